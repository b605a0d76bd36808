"""A stack of VQ-VAE + prior levels, coarsest first, and what it does: sample, inpaint, score.

A level's prior may be conditioned on the codes of the level below it (a coarser grid of the
same image, ``GatedPixelCNN.hierarchical``), as in VQ-VAE-2. ``ModelStack`` is the finest level
with the stack below it as ``coarse`` (None for a plain prior), so a one-level stack is a plain
pair. Sampling draws the coarsest grid first (the layout, from a prior that sees all of it) and
each finer grid given the one below; inpainting redraws the painted region at every level,
coarsest first; scoring adds the levels' log-likelihoods into one joint.

Seeds: level i (0 = coarsest) draws with ``level_seed(seed, i)``, so a stack draws its coarser
levels exactly as the smaller stack alone would: a seed shows the same lesion at every grid size.

Candidate ranking (``candidates=M``; VQ-VAE-2's classifier-based rejection): each sample is the
one of M candidates that the stack's realism critic scores highest. Candidates are drawn with
per-sample seeds, candidate j of seed s with ``s + j * CANDIDATE_SEED_OFFSET``, so candidate 0 is
the sample drawn without ranking and a sample depends on its own seed alone.

Layout ranking (``layouts=K``): before any detail is drawn, each candidate's coarsest grid is the
one of K drawn (layout k of seed s with ``s + k * LAYOUT_SEED_OFFSET``) whose decoded image the
critic's layout head scores highest: one whole lesion with a border on skin, as real layouts
are. Layouts are cheap to draw and judge, and they decide what the finer levels can show.

Layout guidance (``guidance``; 1 = the priors as trained) scales what each finer level's prior
takes from the grid below it (``GatedPixelCNN.coarse_features``): above 1 the finer levels
follow the layout more closely, 0 ignores it (README, "Realism", for what that does to realism).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..data import as_saved
from ..models.codedecoder import CodeDecoder
from ..models.critic import RealismCritic
from ..models.pixelcnn import GatedPixelCNN
from ..models.vqvae import VQVAE
from .grid import (
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

LEVEL_SEED_OFFSET = 1_000_003  # keeps each level's noise apart from the others'
CANDIDATE_SEED_OFFSET = 7_919_000_009  # and each candidate's apart from the other candidates'
LAYOUT_SEED_OFFSET = 104_729_000_003  # and each layout's apart from the other layouts'
Temperatures = float | Sequence[float]


@dataclass
class ModelStack:
    """The finest level's VQ-VAE and prior, and the coarser stack its prior fills in."""

    latent: int
    vqvae: VQVAE
    prior: GatedPixelCNN | None
    source: str
    vqvae_dir: Path
    prior_dir: Path | None
    usage: list[int] | None = field(default=None, repr=False)
    coarse: ModelStack | None = field(default=None, repr=False)
    critic: RealismCritic | None = field(default=None, repr=False)  # ranks candidate samples
    # Post-trained on the codes the priors draw (``lesionstudio.models.codedecoder``); None: the VQ-VAE's own.
    decoder: CodeDecoder | None = field(default=None, repr=False)

    @torch.no_grad()
    def render(self, codes: torch.Tensor, chunk: int = 4) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] of drawn code grids [B, h, w] at this level: by the
        post-trained decoder where the stack has one, else by the VQ-VAE's own decoder."""
        if self.decoder is not None:
            return self.decoder.decode_codes(codes, chunk)
        return self.vqvae.decode_codes(codes, chunk)

    def images(self, drawn: StackSample, chunk: int = 4) -> torch.Tensor:
        """Images of drawn samples as ``render`` gives them (as saved): the ones the critic
        judged where the VQ-VAE's own decoder renders (not decoded twice), else rendered."""
        if self.decoder is None and drawn.judged is not None:
            return drawn.judged
        return self.render(drawn.codes, chunk)

    @property
    def levels(self) -> list[ModelStack]:
        """Every level, coarsest first (this one last)."""
        return ([] if self.coarse is None else self.coarse.levels) + [self]

    def checked_prior(self) -> GatedPixelCNN:
        if self.prior is None:
            raise ValueError(f"no prior is loaded for the {self.latent}x{self.latent} grid")
        return self.prior

    def sampling_levels(self) -> list[ModelStack]:
        """The levels sampling goes through: all of them, each with a prior, each prior fitting the one below."""
        levels = self.levels
        for i, level in enumerate(levels):
            prior = level.checked_prior()
            if prior.hierarchical and i == 0:
                raise ValueError(f"the {level.latent}x{level.latent} prior needs its coarse VQ-VAE and prior loaded")
        return levels

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Codes of images at every level, coarsest first."""
        return [level.vqvae.encode(images) for level in self.levels]


@dataclass
class StackSample:
    levels: list[torch.Tensor]  # code grids [n, h_i, w_i] of every level, coarsest first
    labels: torch.Tensor | None  # [n] class ids (class-conditional priors)
    scores: torch.Tensor | None = None  # [n] realism scores of ranked samples (> 0: looks real)
    # [n, 3, H, W] as the critic judged them (the VQ-VAE's decoder, as saved), or None
    judged: torch.Tensor | None = field(default=None, repr=False)

    @property
    def codes(self) -> torch.Tensor:
        return self.levels[-1]

    @property
    def coarse(self) -> torch.Tensor | None:
        """The grid the finest level filled in (None for a one-level stack)."""
        return self.levels[-2] if len(self.levels) > 1 else None


def level_seed(seed: SeedArg, level: int) -> SeedArg:
    if seed is None or level == 0:
        return seed
    if isinstance(seed, int):
        return seed + level * LEVEL_SEED_OFFSET
    return [int(s) + level * LEVEL_SEED_OFFSET for s in seed]


def level_temperatures(temperature: Temperatures, n_levels: int) -> list[float]:
    """One temperature per level: a number for all, or one per level coarsest first, or
    (layout, detail): the coarsest level's and every finer level's."""
    if isinstance(temperature, int | float):
        temps = [float(temperature)] * n_levels
    else:
        temps = [float(t) for t in temperature]
        if len(temps) == 2 and n_levels != 2:
            temps = temps[:1] + temps[1:] * (n_levels - 1)
        if len(temps) != n_levels:
            raise ValueError(f"expected 1, 2 or {n_levels} temperatures, got {len(temps)}")
    if any(t < 0 for t in temps):
        raise ValueError(f"temperatures must be non-negative, got {temps}")
    return temps


def _split(progress: Progress | None, start: float, end: float) -> Progress | None:
    return None if progress is None else (lambda f: progress(start + (end - start) * f))


def _shares(sizes: list[float]) -> list[tuple[float, float]]:
    """Progress ranges in proportion to each level's work."""
    total, done, out = max(sum(sizes), 1.0), 0.0, []
    for s in sizes:
        out.append((done / total, (done + s) / total))
        done += s
    return out


@torch.no_grad()
def sample_stack(
    stack: ModelStack,
    n: int,
    temperature: Temperatures = 1.0,
    seed: SeedArg = None,
    labels: LabelsArg = None,
    progress: Progress | None = None,
    method: str = "incremental",
    *,
    guidance: float = 1.0,
    layout: torch.Tensor | None = None,
) -> StackSample:
    """Draw n code grids at every level, coarsest first, each given the one below (``method``:
    the sampler, see ``lesionstudio.sampling.grid``; ``guidance``: see the module docstring).
    ``layout`` [n, h, w]: the coarsest grids, drawn already (``choose_layouts``)."""
    levels = stack.sampling_levels()
    temps = level_temperatures(temperature, len(levels))
    if seed is None:  # a concrete seed, so the classes drawn below can be known
        seed = secrets.randbelow(2**31)
    first = levels[0].checked_prior()
    # The classes the first level draws for this seed (the same draw sample() makes first).
    lab = resolve_labels(first, n, labels, make_generators(seed, n))
    ranges = _shares([float(level.checked_prior().grid_size ** 2) for level in levels])
    if layout is not None and tuple(layout.shape) != (n, first.grid_size, first.grid_size):
        raise ValueError(f"layout must be [{n}, {first.grid_size}, {first.grid_size}], got {tuple(layout.shape)}")
    drawn: list[torch.Tensor] = [] if layout is None else [layout.to(first.embedding.weight.device)]
    for i, level in enumerate(levels[len(drawn) :], start=len(drawn)):
        coarse = drawn[-1] if drawn else None
        grids = sample(
            level.checked_prior(),
            n,
            temperature=temps[i],
            seed=level_seed(seed, i),
            labels=labels if i == 0 else lab,
            coarse=coarse,
            method=method,
            progress=_split(progress, *ranges[i]),
            guidance=guidance,
        )
        drawn.append(grids)
    return StackSample(drawn, lab)


def per_sample_seeds(seed: SeedArg, n: int) -> list[int]:
    """n seeds: the given list, or seed, seed + 1, ... (a random start when None)."""
    if seed is None:
        seed = secrets.randbelow(2**31)
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"expected one seed or {n} seeds, got {len(seeds)}")
    return seeds


@torch.no_grad()
def choose_layouts(
    stack: ModelStack,
    seeds: list[int],
    layouts: int,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """For each seed, the coarsest grid [len(seeds), h, w] that the critic's layout head scores
    highest of ``layouts`` drawn (``labels``: each seed's class, kept by its layouts)."""
    critic, top = stack.critic, stack.levels[0]
    if critic is None or critic.layout_head is None:
        raise ValueError("choosing layouts needs a critic with a layout head (python -m train.critic --layout-head)")
    if critic.layout_grid != top.latent:
        raise ValueError(
            f"the critic's layout head judges {critic.layout_grid}x{critic.layout_grid} layouts, "
            f"but this stack's coarsest level is {top.latent}x{top.latent}"
        )
    n, k = len(seeds), layouts
    every = [s + j * LAYOUT_SEED_OFFSET for s in seeds for j in range(k)]
    lab = None if labels is None else labels.repeat_interleave(k)
    grids = sample(top.checked_prior(), n * k, temperature=temperature, seed=every, labels=lab, progress=progress)
    scores = critic.judge_layouts(top.vqvae.decode_codes(grids)).view(n, k)
    return grids.view(n, k, *grids.shape[1:])[torch.arange(n), scores.argmax(1).to(grids.device)]


class Judged(NamedTuple):
    images: torch.Tensor  # [B, 3, H, W], by the VQ-VAE's own decoder, as saved
    realism: torch.Tensor  # [B]


@torch.no_grad()
def judge_codes(stack: ModelStack, codes: torch.Tensor) -> Judged:
    """The critic's realism score [B] of finest-level grids [B, h, w], with the images it
    judged. Judged as saved (the shape head's segmentation can tip on a pixel's last fraction
    of a level), and as the VQ-VAE's own decoder renders them: what the critic was trained on.
    So the choice of codes does not depend on which decoder renders the kept ones."""
    if stack.critic is None:
        raise ValueError("judging samples needs a realism critic (a critic/ folder beside the checkpoints)")
    images = as_saved(stack.vqvae.decode_codes(codes))
    return Judged(images, stack.critic.judge(images).realism)


@torch.no_grad()
def sample_ranked(
    stack: ModelStack,
    n: int,
    candidates: int,
    temperature: Temperatures = 1.0,
    seed: SeedArg = None,
    labels: LabelsArg = None,
    progress: Progress | None = None,
    *,
    guidance: float = 1.0,
    layouts: int = 1,
) -> StackSample:
    """Draw ``candidates`` samples per requested one (in one batch) and keep, for each, the one
    the stack's critic scores most real-looking; ``scores`` holds the kept ones' scores. With
    ``layouts`` > 1 each candidate's layout is the best of that many (``choose_layouts``)."""
    if candidates < 1 or layouts < 1:
        raise ValueError(f"candidates and layouts must be at least 1, got {candidates} and {layouts}")
    if stack.critic is None:
        raise ValueError("ranking candidates needs a realism critic (a critic/ folder beside the checkpoints)")
    m = candidates
    seeds = [s + j * CANDIDATE_SEED_OFFSET for s in per_sample_seeds(seed, n) for j in range(m)]
    lab = None
    if labels is not None:  # each candidate keeps its sample's requested class
        lab = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        lab = (lab.expand(n) if lab.numel() == 1 else lab).repeat_interleave(m)
    layout = None
    if layouts > 1:
        levels = stack.sampling_levels()
        # Each candidate's class, as sample_stack would draw it, kept by all of its layouts.
        lab = resolve_labels(levels[0].checked_prior(), n * m, lab, make_generators(seeds, n * m))
        sizes = [float(level.checked_prior().grid_size ** 2) for level in levels]
        share = layouts * sizes[0] / (layouts * sizes[0] + sum(sizes[1:]))
        first = level_temperatures(temperature, len(levels))[0]
        layout = choose_layouts(stack, seeds, layouts, first, lab, _split(progress, 0.0, share))
        progress = _split(progress, share, 1.0)
    drawn = sample_stack(stack, n * m, temperature, seeds, lab, progress, guidance=guidance, layout=layout)
    judged = judge_codes(stack, drawn.codes)
    scores = judged.realism.view(n, m)
    keep = torch.arange(n) * m + scores.argmax(1)
    kept_labels = None if drawn.labels is None else drawn.labels[keep.to(drawn.labels.device)]
    levels = [g[keep.to(g.device)] for g in drawn.levels]
    return StackSample(levels, kept_labels, scores.max(1).values, judged.images[keep.to(judged.images.device)])


def coarse_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A fine mask [..., h, w] (redrawn codes, painted pixels) to a coarser grid: a coarse cell
    is marked if any of its fine cells is."""
    m = mask.float().reshape(-1, 1, *mask.shape[-2:])
    return (F.adaptive_max_pool2d(m, size) > 0).reshape(*mask.shape[:-2], size, size)


@torch.no_grad()
def inpaint_stack(
    stack: ModelStack,
    codes: Sequence[torch.Tensor],
    mask: torch.Tensor,
    n: int = 1,
    temperature: Temperatures = 1.0,
    seed: int | None = None,
    labels: LabelsArg = None,
    progress: Progress | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Redraw the codes under mask (on the finest grid, [h, w] or [B, h, w]) at every level,
    coarsest first; ``codes`` holds the image's grids at every level, coarsest first ([h_i, w_i]
    or [B, h_i, w_i]). Returns n variants per image of the finest grid, [B * n, h, w]."""
    levels = stack.sampling_levels()
    if len(codes) != len(levels):
        raise ValueError(
            f"inpainting this {len(levels)}-level stack needs the image's codes at every level (coarse codes first)"
        )
    grids = [c[None] if c.ndim == 2 else c for c in codes]
    mask = mask[None] if mask.ndim == 2 else mask
    b = grids[-1].shape[0]
    temps = level_temperatures(temperature, len(levels))
    seed = secrets.randbelow(2**31) if seed is None else seed
    # One class per variant, shared by every level.
    finest = levels[-1].checked_prior()
    if len(levels) == 1:
        return inpaint(finest, grids[0], mask, temperature=temps[0], seed=seed, labels=labels, n=n, progress=progress)
    lab = resolve_labels(finest, b * n, None if labels is None else per_variant(labels, b, n), make_generator(seed))
    masks = [coarse_mask(mask, g.shape[-1]) for g in grids[:-1]] + [mask]
    ranges = _shares([float(m.sum()) for m in masks])
    variants = None
    for i, level in enumerate(levels):
        variants = inpaint(
            level.checked_prior(),
            grids[i],
            masks[i],
            temperature=temps[i],
            seed=level_seed(seed, i),
            labels=lab,
            n=n,
            coarse=variants,
            progress=_split(progress, *ranges[i]),
            guidance=guidance,
        )
    assert variants is not None
    return variants


@dataclass
class StackBits:
    """Bits of code grids under a stack, each [B], classes marginalised when no labels are given."""

    joint: torch.Tensor  # -log2 p(all levels) per finest code: an upper bound on the finest grid's own bits
    finest_given_coarse: torch.Tensor  # the finest grid's bits per code given the level below
    coarse_joint: torch.Tensor | None  # the coarser stack's joint bits per code of its finest grid


@torch.no_grad()
def stack_bits(stack: ModelStack, codes: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> StackBits:
    """Score grids (``codes``: one per level, coarsest first) with one pass of each prior.

    Since p(finest) is at least p(all levels), the joint is an upper bound on the finest grid's
    own bits, so it compares fairly with a plain prior and with the unigram entropy.
    """
    levels = stack.sampling_levels()
    if len(codes) != len(levels):
        raise ValueError(f"scoring this {len(levels)}-level stack needs the codes of every level (coarse codes first)")
    totals, coarse_joint = None, None
    for i, level in enumerate(levels):
        prior = level.checked_prior()
        ll = prior.grid_log_likelihoods(codes[i], labels, codes[i - 1] if i else None)
        if i == len(levels) - 1:
            finest = prior.bits_from(ll, codes[i][0].numel())
            if totals is not None:
                coarse_joint = levels[i - 1].checked_prior().bits_from(totals, codes[i - 1][0].numel())
        totals = ll if totals is None else totals + ll
    assert totals is not None
    joint = levels[-1].checked_prior().bits_from(totals, codes[-1][0].numel())
    return StackBits(joint, finest, coarse_joint)


def stack_nll_bits(
    stack: ModelStack, codes: Sequence[torch.Tensor], labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Joint negative log-likelihood of each image's grids in bits per finest code, [B]."""
    return stack_bits(stack, codes, labels).joint
