"""Measure a VQ-VAE (and optionally a prior) on a folder of images.

python -m lesionstudio.evaluate --vqvae checkpoints/vqvae-64 --data DIR [--prior PATH] [--json]
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from . import metrics
from .data import collate_skip_bad
from .vqvae import VQVAE


def _loader(dataset: Dataset, limit: int | None, batch_size: int) -> DataLoader:
    if limit is not None and limit < len(dataset):  # type: ignore[arg-type]
        dataset = Subset(dataset, range(limit))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skip_bad)


@torch.no_grad()
def evaluate_vqvae(
    model: VQVAE,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    batch_size: int = 16,
) -> dict:
    """Mean PSNR and SSIM of the reconstructions, and codebook usage, over a data set."""
    model.eval()
    psnrs, ssims = [], []
    counts = torch.zeros(model.num_codes, dtype=torch.long)
    for batch in _loader(dataset, limit, batch_size):
        if batch.images.numel() == 0:
            continue
        images = batch.images.to(device)
        recon, codes = model.reconstruct(images)
        psnrs.append(metrics.psnr(recon, images).cpu())
        ssims.append(metrics.ssim(recon, images).cpu())
        counts += metrics.usage_histogram(codes, model.num_codes)
    if not psnrs:
        raise ValueError("no readable images to evaluate")
    return {
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "perplexity": metrics.perplexity(counts),
        "codes_used": metrics.codes_used(counts),
        "images": int(sum(len(p) for p in psnrs)),
        "counts": counts,
    }


@torch.no_grad()
def codebook_usage(
    model: VQVAE,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Count of each code over the images of a data set."""
    model.eval()
    counts = torch.zeros(model.num_codes, dtype=torch.long)
    for batch in _loader(dataset, limit, batch_size):
        if batch.images.numel():
            counts += metrics.usage_histogram(model.encode(batch.images.to(device)), model.num_codes)
    return counts
