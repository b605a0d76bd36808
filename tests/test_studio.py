"""The studio's tasks as library calls, on tiny checkpoints made in the test."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import lesion_image, make_pair
from PIL import Image

from lesionstudio.app.studio import Studio, StudioError, mask_to_codes, zip_images


@pytest.fixture(scope="module")
def studio(tmp_path_factory) -> Studio:
    root = tmp_path_factory.mktemp("ckpts")
    make_pair(root, 32)
    return Studio(root)


@pytest.fixture
def upload(tmp_path: Path) -> Path:
    p = tmp_path / "lesion.jpg"
    lesion_image(300, seed=4).save(p)
    return p


def test_reconstruct(studio: Studio, upload: Path):
    r = studio.reconstruct(str(upload), 32)
    for img in (r.original, r.reconstruction, r.error, r.code_map):
        assert img.size == (256, 256) and img.mode == "RGB"
    assert np.isfinite(r.psnr) and -1 <= r.ssim <= 1
    assert r.codes.shape == (32, 32)


def test_codebook_views(studio: Studio):
    fig, stats = studio.codebook_usage(32)
    assert stats["codes"] == 16 and stats["used"] == 15 and stats["dead"] == 1  # usage 0..15
    assert sorted(fig.data[0].y, reverse=True) == list(fig.data[0].y)
    assert studio.code_patch(32, 3).size == (256, 256)
    with pytest.raises(StudioError, match="between 0 and 15"):
        studio.code_patch(32, 16)
    atlas = studio.codebook_atlas(32, tile=2)
    assert atlas.size[0] == atlas.size[1] > 0


def test_code_occurrences_in_a_data_folder(tmp_path: Path):
    from conftest import write_images

    make_pair(tmp_path / "ck", 32)
    write_images(tmp_path / "data", 5)
    studio = Studio(tmp_path / "ck", data_dir=tmp_path / "data")
    code = int(studio.reconstruct(str(tmp_path / "data" / "lesion_000.jpg"), 32).codes[0, 0])
    found = studio.code_occurrences(32, code, top=3)
    assert 1 <= len(found) <= 3 and found[0][0].size == (256, 256)
    counts = [int(caption.split(": ")[1].split()[0]) for _, caption in found]
    assert counts == sorted(counts, reverse=True) and counts[0] > 0
    assert Studio(tmp_path / "ck").code_occurrences(32, code) == []


def test_nearest_training_image_of_samples(tmp_path: Path, monkeypatch):
    from conftest import write_images

    monkeypatch.setenv("LESIONSTUDIO_CACHE", str(tmp_path / "cache"))
    make_pair(tmp_path / "ck", 32)
    files = write_images(tmp_path / "data", 12)
    studio = Studio(tmp_path / "ck", data_dir=tmp_path / "data")
    samples = studio.generate(32, n=2, seed=1)
    found = studio.nearest_training(samples)
    assert len(found) == 2 and all(img.size == (256, 256) for img, _ in found)
    assert found[0][1].startswith("1: ") and ", lesion_" in found[0][1]
    copy = Image.open(files[5]).transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # a mirrored training image
    ((_, caption),) = studio.nearest_training([copy])
    assert caption == f"1: 0.00 copy?, {files[5].name}"
    assert Studio(tmp_path / "ck").nearest_training(samples) == []  # no data folder: nothing to show


def test_generate_is_reproducible_and_honours_classes(studio: Studio):
    a = studio.generate(32, n=2, temperature=1.0, seed=3, class_name="malignant")
    b = studio.generate(32, n=2, temperature=1.0, seed=3, class_name="malignant")
    assert len(a) == 2 and all(img.size == (256, 256) for img in a)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    assert studio.class_choices(32) == ["any", "benign", "malignant"]
    with pytest.raises(StudioError, match="Unknown class"):
        studio.generate(32, n=1, class_name="nevus")
    with pytest.raises(StudioError, match="between 1 and"):
        studio.generate(32, n=0)
    with pytest.raises(StudioError, match="not available"):
        studio.generate(64, n=1)


def test_inpaint_keeps_unmasked_codes(studio: Studio, upload: Path):
    mask = np.zeros((300, 300, 4), dtype=np.uint8)
    mask[100:180, 120:200, 3] = 255
    original, variants, codes, code_mask, variant_codes = studio.inpaint(str(upload), mask, 32, n=2, seed=1)
    assert len(variants) == 2 and code_mask.any() and not code_mask.all()
    for vc in variant_codes:
        assert torch.equal(vc[~code_mask], codes[~code_mask])
    with pytest.raises(StudioError, match="mask is empty"):
        studio.inpaint(str(upload), np.zeros((300, 300, 4), np.uint8), 32)


def test_mask_to_codes_marks_every_touched_patch():
    m = np.zeros((256, 256), dtype=np.uint8)
    m[0, 0] = 255  # one pixel touches one code
    m[255, 200] = 255
    codes = mask_to_codes(Image.fromarray(m), 32)
    assert codes.sum() == 2 and codes[0, 0] and codes[31, 25]
    assert not mask_to_codes(None, 8).any()


def test_bad_uploads_get_clear_messages(studio: Studio, tmp_path: Path, upload: Path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, not an image")
    good = upload.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[:200])
    big = Image.new("L", (8000, 6000))  # 48 MP of one colour compresses to a few KB
    big.save(tmp_path / "huge.png")
    cases = {
        "empty.jpg": "empty",
        "text.png": "could not be read",
        "truncated.jpg": "could not be read",
        "huge.png": "limit",
    }
    for name, message in cases.items():
        with pytest.raises(StudioError, match=message):
            studio.reconstruct(str(tmp_path / name), 32)
    with pytest.raises(StudioError, match="upload an image"):
        studio.reconstruct(None, 32)
    assert studio.reconstruct(str(upload), 32).psnr > 0  # still serving


def test_vqvae_without_prior_serves_reconstruct_only(tmp_path: Path, upload: Path):
    make_pair(tmp_path, 64)
    for f in (tmp_path / "pixelcnn-64").iterdir():
        f.unlink()
    (tmp_path / "pixelcnn-64").rmdir()
    studio = Studio(tmp_path)
    assert studio.latents == [64]
    assert studio.reconstruct(str(upload), 64).codes.shape == (64, 64)
    assert studio.class_choices(64) == ["any"]
    with pytest.raises(StudioError, match="generation needs one"):
        studio.generate(64, n=1)
    with pytest.raises(StudioError, match="no VQ-VAE checkpoints"):
        Studio(tmp_path / "vqvae-64")


def test_zip_images():
    data = zip_images([lesion_image(16), lesion_image(16, seed=1)])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == ["lesion_000.png", "lesion_001.png"]
        assert Image.open(io.BytesIO(zf.read("lesion_001.png"))).size == (16, 16)


def test_quiz_images_drawn_together_are_each_the_image_drawn_alone(studio: Studio):
    from lesionstudio.app.readerstudy import Trial

    trials = [Trial(i, "synthetic", seed=s) for i, s in enumerate((11, 12345, 7))]
    together = studio.quiz_synthetic_images(trials)
    assert sorted(together) == [0, 1, 2]
    for t in trials:
        alone = studio.quiz_synthetic_images([t])[t.index]
        assert np.array_equal(np.asarray(alone), np.asarray(together[t.index]))
    assert not np.array_equal(np.asarray(together[0]), np.asarray(together[1]))
