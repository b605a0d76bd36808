"""Image-quality and codebook-usage metrics."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import structural_similarity_index_measure


def psnr(preds: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image in a batch [B, C, H, W] (shape [B])."""
    mse = (preds.float() - target.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def ssim(preds: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity of each image in a batch (torchmetrics, Gaussian 11x11 window), shape [B]."""
    out = structural_similarity_index_measure(preds.float(), target.float(), data_range=data_range, reduction="none")
    return out.reshape(-1)


def usage_histogram(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """How often each of num_codes codes occurs in codes (any shape), as int64 counts."""
    return torch.bincount(codes.reshape(-1).long().cpu(), minlength=num_codes)


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code distribution given by counts: num_codes if all are used equally."""
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def entropy_bits(counts: torch.Tensor) -> float:
    """Entropy in bits of the code distribution (the bits/code of a context-free model)."""
    return math.log2(perplexity(counts)) if counts.sum() > 0 else 0.0


def dead_code_count(counts: torch.Tensor) -> int:
    """Number of codes that never occur."""
    return int((counts == 0).sum())


def codes_used(counts: torch.Tensor) -> int:
    return int((counts > 0).sum())
