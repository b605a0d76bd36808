"""Train a Gated PixelCNN prior over the codes of a trained VQ-VAE.

    python -m train.pixelcnn --vqvae runs/vq64/final --data ../shared/data/isic256/train \\
        --labels ../shared/data/isic256/MANIFEST.csv --out runs/px64 --epochs 20 --crop 32

With --coarse-vqvae (a VQ-VAE of the same images with a smaller grid, e.g. runs/vq32/final for
a 64x64 prior) the prior becomes hierarchical: it is conditioned on the coarse codes of each
image, and sampling draws the coarse grid first with that VQ-VAE's own prior. --init-from
starts from a trained prior of the same shape (new conditioning layers start at zero). --crop
then cuts the same window of the image from both grids (S a multiple of the grids' ratio).

The images are encoded once (cached in OUT/codes.npz, and OUT/coarse_codes.npz). Each epoch writes (rank 0 only)
OUT/metrics.jsonl, OUT/curves.html, OUT/samples_epochNNN.png and an atomic OUT/checkpoint.pt;
--resume continues from it; the end exports OUT/final/ with save_pretrained.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchvision.utils import save_image
from tqdm import tqdm

from lesionstudio.cli import HelpFormatter, add_config_argument, parse_with_config
from lesionstudio.codes import CodeSet, codes_key, load_or_extract
from lesionstudio.data import LesionImageFolder, dihedral_variant, eval_transform, split_indices
from lesionstudio.measure.metrics import entropy_bits, usage_histogram
from lesionstudio.measure.scoring import prior_bits
from lesionstudio.models.pixelcnn import GatedPixelCNN
from lesionstudio.models.vqvae import VQVAE
from lesionstudio.plots import write_curves
from lesionstudio.sampling.grid import sample

from . import common


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.pixelcnn", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--vqvae", type=str, required=True, help="trained VQ-VAE folder (or Hub repo id)")
    p.add_argument("--data", type=Path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, logs; OUT/final/ at the end")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--labels", type=Path, default=None, help="CSV of file -> class: makes the prior conditional")
    p.add_argument("--label-column", default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--limit", type=int, default=None, help="use a seeded random subset of N images")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument(
        "--val-limit",
        type=int,
        default=None,
        help="validation grids scored per epoch (default: all; a 128x128 grid costs 16x a 32x32 one)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--crop",
        type=int,
        default=0,
        help="train on random SxS windows of the code grid (0: whole); with --coarse-vqvae, the same "
        "window of the coarse grid too",
    )
    p.add_argument(
        "--dihedral",
        type=int,
        default=1,
        choices=range(1, 9),
        metavar="K",
        help="train on the codes of K turns of each training image: 4 = the right-angle rotations, "
        "8 = with their mirror images (validation stays on the originals)",
    )
    p.add_argument("--coarse-vqvae", default=None, help="condition on this coarser-grid VQ-VAE's codes of each image")
    p.add_argument("--init-from", default=None, help="start from this trained prior's weights (same architecture)")
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--samples", type=int, default=4, help="samples decoded after each epoch (0: none)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None)
    add_config_argument(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser()
    return parse_with_config(p, argv)


def encode_dataset(
    args: argparse.Namespace, vq: VQVAE, device: torch.device, cache: str = "codes.npz", variant: int = 0
) -> tuple[CodeSet, list[str]]:
    """Codes of every image, or of its dihedral `variant` (cached per variant)."""
    base = eval_transform(vq.image_size)
    transform = base if variant == 0 else (lambda img: dihedral_variant(base(img), variant))
    if variant:
        cache = cache.replace(".npz", f"_d{variant}.npz")
    ds = LesionImageFolder(args.data, transform=transform, labels_csv=args.labels, label_column=args.label_column)
    ds = ds.limited(args.limit, args.seed)
    codes = load_or_extract(args.out / cache, vq, ds, codes_key(vq), device)
    return codes, ds.classes


def load_coarse_vqvae(path: str, vq: VQVAE, device: torch.device) -> VQVAE:
    coarse = VQVAE.from_pretrained(path).to(device).eval()
    fine, small = vq.latent_size, coarse.latent_size
    if coarse.image_size != vq.image_size or fine % small or small >= fine:
        raise SystemExit(
            f"--coarse-vqvae {path} must encode the same {vq.image_size}px images to a grid that divides "
            f"{vq.latent_size}x{vq.latent_size}; it makes {coarse.latent_size}x{coarse.latent_size} "
            f"from {coarse.image_size}px"
        )
    return coarse


def init_from(model: GatedPixelCNN, path: str) -> None:
    """Copy a trained prior's weights; only the coarse-condition layers may be new (they stay zero)."""
    src = GatedPixelCNN.from_pretrained(path)
    keys = ("num_codes", "channels", "num_layers", "kernel_size", "num_classes")
    diff = [f"{k} {src.config[k]} vs {model.config[k]}" for k in keys if src.config[k] != model.config[k]]
    if diff:
        raise SystemExit(f"--init-from {path} has a different architecture: " + "; ".join(diff))
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    new = [k for k in missing if not (k.startswith("condition.") or ".cond_proj." in k)]
    if new or unexpected:
        raise SystemExit(f"--init-from {path}: weights do not fit (missing {new}, unexpected {unexpected})")


@dataclass
class Grids:
    """Code grids for training or validation: codes [N, h, w], labels [N] (-1: unknown) and, for
    a hierarchical prior, the coarse codes [N, hc, wc] of the same images."""

    codes: torch.Tensor
    labels: torch.Tensor
    coarse: torch.Tensor | None

    @classmethod
    def of(cls, codeset: CodeSet, coarse_set: CodeSet | None, labelled_only: bool) -> Grids:
        grids = cls(
            torch.from_numpy(codeset.codes.astype("int64")),
            torch.from_numpy(codeset.labels),
            None if coarse_set is None else torch.from_numpy(coarse_set.codes.astype("int64")),
        )
        return grids.take(torch.nonzero(grids.labels >= 0).flatten().tolist()) if labelled_only else grids

    @classmethod
    def cat(cls, parts: list[Grids]) -> Grids:
        coarse = None if parts[0].coarse is None else torch.cat([p.coarse for p in parts])
        return cls(torch.cat([p.codes for p in parts]), torch.cat([p.labels for p in parts]), coarse)

    def __len__(self) -> int:
        return len(self.codes)

    def take(self, idx: list[int]) -> Grids:
        return Grids(self.codes[idx], self.labels[idx], None if self.coarse is None else self.coarse[idx])

    def dataset(self) -> TensorDataset:
        extra = () if self.coarse is None else (self.coarse,)
        return TensorDataset(self.codes, self.labels, *extra)


@dataclass
class Windows:
    """Training windows of code grids [B, s, s] and, for a hierarchical prior, the same windows
    of their coarse grids [B, s / f, s / f] (f: the fine-to-coarse ratio)."""

    codes: torch.Tensor
    coarse: torch.Tensor | None


def random_windows(
    codes: torch.Tensor, size: int, coarse: torch.Tensor | None = None, gen: torch.Generator | None = None
) -> Windows:
    """One random size x size window of each grid in codes [B, h, w] (the whole grid when size is
    0 or not smaller). With coarse grids [B, hc, wc], each window starts on a coarse cell's
    corner and its coarse window covers the same part of the image."""
    b, h, w = codes.shape
    if size <= 0 or size >= min(h, w):
        return Windows(codes, coarse)
    f = 1 if coarse is None else h // coarse.shape[1]
    if size % f:
        raise ValueError(f"a {size}x{size} window does not cover whole {f}x{f} blocks of the coarse grid")
    ys = torch.randint(0, (h - size) // f + 1, (b,), generator=gen) * f
    xs = torch.randint(0, (w - size) // f + 1, (b,), generator=gen) * f
    corners = list(zip(ys.tolist(), xs.tolist(), strict=True))
    fine = torch.stack([codes[i, y : y + size, x : x + size] for i, (y, x) in enumerate(corners)])
    if coarse is None:
        return Windows(fine, None)
    s = size // f
    return Windows(
        fine, torch.stack([coarse[i, y // f : y // f + s, x // f : x // f + s] for i, (y, x) in enumerate(corners)])
    )


@dataclass
class Encoded:
    """The codes of one dihedral variant of every image, and their coarse codes for a hierarchical prior."""

    codes: CodeSet
    coarse: CodeSet | None
    classes: list[str]


@dataclass
class Run:
    """What the steps of a training run share."""

    args: argparse.Namespace
    device: torch.device
    d: common.Dist
    vq: VQVAE
    coarse_vq: VQVAE | None  # the coarser grid's VQ-VAE of a hierarchical prior
    classes: list[str]
    train_set: Grids  # every dihedral variant of the training images
    val_set: Grids  # the validation images as they are
    model: GatedPixelCNN
    opt: common.Optimization
    unigram: float  # bits per code of a model that ignores context

    @property
    def conditional(self) -> bool:
        return self.args.labels is not None

    @property
    def hierarchical(self) -> bool:
        return self.coarse_vq is not None

    @property
    def grid(self) -> int:
        return self.val_set.codes.shape[1]


@dataclass
class EpochStats:
    loss: float  # summed over the steps, in nats per code
    steps: int
    codes: int
    seconds: float


def prepare(args: argparse.Namespace, device: torch.device, d: common.Dist) -> Run:
    """Load the VQ-VAEs, encode and split the images, build the model."""
    vq = VQVAE.from_pretrained(args.vqvae).to(device).eval()
    coarse_vq = load_coarse_vqvae(args.coarse_vqvae, vq, device) if args.coarse_vqvae else None
    if coarse_vq is not None and args.crop % (vq.latent_size // coarse_vq.latent_size):
        ratio = vq.latent_size // coarse_vq.latent_size
        raise SystemExit(
            f"--crop must be a multiple of {ratio} with this --coarse-vqvae (its codes cover {ratio}x{ratio} fine ones)"
        )
    encoded = encode_variants(args, vq, coarse_vq, device, d)
    train_set, val_set, train_labels = split_grids(args, encoded)
    classes = encoded[0].classes
    common.seed_everything(args.seed)
    model = build_model(args, vq, coarse_vq, classes, train_labels).to(device)
    if args.init_from:  # a --resume checkpoint, when there is one, then replaces these weights
        init_from(model, args.init_from)
    steps_per_epoch = max(1, len(train_set) // (args.batch_size * d.world_size))
    opt = common.Optimization.create(model, args.lr, steps_per_epoch * args.epochs, args.warmup_steps, device)
    unigram = entropy_bits(usage_histogram(train_set.codes, vq.num_codes))
    return Run(args, device, d, vq, coarse_vq, classes, train_set, val_set, model, opt, unigram)


def encode_all(
    args: argparse.Namespace, vq: VQVAE, coarse_vq: VQVAE | None, device: torch.device, variant: int
) -> Encoded:
    """The codes (and coarse codes) of dihedral variant `variant` of every image."""
    codeset, classes = encode_dataset(args, vq, device, variant=variant)
    coarse_set = None
    if coarse_vq is not None:
        coarse_set = encode_dataset(args, coarse_vq, device, "coarse_codes.npz", variant)[0]
    if coarse_set is not None and coarse_set.files != codeset.files:
        raise SystemExit("the two VQ-VAEs read different images (a file became unreadable?); delete the caches")
    return Encoded(codeset, coarse_set, classes)


def encode_variants(
    args: argparse.Namespace, vq: VQVAE, coarse_vq: VQVAE | None, device: torch.device, d: common.Dist
) -> list[Encoded]:
    """Every variant's codes: rank 0 encodes (and caches) them, the other ranks then read the caches."""
    variants = range(args.dihedral)
    encoded = [encode_all(args, vq, coarse_vq, device, k) for k in variants] if d.is_main else []
    if d.enabled:
        torch.distributed.barrier()
        if not d.is_main:
            encoded = [encode_all(args, vq, coarse_vq, device, k) for k in variants]
    return encoded


def split_grids(args: argparse.Namespace, encoded: list[Encoded]) -> tuple[Grids, Grids, torch.Tensor]:
    """Training grids (every variant), validation grids (the originals) and the training images'
    labels; a conditional prior keeps the labelled images only."""
    conditional = args.labels is not None
    grids = [Grids.of(e.codes, e.coarse, conditional) for e in encoded]
    n_read = len(encoded[0].codes.labels)
    if conditional and len(grids[0]) < n_read:
        print(f"dropping {n_read - len(grids[0])} images without a label")
    train_idx, val_idx = split_indices(len(grids[0]), args.val_fraction, seed=args.seed)
    # Variants of a validation image stay out of training.
    train_set = Grids.cat([g.take(train_idx) for g in grids])
    # Class frequencies are those of the images, not of their variants.
    return train_set, grids[0].take(val_idx), grids[0].take(train_idx).labels


def build_model(
    args: argparse.Namespace, vq: VQVAE, coarse_vq: VQVAE | None, classes: list[str], train_labels: torch.Tensor
) -> GatedPixelCNN:
    conditional = args.labels is not None
    return GatedPixelCNN(
        num_codes=vq.num_codes,
        channels=args.channels,
        num_layers=args.layers,
        kernel_size=args.kernel,
        num_classes=len(classes) if conditional else 0,
        grid_size=vq.latent_size,
        code_dim=vq.code_dim,
        class_names=classes if conditional else None,
        class_counts=[int((train_labels == i).sum()) for i in range(len(classes))] if conditional else None,
        cond_num_codes=coarse_vq.num_codes if coarse_vq is not None else 0,
        cond_grid_size=coarse_vq.latent_size if coarse_vq is not None else 0,
    )


def describe(run: Run) -> str:
    args, grid, val = run.args, run.grid, run.val_set
    n_params = sum(p.numel() for p in run.model.parameters())
    classes = "classes " + ", ".join(run.classes) if run.conditional else "unconditional"
    coarse = f"on {val.coarse.shape[1]}x{val.coarse.shape[2]} coarse codes, " if val.coarse is not None else ""
    turns = f"{args.dihedral} turns of each image, " if args.dihedral > 1 else ""
    return (
        f"{len(run.train_set)} training / {len(val)} validation grids of {grid}x{grid} codes, "
        f"K={run.vq.num_codes}, {classes}, {coarse}{turns}"
        f"{n_params / 1e6:.2f} M params, unigram entropy {run.unigram:.3f} bits/code, {run.device}"
    )


def train_epoch(run: Run, net: torch.nn.Module, epoch: int) -> EpochStats:
    """One pass over the training grids (this rank's share); everything random follows from (seed, epoch)."""
    args, d, device = run.args, run.d, run.device
    common.seed_everything(args.seed * 1000 + epoch * 10 + d.rank)
    dataset = run.train_set.dataset()
    sampler = common.epoch_sampler(dataset, d, args.seed, epoch)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    run.model.train()
    stats = EpochStats(0.0, 0, 0, 0.0)
    t0 = time.time()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not d.is_main, mininterval=2)
    for batch in bar:
        windows = random_windows(batch[0], args.crop, batch[2] if run.hierarchical else None)
        codes = windows.codes.to(device)
        labels = batch[1].to(device) if run.conditional else None
        coarse = windows.coarse.to(device) if windows.coarse is not None else None
        with run.opt.autocast():
            logits = net(codes, labels, coarse)
        loss = F.cross_entropy(logits.float(), codes)
        common.check_finite(loss, epoch, stats.steps, args.out)
        run.opt.step(loss)
        stats.loss += loss.item()
        stats.steps += 1
        stats.codes += codes.numel()
        bar.set_postfix(bits=f"{loss.item() / math.log(2):.3f}")
    stats.seconds = time.time() - t0
    return stats


def end_epoch(run: Run, epoch: int, stats: EpochStats) -> None:
    """Rank 0: validate, log, draw samples, save the checkpoint."""
    out = run.args.out
    record = {
        "epoch": epoch + 1,
        "epoch_seconds": stats.seconds,
        "train_bits_per_code": stats.loss / max(stats.steps, 1) / math.log(2),
        "val_bits_per_code": validation_bits(run),
        "unigram_bits": run.unigram,
        "codes_per_s": stats.codes * run.d.world_size / max(stats.seconds, 1e-9),
        "lr": run.opt.lr,
    }
    common.append_jsonl(out / "metrics.jsonl", record)
    write_curves(
        common.read_jsonl(out / "metrics.jsonl"),
        {"negative log-likelihood (bits/code)": ["train_bits_per_code", "val_bits_per_code", "unigram_bits"]},
        "Gated PixelCNN training",
        out / "curves.html",
    )
    if run.args.samples:
        write_samples(run, epoch)
    run.opt.save(out / common.CHECKPOINT, epoch + 1)
    print(
        f"epoch {epoch + 1}: train {record['train_bits_per_code']:.3f}, "
        f"validation {record['val_bits_per_code']:.3f} bits/code "
        f"(unigram {run.unigram:.3f}), {record['codes_per_s']:.0f} codes/s"
    )


def validation_bits(run: Run) -> float:
    """Bits per code of the first --val-limit validation grids (all of them by default)."""
    val, device = run.val_set, run.device
    if run.args.val_limit is not None:
        val = val.take(list(range(min(run.args.val_limit, len(val)))))
    labels = val.labels.to(device) if run.conditional else None
    coarse = val.coarse.to(device) if val.coarse is not None else None
    return prior_bits(run.model, val.codes.to(device), labels, batch_size=32, coarse=coarse)


def write_samples(run: Run, epoch: int) -> None:
    """Decoded samples; a hierarchical prior fills in the coarse codes of the first validation images."""
    args, val = run.args, run.val_set
    run.model.eval()
    hier = val.coarse is not None
    n = min(args.samples, len(val)) if hier else args.samples
    grids = sample(
        run.model,
        n,
        shape=(run.grid, run.grid),
        seed=args.seed + epoch,
        labels=val.labels[:n] if hier and run.conditional else None,
        coarse=val.coarse[:n].to(run.device) if hier else None,
    )
    path = args.out / f"samples_epoch{epoch + 1:03d}.png"
    save_image(run.vq.decode_codes(grids).cpu(), path, nrow=args.samples)


def export(run: Run) -> None:
    final = run.args.out / "final"
    run.model.eval()
    run.model.save_pretrained(final)
    print(f"exported {final}")
    if run.args.push_to_hub:
        common.push_to_hub(final, run.args.push_to_hub, f"pixelcnn-{run.model.grid_size}")


def main(argv: list[str] | None = None) -> None:
    common.run(parse_args(argv), common.Steps(prepare, describe, train_epoch, end_epoch, export))


if __name__ == "__main__":
    main()
