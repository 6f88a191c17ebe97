"""What runs inside the Ray worker: the thin measuring wrapper around the user's function.

The driver submits the user's function directly, wrapped by ``make_entry``, with
the predicted resources; the happy path costs one measurement and one buffered
row, and returns the function's value as the task's own value, so the
``ObjectRef`` the user holds is the real one.

Extra work happens only after a failure.  raysched submits every task with
``max_retries >= 1``, so when Ray's memory monitor kills an attempt, Ray runs the
same task again in a fresh worker.  That retry does not rerun the function with
the same resources: it records the killed attempt (with the last live sample of
its use), asks the escalation ladder for the next allocation, submits the
function with it, and returns that attempt's value as its own.  The user's
``ObjectRef`` therefore resolves to the value of the attempt that succeeded, or to
``AttemptsExhausted`` after ``max_attempts``.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import logging
import os
import pickle
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import ray

from ..config import RayschedConfig
from ..errors import AttemptsExhausted, RayschedError
from ..policy.ladder import LadderState
from ..policy.recipe import build_ladder
from ..policy.samples import memory_sample
from ..types import Allocation, AttemptRecord, Features, Outcome, Prediction, Usage
from .measure import AttemptMeter, LiveSample, get_live_sampler
from .session import NAMESPACE

logger = logging.getLogger(__name__)

PROFILER_NAME = "raysched_profiler"
LIVE_KV_NAMESPACE = "raysched_live"
MIN_WALL_FOR_CORES = 0.05  # seconds


@dataclass(frozen=True)
class AttemptSpec:
    """Everything an attempt needs besides the user's arguments; travels with the task."""

    function: str
    code_hash: str
    call_id: str
    attempt: int  # 1 for the first attempt of a call
    features: Features
    prediction: Prediction
    allocation: Allocation
    #: Not shipped with every task: the entry function carries it (see ``make_entry``).
    config: RayschedConfig | None = None
    prior: tuple[AttemptRecord, ...] = ()  # failed attempts of this call, oldest first
    max_peak_seen: float = 0.0
    largest_node_bytes: float | None = None
    priority: int = 0
    ray_options: tuple[tuple[str, Any], ...] = ()  # the caller's other Ray options, kept for resubmission

    @property
    def live_key(self) -> str:
        return f"{self.call_id}:{self.attempt}"


# --- rows ---------------------------------------------------------------------------------------


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, tz=dt.timezone.utc)


def attempt_row(
    spec: AttemptSpec,
    outcome: Outcome,
    usage: Usage | None,
    started_at: float,
    ended_at: float,
    error: str = "",
    node_id: str = "",
    worker_pid: int | None = None,
) -> dict[str, Any]:
    """One profile row (the store's PROFILE_SCHEMA) for one attempt."""
    pred, alloc = spec.prediction, spec.allocation
    peak = usage.peak_rss_bytes if usage is not None else None
    sample = memory_sample(outcome, peak, alloc.memory_bytes, spec.config)
    return {
        "row_id": uuid.uuid4().hex,
        "function": spec.function,
        "code_hash": spec.code_hash,
        "call_id": spec.call_id,
        "attempt": spec.attempt,
        "outcome": outcome.value,
        "error": error[:2000] or None,
        "timestamp": _utc(ended_at),
        "started_at": _utc(started_at),
        "node_id": node_id or None,
        "worker_pid": worker_pid,
        "input_size": spec.features.input_size,
        "tags": list(spec.features.tags),
        "arg_shapes": list(spec.features.arg_shapes),
        "dependencies": list(spec.features.dependencies),
        "priority": spec.priority,
        "prediction_source": pred.source,
        "predicted_memory_bytes": int(pred.memory.target),
        "predicted_memory_upper_bytes": int(pred.memory.upper),
        "predicted_cpu": float(pred.cpu.target),
        "predicted_wall_seconds": float(pred.wall.target),
        "allocated_num_cpus": float(alloc.num_cpus),
        "allocated_memory_bytes": int(alloc.memory_bytes),
        "rung": alloc.rung,
        "peak_rss_bytes": peak,
        "start_rss_bytes": usage.start_rss_bytes if usage is not None else None,
        "memory_sample_bytes": int(sample) if sample is not None else None,
        "cpu_seconds": usage.cpu_seconds if usage is not None else None,
        # Cores are CPU seconds per wall second; below MIN_WALL_FOR_CORES the ratio is
        # mostly scheduler noise and would size a 50 us task at whole cores.
        "cpu_cores": usage.cpu_cores if usage is not None and usage.wall_seconds >= MIN_WALL_FOR_CORES else None,
        "wall_seconds": usage.wall_seconds if usage is not None else None,
        "read_bytes": usage.read_bytes if usage is not None else None,
        "write_bytes": usage.write_bytes if usage is not None else None,
        "read_chars": usage.read_chars if usage is not None else None,
        "write_chars": usage.write_chars if usage is not None else None,
        "source": "ray",
    }


# --- the row sink: buffered, sent to the profiler actor off the task's path -----------------------


class RowSink:
    """Buffers rows in the worker process and sends them to the profiler in batches.

    A flush thread sends the buffer ``flush_interval_s`` after the first row of a
    batch arrives, so a burst of tiny tasks costs one actor call, not one each.
    The send is fire-and-forget: the profiler actor is restarted by Ray if it dies
    and Ray retries the call (``max_task_retries=-1``), and the store de-duplicates
    rows by ``row_id``.  Without a reachable profiler the rows go straight to the
    Parquet store under the home folder, so the task's record is never dropped.
    """

    def __init__(self, flush_interval_s: float, send: Callable[[list[dict]], None]):
        self._interval = flush_interval_s
        self._send = send
        self._rows: list[dict] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, row: dict) -> None:
        with self._cond:
            self._rows.append(row)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="raysched-row-sink", daemon=True)
                self._thread.start()
            self._cond.notify()

    def flush(self) -> None:
        with self._cond:
            rows, self._rows = self._rows, []
        if rows:
            self._send(rows)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._rows:
                    self._cond.wait()
            time.sleep(self._interval)  # let a burst of rows gather into one batch
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a lost batch is logged, the thread lives on
                logger.exception("raysched: could not send profile rows")


_sink: RowSink | None = None
_sink_lock = threading.Lock()


def _send_rows(config: RayschedConfig) -> Callable[[list[dict]], None]:
    handle: list[Any] = []

    def send(rows: list[dict]) -> None:
        try:
            if not handle:
                handle.append(ray.get_actor(PROFILER_NAME, namespace=NAMESPACE))
            handle[0].record.remote(rows)
        except Exception as exc:  # noqa: BLE001 - the actor is gone: write the rows ourselves
            handle.clear()
            logger.warning("raysched: profiler unreachable (%s); writing %d rows to the store directly", exc, len(rows))
            from ..store.profiles import ProfileStore

            ProfileStore(config.home_path).append(rows)

    return send


def get_sink(config: RayschedConfig) -> RowSink:
    global _sink
    with _sink_lock:
        if _sink is None:
            _sink = RowSink(config.flush_interval_s, _send_rows(config))
            atexit.register(_sink.flush)
        return _sink


# --- live samples: the last known use of an attempt, for the retry that follows a kill -----------


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def _publish_live(spec: AttemptSpec) -> Callable[[Any, LiveSample], None]:
    def publish(_key: Any, sample: LiveSample) -> None:
        value = json.dumps(
            {"peak_rss_bytes": sample.peak_rss_bytes, "cpu_seconds": sample.cpu_seconds,
             "wall_seconds": sample.wall_seconds, "read_bytes": sample.read_bytes,
             "write_bytes": sample.write_bytes, "timestamp": sample.timestamp}
        ).encode()
        _kv()._internal_kv_put(spec.live_key, value, overwrite=True, namespace=LIVE_KV_NAMESPACE)
        published.add(spec.live_key)

    published = _published
    return publish


_published: set[str] = set()


def _last_live_usage(spec: AttemptSpec) -> Usage | None:
    try:
        raw = _kv()._internal_kv_get(spec.live_key, namespace=LIVE_KV_NAMESPACE)
    except Exception:  # noqa: BLE001
        return None
    if not raw:
        return None
    s = json.loads(raw)
    return Usage(peak_rss_bytes=int(s["peak_rss_bytes"]), cpu_seconds=float(s["cpu_seconds"]),
                 wall_seconds=float(s["wall_seconds"]), read_bytes=int(s["read_bytes"]),
                 write_bytes=int(s["write_bytes"]))


def _forget_live(spec: AttemptSpec) -> None:
    if spec.live_key in _published:
        _published.discard(spec.live_key)
        try:
            _kv()._internal_kv_del(spec.live_key, namespace=LIVE_KV_NAMESPACE)
        except Exception:  # noqa: BLE001
            pass


# --- why did the previous Ray attempt die? ------------------------------------------------------------


def previous_attempt_cause(task_id: str, attempt_number: int, timeout_s: float = 4.0) -> str | None:
    """Ray's error type for the attempt before ``attempt_number`` of this task, if Ray tells.

    Read from Ray's state API (task events arrive about a second late, hence the
    short poll).  None when the state API is not available (no dashboard).
    """
    try:
        from ray.util.state import get_task
    except Exception:  # noqa: BLE001
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = get_task(task_id, timeout=2, _explain=False)
        except Exception:  # noqa: BLE001 - no dashboard / API server: the cause is unknown
            return None
        attempts = found if isinstance(found, list) else [found] if found is not None else []
        for info in attempts:
            if getattr(info, "attempt_number", None) == attempt_number - 1 and getattr(info, "error_type", None):
                return str(info.error_type)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.25)


def _ray_attempt_number() -> int:
    try:
        return int(ray._private.worker.global_worker.core_worker.get_current_task_attempt_number())
    except Exception:  # noqa: BLE001 - an older Ray: treat every run as a first one
        return 0


# --- the entry point ---------------------------------------------------------------------------------------


_NODE_ID: list[str] = []


def _node_id() -> str:
    """This worker's node (a worker process never changes node)."""
    if not _NODE_ID:
        try:
            _NODE_ID.append(ray.get_runtime_context().get_node_id())
        except Exception:  # noqa: BLE001
            return ""
    return _NODE_ID[0]


def run_measured(fn: Callable[..., Any], spec: AttemptSpec, args: tuple, kwargs: Mapping[str, Any]) -> Any:
    """Run one attempt of the user's function, measured; record its row whatever happens."""
    sink = get_sink(spec.config)
    meter = AttemptMeter()
    started = time.time()
    meter.start()
    sampler = get_live_sampler(spec.config.live_interval_s)
    sampler.register(spec.live_key, meter, _publish_live(spec))
    outcome, error = Outcome.OK, ""
    try:
        return fn(*args, **kwargs)
    except (KeyboardInterrupt, ray.exceptions.TaskCancelledError) as exc:
        outcome, error = Outcome.CANCELLED, repr(exc)
        raise
    except BaseException as exc:
        outcome, error = Outcome.ERROR, f"{type(exc).__name__}: {exc}"
        raise
    finally:
        sampler.unregister(spec.live_key)
        usage = meter.stop()
        sink.add(attempt_row(spec, outcome, usage, started, time.time(), error, _node_id(), os.getpid()))
        _forget_live(spec)


def _unwrap(exc: BaseException) -> BaseException:
    """The user's or raysched's own exception inside Ray's wrapping, so nesting adds no layers."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def recover(fn: Callable[..., Any], spec: AttemptSpec, args: tuple, kwargs: Mapping[str, Any],
            resubmit: Callable[[AttemptSpec, tuple, Mapping[str, Any]], Any]) -> Any:
    """Ray is retrying this task because its worker died: find out why and act.

    - killed for memory (Ray says OUT_OF_MEMORY, or Ray cannot say): record the
      killed attempt with its last live use, climb the ladder, resubmit with the
      bigger allocation and return that attempt's value;
    - an exception the user asked Ray to retry (``retry_exceptions``): the failed
      attempt already recorded itself; run again;
    - any other death (the worker was killed, its node died): record it and run
      the function again here, with the same resources.
    """
    attempt_number = _ray_attempt_number()
    task_id = ray.get_runtime_context().get_task_id() or ""
    cause = previous_attempt_cause(task_id, attempt_number)
    if cause == "TASK_EXECUTION_EXCEPTION":
        return run_measured(fn, spec, args, kwargs)
    usage = _last_live_usage(spec)
    now = time.time()
    started = now - (usage.wall_seconds if usage else 0.0)
    memory_kill = cause in (None, "OUT_OF_MEMORY")
    outcome = Outcome.OOM_KILLED if memory_kill else Outcome.ERROR
    reason = {None: "worker died; Ray's state API could not say why (no dashboard), treated as a memory kill",
              "OUT_OF_MEMORY": "killed by Ray's memory monitor"}.get(cause, f"worker died: {cause}")
    get_sink(spec.config).add(attempt_row(spec, outcome, usage, started, now, reason))
    _forget_live(spec)
    if not memory_kill:
        next_spec = replace(spec, attempt=spec.attempt + 1,
                            prior=spec.prior + (AttemptRecord(spec.attempt, spec.allocation, outcome, usage, reason),))
        if next_spec.attempt > spec.config.max_attempts:
            raise AttemptsExhausted(spec.function, next_spec.prior, "workers kept dying")
        return run_measured(fn, next_spec, args, kwargs)
    failed = spec.prior + (AttemptRecord(spec.attempt, spec.allocation, outcome, usage, reason),)
    ladder = build_ladder(spec.config)
    # This retry keeps its own `memory` label while it waits for the next attempt
    # (Ray releases a blocked task's CPU, not its memory), so the next attempt must
    # fit beside it: cap the ladder at the largest node less that label.
    room = None
    if spec.largest_node_bytes:
        room = max(spec.largest_node_bytes - spec.allocation.memory_bytes, spec.allocation.memory_bytes)
    state = LadderState(spec.prediction, failed, spec.max_peak_seen, room)
    allocation = ladder.next_allocation(state)
    if allocation is None:
        raise AttemptsExhausted(spec.function, failed, "killed for memory on every rung of the ladder")
    next_spec = replace(spec, attempt=spec.attempt + 1, allocation=allocation, prior=failed)
    ref = resubmit(next_spec, args, kwargs)
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        raise _unwrap(exc) from None
    except (KeyboardInterrupt, ray.exceptions.TaskCancelledError):
        ray.cancel(ref, force=True)
        raise


def encode_spec(spec: AttemptSpec) -> bytes:
    """The spec as the task's first argument: plain pickle, without the config.

    cloudpickle (what Ray would use on the dataclass) costs several times more per
    call than the standard pickler on these importable classes, and the config,
    the largest part, travels once with the exported entry function instead.
    """
    return pickle.dumps(replace(spec, config=None) if spec.config is not None else spec, protocol=5)


def make_entry(fn: Callable[..., Any], config: RayschedConfig) -> Callable[..., Any]:
    """The function Ray runs: the user's function behind the measuring wrapper."""

    def entry(spec_bytes: bytes, *args: Any, **kwargs: Any) -> Any:
        spec = replace(pickle.loads(spec_bytes), config=config)
        if _ray_attempt_number() > 0:
            return recover(fn, spec, args, kwargs, _resubmitter(fn, config))
        return run_measured(fn, spec, args, kwargs)

    entry.__name__ = getattr(fn, "__name__", "task")
    entry.__qualname__ = getattr(fn, "__qualname__", entry.__name__)
    entry.__module__ = getattr(fn, "__module__", __name__)
    entry.__doc__ = getattr(fn, "__doc__", None)
    return entry


_remote_cache: dict[int, Any] = {}


def remote_options(spec: AttemptSpec) -> dict[str, Any]:
    """The Ray options an attempt is submitted with: the caller's, then raysched's sizing."""
    options = dict(spec.ray_options)
    options.update(spec.allocation.ray_options())
    # At least one Ray retry: it is how a memory-killed attempt hands over to the ladder.
    options["max_retries"] = max(1, int(options.get("max_retries", 3)))
    options.setdefault("name", spec.function.rsplit(".", 1)[-1])
    return options


def _resubmitter(fn: Callable[..., Any], config: RayschedConfig) -> Callable[[AttemptSpec, tuple, Mapping[str, Any]], Any]:
    def resubmit(spec: AttemptSpec, args: tuple, kwargs: Mapping[str, Any]) -> Any:
        remote = _remote_cache.get(id(fn))
        if remote is None:
            remote = _remote_cache[id(fn)] = ray.remote(make_entry(fn, config))
        return remote.options(**remote_options(spec)).remote(encode_spec(spec), *args, **kwargs)

    return resubmit


def is_raysched_error(exc: BaseException) -> bool:
    return isinstance(_unwrap(exc), RayschedError)
