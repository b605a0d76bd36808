"""Train a VQ-VAE on a folder of lesion images.

    python -m train.vqvae --data ../shared/data/isic256/train --latent 64 --epochs 10 --out runs/vq64
    torchrun --nproc_per_node 4 -m train.vqvae ...   # several GPUs (or CPU processes, gloo)

Each epoch writes (rank 0 only) OUT/metrics.jsonl, OUT/curves.html, OUT/recon_epochNNN.png and an
atomic OUT/checkpoint.pt; --resume continues from it; the end exports OUT/final/ (config.json,
model.safetensors, codebook_usage.json).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.utils import save_image
from tqdm import tqdm

from lesionstudio.cli import HelpFormatter, add_config_argument, parse_with_config
from lesionstudio.data import (
    LesionImageFolder,
    collate_skip_bad,
    eval_transform,
    split_indices,
    train_transform,
)
from lesionstudio.measure.scoring import codebook_usage, evaluate
from lesionstudio.models.vqvae import VQVAE, ResidualBlock
from lesionstudio.plots import write_curves
from lesionstudio.sampling.loading import LATENTS

from . import common


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.vqvae", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--data", type=Path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--latent", type=int, choices=LATENTS, default=64, help="code grid side for a 256 px image")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, logs; OUT/final/ at the end")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--limit", type=int, default=None, help="use a seeded random subset of N images")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-limit", type=int, default=256, help="validation images scored per epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--crop", type=int, default=128, help="random training crop side (0: whole images)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--hidden", type=int, default=128, help="encoder/decoder channels")
    p.add_argument("--res-channels", type=int, default=64)
    p.add_argument("--res-blocks", type=int, default=2)
    p.add_argument(
        "--upsample-res-blocks",
        type=int,
        default=None,
        help="decoder residual blocks after each upsampling stage but the last (default: 0, or those of --init-from)",
    )
    p.add_argument("--num-codes", type=int, default=512, help="codebook size K")
    p.add_argument("--code-dim", type=int, default=64, help="code vector dimension D")
    p.add_argument("--beta", type=float, default=0.25, help="commitment weight")
    p.add_argument("--no-ema", action="store_true", help="learn the codebook by its loss instead of EMA")
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--no-restart", action="store_true", help="do not restart dead codes")
    p.add_argument("--dead-threshold", type=float, default=1.0, help="EMA usage below which a code restarts")
    p.add_argument("--usage-limit", type=int, default=None, help="training images scanned for codebook_usage.json")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="start from a VQ-VAE folder: its weights and config (plus --upsample-res-blocks)",
    )
    p.add_argument(
        "--freeze-encoder",
        action="store_true",
        help="train the decoder only: encoder and codebook stay fixed, so the codes (and priors "
        "trained on them) stay valid",
    )
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None)
    add_config_argument(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser()
    args = parse_with_config(p, argv)
    if args.freeze_encoder and args.init_from is None:
        p.error("--freeze-encoder needs --init-from (a trained encoder and codebook to keep)")
    if args.init_from is not None:
        if not args.init_from.is_dir():
            p.error(f"--init-from {args.init_from}: no such folder")
        try:
            args.source = VQVAE.from_pretrained(args.init_from)  # loaded once, here, to fail early
        except (ValueError, OSError) as e:
            p.error(f"--init-from {args.init_from}: {e}")
        args.latent = args.source.latent_size
        args.image_size = args.source.image_size
    if args.image_size % args.latent:
        p.error(f"--image-size {args.image_size} is not a multiple of --latent {args.latent}")
    if args.crop and args.crop % (args.image_size // args.latent):
        p.error("--crop must be a multiple of the downsampling factor")
    return args


def build_model(args: argparse.Namespace) -> VQVAE:
    if args.init_from is not None:
        source = args.source
        config = dict(source.config)
        if args.upsample_res_blocks is not None:
            config["upsample_res_blocks"] = args.upsample_res_blocks
        model = VQVAE(**config)
        warm_start(model, source)
        return model
    return VQVAE(
        hidden_channels=args.hidden,
        res_channels=args.res_channels,
        num_res_blocks=args.res_blocks,
        downsample=args.image_size // args.latent,
        num_codes=args.num_codes,
        code_dim=args.code_dim,
        beta=args.beta,
        use_ema=not args.no_ema,
        ema_decay=args.ema_decay,
        restart_dead_codes=not args.no_restart,
        dead_code_threshold=args.dead_threshold,
        image_size=args.image_size,
        upsample_res_blocks=args.upsample_res_blocks or 0,
    )


def warm_start(model: VQVAE, source: VQVAE) -> None:
    """Copy source's weights into model, whose decoder may have extra residual blocks.

    The extra blocks start with a zero last convolution, so model computes exactly what source does
    and training only adds to it.
    """
    model.encoder.load_state_dict(source.encoder.state_dict())
    model.quantizer.load_state_dict(source.quantizer.state_dict())
    old = list(source.decoder.net)
    j = 0
    for layer in model.decoder.net:
        match = j < len(old) and type(layer) is type(old[j])
        if match:
            try:
                layer.load_state_dict(old[j].state_dict())
            except RuntimeError:  # same kind, other shape: an inserted layer
                match = False
        if match:
            j += 1
        elif isinstance(layer, ResidualBlock):
            last = layer.block[-1]
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)
        else:
            raise ValueError(f"cannot grow the source decoder into one with {type(layer).__name__} here")
    if j != len(old):
        raise ValueError("the source decoder has layers the new one lacks")


def load_data(args: argparse.Namespace) -> tuple[LesionImageFolder, LesionImageFolder]:
    full = LesionImageFolder(args.data, transform=train_transform(args.image_size, crop=args.crop or None))
    full = full.limited(args.limit, args.seed)
    train_idx, val_idx = split_indices(len(full), args.val_fraction, seed=args.seed)
    train_set = full.subset(train_idx)
    val_set = full.subset(val_idx).with_transform(eval_transform(args.image_size))
    return train_set, val_set


@dataclass
class Run:
    """What the steps of a training run share."""

    args: argparse.Namespace
    device: torch.device
    d: common.Dist
    model: VQVAE
    opt: common.Optimization
    train_set: LesionImageFolder
    val_set: LesionImageFolder


@dataclass
class EpochStats:
    sums: dict[str, float]  # of each loss term (and the perplexity) over the steps
    steps: int
    images: int
    skipped: int  # unreadable images
    seconds: float


LOSS_TERMS = ("loss", "reconstruction", "codebook", "commitment", "perplexity")


def prepare(args: argparse.Namespace, device: torch.device, d: common.Dist) -> Run:
    """Read and split the images, build the model and its optimiser."""
    train_set, val_set = load_data(args)
    common.seed_everything(args.seed)  # same seed, same initial weights on every rank
    model = build_model(args).to(device)
    if args.freeze_encoder:
        model.encoder.requires_grad_(False)
        model.quantizer.requires_grad_(False)
    steps_per_epoch = max(1, len(train_set) // (args.batch_size * d.world_size))
    opt = common.Optimization.create(model, args.lr, steps_per_epoch * args.epochs, args.warmup_steps, device)
    return Run(args, device, d, model, opt, train_set, val_set)


def describe(run: Run) -> str:
    n_params = sum(p.numel() for p in run.model.parameters())
    side = run.model.latent_size
    return (
        f"{len(run.train_set)} training / {len(run.val_set)} validation images, {side}x{side} codes, "
        f"K={run.model.num_codes}, {n_params / 1e6:.2f} M params, {run.device}"
    )


def train_epoch(run: Run, net: torch.nn.Module, epoch: int) -> EpochStats:
    """One pass over this rank's share of the training images."""
    args, d, model = run.args, run.d, run.model
    # Everything random in an epoch follows from (seed, epoch): a resumed run repeats it exactly.
    common.seed_everything(args.seed * 1000 + epoch * 10 + d.rank)
    loader = DataLoader(
        run.train_set,
        batch_size=args.batch_size,
        sampler=common.epoch_sampler(run.train_set, d, args.seed, epoch),
        num_workers=args.workers,
        collate_fn=collate_skip_bad,
        drop_last=len(run.train_set) >= args.batch_size * d.world_size,
        persistent_workers=False,
    )
    model.train()
    if args.freeze_encoder:
        model.quantizer.eval()  # no EMA updates or restarts: every image keeps its codes
    stats = EpochStats(dict.fromkeys(LOSS_TERMS, 0.0), 0, 0, 0, 0.0)
    t0 = time.time()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not d.is_main, mininterval=2)
    for batch in bar:
        stats.skipped += batch.skipped
        if batch.images.numel() == 0:
            continue
        images = batch.images.to(run.device, non_blocking=True)
        with run.opt.autocast():
            _, terms = net(images)
        loss = terms["loss"]
        common.check_finite(loss, epoch, stats.steps, args.out)
        run.opt.step(loss)
        stats.steps += 1
        stats.images += images.shape[0]
        for k in stats.sums:
            stats.sums[k] += float(terms[k].detach())
        bar.set_postfix(loss=f"{loss.item():.4f}", ppl=f"{float(terms['perplexity']):.0f}")
    stats.seconds = time.time() - t0
    return stats


def end_epoch(run: Run, epoch: int, stats: EpochStats) -> None:
    """Rank 0: validate, log, save reconstructions and the checkpoint."""
    args, model = run.args, run.model
    record = {
        "epoch": epoch + 1,
        "epoch_seconds": stats.seconds,
        "images_per_s": stats.images * run.d.world_size / max(stats.seconds, 1e-9),
    }
    record.update({f"train_{k}": v / max(stats.steps, 1) for k, v in stats.sums.items()})
    record["train_quantization"] = record["train_codebook"] + args.beta * record["train_commitment"]
    record["skipped_images"] = stats.skipped
    record["lr"] = run.opt.lr
    val = evaluate(model, run.val_set, device=run.device, batch_size=args.batch_size, limit=args.val_limit)
    record.update({f"val_{k}": val[k] for k in ("psnr", "ssim", "perplexity", "codes_used")})
    write_epoch_outputs(model, run.val_set, run.device, args.out, epoch, record)
    run.opt.save(args.out / common.CHECKPOINT, epoch + 1)
    print(
        f"epoch {epoch + 1}: loss {record['train_loss']:.4f}, val PSNR {val['psnr']:.2f} dB, "
        f"SSIM {val['ssim']:.3f}, perplexity {val['perplexity']:.0f}, codes used {val['codes_used']}/"
        f"{model.num_codes}, {record['images_per_s']:.1f} img/s"
        + (f", {stats.skipped} unreadable images skipped" if stats.skipped else "")
    )


def write_epoch_outputs(
    model: VQVAE, val_set: LesionImageFolder, device: torch.device, out: Path, epoch: int, record: dict
) -> None:
    common.append_jsonl(out / "metrics.jsonl", record)
    records = common.read_jsonl(out / "metrics.jsonl")
    write_curves(
        records,
        {
            "reconstruction loss (MSE)": ["train_reconstruction"],
            "quantization loss": ["train_quantization", "train_codebook", "train_commitment"],
            "validation PSNR (dB)": ["val_psnr"],
            "codebook perplexity": ["train_perplexity", "val_perplexity"],
        },
        "VQ-VAE training",
        out / "curves.html",
    )
    n = min(8, len(val_set))
    if n:
        images = torch.stack([val_set[i][0] for i in range(n) if val_set[i] is not None]).to(device)
        model.eval()
        recon, _ = model.reconstruct(images)
        save_image(torch.cat([images, recon]).cpu(), out / f"recon_epoch{epoch + 1:03d}.png", nrow=n)


def export(run: Run) -> None:
    """Rank 0, after the last epoch: the model folder, with the training images' codebook usage."""
    args, model = run.args, run.model
    final = args.out / "final"
    model.eval()
    model.save_pretrained(final)
    usage_set = run.train_set.with_transform(eval_transform(args.image_size))
    counts = codebook_usage(model, usage_set, run.device, limit=args.usage_limit, batch_size=args.batch_size)
    usage = {
        "num_codes": model.num_codes,
        "images": min(len(usage_set), args.usage_limit or 10**12),
        "counts": counts.tolist(),
    }
    (final / "codebook_usage.json").write_text(json.dumps(usage))
    print(f"exported {final}")
    if args.push_to_hub:
        common.push_to_hub(final, args.push_to_hub, f"vqvae-{model.latent_size}")


def main(argv: list[str] | None = None) -> None:
    common.run(parse_args(argv), common.Steps(prepare, describe, train_epoch, end_epoch, export))


if __name__ == "__main__":
    main()
