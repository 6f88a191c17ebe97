"""Actors without Ray: the rescale sizing (pure) and the driver's watcher, driven with fakes."""

from __future__ import annotations

import pytest

from raysched.config import RayschedConfig
from raysched.policy.recipe import build_sizer
from raysched.policy.rescale import rescale_target
from raysched.policy.rules import RESCALE, STOP_LIMIT, Decision
from raysched.runtime.actors import ActorWatcher
from raysched.types import Allocation, ClusterShape, GiB, MiB, NodeShape

CFG = RayschedConfig()
SIZER = build_sizer(CFG)


def test_a_memory_rescale_gives_headroom_over_what_the_actor_holds_and_keeps_its_cpus():
    new = rescale_target("memory_over_allocation", 400 * MiB, Allocation(1.5, 256 * MiB), SIZER, CFG)
    # 400 MiB x 1.5 headroom x 1.15 margin = 690 MiB, rounded up to 16 MiB.
    assert new.memory_bytes == 704 * MiB and new.num_cpus == 1.5 and new.rung == 1
    # A small overshoot still grows by the ladder's minimum step.
    small = rescale_target("memory_over_allocation", 260 * MiB, Allocation(1.0, 1 * GiB), SIZER, CFG)
    assert small.memory_bytes >= 1.5 * GiB


def test_a_cpu_rescale_sizes_for_the_cores_used_and_keeps_the_memory():
    down = rescale_target("cpu_off_allocation", 0.3, Allocation(4.0, 512 * MiB), SIZER, CFG)
    assert (down.num_cpus, down.memory_bytes) == (0.5, 512 * MiB)
    up = rescale_target("cpu_off_allocation", 2.9, Allocation(1.0, 512 * MiB), SIZER, CFG)
    assert up.num_cpus == 3.0
    assert rescale_target("cpu_off_allocation", 0.01, Allocation(0.25, 512 * MiB), SIZER, CFG) is None


def test_what_a_rescale_keeps_keeps_its_meaning_and_a_callers_num_cpus_is_never_rescaled():
    """A CPU rescale kept a fallback's (or the caller's) memory figure but lost that it was the
    task's own: the successor, judged by it as a whole process, was memory-rescaled at once for the
    same use. And an actor created with .options(num_cpus=4) was rescaled to 0.25 CPU when idle."""
    from raysched.policy import rules as R
    from raysched.policy.recipe import build_rules
    from raysched.policy.rules import AttemptState, LiveReport

    callers = Allocation(4.0, 512 * MiB, memory_is_task_only=True, memory_set_by_caller=True,
                         num_cpus_set_by_caller=True)
    down = rescale_target("cpu_off_allocation", 0.3, callers, SIZER, CFG)
    assert down.memory_bytes == 512 * MiB and down.memory_is_task_only and down.memory_set_by_caller
    grown = rescale_target("memory_over_allocation", 900 * MiB, callers, SIZER, CFG)
    assert grown.num_cpus == 4.0 and grown.num_cpus_set_by_caller and not grown.memory_is_task_only

    def idle(allocation, i):
        return LiveReport(function="mod.A", code_hash="h", call_id="actor:1", attempt=1, node_id="n", priority=0,
                          allocation=allocation, predicted_memory_upper_bytes=0.0, predicted_wall_upper_s=100.0,
                          prediction_source="fallback", rss_bytes=300 * MiB, peak_rss_bytes=300 * MiB,
                          cpu_seconds=0.2, wall_seconds=10 + i * 0.5, timestamp=1.0 + i * 0.5, kind=R.ACTOR,
                          rescalable=True, start_rss_bytes=150 * MiB)

    rules = build_rules(CFG)
    for allocation, wanted in ((callers, R.WARN), (Allocation(4.0, 512 * MiB, memory_is_task_only=True), R.RESCALE)):
        state, got = AttemptState(), []
        for i in range(40):
            state, decisions = rules.evaluate(state, idle(allocation, i))
            got += [d for d in decisions if d.rule == "cpu_off_allocation"]
        assert [d.action for d in got] == [wanted], got
        assert ("the caller set its num_cpus" in got[0].detail) == (wanted == R.WARN), got[0].detail


def test_a_rescale_fits_the_largest_node_and_none_when_it_already_fills_it():
    cluster = ClusterShape((NodeShape("n1", 2.0, 1 * GiB),))
    new = rescale_target("memory_over_allocation", 900 * MiB, Allocation(1.0, 512 * MiB), SIZER, CFG, cluster)
    assert new.memory_bytes == 1 * GiB and new.capped
    assert rescale_target("memory_over_allocation", 1.1 * GiB, new, SIZER, CFG, cluster) is None
    with pytest.raises(ValueError, match="no rescale"):
        rescale_target("wall_over_prediction", 1.0, new, SIZER, CFG)


class FakeHandle:
    def __init__(self, actor_id: str, keys: list[str]):
        self._raysched_actor_id, self.keys, self.applied = actor_id, keys, []

    def _watch_keys(self):
        return list(self.keys)

    def _apply(self, decision):
        self.applied.append(decision)
        return None


def decision(call_id: str, action: str, attempt: int = 1) -> Decision:
    return Decision("memory_over_allocation", action, "mod.A", call_id, attempt)


def test_the_watcher_asks_once_for_every_running_incarnation_and_hands_stops_to_their_handle():
    asked = []
    answers = {"a:1": decision("a:1", RESCALE), "a:0": decision("a:0", STOP_LIMIT, 0),
               "b:1": decision("b:1", "none")}

    def directives(keys):
        asked.append(keys)
        return {k: answers[k] for k in keys if k in answers}

    watcher = ActorWatcher(directives, interval_s=3600)  # the thread sleeps; the test drives it
    a, b = FakeHandle("a", ["a:1", "a:0"]), FakeHandle("b", ["b:1"])
    watcher.watch(a)
    watcher.watch(b)
    watcher.check_once()
    assert asked == [["a:0", "a:1", "b:1"]]  # one request for all of them
    assert sorted(d.action for d in a.applied) == [RESCALE, STOP_LIMIT]
    assert b.applied == []  # "none" is no stop
    watcher.unwatch(a)
    del b  # handles are held weakly: a dropped one is not asked about
    import gc

    gc.collect()
    watcher.check_once()
    assert asked[-1] == ["a:0", "a:1", "b:1"] and len(asked) == 1


def test_an_actor_that_did_not_opt_in_is_warned_only_when_one_that_did_would_be_rescaled():
    """The README: memory over its allocation x 1.2 for 3 samples is a rescale, or for a class that
    did not opt in a warning. The warning came on the first sample over it: a spike the opted-in
    actor rides out warned "left as is: did not opt in", and used up the rule's one firing."""
    from raysched.policy import rules as R
    from raysched.policy.recipe import build_rules
    from raysched.policy.rules import AttemptState, LiveReport

    def report(i, rss, rescalable):
        return LiveReport(function="mod.A", code_hash="h", call_id="actor:1", attempt=1, node_id="n", priority=0,
                          allocation=Allocation(0.5, 256 * MiB), predicted_memory_upper_bytes=0.0,
                          predicted_wall_upper_s=100.0, prediction_source="fallback", rss_bytes=rss,
                          peak_rss_bytes=rss, cpu_seconds=0.0, wall_seconds=1.0 + i, timestamp=1.0 + i,
                          kind=R.ACTOR, rescalable=rescalable, start_rss_bytes=100 * MiB)

    rules = build_rules(CFG)
    spike_then_growth = [400 * MiB, 200 * MiB] + [400 * MiB] * CFG.monitor_sustain_samples
    for rescalable, wanted in ((True, R.RESCALE), (False, R.WARN)):
        state, got = AttemptState(), []
        for i, rss in enumerate(spike_then_growth):
            state, decisions = rules.evaluate(state, report(i, rss, rescalable))
            got += [(i, d.action) for d in decisions if d.rule == "memory_over_allocation"]
        assert got == [(len(spike_then_growth) - 1, wanted)], (rescalable, got)
