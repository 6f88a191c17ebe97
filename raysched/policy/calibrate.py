"""Calibration and scoring of upper bounds. Pure: numpy only.

Split-conformal calibration: on held-out runs, the score of a run is how far its
true use sits above the model's upper quantile, in log space (memory errors are
multiplicative).  The ``ceil((n + 1) * coverage) / n`` empirical quantile of the
scores is the offset that makes the upper bound cover a new exchangeable run with
probability at least ``coverage``.  Coverage is then measured, not assumed, on
runs the offset was not fitted on (``cross_conformal``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_TINY = 1e-6  # floor before taking logs: far below any byte count, second or core share we see


def log_values(values: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(values, dtype=float), _TINY))


def conformal_offset(scores: np.ndarray, coverage: float) -> float:
    """The split-conformal offset for ``scores = log(true) - log(upper)``.

    With too few scores for the level (n < 1/(1-coverage) - 1) the finite-sample
    quantile is infinite; we then take the largest score plus its spread, which is
    conservative without refusing to answer.
    """
    scores = np.asarray(scores, dtype=float)
    scores = scores[np.isfinite(scores)]
    n = scores.shape[0]
    if n == 0:
        return 0.0
    # The k-th smallest score.  The product is rounded off first: in floating point
    # 25 x 0.56 is 14.000000000000002, whose ceiling took the 15th score of 24.
    k = math.ceil(round((n + 1) * coverage, 9))
    if k > n:
        spread = float(np.std(scores)) if n > 1 else 0.0
        return float(np.max(scores) + spread)
    return float(np.partition(scores, k - 1)[k - 1])


def coverage(true: np.ndarray, upper: np.ndarray) -> float:
    """Share of runs whose true use is at or below the upper bound."""
    true, upper = np.asarray(true, dtype=float), np.asarray(upper, dtype=float)
    if true.size == 0:
        return math.nan
    return float(np.mean(true <= upper))


def pinball_loss(true: np.ndarray, predicted: np.ndarray, alpha: float) -> float:
    """Mean quantile (pinball) loss of ``predicted`` as the ``alpha`` quantile of ``true``."""
    diff = np.asarray(true, dtype=float) - np.asarray(predicted, dtype=float)
    return float(np.mean(np.maximum(alpha * diff, (alpha - 1.0) * diff)))


@dataclass(frozen=True)
class AllocationScore:
    """How an upper bound would have done as an allocation on real runs."""

    coverage: float  # share of runs it covered
    mean_over_allocation: float  # mean (allocation - use) / use over covered runs
    under_allocation_rate: float  # share of runs it did not cover: failed attempts

    def as_metrics(self) -> dict[str, float]:
        return {
            "upper_coverage": self.coverage,
            "mean_over_allocation": self.mean_over_allocation,
            "under_allocation_rate": self.under_allocation_rate,
        }


def score_allocation(true: np.ndarray, allocation: np.ndarray) -> AllocationScore:
    true = np.maximum(np.asarray(true, dtype=float), _TINY)
    allocation = np.asarray(allocation, dtype=float)
    if true.size == 0:
        return AllocationScore(math.nan, math.nan, math.nan)
    covered = true <= allocation
    over = (allocation[covered] - true[covered]) / true[covered]
    return AllocationScore(
        coverage=float(np.mean(covered)),
        mean_over_allocation=float(np.mean(over)) if over.size else math.nan,
        under_allocation_rate=float(np.mean(~covered)),
    )


def cross_conformal(scores: np.ndarray, coverage_target: float) -> tuple[float, float]:
    """(offset fitted on all scores, coverage measured out-of-sample).

    The measured coverage comes from two folds: the offset fitted on the older half
    is tested on the newer half and vice versa, so the reported figure is what a
    user would have seen, not the in-sample guarantee.
    """
    scores = np.asarray(scores, dtype=float)
    scores = scores[np.isfinite(scores)]
    offset = conformal_offset(scores, coverage_target)
    n = scores.shape[0]
    if n < 4:
        return offset, math.nan
    half = n // 2
    a, b = scores[:half], scores[half:]
    hits = np.concatenate([b <= conformal_offset(a, coverage_target), a <= conformal_offset(b, coverage_target)])
    return offset, float(np.mean(hits))
