"""Safe loading (never unpickle), crash-safe training, NaN and full-disk handling."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_VQVAE_ARGS, make_pair, run_module
from safetensors.torch import load_file

from lesionstudio.models.hubmodel import CheckpointError
from lesionstudio.models.vqvae import VQVAE
from lesionstudio.sampling import loading
from train import common

TINY = [*TINY_VQVAE_ARGS, "--seed", "5"]


class Payload:
    """Unpickling this creates a marker file: proof that a loader ran pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_weights_are_never_loaded(tmp_path: Path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpts" / "vqvae-64"
    make_pair(tmp_path / "ckpts", 64)
    (folder / "model.safetensors").unlink()
    for name in ("pytorch_model.bin", "model.pt"):
        (folder / name).write_bytes(pickle.dumps({"state": Payload(marker)}))
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        VQVAE.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        loading.load_stack(64, tmp_path / "ckpts")
    assert not marker.exists()


def test_tampered_training_checkpoint_is_refused(image_folder: Path, tmp_path: Path):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": Payload(marker), "epoch": 1}, out / "checkpoint.pt")
    res = run_module(
        [
            "-m",
            "train.vqvae",
            "--data",
            str(image_folder / "train"),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--resume",
            *TINY,
        ]
    )
    assert res.returncode != 0 and "cannot be loaded" in res.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    "change,message",
    [
        ({"num_codes": "512"}, "num_codes must be an integer"),
        ({"beta": -1}, "beta"),
        ({"image_size": 102}, "multiple of downsample"),
        ({"bogus": 1}, "unknown config keys"),
    ],
)
def test_impossible_configs_are_clear_errors(tmp_path: Path, change: dict, message: str):
    make_pair(tmp_path, 64)
    cfg_path = tmp_path / "vqvae-64" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    with pytest.raises(CheckpointError, match=message):
        VQVAE.from_pretrained(tmp_path / "vqvae-64")


def test_full_disk_fails_early(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(common.shutil, "disk_usage", lambda _: type("U", (), {"free": 10 * 2**20})())
    with pytest.raises(SystemExit, match="only 10 MiB free"):
        common.check_output_dir(tmp_path / "out", need_bytes=200 * 2**20)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    image_folder: Path, tmp_path: Path, monkeypatch
):
    from train import vqvae as trainer

    out = tmp_path / "run"
    trainer.main(["--data", str(image_folder / "train"), "--out", str(out), "--epochs", "1", *TINY])
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    calls = {"n": 0}
    forward = VQVAE.forward

    def poisoned(self, images):
        recon, stats = forward(self, images)
        calls["n"] += 1
        if calls["n"] == 2:
            stats["loss"] = stats["loss"] * float("nan")
        return recon, stats

    monkeypatch.setattr(VQVAE, "forward", poisoned)
    with pytest.raises(SystemExit, match="loss became nan at epoch 2"):
        trainer.main(["--data", str(image_folder / "train"), "--out", str(out), "--epochs", "3", "--resume", *TINY])
    kept = torch.load(out / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == 1
    for k, v in good["model"].items():
        assert torch.equal(kept["model"][k], v)


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _check_every_checkpoint_loads(out: Path) -> None:
    for ckpt in out.glob("*.pt"):
        torch.load(ckpt, weights_only=True)
    if (out / "final" / "model.safetensors").exists():
        VQVAE.from_pretrained(out / "final")


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(image_folder: Path, tmp_path: Path):
    data = str(image_folder / "train")
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["-m", "train.vqvae", "--data", data, "--epochs", "4", *TINY]
    res = run_module([*args, "--out", str(full)])
    assert res.returncode == 0, res.stderr[-2000:]

    rng = random.Random(0)
    kills = 0
    killed_while_saving = False
    # First kill: the moment a checkpoint is being written (its temporary file exists).
    proc = _start([*args, "--out", str(killed)])
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if list(killed.glob(".checkpoint.pt.*.tmp")):
            proc.send_signal(signal.SIGKILL)
            kills += 1
            killed_while_saving = True
            break
    proc.wait()
    assert killed_while_saving, "the run ended before a checkpoint write could be interrupted"
    _check_every_checkpoint_loads(killed)
    # Then kills at random moments, each followed by --resume, until the run finishes.
    for _ in range(20):
        if (killed / "final" / "model.safetensors").exists():
            break
        proc = _start([*args, "--out", str(killed), "--resume"])
        try:
            proc.wait(timeout=rng.uniform(2.0, 8.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        _check_every_checkpoint_loads(killed)
    else:
        res = run_module([*args, "--out", str(killed), "--resume"])
        assert res.returncode == 0
    assert kills >= 1
    assert (killed / "final" / "model.safetensors").exists()
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not list(killed.glob(".checkpoint.pt.*.tmp"))
