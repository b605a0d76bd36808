"""Classifier two-sample test (C2ST; Lopez-Paz & Oquab, 2017): can a small CNN tell two image sets apart?

A fresh ``RealismCritic`` learns real vs generated on one half of each set and is scored on the
other half: accuracy 0.5 means indistinguishable, 1.0 told apart every time. Its two branches
give two scores, **layout** (whole images downscaled) and **texture** (full-resolution crops
beside their fine detail, ``TestDesign``), each image judged by the mean logit of several views.
Seeded, and sized for a CPU: 2 x 400 images took 6-9 minutes on one thread of a busy 2-core machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

from ..data import ImageLoadError, eval_transform, load_image
from ..models.critic import FitSettings, RealismCritic, fit


@dataclass(frozen=True)
class TestDesign:
    """The classifier the test trains: the critic's architecture, its texture branch given the
    images' fine detail (``critic.HighPass``; without it a 1 px blur goes unseen)."""

    channels: int = 32
    texture_highpass: bool = True


# How the test's classifier is trained: long enough, and on enough random crops per image, that
# it sees texture (README's Realism page has the calibration this was chosen by).
YARDSTICK = FitSettings(epochs=30, crops=4)


@dataclass
class TwoSampleResult:
    layout_accuracy: float
    texture_accuracy: float
    standard_error: float  # of an accuracy near 0.5 on this many test images
    train_per_set: int
    test_per_set: int
    seconds: float

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def load_uint8(files: Sequence[Path], size: int = 256) -> torch.Tensor:
    """Images as uint8 [N, 3, size, size], preprocessed as the models see them; unreadable files
    are an error (a two-sample test must not silently drop one side's images)."""
    transform = eval_transform(size)
    out = []
    for f in files:
        try:
            out.append((transform(load_image(f)) * 255).round().to(torch.uint8))
        except ImageLoadError as exc:
            raise ImageLoadError(f"{f}: {exc}") from exc
    if not out:
        raise ValueError("no images to compare")
    return torch.stack(out)


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of uint8 images (a calibration row: what a little lost detail scores)."""
    k = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(images.float(), [k, k], [sigma, sigma]).round().clamp(0, 255).to(torch.uint8)


def two_sample_test(
    real: torch.Tensor, generated: torch.Tensor, settings: FitSettings | None = None, design: TestDesign | None = None
) -> TwoSampleResult:
    """C2ST of two uint8 image sets [N, 3, H, W] of at least 4 images each (the larger is cut to
    the smaller, so chance is 0.5); the first half of each (after a seeded shuffle) trains."""
    settings = settings or YARDSTICK
    design = design or TestDesign()
    n = min(len(real), len(generated))
    if n < 4:
        raise ValueError(f"a two-sample test needs at least 4 images per set, got {len(real)} and {len(generated)}")
    t0 = time.time()
    gen = torch.Generator().manual_seed(settings.seed)
    real = real[torch.randperm(len(real), generator=gen)[:n]]
    generated = generated[torch.randperm(len(generated), generator=gen)[:n]]
    half = n // 2
    torch.manual_seed(settings.seed)
    critic = RealismCritic(channels=design.channels, texture_highpass=design.texture_highpass)
    fit(critic, real[:half], generated[:half], settings)
    test = torch.cat([real[half:], generated[half:]]).float() / 255
    truth = torch.cat([torch.ones(n - half), torch.zeros(n - half)]).bool()
    judged = critic.judge(test)
    return TwoSampleResult(
        layout_accuracy=float(((judged.layout > 0) == truth).float().mean()),
        texture_accuracy=float(((judged.texture > 0) == truth).float().mean()),
        standard_error=0.5 / math.sqrt(len(truth)),
        train_per_set=half,
        test_per_set=n - half,
        seconds=time.time() - t0,
    )
