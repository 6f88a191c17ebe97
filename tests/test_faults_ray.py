"""Faults on a real Ray, with the live monitor wired into the worker.

One Ray session for the module (its own fixture: always a fresh local cluster).  Each test asserts that every call it submits
either returns its value exactly once or fails with a clear raysched error, and
that every attempt left its profile row: per call, attempts 1..n, at most one
``ok``, and the last row says how the call ended.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import ray

import raysched
from conftest import wait_for
from raysched import ResourceLimitExceeded, adaptive_remote
from raysched.runtime.session import NAMESPACE, monitor_name, profiler_name
from raysched.store.profiles import ProfileStore
from raysched.types import MiB

pytestmark = pytest.mark.ray

CAP = 300 * MiB


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """A fresh local Ray (never one already running on the machine) and a fresh raysched home."""
    from raysched.runtime import client, session

    home = tmp_path_factory.mktemp("raysched_faults_home")
    old_home = os.environ.get("RAYSCHED_HOME")
    os.environ["RAYSCHED_HOME"] = str(home)
    session._config = None
    client.reset_client()
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    # Sample every 0.2 s so the monitor decides in about a second; hard caps for the leaky functions.
    raysched.configure(live_interval_s=0.2, memory_limits={"leaks_forever": CAP, "leaks_then_hangs_in_c": CAP,
                                                           "leaks_in_a_child": CAP})
    try:
        yield tmp_path_factory.mktemp("faults")
    finally:
        ray.shutdown()
        client.reset_client()
        session._config = None
        if old_home is None:
            os.environ.pop("RAYSCHED_HOME", None)
        else:
            os.environ["RAYSCHED_HOME"] = old_home


def check_calls(function, refs, expected, timeout=120):
    """Every call returned its value once; per call the rows are attempts 1..n ending in one ok."""
    assert ray.get(refs, timeout=timeout) == expected
    rows = raysched.profiles(function)
    assert rows["call_id"].nunique() == len(refs), rows[["call_id", "attempt", "outcome"]]
    for _, attempts in rows.groupby("call_id"):
        attempts = attempts.sort_values("attempt")
        assert list(attempts["attempt"]) == list(range(1, len(attempts) + 1)), attempts
        assert list(attempts["outcome"]).count("ok") == 1 and attempts["outcome"].iloc[-1] == "ok", attempts
    return rows


def markers_left(function) -> list[bytes]:
    """The keys raysched left in Ray's KV for the calls of ``function`` in its rows: none once they ended."""
    from ray.experimental import internal_kv

    from raysched.runtime.worker import LIVE_KV_NAMESPACE

    keys = internal_kv._internal_kv_list("", namespace=LIVE_KV_NAMESPACE)
    calls = {c.encode() for c in raysched.profiles(function)["call_id"].dropna()}
    return [k for k in keys if any(c in k for c in calls)]


# --- a task that grows without end stops at its hard cap --------------------------------------------------


@adaptive_remote(memory=256 * MiB, num_cpus=0.5)
def leaks_forever(step_mib: int) -> int:
    import numpy as np

    held = []
    while True:  # Python runs between allocations: the stop is raised into this loop
        held.append(np.ones(step_mib * MiB // 8))
        time.sleep(0.02)


@adaptive_remote(memory=256 * MiB, num_cpus=0.5)
def leaks_then_hangs_in_c(mib: int) -> int:
    import threading

    import numpy as np

    held = []

    def leak() -> None:  # as a C library's own thread would, while its caller waits in C
        time.sleep(0.5)
        held.append(np.ones(mib * MiB // 8))

    threading.Thread(target=leak, daemon=True).start()
    # One C call, entered before the memory grows: an exception raised into this thread
    # waits for it to return. (Allocated here, the stop could land between the allocation,
    # still under way when the monitor saw it pass the cap, and the sleep: no worker kill.)
    time.sleep(600)
    return len(held)


def test_a_leaky_task_ends_at_its_hard_cap_with_resource_limit_exceeded(faults):
    started = time.monotonic()
    with pytest.raises(ResourceLimitExceeded) as info:
        ray.get(leaks_forever.remote(10), timeout=60)
    elapsed = time.monotonic() - started
    assert info.value.limit == CAP and info.value.measured > CAP and info.value.attempts == 1
    assert elapsed < 30, f"stopped only after {elapsed:.1f} s"
    rows = raysched.profiles(leaks_forever)
    assert list(rows["outcome"]) == ["limit_stopped"], rows  # one attempt, not retried
    assert "memory_hard_limit" in rows["error"].iloc[0]
    assert rows["peak_rss_bytes"].iloc[0] > CAP
    events = raysched.events(leaks_forever)
    assert list(events["action"]) == ["stop_limit"]
    assert markers_left(leaks_forever) == []  # its stop marker was left in Ray's KV for good


def test_a_task_stuck_in_c_code_past_its_cap_has_its_worker_killed_and_is_not_rerun(faults):
    started = time.monotonic()
    with pytest.raises(ResourceLimitExceeded):
        ray.get(leaks_then_hangs_in_c.remote(400), timeout=90)
    assert time.monotonic() - started < 60
    rows = raysched.profiles(leaks_then_hangs_in_c)
    # Recorded once, by Ray's retry of the task (the killed worker could not), and not rerun.
    assert list(rows["outcome"]) == ["limit_stopped"], rows
    assert "worker killed" in rows["error"].iloc[0]
    assert rows["peak_rss_bytes"].iloc[0] > CAP
    assert markers_left(leaks_then_hangs_in_c) == []  # the hard stop's marker, read by the retry


def _leak_then_hold(pid_file: str) -> None:
    import numpy as np

    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    held = []
    for _ in range(100):  # up to 1,000 MiB (bounded: a child that is not stopped must not fill the machine)
        held.append(np.ones(10 * MiB // 8))
        time.sleep(0.02)
    time.sleep(120)


@adaptive_remote(memory=256 * MiB, num_cpus=0.5)
def leaks_in_a_child(pid_file: str) -> int:
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=_leak_then_hold, args=(pid_file,))
    child.start()
    child.join()  # blocked in C: a stop raised into this thread waits for the child to end
    return child.exitcode


def test_a_task_whose_child_leaks_past_the_cap_ends_and_its_child_with_it(faults):
    # The leak is in a forked child while the task waits for it: the cap counts the child
    # (the process tree), and the stop must end the child too, or it held its memory, kept
    # the worker's socket, and the call hung.
    import psutil

    pid_file = str(faults / "leaking_child.pid")
    started = time.monotonic()
    with pytest.raises(ResourceLimitExceeded) as info:
        ray.get(leaks_in_a_child.remote(pid_file), timeout=90)
    assert time.monotonic() - started < 60
    assert info.value.attempts == 1 and info.value.measured > CAP
    child = int(open(pid_file).read())
    assert wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
                    timeout=10), "the leaking child outlived its stopped task"
    rows = raysched.profiles(leaks_in_a_child)
    assert list(rows["outcome"]) == ["limit_stopped"], rows


# --- the monitor's own stop: over the allocation, resubmitted one rung up ---------------------------------


@adaptive_remote(memory=128 * MiB, num_cpus=0.5)
def outgrows_its_allocation(mib: int, hold_s: float) -> int:
    import numpy as np

    held = [np.ones(50 * MiB // 8) for _ in range(mib // 50)]
    for _ in range(int(hold_s / 0.05)):  # short sleeps: a stop raised into the thread lands within one
        time.sleep(0.05)
    return sum(h.nbytes for h in held) // MiB


def test_over_its_allocation_a_task_is_stopped_and_resubmitted_one_rung_up(faults):
    rows = check_calls(outgrows_its_allocation, [outgrows_its_allocation.remote(400, 1.5)], [400])
    rows = rows.sort_values("attempt")
    assert list(rows["outcome"]) == ["oom_killed", "ok"], rows[["attempt", "outcome", "error"]]
    first, last = rows.iloc[0], rows.iloc[1]
    assert "memory_over_allocation" in first["error"] and "stopped by raysched's monitor" in first["error"]
    assert last["allocated_memory_bytes"] > 400 * MiB > first["allocated_memory_bytes"]
    assert first["memory_sample_bytes"] > first["peak_rss_bytes"]  # learnt from as a bumped sample
    assert "stop_and_resubmit" in set(raysched.events(outgrows_its_allocation)["action"])


def test_memory_the_caller_set_is_not_overruled_by_a_stop_and_a_bigger_rung(faults):
    """The same growth under ``.options(memory=128 MiB)``: the caller's figure wins over
    raysched's sizes, so the monitor warns and lets it run, as plain Ray would on a node
    with room; the call ran once (a non-idempotent body ran twice before)."""
    ref = outgrows_its_allocation.options(memory=128 * MiB).remote(400, 1.5)
    assert ray.get(ref, timeout=120) == 400
    rows = raysched.profiles(outgrows_its_allocation)
    mine = rows[rows["allocated_memory_bytes"] == 128 * MiB].sort_values("started_at").tail(1)
    assert len(mine) == 1
    call = rows[rows["call_id"] == mine["call_id"].iloc[0]]
    assert list(call["outcome"]) == ["ok"] and list(call["attempt"]) == [1], call[["attempt", "outcome", "error"]]
    assert call["peak_rss_bytes"].iloc[0] > 400 * MiB  # what it used is recorded all the same
    events = raysched.events(outgrows_its_allocation)
    warned = events[(events["call_id"] == call["call_id"].iloc[0])]
    assert list(warned["action"]) == ["warn"] and "the caller set this memory" in warned["detail"].iloc[0], warned


@adaptive_remote(num_cpus=0.5)
def keeps_a_cache(mib: int) -> int:
    import builtins

    import numpy as np

    builtins._raysched_test_cache = np.ones(mib * MiB // 8)  # a model or a table kept in the worker
    return os.getpid()


@adaptive_remote(num_cpus=0.5)
def only_sleeps(seconds: float) -> bool:
    import builtins

    time.sleep(seconds)
    return hasattr(builtins, "_raysched_test_cache")


def test_what_another_function_left_in_a_worker_is_not_held_against_the_next_task(faults):
    """A function keeping 300 MiB in a worker made the next task of another function there look
    300 MiB bigger: the monitor stopped a task that only slept, past its allocation sized from
    its own history, killed the worker and sized the function at 640 MiB (a helper's audit)."""
    ray.get([only_sleeps.remote(0.05) for _ in range(4)])  # its history: nothing but a worker
    raysched.flush()
    only_sleeps.refresh()
    assert only_sleeps.predict(1.5).memory.source != "fallback"
    # Every worker that may run it holds the cache (at most 4 at 0.5 CPU each on 2 CPUs).
    ray.get([keeps_a_cache.remote(300) for _ in range(4)])
    refs = [only_sleeps.remote(1.5) for _ in range(4)]
    assert any(ray.get(refs, timeout=120))  # some ran beside the cache
    raysched.flush()
    rows = raysched.profiles(only_sleeps).sort_values("started_at")
    history, since = rows.iloc[:4], rows.iloc[4:]
    assert len(since) == 4 and set(since["outcome"]) == {"ok"} and set(since["attempt"]) == {1}, \
        since[["attempt", "outcome", "peak_rss_bytes", "start_rss_bytes", "error"]]
    assert since["peak_rss_bytes"].max() < history["peak_rss_bytes"].max() + 100 * MiB


def _fail_in_user_code(attempt: int) -> None:
    raise ValueError(f"failed on attempt {attempt}")


@adaptive_remote(memory=128 * MiB, num_cpus=0.5)
def outgrows_then_fails(marker: str) -> int:
    import numpy as np

    if os.path.exists(marker):  # the resubmitted attempt fails in the user's own code
        _fail_in_user_code(2)
    open(marker, "w").close()
    held = [np.ones(50 * MiB // 8) for _ in range(8)]
    for _ in range(30):
        time.sleep(0.05)
    return len(held)


def test_an_error_of_a_resubmitted_attempt_shows_the_users_traceback(faults):
    # The waiting task re-raised the later attempt's bare cause: the traceback then held only
    # raysched's frames (_hand_over), and the user's file and line were gone.
    with pytest.raises(ValueError, match="failed on attempt 2") as caught:
        ray.get(outgrows_then_fails.remote(str(faults / "outgrows_then_fails")), timeout=120)
    shown = str(caught.value)
    assert "in _fail_in_user_code" in shown and "in outgrows_then_fails" in shown, shown
    assert "raysched/runtime" not in shown, shown
    assert list(raysched.profiles(outgrows_then_fails).sort_values("attempt")["outcome"]) == ["oom_killed", "error"]


@adaptive_remote(memory=128 * MiB, num_cpus=0.5, num_returns=2)
def outgrows_with_two_values(mib: int, hold_s: float) -> tuple[int, str]:
    import numpy as np

    held = [np.ones(50 * MiB // 8) for _ in range(mib // 50)]
    for _ in range(int(hold_s / 0.05)):
        time.sleep(0.05)
    return sum(h.nbytes for h in held) // MiB, "second"


def test_a_call_with_two_return_values_is_resubmitted_and_returns_both(faults):
    """The next attempt's submission gives a list of refs under num_returns=2, not one."""
    first, second = outgrows_with_two_values.remote(400, 1.5)
    assert ray.get([first, second], timeout=120) == [400, "second"]
    rows = raysched.profiles(outgrows_with_two_values).sort_values("attempt")
    assert list(rows["outcome"]) == ["oom_killed", "ok"], rows[["attempt", "outcome", "error"]]


@adaptive_remote(memory=32 * MiB, num_cpus=0.5)
def allocates_nothing(seconds: float) -> float:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return seconds


def test_a_callers_memory_is_the_tasks_own_not_its_workers(faults):
    # memory=32 MiB means what Ray's label means: the task's own memory. It is sized to
    # 40 MiB (with a minimum of 16 MiB here); x1.2 is below the private RSS of any Ray
    # worker before its task starts (90-110 MiB), so judging the whole process by it
    # stopped and reran a task that allocated nothing. The worker's start is added for
    # the caller's figure.
    minimum = raysched.get_config().min_memory_bytes
    raysched.configure(min_memory_bytes=16 * MiB)
    try:
        rows = check_calls(allocates_nothing, [allocates_nothing.remote(1.5) for _ in range(2)], [1.5, 1.5])
    finally:
        raysched.configure(min_memory_bytes=minimum)
    tolerance = raysched.get_config().monitor_memory_tolerance
    assert list(rows["attempt"]) == [1, 1], rows
    # The case the test is about: the worker alone is over what the label allows.
    assert (rows["start_rss_bytes"] > rows["allocated_memory_bytes"] * tolerance).all(), rows
    assert "stop_and_resubmit" not in set(raysched.events(allocates_nothing).get("action", []))


# --- the monitor actor killed mid-run -----------------------------------------------------------------------


@adaptive_remote(memory=128 * MiB, num_cpus=0.5)
def steady(seconds: float, value: int) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_the_monitor_killed_mid_run_comes_back_and_running_tasks_go_on(faults):
    refs = [steady.remote(8.0, i) for i in range(4)]
    assert wait_for(lambda: _named(monitor_name(raysched.get_config())) is not None)
    monitor = _named(monitor_name(raysched.get_config()))
    assert wait_for(lambda: ray.get(monitor.status.remote(), timeout=10)["reports_received"] > 0)
    ray.kill(monitor, no_restart=False)
    assert ray.get(monitor.ping.remote(), timeout=60) is True  # Ray restarts it under its name
    # The running tasks' reporters find it again: the new instance hears from them.
    assert wait_for(lambda: ray.get(monitor.status.remote(), timeout=10)["reports_received"] > 0, timeout=30)
    check_calls(steady, refs, list(range(4)))


def _named(name):
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


# --- the profiler actor killed mid-run ------------------------------------------------------------------------


@adaptive_remote(memory=128 * MiB, num_cpus=0.25)
def double(i: int) -> int:
    return 2 * i


def test_the_profiler_killed_mid_run_loses_no_row_and_comes_back_with_its_model(faults):
    refs = [double.remote(i) for i in range(40)]
    assert ray.get(refs, timeout=120) == [2 * i for i in range(40)]
    double.refresh(train=True)  # 40 rows: a model is trained and registered
    profiler = _named(profiler_name(raysched.get_config()))
    served = ray.get(profiler.status.remote())["functions"][double.name]["models"]
    assert served and all(v is not None for v in served.values()), served
    refs += [double.remote(i) for i in range(40, 60)]
    ray.kill(profiler, no_restart=False)
    refs += [double.remote(i) for i in range(60, 80)]  # submission goes on meanwhile
    check_calls(double, refs, [2 * i for i in range(80)])
    # The restarted profiler reloads the registered models in the background (MLflow's
    # import takes seconds), then serves them.
    def reloaded():
        bundle = ray.get(profiler.bundle.remote(double.name, double.code_hash), timeout=60)
        return {r: m.version for r, m in bundle.models.items()} == served

    assert wait_for(reloaded, timeout=60, step=1.0)


# --- a worker killed with SIGKILL mid-task --------------------------------------------------------------------


@adaptive_remote(memory=128 * MiB, num_cpus=0.5)
def first_attempt_hangs(marker: str, value: int) -> int:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return value  # a later attempt
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(60)  # killed in here
    return value


def test_a_worker_killed_mid_task_is_recorded_and_the_call_reruns(faults):
    from ray.experimental import internal_kv

    from raysched.runtime.worker import LIVE_KV_NAMESPACE

    def live_keys():
        return {k for k in internal_kv._internal_kv_list("", namespace=LIVE_KV_NAMESPACE) if not k.startswith(b"stop:")}

    before = live_keys()
    marker = faults / "pid"
    ref = first_attempt_hangs.remote(str(marker), 7)
    assert wait_for(lambda: marker.exists() and marker.read_text().strip() != "", timeout=60)
    # Its live sample is published, so that the retry knows what the attempt used.
    assert wait_for(lambda: live_keys() - before, timeout=30)
    time.sleep(0.5)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    rows = check_calls(first_attempt_hangs, [ref], [7]).sort_values("attempt")
    assert len(rows) == 2, rows[["attempt", "outcome", "error"]]
    dead = rows.iloc[0]
    assert dead["outcome"] in ("oom_killed", "error") and "worker died" in dead["error"]
    assert dead["wall_seconds"] > 0  # its last live sample
    # ...with the worker's size at its start: peak - start is what the attempt added
    assert 0 < dead["start_rss_bytes"] <= dead["peak_rss_bytes"], dead


# --- node memory pressure: the lowest priority gives way first -----------------------------------------------


@adaptive_remote(memory=128 * MiB, num_cpus=0.25, max_attempts=3)
def busy_for(marker: str, seconds: float) -> float:
    with open(marker, "a") as f:  # one line per attempt body
        f.write("started\n")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # Python between sleeps: a stop is raised into this loop
        time.sleep(0.05)
    return seconds


def _judge_nodes_by(**changes) -> None:
    """The driver's config, and the monitor's rules now (a client hands them over only when it starts)."""
    from raysched.runtime.monitor import get_or_create_monitor

    config = raysched.configure(**changes)
    monitor = get_or_create_monitor(config)  # held: Ray 2.40 lost a handle made inline
    ray.get(monitor.reconfigure.remote(config), timeout=60)


def test_under_node_pressure_the_lowest_priority_call_gives_way_first_and_resumes_in_place(faults):
    """The node rule on a real node: any reading counts as pressure (threshold 1%), read every second.

    The pressure starts once the monitor has heard of both calls: before that, the one it
    knows of is the lowest priority on its node, whatever its number (this test failed
    when run alone: on a cold worker pool the important call reported first). It ends
    once a call gave way; that call waits in its own task, under its label, until the
    monitor finds room for it on the node (none at 1%), and then runs its next attempt
    there: the same worker process, long before a resubmitted attempt would have been
    run in place (``handover_start_timeout_s``).
    """
    from raysched.runtime.monitor import get_or_create_monitor
    from raysched.runtime.session import get_config

    monitor = get_or_create_monitor(get_config())
    running = lambda: ray.get(monitor.status.remote(), timeout=30)["running_by_function"]  # noqa: E731
    vip_marker, low_marker = faults / "busy_vip", faults / "busy_low"
    vip = busy_for.options(priority=5).remote(str(vip_marker), 6.0)
    low = busy_for.options(priority=0).remote(str(low_marker), 6.0)
    assert wait_for(lambda: vip_marker.exists() and low_marker.exists(), timeout=90)
    assert wait_for(lambda: sum(n for f, n in running().items() if f.endswith("busy_for")) == 2, timeout=30)
    _judge_nodes_by(node_memory_threshold=0.01, node_memory_sustain_readings=1, node_poll_interval_s=1.0)
    try:
        assert wait_for(lambda: len(raysched.events(busy_for)) > 0, timeout=90)
    finally:
        _judge_nodes_by(node_memory_threshold=0.9, node_memory_sustain_readings=2, node_poll_interval_s=5.0)
    # Each call gave way at most once (while the pressure lasted it found no room), then resumed.
    assert ray.get([vip, low], timeout=180) == [6.0, 6.0]
    rows = raysched.profiles(busy_for)
    events = raysched.events(busy_for).sort_values("timestamp")
    first = events.iloc[0]
    low_calls = set(rows.loc[rows["priority"] == 0, "call_id"])
    assert first["action"] == "requeue_lowest_priority" and first["rule"] == "node_memory_pressure"
    assert first["call_id"] in low_calls, (events[["call_id", "action", "detail"]], rows[["call_id", "priority"]])
    assert "priority 0" in first["detail"]
    # Every attempt has its row: the one that gave way cancelled, the next one run in place with
    # the same allocation, in the same worker process, seconds later.
    wait_limit = get_config().handover_start_timeout_s
    for call_id, attempts in rows.groupby("call_id"):
        attempts = attempts.sort_values("attempt")
        assert list(attempts["attempt"]) == list(range(1, len(attempts) + 1)), attempts
        assert list(attempts["outcome"]) == ["cancelled"] * (len(attempts) - 1) + ["ok"], attempts
        assert attempts["error"].iloc[:-1].str.contains("node_memory_pressure").all()
        assert attempts["allocated_memory_bytes"].nunique() == 1  # requeued unchanged, not climbed
        assert attempts["worker_pid"].nunique() == 1, attempts[["attempt", "worker_pid"]]
        gaps = (attempts["started_at"].iloc[1:].to_numpy() - attempts["timestamp"].iloc[:-1].to_numpy())
        assert all(gap / np.timedelta64(1, "s") < wait_limit / 2 for gap in gaps), (call_id, gaps)
    assert len(rows[rows["call_id"] == first["call_id"]]) == 2


# --- the task waiting for the next attempt dies ----------------------------------------------------------------


@adaptive_remote(memory=256 * MiB, num_cpus=0.5)
def grows_then_holds(marker: str, mib: int, hold_s: float) -> int:
    import numpy as np

    with open(marker, "a") as f:  # one line per attempt body: its worker's pid
        f.write(f"{os.getpid()}\n")
    blocks = []
    for _ in range(mib // 50):
        blocks.append(np.ones(50 * MiB // 8))
        time.sleep(0.02)
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return mib


def test_a_task_killed_while_waiting_for_its_next_attempt_records_nothing_twice(faults):
    """Attempt 1 is stopped over its allocation and its task waits for attempt 2; then that task dies.

    Ray's retry of it must not record attempt 1 again nor reuse attempt 2's number.
    """
    marker = faults / "waiting_parent"
    # The module watches every 0.2 s, so a stop not taken within 0.4 s kills attempt 1's worker
    # (the hard stop, tested above): on a loaded CI machine that happened before this test could
    # kill the waiting task itself. Here the stop must be taken in the thread, as it is unloaded.
    base = raysched.get_config()
    raysched.configure(monitor_hard_stop_intervals=100.0)
    try:
        ref = grows_then_holds.remote(str(marker), 600, 3.0)
    finally:
        raysched.configure(base)
    assert wait_for(lambda: marker.exists() and len(marker.read_text().split()) >= 2, timeout=90)
    parent = int(marker.read_text().split()[0])  # attempt 1's worker: its task now waits for attempt 2
    time.sleep(0.5)
    os.kill(parent, signal.SIGKILL)
    assert ray.get(ref, timeout=180) == 600
    assert wait_for(lambda: len(raysched.profiles(grows_then_holds)) >= 2, timeout=30)
    time.sleep(2)  # an orphaned attempt 2 may still record itself
    rows = raysched.profiles(grows_then_holds).sort_values("attempt")
    attempts = rows["attempt"].tolist()
    # Attempts 1..n, each once: attempt 2 ended with the task that waited for it (Ray ends the
    # tasks of a dead owner, with a SystemExit: it may record itself as an error first), and
    # that task's retry records it as cancelled, under the same row id.
    assert attempts == list(range(1, len(attempts) + 1)), rows[["attempt", "outcome", "error"]]
    first = rows[rows["attempt"] == 1]
    assert len(first) == 1 and first["outcome"].iloc[0] == "oom_killed"  # stopped by the monitor, recorded once
    assert rows["outcome"].iloc[-1] == "ok" and rows["attempt"].iloc[-1] >= 3, rows[["attempt", "outcome"]]
    lost = rows[rows["attempt"] == 2].iloc[0]
    assert lost["outcome"] in ("cancelled", "error"), rows[["attempt", "outcome", "error", "worker_pid"]].to_dict("records")  # recorded by the retry, or by itself
    assert markers_left(grows_then_holds) == []  # its live sample and start marker too


@adaptive_remote(memory=256 * MiB, num_cpus=0.5)
def grows_to(mib: int) -> int:
    import numpy as np

    held = [np.ones(50 * MiB // 8) for _ in range(mib // 50)]
    time.sleep(1.5)
    return len(held)


@adaptive_remote(num_cpus=0.5)
def tiny_step(x: int) -> int:
    return x + 1


def test_configure_after_tasks_ran_moves_rows_caps_and_training_to_the_new_config(faults, tmp_path):
    """Found by an audit: workers kept the row sink and the live reporter of the first config
    their tasks brought, so after configure(home=B) rows still went to home A and a hard cap
    set there was never applied; and a profiler that already existed kept training by the
    config it was created with."""
    from raysched.runtime import session
    from raysched.runtime.profiler import get_or_create_profiler

    base = session.get_config()
    assert ray.get([tiny_step.remote(i) for i in range(4)], timeout=60) == [1, 2, 3, 4]
    home_a = base.home_path
    home_b = tmp_path / "b"
    try:
        raysched.configure(home=str(home_b), memory_limits={"grows_to": CAP})
        assert ray.get([tiny_step.remote(i) for i in range(3)], timeout=60) == [1, 2, 3]
        assert wait_for(lambda: len(ProfileStore(home_b).read(tiny_step.name)) == 3, timeout=30)
        assert len(ProfileStore(home_a).read(tiny_step.name)) == 4  # nothing more went to A
        with pytest.raises(ResourceLimitExceeded):
            ray.get(grows_to.remote(600), timeout=60)  # the cap of B's config, seen by B's monitor
        # B's profiler exists now; a configure() that changes how it trains reaches it.
        raysched.configure(min_history_for_model=5, retrain_after_new_rows=1, min_retrain_interval_s=0.0)
        assert ray.get([tiny_step.remote(i) for i in range(8)], timeout=60) == list(range(1, 9))
        profiler = get_or_create_profiler(session.get_config())

        def trained() -> bool:
            status = ray.get(profiler.status.remote(), timeout=30)["functions"].get(tiny_step.name, {})
            return bool(status.get("models"))

        assert wait_for(trained, timeout=60), ray.get(profiler.status.remote(), timeout=30)
    finally:
        raysched.configure(base)


@adaptive_remote(num_cpus=0.25)
def after_the_profiler_ended(x: int) -> int:
    return x * 3


def test_a_flush_after_the_profiler_was_ended_for_good_starts_one_and_waits_for_the_rows(faults):
    """``ray.kill(profiler)`` (as the README says to end one; Ray's default no_restart=True):
    ``raysched.flush()`` and the wait before ``ray.shutdown()`` returned False at once, and
    rows of calls that ended in the last flush interval died with their workers (a helper's
    audit lost 1-8 of 500). It starts the profiler again, as the next call would, and waits."""
    assert ray.get([after_the_profiler_ended.remote(i) for i in range(10)], timeout=60) == [3 * i for i in range(10)]
    raysched.flush(timeout_s=30)  # (False if calls of an earlier test went to another home)
    ray.kill(_named(profiler_name(raysched.get_config())))  # no restart
    assert wait_for(lambda: _named(profiler_name(raysched.get_config())) is None, timeout=30)
    refs = [after_the_profiler_ended.remote(i) for i in range(10, 60)]
    assert ray.get(refs, timeout=120) == [3 * i for i in range(10, 60)]
    assert raysched.flush(timeout_s=60)  # False at once before
    assert _named(profiler_name(raysched.get_config())) is not None
    rows = raysched.profiles(after_the_profiler_ended, settle=False)
    assert int(rows["calls"].fillna(1).sum()) == 60, rows[["call_id", "calls", "outcome"]]
