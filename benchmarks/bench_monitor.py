"""Memory-heavy tasks on a node with a real memory ceiling: plain Ray guessed, plain Ray worst case, raysched (issue 4).

One Ray cluster (``ray.cluster_utils.Cluster``): a head that runs no tasks
(``num_cpus=0``, with the dashboard, whose state API tells raysched and this
script why a worker died) and one worker node with ``num_cpus=2`` and a
``memory`` resource of ``--room-gib`` (3.25 GiB).  The worker node's raylet is
started with Ray's memory-monitor threshold lowered (``RAY_memory_usage_threshold``)
so that it kills a task once the machine uses more than what it used when the
head and raysched's actors were up, plus that room, plus an allowance for the
node's own processes (raylet, agents, idle workers) and the profiler's growth.
Ray's memory monitor judges the whole machine's memory, so the room actually
left at the start of each batch is measured and printed.

The work: each task allocates N MiB in steps of 50 MiB with a short sleep
after each step (so live samples see the climb), holds it for ``--hold-s``,
and returns N.  The sizes are mixed (``--sizes``, a seeded random draw); every
run uses the same sizes in the same order.  Every task asks for 0.25 CPU (set
explicitly on all three paths, so only memory differs), and every task says
its size to raysched as ``input_size`` (``N`` MiB): the feature raysched learns
memory from.

Three ways, side by side in one run, ``--repeats`` times (the order rotates
each repetition so that drift in the machine's load hits all three):

* ``guessed``: plain ``@ray.remote`` with ``memory=--guess-mib`` (300 MiB) for every task;
* ``worst``: plain ``@ray.remote`` with the worst-case ``memory`` for every task:
  the largest peak RSS measured in the warm-up batch, rounded up to 64 MiB
  (what a user who measured the biggest task would write);
* ``raysched``: ``@raysched.adaptive_remote`` (cold fallback ``memory=--guess-mib``)
  warmed by one earlier batch of the same distribution (another seed) that is
  not timed, then trained (``refresh(train=True)``).

Per run it prints: tasks killed by Ray's memory monitor (attempts whose
error type in Ray's state API is ``OUT_OF_MEMORY``; for raysched also its rows
whose error says Ray's memory monitor killed them), attempts stopped by
raysched's monitor (``raysched.events``: ``stop_and_resubmit``), attempts (runs
of the function body, counted by a marker file each run writes; raysched's
profile rows as a cross-check), calls that failed or did not finish within
``--timeout-s``, total time (first submission to the last result), and the CPU
seconds and resident memory of raysched's monitor actor (read from
``/proc/<pid>`` of the actor's process, found with ``ray.util.state.list_actors``).

Goal: raysched with no task killed by Ray's memory monitor, in at most 0.7 of
the worst-case request's total time.

Run:  python benchmarks/bench_monitor.py [--tasks 20] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# Ray >= 2.60 turns token authentication on for a new local cluster unless told otherwise.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
_HOME = tempfile.mkdtemp(prefix="raysched-bench-monitor-")
os.environ["RAYSCHED_HOME"] = _HOME

import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402

import raysched  # noqa: E402
from raysched.types import GiB, MiB  # noqa: E402

#: The paths every run compares; ``--raysched-order`` adds "raysched_queued" (see submit()).
MODES = ("guessed", "worst", "raysched")
QUEUED = "raysched_queued"
STEP_MIB = 50
CPUS_PER_TASK = 0.25


def grow_and_hold(mib: int, hold_s: float, marker_dir: str) -> int:
    """Allocate ``mib`` MiB in 50 MiB steps, hold it, return ``mib``; each run leaves a marker file."""
    import os
    import time
    import uuid

    import numpy as np

    marker = os.path.join(marker_dir, f"{os.getpid()}-{uuid.uuid4().hex}")
    with open(marker, "w") as f:
        f.write(f"{mib} {time.time()}\n")
    blocks = []
    for _ in range(mib // STEP_MIB):
        blocks.append(np.ones(STEP_MIB * MiB // 8))
        time.sleep(0.05)
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:  # short sleeps: a stop raised into this thread lands within one
        time.sleep(0.05)
    with open(marker, "a") as f:
        f.write(f"{time.time()}\n")
    return sum(b.nbytes for b in blocks) // MiB


plain_grow = ray.remote(grow_and_hold)
# The cold-start fallback is the same guess as the plain "guessed" path.
adaptive_grow = None  # made in main(): the fallback comes from the command line


# --- the cluster ---------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def used_bytes() -> int:
    """The machine's used memory as Ray's memory monitor sees it without a cgroup limit: total - available."""
    vm = psutil.virtual_memory()
    return int(vm.total - vm.available)


def memory_holders(top: int = 8) -> dict:
    """What holds the machine's memory as a batch starts: the largest processes by RSS (name,
    MiB) and the shared memory (Ray's object store lives in /dev/shm): the room left under
    the kill line moves with them, and a room that shrinks from one batch to the next is
    traced to its holder here."""
    procs = []
    for proc in psutil.process_iter(["name", "memory_info"]):
        info = proc.info
        if info.get("memory_info") is not None:
            procs.append((info["memory_info"].rss, info.get("name") or "?"))
    procs.sort(reverse=True)
    shmem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("Shmem:")), 0)
    return {"shmem_mib": round(shmem / MiB), "used_mib": round(used_bytes() / MiB),
            "largest": [[name, round(rss / MiB)] for rss, name in procs[:top]]}


def start_cluster(args: argparse.Namespace):
    """Head (no tasks, dashboard), raysched's actors up, then the worker node with the strict threshold."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": _free_port()})
    ray.init(address=cluster.address, namespace="raysched", log_to_driver=False)
    # raysched's profiler and monitor come up now (on the head: the worker node does not exist yet),
    # so that their memory is part of the baseline the threshold is set above.
    from raysched.runtime.client import get_client
    from raysched.runtime.session import NAMESPACE, monitor_name

    ray.get(get_client().handle.ping.remote(), timeout=120)
    deadline = time.monotonic() + 60
    while True:
        try:
            monitor = ray.get_actor(monitor_name(raysched.get_config()), namespace=NAMESPACE)
            ray.get(monitor.ping.remote(), timeout=30)
            break
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    time.sleep(2)
    total = psutil.virtual_memory().total
    baseline = used_bytes()
    allowance = int(args.node_allowance_gib * GiB)
    threshold_bytes = baseline + int(args.room_gib * GiB) + allowance
    fraction = min(0.95, threshold_bytes / total)
    env = {"RAY_memory_usage_threshold": f"{fraction:.4f}", "RAY_memory_monitor_refresh_ms": "250"}
    if not args.numpy_hugepages:
        # numpy asks for transparent huge pages for big arrays (madvise); on this machine's kernel
        # the first big allocations after a batch freed its memory are then ~2x slower (a
        # 1.4 GB climb: 4.5 s, later ones 1.5 s; without: 2.0 s each): benchmarks/README.md.
        env["NUMPY_MADVISE_HUGEPAGE"] = "0"
    if args.idle_worker_s is not None:
        # Ray kills idle workers above the node's CPU count after 1 s; a batch whose concurrency
        # goes up and down then restarts them (~1-2 s each on 2 busy cores).
        env["RAY_idle_worker_killing_time_threshold_ms"] = str(int(args.idle_worker_s * 1000))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # Its `memory` resource is the room: labels decide co-scheduling, the threshold decides kills.
        node = cluster.add_node(num_cpus=2, memory=int(args.room_gib * GiB))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    cluster.wait_for_nodes()
    info = {"machine_total_bytes": total, "baseline_used_bytes": baseline, "threshold_fraction": fraction,
            "threshold_bytes": int(fraction * total), "node_allowance_bytes": allowance,
            "memory_resource_bytes": int(args.room_gib * GiB)}
    return cluster, node, info


# --- the processes we watch ---------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def actor_pid(class_name: str) -> int | None:
    from ray.util.state import list_actors

    try:
        found = list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")], detail=True,
                            raise_on_missing_output=False)
    except Exception:  # noqa: BLE001
        return None
    return int(found[0].pid) if found and found[0].pid else None


def proc_reading(pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system), resident and peak resident MiB of a process; empty if it is gone."""
    if pid is None:
        return {}
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        status = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    status[key] = int(value.split()[0]) / 1024  # kB -> MiB
    except OSError:
        return {}
    return {"cpu_s": (int(fields[11]) + int(fields[12])) / _TICK, "rss_mib": status.get("VmRSS", 0.0),
            "hwm_mib": status.get("VmHWM", 0.0)}


# --- one batch ------------------------------------------------------------------------------------------


def submit(mode: str, sizes: list[int], hold_s: float, marker_dir: str, task_name: str, labels: dict[str, int]):
    if mode.startswith("raysched"):
        # The queued path sends the same calls through raysched's admission queue (priority 0),
        # which admits them in the configured order and backfills behind a big one that waits.
        queue = {"priority": 0} if mode == QUEUED else {}
        return [adaptive_grow.options(input_size=mib * MiB, num_cpus=CPUS_PER_TASK, name=task_name, **queue)
                .remote(mib, hold_s, marker_dir) for mib in sizes]
    memory = labels[mode]
    return [plain_grow.options(memory=memory, num_cpus=CPUS_PER_TASK, name=task_name).remote(mib, hold_s, marker_dir)
            for mib in sizes]


def run_batch(mode: str, sizes: list[int], args: argparse.Namespace, labels: dict[str, int], tag: str,
              threshold_bytes: int, wave: int = 0) -> dict:
    from raysched.runtime.client import submitted_calls

    marker_dir = tempfile.mkdtemp(prefix=f"{tag}-", dir=_HOME)
    task_name = f"bench_{tag}"
    monitor_pid = actor_pid("Monitor")
    before_calls = submitted_calls(adaptive_grow.name)
    holders = memory_holders()
    room_at_start = threshold_bytes - used_bytes()
    mon0 = proc_reading(monitor_pid)
    queue_watch = QueueWatch() if mode.startswith("raysched") else None
    # The driver's view of the nodes' rooms as the batch is submitted: calls without a priority
    # wait in the queue too while a node's room is well below its label (runtime.rooms).
    from raysched.runtime.client import get_client

    watch = get_client().rooms if mode.startswith("raysched") else None
    shortest = watch.shortest_room if watch is not None else None
    t0, t0_wall = time.perf_counter(), time.time()
    refs: list = []
    pending: list = []
    step = wave or len(sizes)
    submit_s = 0.0
    for i in range(0, len(sizes), step):  # all at once, or in waves (the warm-up)
        chunk = submit(mode, sizes[i:i + step], args.hold_s, marker_dir, task_name, labels)
        refs += chunk
        submit_s = submit_s if i else time.perf_counter() - t0  # the driver's submission of the first chunk
        _, late = ray.wait(chunk, num_returns=len(chunk), timeout=max(0.0, t0 + args.timeout_s - time.perf_counter()))
        pending += late
    ready = [r for r in refs if r not in pending]
    elapsed = time.perf_counter() - t0
    queue_seen = queue_watch.stop() if queue_watch is not None else {}
    mon1 = proc_reading(monitor_pid)
    failed, errors = 0, []
    for ref, mib in zip(refs, sizes):
        if ref not in ready:
            continue
        try:
            value = ray.get(ref)
            if value != mib:
                failed += 1
                errors.append(f"wrong value {value} for {mib}")
        except Exception as exc:  # noqa: BLE001 - counted and reported
            failed += 1
            errors.append(f"{type(exc).__name__}: {str(exc)[-1500:]}")  # the cause is at the end
    for ref in pending:
        ray.cancel(ref, force=True, recursive=True)
    result = {
        "mode": mode, "tag": tag, "task_name": task_name, "tasks": len(sizes), "seconds": elapsed,
        "failed": failed, "unfinished": len(pending), "errors": errors[:5], "submit_s": submit_s,
        "room_at_start_mib": room_at_start / MiB,
        "memory_holders_at_start": holders,
        "routing_shortest_room_mib": shortest / MiB if shortest is not None else None,
        "body_runs": len(os.listdir(marker_dir)),
        **body_timeline(marker_dir, elapsed, t0_wall),
        "monitor_cpu_s": (mon1.get("cpu_s", float("nan")) - mon0.get("cpu_s", float("nan"))),
        "monitor_rss_mib": mon1.get("rss_mib", float("nan")),
        "monitor_hwm_mib": mon1.get("hwm_mib", float("nan")),
    }
    result["monitor_cpu_pct"] = 100 * result["monitor_cpu_s"] / elapsed
    result.update(queue_seen)
    if mode.startswith("raysched"):
        calls = submitted_calls(adaptive_grow.name) - before_calls
        rows = raysched.profiles(adaptive_grow)
        rows = rows[rows["call_id"].isin(calls)]
        events = raysched.events(adaptive_grow)
        events = events[events["call_id"].isin(calls)] if len(events) else events
        errors_col = rows["error"].fillna("")
        result.update({
            "rows": len(rows),
            "calls_with_ok_row": int(rows.loc[rows["outcome"] == "ok", "call_id"].nunique()),
            "rows_by_outcome": rows["outcome"].value_counts().to_dict(),
            "rows_killed_by_ray": int(((rows["outcome"] == "oom_killed")
                                       & errors_col.str.contains("Ray's memory monitor")).sum()),
            "rows_stopped_by_monitor": int(errors_col.str.contains("stopped by raysched's monitor").sum()),
            "events_by_action": events["action"].value_counts().to_dict() if len(events) else {},
            "monitor_stops": int((events["action"] == "stop_and_resubmit").sum()) if len(events) else 0,
            # When each decision was taken and each attempt Ray killed ended, seconds from the
            # batch's first submission: how a node rule's stops and Ray's kills interleaved.
            "event_timeline": [
                {"t_s": round(_epoch_s(e.timestamp) - t0_wall, 2), "call": str(e.call_id)[:8], "attempt": int(e.attempt),
                 "action": e.action, "detail": str(e.detail)[:240]}
                for e in events.sort_values("timestamp").itertuples()] if len(events) else [],
            "ray_kill_timeline": [
                {"t_s": round(_epoch_s(r.timestamp) - t0_wall, 2), "call": str(r.call_id)[:8], "attempt": int(r.attempt),
                 "allocated_mib": round(float(r.allocated_memory_bytes) / MiB),
                 "peak_mib": round(float(r.peak_rss_bytes) / MiB) if pd.notna(r.peak_rss_bytes) else None}
                for r in rows[(rows["outcome"] == "oom_killed") & errors_col.str.contains("Ray's memory monitor")]
                .sort_values("timestamp").itertuples()],
            "allocated_mib_ok": rows.loc[rows["outcome"] == "ok", "allocated_memory_bytes"].describe().div(MiB)
                                .round(0).to_dict() if len(rows) else {},
        })
    return result


class QueueWatch:
    """Samples the admission queue's status every 0.25 s while a queued batch runs: the room it
    admitted against (the node's, as the monitor measured it) and the expected peaks admitted calls held."""

    def __init__(self, interval_s: float = 0.25):
        import threading

        from raysched.runtime.admission import ADMISSION_NAME
        from raysched.runtime.session import NAMESPACE

        self._samples: list[tuple[float, float, float]] = []
        # (s since the watch began, room admitted against, the rooms the monitor last told, expected peaks held), MiB,
        # each time one of them changed: when a task is killed, what the queue knew then.
        self._timeline: list[tuple[float, float, float, float]] = []
        self._t0 = time.perf_counter()
        self._done = threading.Event()
        self._name, self._namespace, self._interval = ADMISSION_NAME, NAMESPACE, interval_s
        # Calls the queue admitted before the batch (those it admits during it: the batch's
        # calls given a priority, or routed there because the node is short of room).
        self._admitted_before = self._status().get("admitted_total", 0)
        self._admitted = self._admitted_before
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _status(self) -> dict:
        try:
            actor = ray.get_actor(self._name, namespace=self._namespace)
            return ray.get(actor.status.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - not created yet
            return {}

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            status = self._status()
            if not status:
                continue
            self._admitted = status.get("admitted_total", self._admitted)
            if status.get("capacity_room_bytes") is not None:
                self._samples.append((status["capacity_room_bytes"] / MiB, status["capacity_memory_bytes"] / MiB,
                                      status["held_peak_bytes"] / MiB))
                told = sum(status.get("node_rooms", {}).values()) / MiB
                point = (round(status["capacity_room_bytes"] / MiB), round(told), round(status["held_peak_bytes"] / MiB))
                if not self._timeline or self._timeline[-1][1:] != point:
                    self._timeline.append((round(time.perf_counter() - self._t0, 2), *point))

    def stop(self) -> dict:
        self._done.set()
        self._thread.join(timeout=10)
        admitted = {"queue_admitted": self._status().get("admitted_total", self._admitted) - self._admitted_before}
        if not self._samples:
            return admitted
        capacity = [c for c, _, _ in self._samples]
        return {**admitted, "queue_room_mib": {"min": min(capacity), "median": _med(capacity), "max": max(capacity)},
                "queue_label_mib": self._samples[-1][1], "queue_held_peak_mib_max": max(h for _, _, h in self._samples),
                "queue_timeline": [dict(zip(("t_s", "room_mib", "told_mib", "held_peak_mib"), p))
                                   for p in self._timeline]}


#: Worker pids that ran a body in an earlier batch.
_PIDS_SEEN: set[int] = set()


def start_outside_holder(mib: int) -> subprocess.Popen:
    """A process outside Ray that touches ``mib`` MiB and holds it until killed (another
    program on the node: Ray's memory monitor counts it, the node's labels do not)."""
    code = ("import time\n"
            f"b = bytearray({mib} * 1024 * 1024)\n"
            "for i in range(0, len(b), 4096): b[i] = 1\n"
            "print('held', flush=True)\n"
            "time.sleep(1e9)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "held":
        proc.kill()
        raise RuntimeError(f"the outside process could not hold {mib} MiB")
    return proc


def _epoch_s(value) -> float:
    """A stored timestamp (a pandas Timestamp, naive UTC or aware) as seconds since the epoch."""
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return stamp.timestamp()


def body_timeline(marker_dir: str, elapsed: float, t0_wall: float) -> dict:
    """From the markers: completed runs' (size, seconds), mean and peak number of completed runs at once.

    An attempt killed mid-run leaves only its start: it counts as an attempt, not here.
    """
    spans = []
    starts = []  # (start, pid) of every run, completed or not
    for name in os.listdir(marker_dir):
        with open(os.path.join(marker_dir, name)) as f:
            fields = f.read().split()
        if len(fields) >= 2:  # a run killed as it began may have left its marker empty
            starts.append((float(fields[1]), int(name.split("-", 1)[0])))
        if len(fields) >= 3:
            spans.append((int(fields[0]), float(fields[1]), float(fields[2])))
    # The first three bodies: seconds after the first submission, and whether their worker
    # process had run a body of an earlier batch (else Ray started it, or it sat idle since).
    first_bodies = [{"start_s": round(b - t0_wall, 3), "pid": pid, "worker_seen_before": pid in _PIDS_SEEN}
                    for b, pid in sorted(starts)[:3]]
    _PIDS_SEEN.update(pid for _, pid in starts)
    points = sorted([(b, 1) for _, b, _ in spans] + [(e, -1) for _, _, e in spans])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    busy = sum(e - b for _, b, e in spans)
    first = min((b for _, b, _ in spans), default=0.0)
    return {"mean_running": busy / elapsed if elapsed else float("nan"), "peak_running": peak,
            # From the first submission to the first body's start, and from the last body's end to
            # the batch's end (its result back in the driver): what the batch spends outside bodies.
            "first_start_s": first - t0_wall if spans else float("nan"),
            "first_bodies": first_bodies,
            "after_last_end_s": elapsed - (max(e for _, _, e in spans) - t0_wall) if spans else float("nan"),
            "completed_runs": [(mib, e - b) for mib, b, e in spans],
            # (size, start, end) of each body, seconds from the first start: the batch's timeline.
            "spans": sorted((mib, round(b - first, 3), round(e - first, 3)) for mib, b, e in spans)}


def ray_oom_kills(task_names: list[str]) -> dict[str, dict[str, int]]:
    """Per task name: attempts Ray's state API knows, and those that failed with OUT_OF_MEMORY."""
    from ray.util.state import list_tasks

    out = {}
    for name in task_names:
        rows = list_tasks(filters=[("name", "=", name)], detail=True, limit=10_000, raise_on_missing_output=False)
        out[name] = {
            "ray_attempts": len(rows),
            "oom_killed": sum(1 for r in rows if (r.error_type or "") == "OUT_OF_MEMORY"),
            "other_failures": sum(1 for r in rows if r.state == "FAILED" and (r.error_type or "") != "OUT_OF_MEMORY"),
            "first_started": first_started(rows),
        }
    return out


def first_started(rows, n: int = 3) -> list[dict]:
    """The ``n`` attempts that started first: seconds from the batch's first task event to each
    of their states (where a batch's start is spent: waiting for a node, a worker, or running),
    and the worker's pid."""
    timelines = [({e["state"]: e["created_ms"] / 1000 for e in (r.events or [])}, r.worker_pid) for r in rows]
    timelines = [(t, pid) for t, pid in timelines if t]
    if not timelines:
        return []
    base = min(min(t.values()) for t, _ in timelines)
    firsts = sorted(timelines, key=lambda tp: tp[0].get("RUNNING", float("inf")))[:n]
    return [{"worker_pid": pid, **{state: round(at - base, 3) for state, at in sorted(t.items(), key=lambda kv: kv[1])}}
            for t, pid in firsts]


def held_labels() -> dict[str, float]:
    """The cluster's `memory` (MiB) and CPUs that tasks hold now, as the GCS sees them."""
    total, free = ray.cluster_resources(), ray.available_resources()
    return {"memory_mib": (total.get("memory", 0.0) - free.get("memory", 0.0)) / MiB,
            "cpus": total.get("CPU", 0.0) - free.get("CPU", 0.0)}


def settle_memory(baseline_used: int, baseline_held: dict[str, float], timeout_s: float = 15.0,
                  labels_timeout_s: float = 60.0) -> dict[str, float]:
    """Wait for the previous batch's memory to be freed, and its labels released, so that the
    next batch starts from the same room; returns the labels still held when the wait ended
    and how long it took. (A batch that followed a guessed one whose workers Ray killed found
    labels still held; see benchmarks/README.md.)"""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    time.sleep(1.0)
    while used_bytes() > baseline_used + 1.0 * GiB and time.monotonic() < deadline:
        time.sleep(0.25)
    held = held_labels()
    first = dict(held)
    deadline = time.monotonic() + labels_timeout_s
    while ((held["memory_mib"] > baseline_held["memory_mib"] + 1 or held["cpus"] > baseline_held["cpus"] + 0.01)
           and time.monotonic() < deadline):
        time.sleep(0.25)
        held = held_labels()
    return {"held_memory_mib_after_batch": first["memory_mib"], "held_cpus_after_batch": first["cpus"],
            "held_memory_mib_at_start": held["memory_mib"], "held_cpus_at_start": held["cpus"],
            "settle_s": time.monotonic() - t0}


# --- reporting -------------------------------------------------------------------------------------------


def _med(values):
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def oracle_seconds(run: dict, peak_by_mib: dict[int, float], room_bytes: int) -> float:
    """A lower bound on a batch's time with perfect labels (each task's own peak) and perfect packing:
    the memory-seconds of the worst-case run's bodies over the room, or its longest body."""
    done = run["worst"]["completed_runs"]
    if not done:
        return float("nan")
    memory_seconds = sum(peak_by_mib.get(mib, float("nan")) * seconds for mib, seconds in done)
    return max(memory_seconds / room_bytes, max(seconds for _, seconds in done))


def summarise(runs: list[dict[str, dict]], peak_by_mib: dict[int, float] | None = None,
              room_bytes: int | None = None) -> dict:
    summary = {}
    modes = list(runs[0])
    for mode in modes:
        rs = [r[mode] for r in runs]
        summary[mode] = {
            "seconds": _med([x["seconds"] for x in rs]),
            "oom_killed": _med([x["oom_killed"] for x in rs]),
            "oom_killed_per_repeat": [x["oom_killed"] for x in rs],
            "body_runs": _med([x["body_runs"] for x in rs]),
            "failed_or_unfinished": _med([x["failed"] + x["unfinished"] for x in rs]),
            "monitor_stops": _med([x.get("monitor_stops", 0) for x in rs]),
            "monitor_cpu_s": _med([x["monitor_cpu_s"] for x in rs]),
            "monitor_cpu_pct": _med([x["monitor_cpu_pct"] for x in rs]),
            "monitor_rss_mib": _med([x["monitor_rss_mib"] for x in rs]),
            "room_at_start_mib": _med([x["room_at_start_mib"] for x in rs]),
            "mean_running": _med([x["mean_running"] for x in rs]),
            "peak_running": _med([x["peak_running"] for x in rs]),
            "seconds_per_repeat": [x["seconds"] for x in rs],
        }
    worst = [r["worst"]["seconds"] for r in runs]
    for mode in [m for m in modes if m != "worst"]:
        mine = [r[mode]["seconds"] for r in runs]
        summary[mode]["ratio_to_worst"] = summary[mode]["seconds"] / summary["worst"]["seconds"]
        summary[mode]["paired_ratio_to_worst"] = _med([a / b for a, b in zip(mine, worst)])
        summary[mode]["paired_ratios"] = [a / b for a, b in zip(mine, worst)]
    if peak_by_mib and room_bytes:
        oracle = [oracle_seconds(r, peak_by_mib, room_bytes) for r in runs]
        summary["oracle"] = {"seconds": _med(oracle), "ratio_to_worst": _med([a / b for a, b in zip(oracle, worst)]),
                             "per_repeat": oracle}
    summary["goal"] = {}
    for mode in [m for m in modes if m.startswith("raysched")]:
        rs = summary[mode]
        complete = all(r[mode]["failed"] + r[mode]["unfinished"] == 0 for r in runs)
        no_kills = all(r[mode]["oom_killed"] == 0 and r[mode].get("rows_killed_by_ray", 0) == 0 for r in runs)
        summary["goal"][mode] = {
            "no_ray_kills": no_kills, "all_calls_returned": complete,
            "ratio_to_worst": rs["ratio_to_worst"], "paired_ratio_to_worst": rs["paired_ratio_to_worst"],
            "met": no_kills and complete and rs["ratio_to_worst"] <= 0.7 and rs["paired_ratio_to_worst"] <= 0.7}
    return summary


def print_table(summary: dict, runs: list, args: argparse.Namespace, setup: dict) -> None:
    print()
    print(f"{args.tasks} tasks per batch, sizes {setup['sizes_desc']}, hold {args.hold_s:g} s, {CPUS_PER_TASK} CPU each; "
          f"node: 2 CPUs, memory resource {setup['memory_resource_bytes'] / GiB:.2f} GiB; medians of "
          f"{len(runs)} repetitions")
    print(f"labels: guessed {setup['labels']['guessed'] / MiB:.0f} MiB, worst {setup['labels']['worst'] / MiB:.0f} MiB, "
          f"raysched predicted per task (cold fallback {args.guess_mib} MiB, warmed by {args.tasks} tasks)")
    header = (f"{'path':<15} {'total s':>8} {'x worst':>8} {'paired':>7} {'Ray OOM kills':>13} {'mon. stops':>10} "
              f"{'attempts':>8} {'failed':>6} {'running':>9} {'room MiB':>8} {'monitor CPU s':>13} {'CPU %':>6} "
              f"{'monitor RSS MiB':>15}")
    print(header)
    print("-" * len(header))
    modes = list(runs[0])
    for mode in modes:
        s = summary[mode]
        ratio = s.get("ratio_to_worst", 1.0)
        paired = s.get("paired_ratio_to_worst", 1.0)
        print(f"{mode:<15} {s['seconds']:>8.1f} {ratio:>8.2f} {paired:>7.2f} {s['oom_killed']:>13.0f} "
              f"{s['monitor_stops']:>10.0f} {s['body_runs']:>8.0f} {s['failed_or_unfinished']:>6.0f} "
              f"{s['mean_running']:>5.1f}/{s['peak_running']:<3.0f} "
              f"{s['room_at_start_mib']:>8.0f} {s['monitor_cpu_s']:>13.2f} {s['monitor_cpu_pct']:>6.1f} "
              f"{s['monitor_rss_mib']:>15.0f}")
    print("-" * len(header))
    print("running = function bodies running at once, mean/peak; room = MiB left under the kill threshold at the "
          "batch's start; monitor = raysched's monitor actor during the batch")
    for mode in modes:
        s = summary[mode]
        print(f"{mode}: seconds per repetition {', '.join(f'{x:.1f}' for x in s['seconds_per_repeat'])}; "
              f"Ray OOM kills per repetition {s['oom_killed_per_repeat']}"
              + (f"; paired ratios {', '.join(f'{x:.2f}' for x in s['paired_ratios'])}" if 'paired_ratios' in s else ""))
    if "oracle" in summary:
        print(f"bound with perfect labels and packing (memory-seconds of the worst-case run's tasks at their own "
              f"peaks / the node's memory): {summary['oracle']['seconds']:.1f} s = "
              f"{summary['oracle']['ratio_to_worst']:.2f} x worst")
    for mode, g in summary["goal"].items():
        print(f"goal ({mode}: no Ray OOM kill, every call returned, total time <= 0.7 x worst): "
              f"kills {'none' if g['no_ray_kills'] else 'SOME'}, "
              f"calls {'all returned' if g['all_calls_returned'] else 'NOT all'}, "
              f"ratio {g['ratio_to_worst']:.2f} (paired {g['paired_ratio_to_worst']:.2f}) -> "
              f"{'met' if g['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    global adaptive_grow
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20, help="tasks per batch (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the three paths (default 3)")
    parser.add_argument("--sizes", default="200:1400:100", metavar="MIN:MAX:STEP",
                        help="task sizes in MiB drawn uniformly from this range (default 200:1400:100)")
    parser.add_argument("--hold-s", type=float, default=1.0, help="seconds each task holds its memory (default 1)")
    parser.add_argument("--room-gib", type=float, default=3.25,
                        help="the worker node's memory resource and the room above the baseline (default 3.25)")
    parser.add_argument("--node-allowance-gib", type=float, default=0.75,
                        help="added to the threshold for the node's own processes and idle workers (default 0.75)")
    parser.add_argument("--guess-mib", type=int, default=300, help="the guessed memory label (default 300)")
    parser.add_argument("--timeout-s", type=float, default=90.0, help="a batch's time limit (default 90)")
    parser.add_argument("--warm-wave", type=int, default=4,
                        help="the warm-up batch is submitted this many calls at a time (default 4; 0: all at once, "
                             "which can deadlock raysched's cold start: see benchmarks/README.md)")
    parser.add_argument("--raysched-order", choices=["none", "first_submitted", "largest_first"], default="none",
                        help="add a fourth path, raysched_queued: raysched's calls through its admission queue "
                             "(priority 0) in this order (default none: only raysched straight to Ray)")
    parser.add_argument("--idle-worker-s", type=float, default=None,
                        help="the worker node keeps idle worker processes this long before Ray kills them "
                             "(RAY_idle_worker_killing_time_threshold_ms; default: Ray's, 1 s)")
    parser.add_argument("--numpy-hugepages", choices=["on", "off"], default="on",
                        help="whether the tasks' numpy asks for transparent huge pages (its default: on; "
                             "off sets NUMPY_MADVISE_HUGEPAGE=0 on the worker node)")
    parser.add_argument("--outside-mib", type=int, default=0,
                        help="once the node is set up, a process outside Ray holds this many MiB for the whole run: "
                             "the node's real room is that much less than its memory labels (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", action="append", default=[], metavar="KNOB=VALUE",
                        help="a RayschedConfig knob for the raysched paths, as a Python literal "
                             "(node_kill_margin=0.01); repeatable")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    parser.add_argument("--profiles-out", metavar="FILE",
                        help="write raysched's profile rows of the run (warm-up included) to FILE as Parquet")
    args = parser.parse_args(argv)
    args.numpy_hugepages = args.numpy_hugepages == "on"
    knobs = {}
    for item in args.config:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--config {item!r}: expected KNOB=VALUE")
        try:
            knobs[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parser.error(f"--config {item!r}: {value!r} is not a Python literal")
    if knobs:
        try:  # an unknown knob or a bad value is refused here, before any cluster starts
            raysched.configure(**knobs)
        except (TypeError, ValueError) as exc:
            parser.error(f"--config: {exc}")
    lo, hi, step = (int(x) for x in args.sizes.split(":"))
    rng = random.Random(args.seed)
    choices = list(range(lo, hi + 1, step))
    sizes = [rng.choice(choices) for _ in range(args.tasks)]
    warm_rng = random.Random(args.seed + 1000)
    warm_sizes = [warm_rng.choice(choices) for _ in range(args.tasks)]
    warm_sizes[0], warm_sizes[-1] = lo, hi  # the warm batch spans the whole range

    modes = MODES
    if args.raysched_order != "none":
        raysched.configure(admission_order=args.raysched_order)
        modes = MODES + (QUEUED,)
    adaptive_grow = raysched.adaptive_remote(name="bench_monitor.grow_and_hold", memory=args.guess_mib * MiB,
                                             num_cpus=CPUS_PER_TASK)(grow_and_hold)
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    started = time.perf_counter()
    cluster, _node, setup = start_cluster(args)
    setup["held_at_setup"] = held_labels()  # raysched's actors' own, if any: the settled state
    runs: list[dict[str, dict]] = []
    outside = start_outside_holder(args.outside_mib) if args.outside_mib > 0 else None
    if outside is not None:
        # Counted in the baseline the batches settle to, not in the threshold: the room under
        # Ray's kill threshold is that much less than the labels the node hands out.
        setup["baseline_used_bytes"] += args.outside_mib * MiB
        setup["outside_mib"] = args.outside_mib
    try:
        print(f"cluster up in {time.perf_counter() - started:.1f} s: threshold {setup['threshold_fraction']:.4f} of "
              f"{setup['machine_total_bytes'] / GiB:.1f} GiB = {setup['threshold_bytes'] / GiB:.2f} GiB used "
              f"(baseline {setup['baseline_used_bytes'] / GiB:.2f} GiB)", file=sys.stderr)
        # Warm-up: raysched's first batch (cold: its fallback is the guessed label), not timed against
        # anything, then training; it also measures the worst case a careful user would request.
        t = time.perf_counter()
        warm = run_batch("raysched", warm_sizes, args, {}, "warm", setup["threshold_bytes"], wave=args.warm_wave)
        adaptive_grow.refresh(train=True, timeout=180)
        warm_rows = raysched.profiles(adaptive_grow)
        biggest = float(warm_rows.loc[warm_rows["outcome"] == "ok", "peak_rss_bytes"].max())
        labels = {"guessed": args.guess_mib * MiB, "worst": int(-(-biggest // (64 * MiB)) * 64 * MiB)}
        setup["labels"] = labels
        # What raysched predicts after the warm-up, for a few sizes: the memory it will ask for and
        # the wall time the admission queue counts on (the upper bound).
        setup["predictions"] = {}
        for mib in sorted({lo, (lo + hi) // 2, hi}):
            p = adaptive_grow.options(input_size=mib * MiB).predict(mib, args.hold_s, "")
            setup["predictions"][mib] = {"memory_upper_mib": round(p.memory.upper / MiB), "wall_target_s":
                                         round(p.wall.target, 2), "wall_upper_s": round(p.wall.upper, 2),
                                         "source": p.source}
        print("raysched's predictions after the warm-up:", setup["predictions"])
        setup["sizes"] = sizes
        setup["warm_sizes"] = warm_sizes
        setup["sizes_desc"] = f"{lo}..{hi} MiB (mean {statistics.mean(sizes):.0f})"
        print(f"warm-up batch (raysched cold): {warm['seconds']:.1f} s, rows by outcome {warm['rows_by_outcome']}, "
              f"monitor stops {warm['monitor_stops']}, Ray kills in rows {warm['rows_killed_by_ray']}; with training "
              f"{time.perf_counter() - t:.1f} s; largest peak {biggest / MiB:.0f} MiB -> worst-case label "
              f"{labels['worst'] / MiB:.0f} MiB", file=sys.stderr)
        for rep in range(args.repeats):
            order = modes[rep % len(modes):] + modes[:rep % len(modes)]
            run = {}
            for mode in order:
                settled = settle_memory(setup["baseline_used_bytes"], setup["held_at_setup"])
                run[mode] = run_batch(mode, sizes, args, labels, f"{mode}_r{rep}", setup["threshold_bytes"])
                run[mode].update(settled)
                print(f"repeat {rep + 1}/{args.repeats} {mode}: {run[mode]['seconds']:.1f} s, "
                      f"{run[mode]['body_runs']} runs, {run[mode]['failed']} failed, "
                      f"{run[mode]['unfinished']} unfinished, room at start {run[mode]['room_at_start_mib']:.0f} MiB; "
                      f"labels held after the batch before: {settled['held_memory_mib_after_batch']:.0f} MiB / "
                      f"{settled['held_cpus_after_batch']:g} CPU, at start {settled['held_memory_mib_at_start']:.0f} MiB "
                      f"(settled in {settled['settle_s']:.1f} s)"
                      + (f"; the queue's room {run[mode]['queue_room_mib']['min']:.0f}-"
                         f"{run[mode]['queue_room_mib']['max']:.0f} MiB (median "
                         f"{run[mode]['queue_room_mib']['median']:.0f}; labels {run[mode]['queue_label_mib']:.0f} MiB), "
                         f"expected peaks held at most {run[mode]['queue_held_peak_mib_max']:.0f} MiB"
                         if "queue_room_mib" in run[mode] else "")
                      + (f"; {run[mode]['queue_admitted']} calls through the queue"
                         + (f" (the driver saw a node short of room: {run[mode]['routing_shortest_room_mib']:.0f} MiB)"
                            if run[mode].get("routing_shortest_room_mib") is not None else "")
                         if "queue_admitted" in run[mode] else ""),
                      file=sys.stderr)
            runs.append(run)
        time.sleep(3)  # Ray's task events reach the GCS in batches
        kills = ray_oom_kills(["bench_warm"] + [r[m]["task_name"] for r in runs for m in modes])
        warm.update(kills["bench_warm"])
        warm["oom_killed"] = kills["bench_warm"]["oom_killed"]
        for r in runs:
            for m in modes:
                r[m].update(kills[r[m]["task_name"]])
        every = raysched.profiles(adaptive_grow)
        ok = every[every["outcome"] == "ok"]
        peak_by_mib = {int(k): float(v) for k, v in
                       ok.groupby(ok["input_size"] // MiB)["peak_rss_bytes"].median().items()}
        if args.profiles_out:
            every.to_parquet(args.profiles_out)
        profiler = proc_reading(actor_pid("Profiler"))
        monitor = proc_reading(actor_pid("Monitor"))
    finally:
        if outside is not None:
            outside.kill()
            outside.wait()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(_HOME, ignore_errors=True)
    total_s = time.perf_counter() - started
    summary = summarise(runs, peak_by_mib, setup["memory_resource_bytes"])
    print_table(summary, runs, args, setup)
    print(f"warm-up batch (raysched cold, fallback {args.guess_mib} MiB): {warm['seconds']:.1f} s, Ray OOM kills "
          f"{warm['oom_killed']}, rows {warm['rows_by_outcome']}, monitor stops {warm['monitor_stops']}")
    print(f"at the end: monitor actor RSS {monitor.get('rss_mib', float('nan')):.0f} MiB (peak "
          f"{monitor.get('hwm_mib', float('nan')):.0f}), CPU {monitor.get('cpu_s', float('nan')):.1f} s in all; "
          f"profiler RSS {profiler.get('rss_mib', float('nan')):.0f} MiB, CPU {profiler.get('cpu_s', float('nan')):.1f} s")
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"whole run {total_s:.0f} s; {date}; uptime before: {uptime_before}; after: {uptime_after}; "
          f"cpus {os.cpu_count()}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"date": date, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                       "args": vars(args), "python": platform.python_version(), "ray": ray.__version__,
                       "raysched": raysched.__version__, "uptime_before": uptime_before, "uptime_after": uptime_after,
                       "setup": setup, "warm": warm, "peak_by_mib": peak_by_mib, "summary": summary, "runs": runs,
                       "monitor_end": monitor, "profiler_end": profiler, "whole_run_s": total_s},
                      out, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
