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

import math
from dataclasses import dataclass, field
from typing import Mapping, Protocol

import numpy as np

from ..types import Estimate, Features, History
from .features import feature_row
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
    least-squares line ``use = a + b * size`` and added to the line at this size,
    so that a large input is not sized from small ones.
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
        rows = usable_rows(ctx.history, self.resource)
        n = rows.shape[0]
        if n < self.min_history:
            return None
        values = ctx.history.column(self.resource)[rows]
        sizes = ctx.history.input_size[rows]
        upper_pct = 100.0 if n < self.max_below else self.percentile
        lower_pct = 100.0 - self.percentile
        known = np.isfinite(sizes)
        if x.input_size is not None and known.sum() >= self.min_history:
            s, v = sizes[known], values[known]
            if _spearman(s, v) ** 2 >= self.min_correlation:
                slope, intercept = np.polyfit(s, v, 1)
                slope = max(float(slope), 0.0)  # use never shrinks as input grows
                line = intercept + slope * float(x.input_size)
                resid = v - (intercept + slope * s)
                target = max(line + float(np.median(resid)), 0.0)
                upper = max(line + float(np.percentile(resid, upper_pct)), target)
                lower = min(max(line + float(np.percentile(resid, lower_pct)), 0.0), target)
                return Estimate(target, lower, upper, self.coverage, n, "history")
        target = float(np.median(values))
        return Estimate(
            target=target,
            lower=min(float(np.percentile(values, lower_pct)), target),
            upper=max(float(np.percentile(values, upper_pct)), target),
            coverage=self.coverage,
            n_history=n,
            source="history",
        )


@dataclass(frozen=True)
class QuantileModelEstimator:
    """The calibrated XGBoost quantile model for the resource, when one is served."""

    resource: str

    def estimate(self, ctx: EstimationContext, x: Features) -> Estimate | None:
        model = ctx.models.get(self.resource)
        if model is None:
            return None
        lower, target, upper = (float(v[0]) for v in model.predict(feature_row(x)[None, :]))
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
        return Estimate(est.target, est.lower, est.upper * factor, est.coverage, est.n_history, est.source)


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
        return Estimate(m, est.lower, max(est.upper, m), est.coverage, est.n_history, est.source)


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
        return Estimate(min(est.target, c), min(est.lower, c), c, est.coverage, est.n_history, est.source)


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
