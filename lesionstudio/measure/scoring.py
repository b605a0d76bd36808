"""Scoring a VQ-VAE (and its prior) on a data set: reconstruction quality, codebook usage and
bits per code, for the evaluate command and the trainers' validation."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..data import collate_skip_bad
from ..models.codedecoder import CodeDecoder
from ..models.pixelcnn import GatedPixelCNN
from ..models.vqvae import VQVAE
from ..sampling.stack import ModelStack, stack_bits
from . import metrics


def _loader(dataset: Dataset, limit: int | None, batch_size: int) -> DataLoader:
    if limit is not None and limit < len(dataset):  # type: ignore[arg-type]
        dataset = Subset(dataset, range(limit))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skip_bad)


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


@torch.no_grad()
def prior_bits(
    prior: GatedPixelCNN,
    codes: torch.Tensor,
    labels: torch.Tensor | None = None,
    batch_size: int = 16,
    coarse: torch.Tensor | None = None,
) -> float:
    """Mean negative log-likelihood in bits per code (classes marginalised when labels is None;
    given the coarse grids, for a hierarchical prior)."""
    prior.eval()
    total = 0.0
    for i in range(0, len(codes), batch_size):
        lab = None if labels is None else labels[i : i + batch_size]
        cg = None if coarse is None else coarse[i : i + batch_size]
        total += float(prior.nll_bits(codes[i : i + batch_size], lab, cg).sum())
    return total / max(len(codes), 1)


@torch.no_grad()
def stack_bit_means(
    stack: ModelStack, codes: list[torch.Tensor], labels: torch.Tensor | None, batch_size: int = 16
) -> dict[str, float]:
    """Means over the images of a hierarchical stack's joint bits per finest code, the finest
    grid's bits given the level below, and the coarser levels' joint bits per code of theirs."""
    sums = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(codes[-1]), batch_size):
        lab = None if labels is None else labels[i : i + batch_size]
        bits = stack_bits(stack, [c[i : i + batch_size] for c in codes], lab)
        assert bits.coarse_joint is not None
        sums += torch.stack([p.double().sum() for p in (bits.joint, bits.finest_given_coarse, bits.coarse_joint)])
    means = (sums / max(len(codes[-1]), 1)).tolist()
    return dict(zip(("bits_per_code", "fine_given_coarse_bits", "coarse_bits_per_code"), means, strict=True))


@torch.no_grad()
def evaluate(
    vqvae: VQVAE,
    dataset: Dataset,
    prior: GatedPixelCNN | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    use_labels: bool = False,
    limit: int | None = None,
    coarse: ModelStack | None = None,
    decoder: CodeDecoder | None = None,
) -> dict:
    """Mean PSNR and SSIM of the reconstructions, codebook usage and (with a prior) bits per
    code over a data set (its transform should be the eval transform), first `limit` images.
    A hierarchical prior needs ``coarse``, the stack of coarser levels it fills in. With a
    post-trained ``decoder``, also its PSNR and SSIM on the same codes (``decoder_psnr``, ``decoder_ssim``)."""
    vqvae.eval()
    if prior is not None and prior.hierarchical and (coarse is None or coarse.prior is None):
        raise ValueError("a hierarchical prior is scored with its coarser levels (coarse=)")
    psnrs, ssims, all_codes, all_labels = [], [], [], []
    dec_psnrs, dec_ssims = [], []
    hier = prior is not None and prior.hierarchical and coarse is not None
    all_coarse: list[list[torch.Tensor]] = []
    for batch in tqdm(_loader(dataset, limit, batch_size), desc="evaluating", unit="batch", mininterval=2):
        if batch.images.numel() == 0:
            continue
        images = batch.images.to(device)
        recon, codes = vqvae.reconstruct(images)
        psnrs.append(metrics.psnr(recon, images).cpu())
        ssims.append(metrics.ssim(recon, images).cpu())
        all_codes.append(codes.cpu())
        all_labels.append(batch.labels)
        if decoder is not None:
            rendered = decoder.decode_codes(codes)
            dec_psnrs.append(metrics.psnr(rendered, images).cpu())
            dec_ssims.append(metrics.ssim(rendered, images).cpu())
        if hier:
            assert coarse is not None
            all_coarse.append([c.cpu() for c in coarse.encode(images)])
    if not psnrs:
        raise ValueError("no readable images to evaluate")
    codes = torch.cat(all_codes)
    counts = metrics.usage_histogram(codes, vqvae.num_codes)
    result = {
        "images": len(codes),
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "perplexity": metrics.perplexity(counts),
        "codes_used": metrics.codes_used(counts),
        "num_codes": vqvae.num_codes,
        "bits_per_code": None,
        "unigram_bits": metrics.entropy_bits(counts),
    }
    if decoder is not None:
        result["decoder_psnr"] = float(torch.cat(dec_psnrs).mean())
        result["decoder_ssim"] = float(torch.cat(dec_ssims).mean())
    if prior is not None:
        labels = torch.cat(all_labels)
        if not use_labels or prior.num_classes == 0 or bool((labels < 0).any()):
            labels = None
        if not prior.hierarchical:
            result["bits_per_code"] = prior_bits(prior.to(device), codes.to(device), labels, batch_size)
            return result
        stack = ModelStack(vqvae.latent_size, vqvae, prior.to(device), "", Path(), None, coarse=coarse)
        levels = [torch.cat(grids).to(device) for grids in zip(*all_coarse, strict=True)] + [codes.to(device)]
        lab = None if labels is None else labels.to(device)
        result |= stack_bit_means(stack, levels, lab, batch_size)
    return result
