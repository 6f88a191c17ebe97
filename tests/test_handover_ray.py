"""No deadlock when many calls on a full node wait for bigger attempts at once.

A call stopped for outgrowing its allocation waits for its bigger next attempt
while still holding its own `memory` label. Eight such calls on a node whose
`memory` resource is 1 GiB used to fill it with held labels, so no bigger attempt
could ever be scheduled (0 of 8 done after 60 s). A next attempt that has not
started within `handover_start_timeout_s` now runs in the waiting task's slot.
"""

from __future__ import annotations

import time

import pytest
import ray

import raysched
from raysched import adaptive_remote
from raysched.types import GiB, MiB

from conftest import environment

pytestmark = pytest.mark.ray

#: The module's config: samples every 0.2 s, a bigger next attempt not started within 2.5 s
#: (1.5 s when raysched's own waiting calls hold the room) runs in the waiting task's slot.
TIGHT = dict(live_interval_s=0.2, handover_start_timeout_s=2.5, handover_held_room_s=1.5)


@pytest.fixture(scope="module")
def tight_node(tmp_path_factory):
    with environment(RAYSCHED_HOME=str(tmp_path_factory.mktemp("raysched_handover_home"))):
        ray.init(address="local", num_cpus=2, _memory=1 * GiB, include_dashboard=False, namespace="raysched",
                 log_to_driver=False)
        # Short waits, so that each wave of stopped calls moves on within seconds.
        raysched.configure(**TIGHT)
        try:
            yield
        finally:
            ray.shutdown()


@adaptive_remote(memory=256 * MiB, num_cpus=0.25)
def holds(mib: int) -> int:
    import numpy as np

    held = [np.ones(50 * MiB // 8) for _ in range(mib // 50)]
    for _ in range(40):  # 2 s in short sleeps, so that a stop lands
        time.sleep(0.05)
    return len(held)


def test_waiting_calls_do_not_deadlock_on_held_labels(tight_node):
    refs = [holds.remote(400) for _ in range(8)]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=150)
    assert not pending, f"{len(pending)} of 8 calls still waiting after 150 s"
    assert [ray.get(ref) for ref in ready] == [8] * 8
    rows = raysched.profiles(holds)
    assert rows.groupby("call_id")["outcome"].apply(lambda o: (o == "ok").sum() == 1).all()
    # A next attempt run in place is judged by the allocation the ladder gave it, not by
    # the waiting task's 256 MiB label: it is not stopped again at the point its first
    # attempt was (which used to climb every call through all its attempts).
    assert rows.groupby("call_id")["attempt"].max().max() <= 2, rows[["call_id", "attempt", "outcome"]]
    second = rows[rows["attempt"] == 2]
    assert len(second) and (second["allocated_memory_bytes"] > 256 * MiB).all()


def test_a_next_attempt_blocked_by_raysched_own_waiting_calls_runs_in_place_soon(tight_node):
    # The same eight calls, but a patient timeout: only the check that the room is held by
    # raysched's own waiting calls (handover_held_room_s, 1.5 s here) can end them early. Without
    # it, two waves of stopped calls wait 60 s each (more than 120 s in all).
    raysched.configure(handover_start_timeout_s=60.0)
    try:
        start = time.monotonic()
        refs = [holds.remote(400) for _ in range(8)]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=100)
        elapsed = time.monotonic() - start
        assert not pending, f"{len(pending)} of 8 calls still waiting after {elapsed:.0f} s"
        assert [ray.get(ref) for ref in ready] == [8] * 8
        assert elapsed < 100
    finally:
        raysched.configure(**TIGHT)


@adaptive_remote(memory=64 * MiB, num_cpus=0.25)
def dies_in_place(mib: int, runs_file: str, dies_on: tuple) -> int:
    import os

    import numpy as np

    with open(runs_file, "a") as f:
        f.write("run\n")
    with open(runs_file) as f:
        if len(f.readlines()) in dies_on:
            os._exit(1)  # the attempt run in place dies, and the waiting task with it
    held = [np.ones(50 * MiB // 8) for _ in range(mib // 50)]
    for _ in range(40):
        time.sleep(0.05)
    return len(held)


@ray.remote(num_cpus=0, memory=700 * MiB)
class _HoldsTheRoom:
    def ready(self) -> bool:
        return True


def test_an_attempt_run_in_place_that_dies_is_recorded_and_climbed_from(tight_node, tmp_path):
    """Another label fills the node, so the call's later attempts run in place of the
    waiting first one, and one dies there. Ray's retry used to take it for a death while
    waiting: it submitted another attempt with the same allocation and recorded nothing
    of the one that ran (with Ray's endless retries of memory kills, for ever)."""
    from raysched import AttemptsExhausted

    blocker = _HoldsTheRoom.remote()
    try:
        assert ray.get(blocker.ready.remote(), timeout=60)
        runs = tmp_path / "runs"
        assert ray.get(dies_in_place.remote(200, str(runs), (2,)), timeout=120) == 4
        assert runs.read_text().count("run") == 3
        rows = raysched.profiles(dies_in_place).sort_values("attempt")
        assert list(rows["attempt"]) == [1, 2, 3], rows[["attempt", "outcome", "error"]]
        died = rows.iloc[1]
        assert died["outcome"] == "oom_killed" and "treated as a memory kill" in died["error"]
        assert rows.iloc[2]["outcome"] == "ok"
        assert rows.iloc[2]["allocated_memory_bytes"] > died["allocated_memory_bytes"]
        # Dying in place every time: the call ends within max_attempts (4), each attempt a row
        with pytest.raises(AttemptsExhausted):
            ray.get(dies_in_place.remote(200, str(tmp_path / "again"), (2, 3, 4, 5, 6)), timeout=120)
        assert (tmp_path / "again").read_text().count("run") <= 4
        rows = raysched.profiles(dies_in_place)
        assert rows.groupby("call_id")["attempt"].max().max() <= 4
    finally:
        ray.kill(blocker)


def grows_then_waits(mib: int, deaf: bool) -> int:
    """Each test below decorates it under a name of its own: a function with no runs yet, so
    that its first attempt is sized from the 64 MiB declared and stopped (one or two runs
    that outgrew the declared value would raise it)."""
    import numpy as np

    held = [np.ones(50 * MiB // 8) for _ in range(mib // 50)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a soft cancel lands between the short sleeps...
        try:
            time.sleep(0.05)
        except KeyboardInterrupt:
            if not deaf:
                raise
            # ...unless the task does not take it (as C code that never returns to Python)
    return len(held)


def _fresh_grows_then_waits(name: str):
    return adaptive_remote(memory=64 * MiB, num_cpus=0.25, name=f"test_handover_ray.grows_then_waits.{name}")(
        grows_then_waits)


def _rows_once(function, select, timeout_s: float, step_s: float = 0.2):
    """The rows of ``function`` that ``select`` keeps, once one of them is there (or, after
    ``timeout_s``, as they are)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = select(raysched.profiles(function, settle=False))
        if len(rows) or time.monotonic() >= deadline:
            return rows
        time.sleep(step_s)


def _cancel_after_its_first_attempt(function, ref, then_wait_s: float = 0.0):
    """Cancel the call behind ``ref``, the first of ``function``, once its first attempt's row
    is stored (and ``then_wait_s`` later); its rows, once its second attempt's row is stored too."""
    first = _rows_once(function, lambda r: r[r["attempt"] == 1], 60)
    assert len(first), "the first attempt was never stopped"
    time.sleep(then_wait_s)
    ray.cancel(ref)
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError)):
        ray.get(ref, timeout=60)
    call = first["call_id"].iloc[-1]
    _rows_once(function, lambda r: r[(r["call_id"] == call) & (r["attempt"] == 2)], 20, 0.5)
    rows = raysched.profiles(function, settle=False)
    return rows[rows["call_id"] == call]


@pytest.mark.parametrize("deaf", [False, True], ids=["takes the interrupt", "ignores it"])
def test_a_soft_cancel_of_a_call_on_its_second_attempt_records_that_attempt_as_cancelled(tight_node, deaf):
    """The waiting first task, interrupted, force-killed the running second attempt at once,
    which then recorded nothing. It now cancels it softly, so that it records itself; one
    that does not stop within 5 s is killed and recorded by the waiting task."""
    function = _fresh_grows_then_waits("deaf" if deaf else "interrupted")
    rows = _cancel_after_its_first_attempt(function, function.remote(250, deaf), then_wait_s=3)  # the 2nd runs meanwhile
    by_attempt = rows.set_index("attempt")["outcome"].to_dict()
    assert by_attempt == {1: "oom_killed", 2: "cancelled"}, rows[["attempt", "outcome", "error"]]


def test_a_call_cancelled_while_its_next_attempt_waits_in_rays_queue_records_that_attempt(tight_node):
    """Another label fills the node, so the call's second attempt waits in Ray's queue, and
    the call is cancelled there: no code of that attempt ran to record it (its rows ended
    with the first attempt's). The waiting first task now records it as cancelled."""
    raysched.configure(handover_start_timeout_s=60.0)  # not run in place meanwhile
    blocker = _HoldsTheRoom.remote()
    try:
        assert ray.get(blocker.ready.remote(), timeout=60)
        function = _fresh_grows_then_waits("queued")
        rows = _cancel_after_its_first_attempt(function, function.remote(250, False))
        by_attempt = rows.set_index("attempt")["outcome"].to_dict()
        assert by_attempt == {1: "oom_killed", 2: "cancelled"}, rows[["attempt", "outcome", "error"]]
        second = rows[rows["attempt"] == 2].iloc[0]
        assert "before it started" in second["error"] and second["allocated_memory_bytes"] > 64 * MiB
    finally:
        ray.kill(blocker)
        raysched.configure(**TIGHT)
