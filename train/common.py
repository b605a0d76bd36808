"""What both trainers share: devices, torchrun, seeding, atomic checkpoints, logs."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, RandomSampler

from lesionstudio.files import atomic_file

CHECKPOINT = "checkpoint.pt"


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); nccl on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def cleanup_distributed(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda was asked for but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states in a form torch.load(weights_only=True) accepts (tensors, lists, ints)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_output_dir(out: Path, need_bytes: int) -> None:
    """Fail before training, not hours later, when the output folder is unusable or the disk is full."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-") as f:
            f.write(b"ok")
            f.flush()
    except OSError as exc:
        raise SystemExit(f"error: cannot write to --out {out}: {exc}") from exc
    for stale in out.glob(f".{CHECKPOINT}.*.tmp"):  # left by a run killed while saving
        stale.unlink(missing_ok=True)
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise SystemExit(
            f"error: only {free / 2**20:.0f} MiB free under {out}; training needs about {need_bytes / 2**20:.0f} MiB"
        )


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """Load a training checkpoint; weights_only=True so a tampered file cannot run code."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # any failure here means the file is unusable
        raise SystemExit(
            f"error: checkpoint {path} cannot be loaded ({exc}); remove it or start without --resume"
        ) from exc


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path: Path, last_epoch: int) -> None:
    """Drop records after the checkpointed epoch, so a resumed run does not log an epoch twice."""
    records = [r for r in read_jsonl(path) if r.get("epoch", 0) <= last_epoch]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def check_finite(loss: torch.Tensor, epoch: int, step: int, out: Path) -> None:
    if not torch.isfinite(loss).all():
        raise SystemExit(
            f"error: loss became {loss.item()} at epoch {epoch + 1}, step {step}; stopping. "
            f"The last good checkpoint is kept in {out / CHECKPOINT} (try a lower --lr)."
        )


def push_to_hub(folder: Path, repo_id: str, name: str) -> None:
    """Upload a trained model's folder into `name/` of a Hub repo, where the app looks for it."""
    from huggingface_hub import get_token

    from lesionstudio.publish import publish_folder

    if not get_token():
        print(f"--push-to-hub {repo_id}: no Hugging Face token (HF_TOKEN or `hf auth login`); not uploading")
        return
    info = publish_folder(folder, repo_id, name)
    print(f"uploaded {folder} to {repo_id}/{name}: {info.commit_url}")


@dataclass
class Optimization:
    """Adam, a warm-up + cosine schedule by step, and mixed precision on CUDA."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None

    @classmethod
    def create(
        cls, model: torch.nn.Module, lr: float, total_steps: int, warmup_steps: int, device: torch.device
    ) -> Optimization:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        warmup = min(warmup_steps, total_steps // 10 + 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total_steps, warmup))
        amp_dtype = None
        if device.type == "cuda":
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        return cls(model, optimizer, scheduler, scaler, amp_dtype)

    def autocast(self):
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path, epoch: int) -> None:
        """An atomic checkpoint: a crash mid-write leaves the previous one intact."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "epoch": epoch,
            "config": getattr(self.model, "config", {}),
        }
        with atomic_file(path) as f:
            torch.save(state, f)

    def resume(self, out: Path, resume: bool, device: torch.device, is_main: bool) -> int:
        """Load OUT/checkpoint.pt when resuming and return the epochs already done (0 for a fresh run)."""
        path = out / CHECKPOINT
        log = out / "metrics.jsonl"
        if not (resume and path.exists()):
            if is_main and log.exists():
                log.unlink()  # a fresh run starts a fresh log
            return 0
        ckpt = load_checkpoint(path, device)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if is_main:
            truncate_jsonl(log, ckpt["epoch"])
            print(f"resumed from {path} after epoch {ckpt['epoch']}")
        return ckpt["epoch"]


def epoch_sampler(dataset: Any, d: Dist, seed: int, epoch: int) -> torch.utils.data.Sampler:
    """The epoch's shuffling, a function of (seed, epoch) only, so a resumed run repeats it."""
    if d.enabled:
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        return sampler
    return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


class TrainingRun(Protocol):
    """What :func:`fit` needs of a trainer's run."""

    @property
    def args(self) -> Any: ...  # the trainer's arguments: out, resume, epochs

    @property
    def device(self) -> torch.device: ...

    @property
    def d(self) -> Dist: ...

    @property
    def model(self) -> torch.nn.Module: ...

    @property
    def opt(self) -> Optimization: ...


R = TypeVar("R", bound=TrainingRun)
S = TypeVar("S")


@dataclass(frozen=True)
class Steps(Generic[R, S]):
    """A trainer's steps: build its run, describe it, train one epoch (every rank), end an epoch
    (rank 0: validate, log, checkpoint) and export the model (rank 0)."""

    prepare: Callable[[Any, torch.device, Dist], R]
    describe: Callable[[R], str]
    train_epoch: Callable[[R, torch.nn.Module, int], S]
    end_epoch: Callable[[R, int, S], None]
    export: Callable[[R], None]


def fit(run: R, steps: Steps[R, S]) -> None:
    """A prepared run's epochs: resume from OUT/checkpoint.pt, then train each remaining epoch on
    every rank, with rank 0 describing the run first, ending each epoch and exporting at the end."""
    args, d = run.args, run.d
    start_epoch = run.opt.resume(args.out, args.resume, run.device, d.is_main)
    net = DistributedDataParallel(run.model) if d.enabled else run.model
    if d.is_main:
        print(steps.describe(run))
    for epoch in range(start_epoch, args.epochs):
        stats = steps.train_epoch(run, net, epoch)
        if d.is_main:
            steps.end_epoch(run, epoch, stats)
    if d.is_main:
        steps.export(run)


def run(args: Any, steps: Steps, need_bytes: int = 200 * 2**20) -> None:
    """Pick the device, join torchrun's process group if there is one, check the output folder,
    train, leave the group."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    device = pick_device(args.device)
    d = setup_distributed(device)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    try:
        if d.is_main:
            check_output_dir(args.out, need_bytes)
        fit(steps.prepare(args, device, d), steps)
    finally:
        cleanup_distributed(d)
