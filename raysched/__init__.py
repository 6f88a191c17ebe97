"""raysched: an autopilot for Ray task resources.

``@adaptive_remote`` measures every attempt of a task in its worker, learns from
the profiles what similar calls used, and submits the next call with that much
memory and CPU; when Ray's memory monitor kills an attempt it resubmits it one
rung up an escalation ladder instead of retrying it unchanged.
"""

from __future__ import annotations

from typing import Any

from ._docs import ADAPTIVE_REMOTE_DOC
from .config import RayschedConfig
from .errors import (
    AttemptsExhausted,
    InvalidInput,
    InvalidRayOption,
    PredictionTooLarge,
    RayschedError,
    ResourceLimitExceeded,
    StoppedByMonitor,
    StoreError,
)
from .types import Allocation, Estimate, Features, Outcome, Prediction, Usage

__version__ = "0.1.0"


def adaptive_remote(fn: Any = None, /, **settings: Any):
    from .runtime.decorator import adaptive_remote as _adaptive_remote

    return _adaptive_remote(fn, **settings) if fn is not None else _adaptive_remote(**settings)


adaptive_remote.__doc__ = ADAPTIVE_REMOTE_DOC


def configure(config: RayschedConfig | None = None, **changes: Any) -> RayschedConfig:
    """Set this process's config (a whole RayschedConfig, or changes to the current one)."""
    from .runtime.session import configure as _configure

    return _configure(config, **changes)


def get_config() -> RayschedConfig:
    """This process's config: what ``configure`` set, else the defaults with ``RAYSCHED_HOME``."""
    from .runtime.session import get_config as _get_config

    return _get_config()


def _function_name(f_or_name: Any) -> str | None:
    if f_or_name is None or isinstance(f_or_name, str):
        return f_or_name
    name = getattr(f_or_name, "name", None)
    if isinstance(name, str):
        return name
    raise InvalidInput(f"expected an adaptive function or a function name, got {f_or_name!r}")


def _settle() -> None:
    """Wait until rows of tasks that already finished have reached the store."""
    import ray

    if not ray.is_initialized():
        return
    from .runtime.session import NAMESPACE, profiler_name

    try:
        profiler = ray.get_actor(profiler_name(get_config()), namespace=NAMESPACE)
    except ValueError:
        return
    from .runtime.client import rows_sent_within_s

    # A finished task's row waits up to one flush interval in its worker, then
    # travels to the profiler: give it a generous second, then wait for quiet.
    ray.get(profiler.settle.remote(min_wait_s=rows_sent_within_s(get_config())), timeout=60)


def profiles(f_or_name: Any = None, *, settle: bool = True):
    """Every recorded attempt of a function (or of all functions) as a pandas DataFrame.

    One row per attempt, except for calls a worker counted instead of measuring
    (``RayschedConfig.short_call_*``): ``calls`` says how many calls a row stands
    for (null in rows written before it existed: one).
    """
    from .store.profiles import ProfileStore

    name = _function_name(f_or_name)
    store = ProfileStore(get_config().home_path, writable=False)
    frame = _read_profiles(store, name, settle)
    if isinstance(f_or_name, str):  # a name typed by hand (a function passed is its exact name)
        _hint_if_unknown(store, name, frame)
    return frame


def _read_profiles(store: Any, name: str | None, settle: bool):
    """The rows of ``name``; with ``settle``, once those of this process's recent calls are in."""
    from .store.profiles import calls_without_rows

    import time

    frame = store.read(function=name)
    if not settle:
        return frame
    from .runtime.client import forget_calls, submitted_calls

    expected = list(submitted_calls(name))
    if not expected:
        # No call of this process since the last look (which waited for their rows): nothing
        # to wait for. (A call with one row may have more on the way, after a retry: so a
        # call once submitted is waited for once, even if a row of it is in.)
        return frame
    _settle()
    frame = store.read(function=name)
    # Calls this driver submitted whose rows have not landed yet: wait a little
    # longer for them (a row still in flight on a loaded machine), never for long,
    # since a call still running has no row yet.
    deadline = time.monotonic() + 3.0
    while calls_without_rows(frame, expected) and time.monotonic() < deadline:
        time.sleep(0.25)
        frame = store.read(function=name)
    # Those with rows, and those given up on: a call cancelled before it started, or
    # killed with its worker, never gets a row, and every later call would wait it out.
    forget_calls(name, expected)
    return frame


def _hint_if_unknown(store: Any, name: str | None, frame: Any, what: str = "profiles") -> None:
    """No rows for a bare name: functions are stored as module.qualname, so say which it may mean."""
    if name is None or len(frame) or not len(store.profiles.parts()):
        return
    from .store.profiles import short_name

    known = sorted(set(store.functions()["function"]))
    meant = [n for n in known if short_name(n) == short_name(name) and n != name]
    if meant:
        import warnings

        warnings.warn(f"raysched.{what}: no rows of {name!r}; functions are stored by module and name: "
                      f"{', '.join(meant)}", UserWarning, stacklevel=3)


def flush(timeout_s: float = 10.0) -> bool:
    """Wait (at most ``timeout_s``) until the rows of this process's finished calls are stored.

    Ray's shutdown kills the workers that still hold rows (up to ``flush_interval_s``) and
    the profiler that is writing them: ``ray.shutdown()`` and the process's exit call this
    themselves (up to ``RayschedConfig.shutdown_flush_timeout_s``).  Calls still running,
    or that never get a row (cancelled before they started, killed with their worker),
    are given up on once the profiler is quiet.  True if every call has its row.
    """
    from .runtime.client import flush as _flush

    return _flush(timeout_s)


def events(f_or_name: Any = None):
    """Every decision the live monitor recorded (of one function, or of all) as a pandas DataFrame.

    One row per decision other than "none": the rule, the action (warn, record_cpu,
    stop_and_resubmit, stop_limit, cancel, requeue_lowest_priority; rescale for an actor),
    the measured and allocated figures, a readable detail, the call and attempt.  Oldest first.
    """
    from .runtime.monitor import events as _events
    from .store.profiles import ProfileStore

    name = _function_name(f_or_name)
    frame = _events(name)
    if isinstance(f_or_name, str):  # a name typed by hand: say which stored function it may mean
        _hint_if_unknown(ProfileStore(get_config().home_path, writable=False), name, frame, "events")
    return frame


def __getattr__(name: str) -> Any:
    # Errors that subclass Ray's own are defined where Ray is imported; exported lazily,
    # so that ``import raysched`` (and the pure policy) does not import Ray.
    if name == "WorkerDied":
        from .runtime.worker import WorkerDied

        return WorkerDied
    raise AttributeError(f"module 'raysched' has no attribute {name!r}")


__all__ = [
    "adaptive_remote",
    "configure",
    "get_config",
    "profiles",
    "flush",
    "events",
    "RayschedConfig",
    "Prediction",
    "Estimate",
    "Features",
    "Allocation",
    "Usage",
    "Outcome",
    "RayschedError",
    "InvalidInput",
    "InvalidRayOption",
    "StoreError",
    "PredictionTooLarge",
    "AttemptsExhausted",
    "ResourceLimitExceeded",
    "StoppedByMonitor",
    "WorkerDied",
]
