"""raysched itself as a replayed method: the runtime's predictor, sizer and ladder.

Nothing here re-implements policy: the predictor comes from
``policy.recipe.build_predictor``, the first allocation from ``policy.sizing.size``
and every retry from ``policy.recipe.build_ladder``, all built from one
``RayschedConfig``, exactly as the Ray runtime builds them.  What this adapter adds
is the runtime's bookkeeping, replayed:

- a task type's history is the trace's history rows (peak memory, %cpu / 100 as
  cores, realtime as wall seconds, the input size), oldest first;
- models are trained on that history, then retrained when the rows since the last
  training call for it by the profiler's own rule (``policy.models.retrain_due``:
  ``retrain_after_new_rows`` and a tenth of the history), and a new model is served
  only if it is no worse than the served one on its holdout
  (``policy.models.replaces_served``), as the profiler does; the profiler's clock
  (``min_retrain_interval_s``) and training-cost limit have no counterpart in a
  replay.  Models are fitted lazily: one that no estimator consults is never fitted,
  which is what makes a replay of a whole workflow take seconds, not minutes;
- only memory is scored, so only the memory chain is asked;
- a failed attempt is an out-of-memory kill at the allocation: its attempt record
  says the peak reached the allocation, and (as the runtime stores it) it adds the
  OOM sample ``max(peak + 100 MiB, peak x 1.2)`` to the history, marked censored
  (the true peak is above it; the cost-aware estimator leaves such rows out);
- a finished job adds its true peak to the history.

When the ladder gives up (``max_attempts``) a user's call would raise
``AttemptsExhausted``; a replayed job must still finish, so it is doubled from there
and the adapter counts it in ``exhausted``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..config import RayschedConfig
from ..policy.models import retrain_due
from ..types import Allocation, AttemptRecord, Estimate, Features, History, Outcome, Prediction, Usage
from .methods import Job, Method, TaskHistory, TaskSizer


@dataclass
class _Columns:
    input_size: list[float] = field(default_factory=list)
    memory: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    censored: list[bool] = field(default_factory=list)

    def add(self, input_size: float, memory: float, cpu: float, wall: float, censored: bool = False) -> None:
        self.input_size.append(input_size)
        self.memory.append(memory)
        self.cpu.append(cpu)
        self.wall.append(wall)
        self.censored.append(censored)

    def history(self, version: int) -> History:
        n = len(self.memory)
        return History(
            input_size=np.asarray(self.input_size, dtype=float),
            memory=np.asarray(self.memory, dtype=float),
            cpu=np.asarray(self.cpu, dtype=float),
            wall=np.asarray(self.wall, dtype=float),
            disk=np.full(n, np.nan),
            tags=(),
            version=version,
            censored=np.asarray(self.censored, dtype=bool),
        )


def _columns_of(history: TaskHistory) -> _Columns:
    """A task type's history rows as the runtime's columns: %cpu / 100 as cores, realtime as wall seconds."""
    cols = _Columns()
    for i in range(len(history)):
        cpu = history.cpu_pct[i] / 100.0 if math.isfinite(history.cpu_pct[i]) else float("nan")
        cols.add(float(history.input_size[i]), float(history.peak_rss[i]), cpu, history.realtime_ms[i] / 1000.0)
    return cols


class _LazyModels(Mapping):
    """The models of one retrain, fitted per resource on first use from the history of that moment."""

    def __init__(self, sizer: "_RayschedSizer"):
        self.history = sizer._current_history()
        self.sizer = sizer
        self.fitted: dict[str, object] = {}

    def __getitem__(self, resource: str):
        if resource not in self.fitted:
            from ..policy.models import fit_resource_model, replaces_served

            config, served = self.sizer.config, self.sizer.served
            model = fit_resource_model(self.history, resource, config)
            self.sizer.m.trainings += 1
            if model is not None and replaces_served(model, served.get(resource), self.history, resource, config)[0]:
                served[resource] = model
            self.fitted[resource] = served.get(resource)
        model = self.fitted[resource]
        if model is None:
            raise KeyError(resource)
        return model

    def get(self, resource: str, default=None):
        try:
            return self[resource]
        except KeyError:
            return default

    def __iter__(self):
        return iter(("memory",))

    def __len__(self) -> int:
        return 1


class _RayschedSizer(TaskSizer):
    def __init__(self, method: "RayschedMethod", history: TaskHistory):
        from ..policy.recipe import build_ladder, build_predictor

        self.m = method
        self.config = method.config
        self.predictor = build_predictor(self.config)
        self.ladder = build_ladder(self.config)
        self.cols = _columns_of(history)
        self.version = len(self.cols.memory)
        self._history: History | None = None
        self.served: dict[str, object] = {}  # resource -> the model served, as the profiler's
        self.models = _LazyModels(self)
        self.trained_at = len(self.cols.memory)
        self.max_peak = float(np.nanmax(history.peak_rss)) if len(history) else 0.0
        self._prediction = None

    # --- bookkeeping ------------------------------------------------------------------
    def _current_history(self) -> History:
        if self._history is None:
            self._history = self.cols.history(self.version).tail(self.config.history_window)
        return self._history

    def _add_row(self, input_size: float, memory: float, cpu: float, wall: float, censored: bool = False) -> None:
        self.cols.add(input_size, memory, cpu, wall, censored)
        self.version += 1
        self._history = None
        if retrain_due(len(self.cols.memory) - self.trained_at, len(self.cols.memory), self.config):
            self.models = _LazyModels(self)  # retrained on first use, from the history as of now
            self.trained_at = len(self.cols.memory)

    # --- the TaskSizer protocol --------------------------------------------------------
    def first(self, job: Job) -> float:
        from ..policy.sizing import size

        from ..policy.estimators import EstimationContext

        features = Features(input_size=int(job.input_size) if math.isfinite(job.input_size) else None)
        # Only memory is scored: the runtime's memory chain, with the models trained on
        # the runtime's schedule (lazily: a model no estimator consults is never fitted).
        ctx = EstimationContext(history=self._current_history(), models=self.models,
                                residual_prior=self.m.residual_prior)
        memory = self.predictor.chains["memory"].estimate(ctx, features)
        cpu = Estimate(1.0, 1.0, 1.0, self.config.coverage, 0)
        self._prediction = Prediction(memory=memory, cpu=cpu, wall=cpu, source=memory.source)
        self._first = size(self._prediction, self.config)
        self._exhausted = False
        return float(self._first.memory_bytes)

    def retry(self, job: Job, failed: Sequence[float]) -> float:
        from ..policy.ladder import LadderState
        from ..policy.samples import oom_bump

        # Every failed attempt was killed when its use reached its allocation.
        attempts = []
        alloc = self._first
        for i, a in enumerate(failed):
            if i > 0:
                alloc = self._allocs[i - 1]
            attempts.append(
                AttemptRecord(
                    attempt=i + 1,
                    allocation=alloc,
                    outcome=Outcome.OOM_KILLED,
                    usage=Usage(peak_rss_bytes=int(a)),
                )
            )
        if len(failed) == 1:
            self._allocs = []
        if self.m.record_oom_samples:
            self._add_row(job.input_size, oom_bump(failed[-1], self.config), float("nan"), float("nan"), censored=True)
        state = LadderState(
            prediction=self._prediction,
            attempts=tuple(attempts),
            max_peak_seen=self.max_peak,
            largest_node_bytes=None,
        )
        nxt = self.ladder.next_allocation(state)
        if nxt is None:
            self.m.exhausted += not self._exhausted  # once per job, however many doublings follow
            self._exhausted = True
            nxt = Allocation(num_cpus=alloc.num_cpus, memory_bytes=int(failed[-1] * 2), rung=alloc.rung, reason="doubled")
        self._allocs.append(nxt)
        return float(nxt.memory_bytes)

    def observe(self, job: Job, peak_rss: float, realtime_ms: float) -> None:
        self.max_peak = max(self.max_peak, peak_rss)
        self._add_row(job.input_size, peak_rss, float("nan"), realtime_ms / 1000.0)


class RayschedMethod(Method):
    """raysched's own predictor, sizing and escalation ladder (from ``raysched.policy``)."""

    name = "raysched"

    def __init__(self, config: RayschedConfig | None = None, record_oom_samples: bool = True):
        self.config = config or RayschedConfig()
        self.record_oom_samples = record_oom_samples
        self.exhausted = 0  # jobs whose ladder ran out of attempts (doubled from there)
        self.trainings = 0  # models fitted, per resource (the first of each task type included)
        self.residual_prior: tuple[float, ...] = ()

    def begin_workflow(self, histories: Sequence[TaskHistory]) -> None:
        """The memory chain's prior from every task type's history, as the profiler makes it from
        the functions of a home (``policy.recipe.memory_residual_prior``)."""
        from ..policy.recipe import memory_residual_prior

        self.residual_prior = memory_residual_prior(
            [_columns_of(h).history(len(h)) for h in histories], self.config)

    def sizer(self, history: TaskHistory) -> TaskSizer:
        return _RayschedSizer(self, history)
