"""What post-training a decoder adversarially needs: a PatchGAN discriminator and its losses.

The discriminator is pix2pix's (Isola et al. 2017) N-layer PatchGAN, trained from scratch with
VQGAN's hinge loss (Esser et al. 2021); its features also give pix2pixHD's feature-matching loss.
It is a training tool only: nothing ships it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from lesionstudio.models.critic import HighPass


class PatchDiscriminator(nn.Module):
    """A logit per overlapping patch (70 px receptive field with 3 layers) of images in [0, 1].

    ``highpass``: it sees each image beside its amplified fine detail (``critic.HighPass``) and
    is kept stable by spectral norm instead of GroupNorm, which would divide out the very energy
    of fine detail that a smooth or speckled rendering lacks or overdoes."""

    def __init__(self, channels: int = 32, num_layers: int = 3, highpass: bool = False) -> None:
        super().__init__()
        self.highpass = HighPass() if highpass else None
        in_channels = 6 if highpass else 3
        blocks: list[nn.Module] = [nn.Sequential(self._conv(in_channels, channels, 2), nn.LeakyReLU(0.2))]
        ch = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            # GroupNorm, not BatchNorm: real and fake batches are judged apart, and batch
            # statistics would tell them apart by themselves.
            norm = nn.Identity() if highpass else nn.GroupNorm(8, out)
            blocks.append(nn.Sequential(self._conv(ch, out, stride), norm, nn.LeakyReLU(0.2)))
            ch = out
        self.blocks = nn.ModuleList(blocks)
        self.head = self._conv(ch, 1, 1)

    def _conv(self, ch_in: int, ch_out: int, stride: int) -> nn.Module:
        conv = nn.Conv2d(ch_in, ch_out, 4, stride, 1)
        return spectral_norm(conv) if self.highpass is not None else conv

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every block's activations, then the patch logits last."""
        x = images - 0.5 if self.highpass is None else self.highpass(images)
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        out.append(self.head(x))
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)[-1]


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def feature_matching(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """Mean L1 between the discriminator's features of paired fake and real images (logits left out)."""
    return sum(F.l1_loss(f, r.detach()) for f, r in zip(fake[:-1], real[:-1], strict=True)) / (len(fake) - 1)


def adaptive_weight(
    reconstruction: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor, limit: float = 1e4
) -> torch.Tensor:
    """VQGAN's balance: the ratio of the two losses' gradient norms at the decoder's last layer,
    so the adversarial term pulls as hard as the reconstruction does whatever their scales."""
    rec_grad = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, limit).detach()
