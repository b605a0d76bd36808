"""Sampling and inpainting code grids with a Gated PixelCNN prior.

Two samplers give the same codes for the same seed:

* ``method="naive"`` runs the whole network once per sampled code (h*w forward passes): simple,
  slow, kept as the reference for tests and benchmarks;
* ``method="incremental"`` (default) caches every layer's activations and computes for each new
  code only what that code changes (``lesionstudio.sampling.incremental``): the vertical stack
  once per row, the horizontal stack and the head once per position, batched over the samples.

Both draw Gumbel noise for the sampled positions, row by row in raster order, from a generator
seeded with ``seed`` (on the CPU, so a seed means the same noise on any device) and pick
argmax(logits / T + noise), which is a draw from softmax(logits / T); T = 0 is the argmax.
The two compute the same sums in a different order, so they agree to rounding (exactly, in
practice; in float64 the tests check it on many grids).

A hierarchical prior (conditioned on a coarser grid of the same image) takes that grid as
``coarse=`` in both; drawing the levels in turn is ``lesionstudio.sampling.stack``'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..models.pixelcnn import GatedPixelCNN
from .incremental import IncrementalSampler

Progress = Callable[[float], None]
LabelsArg = int | Sequence[int] | torch.Tensor | None
SeedArg = int | Sequence[int] | None
# One generator for the whole batch, or one per grid (then a grid's codes depend only on its seed).
Generators = torch.Generator | list[torch.Generator]


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def make_generators(seed: SeedArg, n: int) -> Generators:
    """A generator for a seed (or None), or one per grid for a sequence of n seeds."""
    if seed is None or isinstance(seed, int):
        return make_generator(seed)
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"expected one seed or {n} seeds, got {len(seeds)}")
    return [make_generator(s) for s in seeds]


def resolve_labels(prior: GatedPixelCNN, n: int, labels: LabelsArg, gen: Generators) -> torch.Tensor | None:
    """Class ids for n samples: given (int, sequence or tensor), or on a class-conditional prior
    drawn by the training class frequencies when None; None for an unconditional prior."""
    if prior.num_classes == 0:
        if labels is not None:
            raise ValueError("this prior is unconditional: it takes no class labels")
        return None
    if labels is None:
        probs = prior.class_probabilities()
        if isinstance(gen, list):
            return torch.cat([torch.multinomial(probs, 1, generator=g) for g in gen])
        return torch.multinomial(probs, n, replacement=True, generator=gen)
    lab = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if lab.numel() == 1:
        lab = lab.expand(n)
    if lab.numel() != n:
        raise ValueError(f"expected 1 or {n} labels, got {lab.numel()}")
    if int(lab.min()) < 0 or int(lab.max()) >= prior.num_classes:
        raise ValueError(f"labels must be in [0, {prior.num_classes}) ({', '.join(prior.class_names)})")
    return lab.clone()


def row_noise(gen: Generators, count: int, n: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [count, n, k] for the sampled positions of one row (both samplers draw the
    same stream: one block per row that has positions to sample, in raster order)."""
    if isinstance(gen, list):
        u = torch.cat([torch.rand((count, 1, k), generator=g, dtype=like.dtype) for g in gen], dim=1)
    else:
        u = torch.rand((count, n, k), generator=gen, dtype=like.dtype)
    tiny = torch.finfo(like.dtype).tiny
    return (-torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))).to(like.device)


def choose(logits: torch.Tensor, gumbel: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """One code per row of logits [B, K]: Gumbel-max at a temperature (0: argmax), optional top-k."""
    if top_k is not None and 0 < top_k < logits.shape[1]:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature <= 0:
        return logits.argmax(dim=1)
    return (logits / temperature + gumbel).argmax(dim=1)


@torch.no_grad()
def sample(
    prior: GatedPixelCNN,
    n: int,
    shape: tuple[int, int] | None = None,
    *,
    temperature: float = 1.0,
    seed: SeedArg = None,
    labels: LabelsArg = None,
    top_k: int | None = None,
    method: str = "incremental",
    progress: Progress | None = None,
    coarse: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Draw n code grids [n, h, w] from the prior (shape defaults to the grid it was trained on).

    ``seed`` is one seed for the batch, or n seeds, one per grid: then grid i (and its class,
    when drawn) depends on seed i alone, not on the batch it was drawn in. A hierarchical prior
    needs ``coarse`` [n, hc, wc], the coarse grid each sample fills in; ``guidance`` scales its
    features (``GatedPixelCNN.coarse_features``).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    h, w = shape or (prior.grid_size, prior.grid_size)
    device = prior.embedding.weight.device
    coarse = _coarse_on_device(prior, (n, h, w), coarse)
    gen = make_generators(seed, n)
    lab = resolve_labels(prior, n, labels, gen)
    codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
    mask = torch.ones(n, h, w, dtype=torch.bool, device=device)
    return _fill(Draw(prior, codes, mask, lab, temperature, top_k, gen, method, progress, coarse, guidance))


def _coarse_on_device(
    prior: GatedPixelCNN, shape: tuple[int, int, int], coarse: torch.Tensor | None
) -> torch.Tensor | None:
    """The coarse grid as long codes on the prior's device, checked against the prior."""
    if coarse is not None:
        coarse = torch.as_tensor(coarse).to(prior.embedding.weight.device).long()
    prior.check_coarse(shape, coarse)  # a clear error when one is missing or does not fit
    return coarse


@torch.no_grad()
def inpaint(
    prior: GatedPixelCNN,
    codes: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    seed: int | None = None,
    labels: LabelsArg = None,
    n: int = 1,
    top_k: int | None = None,
    fills: int = 4,
    method: str = "incremental",
    progress: Progress | None = None,
    coarse: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Resample the codes where mask is True, keep the others; n variants per input grid.

    codes and mask are [h, w] or [B, h, w]; the result is [B * n, h, w] (variants of one input
    are adjacent). Masked codes are drawn in raster order, each conditioned on all the codes
    before it. A causal prior cannot see the fixed codes after the hole, so each variant is
    the best of ``fills`` fills, ranked by the prior's likelihood of the fixed codes that
    follow the hole (how well the fill leads into what is kept). A hierarchical prior needs
    ``coarse`` ([hc, wc] or [B, hc, wc]), or [B * n, hc, wc] for a different one per variant,
    and draws with its features scaled by ``guidance``.
    """
    if codes.ndim == 2:
        codes, mask = codes[None], mask[None]
    if codes.shape != mask.shape or codes.ndim != 3:
        raise ValueError(f"codes and mask must have the same shape [B, h, w]; got {codes.shape}, {mask.shape}")
    if n < 1 or fills < 1:
        raise ValueError("n and fills must be at least 1")
    device = prior.embedding.weight.device
    codes = codes.to(device).long()
    prior.check_codes(codes)
    mask = mask.to(device).bool()
    b = codes.shape[0]
    if coarse is not None:
        coarse = torch.as_tensor(coarse)
        coarse = coarse[None] if coarse.ndim == 2 else coarse
        if coarse.shape[0] == b and b != b * n:
            coarse = coarse.repeat_interleave(n, dim=0)
    coarse = _coarse_on_device(prior, (b * n, *codes.shape[1:]), coarse)
    gen = make_generator(seed)
    lab = resolve_labels(prior, b * n, labels if labels is None else per_variant(labels, b, n), gen)
    m = fills
    rep = n * m  # fills of one variant adjacent, variants of one input adjacent
    grid = codes.repeat_interleave(rep, dim=0)
    msk = mask.repeat_interleave(rep, dim=0)
    lab_all = None if lab is None else lab.repeat_interleave(m)
    coarse_all = None if coarse is None else coarse.repeat_interleave(m, dim=0)
    draw = Draw(prior, grid, msk, lab_all, temperature, top_k, gen, method, progress, coarse_all, guidance)
    filled = _fill(draw)
    if m == 1:
        return filled
    score = _after_hole_loglik(prior, filled, msk, lab_all, coarse_all)
    best = score.view(b * n, m).argmax(dim=1)
    return filled.view(b * n, m, *filled.shape[1:])[torch.arange(b * n, device=device), best]


def per_variant(labels: LabelsArg, b: int, n: int) -> torch.Tensor:
    """Labels for b grids (or one per variant already) repeated for n variants of each."""
    lab = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if lab.numel() == b and b != b * n:
        lab = lab.repeat_interleave(n)
    return lab


def _after_hole_loglik(
    prior: GatedPixelCNN,
    codes: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor | None,
    coarse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of log p over the kept codes that come after the first masked position of each grid."""
    ll = prior.log_likelihood(codes, labels, coarse).flatten(1)
    flat_mask = mask.flatten(1)
    idx = torch.arange(flat_mask.shape[1], device=codes.device)
    first = torch.where(flat_mask.any(1), flat_mask.float().argmax(1), flat_mask.shape[1])
    after = (idx[None, :] > first[:, None]) & ~flat_mask
    return (ll * after).sum(1)


@dataclass
class Draw:
    """One fill of a batch of grids: what to draw (the masked codes), from which prior, and how."""

    prior: GatedPixelCNN
    codes: torch.Tensor  # [B, h, w], kept where mask is False
    mask: torch.Tensor  # [B, h, w], True where a code is drawn
    labels: torch.Tensor | None
    temperature: float
    top_k: int | None
    gen: Generators
    method: str = "incremental"
    progress: Progress | None = None
    coarse: torch.Tensor | None = None
    guidance: float = 1.0


def _fill(draw: Draw) -> torch.Tensor:
    """The draw's codes with every masked position drawn, by its method."""
    codes = draw.codes.clone()
    labels = None if draw.labels is None else draw.labels.to(codes.device)
    if draw.method == "naive":
        return _fill_naive(draw, codes, labels)
    if draw.method != "incremental":
        raise ValueError(f"method must be 'incremental' or 'naive', got {draw.method!r}")
    b, h, w = codes.shape
    sampler = IncrementalSampler(draw.prior, b, h, w, labels, draw.coarse, draw.guidance)
    weight = draw.prior.embedding.weight

    def noise(count: int) -> torch.Tensor:
        return row_noise(draw.gen, count, b, draw.prior.num_codes, weight)

    return sampler.fill(codes, draw.mask, draw.temperature, draw.top_k, noise, draw.progress)


def _fill_naive(draw: Draw, codes: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The reference sampler: the whole network once per drawn position, in place on codes."""
    prior, mask = draw.prior, draw.mask
    any_mask = mask.any(0)
    total, done = int(any_mask.sum()), 0
    for r in range(codes.shape[1]):
        cols = torch.nonzero(any_mask[r]).flatten().tolist()
        if not cols:
            continue
        noise = row_noise(draw.gen, len(cols), codes.shape[0], prior.num_codes, prior.embedding.weight)
        for j, c in enumerate(cols):
            logits = prior(codes, labels, draw.coarse, draw.guidance)[:, :, r, c]
            new = choose(logits, noise[j], draw.temperature, draw.top_k)
            codes[:, r, c] = torch.where(mask[:, r, c], new, codes[:, r, c])
        done += len(cols)
        if draw.progress:
            draw.progress(done / total)
    return codes
