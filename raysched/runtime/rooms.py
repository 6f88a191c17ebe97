"""The driver's view of the nodes whose room is short of their labels, kept in a thread of its own.

Calls submitted without a priority go straight to Ray, which books them by their
``memory`` labels.  While the room a node has left for more calls (what its tasks may
hold together and keep it under its memory threshold, measured by the monitor, less
what raysched's attempts running there are expected to hold) is well below the labels
Ray could still place there (its free ``memory``), the calls that could hold a
noticeable share of it wait in the admission queue instead
(``policy.admission.RoomRouting``), which admits by the room.  Free labels, not the
node's whole label: tasks of plain Ray that fill a node take its room and its labels
both, and Ray places no more there (set against the whole label, a batch of plain tasks
made the node look short, and the raysched batch submitted as it ended was queued for
nothing).  The driver learns the rooms left from the monitor's ``node_rooms_left`` and
the free labels from Ray every ``room_check_interval_s``, in this module's thread: a
submission reads the last answer (an attribute), and never waits on the monitor.
Without an answer (the monitor not up yet, or unreachable) no call is routed: calls go
straight to Ray, as without this.

Limits: a node the monitor has never had a reading of (none of raysched's tasks ran
there, and the monitor does not run there) is judged by its label alone; calls submitted
in the first moments of a driver, before the first answer, go straight; the answer is up
to ``room_check_interval_s`` old; and the queue does not count calls already sent
straight to Ray.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping

from ..config import RayschedConfig
from ..policy.admission import RoomRouting
from ..types import ClusterShape

logger = logging.getLogger(__name__)

#: How long one question to the monitor may take before the answer is given up on.
_ASK_TIMEOUT_S = 5.0
#: Answers in a row that must find a node short before calls are routed (none: straight at
#: once).  A room is read a moment before or after the free labels: as a batch of plain tasks
#: ended, one answer set the room they still held against the labels they had freed, and the
#: raysched batch submitted then went through the queue for nothing.
SHORT_ANSWERS = 2


def cpu_node_labels(shape: ClusterShape) -> dict[str, float]:
    """The ``memory`` label of each node a task can run on (one with CPUs), by node id."""
    return {node.node_id: float(node.memory_bytes) for node in shape.nodes if node.num_cpus > 0}


class RoomWatch:
    """The smallest room left among the nodes short of their free labels (``shortest_room``, None if none).

    ``ask_rooms(node_ids) -> {node id: room left, bytes}`` asks the monitor; ``cluster()``
    gives the cluster's shape (its labels); ``free_labels() -> {node id: bytes}`` the
    ``memory`` Ray could still place on each node (a node left out: its whole label;
    None: the whole labels).  ``check()`` updates the view once; ``start()`` runs it every
    ``interval_s`` in a daemon thread until ``close()`` or until ``alive()`` says the
    session it was made for has ended.
    """

    def __init__(self, routing: RoomRouting, ask_rooms: Callable[[list[str]], Mapping[str, float]],
                 cluster: Callable[[], ClusterShape], interval_s: float,
                 alive: Callable[[], bool] = lambda: True,
                 free_labels: Callable[[], Mapping[str, float]] | None = None):
        self.routing = routing
        self.shortest_room: float | None = None
        self._ask_rooms, self._cluster, self._interval, self._alive = ask_rooms, cluster, interval_s, alive
        self._free_labels = free_labels
        self._short_answers = 0  # answers in a row that found a node short
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def routes(self, call_bytes: float) -> bool:
        """Whether a call without a priority that may hold ``call_bytes`` goes through the queue now."""
        return self.routing.routes(self.shortest_room, call_bytes)

    def check(self) -> float | None:
        """Ask for the rooms once and keep the answer, once ``SHORT_ANSWERS`` answers in a row
        found a node short; a question that fails forgets the last one (calls then go straight,
        as without the watch)."""
        try:
            labels = cpu_node_labels(self._cluster())
            rooms = self._ask_rooms(sorted(labels)) if labels else {}
            if self._free_labels is not None and labels:
                free = self._free_labels()
                labels = {node_id: min(label, float(free.get(node_id, label))) for node_id, label in labels.items()}
            shortest = self.routing.shortest_room(rooms, labels)
        except Exception as exc:  # noqa: BLE001 - no monitor (yet): calls go straight
            logger.debug("raysched: could not learn the nodes' rooms: %s", exc)
            shortest = None
        self._short_answers = self._short_answers + 1 if shortest is not None else 0
        self.shortest_room = shortest if self._short_answers >= SHORT_ANSWERS else None
        return self.shortest_room

    def start(self) -> "RoomWatch":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="raysched-room-watch", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._closed.is_set() and self._alive():
            self.check()
            self._closed.wait(self._interval)
        self.shortest_room = None

    def close(self) -> None:
        self._closed.set()
        self.shortest_room = None


def ray_room_watch(config: RayschedConfig, cluster: Callable[[], ClusterShape]) -> RoomWatch | None:
    """A started watch asking the monitor of ``config``'s home, or None where routing is off
    (``route_by_room_below`` None, no monitor, or the queue not admitting by room)."""
    if config.route_by_room_below is None or not config.monitor_enabled or not config.admission_node_room:
        return None
    import ray

    from .session import NAMESPACE, monitor_name, session_key

    name, session = monitor_name(config), session_key()
    found: dict[str, Any] = {}

    def ask_rooms(node_ids: list[str]) -> Mapping[str, float]:
        monitor = found.get("monitor")
        if monitor is None:
            monitor = found["monitor"] = ray.get_actor(name, namespace=NAMESPACE)
        try:
            return ray.get(monitor.node_rooms_left.remote(node_ids), timeout=_ASK_TIMEOUT_S)
        except Exception:
            found.pop("monitor", None)  # looked up again next time: it may have been started anew
            raise

    def alive() -> bool:
        return ray.is_initialized() and session_key() == session

    routing = RoomRouting(config.route_by_room_below, config.route_by_room_min_share)
    return RoomWatch(routing, ask_rooms, cluster, config.room_check_interval_s, alive,
                     free_labels=ray_free_memory_labels).start()


def ray_free_memory_labels() -> dict[str, float]:
    """The ``memory`` Ray could still place on each live node (bytes), by node id: a node
    whose memory is all booked has none listed (0)."""
    import ray._private.state

    return {node_id: float(free.get("memory", 0.0))
            for node_id, free in ray._private.state.available_resources_per_node().items()}


__all__ = ["RoomWatch", "ray_room_watch", "ray_free_memory_labels", "cpu_node_labels"]
