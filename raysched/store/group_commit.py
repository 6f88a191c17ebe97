"""Group commit: the appends of many concurrent callers written together, at most once per interval.

Every worker sends its attempt rows to the profiler a few times a second, and a
Parquet part costs about the same to write for 50 rows as for 500 (the footer,
the column chunks, an fsync).  Written one part per batch, a stream of tiny
tasks spent more of the cluster's CPU in the profiler than in the tasks.

``GroupCommit.submit`` returns only once the caller's rows are written (so a
worker that saw its call return may forget them, and a profiler that dies first
fails the call, which Ray retries).  While writes are rare nothing waits: the
first submission after a quiet interval is written at once.  Under load, the
first caller after a write leads the next one: it waits until ``interval_s``
after the last write began, while later callers join its batch, then writes
everything gathered in one go.  One bad submission must not cost the others
their rows: a batch whose combined write fails is written again submission by
submission, and each caller gets its own outcome.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence


class _Submission:
    __slots__ = ("items", "written", "error")

    def __init__(self, items: Sequence[Any]):
        self.items = items
        self.written = 0
        self.error: BaseException | None = None


class _Batch:
    __slots__ = ("submissions", "done")

    def __init__(self) -> None:
        self.submissions: list[_Submission] = []
        self.done = False


class GroupCommit:
    """Writes the submissions of concurrent callers together (see the module docstring).

    ``write(items)`` writes a list of items all or nothing and returns how many it
    wrote.  ``clock`` and ``sleep`` are injectable for tests.
    """

    def __init__(self, write: Callable[[list[Any]], int], interval_s: float,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if not interval_s >= 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s!r}")
        self._write = write
        self.interval_s = float(interval_s)
        self._clock = clock
        self._sleep = sleep
        self._cond = threading.Condition()
        self._open: _Batch | None = None  # the batch that new submissions join, led by its first
        self._writing = False
        self._last_write_started = -float("inf")

    def submit(self, items: Sequence[Any]) -> int:
        """Write ``items`` (with whatever else is gathered); returns how many of them were written.

        Raises the error of writing these items, when that fails.
        """
        submission = _Submission(items)
        with self._cond:
            batch = self._open
            leader = batch is None
            if leader:
                batch = self._open = _Batch()
            batch.submissions.append(submission)
            if not leader:
                while not batch.done:
                    self._cond.wait()
        if leader:
            self._lead(batch)
        if submission.error is not None:
            raise submission.error
        return submission.written

    def _lead(self, batch: _Batch) -> None:
        with self._cond:
            while self._writing:  # one write at a time: the previous batch's
                self._cond.wait()
            delay = self._last_write_started + self.interval_s - self._clock()
        if delay > 0:
            self._sleep(delay)  # later callers join this batch meanwhile
        with self._cond:
            self._open = None  # from here on, new callers gather the next batch
            self._writing = True
            self._last_write_started = self._clock()
        try:
            self._write_batch(batch.submissions)
        finally:
            with self._cond:
                self._writing = False
                batch.done = True
                self._cond.notify_all()

    def _write_batch(self, submissions: list[_Submission]) -> None:
        if len(submissions) > 1:
            try:
                self._write([item for s in submissions for item in s.items])
            except Exception:  # noqa: BLE001 - find whose rows fail: each submission on its own below
                pass
            else:
                for s in submissions:
                    s.written = len(s.items)
                return
        for s in submissions:
            try:
                s.written = self._write(list(s.items))
            except BaseException as exc:  # noqa: BLE001 - handed to its own caller
                s.error = exc
