"""A small CNN that tells real lesion images from generated ones, by layout and by texture.

Two branches of the same shape judge two views of a 256 px image: *layout* sees the whole image
downscaled to ``view_size`` px (where the lesion is, its size, border and the vignette),
*texture* sees ``view_size`` px crops at full resolution (pigment network, skin, speckle). A
branch judges an image by the mean logit of several views: the 8 flips and right-angle turns of
the whole image, a grid of crops. The critic serves twice: as the
classifier of the two-sample test (``lesionstudio.measure.twosample``, a fresh one per comparison) and,
trained on real training images against a stack's own samples (``python -m train.critic``), as
the shipped scorer that ranks candidate samples (VQ-VAE-2's classifier-based rejection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import dihedral_variant
from ..measure.lesionshape import FEATURE_NAMES, shape_features
from .hubmodel import WEIGHTS_LICENSE, HubModel, check_int


class HighPass(nn.Module):
    """An image (centred) beside its fine detail, the residual of a 3x3 box blur, amplified: the
    detail is a few levels in 255, far below the image's own contrast, and a network given the
    image alone does not learn to find it on a few hundred images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return torch.cat([x - 0.5, 8 * (x - blur)], dim=1)


def branch(channels: int, highpass: bool = False) -> nn.Sequential:
    """Four stride-2 convolutions, global average pooling, one logit. GroupNorm, not BatchNorm:
    the critic judges single images and small sets the same way in training and evaluation.
    ``highpass``: the input is ``HighPass``'s and there is no normalisation, since one per image
    divides out the very energy of fine detail that tells a blur, speckle or mottle from skin."""
    layers: list[nn.Module] = [HighPass()] if highpass else []
    ch_in = 6 if highpass else 3
    for ch in (channels, 2 * channels, 4 * channels, 4 * channels):
        layers.append(nn.Conv2d(ch_in, ch, 4, stride=2, padding=1))
        if not highpass:
            layers.append(nn.GroupNorm(math.gcd(8, ch), ch))
        layers.append(nn.LeakyReLU(0.2))
        ch_in = ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(ch_in, 1)]
    return nn.Sequential(*layers)


@dataclass
class Judgement:
    """Logits (> 0: looks real) per image [B]; ``shape`` when the critic has a shape head."""

    layout: torch.Tensor
    texture: torch.Tensor
    shape: torch.Tensor | None = None

    @property
    def realism(self) -> torch.Tensor:
        """The score candidates are ranked by: the two views count equally; the shape head's
        log-odds, when there is one, are added (independent evidence multiplies the odds)."""
        score = (self.layout + self.texture) / 2
        return score if self.shape is None else score + self.shape


class ShapeHead(nn.Module):
    """Quadratic logistic regression on the lesion-shape features (``lesionstudio.measure.lesionshape``):
    the log-odds that a layout is real. Quadratic, as real values of a feature often lie in a
    middle band (lesion area, border sharpness); features are clipped at 3 standard deviations so
    that no odd segmentation yields an extreme score."""

    def __init__(self, n_features: int = len(FEATURE_NAMES)) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))
        self.linear = nn.Linear(2 * n_features, 1)

    def expand(self, features: torch.Tensor) -> torch.Tensor:
        z = ((features - self.mean) / self.scale).clamp(-3, 3)
        return torch.cat([z, z * z - 1], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.expand(features)).view(-1)

    def fit(self, real: torch.Tensor, fake: torch.Tensor, l2: float = 1e-3) -> float:
        """Fit on feature rows of real and generated images (balanced: each side weighs half).
        Returns the final loss."""
        if len(real) < 2 or len(fake) < 2:
            raise ValueError("the shape head needs at least 2 real and 2 generated images")
        both = torch.cat([real, fake]).float()
        self.mean.copy_(both.mean(0))
        self.scale.copy_(both.std(0).clamp_min(1e-6))
        x = self.expand(both)
        target = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))])
        weight = torch.cat([torch.full((len(real),), 0.5 / len(real)), torch.full((len(fake),), 0.5 / len(fake))])
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        opt = torch.optim.LBFGS(self.linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

        def loss() -> torch.Tensor:
            bce = F.binary_cross_entropy_with_logits(self.linear(x).view(-1), target, reduction="none")
            return (bce * weight).sum() + l2 * self.linear.weight.pow(2).sum()

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = loss()
            value.backward()
            return value

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            return float(loss())


class RealismCritic(
    HubModel,
    library_name="lesionstudio",
    tags=["image-classification", "dermoscopy", "synthetic-image-detection", "isic"],
    license=WEIGHTS_LICENSE,
):
    """``forward(images [B, 3, H, W] in [0, 1]) -> Judgement``; H and W at least ``view_size``."""

    def __init__(
        self,
        channels: int = 32,
        view_size: int = 64,
        crops_per_side: int = 3,
        shape_head: bool = False,
        layout_grid: int = 0,  # the grid of the layouts the layout head judges; 0: no layout head
        texture_highpass: bool = False,  # the texture branch sees fine detail (``HighPass``), unnormalised
    ) -> None:
        super().__init__()
        self.channels = check_int("channels", channels, minimum=4)
        self.view_size = check_int("view_size", view_size, minimum=16)
        self.crops_per_side = check_int("crops_per_side", crops_per_side, minimum=1)
        if not isinstance(shape_head, bool):
            raise ValueError(f"config value shape_head must be true or false, got {shape_head!r}")
        self.layout_grid = check_int("layout_grid", layout_grid, minimum=0)
        if not isinstance(texture_highpass, bool):
            raise ValueError(f"config value texture_highpass must be true or false, got {texture_highpass!r}")
        self.layout_net = branch(channels)
        self.texture_net = branch(channels, highpass=texture_highpass)
        self.shape_head = ShapeHead() if shape_head else None
        # Judges the coarsest level's grids, decoded, before any detail is drawn on them.
        self.layout_head = ShapeHead() if layout_grid else None

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < self.view_size:
            raise ValueError(
                f"expected images [B, 3, H, W] with sides of at least {self.view_size}, got {tuple(images.shape)}"
            )

    def layout_view(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.view_size, self.view_size)
        return F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)

    def crop_corners(self, height: int, width: int) -> list[tuple[int, int]]:
        """Top-left corners of the fixed texture crops: an evenly spaced grid over the image."""
        n, v = self.crops_per_side, self.view_size
        ys = torch.linspace(0, height - v, n).round().long().tolist()
        xs = torch.linspace(0, width - v, n).round().long().tolist()
        return [(y, x) for y in ys for x in xs]

    def texture_views(self, images: torch.Tensor) -> torch.Tensor:
        """The fixed crops of every image, [B * crops, 3, v, v] (crops of one image adjacent)."""
        v = self.view_size
        corners = self.crop_corners(*images.shape[-2:])
        crops = [images[:, :, y : y + v, x : x + v] for y, x in corners]
        return torch.stack(crops, dim=1).flatten(0, 1).float()

    def forward(self, images: torch.Tensor) -> Judgement:
        self._check(images)
        b = images.shape[0]
        small = self.layout_view(images)
        turns = torch.cat([dihedral_variant(small, k) for k in range(8)])  # turns of one image b apart
        layout = self.layout_net(turns).view(8, b).mean(0)
        texture = self.texture_net(self.texture_views(images)).view(b, -1).mean(1)
        if self.shape_head is None:
            return Judgement(layout, texture)
        shape = self.shape_head(shape_features(images, self.view_size).to(layout.device))
        return Judgement(layout, texture, shape)

    def training_loss(
        self, images: torch.Tensor, real: torch.Tensor, gen: torch.Generator, crops: int = 1
    ) -> torch.Tensor:
        """Binary cross-entropy of both branches on randomly turned images and ``crops`` random
        crops each (``real``: 1.0 for real images, 0.0 for generated ones)."""
        self._check(images)
        turns = torch.randint(0, 8, (len(images),), generator=gen).tolist()
        turned = torch.stack([dihedral_variant(x, k) for x, k in zip(images, turns, strict=True)])
        v, (h, w) = self.view_size, images.shape[-2:]
        owner = torch.arange(len(images)).repeat_interleave(crops).tolist()
        ys = torch.randint(0, h - v + 1, (len(owner),), generator=gen).tolist()
        xs = torch.randint(0, w - v + 1, (len(owner),), generator=gen).tolist()
        views = torch.stack([turned[i, :, y : y + v, c : c + v] for i, y, c in zip(owner, ys, xs, strict=True)])
        layout = self.layout_net(self.layout_view(turned)).view(-1)
        texture = self.texture_net(views.float()).view(-1)
        return F.binary_cross_entropy_with_logits(layout, real) + F.binary_cross_entropy_with_logits(
            texture, real.repeat_interleave(crops)
        )

    @torch.no_grad()
    def judge_layouts(self, images: torch.Tensor) -> torch.Tensor:
        """Log-odds [B] that layouts look real: the coarsest level's grids decoded by its VQ-VAE
        ([B, 3, H, W] in [0, 1]), judged by the layout head."""
        if self.layout_head is None:
            raise ValueError("this critic has no layout head (python -m train.critic --layout-head)")
        self.eval()
        device = self.layout_head.linear.weight.device
        return self.layout_head(shape_features(images, self.view_size).to(device)).cpu()

    @torch.no_grad()
    def judge(self, images: torch.Tensor, batch_size: int = 32) -> Judgement:
        """Judge images in batches, in eval mode."""
        self.eval()
        parts = [
            self(images[i : i + batch_size].to(self.layout_net[0].weight.device))
            for i in range(0, len(images), batch_size)
        ]
        shape = None if self.shape_head is None else torch.cat([p.shape for p in parts]).cpu()
        return Judgement(torch.cat([p.layout for p in parts]).cpu(), torch.cat([p.texture for p in parts]).cpu(), shape)


@dataclass
class FitSettings:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    crops: int = 1  # random texture crops per image and step


def fit(critic: RealismCritic, real: torch.Tensor, fake: torch.Tensor, settings: FitSettings) -> list[float]:
    """Train a critic on uint8 images [N, 3, H, W]; every epoch sees all generated images and as
    many real ones, drawn at random (balanced classes). Returns the mean loss of each epoch."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("the critic needs at least 2 real and 2 generated images")
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    opt = torch.optim.AdamW(critic.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    per_epoch = min(len(real), len(fake))
    steps = settings.epochs * -(-2 * per_epoch // settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=steps)
    losses = []
    for _ in range(settings.epochs):
        critic.train()
        pick_real = torch.randperm(len(real), generator=gen)[:per_epoch]
        pick_fake = torch.randperm(len(fake), generator=gen)[:per_epoch]
        images = torch.cat([real[pick_real], fake[pick_fake]])
        target = torch.cat([torch.ones(per_epoch), torch.zeros(per_epoch)])
        order = torch.randperm(len(images), generator=gen)
        total = 0.0
        for s in range(0, len(order), settings.batch_size):
            idx = order[s : s + settings.batch_size]
            loss = critic.training_loss(images[idx].float() / 255, target[idx], gen, settings.crops)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(order))
    critic.eval()
    return losses
