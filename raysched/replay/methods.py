"""The interface every replayed sizing method implements.

A :class:`Method` is created once per workflow replay; for each task type the
harness asks it for a :class:`TaskSizer` given that type's history, then feeds the
sizer the online jobs one by one:

1. ``first(job)``: the allocation of the first attempt, in bytes;
2. while the attempt's allocation is below the true peak, ``retry(job, failed)`` with
   the allocations that failed so far (the sizer is never told the true peak of a
   job that failed: a killed task only says "more than this");
3. ``observe(job, peak_rss, realtime_ms)`` once the job fits: the predictor learns
   the true value, as in the Sizey protocol.

A :class:`Job` carries only what is known before a task runs (its type, input
size, the workflow's preset and requested cores): never its peak or runtime.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Job:
    """What a sizer may know of one task instance before it runs."""

    task_type: str
    input_size: float  # bytes; NaN when the trace has none
    preset_memory: float  # the workflow's own request for a first attempt, in bytes; NaN when none
    cpus: float  # requested cores; NaN when none


@dataclass(frozen=True)
class TaskHistory:
    """The history rows of one task type, as numpy arrays (peak bytes, runtime ms, input bytes, preset bytes)."""

    task_type: str
    peak_rss: np.ndarray
    realtime_ms: np.ndarray
    input_size: np.ndarray
    memory: np.ndarray
    cpu_pct: np.ndarray

    def __len__(self) -> int:
        return len(self.peak_rss)


class TaskSizer(ABC):
    """Sizes the jobs of one task type during one replay."""

    @abstractmethod
    def first(self, job: Job) -> float:
        """Bytes for the first attempt."""

    @abstractmethod
    def retry(self, job: Job, failed: Sequence[float]) -> float:
        """Bytes for the next attempt after ``failed`` (all below the unknown peak, in order)."""

    def observe(self, job: Job, peak_rss: float, realtime_ms: float) -> None:
        """Learn the true peak and runtime of a job that has finished."""


class Method(ABC):
    """A sizing method: makes one :class:`TaskSizer` per task type of a workflow."""

    name: str = "method"

    @abstractmethod
    def sizer(self, history: TaskHistory) -> TaskSizer:
        """A sizer for one task type, trained on its history rows."""

    def begin_workflow(self, histories: Sequence[TaskHistory]) -> None:
        """Called once per workflow before any sizer, with every task type's history (for shared fallbacks)."""
