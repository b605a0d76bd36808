"""Teacher-forced draws: codes a prior could put in a real image's grid, given its real context.

One forward pass of a prior over a real code grid gives, at every position, its distribution
given the real codes before it (and the real coarse grid, for a hierarchical prior). A draw from
each of those is what the prior would write there if everything before were real. Mixing such
draws into the real grid at a share of positions gives codes the prior could draw, paired with
the real image: the decoder's training pairs in ``train.decoder``, and the "decoded teacher-forced
draws" calibration row of the realism yardstick.
"""

from __future__ import annotations

import torch

from ..models.pixelcnn import GatedPixelCNN


@torch.no_grad()
def teacher_forced_draws(
    prior: GatedPixelCNN,
    codes: torch.Tensor,
    labels: torch.Tensor | None = None,
    coarse: torch.Tensor | None = None,
    draws: int = 1,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``draws`` independent draws [draws, B, h, w] (int64) at every position of real ``codes``
    [B, h, w], each from the prior's softmax given the real codes before it."""
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if prior.num_classes and labels is None:
        raise ValueError("a class-conditional prior draws given labels (see likeliest_classes)")
    logits = prior(codes, labels, coarse).float() / temperature  # [B, K, h, w]
    probs = torch.softmax(logits.permute(0, 2, 3, 1).reshape(-1, prior.num_codes), dim=1)
    picked = torch.multinomial(probs, draws, replacement=True, generator=generator)  # [B*h*w, draws]
    return picked.t().reshape(draws, *codes.shape)


@torch.no_grad()
def likeliest_classes(prior: GatedPixelCNN, codes: torch.Tensor, coarse: torch.Tensor | None = None) -> torch.Tensor:
    """For grids without labels: the class [B] under which a class-conditional prior finds each
    grid most likely (what to condition its teacher-forced draws on)."""
    if not prior.num_classes:
        raise ValueError("this prior is unconditional: it has no classes")
    return prior.grid_log_likelihoods(codes, None, coarse).argmax(1)


def mix_codes(
    real: torch.Tensor, drawn: torch.Tensor, share: torch.Tensor | float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Real codes [B, h, w] with a random ``share`` of positions (a float, or one per grid [B])
    taken from ``drawn`` [B, h, w]."""
    share = torch.as_tensor(share, dtype=torch.float32).reshape(-1, 1, 1)
    if (share < 0).any() or (share > 1).any():
        raise ValueError("share must be in [0, 1]")
    if real.shape != drawn.shape:
        raise ValueError(f"real and drawn codes differ in shape: {tuple(real.shape)} vs {tuple(drawn.shape)}")
    pick = torch.rand(real.shape, generator=generator) < share
    return torch.where(pick.to(real.device), drawn.to(real.dtype), real)
