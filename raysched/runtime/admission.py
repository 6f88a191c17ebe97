"""The priority queue as a cluster service: an async Ray actor over ``policy.admission``.

A call submitted with ``f.options(priority=N)`` is submitted to Ray at once,
with one extra argument: the ObjectRef of its admission (``admit``).  Ray does
not start a task before its arguments exist, so the call waits, outside Ray's
own queue, until this actor admits it; the user holds the task's real
ObjectRef all along, and the driver never waits.  Right after submitting it
the driver watches the task's ObjectRef (``EndReporter``: a callback Ray runs
once the object exists, without fetching it) and tells the actor of the ends of
its calls in batches (``ended``); then the call's resources count as free again
and the next call in priority order is admitted.  Watching the ObjectRef rather
than waiting for a message from the worker keeps the accounting right when a
worker dies.  A call of a driver that dies never ends that way: the actor looks
every ``refresh_s`` for the drivers (jobs) of its calls among Ray's dead jobs and
ends their calls.  On a Ray without ``ObjectRef._on_ready`` (2.40), the driver
hands the actor each call's ObjectRef instead (``track``), which waits for it: a
second actor call per queued call, and a waiting coroutine each.

Calls submitted without ``priority`` do not pass through the queue: the happy
path costs nothing for them.  The capacity is the CPUs and ``memory`` labels of
the nodes that have CPUs (a CPU-less head's ``memory`` cannot host a task), and
each node's room under its memory threshold as the monitor last measured it
(``Monitor.node_rooms``), which the calls' expected peaks must fit: a label is
fixed when the node starts, and calls whose labels fit it can still pass Ray's
kill threshold when other programs use more.  Both are read again every
``refresh_s``, and before the first admission of a burst after a pause.  Calls
that bypass the queue are not counted in it, so mixing both can admit more than
fits, which Ray then queues as usual.  Each call brings its predicted upper wall
time, so the queue can backfill behind a big call that waits for room
(``policy.admission``).  Calls that arrive within ``gather_s`` of each other are
ordered together before any is admitted: a burst submitted in a loop is admitted
by priority and ``order_key``, not by which message came first.  Not strictly: room
that a call's end frees while a burst still arrives goes at once to the calls
already there, so a lower-priority one may start a few ms ahead of a higher one
sent later in the burst (holding freed room back would slow a stream of tiny calls).

A call whose arguments include ObjectRefs (the outputs of other calls) joins the
queue only once they exist, as Ray starts a task only then: admitted before, it
would hold room it cannot use, and if the calls that make its inputs queue
behind it (a consumer given a higher priority than its producers), for ever.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings
import time
from typing import Any, Awaitable, Callable, Mapping, Sequence

from ..policy.admission import AdmissionQueue, Request, node_labels, pooled_capacity
from .session import SERVICE_PROTOCOL

logger = logging.getLogger(__name__)

ADMISSION_NAME = f"raysched_admission-{SERVICE_PROTOCOL}"  # (one per cluster; the version: session.SERVICE_PROTOCOL)


def ray_ready(refs: Sequence[Any]) -> set[Any]:
    """Those of ``refs`` (distinct ObjectRefs) that exist now, without fetching them here."""
    import ray

    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0, fetch_local=False)
    return set(ready)


def ray_dead_jobs(jobs: set[str]) -> set[str]:
    """Those of ``jobs`` (hex job ids) that Ray counts as dead (their driver is gone)."""
    import ray

    return {job["JobID"] for job in ray._private.state.jobs() if job.get("IsDead") and job.get("JobID") in jobs}


def ray_node_capacities() -> dict[str, Request]:
    """The CPUs and ``memory`` of each live node that has CPUs, by node id, as Ray reports them."""
    import ray

    nodes = {}
    for node in ray.nodes():
        resources = node.get("Resources") or {}
        if node.get("Alive") and resources.get("CPU", 0) > 0:
            nodes[node["NodeID"]] = Request(float(resources["CPU"]), float(resources.get("memory", float("inf"))))
    return nodes


def monitor_rooms(monitor_name: str) -> Callable[[Sequence[str]], Awaitable[Mapping[str, float]]]:
    """Asks the monitor actor of that name for the nodes' rooms (``Monitor.node_rooms``)."""

    async def rooms(node_ids: Sequence[str]) -> Mapping[str, float]:
        import ray

        from .session import NAMESPACE

        monitor = ray.get_actor(monitor_name, namespace=NAMESPACE)
        return await monitor.node_rooms.remote(list(node_ids))

    rooms.monitor = monitor_name  # type: ignore[attr-defined]  (reconfigure tells a change)
    return rooms


#: The admission actor's call slots (its ``max_concurrency``): every waiting call holds one
#: (its ``admit``), and a call finds none free past this many, the ends that would free room
#: included.
ADMISSION_MAX_WAITING = 100_000
#: Slots no ``admit`` may wait in, kept for the calls that free room (``ended``, ``track``)
#: and ``status``: a call that finds the rest taken is admitted at once instead
#: (``Admission.admit``), since waiting there would leave no slot for any end: a deadlock
#: (seen with 4 slots and 6 calls).
ADMISSION_RESERVED_SLOTS = 1_000


class Admission:
    """Admits waiting calls in priority order as admitted ones finish. Plain class; async methods.

    ``capacity()`` returns each node's CPUs and ``memory`` label by node id (none:
    unknown, every call is admitted and Ray queues them); ``rooms(node_ids)``, if
    given, is awaited for each node's room under its memory threshold (node id ->
    bytes; a node left out counts by its label; no answer within ``rooms_timeout_s``:
    labels only).  Both are read again when older than ``refresh_s`` on the ``clock``.
    ``backfill`` as in ``policy.admission.AdmissionQueue``;
    ``gather_s``: the queue admits once no call has arrived for this long (at most
    10 x ``gather_s`` after the burst's first call), so a burst is ordered as a
    whole (0: only the calls already delivered to the actor);
    ``pipeline_s``: how far ahead of its room a short call may be admitted
    (``policy.admission``, "Pipelining");
    ``max_waiting``: the actor's call slots (its ``max_concurrency``), of which
    ``reserved_slots`` (at most half) no ``admit`` waits in.
    """

    def __init__(self, capacity: Callable[[], Mapping[str, Request]] = ray_node_capacities,
                 refresh_s: float = 5.0, clock: Callable[[], float] = time.monotonic, backfill: bool = True,
                 gather_s: float = 0.01, ready: Callable[[Sequence[Any]], set[Any]] = ray_ready,
                 inputs_poll_s: float = 0.05,
                 rooms: Callable[[Sequence[str]], Awaitable[Mapping[str, float]]] | None = None,
                 rooms_timeout_s: float = 2.0, pipeline_s: float = 0.0,
                 dead_jobs: Callable[[set[str]], set[str]] = ray_dead_jobs,
                 max_waiting: int = ADMISSION_MAX_WAITING, reserved_slots: int = ADMISSION_RESERVED_SLOTS):
        self._capacity_fn = capacity
        # Calls past this many ``admit`` and ``track`` calls in the actor are admitted at once.
        self._wait_slots = max(1, max_waiting - min(reserved_slots, max_waiting // 2))
        self._in_slots = 0  # admit and track calls in the actor now
        self.overflowed_total = 0  # calls admitted at once for want of a slot to wait in
        self._rooms_fn = rooms
        self._rooms_monitor: str | None = getattr(rooms, "monitor", None)
        self._rooms_timeout_s = rooms_timeout_s
        self._refresh_s = refresh_s
        self._clock = clock
        self._gather_s = max(0.0, float(gather_s))
        self._nodes = self._read_nodes() or {}
        self._rooms: Mapping[str, float] = {}
        self._queue = AdmissionQueue(backfill=backfill, pipeline_s=pipeline_s)
        if self._nodes:
            self._queue.set_capacity(pooled_capacity(self._nodes, {}), clock(), ceiling=node_labels(self._nodes))
        # The rooms are not read here (an actor's constructor cannot await): the first pass reads them.
        self._read_at = float("-inf") if rooms is not None else clock()
        self._refreshing: asyncio.Future | None = None
        # While calls wait, the capacity is read again every refresh_s even if no call arrives
        # or ends: a node that joins (or a room that grows) is used at once.
        self._capacity_watcher: asyncio.Future | None = None
        self._events: dict[str, asyncio.Event] = {}
        self._pass_pending = False
        self._first_arrival = self._last_arrival = 0.0  # of the burst being gathered (the loop's time)
        self.admitted_total = 0
        # Calls whose ObjectRef arguments do not exist yet: one watcher looks at all of them
        # every ``inputs_poll_s`` (one ray.wait, in a thread), not one poll per call.
        self._ready_fn = ready
        self._inputs_poll_s = inputs_poll_s
        self._awaiting_inputs: dict[str, tuple[list[Any], asyncio.Event]] = {}
        self._inputs_watcher: asyncio.Future | None = None
        # Calls whose drivers report their ends (``ended``): token -> the driver's job id, so
        # that the calls of a driver that died end too (one look every refresh_s for all).
        self._dead_jobs_fn = dead_jobs
        self._owners: dict[str, str] = {}
        self._owners_watcher: asyncio.Future | None = None

    def _read_nodes(self) -> Mapping[str, Request] | None:
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

    def _refresh(self) -> bool:
        """Start reading the capacity again if it is older than ``refresh_s``; True while a read is on.

        The read ends with an admission pass, on the new capacity.
        """
        if self._refreshing is None and self._clock() - self._read_at >= self._refresh_s:
            self._read_at = self._clock()
            self._refreshing = asyncio.ensure_future(self._read_capacity())
        return self._refreshing is not None

    async def _read_capacity(self) -> None:
        try:
            nodes = self._read_nodes()
            if nodes is not None:
                self._nodes = nodes
            if self._rooms_fn is not None and self._nodes:
                try:
                    self._rooms = dict(await asyncio.wait_for(self._rooms_fn(list(self._nodes)),
                                                              self._rooms_timeout_s))
                except Exception as exc:  # noqa: BLE001 - no monitor (yet): the labels alone
                    logger.debug("raysched admission: no node rooms from the monitor (%s)", exc)
                    self._rooms = {}
        finally:
            self._refreshing = None
        capacity = pooled_capacity(self._nodes, self._rooms)
        if capacity is not None:
            self._wake(self._queue.set_capacity(capacity, self._clock(), ceiling=node_labels(self._nodes)))
        else:
            self._wake(self._queue.admit(self._clock()))

    def _admit_pass(self) -> None:
        # Wait on while calls keep arriving (a burst still being sent), up to 10 x gather_s.
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._last_arrival
        if quiet < self._gather_s and loop.time() - self._first_arrival < 10 * self._gather_s:
            loop.call_later(self._gather_s - quiet, self._admit_pass)
            return
        self._pass_pending = False
        if self._refresh():
            return  # the read that is on admits once it has the capacity
        self._wake(self._queue.admit(self._clock()))

    async def admit(self, token: str, priority: int, num_cpus: float, memory_bytes: float,
                    order_key: float = 0.0, wall_seconds: float = float("inf"),
                    inputs: Sequence[Sequence[Any]] = (), peak_bytes: float | None = None,
                    owner: str | None = None) -> bool:
        """Return once the call may start (its task takes this value as an argument).

        ``order_key`` (``policy.admission.order_key``, computed by the driver) orders calls
        of equal priority; the driver's clock by default, since an async actor does not
        start calls in the order they were sent.  ``wall_seconds``: the call's predicted
        upper wall time (inf: unknown), which lets the queue backfill.  ``inputs``: the
        call's ObjectRef arguments, in a list inside a list (so that Ray passes them as
        they are): the call is queued once they all exist.  ``peak_bytes``: the most the
        call is expected to hold (its prediction's upper bound; None: its label), counted
        against the nodes' rooms.  ``owner``: the job id of the driver that reports the
        call's end (``ended``); None: the driver hands over its ObjectRef (``track``).
        """
        if self._queue.is_admitted(token):
            return True  # asked again (a retried call): it was admitted already
        if self._in_slots >= self._wait_slots:
            # Waiting here would take one of the last call slots, which the ends need: without
            # them nothing is ever admitted again. It runs now, in Ray's own queue, outside the
            # priority order (the queue does not count it), as a call without a priority does.
            self.overflowed_total += 1
            if self.overflowed_total == 1 or self.overflowed_total % 10_000 == 0:
                logger.warning("raysched admission: %d calls wait in the queue, all it can hold and still hear "
                               "their ends: later calls go straight to Ray's queue (%d so far)",
                               self._in_slots, self.overflowed_total)
            return True
        self._in_slots += 1
        try:
            return await self._admit(token, priority, num_cpus, memory_bytes, order_key, wall_seconds, inputs,
                                     peak_bytes, owner)
        finally:
            self._in_slots -= 1

    async def _admit(self, token: str, priority: int, num_cpus: float, memory_bytes: float, order_key: float,
                     wall_seconds: float, inputs: Sequence[Sequence[Any]], peak_bytes: float | None,
                     owner: str | None) -> bool:
        refs = list(dict.fromkeys(inputs[0])) if inputs else []
        if refs:
            await self._inputs_exist(token, refs)
            if self._queue.is_admitted(token):
                return True
        request = Request(float(num_cpus), float(memory_bytes), float(wall_seconds),
                          None if peak_bytes is None else float(peak_bytes))
        added = self._queue.add(token, priority, request, order_key)
        if added and owner is not None:
            self._watch_owner(token, owner)
        if not added and not self._queue.is_waiting(token):
            # Its end (``ended`` or ``track``: cancelled at once) was delivered before this
            # call: an async actor does not run calls in the order they were sent.
            return True
        event = self._events.setdefault(token, asyncio.Event())
        if added:
            loop = asyncio.get_running_loop()
            self._last_arrival = loop.time()
            if not self._pass_pending:  # one admission pass for the whole burst
                self._pass_pending, self._first_arrival = True, self._last_arrival
                loop.call_later(self._gather_s, self._admit_pass)
            if self._capacity_watcher is None or self._capacity_watcher.done():
                self._capacity_watcher = asyncio.ensure_future(self._watch_capacity())
        await event.wait()
        return True

    async def _watch_capacity(self) -> None:
        """While calls wait, read the capacity again once older than ``refresh_s`` (the read admits
        what fits then): only arrivals and ends read it otherwise, and a node that joined while
        long calls ran stayed idle until one of them ended."""
        while self._queue.waiting():
            await asyncio.sleep(max(self._refresh_s, 0.01))
            if self._queue.waiting():
                self._refresh()

    async def _inputs_exist(self, token: str, refs: list[Any]) -> None:
        event = asyncio.Event()
        self._awaiting_inputs[token] = (refs, event)
        if self._inputs_watcher is None or self._inputs_watcher.done():
            self._inputs_watcher = asyncio.ensure_future(self._watch_inputs())
        await event.wait()

    async def _watch_inputs(self) -> None:
        loop = asyncio.get_running_loop()
        while self._awaiting_inputs:
            refs = list(dict.fromkeys(r for rs, _ in self._awaiting_inputs.values() for r in rs))
            try:
                ready = await loop.run_in_executor(None, self._ready_fn, refs)
            except Exception as exc:  # noqa: BLE001 - unknown: queue them, Ray still waits for the inputs
                logger.warning("raysched admission: cannot tell whether calls' inputs exist (%s)", exc)
                ready = set(refs)
            for token, (rs, event) in list(self._awaiting_inputs.items()):
                left = [r for r in rs if r not in ready]
                if left:
                    self._awaiting_inputs[token] = (left, event)
                else:
                    del self._awaiting_inputs[token]
                    event.set()
            if self._awaiting_inputs:
                await asyncio.sleep(self._inputs_poll_s)

    async def track(self, token: str, refs: Sequence[Any]) -> None:
        """Wait for the call's ObjectRef (passed in a list, so Ray does not resolve it), then free its room."""
        self._in_slots += 1  # it holds a slot while it waits, as an admit does
        try:
            await self._until_exists(token, refs[0])
        except BaseException:  # noqa: BLE001 - an error or a cancellation ends the call just the same
            pass
        finally:
            self._in_slots -= 1
        self.finish(token)

    async def _until_exists(self, token: str, ref: Any) -> None:
        """Return once the call's value (or error) exists, without fetching it here.

        ``await ref`` fetched and deserialised every queued call's value into this actor
        (a 400 MiB value took its peak from 80 MiB to 925 MiB, and on another node it would
        cross the network): a Ray that has ``ObjectRef._ready`` (2.60 has, 2.40 has not) waits
        for the object's existence alone; on another, the watcher that polls for inputs does.
        """
        exists = getattr(ref, "_ready", None)
        if exists is not None:
            await exists()
        elif hasattr(ref, "binary"):  # an ObjectRef of a Ray without _ready
            await self._inputs_exist(f"ended:{token}", [ref])
        else:
            await ref  # a plain awaitable (the tests' fakes)

    def ended(self, tokens: Sequence[str]) -> None:
        """Calls ended (a driver reports a burst in one message, ``EndReporter``): their room is
        free, and one admission pass admits what fits now."""
        released = []  # waiting calls cancelled before admission
        for token in tokens:
            self._owners.pop(token, None)
            awaiting = self._awaiting_inputs.pop(token, None)
            if awaiting is not None:
                awaiting[1].set()  # ended (cancelled) before its inputs existed: it never queues (_ended_early)
            if self._queue.is_waiting(token):
                released.append(token)
        self._refresh()  # a read that ends admits again, on the new capacity
        self._wake(self._queue.finish_many(tokens, self._clock()))
        for token in released:
            # Cancelled while it waited: its ``admit`` returns now (its task will not run) rather
            # than hold one of this detached actor's call slots, and its memory, for the
            # cluster's life (a helper's audit: 485 of 500 cancelled calls left waiting).
            event = self._events.pop(token, None)
            if event is not None:
                event.set()

    def _watch_owner(self, token: str, owner: str) -> None:
        self._owners[token] = owner
        if self._owners_watcher is None or self._owners_watcher.done():
            self._owners_watcher = asyncio.ensure_future(self._watch_owners())

    async def _watch_owners(self) -> None:
        """While calls reported by their drivers are on, end those whose driver died."""
        loop = asyncio.get_running_loop()
        while self._owners:
            await asyncio.sleep(self._refresh_s)
            jobs = set(self._owners.values())
            try:
                dead = await loop.run_in_executor(None, self._dead_jobs_fn, jobs)
            except Exception as exc:  # noqa: BLE001 - look again next time
                logger.warning("raysched admission: cannot tell whether drivers are alive (%s)", exc)
                continue
            gone = [t for t, job in self._owners.items() if job in dead]
            if gone:
                self.ended(gone)

    def finish(self, token: str) -> None:
        self.ended((token,))

    def status(self) -> dict[str, Any]:
        capacity = self._queue.capacity
        held = self._queue.held()
        return {"waiting": self._queue.waiting(), "admitted": self._queue.admitted(),
                "admitted_early": self._queue.admitted_early(),
                "awaiting_inputs": len(self._awaiting_inputs), "reported_by_drivers": len(self._owners),
                "admitted_total": self.admitted_total, "backfilled_total": self._queue.backfilled_total,
                "overflowed_total": self.overflowed_total,
                # The settings it runs by (the last driver's configure(...) that reached it).
                "backfill": self._queue.backfill, "gather_s": self._gather_s, "rooms_from": self._rooms_monitor,
                "pipeline_s": self._queue.pipeline_s,
                "capacity_cpus": capacity.num_cpus if capacity else None,
                # What admitted calls' labels may add up to (the nodes' labels), and what they
                # are expected to hold at most (the nodes' rooms; a node without one: its label).
                "capacity_memory_bytes": capacity.memory_bytes if capacity else None,
                "capacity_room_bytes": capacity.peak_bytes if capacity else None,
                "node_rooms": dict(self._rooms),
                "held_cpus": held.num_cpus, "held_memory_bytes": held.memory_bytes,
                "held_peak_bytes": held.peak_bytes}

    def reconfigure(self, backfill: bool, gather_s: float, monitor: str | None, pipeline_s: float = 0.0) -> None:
        """A driver's ``configure(admission_backfill=..., admission_gather_s=...,
        admission_node_room=..., admission_pipeline_s=...)``: the actor may predate it, and
        serves every driver."""
        self._queue.backfill = backfill
        self._queue.pipeline_s = pipeline_s
        self._gather_s = max(0.0, float(gather_s))
        if monitor != self._rooms_monitor:
            self._rooms_fn, self._rooms_monitor = (monitor_rooms(monitor) if monitor else None), monitor
            self._rooms = {}
            self._read_at = float("-inf")  # the next pass reads the nodes (and rooms) again

    def ping(self) -> bool:
        return True

#: Memory the admission actor holds per waiting call: Ray's, per pending call of an async actor
#: (measured: 1.35 GB with 20,000 calls waiting, 4.98 GB with 80,000; Ray 2.60).
WAITING_CALL_BYTES = 60_000
#: A driver with this many queued calls not ended is warned (``EndReporter``).
MANY_QUEUED_CALLS = 20_000


class EndReporter:
    """In a driver: tells the admission actor, in batches, which of its queued calls ended.

    ``watch`` registers a callback that Ray runs once the call's ObjectRef exists
    (``ObjectRef._on_ready``: value, error or cancellation; the value is not fetched)
    and keeps the ref until then (Ray drops the callback of a ref nobody holds: the
    call's room would be held for ever).  A thread sends what ended every
    ``batch_s`` at most, in one call of ``send`` (the actor's ``ended``): per queued
    call, one actor call (its ``admit``) instead of two, and no waiting coroutine in
    the actor (a call of a Ray async actor costs ~0.4 ms of its CPU).
    """

    def __init__(self, send: Callable[[list[str]], Any], batch_s: float = 0.002):
        self._send = send
        self._batch_s = batch_s
        self._lock = threading.Lock()
        self._watching: dict[str, Any] = {}  # token -> its ObjectRef, until it exists
        self._ended: list[str] = []
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False  # about many queued calls (``_warn_if_many``)

    def watch(self, token: str, ref: Any) -> None:
        with self._lock:
            self._watching[token] = ref
            self._warn_if_many(len(self._watching))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="raysched-admission-ends", daemon=True)
                self._thread.start()
        ref._on_ready(lambda _exc, token=token: self._ended_now(token))

    def watching(self) -> int:
        """How many watched calls have not ended yet."""
        return len(self._watching)

    def _warn_if_many(self, n: int) -> None:
        """Once the driver's queued calls reach ``MANY_QUEUED_CALLS`` (again once they fell below half)."""
        if n >= MANY_QUEUED_CALLS and not self._warned:
            self._warned = True
            warnings.warn(
                f"raysched: {n:,} calls with a priority from this driver are queued or running. The admission "
                f"actor holds about {WAITING_CALL_BYTES // 1000} KB of memory for each call waiting in its queue "
                f"(Ray's own, per pending call of an async actor; {n * WAITING_CALL_BYTES / 1e9:.1f} GB for {n:,}), "
                f"and past {ADMISSION_MAX_WAITING - ADMISSION_RESERVED_SLOTS:,} waiting calls later ones go "
                "straight to Ray's queue, outside the priority order: submit a backlog this large in waves "
                "(ray.wait on a window of refs), or without a priority.",
                RuntimeWarning, stacklevel=5)  # the user's .remote(): remote, _submit, watch, here

    def _ended_now(self, token: str) -> None:  # on a Ray thread: quick, no Ray calls
        with self._lock:
            if self._watching.pop(token, None) is not None:
                self._ended.append(token)
                if self._warned and len(self._watching) < MANY_QUEUED_CALLS // 2:
                    self._warned = False  # warned again at the next crossing
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self._batch_s)  # the ends of a burst go together
            with self._lock:
                self._wake.clear()
                tokens, self._ended = self._ended, []
            if tokens:
                try:
                    self._send(tokens)
                except Exception as exc:  # noqa: BLE001 - Ray is shutting down; the actor ends a dead driver's calls
                    logger.debug("raysched admission: could not report %d ended calls: %s", len(tokens), exc)


def get_or_create_admission(backfill: bool = True, gather_s: float = 0.01, monitor: str | None = None,
                            pipeline_s: float = 0.0) -> Any:
    """The cluster's admission actor: found by name, created on first use, restarted by Ray.

    Async, so that thousands of waiting calls cost coroutines, not threads. A
    restarted actor starts empty: Ray retries the pending ``admit`` and ``track``
    calls, so every waiting call queues again.  ``backfill``, ``gather_s``, ``pipeline_s`` and
    ``monitor`` (the name of the monitor actor whose node rooms cap the capacity;
    None: labels only) are the creating driver's (``RayschedConfig.admission_backfill``,
    ``admission_gather_s``, ``admission_pipeline_s``, ``admission_node_room``); a driver that configured raysched
    itself hands the actor its settings (``Admission.reconfigure``).
    """
    import ray

    from .session import NAMESPACE, ensure_ray

    ensure_ray()
    return (
        ray.remote(Admission)
        .options(name=ADMISSION_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                 max_restarts=-1, max_task_retries=-1, num_cpus=0, max_concurrency=ADMISSION_MAX_WAITING)
        .remote(backfill=backfill, gather_s=gather_s, rooms=monitor_rooms(monitor) if monitor else None,
                pipeline_s=pipeline_s)
    )


__all__ = ["Admission", "EndReporter", "get_or_create_admission", "monitor_rooms", "ray_node_capacities", "ADMISSION_NAME"]
