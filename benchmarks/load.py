"""Load on the app: N concurrent gradio_client clients mixing reconstruct and generate.

    python benchmarks/load.py [--clients 16] [--seconds 60] [--checkpoints DIR] [--latent 64]

Starts `python app.py` on a free loopback port, runs the clients for a bounded time (each
waits for its answer before sending the next request), then prints requests served, errors,
p50/p95/max latency per endpoint and the app's peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
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

import numpy as np
from gradio_client import Client, handle_file
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def lesion(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256] / 256
    r = np.hypot((xx - 0.5) / rng.uniform(0.2, 0.3), (yy - 0.5) / rng.uniform(0.2, 0.3))
    inside = np.clip(1.5 - r, 0, 1)[..., None]
    img = np.array([0.85, 0.65, 0.55]) * (1 - inside) + np.array([0.35, 0.2, 0.15]) * inside
    img += rng.normal(0, 0.02, img.shape)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--checkpoints", default=None, help="default: the bundled checkpoints/")
    p.add_argument("--latent", default="64")
    p.add_argument("--generate-share", type=float, default=0.25, help="fraction of requests that generate")
    args = p.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)]
    if args.checkpoints:
        cmd += ["--checkpoints", args.checkpoints]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    app = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(360):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if app.poll() is not None:
                    sys.exit("the app exited during start-up")
                time.sleep(0.5)
        tmp = Path(tempfile.mkdtemp())
        uploads = []
        for i in range(4):
            lesion(tmp / f"l{i}.png", i)
            uploads.append(str(tmp / f"l{i}.png"))
        latencies: dict[str, list[float]] = {"reconstruct": [], "generate": []}
        errors: list[str] = []
        lock = threading.Lock()
        start = time.time()
        deadline = start + args.seconds

        def worker(k: int) -> None:
            rng = random.Random(k)
            client = Client(url, verbose=False)
            while time.time() < deadline:
                op = "generate" if rng.random() < args.generate_share else "reconstruct"
                t = time.time()
                try:
                    if op == "generate":
                        client.predict(args.latent, 1.0, 1, rng.randrange(10**6), "any", api_name="/generate")
                    else:
                        client.predict(handle_file(rng.choice(uploads)), args.latent, api_name="/reconstruct")
                    with lock:
                        latencies[op].append(time.time() - t)
                except Exception as exc:  # every failure counts as an error
                    with lock:
                        errors.append(f"{op}: {exc}")

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.time() - start
        served = sum(len(v) for v in latencies.values())
        print(f"{args.clients} clients, {elapsed:.0f} s (requests in flight at the deadline were allowed to finish)")
        print(f"requests served: {served} ({served / elapsed:.2f}/s), errors: {len(errors)}")
        for op, values in latencies.items():
            if values:
                q = statistics.quantiles(values, n=20) if len(values) > 1 else values * 19
                print(f"  {op:<12} n={len(values):<4} p50 {statistics.median(values):6.2f} s  "
                      f"p95 {q[18]:6.2f} s  max {max(values):6.2f} s")  # fmt: skip
        print(f"app peak resident memory: {peak_rss_mib(app.pid):.0f} MiB")
        for e in errors[:5]:
            print("error:", e)
    finally:
        app.terminate()
        app.wait(timeout=30)


if __name__ == "__main__":
    main()
