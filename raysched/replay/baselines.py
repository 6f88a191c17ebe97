"""The published baselines raysched is measured against, each from its description.

- :class:`Presets`: the workflow's own ``memory`` request; on failure Nextflow's
  idiom ``memory * task.attempt``.
- :class:`Tovar`: Tovar et al., "A Job Sizing Strategy for High-Throughput
  Scientific Workflows" (IEEE TPDS 29(2), 2018): the first allocation minimises
  the expected waste ``a * E[t] + a_max * E[t * 1{peak > a}]`` over the peaks seen
  so far (their Equation 1, waste mode); a failed attempt is retried at the
  maximum seen, and a job bigger than anything seen is doubled from there (the
  Sizey paper's reproduction jumps to the whole 128 GB node instead, which only
  makes Tovar look worse).
- :class:`WittPercentile`: Witt et al., "Feedback-Based Resource Allocation for
  Batch Scheduling of Scientific Workflows" (HPCS 2019): the 95th percentile of
  all peaks seen; doubled on failure.
- :class:`WittLR`: the same paper's linear regression of peak on input size, plus
  an offset of one standard deviation of the relative prediction errors seen
  (seeded with the history's residuals); doubled on failure.
- :class:`VPA`: the Kubernetes Vertical Pod Autoscaler's recommender: a decaying
  exponential histogram of peaks (first bucket 10 MB, ratio 1.05), target = the
  90th percentile, plus a 15% safety margin; an OOM kill adds the sample
  ``max(limit + 100 MiB, limit * 1.2)`` and the next attempt gets at least that.
  Decay is by observation count (half-life :attr:`VPA.half_life` observations),
  since a replay has no wall clock.
- :class:`Oracle`: the true peak; zero waste, the floor.

All learn online: ``observe`` adds the finished job to what they know.
Pure numpy: no ray, mlflow or pyarrow.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..types import GiB, MiB
from .methods import Job, Method, TaskHistory, TaskSizer

def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


# --------------------------------------------------------------------------- presets


class _PresetSizer(TaskSizer):
    def __init__(self, fallback: float):
        self.fallback = fallback

    def first(self, job: Job) -> float:
        return job.preset_memory if math.isfinite(job.preset_memory) and job.preset_memory > 0 else self.fallback

    def retry(self, job: Job, failed: Sequence[float]) -> float:
        # Nextflow: memory { 2.GB * task.attempt }; attempt n+1 after n failures.
        return self.first(job) * (len(failed) + 1)


class Presets(Method):
    """The workflow author's request (``memory``); ``memory x attempt`` on failure."""

    name = "presets"

    def sizer(self, history: TaskHistory) -> TaskSizer:
        presets = _finite(history.memory)
        # A row without a preset (none in the published traces) gets the type's largest
        # preset, else 1 GiB, the default of raysched's own cold start.
        return _PresetSizer(float(presets.max()) if len(presets) else float(GiB))


# --------------------------------------------------------------------------- Tovar


def tovar_min_waste(values: np.ndarray, times: np.ndarray) -> float:
    """Tovar et al.'s waste-minimising first allocation over (peak, runtime) samples.

    For a candidate ``a`` among the peaks seen, the expected waste per task is
    ``a * mean(t) + a_max * sum(t_j for peak_j > a) / n``: every task holds ``a``
    for its runtime, and one that needs more fails and is rerun with ``a_max``.
    Ties go to the larger candidate, as in their reference code.
    """
    values = np.asarray(values, dtype=float)
    times = np.asarray(times, dtype=float)
    n = len(values)
    if n == 0:
        raise ValueError("tovar_min_waste needs at least one sample")
    uniq, inverse = np.unique(values, return_inverse=True)  # ascending
    time_per_value = np.bincount(inverse, weights=times)
    tb = times.sum() / n
    am = uniq[-1]
    # time of tasks strictly above each candidate = total - cumulative up to it
    above = times.sum() - np.cumsum(time_per_value)
    waste = uniq * tb + am * above / n
    # argmin over descending order keeps the larger candidate on ties
    order = np.arange(len(uniq))[::-1]
    best = order[np.argmin(waste[order])]
    return float(uniq[best])


class _TovarSizer(TaskSizer):
    def __init__(self, history: TaskHistory):
        self.values = list(map(float, history.peak_rss))
        self.times = list(map(float, history.realtime_ms))
        self._cached: float | None = None

    def first(self, job: Job) -> float:
        if self._cached is None:
            self._cached = tovar_min_waste(np.array(self.values), np.array(self.times))
        return self._cached

    def retry(self, job: Job, failed: Sequence[float]) -> float:
        maximum = max(self.values)
        if failed[-1] < maximum:
            return maximum
        return failed[-1] * 2  # bigger than anything seen

    def observe(self, job: Job, peak_rss: float, realtime_ms: float) -> None:
        self.values.append(float(peak_rss))
        self.times.append(float(realtime_ms))
        self._cached = None


class Tovar(Method):
    """Minimum-waste first allocation (Tovar et al., TPDS 2018); retry at the maximum seen."""

    name = "tovar"

    def sizer(self, history: TaskHistory) -> TaskSizer:
        return _TovarSizer(history)


# --------------------------------------------------------------------------- Witt et al.


class _WittPercentileSizer(TaskSizer):
    def __init__(self, history: TaskHistory, percentile: float):
        self.values = list(map(float, history.peak_rss))
        self.percentile = percentile

    def first(self, job: Job) -> float:
        return float(np.percentile(self.values, self.percentile))

    def retry(self, job: Job, failed: Sequence[float]) -> float:
        return failed[-1] * 2

    def observe(self, job: Job, peak_rss: float, realtime_ms: float) -> None:
        self.values.append(float(peak_rss))


class WittPercentile(Method):
    """The 95th percentile of the peaks seen; doubled on failure (Witt et al., 2019)."""

    name = "witt_percentile"

    def __init__(self, percentile: float = 95.0):
        self.percentile = percentile

    def sizer(self, history: TaskHistory) -> TaskSizer:
        return _WittPercentileSizer(history, self.percentile)


class _WittLRSizer(TaskSizer):
    def __init__(self, history: TaskHistory):
        self.x = list(map(float, history.input_size))
        self.y = list(map(float, history.peak_rss))
        self.errors: list[float] = []
        self._fit()
        # Seed the offset with the history's own relative residuals, so the first
        # online predictions already carry an offset.
        for xi, yi in zip(self.x, self.y):
            self.errors.append((yi - self._raw(xi)) / yi)

    def _fit(self) -> None:
        x = np.array(self.x)
        y = np.array(self.y)
        ok = np.isfinite(x)
        self.mean_x = float(x[ok].mean()) if ok.any() else 0.0
        if ok.sum() >= 2 and np.ptp(x[ok]) > 0:
            slope, intercept = np.polyfit(x[ok], y[ok], 1)
        else:
            slope, intercept = 0.0, float(y.mean())
        self.slope, self.intercept = float(slope), float(intercept)

    def _raw(self, x: float) -> float:
        if not math.isfinite(x):
            x = self.mean_x
        return self.slope * x + self.intercept

    def first(self, job: Job) -> float:
        raw = self._raw(job.input_size)
        offset = float(np.std(self.errors)) if self.errors else 0.0
        allocation = raw * (1 + offset)
        # A regression line can go below zero for small inputs; no task gets less
        # than the smallest peak seen.
        return max(allocation, min(self.y))

    def retry(self, job: Job, failed: Sequence[float]) -> float:
        return failed[-1] * 2

    def observe(self, job: Job, peak_rss: float, realtime_ms: float) -> None:
        raw = self._raw(job.input_size)
        self.errors.append((peak_rss - raw) / peak_rss)
        self.x.append(float(job.input_size))
        self.y.append(float(peak_rss))
        self._fit()


class WittLR(Method):
    """Linear regression on input size plus a standard-deviation offset (Witt et al., 2019)."""

    name = "witt_lr"

    def sizer(self, history: TaskHistory) -> TaskSizer:
        return _WittLRSizer(history)


# --------------------------------------------------------------------------- VPA


class DecayingHistogram:
    """The VPA recommender's exponential-bucket histogram with exponentially decaying weights."""

    def __init__(self, first_bucket: float = 1e7, ratio: float = 1.05, max_value: float = 1e12, half_life: float = 50.0):
        self.first_bucket = first_bucket
        self.ratio = ratio
        n = int(math.ceil(math.log(max_value * (ratio - 1) / first_bucket + 1, ratio)))
        self.n = n
        # bucket i covers [start(i), start(i+1)); start(i) = first * (ratio^i - 1) / (ratio - 1)
        self.starts = first_bucket * (ratio ** np.arange(n + 1) - 1) / (ratio - 1)
        self.weights = np.zeros(n)
        self.half_life = half_life
        self.t = 0  # observation counter (the replay's clock)

    def bucket(self, value: float) -> int:
        i = int(np.searchsorted(self.starts, value, side="right") - 1)
        return min(max(i, 0), self.n - 1)

    def add(self, value: float) -> None:
        self.weights[self.bucket(value)] += 2.0 ** (self.t / self.half_life)
        self.t += 1
        if self.t % 500 == 0:  # renormalise before the weights overflow
            self.weights /= 2.0 ** (self.t / self.half_life)
            self.t = 0

    def percentile(self, q: float) -> float:
        total = self.weights.sum()
        if total <= 0:
            return 0.0
        cum = np.cumsum(self.weights)
        i = int(np.searchsorted(cum, q * total * (1 - 1e-9), side="left"))
        i = min(i, self.n - 1)
        return float(self.starts[i + 1])  # VPA returns the end of the bucket holding the percentile


class _VPASizer(TaskSizer):
    def __init__(self, history: TaskHistory, method: "VPA"):
        self.m = method
        self.hist = DecayingHistogram(half_life=method.half_life)
        for v in history.peak_rss:
            self.hist.add(float(v))

    def _recommend(self) -> float:
        return self.hist.percentile(self.m.target_percentile) * (1 + self.m.margin)

    def first(self, job: Job) -> float:
        return self._recommend()

    def retry(self, job: Job, failed: Sequence[float]) -> float:
        limit = failed[-1]
        bumped = max(limit + self.m.oom_bump_bytes, limit * self.m.oom_bump_ratio)
        self.hist.add(bumped)  # VPA records an OOM as a sample of the bumped size
        return max(self._recommend(), bumped)

    def observe(self, job: Job, peak_rss: float, realtime_ms: float) -> None:
        self.hist.add(float(peak_rss))


class VPA(Method):
    """Kubernetes VPA recommender: decaying histogram, p90, +15%; OOM -> max(+100 MiB, x1.2)."""

    name = "vpa"

    def __init__(
        self,
        target_percentile: float = 0.9,
        margin: float = 0.15,
        oom_bump_bytes: float = 100 * MiB,
        oom_bump_ratio: float = 1.2,
        half_life: float = 50.0,
    ):
        self.target_percentile = target_percentile
        self.margin = margin
        self.oom_bump_bytes = oom_bump_bytes
        self.oom_bump_ratio = oom_bump_ratio
        self.half_life = half_life

    def sizer(self, history: TaskHistory) -> TaskSizer:
        return _VPASizer(history, self)


# --------------------------------------------------------------------------- oracle


class _OracleSizer(TaskSizer):
    truth: float = float("nan")

    def reveal(self, peak_rss: float) -> None:
        self.truth = peak_rss

    def first(self, job: Job) -> float:
        return self.truth

    def retry(self, job: Job, failed: Sequence[float]) -> float:  # never called: the oracle never fails
        return self.truth


class Oracle(Method):
    """Allocation = the true peak (the harness reveals it): the lower bound of any method."""

    name = "oracle"
    sees_truth = True

    def sizer(self, history: TaskHistory) -> TaskSizer:
        return _OracleSizer()


BASELINES: dict[str, type[Method]] = {
    "presets": Presets,
    "tovar": Tovar,
    "witt_percentile": WittPercentile,
    "witt_lr": WittLR,
    "vpa": VPA,
    "oracle": Oracle,
}
