"""The live monitor as a plain class: a fake clock, a temporary ProfileStore, fake nodes. No Ray here."""

from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from raysched.config import RayschedConfig
from raysched.errors import InvalidInput, ResourceLimitExceeded
from raysched.policy import rules as R
from raysched.runtime.measure import LiveSample
from raysched.runtime.monitor import (
    Metrics,
    Monitor,
    RayNodeProbe,
    event_row,
    events,
    node_memory_from_metrics,
    parse_prometheus,
    report_from,
)
from raysched.policy.recipe import build_rules
from raysched.policy.rules import LiveReport, NodeMemory, NodeState
from raysched.store.profiles import ProfileStore
from raysched.store.schema import EVENT_SCHEMA
from raysched.types import GiB, MiB, Allocation, Estimate, Features, Outcome, Prediction

N = 3


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class RecordingMetrics:
    def __init__(self):
        self.calls: list[tuple[str, object]] = []

    def observe(self, function, largest):
        self.calls.append(("observe", function, largest.rss_bytes if largest is not None else 0))

    def decided(self, decision):
        self.calls.append(("decided", decision.action))

    def node(self, reading):
        self.calls.append(("node", round(reading.fraction, 2)))


class SpyStore:
    """A real ProfileStore that counts event writes and can be told to fail."""

    def __init__(self, home, fail: int = 0):
        self.inner = ProfileStore(home)
        self.writes = 0
        self.fail = fail

    def append_events(self, rows):
        if self.fail:
            self.fail -= 1
            raise OSError("disk full")
        self.writes += 1
        return self.inner.append_events(rows)


class Samples:
    """Live reports of one attempt, each one live interval after the previous."""

    def __init__(self, **base):
        self.t = 1_700_000_000.0
        self.base = dict(
            function="mod.f", code_hash="h1", call_id="c1", attempt=1, node_id="node-a", priority=0,
            allocation=Allocation(num_cpus=1.0, memory_bytes=1 * GiB), predicted_memory_upper_bytes=900 * MiB,
            predicted_wall_upper_s=10.0, prediction_source="history", rss_bytes=500 * MiB, peak_rss_bytes=500 * MiB,
            cpu_seconds=1.0, wall_seconds=1.0,
        )
        self.base.update(base)

    def __call__(self, **changes) -> LiveReport:
        self.t += 0.5
        return LiveReport(**{**self.base, "timestamp": self.t, **changes})


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def monitor(tmp_path, clock):
    cfg = RayschedConfig(home=str(tmp_path), monitor_sustain_samples=N, node_memory_sustain_readings=2)
    return Monitor(cfg, store=SpyStore(tmp_path), clock=clock, metrics=RecordingMetrics())


def test_a_stop_is_decided_after_n_samples_and_returned_to_the_worker(monitor, tmp_path):
    s = Samples()
    replies = [monitor.report([s(rss_bytes=int(1.5 * GiB))]) for _ in range(N)]
    assert replies[:-1] == [{}, {}]  # N-1 samples: keep running
    stop = replies[-1]["c1"]
    assert (stop.rule, stop.action, stop.attempt) == ("memory_over_allocation", R.STOP_AND_RESUBMIT, 1)
    # The worker may also poll; the stop stays until the attempt is gone.
    assert monitor.directives(["c1", "unknown"]) == {"c1": stop}
    assert monitor.report([s(rss_bytes=int(1.5 * GiB))]) == {"c1": stop}
    # One event row, read back through raysched's events().
    ev = events(home=str(tmp_path))
    assert list(ev.columns) == EVENT_SCHEMA.names and len(ev) == 1
    row = ev.iloc[0]
    assert (row.function, row.code_hash, row.call_id, row.attempt, row.rule, row.action, row.node_id) == (
        "mod.f", "h1", "c1", 1, "memory_over_allocation", "stop_and_resubmit", "node-a")
    assert row.measured == 1.5 * GiB and row.allocated == 1 * GiB and "next rung" in row.detail
    assert row.timestamp.timestamp() == pytest.approx(stop.timestamp)
    assert monitor.metrics.calls.count(("decided", R.STOP_AND_RESUBMIT)) == 1


def test_n_minus_one_samples_then_clear_is_no_decision_and_no_event(monitor, tmp_path):
    s = Samples()
    batches = [[s(rss_bytes=int(1.5 * GiB))] for _ in range(N - 1)] + [[s()] for _ in range(10)]
    assert all(monitor.report(b) == {} for b in batches)
    assert monitor.directives(["c1"])["c1"].action == R.NONE
    assert monitor.store.writes == 0  # no events for "none"
    assert events(home=str(tmp_path)).empty
    assert not any(c[0] == "decided" for c in monitor.metrics.calls)
    assert monitor.status()["reports_received"] == N - 1 + 10


def test_a_batch_mixes_attempts_and_each_gets_its_own_answer(monitor, tmp_path):
    over, fine = Samples(call_id="big"), Samples(call_id="ok", function="mod.g")
    for _ in range(N):
        reply = monitor.report([over(rss_bytes=2 * GiB), fine()])
    assert set(reply) == {"big"}
    d = monitor.directives(["big", "ok"])
    assert d["big"].stops and d["ok"].action == R.NONE and d["ok"].function == "mod.g"
    assert len(events("mod.f", home=str(tmp_path))) == 1 and events("mod.g", home=str(tmp_path)).empty
    assert events(SimpleNamespace(name="mod.f"), home=str(tmp_path)).call_id.tolist() == ["big"]
    with pytest.raises(InvalidInput):
        events(42, home=str(tmp_path))


def test_hard_cap_stops_with_the_limit_error(tmp_path, clock):
    cfg = RayschedConfig(home=str(tmp_path), monitor_sustain_samples=N, memory_limits={"f": 2 * GiB})
    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics())
    s = Samples()
    for _ in range(N):
        reply = monitor.report([s(rss_bytes=3 * GiB)])
    stop = reply["c1"]
    assert stop.action == R.STOP_LIMIT
    error = stop.limit_error()
    assert isinstance(error, ResourceLimitExceeded) and error.limit == 2 * GiB and "not retried" in str(error)
    assert events(home=str(tmp_path)).action.tolist() == [R.STOP_LIMIT]


def test_warnings_and_cpu_records_are_events_but_not_stops(monitor, tmp_path):
    s = Samples()
    reply = monitor.report([s(wall_seconds=45.0, cpu_seconds=1.0)])
    assert reply == {} and monitor.directives(["c1"])["c1"].action == R.NONE
    assert sorted(events(home=str(tmp_path)).action) == [R.RECORD_CPU, R.WARN]
    monitor.report([s(wall_seconds=46.0, cpu_seconds=1.0)])
    assert len(events(home=str(tmp_path))) == 2  # once per attempt


def test_a_batch_delivered_twice_changes_nothing_and_writes_no_duplicate(monitor, tmp_path):
    s = Samples()
    batches = [[s(rss_bytes=2 * GiB)] for _ in range(N)]
    for b in batches:
        monitor.report(b)
    for b in batches:  # an actor call retried by Ray
        monitor.report(b)
    assert len(events(home=str(tmp_path))) == 1
    # A monitor restarted with no state re-decides the same stop: the event dedupes on its id.
    fresh = Monitor(monitor.config, store=ProfileStore(tmp_path), clock=FakeClock())
    for b in batches:
        fresh.report(b)
    assert len(events(home=str(tmp_path))) == 1
    assert event_row(fresh.directives(["c1"])["c1"])["row_id"] == events(home=str(tmp_path)).row_id.iloc[0]


def test_a_newer_attempt_supersedes_the_stopped_one(monitor):
    first = Samples()
    for _ in range(N):
        monitor.report([first(rss_bytes=2 * GiB)])
    assert monitor.directives(["c1"])["c1"].attempt == 1
    second = Samples(attempt=2, allocation=Allocation(1.0, 4 * GiB, rung=1))
    assert monitor.report([second(rss_bytes=2 * GiB)]) == {}
    d = monitor.directives(["c1"])["c1"]
    assert (d.action, d.attempt) == (R.NONE, 2)
    assert monitor.report([first(rss_bytes=2 * GiB)]) == {}  # a late sample of attempt 1 is ignored
    assert monitor.status()["attempts"] == 1
    assert monitor.status()["running_by_function"] == {second().function: 1}  # attempt 1 ended, 2 runs


def test_silent_attempts_are_forgotten_on_the_clock(monitor, clock):
    monitor.report([Samples(call_id="gone")()])
    clock.advance(monitor.config.monitor_stale_s / 2)
    monitor.report([Samples(call_id="alive")()])
    clock.advance(monitor.config.monitor_stale_s / 2 + 1)
    monitor.report([Samples(call_id="alive")()])
    assert set(monitor.directives(["gone", "alive"])) == {"alive"}
    monitor.forget("alive")
    assert monitor.directives(["alive"]) == {}


def test_an_unwritable_store_keeps_events_and_retries(tmp_path, clock):
    cfg = RayschedConfig(home=str(tmp_path), monitor_sustain_samples=1)
    monitor = Monitor(cfg, store=SpyStore(tmp_path, fail=1), clock=clock, metrics=RecordingMetrics())
    monitor.report([Samples()(rss_bytes=2 * GiB)])  # the decision stands, the write fails
    assert monitor.directives(["c1"])["c1"].stops and monitor.status()["pending_events"] == 1
    monitor.report([Samples(call_id="c2")()])  # next batch: the pending row is written
    assert monitor.status()["pending_events"] == 0 and len(events(home=str(tmp_path))) == 1


# --- node memory pressure -----------------------------------------------------------------------------


class FakeNodes:
    def __init__(self):
        self.fraction: dict[str, float] = {}
        self.reads: list[str] = []
        self.t = 0.0

    def __call__(self, node_id: str) -> NodeMemory | None:
        self.reads.append(node_id)
        self.t += 1
        if node_id not in self.fraction:
            return None
        return NodeMemory(node_id, self.fraction[node_id] * 64 * GiB, 64 * GiB, self.t)


def test_node_pressure_requeues_the_lowest_priority_attempt_first(tmp_path, clock):
    nodes = FakeNodes()
    cfg = RayschedConfig(home=str(tmp_path), node_memory_sustain_readings=2, node_poll_interval_s=5.0)
    monitor = Monitor(cfg, clock=clock, node_reader=nodes, metrics=RecordingMetrics())
    vip, low, other = Samples(call_id="vip", priority=9), Samples(call_id="low", priority=1), \
        Samples(call_id="other", priority=0, node_id="node-b")
    nodes.fraction = {"node-a": 0.96, "node-b": 0.5}

    def tick():
        clock.advance(1.0)
        return monitor.report([vip(), low(), other()])

    replies = [tick() for _ in range(12)]
    # Nodes are read every 5 s of the clock, only those with running attempts.
    assert sorted(set(nodes.reads)) == ["node-a", "node-b"] and len(nodes.reads) == 2 * 2
    stops = [(i, r) for i, r in enumerate(replies) if r]
    assert [sorted(r) for _, r in stops] == [["low"]] * len(stops) and stops[0][0] == 9  # 2nd high read, at 10 s
    d = stops[0][1]["low"]
    assert d.action == R.REQUEUE_LOWEST_PRIORITY and d.node_id == "node-a" and d.measured == pytest.approx(0.96)
    # Never a higher priority on the same node, never a task on a node under no pressure.
    assert {c: d.action for c, d in monitor.directives(["vip", "other"]).items()} == {"vip": R.NONE, "other": R.NONE}
    ev = events(home=str(tmp_path))
    assert ev.action.tolist() == [R.REQUEUE_LOWEST_PRIORITY] and ev.call_id.tolist() == ["low"]
    assert ("node", 0.96) in monitor.metrics.calls


def _high(t: float) -> NodeMemory:
    return NodeMemory("node-a", 0.97 * GiB, GiB, t)


def test_check_node_directly_and_the_next_victim_waits_for_the_first_to_end_and_fresh_readings(tmp_path, clock):
    """The stopped attempt holds its memory until it ends: that relief is on its way, and the
    higher priority is not stopped for it (it was, two readings on, while the first still held 500 MiB)."""
    cfg = RayschedConfig(home=str(tmp_path), node_memory_sustain_readings=2)
    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics())
    a, b = Samples(call_id="a", priority=3), Samples(call_id="b", priority=1)
    monitor.report([a(), b()])
    got = [monitor.check_node(_high(t)) for t in (1.0, 2.0, 3.0, 3.5)]
    assert [d.call_id if d else None for d in got] == [None, "b", None, None]
    monitor.ended([("b", 1, 3.7)])
    got = [monitor.check_node(_high(t)) for t in (4.0, 5.0)]  # still high once it ended: the next gives way
    assert [d.call_id if d else None for d in got] == [None, "a"]
    assert monitor.check_node(_high(5.0)) is None  # the same reading again counts for nothing


def test_a_stopped_attempt_counts_as_relief_only_until_its_worker_would_have_been_killed(tmp_path, clock):
    """It may never report its end (its worker killed for not stopping): after the hard stop's
    time, and a live interval more, the node is judged without it."""
    cfg = RayschedConfig(home=str(tmp_path), node_memory_sustain_readings=2, live_interval_s=0.5,
                         monitor_hard_stop_intervals=2)
    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics())
    a, b = Samples(call_id="a", priority=3), Samples(call_id="b", priority=1)
    monitor.report([a(), b()])
    got = [monitor.check_node(_high(t)) for t in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)]
    # b stopped at 2 s; its 500 MiB counts up to 2 s later ((2 + 2) x 0.5 s); two more readings.
    assert [d.call_id if d else None for d in got] == [None, "b", None, None, None, "a"]


def test_node_readings_far_apart_are_not_in_a_row_and_the_count_stops_at_sustain(tmp_path, clock):
    """Two high readings 40 s apart, nothing between: no stop (they counted as two in a row). A
    node held high by what cannot give way (an actor) keeps its count at ``sustain``, not 10."""
    cfg = RayschedConfig(home=str(tmp_path), node_memory_sustain_readings=2)
    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics())
    monitor.report([Samples(call_id="t", priority=0)()])
    assert monitor.check_node(_high(1.0)) is None
    assert monitor.check_node(_high(41.0)) is None  # more than 2 x node_poll_interval_s later
    assert monitor.check_node(_high(42.0)).call_id == "t"

    rules = build_rules(cfg)
    actor = Samples(call_id="actor:1", kind=R.ACTOR)()
    state = NodeState()
    for t in range(1, 11):
        state, decision = rules.evaluate_node(state, _high(float(t)), [actor])
        assert decision is None
    assert state.streak == cfg.node_memory_sustain_readings


def test_a_call_that_gave_way_resumes_once_its_node_has_room_for_it_held_then_promised(tmp_path, clock):
    """``may_resume``: room on the node for the stopped attempt's expected peak, beside the expected
    peaks of what runs there, in every answer for requeue_room_hold_s; a yes promises that room,
    so another call waiting there is told of it less, until the promise runs out."""
    cfg = RayschedConfig(home=str(tmp_path), node_room_window_s=5.0, requeue_room_hold_s=1.0, live_interval_s=0.5,
                         node_memory_sustain_readings=1)
    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics())
    line = cfg.node_memory_threshold * 16 * GiB  # the room: line - 4 GiB everything else holds
    node = dict(node_total_bytes=16 * GiB)
    a = Samples(call_id="a", priority=0, predicted_memory_upper_bytes=900 * MiB, **node)
    c = Samples(call_id="c", priority=1, predicted_memory_upper_bytes=2 * GiB, **node)
    big = Samples(call_id="big", priority=5, predicted_memory_upper_bytes=line - 4 * GiB - 2.5 * GiB,
                  allocation=Allocation(num_cpus=1.0, memory_bytes=12 * GiB), **node)
    used = 4 * GiB + 500 * MiB + 500 * MiB + 3 * GiB
    monitor.report([s(rss_bytes=r, node_used_bytes=used) for s, r in ((a, 500 * MiB), (c, 500 * MiB), (big, 3 * GiB))])
    assert monitor.may_resume("a", 1) is None  # not stopped
    assert monitor.may_resume("nobody", 1) is None  # never heard of
    # Two high readings (from the endpoint: they do not count for the room) stop "a", then "c".
    stops = [monitor.check_node(NodeMemory("node-a", 15.5 * GiB, 16 * GiB, big.t + dt)) for dt in (1.0, 2.0)]
    assert [d.call_id for d in stops] == ["a", "c"]

    def ask(call_id):
        clock.advance(0.5)
        return monitor.may_resume(call_id, 1)

    # "big" may still grow to its expected peak: 2.5 GiB left, "a" (900 MiB) fits, "c" (2 GiB) too;
    # but not while "big" holds more than that (its worker sends no node reading here).
    assert ask("a") is False  # fits, not yet for a whole second
    monitor.report([big(rss_bytes=int(line - 4 * GiB - 0.5 * GiB))])
    assert ask("a") is False  # 0.5 GiB left: the second starts again
    monitor.report([big(rss_bytes=3 * GiB)])
    assert [ask("a") for _ in range(2)] == [False, False]
    assert ask("a") is True
    # The room promised to "a" (900 MiB) leaves 1.6 GiB: "c" does not fit, until the promise runs
    # out (4 live intervals; "a"'s next attempt never reported), and then only after its own second.
    assert [ask("c") for _ in range(3)] == [False, False, False]
    assert [ask("c") for _ in range(3)] == [False, False, True]
    a2 = Samples(call_id="a", attempt=2, priority=0, predicted_memory_upper_bytes=900 * MiB, **node)
    monitor.report([a2(rss_bytes=400 * MiB, node_used_bytes=used)])
    assert monitor.may_resume("a", 1) is None  # superseded: its next attempt runs
    assert monitor.may_resume("a", 2) is None


# --- metrics, the Prometheus text, the worker's side ------------------------------------------------------


def test_metrics_are_no_ops_outside_ray():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray session is up in this process")
    m = Metrics()
    s = Samples()
    m.observe("mod.f", s())
    m.decided(R.Decision("r", R.STOP_LIMIT, "f", "c", 1))
    m.node(NodeMemory("n", 1, 2))
    assert m.enabled is False


# Captured from a Ray 2.60 node's metrics endpoint (http://<node ip>:<MetricsExportPort>/metrics),
# plus a counter, a histogram bucket and an escaped label to keep the parser honest.
RAY_METRICS = r'''
# HELP ray_node_mem_used_host Host memory usage on a ray node
# TYPE ray_node_mem_used_host gauge
ray_node_mem_used_host{IsHeadNode="true",RayNodeType="head",SessionName="session_2026-11-28_17-48-19_492289_16174",Version="2.60.0",ip="192.0.2.2",otel_scope_name="ray._private.telemetry.open_telemetry_metric_recorder",otel_scope_schema_url="",otel_scope_version=""} 1.619283968e+09
# HELP ray_node_mem_used Memory usage on a ray node
# TYPE ray_node_mem_used gauge
ray_node_mem_used{IsHeadNode="true",RayNodeType="head",SessionName="session_2026-11-28_17-48-19_492289_16174",Version="2.60.0",ip="192.0.2.2",otel_scope_name="ray._private.telemetry.open_telemetry_metric_recorder",otel_scope_schema_url="",otel_scope_version=""} 1.06733568e+09
# HELP ray_node_mem_available Memory available on a ray node
# TYPE ray_node_mem_available gauge
ray_node_mem_available{IsHeadNode="true",RayNodeType="head",SessionName="session_2026-11-28_17-48-19_492289_16174",Version="2.60.0",ip="192.0.2.2",otel_scope_name="ray._private.telemetry.open_telemetry_metric_recorder",otel_scope_schema_url="",otel_scope_version=""} 2.4208728064e+10
# HELP ray_node_mem_total Total memory on a ray node
# TYPE ray_node_mem_total gauge
ray_node_mem_total{IsHeadNode="true",RayNodeType="head",SessionName="session_2026-11-28_17-48-19_492289_16174",Version="2.60.0",ip="192.0.2.2",otel_scope_name="ray._private.telemetry.open_telemetry_metric_recorder",otel_scope_schema_url="",otel_scope_version=""} 2.5276063744e+10
ray_tasks_total{State="FINISHED",Name="f \"quoted\"",ip="192.0.2.2"} 12
ray_latency_bucket{le="+Inf"} 3
this line is not a sample
'''


def test_parse_prometheus_text():
    samples = parse_prometheus(RAY_METRICS)
    names = [n for n, _, _ in samples]
    assert names == ["ray_node_mem_used_host", "ray_node_mem_used", "ray_node_mem_available", "ray_node_mem_total",
                     "ray_tasks_total", "ray_latency_bucket"]
    _, labels, value = samples[4]
    assert labels == {"State": "FINISHED", "Name": 'f "quoted"', "ip": "192.0.2.2"} and value == 12.0
    assert samples[5][1] == {"le": "+Inf"}
    assert parse_prometheus(RAY_METRICS, ["ray_node_mem_total"]) == [
        ("ray_node_mem_total", samples[3][1], 2.5276063744e10)]


def test_node_memory_from_a_captured_endpoint():
    reading = node_memory_from_metrics(RAY_METRICS, "node-a", ip="192.0.2.2", timestamp=5.0)
    assert reading == NodeMemory("node-a", 1.06733568e9, 2.5276063744e10, 5.0)
    assert reading.fraction == pytest.approx(0.0422, abs=1e-4)
    assert node_memory_from_metrics(RAY_METRICS, "node-a", ip="10.9.9.9") is None  # another node's series
    assert node_memory_from_metrics("ray_node_mem_used 5\n", "n") is None  # no total
    assert node_memory_from_metrics("ray_node_mem_used 5\nray_node_mem_total 0\n", "n") is None


def test_report_from_a_worker_spec_and_live_sample():
    est = lambda v: Estimate(v, v, v * 2, 0.95, 5, "history")  # noqa: E731
    spec = SimpleNamespace(function="mod.f", code_hash="h", call_id="c", attempt=2, priority=4,
                           allocation=Allocation(2.0, GiB, rung=1), config=RayschedConfig(max_attempts=6),
                           largest_node_bytes=16 * GiB,
                           prediction=Prediction(memory=est(100.0), cpu=est(1.0), wall=est(3.0), source="history"))
    sample = LiveSample(rss_bytes=10, peak_rss_bytes=20, cpu_seconds=1.5, wall_seconds=2.0, read_bytes=3,
                        write_bytes=4, timestamp=99.0)
    r = report_from(spec, sample, "node-x")
    # The node's memory rides along, read on this machine when the sample was reported.
    assert 0 < r.node_used_bytes < r.node_total_bytes
    assert r.node_memory().node_id == "node-x" and r.node_memory().timestamp == 99.0
    assert replace(r, node_used_bytes=None, node_total_bytes=None, node_kill_threshold=None) == LiveReport(
        "mod.f", "h", "c", 2, "node-x", 4, Allocation(2.0, GiB, rung=1), 200.0, 6.0, "history",
        10, 20, 1.5, 2.0, 3, 4, 99.0, max_attempts=6, wall_source="history",  # the function's own max_attempts
        largest_node_bytes=16 * GiB)  # what its next rung must fit beside its label on
    assert r.key == ("c", 2) and r.cpu_cores == 0.75
    assert replace(r, wall_seconds=0).cpu_cores == 0.0


# --- the worker's side -----------------------------------------------------------------------------------


class FakeMonitorCall:
    """send/resolve over a plain Monitor, with answers that arrive only when released."""

    def __init__(self, monitor: Monitor):
        self.monitor, self.sent, self.ready, self.fail_send = monitor, [], False, False

    def send(self, batch):
        if self.fail_send:
            raise ConnectionError("monitor restarting")
        self.sent.append(list(batch))
        return self.monitor.report(batch)

    def resolve(self, answer):
        return answer if self.ready else None


def test_live_reporter_batches_never_waits_and_keeps_directives(monitor, clock):
    from raysched.runtime.monitor import LiveReporter

    call = FakeMonitorCall(monitor)
    reporter = LiveReporter(call.send, call.resolve, interval_s=0.5, clock=clock)
    a, b = Samples(call_id="a"), Samples(call_id="b")
    call.fail_send = True
    reporter.add(a(rss_bytes=2 * GiB))  # the monitor is away: kept for the next try
    call.fail_send = False
    clock.advance(0.5)
    reporter.add(b())
    assert [len(batch) for batch in call.sent] == [2]
    for _ in range(N):
        clock.advance(0.5)
        reporter.add(a(rss_bytes=2 * GiB))  # the answer is not in yet: buffered, one batch in flight
    assert len(call.sent) == 1 and reporter.directive("a", 1) is None
    call.ready = True
    clock.advance(0.5)
    reporter.add(b())  # the first answer lands, the backlog goes out in one batch
    assert [len(batch) for batch in call.sent] == [2, N + 1]
    clock.advance(0.5)
    reporter.add(b())  # ... and its answer: a's stop
    stop = reporter.directive("a", 1)
    assert stop is not None and stop.action == R.STOP_AND_RESUBMIT
    assert reporter.directive("a", 2) is None and reporter.directive("b", 1) is None
    reporter.ended("a", 1, 0.0)
    assert reporter.directive("a", 1) is None


def test_the_monitor_learns_each_nodes_ray_kill_threshold_from_its_workers_reports(tmp_path, clock):
    """Workers inherit their raylet's RAY_memory_usage_threshold and report it; node readings use it."""
    from raysched.runtime.monitor import ray_kill_threshold

    assert ray_kill_threshold({"RAY_memory_usage_threshold": "0.3"}) == 0.3
    assert ray_kill_threshold({}) is None
    assert ray_kill_threshold({"RAY_memory_usage_threshold": "lots"}) is None
    assert ray_kill_threshold({"RAY_memory_usage_threshold": "1.5"}) is None
    nodes = FakeNodes()
    cfg = RayschedConfig(home=str(tmp_path), node_memory_sustain_readings=2, node_poll_interval_s=5.0)
    monitor = Monitor(cfg, clock=clock, node_reader=nodes, metrics=RecordingMetrics())
    low = Samples(call_id="low", priority=1, node_kill_threshold=0.30)
    nodes.fraction = {"node-a": 0.295}  # far below raysched's 0.9, just below Ray's 0.30

    replies = []
    for _ in range(12):
        clock.advance(1.0)
        replies.append(monitor.report([low()]))
    stopped = [r["low"] for r in replies if r]
    assert stopped and stopped[0].action == R.REQUEUE_LOWEST_PRIORITY
    assert stopped[0].allocated == pytest.approx(0.30 - cfg.node_kill_margin)


def test_a_node_is_judged_every_second_from_its_workers_own_readings(tmp_path, clock):
    """Without waiting for the metrics endpoint (~5 s): the workers' readings ride on their live samples."""
    cfg = RayschedConfig(home=str(tmp_path), node_memory_sustain_readings=2, node_sample_interval_s=1.0)
    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics())  # no endpoint reader at all
    total = 64 * GiB
    vip = Samples(call_id="vip", priority=9, node_used_bytes=0.5 * total, node_total_bytes=total)
    low = Samples(call_id="low", priority=1, node_used_bytes=0.5 * total, node_total_bytes=total)
    for _ in range(6):  # a calm node: nothing
        clock.advance(0.5)
        assert monitor.report([vip(), low()]) == {}
    replies = []
    for _ in range(6):  # the node fills up; samples every 0.5 s, the node judged once a second
        clock.advance(0.5)
        replies.append(monitor.report([vip(node_used_bytes=0.96 * total), low(node_used_bytes=0.96 * total)]))
    stopped_at = [i for i, r in enumerate(replies) if r]
    assert stopped_at and stopped_at[0] <= 3  # the 2nd high judgement, within ~2 s
    first = replies[stopped_at[0]]
    assert list(first) == ["low"] and first["low"].action == R.REQUEUE_LOWEST_PRIORITY
    assert first["low"].measured == pytest.approx(0.96)
    assert monitor.directives(["vip"])["vip"].action == R.NONE


@pytest.mark.parametrize("projection", [True, False])
def test_a_climbing_node_is_relieved_from_its_workers_readings_before_ray_kills(tmp_path, clock, projection):
    """Two tasks on a 16 GiB node whose Ray kills at 50%, the node climbing 1 GiB/s: the workers'
    readings carry the rate, and the monitor keeps the last one between its judgements."""
    cfg = RayschedConfig(home=str(tmp_path), node_memory_projection=projection)
    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics())
    total, label = 16 * GiB, int(3.5 * GiB)
    tasks = [Samples(call_id=c, priority=0, node_total_bytes=total, node_kill_threshold=0.5,
                     allocation=Allocation(1.0, int(1.15 * label)), predicted_memory_upper_bytes=label,
                     wall_seconds=w) for c, w in (("a", 9.0), ("b", 1.0))]
    first_stop = None
    for tick in range(14):  # a live sample every 0.5 s; each task grows 0.25 GiB per sample
        clock.advance(0.5)
        rss = min(0.2 * GiB + tick * 0.25 * GiB, label)
        used = 4 * GiB + 2 * rss
        reply = monitor.report([t(rss_bytes=int(rss), node_used_bytes=used) for t in tasks])
        if reply and first_stop is None:
            first_stop = (used, reply)
    assert first_stop is not None
    used, reply = first_stop
    if projection:  # decided while the node is still under Ray's 8 GiB, and the newer task gives way
        assert used < 8 * GiB and list(reply) == ["b"] and "going to" in reply["b"].detail
    else:  # judged by each reading as it is, the stop comes once the node is past Ray's line
        assert used > 8 * GiB and "going to" not in reply["b"].detail


def test_node_memory_here_reads_this_machine():
    from raysched.runtime.monitor import node_memory_here

    here = node_memory_here()
    assert 0 < here["node_used_bytes"] < here["node_total_bytes"]


def test_a_decision_the_driver_took_is_an_event_but_not_logged_again(monitor, tmp_path, caplog):
    """The monitor's lines reach the driver too: an echo of the driver's own rescale read as a second one."""
    import logging

    rescaled = R.Decision(R.ACTOR_RESCALED, R.RESCALE, "mod.Acc", "actor-1:2", 2, detail="240 MiB -> 1440 MiB")
    with caplog.at_level(logging.INFO, logger="raysched.runtime.monitor"):
        monitor.note([rescaled])
    assert "mod.Acc" not in caplog.text
    events = ProfileStore(tmp_path).events()
    assert list(events["rule"]) == [R.ACTOR_RESCALED]


def test_a_nodes_room_comes_from_its_workers_readings_median_of_the_window(tmp_path, clock):
    """What the node uses besides raysched's attempts, from the workers' own readings; an attempt
    whose last sample is older than the reading (it ended) is not taken off; the median of the
    window is given, so that one reading's error moves it little; a node gone quiet keeps its
    last window's room for monitor_stale_s; the metrics endpoint (another measure) never counts."""
    cfg = RayschedConfig(home=str(tmp_path), node_room_window_s=5.0, monitor_stale_s=60.0)

    def node_reader(node_id):  # a cgroup's use, far below what Ray's killer sees
        return NodeMemory(node_id, 0.1 * GiB, 16 * GiB, source=R.METRICS_READING)

    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics(), node_reader=node_reader)
    line = (0.5 - cfg.node_kill_margin) * 16 * GiB  # Ray kills at 50%
    a = Samples(call_id="a", node_total_bytes=16 * GiB, node_kill_threshold=0.5)
    b = Samples(call_id="b", node_total_bytes=16 * GiB, node_kill_threshold=0.5)
    # Two attempts of 1 GiB each, the node at 6 GiB: everything else holds 4 GiB.
    monitor.report([a(rss_bytes=1 * GiB, node_used_bytes=6 * GiB), b(rss_bytes=1 * GiB, node_used_bytes=6 * GiB)])
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - 4 * GiB)}
    # "b" ends (its memory freed, its last sample stays); "a"'s next reading, 1 s on, is not
    # set against "b"'s old sample: 5 GiB used, 1 GiB of it "a"'s.
    clock.advance(1.0)
    a.t += 0.5
    monitor.report([a(rss_bytes=1 * GiB, node_used_bytes=5 * GiB)])
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - 4 * GiB)}
    # One reading 1 GiB off moves the median little; a change that lasts moves it.
    clock.advance(1.0)
    monitor.report([a(rss_bytes=1 * GiB, node_used_bytes=6 * GiB)])
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - 4 * GiB)}
    for _ in range(2):
        clock.advance(1.0)
        monitor.report([a(rss_bytes=1 * GiB, node_used_bytes=6 * GiB)])
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - 5 * GiB)}  # 3 of the 5
    # The node goes quiet (the monitor's own endpoint poll comes due meanwhile): its last
    # window's room holds, also once its attempts (whose memory was taken off the readings)
    # are forgotten, until it is read again; a node never read is left out.
    clock.advance(30.0)
    monitor.poll_nodes()
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - 5 * GiB)}
    clock.advance(31.0)
    monitor.report([])  # (a sweep: "a" is forgotten)
    assert monitor.status()["attempts"] == 0
    clock.advance(600.0)
    assert monitor.node_rooms(["node-a", "node-b"]) == {"node-a": pytest.approx(line - 5 * GiB)}
    monitor.report([a(rss_bytes=0.5 * GiB, node_used_bytes=4.5 * GiB)])
    clock.advance(monitor.config.node_room_window_s)
    monitor.report([a(rss_bytes=0.5 * GiB, node_used_bytes=4.5 * GiB)])
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - 4 * GiB)}  # read again
    quiet = Monitor(cfg, clock=clock, metrics=RecordingMetrics(), node_reader=node_reader)
    quiet.poll_nodes(), quiet.check_node(node_reader("node-a"))
    assert quiet.node_rooms(["node-a"]) == {}


def test_a_nodes_room_left_takes_off_what_its_running_attempts_are_expected_to_hold(tmp_path, clock):
    """Two attempts expected to hold 900 MiB each hold 500 MiB now: more calls may hold the room
    less 1.8 GiB (a driver sets that against the labels Ray can still place there)."""
    cfg = RayschedConfig(home=str(tmp_path), node_room_window_s=5.0)
    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics())
    a = Samples(call_id="a", node_total_bytes=16 * GiB, node_kill_threshold=0.5)
    b = Samples(call_id="b", node_total_bytes=16 * GiB, node_kill_threshold=0.5)
    monitor.report([a(node_used_bytes=5 * GiB), b(node_used_bytes=5 * GiB)])
    room = monitor.node_rooms(["node-a"])["node-a"]
    assert monitor.node_rooms_left(["node-a", "node-b"]) == {"node-a": pytest.approx(room - 1800 * MiB)}


def test_the_monitor_reads_its_own_node_for_its_room_before_any_task_runs_there(tmp_path, clock):
    """A driver asks for the rooms before a batch, when no worker of the node has read it yet:
    the monitor's node is read by the monitor itself, at most every node_sample_interval_s,
    and its readings count as a worker's would (set against the attempts running then)."""
    cfg = RayschedConfig(home=str(tmp_path), node_sample_interval_s=1.0)
    readings = []

    def own_node():
        readings.append(clock())
        return NodeMemory("node-a", 6 * GiB, 16 * GiB, timestamp=clock(), kill_threshold=0.5,
                          source=R.WORKER_READING)

    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics(), own_node=own_node)
    line = (0.5 - cfg.node_kill_margin) * 16 * GiB
    assert monitor.node_rooms(["node-a", "node-b"]) == {"node-a": pytest.approx(line - 6 * GiB)}
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - 6 * GiB)}
    assert len(readings) == 1  # not read again within the interval
    clock.advance(1.0)
    monitor.node_rooms(["node-a"])
    assert len(readings) == 2
    # Without its own reader (or unreadable) a node nobody read is left out, as before.
    assert Monitor(cfg, clock=clock, metrics=RecordingMetrics(), own_node=lambda: None).node_rooms(["node-a"]) == {}


def test_idle_workers_count_as_reusable_room_only_on_a_quiet_node(tmp_path, clock):
    """The monitor's own node with 1 GiB of idle workers: reusable while nothing of raysched's runs
    there; once an attempt runs, its readings count them as any other program (a room set from
    them mid-batch let the queue admit what the node's other work then took back)."""
    cfg = RayschedConfig(home=str(tmp_path), node_sample_interval_s=1.0, node_room_window_s=0.5)

    def own_node():
        return NodeMemory("node-a", 6 * GiB, 16 * GiB, timestamp=clock(), kill_threshold=0.5,
                          source=R.WORKER_READING, idle_workers_bytes=1 * GiB)

    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics(), own_node=own_node)
    line = (0.5 - cfg.node_kill_margin) * 16 * GiB
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - 5 * GiB)}
    a = Samples(call_id="a", node_total_bytes=16 * GiB, node_kill_threshold=0.5)
    monitor.report([a(rss_bytes=0, node_used_bytes=6 * GiB)])  # (holding nothing yet)
    clock.advance(1.0)
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - 6 * GiB)}


def test_a_node_probe_waits_little_and_hands_each_reading_over_once(clock):
    """RayNodeProbe with a fake launch: a call starts a probe (at most every interval_s) and
    returns what an ended probe read, once, its own if it answers within wait_s; a failed
    probe is no reading."""
    launched: list[str] = []
    results: dict[int, object] = {}

    def launch(node_id):
        launched.append(node_id)
        return len(launched) - 1  # the probe's "ref"

    probe = RayNodeProbe(interval_s=1.0, clock=clock, launch=launch, ready=lambda ref, timeout_s: results.get(ref, False))
    assert probe("n") is None and launched == ["n"]
    assert probe("n") is None and launched == ["n"]  # still running: nothing, and no second probe
    results[0] = NodeMemory("n", 3 * GiB, 16 * GiB, source=R.WORKER_READING)
    assert probe("n") == results[0]  # ended: its reading; not due again within interval_s
    assert probe("n") is None and launched == ["n"]
    clock.advance(1.0)
    assert probe("n") is None and launched == ["n", "n"]
    results[1] = None  # the node died under it
    clock.advance(1.0)
    assert probe("n") is None and launched == ["n", "n", "n"]
    results[2] = NodeMemory("other", 1 * GiB, 16 * GiB, source=R.WORKER_READING)  # not the node asked of
    clock.advance(1.0)
    assert probe("n") is None and launched == ["n", "n", "n", "n"]
    # A probe that never ends is given up after give_up_s, and the node probed again.
    clock.advance(29.0)
    assert probe("n") is None and len(launched) == 4
    clock.advance(1.0)
    assert probe("n") is None and len(launched) == 5
    # A probe that answers within wait_s is handed over by the call that started it.
    clock.advance(1.0)
    results[4] = None  # (failed)
    results[5] = NodeMemory("n", 2 * GiB, 16 * GiB, source=R.WORKER_READING)
    assert probe("n") == results[5] and len(launched) == 6


def test_idle_ray_workers_memory_is_summed_from_the_processes_titled_so():
    from raysched.runtime.monitor import idle_worker_bytes

    class Process:
        def __init__(self, cmdline, uss, readable=True):
            self.info, self._uss, self._readable = {"cmdline": cmdline}, uss, readable

        def memory_full_info(self):
            if not self._readable:
                raise PermissionError("not ours")
            return SimpleNamespace(uss=self._uss)

    found = [Process(["ray::IDLE", "", ""], 45 * MiB), Process(["ray::IDLE"], 50 * MiB),
             Process(["ray::IDLE"], 60 * MiB, readable=False), Process(["ray::bench_task"], 900 * MiB),
             Process(["python", "x.py"], 100 * MiB), Process(None, 1 * MiB), Process([], 1 * MiB)]
    assert idle_worker_bytes(found) == 95 * MiB
    assert idle_worker_bytes() >= 0.0  # this machine's (none here, most likely)


def test_a_quiet_node_is_probed_for_its_room_not_judged_by_the_room_it_last_had(tmp_path, clock):
    """The node's workers read it while raysched's tasks run there; once none does, a probe's
    reading gives its room: here everything else on it grew by 1 GiB meanwhile, which the room
    kept from the last batch did not know.  A node its workers read, and the monitor's own node,
    are not probed."""
    cfg = RayschedConfig(home=str(tmp_path), node_room_window_s=5.0, monitor_stale_s=60.0,
                         node_sample_interval_s=1.0)
    probed: list[str] = []
    answers: dict[str, NodeMemory] = {}

    def node_probe(node_id):
        probed.append(node_id)
        return answers.pop(node_id, None)

    def own_node():
        return NodeMemory("head", 1 * GiB, 16 * GiB, timestamp=clock(), kill_threshold=0.5, source=R.WORKER_READING)

    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics(), own_node=own_node, node_probe=node_probe)
    line = (0.5 - cfg.node_kill_margin) * 16 * GiB
    a = Samples(call_id="a", node_total_bytes=16 * GiB, node_kill_threshold=0.5)
    monitor.report([a(rss_bytes=1 * GiB, node_used_bytes=5 * GiB)])  # everything else: 4 GiB
    assert monitor.node_rooms(["node-a", "head"]) == {"node-a": pytest.approx(line - 4 * GiB),
                                                      "head": pytest.approx(line - 1 * GiB)}
    assert probed == []  # its worker read it just now; the head is the monitor's own
    # "a" runs on, its reports late: the node is its workers' to read, not a probe's.
    clock.advance(3.0)
    monitor.node_rooms(["node-a"])
    assert probed == []
    # "a" ends; the node goes quiet, and something else takes 1 GiB there.
    monitor.ended([("a", 1, a.t + 0.1)])
    clock.advance(27.0)
    monitor.report([])
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - 4 * GiB)}  # the probe is on
    assert probed == ["node-a"]
    answers["node-a"] = NodeMemory("node-a", 5 * GiB, 16 * GiB, timestamp=time.time(), kill_threshold=0.5,
                                   source=R.WORKER_READING)
    clock.advance(2.0)
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - 5 * GiB)}
    # Other work there ends: the newest probe's reading alone gives the room (a median over the
    # window's readings would still count the work that ended).
    for used in (6 * GiB, 6 * GiB, 2 * GiB):
        answers["node-a"] = NodeMemory("node-a", used, 16 * GiB, timestamp=time.time(), kill_threshold=0.5,
                                       source=R.WORKER_READING)
        clock.advance(1.0)
        monitor.node_rooms(["node-a"])
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - 2 * GiB)}
    assert probed.count("node-a") == 5


def test_a_reading_is_set_against_what_the_other_attempts_held_at_its_time(tmp_path, clock):
    """Two tasks growing 1 GiB/s whose workers sample a quarter of a second apart: "a"'s reading
    is set against "b"'s size then, between its samples, not against its last one; judged by
    "b"'s last sample alone, everything else would look 256 MiB off."""
    cfg = RayschedConfig(home=str(tmp_path), node_room_window_s=5.0)
    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics())
    line = cfg.node_memory_threshold * 16 * GiB
    others = 4 * GiB  # everything but the two tasks
    base = dict(node_total_bytes=16 * GiB, node_used_bytes=None)
    t0 = 1_700_000_000.0

    def size(t):  # both grow 1 GiB/s from 0.25 GiB at t0
        return int(0.25 * GiB + (t - t0) * GiB)

    a, b = Samples(call_id="a", **base), Samples(call_id="b", **base)
    for step in range(5):
        tb, ta = t0 + 0.5 * step - 0.25, t0 + 0.5 * step
        clock.advance(0.25)
        monitor.report([b(timestamp=tb, rss_bytes=size(tb))])  # "b"'s worker sends no reading
        if step < 4:
            clock.advance(0.25)
            used_a = others + size(ta) + size(ta)  # at ta, "b" is as big as "a"
            monitor.report([a(timestamp=ta, rss_bytes=size(ta), node_used_bytes=used_a)])
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - others, rel=1e-6)}


def test_an_attempt_that_ended_frees_its_room_at_its_end_and_is_no_victim(tmp_path, clock):
    """A worker says when a watched attempt ends: readings after that no longer count its memory
    (freed), readings before still do; the node rule no longer picks it."""
    from raysched.runtime.monitor import LiveReporter

    cfg = RayschedConfig(home=str(tmp_path), node_room_window_s=5.0)
    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics())
    ends: list = []
    call = FakeMonitorCall(monitor)
    call.ready = True

    def send_ended(batch):
        ends.extend(batch)
        monitor.ended(batch)

    reporter = LiveReporter(call.send, call.resolve, interval_s=0.0, clock=clock, send_ended=send_ended)
    line = cfg.node_memory_threshold * 16 * GiB
    a = Samples(call_id="a", node_total_bytes=16 * GiB)
    big = Samples(call_id="big", node_total_bytes=16 * GiB)
    reporter.add(big(rss_bytes=3 * GiB, node_used_bytes=8 * GiB))
    clock.advance(0.1)
    reporter.add(a(rss_bytes=1 * GiB, node_used_bytes=8 * GiB))  # everything else: 4 GiB
    reporter.ended("big", 1, big.t + 0.1)  # "big" ends right after: its 3 GiB are freed
    reporter.ended("never-reported", 1, big.t)  # too short to be watched: the monitor never hears of it
    assert ends == [("big", 1, big.t + 0.1)]
    assert monitor.status()["running_by_function"] == {"mod.f": 1}
    clock.advance(1.0)
    a.t += 0.1
    reporter.add(a(rss_bytes=1 * GiB, node_used_bytes=5 * GiB))  # within 0.75 s of big's last sample
    # Both readings say everything else holds 4 GiB: the first counts "big" (still running
    # then), the second does not (it had ended), though its last sample is near.
    assert monitor.node_rooms(["node-a"]) == {"node-a": pytest.approx(line - 4 * GiB)}
    # The node rule no longer sees it: a node over its line stops "a", not the ended "big".
    for _ in range(3):
        clock.advance(1.0)
        reply = monitor.report([a(rss_bytes=1 * GiB, node_used_bytes=15.5 * GiB)])
    assert list(reply) == ["a"]


def test_a_call_that_gave_way_is_resubmitted_only_where_another_node_has_its_labels_free(monkeypatch):
    """The worker's choice after a requeue: wait for room on its node, unless another node has the
    call's CPUs, `memory` and custom resources free now (or its options place it themselves)."""
    pytest.importorskip("ray")
    import ray._private.state

    from raysched.runtime import worker
    from raysched.runtime.spec import AttemptSpec

    estimate = Estimate(target=1.0, lower=1.0, upper=1.0, coverage=0.9, n_history=0)

    def spec(**ray_options):
        return AttemptSpec(function="f", code_hash="h", call_id="c0", attempt=1, features=Features(input_size=0),
                           prediction=Prediction(memory=estimate, cpu=estimate, wall=estimate, source="fallback"),
                           allocation=Allocation(num_cpus=1.0, memory_bytes=2 * GiB), config=RayschedConfig(),
                           ray_options=tuple(ray_options.items()))

    free = {"here": {"CPU": 2.0, "memory": 8.0 * GiB}, "there": {"CPU": 1.0, "memory": 1.0 * GiB, "ssd": 1.0}}
    monkeypatch.setattr(ray._private.state, "available_resources_per_node", lambda: free)
    monkeypatch.setattr(worker, "_node_id", lambda: "here")
    assert not worker._free_labels_elsewhere(spec())  # only this node has 2 GiB free
    free["there"]["memory"] = 2.0 * GiB
    assert worker._free_labels_elsewhere(spec())
    assert worker._free_labels_elsewhere(spec(resources={"ssd": 1.0}))
    assert not worker._free_labels_elsewhere(spec(resources={"ssd": 2.0}))
    assert not worker._free_labels_elsewhere(spec(scheduling_strategy="SPREAD"))
    assert not worker._free_labels_elsewhere(spec(label_selector={"tier": "small"}))
    monkeypatch.setattr(ray._private.state, "available_resources_per_node", lambda: 1 / 0)
    assert not worker._free_labels_elsewhere(spec())  # cannot tell: wait here


def test_a_call_that_gave_way_waits_for_the_monitors_yes_and_resubmits_when_it_cannot_tell(monkeypatch):
    """The worker's wait (``_wait_for_room_here``) against a fake monitor and a fake KV: it
    returns once the monitor says yes, or at handover_start_timeout_s; None (resubmit) when the
    monitor cannot tell; while it waits the hand-over marker is up, and it is taken down when
    the wait ends by None or by a cancellation."""
    pytest.importorskip("ray")
    import ray

    from raysched.runtime import worker
    from raysched.runtime.spec import AttemptSpec

    estimate = Estimate(target=1.0, lower=1.0, upper=1.0, coverage=0.9, n_history=0)
    cfg = RayschedConfig(live_interval_s=0.01, handover_start_timeout_s=0.3)
    spec = AttemptSpec(function="f", code_hash="h", call_id="c0", attempt=1, features=Features(input_size=0),
                       prediction=Prediction(memory=estimate, cpu=estimate, wall=estimate, source="fallback"),
                       allocation=Allocation(num_cpus=1.0, memory_bytes=GiB), config=cfg)
    next_spec = replace(spec, attempt=2)
    kv: dict[str, bytes] = {}
    asked: list[tuple[str, int]] = []
    answers: list = []

    class FakeMonitor:
        class may_resume:  # noqa: N801 - as Ray's actor method handle
            @staticmethod
            def remote(call_id, attempt):
                asked.append((call_id, attempt))
                answer = answers.pop(0) if answers else False
                if isinstance(answer, BaseException):
                    raise answer
                return answer

    monkeypatch.setattr(worker, "_free_labels_elsewhere", lambda s: False)
    monkeypatch.setattr(worker, "_kv_put", lambda key, value: kv.__setitem__(key, value) or True)
    monkeypatch.setattr(worker, "_kv_del", lambda key: kv.pop(key, None))
    monkeypatch.setattr(ray, "get_actor", lambda name, namespace=None: FakeMonitor)
    monkeypatch.setattr(ray, "get", lambda answer, timeout=None: answer)
    marker = worker._handover_key(spec)

    answers[:] = [False, False, True]
    waited = worker._wait_for_room_here(spec, next_spec)
    assert waited is not None and waited < 0.3 and asked == [("c0", 1)] * 3
    assert marker in kv  # still up: the attempt run in place takes it down (_run_in_place)
    kv.clear()
    answers[:] = []  # never yes: it runs after the timeout
    assert worker._wait_for_room_here(spec, next_spec) >= 0.3
    kv.clear()
    answers[:] = [False, None]  # the monitor forgot the attempt: resubmit
    assert worker._wait_for_room_here(spec, next_spec) is None and marker not in kv
    answers[:] = [RuntimeError("actor restarting")]
    assert worker._wait_for_room_here(spec, next_spec) is None and marker not in kv
    answers[:] = [False, KeyboardInterrupt()]  # cancelled while it waits
    with pytest.raises(KeyboardInterrupt):
        worker._wait_for_room_here(spec, next_spec)
    assert marker not in kv
    # Off, or the call's task holds a smaller label than its next attempt needs: resubmit at once.
    asked.clear()
    assert worker._wait_for_room_here(replace(spec, config=cfg.replace(requeue_room_hold_s=None)), next_spec) is None
    bigger = replace(next_spec, allocation=Allocation(num_cpus=1.0, memory_bytes=2 * GiB))
    assert worker._wait_for_room_here(spec, bigger) is None and asked == []


def test_a_handed_over_attempt_that_died_as_it_started_counts_as_started_and_is_not_run_twice(monkeypatch):
    """An attempt whose task died before its first live sample (a crash at once) looked
    like one that never got room: the waiting task ran it a second time in its own place
    after handover_start_timeout_s, beside the dead task's retry. Its task now marks its start."""
    pytest.importorskip("ray")
    import ray

    from raysched.runtime import worker
    from raysched.runtime.spec import AttemptSpec

    estimate = Estimate(target=1.0, lower=1.0, upper=1.0, coverage=0.9, n_history=0)
    spec = AttemptSpec(function="f", code_hash="h", call_id="c0", attempt=2, features=Features(input_size=0),
                       prediction=Prediction(memory=estimate, cpu=estimate, wall=estimate, source="fallback"),
                       allocation=Allocation(num_cpus=1.0, memory_bytes=GiB), config=RayschedConfig())
    kv: dict[str, bytes] = {}

    class FakeKV:
        @staticmethod
        def _internal_kv_get(key, namespace=None):
            return kv.get(key)

    monkeypatch.setattr(worker, "_kv", lambda: FakeKV)
    monkeypatch.setattr(worker, "_kv_put", lambda key, value: kv.__setitem__(key, value) or True)
    monkeypatch.setattr(worker, "_room_held_by_waiting", lambda need, own_key: False)
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: ([], refs))  # its ref: still pending (a retry runs)
    started = time.monotonic()
    assert not worker._started_within("ref", spec, 0.3, 3.0, "own")  # no sample, no mark: not started
    assert time.monotonic() - started >= 0.3
    worker._mark_started(spec)  # what its task's entry does first
    assert worker._started_within("ref", spec, 30.0, 3.0, "own")


def test_a_handed_over_attempt_ray_killed_without_a_retry_is_recorded_and_climbed_from(monkeypatch):
    """Ray's legacy killing policy (before Ray 2.56, or RAY_worker_killing_policy_by_group)
    kills the last task of its caller without a retry, and a handed-over attempt is its
    waiting task's only one: no ``recover`` ran for it, and the waiting task ended with Ray's
    OutOfMemoryError, the attempt's row lost. It now records the attempt and climbs from it."""
    pytest.importorskip("ray")
    import ray

    from raysched.errors import AttemptsExhausted
    from raysched.runtime import worker
    from raysched.runtime.spec import AttemptSpec

    estimate = Estimate(target=400 * MiB, lower=300 * MiB, upper=500 * MiB, coverage=0.9, n_history=5)
    first = AttemptSpec(function="f", code_hash="h", call_id="c0", attempt=1, features=Features(input_size=0),
                        prediction=Prediction(memory=estimate, cpu=estimate, wall=estimate, source="history"),
                        allocation=Allocation(num_cpus=1.0, memory_bytes=352 * MiB),
                        config=RayschedConfig(max_attempts=3), max_peak_seen=3 * GiB)
    killed_first = worker.AttemptRecord(1, first.allocation, worker.Outcome.OOM_KILLED, None, "killed")
    second = replace(first, attempt=2, allocation=Allocation(num_cpus=1.0, memory_bytes=GiB),
                     prior=(killed_first,))
    kv: dict[str, bytes] = {}
    rows: list[dict] = []
    submitted: list[AttemptSpec] = []
    outcomes: list = []

    def get(ref, timeout=None):
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(worker, "_kv_put", lambda key, value: kv.__setitem__(key, value) or True)
    monkeypatch.setattr(worker, "_kv_get", lambda key: kv.get(key))
    monkeypatch.setattr(worker, "_kv_del", lambda key: kv.pop(key, None))
    monkeypatch.setattr(worker, "_labels_of_waiting_tasks", lambda call_id: 0.0)
    monkeypatch.setattr(worker, "get_sink", lambda config: SimpleNamespace(add=rows.append, flush=lambda wait_s: True))
    monkeypatch.setattr(ray, "get", get)

    def resubmit(spec, args, kwargs):
        submitted.append(spec)
        return f"ref-{spec.attempt}"

    outcomes[:] = [ray.exceptions.OutOfMemoryError("killed, not retried"), 42]
    assert worker._hand_over(first, second, (), {}, resubmit, run_here=None) == 42
    assert [s.attempt for s in submitted] == [2, 3]
    assert submitted[1].allocation.memory_bytes > second.allocation.memory_bytes  # one rung up
    assert [o.attempt for o in submitted[1].prior] == [1, 2]
    assert [(r["attempt"], r["outcome"]) for r in rows] == [(2, "oom_killed")]
    assert "did not retry" in rows[0]["error"] and not kv  # no marker left behind

    # At max_attempts: the call ends with raysched's error, naming every attempt.
    rows.clear()
    outcomes[:] = [ray.exceptions.OutOfMemoryError("killed, not retried")]
    last = replace(first, config=RayschedConfig(max_attempts=2))
    with pytest.raises(AttemptsExhausted) as info:
        worker._hand_over(last, replace(second, config=last.config), (), {}, resubmit, run_here=None)
    assert [a.attempt for a in info.value.attempts] == [1, 2] and len(rows) == 1

    # The attempt's own code raised OutOfMemoryError (a child of its own was killed): Ray
    # hands it over as RayTaskError(OutOfMemoryError), an instance of both. It is the
    # call's error, as any other: no kill recorded, nothing resubmitted (a helper's audit).
    rows.clear(), submitted.clear()
    raised = ray.exceptions.RayTaskError("f", "traceback", ray.exceptions.OutOfMemoryError("a child")).as_instanceof_cause()
    outcomes[:] = [raised]
    with pytest.raises(ray.exceptions.OutOfMemoryError):
        worker._hand_over(first, second, (), {}, resubmit, run_here=None)
    assert rows == [] and [s.attempt for s in submitted] == [2] and not kv  # only the attempt itself

    # Inside a task: while it climbs, a rerun marker names the killed attempt, so that Ray's
    # retry of this task (if it dies too) goes on from there, instead of recording attempt 1
    # again and reusing attempt 2's number (the audit killed the waiting task to see it).
    roomy = RayschedConfig(max_attempts=5)
    first, second = replace(first, config=roomy), replace(second, config=roomy)
    token = worker._TASK_SPEC.set(first)
    try:
        seen = []
        outcomes[:] = [ray.exceptions.OutOfMemoryError("killed, not retried"), 42]
        resubmit_and_look = lambda spec, a, k: seen.append(dict(kv)) or resubmit(spec, a, k)  # noqa: E731
        assert worker._hand_over(first, second, (), {}, resubmit_and_look, run_here=None) == 42
        marker = worker._run_here_key(first)
        assert worker.decode_spec(seen[1][marker], first.config).attempt == 2
        assert not kv  # dropped once the call returned
        # The killed task had run a later attempt in its own place (its rerun marker says
        # which): that attempt is the one that died, recorded and climbed from.
        rows.clear(), submitted.clear()
        third = replace(second, attempt=3, prior=second.prior + (worker.AttemptRecord(
            2, second.allocation, worker.Outcome.OOM_KILLED, None, "stopped"),), allocation=Allocation(
            num_cpus=1.0, memory_bytes=2 * GiB))
        kv[worker._run_here_key(second)] = worker.encode_spec(third)
        outcomes[:] = [ray.exceptions.OutOfMemoryError("killed, not retried"), 43]
        assert worker._hand_over(first, second, (), {}, resubmit, run_here=None) == 43
        assert [(r["attempt"], r["outcome"]) for r in rows] == [(3, "oom_killed")]
        assert [s.attempt for s in submitted] == [2, 4] and submitted[1].allocation.memory_bytes > 2 * GiB
        # The killed task was itself waiting for a later attempt, which died with it: that one
        # is recorded as lost and submitted again under the next number, with the same allocation.
        rows.clear(), submitted.clear(), kv.clear()
        kv[worker._handover_key(second)] = worker.encode_spec(third)
        outcomes[:] = [ray.exceptions.OutOfMemoryError("killed, not retried"), 44]
        assert worker._hand_over(first, second, (), {}, resubmit, run_here=None) == 44
        assert [(r["attempt"], r["outcome"]) for r in rows] == [(3, "cancelled")]
        assert [(s.attempt, s.allocation) for s in submitted] == [(2, second.allocation), (4, third.allocation)]
        assert [a.attempt for a in submitted[1].prior] == [1, 2, 3]
    finally:
        worker._TASK_SPEC.reset(token)


def test_a_call_cancelled_while_its_next_attempt_waits_in_rays_queue_records_that_attempt(monkeypatch):
    """A call whose next attempt (after a memory kill) still waited in Ray's queue when the
    call was cancelled: no code of that attempt ran to record it, so its rows ended with the
    attempt before it. The waiting task now records it as cancelled, and only when it never
    began (one that began records itself)."""
    pytest.importorskip("ray")
    import ray

    from raysched.runtime import worker
    from raysched.runtime.spec import AttemptSpec

    estimate = Estimate(target=400 * MiB, lower=300 * MiB, upper=500 * MiB, coverage=0.9, n_history=5)
    first = AttemptSpec(function="f", code_hash="h", call_id="c0", attempt=1, features=Features(input_size=0),
                        prediction=Prediction(memory=estimate, cpu=estimate, wall=estimate, source="history"),
                        allocation=Allocation(num_cpus=1.0, memory_bytes=352 * MiB), config=RayschedConfig())
    second = replace(first, attempt=2, allocation=Allocation(num_cpus=1.0, memory_bytes=GiB))
    kv: dict[str, bytes] = {}
    rows: list[dict] = []
    cancels: list[tuple] = []

    class FakeKV:
        @staticmethod
        def _internal_kv_get(key, namespace=None):
            return kv.get(key)

    def cancelled(ref, timeout=None):
        raise ray.exceptions.TaskCancelledError()

    monkeypatch.setattr(worker, "_kv", lambda: FakeKV)
    monkeypatch.setattr(worker, "_kv_put", lambda key, value: kv.__setitem__(key, value) or True)
    monkeypatch.setattr(worker, "_kv_get", lambda key: kv.get(key))
    monkeypatch.setattr(worker, "_kv_del", lambda key: kv.pop(key, None))
    monkeypatch.setattr(worker, "get_sink", lambda config: SimpleNamespace(add=rows.append, flush=lambda wait_s: True))
    monkeypatch.setattr(ray, "get", cancelled)
    monkeypatch.setattr(ray, "cancel", lambda ref, force=False: cancels.append((ref, force)))
    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None, **kw: (list(refs), []))

    with pytest.raises(ray.exceptions.TaskCancelledError):
        worker._hand_over(first, second, (), {}, lambda spec, a, k: "ref-2", run_here=None)
    assert cancels == [("ref-2", False)]  # softly: a running attempt would record itself
    assert [(r["attempt"], r["outcome"]) for r in rows] == [(2, "cancelled")]
    assert "before it started" in rows[0]["error"] and rows[0]["peak_rss_bytes"] is None
    assert not kv  # the hand-over marker is gone

    # It had begun (its task's start marker is there): it records itself, not this task.
    rows.clear()

    def resubmit_and_start(spec, a, k):
        worker._mark_started(spec)  # as its entry does, in its own worker
        return "ref-2"

    with pytest.raises(ray.exceptions.TaskCancelledError):
        worker._hand_over(first, second, (), {}, resubmit_and_start, run_here=None)
    assert rows == [] and not kv


def test_the_used_memory_gauge_is_the_largest_running_attempts_and_zero_once_none_runs(monitor):
    """It showed the newest sample only: the sample that stopped an attempt was never shown, a
    stopped attempt's last figure stayed for good, and concurrent attempts overwrote each other."""
    a, b = Samples(call_id="a"), Samples(call_id="b")
    monitor.report([a(rss_bytes=700 * MiB), b(rss_bytes=300 * MiB)])
    assert monitor.metrics.calls[-1] == ("observe", "mod.f", 700 * MiB)
    for _ in range(N):
        monitor.report([a(rss_bytes=int(1.5 * GiB))])
    observed = [c for c in monitor.metrics.calls if c[0] == "observe"]
    assert observed[-1] == ("observe", "mod.f", int(1.5 * GiB))  # the stopping sample too
    monitor.ended([("a", 1, a.t)])
    assert monitor.metrics.calls[-1] == ("observe", "mod.f", 300 * MiB)
    monitor.ended([("b", 1, b.t)])
    assert monitor.metrics.calls[-1] == ("observe", "mod.f", 0)


def test_an_attempt_not_heard_of_for_four_live_intervals_does_not_give_way(tmp_path, clock):
    """Its worker died without a word (Ray's killer, a crash): its memory is free already.
    Chosen for up to ``monitor_stale_s`` (60 s), it relieved nothing, and the live call that
    could was stopped only after the count started again."""
    cfg = RayschedConfig(home=str(tmp_path), node_memory_sustain_readings=2, live_interval_s=0.5)
    monitor = Monitor(cfg, clock=clock, metrics=RecordingMetrics())
    gone, alive = Samples(call_id="gone", priority=0), Samples(call_id="alive", priority=1)
    monitor.report([gone(), alive()])
    clock.advance(10.0)
    monitor.report([alive()])  # "gone" is never heard of again
    got = [monitor.check_node(_high(t)) for t in (11.0, 12.0)]
    assert [d.call_id if d else None for d in got] == [None, "alive"]


def test_the_used_memory_gauge_drops_an_attempt_forgotten_silent_or_superseded(monitor, clock):
    """An attempt whose worker died says no end (Ray's killer, a SIGKILL): forgotten after
    monitor_stale_s, its figure stayed on its function's gauge for good when no other attempt
    of that function reported again."""
    f, g = Samples(call_id="a"), Samples(call_id="other", function="mod.g")
    monitor.report([f(rss_bytes=900 * MiB)])
    clock.advance(monitor.config.monitor_stale_s + 1)
    monitor.report([g()])  # the sweep forgets "a"
    assert monitor.status()["attempts"] == 1
    observed = [c for c in monitor.metrics.calls if c[0] == "observe" and c[1] == "mod.f"]
    assert observed[-1] == ("observe", "mod.f", 0)


def test_a_monitor_restored_from_its_saved_config_judges_by_it_and_reconfigure_saves(tmp_path, clock):
    """Ray restarts the actor with its creator's config; ``SavedMonitorConfig`` hands it the
    one it was last given (the Ray side: tests/test_monitor_ray.py)."""
    creator = RayschedConfig(home=str(tmp_path))
    driver = creator.replace(memory_limit_bytes=300 * MiB)

    class Saved:
        def __init__(self, config):
            self.config, self.saves = config, []

        def load(self):
            return self.config

        def save(self, config):
            self.saves.append(config)

    restored = Monitor(creator, store=SpyStore(tmp_path), clock=clock, metrics=RecordingMetrics(),
                       saved_config=Saved(driver))
    assert restored.config == driver
    s = Samples()
    restored.report([s(rss_bytes=310 * MiB)])
    assert restored.report([s(rss_bytes=310 * MiB)])["c1"].action == R.STOP_LIMIT
    fresh = Monitor(creator, store=SpyStore(tmp_path), clock=clock, metrics=RecordingMetrics(),
                    saved_config=Saved(None))
    assert fresh.config == creator
    fresh.reconfigure(driver)
    assert fresh._saved_config.saves == [driver] and fresh.config == driver


def test_samples_that_reach_the_monitor_after_their_attempts_end_judge_nothing_and_run_nothing(tmp_path, clock):
    """A worker tells the monitor of an attempt's end at once, but its last samples may still
    wait in the reporter's buffer (a batch was in flight, or the last send was under an
    interval ago) and arrive later. The monitor took them for a running attempt: one it
    had not heard of ran on for monitor_stale_s (its gauge, its count, a victim for its
    node), and a stop was decided for one that had already returned (an event, a metric)."""
    from raysched.runtime.monitor import LiveReporter

    cfg = RayschedConfig(home=str(tmp_path), monitor_sustain_samples=N, node_memory_sustain_readings=2)
    monitor = Monitor(cfg, store=SpyStore(tmp_path), clock=clock, metrics=RecordingMetrics())
    call = FakeMonitorCall(monitor)
    reporter = LiveReporter(call.send, call.resolve, interval_s=0.5, clock=clock, send_ended=monitor.ended)
    seen, short = Samples(call_id="seen"), Samples(call_id="short", function="mod.g")
    reporter.add(seen(rss_bytes=int(1.5 * GiB)))  # sent; its answer is not back yet
    for _ in range(N - 1):
        clock.advance(0.5)
        reporter.add(seen(rss_bytes=int(1.5 * GiB)))  # buffered behind the batch in flight
    reporter.add(short(rss_bytes=3 * GiB, node_used_bytes=15.5 * GiB, node_total_bytes=16 * GiB))
    reporter.ended("seen", 1, seen.t + 0.1)
    reporter.ended("short", 1, short.t + 0.1)  # the monitor has not heard of it yet
    call.ready = True
    clock.advance(0.5)
    other = Samples(call_id="other", function="mod.h")
    reporter.add(other(node_used_bytes=15.5 * GiB, node_total_bytes=16 * GiB))  # the buffer goes out
    assert any(r.call_id == "short" for r in call.sent[-1])  # (the late samples did arrive)
    assert monitor.directives(["seen", "short"]).get("seen").action == R.NONE
    assert monitor.store.writes == 0 and not any(c[0] == "decided" for c in monitor.metrics.calls)
    assert monitor.status()["running_by_function"] == {"mod.h": 1}
    assert [c for c in monitor.metrics.calls if c[0] == "observe" and c[1] == "mod.g"][-1][2] == 0
    # Its node over the line: the running attempt gives way, not the one that ended.
    for _ in range(3):
        clock.advance(1.0)
        reply = monitor.report([other(node_used_bytes=15.5 * GiB, node_total_bytes=16 * GiB)])
    assert list(reply) == ["other"]


def _fallback_spec(call_id: str, memory_bytes: int):
    """A first attempt of ``f`` on its fallback, sampled every 0.05 s, on a cluster whose largest node has 16 GiB."""
    from raysched.runtime.spec import AttemptSpec

    estimate = Estimate(target=1.0, lower=1.0, upper=1.0, coverage=0.9, n_history=0)
    return AttemptSpec(function="f", code_hash="h", call_id=call_id, attempt=1, features=Features(input_size=0),
                       prediction=Prediction(memory=estimate, cpu=estimate, wall=estimate, source="fallback"),
                       allocation=Allocation(num_cpus=1.0, memory_bytes=memory_bytes),
                       config=RayschedConfig(live_interval_s=0.05), largest_node_bytes=16 * GiB)


def test_a_handed_over_attempt_reports_the_room_its_waiting_tasks_leave_the_ladder(monkeypatch):
    """An attempt whose call's earlier task waits for it (a hand-over marker, holding its label)
    tells the monitor the most its next attempt may get: the largest node less both labels,
    which ``climb_and_resubmit`` would cap the ladder at. Without it the monitor judged the
    attempt by the largest node less its own label, and stopped it into AttemptsExhausted."""
    pytest.importorskip("ray")
    from raysched.runtime import worker
    from raysched.runtime.rows import RowSink

    first = _fallback_spec("c0", 5 * GiB)
    second = replace(first, attempt=2, allocation=Allocation(num_cpus=1.0, memory_bytes=6 * GiB))

    class FakeKV:
        @staticmethod
        def _internal_kv_list(prefix, namespace=None):
            key = f"handover:c0:1:{5 * GiB}".encode()  # attempt 1's task waits, holding 5 GiB
            return [key] if key.startswith(prefix.encode()) else []

        def __getattr__(self, name):
            return lambda *a, **k: None

    reports: list = []

    class FakeReporter:
        def add(self, report):
            reports.append(report)

        def directive(self, call_id, attempt):
            return None

        def ended(self, call_id, attempt, when):
            pass

    monkeypatch.setattr(worker, "_kv", lambda: FakeKV())
    monkeypatch.setattr(worker, "get_sink", lambda config: RowSink(60.0, lambda rows: None))
    monkeypatch.setattr(worker, "get_reporter", lambda config, create=True: FakeReporter())
    monkeypatch.setattr(worker, "_node_id", lambda: "node-a")
    assert worker.run_measured(lambda: time.sleep(0.4) or 7, second, (), {}) == 7
    assert reports, "no live sample reported"
    assert {r.ladder_room_bytes for r in reports} == {6 * GiB}  # max(16 - 6 - 5, 6) GiB
    # Over its allocation, it is warned about and left running, not stopped for a rung that cannot fit.
    assert R.MemoryOverAllocation(1.2, 4)(replace(reports[-1], rss_bytes=8 * GiB)).action == R.WARN


def test_an_orphaned_attempt_ended_by_ray_leaves_no_note_for_a_retry_that_never_comes(monkeypatch):
    """Attempt 1's task waited for attempt 2 and died; its retry handed over to attempt 3. Ray then
    ends attempt 2's task, an orphan, with a SystemExit: it noted the exit for a retry of its task,
    which never runs, after the retry had cleared its notes, and the note stayed in Ray's KV (a CI
    run's fault test). A sys.exit() of an attempt its call still waits for is noted, as before."""
    pytest.importorskip("ray")
    from raysched.runtime import worker
    from raysched.runtime.spec import encode_spec

    first = _fallback_spec("c0", 1 * GiB)
    second, third = replace(first, attempt=2), replace(first, attempt=3)
    kv: dict[str, bytes] = {f"handover:c0:1:{GiB}": encode_spec(second)}  # attempt 1's task waits for 2

    class FakeKV:
        @staticmethod
        def _internal_kv_list(prefix, namespace=None):
            return [k.encode() for k in kv if k.startswith(prefix)]

    monkeypatch.setattr(worker, "_kv", lambda: FakeKV)
    monkeypatch.setattr(worker, "_kv_put", lambda key, value: kv.__setitem__(key, value) or True)
    monkeypatch.setattr(worker, "_kv_get", lambda key: kv.get(key))
    monkeypatch.setattr(worker, "_ray_attempt_number", lambda: 0)
    sink = SimpleNamespace(flush=lambda wait_s: True)
    token = worker._TASK_SPEC.set(second)
    try:
        worker._note_ending(second, SystemExit(0), sink)  # the user's sys.exit(): its call waits for it
        assert kv.pop("raised:c0:2:0") == b"EXITED"
        kv[f"handover:c0:1:{GiB}"] = encode_spec(third)  # the waiting task died; its retry moved on
        worker._note_ending(second, SystemExit(0), sink)
        assert "raised:c0:2:0" not in kv
    finally:
        worker._TASK_SPEC.reset(token)


def test_a_soft_cancel_that_lands_in_the_bookkeeping_still_records_the_attempt(monkeypatch):
    """Ray's ray.cancel(ref) interrupts the task's thread (a KeyboardInterrupt) at any point until
    the task returns: landing after the function returned, it skipped the attempt's row and left
    the attempt registered with the live sampler."""
    import _thread
    import threading

    pytest.importorskip("ray")
    from raysched.runtime import worker
    from raysched.runtime.measure import get_live_sampler

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Ray runs a task, and interrupts it, in the main thread")
    spec = _fallback_spec("c-cancel", 1 * GiB)

    class Sink:
        rows: list = []

        def add_attempt(self, spec, outcome, usage, *rest):
            self.rows.append((spec.call_id, outcome, usage))

        add_unmeasured = flush = lambda self, *a, **k: None

    class CancelledWhileStopping(worker.AttemptMeter):
        def stop(self):
            _thread.interrupt_main()  # what Ray's soft cancel does, arriving just now
            return super().stop()

    monkeypatch.setattr(worker, "AttemptMeter", CancelledWhileStopping)
    monkeypatch.setattr(worker, "get_sink", lambda config: Sink())
    monkeypatch.setattr(worker, "get_reporter", lambda config, create=True: None)
    monkeypatch.setattr(worker, "_node_id", lambda: "node-a")
    # A Ray worker's main thread has Python's own SIGINT handler; a test process may have been
    # left another by an earlier test's library (SIG_DFL: Ray's deferral then cannot call it).
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):  # the cancel still ends the call
            worker.run_measured(lambda: 7, spec, (), {})
    finally:
        signal.signal(signal.SIGINT, before)
    assert [(call, outcome) for call, outcome, _ in Sink.rows] == [("c-cancel", Outcome.OK)]
    assert Sink.rows[0][2] is not None  # what it used
    assert spec.live_key not in get_live_sampler(spec.config.live_interval_s)._entries


def test_a_stop_that_fails_the_call_leaves_its_marker_only_for_a_retry_ray_will_run(monkeypatch):
    """A stop at a hard limit (or a cancel) writes a marker that makes Ray's retry of its task
    fail the same way; without a retry of that error (no ``retry_exceptions``) none reads it,
    and each such call left one key in Ray's KV for the cluster's life."""
    pytest.importorskip("ray")
    from raysched.runtime import worker
    from raysched.runtime.spec import AttemptSpec

    kv: dict[str, bytes] = {}
    monkeypatch.setattr(worker, "_kv_put", lambda key, value: kv.__setitem__(key, value) or True)
    monkeypatch.setattr(worker, "_kv_del", lambda key: kv.pop(key, None))
    estimate = Estimate(target=1.0, lower=1.0, upper=1.0, coverage=0.9, n_history=0)
    spec = AttemptSpec(function="f", code_hash="h", call_id="c0", attempt=1, features=Features(input_size=0),
                       prediction=Prediction(memory=estimate, cpu=estimate, wall=estimate, source="fallback"),
                       allocation=Allocation(num_cpus=1.0, memory_bytes=GiB), config=RayschedConfig())
    limit = R.Decision("memory_hard_limit", R.STOP_LIMIT, "f", "c0", 1, 2.0 * GiB, GiB, "over")
    cancel = R.Decision("slow", R.CANCEL, "f", "c0", 1, detail="slow")
    for decision in (limit, cancel):
        worker._put_stop_marker(spec, decision, recorded=False)  # as a hard stop leaves it
        worker._mark_failed_stop(spec, decision)
        assert kv == {}, decision.action  # read by this retry, and no other comes
        retried = replace(spec, ray_options=(("max_retries", 2), ("retry_exceptions", True)))
        worker._mark_failed_stop(retried, decision)
        assert list(kv) == [worker._stop_key(spec)] and b'"recorded": true' in kv.popitem()[1]


def test_an_attempt_lost_with_the_task_that_waited_for_it_counts_as_an_attempt(monkeypatch):
    """Attempt 1's task waited for attempt 2 and died; Ray's retry of it submits attempt 3. Attempt
    2 is recorded (as cancelled: it ended with its owner) and counted in attempt 3's failed
    attempts: left out, a call ran past its max_attempts (the ladder counts them) and its
    AttemptsExhausted did not list it."""
    pytest.importorskip("ray")
    from raysched.errors import AttemptsExhausted
    from raysched.runtime import worker
    from raysched.runtime.spec import AttemptSpec
    from raysched.types import AttemptRecord, Outcome

    estimate = Estimate(target=1.0, lower=1.0, upper=1.0, coverage=0.9, n_history=0)
    first = AttemptSpec(function="f", code_hash="h", call_id="c0", attempt=1, features=Features(input_size=0),
                        prediction=Prediction(memory=estimate, cpu=estimate, wall=estimate, source="fallback"),
                        allocation=Allocation(num_cpus=1.0, memory_bytes=GiB), config=RayschedConfig(max_attempts=4))
    stopped = AttemptRecord(1, first.allocation, Outcome.OOM_KILLED, None, "stopped")
    recorded, submitted = [], []
    monkeypatch.setattr(worker, "_record_for", lambda spec, outcome, usage, reason: recorded.append((spec.attempt, outcome)))
    monkeypatch.setattr(worker, "_last_live_usage", lambda spec: None)
    monkeypatch.setattr(worker, "_kv_del", lambda key: None)
    monkeypatch.setattr(worker, "_call_ends", lambda spec, error: error)
    monkeypatch.setattr(worker, "_hand_over", lambda spec, next_spec, *rest: submitted.append(next_spec) or "value")

    handed = replace(first, attempt=2, prior=(stopped,), allocation=Allocation(num_cpus=1.0, memory_bytes=2 * GiB))
    assert worker._after_lost_handover(first, handed, (), {}, None, None) == "value"
    assert recorded == [(2, Outcome.CANCELLED)]
    (next_spec,) = submitted
    assert next_spec.attempt == 3 and [a.attempt for a in next_spec.prior] == [1, 2], next_spec.prior
    assert next_spec.prior[-1].outcome is Outcome.CANCELLED

    last = replace(handed, attempt=4, prior=tuple(replace(stopped, attempt=n) for n in (1, 2, 3)))
    with pytest.raises(AttemptsExhausted) as info:
        worker._after_lost_handover(replace(first, attempt=3), last, (), {}, None, None)
    assert [a.attempt for a in info.value.attempts] == [1, 2, 3, 4] and recorded[-1] == (4, Outcome.CANCELLED)


def test_the_rerun_marker_of_an_attempt_run_in_place_goes_when_the_call_is_cancelled(monkeypatch):
    """An attempt run in a task after a failure (in place of a waiting one, or rerun) is named
    by a marker for Ray's retry of the task. A soft cancel (a KeyboardInterrupt, which Ray does
    not retry) left it in Ray's KV for good; an exit (the worker ends, Ray retries) keeps it."""
    pytest.importorskip("ray")
    from raysched.runtime import worker
    from raysched.runtime.spec import AttemptSpec

    kv = {}
    monkeypatch.setattr(worker, "_kv_del", lambda key: kv.pop(key, None))
    estimate = Estimate(target=1.0, lower=1.0, upper=1.0, coverage=0.9, n_history=0)
    task = AttemptSpec(function="f", code_hash="h", call_id="c0", attempt=1, features=Features(input_size=0),
                       prediction=Prediction(memory=estimate, cpu=estimate, wall=estimate, source="fallback"),
                       allocation=Allocation(num_cpus=1.0, memory_bytes=GiB), config=RayschedConfig())
    second = replace(task, attempt=2)

    def raising(exc):
        def run():
            raise exc
        return run

    for exc, kept in ((KeyboardInterrupt(), False), (ValueError("boom"), False), (SystemExit(1), True)):
        kv[worker._run_here_key(task)] = b"spec"
        with pytest.raises(type(exc)):
            worker._run_marked(task, second, raising(exc))
        assert (worker._run_here_key(task) in kv) == kept, exc
