"""Gated PixelCNN prior over a grid of VQ-VAE code indices (van den Oord et al., 2016).

Two stacks per layer. The vertical stack sees rows above (its k x k kernel is cut to the rows up
to the current one, and its output reaches the horizontal stack shifted down by one row, so
only rows strictly above leak in). The horizontal stack sees the current row up to the current
position (the first layer excludes the position itself). Together there is no blind spot.
Units are gated, tanh(a) * sigmoid(b); the horizontal stack is residual. With
``num_classes > 0`` a learned class embedding is added inside every gate.

With ``cond_num_codes > 0`` the prior is also conditioned on a coarser code grid of the same
image (from a second VQ-VAE with a smaller grid, as in the two-level prior of VQ-VAE-2): the
coarse codes are embedded, mixed by a small non-causal convolution (the whole coarse grid is
known), upsampled to this grid and added inside every gate. A prior whose layers see about
two dozen codes can then fill in detail around a layout drawn by a prior over the coarse grid,
which sees the whole lesion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .hubmodel import WEIGHTS_LICENSE, HubModel, check_int
from .vqvae import check_codes


def gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Move every row one down (row 0 becomes zeros): row r then holds what row r-1 computed."""
    return F.pad(x, (0, 0, 1, 0))[:, :, : x.shape[2]]


class GatedLayer(nn.Module):
    def __init__(self, channels: int, kernel_size: int, num_classes: int, first: bool, coarse: bool = False) -> None:
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
        self.cond_proj: nn.Conv2d | None = None
        if coarse:
            # Starts at zero: an existing prior warm-started with a new coarse condition
            # begins exactly where it was.
            self.cond_proj = nn.Conv2d(channels, 2 * channels, 1)
            nn.init.zeros_(self.cond_proj.weight)
            nn.init.zeros_(self.cond_proj.bias)

    def bias(self, labels: torch.Tensor | None, coarse: torch.Tensor | None) -> torch.Tensor | None:
        """What the conditions add inside the gates: [B, 2C, 1, 1] (class), [B, 2C, h, w] (coarse
        grid features) or None."""
        out = None
        if self.class_embed is not None and labels is not None:
            out = self.class_embed(labels)[:, :, None, None]
        if self.cond_proj is not None and coarse is not None:
            c = self.cond_proj(coarse)
            out = c if out is None else out + c
        return out

    def forward(self, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        p, w = self.pad, h.shape[3]
        cond = 0.0 if cond is None else cond
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0))) + cond
        h_pre = self.h_conv(F.pad(h, (p, 0, 0, 0)))[:, :, :, :w]
        h_pre = h_pre + self.v_to_h(shift_down(v_pre)) + cond
        h_new = self.h_out(gate(h_pre))
        if not self.first:
            h_new = h_new + h
        return gate(v_pre), h_new


class CoarseCondition(nn.Module):
    """Features of a coarse code grid [B, hc, wc], upsampled to the fine grid: [B, C, h, w]."""

    def __init__(self, num_codes: int, channels: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_codes, channels)
        self.mix = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        )

    def forward(self, coarse: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.embedding(coarse.long()).permute(0, 3, 1, 2)
        x = x + self.mix(x)
        # Each coarse code covers a factor x factor block of fine codes (same image, same frame).
        return F.interpolate(x, size=size, mode="nearest")


class ClassNameError(ValueError):
    """A class name the prior cannot condition on."""


class GatedPixelCNN(
    HubModel,
    library_name="lesionstudio",
    tags=["pixelcnn", "autoregressive", "vq-vae-prior", "dermoscopy", "isic"],
    license=WEIGHTS_LICENSE,
):
    """Autoregressive prior p(codes) = prod p(code[r, c] | codes before it in raster order [, class]).

    ``forward(codes [B, h, w], labels [B] | None, coarse [B, hc, wc] | None) -> logits [B, K, h, w]``.
    ``grid_size`` is the code grid it was trained for (it runs on any grid), ``class_names`` and
    ``class_counts`` describe the classes (for sampling across classes by training frequency).
    ``cond_num_codes`` / ``cond_grid_size`` (both 0 unless conditioned on a coarse grid) are the
    K and grid of the coarse VQ-VAE; a fine grid must be a whole multiple of the coarse one.
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
        cond_num_codes: int = 0,
        cond_grid_size: int = 0,
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
        self.cond_num_codes = check_int("cond_num_codes", cond_num_codes, minimum=0)
        self.cond_grid_size = check_int("cond_grid_size", cond_grid_size, minimum=0)
        if (cond_num_codes > 0) != (cond_grid_size > 0):
            raise ValueError("config values cond_num_codes and cond_grid_size must both be 0 or both be set")
        if cond_grid_size and (cond_grid_size >= grid_size or grid_size % cond_grid_size):
            raise ValueError(
                f"config value grid_size ({grid_size}) must be a larger multiple of cond_grid_size ({cond_grid_size})"
            )

        self.embedding = nn.Embedding(num_codes, channels)
        coarse = cond_num_codes > 0
        self.condition = CoarseCondition(cond_num_codes, channels) if coarse else None
        self.layers = nn.ModuleList(
            GatedLayer(channels, kernel_size, num_classes, first=(i == 0), coarse=coarse) for i in range(num_layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, num_codes, 1)
        )

    @property
    def hierarchical(self) -> bool:
        """Whether this prior needs the codes of a coarser grid (``coarse=``)."""
        return self.cond_num_codes > 0

    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise ValueError unless codes is a [B, h, w] grid of this prior's codes."""
        check_codes(codes, self.num_codes)

    def check_inputs(
        self, codes: torch.Tensor, labels: torch.Tensor | None, coarse: torch.Tensor | None = None
    ) -> None:
        self.check_codes(codes)
        if labels is not None:
            if self.num_classes == 0:
                raise ValueError("this prior is unconditional; pass labels=None")
            if labels.shape != (codes.shape[0],) or int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
                raise ValueError(f"labels must be [B] class ids in [0, {self.num_classes})")
        self.check_coarse(tuple(codes.shape), coarse)

    def check_coarse(self, shape: tuple[int, ...], coarse: torch.Tensor | None) -> None:
        """The coarse grid a [B, h, w] grid needs: None for a plain prior, else codes that tile it."""
        if not self.hierarchical:
            if coarse is not None:
                raise ValueError("this prior is not conditioned on a coarse grid; pass coarse=None")
            return
        if coarse is None:
            raise ValueError(
                f"this prior is conditioned on a {self.cond_grid_size}x{self.cond_grid_size} coarse code grid; "
                "pass coarse=[B, hc, wc] codes"
            )
        b, h, w = shape
        if coarse.ndim != 3 or coarse.shape[0] != b:
            raise ValueError(f"expected coarse codes [{b}, hc, wc], got shape {tuple(coarse.shape)}")
        hc, wc = coarse.shape[1:]
        if h % hc or w % wc or h // hc != w // wc:
            raise ValueError(f"a {h}x{w} grid is not a whole multiple of its {hc}x{wc} coarse grid")
        check_codes(coarse, self.cond_num_codes, "coarse codes")

    def coarse_features(self, coarse: torch.Tensor, size: tuple[int, int], guidance: float = 1.0) -> torch.Tensor:
        """The coarse grid's features at ``size``, scaled by ``guidance``: 1 is the prior as
        trained; above 1 every gate leans further toward what the coarse grid says, so a
        sample keeps its layout more closely (a sampling-time knob, like the temperature)."""
        if self.condition is None:
            raise ValueError("this prior is not conditioned on a coarse grid")
        feats = self.condition(coarse, size)
        return feats if guidance == 1.0 else feats * guidance

    def biases(
        self,
        labels: torch.Tensor | None,
        coarse: torch.Tensor | None,
        size: tuple[int, int],
        guidance: float = 1.0,
    ) -> list[torch.Tensor | None]:
        """Per layer, what the class and coarse-grid conditions add inside its gates."""
        feats = None if coarse is None or self.condition is None else self.coarse_features(coarse, size, guidance)
        return [layer.bias(labels, feats) for layer in self.layers]

    def forward(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor | None = None,
        coarse: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> torch.Tensor:
        self.check_inputs(codes, labels, coarse)
        x = self.embedding(codes.long()).permute(0, 3, 1, 2)
        v = h = x
        biases = self.biases(labels, coarse, codes.shape[1:], guidance)
        for layer, bias in zip(self.layers, biases, strict=True):
            v, h = layer(v, h, bias)
        return self.head(h)

    def class_label(self, name: str | None) -> int | None:
        """The label of a class name; None for "any" (or none), whose class is drawn by the
        training frequencies. Raises ClassNameError for a class this prior does not know."""
        if name in (None, "", "any"):
            return None
        if not self.num_classes:
            raise ClassNameError(f"this prior is unconditional: class {name!r} cannot be honoured; use any")
        if name not in self.class_names:
            raise ClassNameError(f"unknown class {name!r}; this prior knows {', '.join(self.class_names)} (or any)")
        return self.class_names.index(name)

    def class_probabilities(self) -> torch.Tensor:
        counts = torch.tensor(self.class_counts, dtype=torch.float64)
        return counts / counts.sum() if counts.sum() > 0 else torch.full_like(counts, 1 / len(counts))

    @torch.no_grad()
    def log_likelihood(
        self, codes: torch.Tensor, labels: torch.Tensor | None = None, coarse: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-position log p(code) in nats, shape [B, h, w]."""
        logits = self(codes, labels, coarse).float()
        return -F.cross_entropy(logits, codes.long(), reduction="none")

    @torch.no_grad()
    def grid_log_likelihoods(
        self, codes: torch.Tensor, labels: torch.Tensor | None = None, coarse: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p(grid) in nats: [B, 1] given the labels (or for an unconditional prior), else
        [B, num_classes], one column per class. Columns of two priors add up to a joint."""
        if self.num_classes and labels is None:
            per_class = []
            for c in range(self.num_classes):
                lab = torch.full((codes.shape[0],), c, dtype=torch.long, device=codes.device)
                per_class.append(self.log_likelihood(codes, lab, coarse).flatten(1).sum(1))
            return torch.stack(per_class, 1)
        return self.log_likelihood(codes, labels, coarse).flatten(1).sum(1, keepdim=True)

    def bits_from(self, totals: torch.Tensor, n: int) -> torch.Tensor:
        """Bits per code [B] from grid_log_likelihoods columns over n codes; several class
        columns are marginalised out at the training frequencies: p = sum_c p(c) p(. | c)."""
        if totals.shape[1] > 1:
            totals = totals + self.class_probabilities().to(totals.device).log().float()
        return -torch.logsumexp(totals, dim=1) / n / math.log(2)

    @torch.no_grad()
    def nll_bits(
        self, codes: torch.Tensor, labels: torch.Tensor | None = None, coarse: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Negative log-likelihood of each grid in bits per code, shape [B] (given the coarse
        grid, for a hierarchical prior; the class marginalised out when labels is None)."""
        return self.bits_from(self.grid_log_likelihoods(codes, labels, coarse), codes[0].numel())
