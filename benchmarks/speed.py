"""Generation speed, this code against a previous version's, side by side in one run.

    git worktree add ../previous <commit>          # the code to compare with
    python benchmarks/speed.py --baseline ../previous [--checkpoints checkpoints] [--parts ...]

Every part is measured by each code in turn, each in a fresh process with that code first on
its path, on the same checkpoints and the same machine, and printed as both figures and
their ratio:

* ``sampler``: one forward pass of a prior against the incremental sampler drawing a whole
  grid (64x64 and 128x128, batch 1 and 8; the finest level alone, on random coarse codes);
* ``tab``: the Generate tab's default request (4 samples) through the app's API, from the
  call to the gallery's files fetched, on the idle app (``python app.py`` of that code): best
  of 2 after a warm-up;
* ``request``: the same request through the app's sampler worker alone (no queue, no
  encoding, no transfer);
* ``reader``: a reader study of 20 images, from Start to its first image, for study seeds 0
  to 4: what is drawn before it shows (all synthetic images before the draw-ahead; the first
  ones after);
* ``synthesize``: images an hour of ``python -m lesionstudio.synthesize`` at the default
  settings (this code also with ``--workers 2`` and under ``torchrun --nproc-per-node 2``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["sampler", "tab", "request", "reader", "synthesize"]


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_sampler(checkpoints: Path) -> dict[str, float]:
    from lesionstudio.models.pixelcnn import GatedPixelCNN

    out = {}
    for latent in (64, 128):
        prior = GatedPixelCNN.from_pretrained(checkpoints / f"pixelcnn-{latent}").eval()
        for n in (1, 8):
            forward, drawn = time_grid(prior, latent, n)
            out[f"{latent}x{latent} batch {n}: one forward pass, s"] = forward
            out[f"{latent}x{latent} batch {n}: incremental sampler, s"] = drawn
            out[f"{latent}x{latent} batch {n}: sampler / forward"] = drawn / forward
    return out


def time_grid(prior, latent: int, n: int) -> tuple[float, float]:
    """(one forward pass, the incremental sampler's whole grid) in seconds, on random coarse codes."""
    import torch

    from lesionstudio.sampling.grid import sample

    g = torch.Generator().manual_seed(0)
    side = prior.cond_grid_size * latent // prior.grid_size
    labels = torch.zeros(n, dtype=torch.long)
    coarse = torch.randint(0, prior.cond_num_codes, (n, side, side), generator=g)
    codes = torch.randint(0, prior.num_codes, (n, latent, latent), generator=g)
    with torch.no_grad():
        prior(codes, labels, coarse)  # warm-up
        forward = best_of(functools.partial(prior, codes, labels, coarse), 3)
    draw = functools.partial(sample, prior, n, (latent, latent), seed=list(range(n)), labels=labels, coarse=coarse)
    return forward, best_of(draw, 2)


def app_sampler(checkpoints: Path):
    """A studio and its sampler worker, started as the app starts them."""
    from lesionstudio.app.serving import SamplerWorker, set_thread_budget
    from lesionstudio.app.studio import Studio

    set_thread_budget()
    studio = Studio(str(checkpoints))
    studio.preload()
    return studio, SamplerWorker(studio)


def measure_request(checkpoints: Path) -> dict[str, float]:
    studio, worker = app_sampler(checkpoints)
    request = studio.request(studio.default_latent)
    worker.generate(request, [100])  # warm-up
    starts = iter([0, 4])

    def draw() -> None:
        start = next(starts)
        worker.generate(request, list(range(start, start + 4)))

    return {"default Generate request (4 samples), s": best_of(draw, 2)}


def measure_reader(checkpoints: Path, data: Path) -> dict[str, float]:
    from lesionstudio.app import readerstudy
    from lesionstudio.app.serving import QuizImages

    studio, worker = app_sampler(checkpoints)
    studio.reader_files = sorted(str(p) for p in data.glob("*.jpg"))[:200]
    worker.generate(studio.request(studio.default_latent), [100])  # warm-up
    waits = []
    for study_seed in range(5):
        trials = studio.quiz_trials(20, study_seed)
        start = time.perf_counter()
        if hasattr(readerstudy, "draw_plan"):  # this code: the first batch of the draw-ahead
            first = readerstudy.draw_plan(trials, 2, getattr(worker, "processes", 1))[0]
        else:  # the previous code: every synthetic image before the first shows
            first = [t for t in trials if t.real_path is None]
        if first:
            worker.run(QuizImages(first))
        waits.append(time.perf_counter() - start)
    name = "reader study (20 images, study seeds 0-4): Start to the first image"
    return {f"{name}, mean s": sum(waits) / len(waits), f"{name}, longest s": max(waits)}


def measure_synthesize(checkpoints: Path, images: int, launch: str) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="lesionstudio-speed-"))
    args = ["--images" if launch == "torchrun" else "--n", str(images), "--out", str(folder / "set")]
    args += ["--checkpoints", str(checkpoints), "--seed", "0"]
    command = [sys.executable, "-m", "lesionstudio.synthesize", *args]
    if launch == "workers":
        command += ["--workers", "2"]
    elif launch == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m"]
        command += ["lesionstudio.synthesize", *args]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=os.environ.copy())
    seconds = time.perf_counter() - start
    shutil.rmtree(folder)
    return {f"synthesize {images} images ({launch}), images an hour": images * 3600 / seconds}


def measure_tab(code: Path, checkpoints: Path) -> dict[str, float]:
    """The Generate tab's default request through the API of ``python app.py`` run from ``code``."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from load import fetch_files, free_port, new_client, start_app

    port = free_port()
    app = start_app(code, port, str(checkpoints), Path(tempfile.mkdtemp()) / "timings.jsonl")
    try:
        client = new_client(f"http://127.0.0.1:{port}/")
        starts = iter([100, 0, 4])

        def request() -> None:
            fetch_files(client.predict("64", 1.0, 4, next(starts), "any", api_name="/generate"))

        request()  # warm-up
        return {"Generate tab, default request (4 samples), click to files, s": best_of(request, 2)}
    finally:
        app.terminate()
        app.wait(30)


def measure(part: str, args: argparse.Namespace) -> dict[str, float]:
    if part == "sampler":
        return measure_sampler(args.checkpoints)
    if part == "request":
        return measure_request(args.checkpoints)
    if part == "reader":
        return measure_reader(args.checkpoints, args.data)
    launch = part.split(":")[1]
    return measure_synthesize(args.checkpoints, args.images, launch)


def run_part(code: Path, part: str, args: argparse.Namespace) -> dict[str, float]:
    """One part measured by the code in ``code``, in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, __file__, "--measure", part, "--checkpoints", str(args.checkpoints)]
    command += ["--data", str(args.data), "--images", str(args.images)]
    done = subprocess.run(command, env=env, cwd=code, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{part} failed with the code in {code}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", type=Path, help="a checkout of the code to compare with")
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/isic256/train", help="the reader's images")
    p.add_argument("--images", type=int, default=8, help="images each synthesize run draws")
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    p.add_argument("--measure", help=argparse.SUPPRESS)  # inside one code's process
    args = p.parse_args()
    args.checkpoints = args.checkpoints.resolve()
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return
    codes = ([("previous", args.baseline.resolve())] if args.baseline else []) + [("this", ROOT)]
    print(f"checkpoints {args.checkpoints}; {os.cpu_count()} cores; codes: {', '.join(f'{n} {c}' for n, c in codes)}")
    for part in args.parts:
        jobs = [part] if part != "synthesize" else ["synthesize:one"]
        results = {name: {} for name, _ in codes}
        for job in jobs:
            for name, code in codes:
                results[name] |= measure_tab(code, args.checkpoints) if job == "tab" else run_part(code, job, args)
        if part == "synthesize":
            for launch in ("workers", "torchrun"):
                results["this"] |= run_part(ROOT, f"synthesize:{launch}", args)
        report(results)


def report(results: dict[str, dict[str, float]]) -> None:
    this = results["this"]
    previous = results.get("previous", {})
    for key, value in this.items():
        if key in previous:
            print(f"{key}: previous {previous[key]:.3f}, this {value:.3f} ({value / previous[key]:.2f}x)")
        else:
            print(f"{key}: this {value:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
