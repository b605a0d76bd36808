"""Stacks of levels: priors conditioned on the coarser grid below them, loaded, sampled,
inpainted and scored as one stack (two and three levels)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_pair, run_module
from fake_hub import serve_repo

from lesionstudio.app.studio import Studio
from lesionstudio.models.hubmodel import CheckpointError
from lesionstudio.models.pixelcnn import GatedPixelCNN
from lesionstudio.sampling import loading
from lesionstudio.sampling.grid import inpaint, sample
from lesionstudio.sampling.stack import ModelStack, coarse_mask, inpaint_stack, level_seed, sample_stack, stack_nll_bits


def random_hier_prior(num_classes: int = 0, seed: int = 0) -> GatedPixelCNN:
    """A small 8x8 prior on a 4x4 coarse grid, large random weights, float64."""
    torch.manual_seed(seed)
    prior = GatedPixelCNN(
        num_codes=16,
        channels=16,
        num_layers=3,
        kernel_size=3,
        num_classes=num_classes,
        grid_size=8,
        cond_num_codes=8,
        cond_grid_size=4,
    )
    for p in prior.parameters():
        p.data.normal_(0, 0.3)
    return prior.double().eval()


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    """A plain 32x32 pair and a 64x64 pair whose prior fills in the 32x32 grid."""
    root = tmp_path / "ckpts"
    make_pair(root, 32)
    make_pair(root, 64, coarse=32)
    return root


def test_coarse_codes_condition_without_breaking_causality():
    prior = random_hier_prior()
    codes = torch.randint(0, 16, (2, 8, 8))
    coarse = torch.randint(0, 8, (2, 4, 4))
    a = prior(codes, coarse=coarse)
    b = prior(codes, coarse=(coarse + 1) % 8)
    assert a.shape == (2, 16, 8, 8) and not torch.allclose(a, b)
    # Causality in the fine grid: logits at (r, c) never depend on fine codes at or after it.
    x = prior.embedding(codes[:1]).permute(0, 3, 1, 2).detach().requires_grad_(True)
    v = h = x
    for layer, bias in zip(prior.layers, prior.biases(None, coarse[:1], (8, 8)), strict=True):
        v, h = layer(v, h, bias)
    prior.head(h)[0, :, 4, 3].sum().backward()
    dep = x.grad[0].abs().sum(0) > 0
    assert not any(dep[i, j] for i in range(8) for j in range(8) if (i, j) >= (4, 3))
    assert dep[3, 3] and dep[4, 2]


def test_inputs_and_config_are_checked():
    prior = random_hier_prior()
    codes = torch.randint(0, 16, (2, 8, 8))
    with pytest.raises(ValueError, match="coarse"):
        prior(codes)
    with pytest.raises(ValueError, match="whole multiple"):
        prior(codes, coarse=torch.randint(0, 8, (2, 3, 3)))
    with pytest.raises(ValueError, match=r"coarse codes must be in \[0, 8\)"):
        prior(codes, coarse=torch.full((2, 4, 4), 8))
    plain = GatedPixelCNN(num_codes=16, channels=8, num_layers=2, grid_size=8)
    with pytest.raises(ValueError, match="not conditioned"):
        plain(codes, coarse=torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="both"):
        GatedPixelCNN(num_codes=16, grid_size=8, cond_num_codes=8)
    with pytest.raises(ValueError, match="multiple"):
        GatedPixelCNN(num_codes=16, grid_size=8, cond_num_codes=8, cond_grid_size=3)


def test_new_condition_starts_at_zero():
    """A plain prior's weights in a hierarchical one give the same logits (warm starts)."""
    torch.manual_seed(0)
    plain = GatedPixelCNN(num_codes=16, channels=8, num_layers=2, grid_size=8, num_classes=2)
    hier = GatedPixelCNN(
        num_codes=16, channels=8, num_layers=2, grid_size=8, num_classes=2, cond_num_codes=8, cond_grid_size=4
    )
    missing, unexpected = hier.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("cond" in k or k.startswith("condition.") for k in missing)
    codes, labels = torch.randint(0, 16, (2, 8, 8)), torch.tensor([0, 1])
    torch.testing.assert_close(hier(codes, labels, torch.randint(0, 8, (2, 4, 4))), plain(codes, labels))


@pytest.mark.parametrize("num_classes", [0, 2])
def test_incremental_sampler_matches_the_plain_one_with_coarse_codes(num_classes: int):
    prior = random_hier_prior(num_classes)
    coarse = torch.randint(0, 8, (3, 4, 4))
    labels = torch.tensor([0, 1, 1]) if num_classes else None
    a = sample(prior, 3, seed=5, labels=labels, coarse=coarse, method="naive")
    b = sample(prior, 3, seed=5, labels=labels, coarse=coarse)
    assert torch.equal(a, b)
    assert not torch.equal(b, sample(prior, 3, seed=5, labels=labels, coarse=(coarse + 3) % 8))
    codes, mask = torch.randint(0, 16, (8, 8)), torch.zeros(8, 8, dtype=torch.bool)
    mask[2:5, 1:6] = True
    per_variant = torch.randint(0, 8, (2, 4, 4))
    lab = 1 if num_classes else None
    x = inpaint(prior, codes, mask, seed=2, n=2, labels=lab, coarse=per_variant, method="naive")
    y = inpaint(prior, codes, mask, seed=2, n=2, labels=lab, coarse=per_variant)
    assert torch.equal(x, y) and torch.equal(y[:, ~mask], codes[~mask].expand(2, -1))
    with pytest.raises(ValueError, match="coarse"):
        sample(prior, 2, seed=0)


def test_load_hierarchical_pair(checkpoints: Path):
    pair = loading.load_stack(64, checkpoints)
    assert pair.prior.hierarchical and pair.coarse is not None
    assert pair.coarse.latent == 32 and pair.coarse.prior is not None and pair.coarse.coarse is None
    assert loading.load_stack(32, checkpoints).coarse is None


def test_coarse_pair_problems_are_clear_errors(tmp_path: Path):
    root = tmp_path / "a"
    make_pair(root, 64, coarse=32)  # no 32x32 pair beside it
    with pytest.raises(CheckpointError, match=r"fills in a 32x32 coarse grid.*no vqvae-32"):
        loading.load_stack(64, root)
    make_pair(root, 32, num_codes=8)  # coarse K does not match what the prior was made for
    with pytest.raises(CheckpointError, match="coarse codebook size K: prior expects 16, VQ-VAE has 8"):
        loading.load_stack(64, root)
    root = tmp_path / "b"
    make_pair(root, 32)
    make_pair(root, 64, coarse=32)
    cfg = json.loads((root / "pixelcnn-32" / "config.json").read_text())
    cfg["class_names"] = ["nevus", "melanoma"]
    (root / "pixelcnn-32" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="classes"):
        loading.load_stack(64, root)


def test_sample_pair_draws_the_coarse_grid_as_the_coarse_pair_would(checkpoints: Path):
    pair = loading.load_stack(64, checkpoints)
    drawn = sample_stack(pair, 2, seed=[3, 4], labels=None)
    assert drawn.codes.shape == (2, 64, 64) and drawn.coarse.shape == (2, 32, 32) and drawn.labels.shape == (2,)
    alone = sample(pair.coarse.prior, 2, seed=[3, 4])
    assert torch.equal(drawn.coarse, alone), "a seed gives the same layout at both grid sizes"
    # The fine stage is the fine prior given those coarse codes and classes, with its own seeds.
    again = sample(pair.prior, 2, seed=level_seed([3, 4], 1), labels=drawn.labels, coarse=drawn.coarse)
    assert torch.equal(drawn.codes, again)
    plain = sample_stack(loading.load_stack(32, checkpoints), 2, seed=[3, 4])
    assert plain.coarse is None and torch.equal(plain.codes, alone) and torch.equal(plain.labels, drawn.labels)
    seen = []
    sample_stack(pair, 1, seed=0, labels=1, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)


def test_inpaint_pair_redraws_coarse_and_fine_codes_under_the_mask(checkpoints: Path):
    pair = loading.load_stack(64, checkpoints)
    codes, coarse = torch.randint(0, 16, (64, 64)), torch.randint(0, 16, (32, 32))
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[10:20, 30:41] = True
    assert coarse_mask(mask, 32)[5:10, 15:21].all() and int(coarse_mask(mask, 32).sum()) == 5 * 6
    out = inpaint_stack(pair, [coarse, codes], mask, n=2, seed=1)
    assert out.shape == (2, 64, 64)
    assert torch.equal(out[:, ~mask], codes[~mask].expand(2, -1))
    assert bool((out[:, mask] != codes[mask]).any())
    assert torch.equal(out, inpaint_stack(pair, [coarse, codes], mask, n=2, seed=1)), "seeded"
    with pytest.raises(ValueError, match="coarse codes"):
        inpaint_stack(pair, [codes], mask)


def test_pair_bits_are_the_joint_negative_log_likelihood(checkpoints: Path):
    pair = loading.load_stack(64, checkpoints)
    codes, coarse = torch.randint(0, 16, (2, 64, 64)), torch.randint(0, 16, (2, 32, 32))
    lab = torch.tensor([0, 1])
    bits = stack_nll_bits(pair, [coarse, codes], lab)
    manual = -(
        pair.coarse.prior.log_likelihood(coarse, lab).flatten(1).sum(1)
        + pair.prior.log_likelihood(codes, lab, coarse).flatten(1).sum(1)
    ) / (64 * 64 * math.log(2))
    torch.testing.assert_close(bits, manual)
    # Marginalising the class: -log2 sum_c p(c) p(., . | c), at most the bits of the likelier class.
    marginal = stack_nll_bits(pair, [coarse, codes])
    per_class = torch.stack([stack_nll_bits(pair, [coarse, codes], torch.full((2,), c)) for c in range(2)])
    log2_p = pair.prior.class_probabilities().float().log2()[:, None]
    assert bool((marginal >= per_class.min(0).values - 1e-4).all())
    assert bool((marginal <= (per_class - log2_p / 4096).min(0).values + 1e-4).all())


def test_studio_generates_and_inpaints_with_a_hierarchical_pair(checkpoints: Path):
    studio = Studio(checkpoints)
    images = studio.generate(64, n=2, seed=0, class_name="malignant")
    assert len(images) == 2 and images[0].size == (256, 256)
    assert [im.tobytes() for im in images] == [
        im.tobytes() for im in studio.generate(64, n=2, seed=0, class_name="malignant")
    ]
    from conftest import lesion_image

    mask = torch.zeros(256, 256)
    mask[64:128, 64:160] = 1
    original, variants, codes, code_mask, _ = studio.inpaint(lesion_image(256), mask.numpy(), 64, n=2, seed=0)
    assert len(variants) == 2 and code_mask.shape == (64, 64) and int(code_mask.sum()) == 16 * 24


def test_evaluate_scores_a_hierarchical_prior_with_its_coarse_pair(checkpoints: Path, image_folder: Path):
    args = [
        "-m",
        "lesionstudio.evaluate",
        "--vqvae",
        str(checkpoints / "vqvae-64"),
        "--prior",
        str(checkpoints / "pixelcnn-64"),
        "--data",
        str(image_folder / "train"),
        "--limit",
        "3",
        "--json",
    ]
    res = run_module(args)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bits_per_code"] > 0 and out["fine_given_coarse_bits"] > 0 and out["coarse_bits_per_code"] > 0
    assert "coarse grid" in res.stdout
    lone = checkpoints.parent / "lone"
    lone.mkdir()
    (checkpoints / "pixelcnn-64").rename(lone / "pixelcnn-64")
    res = run_module(args[:5] + [str(lone / "pixelcnn-64")] + args[6:])
    assert res.returncode != 0 and "--coarse-vqvae" in res.stderr


def test_hierarchical_pair_through_a_local_hub_server(checkpoints: Path, tmp_path: Path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    script = (
        "import json; from lesionstudio.sampling import loading; p = loading.load_stack(64, 'lesion/checkpoints'); "
        "print(json.dumps([p.coarse.latent, p.coarse.prior.grid_size, p.prior.cond_grid_size]))"
    )
    with serve_repo("lesion/checkpoints", checkpoints) as (endpoint, requests):
        res = run_module(["-c", script], env={**env, "HF_ENDPOINT": endpoint}, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout.strip().splitlines()[-1]) == [32, 32, 32]
        assert any("pixelcnn-32/model.safetensors" in r for r in requests)


def test_synthesize_records_the_coarse_prior(checkpoints: Path, tmp_path: Path):
    from lesionstudio.synthesize import synthesize

    pair = loading.load_stack(64, checkpoints)
    rows = synthesize(tmp_path / "synth", 2, pair, batch_size=2, show_progress=False)
    assert rows[0]["coarse_prior"] == str(checkpoints / "pixelcnn-32") and len(rows[0]["coarse_prior_sha256"]) == 64
    assert "coarse prior, which drew each lesion's layout first" in (tmp_path / "synth" / "README.md").read_text()
    assert float(rows[0]["bits_per_code"]) > 0
    # a changed coarse prior is refused rather than mixed into the folder
    cprior = loading.load_stack(32, checkpoints).prior
    for p in cprior.parameters():
        p.data.add_(0.01)
    cprior.save_pretrained(checkpoints / "pixelcnn-32")
    with pytest.raises(ValueError, match="coarse_prior_sha256"):
        synthesize(tmp_path / "synth", 3, loading.load_stack(64, checkpoints), batch_size=2, show_progress=False)


@pytest.fixture
def three_levels(tmp_path: Path) -> Path:
    """16x16 (plain prior) -> 32x32 (on the 16x16 codes) -> 64x64 (on the 32x32 codes)."""
    root = tmp_path / "three"
    make_pair(root, 16)
    make_pair(root, 32, coarse=16)
    make_pair(root, 64, coarse=32)
    return root


def test_a_three_level_stack_loads_coarsest_first(three_levels: Path):
    stack = loading.load_stack(64, three_levels)
    assert [level.latent for level in stack.levels] == [16, 32, 64]
    assert stack.coarse.coarse.coarse is None and loading.load_stack(16, three_levels).levels[0].prior is not None
    (three_levels / "vqvae-16" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"32x32 coarse grid.*16x16 coarse grid"):
        loading.load_stack(64, three_levels)


def test_three_level_sampling_is_each_level_given_the_one_below(three_levels: Path):
    stack = loading.load_stack(64, three_levels)
    drawn = sample_stack(stack, 2, seed=[5, 6], temperature=(1.0, 0.7))
    assert [g.shape[-1] for g in drawn.levels] == [16, 32, 64]
    top = sample(stack.levels[0].prior, 2, seed=[5, 6])
    middle = sample(
        stack.levels[1].prior, 2, seed=level_seed([5, 6], 1), labels=drawn.labels, coarse=top, temperature=0.7
    )
    fine = sample(stack.prior, 2, seed=level_seed([5, 6], 2), labels=drawn.labels, coarse=middle, temperature=0.7)
    assert torch.equal(drawn.levels[0], top) and torch.equal(drawn.levels[1], middle)
    assert torch.equal(drawn.codes, fine)
    # The same seed shows the same lesion at every grid size: the 32x32 stack draws the same two levels.
    smaller = sample_stack(loading.load_stack(32, three_levels), 2, seed=[5, 6], temperature=(1.0, 0.7))
    assert all(torch.equal(a, b) for a, b in zip(smaller.levels, drawn.levels[:2], strict=False))
    with pytest.raises(ValueError, match="temperatures"):
        sample_stack(stack, 1, temperature=(1.0, 0.9, 0.8, 0.7))


def tiny_stack() -> ModelStack:
    """Three levels of small random priors (4x4 -> 8x8 -> 16x16) in float64, without VQ-VAEs."""
    stack = None
    for i, grid in enumerate((4, 8, 16)):
        torch.manual_seed(grid)
        prior = GatedPixelCNN(
            num_codes=8,
            channels=8,
            num_layers=2,
            kernel_size=3,
            num_classes=2,
            grid_size=grid,
            cond_num_codes=8 if i else 0,
            cond_grid_size=grid // 2 if i else 0,
        )
        for p in prior.parameters():
            p.data.normal_(0, 0.4)
        stack = ModelStack(grid, None, prior.double().eval(), "", Path(), None, coarse=stack)
    return stack


def test_three_level_incremental_and_naive_samplers_agree():
    stack = tiny_stack()
    for temps in (1.0, (1.0, 0.6), (0.9, 0.8, 0.7)):
        fast = sample_stack(stack, 3, seed=[1, 2, 3], temperature=temps)
        naive = sample_stack(stack, 3, seed=[1, 2, 3], temperature=temps, method="naive")
        assert [g.shape[-1] for g in fast.levels] == [4, 8, 16]
        assert all(torch.equal(a, b) for a, b in zip(naive.levels, fast.levels, strict=True))
        assert torch.equal(naive.labels, fast.labels)


def test_three_level_inpainting_and_scoring(three_levels: Path):
    stack = loading.load_stack(64, three_levels)
    codes = [torch.randint(0, 16, (g, g)) for g in (16, 32, 64)]
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[8:24, 40:56] = True
    out = inpaint_stack(stack, codes, mask, n=2, seed=3)
    assert out.shape == (2, 64, 64) and torch.equal(out[:, ~mask], codes[-1][~mask].expand(2, -1))
    assert torch.equal(out, inpaint_stack(stack, codes, mask, n=2, seed=3))
    batch = [c[None].expand(2, -1, -1) for c in codes]
    lab = torch.tensor([0, 1])
    manual = -sum(
        level.prior.log_likelihood(batch[i], lab, batch[i - 1] if i else None).flatten(1).sum(1)
        for i, level in enumerate(stack.levels)
    ) / (64 * 64 * math.log(2))
    torch.testing.assert_close(stack_nll_bits(stack, batch, lab), manual)
