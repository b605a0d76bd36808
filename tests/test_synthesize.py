"""python -m lesionstudio.synthesize: N labelled images with provenance, resumable, reproducible."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_pair, run_module
from PIL import Image

from lesionstudio.codes import file_sha256
from lesionstudio.sampling.generation import GenerationSettings
from lesionstudio.sampling.grid import sample
from lesionstudio.sampling.loading import load_stack
from lesionstudio.synthesize import COLUMNS, Shard, image_seed, merge_metadata, synthesize


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpts")
    make_pair(root, 32)
    return root


def rows_of(folder: Path) -> list[dict]:
    with open(folder / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_cli_writes_n_images_with_matching_metadata(ckpts: Path, tmp_path: Path):
    out = tmp_path / "synth"
    r = run_module(
        [
            "-m",
            "lesionstudio.synthesize",
            "--n",
            "5",
            "--out",
            str(out),
            "--latent",
            "32",
            "--batch-size",
            "2",
            "--checkpoints",
            str(ckpts),
            "--temperature",
            "0.8",
            "--seed",
            "3",
        ]
    )
    assert r.returncode == 0, r.stderr
    pngs = sorted(out.glob("*.png"))
    rows = rows_of(out)
    assert len(pngs) == 5 and [row["file"] for row in rows] == [p.name for p in pngs]
    assert set(COLUMNS) <= set(rows[0])
    for row in rows:
        assert Image.open(out / row["file"]).size == (256, 256)
        assert row["latent"] == "32" and float(row["temperature"]) == 0.8 and row["seed"] == "3"
        assert row["class"] in ("benign", "malignant")
        assert row["vqvae_sha256"] == file_sha256(ckpts / "vqvae-32" / "model.safetensors")
        assert row["prior_sha256"] == file_sha256(ckpts / "pixelcnn-32" / "model.safetensors")
        assert 0 < float(row["bits_per_code"]) < 10
    assert "synthetic" in (out / "README.md").read_text().lower()
    assert "5 images" in r.stdout


def test_bits_per_code_is_the_priors_nll_of_the_image_codes(ckpts: Path, tmp_path: Path):
    pair = load_stack(32, ckpts)
    row = synthesize(tmp_path, 1, pair, GenerationSettings(class_name="benign"), seed=11, show_progress=False)[0]
    codes = sample(pair.prior, 1, seed=[int(row["image_seed"])], labels=torch.tensor([0]))
    expected = float(pair.prior.nll_bits(codes, torch.tensor([0]))[0])
    assert float(row["bits_per_code"]) == pytest.approx(expected, abs=1e-3)
    decoded = (pair.vqvae.decode_codes(codes)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.abs(pixels(tmp_path / row["file"]).astype(int) - decoded.astype(int)).max() <= 1


def test_rerun_resumes_and_same_seed_same_images(ckpts: Path, tmp_path: Path):
    pair = load_stack(32, ckpts)
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize(a, 4, pair, seed=5, batch_size=3, show_progress=False)
    # An interrupted run: one image lost, one row lost; a re-run (other batch size) completes it.
    synthesize(b, 4, pair, seed=5, batch_size=2, show_progress=False)
    (b / "synthetic_000002.png").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in b.glob("*.png")}
    rows = synthesize(b, 6, pair, seed=5, batch_size=4, show_progress=False)
    assert len(rows) == 6 and len(list(b.glob("*.png"))) == 6 and len(rows_of(b)) == 6
    after = {p.name: p.stat().st_mtime_ns for p in b.glob("*.png")}
    assert all(after[name] == t for name, t in before.items())  # existing images were skipped
    for i in range(4):  # same seed: same images, whatever the batches were
        name = f"synthetic_{i:06d}.png"
        assert np.array_equal(pixels(a / name), pixels(b / name))
    other = synthesize(tmp_path / "c", 2, pair, seed=6, show_progress=False)
    assert not np.array_equal(pixels(a / "synthetic_000000.png"), pixels(tmp_path / "c" / other[0]["file"]))
    assert image_seed(5, 1) != image_seed(6, 0)


def test_classes_are_honoured(ckpts: Path, tmp_path: Path):
    pair = load_stack(32, ckpts)
    rows = synthesize(tmp_path / "m", 3, pair, GenerationSettings(class_name="malignant"), seed=1, show_progress=False)
    assert [r["class"] for r in rows] == ["malignant"] * 3
    # The class reaches the prior: the same seeds under the other class give other codes.
    rows_b = synthesize(tmp_path / "b", 3, pair, GenerationSettings(class_name="benign"), seed=1, show_progress=False)
    assert [r["class"] for r in rows_b] == ["benign"] * 3
    assert any(not np.array_equal(pixels(tmp_path / "m" / r["file"]), pixels(tmp_path / "b" / r["file"])) for r in rows)
    mixed = synthesize(
        tmp_path / "any", 12, pair, GenerationSettings(class_name="any"), seed=1, batch_size=6, show_progress=False
    )
    assert {r["class"] for r in mixed} == {"benign", "malignant"}
    with pytest.raises(ValueError, match="Unknown class 'nevus'"):
        synthesize(tmp_path / "x", 1, pair, GenerationSettings(class_name="nevus"), show_progress=False)


def test_other_settings_are_refused_not_mixed(ckpts: Path, tmp_path: Path):
    pair = load_stack(32, ckpts)
    synthesize(tmp_path, 2, pair, seed=1, show_progress=False)
    before = (tmp_path / "metadata.csv").read_bytes()
    with pytest.raises(ValueError, match="temperature"):
        synthesize(tmp_path, 3, pair, GenerationSettings(temperature=0.5), seed=1, show_progress=False)
    with pytest.raises(ValueError, match="seed"):
        synthesize(tmp_path, 3, pair, seed=2, show_progress=False)
    assert (tmp_path / "metadata.csv").read_bytes() == before and len(list(tmp_path.glob("*.png"))) == 2
    r = run_module(
        [
            "-m",
            "lesionstudio.synthesize",
            "--n",
            "2",
            "--out",
            str(tmp_path),
            "--latent",
            "32",
            "--checkpoints",
            str(ckpts),
            "--temperature",
            "-1",
        ]
    )
    # The rules of lesionstudio.sampling.generation, the same as the Generate tab's.
    assert r.returncode != 0 and "Temperature must be between 0 and 4" in r.stderr


def test_unconditional_prior_refuses_a_class(tmp_path: Path):
    from lesionstudio.models.pixelcnn import GatedPixelCNN

    make_pair(tmp_path / "ck", 32)
    GatedPixelCNN(num_codes=16, channels=8, num_layers=2, grid_size=32, code_dim=4).save_pretrained(
        tmp_path / "ck" / "pixelcnn-32"
    )
    pair = load_stack(32, tmp_path / "ck")
    with pytest.raises(ValueError, match="unconditional"):
        synthesize(tmp_path / "o", 1, pair, GenerationSettings(class_name="benign"), show_progress=False)
    rows = synthesize(tmp_path / "o", 2, pair, show_progress=False)
    assert [r["class"] for r in rows] == ["", ""]


def files_of(folder: Path) -> dict[str, bytes]:
    """Every image and the metadata, byte for byte (not the README: it holds the time it was written)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "README.md"}


def test_shares_make_the_same_files_as_one_process_and_resume(ckpts: Path, tmp_path: Path):
    pair = load_stack(32, ckpts)
    one, shared = tmp_path / "one", tmp_path / "shared"
    synthesize(one, 5, pair, seed=3, batch_size=2, show_progress=False)
    rows = synthesize(shared, 5, pair, seed=3, batch_size=2, show_progress=False, shard=Shard(1, 2))
    assert [r["index"] for r in rows] == ["1", "3"] and not (shared / "metadata.csv").exists()
    assert [p.name for p in shared.glob("metadata.part*")] == ["metadata.part1of2.csv"]
    # The other share, as a resumed run of one process would finish it: it folds the share in.
    synthesize(shared, 5, pair, seed=3, batch_size=3, show_progress=False, shard=Shard(0, 2))
    assert merge_metadata(shared, pair) == 5 and not list(shared.glob("metadata.part*"))
    assert files_of(shared) == files_of(one)
    (shared / "synthetic_000003.png").unlink()  # interrupted: one process completes it
    synthesize(shared, 5, pair, seed=3, show_progress=False)
    assert files_of(shared) == files_of(one)
    with pytest.raises(ValueError, match="rank"):
        Shard(2, 2)


@pytest.mark.parametrize("launch", ["workers", "torchrun"])
def test_cli_shares_give_the_files_of_one_process(ckpts: Path, tmp_path: Path, launch: str):
    # --images: torchrun's parser would take --n for one of its own options.
    args = ["--images", "5", "--latent", "32", "--batch-size", "2", "--checkpoints", str(ckpts), "--seed", "4"]
    one = run_module(["-m", "lesionstudio.synthesize", "--out", str(tmp_path / "one"), *args])
    assert one.returncode == 0, one.stderr
    if launch == "workers":
        cmd = ["-m", "lesionstudio.synthesize", "--workers", "2"]
    else:  # two ranks on this machine, gloo: as over several machines sharing the output folder
        torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531"]
        cmd = [*torchrun, "-m", "lesionstudio.synthesize"]
    shared = run_module([*cmd, "--out", str(tmp_path / "shared"), *args])
    assert shared.returncode == 0, shared.stderr
    assert files_of(tmp_path / "shared") == files_of(tmp_path / "one")
    assert "- images: 5 (" in (tmp_path / "shared" / "README.md").read_text()
