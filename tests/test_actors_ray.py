"""``@adaptive_remote`` on a class, on a real local Ray: sizing from past incarnations,
measured rows, rescaling with state kept, opting out, and the hard cap."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
import ray

import raysched
from raysched import InvalidInput, ResourceLimitExceeded, adaptive_remote
from raysched.policy.rules import RESCALE, Decision
from raysched.types import MiB

from conftest import wait_for

pytestmark = pytest.mark.ray

CAP = 700 * MiB


@pytest.fixture(scope="module", autouse=True)
def actor_config(ray_session):
    raysched.configure(live_interval_s=0.2, monitor_sustain_samples=2, memory_limits={"Leaky": CAP, "Squatter": CAP})
    yield


@adaptive_remote(memory=300 * MiB, num_cpus=0.5)
class Holder:
    """Holds a block of memory of the size it was asked for; stateless apart from it."""

    def __init__(self, mib: int = 0):
        self.block = np.ones(mib * MiB // 8) if mib else None

    def nbytes(self) -> int:
        return 0 if self.block is None else int(self.block.nbytes)

    def pid(self) -> int:
        import os

        return os.getpid()


@adaptive_remote(memory=200 * MiB)
class Grower:
    """Keeps a list (its state, saved and restored across a rescale) and may grow a buffer."""

    def __init__(self):
        self.items: list[int] = []
        self.buffer = None

    def add(self, x: int) -> int:
        self.items.append(x)
        return len(self.items)

    def grow(self, mib: int) -> int:
        self.buffer = np.ones(mib * MiB // 8)
        return int(self.buffer.nbytes)

    def raysched_save_state(self):
        return list(self.items)

    def raysched_restore_state(self, state):
        self.items = state


@adaptive_remote(memory=200 * MiB)
class Unscalable:
    def __init__(self):
        self.buffer = None

    def grow(self, mib: int) -> int:
        self.buffer = np.ones(mib * MiB // 8)
        return int(self.buffer.nbytes)

    def ping(self) -> str:
        return "pong"


def _grow(blocks: list, mib_per_step: int, steps: int) -> int:
    """What the leaky actors' ``leak`` does: a step of memory every 50 ms, kept."""
    import time

    for _ in range(steps):
        blocks.append(np.ones(mib_per_step * MiB // 8))
        time.sleep(0.05)
    return len(blocks)


@adaptive_remote(memory=200 * MiB, rescalable=True)
class Leaky:
    def __init__(self):
        self.blocks = []

    def leak(self, mib_per_step: int, steps: int) -> int:
        return _grow(self.blocks, mib_per_step, steps)


@ray.remote
def ask_nbytes(actor) -> int:
    return ray.get(actor.nbytes.remote())


def test_an_actor_runs_its_calls_and_records_one_row_with_its_real_use(ray_session):
    handle = Holder.remote(120)
    assert handle.prediction.source.startswith("fallback")
    # The fallback is taken as an upper bound, with the margin and rounding a task's gets.
    assert handle.allocation.num_cpus == 0.5 and 300 * MiB <= handle.allocation.memory_bytes <= 400 * MiB
    assert ray.get(handle.nbytes.remote(), timeout=60) == 120 * MiB
    with pytest.raises(AttributeError, match="no method"):
        handle.missing
    # Passed to a task, the handle arrives as the actor's Ray handle.
    assert ray.get(ask_nbytes.remote(handle), timeout=60) == 120 * MiB
    usage = ray.get(handle.terminate(), timeout=60)
    assert usage.peak_rss_bytes - usage.start_rss_bytes >= 110 * MiB
    with pytest.raises(InvalidInput, match="terminated"):
        handle.nbytes.remote()
    rows = raysched.profiles(Holder)
    assert len(rows) == 1
    row = rows.iloc[0]
    assert (row["outcome"], row["attempt"], row["call_id"]) == ("ok", 1, handle.actor_id)
    assert row["allocated_memory_bytes"] == handle.allocation.memory_bytes and row["peak_rss_bytes"] >= 120 * MiB


def test_the_next_actor_of_a_class_is_sized_from_its_past_incarnations(ray_session):
    for _ in range(2):  # with the first test's row and the dropped one below, past min_history_for_stats
        ray.get(Holder.remote(120).terminate(), timeout=60)
    # A handle dropped without terminate() still has its actor record its row.
    dropped = Holder.remote(120)
    ray.get(dropped.nbytes.remote(), timeout=60)
    del dropped
    gc.collect()
    assert wait_for(lambda: len(raysched.profiles(Holder)) >= 4, timeout=30), raysched.profiles(Holder)[["outcome", "attempt"]]
    Holder.refresh()
    # predict() asks without creating an actor, with per-actor metadata too.
    assert Holder.predict(120).memory.n_history >= 4
    assert Holder.options(tags=["probe"]).predict(120).memory.source == "history"
    handle = Holder.remote(120)
    try:
        # (Memory: these lives are too short for their cores to count, so CPU stays on the fallback.)
        assert handle.prediction.memory.source == "history" and handle.prediction.memory.n_history >= 4
        peak = raysched.profiles(Holder)["peak_rss_bytes"].max()
        # Sized from what the incarnations held, with room above it, not from the fallback.
        assert peak <= handle.allocation.memory_bytes <= 3 * peak
    finally:
        ray.get(handle.terminate(), timeout=60)


def test_an_actor_that_outgrows_its_allocation_is_rescaled_and_keeps_its_state(ray_session):
    handle = Grower.remote()
    first_id, first_allocation = handle.ray_handle._actor_id, handle.allocation
    assert [ray.get(handle.add.remote(i), timeout=60) for i in range(3)] == [1, 2, 3]
    ray.get(handle.grow.remote(400), timeout=60)  # resident ~500 MiB against ~240 MiB allocated
    assert wait_for(lambda: handle.incarnation == 2, timeout=60), "the monitor did not rescale the actor"
    assert handle.ray_handle._actor_id != first_id
    # Calls through the handle go on, on the new actor, with the state handed over.
    assert ray.get(handle.add.remote(3), timeout=60) == 4
    assert handle.allocation.memory_bytes >= 1.5 * 400 * MiB
    (rescale,) = handle.rescales
    assert rescale.old == first_allocation and rescale.decision.rule == "memory_over_allocation"
    ray.get(handle.terminate(), timeout=60)
    assert wait_for(lambda: len(raysched.profiles(Grower)) == 2, timeout=30)
    rows = raysched.profiles(Grower).sort_values("attempt")
    assert rows["outcome"].tolist() == ["ok", "ok"]
    assert rows["allocated_memory_bytes"].tolist() == [first_allocation.memory_bytes, handle.allocation.memory_bytes]
    assert rows["attempt"].tolist() == [1, 2]
    assert rows["peak_rss_bytes"].iloc[0] >= 400 * MiB
    assert set(rows["call_id"]) == {handle.actor_id}
    events = raysched.events(Grower)
    assert {"rescale"} <= set(events["action"]) and "actor_rescaled" in set(events["rule"])


@adaptive_remote(memory=200 * MiB)
class SaveFails(Grower._cls):
    def raysched_save_state(self):
        raise RuntimeError("cannot pickle the connection")


@adaptive_remote(memory=200 * MiB)
class RestoreFails(Grower._cls):
    def raysched_restore_state(self, state):
        raise RuntimeError("bad state")


@adaptive_remote(memory=200 * MiB)
class SaveUnpicklable(Grower._cls):
    def raysched_save_state(self):
        import threading

        return threading.Lock()


def test_a_state_hand_over_that_fails_keeps_the_old_incarnation_serving_with_its_state(ray_session):
    """A save hook that raised (or returned what cannot be pickled) or a restore hook that raised
    ended the new incarnation, and the old one had already recorded its row and exited: the
    actor's state was lost for good and every later call raised RayschedError. The old
    incarnation, which still holds the state, must serve on (a helper's audit)."""
    for cls, cause in ((SaveFails, "cannot pickle the connection"), (SaveUnpicklable, "pickle"),
                       (RestoreFails, "bad state")):
        handle = cls.remote()
        first = handle.raysched.ray_handle
        assert [ray.get(handle.add.remote(i), timeout=60) for i in range(3)] == [1, 2, 3]
        grown = Decision("memory_over_allocation", RESCALE, cls.name, handle.raysched.actor_id, 1,
                         measured=600 * MiB, allocated=200 * MiB, detail="grown")
        assert handle._apply(grown) is not None and handle.raysched.incarnation == 2
        assert wait_for(lambda: handle.raysched.incarnation == 1, timeout=60), cls
        assert handle.raysched.ray_handle is first and handle.raysched.rescales == []
        assert ray.get(handle.add.remote(3), timeout=60) == 4  # the state __init__ did not build
        assert wait_for(lambda: "actor_rescale_skipped" in set(raysched.events(cls).get("rule", [])), timeout=30), \
            raysched.events(cls).T
        skipped = raysched.events(cls).query("rule == 'actor_rescale_skipped'")["detail"].iloc[0]
        assert "could not be handed over" in skipped and "serves on" in skipped, skipped
        assert wait_for(lambda: "error" in set(raysched.profiles(cls)["outcome"]), timeout=30)
        row = raysched.profiles(cls).set_index("attempt").loc[2]
        assert row["outcome"] == "error" and cause in row["error"], row["error"]
        ray.get(handle.raysched.terminate(), timeout=60)
        assert wait_for(lambda: len(raysched.profiles(cls)) == 2, timeout=30)
        assert raysched.profiles(cls).set_index("attempt").loc[1, "outcome"] == "ok"


@adaptive_remote(num_cpus=2, memory=200 * MiB, rescalable=True)
class Idler:
    def pid(self) -> int:
        import os

        return os.getpid()


# A test that counts on an idle actor holding its fallback's CPUs has a class of its own:
# three rows of Idler's earlier tests, once stored, size the next Idler down to the cores
# they used (the suite's order decided whether a named Idler was idle enough to judge).
@adaptive_remote(num_cpus=2, memory=200 * MiB, rescalable=True)
class WaitingIdler(Idler._cls):
    pass


@adaptive_remote(num_cpus=2, memory=200 * MiB, rescalable=True)
class NamedIdler(Idler._cls):
    pass


@adaptive_remote(num_cpus=0.5, memory=200 * MiB, rescalable=True)
class Lent(Idler._cls):
    pass


def test_an_idle_actor_is_rescaled_down_to_the_cores_it_uses(ray_session):
    base = raysched.get_config()
    raysched.configure(monitor_cpu_min_wall_s=1.0, actor_cpu_sustain_samples=3)  # the monitor follows
    try:
        handle = Idler.remote()
        first_pid, first_allocation = ray.get(handle.pid.remote(), timeout=60), handle.allocation
        assert first_allocation.num_cpus == 2.0
        assert wait_for(lambda: handle.incarnation == 2, timeout=60), raysched.events(Idler).T
        assert handle.allocation.num_cpus == 0.25  # the floor: it used next to nothing
        assert handle.allocation.memory_bytes == first_allocation.memory_bytes
        assert ray.get(handle.pid.remote(), timeout=60) != first_pid  # a new actor answers
        assert handle.rescales[0].decision.rule == "cpu_off_allocation"
        ray.get(handle.terminate(), timeout=60)
    finally:
        raysched.configure(base)


def test_a_rescale_waits_a_moment_after_ray_kill_could_have_read_the_actor_id(ray_session):
    handle = WaitingIdler.remote()
    ray.get(handle.pid.remote(), timeout=60)
    handle._ray_actor_id  # what ray.kill reads just before it kills
    idle = Decision("cpu_off_allocation", RESCALE, WaitingIdler.name, handle.raysched.actor_id, 1, measured=0.01,
                    allocated=2.0, detail="idle")
    assert handle._apply(idle) is None and handle.raysched.incarnation == 1
    time.sleep(1.1)  # no kill came: the same decision, given again, is applied
    assert handle._apply(idle) is not None and handle.raysched.incarnation == 2
    ray.get(handle.raysched.terminate(), timeout=60)


def skipped_rescales(cls, handle) -> list[str]:
    """The details of the actor_rescale_skipped events of ``handle``'s actor."""
    events = raysched.events(cls)
    mine = events[events["call_id"].str.startswith(handle.raysched.actor_id)]
    return mine[mine["rule"] == "actor_rescale_skipped"]["detail"].tolist()


@ray.remote(num_cpus=0)
def pid_through(actor) -> int:
    return ray.get(actor.pid.remote())


@pytest.mark.parametrize("how", ["a task's argument", "nested, through ray.put"])
def test_an_actor_whose_handle_was_passed_on_is_not_rescaled(ray_session, how):
    handle = Lent.remote()
    first_pid = ray.get(handle.pid.remote(), timeout=60)
    if how == "a task's argument":
        assert ray.get(pid_through.remote(handle), timeout=60) == first_pid
        elsewhere = handle.raysched.ray_handle  # what the task got
    else:
        elsewhere = ray.get(ray.put([handle]), timeout=60)[0]
    assert isinstance(elsewhere, ray.actor.ActorHandle) and not hasattr(elsewhere, "raysched")
    idle = Decision("cpu_off_allocation", RESCALE, Lent.name, handle.raysched.actor_id, 1, measured=0.01,
                    allocated=0.5, detail="idle")
    assert handle._apply(idle) is None
    assert handle.raysched.incarnation == 1 and handle.raysched.rescales == []
    # Rescaled, the incarnation the holder's handle names would have ended after its queue.
    time.sleep(1.0)
    assert ray.get(pid_through.remote(elsewhere), timeout=60) == first_pid
    assert ray.get(handle.pid.remote(), timeout=60) == first_pid
    assert wait_for(lambda: skipped_rescales(Lent, handle), timeout=30), raysched.events(Lent).T
    assert "its handle was passed to a task, an actor or ray.put" in skipped_rescales(Lent, handle)[0]
    ray.get(handle.raysched.terminate(), timeout=60)


@adaptive_remote(memory=256 * MiB, rescalable=True)
class Stateless:
    def pid(self) -> int:
        import os

        return os.getpid()


def test_a_stateless_actor_whose_incarnation_died_first_is_rescaled_into_one_that_serves(ray_session, monkeypatch):
    """Its node lost, say, before Ray marked it dead: with nothing to hand over, its successor
    ended itself all the same (it fetched the dead one's state), and every later call failed."""
    from raysched.runtime import actors

    handle = Stateless.remote()
    first = ray.get(handle.pid.remote(), timeout=60)
    ray.kill(handle.raysched.ray_handle)
    monkeypatch.setattr(actors, "_is_dead", lambda actor: False)  # Ray has not noticed yet
    spec = handle._spec
    grown = Decision("memory_over_allocation", RESCALE, spec.function, spec.live_key, spec.attempt,
                     measured=400 * MiB, allocated=float(spec.allocation.memory_bytes), detail="grew")
    assert handle._apply(grown) is not None
    assert ray.get(handle.pid.remote(), timeout=60) != first
    assert handle.incarnation == 2 and handle._stopped is None
    ray.get(handle.terminate(), timeout=60)


@adaptive_remote(memory=256 * MiB, rescalable=True)
class Spans:
    def span(self, delay: float) -> tuple:
        start = time.time()
        time.sleep(delay)
        return start, time.time()


def test_a_stateless_actors_calls_keep_their_order_across_a_rescale(ray_session):
    """Ray runs one caller's calls to an actor in the order sent. Across a rescale of an actor
    with no state to hand over, a call sent after the switch ran on the new actor at once,
    while one sent before still ran on the old: the later call overtook the earlier one."""
    handle = Spans.remote()
    ray.get(handle.span.remote(0.0), timeout=60)
    before = handle.span.remote(4.0)
    spec = handle._spec
    grown = Decision("memory_over_allocation", RESCALE, spec.function, spec.live_key, spec.attempt,
                     measured=400 * MiB, allocated=float(spec.allocation.memory_bytes), detail="grew")
    assert handle._apply(grown) is not None and handle.raysched.incarnation == 2
    after = handle.span.remote(0.0)
    (_, before_end), (after_start, _) = ray.get([before, after], timeout=60)
    assert after_start >= before_end, f"the later call started {before_end - after_start:.2f} s before the earlier ended"
    ray.get(handle.raysched.terminate(), timeout=60)


@adaptive_remote(memory=200 * MiB, max_concurrency=4)
class ThreadedTally:
    def __init__(self):
        self.n = 0

    def inc(self) -> int:
        self.n += 1
        return self.n

    def raysched_save_state(self):
        return self.n

    def raysched_restore_state(self, state):
        self.n = state


@adaptive_remote(memory=200 * MiB)
class AsyncTally(ThreadedTally._cls):
    async def inc(self) -> int:
        self.n += 1
        return self.n


def test_an_actor_that_runs_calls_at_once_and_hands_over_state_is_not_replaced(ray_session):
    # Its save and restore would race the calls around them, losing their effects silently.
    for cls, why in ((ThreadedTally, "a threaded actor (max_concurrency=4)"), (AsyncTally, "an async actor")):
        handle = cls.remote()
        assert ray.get(handle.inc.remote(), timeout=60) == 1
        grown = Decision("memory_over_allocation", RESCALE, cls.name, handle.raysched.actor_id, 1,
                         measured=600 * MiB, allocated=200 * MiB, detail="grown")
        assert handle._apply(grown) is None and handle.raysched.incarnation == 1
        assert ray.get(handle.inc.remote(), timeout=60) == 2
        assert wait_for(lambda: why in " ".join(raysched.events(cls)["detail"]), timeout=30), raysched.events(cls).T
        ray.get(handle.raysched.terminate(), timeout=60)


class _Worker:
    def __init__(self):
        self.held = []

    def work(self, wait_s: float, mib: int) -> int:
        time.sleep(wait_s)
        self.held.append(np.ones(mib * MiB // 8))
        return mib


@adaptive_remote(memory=200 * MiB, max_concurrency=2)
class ThreadedWorker(_Worker):
    pass


@adaptive_remote(memory=200 * MiB)
class AsyncWorker(_Worker):
    async def ping(self) -> str:
        return "pong"


def test_the_row_of_an_actor_that_runs_calls_at_once_waits_for_the_calls_sent_before_its_end(ray_session):
    """``terminate()`` right after a call: a threaded or async actor recorded its row beside the
    call, not after it (62 MiB and 0 s for a call that held 600 MiB for 1.4 s; a helper's audit).
    Its end still comes after the row."""
    for cls in (ThreadedWorker, AsyncWorker):
        handle = cls.remote()
        call = handle.work.remote(1.0, 300)
        usage = ray.get(handle.raysched.terminate(), timeout=60)
        assert ray.get(call, timeout=60) == 300
        assert usage.wall_seconds >= 1.0 and usage.task_rss_bytes >= 280 * MiB, (cls.name, usage)
        rows = raysched.profiles(cls)
        assert len(rows) == 1 and rows["peak_rss_bytes"].iloc[0] >= 280 * MiB, rows.T


def test_a_named_actor_is_not_replaced_and_the_event_says_why(ray_session):
    base = raysched.get_config()
    raysched.configure(monitor_cpu_min_wall_s=1.0, actor_cpu_sustain_samples=3)  # idle: a rescale decision
    try:
        handle = NamedIdler.options(name="raysched-named-idler", lifetime="detached").remote()
        first_pid = ray.get(handle.pid.remote(), timeout=60)
        assert wait_for(lambda: skipped_rescales(NamedIdler, handle), timeout=60), raysched.events(NamedIdler).T
        assert "a named actor ('raysched-named-idler') is never replaced" in skipped_rescales(NamedIdler, handle)[0]
        assert handle.raysched.incarnation == 1 and handle.raysched.rescales == []
        assert ray.get(handle.pid.remote(), timeout=30) == first_pid
        found = ray.get_actor("raysched-named-idler")
        assert ray.get(found.pid.remote(), timeout=30) == first_pid
        ray.get(handle.raysched.terminate(), timeout=60)
    finally:
        raysched.configure(base)
        try:  # detached, and holding 2 CPUs: left behind by a failure, it starved every later test
            ray.kill(ray.get_actor("raysched-named-idler"))
        except ValueError:
            pass  # ended already


def test_ray_kill_ends_an_adaptive_actor_and_no_rescale_brings_it_back(ray_session):
    handle = Idler.remote()
    assert isinstance(handle, ray.actor.ActorHandle)
    killed = handle.raysched.ray_handle
    ray.get(handle.pid.remote(), timeout=60)
    ray.kill(handle)
    # Ray's kill travels through the GCS while a call goes straight to the actor: with plain
    # Ray too, a call sent right after ray.kill runs now and then (1 in 20 here).
    assert wait_for(lambda: _call_fails(handle), timeout=30)
    # A rescale the monitor decided from its last samples, applied after the kill.
    time.sleep(1.1)  # (one applied at once waits for a kill that may be on its way: test_a_rescale_waits_...)
    late = Decision("cpu_off_allocation", RESCALE, Idler.name, handle.raysched.actor_id, 1, measured=0.01,
                    allocated=2.0, detail="idle")
    assert handle._apply(late) is None
    assert handle.raysched.incarnation == 1 and handle.raysched.ray_handle is killed
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(handle.pid.remote(), timeout=60)
    assert wait_for(lambda: "not rescaled: the actor is dead" in " ".join(raysched.events(Idler)["detail"]))
    # A named, detached one: killed, its name is free again, as with Ray.
    named = Holder.options(name="raysched-kill-probe", lifetime="detached").remote()
    probe = ray.get_actor("raysched-kill-probe")
    assert ray.get(probe.nbytes.remote(), timeout=60) == 0
    ray.kill(named)
    assert wait_for(lambda: _no_actor_named("raysched-kill-probe"), timeout=30)


def _call_fails(handle) -> bool:
    try:
        ray.get(handle.pid.remote(), timeout=60)
    except ray.exceptions.RayActorError:
        return True
    return False


def _no_actor_named(name: str) -> bool:
    try:
        ray.get_actor(name)
    except ValueError:
        return True
    return False


@adaptive_remote(memory=100 * MiB)
class Light:
    def ping(self) -> str:
        return "pong"


@ray.remote
def plain_task() -> int:
    return 1


def test_actors_given_no_cpus_hold_none_while_they_run_as_plain_ray_actors(ray_session):
    # More actors than the cluster's 2 CPUs, and a task beside them: Ray's default for an
    # actor is 1 CPU to be placed and none while it runs.
    actors = [Light.remote() for _ in range(3)]
    try:
        assert ray.get([a.ping.remote() for a in actors], timeout=60) == ["pong"] * 3
        assert ray.get(plain_task.remote(), timeout=60) == 1
        assert all(a.raysched.allocation.num_cpus == 0 for a in actors)
        assert "Ray's actor default" in actors[0].raysched.allocation.reason
        # Asked for, CPUs are held for the actor's life, as with Ray.
        held = Light.options(num_cpus=1).remote()
        ray.get(held.ping.remote(), timeout=60)
        assert held.raysched.allocation.num_cpus == 1
        assert wait_for(lambda: ray.available_resources().get("CPU", 0) == 1, timeout=10), ray.available_resources()
        ray.get(held.raysched.terminate(), timeout=60)
    finally:
        for a in actors:
            ray.get(a.raysched.terminate(), timeout=60)


def test_actors_run_inside_placement_groups(ray_session):
    # The bundle is the reservation: raysched's memory label (most bundles hold none)
    # and CPUs are cut to it, or Ray would refuse to create the actor.
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([{"CPU": 1}])
    ray.get(group.ready(), timeout=30)
    try:
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        for actor in (Light.options(scheduling_strategy=strategy).remote(),      # Ray's default CPU
                      Holder.options(scheduling_strategy=strategy).remote()):    # 0.5 CPU, 300 MiB
            assert ray.get(actor.raysched.ray_handle.__ray_ready__.remote(), timeout=60)
            # raysched's allocation is kept (the fallback, or what earlier incarnations held:
            # a bundle without memory does not cut it to nothing)
            assert actor.raysched.allocation.memory_bytes >= 64 * MiB
            ray.get(actor.raysched.terminate(), timeout=60)
    finally:
        remove_placement_group(group)


def test_rays_own_actor_methods_reach_the_current_incarnation(ray_session):
    handle = Light.remote()
    assert ray.get(handle.__ray_ready__.remote(), timeout=60) is True
    assert ray.get(handle.__ray_call__.remote(lambda actor: actor.ping()), timeout=60) == "pong"
    # Ray's graceful exit through the handle: the actor records its row first, as with terminate().
    handle.__ray_terminate__.remote()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(handle.ping.remote(), timeout=60)
    assert wait_for(lambda: handle.raysched.actor_id in set(raysched.profiles(Light)["call_id"]), timeout=30)


@adaptive_remote
class Bare:
    def ping(self) -> str:
        return "pong"


def test_an_actor_given_no_memory_holds_no_label_until_its_class_has_history(ray_session):
    # The default fallback (1 GiB) held for life by each of a few light actors would keep
    # them from fitting a small node; a plain Ray actor holds no memory label.
    before = ray.available_resources().get("memory", 0)
    actors = [Bare.remote() for _ in range(3)]
    try:
        assert ray.get([a.ping.remote() for a in actors], timeout=60) == ["pong"] * 3
        assert all(a.raysched.allocation.memory_bytes == 0 for a in actors)
        assert ray.available_resources().get("memory", 0) > before - 100 * MiB
    finally:
        for a in actors:
            ray.get(a.raysched.terminate(), timeout=60)
    assert wait_for(lambda: len(raysched.profiles(Bare)) >= 1, timeout=30)
    Bare.refresh()
    sized = Bare.remote()  # its class's rows size it now
    try:
        assert ray.get(sized.ping.remote(), timeout=60) == "pong"
        assert sized.raysched.allocation.memory_bytes > 0
    finally:
        ray.get(sized.raysched.terminate(), timeout=60)


@adaptive_remote(memory=150 * MiB)
class Pinger:
    def ping(self) -> str:
        return "pong"


def test_an_actor_is_sized_from_the_rows_stored_before_it_is_made_with_no_refresh(ray_session):
    """A helper's audit: an actor was sized from the bundle the driver held since its class
    last made one, so a driver making actors one after another put five in a row on the
    fallback with the rows of the earlier ones stored. It now asks the profiler (one round
    trip), as a user would expect without calling refresh()."""
    for _ in range(3):  # min_history_for_stats
        made = Pinger.remote()
        assert ray.get(made.ping.remote(), timeout=60) == "pong"
        ray.get(made.raysched.terminate(), timeout=60)
    assert wait_for(lambda: len(raysched.profiles(Pinger, settle=False)) >= 3, timeout=30)
    raysched.flush(timeout_s=10)  # the rows are with the profiler, not only in the store
    handle = Pinger.remote()
    try:
        assert handle.raysched.prediction.memory.source == "history", handle.raysched.prediction
        assert handle.raysched.prediction.memory.n_history >= 3
    finally:
        ray.get(handle.raysched.terminate(), timeout=60)


@adaptive_remote(memory=200 * MiB)
class Waiter:
    async def wait(self, seconds: float) -> bool:
        import asyncio

        await asyncio.sleep(seconds)
        # Ray warns once per process of a "blocking ray.get inside async actor", for a
        # ray.get in any thread: raysched's own threads must not set it off.
        return bool(ray._private.worker.blocking_get_inside_async_warned)


def test_an_async_actors_watched_calls_set_off_no_blocking_get_warning(ray_session):
    waiter = Waiter.remote()
    try:
        assert ray.get([waiter.wait.remote(2.0) for _ in range(2)], timeout=60) == [False, False]
    finally:
        ray.get(waiter.raysched.terminate(), timeout=60)


def test_an_actor_that_did_not_opt_in_is_warned_about_not_replaced(ray_session):
    handle = Unscalable.remote()
    ray.get(handle.grow.remote(400), timeout=60)
    assert wait_for(lambda: any(raysched.events(Unscalable)["action"] == "warn"), timeout=30)
    detail = raysched.events(Unscalable)["detail"].iloc[0]
    assert "did not opt in" in detail
    assert handle.incarnation == 1 and ray.get(handle.ping.remote(), timeout=30) == "pong"
    ray.get(handle.terminate(), timeout=60)


def test_a_leaky_actor_ends_at_its_hard_cap_and_its_handle_says_why(ray_session):
    handle = Leaky.remote()
    leaking = handle.leak.remote(20, 200)  # 4 GB over 10 s unless stopped
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(leaking, timeout=60)
    assert wait_for(lambda: _fails_with_limit(handle), timeout=30), (handle._stopped, handle._handled,
                                                                    raysched.events(Leaky).T)
    # It may have passed its allocation first and been replaced (the successor waited for its
    # state behind the leaking call); the cap stopped it there, and the successor with it.
    # Its row is there at once: profiles() waits for the row of an actor its handle saw
    # stopped, as for a task's (it came back empty, the row landing seconds later).
    from raysched.runtime.client import submitted_calls

    assert handle._raysched_actor_id in submitted_calls(Leaky.name)
    rows = raysched.profiles(Leaky).set_index("attempt")
    assert 1 in rows.index, rows
    assert rows.loc[1, "outcome"] == "limit_stopped"
    assert CAP <= rows.loc[1, "peak_rss_bytes"] < CAP + 1024 * MiB
    assert set(rows["outcome"]) <= {"limit_stopped", "cancelled"}
    assert "stop_limit" in set(raysched.events(Leaky)["action"])


def test_a_leaky_actor_with_restarts_is_not_restarted_into_its_own_stop(ray_session):
    """With ``max_restarts=2``, Ray restarted the actor stopped at its cap; each restart met the
    same standing stop, recorded another ``limit_stopped`` row (~65 MiB, nothing leaked) and
    killed itself, until the restarts ran out (a helper's audit)."""
    handle = Leaky.options(max_restarts=2).remote()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(handle.leak.remote(20, 200), timeout=60)
    assert wait_for(lambda: _fails_with_limit(handle), timeout=30)
    time.sleep(4 * raysched.get_config().live_interval_s + 2)  # a restart would have met the stop by now
    rows = raysched.profiles(Leaky)
    stopped = rows[(rows["call_id"] == handle._raysched_actor_id) & (rows["outcome"] == "limit_stopped")]
    assert len(stopped) == 1 and stopped["peak_rss_bytes"].iloc[0] >= CAP, stopped[["attempt", "peak_rss_bytes"]]


def _fails_with_limit(handle) -> bool:
    try:
        handle.leak.remote(1, 1)
    except ResourceLimitExceeded as exc:
        return exc.limit == CAP
    return False


@adaptive_remote(memory=200 * MiB)
class Squatter:
    def __init__(self):
        self.blocks = []

    def leak(self, mib_per_step: int, steps: int) -> int:
        return _grow(self.blocks, mib_per_step, steps)

    def ping(self) -> str:
        return "pong"


@ray.remote
def ping_through(actor) -> str:
    return ray.get(actor.ping.remote())


def test_dropping_a_handle_does_not_end_the_watch_of_an_actor_that_lives_on(ray_session):
    # A detached, named actor made by a setup step that keeps no handle: the usual Ray service.
    Squatter.options(name="raysched-squatter", lifetime="detached").remote()
    gc.collect()
    service = ray.get_actor("raysched-squatter")
    assert ray.get(service.ping.remote(), timeout=60) == "pong"
    # Still measured and held to its hard cap: stopped at it, not left to run 1.2 GB past it.
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(service.leak.remote(20, 60), timeout=60)
    assert wait_for(lambda: "limit_stopped" in set(raysched.profiles(Squatter)["outcome"]), timeout=30)
    row = raysched.profiles(Squatter).iloc[0]
    assert len(raysched.profiles(Squatter)) == 1 and row["peak_rss_bytes"] >= CAP  # no early row at the drop
    # An anonymous actor whose handle was passed to a task: another holder may keep it alive.
    passed = Squatter.remote()
    actor_id, ray_handle = passed.raysched.actor_id, passed.raysched.ray_handle
    assert ray.get(ping_through.remote(passed), timeout=60) == "pong"
    del passed
    gc.collect()
    time.sleep(1.5)  # a row, had the drop ended its measurement, would be written by now
    assert actor_id not in set(raysched.profiles(Squatter)["call_id"])
    assert ray.get(ray_handle.ping.remote(), timeout=60) == "pong"
    ray.kill(ray_handle)


@adaptive_remote(memory=200 * MiB, num_cpus=0.5)
class Worker:
    """A class whose methods carry the names a handle used to own."""

    def terminate(self):
        return "user terminate"

    def prediction(self):
        return "user prediction"

    def allocation(self):
        return "user allocation"

    def incarnation(self):
        return "user incarnation"

    def rescales(self):
        return "user rescales"

    def actor_id(self):
        return "user actor_id"

    def ray_handle(self):
        return "user ray_handle"


def test_user_methods_win_over_the_handles_names_and_raysched_keeps_its_own(ray_session):
    handle = Worker.remote()
    names = ["terminate", "prediction", "allocation", "incarnation", "rescales", "actor_id", "ray_handle"]
    assert ray.get([getattr(handle, name).remote() for name in names], timeout=60) == [f"user {n}" for n in names]
    with pytest.raises(TypeError, match=r"handle\.raysched\.terminate"):
        handle.terminate()  # the user's method, called without .remote(): not raysched's terminate
    assert handle.raysched.incarnation == 1 and handle.raysched.allocation.num_cpus == 0.5
    assert handle.raysched.rescales == [] and handle.raysched.prediction.source.startswith("fallback")
    assert handle.raysched.ray_handle._actor_id.hex() and handle.raysched.actor_id.startswith("actor-")
    ray.get(handle.raysched.terminate(), timeout=60)
    with pytest.raises(InvalidInput, match="terminated"):
        handle.terminate.remote()
    # A class without such methods still sees the old names on the handle.
    other = Holder.remote()
    assert other.allocation is other.raysched.allocation and other.actor_id == other.raysched.actor_id
    ray.get(other.terminate(), timeout=60)


def test_bad_declarations_get_clear_errors(ray_session):
    class OnlySave:
        def raysched_save_state(self):
            return None

    with pytest.raises(InvalidInput, match="without raysched_restore_state"):
        adaptive_remote(OnlySave)
    with pytest.raises(InvalidInput, match="rescalable"):
        adaptive_remote(rescalable="yes")(Unscalable._cls)
    with pytest.raises(TypeError, match="remote"):
        Holder()

    class OwnRaysched:
        def raysched(self):
            return None

    with pytest.raises(InvalidInput, match="raysched.*rename"):
        adaptive_remote(OwnRaysched)


@adaptive_remote
def submitted_by_an_actor(x):
    return x + 1


@adaptive_remote
class Submitter:
    def run(self, x):
        return ray.get(submitted_by_an_actor.remote(x))


def test_calls_an_actor_submits_are_sized_as_its_driver_configured(ray_session):
    """The actor's process read its config from the environment, not from its driver."""
    base = raysched.get_config()
    raysched.configure(default_memory_bytes=0)  # cold calls: no memory label
    try:
        handle = Submitter.remote()
        assert ray.get(handle.run.remote(1), timeout=60) == 2
        ray.get(handle.raysched.terminate(), timeout=60)
    finally:
        raysched.configure(base)
    # submitted by the actor, not by this driver: profiles() does not wait for its row
    assert wait_for(lambda: len(raysched.profiles(submitted_by_an_actor)) == 1, timeout=30)
    row = raysched.profiles(submitted_by_an_actor).iloc[-1]
    assert row["outcome"] == "ok" and row["allocated_memory_bytes"] == 0


@adaptive_remote(memory=100 * MiB, num_cpus=1)
class Counter:
    def __init__(self, start: int):
        self.n = start

    def _bump(self) -> int:  # a method with a leading underscore: Ray's handle calls it
        self.n += 1
        return self.n

    def value(self) -> int:
        return self.n


def test_an_actor_handle_behaves_as_rays_at_the_edges(ray_session):
    """Found by an audit: constructor arguments were checked only when the actor died of
    them, _private methods could not be called, and a dropped handle kept its actor (and its
    CPU) until the next garbage collection: the handle and its API object were a cycle."""
    with pytest.raises(TypeError, match="too many positional arguments"):
        Counter.remote(1, 2, 3)
    with pytest.raises(TypeError, match="missing a required argument"):
        Counter.remote()
    handle = Counter.remote(5)
    assert ray.get(handle._bump.remote(), timeout=60) == 6 and ray.get(handle.value.remote(), timeout=60) == 6
    with pytest.raises(AttributeError):
        handle._no_such_method
    total = ray.cluster_resources()["CPU"]
    assert wait_for(lambda: ray.available_resources().get("CPU", 0) <= total - 1, timeout=30)
    gc.disable()  # the handle must go by reference counting alone
    try:
        del handle
        assert wait_for(lambda: ray.available_resources().get("CPU", 0) >= total, timeout=20), ray.available_resources()
    finally:
        gc.enable()


def test_an_actor_starts_without_rays_deprecation_warning():
    """An adaptive actor asks at its start whether Ray restarted it; Ray's property for that reads
    its own deprecated ``actor_id``, whose warning reached the driver's output for every actor."""

    @ray.remote(num_cpus=0)
    class Probe:
        def check(self):
            import warnings

            from raysched.runtime.actor_worker import _was_restarted

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                restarted = _was_restarted()
            return restarted, [f"{w.category.__name__}: {w.message}" for w in caught]

    probe = Probe.remote()
    restarted, caught = ray.get(probe.check.remote(), timeout=60)
    ray.kill(probe)
    assert restarted is False
    assert caught == []
