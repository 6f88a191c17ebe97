"""The live monitor's rules: pure, driven by hand-made samples on a fake clock. No Ray here."""

from __future__ import annotations

from dataclasses import replace

import pytest

from raysched.config import RayschedConfig
from raysched.errors import ResourceLimitExceeded
from raysched.policy import rules as R
from raysched.policy.recipe import build_rules
from raysched.policy.rules import AttemptRule, AttemptState, Decision, LiveReport, NodeMemory, NodeState, Rules
from raysched.types import GiB, MiB, Allocation, Estimate, Prediction

N = 3  # the sustain used throughout
CFG = RayschedConfig(monitor_sustain_samples=N, node_memory_sustain_readings=N)


class FakeClock:
    """Sample timestamps: each call is one live interval later."""

    def __init__(self, start: float = 1000.0, step: float = 0.5):
        self.now, self.step = start, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def live(clock: FakeClock | None = None, **changes) -> LiveReport:
    base = LiveReport(
        function="mod.f", code_hash="h1", call_id="c1", attempt=1, node_id="node-a", priority=0,
        allocation=Allocation(num_cpus=1.0, memory_bytes=1 * GiB), predicted_memory_upper_bytes=900 * MiB,
        predicted_wall_upper_s=10.0, prediction_source="history", rss_bytes=500 * MiB, peak_rss_bytes=500 * MiB,
        cpu_seconds=5.0, wall_seconds=5.0, timestamp=clock() if clock else 1.0,
    )
    return replace(base, **changes)


def replay(rules: Rules, reports: list[LiveReport]) -> list[tuple[Decision, ...]]:
    """The decisions of each sample, fed in order to one attempt's state."""
    state, out = AttemptState(), []
    for r in reports:
        state, decisions = rules.evaluate(state, r)
        out.append(decisions)
    return out


def actions(per_sample: list[tuple[Decision, ...]]) -> list[tuple[str, ...]]:
    return [tuple(d.action for d in ds) for ds in per_sample]


# --- each check on its own: a table ---------------------------------------------------------------

OVER = int(1.3 * GiB)  # over 1 GiB x 1.2

CHECKS = [
    # (case, check, report changes, expected action or None)
    ("under tolerance", R.MemoryOverAllocation(1.2, 4), dict(rss_bytes=int(1.15 * GiB)), None),
    ("over tolerance", R.MemoryOverAllocation(1.2, 4), dict(rss_bytes=OVER), R.STOP_AND_RESUBMIT),
    ("peak alone does not count", R.MemoryOverAllocation(1.2, 4), dict(peak_rss_bytes=2 * GiB), None),
    ("over but capped: warn", R.MemoryOverAllocation(1.2, 4),
     dict(rss_bytes=OVER, allocation=Allocation(1.0, 1 * GiB, capped=True)), R.WARN),
    ("over on the last attempt: warn", R.MemoryOverAllocation(1.2, 4), dict(rss_bytes=OVER, attempt=4), R.WARN),
    # the call's own max_attempts (@adaptive_remote(max_attempts=N)) wins over the monitor's config
    ("over on the function's own last attempt: warn", R.MemoryOverAllocation(1.2, 4),
     dict(rss_bytes=OVER, attempt=2, max_attempts=2), R.WARN),
    ("more attempts of its own: stop and resubmit", R.MemoryOverAllocation(1.2, 4),
     dict(rss_bytes=OVER, attempt=4, max_attempts=6), R.STOP_AND_RESUBMIT),
    ("an actor's rule has no last attempt", R.MemoryOverAllocation(1.2, None),
     dict(rss_bytes=OVER, attempt=4, max_attempts=4), R.STOP_AND_RESUBMIT),
    # the caller's figure (fallback or memory=) is the task's own: the worker's start is added
    ("caller's figure: the worker's start is not the task's", R.MemoryOverAllocation(1.2, 4),
     dict(rss_bytes=177 * MiB, start_rss_bytes=177 * MiB, allocation=Allocation(1.0, 128 * MiB, memory_is_task_only=True)),
     None),
    ("caller's figure: the task's own growth past it stops", R.MemoryOverAllocation(1.2, 4),
     dict(rss_bytes=400 * MiB, start_rss_bytes=177 * MiB, allocation=Allocation(1.0, 128 * MiB, memory_is_task_only=True)),
     R.STOP_AND_RESUBMIT),
    # .options(memory=...) wins over raysched's sizes: the next rung would overrule it
    ("the caller's own memory= outgrown: warn, left running", R.MemoryOverAllocation(1.2, 4),
     dict(rss_bytes=400 * MiB, start_rss_bytes=177 * MiB,
          allocation=Allocation(1.0, 128 * MiB, memory_is_task_only=True, memory_set_by_caller=True)), R.WARN),
    ("a measured size covers the whole worker", R.MemoryOverAllocation(1.2, 4),
     dict(rss_bytes=177 * MiB, start_rss_bytes=177 * MiB, allocation=Allocation(1.0, 128 * MiB)), R.STOP_AND_RESUBMIT),
    ("no cap configured", R.MemoryOverHardCap(None, {}), dict(rss_bytes=100 * GiB), None),
    ("global cap", R.MemoryOverHardCap(2 * GiB, {}), dict(rss_bytes=3 * GiB), R.STOP_LIMIT),
    ("per-function cap wins over global", R.MemoryOverHardCap(8 * GiB, {"mod.f": 2 * GiB}),
     dict(rss_bytes=3 * GiB), R.STOP_LIMIT),
    ("per-function cap by short name", R.MemoryOverHardCap(None, {"f": 2 * GiB}), dict(rss_bytes=3 * GiB), R.STOP_LIMIT),
    ("another function's cap", R.MemoryOverHardCap(None, {"mod.g": 2 * GiB}), dict(rss_bytes=3 * GiB), None),
    ("generous per-function cap beats a tight global", R.MemoryOverHardCap(1 * GiB, {"mod.f": 4 * GiB}),
     dict(rss_bytes=3 * GiB), None),
    ("wall within factor", R.WallOverPrediction(3.0), dict(wall_seconds=29.0), None),
    ("wall past factor: warn", R.WallOverPrediction(3.0), dict(wall_seconds=31.0), R.WARN),
    ("wall past factor: cancel", R.WallOverPrediction(3.0, cancel=True), dict(wall_seconds=31.0), R.CANCEL),
    ("wall never judged on a fallback", R.WallOverPrediction(3.0, cancel=True),
     dict(wall_seconds=1e6, prediction_source="fallback"), None),
    ("wall never judged on its own fallback", R.WallOverPrediction(3.0, cancel=True),
     dict(wall_seconds=1e6, prediction_source="history", wall_source="fallback"), None),
    # a call too short to have CPU cores keeps CPU's fallback, the overall source: its wall is judged
    ("wall judged when only another resource is a fallback", R.WallOverPrediction(3.0, cancel=True),
     dict(wall_seconds=31.0, prediction_source="fallback", wall_source="history"), R.CANCEL),
    # a call predicted at 7 ms, sampled at 22 ms: past 3 x, but not by the samples' own grain (an audit)
    ("a few ms past a ms prediction is not slow", R.WallOverPrediction(3.0, cancel=True, min_over_s=1.5),
     dict(wall_seconds=0.022, predicted_wall_upper_s=0.007), None),
    ("a ms prediction overrun by more than the grain", R.WallOverPrediction(3.0, cancel=True, min_over_s=1.5),
     dict(wall_seconds=1.6, predicted_wall_upper_s=0.007), R.CANCEL),
    ("the grain does not shorten a long prediction's limit", R.WallOverPrediction(3.0, min_over_s=1.5),
     dict(wall_seconds=29.0), None),
    ("cpu in range", R.CpuOffAllocation(0.25, 1.5, 10.0), dict(cpu_seconds=12.0, wall_seconds=20.0), None),
    ("cpu far below", R.CpuOffAllocation(0.25, 1.5, 10.0), dict(cpu_seconds=2.0, wall_seconds=20.0), R.RECORD_CPU),
    ("cpu far above", R.CpuOffAllocation(0.25, 1.5, 10.0), dict(cpu_seconds=80.0, wall_seconds=20.0), R.RECORD_CPU),
    ("cpu not judged in start-up", R.CpuOffAllocation(0.25, 1.5, 10.0), dict(cpu_seconds=0.0, wall_seconds=5.0), None),
]


@pytest.mark.parametrize("case,check,changes,expected", CHECKS, ids=[c[0] for c in CHECKS])
def test_each_check(case, check, changes, expected):
    finding = check(live(**changes))
    assert (finding.action if finding else None) == expected


def test_findings_carry_the_figures_in_the_rules_units():
    f = R.MemoryOverHardCap(2 * GiB)(live(rss_bytes=3 * GiB))
    assert (f.measured, f.allocated) == (3 * GiB, 2 * GiB) and "3072 MiB" in f.detail and "2048 MiB" in f.detail
    f = R.WallOverPrediction(3.0)(live(wall_seconds=31.0))
    assert (f.measured, f.allocated) == (31.0, 10.0) and "running 31.0 s" in f.detail
    f = R.WallOverPrediction(3.0)(live(wall_seconds=0.5, predicted_wall_upper_s=0.007))
    assert "running 500 ms, over the predicted upper bound 7 ms x 3" in f.detail  # was "0.0 s" for both
    f = R.CpuOffAllocation(0.25, 1.5, 10.0)(live(cpu_seconds=2.0, wall_seconds=20.0, allocation=Allocation(2.0, GiB)))
    assert (f.measured, f.allocated) == (0.1, 2.0)


# --- hysteresis: stops need N consecutive samples -------------------------------------------------


def over_allocation_rules(sustain: int = N) -> Rules:
    return Rules((AttemptRule("memory_over_allocation", R.MemoryOverAllocation(1.2, 4), sustain),))


@pytest.mark.parametrize(
    "pattern,expected_stop_at",
    [
        ("OOc", None),  # held N-1 samples, then cleared: nothing at all
        ("OOcOO", None),  # a clear sample resets the count
        ("OOO", 2),  # held N samples: the Nth stops
        ("OOcOOOO", 5),  # the count starts again after a clear sample
        ("cccccc", None),
    ],
)
def test_a_stop_needs_the_condition_over_n_consecutive_samples(pattern, expected_stop_at):
    clock = FakeClock()
    reports = [live(clock, rss_bytes=OVER if ch == "O" else 900 * MiB) for ch in pattern]
    per_sample = replay(over_allocation_rules(), reports)
    stops = [i for i, ds in enumerate(per_sample) if any(d.stops for d in ds)]
    assert stops == ([] if expected_stop_at is None else [expected_stop_at])


def test_n_minus_one_samples_then_clear_produces_no_action_with_the_default_recipe():
    clock = FakeClock()
    over = [live(clock, rss_bytes=OVER) for _ in range(CFG.monitor_sustain_samples - 1)]
    cleared = [live(clock, rss_bytes=800 * MiB) for _ in range(5)]
    assert all(ds == () for ds in replay(build_rules(CFG), over + cleared))


def test_a_sample_seen_twice_or_late_changes_nothing():
    clock = FakeClock()
    a, b = live(clock, rss_bytes=OVER), live(clock, rss_bytes=OVER)
    # A batch delivered twice (an actor call retried) and one arriving late count once.
    per_sample = replay(over_allocation_rules(), [a, a, b, b, a])
    assert all(ds == () for ds in per_sample)
    c = live(clock, rss_bytes=OVER)
    assert actions(replay(over_allocation_rules(), [a, b, b, c])) == [(), (), (), (R.STOP_AND_RESUBMIT,)]


def test_after_a_stop_nothing_more_is_decided_and_warnings_fire_once():
    clock = FakeClock()
    rules = Rules((
        AttemptRule("memory_over_allocation", R.MemoryOverAllocation(1.2, 4), N),
        AttemptRule("wall_over_prediction", R.WallOverPrediction(3.0), N),
    ))
    reports = [live(clock, rss_bytes=OVER, wall_seconds=40.0 + i) for i in range(6)]
    got = actions(replay(rules, reports))
    # Warnings need no hysteresis (nothing is stopped) and fire once; the stop ends it.
    assert got == [(R.WARN,), (), (R.STOP_AND_RESUBMIT,), (), (), ()]


def test_the_hard_cap_takes_precedence_over_resubmission():
    clock = FakeClock()
    reports = [live(clock, rss_bytes=3 * GiB) for _ in range(N)]
    same_sustain = CFG.replace(memory_limits={"mod.f": 2 * GiB}, monitor_limit_sustain_samples=N)
    got = replay(build_rules(same_sustain), reports)
    assert actions(got) == [(), (), (R.STOP_LIMIT,)]
    decision = got[-1][0]
    assert decision.rule == "memory_hard_limit" and decision.stops
    error = decision.limit_error()
    assert isinstance(error, ResourceLimitExceeded)
    assert (error.function, error.measured, error.limit, error.attempts) == ("mod.f", 3 * GiB, 2 * GiB, 1)
    with pytest.raises(ValueError):
        Decision("x", R.WARN, "f", "c", 1).limit_error()


def test_the_hard_cap_stops_on_the_second_sample_over_it_by_default():
    """Three samples let a 200 MiB/s leak end 56% over a 400 MiB cap (a helper's audit)."""
    clock = FakeClock()
    got = replay(build_rules(CFG.replace(memory_limits={"mod.f": 2 * GiB})),
                 [live(clock, rss_bytes=3 * GiB) for _ in range(3)])
    assert actions(got) == [(), (R.STOP_LIMIT,), ()]
    # One sample over, then under: no stop (a cap still has hysteresis).
    blip = [live(clock, rss_bytes=3 * GiB), live(clock, rss_bytes=1 * GiB), live(clock, rss_bytes=3 * GiB)]
    assert actions(replay(build_rules(CFG.replace(memory_limits={"mod.f": 2 * GiB})), blip)) == [(), (), ()]


def test_a_leak_that_passes_its_allocation_first_and_the_cap_later_still_fails_at_the_cap():
    # A leak: over the allocation x 1.2 from the first sample, over the 2 GiB cap from the
    # second.  The resubmit rule's streak completes first (sample 3), when the cap's is at
    # 2; the stop it decides on is the cap's: resubmitting bigger would break the cap again
    # (it ran the function twice, the second attempt allocated far above the cap).
    clock = FakeClock()
    reports = [live(clock, rss_bytes=OVER)] + [live(clock, rss_bytes=int(2.5 * GiB)) for _ in range(N)]
    got = replay(build_rules(CFG.replace(memory_limits={"mod.f": 2 * GiB}, monitor_limit_sustain_samples=N)), reports)
    assert actions(got) == [(), (), (R.STOP_LIMIT,), ()]
    decision = got[2][0]
    assert decision.rule == "memory_hard_limit" and decision.allocated == 2 * GiB
    assert "decided when memory_over_allocation had held for 3 samples" in decision.detail
    # Under the cap, the same sustained growth is resubmitted as before.
    under = [live(clock, rss_bytes=OVER) for _ in range(N)]
    assert actions(replay(build_rules(CFG.replace(memory_limits={"mod.f": 2 * GiB})), under)) == \
        [(), (), (R.STOP_AND_RESUBMIT,)]


def test_decisions_name_the_attempt_and_where_it_ran():
    clock = FakeClock()
    got = replay(over_allocation_rules(1), [live(clock, rss_bytes=OVER, call_id="c9", attempt=2, node_id="node-z")])
    d = got[0][0]
    assert (d.function, d.code_hash, d.call_id, d.attempt, d.node_id) == ("mod.f", "h1", "c9", 2, "node-z")
    assert d.timestamp == clock.now and d.measured == OVER and d.allocated == GiB
    assert "resubmit on the next rung" in d.detail
    with pytest.raises(ValueError, match="unknown action"):
        Decision("x", "explode", "f", "c", 1)


def test_wall_cancel_is_sustained_like_any_stop():
    clock = FakeClock()
    rules = build_rules(CFG.replace(monitor_cancel_slow=True))
    slow = [live(clock, wall_seconds=31.0 + i, cpu_seconds=31.0 + i) for i in range(N)]
    assert actions(replay(rules, slow)) == [(), (), (R.CANCEL,)]


# --- node memory pressure: the lowest priority gives way first ----------------------------------------


def running_on(node: str, *specs: tuple[str, int, int]) -> list[LiveReport]:
    return [live(call_id=c, priority=p, rss_bytes=rss * MiB, node_id=node) for c, p, rss in specs]


def readings(clock: FakeClock, fractions: str) -> list[NodeMemory]:
    """'H' a reading at 95% of the node's memory, 'L' one at 50%."""
    return [NodeMemory("node-a", (0.95 if ch == "H" else 0.5) * 64 * GiB, 64 * GiB, clock()) for ch in fractions]


def replay_node(rules: Rules, reads: list[NodeMemory], running: list[LiveReport]) -> list[Decision | None]:
    """Feed readings; a stopped attempt no longer counts as running, as in the monitor."""
    state, out, running = NodeState(), [], list(running)
    for reading in reads:
        state, decision = rules.evaluate_node(state, reading, running)
        out.append(decision)
        if decision is not None:
            running = [r for r in running if r.key != (decision.call_id, decision.attempt)]
    return out


def test_node_pressure_stops_lowest_priority_first_never_a_higher_one():
    rules = build_rules(CFG)
    running = running_on("node-a", ("high", 5, 100), ("low", 0, 100), ("mid", 2, 4000)) + \
        running_on("node-b", ("elsewhere", -9, 100))
    got = replay_node(rules, readings(FakeClock(), "H" * (3 * N + 2)), running)
    victims = [d.call_id for d in got if d is not None]
    # One every N readings, in priority order; the other node's task is never touched.
    assert victims == ["low", "mid", "high"]
    assert [i for i, d in enumerate(got) if d is not None] == [N - 1, 2 * N - 1, 3 * N - 1]
    first = next(d for d in got if d is not None)
    assert first.action == R.REQUEUE_LOWEST_PRIORITY and first.node_id == "node-a"
    assert first.measured == pytest.approx(0.95) and first.allocated == CFG.node_memory_threshold
    assert "priority 0" in first.detail


def test_node_pressure_among_equals_the_biggest_gives_way_when_none_is_enough():
    running = running_on("node-a", ("small", 1, 100), ("big", 1, 3000), ("vip", 7, 9000))
    got = replay_node(build_rules(CFG), readings(FakeClock(), "H" * N), running)
    assert got[-1] is not None and got[-1].call_id == "big"


def test_node_pressure_among_equals_that_relieve_the_node_the_newest_gives_way():
    # 95% of 64 GiB against a 90% threshold: 3.2 GiB too much. Both 4 GiB tasks relieve it
    # alone; the one that started last loses the least work (a stop restarts it from scratch).
    old, new, small = (live(call_id=c, priority=1, rss_bytes=rss * MiB, node_id="node-a", wall_seconds=wall)
                       for c, rss, wall in [("a-old", 4096, 30.0), ("b-new", 4096, 2.0), ("c-small", 100, 0.5)])
    rules = build_rules(CFG.replace(node_memory_threshold=0.9))
    got = replay_node(rules, readings(FakeClock(), "H" * N), [old, new, small])
    assert got[-1] is not None and got[-1].call_id == "b-new"


def test_node_pressure_among_tasks_that_started_together_the_smallest_that_relieves_the_node_gives_way():
    # A batch's first three tasks start together and overshoot the node by 3.2 GiB: each would
    # relieve it alone, and each has lost as little work; the smallest needs the least room to
    # start again (it waits for it under its own label). One that started a live interval before
    # is not among them, however small.
    def task(call_id, expected_gib, wall):
        return live(call_id=call_id, priority=1, rss_bytes=4096 * MiB, node_id="node-a", wall_seconds=wall,
                    predicted_memory_upper_bytes=expected_gib * GiB)

    cfg = CFG.replace(node_memory_threshold=0.9, live_interval_s=0.5)
    big, mid, small, earlier = task("a-big", 12, 0.30), task("b-mid", 8, 0.32), task("c-small", 5, 0.35), \
        task("d-earlier", 4.5, 0.9)
    got = replay_node(build_rules(cfg), readings(FakeClock(), "H" * N), [big, mid, small, earlier])
    assert got[-1] is not None and got[-1].call_id == "c-small"
    # Without that allowance, the newest alone: as before.
    got = replay_node(build_rules(cfg.replace(live_interval_s=0.01)), readings(FakeClock(), "H" * N),
                      [big, mid, small, earlier])
    assert got[-1] is not None and got[-1].call_id == "a-big"


@pytest.mark.parametrize("pattern", ["HHL", "HLHLHL", "HHLHH", "LLLLL"])
def test_node_pressure_has_hysteresis(pattern):
    running = running_on("node-a", ("low", 0, 100))
    assert replay_node(build_rules(CFG), readings(FakeClock(), pattern), running) == [None] * len(pattern)


def test_node_pressure_with_nothing_running_there_decides_nothing_and_stale_readings_are_ignored():
    rules = build_rules(CFG)
    clock = FakeClock()
    assert replay_node(rules, readings(clock, "H" * (N + 2)), running_on("node-b", ("x", 0, 100))) == [None] * (N + 2)
    reading = readings(clock, "H")[0]
    state, _ = rules.evaluate_node(NodeState(), reading, [])
    assert rules.evaluate_node(state, reading, []) == (state, None)  # the same reading again


def test_with_stop_marks_an_attempt_stopped_from_outside():
    clock = FakeClock()
    d = Decision("node_memory_pressure", R.REQUEUE_LOWEST_PRIORITY, "mod.f", "c1", 1)
    state = R.with_stop(AttemptState(), d)
    assert state.stop == d
    assert build_rules(CFG).evaluate(state, live(clock, rss_bytes=10 * GiB)) == (state, ())


def climbing_node(label_gib: float, source: str, seconds: int = 7) -> list[tuple[NodeMemory, list[LiveReport]]]:
    """A 16 GiB node whose Ray kills at half of it (8 GiB): 4 GiB of other processes and two
    tasks that each grow by 0.5 GiB/s from 0.2 GiB up to ``label_gib``, their predictions'
    upper bound (their labels 15% more); a worker's reading every second."""
    out = []
    for t in range(seconds):
        rss = min(0.2 + 0.5 * t, label_gib)
        tasks = [live(call_id=c, priority=0, node_id="node-a", rss_bytes=int(rss * GiB), wall_seconds=t + w,
                      allocation=Allocation(1.0, int(1.15 * label_gib * GiB)),
                      predicted_memory_upper_bytes=label_gib * GiB, timestamp=1000.0 + t) for c, w in (("a", 1), ("b", 0))]
        reading = NodeMemory("node-a", (4 + 2 * rss) * GiB, 16 * GiB, 1000.0 + t, kill_threshold=0.5, source=source)
        out.append((reading, tasks))
    return out


def first_stop(config: RayschedConfig, trace) -> tuple[int, Decision] | None:
    rules, state = build_rules(config), NodeState()
    for t, (reading, running) in enumerate(trace):
        state, decision = rules.evaluate_node(state, reading, running)
        if decision is not None:
            return t, decision
    return None


def test_a_node_climbing_fast_is_relieved_before_ray_kills_not_after():
    """Tasks growing 1 GiB/s together: waiting for two readings over the threshold (7.84 GiB,
    1 point under Ray's 8 GiB) meant the first was already past Ray's line."""
    default = RayschedConfig()
    assert build_rules(default).node_rule.lead_s == 2 * 1.0 + 0.5  # two readings 1 s apart + a live interval
    trace = climbing_node(3.5, R.WORKER_READING)
    t, decision = first_stop(default, trace)
    reading = trace[t][0]
    # Stopped at t=3 (7.4 GiB, still under the threshold): the node was going to pass 8 GiB.
    assert t == 3 and reading.used_bytes < 8 * GiB and decision.action == R.REQUEUE_LOWEST_PRIORITY
    assert decision.call_id == "b" and "going to" in decision.detail  # the newer task gives way
    # Judging each reading as it is, the first high reading (t=4, 8.4 GiB) is past Ray's line already.
    t_plain, _ = first_stop(default.replace(node_memory_projection=False), trace)
    assert t_plain == 5 and trace[4][0].used_bytes > 8 * GiB
    # A metrics endpoint's reading may be 5 s old: no growth rate is taken from it.
    assert first_stop(default, climbing_node(3.5, R.METRICS_READING))[0] == 5
    # A node with a lowered threshold that the config leaves to Ray's killer (node_kill_margin
    # None) is left to it by the projection too: the climb ends at 65%, under the 90% judged by.
    assert first_stop(default.replace(node_kill_margin=None), trace) is None


def test_a_node_climbing_to_expected_peaks_that_fit_is_left_alone():
    """The same climb, but the tasks' expected peaks (their predictions' upper bounds, 1.85 GiB
    each) end the node at 7.7 GiB, under its 7.84 GiB threshold: the growth is projected no
    further than they allow, so nothing is stopped.  Unbounded, the rate of 1 GiB/s x 2.5 s
    would have read 6.4 GiB at t=2 as 8.9 GiB; bounded by the labels (15% more: 8.26 GiB),
    past Ray's 8 GiB too. The admission queue fills a node's room by the upper bounds."""
    trace = climbing_node(1.85, R.WORKER_READING, seconds=10)
    assert max(r.used_bytes for r, _ in trace) == pytest.approx(7.7 * GiB)
    assert first_stop(RayschedConfig(), trace) is None
    rule = build_rules(RayschedConfig()).node_rule
    reading, running = trace[2]
    assert rule.projected_bytes(trace[1][0], reading, running) == pytest.approx(reading.used_bytes + 2 * 0.65 * GiB)
    by_labels = [(r, [replace(x, predicted_memory_upper_bytes=float(x.allocation.memory_bytes)) for x in xs])
                 for r, xs in trace]
    assert first_stop(RayschedConfig(), by_labels) is not None


def test_an_attempt_is_expected_to_hold_its_upper_bound_or_a_callers_own_figure():
    sized = live(allocation=Allocation(1.0, 1 * GiB), predicted_memory_upper_bytes=900 * MiB, rss_bytes=500 * MiB)
    assert sized.expected_peak_bytes == 900 * MiB and sized.memory_headroom_bytes == 400 * MiB
    own = replace(sized, allocation=Allocation(1.0, 1 * GiB, memory_is_task_only=True), start_rss_bytes=150 * MiB)
    assert own.expected_peak_bytes == (1024 + 150) * MiB  # memory= is the task's: on top of the worker
    assert replace(sized, rss_bytes=2 * GiB).memory_headroom_bytes == 0.0


def test_build_rules_follows_the_config():
    rules = build_rules(RayschedConfig())
    assert [r.name for r in rules.attempt_rules] == [
        "memory_hard_limit", "memory_over_allocation", "wall_over_prediction", "cpu_off_allocation"]
    assert [r.sustain for r in rules.attempt_rules] == [RayschedConfig().monitor_limit_sustain_samples] + \
        [RayschedConfig().monitor_sustain_samples] * 3
    assert rules.node_rule.threshold == 0.9
    cfg = RayschedConfig(memory_limit_bytes=8 * GiB, memory_limits={"mod.f": 2 * GiB}, monitor_memory_tolerance=1.5)
    assert cfg.memory_limits == (("mod.f", 2 * GiB),) and hash(cfg)  # a mapping is stored hashable
    cap = build_rules(cfg).attempt_rules[0].check
    assert cap.limit_for("mod.f") == 2 * GiB and cap.limit_for("mod.g") == 8 * GiB
    assert build_rules(cfg).attempt_rules[1].check.tolerance == 1.5


@pytest.mark.parametrize(
    "changes",
    [dict(monitor_sustain_samples=0), dict(node_memory_threshold=1.5), dict(memory_limit_bytes=0),
     dict(memory_limits={"f": -1}), dict(monitor_memory_tolerance=0.5),
     dict(monitor_cpu_low_ratio=2.0, monitor_cpu_high_ratio=1.0)],
)
def test_bad_monitor_knobs_are_refused(changes):
    with pytest.raises(ValueError, match="invalid RayschedConfig"):
        RayschedConfig(**changes)


def test_node_pressure_acts_below_a_lowered_ray_kill_threshold():
    """A node whose Ray memory monitor kills at 30% must not wait for raysched's own 90%."""
    rules = build_rules(CFG)
    running = running_on("node-a", ("low", 0, 100))
    clock = FakeClock()
    lowered = [NodeMemory("node-a", 0.295 * 64 * GiB, 64 * GiB, clock(), kill_threshold=0.30) for _ in range(N)]
    got = replay_node(rules, lowered, running)
    assert got[-1] is not None and got[-1].call_id == "low"
    assert got[-1].allocated == pytest.approx(0.30 - CFG.node_kill_margin)
    assert "Ray kills at 30%" in got[-1].detail
    # Below Ray's threshold less the margin: nothing; and Ray's default (0.95) leaves raysched's 0.9 in charge.
    calm = [NodeMemory("node-a", 0.26 * 64 * GiB, 64 * GiB, clock(), kill_threshold=0.30) for _ in range(N)]
    assert replay_node(rules, calm, running) == [None] * N
    rule = rules.node_rule
    assert rule.threshold_for(NodeMemory("n", 1, 2, kill_threshold=0.95)) == CFG.node_memory_threshold
    assert rule.threshold_for(NodeMemory("n", 1, 2)) == CFG.node_memory_threshold
    opted_out = build_rules(CFG.replace(node_kill_margin=None)).node_rule  # leave such nodes to Ray's killer
    assert opted_out.threshold_for(NodeMemory("n", 1, 2, kill_threshold=0.30)) == CFG.node_memory_threshold


def test_a_nodes_room_is_its_threshold_less_what_anything_but_its_running_attempts_uses():
    rule = build_rules(CFG).node_rule
    # Ray kills at 50% of 16 GiB: raysched's line is a point below (7.84 GiB); the node uses
    # 6 GiB, 1.5 GiB of it the attempts': everything else holds 4.5 GiB.
    reading = NodeMemory("node-a", 6 * GiB, 16 * GiB, kill_threshold=0.5)
    assert rule.room_bytes(reading, 1.5 * GiB) == pytest.approx((0.5 - CFG.node_kill_margin) * 16 * GiB - 4.5 * GiB)
    # No lowered threshold: raysched's own 90%; and a node past its line has no room at all.
    assert rule.room_bytes(NodeMemory("node-a", 6 * GiB, 16 * GiB), 0.0) == pytest.approx(0.9 * 16 * GiB - 6 * GiB)
    assert rule.room_bytes(NodeMemory("node-a", 15 * GiB, 16 * GiB), 0.0) == 0.0
    # Idle Ray workers' memory (a probe's reading) is not room lost: tasks reuse those workers.
    idle = NodeMemory("node-a", 6 * GiB, 16 * GiB, kill_threshold=0.5, idle_workers_bytes=0.25 * GiB)
    assert rule.room_bytes(idle, 1.5 * GiB) == pytest.approx(rule.room_bytes(reading, 1.5 * GiB) + 0.25 * GiB)


def test_an_attempts_size_at_a_reading_is_read_off_the_line_between_its_samples():
    samples = [(10.0, 100.0), (10.5, 600.0), (11.0, 1100.0), (11.5, 1100.0)]
    assert R.resident_at(samples, 10.25, near=0.75) == pytest.approx(350.0)  # growing 1,000 a second
    assert R.resident_at(samples, 11.2, near=0.75) == pytest.approx(1100.0)
    assert R.resident_at(samples, 9.5, near=0.75) == 100.0  # just before its first sample
    assert R.resident_at(samples, 12.0, near=0.75) == 1100.0  # just after its last
    assert R.resident_at(samples, 9.0, near=0.75) == 0.0  # not started yet
    assert R.resident_at(samples, 12.5, near=0.75) == 0.0  # ended: freed
    assert R.resident_at([], 10.0, near=0.75) == 0.0
    # Its worker said when it ended: its last size until then, whether sooner or later than near.
    assert R.resident_at(samples, 11.6, near=0.75, ended_at=11.55) == 0.0
    assert R.resident_at(samples, 12.5, near=0.75, ended_at=13.0) == 1100.0


# --- actors: the same checks, rescaling instead of resubmitting -----------------------------------


def actor(clock: FakeClock | None = None, **changes) -> LiveReport:
    return live(clock, **{"kind": R.ACTOR, "rescalable": True, "call_id": "actor-1:1",
                          "allocation": Allocation(1.0, 256 * MiB), **changes})


def test_an_actor_over_its_allocation_is_rescaled_after_n_samples_and_never_requeued():
    clock = FakeClock()
    rules = build_rules(CFG)
    per_sample = replay(rules, [actor(clock, rss_bytes=400 * MiB) for _ in range(N + 2)])
    assert actions(per_sample) == [(), ()] + [(R.RESCALE,)] + [(), ()]
    # The node rule picks tasks only: an actor's state cannot be requeued.
    node_rule = R.NodePressure(0.9)
    assert node_rule.victim([actor(priority=-5), live(priority=3)]).kind == R.TASK
    assert node_rule.victim([actor()]) is None


@pytest.mark.parametrize(
    "changes,why",
    [
        (dict(rescalable=False), "did not opt in"),
        (dict(attempt=CFG.actor_max_rescales + 1), "rescaled 3 times already"),
    ],
)
def test_an_actor_that_cannot_be_rescaled_is_warned_about_once_and_stays_judged(changes, why):
    clock = FakeClock()
    rss = 400 * MiB if "cpu_seconds" not in changes else 100 * MiB
    reports = [actor(clock, rss_bytes=rss, **changes) for _ in range(CFG.actor_cpu_sustain_samples + 2)]
    per_sample = replay(build_rules(CFG), reports)
    fired = [d for ds in per_sample for d in ds]
    assert [d.action for d in fired] == [R.WARN] and why in fired[0].detail
    # A warning is no stop: the hard cap still watches it.
    capped = build_rules(CFG.replace(memory_limit_bytes=rss // 2))
    assert R.STOP_LIMIT in {d.action for ds in replay(capped, reports) for d in ds}


def test_an_actor_off_its_cpu_is_rescaled_only_after_the_longer_cpu_streak():
    clock = FakeClock()
    idle = [actor(clock, cpu_seconds=0.5, wall_seconds=20.0 + i, rss_bytes=100 * MiB,
                  allocation=Allocation(2.0, 256 * MiB)) for i in range(CFG.actor_cpu_sustain_samples + 1)]
    per_sample = replay(build_rules(CFG), idle)
    stops = [i for i, ds in enumerate(per_sample) if any(d.action == R.RESCALE for d in ds)]
    assert stops == [CFG.actor_cpu_sustain_samples - 1]
    # Tasks only record the same finding, at once, and nothing stops them.
    task = replay(build_rules(CFG), [replace(r, kind=R.TASK) for r in idle])
    assert actions(task)[0] == (R.RECORD_CPU,)


def test_an_actor_being_replaced_still_stops_at_its_hard_cap():
    clock = FakeClock()
    rules = build_rules(CFG.replace(memory_limit_bytes=1 * GiB))
    growing = [actor(clock, rss_bytes=(400 + 200 * i) * MiB) for i in range(8)]
    state, decided = AttemptState(), []
    for r in growing:
        state, ds = rules.evaluate(state, r)
        decided += ds
    assert [d.action for d in decided] == [R.RESCALE, R.STOP_LIMIT]
    assert state.stop.action == R.STOP_LIMIT  # the cap overrides the pending rescale
    # A task's stop, by contrast, ends its evaluation.
    task_state, _ = rules.evaluate(AttemptState(), live(clock))
    task_state = R.with_stop(task_state, Decision("x", R.STOP_AND_RESUBMIT, "mod.f", "c1", 1))
    assert rules.evaluate(task_state, live(clock, rss_bytes=5 * GiB)) == (task_state, ())


def test_an_attempt_capped_at_its_memory_limit_is_left_to_the_caps_rule():
    capped = Allocation(1.0, 600 * MiB, capped=True, reason="2 x observed peak, capped at the memory limit")
    finding = R.MemoryOverAllocation(1.2, 4)(live(rss_bytes=800 * MiB, allocation=capped))
    assert finding.action == R.WARN and "capped at the memory limit" in finding.detail


def test_low_cpu_use_at_the_floor_of_a_quarter_core_is_not_recorded():
    """Nothing smaller would be asked for: the record (a task's) and the warning that no other
    size exists (an actor's) only filled the events (a helper's audit)."""
    clock = FakeClock()
    floor = dict(allocation=Allocation(0.25, 256 * MiB), cpu_seconds=0.1, wall_seconds=20.0, rss_bytes=100 * MiB)
    reports = [actor(clock, **floor) for _ in range(CFG.actor_cpu_sustain_samples + 2)]
    assert [d for ds in replay(build_rules(CFG), reports) for d in ds] == []
    tasks = [replace(r, kind=R.TASK) for r in reports]
    assert [d for ds in replay(build_rules(CFG), tasks) for d in ds] == []
    above = [replace(r, allocation=Allocation(1.0, 256 * MiB)) for r in tasks]
    assert [d.action for ds in replay(build_rules(CFG), above) for d in ds] == [R.RECORD_CPU]


def test_a_sample_that_stops_an_attempt_records_nothing_else_about_it():
    clock = FakeClock()
    rules = build_rules(CFG.replace(memory_limit_bytes=300 * MiB))
    # Over the cap from the first sample; its cores fall below the record's bar on the N-th,
    # the sample that stops it.
    idle_and_over = [live(clock, rss_bytes=400 * MiB, cpu_seconds=0.1 if i == N - 1 else 20.0 + i,
                          wall_seconds=20.0 + i) for i in range(N)]
    fired = [d.action for ds in replay(rules, idle_and_over) for d in ds]
    assert fired == [R.STOP_LIMIT], fired


def test_of_equals_a_call_with_attempts_left_gives_way_before_one_on_its_last():
    """A call on its last attempt that gives way fails with AttemptsExhausted, though it outgrew
    nothing: of two equal priorities that would each relieve the node, the other goes, even if
    the last-attempt one started later; never a lower priority's place, though."""
    rule = build_rules(CFG).node_rule
    veteran = live(call_id="veteran", attempt=4, max_attempts=4, rss_bytes=3 * GiB, wall_seconds=2.0)
    fresh = live(call_id="fresh", attempt=1, max_attempts=4, rss_bytes=3 * GiB, wall_seconds=60.0)
    assert rule.victim([veteran, fresh], excess_bytes=1 * GiB).call_id == "fresh"
    assert rule.victim([veteran, replace(fresh, max_attempts=None)], excess_bytes=1 * GiB).call_id == "fresh"
    assert rule.victim([veteran, replace(fresh, priority=1)], excess_bytes=1 * GiB).call_id == "veteran"
    assert rule.victim([veteran], excess_bytes=1 * GiB).call_id == "veteran"


def test_a_nodes_worker_readings_count_though_its_clock_is_behind_the_monitors():
    """Endpoint readings carry the monitor's clock, worker readings their node's: one last time
    for both dropped every worker reading after the first poll on a node 6 s behind."""
    rules = build_rules(CFG.replace(node_memory_projection=False))
    worker = lambda t: NodeMemory("node-a", 0.97 * GiB, GiB, t, source=R.WORKER_READING)  # noqa: E731
    endpoint = NodeMemory("node-a", 0.5 * GiB, GiB, 106.0, source=R.METRICS_READING)
    state, fired = NodeState(), []
    for reading in (worker(100.0), endpoint, *(worker(100.0 + t) for t in range(1, 4))):
        state, decision = rules.evaluate_node(state, reading, [live()])
        fired.append(decision is not None)
    # The endpoint's low reading restarts the count; then N worker readings in a row fire.
    assert fired == [False, False] + [False] * (N - 1) + [True] + [False] * (3 - N), fired


def test_a_task_is_stopped_for_the_next_rung_only_where_the_ladder_has_one_beside_its_label():
    """A stopped task keeps its `memory` label while its next attempt runs, so the ladder caps
    that attempt at what the largest node leaves beside it (``worker.climb_and_resubmit``).
    From half the node up nothing bigger fits: a stop there failed the call
    (AttemptsExhausted after one attempt) that Ray would have let run on the node's room."""
    from raysched.policy.ladder import LadderState
    from raysched.policy.recipe import build_ladder
    from raysched.types import AttemptRecord, Outcome

    largest = 16 * GiB
    ladder = build_ladder(CFG)
    check = R.MemoryOverAllocation(1.2, 4)
    est = live().allocation
    memory = Estimate(target=GiB, lower=GiB, upper=GiB, coverage=0.9, n_history=20)
    prediction = Prediction(memory=memory, cpu=memory, wall=memory, source="history")
    for gib in (4, 7.5, 8, 10, 15):
        allocation = replace(est, memory_bytes=int(gib * GiB))
        finding = check(live(allocation=allocation, rss_bytes=int(gib * 1.3 * GiB), largest_node_bytes=largest))
        held = float(allocation.memory_bytes)  # as climb_and_resubmit: the room beside its own label
        room = max(largest - held, held)
        failed = (AttemptRecord(1, allocation, Outcome.OOM_KILLED, None, "stopped"),)
        rung = ladder.next_allocation(LadderState(prediction, failed, 0.0, room, None))
        assert (finding.action == R.STOP_AND_RESUBMIT) == (rung is not None), gib
        if rung is None:
            assert finding.action == R.WARN and "beside" in finding.detail and "16384 MiB" in finding.detail
    # An actor's rescale holds no label beside it; unknown node sizes change nothing.
    big = replace(est, memory_bytes=10 * GiB)
    assert check(live(allocation=big, rss_bytes=13 * GiB)).action == R.STOP_AND_RESUBMIT
    assert check(live(allocation=big, rss_bytes=13 * GiB, largest_node_bytes=largest,
                      kind=R.ACTOR)).action == R.STOP_AND_RESUBMIT


def test_a_handed_over_attempt_is_not_stopped_where_its_waiting_tasks_leave_the_ladder_no_rung():
    """Attempt 2 runs while attempt 1's task waits for it, holding its label: the ladder caps
    attempt 3 at the largest node less both labels (``worker.ladder_room``). Below half the
    node, attempt 2 was still stopped there, and its call failed with AttemptsExhausted
    ("killed for memory on every rung") after 2 of its 4 attempts, where Ray let it run."""
    from raysched.policy.ladder import LadderState
    from raysched.policy.recipe import build_ladder
    from raysched.types import AttemptRecord, Outcome

    largest, waiting = 16 * GiB, 5 * GiB  # attempt 1's label, held by its waiting task
    ladder = build_ladder(CFG)
    check = R.MemoryOverAllocation(1.2, 4)
    est = live().allocation
    memory = Estimate(target=GiB, lower=GiB, upper=GiB, coverage=0.9, n_history=20)
    prediction = Prediction(memory=memory, cpu=memory, wall=memory, source="history")
    first = AttemptRecord(1, replace(est, memory_bytes=waiting), Outcome.OOM_KILLED, None, "stopped")
    for gib in (2, 5, 5.5, 6, 7):
        allocation = replace(est, memory_bytes=int(gib * GiB))
        held = float(allocation.memory_bytes)
        room = max(largest - held - waiting, held)  # as worker.ladder_room
        finding = check(live(attempt=2, allocation=allocation, rss_bytes=int(gib * 1.3 * GiB),
                             largest_node_bytes=largest, ladder_room_bytes=room))
        failed = (first, AttemptRecord(2, allocation, Outcome.OOM_KILLED, None, "stopped"))
        rung = ladder.next_allocation(LadderState(prediction, failed, 0.0, room, None))
        assert (finding.action == R.STOP_AND_RESUBMIT) == (rung is not None), (gib, finding)
        if rung is None:
            assert finding.action == R.WARN and "waiting for it" in finding.detail
    # 6 GiB is below half the node: the case that was stopped into AttemptsExhausted.
    assert check(live(attempt=2, allocation=replace(est, memory_bytes=6 * GiB), rss_bytes=8 * GiB,
                      largest_node_bytes=largest, ladder_room_bytes=6 * GiB)).action == R.WARN
