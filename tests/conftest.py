"""Shared fixtures: one Ray session per test module, each with its own raysched home."""

from __future__ import annotations

import contextlib
import os
import pathlib
import time

import pytest

# Ray >= 2.60 turns on token authentication for a new local cluster; tests start
# their own clusters and say so explicitly.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Workers import test modules (functions and exception classes defined in them) by name.
_TESTS = str(pathlib.Path(__file__).resolve().parent)
if _TESTS not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)

SHARED_TRACES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "traces"


def ray_takes_task_option(name: str) -> bool:
    """Whether the installed Ray knows this task option (``label_selector`` and
    ``fallback_strategy`` are newer than Ray 2.40, which pyproject still allows)."""
    import importlib

    for module in ("ray._common.ray_option_utils", "ray._private.ray_option_utils"):
        try:
            return name in importlib.import_module(module).task_options
        except (ImportError, AttributeError):
            continue
    return False


def wait_for(predicate, timeout=30.0, step=0.1):
    """Poll ``predicate`` until it is true or ``timeout`` passes; whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def free_port() -> int:
    """A TCP port nothing listens on now (for a second dashboard in one test session)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _process_config_restored():
    """Every test leaves raysched's process config as it found it: a test that called
    ``raysched.configure`` made the process "configured here" with the home of that moment,
    and a later test's RAYSCHED_HOME was ignored (the demo ran in the checkout's ./.raysched)."""
    from raysched.runtime import session

    saved = (session._config, session._configured_here)
    yield
    if (session._config, session._configured_here) != saved:
        from raysched.runtime import client

        session._config, session._configured_here = saved
        client.reset_client()


@contextlib.contextmanager
def environment(**values: str):
    """Set environment variables (and raysched's process config from them), then restore both."""
    from raysched.runtime import client, session

    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    session._config = None  # re-read RAYSCHED_HOME
    client.reset_client()
    try:
        yield
    finally:
        client.reset_client()
        session._config = None
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """A local Ray with 2 CPUs and a fresh RAYSCHED_HOME, shared by one test module."""
    import ray

    home = tmp_path_factory.mktemp("raysched_home")
    with environment(RAYSCHED_HOME=str(home)):
        # address="local": always a new cluster, never one another process left running.
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="raysched", log_to_driver=False)
        try:
            yield home
        finally:
            ray.shutdown()
