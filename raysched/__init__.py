"""raysched: an autopilot for Ray task resources.

``@adaptive_remote`` measures every attempt of a task in its worker, learns from
the profiles what similar calls used, and submits the next call with that much
memory and CPU; when Ray's memory monitor kills an attempt it resubmits it one
rung up an escalation ladder instead of retrying it unchanged.
"""

from __future__ import annotations

from typing import Any

from .config import RayschedConfig
from .errors import (
    AttemptsExhausted,
    InvalidInput,
    PredictionTooLarge,
    RayschedError,
    ResourceLimitExceeded,
    StoreError,
)
from .types import Allocation, Estimate, Features, Outcome, Prediction, Usage

__version__ = "0.1.0"


def adaptive_remote(fn: Any = None, /, **settings: Any):
    """Decorate a function to run as a Ray task sized from its past runs (see ``runtime.decorator``)."""
    from .runtime.decorator import adaptive_remote as _adaptive_remote

    return _adaptive_remote(fn, **settings) if fn is not None else _adaptive_remote(**settings)


def configure(config: RayschedConfig | None = None, **changes: Any) -> RayschedConfig:
    """Set this process's config (a whole RayschedConfig, or changes to the current one)."""
    from .runtime.session import configure as _configure

    return _configure(config, **changes)


def get_config() -> RayschedConfig:
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
    from .runtime.profiler import PROFILER_NAME
    from .runtime.session import NAMESPACE

    try:
        profiler = ray.get_actor(PROFILER_NAME, namespace=NAMESPACE)
    except ValueError:
        return
    flush = get_config().flush_interval_s
    # A finished task's row waits up to one flush interval in its worker, then
    # travels to the profiler: give it a generous second, then wait for quiet.
    ray.get(profiler.settle.remote(min_wait_s=max(1.0, 3 * flush)), timeout=60)


def profiles(f_or_name: Any = None, *, settle: bool = True):
    """Every recorded attempt of a function (or of all functions) as a pandas DataFrame."""
    from .store.profiles import ProfileStore

    name = _function_name(f_or_name)
    if settle:
        _settle()
    return ProfileStore(get_config().home_path).read(function=name)


__all__ = [
    "adaptive_remote",
    "configure",
    "get_config",
    "profiles",
    "RayschedConfig",
    "Prediction",
    "Estimate",
    "Features",
    "Allocation",
    "Usage",
    "Outcome",
    "RayschedError",
    "InvalidInput",
    "StoreError",
    "PredictionTooLarge",
    "AttemptsExhausted",
    "ResourceLimitExceeded",
]
