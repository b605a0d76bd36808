"""Measure a VQ-VAE (and optionally a prior) on a folder of images.

python -m lesionstudio.evaluate --vqvae checkpoints/vqvae-64 --data DIR [--prior PATH] [--json]

A hierarchical prior (conditioned on a coarser grid) is scored with its coarse VQ-VAE and prior
(``--coarse-vqvae`` / ``--coarse-prior``, by default ``vqvae-N`` and ``pixelcnn-N`` beside the
prior's folder): bits per code is then -log2 p(coarse, fine) per fine code, an upper bound on
the fine grid's own bits, comparable with a plain prior's and with the unigram entropy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .cli import HelpFormatter
from .data import LesionImageFolder, eval_transform, split_indices
from .measure.scoring import evaluate
from .models.codedecoder import CodeDecoder
from .models.hubmodel import CheckpointError
from .models.pixelcnn import GatedPixelCNN
from .models.vqvae import VQVAE
from .sampling.loading import check_coarse_stack, check_pair, load_stack_from
from .sampling.stack import ModelStack


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lesionstudio.evaluate",
        description=__doc__.split("\n")[1].strip(),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--vqvae", required=True, help="VQ-VAE folder or Hub repo id")
    p.add_argument("--data", type=Path, required=True, help="folder of images")
    p.add_argument("--prior", default=None, help="prior folder or Hub repo id (adds bits per code)")
    p.add_argument(
        "--decoder",
        default=None,
        help="post-trained decoder folder (decoder-N/): adds its PSNR and SSIM on the same codes",
    )
    p.add_argument("--coarse-vqvae", default=None, help="a hierarchical prior's coarse VQ-VAE (default: beside it)")
    p.add_argument("--coarse-prior", default=None, help="a hierarchical prior's coarse prior (default: beside it)")
    p.add_argument("--limit", type=int, default=None, help="first N images (after --split)")
    p.add_argument("--labels", type=Path, default=None, help="CSV of labels: score a conditional prior per class")
    p.add_argument(
        "--split",
        choices=("all", "train", "val"),
        default="all",
        help="the trainers' train or validation split of DIR (same --val-fraction, --seed)",
    )
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    args = p.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device

    vq = VQVAE.from_pretrained(args.vqvae).to(device)
    prior = GatedPixelCNN.from_pretrained(args.prior).to(device) if args.prior else None
    coarse, decoder = None, None
    try:
        if args.decoder:
            decoder = CodeDecoder.from_pretrained(args.decoder).to(device)
            decoder.check_fits(vq, args.decoder)
        if prior is not None:
            check_pair(vq, prior, args.vqvae, args.prior)
            if prior.hierarchical:
                coarse = load_coarse(args.prior, prior, args.coarse_vqvae, args.coarse_prior, device)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from exc
    ds = LesionImageFolder(args.data, transform=eval_transform(vq.image_size), labels_csv=args.labels)
    if args.split != "all":
        train_idx, val_idx = split_indices(len(ds), args.val_fraction, seed=args.seed)
        ds = ds.subset(val_idx if args.split == "val" else train_idx)
    if args.limit is not None:
        ds = ds.subset(range(min(args.limit, len(ds))))
    r = evaluate(
        vq, ds, prior, device, args.batch_size, use_labels=args.labels is not None, coarse=coarse, decoder=decoder
    )
    print(f"images:        {r['images']} ({args.data}, split {args.split})")
    print(f"PSNR:          {r['psnr']:.2f} dB")
    print(f"SSIM:          {r['ssim']:.4f}")
    if decoder is not None:
        print(f"post-trained decoder on the same codes: PSNR {r['decoder_psnr']:.2f} dB, SSIM {r['decoder_ssim']:.4f}")
    print(f"perplexity:    {r['perplexity']:.1f}")
    print(f"codes used:    {r['codes_used']} / {r['num_codes']}")
    print(f"unigram:       {r['unigram_bits']:.3f} bits/code (a model that ignores context)")
    if r["bits_per_code"] is not None:
        gain = 1 - r["bits_per_code"] / r["unigram_bits"] if r["unigram_bits"] else 0.0
        print(f"prior NLL:     {r['bits_per_code']:.3f} bits/code ({gain:.1%} below unigram)")
    if r.get("fine_given_coarse_bits") is not None:
        print(
            f"  of which:    coarse grid {r['coarse_bits_per_code']:.3f} bits per coarse code, "
            f"fine grid given it {r['fine_given_coarse_bits']:.3f} bits per fine code"
        )
    if args.json:
        keys = ("psnr", "ssim", "perplexity", "codes_used", "bits_per_code", "unigram_bits")
        extra = ("fine_given_coarse_bits", "coarse_bits_per_code", "decoder_psnr", "decoder_ssim")
        print(json.dumps({k: r[k] for k in keys} | {k: r[k] for k in extra if k in r}))


def load_coarse(
    prior_dir: str | Path,
    prior: GatedPixelCNN,
    coarse_vqvae: str | Path | None = None,
    coarse_prior: str | Path | None = None,
    device: str = "cpu",
) -> ModelStack:
    """The coarser levels a hierarchical prior fills in: the given coarse VQ-VAE and prior (their
    own coarser levels beside them), or ``vqvae-N`` / ``pixelcnn-N`` beside the prior."""
    g = prior.cond_grid_size
    beside = Path(prior_dir).parent
    vq_path = Path(coarse_vqvae or beside / f"vqvae-{g}")
    prior_path = Path(coarse_prior or beside / f"pixelcnn-{g}")
    for what, given, path, flag in (
        ("VQ-VAE", coarse_vqvae, vq_path, "--coarse-vqvae"),
        ("prior", coarse_prior, prior_path, "--coarse-prior"),
    ):
        if not given and not path.is_dir():
            raise CheckpointError(
                f"{prior_dir} is a hierarchical prior: give its coarse {what} with {flag} (no {path} beside it)"
            )
    coarse = load_stack_from(vq_path, prior_path, device=device)
    check_coarse_stack(prior, prior_dir, coarse)
    return coarse


if __name__ == "__main__":
    main()
