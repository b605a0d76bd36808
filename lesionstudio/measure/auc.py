"""ROC AUC of classifier scores, and its bootstrap 95% interval over test images and training seeds.

The AUC is the Mann-Whitney statistic: the share of (positive, negative) pairs the scores order
correctly, ties counting a half. One pair table per training seed makes a bootstrap replicate a
pair of matrix products: each replicate resamples the positives and the negatives apart (so both
classes keep their counts) and the seeds, and the same resample serves every arm compared, which
pairs their difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """An estimate with its bootstrap 95% interval."""

    estimate: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"estimate": round(self.estimate, 4), "low": round(self.low, 4), "high": round(self.high, 4)}

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def pair_wins(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """[..., P, Q]: 1 where positive p scores above negative q, 0.5 on a tie, else 0."""
    p = np.asarray(positive, dtype=np.float64)[..., :, None]
    q = np.asarray(negative, dtype=np.float64)[..., None, :]
    return (p > q) + 0.5 * (p == q)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` [N] for binary ``labels`` [N] (1: positive)."""
    scores, labels = _checked(scores, labels)
    return float(pair_wins(scores[labels], scores[~labels]).mean())


@dataclass(frozen=True)
class Resamples:
    """Bootstrap replicates, shared by every arm so that their differences are paired:
    multiplicities of each positive [B, P], negative [B, Q] and training seed [B, S]."""

    positive: np.ndarray
    negative: np.ndarray
    seeds: np.ndarray

    @classmethod
    def draw(cls, labels: np.ndarray, num_seeds: int, replicates: int = 2000, seed: int = 0) -> Resamples:
        labels = np.asarray(labels).astype(bool)
        if num_seeds < 1 or replicates < 1:
            raise ValueError("need at least one training seed and one replicate")
        rng = np.random.default_rng(seed)

        def counts(n: int) -> np.ndarray:
            return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)

        return cls(counts(int(labels.sum())), counts(int((~labels).sum())), counts(num_seeds))

    def aucs(self, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[B]: each replicate's AUC, the mean over its resampled seeds, of ``scores`` [S, N]."""
        scores, labels = np.atleast_2d(scores), np.asarray(labels).astype(bool)
        if scores.shape[0] != self.seeds.shape[1]:
            raise ValueError(f"scores hold {scores.shape[0]} seeds, the resamples {self.seeds.shape[1]}")
        per_seed = np.empty((len(self.seeds), len(scores)))
        norm = self.positive.shape[1] * self.negative.shape[1]
        for s, row in enumerate(scores):
            wins = pair_wins(row[labels], row[~labels])
            per_seed[:, s] = np.einsum("bp,pq,bq->b", self.positive, wins, self.negative, optimize=True) / norm
        return (per_seed * self.seeds).sum(1) / self.seeds.shape[1]


def mean_auc(scores: np.ndarray, labels: np.ndarray, resamples: Resamples) -> Interval:
    """The mean AUC over training seeds of ``scores`` [S, N], with its 95% interval."""
    scores, labels = _checked(scores, labels)
    estimate = float(np.mean([auc(row, labels) for row in scores]))
    return _interval(estimate, resamples.aucs(scores, labels))


def auc_difference(scores: np.ndarray, baseline: np.ndarray, labels: np.ndarray, resamples: Resamples) -> Interval:
    """Mean AUC of ``scores`` minus that of ``baseline`` (both [S, N], seed s of one paired with
    seed s of the other), with the 95% interval of the paired difference."""
    scores, labels = _checked(scores, labels)
    baseline, _ = _checked(baseline, labels)
    if scores.shape != baseline.shape:
        raise ValueError(f"paired arms need the same seeds and images, got {scores.shape} and {baseline.shape}")
    estimate = float(np.mean([auc(a, labels) - auc(b, labels) for a, b in zip(scores, baseline, strict=True)]))
    return _interval(estimate, resamples.aucs(scores, labels) - resamples.aucs(baseline, labels))


def per_seed(scores: np.ndarray, labels: np.ndarray) -> list[float]:
    """Each training seed's AUC."""
    scores, labels = _checked(scores, labels)
    return [auc(row, labels) for row in scores]


def _interval(estimate: float, replicates: np.ndarray) -> Interval:
    low, high = np.percentile(replicates, [2.5, 97.5])
    return Interval(estimate, float(low), float(high))


def _checked(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    labels = labels.astype(bool)
    if scores.shape[-1] != len(labels):
        raise ValueError(f"{scores.shape[-1]} scores for {len(labels)} labels")
    if labels.all() or not labels.any():
        raise ValueError("AUC needs both classes among the test images")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores, labels
