"""The Sizey-protocol replay of a trace and its accounting.

Protocol (Bader et al., "Sizey", IEEE CLUSTER 2024), per task type:

- a task type takes part when it has at least ``min_rows`` (34) usable rows (for a
  trace with its own split, such as Lotaru's, at least one history and one online row);
- a random ``history_fraction`` (30%) of its rows, drawn with the seed, is the history
  a method may train on; the other 70% arrive one by one in random order (for Lotaru
  the ``Label`` column fixes which rows are which; the online order is still random);
- for each arriving job the method proposes an allocation; an allocation at or above
  the true ``peak_rss`` wastes ``(allocation - peak_rss) * realtime``; one below it is a
  failed attempt that wastes ``allocation * realtime``, and the method's own failure
  strategy proposes the next allocation until one fits; then the method learns the
  true value.

Reported per method: wastage in GB-hours (GB = 1e9 bytes), failed attempts, jobs
("tasks"), MAQ = used / (used + wasted) with used = ``peak_rss * realtime``, and the
seconds the method itself spent (training and sizing, not the harness).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import RayschedError
from .methods import Job, Method, TaskHistory
from .readers import Trace

#: bytes x milliseconds -> GB-hours
BYTE_MS_TO_GBH = 1.0 / (1e9 * 3_600_000.0)
MIN_ROWS = 34
HISTORY_FRACTION = 0.3
#: Attempts a method gets for one job; a job still not covered then is given up by that
#: method (its attempts are charged, it counts in ``given_up``), as a workflow manager
#: gives up after its retries: a preset of 512 KB for a 300 MB task, with Nextflow's
#: ``memory x attempt``, is a method losing, not a replay to abort.
MAX_ATTEMPTS = 64


class ReplayError(RayschedError):
    """A method misbehaved during a replay (no progress after a failure, NaN allocation...)."""


@dataclass
class Tally:
    """Accumulated accounting of one method on a set of jobs; byte-ms internally."""

    used: float = 0.0  # sum of peak * realtime
    over: float = 0.0  # sum of (final allocation - peak) * realtime
    under: float = 0.0  # sum of failed allocations * realtime
    failures: int = 0
    tasks: int = 0
    seconds: float = 0.0
    given_up: int = 0  # jobs still not covered after MAX_ATTEMPTS attempts

    def add(self, other: "Tally") -> None:
        self.used += other.used
        self.over += other.over
        self.under += other.under
        self.failures += other.failures
        self.tasks += other.tasks
        self.seconds += other.seconds
        self.given_up += other.given_up

    @property
    def wastage_gbh(self) -> float:
        return (self.over + self.under) * BYTE_MS_TO_GBH

    @property
    def used_gbh(self) -> float:
        return self.used * BYTE_MS_TO_GBH

    @property
    def maq(self) -> float:
        total = self.used + self.over + self.under
        return self.used / total if total > 0 else 1.0

    @property
    def failure_rate(self) -> float:
        return self.failures / self.tasks if self.tasks else 0.0

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "wastage_gbh": self.wastage_gbh,
            "failures": self.failures,
            "tasks": self.tasks,
            "maq": self.maq,
            "seconds": self.seconds,
        }
        if self.given_up:  # only then: the documented five keys otherwise
            out["given_up"] = self.given_up
        return out


def account(allocations: Sequence[float], peak_rss: float, realtime_ms: float) -> Tally:
    """The accounting of one job: every allocation below the peak is a failed attempt
    wasting ``allocation * realtime``; the last one (at or above the peak) wastes
    ``(allocation - peak) * realtime``."""
    if not allocations or allocations[-1] < peak_rss:
        raise ValueError("the last allocation must cover the peak")
    t = Tally(used=peak_rss * realtime_ms, tasks=1)
    for a in allocations[:-1]:
        if a >= peak_rss:
            raise ValueError("only the last allocation may cover the peak")
        t.under += a * realtime_ms
        t.failures += 1
    t.over = (allocations[-1] - peak_rss) * realtime_ms
    return t


def account_given_up(allocations: Sequence[float], peak_rss: float, realtime_ms: float) -> Tally:
    """A job whose every allocation fell below its peak: each was a failed attempt wasting
    ``allocation * realtime``, and the job never ran to the end (nothing used)."""
    if not allocations or max(allocations) >= peak_rss:
        raise ValueError("a given-up job has only allocations below its peak")
    return Tally(under=sum(allocations) * realtime_ms, failures=len(allocations), tasks=1, given_up=1)


@dataclass
class TaskTypeRun:
    """One task type of one workflow: its rows split into history and online order."""

    task_type: str
    history: TaskHistory
    online: pd.DataFrame  # in arrival order


@dataclass
class WorkflowResult:
    name: str
    format: str
    seed: int
    methods: dict[str, Tally] = field(default_factory=dict)
    per_type: dict[str, dict[str, Tally]] = field(default_factory=dict)  # task type -> method -> tally
    task_types: int = 0
    skipped_rows: dict[str, int] = field(default_factory=dict)
    skipped_types: dict[str, int] = field(default_factory=dict)  # task type -> its usable rows
    path: str = ""  # the trace file replayed

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "methods": {m: t.as_dict() for m, t in self.methods.items()},
            "task_types": self.task_types,
            "skipped_rows": dict(self.skipped_rows),
            "skipped_task_types": dict(self.skipped_types),
        }


def _type_rng(seed: int, task_type: str) -> np.random.Generator:
    # One stream per (seed, task type): a type's split does not depend on which other types exist.
    return np.random.default_rng([seed, zlib.crc32(task_type.encode())])


def _history(task_type: str, rows: pd.DataFrame) -> TaskHistory:
    return TaskHistory(
        task_type=task_type,
        peak_rss=rows["peak_rss"].to_numpy(float),
        realtime_ms=rows["realtime_ms"].to_numpy(float),
        input_size=rows["input_size"].to_numpy(float),
        memory=rows["memory"].to_numpy(float),
        cpu_pct=rows["cpu_pct"].to_numpy(float),
    )


def split_trace(
    trace: Trace, seed: int = 0, min_rows: int = MIN_ROWS, history_fraction: float = HISTORY_FRACTION
) -> tuple[list[TaskTypeRun], dict[str, int]]:
    """The task types that take part, each with its history and online order; and the skipped types."""
    runs: list[TaskTypeRun] = []
    skipped: dict[str, int] = {}
    fixed_split = (trace.rows["split"] != "").any()
    for task_type, rows in sorted(trace.rows.groupby("task_type", sort=False), key=lambda kv: kv[0]):
        rows = rows.reset_index(drop=True)
        rng = _type_rng(seed, task_type)
        if fixed_split:
            hist = rows[rows["split"] == "history"]
            online = rows[rows["split"] == "online"]
            if len(hist) == 0 or len(online) == 0:
                skipped[task_type] = len(rows)
                continue
        else:
            if len(rows) < min_rows:
                skipped[task_type] = len(rows)
                continue
            order = rng.permutation(len(rows))
            n_online = int(math.ceil(len(rows) * (1 - history_fraction) - 1e-9))
            n_hist = len(rows) - n_online
            if n_hist == 0 or n_online == 0:  # too few rows for both (a --min-rows of 3 or less)
                skipped[task_type] = len(rows)
                continue
            hist = rows.iloc[order[:n_hist]]
            online = rows.iloc[order[n_hist:]]
        online = online.iloc[rng.permutation(len(online))]
        runs.append(TaskTypeRun(task_type, _history(task_type, hist), online.reset_index(drop=True)))
    return runs, skipped


def _checked(allocation: float, method: Method, run: TaskTypeRun) -> float:
    """An allocation as a method proposed it, refused unless a finite positive number of
    bytes (an infinite retry made the wastage infinite, and the JSON not JSON)."""
    if not math.isfinite(allocation) or allocation <= 0:
        raise ReplayError(f"{method.name} on {run.task_type}: proposed {allocation!r} bytes")
    return allocation


def _replay_type(method: Method, run: TaskTypeRun) -> Tally:
    total = Tally()
    clock = time.perf_counter
    t0 = clock()
    sizer = method.sizer(run.history)
    spent = clock() - t0
    reveal = getattr(sizer, "reveal", None) if getattr(method, "sees_truth", False) else None
    for rec in run.online.itertuples(index=False):
        job = Job(
            task_type=run.task_type,
            input_size=float(rec.input_size),
            # The first attempt's request: a retried run's preset was multiplied by its attempt.
            preset_memory=float(rec.memory) / float(rec.attempt),
            cpus=float(rec.cpus),
        )
        peak, rt = float(rec.peak_rss), float(rec.realtime_ms)
        t0 = clock()
        if reveal is not None:
            reveal(peak)
        allocations = [_checked(float(sizer.first(job)), method, run)]
        while allocations[-1] < peak and len(allocations) < MAX_ATTEMPTS:
            nxt = _checked(float(sizer.retry(job, tuple(allocations))), method, run)
            if not nxt > allocations[-1]:
                raise ReplayError(
                    f"{method.name} on {run.task_type}: after a failure at {allocations[-1]:.0f} B "
                    f"it proposed {nxt!r}, no larger"
                )
            allocations.append(nxt)
        sizer.observe(job, peak, rt)
        spent += clock() - t0
        total.add(account(allocations, peak, rt) if allocations[-1] >= peak else account_given_up(allocations, peak, rt))
    total.seconds = spent
    return total


def replay_trace(
    trace: Trace,
    methods: Iterable[Method],
    seed: int = 0,
    min_rows: int = MIN_ROWS,
    history_fraction: float = HISTORY_FRACTION,
) -> WorkflowResult:
    """Replay one trace with every method; the same split and order for all of them."""
    runs, skipped_types = split_trace(trace, seed=seed, min_rows=min_rows, history_fraction=history_fraction)
    result = WorkflowResult(
        name=trace.name,
        format=trace.format,
        seed=seed,
        path=trace.path,
        task_types=len(runs),
        skipped_rows=dict(trace.skipped),
        skipped_types=skipped_types,
    )
    histories = [r.history for r in runs]
    for method in methods:
        t0 = time.perf_counter()
        method.begin_workflow(histories)
        setup = time.perf_counter() - t0
        tally = Tally(seconds=setup)
        for run in runs:
            t = _replay_type(method, run)
            result.per_type.setdefault(run.task_type, {})[method.name] = t
            tally.add(t)
        result.methods[method.name] = tally
    return result
