"""The priority queue as a cluster service: an async Ray actor over ``policy.admission``.

A call submitted with ``f.options(priority=N)`` is submitted to Ray at once,
with one extra argument: the ObjectRef of its admission (``admit``).  Ray does
not start a task before its arguments exist, so the call waits, outside Ray's
own queue, until this actor admits it; the user holds the task's real
ObjectRef all along, and the driver never waits.  Right after submitting it
the driver hands the actor the task's ObjectRef (``track``); when it resolves
(value, error or cancellation) the call's resources count as free again and
the next call in priority order is admitted.  Tracking the ObjectRef rather
than a message from the worker keeps the accounting right when a worker dies.

Calls submitted without ``priority`` do not pass through the queue: the happy
path costs nothing for them.  The capacity is the cluster's CPU and ``memory``
resources (``ray.cluster_resources()``, read again every ``refresh_s``);
calls that bypass the queue are not counted in it, so mixing both can admit
more than fits, which Ray then queues as usual.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Sequence

from ..policy.admission import AdmissionQueue, Request

logger = logging.getLogger(__name__)

ADMISSION_NAME = "raysched_admission"


def ray_capacity() -> Request | None:
    """The cluster's schedulable CPUs and memory, as Ray reports them."""
    import ray

    total = ray.cluster_resources()
    if not total.get("CPU"):
        return None
    return Request(float(total["CPU"]), float(total.get("memory", float("inf"))))


class Admission:
    """Admits waiting calls in priority order as admitted ones finish. Plain class; async methods.

    ``capacity()`` returns the cluster's capacity (None: unknown, admit one at a
    time); it is read again when older than ``refresh_s`` on the ``clock``.
    """

    def __init__(self, capacity: Callable[[], Request | None] = ray_capacity, refresh_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self._capacity_fn = capacity
        self._refresh_s = refresh_s
        self._clock = clock
        self._queue = AdmissionQueue(self._read_capacity())
        self._read_at = clock()
        self._events: dict[str, asyncio.Event] = {}
        self.admitted_total = 0

    def _read_capacity(self) -> Request | None:
        try:
            return self._capacity_fn()
        except Exception as exc:  # noqa: BLE001 - keep the last known capacity
            logger.warning("raysched admission: cannot read the cluster's capacity (%s)", exc)
            return None

    def _wake(self, tokens: Sequence[str]) -> None:
        self.admitted_total += len(tokens)
        for token in tokens:
            event = self._events.pop(token, None)
            if event is not None:
                event.set()

    def _refresh(self) -> None:
        if self._clock() - self._read_at >= self._refresh_s:
            self._read_at = self._clock()
            capacity = self._read_capacity()
            if capacity is not None and capacity != self._queue.capacity:
                self._wake(self._queue.set_capacity(capacity))

    async def admit(self, token: str, priority: int, num_cpus: float, memory_bytes: float,
                    order_key: float = 0.0) -> bool:
        """Return once the call may start (its task takes this value as an argument).

        ``order_key`` (``policy.admission.order_key``, computed by the driver) orders calls
        of equal priority; the driver's clock by default, since an async actor does not
        start calls in the order they were sent.
        """
        self._refresh()
        event = self._events.setdefault(token, asyncio.Event())
        request = Request(float(num_cpus), float(memory_bytes))
        self._wake(self._queue.offer(token, priority, request, order_key))
        await event.wait()
        return True

    async def track(self, token: str, refs: Sequence[Any]) -> None:
        """Wait for the call's ObjectRef (passed in a list, so Ray does not resolve it), then free its room."""
        try:
            await refs[0]
        except BaseException:  # noqa: BLE001 - an error or a cancellation ends the call just the same
            pass
        self.finish(token)

    def finish(self, token: str) -> None:
        self._refresh()
        self._wake(self._queue.finish(token))

    def status(self) -> dict[str, Any]:
        capacity = self._queue.capacity
        held = self._queue.held()
        return {"waiting": self._queue.waiting(), "admitted": self._queue.admitted(),
                "admitted_total": self.admitted_total,
                "capacity_cpus": capacity.num_cpus if capacity else None,
                "held_cpus": held.num_cpus, "held_memory_bytes": held.memory_bytes}

    def ping(self) -> bool:
        return True


def get_or_create_admission() -> Any:
    """The cluster's admission actor: found by name, created on first use, restarted by Ray.

    Async, so that thousands of waiting calls cost coroutines, not threads. A
    restarted actor starts empty: Ray retries the pending ``admit`` and ``track``
    calls, so every waiting call queues again.
    """
    import ray

    from .session import NAMESPACE, ensure_ray

    ensure_ray()
    return (
        ray.remote(Admission)
        .options(name=ADMISSION_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                 max_restarts=-1, max_task_retries=-1, num_cpus=0, max_concurrency=100_000)
        .remote()
    )


__all__ = ["Admission", "get_or_create_admission", "ray_capacity", "ADMISSION_NAME"]
