"""The admission queue on a real local Ray (2 CPUs): calls given a priority start in priority
order when the cluster is full, keep real ObjectRefs, and a cancelled waiting call frees its place."""

from __future__ import annotations

import pytest
import ray

import raysched
from raysched import adaptive_remote
from raysched.runtime.admission import ADMISSION_NAME
from raysched.runtime.session import NAMESPACE
from raysched.types import MiB

from conftest import wait_for

pytestmark = pytest.mark.ray


@adaptive_remote(num_cpus=1, memory=100 * MiB)
def hold(label: str, seconds: float):
    import time

    start = time.time()
    time.sleep(seconds)
    return label, start


def _named(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
        return True
    except ValueError:
        return False


def _queue_status():
    queue = ray.get_actor(ADMISSION_NAME, namespace=NAMESPACE)  # held: Ray 2.40 lost a handle made inline
    return ray.get(queue.status.remote(), timeout=30)


@adaptive_remote(num_cpus=1, memory=100 * MiB)
def echo(x):  # (its own function: runs of `hold` would change how the next tests' calls are sized)
    return x


def test_an_older_raysched_s_service_actors_left_on_the_cluster_are_not_used(ray_session):
    """First in this module, before this version's queue exists. An audit: on a cluster that
    outlived an upgrade, the new driver found the old version's detached admission actor by its
    name and every call with a priority failed with "TypeError: too many positional arguments".
    Service actors' names carry their protocol version (session.SERVICE_PROTOCOL)."""
    from raysched.runtime.session import SERVICE_PROTOCOL, _home_key, profiler_name

    @ray.remote(num_cpus=0)
    class OlderService:
        def admit(self, token, priority, num_cpus, memory_bytes, submitted_at):  # the older signature
            return True

        def ping(self):
            return True

    config = raysched.get_config()
    older = [OlderService.options(name=name, namespace=NAMESPACE, lifetime="detached").remote()
             for name in ("raysched_admission", f"raysched_profiler-{_home_key(str(config.home_path))}")]
    try:
        assert SERVICE_PROTOCOL in ADMISSION_NAME and SERVICE_PROTOCOL in profiler_name(config)
        assert ray.get(echo.options(priority=3).remote("a"), timeout=60) == "a"
        assert ray.get(echo.remote("b"), timeout=60) == "b"
    finally:
        for actor in older:
            ray.kill(actor)


def test_calls_with_a_priority_start_highest_first_when_the_cluster_is_full(ray_session):
    # 2 CPUs, 1 CPU per call: two low calls take the cluster...
    first = [hold.options(priority=0).remote(f"low{i}", 1.0) for i in range(2)]
    assert wait_for(lambda: _queue_status()["admitted"] == 2, timeout=60), _queue_status()
    # ...then four more low calls and, last, two urgent ones queue behind them.
    later = [hold.options(priority=0).remote(f"low{i}", 0.4) for i in range(2, 6)]
    # (1.5 s each: a high call's body may start a second late, in a new worker on a busy machine,
    # and a low call admitted when the other high one ended must not start before it)
    high = [hold.options(priority=5).remote(f"high{i}", 1.5) for i in range(2)]
    assert all(isinstance(r, ray.ObjectRef) for r in first + later + high)
    results = ray.get(first + later + high, timeout=120)
    order = [label for label, _start in sorted(results, key=lambda r: r[1])]
    # The urgent calls start as soon as the first slots free up, before every waiting low one.
    assert set(order[:2]) == {"low0", "low1"} and set(order[2:4]) == {"high0", "high1"}, order
    assert set(order[4:]) == {"low2", "low3", "low4", "low5"}, order
    assert wait_for(lambda: _queue_status()["admitted"] == 0, timeout=30), _queue_status()
    rows = raysched.profiles(hold)
    assert sorted(rows["priority"].tolist()) == [0] * 6 + [5] * 2


def test_a_call_cancelled_while_it_waits_frees_its_place_and_others_go_on(ray_session):
    running = [hold.options(priority=1).remote(f"run{i}", 1.5) for i in range(2)]
    waiting = hold.options(priority=1).remote("cancelled", 0.1)
    after = hold.options(priority=1).remote("after", 0.1)
    ray.cancel(waiting)
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError)):
        ray.get(waiting, timeout=60)
    assert ray.get(after, timeout=60)[0] == "after"
    ray.get(running, timeout=60)
    assert wait_for(lambda: _queue_status()["admitted"] == 0 and _queue_status()["waiting"] == 0, timeout=30)
    # Calls without a priority never touch the queue.
    before = _queue_status()["admitted_total"]
    assert ray.get(hold.remote("plain", 0.0), timeout=60)[0] == "plain"
    assert _queue_status()["admitted_total"] == before


# --- backfill behind a big waiting call, and a priority given by the decorator ----------------


@adaptive_remote(num_cpus=1, memory=50 * MiB, priority=0)
def long_call(label: str, seconds: float):
    import time

    start = time.time()
    time.sleep(seconds)
    return label, start, time.time()


@adaptive_remote(num_cpus=1, memory=50 * MiB, priority=0)
def short_call(label: str, seconds: float):
    import time

    start = time.time()
    time.sleep(seconds)
    return label, start, time.time()


def test_a_short_call_backfills_beside_a_big_one_that_waits_and_does_not_delay_it(ray_session):
    # Past runs give both functions a predicted wall time (the queue counts on it).
    # Three runs each (min_history_for_stats), two at a time.
    ray.get([long_call.remote("warm", 1.5) for _ in range(3)] + [short_call.remote("warm", 0.1) for _ in range(3)],
            timeout=120)
    for f in (long_call, short_call):
        assert wait_for(lambda f=f: len(raysched.profiles(f)) >= 3, timeout=60)
        f.refresh()
    assert long_call.predict("x", 1.5).wall.n_history >= 3 and short_call.predict("x", 0.1).wall.n_history >= 3
    before = _queue_status()
    assert before["admitted"] == 0 and before["admitted_total"] >= 6  # the decorator's priority queues every call

    a = long_call.remote("A", 1.5)  # 1 of the 2 CPUs
    assert wait_for(lambda: _queue_status()["admitted"] == 1, timeout=60)
    # Sized from its history, it counts against the node's room by its prediction's upper
    # bound: its label less the sizing's margin.
    held = _queue_status()
    upper = long_call.predict("A", 1.5).memory.upper
    assert held["held_peak_bytes"] == pytest.approx(upper) and upper < held["held_memory_bytes"], held
    big = long_call.options(num_cpus=2).remote("B", 0.2)  # needs both: waits until A ends
    small = short_call.remote("S", 0.1)  # fits now and ends long before A does
    (_, a_start, a_end), (_, b_start, _), (_, s_start, s_end) = ray.get([a, big, small], timeout=120)
    assert s_start < b_start and s_end <= b_start + 0.05, (s_start, s_end, b_start)
    assert b_start >= a_end - 0.05  # the big call did wait for its room...
    assert b_start - a_end < 5.0  # ...and started once A ended, not after anything else
    assert _queue_status()["backfilled_total"] >= before["backfilled_total"] + 1


def test_a_bad_priority_on_the_decorator_is_refused_at_once():
    with pytest.raises(raysched.InvalidInput, match="priority"):
        adaptive_remote(priority="high")(lambda: None)


@adaptive_remote(num_cpus=1, memory=100 * MiB)
def produce(i: int) -> int:
    import time

    time.sleep(0.3)
    return i


@adaptive_remote(num_cpus=1, memory=100 * MiB)
def consume(x: int) -> int:
    return 10 * x


def test_a_consumer_with_a_higher_priority_than_its_producers_does_not_hang_the_queue(ray_session):
    """Draining a pipeline by giving its later stage the higher priority: the consumers were
    admitted first, held both CPUs while Ray waited for their inputs, and the producers never ran."""
    made = [produce.options(priority=0).remote(i) for i in range(2)]
    used = [consume.options(priority=5).remote(x) for x in made]
    assert ray.get(used, timeout=60) == [0, 10]
    assert wait_for(lambda: _queue_status()["admitted"] == 0 and _queue_status()["awaiting_inputs"] == 0,
                    timeout=30), _queue_status()


def test_a_call_no_node_can_run_does_not_block_the_queue(ray_session):
    """3 CPUs asked on a 2-CPU cluster: Ray keeps it pending; the queue must not wait for it."""
    impossible = hold.options(priority=5, num_cpus=3).remote("never", 0.1)
    fine = [hold.options(priority=1).remote(f"fine{i}", 0.1) for i in range(4)]
    assert sorted(label for label, _ in ray.get(fine, timeout=60)) == [f"fine{i}" for i in range(4)]
    ray.cancel(impossible)
    assert wait_for(lambda: _queue_status()["admitted"] == 0, timeout=30), _queue_status()


@adaptive_remote(num_cpus=0.5, memory=800 * MiB)
def labelled(label: str, seconds: float):
    import time

    start = time.time()
    time.sleep(seconds)
    return label, start, time.time()


def _monitor_judging_by_a_room_of(room_bytes: int):
    """The monitor, its threshold set ``room_bytes`` above what the machine uses now (and the
    driver's config handed to it first, so that it cannot undo this one)."""
    import threading
    import time

    import psutil

    from raysched.runtime.client import get_client
    from raysched.runtime.session import monitor_name

    config = raysched.get_config()
    get_client().handle  # the profiler, and the monitor beside it, in the background...
    for thread in threading.enumerate():
        if thread.name == "raysched-monitor-start":
            thread.join(timeout=60)  # ...which hands the monitor this driver's config: not after ours
    assert wait_for(lambda: _named(monitor_name(config)), timeout=60)
    monitor = ray.get_actor(monitor_name(config), namespace=NAMESPACE)
    ray.get(monitor.ping.remote(), timeout=60)
    time.sleep(1.0)  # (a threaded actor: its first reconfigure is done by now)
    vm = psutil.virtual_memory()
    strict = config.replace(node_memory_threshold=(vm.total - vm.available + room_bytes) / vm.total)
    ray.get(monitor.reconfigure.remote(strict), timeout=30)
    return monitor


@pytest.mark.alone  # its node's room is set from the machine's memory in use
def test_calls_whose_labels_fit_the_node_but_not_its_room_start_one_at_a_time(ray_session):
    """The node's ``memory`` label has room for both 800 MiB calls; what the machine really has
    under the monitor's threshold (set 1 GiB above what it uses now) has room for one: the queue
    admits against that, from the monitor's reading, and the second call starts once the first ends."""
    import time

    from raysched.types import GiB

    config = raysched.get_config()
    monitor = _monitor_judging_by_a_room_of(1 * GiB)
    try:
        # The monitor knows a node's room from its workers' readings (a watched call's), not
        # from its metrics endpoint, which serves another measure.
        ray.get(labelled.remote("watched", 1.2), timeout=60)
        time.sleep(5.5)  # the queue's last read of the rooms grows old: the next burst reads them first
        calls = [labelled.options(priority=0).remote(f"call{i}", 1.0) for i in range(2)]
        (_, first_start, first_end), (_, second_start, _) = sorted(ray.get(calls, timeout=120), key=lambda r: r[1])
        status = _queue_status()
        assert second_start >= first_end - 0.05, (first_start, first_end, second_start, status)
        assert status["capacity_memory_bytes"] > 2 * 800 * MiB  # the labels alone would admit both at once
        [room] = status["node_rooms"].values()
        assert room < 1.6 * GiB and status["capacity_room_bytes"] == pytest.approx(room), status
    finally:
        ray.get(monitor.reconfigure.remote(config), timeout=30)


@adaptive_remote(num_cpus=0.5, memory=800 * MiB)
def labelled_too(label: str, seconds: float):  # (no history: sized by its label, as `labelled` first was)
    import time

    start = time.time()
    time.sleep(seconds)
    return label, start, time.time()


@pytest.mark.alone  # its node's room is set from the machine's memory in use
def test_calls_without_a_priority_wait_in_the_queue_while_the_node_is_short_of_room(ray_session):
    """The node's label holds both 800 MiB calls, its room (1 GiB under the monitor's threshold)
    one: though given no priority, they go through the queue, which starts them one at a time.
    Before any of raysched's tasks ran on the node to read it: the monitor reads its own node.
    Once the room is back above the label, such calls go straight to Ray again."""
    from raysched.runtime.client import get_client
    from raysched.types import GiB

    config = raysched.get_config()
    rooms = get_client().rooms
    assert rooms is not None  # on by default (route_by_room_below)
    assert rooms.check() is None  # the node's room is above its label: no call is routed

    def admitted_so_far() -> int:
        return _queue_status()["admitted_total"] if _named(ADMISSION_NAME) else 0

    monitor = _monitor_judging_by_a_room_of(1 * GiB)
    try:
        assert wait_for(lambda: rooms.check() is not None, timeout=30)
        assert rooms.shortest_room < 1.6 * GiB
        before = admitted_so_far()
        calls = [labelled_too.remote(f"call{i}", 1.0) for i in range(2)]
        (_, first_start, first_end), (_, second_start, _) = sorted(ray.get(calls, timeout=120), key=lambda r: r[1])
        assert second_start >= first_end - 0.05, (first_start, first_end, second_start, _queue_status())
        assert admitted_so_far() == before + 2
    finally:
        ray.get(monitor.reconfigure.remote(config), timeout=30)
    assert wait_for(lambda: rooms.check() is None, timeout=30)
    before = admitted_so_far()
    assert [label for label, *_ in ray.get([labelled_too.remote(f"again{i}", 0.1) for i in range(2)],
                                           timeout=60)] == ["again0", "again1"]
    assert admitted_so_far() == before  # straight to Ray


def test_the_monitor_hears_at_once_that_a_watched_task_ended(ray_session):
    """Its memory is free at once; the monitor had counted it running until its silence ran out (60 s)."""
    from raysched.runtime.client import get_client
    from raysched.runtime.session import monitor_name

    get_client().handle
    assert wait_for(lambda: _named(monitor_name(raysched.get_config())), timeout=60)
    monitor = ray.get_actor(monitor_name(raysched.get_config()), namespace=NAMESPACE)
    running = lambda: ray.get(monitor.status.remote(), timeout=30)["running_by_function"]  # noqa: E731
    ref = labelled.remote("watched", 1.5)  # three live samples or so
    assert wait_for(lambda: running().get(labelled.name) == 1, timeout=60), running()
    ray.get(ref, timeout=60)
    assert wait_for(lambda: labelled.name not in running(), timeout=5), running()


@adaptive_remote(num_cpus=1, memory=100 * MiB, priority=0)
def leaf(x: int) -> int:
    return x * x


@adaptive_remote(num_cpus=1, memory=100 * MiB, priority=0)
def parent(x: int) -> int:
    return sum(ray.get([leaf.remote(x), leaf.remote(x + 1)]))


@adaptive_remote(num_cpus=1, memory=100 * MiB, priority=10)
def consume_list(refs: list) -> int:
    return sum(ray.get(refs))


def test_calls_that_wait_on_calls_with_a_priority_do_not_deadlock_the_queue(ray_session):
    """Both deadlocked (found by an audit): the queue counted a parent's CPU while it was
    blocked in ray.get on its queued children (Ray gives that CPU back), and a consumer of
    higher priority was admitted before producers whose refs it got inside a list."""
    before = _queue_status()["admitted_total"] if _named(ADMISSION_NAME) else 0
    assert ray.get([parent.remote(1), parent.remote(3)], timeout=60) == [1 + 4, 9 + 16]
    assert wait_for(lambda: _queue_status()["admitted"] == 0, timeout=30), _queue_status()
    # Children of an admitted call went straight to Ray: only the two parents passed the queue.
    assert _queue_status()["admitted_total"] - before == 2
    assert wait_for(lambda: raysched.profiles(leaf, settle=False)["calls"].fillna(1).sum() == 4, timeout=30)
    made = [[leaf.remote(i) for i in range(2 * j, 2 * j + 2)] for j in range(2)]
    assert ray.get([consume_list.remote(refs) for refs in made], timeout=60) == [0 + 1, 4 + 9]
    assert wait_for(lambda: _queue_status()["admitted"] == 0, timeout=30), _queue_status()


@ray.remote(num_cpus=1)
def plain_middle(x: int) -> int:
    return ray.get(leaf.options(priority=3).remote(x))


@adaptive_remote(num_cpus=1, memory=100 * MiB)
def through_a_plain_task(x: int) -> int:
    return ray.get(plain_middle.remote(x))


@adaptive_remote(num_cpus=1, memory=100 * MiB)
def from_threads(x: int) -> int:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        refs = list(pool.map(lambda k: leaf.options(priority=3).remote(x + k), range(3)))
    return sum(ray.get(refs))


def test_calls_made_inside_ray_go_straight_to_it_whoever_waits_on_them(ray_session):
    """Three more deadlocks (a helper's audit): the queue let only an admitted call's own
    children pass (its task's context said so), but a priority call made through a plain
    task, or from a thread of the admitted call, was queued behind the blocked parents
    that held both CPUs; and a consumer given 300 refs joined the queue once the first
    256 existed, was admitted ahead of the producers of the rest and held their room."""
    assert ray.get([through_a_plain_task.options(priority=1).remote(x) for x in range(4)],
                   timeout=60) == [x * x for x in range(4)]
    assert ray.get([from_threads.options(priority=1).remote(10 * x) for x in range(4)],
                   timeout=60) == [sum((10 * x + k) ** 2 for k in range(3)) for x in range(4)]
    made = [leaf.remote(i) for i in range(300)]
    consumers = [consume_list.remote(made) for _ in range(2)]
    assert ray.get(consumers, timeout=120) == [sum(i * i for i in range(300))] * 2
    assert wait_for(lambda: _queue_status()["admitted"] == 0, timeout=30), _queue_status()


@adaptive_remote(num_cpus=1, memory=100 * MiB)
def pair(x: int):
    return x, -x


@adaptive_remote(num_cpus=1, memory=100 * MiB)
def touch(path: str) -> None:
    with open(path, "a") as f:
        f.write("ran\n")


def test_a_queued_call_of_several_or_no_return_values_runs_and_frees_its_room(ray_session, tmp_path):
    """With num_returns=2 Ray gives a list of refs, with 0 none: the queue tracked neither
    (a TypeError swallowed), so calls hung or never ran."""
    refs = [pair.options(num_returns=2, priority=0).remote(i) for i in range(6)]
    assert all(isinstance(r, list) and len(r) == 2 for r in refs)
    assert ray.get([r for pair_refs in refs for r in pair_refs], timeout=60) == [v for i in range(6) for v in (i, -i)]
    marker = tmp_path / "touched"
    assert all(touch.options(num_returns=0, priority=0).remote(str(marker)) is None for _ in range(3))
    assert wait_for(lambda: marker.exists() and marker.read_text().count("ran") == 3, timeout=60)
    assert wait_for(lambda: _queue_status()["admitted"] == 0, timeout=30), _queue_status()


def test_a_call_ray_refuses_to_submit_holds_no_room_in_the_queue(ray_session):
    # An argument Ray cannot serialise fails .remote() as in plain Ray; the queue had been
    # asked to admit the call first, and held its room for ever: later calls never started.
    import threading

    for _ in range(3):  # 3 CPUs' worth on a 2-CPU cluster
        with pytest.raises(TypeError):
            hold.options(priority=0).remote(threading.Lock(), 0.1)
    assert ray.get(hold.options(priority=0).remote("after", 0.1), timeout=60)[0] == "after"
    assert wait_for(lambda: _queue_status()["admitted"] == 0 and _queue_status()["waiting"] == 0,
                    timeout=30), _queue_status()


def test_a_drivers_configure_reaches_the_admission_actor_that_already_runs(ray_session):
    ray.get(hold.options(priority=1).remote("first", 0.0))  # the actor exists, as its creator set it
    assert _queue_status()["backfill"] is True
    before = raysched.get_config()
    try:
        raysched.configure(admission_backfill=False, admission_gather_s=0.05)
        ray.get(hold.options(priority=1).remote("after", 0.0))
        assert wait_for(lambda: _queue_status()["backfill"] is False, timeout=30), _queue_status()
        assert _queue_status()["gather_s"] == 0.05
    finally:
        raysched.configure(before)
        ray.get(hold.options(priority=1).remote("restored", 0.0))
    assert wait_for(lambda: _queue_status()["backfill"] is True, timeout=30)


@adaptive_remote(memory=600 * MiB)
def big_value(mib: int) -> bytes:
    return b"x" * (mib * MiB)


def _admission_peak_rss() -> int:
    actor = ray.get_actor(ADMISSION_NAME, namespace=NAMESPACE)

    def peak(_self) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    return ray.get(actor.__ray_call__.remote(peak))


def test_the_queue_sees_a_call_end_without_fetching_its_value(ray_session):
    """It awaited each queued call's ref, which fetched and deserialised the value into the
    admission actor: a 400 MiB value took its peak from ~80 MiB to ~925 MiB."""
    ray.get(big_value.options(priority=0).remote(1))  # the actor exists
    before = _admission_peak_rss()
    ref = big_value.options(priority=0).remote(400)
    assert len(ray.get(ref)) == 400 * MiB
    wait_for(lambda: _queue_status()["admitted"] == 0, timeout=30)  # its end reached the queue
    assert _admission_peak_rss() - before < 100 * MiB


def test_the_driver_reports_its_queued_calls_ends_to_the_queue(ray_session):
    """One actor call per queued call (its admit): the driver watches the call's ref and reports
    its end in a batch, where the actor waited on each ref (a second call, and a coroutine)."""
    from raysched.runtime import decorator
    from raysched.runtime.client import get_client

    if not decorator._WATCH_ENDS:
        pytest.skip("this Ray cannot watch a ref without fetching it (ObjectRef._on_ready)")
    refs = [big_value.options(priority=0).remote(1) for _ in range(6)]
    assert [len(v) for v in ray.get(refs)] == [MiB] * 6
    reporter, job_id = get_client().admission_ends
    assert job_id == ray.get_runtime_context().get_job_id()
    wait_for(lambda: reporter.watching() == 0 and _queue_status()["admitted"] == 0
             and _queue_status()["reported_by_drivers"] == 0, timeout=30)


def test_an_admission_actor_ended_for_good_is_started_again_for_the_next_calls(ray_session, monkeypatch):
    """Ray restarts the queue actor after a crash, but not one ended with ``ray.kill``: the
    driver kept its dead handle, and every later call with a priority failed with Ray's
    ActorDiedError until the driver restarted (an audit's finding). The driver looks the
    actor up by name again every ADMISSION_RELOOK_S (5 s; 0 here, not to wait for it)."""
    from raysched.runtime import client as client_module

    assert ray.get(echo.options(priority=1).remote(1), timeout=60) == 1  # the queue is up, its handle held
    ray.kill(ray.get_actor(ADMISSION_NAME, namespace=NAMESPACE))
    assert wait_for(lambda: not _named(ADMISSION_NAME), timeout=30)
    monkeypatch.setattr(client_module, "ADMISSION_RELOOK_S", 0.0, raising=False)
    assert ray.get([echo.options(priority=1).remote(i) for i in range(3)], timeout=60) == [0, 1, 2]
    assert _named(ADMISSION_NAME) and _queue_status()["admitted_total"] >= 3


def _one_cpu():
    from raysched.policy.admission import Request

    return {"node": Request(1.0, 1e12)}


def _no_dead_jobs(jobs):
    return set()


def test_an_admission_actor_at_its_call_slots_still_hears_ends_and_admits_everything(ray_session):
    """The thirty-first session's deadlock, on Ray: 4 slots, 6 calls of one CPU on one CPU. The
    5 that waited held every slot, and the end that would free room never ran."""
    from raysched.runtime.admission import Admission

    queue = (ray.remote(Admission).options(max_concurrency=4, num_cpus=0)
             .remote(capacity=_one_cpu, dead_jobs=_no_dead_jobs, gather_s=0.0, max_waiting=4))
    try:
        calls = [queue.admit.remote(f"s{i}", 0, 1.0, 1e6, float(i)) for i in range(6)]
        # One admitted; of the others, two wait and the rest find no slot to wait in (three, or
        # four if they came before the admission pass, while the admitted call still held its slot).
        done, _ = ray.wait(calls, num_returns=4, timeout=30)
        assert len(done) == 4, ray.get(queue.status.remote(), timeout=10)
        status = ray.get(queue.status.remote(), timeout=10)
        assert status["overflowed_total"] in (3, 4) and status["admitted"] == 1, status
        assert status["waiting"] + status["overflowed_total"] + status["admitted"] == 6, status
        for i in range(6):  # each end gets in, and admits the next waiting call
            ray.get(queue.ended.remote([f"s{i}"]), timeout=10)
        assert ray.get(calls, timeout=30) == [True] * 6
        assert ray.get(queue.status.remote(), timeout=10)["waiting"] == 0
    finally:
        ray.kill(queue)
