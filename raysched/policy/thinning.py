"""Which calls of a function a worker measures in full: all of them, until they prove tiny.

Measuring an attempt (peak RSS with children, CPU, I/O) costs about 0.2 ms of a
core, and a profile row about as much again downstream (benchmarks/README.md,
"Where the added CPU goes").  For a call that runs for seconds that is nothing;
for a stream of 1 ms calls it is a fifth of the work, spent to learn the same
figures over and over.  So once a function's calls in one worker process have
been short and small ``short_call_streak`` times in a row (fully measured), the
worker measures only one call in ``short_call_measure_every`` of it, and no more
than one per ``short_call_measure_gap_s`` seconds; the others are timed (a clock
read at each end) and counted in the ``calls`` column of a row of the same batch
the worker sends, so the store still accounts for every call.  The gap bounds
the rows a fast stream makes (a worker running 700 tiny calls a second sent 70
rows a second at one in ten, each costing the profiler more than the call it
stands for), while a slow stream is still measured one call in ten.

Anything unusual ends the thinning at once, and the calls after it are measured
in full again until a new streak builds up: a call that fails, lasts longer than
``short_call_wall_s`` or, measured, grows the process by more than
``short_call_rss_bytes``.  A thinned call that runs on past one live interval is
not left unwatched either: the runtime starts a full meter for it at its first
live sample (``runtime.measure.DeferredMeter``), so the monitor and its hard
limits see it as they see any other attempt.

Pure: imports neither ray, mlflow nor pyarrow, and keeps no clock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RayschedConfig

__all__ = ["ShortCallThinning", "thinning_from_config"]


@dataclass
class ShortCallThinning:
    """The measure-or-count decision for the calls of one function in one process.

    ``measure_next()`` before a call, ``observe(...)`` after it.  Not thread-safe by
    design: a task worker runs one task at a time (threaded actors do not use it).
    """

    #: A call no longer than this (seconds, wall) counts as short...
    wall_s: float
    #: ...if, when measured, it grew the process's resident set by at most this.
    rss_bytes: int
    #: Short calls in a row (the first ``streak`` of them measured) before thinning starts.
    streak: int
    #: Once thinning, one call in this many is measured; 1 measures every call...
    every: int
    #: ...and at most one per this many seconds (the caller's clock, passed in).
    gap_s: float = 0.0

    def __post_init__(self) -> None:
        self._short_in_a_row = 0
        self._unmeasured_since = 0  # calls counted, not measured, since the last measured one
        self._last_measured_at = float("-inf")  # when the last measured call started

    @property
    def thinning(self) -> bool:
        """Whether calls are being thinned now."""
        return self.every > 1 and self._short_in_a_row >= self.streak

    def measure_next(self, now: float | None = None) -> bool:
        """Whether the next call, starting at ``now`` (seconds on a monotonic clock), is measured
        in full; without a clock the gap does not apply."""
        if not self.thinning:
            return True
        due = self._unmeasured_since + 1 >= self.every
        return due and (now is None or now - self._last_measured_at >= self.gap_s)

    def observe(self, measured: bool, ok: bool, wall_s: float, rss_growth_bytes: int | None = None,
                started_at: float | None = None) -> None:
        """What a call did: measured or only timed, whether it returned, its wall time and,
        measured, how much it grew the process (peak minus start RSS); ``started_at`` on the
        clock ``measure_next`` was given."""
        if measured and started_at is not None:
            self._last_measured_at = started_at
        short = ok and wall_s <= self.wall_s and (rss_growth_bytes is None or rss_growth_bytes <= self.rss_bytes)
        if not short:
            self._short_in_a_row = 0
            self._unmeasured_since = 0
            return
        self._short_in_a_row = min(self._short_in_a_row + 1, self.streak)
        self._unmeasured_since = 0 if measured else self._unmeasured_since + 1


def thinning_from_config(config: RayschedConfig) -> ShortCallThinning:
    """A fresh decision state from the config's ``short_call_*`` knobs."""
    return ShortCallThinning(
        wall_s=config.short_call_wall_s,
        rss_bytes=config.short_call_rss_bytes,
        streak=config.short_call_streak,
        every=config.short_call_measure_every,
        gap_s=config.short_call_measure_gap_s,
    )
