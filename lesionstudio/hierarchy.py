"""Drawing, inpainting and scoring code grids for a VQ-VAE + prior pair, in one or two levels.

A hierarchical prior (``GatedPixelCNN.hierarchical``) fills in a coarser code grid of the same
image, made by a second VQ-VAE with its own prior; ``hub.load_pair`` loads that coarse pair as
``ModelPair.coarse``. Sampling then draws the coarse grid first (the whole lesion's layout,
from a prior that sees all of it) and the fine grid given it. Every function here also takes a
plain pair, so callers need not care which kind they hold.

Seeds: the coarse stage is drawn exactly as the coarse pair alone would draw it for the same
seed and labels, so a seed shows the same lesion at both grid sizes, in more detail at the
finer one; the fine stage uses its own noise (``fine_seed``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .hub import ModelPair
from .pixelcnn import GatedPixelCNN
from .sampling import (
    LabelsArg,
    Progress,
    SeedArg,
    inpaint,
    make_generator,
    make_generators,
    per_variant,
    resolve_labels,
    sample,
)

FINE_SEED_OFFSET = 1_000_003  # keeps the fine stage's noise apart from the coarse stage's


@dataclass
class PairSample:
    codes: torch.Tensor  # [n, h, w] fine codes
    coarse: torch.Tensor | None  # [n, hc, wc] coarse codes they fill in (hierarchical pairs)
    labels: torch.Tensor | None  # [n] class ids (class-conditional priors)


def prior_of(pair: ModelPair) -> GatedPixelCNN:
    if pair.prior is None:
        raise ValueError(f"no prior is loaded for the {pair.latent}x{pair.latent} grid")
    return pair.prior


def coarse_of(pair: ModelPair) -> ModelPair | None:
    """The coarse pair a hierarchical prior fills in, or None for a plain prior."""
    if not prior_of(pair).hierarchical:
        return None
    if pair.coarse is None or pair.coarse.prior is None:
        raise ValueError(f"the {pair.latent}x{pair.latent} prior needs its coarse VQ-VAE and prior loaded")
    return pair.coarse


def fine_seed(seed: SeedArg) -> SeedArg:
    if seed is None:
        return None
    if isinstance(seed, int):
        return seed + FINE_SEED_OFFSET
    return [int(s) + FINE_SEED_OFFSET for s in seed]


def _split(progress: Progress | None, start: float, end: float) -> Progress | None:
    return None if progress is None else (lambda f: progress(start + (end - start) * f))


@torch.no_grad()
def sample_pair(
    pair: ModelPair,
    n: int,
    temperature: float = 1.0,
    seed: SeedArg = None,
    labels: LabelsArg = None,
    progress: Progress | None = None,
) -> PairSample:
    """Draw n fine code grids for a pair (coarse grid first when its prior is hierarchical)."""
    prior = prior_of(pair)
    coarse_pair = coarse_of(pair)
    if seed is None:  # a concrete seed, so the classes drawn below can be known
        seed = secrets.randbelow(2**31)
    first = prior if coarse_pair is None else prior_of(coarse_pair)
    # The classes the first stage draws for this seed (the same draw sample() makes first).
    lab = resolve_labels(first, n, labels, make_generators(seed, n))
    if coarse_pair is None:
        codes = sample(prior, n, temperature=temperature, seed=seed, labels=labels, progress=progress)
        return PairSample(codes, None, lab)
    coarse_prior = first
    hc, wc, h = coarse_prior.grid_size, coarse_prior.grid_size, prior.grid_size
    part = hc * wc / (hc * wc + h * h)
    coarse = sample(coarse_prior, n, temperature=temperature, seed=seed, labels=labels,
                    progress=_split(progress, 0.0, part))  # fmt: skip
    codes = sample(prior, n, temperature=temperature, seed=fine_seed(seed), labels=lab, coarse=coarse,
                   progress=_split(progress, part, 1.0))  # fmt: skip
    return PairSample(codes, coarse, lab)


def coarse_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A fine code mask [..., h, w] to the coarse grid: a coarse code is redrawn if any of its
    fine codes is."""
    m = mask.float().reshape(-1, 1, *mask.shape[-2:])
    return (F.adaptive_max_pool2d(m, size) > 0).reshape(*mask.shape[:-2], size, size)


@torch.no_grad()
def inpaint_pair(
    pair: ModelPair,
    codes: torch.Tensor,
    mask: torch.Tensor,
    coarse: torch.Tensor | None = None,
    n: int = 1,
    temperature: float = 1.0,
    seed: int | None = None,
    labels: LabelsArg = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Redraw the codes under mask ([h, w] or [B, h, w]); n variants per grid, [B * n, h, w].

    For a hierarchical pair, ``coarse`` holds the coarse codes of the same images: the coarse
    codes under the (coarsened) mask are redrawn first, then the fine codes given them.
    """
    prior = prior_of(pair)
    coarse_pair = coarse_of(pair)
    if coarse_pair is None:
        return inpaint(prior, codes, mask, temperature=temperature, seed=seed, labels=labels, n=n, progress=progress)
    if coarse is None:
        raise ValueError("inpainting with a hierarchical prior needs the coarse codes of the image (coarse=)")
    codes = codes[None] if codes.ndim == 2 else codes
    mask = mask[None] if mask.ndim == 2 else mask
    coarse = coarse[None] if coarse.ndim == 2 else coarse
    b = codes.shape[0]
    seed = secrets.randbelow(2**31) if seed is None else seed
    # One class per variant, shared by both stages.
    lab = resolve_labels(prior, b * n, None if labels is None else per_variant(labels, b, n), make_generator(seed))
    coarse_prior = prior_of(coarse_pair)
    cmask = coarse_mask(mask, coarse.shape[-1])
    part = float(cmask.sum()) / max(float(cmask.sum() + mask.sum()), 1.0)
    variants = inpaint(coarse_prior, coarse, cmask, temperature=temperature, seed=seed, labels=lab, n=n,
                       progress=_split(progress, 0.0, part))  # fmt: skip
    return inpaint(prior, codes, mask, temperature=temperature, seed=seed + FINE_SEED_OFFSET, labels=lab, n=n,
                   coarse=variants, progress=_split(progress, part, 1.0))  # fmt: skip


@torch.no_grad()
def pair_nll_bits(
    pair: ModelPair, codes: torch.Tensor, coarse: torch.Tensor | None = None, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Negative log-likelihood of each fine grid in bits per fine code, [B].

    For a hierarchical pair this is -log2 p(coarse, fine) / (h * w): the coarse grid's bits
    under its prior plus the fine grid's given it, spread over the fine codes. Since p(fine) is
    at least p(coarse, fine), it is an upper bound on the fine grid's own bits per code, so it
    compares fairly with a plain prior and with the unigram entropy. Classes are marginalised
    out of the joint when labels is None.
    """
    prior = prior_of(pair)
    coarse_pair = coarse_of(pair)
    if coarse_pair is None:
        return prior.nll_bits(codes, labels)
    if coarse is None:
        raise ValueError("scoring with a hierarchical prior needs the coarse codes of the images (coarse=)")
    return pair_bits_parts(pair, codes, coarse, labels)[0]


@torch.no_grad()
def pair_bits_parts(
    pair: ModelPair, codes: torch.Tensor, coarse: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a hierarchical pair, from one pass of each prior: the joint bits per fine code
    (``pair_nll_bits``), the fine grid's bits per fine code given the coarse grid, and the coarse
    grid's bits per coarse code; each [B], classes marginalised when labels is None."""
    coarse_pair = coarse_of(pair)
    if coarse_pair is None:
        raise ValueError("pair_bits_parts scores a hierarchical pair; use pair_nll_bits for a plain one")
    prior, coarse_prior = prior_of(pair), prior_of(coarse_pair)
    fine_ll = prior.grid_log_likelihoods(codes, labels, coarse)
    coarse_ll = coarse_prior.grid_log_likelihoods(coarse, labels)
    n = codes[0].numel()
    return (
        prior.bits_from(fine_ll + coarse_ll, n),
        prior.bits_from(fine_ll, n),
        coarse_prior.bits_from(coarse_ll, coarse[0].numel()),
    )
