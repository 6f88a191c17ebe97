"""Ray Job submission on a cluster that outlives its drivers.

Two jobs that name the same raysched home share what was learnt: the second job's
first prediction stands on the first job's runs.  A job with another home gets its
own profiler and store, and the first home is left as it was.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest

ray = pytest.importorskip("ray")

from conftest import environment, free_port  # noqa: E402

from raysched.store.profiles import ProfileStore  # noqa: E402

pytestmark = pytest.mark.ray

FUNCTION = "jobs_test.fill"
MiB = 2**20

JOB = textwrap.dedent(
    f"""
    import json, sys, time
    import numpy as np
    import ray
    import raysched
    from raysched import adaptive_remote

    @adaptive_remote(name={FUNCTION!r}, memory=300 * 2**20)
    def fill(n_mib):
        block = np.ones(n_mib * 2**20 // 8)
        time.sleep(0.1)  # long enough for its CPU cores to count (runs under 50 ms record none)
        return int(block.nbytes)

    ray.init()  # the job's own cluster (RAY_ADDRESS, set by the job supervisor)
    sizes = [int(x) for x in sys.argv[1].split(",")]
    first = fill.options(input_size=40 * 2**20).predict(40)
    refs = [fill.options(input_size=n * 2**20).remote(n) for n in sizes]
    assert ray.get(refs, timeout=120) == [n * 2**20 for n in sizes]
    rows = raysched.profiles(fill)
    print("RESULT " + json.dumps({{
        "source": first.source, "n_history": first.memory.n_history,
        "sources": [first.memory.source, first.cpu.source, first.wall.source],
        "home": str(raysched.get_config().home_path), "rows": len(rows),
    }}))
    """
)


@pytest.fixture(scope="module")
def job_cluster(tmp_path_factory):
    """A head with the dashboard's job server, started apart from any driver (as ``ray start --head``)."""
    from ray.cluster_utils import Cluster
    from ray.job_submission import JobSubmissionClient

    port, client_port, agent_port = free_port(), free_port(), free_port()
    # Ray Client's proxy forks a server per client while its gRPC threads run; with gRPC's fork
    # handlers on, that child died at once ("Starting Ray client server failed") in 6 of 16
    # connects on a busy 2-core machine, and in 0 of 24 with them off. The head inherits this.
    with environment(GRPC_ENABLE_FORK_SUPPORT="false"):
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "ray_client_server_port": client_port,
            # Its own agent port, not Ray's default 52365: a cluster of the other test worker may
            # hold that one, and an agent that cannot bind it stays up without its HTTP service,
            # so that the head has no agent to submit jobs to.
            "dashboard_agent_listen_port": agent_port})
    job_dir = tmp_path_factory.mktemp("job")
    (job_dir / "job.py").write_text(JOB)
    (job_dir / "client_port").write_text(str(client_port))
    try:
        client = JobSubmissionClient(f"http://127.0.0.1:{port}")
        yield client, job_dir
    finally:
        cluster.shutdown()


def _submit_job(client, job_dir, home, sizes) -> str:
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(
                entrypoint=f"{sys.executable} job.py {','.join(map(str, sizes))}",
                runtime_env={"working_dir": str(job_dir),
                             "env_vars": {"RAYSCHED_HOME": str(home), "RAY_AUTH_MODE": "disabled"}},
            )
        except RuntimeError as exc:
            # The head's job agent registers a few seconds after the dashboard answers (more
            # on a busy machine): Ray's own answer is to try again later.
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _job_result(client, job_id) -> dict:
    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            break
        time.sleep(0.25)
    logs = client.get_job_logs(job_id)
    assert str(status) == "SUCCEEDED", f"job {job_id} ended {status}:\n{logs[-4000:]}"
    lines = [line for line in logs.splitlines() if line.startswith("RESULT ")]
    assert lines, logs[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_jobs_sharing_a_home_share_what_was_learnt_and_another_home_stays_apart(job_cluster, tmp_path):
    client, job_dir = job_cluster
    home_a, home_b = tmp_path / "home_a", tmp_path / "home_b"

    first = _job_result(client, _submit_job(client, job_dir, home_a, [20, 30, 40, 50, 60, 70, 80]))
    assert first["home"] == str(home_a)
    assert first["n_history"] == 0 and first["source"] == "fallback"
    assert first["rows"] == 7

    # Two more jobs at once. A second one in home A, a new driver process: its first prediction
    # comes from the first job's runs. One in another home: its own profiler, starting cold;
    # nothing of it lands in home A (nor anything of home A in it), though both run together.
    second_id = _submit_job(client, job_dir, home_a, [25, 45, 65])
    other_id = _submit_job(client, job_dir, home_b, [30, 50])
    second = _job_result(client, second_id)
    assert second["n_history"] >= 7, second
    assert second["sources"] == ["history", "history", "history"], second  # memory, CPU, wall
    assert second["rows"] == 10

    other = _job_result(client, other_id)
    assert other["n_history"] == 0 and other["source"] == "fallback", other
    assert other["rows"] == 2
    rows_a = ProfileStore(home_a).read(function=FUNCTION)
    rows_b = ProfileStore(home_b).read(function=FUNCTION)
    assert len(rows_a) == 10 and len(rows_b) == 2
    assert (rows_a["outcome"] == "ok").all() and (rows_b["outcome"] == "ok").all()
    # The second job was sized from the first's measurements: its allocations follow its inputs.
    second_job = rows_a[rows_a["input_size"].isin([n * MiB for n in (25, 45, 65)])]
    assert len(second_job) == 3 and (second_job["prediction_source"] != "fallback").all()
    allocated = second_job.sort_values("input_size")["allocated_memory_bytes"].astype(float).tolist()
    assert allocated[0] < allocated[-1], allocated
    used = (rows_a["peak_rss_bytes"] - rows_a["start_rss_bytes"]).astype(float)
    assert used[rows_a["input_size"] == 80 * MiB].iloc[0] > 70 * MiB


def test_a_driver_over_ray_client_gets_a_clear_error(job_cluster, tmp_path):
    """Over ``ray://`` the first call failed deep inside raysched with an AttributeError."""
    import subprocess
    from pathlib import Path

    _, job_dir = job_cluster
    port = (job_dir / "client_port").read_text()
    script = textwrap.dedent(f"""
        import ray, raysched
        ray.init("ray://127.0.0.1:{port}")
        @ray.remote
        def plain(x):
            return x + 1
        assert ray.get(plain.remote(1)) == 2  # Ray Client itself works
        @raysched.adaptive_remote
        def f(x):
            return x + 1
        try:
            f.remote(1)
        except raysched.RayschedError as exc:
            print("REFUSED", exc)
    """)
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "RAYSCHED_HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert "REFUSED raysched does not run over Ray Client" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "ray job submit" in out.stdout
