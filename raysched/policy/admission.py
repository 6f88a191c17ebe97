"""The priority queue in front of the cluster: which waiting call starts next. Pure.

Ray starts queued tasks roughly first come, first served: a burst of low-priority
work submitted first holds every slot until it is done, and an urgent call
submitted after it waits for all of it.  Calls submitted with a ``priority``
wait here instead, and are admitted to Ray in priority order (highest first,
then first submitted) while the resources that admitted calls hold, plus the
call's own, fit the cluster's capacity.

Strict order, no backfill: while a higher-priority call waits for room, no
lower-priority call is admitted past it, even a smaller one that would fit
(a stream of small low-priority calls must not starve a big urgent one).
When nothing is admitted at all, the head call is admitted whatever its
size: a call bigger than the whole cluster is Ray's to refuse or cap, not
the queue's to hold for ever.

Pure: imports neither ray, mlflow nor pyarrow.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    """What one call asks of the cluster (the sized allocation)."""

    num_cpus: float
    memory_bytes: float


class AdmissionQueue:
    """Calls waiting for room, by priority; calls admitted and not yet finished, with what they hold."""

    def __init__(self, capacity: Request | None = None):
        self._capacity = capacity
        # (-priority, order key, arrival, token, request): the key is the submitter's (its
        # clock, by default), since calls can reach the queue out of order.
        self._waiting: list[tuple[int, float, int, str, Request]] = []
        self._queued: set[str] = set()  # the tokens in _waiting
        self._gone: set[str] = set()  # waiting tokens finished (cancelled) before admission
        self._admitted: dict[str, Request] = {}
        self._arrival = itertools.count()

    @property
    def capacity(self) -> Request | None:
        return self._capacity

    def waiting(self) -> int:
        return len(self._waiting) - len(self._gone)

    def admitted(self) -> int:
        return len(self._admitted)

    def held(self) -> Request:
        return Request(sum(r.num_cpus for r in self._admitted.values()),
                       sum(r.memory_bytes for r in self._admitted.values()))

    def offer(self, token: str, priority: int, request: Request, order_key: float = 0.0) -> list[str]:
        """A call arrives; returns the tokens admitted now (it may be among them).

        Among equal priorities the smaller ``order_key`` goes first (see ``order_key``).
        """
        if token in self._admitted or token in self._queued:
            return []  # offered twice (a retried actor call): one place in the queue
        heapq.heappush(self._waiting, (-priority, order_key, next(self._arrival), token, request))
        self._queued.add(token)
        return self._admit()

    def finish(self, token: str) -> list[str]:
        """A call ended (or was cancelled while waiting); returns the tokens admitted now."""
        if self._admitted.pop(token, None) is None and token in self._queued:
            self._gone.add(token)
        return self._admit()

    def set_capacity(self, capacity: Request) -> list[str]:
        """The cluster's capacity changed (a node joined or left); returns the tokens admitted now."""
        self._capacity = capacity
        return self._admit()

    def _fits(self, request: Request) -> bool:
        if self._capacity is None or not self._admitted:
            return True
        held = self.held()
        return (held.num_cpus + request.num_cpus <= self._capacity.num_cpus + 1e-9
                and held.memory_bytes + request.memory_bytes <= self._capacity.memory_bytes)

    def _admit(self) -> list[str]:
        out = []
        while self._waiting:
            token, request = self._waiting[0][3:]
            if token not in self._gone and not self._fits(request):
                break  # strict order: nothing lower passes a waiting higher call
            heapq.heappop(self._waiting)
            self._queued.discard(token)
            if token in self._gone:  # cancelled while it waited
                self._gone.discard(token)
                continue
            self._admitted[token] = request
            out.append(token)
        return out


FIRST_SUBMITTED = "first_submitted"
LARGEST_FIRST = "largest_first"
ORDERS = (FIRST_SUBMITTED, LARGEST_FIRST)


def order_key(order: str, submitted_at: float, memory_bytes: float, wall_seconds: float) -> float:
    """The key that orders calls of equal priority (smaller first).

    - ``first_submitted``: the submitter's clock: first come, first served;
    - ``largest_first``: the predicted memory-seconds (memory x wall), largest first,
      the longest-processing-time rule: a batch whose big calls start first leaves
      small ones for the end, which pack into the room that is left instead of one
      big call running alone (ties by the clock's order are lost: the key is the size).
    """
    if order == FIRST_SUBMITTED:
        return float(submitted_at)
    if order == LARGEST_FIRST:
        return -float(memory_bytes) * max(float(wall_seconds), 1e-3)
    raise ValueError(f"unknown admission order {order!r}; expected one of {ORDERS}")


__all__ = ["AdmissionQueue", "Request", "order_key", "ORDERS", "FIRST_SUBMITTED", "LARGEST_FIRST"]
