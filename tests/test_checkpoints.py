"""The shipped checkpoints: complete, loadable from their folders (sampling.loading) and a Hub-like server."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED_DATA, run_module, write_images
from fake_hub import serve_repo
from huggingface_hub import ModelCard
from PIL import Image

from lesionstudio.codes import file_sha256
from lesionstudio.models.pixelcnn import GatedPixelCNN
from lesionstudio.models.vqvae import VQVAE
from lesionstudio.sampling import loading

CHECKPOINTS = ROOT / "checkpoints"
SHIPPED = (16, 32, 64, 128)
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
        assert stack.critic.layout_grid == stack.levels[0].latent, "the critic chooses this stack's layouts"
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


@pytest.mark.parametrize("latent", [32, 128])
def test_shipped_stack_through_a_local_hub_server(tmp_path: Path, latent: int):
    script = (
        "import json; from lesionstudio.sampling import loading; "
        f"p = loading.load_stack({latent}, 'lesionstudio/checkpoints'); "
        "print(json.dumps([[lv.latent for lv in p.levels], p.prior.grid_size, sum(p.usage)]))"
    )
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with serve_repo("lesionstudio/checkpoints", CHECKPOINTS) as (endpoint, requests):
        res = run_module(["-c", script], env={**env, "HF_ENDPOINT": endpoint}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    usage = json.loads((CHECKPOINTS / f"vqvae-{latent}" / "codebook_usage.json").read_text())
    levels = [n for n in SHIPPED if n <= latent]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [levels, latent, sum(usage["counts"])]
    assert any(f"pixelcnn-{latent}/model.safetensors" in r for r in requests)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data/isic256")
# The bits are the stack's joint over every level; on the validation split they are 33.6%, 25.2% and
# (64x64) about 30% below the unigram entropy, on these 16 images less (their own unigram entropy is lower).
# At 128x128 the first 4 images: scoring that stack costs about 6 s an image on 2 CPU cores.
@pytest.mark.parametrize(
    ("latent", "min_psnr", "max_bits_ratio", "limit"),
    [(16, 25.0, 0.75, 16), (32, 29.0, 0.8, 16), (64, 32.0, 0.8, 16), (128, 35.0, 0.8, 4)],
)
def test_shipped_models_on_real_images(latent: int, min_psnr: float, max_bits_ratio: float, limit: int):
    """A smoke check on the sample images (training images: the model cards hold held-out numbers)."""
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
            "--limit",
            str(limit),
            "--json",
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["psnr"] > min_psnr and out["bits_per_code"] < max_bits_ratio * out["unigram_bits"]


def test_the_128x128_stack_through_the_commands(tmp_path: Path):
    """synthesize, memorization, quality and evaluate at the finest shipped grid (test-made real images)."""
    write_images(tmp_path / "real", 12, size=256)
    gen = tmp_path / "gen"
    common = ["--checkpoints", str(CHECKPOINTS)]
    res = run_module(
        ["-m", "lesionstudio.synthesize", "--n", "4", "--latent", "128", "--batch-size", "4"]
        + ["--seed", "3", "--out", str(gen), *common]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    with open(gen / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["latent"] for r in rows} == {"128"}
    assert {r["prior_sha256"] for r in rows} == {file_sha256(CHECKPOINTS / "pixelcnn-128" / "model.safetensors")}
    assert all(Image.open(gen / r["file"]).size == (256, 256) for r in rows)

    env = {"LESIONSTUDIO_CACHE": str(tmp_path / "cache")}
    memo = ["-m", "lesionstudio.memorization", "--generated", str(gen), "--train", str(tmp_path / "real")]
    # by default the report goes beside the set: its contact sheet inside would count as a sample below
    res = run_module([*memo, "--holdout-fraction", "0.25", *common], env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"features: encoder of {CHECKPOINTS / 'vqvae-32'}\n" in res.stdout  # not the 128x128 maker
    summary = json.loads(gen.with_name(f"{gen.name}-memorization").joinpath("summary.json").read_text())
    assert summary["generated"] == 4

    res = run_module(
        ["-m", "lesionstudio.quality", "--real", str(tmp_path / "real"), "--generated", str(gen)] + [*common, "--json"],
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["generated_images"] == 4 and out["fd_vq_real_half_vs_generated"] > 0

    res = run_module(
        ["-m", "lesionstudio.evaluate", "--vqvae", str(CHECKPOINTS / "vqvae-128"), "--prior"]
        + [str(CHECKPOINTS / "pixelcnn-128"), "--data", str(tmp_path / "real"), "--limit", "4", "--json"]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["psnr"] > 30 and out["bits_per_code"] < out["unigram_bits"]
    assert out["fine_given_coarse_bits"] < out["bits_per_code"]  # the 64x64 codes say much of the 128x128 ones
