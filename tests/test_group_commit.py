"""Group commit of the profiler's writes: many callers, one part per interval, no row lost (no Ray)."""

from __future__ import annotations

import threading
import time

import pytest

from raysched.errors import InvalidInput
from raysched.store.group_commit import GroupCommit


class Writes:
    """A fake table: records each write; a row named "bad" fails the write it is in."""

    def __init__(self, seconds: float = 0.0):
        self.calls: list[list[str]] = []
        self.seconds = seconds
        self.lock = threading.Lock()

    def __call__(self, rows: list[str]) -> int:
        if "bad" in rows:
            raise InvalidInput("row 'bad' is malformed")
        time.sleep(self.seconds)
        with self.lock:
            self.calls.append(list(rows))
        return len(rows)

    @property
    def rows(self) -> list[str]:
        return [r for call in self.calls for r in call]


def _submit_all(commit: GroupCommit, batches: list[list[str]], stagger_s: float = 0.0) -> dict[int, object]:
    results: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            results[i] = commit.submit(batches[i])
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            results[i] = exc

    threads = []
    for i in range(len(batches)):
        t = threading.Thread(target=one, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(stagger_s)
    for t in threads:
        t.join(10)
    return results


def test_a_quiet_submission_is_written_at_once():
    writes = Writes()
    commit = GroupCommit(writes, interval_s=30.0)
    started = time.monotonic()
    assert commit.submit(["a", "b"]) == 2
    assert time.monotonic() - started < 5.0  # the first write after a quiet spell does not wait
    assert writes.calls == [["a", "b"]]


def test_under_load_batches_are_written_together_and_every_caller_returns_after_its_rows_are_written():
    writes = Writes(seconds=0.02)
    commit = GroupCommit(writes, interval_s=0.3)
    commit.submit(["warm"])  # the last write began just now: the next one waits its interval
    batches = [[f"r{i}-0", f"r{i}-1"] for i in range(12)]
    results = _submit_all(commit, batches, stagger_s=0.01)
    assert results == {i: 2 for i in range(12)}
    assert sorted(writes.rows) == sorted(["warm"] + [r for b in batches for r in b])  # each row once
    assert len(writes.calls) <= 3  # 12 batches arriving within an interval: one or two parts, not 12


def test_a_bad_submission_fails_alone_and_the_others_rows_are_written():
    writes = Writes()
    commit = GroupCommit(writes, interval_s=0.3)
    commit.submit(["warm"])
    batches = [["a"], ["bad", "b"], ["c"]]
    results = _submit_all(commit, batches, stagger_s=0.02)
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], InvalidInput)
    assert sorted(writes.rows) == ["a", "c", "warm"]  # the malformed batch is refused (its caller has the error)


def test_interval_must_not_be_negative():
    with pytest.raises(ValueError, match="interval_s"):
        GroupCommit(Writes(), interval_s=-1)
