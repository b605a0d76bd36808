"""Load on the app: N concurrent gradio_client clients, a quarter of them generating, the rest
reconstructing uploads.

    python benchmarks/load.py [--clients 16] [--seconds 60] [--generate-clients K] [--mixed] [--root DIR]

Starts ``python app.py`` (of this checkout, or of ``--root``, to measure another version on the
same machine) on a free loopback port. First, on the idle app, one generate and one reconstruct
request alone (the idle times); then the clients for a bounded time, each keeping its role and
waiting for its answer before sending the next request. Prints requests served, errors, p50/p95/max
latency per endpoint with their ratios to the idle times, the app's peak memory (its sampler
process included: summed PSS and resident sets, sampled), and, where the app writes
``--timings``, where a request's time went.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from gradio_client import Client, handle_file
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lesionstudio.sampling.generation import DEFAULT_CANDIDATES, GenerationSettings  # noqa: E402


def lesion(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256] / 256
    r = np.hypot((xx - 0.5) / rng.uniform(0.2, 0.3), (yy - 0.5) / rng.uniform(0.2, 0.3))
    inside = np.clip(1.5 - r, 0, 1)[..., None]
    img = np.array([0.85, 0.65, 0.55]) * (1 - inside) + np.array([0.35, 0.2, 0.15]) * inside
    img += rng.normal(0, 0.02, img.shape)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


class MemoryWatch:
    """Peak memory of the app and its child processes (the sampler's), sampled every ``every``
    seconds: the sum of their resident sets (shared pages counted in each) and of their
    proportional sets (PSS: a page shared by k processes counts 1/k in each)."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.app, self.every = psutil.Process(pid), every
        self.peak_rss = self.peak_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            rss = pss = 0
            for proc in [self.app, *self.app.children(recursive=True)]:
                try:
                    info = proc.memory_full_info()
                except psutil.Error:  # a child that just exited
                    continue
                rss, pss = rss + info.rss, pss + info.pss
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss / 2**20), max(self.peak_pss, pss / 2**20)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def peak_rss_mib(pid: int) -> float:
    """The app process's own peak resident set (VmHWM), children not included."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """CPU seconds the app and its live child processes have used so far (all their threads)."""
    app = psutil.Process(pid)
    total = 0.0
    for proc in [app, *app.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(root: Path, port: int, checkpoints: str | None, timings: Path) -> subprocess.Popen:
    cmd = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)]
    if checkpoints:
        cmd += ["--checkpoints", checkpoints]
    if "--timings" in (root / "app.py").read_text():
        cmd += ["--timings", str(timings)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    app = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(360):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return app
        except OSError:
            if app.poll() is not None:
                sys.exit("the app exited during start-up")
            time.sleep(0.5)
    app.kill()
    sys.exit("the app did not start in 3 minutes")


class Requests:
    """The two requests the clients send, with the Generate tab's defaults. Each fetches the
    result files as a browser would (one plain GET each): gradio_client's own downloads cost the
    client more CPU than the server spends on a reconstruct, on the machine the app shares."""

    def __init__(self, latent: str, uploads: list[str], candidates: int) -> None:
        self.latent, self.uploads, self.candidates = latent, uploads, candidates

    def generate(self, client: Client, rng: random.Random) -> None:
        fetch_files(
            client.predict(
                self.latent,
                DEFAULTS.temperature,
                1,
                rng.randrange(10**6),
                "any",
                DEFAULTS.temperatures[1],
                self.candidates,
                api_name="/generate",
            )
        )

    def reconstruct(self, client: Client, rng: random.Random) -> None:
        fetch_files(client.predict(handle_file(rng.choice(self.uploads)), self.latent, api_name="/reconstruct"))


DEFAULTS = GenerationSettings()


def new_client(url: str) -> Client:
    return Client(url, verbose=False, download_files=False)


def fetch_files(result: Any) -> int:
    """GET every file a result names (nested lists, tuples and dicts); returns the bytes read."""
    if isinstance(result, dict):
        if isinstance(result.get("url"), str):
            with urllib.request.urlopen(result["url"], timeout=60) as r:
                return len(r.read())
        return sum(fetch_files(v) for v in result.values())
    if isinstance(result, list | tuple):
        return sum(fetch_files(v) for v in result)
    return 0


def load_latents(url: str, requests: Requests, latents: list[str]) -> list[str]:
    """One reconstruct and one single-candidate generation at each grid size, so that every
    size is loaded in the app and in its sampler before the load; returns their first-use times."""
    c, rng, lines = new_client(url), random.Random(-2), []
    for latent in latents:
        sized = Requests(latent, requests.uploads, 1)
        for op in ("reconstruct", "generate"):
            t = time.perf_counter()
            getattr(sized, op)(c, rng)
            lines.append(f"  first {op} at {latent}x{latent}: {time.perf_counter() - t:.2f} s")
    return lines


def idle_times(url: str, requests: Requests) -> dict[str, float]:
    """Each request alone on the idle app, after one warm-up: best of two."""
    c, rng, out = new_client(url), random.Random(-1), {}
    for op in ("generate", "reconstruct"):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            getattr(requests, op)(c, rng)
            times.append(time.perf_counter() - t)
        out[op] = min(times[1:])
    return out


def run_clients(url: str, requests: Requests, clients: int, generating: int, seconds: float, mixed: bool):
    latencies: dict[str, list[float]] = {"generate": [], "reconstruct": []}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.time() + seconds

    def worker(k: int) -> None:
        rng = random.Random(k)
        role = "generate" if k < generating else "reconstruct"
        try:
            c = new_client(url)
        except Exception as exc:  # a client that cannot connect counts as an error
            with lock:
                errors.append(f"connect: {exc}")
            return
        while time.time() < deadline:
            op = ("generate" if rng.random() < generating / clients else "reconstruct") if mixed else role
            t = time.perf_counter()
            try:
                getattr(requests, op)(c, rng)
                with lock:
                    latencies[op].append(time.perf_counter() - t)
            except Exception as exc:  # every failure counts as an error
                with lock:
                    errors.append(f"{op}: {exc}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return latencies, errors


def quantile(values: list[float], q: float) -> float:
    return float(np.quantile(values, q)) if values else float("nan")


def breakdown(timings: Path, latencies: dict[str, list[float]], skip: int) -> list[str]:
    """Mean seconds per request in each part, from the app's timing log (warm-up lines skipped)."""
    if not timings.exists():
        return ["  (this app writes no timings)"]
    rows = [json.loads(line) for line in timings.read_text().splitlines()[skip:]]
    out = []
    for op, values in latencies.items():
        mine = [r for r in rows if r["endpoint"] == op]
        if not mine or not values:
            continue
        mean = {k: statistics.fmean(r.get(k, 0.0) for r in mine) for k in mine[0] if k != "endpoint"}
        outside = statistics.fmean(values) - mean["handler"]
        parts = [f"Gradio queue + transfer {outside:.2f}"]
        if "waited" in mean:
            parts.append(f"sampler queue {mean['waited']:.2f}")
        parts.append(f"compute {mean['ran']:.2f}")
        if "cpu" in mean:
            parts.append(f"(on a core {mean['cpu']:.2f}: {mean['cpu'] / mean['ran']:.0%})")
        if "batch" in mean:
            parts.append(f"(batch of {mean['batch']:.1f} requests)")
        parts.append(f"encode {mean['encode']:.2f}")
        if mean.get("nearest"):
            parts.append(f"nearest {mean['nearest']:.2f}")
        out.append(f"  {op:<12} mean {statistics.fmean(values):.2f} s = " + ", ".join(parts))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--generate-clients", type=int, default=None, help="clients that generate (default: a quarter)")
    p.add_argument(
        "--mixed",
        action="store_true",
        help="each client picks each request's kind at random, generating with that share (the "
        "slow kind then holds most clients: they finish the fast ones and join its queue)",
    )
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose app.py is served")
    p.add_argument("--checkpoints", default=None, help="default: the app's own default")
    p.add_argument("--latent", default="64")
    p.add_argument(
        "--load-latents",
        nargs="+",
        default=[],
        metavar="N",
        help="grid sizes used once each before the load, so that all of them are loaded (peak memory)",
    )
    p.add_argument("--client-nice", type=int, default=19, help="CPU niceness of the clients (0: as the app)")
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="per generated sample")
    args = p.parse_args()
    generating = args.clients // 4 if args.generate_clients is None else args.generate_clients

    tmp = Path(tempfile.mkdtemp())
    uploads = []
    for i in range(32):  # distinct uploads, so no request can reuse another's work
        lesion(tmp / f"l{i}.png", i)
        uploads.append(str(tmp / f"l{i}.png"))
    requests = Requests(args.latent, uploads, args.candidates)
    port, timings = free_port(), tmp / "timings.jsonl"
    app = start_app(args.root, port, args.checkpoints, timings)
    # The clients share the machine with the app (real ones would not): the lowest CPU priority
    # lets the app have the cores it can use; the clients' share is printed.
    os.nice(args.client_nice)
    url = f"http://127.0.0.1:{port}/"
    memory = MemoryWatch(app.pid)
    try:
        first_use = load_latents(url, requests, args.load_latents)
        idle = idle_times(url, requests)
        skip = len(timings.read_text().splitlines()) if timings.exists() else 0
        cpu_before, clients_before = cpu_seconds(app.pid), time.process_time()
        start = time.time()
        latencies, errors = run_clients(url, requests, args.clients, generating, args.seconds, args.mixed)
        elapsed = time.time() - start
        app_cores = (cpu_seconds(app.pid) - cpu_before) / elapsed
        client_cores = (time.process_time() - clients_before) / elapsed
        served = sum(len(v) for v in latencies.values())
        share = generating / args.clients
        who = f"each request generating with p = {share:.2f}" if args.mixed else f"{generating} generating"
        print(
            f"{args.root.name}: {args.clients} clients ({who}; one {args.latent}x{args.latent} sample from "
            f"{args.candidates} candidates), {elapsed:.0f} s (requests in flight at the deadline were allowed "
            "to finish)"
        )
        if first_use:
            print("sizes loaded before the load (first use, incl. loading):\n" + "\n".join(first_use))
        print(f"requests served: {served} ({served / elapsed:.2f}/s), errors: {len(errors)}")
        for op, values in latencies.items():
            if values:
                print(
                    f"  {op:<12} n={len(values):<4} idle {idle[op]:5.2f} s  p50 {quantile(values, 0.5):6.2f} s "
                    f"({quantile(values, 0.5) / idle[op]:4.1f}x)  p95 {quantile(values, 0.95):6.2f} s "
                    f"({quantile(values, 0.95) / idle[op]:4.1f}x)  max {max(values):6.2f} s"
                )
        memory.stop()
        processes = 1 + len(psutil.Process(app.pid).children(recursive=True))
        print(
            f"app peak memory ({processes} process{'es' if processes > 1 else ''}): PSS {memory.peak_pss:.0f} MiB, "
            f"resident {memory.peak_rss:.0f} MiB summed; the app process alone {peak_rss_mib(app.pid):.0f} MiB (VmHWM)"
        )
        print("where the time went (means under load):")
        print("\n".join(breakdown(timings, latencies, skip)))
        print(
            f"cores busy during the load (of {os.cpu_count()}): the app {app_cores:.2f}, "
            f"the benchmark's clients {client_cores:.2f}; CPU seconds per request served: the app "
            f"{app_cores * elapsed / max(served, 1):.2f}, the clients {client_cores * elapsed / max(served, 1):.2f}"
        )
        for e in errors[:5]:
            print("error:", e)
    finally:
        app.terminate()
        app.wait(timeout=30)


if __name__ == "__main__":
    main()
