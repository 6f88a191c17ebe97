"""The monitor as a named, detached, restartable actor on a real local Ray."""

from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")

from raysched.config import RayschedConfig  # noqa: E402
from raysched.policy import rules as R  # noqa: E402
from raysched.policy.rules import STOP_AND_RESUBMIT, LiveReport  # noqa: E402
from raysched.runtime.monitor import (  # noqa: E402
    RayNodeProbe,
    RayNodeReader,
    events,
    get_or_create_monitor,
    ray_live_reporter,
)
from raysched.runtime.session import NAMESPACE, monitor_name  # noqa: E402
from raysched.types import GiB, MiB, Allocation  # noqa: E402

from conftest import wait_for  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 enables token auth otherwise
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def sample(t: float, rss: int) -> LiveReport:
    return LiveReport(
        function="mod.f", code_hash="h1", call_id="c1", attempt=1, node_id=ray.get_runtime_context().get_node_id(),
        priority=0, allocation=Allocation(1.0, 256 * MiB), predicted_memory_upper_bytes=200 * MiB,
        predicted_wall_upper_s=10.0, prediction_source="history", rss_bytes=rss, peak_rss_bytes=rss,
        cpu_seconds=t, wall_seconds=t, timestamp=1_700_000_000.0 + t,
    )


def test_monitor_actor_decides_records_and_comes_back_after_a_kill(cluster, tmp_path):
    cfg = RayschedConfig(home=str(tmp_path), monitor_sustain_samples=2)
    monitor = get_or_create_monitor(cfg)
    assert ray.get(monitor.report.remote([sample(1, 1 * GiB)]), timeout=60) == {}
    reply = ray.get(monitor.report.remote([sample(2, 1 * GiB)]), timeout=30)
    assert reply["c1"].action == STOP_AND_RESUBMIT  # a frozen Decision crosses the process boundary
    assert ray.get(monitor.directives.remote(["c1"]))["c1"].action == STOP_AND_RESUBMIT
    assert events(home=str(tmp_path)).action.tolist() == [STOP_AND_RESUBMIT]
    # In a Ray process the metrics are real.
    assert ray.get(monitor.__ray_call__.remote(lambda self: self.metrics.enabled)) is True

    ray.kill(monitor, no_restart=False)
    # Ray restarts it under the same name; the call waits for it (max_task_retries=-1).
    assert ray.get(monitor.ping.remote(), timeout=60) is True
    same = ray.get_actor(monitor_name(cfg), namespace=NAMESPACE)
    assert same._actor_id == monitor._actor_id == get_or_create_monitor(cfg)._actor_id
    # A restarted monitor starts empty: hysteresis counts afresh, and the re-decided
    # stop is not written twice.
    assert ray.get(monitor.directives.remote(["c1"])) == {}
    ray.get(monitor.report.remote([sample(3, 1 * GiB)]))
    assert ray.get(monitor.report.remote([sample(4, 1 * GiB)]))["c1"].action == STOP_AND_RESUBMIT
    assert len(events(home=str(tmp_path))) == 1  # the same decision: its row id dedupes


def test_a_restarted_monitor_judges_by_the_config_it_was_last_handed_not_its_creators(cluster, tmp_path):
    """Ray restarts an actor with its creation arguments: the config of whoever created the
    monitor (a worker's reporter, an earlier driver), not the one a driver's ``reconfigure``
    handed it since. A cap set by that driver then stopped nothing after a restart."""
    from dataclasses import replace

    from raysched.policy.rules import STOP_LIMIT

    creator = RayschedConfig(home=str(tmp_path))  # no cap
    driver = creator.replace(memory_limit_bytes=300 * MiB)
    monitor = get_or_create_monitor(creator)
    ray.get(monitor.reconfigure.remote(driver), timeout=60)
    ray.kill(monitor, no_restart=False)
    assert ray.get(monitor.ping.remote(), timeout=60) is True
    # Over the driver's cap, under the allocation x 1.2: only the cap stops it.
    over = [replace(sample(t, 301 * MiB + int(t)), call_id="capped") for t in (31, 32)]
    ray.get(monitor.report.remote(over[:1]), timeout=30)
    reply = ray.get(monitor.report.remote(over[1:]), timeout=30)
    assert reply["capped"].action == STOP_LIMIT


def test_a_workers_live_reporter_learns_its_stop_without_waiting(cluster, tmp_path):
    from dataclasses import replace

    cfg = RayschedConfig(home=str(tmp_path), monitor_sustain_samples=2, live_interval_s=0.05)
    reporter = ray_live_reporter(cfg)
    deadline = time.monotonic() + 30
    t = 10.0
    while reporter.directive("c2", 1) is None and time.monotonic() < deadline:
        t += 1
        reporter.add(replace(sample(t, 1 * GiB), call_id="c2"))
        time.sleep(0.05)
    stop = reporter.directive("c2", 1)
    assert stop is not None and stop.action == STOP_AND_RESUBMIT


@ray.remote(num_cpus=0)
def _nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_a_node_probe_reads_the_node_it_runs_on_as_its_workers_do(cluster):
    """A task of no CPUs pinned to the node reads it (total - available, Ray's kill threshold
    as the node's workers inherit it); the probe never waits for it, and a node that does not
    exist gives no reading."""
    import psutil

    probe = RayNodeProbe(interval_s=0.0)
    node_id = ray.get_runtime_context().get_node_id()
    readings = []
    assert wait_for(lambda: readings.append(probe(node_id)) or readings[-1] is not None, timeout=60)
    reading = readings[-1]
    total = psutil.virtual_memory().total
    assert reading.node_id == node_id and reading.source == R.WORKER_READING
    assert reading.total_bytes == total and 0 < reading.used_bytes < total
    assert 0 <= reading.idle_workers_bytes < reading.used_bytes
    # Workers that ran plain tasks a moment ago idle (titled ray::IDLE): their memory is counted.
    naps = {pid for pid in ray.get([_nap.remote(0.5) for _ in range(3)])}
    readings.clear()
    assert wait_for(lambda: readings.append(probe(node_id)) or readings[-1] is not None, timeout=60)
    assert len(naps) < 2 or readings[-1].idle_workers_bytes > 0, (naps, readings[-1])
    assert abs(reading.timestamp - time.time()) < 60
    nowhere = "ff" * 28  # a node id no node has: Ray fails the probe
    answers = [probe(nowhere) for _ in range(3)]
    time.sleep(2.0)
    answers += [probe(nowhere) for _ in range(3)]
    assert answers == [None] * 6


def test_node_memory_from_this_nodes_metrics_endpoint(cluster):
    reader = RayNodeReader(timeout_s=2.0)
    node_id = ray.get_runtime_context().get_node_id()
    deadline = time.monotonic() + 15  # Ray's reporter publishes node stats every 5 s
    reading = None
    while reading is None and time.monotonic() < deadline:
        reading = reader(node_id)
        if reading is None:
            time.sleep(0.5)
    if reading is None:
        pytest.skip("this node's metrics endpoint served no ray_node_mem_* within 15 s")
    assert reading.node_id == node_id and reading.total_bytes > 0 and 0 < reading.fraction < 1
