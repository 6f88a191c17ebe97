"""The admission queue without Ray: the pure order and capacity rules, and the async service
driven with a fake capacity and a fake clock."""

from __future__ import annotations

import asyncio

from raysched.policy.admission import FIRST_SUBMITTED, LARGEST_FIRST, AdmissionQueue, Request, order_key
from raysched.runtime.admission import Admission
from raysched.types import GiB

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


def test_the_service_releases_waiters_in_order_as_tracked_calls_end():
    capacity = [Request(1.0, 8 * GiB)]
    clock = Clock()
    service = Admission(capacity=lambda: capacity[0], refresh_s=5.0, clock=clock)

    async def scenario():
        started: list[str] = []

        async def call(token, priority):
            await service.admit(token, priority, 1.0, 1 * GiB)
            started.append(token)

        done = [asyncio.get_running_loop().create_future() for _ in range(3)]
        tasks = [asyncio.create_task(call("low-1", 0)), asyncio.create_task(call("low-2", 0)),
                 asyncio.create_task(call("high", 7))]
        for _ in range(3):
            await asyncio.sleep(0)
        assert started == ["low-1"]
        tracking = asyncio.create_task(service.track("low-1", [done[0]]))
        done[0].set_result("value")  # the call's ref resolves
        await tracking
        await asyncio.sleep(0)
        assert started == ["low-1", "high"]
        # An error ends a call just the same; and a bigger cluster, seen after refresh_s, admits more.
        failing = asyncio.create_task(service.track("high", [done[1]]))
        done[1].set_exception(RuntimeError("task failed"))
        await failing
        await asyncio.sleep(0)
        assert started == ["low-1", "high", "low-2"]
        await asyncio.gather(*tasks)
        assert service.status()["admitted_total"] == 3

    asyncio.run(scenario())
