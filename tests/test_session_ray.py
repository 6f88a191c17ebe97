"""Ray shut down and started again in one driver process: ``ray.shutdown()`` keeps the rows of
the calls that finished before it, and raysched follows the new session.

Each test starts and shuts down its own local clusters (what it tests), so the module
cannot share one Ray session.
"""

from __future__ import annotations

import time

import pytest
import ray

from conftest import environment

import raysched
from raysched import adaptive_remote
from raysched.runtime.session import NAMESPACE, profiler_name, session_token
from raysched.store.profiles import ProfileStore

pytestmark = pytest.mark.ray


@adaptive_remote
def square(x):
    time.sleep(0.1)
    return x * x


@adaptive_remote
def naps(seconds):
    time.sleep(seconds)
    return seconds


def start_ray():
    # address="local": always a new cluster, never one another process left running.
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)


@pytest.fixture
def home(tmp_path):
    with environment(RAYSCHED_HOME=str(tmp_path)):
        try:
            yield tmp_path
        finally:
            if ray.is_initialized():
                ray.shutdown()


def test_shutdown_keeps_the_rows_of_finished_calls_without_waiting_for_running_ones(home):
    """Rows wait in the workers (a flush interval) and in the profiler (a group commit):
    Ray's shutdown killed them there (0-2 rows of 6 were stored).  A call still running
    never ends, so the shutdown does not wait for its row."""
    raysched.configure(shutdown_flush_timeout_s=30.0)
    start_ray()
    still_running = naps.options(num_cpus=0.5).remote(60)
    assert ray.get([square.remote(i) for i in range(6)]) == [i * i for i in range(6)]
    started = time.monotonic()
    ray.shutdown()
    assert time.monotonic() - started < 15.0  # not the 30 s allowed: it gave up on the running call
    assert len(ProfileStore(home).read(function=square.name)) == 6
    del still_running


@adaptive_remote(retry_exceptions=True, max_retries=3)
def fails_twice(path):
    import os

    runs = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(runs + 1))
    if runs < 2:
        raise ValueError(f"run {runs + 1} fails")
    return runs + 1


def test_shutdown_right_after_a_call_that_took_several_attempts_keeps_its_last_row(home):
    """The driver counts a call as recorded once any row of it is in; the row of its
    last attempt (here the one that worked) came after, and the shutdown lost it."""
    start_ray()
    assert ray.get(fails_twice.remote(str(home / "runs"))) == 3
    ray.shutdown()
    rows = ProfileStore(home).read(function=fails_twice.name).sort_values("attempt")
    assert list(rows["outcome"]) == ["error", "error", "ok"] and list(rows["attempt"]) == [1, 2, 3]


def test_a_new_ray_session_in_the_same_process_gets_its_own_profiler_and_the_history(home, monkeypatch):
    """The first job of every new local cluster has the same id: the session name tells them apart."""
    start_ray()
    ray.get([square.remote(i) for i in range(5)])
    first_session = session_token()
    with monkeypatch.context() as older_ray:  # Ray 2.40's runtime context has no get_session_name
        older_ray.delattr(ray.runtime_context.RuntimeContext, "get_session_name", raising=False)
        assert session_token() == first_session
    ray.shutdown()
    start_ray()
    assert session_token() != first_session
    assert ray.get([square.remote(i) for i in range(3)]) == [0, 1, 4]
    # The client found no stale handle: the profiler runs in the new cluster.
    ray.get_actor(profiler_name(raysched.get_config()), namespace=NAMESPACE)
    prediction = square.predict(3)
    assert prediction.memory.source == "history" and prediction.memory.n_history >= 5
    assert len(raysched.profiles(square)) == 8
    # ray.shutdown was wrapped once, in the first session only.
    assert not getattr(ray.shutdown.__wrapped__, "_raysched_flushes", False)
