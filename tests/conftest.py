"""Shared fixtures: one Ray session per test module, each with its own raysched home."""

from __future__ import annotations

import os
import pathlib

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


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """A local Ray with 2 CPUs and a fresh RAYSCHED_HOME, shared by one test module."""
    import ray

    import raysched
    from raysched.runtime import client, session

    home = tmp_path_factory.mktemp("raysched_home")
    old_home = os.environ.get("RAYSCHED_HOME")
    os.environ["RAYSCHED_HOME"] = str(home)
    session._config = None  # re-read RAYSCHED_HOME for this module
    client.reset_client()
    ray.init(num_cpus=2, include_dashboard=False, namespace="raysched", log_to_driver=False)
    yield home
    ray.shutdown()
    client.reset_client()
    session._config = None
    if old_home is None:
        os.environ.pop("RAYSCHED_HOME", None)
    else:
        os.environ["RAYSCHED_HOME"] = old_home
    _ = raysched
