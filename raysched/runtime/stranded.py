"""In a driver: ends its calls that a lost node left with a label no alive node can hold.

A call sized to fit only the biggest node(s) carries that ``memory`` / ``num_cpus``
label in its Ray task spec, which cannot change once submitted.  When those nodes
die while it runs or waits, Ray retries it with the same spec (a system-failure
retry); no alive node can hold the label, so it waits in Ray's
queue for ever, and ``ray.get`` never returns: raysched's own retry path
(``worker.recover``) only runs once the retried task starts.  Ray offers no way to
change a submitted task's resources or to fill its return object with another
value, so the call cannot be completed elsewhere under the caller's ``ObjectRef``.
What is done instead, once a call is found stranded (``policy.stranding``) twice in a
row, a check apart:

- a profile row for the attempt that was lost (``cancelled``, with why, its last live
  use where its worker published one) and an event (rule ``node_lost``, action
  ``cancel``) in ``raysched.events()``, through the worker's row sink and the monitor's
  ``note``, the paths every other row and event take;
- a warning naming the function, the call, its label and the largest alive node;
- ``ray.cancel`` of the call's task: the caller's ``ray.get`` raises Ray's
  ``TaskCancelledError`` at once, instead of hanging.

Cost: a plan decides once whether its calls could be stranded at all
(``stranding.at_risk``: some node the call may run on would run it under plain Ray's
ask but not under raysched's label); on a cluster of equal nodes none is, and a
submission adds nothing.  A call at risk costs a dict entry and an ``ObjectRef._on_ready``
callback that drops it when it ends (~50 us).  While such calls are in flight, one
thread reads the cluster's nodes (``ray.nodes()``) every ``CHECK_INTERVAL_S``; with
none, it sleeps.  On a Ray without ``_on_ready`` (2.40) nothing is watched.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import ray

from ..policy.rules import CANCEL, NODE_LOST, Decision
from ..policy.stranding import Ask, largest_node, stranded
from ..types import ClusterShape, LabelTerm, Outcome

logger = logging.getLogger(__name__)

#: How often the watcher reads the cluster's nodes while calls at risk are in flight.
CHECK_INTERVAL_S = 1.0
#: Looks in a row that must find a call stranded before it is ended (a reading taken as a
#: node leaves or joins is not acted on alone).
STRANDED_LOOKS = 2
#: How long the watcher waits for the lost attempt's row to be stored before it cancels the
#: call: the caller may read the profiles as soon as its ``ray.get`` fails.
_ROW_WAIT_S = 5.0


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class StrandGroup:
    """The calls in flight of one plan whose label could be stranded, and what judging them needs."""

    __slots__ = ("watch", "function", "code_hash", "config", "label", "plain", "node_id", "demands", "selectors",
                 "calls", "looks")

    def __init__(self, watch: "StrandWatch", function: str, code_hash: str, config: Any, label: Ask, plain: Ask,
                 node_id: str | None, demands: tuple[tuple[str, float], ...],
                 selectors: tuple[tuple[LabelTerm, ...], ...]):
        self.watch = watch
        self.function, self.code_hash, self.config = function, code_hash, config
        self.label, self.plain = label, plain
        self.node_id, self.demands, self.selectors = node_id, demands, selectors
        self.calls: dict[str, tuple[Any, bytes]] = {}  # call id -> (its ObjectRef, its spec bytes), until it ends
        self.looks = 0  # looks in a row that found the label stranded

    def add(self, call_id: str, ref: Any, spec_bytes: bytes) -> None:
        """Watch one call (the submission path: a dict entry and a callback)."""
        self.watch.add(self, call_id, ref, spec_bytes)

    def nodes(self, shape: ClusterShape) -> tuple:
        return shape.eligible(self.node_id, self.demands, self.selectors).nodes


class StrandWatch:
    """The driver's watcher of its calls at risk (one per Ray session: ``ProfilerClient.strand_watch``)."""

    def __init__(self, read_shape: Callable[[], ClusterShape], on_shrink: Callable[[], None] | None = None,
                 interval_s: float = CHECK_INTERVAL_S, looks: int = STRANDED_LOOKS):
        self._read_shape = read_shape
        self._on_shrink = on_shrink
        self._interval = interval_s
        self._looks = looks
        self._lock = threading.Lock()
        self._groups: set[StrandGroup] = set()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._node_ids: frozenset[str] | None = None

    def group(self, **kwargs: Any) -> StrandGroup:
        return StrandGroup(self, **kwargs)

    def add(self, group: StrandGroup, call_id: str, ref: Any, spec_bytes: bytes) -> None:
        with self._lock:
            group.calls[call_id] = (ref, spec_bytes)
            self._groups.add(group)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="raysched-stranded", daemon=True)
                self._thread.start()
        self._wake.set()
        ref._on_ready(lambda _exc, group=group, call_id=call_id: self._ended(group, call_id))

    def _ended(self, group: StrandGroup, call_id: str) -> None:  # on a Ray thread: quick, no Ray calls
        with self._lock:
            group.calls.pop(call_id, None)

    def in_flight(self) -> int:
        with self._lock:
            return sum(len(g.calls) for g in self._groups)

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                for group in [g for g in self._groups if not g.calls]:
                    self._groups.discard(group)
                    group.looks = 0
                idle = not self._groups
                if idle:
                    self._wake.clear()
                    self._node_ids = None
            if idle:
                self._wake.wait()  # no call at risk in flight: no reads at all
                continue
            time.sleep(self._interval)
            if not ray.is_initialized():
                return  # Ray shut down: its calls end with it (and this thread must not outlive them)
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - Ray shutting down, a GCS away: look again later
                logger.debug("raysched: checking calls for lost nodes: %s", exc)
                if not ray.is_initialized():
                    return

    def check(self) -> list[str]:
        """One look: end the calls found stranded ``looks`` times in a row; their ids."""
        shape = self._read_shape()
        ids = frozenset(n.node_id for n in shape.nodes)
        if self._node_ids is not None and self._node_ids - ids and self._on_shrink is not None:
            self._on_shrink()  # a node left: new calls are sized to the nodes alive at once, not within 5 s
        self._node_ids = ids
        if not _enabled():
            return []  # turned off since these calls were planned (configure(cancel_stranded_calls=False))
        found: list[tuple[StrandGroup, str, Any, bytes, tuple]] = []
        with self._lock:
            groups = list(self._groups)
        for group in groups:
            nodes = group.nodes(shape)
            if not stranded(group.label, group.plain, nodes):
                group.looks = 0
                continue
            group.looks += 1
            if group.looks < self._looks:
                continue
            with self._lock:
                found.extend((group, call_id, ref, spec_bytes, nodes) for call_id, (ref, spec_bytes) in group.calls.items())
        return self._end_all(found)

    def _end_all(self, found: list[tuple["StrandGroup", str, Any, bytes, tuple]]) -> list[str]:
        """Record, report and cancel the stranded calls of one look, together: one event call and
        one flush per home, then every cancel (one call at a time, each with its own round trip
        and flush, ended a dozen calls 0.5 s apart: a thousand would have taken minutes)."""
        ended: list[tuple[StrandGroup, str, Any, str, int]] = []
        decisions: dict[Any, list[Decision]] = {}
        for group, call_id, ref, spec_bytes, nodes in found:
            try:
                lost = self._record(group, call_id, ref, spec_bytes, nodes)
            except Exception:  # noqa: BLE001 - one call's failure must not keep the others waiting
                logger.exception("raysched: could not end stranded call %s of %s", call_id, group.function)
                lost = None
            with self._lock:
                group.calls.pop(call_id, None)
            if lost is not None:
                decision, reason, attempt = lost
                decisions.setdefault(group.config, []).append(decision)
                ended.append((group, call_id, ref, reason, attempt))
        from .rows import get_sink

        for config, batch in decisions.items():
            _note(config, batch)
            # The rows are stored before the callers hear: they may read the profiles at once.
            get_sink(config).flush(wait_s=_ROW_WAIT_S)
        for group, call_id, ref, reason, attempt in ended:
            logger.warning("raysched: cancelled %s call %s (attempt %d): %s. Submit it again: new calls are "
                           "sized to the nodes alive.", group.function, call_id, attempt, reason)
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - its row and event say why; the others are still cancelled
                logger.exception("raysched: could not cancel stranded call %s of %s", call_id, group.function)
        return [call_id for _, call_id, _, _, _ in ended]

    def _record(self, group: StrandGroup, call_id: str, ref: Any, spec_bytes: bytes,
                nodes: tuple) -> tuple[Decision, str, int] | None:
        """The lost attempt's row, and its event and reason; None if the call had ended meanwhile."""
        from .spec import decode_spec
        from .worker import _handed_over, _last_live_usage, _last_run_here, _record_for

        done, _ = ray.wait([ref], timeout=0, fetch_local=False)
        if done:
            return None
        task_spec = decode_spec(spec_bytes, group.config)
        # The attempt that was lost: the task's own, a later one it ran in place after a
        # failure, or one it had handed over to (its owner, the task, died with the node).
        spec = _last_run_here(task_spec) or task_spec
        spec = _handed_over(spec) or spec
        usage = _last_live_usage(spec)
        biggest = largest_node(nodes, group.label.num_cpus)
        largest = (f"{_gib(biggest.memory_bytes)} and {biggest.num_cpus:g} CPUs (node {biggest.node_id[:8]})"
                   if biggest is not None else "none")
        label = f"memory {_gib(group.label.memory_bytes)}, num_cpus {group.label.num_cpus:g}"
        reason = (f"a node it could run on was lost, and no alive node can hold the label raysched submitted it "
                  f"with ({label}; the largest alive node it may run on has {largest}): Ray would keep its "
                  f"retry waiting for ever, so the driver cancelled it"
                  + ("" if usage is not None else " (no live sample: it ran under 0.5 s, or had not started)"))
        _record_for(spec, Outcome.CANCELLED, usage, reason)
        decision = Decision(NODE_LOST, CANCEL, group.function, call_id, spec.attempt,
                            measured=float(group.label.memory_bytes),
                            allocated=float(biggest.memory_bytes if biggest is not None else 0),
                            detail=reason[:2000], code_hash=group.code_hash, timestamp=time.time())
        return decision, reason, spec.attempt


def _enabled() -> bool:
    """The driver's config now, not the plan's: turned off mid-run for an autoscaling cluster,
    the calls already in flight are left waiting too (a review)."""
    from .session import get_config

    return bool(get_config().cancel_stranded_calls)


def _note(config: Any, decisions: list[Decision]) -> None:
    """The events, through the monitor as every driver decision goes; straight to the store without one."""
    from .session import NAMESPACE, monitor_name

    try:
        monitor = ray.get_actor(monitor_name(config), namespace=NAMESPACE)
        ray.get(monitor.note.remote(decisions), timeout=10)
        return
    except Exception as exc:  # noqa: BLE001 - no monitor (disabled, or lost with the node): write it here
        logger.debug("raysched: no monitor to note %d node_lost event(s) (%s); writing them to the store",
                     len(decisions), exc)
    from ..store.profiles import ProfileStore
    from .monitor import event_row

    try:
        ProfileStore(config.home_path).append_events([event_row(d) for d in decisions])
    except Exception as exc:  # noqa: BLE001 - the warnings still say it
        logger.warning("raysched: could not record %d node_lost event(s) of %s: %s", len(decisions),
                       decisions[0].function, exc)


__all__ = ["CHECK_INTERVAL_S", "STRANDED_LOOKS", "StrandGroup", "StrandWatch"]
