"""The VQ-VAE trainer through its real command line, on 16 generated images."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import kill_when_exists, run_module
from safetensors.torch import load_file

from lesionstudio.vqvae import VQVAE

TINY = [
    "--image-size", "64", "--latent", "32", "--crop", "0", "--batch-size", "4", "--workers", "0",
    "--hidden", "16", "--res-channels", "8", "--res-blocks", "1", "--num-codes", "32", "--code-dim", "8",
    "--lr", "3e-3", "--warmup-steps", "1", "--val-fraction", "0.25", "--seed", "3",
]  # fmt: skip


def train(data: Path, out: Path, epochs: int, *extra: str):
    res = run_module(
        ["-m", "train.vqvae", "--data", str(data), "--out", str(out), "--epochs", str(epochs), *TINY, *extra]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_exports(image_folder: Path, tmp_path: Path):
    out = tmp_path / "run"
    res = train(image_folder / "train", out, 3)
    recs = records(out)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert recs[-1]["train_reconstruction"] < recs[0]["train_reconstruction"]
    assert recs[-1]["val_psnr"] > recs[0]["val_psnr"]
    for name in ("curves.html", "recon_epoch003.png", "checkpoint.pt", "final/config.json",
                 "final/model.safetensors", "final/codebook_usage.json"):  # fmt: skip
        assert (out / name).exists(), name
    assert "val PSNR" in res.stdout
    usage = json.loads((out / "final/codebook_usage.json").read_text())
    assert len(usage["counts"]) == 32 and sum(usage["counts"]) == 12 * 32 * 32

    model = VQVAE.from_pretrained(out / "final")
    again = VQVAE.from_pretrained(out / "final")
    x = torch.rand(2, 3, 64, 64)
    assert model.latent_size == 32
    assert torch.equal(model.encode(x), again.encode(x))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v), k


def test_resume_matches_uninterrupted_run(image_folder: Path, tmp_path: Path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(image_folder / "train", full, 3)
    args = [
        "-m",
        "train.vqvae",
        "--data",
        str(image_folder / "train"),
        "--out",
        str(part),
        "--epochs",
        "3",
        *TINY,
    ]
    kill_when_exists(args, part / "checkpoint.pt")
    assert not (part / "final").exists(), "the run finished before it could be interrupted"
    res = train(image_folder / "train", part, 3, "--resume")
    assert "resumed" in res.stdout
    a = load_file(full / "final/model.safetensors")
    b = load_file(part / "final/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["epoch"] for r in records(part)] == [1, 2, 3]


def test_unwritable_out_fails_early(image_folder: Path, tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = run_module(["-m", "train.vqvae", "--data", str(image_folder / "train"), "--out", str(blocker / "x"), *TINY])
    assert res.returncode != 0 and "cannot write to --out" in res.stderr


def test_empty_data_folder_is_a_clear_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    res = run_module(["-m", "train.vqvae", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), *TINY])
    assert res.returncode != 0 and "no images" in res.stderr


def test_torchrun_two_cpu_processes(image_folder: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    res = run_module(
        ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "train.vqvae", "--data", str(image_folder / "train"), "--out", str(out),
         "--epochs", "1", "--device", "cpu", *TINY],
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["epoch"] for r in records(out)] == [1]
    VQVAE.from_pretrained(out / "final")
