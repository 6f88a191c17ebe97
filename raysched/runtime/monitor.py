"""The live monitor: watches running attempts through their live samples and decides what to stop.

Workers send batches of ``LiveReport`` (one per running attempt per live
interval; tasks shorter than the interval never report).  ``Monitor`` keeps a
small state per attempt, evaluates the rules ``recipe.build_rules`` composes,
and keeps the decisions for workers to poll (``directives``); every decision
other than "none" becomes one event row in the profile store and a metric.  It
also reads the memory of the nodes that have running attempts from their
metrics endpoints and, under pressure, has the lowest-priority attempt there
give way.  From its workers' readings it works out each node's *room* (the
memory its tasks may hold together and keep it under the node rule's threshold),
which the admission queue admits against (``node_rooms``); workers say when an
attempt ends (``ended``), so that its memory leaves the room at once.

``Monitor`` is a plain class that tests drive with a fake clock and a
temporary store; ``get_or_create_monitor`` is the one place that makes it a
named, detached, restartable Ray actor (as ``profiler.get_or_create_profiler``).
Rules only decide; the worker applies a stop (see ``Decision.stops``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import statistics
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    import pandas as pd

from ..config import RayschedConfig
from ..policy.rules import (
    ACTOR_RESCALED,
    METRICS_READING,
    WORKER_READING,
    REQUEUE_LOWEST_PRIORITY,
    STOP_AND_RESUBMIT,
    AttemptState,
    Decision,
    LiveReport,
    NodeMemory,
    NodeState,
    resident_at,
    room_left_bytes,
    with_stop,
)
from .session import MONITOR_BASE, NAMESPACE, monitor_name

logger = logging.getLogger(__name__)

#: Base name; the actor of a home is ``session.monitor_name(config)``.
MONITOR_NAME = MONITOR_BASE
#: Pending event rows kept while the store cannot be written; beyond it the oldest are dropped.
MAX_PENDING_EVENTS = 10_000


def report_from(spec: Any, sample: Any, node_id: str = "", kind: str = "task",
                ladder_room_bytes: float | None = None) -> LiveReport:
    """A LiveReport from a worker's ``AttemptSpec`` and a ``measure.LiveSample`` (``kind``: task or actor;
    ``ladder_room_bytes``: the most its next attempt may get, ``worker.ladder_room``)."""
    prediction = spec.prediction
    # An actor's incarnations are judged apart: the one being replaced runs on (and stays
    # under its hard cap) while its successor already reports.
    call_id = spec.live_key if kind == "actor" else spec.call_id
    return LiveReport(
        function=spec.function, code_hash=spec.code_hash, call_id=call_id, attempt=spec.attempt,
        node_id=node_id, priority=spec.priority, allocation=spec.allocation,
        predicted_memory_upper_bytes=float(prediction.memory.upper),
        predicted_wall_upper_s=float(prediction.wall.upper), prediction_source=prediction.source,
        rss_bytes=int(sample.rss_bytes), peak_rss_bytes=int(sample.peak_rss_bytes),
        cpu_seconds=float(sample.cpu_seconds), wall_seconds=float(sample.wall_seconds),
        read_bytes=int(sample.read_bytes), write_bytes=int(sample.write_bytes), timestamp=float(sample.timestamp),
        node_kill_threshold=ray_kill_threshold(), kind=kind, rescalable=bool(getattr(spec, "rescalable", False)),
        start_rss_bytes=int(sample.start_rss_bytes),
        max_attempts=int(spec.config.max_attempts) if getattr(spec, "config", None) is not None else None,
        wall_source=str(prediction.wall.source),
        largest_node_bytes=getattr(spec, "largest_node_bytes", None),
        ladder_room_bytes=ladder_room_bytes,
        **node_memory_here(),
    )


def node_memory_here() -> dict[str, float]:
    """This node's used and total memory now: used = total - available, as Ray's memory monitor counts.

    Read in the worker with every live sample, so the node rule can judge a node
    every second instead of waiting for its metrics endpoint (refreshed every ~5 s).
    Empty when it cannot be read.
    """
    try:
        import psutil

        vm = psutil.virtual_memory()
        return {"node_used_bytes": float(vm.total - vm.available), "node_total_bytes": float(vm.total)}
    except Exception:  # noqa: BLE001 - the metrics endpoint still tells the monitor
        return {}


#: The process title Ray gives a worker process that runs nothing.
IDLE_WORKER_TITLE = "ray::IDLE"


def idle_worker_bytes(processes: Iterable[Any] | None = None) -> float:
    """The private memory (USS) of this node's idle Ray worker processes, summed (0 if unreadable).

    ``processes``: psutil processes with ``info["cmdline"]`` (default: all of this node's).
    A process that ends or cannot be read meanwhile is left out.
    """
    try:
        import psutil

        found = processes if processes is not None else psutil.process_iter(["cmdline"])
        total = 0.0
        for process in found:
            cmdline = process.info.get("cmdline") or []
            if cmdline and str(cmdline[0]).startswith(IDLE_WORKER_TITLE):
                try:
                    total += float(process.memory_full_info().uss)
                except Exception:  # noqa: BLE001 - gone, or not ours to read
                    continue
        return total
    except Exception:  # noqa: BLE001 - no psutil: count them as any other program
        return 0.0


def own_node_memory() -> NodeMemory | None:
    """The memory of the node this process runs on, read as its workers read it, with its idle
    Ray workers' memory (None: unreadable).  A probe of a quiet node runs it there (``RayNodeProbe``)."""
    import ray

    here = node_memory_here()
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    if not here or not node_id:
        return None
    return NodeMemory(node_id, here["node_used_bytes"], here["node_total_bytes"], time.time(),
                      ray_kill_threshold(), source=WORKER_READING, idle_workers_bytes=idle_worker_bytes())


def ray_kill_threshold(environ: Mapping[str, str] | None = None) -> float | None:
    """Ray's memory-monitor threshold on this node, as this worker inherited it from its raylet.

    A worker process inherits the raylet's environment, so ``RAY_memory_usage_threshold``
    set when the node was started is visible here; None when unset (Ray's default,
    0.95, is above raysched's own threshold) or not a fraction in (0, 1].
    """
    raw = (os.environ if environ is None else environ).get("RAY_memory_usage_threshold")
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and 0 < value <= 1 else None


# --- metrics: ray.util.metrics when in a Ray process, nothing otherwise --------------------------------


class Metrics:
    """The monitor's Prometheus metrics, created on first use; no-ops outside a Ray process.

    Exported by Ray with its ``ray_`` prefix: ``ray_raysched_memory_predicted_upper_bytes``
    and ``ray_raysched_memory_used_bytes`` (gauges per function: the resident memory of
    its running attempt that holds the most, 0 once none runs, and that attempt's
    prediction), ``ray_raysched_monitor_decisions_total`` (per rule
    and action), ``ray_raysched_stopped_attempts_total`` and
    ``ray_raysched_resubmissions_total`` (per function), ``ray_raysched_actor_rescales_total``
    (per function: actors replaced, counted from the driver's note), ``ray_raysched_node_memory_fraction``
    (per node).
    """

    def __init__(self) -> None:
        self._made: dict[str, Any] | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self._metrics())

    def _metrics(self) -> dict[str, Any]:
        if self._made is not None:
            return self._made
        with self._lock:
            if self._made is not None:
                return self._made
            made: dict[str, Any] = {}
            try:
                import ray

                if ray.is_initialized():
                    from ray.util.metrics import Counter, Gauge

                    made = {
                        "predicted": Gauge("raysched_memory_predicted_upper_bytes",
                                           "Predicted memory upper bound of the newest sampled attempt",
                                           tag_keys=("function",)),
                        "used": Gauge("raysched_memory_used_bytes",
                                      "Resident memory of the newest sampled attempt", tag_keys=("function",)),
                        "decisions": Counter("raysched_monitor_decisions_total",
                                             "Decisions of the live monitor other than none",
                                             tag_keys=("rule", "action")),
                        "stopped": Counter("raysched_stopped_attempts_total",
                                           "Attempts the live monitor stopped", tag_keys=("function", "action")),
                        "resubmitted": Counter("raysched_resubmissions_total",
                                               "Attempts stopped to be resubmitted (next rung or requeued)",
                                               tag_keys=("function",)),
                        "rescaled": Counter("raysched_actor_rescales_total",
                                            "Actors replaced by one of another size", tag_keys=("function",)),
                        "node": Gauge("raysched_node_memory_fraction", "Used share of a node's memory",
                                      tag_keys=("node_id",)),
                    }
            except Exception:  # noqa: BLE001 - metrics are never worth failing the monitor for
                logger.exception("raysched: could not create the monitor's metrics")
                made = {}
            self._made = made
            return made

    def observe(self, function: str, largest: LiveReport | None) -> None:
        """The function's gauges: its running attempt holding the most (None: none runs)."""
        m = self._metrics()
        if m:
            tags = {"function": function}
            m["used"].set(largest.rss_bytes if largest is not None else 0, tags=tags)
            if largest is not None:
                m["predicted"].set(largest.predicted_memory_upper_bytes, tags=tags)

    def decided(self, decision: Decision) -> None:
        m = self._metrics()
        if not m:
            return
        m["decisions"].inc(1, tags={"rule": decision.rule, "action": decision.action})
        if decision.stops and decision.rule != ACTOR_RESCALED:  # the note follows the stop already counted
            m["stopped"].inc(1, tags={"function": decision.function, "action": decision.action})
        if decision.action in (STOP_AND_RESUBMIT, REQUEUE_LOWEST_PRIORITY):
            m["resubmitted"].inc(1, tags={"function": decision.function})
        if decision.rule == ACTOR_RESCALED:
            m["rescaled"].inc(1, tags={"function": decision.function})

    def node(self, reading: NodeMemory) -> None:
        m = self._metrics()
        if m:
            m["node"].set(reading.fraction, tags={"node_id": reading.node_id})


# --- node memory: Ray's per-node Prometheus endpoint ----------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str, names: Iterable[str] | None = None) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample line of Prometheus text exposition.

    Comments, blank and unparsable lines are skipped; ``names`` keeps only those
    metrics.  Enough for Ray's gauges, not a full implementation of the format.
    """
    wanted = set(names) if names is not None else None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, raw_labels, raw_value = match.groups()
        if wanted is not None and name not in wanted:
            continue
        try:
            value = float(raw_value)
        except ValueError:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                  for k, v in _LABEL.findall(raw_labels or "")}
        out.append((name, labels, value))
    return out


def node_memory_from_metrics(text: str, node_id: str, ip: str | None = None,
                             timestamp: float = 0.0) -> NodeMemory | None:
    """A node's memory from its metrics text: ``ray_node_mem_used`` / ``ray_node_mem_total``.

    With ``ip``, only series of that node's address count (an endpoint may serve
    several); None when either gauge is missing.
    """
    found: dict[str, float] = {}
    for name, labels, value in parse_prometheus(text, ("ray_node_mem_used", "ray_node_mem_total")):
        if ip is not None and labels.get("ip", ip) != ip:
            continue
        found[name] = value
    if "ray_node_mem_used" not in found or not found.get("ray_node_mem_total"):
        return None
    return NodeMemory(node_id, found["ray_node_mem_used"], found["ray_node_mem_total"], timestamp,
                      source=METRICS_READING)


def fetch_metrics_text(address: str, timeout_s: float = 1.0) -> str:
    """The Prometheus text a node's metrics agent serves at ``http://<address>/metrics``."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as response:  # noqa: S310
        return response.read().decode("utf-8", errors="replace")


class RayNodeReader:
    """Reads a node's memory: its metrics address from ``ray.nodes()``, then the endpoint."""

    def __init__(self, timeout_s: float = 1.0):
        self._timeout = timeout_s
        self._addresses: dict[str, tuple[str, int]] = {}

    def _address(self, node_id: str) -> tuple[str, int] | None:
        if node_id not in self._addresses:
            import ray

            for node in ray.nodes():  # refreshed when an unknown node shows up
                if node.get("Alive") and node.get("MetricsExportPort"):
                    self._addresses[node["NodeID"]] = (node["NodeManagerAddress"], int(node["MetricsExportPort"]))
        return self._addresses.get(node_id)

    def __call__(self, node_id: str) -> NodeMemory | None:
        try:
            address = self._address(node_id)
            if address is None:
                return None
            ip, port = address
            text = fetch_metrics_text(f"{ip}:{port}", self._timeout)
            return node_memory_from_metrics(text, node_id, ip=ip, timestamp=time.time())
        except Exception as exc:  # noqa: BLE001 - a node we cannot read is a node we do not judge
            logger.debug("raysched: could not read the memory of node %s: %s", node_id, exc)
            self._addresses.pop(node_id, None)
            return None


class RayNodeProbe:
    """Reads a node where none of raysched's tasks runs now: a task of no CPUs pinned to it.

    A node's room comes from its workers' readings (``Monitor.node_rooms``); a node
    where nothing of raysched's runs sends none, and the room it last had can be far
    from the room it has now: in the monitor benchmark, a node quiet through two batches of
    plain Ray tasks had ~700 MiB less room when the next raysched batch came than the
    room kept for it, the queue admitted two tasks into that room, and Ray's killer took
    both.  Its metrics endpoint serves another measure (a cgroup's use, ``RayNodeReader``).
    So the node is read as its workers would read it, by a tiny task that runs there
    (``own_node_memory``: no CPUs, so that it starts on a busy node too).

    A call starts a probe of the node if none is on and the last one started
    ``interval_s`` ago or more, waits at most ``wait_s`` for a probe it started (one on a
    node whose worker is up answers in a few ms; the first on a node starts a worker, and
    is picked up by a later call), and returns the newest reading of a probe that ended
    since the last call (None if none has): the caller notes each reading once.  A reading
    picked up a call later is as old as the calls are apart, and a room from readings a
    few seconds old still counted a batch of plain tasks that had ended (the benchmark's
    straight batches were sent through the queue, short of a room they had).  A probe
    that fails (the node died) is forgotten, and so is one still not done after
    ``give_up_s`` (it may never start: a node that cannot start a worker process), so that
    the node is probed again.
    """

    def __init__(self, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 launch: Callable[[str], Any] | None = None,
                 ready: Callable[[Any, float], NodeMemory | None | bool] | None = None, give_up_s: float = 30.0,
                 wait_s: float = 0.1):
        self._interval_s = interval_s
        self._give_up_s = give_up_s
        self._wait_s = wait_s
        self._clock = clock
        self._launch, self._ready = launch, ready  # (None: Ray's; a bound method would not pickle)
        self._pending: dict[str, Any] = {}  # node id -> the probe on there
        self._started: dict[str, float] = {}  # node id -> clock of its last probe's start
        self._remote: Any = None

    def _ray_launch(self, node_id: str) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self._remote is None:
            self._remote = ray.remote(num_cpus=0, max_retries=0)(own_node_memory)
        return self._remote.options(
            name="raysched_node_probe",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()

    @staticmethod
    def _ray_ready(ref: Any, timeout_s: float) -> NodeMemory | None | bool:
        """The probe's reading once it ended (None if it failed), False while it runs after ``timeout_s``."""
        import ray

        ready, _ = ray.wait([ref], timeout=timeout_s)
        if not ready:
            return False
        try:
            return ready[0].future().result(timeout=10.0)
        except Exception as exc:  # noqa: BLE001 - a node gone, or unreadable: no reading
            logger.debug("raysched: a node probe failed: %s", exc)
            return None

    def _collect(self, node_id: str, now: float, timeout_s: float) -> NodeMemory | None | bool:
        """The pending probe's reading (None: it failed or was given up), False while it runs."""
        result = (self._ready or self._ray_ready)(self._pending[node_id], timeout_s)
        if result is False and now - self._started[node_id] < self._give_up_s:
            return False
        del self._pending[node_id]
        return result if isinstance(result, NodeMemory) and result.node_id == node_id else None

    def __call__(self, node_id: str) -> NodeMemory | None:
        reading = None
        now = self._clock()
        if node_id in self._pending:
            result = self._collect(node_id, now, 0.0)
            if result is False:
                return None
            reading = result
        if now - self._started.get(node_id, float("-inf")) >= self._interval_s:
            try:
                self._pending[node_id] = (self._launch or self._ray_launch)(node_id)
                self._started[node_id] = now
            except Exception as exc:  # noqa: BLE001 - Ray shutting down: the room last known
                logger.debug("raysched: could not start a probe of node %s: %s", node_id, exc)
                return reading
            if self._wait_s > 0:
                fresh = self._collect(node_id, now, self._wait_s)
                if isinstance(fresh, NodeMemory):
                    reading = fresh
        return reading


# --- the monitor ------------------------------------------------------------------------------------------


#: Room promised to a call that gave way (``Monitor.may_resume``) is held for it this many
#: live intervals at most: its next attempt reports within about two.
_PROMISE_INTERVALS = 4

#: Samples of an attempt's resident size kept for working out a node's room (a few live
#: intervals: the room's window is set against readings of the last few seconds).
_ROOM_SAMPLES = 16


@dataclass
class _Attempt:
    state: AttemptState
    last: LiveReport
    seen: float  # the monitor's clock when it last heard of the attempt
    # (timestamp, rss_bytes) of its newest samples, oldest first (see node_rooms)
    samples: deque = field(default_factory=lambda: deque(maxlen=_ROOM_SAMPLES))
    ended_at: float | None = None  # when its worker said it ended (the worker's time.time())


def event_row(decision: Decision) -> dict[str, Any]:
    """One EVENT_SCHEMA row; its id is fixed by what it decides, so a re-decision after a restart dedupes."""
    key = f"{decision.call_id}:{decision.attempt}:{decision.rule}:{decision.action}"
    return {
        "row_id": hashlib.sha1(key.encode()).hexdigest()[:32],
        "function": decision.function,
        "code_hash": decision.code_hash or None,
        "call_id": decision.call_id,
        "attempt": decision.attempt,
        "rule": decision.rule,
        "action": decision.action,
        "measured": float(decision.measured),
        "allocated": float(decision.allocated),
        "detail": decision.detail,
        "node_id": decision.node_id or None,
        "timestamp": float(decision.timestamp),
    }


class SavedMonitorConfig:
    """The config a monitor actor was last handed (``Monitor.reconfigure``), kept in Ray's KV
    for its restarts.

    Ray restarts an actor with its creation arguments: the config of whoever created the
    monitor (an earlier driver, or a worker's reporter that found none), not the one a
    driver handed it since; restarted, it judged by the creator's caps and thresholds (a
    cap the driver set stopped nothing).  ``load`` gives the saved config to a restarted
    actor only: a monitor created anew judges by its creator's, until a driver hands it its own.
    """

    def __init__(self, name: str):
        self.key = f"monitor_config:{name}"

    def load(self) -> RayschedConfig | None:
        from ray import cloudpickle

        from .actor_worker import _was_restarted  # without Ray's deprecation warning
        from .worker import _kv_get

        if not _was_restarted():
            return None
        raw = _kv_get(self.key)  # None: no KV, or nothing handed over yet
        try:
            return cloudpickle.loads(raw) if raw else None
        except Exception:  # noqa: BLE001 - judged by the creator's config, as before
            logger.warning("raysched: the restarted monitor could not read the config it was last handed; "
                           "it judges by its creator's", exc_info=True)
            return None

    def save(self, config: RayschedConfig) -> None:
        from ray import cloudpickle

        from .worker import _kv_put

        if not _kv_put(self.key, cloudpickle.dumps(config)):  # a restart then judges by the creator's config
            logger.warning("raysched: could not keep the monitor's config for its restarts")


class Monitor:
    """Evaluates the monitor's rules over batches of live reports; keeps directives for workers.

    ``clock`` (monotonic seconds) drives forgetting silent attempts and the
    pace of node reads; decisions carry their sample's own timestamp.
    ``node_reader(node_id) -> NodeMemory | None`` reads a node's memory (None:
    nodes are not watched); ``metrics`` defaults to ``Metrics()``; ``saved_config``
    (``SavedMonitorConfig``) keeps what ``reconfigure`` hands it for a restart of the actor.
    ``own_node() -> NodeMemory | None`` reads the memory of the node the monitor runs on,
    as a worker does (see ``node_rooms``); ``node_probe(node_id) -> NodeMemory | None``
    (``RayNodeProbe``) reads another node so, where no worker of raysched's does.
    """

    def __init__(
        self,
        config: RayschedConfig,
        store: Any = None,
        clock: Callable[[], float] = time.monotonic,
        node_reader: Callable[[str], NodeMemory | None] | None = None,
        metrics: Any = None,
        saved_config: Any = None,
        own_node: Callable[[], NodeMemory | None] | None = None,
        node_probe: Callable[[str], NodeMemory | None] | None = None,
    ):
        from ..store.profiles import ProfileStore

        self._saved_config = saved_config
        restored = saved_config.load() if saved_config is not None else None
        config = restored if restored is not None else config
        self.config = config
        # Imported here: a worker's handle on this actor imports this module (Ray does), and
        # the recipe brings the estimators and numpy; the rules alone are light.
        from ..policy.recipe import build_rules

        self.rules = build_rules(config)
        self.store = store if store is not None else ProfileStore(config.home_path)
        self._clock = clock
        self._node_reader = node_reader
        self.metrics = metrics if metrics is not None else Metrics()
        self._lock = threading.RLock()
        self._poll_lock = threading.Lock()
        self._attempts: dict[tuple[str, int], _Attempt] = {}
        self._newest: dict[str, int] = {}  # call_id -> newest attempt reported
        self._nodes: dict[str, NodeState] = {}
        self._kill_thresholds: dict[str, float] = {}  # node id -> Ray's kill threshold, as its workers report it
        self._node_judged: dict[str, float] = {}  # node id -> clock of its last judgement from workers' readings
        # node id -> (clock, reading) of its recent readings, newest last (see node_rooms)
        self._room_readings: dict[str, list[tuple[float, NodeMemory]]] = {}
        self._last_rooms: dict[str, float] = {}  # node id -> the room node_rooms last worked out
        # (call id, attempt that gave way) -> (node id, expected peak, clock): room promised to
        # its next attempt (see may_resume); and since when its room has fit, answer after answer
        self._promised: dict[tuple[str, int], tuple[str, float, float]] = {}
        self._fits_since: dict[tuple[str, int], float] = {}
        self._pending: list[dict[str, Any]] = []
        # (call id, attempt) -> (its end, the worker's time.time(); the monitor's clock then): ends
        # of attempts not heard of yet, whose last samples may still be on their way (see ended)
        self._early_ends: dict[tuple[str, int], tuple[float, float]] = {}
        self._last_sweep = self._last_poll = clock()
        self._own_node = own_node
        self._own_read_at = float("-inf")
        self._own_node_id: str | None = None
        self._node_probe = node_probe
        self._probe_lock = threading.Lock()
        self._probe_readings: dict[str, NodeMemory] = {}  # node id -> the last reading a probe brought
        self.reports_received = 0
        self.decisions_made = 0

    # --- workers send live reports ------------------------------------------------------------------
    def report(self, samples: Sequence[LiveReport]) -> dict[str, Decision]:
        """Evaluate a batch of live reports; returns the stops for the attempts in it, by call id.

        An empty answer means: keep running.  The stops include ones decided
        earlier for these attempts (a node's pressure), so a worker reporting
        every interval learns of its stop in the reply, without polling.
        """
        now = self._clock()
        decided: list[Decision] = []
        fresh: dict[str, NodeMemory] = {}  # node id -> the newest reading its workers sent in this batch
        with self._lock:
            for report in samples:
                self.reports_received += 1
                if report.node_kill_threshold is not None and report.node_id:
                    self._kill_thresholds[report.node_id] = report.node_kill_threshold
                decided += self._evaluate(report, now)
                reading = report.node_memory() if report.node_id else None
                if reading is not None and (report.node_id not in fresh
                                            or reading.timestamp > fresh[report.node_id].timestamp):
                    fresh[report.node_id] = reading
            self._sweep(now)
            self._publish_used(r.function for r in samples)
            due = [r for node_id, r in sorted(fresh.items())
                   if now - self._node_judged.get(node_id, float("-inf")) >= self.config.node_sample_interval_s]
            for reading in due:
                self._node_judged[reading.node_id] = now
        # The workers' own readings: a node judged every node_sample_interval_s, not every ~5 s.
        for reading in due:
            decision = self._check_node(reading)
            if decision is not None:
                decided.append(decision)
        if self._node_reader is not None and now - self._last_poll >= self.config.node_poll_interval_s:
            decided += self.poll_nodes()
        self._record(decided)
        with self._lock:
            out = {}
            for report in samples:
                attempt = self._attempts.get(report.key)
                if attempt is not None and attempt.state.stop is not None:
                    out[report.call_id] = attempt.state.stop
            return out

    def _evaluate(self, report: LiveReport, now: float) -> list[Decision]:
        newest = self._newest.get(report.call_id)
        if newest is not None and report.attempt < newest:
            return []  # a late sample of an attempt already superseded
        if newest is not None and report.attempt > newest:
            self._attempts.pop((report.call_id, newest), None)  # that attempt has ended
        self._newest[report.call_id] = report.attempt
        entry = self._attempts.get(report.key)
        early_end = self._early_ends.pop(report.key, None) if entry is None else None
        # A sample that arrives after its attempt's end (it waited in its worker's buffer):
        # its memory still counts up to the end (node rooms), but no rule judges an attempt
        # that is over (a stop of one that returned, an event for nothing).
        over = early_end is not None or (entry is not None and entry.ended_at is not None)
        state = entry.state if entry is not None else AttemptState()
        new_state, decisions = (state, ()) if over else self.rules.evaluate(state, report)
        if entry is None:
            entry = self._attempts[report.key] = _Attempt(new_state, report, now)
            if early_end is not None:
                entry.ended_at = early_end[0]
        else:
            entry.state, entry.seen = new_state, now
            if report.timestamp >= entry.last.timestamp:
                entry.last = report
        if not entry.samples or report.timestamp > entry.samples[-1][0]:
            entry.samples.append((report.timestamp, report.rss_bytes))
        return list(decisions)

    def _publish_used(self, functions: Iterable[str]) -> None:
        """Set each function's gauges from its running attempts: the largest resident memory
        among them (0 once none runs), and that attempt's predicted upper bound.  Under the lock.

        The newest sample alone left a stopped attempt's last figure (or none: the sample
        that stopped it was skipped) on the gauge for good, and concurrent attempts
        overwrote each other (a helper's audit).
        """
        for function in set(functions):
            running = [a.last for a in self._attempts.values()
                       if a.last.function == function and a.ended_at is None]
            self.metrics.observe(function, max(running, key=lambda r: r.rss_bytes) if running else None)

    def _sweep(self, now: float) -> None:
        """Forget attempts silent for ``monitor_stale_s`` (ended, or their worker died)."""
        stale_s = self.config.monitor_stale_s
        if now - self._last_sweep < stale_s / 4:
            return
        self._last_sweep = now
        forgotten = set()
        for key in [k for k, a in self._attempts.items() if now - a.seen > stale_s]:
            forgotten.add(self._attempts.pop(key).last.function)
            if self._newest.get(key[0]) == key[1]:
                del self._newest[key[0]]
        # A worker that died says no end: its attempt leaves its function's gauge here, or never.
        self._publish_used(forgotten)
        self._early_ends = {k: e for k, e in self._early_ends.items() if now - e[1] <= stale_s}
        running_nodes = {a.last.node_id for a in self._attempts.values()}
        for node_id in [n for n in self._nodes if n not in running_nodes]:
            del self._nodes[node_id]

    # --- nodes ---------------------------------------------------------------------------------------------
    def check_node(self, reading: NodeMemory) -> Decision | None:
        """Judge one memory reading of a node; the requeue it decides, if any, is recorded."""
        decision = self._check_node(reading)
        if decision is not None:
            self._record([decision])
        return decision

    def _check_node(self, reading: NodeMemory) -> Decision | None:
        self.metrics.node(reading)
        with self._lock:
            if reading.kill_threshold is None and reading.node_id in self._kill_thresholds:
                reading = replace(reading, kill_threshold=self._kill_thresholds[reading.node_id])
            self._note_room(reading)
            # Those that may give way: heard of within four live intervals. A worker that died
            # without a word (Ray's killer, a crash) freed its memory: chosen, its attempt
            # relieved nothing, and the count started again before a live one was.
            running = self._running_on(reading.node_id, heard_within_s=4 * self.config.live_interval_s)
            state, decision = self.rules.evaluate_node(self._nodes.get(reading.node_id, NodeState()), reading,
                                                       running, self._stopping_on(reading))
            self._nodes[reading.node_id] = state
            if decision is not None:
                key = (decision.call_id, decision.attempt)
                entry = self._attempts[key]
                entry.state = with_stop(entry.state, decision)
            return decision

    def _running_on(self, node_id: str, heard_within_s: float = math.inf) -> list[LiveReport]:
        """The last reports of the attempts still running on a node: not stopped, not ended,
        and heard of within ``heard_within_s`` (under the lock)."""
        heard = self._clock() - heard_within_s
        return [a.last for a in self._attempts.values()
                if a.state.stop is None and a.ended_at is None and a.last.node_id == node_id and a.seen >= heard]

    def _stopping_on(self, reading: NodeMemory) -> list[LiveReport]:
        """The last reports of the attempts stopped on the reading's node that have not ended
        (under the lock), up to the time their workers are killed if they do not stop: after
        that, a killed worker's memory is free, though no end may ever be reported for it."""
        grace = (self.config.monitor_hard_stop_intervals + 2) * self.config.live_interval_s
        return [a.last for a in self._attempts.values()
                if a.state.stop is not None and a.ended_at is None and a.last.node_id == reading.node_id
                and reading.timestamp - a.state.stop.timestamp <= grace]

    def _note_room(self, reading: NodeMemory) -> None:
        """Keep a worker's reading for the node's room (under the lock; see ``node_rooms``).

        Only workers' readings: they are the measure Ray's memory monitor kills by
        (total - available).  A node's metrics endpoint serves another, and an older
        one: where Ray reads memory from a cgroup it reports that cgroup's use (here
        55 MiB where total - available was 512 MiB), and a room from it let a batch
        start with more than the node had (two Ray OOM kills in the monitor benchmark).
        """
        if self.rules.node_rule is None or reading.source != WORKER_READING:
            return
        now = self._clock()
        window = self.config.node_room_window_s
        readings = self._room_readings.setdefault(reading.node_id, [])
        readings[:] = [(t, r) for t, r in readings if now - t < window] + [(now, reading)]

    def _held_at(self, reading: NodeMemory) -> float:
        """What raysched's attempts on the reading's node held at its time (under the lock)."""
        near = 1.5 * self.config.live_interval_s
        return sum(resident_at(list(a.samples), reading.timestamp, near, a.ended_at)
                   for a in self._attempts.values() if a.last.node_id == reading.node_id)

    def node_rooms(self, node_ids: Sequence[str]) -> dict[str, float]:
        """Each node's room (bytes) for the admission queue (``NodePressure.room_bytes``).

        The median over its workers' readings of the last ``node_room_window_s``,
        each set against what the node's attempts held at its time, from their
        samples on either side of it (``resident_at``): the samples of different
        workers are up to a live interval apart, and a task growing ~1 GB/s moves by
        500 MiB in one.  The median, so that one reading's error moves it little.
        A node no worker has read for ``node_sample_interval_s`` (nothing of raysched's
        runs there now) is read by a probe (``node_probe``, a task of no CPUs pinned to
        it: ``_probe_quiet_nodes``), whose reading alone gives its room (not the median
        of the window: what the node's readings of a few seconds before saw may have
        ended since, and nothing is set against it).  Until one
        comes, the node has the room its last window of readings told (set against its
        attempts' samples, kept for ``monitor_stale_s``: the room worked out before they
        are forgotten is kept until the node is read again); a node never read is left
        out (the queue counts it by its label).  Left out after a minute instead, a node
        quiet between two batches was counted by its label again (in the monitor
        benchmark, its 3.25 GiB against 2.2 GB of room, and the first batch after a quiet
        spell had 6 Ray OOM kills); kept without a probe, its room missed what other
        work had taken there since (~700 MiB in the benchmark: two Ray OOM kills in the
        first batch after a quiet spell).  The node the monitor runs
        on it reads itself as well, at most every ``node_sample_interval_s``: before a batch
        starts, when none of its tasks runs yet to read it, its room is known (a driver
        deciding which calls to queue asks then, ``policy.admission.RoomRouting``).
        """
        rule = self.rules.node_rule
        if rule is None:
            return {}
        self._read_own_node()
        self._probe_quiet_nodes(node_ids)
        now = self._clock()
        window = self.config.node_room_window_s
        with self._lock:
            rooms = {}
            for node_id in node_ids:
                readings = self._room_readings.get(node_id, [])
                if not readings or now - readings[-1][0] >= self.config.monitor_stale_s:
                    if node_id in self._last_rooms:
                        rooms[node_id] = self._last_rooms[node_id]
                    continue
                if readings[-1][1] is self._probe_readings.get(node_id):
                    # A quiet node, read by a probe: the newest reading alone.  Set against no
                    # running attempt, it has no sample's error for a median to damp; and the
                    # readings of a few seconds before may be of work that has ended since
                    # (a batch of plain Ray tasks there: a median over them told a room 2.3 GB
                    # under the node's as the next batch started, benchmarks/README.md).
                    recent = [readings[-1][1]]
                else:
                    recent = [r for t, r in readings if now - t < window] or [r for _, r in readings]
                rooms[node_id] = self._last_rooms[node_id] = statistics.median(
                    rule.room_bytes(r, self._held_at(r)) for r in recent)
            return rooms

    def node_rooms_left(self, node_ids: Sequence[str]) -> dict[str, float]:
        """Each node's room (``node_rooms``) less what raysched's attempts running there are
        expected to hold at most (``policy.rules.room_left_bytes``): what more calls may hold
        there now.  A driver sets it against the ``memory`` labels Ray could still place there
        (``runtime.rooms``)."""
        rooms = self.node_rooms(node_ids)
        with self._lock:
            return {node_id: room_left_bytes(room, self._running_on(node_id)) for node_id, room in rooms.items()}

    def _read_own_node(self) -> None:
        """Keep a reading of the monitor's own node for its room, if one is due."""
        now = self._clock()
        if self._own_node is None or now - self._own_read_at < self.config.node_sample_interval_s:
            return
        self._own_read_at = now
        reading = self._own_node()
        if reading is not None:
            self._own_node_id = reading.node_id
            with self._lock:
                if self._running_on(reading.node_id):
                    # Idle workers count as reusable only on a quiet node (``_probe_quiet_nodes``).
                    reading = replace(reading, idle_workers_bytes=0.0)
                self._note_room(reading)

    def _probe_quiet_nodes(self, node_ids: Sequence[str]) -> None:
        """Read the nodes where no attempt of raysched's runs and that no worker has read for
        ``node_sample_interval_s``, with a probe each.

        The probe (``RayNodeProbe``) answers within a tenth of a second on a node whose
        worker is up, else at a later ask.  Without it a quiet node kept the room it last
        had, which other programs may have taken since.  A node where attempts run is
        theirs to read even when their reports come late: a probe's reading alone (no
        median, idle workers counted as reusable) set a room mid-batch that the node's
        other work swung back under, and the queue admitted into it (two Ray OOM kills,
        benchmarks/README.md).
        """
        if self._node_probe is None or not self._probe_lock.acquire(blocking=False):
            return  # (another thread is probing: it notes what comes)
        try:
            now, due = self._clock(), []
            with self._lock:
                for node_id in node_ids:
                    readings = self._room_readings.get(node_id)
                    if node_id != self._own_node_id and not self._running_on(node_id) and not (
                            readings and now - readings[-1][0] < self.config.node_sample_interval_s):
                        due.append(node_id)
            for node_id in due:  # (outside the lock: a probe may wait for its answer)
                reading = self._node_probe(node_id)
                if reading is not None:
                    with self._lock:
                        self._note_room(reading)
                        self._probe_readings[node_id] = reading
        finally:
            self._probe_lock.release()

    def may_resume(self, call_id: str, attempt: int) -> bool | None:
        """Whether the call whose ``attempt`` gave way on its node may run its next attempt there now.

        Yes once its expected peak has fit in what the node's room leaves
        (``policy.rules.room_left_bytes``: the room less the expected peaks of the
        attempts running there, and less room promised to others) in every answer for
        ``requeue_room_hold_s``: an attempt that just started is not counted until it
        reports, within a live interval.  A yes promises the room: other calls asking
        are told of it less this one's expected peak until its next attempt reports, or
        for ``_PROMISE_INTERVALS`` live intervals, so that two calls waiting on one
        node do not start into the same room.

        None: the monitor cannot tell (it knows nothing of that attempt, no stop of it,
        no reading of its node); the worker then resubmits the call to Ray.
        """
        key = (call_id, int(attempt))
        now = self._clock()
        with self._lock:
            entry = self._attempts.get(key)
            if entry is None or entry.state.stop is None or not entry.last.node_id:
                return None
            node_id, need = entry.last.node_id, entry.last.expected_peak_bytes
            room = self.node_rooms([node_id]).get(node_id)
            if room is None:
                return None
            ttl = _PROMISE_INTERVALS * self.config.live_interval_s
            self._promised = {k: p for k, p in self._promised.items()
                              if now - p[2] < ttl and self._newest.get(k[0], k[1]) <= k[1]}
            self._fits_since = {k: t for k, t in self._fits_since.items() if now - t < self.config.monitor_stale_s}
            promised = sum(p[1] for k, p in self._promised.items() if p[0] == node_id and k != key)
            if room_left_bytes(room, self._running_on(node_id), promised) < need:
                self._fits_since.pop(key, None)
                return False
            since = self._fits_since.setdefault(key, now)
            if now - since < (self.config.requeue_room_hold_s or 0.0):
                return False
            del self._fits_since[key]
            self._promised[key] = (node_id, need, now)
            return True

    def poll_nodes(self) -> list[Decision]:
        """Read the memory of every node with a running attempt and judge it (one poll at a time)."""
        if self._node_reader is None or not self._poll_lock.acquire(blocking=False):
            return []
        try:
            self._last_poll = self._clock()
            with self._lock:
                nodes = sorted({a.last.node_id for a in self._attempts.values()
                                if a.state.stop is None and a.last.node_id})
            decisions = []
            for node_id in nodes:
                reading = self._node_reader(node_id)  # outside the lock: it may wait on the network
                if reading is not None:
                    decision = self._check_node(reading)
                    if decision is not None:
                        decisions.append(decision)
            return decisions
        finally:
            self._poll_lock.release()

    def ended(self, ends: Sequence[tuple[str, int, float]]) -> None:
        """Workers say that attempts they reported have ended: (call id, attempt, time.time()).

        The node rule no longer picks them, no rule judges them, and a node's room no
        longer counts their memory after that time (it is freed); they are forgotten
        once silent for ``monitor_stale_s``, as the rest, so that readings taken before
        their end still count them.  An end may come before the attempt's last samples
        (they waited in the worker's buffer, and the end is sent at once): an end of an
        attempt not heard of yet is kept for its samples, for ``monitor_stale_s``.
        """
        now = self._clock()
        with self._lock:
            ended = []
            for call_id, attempt, at in ends:
                key = (call_id, int(attempt))
                entry = self._attempts.get(key)
                if entry is not None:
                    entry.ended_at = float(at)
                    ended.append(entry.last.function)
                else:
                    self._early_ends[key] = (float(at), now)
            self._publish_used(ended)

    # --- what workers and users ask ---------------------------------------------------------------------
    def directives(self, call_ids: Iterable[str]) -> dict[str, Decision]:
        """For each call id the monitor knows: the stop decided for its newest attempt, else "none".

        A worker compares the decision's ``attempt`` with its own; call ids the
        monitor has not heard of (yet, or any more) are left out.
        """
        with self._lock:
            out = {}
            for call_id in call_ids:
                attempt = self._newest.get(call_id)
                entry = self._attempts.get((call_id, attempt)) if attempt is not None else None
                if entry is not None:
                    out[call_id] = entry.state.stop or Decision.none(entry.last)
            return out

    def forget(self, call_id: str, attempt: int | None = None) -> None:
        """Drop an attempt (or every attempt of a call) that has ended."""
        with self._lock:
            dropped = set()
            for key in [k for k in self._attempts if k[0] == call_id and (attempt is None or k[1] == attempt)]:
                dropped.add(self._attempts.pop(key).last.function)
            if attempt is None or self._newest.get(call_id) == attempt:
                self._newest.pop(call_id, None)
            self._publish_used(dropped)

    def status(self) -> dict[str, Any]:
        with self._lock:
            running: dict[str, int] = {}
            for attempt in self._attempts.values():
                if attempt.state.stop is None and attempt.ended_at is None:
                    running[attempt.last.function] = running.get(attempt.last.function, 0) + 1
            return {
                "attempts": len(self._attempts),
                "stopping": sum(a.state.stop is not None for a in self._attempts.values()),
                # Attempts reporting, not stopped and not ended, by function (an attempt
                # whose worker died is forgotten once silent for monitor_stale_s).
                "running_by_function": running,
                "nodes": len(self._nodes),
                "reports_received": self.reports_received,
                "decisions": self.decisions_made,
                "pending_events": len(self._pending),
            }

    def ping(self) -> bool:
        return True

    def note(self, decisions: Sequence[Decision]) -> None:
        """Record decisions taken outside the monitor's rules (a driver rescaling an actor) as events.

        Not logged again here: whoever took them has said so where its user reads it (the
        monitor's lines reach the driver too, and read as a second rescale)."""
        self._record(decisions, log=False)

    def reconfigure(self, config: RayschedConfig) -> None:
        """Judge from now on by ``config``'s rules (a driver's caps and thresholds); attempt state is kept."""
        from ..policy.recipe import build_rules

        rules = build_rules(config)
        with self._lock:
            self.config, self.rules = config, rules
        if self._saved_config is not None:
            self._saved_config.save(config)  # Ray restarts the actor with its creator's

    # --- events and metrics --------------------------------------------------------------------------------
    def _record(self, decisions: Sequence[Decision], log: bool = True) -> None:
        """Count every non-"none" decision, log it (``log``), and write it (and any still pending) as events."""
        decisions = [d for d in decisions if d.action != "none"]
        for d in decisions:
            self.metrics.decided(d)
            if log:
                level = logging.WARNING if d.action != "record_cpu" else logging.INFO
                logger.log(level, "raysched monitor: %s %s (call %s, attempt %d): %s", d.action, d.function,
                           d.call_id, d.attempt, d.detail)
        with self._lock:
            self.decisions_made += len(decisions)
            self._pending.extend(event_row(d) for d in decisions)
            del self._pending[:-MAX_PENDING_EVENTS]
            rows, self._pending = self._pending, []
        if not rows:
            return
        try:
            self.store.append_events(rows)
        except Exception:  # noqa: BLE001 - an unwritable store must not stop the decisions; retry later
            logger.exception("raysched: could not write %d monitor events; will retry", len(rows))
            with self._lock:
                self._pending[:0] = rows
                del self._pending[:-MAX_PENDING_EVENTS]


# --- the worker's side: batch reports, keep the answers -----------------------------------------------


class LiveReporter:
    """Per worker process: batches live reports to the monitor and keeps its answers for free lookups.

    ``add`` is called from the live sampler's callback for each running attempt;
    at most every ``interval_s`` the buffered reports go out as one batch with
    ``send(batch) -> pending``, and ``resolve(pending) -> dict | None`` (None: no
    answer yet) is checked without waiting on later calls, so the sampler thread
    never blocks on the monitor.  One batch is in flight at a time; while the
    monitor is away (restarting) reports are buffered, the oldest dropped beyond
    ``max_buffer``.  ``directive(call_id, attempt)`` is a dict lookup.
    ``ended(call_id, attempt, at)`` drops the attempt's directive and tells the
    monitor at once, with ``send_ended(ends)`` (no answer awaited), that an attempt
    it had reports of has ended: its memory is free from then on (``Monitor.ended``).
    """

    def __init__(self, send: Callable[[list[LiveReport]], Any], resolve: Callable[[Any], Mapping[str, Decision] | None],
                 interval_s: float, clock: Callable[[], float] = time.monotonic, max_buffer: int = 1000,
                 send_ended: Callable[[list[tuple[str, int, float]]], Any] | None = None):
        self._send, self._resolve, self._interval, self._clock = send, resolve, interval_s, clock
        self._send_ended = send_ended
        self._max_buffer = max_buffer
        self._reported: set[tuple[str, int]] = set()  # attempts this process has reported and not ended
        self._lock = threading.Lock()
        self._buffer: list[LiveReport] = []
        self._pending: Any = None
        self._last_send = float("-inf")
        self._directives: dict[str, Decision] = {}

    def add(self, report: LiveReport) -> None:
        with self._lock:
            self._reported.add(report.key)
            self._buffer.append(report)
            del self._buffer[:-self._max_buffer]
            self._poll()
            if self._pending is None and self._clock() - self._last_send >= self._interval:
                batch, self._buffer = self._buffer, []
                self._last_send = self._clock()
                try:
                    self._pending = self._send(batch)
                except Exception as exc:  # noqa: BLE001 - no monitor: keep the reports for the next try
                    logger.debug("raysched: could not reach the monitor: %s", exc)
                    self._buffer[:0] = batch

    def _poll(self) -> None:
        if self._pending is None:
            return
        try:
            answer = self._resolve(self._pending)
        except Exception as exc:  # noqa: BLE001 - a lost batch: its attempts report again next tick
            logger.debug("raysched: a monitor report failed: %s", exc)
            answer = {}
        if answer is not None:
            self._pending = None
            self._directives.update(answer)

    def directive(self, call_id: str, attempt: int) -> Decision | None:
        """The stop the monitor decided for this attempt, if any (as of the last answer received)."""
        with self._lock:
            self._poll()
            decision = self._directives.get(call_id)
        return decision if decision is not None and decision.attempt == attempt else None

    def ended(self, call_id: str, attempt: int, at: float) -> None:
        """The attempt has ended at ``at`` (time.time()): its directive is dropped, and the
        monitor hears of the end if it heard of the attempt."""
        with self._lock:
            self._directives.pop(call_id, None)
            if (call_id, attempt) not in self._reported:
                return  # never reported (shorter than an interval): the monitor does not know it
            self._reported.discard((call_id, attempt))
        if self._send_ended is not None:
            try:
                self._send_ended([(call_id, attempt, at)])
            except Exception as exc:  # noqa: BLE001 - the monitor counts it ended once silent
                logger.debug("raysched: could not tell the monitor of an attempt's end: %s", exc)


def ray_live_reporter(config: RayschedConfig) -> LiveReporter:
    """A LiveReporter sending to the cluster's monitor actor (looked up by name, created if missing)."""
    import ray

    handle: list[Any] = []

    def monitor() -> Any:
        if not handle:
            try:
                handle.append(ray.get_actor(monitor_name(config), namespace=NAMESPACE))
            except ValueError:
                handle.append(get_or_create_monitor(config))
        return handle[0]

    def send(batch: list[LiveReport]) -> Any:
        return monitor().report.remote(batch)

    def send_ended(ends: list[tuple[str, int, float]]) -> Any:
        return monitor().ended.remote(ends)

    def resolve(ref: Any) -> Mapping[str, Decision] | None:
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            return None
        try:
            # A ready ref's future, not ray.get: in an async actor's process Ray warns of a
            # "blocking ray.get inside async actor" for any thread's ray.get, and this one
            # (the sampler thread's) is not the user's and never blocks.
            return ready[0].future().result(timeout=10.0)
        except Exception:
            handle.clear()  # a monitor killed for good: look it up (or create it) again next time
            raise

    return LiveReporter(send, resolve, config.live_interval_s, send_ended=send_ended)


def get_or_create_monitor(config: RayschedConfig):
    """The monitor actor of the config's home: found by name, created on first use, restarted by Ray.

    A restarted monitor starts with no state: workers report again within one
    live interval and hysteresis counts afresh; events already written are
    not duplicated (their row ids are fixed by what they decide).  It judges by
    the config it was last handed (``SavedMonitorConfig``), not its creator's.
    """
    from .session import get_or_create_actor

    name = monitor_name(config)
    return get_or_create_actor(Monitor, name, config, node_reader=RayNodeReader(),
                               saved_config=SavedMonitorConfig(name), own_node=own_node_memory,
                               node_probe=RayNodeProbe(config.node_sample_interval_s))


def events(function: Any = None, *, home: str | None = None) -> pd.DataFrame:
    """Every decision the live monitor recorded (of one function, or all), oldest first.

    ``function`` is a name or an adaptive function; ``home`` defaults to the
    configured raysched home.  Columns as ``store.schema.EVENT_SCHEMA``.
    """
    from ..store.profiles import ProfileStore
    from .session import get_config

    name = function if function is None or isinstance(function, str) else getattr(function, "name", None)
    if function is not None and not isinstance(name, str):
        from ..errors import InvalidInput

        raise InvalidInput(f"expected an adaptive function or a function name, got {function!r}")
    return ProfileStore(home if home is not None else get_config().home_path, writable=False).events(function=name)


__all__ = [
    "Monitor", "Metrics", "LiveReport", "NodeMemory", "Decision", "RayNodeReader", "RayNodeProbe", "MONITOR_NAME",
    "report_from", "ray_kill_threshold", "node_memory_here", "own_node_memory", "idle_worker_bytes", "parse_prometheus", "node_memory_from_metrics", "fetch_metrics_text", "event_row",
    "get_or_create_monitor", "events", "LiveReporter", "ray_live_reporter", "SavedMonitorConfig",
]
