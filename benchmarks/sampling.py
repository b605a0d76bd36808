"""Sampling speed, measured side by side in one run: one forward pass vs incremental vs plain.

    python benchmarks/sampling.py [--prior checkpoints/pixelcnn-64] [--threads 2]

The plain sampler (one whole forward pass per code) is timed on the first codes of the grid
and extrapolated to the whole grid (its cost per code is constant); its column says so. A
hierarchical prior is timed on random coarse codes (its fine stage alone; the coarse stage
costs what its own prior's benchmark says).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lesionstudio.models.pixelcnn import GatedPixelCNN  # noqa: E402
from lesionstudio.sampling.grid import inpaint, sample  # noqa: E402


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(prior: GatedPixelCNN, g: int, n: int, positions: int) -> None:
    codes = torch.randint(0, prior.num_codes, (n, g, g))
    labels = torch.zeros(n, dtype=torch.long) if prior.num_classes else None
    coarse = None
    if prior.hierarchical:
        gc = g * prior.cond_grid_size // prior.grid_size
        coarse = torch.randint(0, prior.cond_num_codes, (n, gc, gc))
    with torch.no_grad():
        prior(codes, labels, coarse)  # warm-up
        forward = timed(lambda: prior(codes, labels, coarse), repeat=2)
    incremental = timed(lambda: sample(prior, n, shape=(g, g), seed=0, labels=labels, coarse=coarse), repeat=2)
    mask = torch.zeros(n, g * g, dtype=torch.bool)
    mask[:, :positions] = True
    mask = mask.view(n, g, g)
    plain = timed(lambda: inpaint(prior, codes, mask, seed=0, fills=1, method="naive", coarse=coarse))
    plain *= g * g / positions
    print(
        f"{g:>4}x{g:<2} {n:>5} {forward:>10.3f} {incremental:>14.2f} {plain:>8.0f} (from {positions}) "
        f"{incremental / forward:>12.1f}x {plain / incremental:>10.0f}x"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prior", default=None, help="prior folder; default: a random prior of the default config")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--grids", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--plain-codes", type=int, default=8, help="codes the plain sampler is timed on")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.prior:
        prior = GatedPixelCNN.from_pretrained(args.prior)
        name = args.prior
    else:
        torch.manual_seed(0)
        prior = GatedPixelCNN(num_classes=2).eval()
        name = "random prior, default config"
    print(
        f"prior: {name} (channels {prior.channels}, layers {prior.num_layers}, kernel {prior.kernel_size}, "
        f"K {prior.num_codes}, classes {prior.num_classes}"
        f"{', on random coarse codes' if prior.hierarchical else ''}); "
        f"torch {torch.__version__}, {args.threads} threads"
    )
    header = f"{'grid':>7} {'batch':>5} {'forward s':>10} {'incremental s':>14} {'plain s (extrapolated)':>22} "
    header += f"{'incr/forward':>13} {'plain/incr':>11}"
    print(header)
    for g in args.grids:
        if prior.hierarchical and (g * prior.cond_grid_size) % prior.grid_size:
            continue  # no whole coarse grid for this size
        for n in args.batches:
            measure(prior, g, n, min(args.plain_codes, g * g))


if __name__ == "__main__":
    main()
