"""What runs inside the Ray worker: the thin measuring wrapper around the user's function.

The driver submits the user's function directly, wrapped by ``make_entry``, with
the predicted resources; the happy path costs one measurement and one buffered
row, and returns the function's value as the task's own value, so the
``ObjectRef`` the user holds is the real one.  Once a function's calls in this
process proved tiny, most of them cost less still: ``policy.thinning`` picks one
in ``short_call_measure_every`` (at most one per ``short_call_measure_gap_s``) to
measure, and the others are only timed and
counted in the ``calls`` of a row of the same batch (``rows.RowSink.add_unmeasured``).

Extra work happens only after a failure.  raysched submits every task with
one Ray retry more than the caller's ``max_retries`` leaves (``remote_options``),
so when Ray's memory monitor kills an attempt, Ray runs the same task again in a
fresh worker.  That retry does not rerun the function with
the same resources: it records the killed attempt (with the last live sample of
its use), asks the escalation ladder for the next allocation, submits the
function with it, and returns that attempt's value as its own.  The user's
``ObjectRef`` therefore resolves to the value of the attempt that succeeded, or to
``AttemptsExhausted`` after ``max_attempts``.  A worker that died for another
reason is recorded and the function rerun in the retry, as plain Ray would, while
the caller's ``max_retries`` allows (``WorkerDied`` once it does not).

The live monitor (``runtime.monitor``) sees every attempt that runs longer than
one live interval: the sampler thread's callback feeds this process's one
``LiveReporter`` and looks up the monitor's answer (a dict lookup, never a
wait).  A stop is applied to the running attempt in two steps: first an
exception raised into the task's thread (``PyThreadState_SetAsyncExc``), which
``run_measured`` turns into the action: ``stop_and_resubmit`` records the
attempt as ``oom_killed`` and climbs the ladder as after a memory kill,
``stop_limit`` records ``limit_stopped`` and fails with
``ResourceLimitExceeded``, ``cancel`` records ``cancelled`` and fails with
``StoppedByMonitor``, ``requeue_lowest_priority`` records ``cancelled`` and
resubmits with the same allocation.  A task still running
``monitor_hard_stop_intervals`` later (stuck in C code) has its worker killed
with SIGKILL after a stop marker is written; Ray's retry runs ``recover``,
which reads the marker (or asks the monitor) before guessing the cause and
applies the same action.  Without a reachable monitor, tasks run unwatched and
still record their rows.

Beside this module: ``spec`` (the attempt's spec and how it travels with its task),
``rows`` (its profile row and the sink that batches rows to the profiler) and
``options`` (the Ray options an attempt is submitted with).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import gc
import json
import logging
import os
import signal
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping

import ray

from ..config import RayschedConfig
from ..errors import AttemptsExhausted, RayschedError, StoppedByMonitor
from ..policy.thinning import ShortCallThinning, thinning_from_config
from ..types import AttemptRecord, Outcome, Usage
from .measure import AttemptMeter, DeferredMeter, LiveSample, get_live_sampler
from .options import ask_a_return, definition_options, ray_remote, remote_options, retry_budget
from .rows import OnePerHome, RowSink, attempt_row, attempt_row_id, flush_all_sinks, get_sink
from .session import NAMESPACE, adopt_config, get_config, monitor_name
from .spec import AttemptSpec, decode_spec, encode_spec

logger = logging.getLogger(__name__)


LIVE_KV_NAMESPACE = "raysched_live"


# --- live samples: the last known use of an attempt, for the retry that follows a kill -----------


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


# Markers and live samples in Ray's KV are hints for a later retry: a KV that cannot be
# reached costs the hint (logged by the caller where it matters), never the task.
def _kv_put(key: str, value: bytes) -> bool:
    try:
        _kv()._internal_kv_put(key, value, overwrite=True, namespace=LIVE_KV_NAMESPACE)
        return True
    except Exception:  # noqa: BLE001
        return False


def _kv_get(key: str) -> bytes | None:
    try:
        return _kv()._internal_kv_get(key, namespace=LIVE_KV_NAMESPACE) or None
    except Exception:  # noqa: BLE001
        return None


def _kv_del(key: str) -> None:
    try:
        _kv()._internal_kv_del(key, namespace=LIVE_KV_NAMESPACE)
    except Exception:  # noqa: BLE001
        pass


def _publish_live(spec: AttemptSpec, sample: LiveSample) -> None:
    value = json.dumps(
        {"peak_rss_bytes": sample.peak_rss_bytes, "cpu_seconds": sample.cpu_seconds,
         "wall_seconds": sample.wall_seconds, "read_bytes": sample.read_bytes,
         "write_bytes": sample.write_bytes, "timestamp": sample.timestamp,
         "start_rss_bytes": sample.start_rss_bytes}
    ).encode()
    _kv()._internal_kv_put(spec.live_key, value, overwrite=True, namespace=LIVE_KV_NAMESPACE)
    _published.add(spec.live_key)


_published: set[str] = set()


def _last_live_usage(spec: AttemptSpec) -> Usage | None:
    raw = _kv_get(spec.live_key)
    if raw is None:
        return None
    s = json.loads(raw)
    return Usage(peak_rss_bytes=int(s["peak_rss_bytes"]), cpu_seconds=float(s["cpu_seconds"]),
                 wall_seconds=float(s["wall_seconds"]), read_bytes=int(s["read_bytes"]),
                 write_bytes=int(s["write_bytes"]), start_rss_bytes=int(s.get("start_rss_bytes", 0)))


def _forget_live(spec: AttemptSpec, force: bool = False) -> None:
    """Delete the attempt's live sample (``force``: also when another process published it)."""
    if force or spec.live_key in _published:
        _published.discard(spec.live_key)
        _kv_del(spec.live_key)


# --- why did the previous Ray attempt die? ------------------------------------------------------------


def previous_attempt_cause(task_id: str, attempt_number: int, timeout_s: float = 4.0) -> str | None:
    """Ray's error type for the attempt before ``attempt_number`` of this task, if Ray tells.

    Read from Ray's state API (task events arrive about a second late, hence the
    short poll).  None when the state API is not available (no dashboard).
    """
    try:
        from ray.util.state import get_task

        # This cluster's own address: without one, the state API goes to the cluster named
        # in Ray's "current cluster" file, which a `ray start` cluster that ended without
        # `ray stop` leaves behind, and waits ~40 s per lookup for its dead GCS.
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = get_task(task_id, address=address, timeout=2, _explain=False)
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


# --- the live monitor: reports out, stops in ------------------------------------------------------------

def _new_reporter(config: RayschedConfig) -> Any:
    from .monitor import ray_live_reporter  # imported off the task's path: in the sampler thread

    return ray_live_reporter(config)


#: This process's LiveReporters, one per monitor (per home), as the sinks.
_reporters = OnePerHome(monitor_name, _new_reporter)
_reporter_pid: int | None = None
_reporter_lock = threading.Lock()


def get_reporter(config: RayschedConfig, create: bool = True) -> Any:
    """This worker process's LiveReporter to the monitor of ``config``'s home (None when the
    monitor is disabled, or, with ``create=False``, when none was made yet)."""
    global _reporter_pid
    if not config.monitor_enabled:
        return None
    if _reporter_pid != os.getpid():
        with _reporter_lock:
            if _reporter_pid != os.getpid():  # a forked process: its parent's reporters are not its own
                _reporters.clear()
                _reporter_pid = os.getpid()
    return _reporters.get(config, create)


class _MonitorStop(BaseException):
    """Raised into a task's thread when the monitor stops its attempt; ``run_measured`` catches it.

    A BaseException, so that the user's ``except Exception`` does not swallow it.
    """


def _set_async_exc(thread_id: int, exc_type: type[BaseException] | None) -> int:
    """Raise ``exc_type`` in a thread at its next bytecode (None: clear a pending one)."""
    obj = ctypes.py_object(exc_type) if exc_type is not None else None
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), obj)


class _Running:
    """One running attempt as the sampler thread sees it; ``lock`` orders a stop against the end."""

    __slots__ = ("thread_id", "spec", "started_at", "lock", "done", "stop", "stop_at")

    def __init__(self, thread_id: int, spec: AttemptSpec, started_at: float):
        self.thread_id = thread_id
        self.spec = spec
        self.started_at = started_at  # time.time() at the attempt's start: its child processes came later
        self.lock = threading.Lock()
        self.done = False
        self.stop: Any = None  # the monitor's Decision once raised into the thread
        self.stop_at = 0.0  # time.monotonic() of that

    def finish(self) -> Any:
        """The attempt has ended (idempotent): no stop is raised into it any more; returns the stop, if any.

        A stop raised just before the end may still be pending in the thread:
        it is cleared, so that it cannot fire later in unrelated code.
        """
        with self.lock:
            if not self.done:
                self.done = True
                if self.stop is not None:
                    _set_async_exc(self.thread_id, None)
            return self.stop


_STOP_OUTCOMES = {
    "stop_and_resubmit": Outcome.OOM_KILLED,
    "stop_limit": Outcome.LIMIT_STOPPED,
    "cancel": Outcome.CANCELLED,
    "requeue_lowest_priority": Outcome.CANCELLED,
}


def _stop_reason(decision: Any, how: str = "stopped by raysched's monitor") -> str:
    return f"{how} ({decision.rule}, {decision.action}): {decision.detail}"


_KILLED_BY_RAYSCHED = "worker killed by raysched: it did not stop when its monitor asked"
_DIED_BEFORE_STOP = "worker died before raysched's monitor could stop it"


def _stop_key(spec: AttemptSpec) -> str:
    return f"stop:{spec.live_key}"


def _put_stop_marker(spec: AttemptSpec, decision: Any, recorded: bool) -> None:
    """Tell a later Ray retry of this task that the monitor stopped this attempt (and whether its row is written)."""
    value = json.dumps({"decision": dataclasses.asdict(decision), "recorded": recorded}).encode()
    if not _kv_put(_stop_key(spec), value):  # the retry then asks the monitor
        logger.warning("raysched: could not write the stop marker of %s", spec.live_key)


def _stop_marker(spec: AttemptSpec) -> tuple[Any, bool] | None:
    from ..policy.rules import Decision

    raw = _kv_get(_stop_key(spec))
    if raw is None:
        return None
    try:
        found = json.loads(raw)
        return Decision(**found["decision"]), bool(found["recorded"])
    except Exception:  # noqa: BLE001 - an unreadable marker is no marker
        return None


def _drop_stop_marker(spec: AttemptSpec) -> None:
    _kv_del(_stop_key(spec))


def _mark_failed_stop(spec: AttemptSpec, decision: Any) -> None:
    """Before a stop that fails the call (a hard limit, a cancel) is raised: a stop marker, recorded,
    for Ray's retry of the task if Ray retries that error (``retry_exceptions``), so that it fails
    the same way instead of rerunning the function; else none. No retry reads it then, and every
    call stopped so stayed in Ray's KV for the cluster's life."""
    if _ray_retries(spec, _stop_error(spec, decision)):
        _put_stop_marker(spec, decision, recorded=True)
    else:
        _drop_stop_marker(spec)  # the marker a hard stop left for this retry, read now


def _monitor_directive(spec: AttemptSpec) -> Any:
    """The stop the monitor decided for exactly this attempt, if it is reachable and decided one."""
    if not spec.config.monitor_enabled:
        return None
    try:
        monitor = ray.get_actor(monitor_name(spec.config), namespace=NAMESPACE)
        found = ray.get(monitor.directives.remote([spec.call_id]), timeout=spec.config.monitor_directive_timeout_s)
    except Exception:  # noqa: BLE001 - no monitor, or restarting: the cause is guessed as before
        return None
    decision = found.get(spec.call_id)
    return decision if decision is not None and decision.attempt == spec.attempt and decision.stops else None


def _hard_stop(running: _Running) -> None:
    """The attempt ignored its stop: leave a marker, send this process's rows, and kill the worker.

    Called with ``running.lock`` held, so the task cannot end meanwhile.
    """
    spec = running.spec
    logger.warning("raysched: attempt %s did not stop within %.1f s of the monitor's %s; killing its worker",
                   spec.live_key, time.monotonic() - running.stop_at, running.stop.action)
    _put_stop_marker(spec, running.stop, recorded=False)
    try:
        flush_all_sinks(wait_s=2.0)  # rows of earlier tasks of this worker must not die with it
    except Exception:  # noqa: BLE001
        logger.exception("raysched: could not flush profile rows before the kill")
    # Its children would outlive the worker, holding their memory (and a forked child the
    # worker's socket, so that Ray would not see the worker die).
    end_child_processes(running.started_at, grace_s=0.0)
    os.kill(os.getpid(), signal.SIGKILL)


def end_child_processes(since: float, grace_s: float = 0.5) -> int:
    """End the processes this worker started (directly or not) since ``since`` (``time.time()``):
    SIGTERM, then SIGKILL for those still alive after ``grace_s``.  Returns how many there were.

    A stopped attempt's children are part of it: left running, a leaking child kept
    growing after its task failed at its hard cap, and one its task waited for
    (``Process.join()``, blocked in C) kept the stop from ever reaching the task.
    Processes started before the attempt (a pool an earlier task left) are not its own.
    """
    import psutil

    from .measure import started_since

    try:
        children = [c for c in psutil.Process().children(recursive=True) if started_since(c.pid, since)]
    except psutil.Error:
        return 0
    for child in children:
        try:
            child.send_signal(signal.SIGKILL if grace_s <= 0 else signal.SIGTERM)
        except psutil.Error:
            pass
    if grace_s > 0 and children:
        _, alive = psutil.wait_procs(children, timeout=grace_s)
        for child in alive:
            try:
                child.kill()
            except psutil.Error:
                pass
    if children:
        logger.info("raysched: ended %d child process(es) of a stopped attempt", len(children))
    return len(children)


def _on_live(spec: AttemptSpec, running: _Running,
             room: float | None = None) -> Callable[[Any, LiveSample], None]:
    """The sampler thread's callback: publish the sample, report it, apply a stop the monitor decided.

    ``room``: the most the ladder may give the next attempt (``ladder_room``), reported so
    that the monitor does not stop an attempt for which no bigger one fits."""

    def on_sample(_key: Any, sample: LiveSample) -> None:
        try:
            _publish_live(spec, sample)
        except Exception:  # noqa: BLE001 - the retry then records the attempt without its last use
            logger.debug("raysched: could not publish the live sample of %s", spec.live_key)
        if running.stop is not None:
            with running.lock:
                waited = time.monotonic() - running.stop_at
                if not running.done and waited >= spec.config.monitor_hard_stop_intervals * spec.config.live_interval_s:
                    _hard_stop(running)
            return
        reporter = get_reporter(spec.config)
        if reporter is None:
            return
        from .monitor import report_from

        reporter.add(report_from(spec, sample, _node_id(), ladder_room_bytes=room))
        decision = reporter.directive(spec.call_id, spec.attempt)
        if decision is None or not decision.stops:
            return
        with running.lock:
            if running.done or running.stop is not None:
                return
            running.stop, running.stop_at = decision, time.monotonic()
            _set_async_exc(running.thread_id, _MonitorStop)
        # Outside the lock (it waits for them): the attempt's children end with it, and a
        # task blocked waiting for one of them gets back to Python, where the stop is raised.
        end_child_processes(running.started_at)

    return on_sample


_NO_DEFERRAL = contextlib.nullcontext()


try:
    from ray._private.utils import DeferSigint as _DeferSigint
except ImportError:  # pragma: no cover - an older or newer Ray: the race stays
    _DeferSigint = None


def _cancel_deferred() -> contextlib.AbstractContextManager:
    """Ray's own guard against its soft cancel (it defers SIGINT in the main thread, where Ray
    runs a task, and raises the KeyboardInterrupt on leaving); a no-op elsewhere, or on a Ray
    without it.  Looked up once, at import: it runs at the end of every measured attempt."""
    return _DeferSigint.create_if_main_thread() if _DeferSigint is not None else _NO_DEFERRAL


def run_measured(fn: Callable[..., Any], spec: AttemptSpec, args: tuple, kwargs: Mapping[str, Any],
                 resubmit: Callable[[AttemptSpec, tuple, Mapping[str, Any]], Any] | None = None,
                 thinning: ShortCallThinning | None = None) -> Any:
    """Run one attempt of the user's function, measured; record its row whatever happens.

    When the monitor stops the attempt, apply its action (see the module
    docstring); ``resubmit`` submits the next attempt of a stopped one.
    ``thinning``: the function's measure-or-count state in this process; a call it
    does not measure is timed, watched from its first live sample on
    (``DeferredMeter``), and if it returns in time only counted.
    """
    sink = get_sink(spec.config)
    begun = time.monotonic()
    measured = thinning is None or thinning.measure_next(begun)
    meter = AttemptMeter(owner=spec.function) if measured else DeferredMeter(owner=spec.function)
    started = time.time()
    meter.start()
    sampler = get_live_sampler(spec.config.live_interval_s)
    running = _Running(threading.get_ident(), spec, started)
    outcome, error, stop, usage = Outcome.OK, "", None, None
    ending: BaseException | None = None  # the user's exception, or a SystemExit
    # A later attempt's call may have earlier tasks waiting for it, holding their labels
    # (read once, here: they wait until this attempt ends); a first attempt has none.
    room = ladder_room(spec) if spec.attempt > 1 and spec.config.monitor_enabled else None
    try:
        sampler.register(spec.live_key, meter, _on_live(spec, running, room))
        value = fn(*args, **kwargs)
        running.finish()
        return value
    except _MonitorStop:
        stop = running.finish()
        outcome, error = _STOP_OUTCOMES[stop.action], _stop_reason(stop)
    except (KeyboardInterrupt, ray.exceptions.TaskCancelledError) as exc:
        running.finish()
        outcome = Outcome.CANCELLED
        error = _describe(exc, repr)
        raise
    except BaseException as exc:
        running.finish()
        outcome = Outcome.ERROR  # before the text: a user's __str__ may raise
        error = _describe(exc, lambda e: f"{type(e).__name__}: {e}")
        ending = exc
        raise
    finally:
        # Ray's soft cancel (ray.cancel) interrupts the task's thread at any point until the
        # task returns, this bookkeeping included: a KeyboardInterrupt here lost the attempt's
        # row and left it registered with the live sampler. A measured attempt's is deferred
        # to the end of it (~8 us); a thinned call's, which records a count, is not.
        with _cancel_deferred() if measured else _NO_DEFERRAL:
            sampler.unregister(spec.live_key)
            usage = meter.stop()
            if usage is None and outcome is Outcome.OK:
                sink.add_unmeasured(spec, started, time.time())
            else:
                sink.add_attempt(spec, outcome, usage, started, time.time(), error, _node_id(), os.getpid())
            if ending is not None:
                _note_ending(spec, ending, sink)
            if spec.attempt > 1:
                # A later attempt's row may be its call's last, and the driver counts a call as
                # recorded once any row of it is stored (it cannot know how many attempts ran
                # here): stored before the value or the error reaches the caller, so that
                # flush() and ray.shutdown() right after ray.get() keep it. Only calls that
                # already failed once pay the wait.
                sink.flush(wait_s=_RECOVER_FLUSH_WAIT_S)
            if thinning is not None:
                wall = usage.wall_seconds if usage is not None else meter.wall_seconds
                growth = usage.task_rss_bytes if usage is not None and measured else None
                thinning.observe(measured, outcome is Outcome.OK, wall, growth, begun)
            _forget_live(spec)
            reporter = get_reporter(spec.config, create=False)
            if reporter is not None:
                reporter.ended(spec.call_id, spec.attempt, time.time())  # its memory is free now
    # Only a stop gets here.  The exception and its traceback (which held the user's
    # frames and their memory) are gone; collect what cycles kept, before waiting on the next attempt.
    gc.collect()
    end_child_processes(started)  # any it started after the stop was raised (a pool refilling itself)
    if stop.action in ("stop_limit", "cancel"):
        _mark_failed_stop(spec, stop)  # a Ray retry (retry_exceptions) must not rerun it
    return _apply_stop(fn, spec, stop, usage, error, args, kwargs, resubmit or _resubmitter(fn, spec.config))


def _ray_retries(spec: AttemptSpec, exc: BaseException) -> bool:
    """Whether Ray will run this attempt's task again after ``exc``: ``retry_exceptions``
    (True, or a list of types) takes it, and the caller's ``max_retries`` has room for it
    (``remote_options`` gives the task only what is left of it; reruns spent it)."""
    wanted = dict(spec.ray_options).get("retry_exceptions")
    if not wanted or not isinstance(exc, Exception):
        return False  # a SystemExit ends the worker: that is a death, not a retried exception
    if isinstance(wanted, (list, tuple)) and not isinstance(exc, tuple(wanted)):
        return False
    budget = retry_budget(spec)
    return budget < 0 or spec.reruns < budget


#: What an attempt's worker saw end it, for Ray's retry of its task: an exception Ray
#: retries (Ray's state API's own name for it), or the function's ``sys.exit()``.
_RAISED, _EXITED = "TASK_EXECUTION_EXCEPTION", "EXITED"


def _raised_key(task_spec: AttemptSpec, ray_attempt: int) -> str:
    return f"{_raised_prefix(task_spec)}{ray_attempt}"


def _raised_prefix(task_spec: AttemptSpec) -> str:
    """What the keys of ``task_spec``'s task's raise notes start with (one per Ray attempt)."""
    return f"raised:{task_spec.live_key}:"


def _note_ending(spec: AttemptSpec, exc: BaseException, sink: "RowSink") -> None:
    """After the user's exception: tell Ray's retry that it was one, or save the rows before an exit.

    Ray's retry of the task (``recover``) would otherwise learn the cause only from Ray's
    state API, which needs the dashboard: without it, an exception retried under
    ``retry_exceptions`` looked like a memory kill, and the ladder climbed for it.
    """
    task_spec = _TASK_SPEC.get()
    if isinstance(exc, SystemExit):
        # The worker process ends with it. Ray's retry (raysched always leaves it one) must not
        # take the exit for a memory kill; and rows still buffered, of earlier calls too, would die.
        # Not for an attempt its call has moved on from: that is Ray ending an orphan, which no
        # retry follows, and its note stayed in Ray's KV for good (a CI run's fault test).
        if task_spec is not None and not _superseded(spec):
            _kv_put(_raised_key(task_spec, _ray_attempt_number()), _EXITED.encode())
        sink.flush(wait_s=_RECOVER_FLUSH_WAIT_S)
        return
    if task_spec is not None and _ray_retries(spec, exc):
        _kv_put(_raised_key(task_spec, _ray_attempt_number()), _RAISED.encode())


def _superseded(spec: AttemptSpec) -> bool:
    """Whether a task of ``spec``'s call has handed over to a later attempt than ``spec``'s.

    So it is when the task that handed over to ``spec`` died while waiting for it and its
    retry handed over to the next attempt (``_after_lost_handover``): Ray then ends
    ``spec``'s task, an orphan, with a SystemExit, and never retries it.  One listing of
    the call's hand-over markers, on that rare path only.
    """
    try:
        keys = _kv()._internal_kv_list(f"{_HANDOVER_PREFIX}{spec.call_id}:", namespace=LIVE_KV_NAMESPACE)
    except Exception:  # noqa: BLE001 - unknown: the note is written, as before
        return False
    for key in keys:
        handed = _spec_marker(key.decode(), spec.config)
        if handed is not None and handed.attempt > spec.attempt:
            return True
    return False


def _describe(exc: BaseException, text: Callable[[BaseException], str]) -> str:
    """``text(exc)``, or the exception's type name when its own ``__str__``/``__repr__`` raises."""
    try:
        return text(exc)
    except Exception:  # noqa: BLE001 - the user's exception class, not ours
        return f"{type(exc).__name__} (its message could not be read)"


def _apply_stop(fn: Callable[..., Any], spec: AttemptSpec, decision: Any, usage: Usage | None, reason: str,
                args: tuple, kwargs: Mapping[str, Any],
                resubmit: Callable[[AttemptSpec, tuple, Mapping[str, Any]], Any]) -> Any:
    """What follows a stopped attempt (its row is written): fail, or resubmit the next attempt."""
    if decision.action in ("stop_limit", "cancel"):
        # Once the row is stored: the retry of a task whose worker the stop killed records it
        # (``recover``), and the caller could hear the error, and shut Ray down, before it was sent.
        raise _call_ends(spec, _stop_error(spec, decision))
    record = AttemptRecord(spec.attempt, spec.allocation, _STOP_OUTCOMES[decision.action], usage, reason)
    same = decision.action == "requeue_lowest_priority"  # it gave way on its node: the same size again
    return climb_and_resubmit(spec, record, args, kwargs, resubmit, same_allocation=same,
                              run_here=lambda s: run_measured(fn, s, args, kwargs, resubmit))


def _stop_error(spec: AttemptSpec, decision: Any) -> BaseException:
    """The error a stop that fails the call ends it with."""
    if decision.action == "stop_limit":
        return decision.limit_error()
    return StoppedByMonitor(spec.function, spec.attempt, decision.rule, decision.detail)


def climb_and_resubmit(spec: AttemptSpec, failed_attempt: AttemptRecord, args: tuple, kwargs: Mapping[str, Any],
                       resubmit: Callable[[AttemptSpec, tuple, Mapping[str, Any]], Any],
                       same_allocation: bool = False,
                       run_here: Callable[[AttemptSpec], Any] | None = None) -> Any:
    """Submit the next attempt of a call one ladder rung up (or as it was) and return its value.

    Shared by the retry after a memory kill and by a stop of the monitor.  This
    task keeps its own `memory` label while it waits, so when many calls on a full
    node wait at once their labels can leave no room for any bigger attempt: a
    next attempt that has not started within ``handover_start_timeout_s`` is
    cancelled and run here instead, in this task's slot (``run_here``).  It may be
    killed again, which costs an attempt: the call then ends, one way or the
    other, within ``max_attempts`` instead of waiting for ever.
    """
    failed = spec.prior + (failed_attempt,)
    if same_allocation:
        if len(failed) >= spec.config.max_attempts:
            raise _call_ends(spec, AttemptsExhausted(spec.function, failed, "stopped by the monitor on every attempt"))
        allocation = spec.allocation
    else:
        # Imported here: the ladder's modules (the estimators', numpy) are no part of a worker's first call.
        from ..policy.ladder import LadderState
        from ..policy.recipe import build_ladder
        from ..policy.rules import MemoryOverHardCap

        ladder = build_ladder(spec.config)
        # This task keeps its own `memory` label while it waits for the next attempt
        # (Ray releases a blocked task's CPU, not its memory), and so do the call's earlier
        # tasks that wait for it in turn: the next attempt must fit beside them all, so the
        # ladder is capped at the largest node less those labels.
        room = ladder_room(spec)
        limit = MemoryOverHardCap(spec.config.memory_limit_bytes, dict(spec.config.memory_limits)).limit_for(spec.function)
        allocation = ladder.next_allocation(LadderState(spec.prediction, failed, spec.max_peak_seen, room, limit))
        if allocation is None:
            raise _call_ends(spec, AttemptsExhausted(spec.function, failed,
                                                     "killed for memory on every rung of the ladder"))
    next_spec = replace(spec, attempt=spec.attempt + 1, allocation=allocation, prior=failed)
    if same_allocation and run_here is not None:
        waited = _wait_for_room_here(spec, next_spec)
        if waited is not None:
            note = f"gave way on its node; run in place of attempt {spec.attempt} after {waited:.1f} s waiting for room"
            logger.info("raysched: %s attempt %d %s", spec.function, next_spec.attempt, note)
            in_place = replace(next_spec, allocation=replace(
                allocation, reason="; ".join(filter(None, (allocation.reason, note)))))
            return _run_in_place(spec, in_place, run_here)
    return _hand_over(spec, next_spec, args, kwargs, resubmit, run_here)


def ladder_room(spec: AttemptSpec) -> float | None:
    """The most the ladder may give the attempt after ``spec``'s (None: no largest node known):
    the largest node less the `memory` label this task keeps while it waits and those of the
    call's earlier tasks that wait in turn (their hand-over markers), at least this task's
    label. Called in the attempt's own thread (its task's label, ``_held_label``)."""
    if not spec.largest_node_bytes:
        return None
    held = _held_label(spec)
    return max(spec.largest_node_bytes - held - _labels_of_waiting_tasks(spec.call_id), held)


def _wait_for_room_here(spec: AttemptSpec, next_spec: AttemptSpec) -> float | None:
    """For a call that gave way on its node: wait in this task until the monitor promises room
    for it there (``Monitor.may_resume``); the seconds waited, or None to resubmit it instead.

    This task holds the `memory` label its next attempt needs (the same size). Resubmitted,
    that attempt would need a second one beside it while this task waits (Ray gives back a
    blocked task's CPU, not its memory), and on a full node it waited, up to
    ``handover_start_timeout_s``, while Ray filled each freed label with smaller calls.
    Here it waits for the node's real room instead, at most as long, and then runs.

    None (resubmitted): waiting is off (``requeue_room_hold_s``), another node has its labels
    free now (it may start there at once), or the monitor cannot tell.  While it waits, the
    hand-over marker says that the attempt that gave way is recorded (``recover``).
    """
    config = spec.config
    if (config.requeue_room_hold_s is None or not config.monitor_enabled
            or _held_label(spec) < next_spec.allocation.memory_bytes or _free_labels_elsewhere(next_spec)):
        return None
    try:
        monitor = ray.get_actor(monitor_name(config), namespace=NAMESPACE)
    except Exception:  # noqa: BLE001 - no monitor: resubmit
        return None
    _put_handover(spec, next_spec)
    start = time.monotonic()
    try:
        while True:
            try:
                answer = ray.get(monitor.may_resume.remote(spec.call_id, spec.attempt),
                                 timeout=config.monitor_directive_timeout_s)
            except ray.exceptions.TaskCancelledError:
                raise
            except Exception:  # noqa: BLE001 - restarting, or gone: it has forgotten the attempt anyway
                answer = None
            waited = time.monotonic() - start
            if answer is None:
                _drop_handover(spec)  # resubmitted: _hand_over writes it again
                return None
            if answer or waited >= config.handover_start_timeout_s:
                return waited
            # Once per live interval: the monitor's view of the node changes no faster.
            time.sleep(min(config.live_interval_s, max(0.0, config.handover_start_timeout_s - waited)))
    except BaseException:  # cancelled while it waited: no attempt of its own runs
        _drop_handover(spec)
        raise


def _free_labels_elsewhere(spec: AttemptSpec) -> bool:
    """Whether a node other than this one has the CPUs, `memory` and custom resources of the
    allocation free now.  Not for a call placed by its own options (a placement group, a
    scheduling strategy, a label selector): Ray puts its next attempt where they say,
    whatever is free elsewhere."""
    options = dict(spec.ray_options)
    if (options.get("placement_group") not in (None, "default")
            or options.get("scheduling_strategy") not in (None, "DEFAULT")
            or options.get("label_selector") or options.get("fallback_strategy")):
        return False
    wanted = {"CPU": spec.allocation.num_cpus, "memory": float(spec.allocation.memory_bytes)}
    wanted.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    try:
        here = _node_id()
        per_node = ray._private.state.available_resources_per_node()
    except Exception:  # noqa: BLE001 - cannot tell: wait here
        return False
    return any(node != here and all(free.get(k, 0.0) >= v for k, v in wanted.items() if v > 0)
               for node, free in per_node.items())


def _hand_over(spec: AttemptSpec, next_spec: AttemptSpec, args: tuple, kwargs: Mapping[str, Any],
               resubmit: Callable[[AttemptSpec, tuple, Mapping[str, Any]], Any],
               run_here: Callable[[AttemptSpec], Any] | None) -> Any:
    """Submit ``next_spec`` from the task of ``spec`` (whose row is written) and return its value.

    While it waits, a marker in Ray's KV says that ``spec``'s attempt is recorded and
    handed over: if Ray kills this waiting task (its memory monitor may), Ray's retry
    reads it in ``recover`` and neither records the attempt again nor reuses the
    next attempt's number (that attempt lost its owner with this task).
    """
    _put_handover(spec, next_spec)
    returned = resubmit(next_spec, args, kwargs)
    # One ref, or a list of them under num_returns > 1 (a task makes them all at once, so the
    # first says when it started or ended); ray.get of the list is this task's values, in order.
    ref = returned[0] if isinstance(returned, list) else returned
    try:
        if run_here is not None and not _started_within(ref, next_spec, spec.config.handover_start_timeout_s,
                                                        spec.config.handover_held_room_s, _handover_key(spec)):
            ray.cancel(ref)  # still queued behind held labels: it will not run
            logger.warning("raysched: %s attempt %d found no room for %d MiB; running it in place",
                           spec.function, next_spec.attempt, next_spec.allocation.memory_bytes // 2**20)
            # Judged by the allocation the ladder gave it, not by this task's smaller label:
            # under that label it would only be stopped again at the same point. The waiting
            # tasks whose labels fill the node hold little memory, and the monitor's node rule
            # still watches the node itself.
            held = spec.allocation.memory_bytes // 2**20
            note = f"run in place of attempt {spec.attempt}, under its {held} MiB label"
            in_place = replace(next_spec, allocation=replace(
                next_spec.allocation, reason="; ".join(filter(None, (next_spec.allocation.reason, note)))))
            return _run_in_place(spec, in_place, run_here)
        try:
            return ray.get(returned)
        except ray.exceptions.OutOfMemoryError as exc:
            if isinstance(exc, ray.exceptions.RayTaskError):
                raise  # the attempt's own code raised it (a child of its own was killed): the call's error
            # Ray killed the next attempt's task for memory and will not retry it, so no
            # ``recover`` of it runs: Ray's legacy killing policy (the default before Ray
            # 2.56, or with RAY_worker_killing_policy_by_group=true) kills the last task of
            # its caller without a retry, and a handed-over attempt is always its waiting
            # task's only one. This task acts as its retry would have (below).
            pass
    except ray.exceptions.RayTaskError as exc:
        # As it is: its text has the attempt's own traceback, the user's frames (its cause
        # alone, re-raised here, had only this task's raysched frames). It is the user's
        # error type too (Ray makes it an instance of its cause's class).
        raise exc.with_traceback(None) from None
    except (KeyboardInterrupt, ray.exceptions.TaskCancelledError):
        # The call was cancelled while this task waited: cancel the attempt softly first, so
        # that it records itself as cancelled (a forced cancel kills its worker, row and all).
        ray.cancel(ref)
        if not _ended_within(next_spec, _CANCEL_GRACE_S):
            # It did not take the interrupt (stuck in C code, or it caught it): killed with its
            # worker, it records nothing, so this task records it, with its last live use.
            ray.cancel(ref, force=True)
            _record_for(next_spec, Outcome.CANCELLED, _last_live_usage(next_spec),
                        f"cancelled; it did not stop within {_CANCEL_GRACE_S:g} s of a soft cancel and was killed")
        elif _never_started(ref, next_spec, _CANCEL_GRACE_S):
            # Cancelled in Ray's queue: none of its code ran to record it, so this task does,
            # so that the call's rows end with its cancel, not with the attempt before it.
            _record_for(next_spec, Outcome.CANCELLED, None, "cancelled before it started (it waited in Ray's queue)")
        raise
    finally:
        _drop_handover(spec)
        _kv_del(_started_key(next_spec))
    return _after_unretried_kill(next_spec, args, kwargs, resubmit, run_here)


def _after_unretried_kill(killed_task: AttemptSpec, args: tuple, kwargs: Mapping[str, Any],
                          resubmit: Callable[[AttemptSpec, tuple, Mapping[str, Any]], Any],
                          run_here: Callable[[AttemptSpec], Any] | None) -> Any:
    """What ``recover`` would have done in the retry of ``killed_task``'s Ray task, which Ray
    killed for memory without one: done by the task that waited for it.

    The attempt that died is the last one that task ran (``_last_run_here``: an attempt
    run in place), and if it had handed over in turn, the attempt it waited for died with
    it (``_after_lost_handover``).  While this task climbs, a rerun marker names that
    attempt, so that Ray's retry of this task, if this one dies too, goes on from there
    instead of recording this task's own attempt again.
    """
    failed = _last_run_here(killed_task) or killed_task
    task_spec = _TASK_SPEC.get()
    marked = task_spec is not None and _kv_put(_run_here_key(task_spec), encode_spec(failed))

    def go_on() -> Any:
        handed = _handed_over(failed)
        if handed is not None:
            return _after_lost_handover(failed, handed, args, kwargs, resubmit, run_here)
        return climb_and_resubmit(failed, _killed_unretried(failed), args, kwargs, resubmit, run_here=run_here)

    return _run_marked(task_spec, failed, go_on) if marked else go_on()


def _killed_unretried(spec: AttemptSpec) -> AttemptRecord:
    """Record the attempt ``spec``, which Ray killed for memory without a retry, with its last
    live use; the record the ladder climbs from."""
    usage = _last_live_usage(spec)
    reason = "killed by Ray's memory monitor, which did not retry it (the last task of its caller)"
    _record_for(spec, Outcome.OOM_KILLED, usage, reason)
    return AttemptRecord(spec.attempt, spec.allocation, Outcome.OOM_KILLED, usage, reason)


def _record_for(spec: AttemptSpec, outcome: Outcome, usage: Usage | None, reason: str) -> None:
    """Record an attempt that could not record itself (killed with its worker, or never
    started), from another task: with its last live use (None: it sent none), ending now.

    Under the attempt's own row id (``attempt_row_id``): a worker that died after its row was
    sent but before its marker said so (``_hand_over``) is recorded once, not twice."""
    now = time.time()
    get_sink(spec.config).add(attempt_row(spec, outcome, usage, now - (usage.wall_seconds if usage else 0.0),
                                          now, reason, row_id=attempt_row_id(spec)))
    _forget_live(spec, force=True)


def _call_ends(spec: AttemptSpec, error: BaseException) -> BaseException:
    """``error``, once the rows this worker holds are stored: the call ends with it, and the
    driver counts a call as recorded once any row of it is in, so its last row must be
    stored before the caller hears (``flush()`` and ``ray.shutdown()`` right after)."""
    get_sink(spec.config).flush(wait_s=_RECOVER_FLUSH_WAIT_S)
    return error


#: How long a cancelled call's waiting task lets the running attempt take a soft cancel.
_CANCEL_GRACE_S = 5.0


def _ended_within(spec: AttemptSpec, timeout_s: float) -> bool:
    """Whether the running attempt ``spec`` ends within ``timeout_s``: its live sample is gone
    from Ray's KV (its worker deletes it once its row is written). Not by its ObjectRef: Ray
    fills that with the cancellation at once, while the task may still run."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if _kv()._internal_kv_get(spec.live_key, namespace=LIVE_KV_NAMESPACE) is None:
                return True
        except Exception:  # noqa: BLE001 - no KV: judge by the clock
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _never_started(ref: Any, spec: AttemptSpec, timeout_s: float) -> bool:
    """Whether the cancelled attempt ``spec`` ended without its task having begun: once its
    ref is done (a soft cancel ends a queued task at once, a running one once it has
    recorded itself), its task's start marker (``_mark_started``) says whether it ran."""
    try:
        ready, _ = ray.wait([ref], timeout=timeout_s)
    except Exception:  # noqa: BLE001 - cannot tell: it may have recorded itself
        return False
    return bool(ready) and _kv_get(_started_key(spec)) is None


def _run_in_place(spec: AttemptSpec, in_place: AttemptSpec, run_here: Callable[[AttemptSpec], Any]) -> Any:
    """Run the next attempt in this (waiting) task, as this task's own attempt.

    It is no longer handed over: if it is killed (for memory, most likely) it kills this
    task, and Ray's retry must record it and climb from it (``recover`` reads the rerun
    marker), not submit another attempt with the same allocation (as after a death while
    waiting), which Ray's unbounded retries of memory kills repeated for ever.
    """
    task_spec = _TASK_SPEC.get()
    marked = task_spec is not None and _kv_put(_run_here_key(task_spec), encode_spec(in_place))
    if marked:
        _drop_handover(spec)
    # The waiting attempt's row first: the attempt run here may kill this process.
    get_sink(spec.config).flush(wait_s=_RECOVER_FLUSH_WAIT_S)
    if not marked:
        return run_here(in_place)
    return _run_marked(task_spec, in_place, lambda: run_here(in_place))


_HANDOVER_PREFIX = "handover:"
#: A handed-over attempt whose task has begun (``_mark_started``).
_STARTED_PREFIX = "started:"


def _held_label(spec: AttemptSpec) -> float:
    """The `memory` label the Ray task running ``spec`` holds: its own, or, for an attempt
    run in place of a waiting one, the waiting task's (what Ray counts)."""
    return (_TASK_SPEC.get() or spec).allocation.memory_bytes


def _handover_key(spec: AttemptSpec) -> str:
    # The waiting task's own label ends the key, so that one listing of the markers
    # says how much `memory` raysched's waiting calls hold (``_room_held_by_waiting``).
    return f"{_HANDOVER_PREFIX}{spec.live_key}:{int(_held_label(spec))}"


def _labels_in(keys: Iterable[bytes], skip: bytes | None = None) -> float:
    """The `memory` labels that hand-over markers' keys end with (``_handover_key``), summed."""
    held = 0.0
    for key in keys:
        if key != skip:
            try:
                held += int(key.rsplit(b":", 1)[1])
            except (IndexError, ValueError):
                continue
    return held


def _labels_of_waiting_tasks(call_id: str) -> float:
    """The `memory` labels the call's tasks that wait for a later attempt of it hold (their
    hand-over markers; 0 when the KV cannot say)."""
    try:
        return _labels_in(_kv()._internal_kv_list(f"{_HANDOVER_PREFIX}{call_id}:", namespace=LIVE_KV_NAMESPACE))
    except Exception:  # noqa: BLE001
        return 0.0


def _room_held_by_waiting(need: float, own_key: str) -> bool:
    """True when the cluster has too little free `memory` for ``need``, but would have
    enough if raysched's other waiting calls released their labels: they wait for
    attempts that cannot start beside them, so the next attempt never will either."""
    try:
        free = float(ray.available_resources().get("memory", 0.0))
        if free >= need:
            return False  # the room exists (perhaps split across nodes): let Ray place it
        keys = _kv()._internal_kv_list(_HANDOVER_PREFIX, namespace=LIVE_KV_NAMESPACE)
    except Exception:  # noqa: BLE001 - no answer: wait for the timeout instead
        return False
    return free + _labels_in(keys, skip=own_key.encode()) >= need


def _put_handover(spec: AttemptSpec, next_spec: AttemptSpec) -> None:
    if not _kv_put(_handover_key(spec), encode_spec(next_spec)):  # a retry may then record it twice
        logger.warning("raysched: could not write the hand-over marker of %s", spec.live_key)


def _spec_marker(key: str, config: RayschedConfig | None) -> AttemptSpec | None:
    """The attempt spec a marker in Ray's KV holds, if there is a readable one."""
    raw = _kv_get(key)
    try:
        return decode_spec(raw, config) if raw is not None else None
    except Exception:  # noqa: BLE001 - an unreadable marker is no marker
        return None


def _handed_over(spec: AttemptSpec) -> AttemptSpec | None:
    """The next attempt this attempt's task handed over to before it died, if it did."""
    return _spec_marker(_handover_key(spec), spec.config)


def _drop_handover(spec: AttemptSpec) -> None:
    _kv_del(_handover_key(spec))


def _started_key(spec: AttemptSpec) -> str:
    return f"{_STARTED_PREFIX}{spec.live_key}"


def _mark_started(spec: AttemptSpec) -> None:
    """A handed-over attempt's task has begun. Its first live sample says so too, but an
    attempt that dies before it (a crash as it starts) sends none: the waiting task would
    then take it for one that never got room, and run it a second time in its place."""
    _kv_put(_started_key(spec), b"1")


def _started_within(ref: Any, spec: AttemptSpec, timeout_s: float, held_room_s: float, own_key: str) -> bool:
    """True once the attempt behind ``ref`` has finished or published a live sample;
    False after ``timeout_s`` without either, or once the room it needs has been held by
    raysched's other waiting calls (``_room_held_by_waiting``) for ``held_room_s`` in a
    row. (In a row: an attempt just granted holds its own label before its first
    sample, and then looks like one that has no room.)"""
    deadline = time.monotonic() + timeout_s
    held_since: float | None = None
    while time.monotonic() < deadline:
        ready, _ = ray.wait([ref], timeout=1.0)
        if ready:
            return True
        try:
            if (_kv()._internal_kv_get(spec.live_key, namespace=LIVE_KV_NAMESPACE)
                    or _kv()._internal_kv_get(_started_key(spec), namespace=LIVE_KV_NAMESPACE)):
                return True
        except Exception:  # noqa: BLE001 - no KV: assume it runs rather than run twice
            return True
        now = time.monotonic()
        if not _room_held_by_waiting(spec.allocation.memory_bytes, own_key):
            held_since = None
        elif held_since is None:
            held_since = now
        elif now - held_since >= held_room_s:
            return False
    return False


class WorkerDied(RayschedError, ray.exceptions.WorkerCrashedError):
    """A call's worker died (not for memory, not stopped by raysched) and the caller's
    ``max_retries`` allows no further rerun: Ray's ``WorkerCrashedError``, with what happened.

    Defined here rather than in ``raysched.errors``, which must not import Ray.
    """

    def __init__(self, function: str, attempt: int, reason: str, max_retries: int, reruns: int):
        self.function = function
        self.attempt = attempt
        self.reason = reason
        self.max_retries = max_retries
        self.reruns = reruns
        allowed = ("forbids a rerun" if max_retries == 0
                   else f"allows no rerun after {reruns} rerun(s) after such deaths")
        super().__init__(f"{function}: the worker running attempt {attempt} died ({reason}); "
                         f"max_retries={max_retries} {allowed}")

    def __str__(self) -> str:  # WorkerCrashedError's own __str__ is a fixed text
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):
        return (WorkerDied, (self.function, self.attempt, self.reason, self.max_retries, self.reruns))


def _unwrap(exc: BaseException) -> BaseException:
    """The user's or raysched's own exception inside Ray's wrapping, so nesting adds no layers."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def recover(fn: Callable[..., Any], spec: AttemptSpec, args: tuple, kwargs: Mapping[str, Any],
            resubmit: Callable[[AttemptSpec, tuple, Mapping[str, Any]], Any]) -> Any:
    """Ray is retrying this task because its attempt died or raised: find out why and act.

    - the monitor stopped the attempt (a stop marker left by its worker, else the
      monitor's directive for it): record it if its worker could not, and apply
      the stop's action: a hard limit or a cancel fails again, never reruns;
    - killed for memory (Ray says OUT_OF_MEMORY, or Ray cannot say): record the
      killed attempt with its last live use, climb the ladder, resubmit with the
      bigger allocation and return that attempt's value;
    - an exception the user asked Ray to retry (``retry_exceptions``): the failed
      attempt already recorded itself; run again;
    - any other death (the worker was killed, its node died): record it and, if the
      caller's ``max_retries`` allows one more rerun (``retry_budget``), run the
      function again here with the same resources, else fail with ``WorkerDied``.

    ``spec`` is the attempt the task was submitted with; when this task already ran a
    later attempt here (``_run_again_here``), that one is the attempt that failed.
    """
    task_spec = spec
    spec = _last_run_here(task_spec) or task_spec
    handed = _handed_over(spec)
    if handed is not None:
        return _after_lost_handover(spec, handed, args, kwargs, resubmit,
                                    run_here=lambda s: run_measured(fn, s, args, kwargs, resubmit))
    marker = _stop_marker(spec)
    decision, recorded = marker if marker is not None else (_monitor_directive(spec), False)
    # A stop to resubmit that raysched did not get to apply (no marker: Ray's memory
    # monitor, most likely, was faster) is a memory kill: the cause below says whose.
    if decision is not None and (marker is not None or decision.action != "stop_and_resubmit"):
        usage = _last_live_usage(spec)
        reason = _stop_reason(decision, _KILLED_BY_RAYSCHED if marker is not None else _DIED_BEFORE_STOP)
        if not recorded:
            _record_for(spec, _STOP_OUTCOMES[decision.action], usage, reason)
        if decision.action in ("stop_limit", "cancel"):
            _mark_failed_stop(spec, decision)  # any further retry fails the same way
        else:
            _drop_stop_marker(spec)
        return _apply_stop(fn, spec, decision, usage, reason, args, kwargs, resubmit)
    attempt_number = _ray_attempt_number()
    raised = _raised_key(task_spec, attempt_number - 1)
    seen = _kv_get(raised)
    if seen is not None:
        _kv_del(raised)
        cause: str | None = seen.decode()  # raysched saw it raise or exit (and recorded it)
    else:
        task_id = ray.get_runtime_context().get_task_id() or ""
        cause = previous_attempt_cause(task_id, attempt_number)
    if cause == _RAISED and decision is None:
        # Ray retries it within the caller's budget (``remote_options``); counted so that
        # the call's later tasks get only what is left of it.
        # A new attempt number (its row, live samples and markers are its own), not a ladder rung.
        return _run_again_here(fn, task_spec, replace(spec, attempt=spec.attempt + 1, reruns=spec.reruns + 1),
                               args, kwargs, resubmit)
    usage = _last_live_usage(spec)
    memory_kill = cause in (None, "OUT_OF_MEMORY") or decision is not None
    outcome = Outcome.OOM_KILLED if memory_kill else Outcome.ERROR
    reason = {None: "worker died; Ray's state API could not say why (no dashboard), treated as a memory kill",
              "OUT_OF_MEMORY": "killed by Ray's memory monitor",
              _EXITED: "the function called sys.exit(), which ended its worker"}.get(cause, f"worker died: {cause}")
    if decision is not None:
        reason += "; " + _stop_reason(decision, "raysched's monitor had decided to stop it")
    if cause != _EXITED:  # an exit's attempt wrote its own row before it ended the worker
        _record_for(spec, outcome, usage, reason)
    else:
        _forget_live(spec, force=True)
    record = AttemptRecord(spec.attempt, spec.allocation, outcome, usage, reason)
    if not memory_kill:
        budget = retry_budget(spec)
        if 0 <= budget <= spec.reruns:
            raise _call_ends(spec, WorkerDied(spec.function, spec.attempt, reason, budget, spec.reruns))
        next_spec = replace(spec, attempt=spec.attempt + 1, prior=spec.prior + (record,), reruns=spec.reruns + 1)
        if next_spec.attempt > spec.config.max_attempts:
            raise _call_ends(spec, AttemptsExhausted(spec.function, next_spec.prior, "workers kept dying"))
        return _run_again_here(fn, task_spec, next_spec, args, kwargs, resubmit)
    return climb_and_resubmit(spec, record, args, kwargs, resubmit,
                              run_here=lambda s: run_measured(fn, s, args, kwargs, resubmit))


def _after_lost_handover(spec: AttemptSpec, handed: AttemptSpec, args: tuple, kwargs: Mapping[str, Any],
                         resubmit: Callable[[AttemptSpec, tuple, Mapping[str, Any]], Any],
                         run_here: Callable[[AttemptSpec], Any] | None) -> Any:
    """``spec``'s attempt was recorded and handed over to ``handed``; then its task died while
    waiting, and ``handed`` died with it as its owner (Ray ends the tasks of a dead owner;
    or it runs on, orphaned, and records itself). ``handed`` is recorded as cancelled (its
    own row, if it wrote one, has the same id: ``rows.attempt_row_id``); submit again under
    the following number, with the same allocation."""
    usage = _last_live_usage(handed)
    reason = f"lost with attempt {spec.attempt}'s task, which died while waiting for it"
    _record_for(handed, Outcome.CANCELLED, usage, reason)
    lost = AttemptRecord(handed.attempt, handed.allocation, Outcome.CANCELLED, usage, reason)
    following = replace(handed, attempt=handed.attempt + 1, prior=handed.prior + (lost,))
    exhausted = handed.attempt >= spec.config.max_attempts
    if not exhausted:
        # Said before the lost attempt's notes are deleted: an orphan ended after this sees
        # that its call has moved on and leaves none (``_superseded``).
        _put_handover(spec, following)
    # Its task's markers, which no retry of it reads: its start, and the exit Ray's end of an
    # orphan (a SystemExit) made it note for a retry (``_note_ending``).
    _kv_del(_started_key(handed))
    try:
        for key in _kv()._internal_kv_list(_raised_prefix(handed), namespace=LIVE_KV_NAMESPACE):
            _kv_del(key.decode())
    except Exception:  # noqa: BLE001
        pass
    if exhausted:
        # Ray retries a task its memory monitor killed without end: the call's attempts bound it.
        _drop_handover(spec)
        raise _call_ends(spec, AttemptsExhausted(spec.function, handed.prior + (lost,),
                                                 "tasks kept dying while they waited"))
    logger.warning("raysched: %s attempt %d died while waiting for attempt %d; submitting attempt %d",
                   spec.function, spec.attempt, handed.attempt, handed.attempt + 1)
    return _hand_over(spec, following, args, kwargs, resubmit, run_here)


#: How long ``recover`` waits for the profiler to take a failed attempt's row before it
#: reruns the function here (a rerun that kills this process again would lose the row).
_RECOVER_FLUSH_WAIT_S = 5.0


def _run_here_key(task_spec: AttemptSpec) -> str:
    return f"rerun:{task_spec.live_key}"


def _run_again_here(fn: Callable[..., Any], task_spec: AttemptSpec, spec: AttemptSpec, args: tuple,
                    kwargs: Mapping[str, Any], resubmit: Callable[[AttemptSpec, tuple, Mapping[str, Any]], Any]) -> Any:
    """Run ``spec``'s attempt in this task (submitted for ``task_spec``'s) after a failure.

    The failed attempt's row is sent first and waited for: the rerun may kill this
    process again.  A marker in Ray's KV says which attempt this task runs now, so that
    the Ray retry after another death records that attempt, not the task's first one,
    and counts its reruns against ``max_retries`` (``_last_run_here``).
    """
    get_sink(spec.config).flush(wait_s=_RECOVER_FLUSH_WAIT_S)
    if not _kv_put(_run_here_key(task_spec), encode_spec(spec)):
        logger.warning("raysched: could not write the rerun marker of %s", task_spec.live_key)
    return _run_marked(task_spec, spec, lambda: run_measured(fn, spec, args, kwargs, resubmit))


def _run_marked(task_spec: AttemptSpec, spec: AttemptSpec, run: Callable[[], Any]) -> Any:
    """``run()`` the attempt ``spec`` under this task's rerun marker, dropped once no retry of
    the task will read it: after a return, or an exception Ray does not retry (a cancel's
    KeyboardInterrupt too; not a SystemExit, which ends the worker: Ray's retry reads it)."""
    try:
        value = run()
    except BaseException as exc:
        if not isinstance(exc, SystemExit) and not _ray_retries(spec, exc):
            _kv_del(_run_here_key(task_spec))
        raise  # kept otherwise: the retry_exceptions rerun reads it
    _kv_del(_run_here_key(task_spec))
    return value


def _last_run_here(task_spec: AttemptSpec) -> AttemptSpec | None:
    """The attempt this task last ran after a failure (``_run_again_here``), if it did."""
    return _spec_marker(_run_here_key(task_spec), task_spec.config)


def make_entry(fn: Callable[..., Any], config: RayschedConfig, max_calls: int | None = None,
               base: RayschedConfig | None = None) -> Callable[..., Any]:
    """The function Ray runs: the user's function behind the measuring wrapper.

    ``config`` is the function's (with its own ``max_attempts``...), ``base`` the submitting
    process's config, which the worker adopts for the calls the task submits in turn.
    ``max_calls``: the one the remote function is made with (Ray ends the worker
    process after that many runs; its last run sends its rows first).
    """
    last_call = max_calls or float("inf")

    def entry(spec_bytes: bytes, /, *args: Any, **kwargs: Any) -> Any:  # positional-only: a user's
        # function may have a parameter of that name, passed by keyword
        if base is not None and not adopted:
            adopt_config(base)
            adopted.append(True)
        spec = decode_spec(spec_bytes, config)
        if spec.queued:
            args = args[1:]  # the admission's value: the queue let this call start
            spec = spec.with_call_id(spec.call_id)  # a copy (its cached row part kept)...
            spec.__dict__["queued"] = False  # ...so that its next attempts are not queued again
        calls[0] += 1
        token = _enter_task(spec)
        if spec.attempt > 1:
            _mark_started(spec)  # for the task that handed it over and waits (``_started_within``)
        try:
            if _ray_attempt_number() > 0:
                return recover(fn, spec, args, kwargs, _resubmitter(fn, config))
            if spec.attempt == 1 and config.short_call_measure_every > 1:
                if not thinning:
                    thinning.append(thinning_from_config(config))  # in the worker, on its first call
                # the resubmitter is built only if the monitor stops it
                return run_measured(fn, spec, args, kwargs, thinning=thinning[0])
            return run_measured(fn, spec, args, kwargs)
        except BaseException as exc:
            _drop_own_frames(exc)
            raise
        finally:
            _leave_task(token)
            if calls[0] >= last_call:
                # Ray ends this worker process as soon as the task returns (max_calls):
                # the buffered rows must reach the profiler first.
                flush_all_sinks(wait_s=_LAST_FLUSH_WAIT_S)

    adopted: list[bool] = []  # the base config was adopted in this process
    calls = [0]  # runs of this function in this worker process, as Ray counts them for max_calls
    thinning: list[ShortCallThinning] = []  # which of its first attempts this process measures in full
    entry.__name__ = getattr(fn, "__name__", "task")
    entry.__qualname__ = getattr(fn, "__qualname__", entry.__name__)
    entry.__module__ = getattr(fn, "__module__", __name__)
    entry.__doc__ = getattr(fn, "__doc__", None)
    return entry


_remote_cache: dict[tuple, Any] = {}

#: The folder of the raysched package: a frame whose code is in it is raysched's own.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _drop_own_frames(exc: BaseException) -> None:
    """Start the traceback of the user's error at the user's code, as plain Ray shows it.

    Ray drops its executor's frame from the traceback it shows; raysched's entry and
    measuring wrapper stood between it and the user's function.  Only the frames in
    front of the first frame outside raysched are dropped: an error raised by
    raysched itself keeps its whole traceback.  A later attempt's error (a
    ``RayTaskError``, whose text holds that attempt's traceback) loses them all.
    """
    first = tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    if tb is not first and (tb is not None or isinstance(exc, ray.exceptions.RayTaskError)):
        exc.__traceback__ = tb


#: The spec the running Ray task was submitted with (set by ``make_entry``'s entry): an
#: attempt run in place of a waiting one is marked as this task's own (``_hand_over``).
_TASK_SPEC: contextvars.ContextVar[AttemptSpec | None] = contextvars.ContextVar("raysched_task_spec", default=None)


# Functions, not the variable itself, in ``entry``: Ray pickles that closure by value, and a
# ContextVar does not pickle.
def _enter_task(spec: AttemptSpec) -> contextvars.Token:
    return _TASK_SPEC.set(spec)


def _leave_task(token: contextvars.Token) -> None:
    _TASK_SPEC.reset(token)


def inside_ray() -> bool:
    """Whether this runs in a Ray worker process (a task or an actor), not in a driver.

    The admission queue orders the calls drivers submit.  A call made inside Ray goes
    straight to Ray: whatever made it may be waiting on it in ``ray.get`` while it holds
    room in the queue (an admitted call, or one that called it through plain tasks,
    actors or threads raysched does not see), and Ray gives a blocked task's CPU back,
    the queue does not: queued behind that room, the call would wait for ever.
    """
    return ray._private.worker.global_worker.mode == ray.WORKER_MODE

#: How long the last call of a worker process (``max_calls``) waits for its rows to be taken.
_LAST_FLUSH_WAIT_S = 10.0


def _resubmitter(fn: Callable[..., Any], config: RayschedConfig) -> Callable[[AttemptSpec, tuple, Mapping[str, Any]], Any]:
    def resubmit(spec: AttemptSpec, args: tuple, kwargs: Mapping[str, Any]) -> Any:
        definition = definition_options(spec.ray_options)
        # The config too: its entry carries it into every later attempt (ladder, caps, home),
        # and one worker process may resubmit a function under two (a driver's configure()
        # between batches; two decorations of one module function). The cached entry holds
        # ``fn`` and ``config``, so neither id is reused while it is kept.
        key = (id(fn), id(config), tuple(sorted(definition.items())))
        remote = _remote_cache.get(key)
        if remote is None:
            remote = _remote_cache[key] = ray_remote(make_entry(fn, config, definition.get("max_calls"), get_config()),
                                                     definition)
        options = remote_options(spec)
        ask_a_return(options)  # the task that hands over waits on this attempt: it needs a ref
        return remote.options(**options).remote(encode_spec(spec), *args, **kwargs)

    return resubmit


def is_raysched_error(exc: BaseException) -> bool:
    return isinstance(_unwrap(exc), RayschedError)
