"""Train a Gated PixelCNN prior over the codes of a trained VQ-VAE.

    python -m train.pixelcnn --vqvae runs/vq64/final --data ../shared/data/isic256/train \\
        --labels ../shared/data/isic256/MANIFEST.csv --out runs/px64 --epochs 20 --crop 32

With --coarse-vqvae (a VQ-VAE of the same images with a smaller grid, e.g. runs/vq32/final for
a 64x64 prior) the prior becomes hierarchical: it is conditioned on the coarse codes of each
image, and sampling draws the coarse grid first with that VQ-VAE's own prior. --init-from
starts from a trained prior of the same shape (new conditioning layers start at zero).

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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torchvision.utils import save_image
from tqdm import tqdm

from lesionstudio.codes import CodeSet, codes_key, load_or_extract
from lesionstudio.data import LesionImageFolder, dihedral_variant, eval_transform, split_indices
from lesionstudio.metrics import entropy_bits, usage_histogram
from lesionstudio.pixelcnn import GatedPixelCNN
from lesionstudio.plots import write_curves
from lesionstudio.sampling import sample
from lesionstudio.scoring import prior_bits
from lesionstudio.vqvae import VQVAE

from . import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.pixelcnn", description=__doc__.split("\n")[0])
    p.add_argument("--vqvae", type=str, required=True, help="trained VQ-VAE folder (or Hub repo id)")
    p.add_argument("--data", type=Path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--labels", type=Path, default=None, help="CSV of file -> class: makes the prior conditional")
    p.add_argument("--label-column", default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--limit", type=int, default=None, help="use a seeded random subset of N images")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", type=int, default=0, help="train on random SxS crops of the code grid (0: whole)")
    p.add_argument("--dihedral", type=int, default=1, choices=range(1, 9), metavar="K",
                   help="train on the codes of K turns of each training image: 4 = the right-angle rotations, "
                   "8 = with their mirror images (validation stays on the originals)")
    p.add_argument("--coarse-vqvae", default=None, help="condition on this coarser-grid VQ-VAE's codes of each image")
    p.add_argument("--init-from", default=None, help="start from this trained prior's weights (same architecture)")
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--samples", type=int, default=4, help="samples decoded after each epoch (0: none)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None)
    return p.parse_args(argv)


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


def random_crops(codes: torch.Tensor, size: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """One random size x size window of each grid in codes [B, h, w]."""
    b, h, w = codes.shape
    if size <= 0 or size >= min(h, w):
        return codes
    ys = torch.randint(0, h - size + 1, (b,), generator=gen)
    xs = torch.randint(0, w - size + 1, (b,), generator=gen)
    return torch.stack([codes[i, y : y + size, x : x + size] for i, (y, x) in enumerate(zip(ys, xs, strict=True))])


def main(argv: list[str] | None = None) -> None:
    common.run(train, parse_args(argv))


def train(args: argparse.Namespace, device: torch.device, d: common.Dist) -> None:
    out: Path = args.out
    if d.is_main:
        common.check_output_dir(out, need_bytes=200 * 2**20)
    vq = VQVAE.from_pretrained(args.vqvae).to(device).eval()
    coarse_vq = load_coarse_vqvae(args.coarse_vqvae, vq, device) if args.coarse_vqvae else None
    if coarse_vq is not None and args.crop:
        raise SystemExit("--crop is not supported with --coarse-vqvae: train on whole grids")

    def encode_all(variant: int) -> tuple[CodeSet, CodeSet | None, list[str]]:
        codeset, classes = encode_dataset(args, vq, device, variant=variant)
        coarse_set = None
        if coarse_vq is not None:
            coarse_set = encode_dataset(args, coarse_vq, device, "coarse_codes.npz", variant)[0]
        if coarse_set is not None and coarse_set.files != codeset.files:
            raise SystemExit("the two VQ-VAEs read different images (a file became unreadable?); delete the caches")
        return codeset, coarse_set, classes

    variants = range(args.dihedral)
    encoded = [encode_all(k) for k in variants] if d.is_main else None
    if d.enabled:  # rank 0 encoded (and cached) the codes; the others read the cache
        torch.distributed.barrier()
        if not d.is_main:
            encoded = [encode_all(k) for k in variants]
    assert encoded is not None
    classes = encoded[0][2]
    conditional = args.labels is not None
    grids = [Grids.of(codeset, coarse_set, conditional) for codeset, coarse_set, _ in encoded]
    if conditional and len(grids[0]) < len(encoded[0][0].labels):
        print(f"dropping {len(encoded[0][0].labels) - len(grids[0])} images without a label")
    train_idx, val_idx = split_indices(len(grids[0]), args.val_fraction, seed=args.seed)
    # Variants of a validation image stay out of training.
    train_set = Grids.cat([g.take(train_idx) for g in grids])
    val_set = grids[0].take(val_idx)
    train_codes, val_codes, val_labels, val_coarse = train_set.codes, val_set.codes, val_set.labels, val_set.coarse
    originals = grids[0].take(train_idx).labels  # class frequencies of the images, not of their variants
    grid = val_codes.shape[1]
    hier = coarse_vq is not None

    common.seed_everything(args.seed)
    model = GatedPixelCNN(
        num_codes=vq.num_codes,
        channels=args.channels,
        num_layers=args.layers,
        kernel_size=args.kernel,
        num_classes=len(classes) if conditional else 0,
        grid_size=grid,
        code_dim=vq.code_dim,
        class_names=classes if conditional else None,
        class_counts=[int((originals == i).sum()) for i in range(len(classes))] if conditional else None,
        cond_num_codes=coarse_vq.num_codes if coarse_vq is not None else 0,
        cond_grid_size=coarse_vq.latent_size if coarse_vq is not None else 0,
    ).to(device)
    if args.init_from:  # a --resume checkpoint, when there is one, then replaces these weights
        init_from(model, args.init_from)
    steps_per_epoch = max(1, len(train_codes) // (args.batch_size * d.world_size))
    opt = common.Optimization.create(model, args.lr, steps_per_epoch * args.epochs, args.warmup_steps, device)
    start_epoch = opt.resume(out, args.resume, device, d.is_main)

    unigram = entropy_bits(usage_histogram(train_codes, vq.num_codes))
    net = DistributedDataParallel(model) if d.enabled else model
    dataset = train_set.dataset()
    if d.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{len(train_codes)} training / {len(val_codes)} validation grids of {grid}x{grid} codes, "
            f"K={vq.num_codes}, {'classes ' + ', '.join(classes) if conditional else 'unconditional'}, "
            f"{f'on {val_coarse.shape[1]}x{val_coarse.shape[2]} coarse codes, ' if hier else ''}"
            f"{f'{args.dihedral} turns of each image, ' if args.dihedral > 1 else ''}"
            f"{n_params / 1e6:.2f} M params, unigram entropy {unigram:.3f} bits/code, {device}"
        )

    for epoch in range(start_epoch, args.epochs):
        common.seed_everything(args.seed * 1000 + epoch * 10 + d.rank)
        sampler = common.epoch_sampler(dataset, d, args.seed, epoch)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
        model.train()
        total, n_steps, n_codes = 0.0, 0, 0
        t0 = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not d.is_main, mininterval=2)
        for batch in bar:
            batch_codes = random_crops(batch[0], args.crop).to(device)
            lab = batch[1].to(device) if conditional else None
            cg = batch[2].to(device) if hier else None
            with opt.autocast():
                logits = net(batch_codes, lab, cg)
            loss = F.cross_entropy(logits.float(), batch_codes)
            common.check_finite(loss, epoch, n_steps, out)
            opt.step(loss)
            total += loss.item()
            n_steps += 1
            n_codes += batch_codes.numel()
            bar.set_postfix(bits=f"{loss.item() / math.log(2):.3f}")
        elapsed = time.time() - t0
        if not d.is_main:
            continue
        val_bits = prior_bits(
            model,
            val_codes.to(device),
            val_labels.to(device) if conditional else None,
            batch_size=32,
            coarse=val_coarse.to(device) if hier else None,
        )
        record = {
            "epoch": epoch + 1,
            "epoch_seconds": elapsed,
            "train_bits_per_code": total / max(n_steps, 1) / math.log(2),
            "val_bits_per_code": val_bits,
            "unigram_bits": unigram,
            "codes_per_s": n_codes * d.world_size / max(elapsed, 1e-9),
            "lr": opt.lr,
        }
        common.append_jsonl(out / "metrics.jsonl", record)
        write_curves(
            common.read_jsonl(out / "metrics.jsonl"),
            {"negative log-likelihood (bits/code)": ["train_bits_per_code", "val_bits_per_code", "unigram_bits"]},
            "Gated PixelCNN training",
            out / "curves.html",
        )
        if args.samples:
            model.eval()
            # A hierarchical prior fills in the coarse codes of the first validation images.
            n = min(args.samples, len(val_coarse)) if hier else args.samples
            grids = sample(
                model,
                n,
                shape=(grid, grid),
                seed=args.seed + epoch,
                labels=val_labels[:n] if hier and conditional else None,
                coarse=val_coarse[:n].to(device) if hier else None,
            )
            save_image(vq.decode_codes(grids).cpu(), out / f"samples_epoch{epoch + 1:03d}.png", nrow=args.samples)
        opt.save(out / common.CHECKPOINT, epoch + 1)
        print(
            f"epoch {epoch + 1}: train {record['train_bits_per_code']:.3f}, validation {val_bits:.3f} bits/code "
            f"(unigram {unigram:.3f}), {record['codes_per_s']:.0f} codes/s"
        )

    if d.is_main:
        final = out / "final"
        model.eval()
        model.save_pretrained(final)
        print(f"exported {final}")
        if args.push_to_hub:
            common.push_to_hub(final, args.push_to_hub, f"pixelcnn-{model.grid_size}")


if __name__ == "__main__":
    main()
