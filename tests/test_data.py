from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, lesion_image, write_images
from PIL import Image
from torch.utils.data import DataLoader

from lesionstudio.data import (
    ImageLoadError,
    LesionImageFolder,
    collate_skip_bad,
    eval_transform,
    find_images,
    load_image,
    min_max_scale,
    read_labels,
    split_indices,
    train_transform,
)


def test_min_max_scaling_reaches_both_ends():
    x = torch.rand(2, 3, 16, 16) * 0.3 + 0.2
    y = min_max_scale(x)
    for img in y:
        assert img.min() == 0.0 and img.max() == 1.0
    assert torch.equal(min_max_scale(torch.full((3, 4, 4), 7.0)), torch.zeros(3, 4, 4))


def test_eval_transform_is_deterministic_and_in_range():
    img = lesion_image(80, seed=3)
    t = eval_transform(64)
    a, b = t(img), t(img)
    assert a.shape == (3, 64, 64) and torch.equal(a, b)
    assert a.min() == 0.0 and a.max() == 1.0


def test_train_augmentations_keep_range_and_vary():
    img = lesion_image(64, seed=1)
    t = train_transform(64, crop=32, jitter=0.2)
    torch.manual_seed(0)
    outs = [t(img) for _ in range(8)]
    for o in outs:
        assert o.shape == (3, 32, 32)
        assert o.min() >= 0.0 and o.max() <= 1.0
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_labels_from_manifest_style_csv(image_folder: Path):
    ds = LesionImageFolder(image_folder / "train", labels_csv=image_folder / "labels.csv")
    assert ds.classes == ["benign", "malignant"]
    assert len(ds) == 16
    names = {p.name: t for p, t in zip(ds.files, ds.targets, strict=True)}
    assert names["lesion_000.jpg"] == 0 and names["lesion_001.png"] == 1
    assert ds.class_counts() == [8, 8]
    img, label = ds[1]
    assert img.shape == (3, 256, 256) and label in (0, 1)


def test_labels_from_isic_one_hot_csv(tmp_path: Path):
    write_images(tmp_path / "imgs", 3)
    csv_path = tmp_path / "gt.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "MEL", "NV", "BCC"])
        w.writerow(["lesion_000", "1.0", "0.0", "0.0"])
        w.writerow(["lesion_001", "0.0", "1.0", "0.0"])
        w.writerow(["lesion_002", "0.0", "0.0", "1.0"])
    labels = read_labels(csv_path)
    assert labels.classes == ["BCC", "MEL", "NV"]
    ds = LesionImageFolder(tmp_path / "imgs", labels_csv=csv_path)
    assert ds.targets == [1, 2, 0]


def test_csv_without_usable_columns_is_a_clear_error(tmp_path: Path):
    p = tmp_path / "bad.csv"
    p.write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="no file column"):
        read_labels(p)


def test_empty_folder_is_a_clear_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        LesionImageFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "missing")


def test_corrupt_files_are_skipped_and_counted(tmp_path: Path, caplog):
    folder = tmp_path / "imgs"
    write_images(folder, 6)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    good = (folder / "lesion_000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    ds = LesionImageFolder(folder, transform=eval_transform(32))
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_skip_bad)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert sum(b.skipped for b in batches) >= 2  # zero-byte and text always fail; truncated may decode
    assert sum(len(b.images) for b in batches) + sum(b.skipped for b in batches) == len(ds)
    assert all(b.images.shape[1:] == (3, 32, 32) for b in batches if len(b.images))
    assert "skipping" in caplog.text


def test_load_image_converts_modes(tmp_path: Path):
    base = lesion_image(40)
    for mode in ("L", "RGBA", "P", "CMYK", "I;16"):
        p = tmp_path / f"img_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
        (base.convert(mode) if mode != "I;16" else base.convert("L").convert("I;16")).save(p)
        out = load_image(p)
        assert out.mode == "RGB" and out.size == (40, 40)
    with pytest.raises(ImageLoadError):
        load_image(tmp_path / "nope.png")


def test_split_is_deterministic_and_disjoint():
    a = split_indices(100, 0.1, seed=1)
    b = split_indices(100, 0.1, seed=1)
    c = split_indices(100, 0.1, seed=2)
    assert a == b and a != c
    train, val = a
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 100


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data/isic256 not present")
def test_real_isic_sample_with_manifest():
    ds = LesionImageFolder(SHARED_DATA / "sample", labels_csv=SHARED_DATA / "MANIFEST.csv")
    assert len(ds) == 16 and ds.class_counts() == [8, 8]
    x, _ = ds[0]
    assert x.shape == (3, 256, 256) and x.min() == 0 and x.max() == 1
    assert Image.open(ds.files[0]).size == (256, 256)


def test_to_pil_rounds_to_the_nearest_level():
    # Truncating (as torchvision's to_pil_image does for floats) would save every image half a
    # level darker than it is: a tell between saved samples and real images for a critic.
    from lesionstudio.data import to_pil

    levels = torch.tensor([0.0, 0.999, 1.6, 127.5, 254.6, 255.0]) / 255
    img = to_pil(levels.view(1, 1, -1).expand(3, 1, -1).contiguous())
    assert [pixel[0] for pixel in img.getdata()] == [0, 1, 2, 128, 255, 255]
