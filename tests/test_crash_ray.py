"""Workers that die for reasons that are not raysched's business: the caller's retry budget holds.

Its own Ray session, with the dashboard: Ray's state API (which the dashboard serves)
is how raysched tells a crashed worker from a memory kill; without it, every
unexplained death is treated as a memory kill (README, "Killed for memory").
Each call is compared with the same function under plain ``ray.remote``: raysched
must never run it more often, and every attempt that ran leaves its row.
"""

from __future__ import annotations

import os

import pytest
import ray

import raysched
from raysched import adaptive_remote
from raysched.types import MiB

from conftest import environment, free_port

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def dashboard_session(tmp_path_factory):
    home = tmp_path_factory.mktemp("raysched_crash_home")
    with environment(RAYSCHED_HOME=str(home)):
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=free_port(),
                 namespace="raysched", log_to_driver=False)
        try:
            yield tmp_path_factory.mktemp("crash")
        finally:
            ray.shutdown()


def crash(path: str) -> None:
    """Count the run in ``path``, then end the worker process as a segfaulting library would."""
    with open(path, "a") as f:
        f.write("x")
    os._exit(1)


def raise_value_error(path: str) -> None:
    with open(path, "a") as f:
        f.write("x")
    raise ValueError("always")


def runs_of(remote_function, path) -> tuple[int, BaseException]:
    """How often one call of ``remote_function`` ran before ``ray.get`` raised, and what it raised."""
    path.write_text("")
    with pytest.raises(Exception) as raised:
        ray.get(remote_function.remote(str(path)), timeout=120)
    return len(path.read_text()), raised.value


def failed_rows(function):
    rows = raysched.profiles(function).sort_values("attempt")
    assert rows["call_id"].nunique() == 1, rows[["call_id", "attempt", "outcome"]]
    return rows


@pytest.mark.parametrize("case", ["options_max_retries_0", "decorator_max_retries_0", "default_max_retries"])
def test_a_crashing_worker_reruns_as_often_as_plain_ray_and_every_death_is_recorded(dashboard_session, case):
    retries = {"options_max_retries_0": 0, "decorator_max_retries_0": 0, "default_max_retries": 3}[case]
    plain_runs, plain_error = runs_of(ray.remote(max_retries=retries)(crash), dashboard_session / f"plain_{case}")
    assert isinstance(plain_error, ray.exceptions.WorkerCrashedError) and plain_runs == retries + 1

    if case == "options_max_retries_0":
        function = adaptive_remote(name=f"crash_{case}", memory=128 * MiB)(crash)
        call = function.options(max_retries=0)
    elif case == "decorator_max_retries_0":
        function = call = adaptive_remote(name=f"crash_{case}", memory=128 * MiB, max_retries=0)(crash)
    else:
        function = call = adaptive_remote(name=f"crash_{case}", memory=128 * MiB)(crash)
    runs, error = runs_of(call, dashboard_session / case)
    assert runs == plain_runs, error
    assert isinstance(error, ray.exceptions.WorkerCrashedError), repr(error)
    assert isinstance(error, raysched.WorkerDied) and isinstance(error, raysched.RayschedError), repr(error)
    assert f"max_retries={retries}" in str(error), str(error)

    rows = failed_rows(function)
    assert list(rows["attempt"]) == list(range(1, runs + 1)), rows[["attempt", "outcome", "error"]]
    assert set(rows["outcome"]) == {"error"}, rows[["attempt", "outcome", "error"]]
    assert rows["error"].str.contains("worker died").all(), rows["error"].tolist()


@pytest.mark.parametrize("retries", [0, 2])
def test_retried_exceptions_rerun_as_often_as_plain_ray(dashboard_session, retries):
    plain_runs, _ = runs_of(ray.remote(max_retries=retries, retry_exceptions=True)(raise_value_error),
                            dashboard_session / f"plain_raise_{retries}")
    function = adaptive_remote(name=f"raise_{retries}", memory=128 * MiB, max_retries=retries,
                               retry_exceptions=True)(raise_value_error)
    runs, error = runs_of(function, dashboard_session / f"raise_{retries}")
    assert isinstance(error, ValueError)
    assert runs == plain_runs == retries + 1
    rows = failed_rows(function)  # one row per run, numbered as the runs were
    assert list(rows["attempt"]) == list(range(1, runs + 1)), rows[["attempt", "outcome", "error"]]
    assert set(rows["outcome"]) == {"error"} and rows["error"].str.contains("ValueError").all()


STALE_CLUSTER_SCRIPT = r"""
import os, sys, time
tmp = sys.argv[1]
os.environ["RAY_TMPDIR"] = tmp  # Ray's temp folder for this cluster alone: the shared one is left alone
os.makedirs(os.path.join(tmp, "ray"), exist_ok=True)
with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
    f.write("127.0.0.1:1")  # a `ray start` cluster that ended without `ray stop`
import ray, raysched

@raysched.adaptive_remote(max_retries=1)
def crashes():
    os._exit(3)

ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
started = time.monotonic()
try:
    ray.get(crashes.remote(), timeout=120)
except Exception as exc:
    print("RESULT", type(exc).__name__, round(time.monotonic() - started, 1))
ray.shutdown()
"""


def test_a_stale_current_cluster_file_does_not_hold_up_a_worker_death(tmp_path):
    """Why an attempt died is asked of this cluster's state API, by its own address: without
    one Ray asks the cluster in its "current cluster" file, and a dead one there cost ~40 s
    per worker death (124.8 s for this call, 4.8 s without the file)."""
    import subprocess
    import sys

    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, RAYSCHED_HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled")
    try:
        done = subprocess.run([sys.executable, "-c", STALE_CLUSTER_SCRIPT, folder], capture_output=True, text=True,
                              timeout=300, env=env)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, done.stdout[-2000:] + done.stderr[-2000:]
    name, seconds = results[0]
    assert "AttemptsExhausted" in name, done.stdout[-2000:]
    assert float(seconds) < 40.0, done.stdout
