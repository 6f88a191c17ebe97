"""Small estimators, each with one job, and the wrappers around them.

Modelled on the Kubernetes VPA recommender's ``logic/estimator.go``: a base
estimator proposes an Estimate for one resource; wrappers adjust it (a
confidence multiplier for little history, a minimum, a cap); ``FirstOf`` picks the
first estimator that has an answer.  One function, ``recipe.build_predictor``,
composes them from the config.  One wrapper serves every resource: the resource
is a parameter, not a type.

Pure: imports neither ray, mlflow nor pyarrow.
"""

from __future__ import annotations

import functools
import math
import statistics
import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Iterable, Mapping, Protocol

import numpy as np

from ..types import Estimate, Features, History
from .models import ResourceModel, usable_rows


@dataclass(frozen=True)
class Fallback:
    """What the user declared for a function (cold-start values), per resource; None if nothing."""

    memory: float | None = None
    cpu: float | None = None
    wall: float | None = None
    disk: float | None = None

    def get(self, resource: str) -> float | None:
        return getattr(self, resource)


@dataclass(frozen=True, eq=False)
class EstimationContext:
    """Everything an estimator may look at besides the call's own features."""

    history: History
    models: Mapping[str, ResourceModel] = field(default_factory=dict)
    fallback: Fallback = Fallback()
    #: Log residuals that stand for runs of the workflow's other functions, for a function
    #: with few runs of its own (``residual_prior``); empty: none.
    residual_prior: tuple[float, ...] = ()


class Estimator(Protocol):
    """Proposes an Estimate for one resource of one call, or None when it has no answer."""

    def estimate(self, ctx: EstimationContext, x: Features) -> Estimate | None: ...


# --- base estimators --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConstantEstimator:
    """The user's fallback for the resource if declared, else a default: the cold start."""

    resource: str
    default: float
    coverage: float

    def estimate(self, ctx: EstimationContext, x: Features) -> Estimate | None:
        declared = ctx.fallback.get(self.resource)
        value = float(declared if declared is not None else self.default)
        return Estimate(value, value, value, self.coverage, 0, "fallback")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape[0] < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return 0.0
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass(frozen=True)
class PercentileEstimator:
    """A robust statistic of past runs: the high percentile (the max with few runs).

    Where input size explains the use (Spearman rho^2 >= ``min_correlation``) and
    the call's input size is known, the statistic is taken of the residuals of a
    least-squares line ``use = a + b * size`` and added to the line at this size (at the
    smallest input seen, for a smaller one), so that a large input is not sized from
    small ones.
    """

    resource: str
    percentile: float
    min_history: int
    min_correlation: float
    coverage: float
    #: Below this many runs the upper bound is the max, not a percentile: with 5
    #: runs, the "p95" is an interpolation between the two largest.
    max_below: int = 20

    def estimate(self, ctx: EstimationContext, x: Features) -> Estimate | None:
        fit = _per_history(ctx.history, self, lambda: self._fit(ctx.history))
        if fit is None:
            return None
        n, line_fit, unsized = fit
        if x.input_size is not None and line_fit is not None:
            slope, intercept, median, upper_resid, lower_resid, smallest = line_fit
            # Read no lower than the smallest input seen: below it the line is a guess, and one
            # with an intercept under zero gave a call of a small input 0 s or the 64 MiB floor
            # (use does not shrink further, as CostAwareEstimator reads its curve).
            line = intercept + slope * max(float(x.input_size), smallest)
            target = max(line + median, 0.0)
            upper = max(line + upper_resid, target)
            lower = min(max(line + lower_resid, 0.0), target)
            return Estimate(target, lower, upper, self.coverage, n, "history")
        return unsized

    def _fit(self, history: History) -> tuple[int, tuple[float, ...] | None, Estimate] | None:
        """Everything of the estimate that depends on the history alone (a driver sizes many
        calls from one history): the line on input size with its residuals' statistics,
        if input size explains use, and the estimate of a call without an input size."""
        rows = usable_rows(history, self.resource)
        n = rows.shape[0]
        if n < self.min_history:
            return None
        values = history.column(self.resource)[rows]
        sizes = history.input_size[rows]
        upper_pct = 100.0 if n < self.max_below else self.percentile
        lower_pct = 100.0 - self.percentile
        known = np.isfinite(sizes)
        line_fit = None
        if known.sum() >= self.min_history:
            s, v = sizes[known], values[known]
            if _spearman(s, v) ** 2 >= self.min_correlation:
                slope, intercept = np.polyfit(s, v, 1)
                slope = max(float(slope), 0.0)  # use never shrinks as input grows
                resid = v - (intercept + slope * s)
                line_fit = (slope, float(intercept), float(np.median(resid)),
                            float(np.percentile(resid, upper_pct)), float(np.percentile(resid, lower_pct)),
                            float(s.min()))
        target = float(np.median(values))
        unsized = Estimate(
            target=target,
            lower=min(float(np.percentile(values, lower_pct)), target),
            upper=max(float(np.percentile(values, upper_pct)), target),
            coverage=self.coverage,
            n_history=n,
            source="history",
        )
        return n, line_fit, unsized


@dataclass(frozen=True)
class QuantileModelEstimator:
    """The calibrated XGBoost quantile model for the resource, when one is served."""

    resource: str

    def estimate(self, ctx: EstimationContext, x: Features) -> Estimate | None:
        model = ctx.models.get(self.resource)
        if model is None:
            return None
        lower, target, upper = (float(v[0]) for v in model.predict(model.row(x)[None, :]))
        return Estimate(target, min(lower, target), max(upper, target), model.coverage_target,
                        len(ctx.history) or model.n_train, model.source)


# --- wrappers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WithConfidenceMultiplier:
    """Widens the upper bound when few runs stand behind it (VPA's confidence multiplier).

    upper x (1 + scale / n) ** exponent; with scale 1, exponent 1:
    3 runs: x1.33, 10 runs: x1.10, 30 runs: x1.03, 300 runs: x1.003.
    """

    inner: Estimator
    scale: float
    exponent: float

    def estimate(self, ctx: EstimationContext, x: Features) -> Estimate | None:
        est = self.inner.estimate(ctx, x)
        if est is None or est.n_history <= 0:
            return est
        factor = (1.0 + self.scale / est.n_history) ** self.exponent
        return replace(est, upper=est.upper * factor)


@dataclass(frozen=True)
class AtLeastFewRuns:
    """The inner estimate (the cold start), raised to the largest use of the runs so far
    while they are too few (1 to ``min_history`` - 1) for statistics: a declared 1 GiB
    that a run has outgrown is known to be short, and sizing the next calls from it
    repeated the kill (or the stop) until a third run existed (an audit)."""

    inner: Estimator
    resource: str
    min_history: int

    def estimate(self, ctx: EstimationContext, x: Features) -> Estimate | None:
        est = self.inner.estimate(ctx, x)
        if est is None:
            return None
        rows = usable_rows(ctx.history, self.resource)
        if not 0 < rows.shape[0] < self.min_history:
            return est
        largest = float(ctx.history.column(self.resource)[rows].max())
        if largest <= est.upper:
            return est
        return Estimate(largest, min(est.lower, largest), largest, est.coverage, int(rows.shape[0]), "history")


@dataclass(frozen=True)
class WithMinimum:
    """No bound below ``minimum`` (for example, a worker never needs less than 64 MiB)."""

    inner: Estimator
    minimum: float

    def estimate(self, ctx: EstimationContext, x: Features) -> Estimate | None:
        est = self.inner.estimate(ctx, x)
        if est is None:
            return None
        if est.target >= self.minimum:
            return est
        m = self.minimum
        return replace(est, target=m, upper=max(est.upper, m))


@dataclass(frozen=True)
class WithCap:
    """No bound above ``cap`` (a hard per-function or cluster limit)."""

    inner: Estimator
    cap: float

    def estimate(self, ctx: EstimationContext, x: Features) -> Estimate | None:
        est = self.inner.estimate(ctx, x)
        if est is None or est.upper <= self.cap:
            return est
        c = self.cap
        return replace(est, target=min(est.target, c), lower=min(est.lower, c), upper=c)


def runs_with_tags(history: History, tags: tuple[str, ...]) -> History:
    """The runs of ``history`` made with exactly the call's ``tags`` (as a set).

    All of them when every run has those tags, or none has: a call with a tag never
    seen starts from the function's other runs (a better start than a blind default;
    the ladder corrects an estimate that falls short).  Made once per history and tag
    set, so that the fits made on it are kept too (``_per_history``).
    """
    if not history.tags:  # no run has tags
        return history
    key = frozenset(tags)
    return _per_history(history, ("runs_with_tags", key), lambda: _select_tags(history, key))


def _select_tags(history: History, key: frozenset) -> History:
    same = np.fromiter((frozenset(t) == key for t in history.tags), dtype=bool, count=len(history.tags))
    if same.all() or not same.any():
        return history
    return history.select(same)


@dataclass(frozen=True)
class SameTags:
    """The inner estimator, on the runs with the call's tags only.

    Tags are the user's word that calls differ (``f.options(tags=["genome=hg38"])``):
    a history estimator that pooled them would size a small genome's calls for the
    large one's peaks.  With too few such runs the inner estimator has no answer and
    the chain goes on (to the model, which takes tags as features, or to fewer-run
    statistics of the same runs).
    """

    inner: Estimator

    def estimate(self, ctx: EstimationContext, x: Features) -> Estimate | None:
        runs = runs_with_tags(ctx.history, x.tags)
        if runs is not ctx.history:
            ctx = replace(ctx, history=runs)
        return self.inner.estimate(ctx, x)


@dataclass(frozen=True)
class FirstOf:
    """The first estimator with an answer: model, else history statistics, else fallback."""

    estimators: tuple[Estimator, ...]

    def estimate(self, ctx: EstimationContext, x: Features) -> Estimate | None:
        for estimator in self.estimators:
            est = estimator.estimate(ctx, x)
            if est is not None and math.isfinite(est.upper):
                return est
        return None


# --- cost-aware memory sizing -------------------------------------------------------------------


def _isotonic(y: np.ndarray) -> np.ndarray:
    """Non-decreasing least-squares fit of ``y`` (pool-adjacent-violators), same length."""
    means: list[float] = []
    counts: list[int] = []
    for v in y:
        means.append(float(v))
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, c2 = means.pop(), counts.pop()
            m1, c1 = means.pop(), counts.pop()
            means.append((m1 * c1 + m2 * c2) / (c1 + c2))
            counts.append(c1 + c2)
    return np.repeat(np.array(means), np.array(counts))


#: Runs the slope beyond the range is worked out from, at most (evenly spaced in input size):
#: Theil-Sen's pairs grow with the square of the runs (256 runs: 33,000 pairs, ~1 ms).
_SLOPE_MAX_RUNS = 256


def _loglog_slope(ls: np.ndarray, lu: np.ndarray, max_slope: float, fraction: float = 1.0) -> float:
    """Theil-Sen slope of log use on log input size over the ``fraction`` of runs with the
    largest inputs (at least 3), clipped to [0, max_slope].

    The median of the pairwise slopes, not least squares: the slope carries the fit past
    the largest input seen, where the runs are fewest, and one odd run there (a peak of a
    second mode at the top of the range) tipped a least-squares line, and every call
    beyond the range with it.  In the trace replay (seeds 0-2) it cut raysched's wastage
    on the Lotaru sets by 1.4-2.7%, with no more failed attempts."""
    k = max(3, int(math.ceil(ls.shape[0] * fraction)))
    order = np.argsort(ls, kind="stable")[-k:]
    if order.shape[0] > _SLOPE_MAX_RUNS:
        order = order[np.linspace(0, order.shape[0] - 1, _SLOPE_MAX_RUNS).round().astype(int)]
    ls, lu = ls[order], lu[order]
    if ls.shape[0] < 2 or np.ptp(ls) <= 0:
        return 0.0
    i, j = np.triu_indices(ls.shape[0], 1)
    dx = ls[j] - ls[i]
    apart = dx > 0  # sorted by size: pairs of equal sizes have no slope
    slope = float(np.median((lu[j] - lu[i])[apart] / dx[apart]))
    return min(max(slope, 0.0), max_slope)


def _monotone_fit(ls: np.ndarray, lu: np.ndarray, query: np.ndarray, slope: float) -> np.ndarray:
    """The non-decreasing (isotonic) fit of ``lu`` on ``ls``, read at ``query``.

    Inside the range of ``ls``: linear interpolation between the fitted points;
    below it: the smallest fitted value (flat: use does not shrink further); above
    it: the largest fitted value plus ``slope`` per unit of log size (a log-log
    line, so that an input 10x larger than any seen is not sized as the largest).
    """
    return _read_curve(*_isotonic_curve(ls, lu), query, slope)


def _isotonic_curve(ls: np.ndarray, lu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The isotonic fit of ``lu`` on ``ls``: the sorted ``ls`` and the fitted values there."""
    order = np.argsort(ls, kind="stable")
    return ls[order], _isotonic(lu[order])


def _read_curve(xs: np.ndarray, fit: np.ndarray, query: np.ndarray, slope: float) -> np.ndarray:
    """An isotonic curve read at ``query``, extended along ``slope`` past its end (see ``_monotone_fit``)."""
    out = np.interp(query, xs, fit)
    beyond = query > xs[-1]
    if slope > 0 and np.any(beyond):
        out = np.where(beyond, fit[-1] + slope * (query - xs[-1]), out)
    return out


def _extrapolation_scores(
    ls: np.ndarray,
    lu: np.ndarray,
    slope_of: Callable[[np.ndarray, np.ndarray], float],
    covered_of: Callable[[np.ndarray, np.ndarray, float], float],
    hold_fractions: tuple[float, ...] = (0.1, 0.2, 0.3),
    min_train: int = 3,
    min_distance: float = 0.1,
) -> np.ndarray:
    """Leave-largest-out scores of the extrapolation error, per unit of log distance.

    For each share in ``hold_fractions``, the runs with the largest inputs are held
    out (at least one, and every run of the smallest held-out size), and the curve
    is fitted on the rest (``_monotone_fit`` with the slope ``slope_of(kept)``).
    Each held-out run scores how far its log use rose above that curve plus
    ``covered_of(kept, slope)`` (the log headroom the residuals of the kept runs
    already give), divided by its distance past the kept runs' largest log input
    (at least ``min_distance``, so that noise just past the range does not make a
    steep score).  Empty when no split keeps ``min_train`` runs of distinct sizes.
    """
    order = np.argsort(ls, kind="stable")
    xs, ys = ls[order], lu[order]
    n = xs.shape[0]
    scores: list[np.ndarray] = []
    for k in sorted({max(1, int(math.ceil(n * f))) for f in hold_fractions}):
        if k >= n:
            continue
        keep = xs < xs[n - k]
        if keep.sum() < min_train or np.ptp(xs[keep]) <= 0:
            continue
        held = ~keep
        slope = slope_of(xs[keep], ys[keep])
        fitted = _monotone_fit(xs[keep], ys[keep], xs[held], slope) + covered_of(xs[keep], ys[keep], slope)
        scores.append((ys[held] - fitted) / np.maximum(xs[held] - xs[keep][-1], min_distance))
    return np.concatenate(scores) if scores else np.empty(0)


def residual_prior(histories: Iterable[History], estimator: CostAwareEstimator, runs: int,
                   min_pooled: int = 10) -> tuple[float, ...]:
    """``runs`` residuals that stand for a workflow's functions: the (i + 0.5) / runs quantiles
    of the log residuals of every history given (``CostAwareEstimator.residuals``) pooled.

    The issue's "shared fallback": a function with a few runs knows little of how far its
    next run may stray above what its input predicts, and the failures that cost most in
    the trace replay were near misses on such functions (a median of 0.95 of the peak).
    Residuals are in log space, so functions of any size pool; empty below ``min_pooled``
    residuals or with ``runs`` 0.
    """
    if runs <= 0:
        return ()
    pooled = [r for r in (estimator.residuals(h) for h in histories) if r.shape[0]]
    values = np.concatenate(pooled) if pooled else np.empty(0)
    if values.shape[0] < min_pooled:
        return ()
    return tuple(float(q) for q in np.quantile(values, (np.arange(runs) + 0.5) / runs))


def _nearest(values: np.ndarray, distance: np.ndarray, k: int) -> np.ndarray:
    """The ``values`` of the ``k`` smallest distances (ties: the earliest runs), in no order.

    The same runs as ``values[np.argsort(distance, kind="stable")[:k]]``, in linear
    time: a driver does this on every call with a new input size.
    """
    kth = np.partition(distance, k - 1)[k - 1]
    closer = distance < kth
    ties = np.flatnonzero(distance == kth)[: k - int(np.count_nonzero(closer))]
    return np.concatenate([values[closer], values[ties]])


#: Work an estimator does on a history whatever the call (fits, cross-fitted residuals),
#: kept while the history lives: a driver sizes many calls from one bundle's history,
#: and redoing it per call cost ~0.6 ms of every submission with a new input size.
_HISTORY_FITS: "weakref.WeakKeyDictionary[History, dict]" = weakref.WeakKeyDictionary()
_HISTORY_FITS_LOCK = threading.Lock()
#: Kept in place of a value that is the history itself (a selection that keeps every run):
#: a value that refers to its weak key keeps the key alive, and every history a profiler
#: trained on, or a driver sized calls from, was kept for good with all its fits.
_THE_HISTORY = object()


def _per_history(history: History, key: Hashable, make: Callable[[], Any]) -> Any:
    """``make()``, computed once per (history, key) while the history object lives.

    ``make()`` must not return anything that refers to ``history`` but ``history``
    itself (kept as a marker), or the cache would keep the history alive.
    """
    with _HISTORY_FITS_LOCK:
        found = _HISTORY_FITS.get(history)
        if found is not None and key in found:
            value = found[key]
            return history if value is _THE_HISTORY else value
    value = make()  # outside the lock: two threads may both compute it, with the same result
    with _HISTORY_FITS_LOCK:
        _HISTORY_FITS.setdefault(history, {})[key] = _THE_HISTORY if value is history else value
    return value


@dataclass(frozen=True)
class _SizeFit:
    """What CostAwareEstimator learns from a history about use against input size."""

    n: int  # usable, uncensored runs
    log_use: np.ndarray  # of those runs
    use_size: bool  # input size explains use (Spearman rho^2 >= min_correlation)
    ls: np.ndarray | None = None  # log1p(input size) of the runs with a known size
    lu: np.ndarray | None = None  # their log use
    slope: float = 0.0  # log-log slope beyond the largest input
    curve_x: np.ndarray | None = None  # the isotonic fit: sorted ls...
    curve_y: np.ndarray | None = None  # ...and the fitted log use there
    resid: np.ndarray | None = None  # cross-fitted log residuals, in the order of ls
    wall: np.ndarray | None = None  # wall seconds of the runs (of those with a known size when sized)
    extrapolation_widen: list = field(default_factory=list)  # computed on the first call past the range
    unsized: dict = field(default_factory=dict)  # residual prior -> the estimate of a call sized without its input size

    def center(self, query: float) -> float:
        """``_monotone_fit(ls, lu, [query], slope)``, from the curve fitted once."""
        assert self.curve_x is not None and self.curve_y is not None
        return float(_read_curve(self.curve_x, self.curve_y, np.array([query]), self.slope)[0])


@functools.lru_cache(maxsize=None)
def unseen_tail_ratio(k: int) -> float:
    """How far a run beyond the largest of ``k`` lands past it, on average, as a share
    of how far that largest lies above the median, for normal draws.

    The largest of k lies near ``z = inv_cdf((k - 0.375) / (k + 0.25))`` (Blom); a draw
    beyond it lies ``pdf(z) / (1 - cdf(z)) - z`` past it on average (the mean excess).
    The ratio shrinks as k grows, slowly: 0.32 at 8 runs, 0.18 at 30, 0.13 at 100.
    """
    if k < 2:
        return 1.0
    z = _NORMAL.inv_cdf((k - 0.375) / (k + 0.25))
    return (_NORMAL.pdf(z) / (1.0 - _NORMAL.cdf(z)) - z) / z


_NORMAL = statistics.NormalDist()


@dataclass(frozen=True)
class CostAwareEstimator:
    """Memory sized by the cost of a failure against the cost of waste.

    1. Center: log(peak) as a non-decreasing (isotonic) function of log(input
       size) when input size explains use (Spearman rho^2 >= ``min_correlation``;
       memory rarely shrinks as input grows, and often saturates, which a line
       cannot follow), else the median.  Beyond the largest input seen, the
       center follows the log-log (Theil-Sen) slope of the runs (clipped to
       [0, ``max_slope``]) instead of staying flat.
    2. Residuals, calibrated: each run's log-residual comes from a fit on the
       other folds (cross-fitted, with the same extrapolation), so the spread is
       what a new run will see; only the ``local_fraction`` of runs nearest in
       input size are used (errors are not the same for small and large inputs);
       a phantom run ``tail_allowance`` of the spread beyond the largest
       residual stands for the tail not yet seen.
    3. Allocation: among the candidate allocations ``center x exp(residual)``, the
       one with the least expected waste, where a run that fits wastes
       ``allocation - peak`` and a run that fails wastes the allocation plus the
       retry at the ceiling (``center x exp(max residual)``) minus its peak (Tovar
       et al.'s criterion, per input size), plus the failure's fixed cost
       (``failure_overhead_s`` of the allocation, set against the median wall time
       of the runs whose residuals are used), never covering fewer than
       ``min_coverage`` of the residuals (failed attempts cost users time too).

    Runs killed for memory (``History.censored``) are left out: their value is a
    bumped lower bound, and the same call's successful retry is in the history.

    The estimate's ``upper`` is that allocation, with ``margin`` 0: the sizer adds
    no margin over it (the choice already weighs what a failure costs), and the
    admission queue and the monitor count the call by what it chose.  ``coverage``
    is the chance a new run fits, by rank (the real residuals covered over their
    count plus one), ``target`` the center.
    """

    resource: str
    min_history: int
    min_correlation: float
    local_fraction: float
    min_local: int
    tail_allowance: float
    min_coverage: float
    folds: int = 5
    #: Largest log-log slope beyond the largest input (1: use proportional to input).
    max_slope: float = 1.0
    #: Whether to follow the log-log slope beyond the largest input (False: flat).
    extrapolate: bool = True
    #: Share of runs, those with the largest inputs, the slope beyond the range is fitted on.
    slope_fraction: float = 1.0
    #: Log headroom over the cap (the largest use seen, grown beyond the range); inf: no cap.
    cap_allowance: float = math.inf
    #: Log widening of the allocation per unit of log input size beyond the largest input seen.
    widen: float = 0.0
    #: Beyond the largest input seen, widen the allocation by this quantile of the
    #: leave-largest-out extrapolation scores (``_extrapolation_scores``) times the
    #: log distance past the range; 0: off.
    extrapolation_quantile: float = 0.0
    #: Seconds a failed attempt costs beyond its own run (the kill is detected, a rerun
    #: started and its inputs fetched again), charged at the failed allocation; 0: none.
    failure_overhead_s: float = 0.0
    #: Scale the phantom's distance by the number of residuals (``unseen_tail_ratio``):
    #: ``tail_allowance`` then multiplies that ratio instead of standing alone.
    tail_by_count: bool = False
    #: A call whose local residuals number at most this many also counts the context's
    #: ``residual_prior`` among them (0: never): a few runs say little about the tail, and
    #: the workflow's other functions say how far runs stray from what their input predicts.
    prior_max_local: int = 0

    def _fit(self, history: History) -> _SizeFit:
        """Everything of the estimate that depends on the history alone."""
        rows = usable_rows(history, self.resource)
        rows = rows[~history.censored_mask[rows]]
        n = rows.shape[0]
        if n < self.min_history:
            return _SizeFit(n, np.empty(0), False)
        log_use = np.log(history.column(self.resource)[rows])
        sizes = history.input_size[rows]
        known = np.isfinite(sizes) & (sizes >= 0)
        if not (known.sum() >= self.min_history
                and _spearman(np.log1p(sizes[known]), log_use[known]) ** 2 >= self.min_correlation):
            return _SizeFit(n, log_use, False, wall=history.wall[rows])
        ls, lu = np.log1p(sizes[known]), log_use[known]
        slope = _loglog_slope(ls, lu, self.max_slope, self.slope_fraction) if self.extrapolate else 0.0
        return _SizeFit(n, log_use, True, ls, lu, slope, *_isotonic_curve(ls, lu), self._cross_fitted(ls, lu, slope),
                        wall=history.wall[rows][known])

    def estimate(self, ctx: EstimationContext, x: Features) -> Estimate | None:
        fit: _SizeFit = _per_history(ctx.history, self, lambda: self._fit(ctx.history))
        n, log_use = fit.n, fit.log_use
        if n < self.min_history:
            return None
        if not (fit.use_size and x.input_size is not None):
            # Nothing of the call matters: one estimate per history (and prior).
            found = fit.unsized.get(ctx.residual_prior)
            if found is None:
                center = float(np.median(log_use))
                resid = self._with_prior(np.sort(log_use - center), ctx.residual_prior)
                found = fit.unsized[ctx.residual_prior] = self._choose(center, resid, float(np.max(log_use)), n,
                                                                       self._overhead(fit.wall))
            return found
        ls, lu, slope = fit.ls, fit.lu, fit.slope
        assert ls is not None and lu is not None and fit.resid is not None
        query = math.log1p(float(x.input_size))
        center = fit.center(query)
        resid, wall = fit.resid, fit.wall
        k = max(self.min_local, int(math.ceil(len(resid) * self.local_fraction)))
        if k < len(resid):
            distance = np.abs(ls - query)
            resid = _nearest(resid, distance, k)
            if self.failure_overhead_s > 0:
                wall = _nearest(wall, distance, k)
        # Beyond the largest input the local residuals understate the error: widen
        # every candidate by ``widen`` per unit of log distance past the range.
        beyond = max(0.0, query - float(fit.curve_x[-1]))  # type: ignore[index]
        if beyond > 0:
            if not fit.extrapolation_widen:
                fit.extrapolation_widen.append(self._extrapolation_widen(ls, lu))
            widen = self.widen + fit.extrapolation_widen[0]
        else:
            widen = self.widen
        center += widen * beyond
        # Never above the largest use seen, grown along the slope beyond the range.
        cap = float(np.max(log_use)) + (slope + widen) * beyond
        return self._choose(center, self._with_prior(np.sort(resid), ctx.residual_prior), cap, n, self._overhead(wall))

    def _with_prior(self, resid: np.ndarray, prior: tuple[float, ...]) -> np.ndarray:
        """The sorted residuals, with the prior's among them if there are few (``prior_max_local``)."""
        if not prior or resid.shape[0] > self.prior_max_local:
            return resid
        return np.sort(np.concatenate([resid, np.asarray(prior, dtype=float)]))

    def residuals(self, history: History) -> np.ndarray:
        """The log residuals this estimator sizes ``history``'s calls by: cross-fitted along input
        size where size explains use, else around the median; empty below ``min_history`` runs."""
        fit: _SizeFit = _per_history(history, self, lambda: self._fit(history))
        if fit.n < self.min_history:
            return np.empty(0)
        if fit.use_size and fit.resid is not None:
            return fit.resid
        return fit.log_use - float(np.median(fit.log_use))

    def _overhead(self, wall: np.ndarray | None) -> float:
        """A failure's fixed cost as a share of one run: ``failure_overhead_s`` over the
        median wall time of ``wall`` (0 when off, or when no run's wall time is known)."""
        if self.failure_overhead_s <= 0 or wall is None:
            return 0.0
        known = wall[np.isfinite(wall) & (wall > 0)]
        if known.shape[0] == 0:
            return 0.0
        return self.failure_overhead_s / float(np.median(known))

    def _choose(self, center: float, resid: np.ndarray, cap: float, n: int, overhead: float = 0.0) -> Estimate:
        """The allocation of least expected waste, given the center and the sorted log residuals."""
        k = resid.shape[0]
        median = float(resid[k // 2]) if k % 2 else float((resid[k // 2 - 1] + resid[k // 2]) / 2)
        spread = float(resid[-1]) - median
        allowance = self.tail_allowance * (unseen_tail_ratio(k) if self.tail_by_count else 1.0)
        resid = np.append(resid, float(resid[-1]) + allowance * spread)  # still sorted
        alloc = np.exp(np.minimum(center + resid, max(cap, center) + self.cap_allowance))
        ceiling = alloc[-1]
        m = alloc.shape[0]
        # expected waste per run of allocating alloc[i]: runs j <= i fit, runs j > i fail
        # (their allocation held for the run and, as the failure's fixed cost, for
        # ``overhead`` runs more) and rerun at the ceiling.
        cum = np.cumsum(alloc)
        fits = alloc * np.arange(1, m + 1) - cum
        fails = (m - np.arange(1, m + 1)) * (alloc * (1.0 + overhead) + ceiling) - (cum[-1] - cum)
        first = min(m - 1, max(0, int(math.ceil(self.min_coverage * m)) - 1))
        i = first + int(np.argmin((fits + fails)[first:]))
        chosen = float(alloc[i])
        target = min(math.exp(center), chosen)
        return Estimate(
            target=target,
            lower=min(float(alloc[0]), target),
            upper=chosen,
            # Of the k real residuals it covers min(i + 1, k) (the last candidate is the
            # phantom run); a new run is as likely to rank anywhere among k + 1, so that
            # share of k + 1 is the chance it fits ((i + 1) / m, the share of candidates,
            # claimed 1.0 where 0.89-0.94 fitted with 8-29 runs).
            coverage=min(i + 1, k) / (k + 1),
            n_history=n,
            source="history",
            margin=0.0,
        )

    def _extrapolation_widen(self, ls: np.ndarray, lu: np.ndarray) -> float:
        """Log widening per unit of log distance past the range: the
        ``extrapolation_quantile`` of the leave-largest-out scores (how far held-out
        largest runs rose above the curve fitted without them, past the largest
        local residual of the runs kept), at least 0; 0 when off."""
        if self.extrapolation_quantile <= 0:
            return 0.0

        def slope_of(x: np.ndarray, y: np.ndarray) -> float:
            return _loglog_slope(x, y, self.max_slope, self.slope_fraction) if self.extrapolate else 0.0

        def covered_of(x: np.ndarray, y: np.ndarray, slope: float) -> float:
            # the largest cross-fitted residual of the local share nearest the top (x is sorted)
            resid = self._cross_fitted(x, y, slope)
            k = max(self.min_local, int(math.ceil(len(resid) * self.local_fraction)))
            return float(np.max(resid[-k:]))

        scores = _extrapolation_scores(ls, lu, slope_of, covered_of)
        if scores.shape[0] == 0:
            return 0.0
        return max(0.0, float(np.quantile(scores, self.extrapolation_quantile)))

    def _cross_fitted(self, ls: np.ndarray, lu: np.ndarray, slope: float) -> np.ndarray:
        n = ls.shape[0]
        k = min(self.folds, n)
        fold = np.arange(n) % k  # deterministic, interleaved in time
        resid = np.empty(n)
        for f in range(k):
            test, train = fold == f, fold != f
            resid[test] = lu[test] - _monotone_fit(ls[train], lu[train], ls[test], slope)
        return resid
