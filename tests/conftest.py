"""Shared fixtures: small lesion-like images made in the test, so no data set is needed."""

from __future__ import annotations

import csv
import json
import os
import shlex
import sys
from pathlib import Path

# One torch thread unless the caller chose: the tests' tensors are small, and the app servers and
# trainers they start need the other core.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "isic256"

# Tests never touch the network (set before any test module imports huggingface_hub).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# A tiny VQ-VAE for the trainer tests (64 px images, 32x32 codes), as command-line arguments.
TINY_VQVAE_ARGS = shlex.split(
    "--image-size 64 --latent 32 --crop 0 --batch-size 4 --workers 0 --hidden 16 --res-channels 8 "
    "--res-blocks 1 --num-codes 32 --code-dim 8 --lr 3e-3 --warmup-steps 1 --val-fraction 0.25"
)


def lesion_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A skin-toned background with a darker, irregular elliptical blob and some texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    skin = np.array([0.85, 0.65, 0.55]) + rng.uniform(-0.05, 0.05, 3)
    lesion = np.array([0.35, 0.2, 0.15]) + rng.uniform(-0.05, 0.05, 3)
    cx, cy = rng.uniform(0.35, 0.65, 2)
    rx, ry = rng.uniform(0.15, 0.3, 2)
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.15 * np.sin(3 * angle + rng.uniform(0, 6.28))
    r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2) / wobble
    inside = np.clip(1.5 - r, 0, 1)[..., None]
    img = skin * (1 - inside) + lesion * inside
    img += rng.normal(0, 0.02, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def painted_editor(upload: str, folder: Path, size: int, lo: int, hi: int) -> dict:
    """The Inpaint tab's editor value for gradio_client: the upload with a square [lo, hi) painted
    on a size x size layer."""
    from gradio_client import handle_file

    mask = np.zeros((size, size, 4), dtype=np.uint8)
    mask[lo:hi, lo:hi] = (255, 0, 255, 255)
    Image.fromarray(mask, "RGBA").save(folder / "mask.png")
    return {"background": handle_file(upload), "layers": [handle_file(str(folder / "mask.png"))], "composite": None}


def result_pixels(path_or_dict) -> np.ndarray:
    """The RGB pixels of an image a gradio_client call returned (a path, or a gallery item)."""
    path = path_or_dict["image"] if isinstance(path_or_dict, dict) else path_or_dict
    return np.asarray(Image.open(path).convert("RGB"))


def write_images(folder: Path, n: int, size: int = 64, start_seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"lesion_{i:03d}.{'png' if i % 2 else 'jpg'}"
        lesion_image(size, seed=start_seed + i).save(p)
        paths.append(p)
    return paths


def make_pair(root: Path, latent: int, num_codes: int = 16, prior_codes: int | None = None, coarse: int = 0) -> None:
    """A tiny untrained VQ-VAE + class-conditional prior pair in root/vqvae-N, root/pixelcnn-N
    (the prior hierarchical on root/vqvae-{coarse}'s codes when coarse is given)."""
    from lesionstudio.models.pixelcnn import GatedPixelCNN
    from lesionstudio.models.vqvae import VQVAE

    torch.manual_seed(latent)
    vq = VQVAE(
        hidden_channels=16, res_channels=8, num_res_blocks=1, downsample=256 // latent, num_codes=num_codes, code_dim=4
    )
    vq.save_pretrained(root / f"vqvae-{latent}")
    (root / f"vqvae-{latent}" / "codebook_usage.json").write_text(
        json.dumps({"num_codes": num_codes, "counts": list(range(num_codes))})
    )
    prior = GatedPixelCNN(
        num_codes=prior_codes or num_codes,
        channels=8,
        num_layers=2,
        num_classes=2,
        grid_size=latent,
        code_dim=4,
        class_names=["benign", "malignant"],
        cond_num_codes=num_codes if coarse else 0,
        cond_grid_size=coarse,
    )
    if coarse:  # random condition weights (they start at zero), so the coarse codes matter
        for layer in prior.layers:
            torch.nn.init.normal_(layer.cond_proj.weight, std=0.5)
    prior.save_pretrained(root / f"pixelcnn-{latent}")


@pytest.fixture
def stack_with_critic(tmp_path: Path) -> Path:
    """A tiny 16 -> 32 stack (random condition weights, so the coarse codes matter) with a
    realism critic whose scores are spread, so a ranking has something to rank."""
    from lesionstudio.models.critic import RealismCritic

    root = tmp_path / "ckpts"
    make_pair(root, 16)
    make_pair(root, 32, coarse=16)
    torch.manual_seed(0)
    critic = RealismCritic(channels=4)
    for p in critic.parameters():
        p.data.normal_(0, 0.5)
    critic.save_pretrained(root / "critic")
    return root


@pytest.fixture
def stack_with_layout_critic(stack_with_critic: Path) -> Path:
    """The same stack, its critic given a shape head and a layout head for the 16x16 grid, with
    random weights (so that they rank)."""
    from lesionstudio.models.critic import RealismCritic

    folder = stack_with_critic / "critic"
    plain = RealismCritic.from_pretrained(folder)
    critic = RealismCritic(**{**plain.config, "shape_head": True, "layout_grid": 16})
    torch.manual_seed(1)
    for p in critic.parameters():
        p.data.normal_(0, 0.5)
    critic.save_pretrained(folder)
    return stack_with_critic


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """16 lesion images (64 px), half benign and half malignant in labels.csv beside them."""
    folder = tmp_path / "images"
    paths = write_images(folder / "train", 16)
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label_if_known"])
        for i, p in enumerate(paths):
            w.writerow([f"train/{p.name}", "malignant" if i % 2 else "benign"])
    return folder


def kill_when_exists(args: list[str], path: Path, timeout: float = 300) -> None:
    """Start `python ARGS` and SIGKILL it as soon as `path` exists (an interrupted run)."""
    import signal
    import subprocess
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.exists(), f"{path} was never written"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The odd and hostile uploads of tests/hostile.py, written once."""
    from hostile import CORPUS, make

    folder = tmp_path_factory.mktemp("hostile")
    for name in CORPUS:
        make(folder, name)
    return folder


def launch_app(
    tmp_path_factory,
    source: Path | None = None,
    extra_args: tuple[str, ...] = (),
    hub: str | None = None,
    env: dict | None = None,
):
    """Start `python app.py` on a free loopback port, on `source` (or Hub repo `hub`) or tiny
    checkpoints; yield its URL."""
    import subprocess
    import time
    import urllib.request

    root = source
    if root is None and hub is None:
        root = tmp_path_factory.mktemp("ckpts")
        make_pair(root, 32)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_EXAMPLES_CACHE": str(tmp_path_factory.mktemp("examples_cache")),
        **(env or {}),
    }
    source_args = ["--hub", hub] if hub else ["--checkpoints", str(root)]
    log = open(tmp_path_factory.mktemp("log") / "app.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "app.py", *source_args, "--host", "127.0.0.1", "--port", str(port), *extra_args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited: {Path(log.name).read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("app did not start in time")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def run_module(args: list[str], cwd: Path = ROOT, timeout: float = 600, env: dict | None = None):
    """Run `python -m ...` from the repo root as a user would, returning the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )
