"""A decoder of its own: code grid -> image, for a VQ-VAE whose encoder and codebook it leaves alone.

A VQ-VAE's decoder only ever saw the encoder's codes. A prior draws other codes, often equally
likely alternatives (the codebook has many codes for one colour), which that decoder renders as
mottled noise. A ``CodeDecoder`` is a copy of the decoder post-trained on such codes (see
``train.decoder``) and shipped as its own folder (``decoder-{latent}/``): it holds the VQ-VAE's
codebook, checked bit for bit at load, so every prior, critic and cached code grid of that VQ-VAE
stays valid, and the VQ-VAE's own (faithful) decoder stays loadable beside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .hubmodel import WEIGHTS_LICENSE, CheckpointError, HubModel, check_int
from .vqvae import VQVAE, Decoder, check_codes

OBJECTIVES = ("mse", "adversarial")  # how a decoder was trained: the VQ-VAE's own loss, or train.decoder's


class CodeDecoder(
    HubModel,
    library_name="lesionstudio",
    tags=["vq-vae", "decoder", "dermoscopy", "skin-lesion", "isic"],
    license=WEIGHTS_LICENSE,
):
    """Images [B, 3, H, W] in [0, 1] from code indices [B, h, w] of one VQ-VAE's codebook.

    The architecture arguments are those of ``VQVAE`` (so its decoder's weights load as they are);
    ``objective`` says which decoder the folder holds.
    """

    def __init__(
        self,
        num_codes: int = 512,
        code_dim: int = 64,
        hidden_channels: int = 128,
        res_channels: int = 64,
        num_res_blocks: int = 2,
        downsample: int = 4,
        upsample_res_blocks: int = 0,
        image_size: int = 256,
        out_channels: int = 3,
        objective: str = "mse",
    ) -> None:
        super().__init__()
        check_int("num_codes", num_codes, minimum=2)
        check_int("code_dim", code_dim, minimum=1)
        check_int("downsample", downsample, choices=(2, 4, 8, 16))
        check_int("image_size", image_size, minimum=downsample)
        if objective not in OBJECTIVES:
            raise ValueError(f"config value objective must be one of {OBJECTIVES}, got {objective!r}")
        self.objective = objective
        self.image_size = image_size
        self.downsample = downsample
        self.register_buffer("codebook", torch.zeros(num_codes, code_dim))
        n_down = int(math.log2(downsample))
        self.decoder = Decoder(
            out_channels, hidden_channels, res_channels, num_res_blocks, n_down, code_dim, upsample_res_blocks
        )

    @classmethod
    def from_vqvae(cls, vq: VQVAE, objective: str = "mse", num_res_blocks: int | None = None) -> CodeDecoder:
        """A copy of a VQ-VAE's decoder and codebook (the start of post-training). With more
        ``num_res_blocks`` than the VQ-VAE's decoder has, the extra blocks (after its own, at the
        code grid's resolution: a wider view of the codes) start with a zero last convolution,
        so the copy still decodes exactly as the VQ-VAE does."""
        c = vq.config
        own = c.get("num_res_blocks", 2)
        blocks = own if num_res_blocks is None else num_res_blocks
        if blocks < own:
            raise ValueError(f"num_res_blocks must be at least the VQ-VAE decoder's {own}, got {blocks}")
        model = cls(
            num_codes=vq.num_codes,
            code_dim=vq.code_dim,
            hidden_channels=c.get("hidden_channels", 128),
            res_channels=c.get("res_channels", 64),
            num_res_blocks=blocks,
            downsample=vq.downsample,
            upsample_res_blocks=c.get("upsample_res_blocks", 0),
            image_size=vq.image_size,
            out_channels=c.get("in_channels", 3),
            objective=objective,
        )
        model.codebook.copy_(vq.quantizer.codebook)
        old, new = list(vq.decoder.net), list(model.decoder.net)
        extra = blocks - own
        for layer in new[1 + own : 1 + blocks]:  # the added blocks, after the first conv and the old ones
            nn.init.zeros_(layer.block[-1].weight)
            nn.init.zeros_(layer.block[-1].bias)
        for src, dst in zip(old, new[: 1 + own] + new[1 + own + extra :], strict=True):
            dst.load_state_dict(src.state_dict())
        return model

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    def check_fits(self, vq: VQVAE, where: str = "decoder") -> None:
        """Raise CheckpointError unless this decoder reads the codes of ``vq`` (same codebook, bit for bit)."""
        if self.latent_size != vq.latent_size or self.num_codes != vq.num_codes:
            raise CheckpointError(
                f"{where} decodes {self.num_codes} codes on a {self.latent_size}x{self.latent_size} grid; "
                f"the VQ-VAE has {vq.num_codes} on {vq.latent_size}x{vq.latent_size}"
            )
        if not torch.equal(self.codebook.cpu(), vq.quantizer.codebook.cpu()):
            raise CheckpointError(f"{where} was trained for another codebook than this VQ-VAE's")

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (unclamped, for training) for code indices [B, h, w]."""
        return self.decoder(F.embedding(codes.long(), self.codebook).permute(0, 3, 1, 2)) + 0.5

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, chunk: int = 4) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1], ``chunk`` grids at a time (as ``VQVAE.decode_codes``)."""
        check_codes(codes, self.num_codes)
        return torch.cat([self(c) for c in codes.split(chunk)]).clamp(0, 1)
