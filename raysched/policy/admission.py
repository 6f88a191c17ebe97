"""The priority queue in front of the cluster: which waiting call starts next. Pure.

Ray starts queued tasks roughly first come, first served: a burst of low-priority
work submitted first holds every slot until it is done, and an urgent call
submitted after it waits for all of it.  Ray also lets a task that does not fit
yet hold back the smaller ones queued behind it (measured: a batch of mixed
memory sizes runs like a strict first-in-first-out queue, see
benchmarks/README.md), so the node's memory idles while a big task waits for
room.  Calls submitted with a ``priority`` wait here instead, and are admitted
to Ray in priority order (highest first, then by ``order_key``) while the
resources that admitted calls hold, plus the call's own, fit the cluster.

**Backfill, EASY style** (the Argonne scheduler of Lifka 1995, Slurm's
``sched/backfill``).  When the first waiting call (the *head*) does not fit,
the queue works out when it will, from the predicted ends of the calls
admitted before it (admitted at + predicted upper wall time): the *shadow
time*, and the room left over at that time once the head has its share (the
*extra*).  A later call may then start now if it fits now and either ends by
the shadow time or fits in the extra: by the predictions, it never delays the
head.  So a stream of small low-priority calls cannot starve a big urgent one,
and the room a waiting big call cannot use yet is not wasted.  A call whose
wall time is unknown never ends "by the shadow time"; when an admitted call's
end is unknown the head's start cannot be told, and nothing passes it.  A call
running past its predicted end counts as ending now.  Only the head is
protected (EASY): a backfilled call may delay the second waiting call.

A call that no single node could hold (an explicit ``num_cpus`` more than the
largest node has, say, though not more than all of them together) passes through at
once and holds nothing: no room the queue frees would ever do, and Ray keeps it
pending until the cluster grows, as it would without raysched. (Admitted and held, it
blocked every other call for good.)

**Pipelining** (``pipeline_s``).  Admitting a call is a round trip: the queue
answers, the driver submits the task, Ray starts it, its end reaches the queue, which
admits the next.  Calls that run for a millisecond then leave the CPUs idle between
them (a helper's audit: 10,000 tiny calls took 33 s through the queue, 5 s straight to
Ray).  So the head call may be admitted before its room is free, when by the
predictions it will be within ``pipeline_s`` (the admitted calls' predicted ends, as
for backfill) and the calls admitted ahead of their room, itself included, add up to at
most ``pipeline_s`` of the whole cluster's time (each counts its predicted upper wall
time x its dominant share of the capacity, as in DRF).  Ray holds such a call in its
own queue until the room is there; an urgent call arriving later starts after at most
``pipeline_s`` of predicted work that way, and a call without a known wall time, or a
long one, is never admitted ahead.  At most ``backfill_depth`` calls are ahead at once
(each admission ahead sorts the admitted calls by their predicted ends).  0: only calls
whose room is free now.

**Room, not only labels.**  A node's ``memory`` resource is a label fixed when the
node starts, and Ray books calls' labels against it; Ray's memory monitor kills by
what the node really uses, which other programs' growth can push up.  So the queue
counts memory twice: the labels of admitted calls against the nodes' labels (else Ray
only queues them), and what they are expected to hold at most (their predictions'
upper bounds, ``expected_peak_bytes``) against the nodes' *room*, the memory
their tasks may hold and keep them under their memory threshold
(``pooled_capacity``).  The *ceiling* is each node's labels alone (``node_labels``): a
call bigger than the room but within one node's labels waits until it can run alone
(anything fits an empty queue), instead of passing through as if no room would ever do.

Pure: imports neither ray, mlflow nor pyarrow.  Time is the caller's clock
(``now``), so tests and replays drive it.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class Request:
    """What one call asks of the cluster (the sized allocation), and for how long.

    ``memory_bytes`` is the call's ``memory`` label, what Ray books on a node;
    ``peak_bytes`` the most it is expected to really hold (its prediction's upper
    bound; by default its label), what the node's room must have (see "Room, not
    only labels").  ``wall_seconds`` is the predicted upper bound of the call's run
    time; ``inf`` when unknown (such a call is never backfilled on the strength of
    its end).  As a capacity, ``memory_bytes`` is the nodes' labels and
    ``peak_bytes`` their rooms.
    """

    num_cpus: float
    memory_bytes: float
    wall_seconds: float = math.inf
    peak_bytes: float | None = None

    def __post_init__(self) -> None:
        if self.peak_bytes is None:
            object.__setattr__(self, "peak_bytes", self.memory_bytes)

    def __add__(self, other: "Request") -> "Request":
        return Request(self.num_cpus + other.num_cpus, self.memory_bytes + other.memory_bytes,
                       peak_bytes=self.peak_bytes + other.peak_bytes)

    def __sub__(self, other: "Request") -> "Request":
        return Request(self.num_cpus - other.num_cpus, self.memory_bytes - other.memory_bytes,
                       peak_bytes=self.peak_bytes - other.peak_bytes)

    def within(self, room: "Request") -> bool:
        """Whether this request's CPUs, label and expected peak fit in ``room``."""
        return (self.num_cpus <= room.num_cpus + 1e-9 and self.memory_bytes <= room.memory_bytes
                and self.peak_bytes <= room.peak_bytes)


_NOTHING = Request(0.0, 0.0)
#: What a call no node could hold holds once admitted: nothing, and it ends at once
#: as far as backfilling is concerned.
_PASSED_THROUGH = Request(0.0, 0.0, 0.0)
#: How many calls that ended before they were added the queue remembers (the oldest go first).
_ENDED_EARLY_MAX = 10_000


@dataclass(frozen=True)
class _Waiting:
    sort_key: tuple  # (-priority, order key, arrival): unique, so entries never compare further
    token: str
    request: Request

    def __lt__(self, other: "_Waiting") -> bool:
        return self.sort_key < other.sort_key


class AdmissionQueue:
    """Calls waiting for room, by priority; calls admitted and not yet finished, with what they hold.

    ``backfill``: let later calls use room the head call cannot use yet (EASY, above);
    ``backfill_depth``: how many waiting calls behind the head one pass looks at
    (Slurm's ``bf_max_job_test``: a pass stays cheap with thousands waiting);
    ``pipeline_s``: how far ahead of its room a short head call may be admitted (above).
    """

    def __init__(self, capacity: Request | None = None, backfill: bool = True, backfill_depth: int = 256,
                 pipeline_s: float = 0.0):
        self._capacity = capacity
        self.pipeline_s = pipeline_s
        # Calls admitted ahead of their room: token -> their predicted work (cluster-seconds).
        self._early: dict[str, float] = {}
        self._early_work = 0.0
        self._ceilings: tuple[Request, ...] = ()  # empty: the capacity (see set_capacity)
        self._backfill = backfill
        self._depth = max(0, int(backfill_depth))
        # Sorted by (-priority, order key, arrival): the key is the submitter's (its clock,
        # by default), since calls can reach the queue out of order.
        self._waiting: list[_Waiting] = []
        self._queued: set[str] = set()  # the tokens in _waiting
        self._gone: set[str] = set()  # waiting tokens finished (cancelled) before admission
        self._admitted: dict[str, tuple[Request, float]] = {}  # token -> (request, admitted at)
        #: How many admitted calls hold room (not passed through): a queue with none is empty
        #: to the next call (a passed-through call that never starts kept one bigger than the
        #: room, which must run alone, waiting for good, and every call behind it).
        self._holding = 0
        # Calls that finished before they were added (a call cancelled at once: its end can
        # reach the queue before its arrival does); an add of one of these is refused.
        self._ended_early: dict[str, None] = {}
        self._held = _NOTHING
        self._arrival = itertools.count()
        self.backfilled_total = 0

    @property
    def backfill(self) -> bool:
        """Whether later calls may use room the head call cannot use yet."""
        return self._backfill

    @backfill.setter
    def backfill(self, on: bool) -> None:
        self._backfill = bool(on)

    @property
    def pipeline_s(self) -> float:
        """How many seconds of the cluster's time the calls admitted ahead of their room may add up to."""
        return self._pipeline_s

    @pipeline_s.setter
    def pipeline_s(self, seconds: float) -> None:
        self._pipeline_s = max(0.0, float(seconds))

    @property
    def capacity(self) -> Request | None:
        return self._capacity

    def admitted_early(self) -> int:
        """How many admitted calls were admitted ahead of their room and have not ended."""
        return len(self._early)

    def waiting(self) -> int:
        return len(self._waiting) - len(self._gone)

    def admitted(self) -> int:
        return len(self._admitted)

    def held(self) -> Request:
        return self._held

    def is_admitted(self, token: str) -> bool:
        return token in self._admitted

    def add(self, token: str, priority: int, request: Request, order_key: float = 0.0) -> bool:
        """Queue a call without admitting anything (``admit`` does); False if it is already known.

        Among equal priorities the smaller ``order_key`` goes first (see ``order_key``).
        """
        if token in self._ended_early:
            return False  # it has ended already: nothing to admit (kept: a retried add is refused too)
        if token in self._admitted or token in self._queued:
            return False  # offered twice (a retried actor call): one place in the queue
        bisect.insort(self._waiting, _Waiting((-priority, order_key, next(self._arrival)), token, request))
        self._queued.add(token)
        return True

    def offer(self, token: str, priority: int, request: Request, order_key: float = 0.0,
              now: float = 0.0) -> list[str]:
        """A call arrives; returns the tokens admitted now (it may be among them)."""
        return self.admit(now) if self.add(token, priority, request, order_key) else []

    def finish(self, token: str, now: float = 0.0) -> list[str]:
        """A call ended (or was cancelled while waiting); returns the tokens admitted now."""
        return self.finish_many((token,), now)

    def finish_many(self, tokens: Iterable[str], now: float = 0.0) -> list[str]:
        """Calls ended (a driver's report of a burst): one admission pass for them all."""
        for token in tokens:
            self._release(token)
        return self.admit(now)

    def _release(self, token: str) -> None:
        held = self._admitted.pop(token, None)
        if held is not None:
            if held[0] is not _PASSED_THROUGH:
                self._holding -= 1
            self._held = self._held - held[0] if self._holding else _NOTHING  # no drift once empty
            work = self._early.pop(token, None)
            if work is not None:
                self._early_work = self._early_work - work if self._early else 0.0
        elif token in self._queued:
            self._gone.add(token)
        else:
            self._ended_early[token] = None
            if len(self._ended_early) > _ENDED_EARLY_MAX:
                del self._ended_early[next(iter(self._ended_early))]

    def is_waiting(self, token: str) -> bool:
        return token in self._queued and token not in self._gone

    def set_capacity(self, capacity: Request, now: float = 0.0,
                     ceiling: Request | Sequence[Request] | None = None) -> list[str]:
        """The cluster's capacity changed (a node joined or left, or its room); returns the tokens admitted now.

        ``ceiling``: the most one call could ever be given, one per node (each node's
        labels, ``node_labels``; by default the capacity): a call within none of them
        passes through; one beyond the capacity only waits.
        """
        self._capacity = capacity
        self._ceilings = (ceiling,) if isinstance(ceiling, Request) else tuple(ceiling or ())
        # A call admitted before the capacity was known (the first pass runs while it is being
        # read) that no node can hold holds nothing from now on, as if it had passed through.
        for token, (request, at) in list(self._admitted.items()):
            if request is not _PASSED_THROUGH and self._beyond_ceiling(request):
                self._admitted[token] = (_PASSED_THROUGH, at)
                self._holding -= 1
                self._held = self._held - request if self._holding else _NOTHING
        return self.admit(now)

    def _beyond_ceiling(self, request: Request) -> bool:
        """Whether no node could ever hold the call (it passes through; see the module docstring)."""
        if self._ceilings:
            return not any(request.within(ceiling) for ceiling in self._ceilings)
        return self._capacity is not None and not request.within(self._capacity)

    def _fits(self, request: Request) -> bool:
        if self._capacity is None or not self._holding:
            return True
        cap, held = self._capacity, self._held  # (floats, not Requests: a pass looks at hundreds)
        return (held.num_cpus + request.num_cpus <= cap.num_cpus + 1e-9
                and held.memory_bytes + request.memory_bytes <= cap.memory_bytes
                and held.peak_bytes + request.peak_bytes <= cap.peak_bytes)

    def _reservation(self, head: Request, now: float) -> tuple[float, Request] | None:
        """When the head call will fit, by the admitted calls' predicted ends, and the room
        left over then beside it; None when that cannot be told (an end is unknown)."""
        assert self._capacity is not None
        cap, held = self._capacity, self._held
        cpus, memory, peak = (cap.num_cpus - held.num_cpus, cap.memory_bytes - held.memory_bytes,
                              cap.peak_bytes - held.peak_bytes)
        ends = sorted(((max(at + request.wall_seconds, now), request) for request, at in self._admitted.values()),
                      key=lambda end_request: end_request[0])
        for end, request in ends:
            if math.isinf(end):
                return None
            cpus, memory, peak = cpus + request.num_cpus, memory + request.memory_bytes, peak + request.peak_bytes
            if head.num_cpus <= cpus + 1e-9 and head.memory_bytes <= memory and head.peak_bytes <= peak:
                return end, Request(cpus - head.num_cpus, memory - head.memory_bytes,
                                    peak_bytes=peak - head.peak_bytes)
        # A head bigger than the capacity (within the ceiling: bigger than the room) starts
        # alone, once every admitted call has ended.
        return (ends[-1][0], _NOTHING) if ends else None

    def _may_start_ahead(self, request: Request) -> bool:
        """Whether a head call that does not fit now may be admitted ahead of its room, if
        predicted to have it within ``pipeline_s`` (see "Pipelining")."""
        return (self._pipeline_s > 0 and self._capacity is not None and math.isfinite(request.wall_seconds)
                and len(self._early) < self._depth  # (each admission ahead sorts the admitted calls)
                and self._early_work + _share(request, self._capacity) * request.wall_seconds <= self._pipeline_s)

    def admit(self, now: float = 0.0) -> list[str]:
        """Admit what may start now, in order, backfilling behind a head that does not fit."""
        out: list[str] = []
        kept: list[_Waiting] = []
        reservation: tuple[float, Request] | None = None
        blocked = False  # the head is waiting for room
        looked = 0
        for index, entry in enumerate(self._waiting):
            if self._drop_if_gone(entry):  # cancelled while it waited
                continue
            token, request = entry.token, entry.request
            if self._beyond_ceiling(request):
                # More than any one node holds: no room the queue frees will ever do,
                # and Ray keeps such a task pending until the cluster grows. Held here, it
                # would block every other call for good; it passes through, holding nothing.
                self._queued.discard(token)
                self._admitted[token] = (_PASSED_THROUGH, now)
                out.append(token)
                continue
            if blocked:
                looked += 1
                if reservation is None or looked > self._depth:
                    # The rest stays as it is (a copy in C, not a look at each call): a call
                    # cancelled back there is dropped once a pass reaches it.
                    kept.extend(self._waiting[index:])
                    break
                shadow, extra = reservation
                if not self._fits(request):
                    kept.append(entry)
                    continue
                if now + request.wall_seconds <= shadow:
                    pass  # done before the head can start: it takes nothing from it
                elif request.within(extra):
                    reservation = (shadow, extra - request)  # runs on beside the head
                else:
                    kept.append(entry)
                    continue
                self.backfilled_total += 1
            elif not self._fits(request):
                ahead = self._may_start_ahead(request)
                reservation = self._reservation(request, now) if self._backfill or ahead else None
                if ahead and reservation is not None and reservation[0] <= now + self._pipeline_s:
                    # Admitted ahead of its room: Ray holds it until then, and it is counted
                    # as starting then (the next call's prediction builds on its end).
                    self._take(token, request, reservation[0], out)
                    self._early[token] = _share(request, self._capacity) * request.wall_seconds
                    self._early_work += self._early[token]
                    continue
                blocked = True
                kept.append(entry)
                if not self._backfill:
                    reservation = None
                continue
            self._take(token, request, now, out)
        self._waiting = kept
        return out

    def _take(self, token: str, request: Request, start: float, out: list[str]) -> None:
        """Admit a waiting call, counted as starting at ``start``."""
        self._queued.discard(token)
        self._admitted[token] = (request, start)
        self._holding += 1
        self._held = self._held + request
        out.append(token)

    def _drop_if_gone(self, entry: _Waiting) -> bool:
        """Forget a waiting call that finished (was cancelled) before admission; True if it had."""
        if entry.token in self._gone:
            self._gone.discard(entry.token)
            self._queued.discard(entry.token)
            return True
        return False


def _share(request: Request, capacity: Request) -> float:
    """The call's dominant share of the capacity (DRF): its largest fraction of any resource."""
    shares = [need / have for need, have in ((request.num_cpus, capacity.num_cpus),
                                             (request.memory_bytes, capacity.memory_bytes),
                                             (request.peak_bytes, capacity.peak_bytes)) if have > 0]
    return max(shares, default=0.0)


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


def expected_peak_bytes(memory_upper_bytes: float, label_is_callers: bool) -> float | None:
    """What a call is expected to hold at most, as the queue counts it against the nodes' rooms.

    Its prediction's upper bound (a cost-aware estimate's chosen allocation; another
    estimate's bound, without the sizing's margin), when the label is raysched's own; a
    caller's own figure (``memory=``, or the cold fallback) is taken as it is: None, the
    label.
    """
    if label_is_callers or not math.isfinite(memory_upper_bytes) or memory_upper_bytes <= 0:
        return None
    return float(memory_upper_bytes)


def pooled_capacity(nodes: Mapping[str, Request], rooms: Mapping[str, float]) -> Request | None:
    """What the queue admits against, pooled over the nodes: their CPUs, their ``memory``
    labels, and their rooms (``peak_bytes``).

    ``nodes``: node id -> the node's CPUs and memory label; ``rooms``: node id -> the
    memory its tasks may hold and keep it under its memory threshold (a node without
    one counts its label as its room).  None without nodes.
    """
    if not nodes:
        return None
    return Request(sum(n.num_cpus for n in nodes.values()), sum(n.memory_bytes for n in nodes.values()),
                   peak_bytes=sum(max(0.0, rooms[node_id]) if node_id in rooms else n.memory_bytes
                                  for node_id, n in nodes.items()))


def node_labels(nodes: Mapping[str, Request]) -> tuple[Request, ...]:
    """Each node's CPUs and memory label, with no limit on room: the most the cluster could
    ever give one call, node by node (a call within none passes through; one beyond the
    room only waits to run alone).  A Ray task runs on one node: within the nodes' labels
    added together but no single node's, it was admitted and never started."""
    return tuple(Request(n.num_cpus, n.memory_bytes, peak_bytes=math.inf) for n in nodes.values())


@dataclass(frozen=True)
class RoomRouting:
    """Which calls submitted without a priority wait in the queue too: those Ray could place
    on a node that cannot hold them.

    Ray books a call by its ``memory`` label against the node's label, fixed when the node
    started; raysched's node rule and the queue know the node's *room* (``pooled_capacity``
    above), which other programs' growth shrinks.  Where the room is well below the label,
    calls whose labels Ray can place together pass Ray's kill threshold together: on such a
    node (measured, benchmarks/README.md) calls sent straight to Ray were killed 6 and 8
    times a batch while the same calls through the queue were not killed at all.  The node
    rule, stopping one attempt at a time from readings a second apart, could not keep up
    with tasks growing together at ~1 GB/s.

    ``below``: a node is short while its room is below this fraction of its label (None:
    never); the driver gives the room a node has left for more calls, and the labels Ray
    could still place there (``runtime.rooms``).  ``min_share``: only a call that may hold
    at least this share of the shortest such node's room is routed; tiny calls keep the
    straight path, where the queue's round trip would cost more than they could hold.
    """

    below: float | None
    min_share: float

    def shortest_room(self, rooms: Mapping[str, float], labels: Mapping[str, float]) -> float | None:
        """The smallest room among the nodes short of their labels (bytes), None if none is.

        ``rooms``: node id -> room (a node the monitor has no reading of is left out: it
        is judged by its label, as before); ``labels``: node id -> ``memory`` label, of the
        nodes a task may run on (a CPU-less head's room does not matter to a task).
        """
        if self.below is None:
            return None
        short = [room for node_id, room in rooms.items()
                 if labels.get(node_id, 0) > 0 and room < self.below * labels[node_id]]
        return min(short) if short else None

    def routes(self, shortest_room: float | None, call_bytes: float) -> bool:
        """Whether a call without a priority goes through the queue; ``call_bytes``: the most
        it is expected to hold (its label, or its expected peak where that is more)."""
        return shortest_room is not None and call_bytes > 0 and call_bytes >= self.min_share * shortest_room


__all__ = ["AdmissionQueue", "Request", "RoomRouting", "order_key", "expected_peak_bytes", "pooled_capacity",
           "node_labels", "ORDERS", "FIRST_SUBMITTED", "LARGEST_FIRST"]
