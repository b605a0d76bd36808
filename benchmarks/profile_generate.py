"""Where one default Generate request's time goes: cProfile of ``Studio.generate`` at the defaults.

    python benchmarks/profile_generate.py [--checkpoints checkpoints] [--latent 64] [--threads 1] [--top 40]
    python benchmarks/profile_generate.py --synthesize [--n 8]   # the same for synthesize's batches

One warm-up request first (models loaded, caches filled), then the profiled one; prints the
wall time and the functions by cumulative time. With ``--synthesize``, ``synthesize`` writing
``--n`` images at the default settings into a temporary folder (one batch of 8 by default).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lesionstudio.app.studio import Studio  # noqa: E402
from lesionstudio.synthesize import synthesize  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--n", type=int, default=4, help="samples in the request (the tab's default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the app's sampler worker uses 1)")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--synthesize", action="store_true", help="profile synthesize writing --n images instead")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    studio = Studio(args.checkpoints)
    studio.generate(args.latent, n=1, seed=0, candidates=2, layouts=2)  # warm-up
    profile = cProfile.Profile()
    start = time.perf_counter()
    if args.synthesize:
        with tempfile.TemporaryDirectory() as out:
            profile.enable()
            synthesize(out, args.n, studio.stack(args.latent), show_progress=False)
            profile.disable()
        what = f"synthesize of {args.n} images"
    else:
        profile.enable()
        studio.generate(args.latent, n=args.n, seed=0)
        profile.disable()
        what = "one default request"
    print(f"{what} ({studio.default_settings(args.latent)}): {time.perf_counter() - start:.1f} s")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
