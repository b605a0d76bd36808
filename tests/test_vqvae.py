from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lesionstudio.measure import metrics
from lesionstudio.models.hubmodel import CheckpointError
from lesionstudio.models.vqvae import VQVAE, VectorQuantizer

SMALL = dict(hidden_channels=16, res_channels=8, num_res_blocks=1, num_codes=32, code_dim=8)


@pytest.mark.parametrize("downsample,grid", [(8, 32), (4, 64), (2, 128)])
def test_encode_decode_shapes(downsample: int, grid: int):
    model = VQVAE(downsample=downsample, **SMALL).eval()
    x = torch.rand(2, 3, 256, 256)
    codes = model.encode(x)
    assert codes.shape == (2, grid, grid) and codes.dtype == torch.long
    assert model.latent_size == grid
    out = model.decode_codes(codes)
    assert out.shape == (2, 3, 256, 256)
    assert out.min() >= 0 and out.max() <= 1
    recon, stats = model(x)
    assert recon.shape == x.shape
    for key in ("loss", "reconstruction", "codebook", "commitment", "perplexity", "codes_used"):
        assert key in stats


def test_nearest_code_in_chunks_matches_the_full_distance_matrix():
    torch.manual_seed(0)
    q = VectorQuantizer(num_codes=64, code_dim=8)
    with torch.no_grad():
        q.embedding.copy_(torch.randn(64, 8))
    flat = torch.randn(1000, 8)
    expected = torch.cdist(flat, q.embedding).argmin(1)
    assert torch.equal(q.nearest(flat, chunk=128), expected)  # 1000 rows: 7 full chunks and a part
    assert torch.equal(q.nearest(flat.half()), q.nearest(flat.half().float()))  # half inputs (autocast) work


def test_straight_through_gradient_reaches_encoder():
    model = VQVAE(downsample=4, use_ema=False, **SMALL)
    _, stats = model(torch.rand(2, 3, 32, 32))
    stats["reconstruction"].backward()  # only the reconstruction path crosses the quantiser
    first = model.encoder.net[0].weight.grad
    assert first is not None and first.abs().sum() > 0


def test_losses_equal_hand_computation():
    vq = VectorQuantizer(num_codes=2, code_dim=2, use_ema=False, init_from_data=False, restart_dead_codes=False)
    with torch.no_grad():
        vq.embedding.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    z = torch.tensor([[0.2, 0.1], [0.9, 0.6]]).t().reshape(1, 2, 1, 2)  # two vectors on a 1x2 grid
    q, idx, stats = vq(z)
    assert idx.tolist() == [[[0, 1]]]
    expected = ((0.2**2 + 0.1**2) + (0.1**2 + 0.4**2)) / 4  # mean over 2 vectors x 2 dims
    assert stats["codebook"].item() == pytest.approx(expected)
    assert stats["commitment"].item() == pytest.approx(expected)
    assert torch.allclose(q, torch.tensor([[0.0, 0.0], [1.0, 1.0]]).t().reshape(1, 2, 1, 2))
    # the codebook loss moves codes, the commitment loss moves the encoder output
    z = z.clone().requires_grad_(True)
    _, _, stats = vq(z)
    (stats["codebook"] + 0.25 * stats["commitment"]).backward()
    assert vq.embedding.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


def test_ema_moves_codes_towards_assigned_vectors():
    vq = VectorQuantizer(num_codes=2, code_dim=2, ema_decay=0.5, init_from_data=False, restart_dead_codes=False)
    vq.embedding.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0]]))
    vq.ema_embed_sum.copy_(vq.embedding)
    target = torch.tensor([1.0, 1.0])
    z = target.view(1, 2, 1, 1).expand(1, 2, 4, 4).contiguous()
    vq.train()
    before = (vq.embedding[0] - target).norm()
    for _ in range(3):
        vq(z)
    after = (vq.embedding[0] - target).norm()
    assert after < before * 0.5
    assert torch.equal(vq.embedding[1], torch.tensor([5.0, 5.0])) or vq.cluster_size[1] < 1


def test_dead_codes_are_restarted_on_encoder_outputs():
    vq = VectorQuantizer(num_codes=4, code_dim=2, ema_decay=0.5, init_from_data=False, dead_code_threshold=0.5)
    vq.embedding.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [300.0, 300.0]]))
    vq.ema_embed_sum.copy_(vq.embedding)
    z = torch.randn(1, 2, 4, 4) * 0.1
    vq.train()
    for _ in range(3):
        vq(z)
    far = vq.embedding[1:].abs().max()
    assert far < 1.0, "unused codes far from the data should have been moved onto encoder outputs"


def test_init_from_data_uses_encoder_outputs():
    vq = VectorQuantizer(num_codes=8, code_dim=3, restart_dead_codes=False)
    z = torch.randn(2, 3, 4, 4) + 10
    vq.train()
    vq(z)
    assert bool(vq.initialized)
    assert vq.embedding.mean() > 5  # codes now live where the data is


def test_save_and_reload_give_identical_outputs(tmp_path: Path):
    model = VQVAE(downsample=4, **SMALL).eval()
    x = torch.rand(1, 3, 64, 64)
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"config.json", "model.safetensors"}
    again = VQVAE.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    assert torch.equal(again.encode(x), model.encode(x))
    assert torch.equal(again.decode_codes(model.encode(x)), model.decode_codes(model.encode(x)))


def test_bad_checkpoints_give_clear_errors(tmp_path: Path):
    model = VQVAE(downsample=4, **SMALL)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())

    (folder / "config.json").write_text(json.dumps({**cfg, "num_codes": 0}))
    with pytest.raises(CheckpointError, match="num_codes"):
        VQVAE.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "downsample": 3}))
    with pytest.raises(CheckpointError, match="downsample"):
        VQVAE.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "code_dim": 4}))
    with pytest.raises(CheckpointError, match="does not match"):
        VQVAE.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        VQVAE.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        VQVAE.from_pretrained(folder)


def test_decode_rejects_out_of_range_codes():
    model = VQVAE(downsample=4, **SMALL)
    with pytest.raises(ValueError, match="codes must be in"):
        model.decode_codes(torch.full((1, 4, 4), 32))


def test_metrics():
    x = torch.rand(2, 3, 32, 32)
    assert torch.isinf(metrics.psnr(x, x)).sum() == 0  # clamped, not infinite
    noisy = (x + 0.1).clamp(0, 1)
    assert (metrics.psnr(noisy, x) < 30).all()
    assert metrics.ssim(x, x).min() > 0.999
    counts = torch.tensor([5, 5, 0, 0])
    assert metrics.perplexity(counts) == pytest.approx(2.0)
    assert metrics.entropy_bits(counts) == pytest.approx(1.0)
    assert metrics.dead_code_count(counts) == 2 and metrics.codes_used(counts) == 2
    assert metrics.usage_histogram(torch.tensor([[0, 1], [1, 3]]), 4).tolist() == [1, 2, 0, 1]


def test_shipped_128_config_is_what_the_gpu_recipe_trains():
    """configs/vqvae-128.json is the shipped 128x128 model's config and what the README's GPU recipe trains."""
    from conftest import ROOT

    from train.vqvae import build_model, parse_args

    args = parse_args(["--data", "x", "--out", "y", "--latent", "128", "--batch-size", "64", "--crop", "256"])
    model = build_model(args)
    shipped = json.loads((ROOT / "configs" / "vqvae-128.json").read_text())
    assert VQVAE(**shipped).latent_size == 128
    assert model.config == shipped
    assert json.loads((ROOT / "checkpoints" / "vqvae-128" / "config.json").read_text()) == shipped
