"""Post-train a VQ-VAE's decoder on the codes its prior draws, encoder and codebook frozen.

    python -m train.decoder --checkpoints checkpoints --latent 64 --data ../shared/data/isic256/train \
        --labels ../shared/data/isic256/MANIFEST.csv --epochs 20 --out runs/dec64
    torchrun --nproc_per_node 2 -m train.decoder ...

Each training pair is a real image and a code grid for it: the encoder's own codes, or those with
a random share of positions redrawn teacher-forced by the level's prior (``lesionstudio.
teacherforcing``; the draws are made once, before training, and cached in OUT/pairs.npz). The
decoder learns an L1 (or MSE) reconstruction of the real image from either, plus, from
``--disc-start`` on, a PatchGAN hinge loss weighted adaptively as in VQGAN and the
discriminator's feature matching (pix2pixHD). Only the decoder's weights change: every prior,
the critic and every cached code grid of the VQ-VAE stay valid. Each epoch writes (rank 0)
OUT/metrics.jsonl, OUT/curves.html, OUT/decoded_epochNNN.png and an atomic OUT/checkpoint.pt;
--resume continues from it; the end exports OUT/final/ (a ``CodeDecoder`` folder).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.utils import save_image
from tqdm import tqdm

from lesionstudio import npzcache
from lesionstudio.cli import HelpFormatter, add_config_argument, parse_with_config
from lesionstudio.codes import codes_key, state_sha256
from lesionstudio.data import LesionImageFolder, collate_skip_bad, eval_transform, split_indices
from lesionstudio.measure import metrics
from lesionstudio.models.codedecoder import CodeDecoder
from lesionstudio.models.hubmodel import CheckpointError
from lesionstudio.plots import write_curves
from lesionstudio.sampling.loading import LATENTS, load_stack
from lesionstudio.sampling.stack import ModelStack
from lesionstudio.sampling.teacherforcing import mix_codes, teacher_forced_draws

from . import common
from .adversarial import PatchDiscriminator, adaptive_weight, feature_matching, hinge_d_loss


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.decoder",
        description=__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoints", default="checkpoints", help="folder (or Hub repo) with vqvae-N/ and pixelcnn-N/")
    p.add_argument("--latent", type=int, choices=LATENTS, default=64, help="the grid whose decoder is post-trained")
    p.add_argument("--data", type=Path, required=True, help="folder of training images (searched recursively)")
    p.add_argument("--labels", type=Path, default=None, help="labels CSV, for a class-conditional prior")
    p.add_argument("--label-column", default=None)
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, logs; OUT/final/ at the end")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps-per-epoch", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--crop", type=int, default=128, help="training crop side in pixels (the loss region)")
    p.add_argument("--margin", type=int, default=2, help="codes decoded around a crop for context, not scored")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--limit", type=int, default=None, help="use a seeded random subset of N images")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-limit", type=int, default=32, help="validation images scored per epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=2, help="teacher-forced draws cached per image")
    p.add_argument("--draw-temperature", type=float, default=1.0)
    p.add_argument("--real-share", type=float, default=0.25, help="share of pairs with the encoder's own codes")
    p.add_argument("--max-redraw", type=float, default=1.0, help="redrawn share of a perturbed grid ~ U(0, this)")
    p.add_argument("--reconstruction", choices=("l1", "mse"), default="l1")
    p.add_argument("--disc-start", type=int, default=500, help="step from which the decoder sees the discriminator")
    p.add_argument("--disc-weight", type=float, default=0.5, help="times the adaptive weight")
    p.add_argument("--fm-weight", type=float, default=1.0, help="discriminator feature matching (0: off)")
    p.add_argument(
        "--res-blocks",
        type=int,
        default=None,
        help="residual blocks at the code grid's resolution (default: the VQ-VAE decoder's; more start at zero)",
    )
    p.add_argument("--disc-channels", type=int, default=32)
    p.add_argument("--disc-layers", type=int, default=3)
    p.add_argument(
        "--disc-highpass",
        action="store_true",
        help="the discriminator also sees each crop's amplified fine detail (spectral norm, no GroupNorm)",
    )
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None)
    add_config_argument(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser()
    args = parse_with_config(p, argv)
    for name in ("real_share", "max_redraw"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.draws < 1 or args.draw_temperature <= 0:
        p.error("--draws must be at least 1 and --draw-temperature positive")
    return args


class DecoderGAN(nn.Module):
    """The decoder being post-trained and its discriminator, one module so that one optimiser,
    one checkpoint and DistributedDataParallel cover both."""

    def __init__(self, decoder: CodeDecoder, disc: PatchDiscriminator) -> None:
        super().__init__()
        self.decoder = decoder
        self.disc = disc

    def last_layer(self) -> torch.Tensor:
        return self.decoder.decoder.net[-1].weight

    def forward(self, codes: torch.Tensor, real: torch.Tensor, terms: LossSettings) -> dict[str, torch.Tensor]:
        """Every loss of one step: the decoder's (with the discriminator frozen) plus the
        discriminator's (on the decoded images detached), to be summed into one backward."""
        margin = terms.margin_px
        decoded = self.decoder(codes)
        fake = decoded[:, :, margin : decoded.shape[2] - margin, margin : decoded.shape[3] - margin]
        err = (fake - real).abs() if terms.l1 else (fake - real) ** 2
        rec = err.mean()
        out = {"reconstruction": rec, "adversarial": rec.new_zeros(()), "feature_matching": rec.new_zeros(())}
        out["weight"] = rec.new_zeros(())
        g_loss = rec
        real_feats = self.disc.features(real)  # feature matching reads them detached
        if terms.adversarial:
            self.disc.requires_grad_(False)
            fake_feats = self.disc.features(fake)
            self.disc.requires_grad_(True)
            adv = -fake_feats[-1].mean()
            weight = adaptive_weight(rec, adv, self.last_layer()) * terms.disc_weight
            fm = feature_matching(fake_feats, real_feats) if terms.fm_weight else rec.new_zeros(())
            g_loss = rec + weight * adv + terms.fm_weight * fm
            out.update(adversarial=adv, feature_matching=fm, weight=weight)
        d_real, d_fake = real_feats[-1], self.disc(fake.detach())
        out["disc"] = hinge_d_loss(d_real, d_fake)
        out["disc_accuracy"] = 0.5 * ((d_real > 0).float().mean() + (d_fake < 0).float().mean())
        out["loss"] = g_loss + out["disc"]
        return out


@dataclass(frozen=True)
class LossSettings:
    margin_px: int
    l1: bool
    adversarial: bool
    disc_weight: float
    fm_weight: float


@dataclass
class Pairs:
    """Real images and their code grids: the encoder's and the prior's teacher-forced draws."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    codes: torch.Tensor  # int64 [N, h, w]
    draws: torch.Tensor  # int64 [N, draws, h, w]

    def take(self, idx: list[int]) -> Pairs:
        return Pairs(self.images[idx], self.codes[idx], self.draws[idx])


def read_images(args: argparse.Namespace, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """Every readable image as uint8 (the models' preprocessing), its class id (-1: none) and file."""
    ds = LesionImageFolder(
        args.data, transform=eval_transform(image_size), labels_csv=args.labels, label_column=args.label_column
    ).limited(args.limit, args.seed)
    loader = DataLoader(range(len(ds)), batch_size=64, collate_fn=lambda idx: idx)
    images, labels, files = [], [], []
    for idx in tqdm(loader, desc="reading images", mininterval=2):
        items = [(i, ds[i]) for i in idx]
        good = [(i, it) for i, it in items if it is not None]
        if good:
            batch = collate_skip_bad([it for _, it in good])
            images.append((batch.images * 255).round().to(torch.uint8))
            labels.append(batch.labels)
            files += [ds.files[i] for i, _ in good]
    if not images:
        raise SystemExit(f"error: no readable images under {args.data}")
    return torch.cat(images), torch.cat(labels), files


@torch.no_grad()
def draw_pairs(args: argparse.Namespace, stack: ModelStack, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Codes and teacher-forced draws of every image, in batches."""
    prior = stack.checked_prior()
    gen = torch.Generator().manual_seed(args.seed)
    codes, draws = [], []
    for i in tqdm(range(0, len(images), 16), desc="teacher-forced draws", mininterval=2):
        x = images[i : i + 16].float() / 255
        real = stack.vqvae.encode(x)
        coarse = stack.coarse.vqvae.encode(x) if prior.hierarchical else None
        lab = labels[i : i + 16] if prior.num_classes else None
        if lab is not None and (lab < 0).any():
            raise SystemExit("error: a class-conditional prior needs a label for every image (see --labels)")
        codes.append(real.to(torch.uint16))
        drawn = teacher_forced_draws(prior, real, lab, coarse, args.draws, args.draw_temperature, gen)
        draws.append(drawn.transpose(0, 1).to(torch.uint16))
    return {"codes": torch.cat(codes).numpy(), "draws": torch.cat(draws).numpy()}


def load_pairs(args: argparse.Namespace, stack: ModelStack) -> Pairs:
    """The pairs of every image, from OUT/pairs.npz when it was made by the same models, files and settings."""
    images, labels, files = read_images(args, stack.vqvae.image_size)
    stamp = {
        "vqvae": codes_key(stack.vqvae),
        "prior": state_sha256(stack.checked_prior()),
        "files": [str(f) for f in files],
        "labels": labels.tolist(),
        "draws": args.draws,
        "temperature": args.draw_temperature,
        "seed": args.seed,
    }
    cache = args.out / "pairs.npz"
    found = npzcache.load(cache, stamp, ("codes", "draws"))
    if found is None:
        found = draw_pairs(args, stack, images, labels)
        npzcache.save(cache, stamp, found)
    codes = torch.from_numpy(found["codes"].astype(np.int64))
    return Pairs(images, codes, torch.from_numpy(found["draws"].astype(np.int64)))


@dataclass
class Run:
    args: argparse.Namespace
    device: torch.device
    d: common.Dist
    model: DecoderGAN
    opt: common.Optimization
    stack: ModelStack
    train: Pairs
    val: Pairs


def prepare(args: argparse.Namespace, device: torch.device, d: common.Dist) -> Run:
    """Load the models, make (or read) the pairs, build the decoder and discriminator."""
    try:
        stack = load_stack(args.latent, args.checkpoints, require_prior=True)
    except (CheckpointError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    down = stack.vqvae.downsample
    if args.crop % down or args.crop // down + 2 * args.margin > stack.latent:
        raise SystemExit(f"error: --crop must be a multiple of {down} and fit the {stack.latent}x{stack.latent} grid")
    pairs = load_pairs(args, stack)
    train_idx, val_idx = split_indices(len(pairs.codes), args.val_fraction, seed=args.seed)
    common.seed_everything(args.seed)
    disc = PatchDiscriminator(args.disc_channels, args.disc_layers, args.disc_highpass)
    try:
        decoder = CodeDecoder.from_vqvae(stack.vqvae, "adversarial", args.res_blocks)
    except ValueError as exc:
        raise SystemExit(f"error: --res-blocks: {exc}") from exc
    model = DecoderGAN(decoder, disc).to(device)
    opt = common.Optimization.create(model, args.lr, args.steps_per_epoch * args.epochs, args.warmup_steps, device)
    return Run(args, device, d, model, opt, stack, pairs.take(train_idx), pairs.take(val_idx[: args.val_limit]))


def describe(run: Run) -> str:
    n_dec = sum(p.numel() for p in run.model.decoder.parameters())
    n_disc = sum(p.numel() for p in run.model.disc.parameters())
    return (
        f"{len(run.train.codes)} training / {len(run.val.codes)} validation pairs, {run.stack.latent}x"
        f"{run.stack.latent} codes, decoder {n_dec / 1e6:.2f} M, discriminator {n_disc / 1e6:.2f} M params, "
        f"{run.device}"
    )


@dataclass
class Batch:
    codes: torch.Tensor  # [B, c + 2m, c + 2m] code windows
    real: torch.Tensor  # [B, 3, crop, crop] in [0, 1], the windows' centres


def make_batch(run: Run, gen: torch.Generator) -> Batch:
    """Random windows of random training pairs, each grid real or partly redrawn."""
    args, pairs, down = run.args, run.train, run.stack.vqvae.downsample
    b, c, m = args.batch_size, args.crop // down, args.margin
    grid = pairs.codes.shape[-1]
    idx = torch.randint(0, len(pairs.codes), (b,), generator=gen)
    draw = torch.randint(0, pairs.draws.shape[1], (b,), generator=gen)
    share = torch.rand(b, generator=gen) * args.max_redraw
    share[torch.rand(b, generator=gen) < args.real_share] = 0.0
    codes = mix_codes(pairs.codes[idx], pairs.draws[idx, draw], share, gen)
    ys = torch.randint(0, grid - c - 2 * m + 1, (b,), generator=gen)
    xs = torch.randint(0, grid - c - 2 * m + 1, (b,), generator=gen)
    windows, reals = [], []
    for i in range(b):
        y, x = int(ys[i]), int(xs[i])
        windows.append(codes[i, y : y + c + 2 * m, x : x + c + 2 * m])
        py, px = (y + m) * down, (x + m) * down
        reals.append(pairs.images[idx[i], :, py : py + c * down, px : px + c * down])
    real = torch.stack(reals).float() / 255
    return Batch(torch.stack(windows), real)


def train_epoch(run: Run, net: nn.Module, epoch: int) -> dict[str, float]:
    """``--steps-per-epoch`` steps, every random choice a function of (seed, epoch, rank)."""
    args, d = run.args, run.d
    gen = torch.Generator().manual_seed(args.seed * 1000 + epoch * 10 + d.rank)
    run.model.train()
    sums: dict[str, float] = {}
    t0 = time.time()
    bar = tqdm(
        range(args.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not d.is_main, mininterval=5
    )
    for i in bar:
        step = epoch * args.steps_per_epoch + i
        batch = make_batch(run, gen)
        terms = LossSettings(
            margin_px=args.margin * run.stack.vqvae.downsample,
            l1=args.reconstruction == "l1",
            adversarial=step >= args.disc_start,
            disc_weight=args.disc_weight,
            fm_weight=args.fm_weight,
        )
        dev = run.device
        with run.opt.autocast():
            out = net(batch.codes.to(dev), batch.real.to(dev), terms)
        common.check_finite(out["loss"], epoch, i, args.out)
        run.opt.step(out["loss"])
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        bar.set_postfix(rec=f"{float(out['reconstruction'].detach()):.4f}")
    stats = {f"train_{k}": v / args.steps_per_epoch for k, v in sums.items()}
    stats["epoch_seconds"] = time.time() - t0
    return stats


@torch.no_grad()
def validate(run: Run) -> dict[str, float]:
    """PSNR/SSIM of the decoder on the encoder's codes (faithfulness) and on fully teacher-forced
    draws, beside the VQ-VAE's own decoder on the same codes."""
    decoder, vq = run.model.decoder.eval(), run.stack.vqvae
    real = run.val.images.float() / 255
    out = {}
    for name, codes in (("real_codes", run.val.codes), ("drawn_codes", run.val.draws[:, 0])):
        for who, dec in (("", decoder), ("mse_", vq)):
            images = dec.decode_codes(codes.to(run.device)).cpu()
            out[f"val_{who}psnr_{name}"] = float(metrics.psnr(images, real).mean())
            out[f"val_{who}ssim_{name}"] = float(metrics.ssim(images, real).mean())
    return out


def end_epoch(run: Run, epoch: int, stats: dict[str, float]) -> None:
    """Rank 0: validate, log, save a sheet and the checkpoint."""
    args = run.args
    record = {"epoch": epoch + 1, **stats, **validate(run), "lr": run.opt.lr}
    common.append_jsonl(args.out / "metrics.jsonl", record)
    write_curves(
        common.read_jsonl(args.out / "metrics.jsonl"),
        {
            "reconstruction loss": ["train_reconstruction"],
            "discriminator": ["train_disc", "train_disc_accuracy"],
            "validation PSNR (dB)": ["val_psnr_real_codes", "val_mse_psnr_real_codes", "val_psnr_drawn_codes"],
        },
        "decoder post-training",
        args.out / "curves.html",
    )
    save_sheet(run, args.out / f"decoded_epoch{epoch + 1:03d}.png")
    run.opt.save(args.out / common.CHECKPOINT, epoch + 1)
    print(
        f"epoch {epoch + 1}: rec {record['train_reconstruction']:.4f}, disc acc {record['train_disc_accuracy']:.2f}, "
        f"val PSNR {record['val_psnr_real_codes']:.2f} dB (MSE decoder {record['val_mse_psnr_real_codes']:.2f}), "
        f"drawn codes {record['val_psnr_drawn_codes']:.2f} dB, {record['epoch_seconds']:.0f} s"
    )


@torch.no_grad()
def save_sheet(run: Run, path: Path, n: int = 6) -> None:
    """Rows: real images; the MSE decoder and this one on the same teacher-forced draws."""
    val = run.val.take(list(range(min(n, len(run.val.codes)))))
    drawn = val.draws[:, 0].to(run.device)
    rows = [
        val.images.float() / 255,
        run.stack.vqvae.decode_codes(drawn).cpu(),
        run.model.decoder.decode_codes(drawn).cpu(),
    ]
    save_image(torch.cat(rows), path, nrow=len(val.codes))


def export(run: Run) -> None:
    """Rank 0: OUT/final/, a CodeDecoder folder whose codebook is checked against the VQ-VAE's."""
    final = run.args.out / "final"
    decoder = run.model.decoder.eval()
    decoder.check_fits(run.stack.vqvae, "the post-trained decoder")
    decoder.save_pretrained(final)
    print(f"exported {final}")
    if run.args.push_to_hub:
        common.push_to_hub(final, run.args.push_to_hub, f"decoder-{run.stack.latent}")


def main(argv: list[str] | None = None) -> None:
    common.run(parse_args(argv), common.Steps(prepare, describe, train_epoch, end_epoch, export))


if __name__ == "__main__":
    main()
