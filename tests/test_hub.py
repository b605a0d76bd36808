"""Loading VQ-VAE + prior pairs: local folders, the environment variable, a Hub-like server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_pair, run_module
from fake_hub import serve_repo

from lesionstudio.models.hubmodel import CheckpointError
from lesionstudio.sampling import loading


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    root = tmp_path / "ckpts"
    make_pair(root, 64)
    make_pair(root, 32)
    return root


def test_load_local_pair(checkpoints: Path):
    assert loading.available_latents(checkpoints) == [32, 64]
    pair = loading.load_stack(64, checkpoints)
    assert pair.vqvae.latent_size == 64 and pair.prior is not None and pair.prior.grid_size == 64
    assert pair.usage == list(range(16))
    assert pair.vqvae_dir == checkpoints / "vqvae-64"
    with pytest.raises(CheckpointError, match="no vqvae-128"):
        loading.load_stack(128, checkpoints)
    with pytest.raises(ValueError, match="latent size"):
        loading.load_stack(48, checkpoints)


def test_environment_variable_names_the_default_folder(checkpoints: Path, monkeypatch):
    monkeypatch.setenv(loading.ENV_VAR, str(checkpoints))
    assert loading.default_source() == checkpoints
    assert loading.load_stack(32).vqvae.latent_size == 32
    monkeypatch.delenv(loading.ENV_VAR)
    assert loading.default_source() == loading.BUNDLED


def test_mismatched_pair_is_a_clear_error(tmp_path: Path):
    root = tmp_path / "bad"
    make_pair(root, 64, num_codes=16, prior_codes=32)
    with pytest.raises(CheckpointError, match=r"does not match.*K: prior 32 vs VQ-VAE 16"):
        loading.load_stack(64, root)
    # a prior trained for another grid
    make_pair(root, 32)
    (root / "pixelcnn-64").rename(root / "old")
    (root / "pixelcnn-32").rename(root / "pixelcnn-64")
    with pytest.raises(CheckpointError, match="grid size: prior 32 vs VQ-VAE 64"):
        loading.load_stack(64, root)


def test_missing_and_corrupt_files_name_the_folder(checkpoints: Path):
    (checkpoints / "pixelcnn-64" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="pixelcnn-64.*corrupt"):
        loading.load_stack(64, checkpoints)
    (checkpoints / "vqvae-32" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="vqvae-32: missing config.json"):
        loading.load_stack(32, checkpoints)
    with pytest.raises(CheckpointError, match="does not exist"):
        loading.load_stack(64, checkpoints / "nowhere")


def test_vqvae_alone_loads_without_a_prior(tmp_path: Path):
    root = tmp_path / "only"
    make_pair(root, 64)
    for f in (root / "pixelcnn-64").iterdir():
        f.unlink()
    (root / "pixelcnn-64").rmdir()
    pair = loading.load_stack(64, root, require_prior=False)
    assert pair.prior is None
    with pytest.raises(CheckpointError, match="no pixelcnn-64"):
        loading.load_stack(64, root)


LOAD_SCRIPT = """
import json
from lesionstudio.sampling import loading
print(json.dumps({"latents": loading.available_latents("lesion/checkpoints"),
                  "grid": loading.load_stack(64, "lesion/checkpoints").prior.grid_size}))
"""


def test_hub_repo_through_a_local_hub_server(checkpoints: Path, tmp_path: Path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with serve_repo("lesion/checkpoints", checkpoints) as (endpoint, requests):
        res = run_module(["-c", LOAD_SCRIPT], env={**env, "HF_ENDPOINT": endpoint}, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout.strip().splitlines()[-1]) == {"latents": [32, 64], "grid": 64}
        assert any("vqvae-64/model.safetensors" in r for r in requests)
        assert any(r.startswith("GET") for r in requests)
    # the server is gone: offline mode loads the same files from the cache
    res = run_module(["-c", LOAD_SCRIPT], env={**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": endpoint}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # an unknown repo is a clear error
    with serve_repo("lesion/checkpoints", checkpoints) as (endpoint, _):
        script = "from lesionstudio.sampling import loading; loading.load_stack(64, 'other/repo')"
        res = run_module(["-c", script], env={**env, "HF_ENDPOINT": endpoint}, timeout=300)
        assert res.returncode != 0 and "not found" in res.stderr


def test_evaluate_cli_json(checkpoints: Path, image_folder: Path):
    res = run_module(
        [
            "-m",
            "lesionstudio.evaluate",
            "--vqvae",
            str(checkpoints / "vqvae-64"),
            "--prior",
            str(checkpoints / "pixelcnn-64"),
            "--data",
            str(image_folder / "train"),
            "--limit",
            "4",
            "--json",
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == {"psnr", "ssim", "perplexity", "codes_used", "bits_per_code", "unigram_bits"}
    assert out["bits_per_code"] > 0 and 0 < out["codes_used"] <= 16 and out["psnr"] > 0
    res = run_module(
        [
            "-m",
            "lesionstudio.evaluate",
            "--vqvae",
            str(checkpoints / "vqvae-64"),
            "--data",
            str(image_folder / "train"),
            "--split",
            "val",
            "--val-fraction",
            "0.25",
            "--json",
        ]
    )
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bits_per_code"] is None and "images:        4" in res.stdout
