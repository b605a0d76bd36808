"""The downstream benchmark's benign/malignant classifier: one small CNN trained from scratch.

Every arm of the benchmark trains it the same way (``ClassifierDesign``: architecture, steps,
batch, augmentations); only the training images differ. It is sized for a CPU: a fixed number of
steps whatever the training set's size, so a larger set is seen fewer times, not for longer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..data import dihedral_variant


@dataclass(frozen=True)
class ClassifierDesign:
    size: int = 64  # images are downscaled to size x size
    channels: int = 16  # of the first block; each later block doubles it
    blocks: int = 4
    convs: int = 2  # per block, the last one striding
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    dropout: float = 0.2
    shift: int = 4  # random translation, in pixels (reflect-padded), besides the 8 flips and rotations
    test_views: int = 8  # dihedral views averaged per test image

    def as_dict(self) -> dict:
        return asdict(self)


class LesionClassifier(nn.Module):
    """Conv-BN-ReLU blocks, each halving the side, then global average pooling and one logit."""

    def __init__(self, channels: int = 16, blocks: int = 4, convs: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for b in range(blocks):
            c_out = channels * 2**b
            for i in range(convs):
                stride = 2 if i == convs - 1 else 1
                layers += [
                    nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B] of images [B, 3, H, W] in [0, 1] (positive: malignant)."""
        h = self.features(x * 2 - 1).mean((-2, -1))
        return self.head(self.dropout(h)).squeeze(-1)


def augment(images: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image of a float batch [B, 3, S, S] flipped/rotated (one of 8, its own), then the batch
    shifted by one random offset of up to ``shift`` px (reflect-padded)."""
    views = torch.randint(0, 8, (len(images),), generator=gen)
    out = images.clone()
    for k in views.unique().tolist():
        pick = views == k
        out[pick] = dihedral_variant(images[pick], k)
    if shift:
        side = images.shape[-1]
        padded = F.pad(out, (shift,) * 4, mode="reflect")
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
        out = padded[..., dy : dy + side, dx : dx + side]
    return out


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, design: ClassifierDesign, seed: int
) -> LesionClassifier:
    """A classifier trained on uint8 images [N, 3, S, S] with labels [N] (1: malignant); each
    batch is drawn class-balanced, so a set's class mix does not bias it."""
    labels = labels.long()
    by_class = [torch.nonzero(labels == c).flatten() for c in (0, 1)]
    if min(len(i) for i in by_class) < 1:
        raise ValueError("the classifier needs training images of both classes")
    if images.shape[-1] != design.size:
        raise ValueError(f"images are {images.shape[-1]} px, the design's {design.size}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LesionClassifier(design.channels, design.blocks, design.convs, design.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=design.lr, weight_decay=design.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=design.lr, total_steps=design.steps)
    half = design.batch_size // 2
    target = torch.cat([torch.zeros(half), torch.ones(design.batch_size - half)])
    model.train()
    for _ in range(design.steps):
        pick = torch.cat(
            [
                by_class[0][torch.randint(0, len(by_class[0]), (half,), generator=gen)],
                by_class[1][torch.randint(0, len(by_class[1]), (design.batch_size - half,), generator=gen)],
            ]
        )
        x = augment(images[pick].float() / 255, design.shift, gen)
        loss = F.binary_cross_entropy_with_logits(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def malignancy_scores(
    model: LesionClassifier, images: torch.Tensor, views: int = 8, batch_size: int = 256
) -> torch.Tensor:
    """Scores [N] of uint8 images: the logit averaged over the first ``views`` dihedral views."""
    if not 1 <= views <= 8:
        raise ValueError(f"views must be in [1, 8], got {views}")
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = images[s : s + batch_size].float() / 255
        out.append(torch.stack([model(dihedral_variant(x, k)) for k in range(views)]).mean(0))
    return torch.cat(out)
