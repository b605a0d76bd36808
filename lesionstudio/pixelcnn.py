"""Gated PixelCNN prior over a grid of VQ-VAE code indices (van den Oord et al., 2016).

Two stacks per layer. The vertical stack sees rows above (its k x k kernel is cut to the rows up
to the current one, and its output reaches the horizontal stack shifted down by one row, so
only rows strictly above leak in). The horizontal stack sees the current row up to the current
position (the first layer excludes the position itself). Together there is no blind spot.
Units are gated, tanh(a) * sigmoid(b); the horizontal stack is residual. With
``num_classes > 0`` a learned class embedding is added inside every gate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .hubmodel import HubModel, check_int


def gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Move every row one down (row 0 becomes zeros): row r then holds what row r-1 computed."""
    return F.pad(x, (0, 0, 1, 0))[:, :, : x.shape[2]]


class GatedLayer(nn.Module):
    def __init__(self, channels: int, kernel_size: int, num_classes: int, first: bool) -> None:
        super().__init__()
        p = kernel_size // 2
        self.pad, self.first, self.channels = p, first, channels
        # Vertical: rows r-p..r, columns c-p..c+p.
        self.v_conv = nn.Conv2d(channels, 2 * channels, (p + 1, kernel_size))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        # Horizontal: columns c-p..c (c-p..c-1 in the first layer, which must not see its own code).
        self.h_width = p if first else p + 1
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, self.h_width))
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.class_embed = nn.Embedding(num_classes, 2 * channels) if num_classes > 0 else None

    def class_bias(self, labels: torch.Tensor | None) -> torch.Tensor | float:
        if self.class_embed is None or labels is None:
            return 0.0
        return self.class_embed(labels)[:, :, None, None]

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p, w = self.pad, h.shape[3]
        cond = self.class_bias(labels)
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0))) + cond
        h_pre = self.h_conv(F.pad(h, (p, 0, 0, 0)))[:, :, :, :w]
        h_pre = h_pre + self.v_to_h(shift_down(v_pre)) + cond
        h_new = self.h_out(gate(h_pre))
        if not self.first:
            h_new = h_new + h
        return gate(v_pre), h_new


class GatedPixelCNN(
    HubModel,
    library_name="lesionstudio",
    tags=["pixelcnn", "autoregressive", "vq-vae-prior", "dermoscopy", "isic"],
    license="apache-2.0",
):
    """Autoregressive prior p(codes) = prod p(code[r, c] | codes before it in raster order [, class]).

    ``forward(codes [B, h, w], labels [B] | None) -> logits [B, K, h, w]``. ``grid_size`` is
    the code grid it was trained for (it runs on any grid), ``class_names`` and
    ``class_counts`` describe the classes (for sampling across classes by training frequency).
    """

    def __init__(
        self,
        num_codes: int = 512,
        channels: int = 128,
        num_layers: int = 12,
        kernel_size: int = 5,
        num_classes: int = 0,
        grid_size: int = 64,
        code_dim: int = 0,
        class_names: list[str] | None = None,
        class_counts: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.num_codes = check_int("num_codes", num_codes, minimum=2)
        self.channels = check_int("channels", channels, minimum=1)
        self.num_layers = check_int("num_layers", num_layers, minimum=1)
        self.kernel_size = check_int("kernel_size", kernel_size, minimum=3)
        if kernel_size % 2 == 0:
            raise ValueError(f"config value kernel_size must be odd, got {kernel_size}")
        self.num_classes = check_int("num_classes", num_classes, minimum=0)
        self.grid_size = check_int("grid_size", grid_size, minimum=1)
        self.code_dim = check_int("code_dim", code_dim, minimum=0)  # of the VQ-VAE it models (0: unknown)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"config has {len(self.class_names)} class_names for num_classes={num_classes}")
        if class_counts is not None and (
            len(class_counts) != num_classes or any(not isinstance(c, int) or c < 0 for c in class_counts)
        ):
            raise ValueError(f"config value class_counts must be {num_classes} non-negative integers")
        self.class_counts = list(class_counts) if class_counts else [1] * num_classes

        self.embedding = nn.Embedding(num_codes, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, kernel_size, num_classes, first=(i == 0)) for i in range(num_layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, num_codes, 1)
        )

    def check_inputs(self, codes: torch.Tensor, labels: torch.Tensor | None) -> None:
        if codes.ndim != 3:
            raise ValueError(f"expected codes [B, h, w], got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"codes must be in [0, {self.num_codes})")
        if labels is not None:
            if self.num_classes == 0:
                raise ValueError("this prior is unconditional; pass labels=None")
            if labels.shape != (codes.shape[0],) or int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
                raise ValueError(f"labels must be [B] class ids in [0, {self.num_classes})")

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(codes, labels)
        x = self.embedding(codes.long()).permute(0, 3, 1, 2)
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.head(h)

    def class_probabilities(self) -> torch.Tensor:
        counts = torch.tensor(self.class_counts, dtype=torch.float64)
        return counts / counts.sum() if counts.sum() > 0 else torch.full_like(counts, 1 / len(counts))

    @torch.no_grad()
    def log_likelihood(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position log p(code) in nats, shape [B, h, w]."""
        logits = self(codes, labels).float()
        return -F.cross_entropy(logits, codes.long(), reduction="none")

    @torch.no_grad()
    def nll_bits(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Negative log-likelihood of each grid in bits per code, shape [B].

        On a class-conditional prior without labels, the class is marginalised out:
        p(codes) = sum_c p(c) p(codes | c).
        """
        n = codes[0].numel()
        if self.num_classes and labels is None:
            per_class = []
            for c in range(self.num_classes):
                lab = torch.full((codes.shape[0],), c, dtype=torch.long, device=codes.device)
                per_class.append(self.log_likelihood(codes, lab).flatten(1).sum(1))
            log_prior = self.class_probabilities().to(codes.device).log().float()
            total = torch.logsumexp(torch.stack(per_class, 1) + log_prior, dim=1)
        else:
            total = self.log_likelihood(codes, labels).flatten(1).sum(1)
        return -total / n / math.log(2)
