"""The shipped checkpoints: complete, loadable from their folders (lesionstudio.loading) and a Hub-like server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED_DATA, run_module
from fake_hub import serve_repo
from huggingface_hub import ModelCard

from lesionstudio import loading
from lesionstudio.pixelcnn import GatedPixelCNN
from lesionstudio.vqvae import VQVAE

CHECKPOINTS = ROOT / "checkpoints"
SHIPPED = (16, 32, 64)
WEIGHTS_LICENSE = "cc-by-nc-sa-4.0"  # trained on ISIC images, some CC-BY-NC / CC BY-NC-SA


def test_every_shipped_latent_has_a_complete_pair():
    assert loading.available_latents(CHECKPOINTS) == list(SHIPPED)
    files = {p.relative_to(CHECKPOINTS).as_posix() for p in CHECKPOINTS.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]  # no pickles
    for latent in SHIPPED:
        for name in (f"vqvae-{latent}", f"pixelcnn-{latent}"):
            assert {f"{name}/config.json", f"{name}/model.safetensors", f"{name}/README.md"} <= files
            assert (CHECKPOINTS / name / "model.safetensors").stat().st_size < 50 * 2**20
            card = (CHECKPOINTS / name / "README.md").read_text()
            meta = ModelCard(card).data
            assert meta.library_name == "lesionstudio" and meta.tags and meta.pipeline_tag, name
            assert meta.license == WEIGHTS_LICENSE and meta.datasets is None, name  # no made-up dataset id
            assert "apache-2.0" not in card.lower().replace("the code is apache-2.0", ""), name
            assert "bits_per_code" in card if name.startswith("pixelcnn") else "psnr" in card
        usage = json.loads((CHECKPOINTS / f"vqvae-{latent}" / "codebook_usage.json").read_text())
        assert len(usage["counts"]) == 512 and sum(usage["counts"]) == usage["images"] * latent * latent
    assert {"critic/config.json", "critic/model.safetensors", "critic/README.md"} <= files


def test_the_shipped_stacks_stand_on_the_16x16_layout_level():
    for latent in SHIPPED:
        stack = loading.load_stack(latent)
        assert [level.latent for level in stack.levels] == [n for n in SHIPPED if n <= latent]
        assert stack.critic is not None
        assert stack.levels[0].prior.kernel_size // 2 * stack.levels[0].prior.num_layers >= 16, (
            "the layout prior's receptive field covers its whole grid"
        )


@pytest.mark.parametrize("latent", SHIPPED)
def test_shipped_pair_loads_from_its_folders_and_through_hub(latent: int):
    vq = VQVAE.from_pretrained(CHECKPOINTS / f"vqvae-{latent}")
    prior = GatedPixelCNN.from_pretrained(CHECKPOINTS / f"pixelcnn-{latent}")
    assert vq.latent_size == latent and prior.grid_size == latent and prior.class_names == ["benign", "malignant"]
    pair = loading.load_stack(latent)  # the bundled folder is the default source
    assert pair.vqvae_dir == CHECKPOINTS / f"vqvae-{latent}" and pair.usage is not None
    for a, b in zip(vq.state_dict().values(), pair.vqvae.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    if prior.hierarchical:  # it fills in the shipped coarser pair's grid
        assert pair.coarse is not None and pair.coarse.vqvae_dir == CHECKPOINTS / f"vqvae-{prior.cond_grid_size}"


def test_shipped_32_pair_through_a_local_hub_server(tmp_path: Path):
    script = (
        "import json; from lesionstudio import loading; p = loading.load_stack(32, 'lesionstudio/checkpoints'); "
        "print(json.dumps([p.vqvae.latent_size, p.prior.grid_size, sum(p.usage)]))"
    )
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with serve_repo("lesionstudio/checkpoints", CHECKPOINTS) as (endpoint, requests):
        res = run_module(["-c", script], env={**env, "HF_ENDPOINT": endpoint}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    usage = json.loads((CHECKPOINTS / "vqvae-32" / "codebook_usage.json").read_text())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [32, 32, sum(usage["counts"])]
    assert any("pixelcnn-32/model.safetensors" in r for r in requests)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data/isic256")
# The bits are the stack's joint over every level; on the validation split they are 33.6%, 25.2% and
# (64x64) about 30% below the unigram entropy, on these 16 images less (their own unigram entropy is lower).
@pytest.mark.parametrize(("latent", "min_psnr", "max_bits_ratio"), [(16, 25.0, 0.75), (32, 29.0, 0.8), (64, 32.0, 0.8)])
def test_shipped_models_on_real_images(latent: int, min_psnr: float, max_bits_ratio: float):
    """A smoke check on the 16 sample images (training images: the model cards hold held-out numbers)."""
    res = run_module(
        [
            "-m",
            "lesionstudio.evaluate",
            "--vqvae",
            str(CHECKPOINTS / f"vqvae-{latent}"),
            "--prior",
            str(CHECKPOINTS / f"pixelcnn-{latent}"),
            "--data",
            str(SHARED_DATA / "sample"),
            "--json",
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["psnr"] > min_psnr and out["bits_per_code"] < max_bits_ratio * out["unigram_bits"]
