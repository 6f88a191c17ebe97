"""The admission queue without Ray: the pure order and capacity rules, and the async service
driven with a fake capacity and a fake clock."""

from __future__ import annotations

import asyncio
import math

from raysched.policy.admission import (
    FIRST_SUBMITTED,
    LARGEST_FIRST,
    AdmissionQueue,
    Request,
    RoomRouting,
    expected_peak_bytes,
    order_key,
    pooled_capacity,
    node_labels,
)
from raysched.runtime.admission import Admission
from raysched.types import GiB, MiB

from conftest import wait_for

ONE = Request(1.0, 1 * GiB)


def test_calls_are_admitted_by_priority_then_arrival_while_they_fit():
    q = AdmissionQueue(Request(2.0, 8 * GiB))
    assert q.offer("low-1", 0, ONE) == ["low-1"]
    assert q.offer("low-2", 0, ONE) == ["low-2"]
    assert q.offer("low-3", 0, ONE) == []  # full: 2 of 2 CPUs held
    assert q.offer("high-1", 5, ONE) == []
    assert q.offer("high-2", 5, ONE) == []
    assert q.offer("mid", 3, ONE) == []
    assert (q.waiting(), q.admitted(), q.held()) == (4, 2, Request(2.0, 2 * GiB))
    assert q.finish("low-1") == ["high-1"]  # the highest first, then first come
    assert q.finish("low-2") == ["high-2"]
    assert q.finish("high-1") == ["mid"]
    assert q.finish("high-2") == ["low-3"]


def test_no_lower_call_passes_a_waiting_higher_one_even_if_it_would_fit():
    q = AdmissionQueue(Request(4.0, 8 * GiB))
    q.offer("a", 0, Request(3.0, 1 * GiB))
    assert q.offer("big-urgent", 9, Request(2.0, 1 * GiB)) == []  # 3 + 2 > 4
    assert q.offer("small-low", 0, Request(0.5, 1 * GiB)) == []  # would fit, but must not pass it
    assert q.finish("a") == ["big-urgent", "small-low"]


def test_memory_counts_too_and_an_oversized_call_runs_alone():
    q = AdmissionQueue(Request(8.0, 4 * GiB))
    assert q.offer("a", 0, Request(1.0, 3 * GiB)) == ["a"]
    assert q.offer("b", 0, Request(1.0, 2 * GiB)) == []  # 5 GiB > 4 GiB
    assert q.finish("a") == ["b"]
    q.finish("b")
    assert q.offer("huge", 0, Request(16.0, 64 * GiB)) == ["huge"]  # nothing admitted: never held for ever


def test_a_call_bigger_than_the_whole_capacity_passes_through_and_blocks_nobody():
    """Ray keeps such a task pending; admitted and held, it blocked every other call for good."""
    q = AdmissionQueue(Request(2.0, 8 * GiB))
    assert q.offer("bad", 5, Request(3.0, 1 * GiB)) == ["bad"]  # 3 CPUs of 2: through at once
    assert q.held() == Request(0.0, 0.0)
    assert [q.offer(f"good{i}", 1, ONE) for i in range(3)] == [["good0"], ["good1"], []]
    assert q.finish("good0") == ["good2"]
    assert q.finish("bad") == [] and q.admitted() == 2
    # With the room full, it passes all the same: the queue can never make room for it.
    assert q.offer("wide", 0, Request(1.0, 16 * GiB)) == ["wide"]


def test_the_capacity_pools_the_nodes_labels_and_their_rooms_a_node_without_one_by_its_label():
    nodes = {"a": Request(2.0, 4 * GiB), "b": Request(4.0, 8 * GiB), "c": Request(1.0, 2 * GiB)}
    rooms = {"a": 3 * GiB, "b": 16 * GiB, "gone": 1 * GiB}  # "c": no reading; "gone": a node Ray no longer has
    assert pooled_capacity(nodes, rooms) == Request(7.0, 14 * GiB, peak_bytes=(3 + 16 + 2) * GiB)
    assert pooled_capacity(nodes, {"a": -1 * GiB}).peak_bytes == (0 + 8 + 2) * GiB  # over its line: no room
    assert node_labels(nodes) == (Request(2.0, 4 * GiB, peak_bytes=math.inf), Request(4.0, 8 * GiB, peak_bytes=math.inf),
                                  Request(1.0, 2 * GiB, peak_bytes=math.inf))
    assert pooled_capacity({}, rooms) is None
    assert Request(1.0, 2 * GiB).peak_bytes == 2 * GiB  # a call's expected peak is its label unless told
    assert expected_peak_bytes(1.5 * GiB, label_is_callers=False) == 1.5 * GiB
    assert expected_peak_bytes(1.5 * GiB, label_is_callers=True) is None  # memory=, or the fallback


def test_a_call_within_the_pool_but_no_single_node_passes_through_and_blocks_nothing():
    """Two nodes of 2 CPUs and 4 GiB: a call of 3 CPUs (or a 6 GiB label) fits the two together
    but no node, so Ray never starts it. Admitted against the pool, it held 3 CPUs for good
    and a later call that fits either node waited behind it for ever."""
    nodes = {"n1": Request(2.0, 4 * GiB), "n2": Request(2.0, 4 * GiB)}
    for wide in (Request(3.0, 1 * GiB, 10.0), Request(1.0, 6 * GiB, 10.0)):
        q = AdmissionQueue(backfill=True)
        q.set_capacity(pooled_capacity(nodes, {}), 0.0, ceiling=node_labels(nodes))
        assert q.offer("wide", 0, wide, 0.0, 0.0) == ["wide"]
        assert q.held() == Request(0.0, 0.0)
        assert q.offer("two", 5, Request(2.0, 1 * GiB, 10.0), 1.0, 0.0) == ["two"]
        # One node's worth still waits its turn as before: it fits a node, once the room is free.
        assert q.offer("node", 0, Request(2.0, 4 * GiB, 10.0), 2.0, 0.0) == ["node"]
        assert q.offer("more", 0, Request(1.0, 1 * GiB, 10.0), 3.0, 0.0) == []

    # Admitted before the capacity was known (anything fits then), it stops holding once it is.
    q = AdmissionQueue()
    assert q.offer("early", 0, Request(3.0, 1 * GiB)) == ["early"] and q.held().num_cpus == 3.0
    assert q.set_capacity(pooled_capacity(nodes, {}), ceiling=node_labels(nodes)) == []
    assert q.held() == Request(0.0, 0.0) and q.offer("two", 5, Request(2.0, 1 * GiB)) == ["two"]

    service = Admission(capacity=lambda: nodes, clock=Clock(), gather_s=0.0)

    async def scenario():
        assert await asyncio.wait_for(service.admit("wide", 0, 3.0, 1 * GiB, 0.0, 10.0), 1.0) is True
        assert await asyncio.wait_for(service.admit("two", 5, 2.0, 1 * GiB, 1.0, 10.0), 1.0) is True
        assert service.status()["held_cpus"] == 2.0

    asyncio.run(scenario())


def test_a_call_that_passed_through_does_not_keep_a_call_bigger_than_the_room_from_running_alone():
    """The passed-through call never starts (no node has 3 CPUs) and holds nothing; counted as
    "admitted", it kept the queue from ever being empty, and the call that must run alone (its
    peak beyond the room) waited for good, with every call behind it."""
    nodes = {"a": Request(2.0, 8 * GiB)}
    q = AdmissionQueue(backfill=True, pipeline_s=0.05)
    q.set_capacity(pooled_capacity(nodes, {"a": 3 * GiB}), 0.0, ceiling=node_labels(nodes))
    assert q.offer("huge", 5, Request(3.0, 0.0, 60.0), now=0.0) == ["huge"]
    assert q.offer("big", 5, Request(1.0, 4 * GiB, 30.0, peak_bytes=4 * GiB), now=0.1) == ["big"]
    assert q.offer("small", 1, Request(1.0, 256 * MiB, 1.0), now=0.2) == []  # behind the one running alone
    assert q.finish("big", 31.0) == ["small"]
    assert q.finish("huge", 32.0) == [] and q.held() == Request(1.0, 256 * MiB, peak_bytes=256 * MiB)


def test_calls_must_fit_the_labels_and_the_room_and_one_bigger_than_the_room_waits_to_run_alone():
    """The room is what the nodes can give now: passed through as if no room would ever do, a call
    bigger than it ran beside others on a node already short of memory."""
    q = AdmissionQueue()
    q.set_capacity(Request(2.0, 4 * GiB, peak_bytes=2 * GiB), ceiling=Request(2.0, 4 * GiB, peak_bytes=math.inf))
    # Expected peaks below the labels (the sizing's margin): three fit the labels, two the room.
    call = Request(0.5, 1.2 * GiB, peak_bytes=1 * GiB)
    assert [q.offer(t, 0, call) for t in ("a", "b", "c")] == [["a"], ["b"], []]
    assert q.held() == Request(1.0, 2.4 * GiB, peak_bytes=2 * GiB)
    assert q.finish("a") == ["c"]
    q.finish("b"), q.finish("c")
    assert q.offer("small", 0, Request(0.5, 1 * GiB)) == ["small"]
    assert q.offer("big", 0, Request(0.5, 3 * GiB)) == []  # 3 GiB > the 2 GiB room: it waits...
    assert q.finish("small") == ["big"]  # ...until it can run alone
    assert q.offer("after", 0, Request(0.5, 0.5 * GiB)) == []  # it holds the room while it runs
    assert q.offer("wide", 0, Request(0.5, 5 * GiB)) == ["wide"]  # beyond the labels: passes through
    q.finish("big")
    assert q.admitted() == 2  # "after" and "wide"


def test_a_call_cancelled_while_waiting_leaves_the_queue_and_offers_are_idempotent():
    q = AdmissionQueue(Request(1.0, 8 * GiB))
    q.offer("a", 0, ONE)
    q.offer("b", 0, ONE)
    q.offer("c", 0, ONE)
    assert q.offer("b", 0, ONE) == [] and q.waiting() == 2  # a retried offer keeps one place
    assert q.finish("b") == [] and q.waiting() == 1  # cancelled before it was admitted
    assert q.finish("a") == ["c"]
    assert q.finish("never-seen") == []


def test_equal_priorities_go_by_the_submitters_clock_not_by_arrival():
    q = AdmissionQueue(Request(1.0, 8 * GiB))
    key = lambda t: order_key(FIRST_SUBMITTED, t, 1 * GiB, 1.0)  # noqa: E731
    q.offer("first-arrived", 0, ONE, key(10.0))
    q.offer("late", 0, ONE, key(30.0))
    q.offer("early", 0, ONE, key(20.0))  # sent before "late", reached the queue after it
    assert q.finish("first-arrived") == ["early"]


def test_largest_first_admits_the_biggest_predicted_memory_seconds_first_within_a_priority():
    q = AdmissionQueue(Request(1.0, 64 * GiB))
    key = lambda mem, wall: order_key(LARGEST_FIRST, 0.0, mem, wall)  # noqa: E731
    q.offer("running", 0, ONE, key(1 * GiB, 1.0))
    q.offer("small", 0, ONE, key(1 * GiB, 1.0))
    q.offer("long", 0, ONE, key(1 * GiB, 60.0))
    q.offer("big", 0, ONE, key(8 * GiB, 2.0))
    q.offer("urgent-small", 3, ONE, key(0.1 * GiB, 0.1))  # priority still comes first
    assert [q.finish(t)[0] for t in ("running", "urgent-small", "long", "big")] == ["urgent-small", "long", "big",
                                                                                      "small"]
    try:
        order_key("random", 0.0, 1.0, 1.0)
    except ValueError as exc:
        assert "largest_first" in str(exc)
    else:
        raise AssertionError("an unknown order must be refused")


def test_a_new_capacity_admits_what_now_fits():
    q = AdmissionQueue(Request(1.0, 8 * GiB))
    q.offer("a", 0, ONE)
    q.offer("b", 0, ONE)
    assert q.set_capacity(Request(2.0, 8 * GiB)) == ["b"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


async def _settle():
    """Let the service's admission pass (scheduled with call_later(0)) and its waiters run."""
    for _ in range(4):
        await asyncio.sleep(0)


def test_a_call_whose_end_arrives_before_it_is_never_queued():
    """A call cancelled at once: the async service may take its end before its arrival."""
    q = AdmissionQueue(Request(1.0, 8 * GiB))
    assert q.finish("x") == []
    assert q.add("x", 0, ONE) is False and q.add("x", 0, ONE) is False  # a retried add too
    assert q.waiting() == 0 and q.admitted() == 0 and not q.is_waiting("x")
    assert q.offer("y", 0, ONE) == ["y"]  # nothing of "x" holds room

    service = Admission(capacity=lambda: {"n": Request(1.0, 8 * GiB)}, clock=Clock(), gather_s=0.0)

    async def scenario():
        ended = asyncio.get_running_loop().create_future()
        ended.set_exception(RuntimeError("cancelled"))
        await service.track("z", [ended])  # the end first...
        assert await asyncio.wait_for(service.admit("z", 0, 1.0, 1 * GiB), 1.0) is True  # ...then the arrival
        status = service.status()
        assert status["waiting"] == 0 and status["admitted"] == 0 and status["admitted_total"] == 0

    asyncio.run(scenario())


def test_the_service_releases_waiters_in_order_as_tracked_calls_end():
    capacity = [Request(1.0, 8 * GiB)]
    clock = Clock()
    service = Admission(capacity=lambda: {"n": capacity[0]}, refresh_s=5.0, clock=clock, gather_s=0.0)

    async def scenario():
        started: list[str] = []

        async def call(token, priority):
            await service.admit(token, priority, 1.0, 1 * GiB)
            started.append(token)

        done = [asyncio.get_running_loop().create_future() for _ in range(3)]
        tasks = [asyncio.create_task(call("low-1", 0))]
        await _settle()
        assert started == ["low-1"]
        tasks += [asyncio.create_task(call("low-2", 0)), asyncio.create_task(call("high", 7))]
        await _settle()
        assert started == ["low-1"]  # full
        tracking = asyncio.create_task(service.track("low-1", [done[0]]))
        done[0].set_result("value")  # the call's ref resolves
        await tracking
        await _settle()
        assert started == ["low-1", "high"]
        # An error ends a call just the same.
        failing = asyncio.create_task(service.track("high", [done[1]]))
        done[1].set_exception(RuntimeError("task failed"))
        await failing
        await _settle()
        assert started == ["low-1", "high", "low-2"]
        await asyncio.gather(*tasks)
        assert service.status()["admitted_total"] == 3
        # Asked again for a call it admitted (a retried actor call): it answers at once.
        assert await asyncio.wait_for(service.admit("low-2", 0, 1.0, 1 * GiB), 1.0) is True

    asyncio.run(scenario())


def test_a_call_cancelled_while_it_waits_ends_its_admit_instead_of_waiting_for_ever():
    """Each queued call cancelled before admission left its ``admit`` waiting in the detached
    actor for the cluster's life: one of its call slots and its memory (a helper's audit)."""
    service = Admission(capacity=lambda: {"n": Request(1.0, 8 * GiB)}, clock=Clock(), gather_s=0.0)

    async def scenario():
        assert await asyncio.wait_for(service.admit("running", 0, 1.0, 1 * GiB), 1.0) is True
        waiting = asyncio.create_task(service.admit("cancelled", 0, 1.0, 1 * GiB))
        await _settle()
        assert not waiting.done() and service.status()["waiting"] == 1
        ended = asyncio.get_running_loop().create_future()
        ended.set_exception(RuntimeError("cancelled"))
        await service.track("cancelled", [ended])
        await asyncio.wait_for(waiting, 1.0)  # it returns; its task will not run
        assert service._events == {} and service.status()["waiting"] == 0
        assert service.status()["admitted_total"] == 1  # not counted as admitted
        # The room it never held is still the running call's alone.
        later = asyncio.create_task(service.admit("later", 0, 1.0, 1 * GiB))
        await _settle()
        assert not later.done()
        done = asyncio.get_running_loop().create_future()
        done.set_result("value")
        await service.track("running", [done])
        assert await asyncio.wait_for(later, 1.0) is True

    asyncio.run(scenario())


def test_a_call_that_finds_no_slot_to_wait_in_is_admitted_at_once_so_that_ends_still_get_in():
    """Every waiting call holds one of the actor's call slots: at its max_concurrency it took no
    call at all, the ends that free room included (4 slots, 6 calls: a deadlock on real Ray)."""
    service = Admission(capacity=lambda: {"n": Request(1.0, 8 * GiB)}, clock=Clock(), gather_s=0.0,
                        max_waiting=6, reserved_slots=2)  # 4 slots to wait in, 2 kept for ends

    async def scenario():
        assert await asyncio.wait_for(service.admit("running", 0, 1.0, 1 * GiB), 1.0) is True
        waiting = [asyncio.create_task(service.admit(f"w{i}", 0, 1.0, 1 * GiB)) for i in range(4)]
        await _settle()
        assert not any(t.done() for t in waiting) and service.status()["waiting"] == 4
        # The next one would take a slot the ends need: admitted at once, outside the queue.
        assert await asyncio.wait_for(service.admit("over", 9, 1.0, 1 * GiB), 1.0) is True
        assert service.status()["overflowed_total"] == 1 and service.status()["waiting"] == 4
        assert service.status()["held_cpus"] == 1.0  # the queue does not count it
        service.ended(["over"])  # its end changes nothing
        await _settle()
        assert not any(t.done() for t in waiting)
        service.ended(["running"])
        await _settle()
        assert [t.done() for t in waiting] == [True, False, False, False]  # in order, as before
        # A slot is free again: the next call waits in it.
        later = asyncio.create_task(service.admit("later", 0, 1.0, 1 * GiB))
        await _settle()
        assert not later.done() and service.status()["overflowed_total"] == 1
        for i in range(4):
            service.ended([f"w{i}"])
            await _settle()
        assert all(t.done() for t in waiting) and later.done()
        # A call that only waits for its ObjectRef (track) holds a slot too; at most half are kept.
        small = Admission(capacity=lambda: {"n": Request(1.0, 8 * GiB)}, clock=Clock(), gather_s=0.0,
                          max_waiting=4, reserved_slots=1_000)
        never = asyncio.get_running_loop().create_future()
        tracking = [asyncio.create_task(small.track(f"t{i}", [never])) for i in range(2)]
        await _settle()
        assert await asyncio.wait_for(small.admit("x", 0, 1.0, 1 * GiB), 1.0) is True
        assert small.status()["overflowed_total"] == 1
        for t in tracking:
            t.cancel()

    asyncio.run(scenario())


def test_a_later_drivers_configure_reaches_the_admission_actor_it_finds():
    """The actor is created by the first driver and found by the others: their
    admission_backfill, _gather_s and _node_room were silently ignored."""
    service = Admission(capacity=lambda: {"n": Request(8.0, 4 * GiB)}, clock=Clock(), gather_s=0.01)
    assert {k: service.status()[k] for k in ("backfill", "gather_s", "rooms_from")} == \
        {"backfill": True, "gather_s": 0.01, "rooms_from": None}
    service.reconfigure(backfill=False, gather_s=0.2, monitor="raysched-monitor-x")
    assert {k: service.status()[k] for k in ("backfill", "gather_s", "rooms_from")} == \
        {"backfill": False, "gather_s": 0.2, "rooms_from": "raysched-monitor-x"}
    assert service._rooms_fn is not None and service._read_at == float("-inf")  # rooms asked for at the next pass
    # With backfill off, a short call no longer passes a big head that waits (as AdmissionQueue(backfill=False)).
    service._queue.offer("running", 0, Request(1, 3 * GiB, wall_seconds=10), now=0)
    service._queue.offer("big", 0, Request(1, 3 * GiB, wall_seconds=10), now=0)
    assert service._queue.offer("short", 0, Request(1, 1 * GiB, wall_seconds=1), now=0) == []
    service.reconfigure(backfill=True, gather_s=0.0, monitor=None)
    assert service._rooms_fn is None and service.status()["rooms_from"] is None


def test_the_service_orders_a_burst_by_priority_not_by_which_message_came_first():
    service = Admission(capacity=lambda: {"n": Request(1.0, 8 * GiB)}, clock=Clock(), gather_s=0.05)

    async def scenario():
        started: list[str] = []

        async def call(token, priority):
            await service.admit(token, priority, 1.0, 1 * GiB)
            started.append(token)

        # Sent in a loop, reaching the actor low first: without gathering, "low" would be
        # admitted before "urgent" had arrived, and hold the only slot.
        tasks = [asyncio.create_task(call("low", 0))]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(call("urgent", 9)))
        await asyncio.sleep(0.1)
        assert started == ["urgent"]
        service.finish("urgent")
        await _settle()
        assert started == ["urgent", "low"]
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


# --- backfill (EASY) ------------------------------------------------------------------------------


def R(cpus, gib, wall=math.inf):  # noqa: N802 - a short constructor for the tables below
    return Request(float(cpus), gib * GiB, float(wall))


def test_a_short_call_backfills_while_a_big_one_waits_if_it_ends_before_the_big_one_can_start():
    q = AdmissionQueue(R(8, 4))
    assert q.offer("running", 0, R(1, 3, wall=10), now=0) == ["running"]
    assert q.offer("big", 5, R(1, 3, wall=10), now=1) == []  # 3 + 3 > 4 GiB: waits until t=10
    # 1 GiB is free now: a 5 s call ends by t=10, so it delays nothing (even at a lower priority).
    assert q.offer("short", 0, R(1, 1, wall=5), now=2) == ["short"]
    assert q.backfilled_total == 1
    # Another 1 GiB call would not fit now (4 of 4 GiB held), whatever its length.
    assert q.offer("short-2", 0, R(1, 0.5, wall=1), now=2) == []
    # Once "short" ends (t=7), "short-2" fits, and it too ends (t=8) before the head may start.
    assert q.finish("short", now=7) == ["short-2"]
    assert q.finish("short-2", now=8) == []
    assert q.finish("running", now=10) == ["big"]


def test_a_long_call_backfills_only_into_the_room_the_big_one_leaves():
    q = AdmissionQueue(R(8, 6))
    q.offer("running", 0, R(1, 4, wall=10), now=0)
    assert q.offer("big", 0, R(1, 5, wall=10), now=0) == []  # at t=10: 6 free, 5 for big, 1 extra
    assert q.offer("long-too-big", 0, R(1, 1.5, wall=100), now=0) == []  # past t=10 and over the extra
    assert q.offer("long-small", 0, R(1, 1, wall=100), now=0) == ["long-small"]  # within the extra
    assert q.offer("long-small-2", 0, R(1, 0.5, wall=100), now=0) == []  # the extra is used up
    assert q.offer("quick", 0, R(1, 0.5, wall=3), now=0) == ["quick"]  # ends before t=10
    assert q.finish("quick", now=3) == []
    assert q.finish("running", now=10) == ["big"]  # the head starts when it was promised
    assert q.held() == R(2, 6)  # "big" beside "long-small": exactly the room there was


def test_nothing_passes_the_head_when_an_end_is_unknown_or_backfill_is_off():
    unknown = AdmissionQueue(R(8, 4))
    unknown.offer("running", 0, R(1, 3), now=0)  # no predicted wall time: when room frees is unknown
    unknown.offer("big", 0, R(1, 3, wall=10), now=0)
    assert unknown.offer("short", 0, R(1, 1, wall=1), now=0) == []
    off = AdmissionQueue(R(8, 4), backfill=False)
    off.offer("running", 0, R(1, 3, wall=10), now=0)
    off.offer("big", 0, R(1, 3, wall=10), now=0)
    assert off.offer("short", 0, R(1, 1, wall=1), now=0) == []
    # A call of unknown length never counts as ending before the head starts: with no extra
    # room beside the head (4 - 4 GiB), it waits, while a call known to be short goes.
    q = AdmissionQueue(R(8, 4))
    q.offer("running", 0, R(1, 3, wall=10), now=0)
    q.offer("big", 0, R(1, 4, wall=10), now=0)
    assert q.offer("unknown-length", 0, R(1, 1), now=0) == []
    assert q.offer("known-short", 0, R(1, 1, wall=2), now=0) == ["known-short"]


def test_a_call_running_past_its_predicted_end_counts_as_ending_now():
    q = AdmissionQueue(R(8, 4))
    q.offer("late", 0, R(1, 3, wall=10), now=0)
    q.offer("big", 0, R(1, 4, wall=10), now=20)  # "late" should have ended at t=10
    # It may end any moment: a 5 s call would delay the head, and there is no extra room.
    assert q.offer("short", 0, R(1, 1, wall=5), now=20) == []
    # Had it been on time (ending at t=30), the same call would have gone.
    on_time = AdmissionQueue(R(8, 4))
    on_time.offer("running", 0, R(1, 3, wall=10), now=20)
    on_time.offer("big", 0, R(1, 4, wall=10), now=20)
    assert on_time.offer("short", 0, R(1, 1, wall=5), now=20) == ["short"]


def test_a_stream_of_small_calls_does_not_starve_a_big_waiting_one():
    """Small 4 s calls arrive every second; a big call waits for room. Without the reservation
    they would keep the node busy for ever; with it the big call starts once the calls admitted
    before it have ended."""
    q = AdmissionQueue(R(8, 4))
    started = {}
    running = {}  # token -> end
    for token in q.offer("small-0", 0, R(1, 1, wall=4), now=0):
        started[token], running[token] = 0, 4
    q.offer("big", 9, R(1, 4, wall=4), now=0.5)
    for t in range(1, 30):
        for token in [k for k, end in running.items() if end <= t]:
            del running[token]
            for admitted in q.finish(token, now=t):
                started[admitted], running[admitted] = t, t + 4
        for admitted in q.offer(f"small-{t}", 0, R(1, 1, wall=4), now=t):
            started[admitted], running[admitted] = t, t + 4
    assert started["big"] <= 4  # the running small call ends at t=4
    assert len(started) > 10  # and the stream goes on after it


def _batch_makespan(backfill: bool, order: str) -> float:
    """The monitor benchmark's batch (benchmarks/bench_monitor.py: sizes in GiB, a task holds its
    size + 0.17 GiB of worker for ~1.1 s + 1.4 s per GiB, 3.25 GiB and 8 slots of 0.25 CPU)
    through the queue on a simulated clock, submitted as one burst; returns when the last call ends."""
    sizes = [0.8, 1.4, 0.8, 0.2, 0.6, 1.0, 0.9, 0.8, 1.4, 0.6, 0.9, 0.7, 1.1, 0.5, 1.0, 0.4, 0.6, 0.4, 1.4, 0.3]
    requests = {f"c{i}": R(0.25, gib + 0.17, wall=1.1 + 1.4 * gib) for i, gib in enumerate(sizes)}
    q = AdmissionQueue(R(2, 3.25), backfill=backfill)
    for i, (token, request) in enumerate(requests.items()):
        q.add(token, 0, request, order_key(order, i, request.memory_bytes, request.wall_seconds))
    now = 0.0
    ends = {token: now + requests[token].wall_seconds for token in q.admit(now)}
    while q.waiting() or q.admitted():
        token = min((t for t in ends if q.is_admitted(t)), key=ends.get)
        now = ends[token]
        for admitted in q.finish(token, now=now):
            ends[admitted] = now + requests[admitted].wall_seconds
    assert len(ends) == len(sizes)
    return max(ends.values())


def test_backfill_and_largest_first_shorten_a_batch_of_mixed_sizes():
    fifo_strict = _batch_makespan(False, FIRST_SUBMITTED)
    fifo_easy = _batch_makespan(True, FIRST_SUBMITTED)
    largest_easy = _batch_makespan(True, LARGEST_FIRST)
    # Worked out with this queue: 17.5 s strict, 16.5 s with backfill, 16.2 s largest first
    # with backfill; perfect packing of the memory-seconds would take 14.1 s.
    assert fifo_easy < 0.96 * fifo_strict, (fifo_easy, fifo_strict)
    assert largest_easy < fifo_easy, (largest_easy, fifo_easy)


def test_a_call_joins_the_queue_only_once_its_object_ref_inputs_exist():
    """A consumer given a higher priority than its producers was admitted first, held the
    room while Ray waited for its inputs, and the producers never got any: a hang."""
    capacity = [Request(2.0, 8 * GiB)]
    existing: set[str] = set()
    service = Admission(capacity=lambda: {"n": capacity[0]}, refresh_s=5.0, clock=Clock(), gather_s=0.0,
                        ready=lambda refs: {r for r in refs if r in existing}, inputs_poll_s=0.001)

    async def scenario():
        started: list[str] = []

        async def call(token, priority, inputs=()):
            await service.admit(token, priority, 1.0, 1 * GiB, inputs=inputs)
            started.append(token)

        tasks = [asyncio.create_task(call(f"consume{i}", 5, [[f"out{i}", "shared"]])) for i in range(2)]
        tasks += [asyncio.create_task(call(f"produce{i}", 0)) for i in range(2)]
        await asyncio.sleep(0.02)
        assert started == ["produce0", "produce1"]  # the producers run; the consumers wait for their inputs
        assert service.status()["awaiting_inputs"] == 2 and service.status()["admitted"] == 2
        existing.update({"out0", "shared"})  # producer 0's output exists (and the input both share)
        await service.track("produce0", [_done()])
        await asyncio.sleep(0.02)
        assert started == ["produce0", "produce1", "consume0"]
        # A call that ends (is cancelled) while it waits for its inputs never takes room.
        await service.track("consume1", [_done()])
        existing.add("out1")
        await service.track("produce1", [_done()])
        await asyncio.sleep(0.02)
        assert service.status()["awaiting_inputs"] == 0 and service.status()["admitted"] == 1  # consume0 only
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def _done():
    future = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def test_the_service_admits_against_the_monitors_rooms_and_falls_back_to_labels():
    """Two calls that fit the node's 4 GiB label but not its 2 GiB room start one at a time; the
    rooms are read before the first admission, and again once older than refresh_s."""
    clock = Clock()
    asked: list[list[str]] = []
    room = {"n": 2 * GiB}

    async def rooms(node_ids):
        asked.append(list(node_ids))
        await asyncio.sleep(0.01)  # an actor call: the first pass must wait for it
        if room is None:
            raise RuntimeError("no monitor")
        return dict(room)

    service = Admission(capacity=lambda: {"n": Request(2.0, 4 * GiB)}, refresh_s=5.0, clock=clock,
                        gather_s=0.0, rooms=rooms)

    async def scenario():
        started: list[str] = []

        async def call(token):
            await service.admit(token, 0, 0.5, 1.5 * GiB)
            started.append(token)

        tasks = [asyncio.create_task(call(t)) for t in ("a", "b")]
        await asyncio.sleep(0.05)
        assert started == ["a"] and asked == [["n"]]
        status = service.status()
        assert (status["capacity_room_bytes"], status["capacity_memory_bytes"]) == (2 * GiB, 4 * GiB)
        assert status["node_rooms"] == {"n": 2 * GiB} and status["held_peak_bytes"] == 1.5 * GiB
        service.finish("a")
        await asyncio.sleep(0.05)
        assert started == ["a", "b"] and len(asked) == 1  # not read again within refresh_s
        # The monitor gone: after refresh_s, the labels alone.
        nonlocal room
        room = None
        clock.now += 6.0
        tasks += [asyncio.create_task(call(t)) for t in ("c", "d")]
        await asyncio.sleep(0.05)
        assert started == ["a", "b", "c"]  # "b" still holds 1.5 GiB of the 4
        assert len(asked) == 2 and service.status()["capacity_room_bytes"] == 4 * GiB
        service.finish("b")
        await asyncio.sleep(0.01)
        assert started == ["a", "b", "c", "d"]
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_short_calls_are_admitted_ahead_of_their_room_up_to_the_pipeline_budget():
    """Tiny calls of known wall time: beyond the two that fit, the queue admits those predicted
    to fit within pipeline_s, until the calls admitted ahead add up to pipeline_s of the
    cluster's time; an urgent call arriving then is the first admitted once room frees."""
    q = AdmissionQueue(R(2, 8), pipeline_s=0.05)
    tiny = R(1, 0.1, wall=0.002)  # half the cluster's CPUs for 2 ms: 0.001 cluster-seconds each
    admitted = [t for i in range(200) for t in q.offer(f"c{i}", 0, tiny, now=0.0)]
    assert admitted == [f"c{i}" for i in range(len(admitted))]  # in order
    assert 2 + 40 <= len(admitted) <= 2 + 50 and q.admitted_early() == len(admitted) - 2
    assert q.offer("urgent", 9, tiny, now=0.0) == []  # the budget is spent
    assert q.finish("c0", now=0.002) == ["urgent"]  # first once a call ends, ahead of c52...
    running = admitted[1:] + ["urgent"]
    while running:  # the rest of the batch goes through the same way
        running += q.finish(running.pop(0), now=0.01)
        assert q._early_work <= 0.05 + 1e-12
    assert q.waiting() == 0 and q._early_work == 0.0 and q.admitted_early() == 0  # no drift once they have all ended


def test_long_calls_and_calls_of_unknown_wall_time_are_never_admitted_ahead():
    for request in (R(1, 0.1, wall=10), R(1, 0.1)):  # 10 s: 5 cluster-seconds each; unknown: inf
        q = AdmissionQueue(R(2, 8), pipeline_s=0.05)
        assert [t for i in range(5) for t in q.offer(f"c{i}", 0, request, now=0.0)] == ["c0", "c1"]
    off = AdmissionQueue(R(2, 8), pipeline_s=0.0)
    assert [t for i in range(5) for t in off.offer(f"c{i}", 0, R(1, 0.1, wall=0.002), now=0.0)] == ["c0", "c1"]


def _tiny_batch_makespan(pipeline_s: float, calls: int = 400, wall: float = 0.001, latency: float = 0.004) -> float:
    """A batch of tiny calls through the queue on 2 CPUs, where each admission reaches Ray and
    each end reaches the queue ``latency`` seconds later (the actor's round trips): returns
    when the last call ends. Ray runs what was admitted as soon as a CPU is free."""
    import heapq

    q = AdmissionQueue(R(2, 8), pipeline_s=pipeline_s)
    for i in range(calls):
        q.add(f"c{i}", 0, R(1, 0.1, wall=wall), float(i))
    cpus_free_at = [0.0, 0.0]
    events: list[tuple[float, str]] = []  # (when the queue hears of the end, token)
    last_end = 0.0

    def run(tokens: list[str], now: float) -> None:
        nonlocal last_end
        for token in tokens:
            start = max(now + latency, heapq.heappop(cpus_free_at))
            heapq.heappush(cpus_free_at, start + wall)
            last_end = max(last_end, start + wall)
            heapq.heappush(events, (start + wall + latency, token))

    run(q.admit(0.0), 0.0)
    while events:
        now, token = heapq.heappop(events)
        run(q.finish(token, now), now)
    assert q.waiting() == 0 and q.admitted() == 0
    return last_end


def test_pipelining_hides_the_admission_round_trip_of_tiny_calls():
    """Without it two 1 ms calls run per 9 ms round trip; with it the CPUs stay busy."""
    strict, pipelined = _tiny_batch_makespan(0.0), _tiny_batch_makespan(0.05)
    assert strict > 1.5  # 200 round trips of ~9 ms
    assert pipelined < strict / 4


def test_calls_whose_driver_reports_their_ends_are_ended_in_batches_or_with_their_dead_driver():
    """The driver reports ends (one message for many calls) instead of the actor waiting on each
    call's ref; the calls of a driver that died, admitted or waiting, end without a report."""
    dead: set[str] = set()
    service = Admission(capacity=lambda: {"n": Request(1.0, 8 * GiB)}, refresh_s=0.05, clock=Clock(), gather_s=0.0,
                        dead_jobs=lambda jobs: jobs & dead)

    async def scenario():
        assert await asyncio.wait_for(service.admit("a", 0, 1.0, 1 * GiB, owner="job-1"), 1.0) is True
        b = asyncio.create_task(service.admit("b", 0, 1.0, 1 * GiB, owner="job-1"))
        await _settle()
        assert not b.done() and service.status()["reported_by_drivers"] == 2
        service.ended(["a"])  # the driver's batch
        assert await asyncio.wait_for(b, 1.0) is True
        # Another driver's call waits behind b; b's driver dies without reporting b's end.
        c = asyncio.create_task(service.admit("c", 0, 1.0, 1 * GiB, owner="job-2"))
        d = asyncio.create_task(service.admit("d", 0, 1.0, 1 * GiB, owner="job-1"))  # queued after c
        await asyncio.sleep(0.15)
        assert not c.done() and not d.done()
        dead.add("job-1")
        assert await asyncio.wait_for(c, 2.0) is True  # b ended with its driver
        await asyncio.wait_for(d, 2.0)  # d, waiting, too: its admit returns, its task will not run
        assert service.status()["waiting"] == 0 and service.status()["admitted"] == 1  # c alone
        assert service.status()["reported_by_drivers"] == 1
        service.ended(["c"])
        assert service.status()["admitted"] == 0 and service.status()["reported_by_drivers"] == 0

    asyncio.run(scenario())


class _FakeRef:
    def __init__(self):
        self.callbacks = []

    def _on_ready(self, callback):
        self.callbacks.append(callback)

    def resolve(self):
        for callback in self.callbacks:
            callback(None)


def test_the_end_reporter_sends_the_ends_of_a_burst_together_and_holds_refs_until_they_exist():
    import threading
    import time

    from raysched.runtime.admission import EndReporter

    sent, arrived = [], threading.Event()
    reporter = EndReporter(lambda tokens: (sent.append(list(tokens)), arrived.set()), batch_s=0.05)
    refs = {f"t{i}": _FakeRef() for i in range(5)}
    for token, ref in refs.items():
        reporter.watch(token, ref)
    assert reporter.watching() == 5  # held: Ray drops the callback of a ref nobody holds
    for token in ("t0", "t1", "t2"):
        refs[token].resolve()
    assert arrived.wait(2.0)
    time.sleep(0.1)
    assert sent == [["t0", "t1", "t2"]] and reporter.watching() == 2
    refs["t0"].resolve()  # a second callback of an ended call: not reported twice
    refs["t3"].resolve()
    deadline = time.monotonic() + 2.0
    while len(sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent == [["t0", "t1", "t2"], ["t3"]]


def test_a_driver_with_a_backlog_past_what_the_queue_holds_well_is_warned_once_per_crossing(monkeypatch):
    """The admission actor holds ~60 KB per waiting call (Ray's, per pending call of an async
    actor: 5 GB with 80,000 waiting), and at max_concurrency waiting calls it takes no call at
    all, so the ends that would free room wait behind them for ever (checked with a limit of 4:
    6 calls queued, 1 admitted, ``ended`` never ran). Nothing said so."""
    import warnings

    from raysched.runtime import admission
    from raysched.runtime.admission import EndReporter

    monkeypatch.setattr(admission, "MANY_QUEUED_CALLS", 10)
    reporter = EndReporter(lambda tokens: None, batch_s=0.01)
    refs = {f"t{i}": _FakeRef() for i in range(30)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(12):
            reporter.watch(f"t{i}", refs[f"t{i}"])
        assert len(caught) == 1 and "10 calls with a priority" in str(caught[0].message)
        assert "waves" in str(caught[0].message) and caught[0].category is RuntimeWarning
        for i in range(8):
            refs[f"t{i}"].resolve()  # 4 left: below half of 10, warned again at the next crossing
        for i in range(12, 30):
            reporter.watch(f"t{i}", refs[f"t{i}"])
        assert len(caught) == 2


def test_a_node_that_joins_while_calls_wait_is_used_without_waiting_for_an_end():
    """The capacity was read again only when a call arrived or ended: a node that joined while
    long calls ran stayed idle, and the calls queued behind them waited for the first end
    (an hour, for hour-long calls), though the docstring says it is read every refresh_s."""
    clock = Clock()
    nodes = {"a": Request(1.0, 8 * GiB)}
    service = Admission(capacity=lambda: dict(nodes), refresh_s=0.05, clock=clock, gather_s=0.0)

    async def scenario():
        assert await asyncio.wait_for(service.admit("long", 0, 1.0, 1 * GiB), 1.0) is True
        waiting = asyncio.create_task(service.admit("next", 0, 1.0, 1 * GiB))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # one CPU, held
        nodes["b"] = Request(1.0, 8 * GiB)  # a node joins; nothing arrives or ends
        clock.now += 10.0
        assert await asyncio.wait_for(waiting, 2.0) is True
        assert service.status()["capacity_cpus"] == 2.0

    asyncio.run(scenario())


# --- which calls without a priority wait in the queue too ------------------------------------------------


def test_room_routing_routes_calls_that_matter_while_a_node_is_well_short_of_its_label():
    routing = RoomRouting(below=0.85, min_share=0.05)
    labels = {"a": 3.25 * GiB, "b": 8 * GiB}
    # Rooms at or near the labels (or above): nothing is short, every call goes straight.
    assert routing.shortest_room({"a": 3.0 * GiB, "b": 9 * GiB}, labels) is None
    assert not routing.routes(None, 1 * GiB)
    # "a" 1.2 GB short (room 2 GiB < 0.85 x 3.25 GiB): calls that may hold 5% of its room go
    # through the queue; a tiny one keeps the straight path.
    shortest = routing.shortest_room({"a": 2 * GiB, "b": 9 * GiB}, labels)
    assert shortest == 2 * GiB
    assert routing.routes(shortest, 800 * MiB) and routing.routes(shortest, 0.05 * 2 * GiB)
    assert not routing.routes(shortest, 50 * MiB) and not routing.routes(shortest, 0)
    # The smallest short room counts; a node without a reading, or without a label (a CPU-less
    # head, left out by the driver), is not short.
    assert routing.shortest_room({"a": 2 * GiB, "b": 1 * GiB}, labels) == 1 * GiB
    assert routing.shortest_room({"c": 1 * GiB}, labels) is None
    assert routing.shortest_room({"a": 0.0}, labels) == 0.0
    assert RoomRouting(below=None, min_share=0.05).shortest_room({"a": 0.0}, labels) is None


def test_the_drivers_room_watch_keeps_the_last_answer_and_forgets_it_when_the_monitor_fails():
    from raysched.runtime.rooms import RoomWatch
    from raysched.types import ClusterShape, NodeShape

    shape = ClusterShape((NodeShape("head", 0, 1 * GiB), NodeShape("a", 2, int(3.25 * GiB))))
    answers = [{"a": 2 * GiB, "head": 0.0}, {"a": 3.2 * GiB}, RuntimeError("monitor restarting")]
    asked = []

    def ask(node_ids):
        asked.append(node_ids)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    answers.insert(0, {"a": 2 * GiB})
    watch = RoomWatch(RoomRouting(0.85, 0.05), ask, lambda: shape, interval_s=60.0)
    assert watch.shortest_room is None and not watch.routes(800 * MiB)  # no answer yet: straight
    assert watch.check() is None  # short in one answer: not yet (no flapping)
    assert watch.check() == 2 * GiB and watch.routes(800 * MiB) and not watch.routes(10 * MiB)
    assert asked == [["a"]] * 2  # only nodes a task can run on (the head has no CPUs)
    assert watch.check() is None  # back above 0.85 of its label
    watch.shortest_room = 1 * GiB
    assert watch.check() is None  # a failed question: calls go straight, as without the watch
    # In its thread: a first answer at once, then every interval_s until closed.
    answers[:] = [{"a": 1 * GiB}] * 5
    watch._interval = 0.05
    watch.start()
    try:
        assert wait_for(lambda: watch.shortest_room == 1 * GiB, timeout=5, step=0.01)
    finally:
        watch.close()
    assert wait_for(lambda: not watch._thread.is_alive(), timeout=5, step=0.01) and watch.shortest_room is None


def test_the_room_watch_sets_the_room_left_against_the_labels_ray_could_still_place():
    """A batch of plain Ray tasks holds 2.9 GiB of "a"'s 3.25 GiB label and takes as much room:
    Ray can place 0.35 GiB more, which the 1 GiB left holds, so "a" is not short, though 1 GiB
    is well under its whole label.  Once they end, Ray can place the whole label again, and the
    same 1 GiB is short.  A node Ray lists no free memory for has none (all booked)."""
    from raysched.runtime.rooms import RoomWatch
    from raysched.types import ClusterShape, NodeShape

    shape = ClusterShape((NodeShape("a", 2, int(3.25 * GiB)), NodeShape("b", 2, int(3.25 * GiB))))
    free = {"a": 0.35 * GiB}
    watch = RoomWatch(RoomRouting(0.85, 0.05), lambda node_ids: {"a": 1 * GiB}, lambda: shape,
                      interval_s=60.0, free_labels=lambda: free)
    assert watch.check() is None and watch.check() is None
    free["a"] = 3.25 * GiB
    assert watch.check() is None and watch.check() == 1 * GiB  # (two answers in a row)
    free["a"] = 0.0
    assert watch.check() is None

