"""The memorisation check flags planted copies of training images and leaves new images alone."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA, lesion_image, make_pair, run_module, write_images
from PIL import Image, ImageOps

from lesionstudio.measure.features import EncoderFeatures, cached, compute, dihedral
from lesionstudio.memorization import check, nearest
from lesionstudio.models.vqvae import VQVAE


def jpeg_recompressed(img: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def plant(train: list[Path], generated: Path, new: list[Image.Image]) -> dict[str, str]:
    """Unrelated images plus an exact copy, a flipped and a turned JPEG-recompressed copy of training images."""
    generated.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(new):
        img.save(generated / f"new_{i}.png")
    Image.open(train[3]).save(generated / "copy_exact.png")
    jpeg_recompressed(ImageOps.mirror(Image.open(train[6]).convert("RGB"))).save(generated / "copy_flipped.jpg")
    jpeg_recompressed(Image.open(train[9]).convert("RGB").rotate(90)).save(generated / "copy_turned.jpg")
    return {"copy_exact.png": train[3].name, "copy_flipped.jpg": train[6].name, "copy_turned.jpg": train[9].name}


def test_cli_flags_copies_and_not_new_images(tmp_path: Path):
    make_pair(tmp_path / "ck", 32)
    train = write_images(tmp_path / "train", 40)
    write_images(tmp_path / "heldout", 16, start_seed=1000)
    planted = plant(train, tmp_path / "gen", [lesion_image(64, seed=500 + i) for i in range(8)])
    out = tmp_path / "report"
    r = run_module(
        [
            "-m",
            "lesionstudio.memorization",
            "--generated",
            str(tmp_path / "gen"),
            "--train",
            str(tmp_path / "train"),
            "--heldout",
            str(tmp_path / "heldout"),
            "--feature-model",
            str(tmp_path / "ck" / "vqvae-32"),
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "f.npz"),
        ]
    )
    assert r.returncode == 0, r.stderr
    with open(out / "memorization.csv", newline="") as f:
        rows = {Path(row["generated"]).name: row for row in csv.DictReader(f)}
    assert len(rows) == 11
    for name, source in planted.items():
        row = rows[name]
        assert row["flagged"] == "1", row
        assert Path(row["nearest_pixel"]).name == source and float(row["pixel_ratio"]) < 0.25
    for name, row in rows.items():
        if name.startswith("new_"):
            assert row["flagged"] == "0", row
            assert float(row["feature_ratio"]) > 0.25 and float(row["pixel_ratio"]) > 0.25
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flagged"] == 3 and summary["train"] == 40 and summary["heldout"] == 16
    sheet = Image.open(out / "closest_pairs.png")
    assert sheet.width == 3 * 128 + 4 * 6 and sheet.height > 3 * 128
    page = (out / "closest_pairs.html").read_text()
    assert page.count("<tr>") == 12 and "flagged" in page and "data:image/png;base64," in page
    assert "flagged (ratio < 0.25 in either space): 3 of 11" in r.stdout


def test_default_heldout_is_the_trainers_split_and_report_is_not_a_sample(tmp_path: Path):
    make_pair(tmp_path / "ck", 32)
    write_images(tmp_path / "train", 30)
    made = write_images(tmp_path / "gen", 3, start_seed=700)
    args = [
        "-m",
        "lesionstudio.memorization",
        "--generated",
        str(tmp_path / "gen"),
        "--train",
        str(tmp_path / "train"),
        "--feature-model",
        str(tmp_path / "ck" / "vqvae-32"),
    ]
    for _ in range(2):  # a second run finds the same 3 samples: the report is beside gen/, not in it
        r = run_module(args, env={"LESIONSTUDIO_CACHE": str(tmp_path / "cache")})
        assert r.returncode == 0, r.stderr
        summary = json.loads((tmp_path / "gen-memorization" / "summary.json").read_text())
        assert (summary["generated"], summary["train"], summary["heldout"]) == (3, 27, 3)
        assert sorted((tmp_path / "gen").iterdir()) == made  # the set is left as it was
    assert len(list((tmp_path / "cache").glob("features-*.npz"))) == 1  # training features reused
    bad = run_module(
        [
            "-m",
            "lesionstudio.memorization",
            "--generated",
            str(tmp_path / "nothing"),
            "--train",
            str(tmp_path / "train"),
        ]
    )
    assert bad.returncode != 0 and "does not exist" in bad.stderr


def test_default_feature_model_is_not_the_one_that_made_the_samples(tmp_path: Path):
    for latent in (32, 64):
        make_pair(tmp_path / "ck", latent)
    write_images(tmp_path / "train", 12)
    write_images(tmp_path / "gen", 2, start_seed=300)
    args = [
        "-m",
        "lesionstudio.memorization",
        "--generated",
        str(tmp_path / "gen"),
        "--train",
        str(tmp_path / "train"),
        "--checkpoints",
        str(tmp_path / "ck"),
        "--holdout-fraction",
        "0.25",
    ]
    env = {"LESIONSTUDIO_CACHE": str(tmp_path / "cache")}
    r = run_module(args, env=env)
    assert r.returncode == 0, r.stderr
    assert f"features: encoder of {tmp_path / 'ck' / 'vqvae-32'}\n" in r.stdout
    (tmp_path / "gen" / "metadata.csv").write_text("file,class,latent\nlesion_000.jpg,benign,32\n")
    r = run_module(args, env=env)
    assert r.returncode == 0, r.stderr
    assert f"features: encoder of {tmp_path / 'ck' / 'vqvae-64'}\n" in r.stdout


def test_nearest_takes_the_best_orientation_and_excludes():
    import torch

    train = torch.tensor([[0.0, 0.0], [10.0, 0.0], [9.0, 7.0]])
    queries = torch.tensor([[[9.0, 9.0], [9.5, 0.0]]])  # the second orientation is closest to row 1
    found = nearest(queries, train)
    assert found.index.tolist() == [1] and found.distance.tolist() == [pytest.approx(0.5)]
    found = nearest(queries, train, exclude=torch.tensor([1]))
    assert found.index.tolist() == [2]


def test_feature_cache_is_rebuilt_when_files_change(tmp_path: Path):
    make_pair(tmp_path / "ck", 32)
    files = write_images(tmp_path / "imgs", 4)
    extractor = EncoderFeatures(VQVAE.from_pretrained(tmp_path / "ck" / "vqvae-32"))
    cache = tmp_path / "c.npz"
    a = cached(files, extractor, cache)
    assert cache.exists() and a.features.shape == (4, 4 * 16)
    lesion_image(64, seed=99).save(files[0])  # same name, new content
    b = cached(files, extractor, cache)
    assert not (a.features[0] == b.features[0]).all() and (a.features[1:] == b.features[1:]).all()
    views = compute(files[:2], extractor, all_orientations=True)
    assert views.features.shape == (2, 8, 64) and len(dihedral(views.pixels[:1, 0].view(1, 3, 32, 32))) == 8


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data/isic256")
def test_real_isic_copies_are_flagged_with_the_shipped_encoder(tmp_path: Path):
    from lesionstudio.data import find_images
    from lesionstudio.sampling.loading import load_stack

    files = find_images(SHARED_DATA / "train")
    train, heldout, new = files[:300], files[300:364], files[364:376]
    extractor = EncoderFeatures(load_stack(32, require_prior=False).vqvae)
    gen_dir = tmp_path / "gen"
    # Real lesions the "model" never saw stand in for good samples.
    planted = plant(train, gen_dir, [Image.open(f).convert("RGB") for f in new])
    gen_files = sorted(gen_dir.iterdir())
    report = check(
        compute(gen_files, extractor, all_orientations=True),
        cached(train, extractor, tmp_path / "t.npz"),
        compute(heldout, extractor, all_orientations=True),
    )
    rows = {Path(r["generated"]).name: r for r in report.rows}
    for name in planted:
        assert rows[name]["flagged"] == 1 and rows[name]["feature_ratio"] < 0.2, rows[name]
    unflagged = [r for n, r in rows.items() if n.startswith("new_")]
    ratios = [(r["feature_ratio"], r["pixel_ratio"]) for r in unflagged]
    assert unflagged and all(r["flagged"] == 0 for r in unflagged), ratios
