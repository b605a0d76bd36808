"""Nearest-neighbour search between feature rows, and the distance ratio below which a generated
image counts as a possible copy of a training image (README, "Memorisation")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below the held-out real images' lowest ratios and above those of flipped, turned or re-saved
# copies of training images.
DEFAULT_THRESHOLD = 0.25


@dataclass
class Neighbours:
    index: torch.Tensor  # [Q] nearest training image per query
    distance: torch.Tensor  # [Q]


def nearest(
    queries: torch.Tensor, train: torch.Tensor, exclude: torch.Tensor | None = None, chunk: int = 256
) -> Neighbours:
    """Nearest training row for each query; queries [Q, F] or [Q, V, F] (V orientations: the
    smallest distance over them counts), train [N, F]. Euclidean distance. ``exclude`` [Q]: a
    training row each query may not match (itself, for leave-one-out distances)."""
    if queries.ndim == 2:
        queries = queries[:, None]
    idx, dist = [], []
    train = train.float()
    for s in range(0, len(queries), chunk):
        q = queries[s : s + chunk].float()
        d = torch.cdist(q.reshape(-1, q.shape[-1]), train).view(q.shape[0], q.shape[1], -1)
        d = d.min(dim=1).values  # best orientation per training image
        if exclude is not None:
            d[torch.arange(len(q)), exclude[s : s + chunk]] = float("inf")
        best = d.min(dim=1)
        idx.append(best.indices)
        dist.append(best.values)
    return Neighbours(torch.cat(idx), torch.cat(dist))
