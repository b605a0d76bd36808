"""Time to one finished sample (every level drawn, decoded), with and without candidate ranking.

    python benchmarks/generate.py [--checkpoints checkpoints] [--baseline OLD_CHECKPOINTS] [--latent 64 [128 ...]]

Times ``Studio.generate`` (what the Generate tab runs, minus the browser): one sample at the
default temperatures and layout guidance, then one sample ranked from 2 and 4 candidates when
the checkpoints have a critic, each also with every candidate's layout chosen from ``--layouts``
(default 8) when the critic has a layout head. ``--baseline`` times another checkpoints folder the same way in
the same run (for example the previous release), and several ``--latent`` sizes are timed one
after another, so the ratios (to the first row) compare like with like. Best of ``--repeat``
runs, after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lesionstudio.app.studio import Studio  # noqa: E402


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def rows(source: str, latent: int, repeat: int, candidates: list[int], layouts: int) -> list[tuple[str, float]]:
    studio = Studio(source)
    stack = studio.stack(latent)
    name = f"{source}: {' -> '.join(str(lv.latent) for lv in stack.levels)}"
    chosen = [1] + ([layouts] if layouts > 1 and studio.default_settings(latent).layouts > 1 else [])
    out = []
    for m in [1] + [c for c in candidates if studio.has_critic and c > 1]:
        for k in chosen:
            t = best_of(
                lambda m=m, k=k: studio.generate(latent, n=1, seed=0, candidates=m, layouts=k),
                repeat,
            )
            label = f"{name}, {m} candidate{'s' if m > 1 else ''}" + (f", {k} layouts each" if k > 1 else "")
            out.append((label, t))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--baseline", default=None, help="another checkpoints folder, timed in the same run")
    p.add_argument("--latent", type=int, nargs="+", default=[64], help="grid sizes, timed in this order")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--candidates", type=int, nargs="+", default=[2, 4])
    p.add_argument("--layouts", type=int, default=8, help="layouts per candidate (1: none chosen)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.repeat}")
    results = []
    for latent in args.latent:
        if args.baseline:
            results += rows(args.baseline, latent, args.repeat, [], 1)
        results += rows(args.checkpoints, latent, args.repeat, args.candidates, args.layouts)
    base = results[0][1]
    for label, t in results:
        print(f"{t:8.2f} s  {t / base:5.2f}x  {label}")


if __name__ == "__main__":
    main()
