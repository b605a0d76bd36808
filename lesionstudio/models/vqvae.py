"""VQ-VAE: residual encoder, vector-quantised codebook, decoder.

Loss = MSE reconstruction + codebook loss + beta x commitment loss (beta = 0.25). The codebook
can be learned by that loss or, more stably, by exponential moving averages (EMA) of the encoder
outputs assigned to each code; codes unused for a while are restarted on encoder outputs, and
the codebook can start from encoder outputs, the remedies for codebook collapse.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .hubmodel import WEIGHTS_LICENSE, HubModel, check_float, check_int


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with a straight-through gradient.

    ``forward(z)`` takes encoder outputs [B, D, H, W] and returns the quantised tensor (whose
    gradient flows straight to z), the code indices [B, H, W] and a dict of losses and
    statistics. Usage is exposed as ``cluster_size`` (an EMA of how many vectors each code
    receives per batch) and ``dead_codes()``.
    """

    def __init__(
        self,
        num_codes: int = 512,
        code_dim: int = 64,
        beta: float = 0.25,
        use_ema: bool = True,
        ema_decay: float = 0.99,
        eps: float = 1e-5,
        restart_dead_codes: bool = True,
        dead_code_threshold: float = 1.0,
        init_from_data: bool = True,
    ) -> None:
        super().__init__()
        self.num_codes = check_int("num_codes", num_codes, minimum=2)
        self.code_dim = check_int("code_dim", code_dim, minimum=1)
        self.beta = check_float("beta", beta, 0.0, 100.0)
        self.use_ema = bool(use_ema)
        self.ema_decay = check_float("ema_decay", ema_decay, 0.0, 0.99999)
        self.eps = eps
        self.restart_dead_codes = bool(restart_dead_codes)
        self.dead_code_threshold = check_float("dead_code_threshold", dead_code_threshold, 0.0, 1e9)
        self.init_from_data = bool(init_from_data)

        embedding = torch.empty(num_codes, code_dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if self.use_ema:
            # The EMA codebook is not learned by gradient, so it is a buffer.
            self.register_buffer("embedding", embedding)
            self.register_buffer("ema_embed_sum", embedding.clone())
        else:
            self.embedding = nn.Parameter(embedding)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("initialized", torch.tensor(not self.init_from_data))

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.detach()

    def dead_codes(self) -> torch.Tensor:
        """Indices of the codes whose EMA usage fell below the restart threshold."""
        return torch.nonzero(self.cluster_size < self.dead_code_threshold).flatten()

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for indices [B, H, W], as [B, D, H, W]."""
        return F.embedding(indices, self.embedding).permute(0, 3, 1, 2)

    def nearest(self, flat: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean) for each row of flat [N, D]."""
        emb = self.embedding.float()
        emb_sq = emb.pow(2).sum(1)
        # |x|^2 is the same for every code of a row, so |e|^2 - 2 x.e ranks them; in chunks of
        # rows, since a 128x128 grid's distances to every code would not stay in cache.
        return torch.cat([torch.addmm(emb_sq, part.float(), emb.t(), alpha=-2).argmin(1) for part in flat.split(chunk)])

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        b, d, h, w = z.shape
        if d != self.code_dim:
            raise ValueError(f"expected {self.code_dim} channels, got {d}")
        z = z.float()  # distances and EMA statistics in float32, also under autocast
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.training and not bool(self.initialized):
            self._init_from(flat.detach())
        indices = self.nearest(flat.detach())
        quantized = F.embedding(indices, self.embedding)

        codebook_loss = F.mse_loss(quantized, flat.detach())
        commitment_loss = F.mse_loss(flat, quantized.detach())
        counts = torch.bincount(indices, minlength=self.num_codes).float()
        if self.training:
            self._update(flat.detach(), indices, counts)

        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        stats = {
            "codebook": codebook_loss,
            "commitment": commitment_loss,
            "perplexity": perplexity,
            "codes_used": (counts > 0).sum().float(),
        }
        quantized = quantized.view(b, h, w, d).permute(0, 3, 1, 2)
        quantized_st = z + (quantized - z).detach()  # straight-through estimator
        return quantized_st, indices.view(b, h, w), stats

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        """Start the codebook from random encoder outputs (with replacement if too few)."""
        n = flat.shape[0]
        pick = torch.randperm(n, device=flat.device)[: self.num_codes]
        if n < self.num_codes:
            pick = torch.randint(0, n, (self.num_codes,), device=flat.device)
        new = flat[pick].clone()
        if n < self.num_codes:
            new += 1e-3 * flat.std() * torch.randn_like(new)
        self._broadcast(new)
        self.embedding.data.copy_(new)
        if self.use_ema:
            self.ema_embed_sum.copy_(new)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        embed_sum = torch.zeros_like(self.embedding, dtype=torch.float32).index_add_(0, indices, flat)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(embed_sum)
        decay = self.ema_decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        if self.use_ema:
            self.ema_embed_sum.mul_(decay).add_(embed_sum, alpha=1 - decay)
            # Laplace smoothing keeps codes with no assignments from dividing by zero.
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
            self.embedding.copy_(self.ema_embed_sum / smoothed[:, None])
        if self.restart_dead_codes:
            self._restart(flat)

    @torch.no_grad()
    def _restart(self, flat: torch.Tensor) -> None:
        dead = self.dead_codes()
        if dead.numel() == 0:
            return
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        new = flat[pick].clone()
        self._broadcast(new)  # every rank restarts the same codes on the same vectors
        self.embedding.data[dead] = new
        if self.use_ema:
            self.ema_embed_sum[dead] = new
        self.cluster_size[dead] = 1.0

    @staticmethod
    def _broadcast(t: torch.Tensor) -> None:
        if _distributed():
            dist.broadcast(t, src=0)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _stage_channels(hidden: int, n_down: int) -> list[int]:
    """Channels after each stride-2 stage: widening to `hidden` at the coarsest resolution."""
    return [max(hidden // 2 ** (n_down - 1 - i), 16) for i in range(n_down)]


class Encoder(nn.Module):
    """Stride-2 4x4 convolutions down to the code grid, then residual blocks, then 1x1 to D."""

    def __init__(
        self, in_channels: int, hidden: int, res_hidden: int, num_res_blocks: int, n_down: int, code_dim: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch_in = in_channels
        for ch in _stage_channels(hidden, n_down):
            layers += [nn.Conv2d(ch_in, ch, 4, stride=2, padding=1), nn.ReLU()]
            ch_in = ch
        layers.append(nn.Conv2d(ch_in, hidden, 3, padding=1))
        layers += [ResidualBlock(hidden, res_hidden) for _ in range(num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(hidden, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Mirror of the encoder: 3x3 from D, residual blocks, stride-2 transposed convolutions.

    ``upsample_res_blocks`` residual blocks follow each upsampling stage but the last: capacity at
    the finer resolutions, where a lone transposed convolution can only interpolate the fine detail.
    """

    def __init__(
        self,
        out_channels: int,
        hidden: int,
        res_hidden: int,
        num_res_blocks: int,
        n_down: int,
        code_dim: int,
        upsample_res_blocks: int = 0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(code_dim, hidden, 3, padding=1)]
        layers += [ResidualBlock(hidden, res_hidden) for _ in range(num_res_blocks)]
        layers.append(nn.ReLU())
        chans = _stage_channels(hidden, n_down)[::-1]  # hidden first, narrowing towards the image
        for i, ch in enumerate(chans):
            ch_out = chans[i + 1] if i + 1 < len(chans) else out_channels
            layers.append(nn.ConvTranspose2d(ch, ch_out, 4, stride=2, padding=1))
            if i + 1 < len(chans):
                layers.append(nn.ReLU())
                layers += [ResidualBlock(ch_out, max(ch_out // 2, 8)) for _ in range(upsample_res_blocks)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def check_codes(codes: torch.Tensor, num_codes: int, what: str = "codes") -> None:
    """Raise ValueError unless codes is a [B, h, w] grid of code indices in [0, num_codes)."""
    if codes.ndim != 3:
        raise ValueError(f"expected {what} [B, h, w], got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
        raise ValueError(f"{what} must be in [0, {num_codes}), got [{int(codes.min())}, {int(codes.max())}]")


class VQVAE(
    HubModel,
    library_name="lesionstudio",
    tags=["vq-vae", "dermoscopy", "skin-lesion", "isic"],
    license=WEIGHTS_LICENSE,
):
    """VQ-VAE for RGB images in [0, 1]; ``downsample`` sets the code grid (256 px / 4 = 64x64).

    The constructor arguments are the whole config (saved to config.json by save_pretrained).
    """

    def __init__(
        self,
        in_channels: int = 3,
        hidden_channels: int = 128,
        res_channels: int = 64,
        num_res_blocks: int = 2,
        downsample: int = 4,
        num_codes: int = 512,
        code_dim: int = 64,
        beta: float = 0.25,
        use_ema: bool = True,
        ema_decay: float = 0.99,
        restart_dead_codes: bool = True,
        dead_code_threshold: float = 1.0,
        init_from_data: bool = True,
        image_size: int = 256,
        upsample_res_blocks: int = 0,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        check_int("hidden_channels", hidden_channels, minimum=8)
        check_int("res_channels", res_channels, minimum=1)
        check_int("num_res_blocks", num_res_blocks, minimum=0)
        check_int("upsample_res_blocks", upsample_res_blocks, minimum=0)
        check_int("downsample", downsample, choices=(2, 4, 8, 16))
        check_int("image_size", image_size, minimum=downsample)
        if image_size % downsample:
            raise ValueError(f"image_size {image_size} is not a multiple of downsample {downsample}")
        self.image_size = image_size
        self.downsample = downsample
        n_down = int(math.log2(downsample))
        self.encoder = Encoder(in_channels, hidden_channels, res_channels, num_res_blocks, n_down, code_dim)
        self.quantizer = VectorQuantizer(
            num_codes=num_codes,
            code_dim=code_dim,
            beta=beta,
            use_ema=use_ema,
            ema_decay=ema_decay,
            restart_dead_codes=restart_dead_codes,
            dead_code_threshold=dead_code_threshold,
            init_from_data=init_from_data,
        )
        self.decoder = Decoder(
            in_channels, hidden_channels, res_channels, num_res_blocks, n_down, code_dim, upsample_res_blocks
        )

    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    @property
    def code_dim(self) -> int:
        return self.quantizer.code_dim

    @property
    def latent_size(self) -> int:
        """Side of the code grid for an image of ``image_size`` pixels."""
        return self.image_size // self.downsample

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.encoder.net[0].in_channels:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(f"image sides must be multiples of {self.downsample}, got {tuple(images.shape)}")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction of images in [0, 1] and a dict of losses and statistics.

        ``stats["loss"]`` = reconstruction + codebook + beta x commitment. With an EMA codebook
        the codebook term carries no gradient (the EMA moves the codes) but is still reported.
        """
        self._check_images(images)
        z = self.encoder(images - 0.5)
        quantized, _, stats = self.quantizer(z)
        recon = self.decoder(quantized) + 0.5
        stats["reconstruction"] = F.mse_loss(recon.float(), images.float())
        stats["loss"] = stats["reconstruction"] + stats["codebook"] + self.quantizer.beta * stats["commitment"]
        return recon, stats

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Code indices [B, h, w] for images [B, 3, H, W] in [0, 1]."""
        self._check_images(images)
        z = self.encoder(images - 0.5).float()
        b, d, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, chunk: int = 4) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] for code indices [B, h, w], decoded ``chunk`` at a time:
        the full-resolution activations of a large batch would hold gigabytes at once."""
        check_codes(codes, self.num_codes)
        parts = [self.decoder(self.quantizer.lookup(c.long())) for c in codes.split(chunk)]
        return (torch.cat(parts) + 0.5).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction in [0, 1], codes) for images in [0, 1]."""
        codes = self.encode(images)
        return self.decode_codes(codes), codes
