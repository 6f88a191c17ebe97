"""When a function's use shifts, size it from the runs since the shift.

The estimators weigh every run of the history window (2,000 runs) alike.  When a
function's use changes without a code change (its data grew, a library was
upgraded, a cache went cold), the old runs kept deciding for a long time: after a
halving, memory and CPU stayed ~2x over-allocated for ~2,000 calls; after a
doubling, every call lost an attempt to the memory killer for tens to hundreds of
calls, and the XGBoost model's CPU and wall bounds lagged as long (audit, twentieth
session).  The Kubernetes VPA recommender forgets with a decaying histogram (a
24 h half-life); a batch function has no clock that fits every workload, so this
looks for the shift itself.

``runs_since_shift`` finds the newest level shift of a resource's use in the time
order of the runs: one change point by the standardized CUSUM of signs of the runs' residuals
(log use, less the isotonic curve of use on input size, less
each tag set's median: a change in which inputs or tags arrive is not a shift),
accepted when at least ``min_runs`` runs lie on each side, the sign test's z is at
least ``min_score``, and their medians differ by at least ``min_log`` and
``noise_multiple`` times the residuals' robust spread, and placed where each side
lies closest to its own median (``_refined``);
then again within the runs after it, so that the newest of several shifts wins.
Runs killed for memory count at their bumped sample, a lower bound that is
already above the old level when use grew.

``SinceShift`` hands its inner estimator those runs only, and sets aside a model
that learnt from more runs than the function has made since the shift: it was
trained, at least in part, on the old level (the profiler trains new ones on the
runs since the shift, ``policy.models.fit_resource_model``).

Pure: imports neither ray, mlflow nor pyarrow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from ..types import Estimate, Features, History
from .estimators import EstimationContext, Estimator, _isotonic_curve, _per_history


@dataclass(frozen=True)
class ShiftTest:
    """What counts as a shift (``RayschedConfig.shift_*``)."""

    #: Runs needed on each side of a change point.
    min_runs: int = 8
    #: Smallest shift of the median log use that counts (0.2: x1.22).
    min_log: float = 0.2
    #: ...and at least this many times the residuals' robust spread (1.4826 x MAD).
    noise_multiple: float = 1.5
    #: A split must also pass a two-sample sign test at this z (3.5: a steady stream
    #: of 2,000 runs strays this far rarely; a doubling passes after 13 runs, 7 calls
    #: with their killed attempts).  Without it, a few failed calls close together (a
    #: failure and its retry are two high runs) cut a steady history in the replay.
    min_score: float = 3.5
    #: Change points looked for within the runs after the last one found.
    max_rounds: int = 3


def runs_since_shift(history: History, resource: str, test: ShiftTest) -> History:
    """The runs of ``history`` since the newest shift of ``resource``'s use; all of them
    when there is none.  Computed once per history, resource and test."""
    return _per_history(history, ("runs_since_shift", resource, test), lambda: _cut(history, resource, test))


def _cut(history: History, resource: str, test: ShiftTest) -> History:
    values = history.column(resource)
    rows = np.flatnonzero(np.isfinite(values) & (values > 0))
    if rows.shape[0] < 2 * test.min_runs:
        return history
    resid = _residuals(history, rows, np.log(values[rows]))
    start = 0
    for _ in range(test.max_rounds):
        split = _change_point(resid[start:], test)
        if split is None:
            break
        start += split
    if start == 0:
        return history
    return history.select(np.arange(len(history)) >= rows[start])


def _residuals(history: History, rows: np.ndarray, log_use: np.ndarray) -> np.ndarray:
    """Log use less what input size and tags explain, in the runs' order."""
    resid = log_use.copy()
    sizes = history.input_size[rows]
    known = np.isfinite(sizes) & (sizes >= 0)
    if known.sum() >= 3:
        ls = np.log1p(sizes[known])
        if np.ptp(ls) > 0:
            # The isotonic curve of use on size (as the cost-aware center), even where
            # size explains little: inputs of a new range that need more are not a shift.
            # (Use often saturates: a line would leave the largest inputs a level of their own.)
            xs, fit = _isotonic_curve(ls, log_use[known])
            resid[known] = log_use[known] - np.interp(ls, xs, fit)
    if history.tags:
        groups: dict[frozenset, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(frozenset(history.tags[r]), []).append(i)
        if len(groups) > 1:
            for members in groups.values():
                resid[members] -= np.median(resid[members])
    return resid


def _change_point(resid: np.ndarray, test: ShiftTest, tries: int = 8) -> int | None:
    """Where the level of ``resid`` shifts (the index of the first run after), or None."""
    n = resid.shape[0]
    m = test.min_runs
    if n < 2 * m:
        return None
    signs = np.sign(resid - np.median(resid))
    # The standardized CUSUM of signs: a split k is scored by how far the signs before
    # it stray from their share of the total, over the spread that has by chance
    # (a two-sample sign test), so that a shift 16 runs ago in a window of 2,000
    # stands out as clearly as one in the middle.
    k = np.arange(m, n - m + 1)
    cusum = np.cumsum(signs)[k - 1] - k / n * signs.sum()
    score = np.abs(cusum) / np.sqrt(k * (n - k) / n)
    # The best split first; when its levels differ by less than the test asks (a
    # stray of the random walk in a long steady stretch), the best of the newer
    # splits, and so on: a real shift among the last runs is not hidden by noise
    # further back.
    score[score < test.min_score] = -1.0
    first = 0
    for _ in range(tries):
        if first >= k.shape[0] or score[first:].max() < 0:
            return None
        split = int(k[first + int(np.argmax(score[first:]))])
        before, after = resid[:split], resid[split:]
        shift = float(np.median(after) - np.median(before))
        spread = 1.4826 * float(np.median(np.abs(np.concatenate([before - np.median(before),
                                                                  after - np.median(after)]))))
        if abs(shift) >= max(test.min_log, test.noise_multiple * spread):
            return _refined(resid, split, m)
        first = split - m + 1
    return None


def _refined(resid: np.ndarray, split: int, m: int) -> int:
    """The split near ``split`` that leaves each side closest to its own median (least
    absolute deviations: where one level ends and the other begins), searched ``m`` runs
    either way, then again around the better one found, until none is better.

    The sign CUSUM scores splits against the median of all the runs: a few old runs
    above it by chance just before a shift score as well as the shift itself, and its
    best split landed up to ``m`` runs early or more (9 in a simulated doubling),
    handing the estimators old runs with the new, and flapping between two places as
    runs arrived (a next round cannot cut so few runs off at z >= 3.5)."""
    n = resid.shape[0]
    costs: dict[int, float] = {}

    def cost(k: int) -> float:
        if k not in costs:
            before, after = resid[:k], resid[k:]
            costs[k] = float(np.abs(before - np.median(before)).sum() + np.abs(after - np.median(after)).sum())
        return costs[k]

    for _ in range(n):
        best = min(range(max(m, split - m), min(n - m, split + m) + 1), key=lambda k: (cost(k), abs(k - split)))
        if best == split:
            break
        split = best
    return split


@dataclass(frozen=True)
class SinceShift:
    """The inner estimator on the runs since the newest shift of the resource's use."""

    inner: Estimator
    resource: str
    test: ShiftTest

    def estimate(self, ctx: EstimationContext, x: Features) -> Estimate | None:
        runs = runs_since_shift(ctx.history, self.resource, self.test)
        if runs is not ctx.history:
            ctx = replace(ctx, history=runs, models=_models_since(ctx.models, self.resource, runs))
        return self.inner.estimate(ctx, x)


def _models_since(models: Mapping, resource: str, runs: History) -> Mapping:
    """``models`` without the resource's model if it learnt from more runs than ``runs`` has."""
    model = models.get(resource)
    if model is None:
        return models
    held = model.metrics.get("rows_holdout", 0.0) if model.metrics else 0.0
    learnt_from = model.n_train + (held if math.isfinite(held) else 0.0)
    values = runs.column(resource)
    since = int(np.count_nonzero(np.isfinite(values) & (values > 0)))
    if learnt_from <= since:
        return models
    return {r: m for r, m in models.items() if r != resource}
