from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lesionstudio.models.pixelcnn import GatedPixelCNN
from lesionstudio.sampling.grid import inpaint, sample


def random_prior(num_classes: int = 0, kernel: int = 5, layers: int = 4, seed: int = 0) -> GatedPixelCNN:
    """A small prior with large random weights (sharp, varied distributions), in float64."""
    torch.manual_seed(seed)
    prior = GatedPixelCNN(
        num_codes=16, channels=16, num_layers=layers, kernel_size=kernel, num_classes=num_classes, grid_size=8
    )
    for p in prior.parameters():
        p.data.normal_(0, 0.3)
    return prior.double().eval()


def dependence(prior: GatedPixelCNN, r: int, c: int, size: int = 8) -> torch.Tensor:
    """Which input positions the logits at (r, c) depend on, by gradient."""
    codes = torch.randint(0, prior.num_codes, (1, size, size))
    x = prior.embedding(codes).permute(0, 3, 1, 2).detach().requires_grad_(True)
    v = h = x
    labels = torch.zeros(1, dtype=torch.long) if prior.num_classes else None
    coarse = torch.randint(0, prior.cond_num_codes, (1, size // 2, size // 2)) if prior.hierarchical else None
    for layer, bias in zip(prior.layers, prior.biases(labels, coarse, (size, size)), strict=True):
        v, h = layer(v, h, bias)
    prior.head(h)[0, :, r, c].sum().backward()
    return x.grad[0].abs().sum(0) > 0


@pytest.mark.parametrize("kernel", [3, 5])
def test_causal_with_no_blind_spot(kernel: int):
    prior = random_prior(kernel=kernel, layers=4)
    size = 8
    for r, c in [(0, 0), (3, 4), (5, 0), (7, 7), (4, 7)]:
        dep = dependence(prior, r, c, size)
        for i in range(size):
            for j in range(size):
                if (i, j) >= (r, c):
                    assert not dep[i, j], f"logits at {(r, c)} depend on {(i, j)} (not before it)"
        if r > 0:
            assert dep[r - 1, c], "must see the position directly above"
            if c + 1 < size:
                assert dep[r - 1, c + 1], "blind spot: the position above-right is not seen"
        if c > 0:
            assert dep[r, c - 1], "must see the position to the left"


def test_logits_shape_and_conditioning():
    prior = random_prior(num_classes=2)
    codes = torch.randint(0, 16, (3, 8, 8))
    a = prior(codes, torch.tensor([0, 0, 0]))
    b = prior(codes, torch.tensor([1, 1, 1]))
    assert a.shape == (3, 16, 8, 8)
    assert not torch.allclose(a, b), "the class must change the logits"
    with pytest.raises(ValueError, match="labels"):
        prior(codes, torch.tensor([0, 2, 0]))
    with pytest.raises(ValueError, match="codes must be in"):
        prior(codes + 16, torch.tensor([0, 0, 0]))


@pytest.mark.parametrize("num_classes", [0, 2])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.5])
def test_incremental_equals_naive(num_classes: int, temperature: float):
    prior = random_prior(num_classes=num_classes, seed=num_classes)
    labels = None if num_classes == 0 else [1, 0, 1]
    for seed in (0, 1):
        a = sample(prior, 3, seed=seed, temperature=temperature, labels=labels, method="naive")
        b = sample(prior, 3, seed=seed, temperature=temperature, labels=labels)
        assert torch.equal(a, b)


def test_incremental_equals_naive_non_square_top_k_and_class_draw():
    prior = random_prior(num_classes=2, kernel=3, layers=3)
    a = sample(prior, 2, shape=(5, 9), seed=4, top_k=3, method="naive")
    b = sample(prior, 2, shape=(5, 9), seed=4, top_k=3)
    assert a.shape == (2, 5, 9) and torch.equal(a, b)


def test_same_seed_same_codes_and_different_seed_differs():
    prior = random_prior()
    assert torch.equal(sample(prior, 2, seed=5), sample(prior, 2, seed=5))
    assert not torch.equal(sample(prior, 2, seed=5), sample(prior, 2, seed=6))


def test_per_grid_seeds_make_each_grid_independent_of_its_batch():
    prior = random_prior(num_classes=2)
    batch = sample(prior, 3, seed=[10, 11, 12])
    assert torch.equal(batch, sample(prior, 3, seed=[10, 11, 12], method="naive"))
    for i, s in enumerate((10, 11, 12)):  # the same grid (and drawn class) alone or in any batch
        assert torch.equal(batch[i], sample(prior, 1, seed=[s])[0])
    assert torch.equal(batch[1:], sample(prior, 2, seed=[11, 12]))
    with pytest.raises(ValueError, match="3 seeds"):
        sample(prior, 3, seed=[1, 2])


def test_temperature_zero_is_argmax():
    prior = random_prior()
    codes = sample(prior, 2, temperature=0.0, seed=0)
    logits = prior(codes)
    assert torch.equal(logits.argmax(1), codes)
    near_zero = sample(prior, 2, temperature=1e-6, seed=3)
    assert torch.equal(near_zero, codes)


def test_float32_sampler_agrees_with_naive():
    prior = random_prior().float()
    a = sample(prior, 2, seed=0, method="naive")
    b = sample(prior, 2, seed=0)
    assert (a == b).float().mean() == 1.0


@pytest.mark.parametrize("num_classes", [0, 2])
def test_inpaint_keeps_unmasked_and_matches_naive(num_classes: int):
    prior = random_prior(num_classes=num_classes)
    codes = torch.randint(0, 16, (2, 8, 8))
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, 2:5, 3:6] = True
    mask[1, 6:, :2] = True
    labels = None if num_classes == 0 else [0, 1]
    a = inpaint(prior, codes, mask, seed=3, n=2, labels=labels, method="naive")
    b = inpaint(prior, codes, mask, seed=3, n=2, labels=labels)
    assert a.shape == (4, 8, 8)
    assert torch.equal(a, b)
    expanded_codes = codes.repeat_interleave(2, 0)
    expanded_mask = mask.repeat_interleave(2, 0)
    assert torch.equal(b[~expanded_mask], expanded_codes[~expanded_mask])
    assert not torch.equal(b[expanded_mask], expanded_codes[expanded_mask])  # something was resampled


def test_inpaint_candidates_rank_by_what_follows_the_hole():
    prior = random_prior()
    codes = sample(prior, 1, seed=0, temperature=0.0)[0]
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[1:3, 2:6] = True
    one = inpaint(prior, codes, mask, seed=7, n=1, fills=1)
    best = inpaint(prior, codes, mask, seed=7, n=1, fills=8)
    # the best of 8 is at least as consistent with the kept codes as a single fill
    from lesionstudio.sampling.grid import _after_hole_loglik

    assert _after_hole_loglik(prior, best, mask[None], None) >= _after_hole_loglik(prior, one, mask[None], None)


def test_inpaint_2d_input_and_empty_mask():
    prior = random_prior()
    codes = torch.randint(0, 16, (8, 8))
    out = inpaint(prior, codes, torch.zeros(8, 8, dtype=torch.bool), n=3, seed=0)
    assert out.shape == (3, 8, 8) and torch.equal(out, codes.expand(3, 8, 8))


def test_unconditional_prior_rejects_labels_and_conditional_draws_them():
    with pytest.raises(ValueError, match="unconditional"):
        sample(random_prior(), 1, labels=0)
    prior = random_prior(num_classes=2)
    assert sample(prior, 2, seed=0).shape == (2, 8, 8)  # labels=None works on a conditional prior


def test_nll_bits_marginalises_classes():
    prior = random_prior(num_classes=2)
    codes = torch.randint(0, 16, (2, 8, 8))
    b0 = prior.nll_bits(codes, torch.tensor([0, 0]))
    b1 = prior.nll_bits(codes, torch.tensor([1, 1]))
    marg = prior.nll_bits(codes)
    assert (marg <= torch.maximum(b0, b1) + 1e-9).all() and (marg >= torch.minimum(b0, b1) - 1e-9).all()


def test_save_and_reload_identical(tmp_path: Path):
    prior = GatedPixelCNN(
        num_codes=16,
        channels=8,
        num_layers=2,
        num_classes=2,
        grid_size=8,
        class_names=["benign", "malignant"],
        class_counts=[3, 1],
    )
    prior.save_pretrained(tmp_path / "p")
    again = GatedPixelCNN.from_pretrained(tmp_path / "p")
    assert again.class_names == ["benign", "malignant"] and again.class_counts == [3, 1]
    codes = torch.randint(0, 16, (1, 8, 8))
    lab = torch.tensor([1])
    assert torch.equal(prior.eval()(codes, lab), again(codes, lab))
    assert torch.equal(sample(prior, 1, seed=2), sample(again, 1, seed=2))


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_incremental_equals_naive_at_every_grid_size(size: int):
    """A class-conditional prior on a coarse grid, in float64: drawn positions in the first row,
    the middle and the last (the vertical stack runs through every row between them), and at
    16 and 32 whole grids."""
    torch.manual_seed(size)
    prior = GatedPixelCNN(
        num_codes=16,
        channels=8,
        num_layers=3,
        num_classes=2,
        grid_size=size,
        cond_num_codes=8,
        cond_grid_size=size // 2,
    )
    for p in prior.parameters():
        p.data.normal_(0, 0.3)
    prior = prior.double().eval()
    codes = torch.randint(0, 16, (2, size, size))
    coarse = torch.randint(0, 8, (2, size // 2, size // 2))
    mask = torch.zeros(2, size, size, dtype=torch.bool)
    mask[:, 0, :4] = True
    mask[0, size // 2, 3:9] = True
    mask[1, size - 1, -6:] = True
    args = {"seed": size, "fills": 1, "labels": [0, 1], "coarse": coarse}
    naive = inpaint(prior, codes, mask, method="naive", **args)
    assert torch.equal(inpaint(prior, codes, mask, **args), naive)
    assert not torch.equal(naive[mask], codes[mask])
    if size <= 32:
        whole = {"seed": [1, 2], "labels": [1, 0], "coarse": coarse}
        assert torch.equal(sample(prior, 2, **whole), sample(prior, 2, method="naive", **whole))
