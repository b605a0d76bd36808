"""Train a Gated PixelCNN prior over the codes of a trained VQ-VAE.

    python -m train.pixelcnn --vqvae runs/vq64/final --data ../shared/data/isic256/train \\
        --labels ../shared/data/isic256/MANIFEST.csv --out runs/px64 --epochs 20 --crop 32

The images are encoded once (cached in OUT/codes.npz). Each epoch writes (rank 0 only)
OUT/metrics.jsonl, OUT/curves.html, OUT/samples_epochNNN.png and an atomic OUT/checkpoint.pt;
--resume continues from it; the end exports OUT/final/ with save_pretrained.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torchvision.utils import save_image
from tqdm import tqdm

from lesionstudio.codes import CodeSet, codes_key, load_or_extract
from lesionstudio.data import LesionImageFolder, eval_transform, split_indices
from lesionstudio.metrics import entropy_bits, usage_histogram
from lesionstudio.pixelcnn import GatedPixelCNN
from lesionstudio.plots import write_curves
from lesionstudio.sampling import sample
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
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--samples", type=int, default=4, help="samples decoded after each epoch (0: none)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None)
    return p.parse_args(argv)


def encode_dataset(args: argparse.Namespace, vq: VQVAE, device: torch.device) -> tuple[CodeSet, list[str]]:
    ds = LesionImageFolder(
        args.data, transform=eval_transform(vq.image_size), labels_csv=args.labels, label_column=args.label_column
    )
    if args.limit is not None and args.limit < len(ds):
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed)).tolist()
        ds = ds.subset(sorted(perm[: args.limit]))
    codes = load_or_extract(args.out / "codes.npz", vq, ds, codes_key(vq), device)
    return codes, ds.classes


def random_crops(codes: torch.Tensor, size: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """One random size x size window of each grid in codes [B, h, w]."""
    b, h, w = codes.shape
    if size <= 0 or size >= min(h, w):
        return codes
    ys = torch.randint(0, h - size + 1, (b,), generator=gen)
    xs = torch.randint(0, w - size + 1, (b,), generator=gen)
    return torch.stack([codes[i, y : y + size, x : x + size] for i, (y, x) in enumerate(zip(ys, xs, strict=True))])


@torch.no_grad()
def bits_per_code(model: GatedPixelCNN, codes: torch.Tensor, labels: torch.Tensor | None, bs: int = 32) -> float:
    """Mean negative log-likelihood in bits per code over full grids."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(codes), bs):
        c = codes[i : i + bs]
        lab = None if labels is None else labels[i : i + bs]
        total += float(model.nll_bits(c, lab).sum()) * c[0].numel()
        count += c.numel()
    return total / max(count, 1)


def main(argv: list[str] | None = None) -> None:
    common.run(train, parse_args(argv))


def train(args: argparse.Namespace, device: torch.device, d: common.Dist) -> None:
    out: Path = args.out
    if d.is_main:
        common.check_output_dir(out, need_bytes=200 * 2**20)
    vq = VQVAE.from_pretrained(args.vqvae).to(device).eval()
    codeset, classes = encode_dataset(args, vq, device) if d.is_main else (None, None)
    if d.enabled:  # rank 0 encoded (and cached) the codes; the others read the cache
        torch.distributed.barrier()
        if not d.is_main:
            codeset, classes = encode_dataset(args, vq, device)
    assert codeset is not None and classes is not None
    codes = torch.from_numpy(codeset.codes.astype("int64"))
    labels = torch.from_numpy(codeset.labels)
    conditional = args.labels is not None
    if conditional:
        known = labels >= 0
        if not bool(known.all()):
            print(f"dropping {int((~known).sum())} images without a label")
            codes, labels = codes[known], labels[known]
    train_idx, val_idx = split_indices(len(codes), args.val_fraction, seed=args.seed)
    train_codes, val_codes = codes[train_idx], codes[val_idx]
    train_labels, val_labels = labels[train_idx], labels[val_idx]
    grid = codes.shape[1]

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
        class_counts=[int((train_labels == i).sum()) for i in range(len(classes))] if conditional else None,
    ).to(device)
    steps_per_epoch = max(1, len(train_codes) // (args.batch_size * d.world_size))
    opt = common.Optimization.create(model, args.lr, steps_per_epoch * args.epochs, args.warmup_steps, device)
    start_epoch = opt.resume(out, args.resume, device, d.is_main)

    unigram = entropy_bits(usage_histogram(train_codes, vq.num_codes))
    net = DistributedDataParallel(model) if d.enabled else model
    dataset = TensorDataset(train_codes, train_labels)
    if d.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{len(train_codes)} training / {len(val_codes)} validation grids of {grid}x{grid} codes, "
            f"K={vq.num_codes}, {'classes ' + ', '.join(classes) if conditional else 'unconditional'}, "
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
        for batch_codes, batch_labels in bar:
            batch_codes = random_crops(batch_codes, args.crop).to(device)
            lab = batch_labels.to(device) if conditional else None
            with opt.autocast():
                logits = net(batch_codes, lab)
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
        val_bits = bits_per_code(model, val_codes.to(device), val_labels.to(device) if conditional else None)
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
            grids = sample(model, args.samples, shape=(grid, grid), seed=args.seed + epoch)
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
            common.push_to_hub(model, args.push_to_hub, final)


if __name__ == "__main__":
    main()
