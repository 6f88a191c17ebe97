"""Killed for memory: raysched climbs its ladder instead of letting Ray retry with the same resources.

Ray's memory monitor is made strict for this module: the worker node may use
only ~2 GiB more than the machine uses once Ray is up.  Two tasks that each grow to ~900 MiB, declared
at 400 MiB, are scheduled side by side and overflow the node; Ray kills one.
raysched records the killed attempt, resubmits it one rung up (now too big to
share the node's 2 GiB `memory` resource with the other) and the call still
returns its value, exactly once.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest
import ray

import raysched
from raysched import AttemptsExhausted, adaptive_remote
from raysched.types import GiB, MiB

from conftest import environment, free_port

# Its thresholds are set from the machine's memory in use: nothing else may run meanwhile.
pytestmark = [pytest.mark.ray, pytest.mark.alone]


@pytest.fixture(scope="module")
def strict_node(tmp_path_factory):
    """A head node that runs nothing, and a worker node whose memory monitor is strict.

    The threshold is set after the head (GCS, dashboard) is up, so the node may
    use about 2 GiB more than Ray and everything else on the machine already do.
    """
    from ray.cluster_utils import Cluster

    home = tmp_path_factory.mktemp("raysched_oom_home")
    with environment(RAYSCHED_HOME=str(home)):
        # The dashboard serves Ray's state API, which tells raysched why a worker died.
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": free_port()})
        time.sleep(2)
        vm = psutil.virtual_memory()
        used = (vm.total - vm.available) / vm.total
        strict = {
            "RAY_memory_usage_threshold": f"{min(0.95, used + 2.0 * GiB / vm.total):.4f}",
            "RAY_memory_monitor_refresh_ms": "100",
        }
        with environment(**strict):
            # Its raylet reads the strict threshold. Its `memory` label (3 GiB) is larger than the
            # real room (~2 GiB): labels decide co-scheduling, the monitor decides kills.
            cluster.add_node(num_cpus=2, memory=3 * GiB)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="raysched", log_to_driver=False)
        # What is tested here is raysched's answer to Ray's own kills: its node rule, which would
        # act just below this node's threshold, stays out of the way (tests/test_faults_ray.py has it).
        raysched.configure(node_kill_margin=None)
        try:
            yield home
        finally:
            from raysched.runtime import client, session

            session._config = None
            client.reset_client()
            ray.shutdown()
            cluster.shutdown()


@adaptive_remote(memory=400 * MiB, num_cpus=0.5)
def grow_and_hold(mib: int, hold_s: float) -> int:
    import numpy as np

    blocks = []
    for _ in range(mib // 50):  # grow in steps, so live samples see the climb
        blocks.append(np.ones(50 * MiB // 8))
        time.sleep(0.05)
    time.sleep(hold_s)
    return sum(b.nbytes for b in blocks) // MiB


@adaptive_remote(memory=300 * MiB, num_cpus=0.5, max_attempts=2)
def always_too_big(mib: int) -> int:
    import numpy as np

    blocks = [np.ones(50 * MiB // 8) for _ in range(mib // 50)]
    time.sleep(5)
    return len(blocks)


def test_memory_kill_climbs_the_ladder_and_returns_the_value_once(strict_node):
    refs = [grow_and_hold.remote(900, 2.5), grow_and_hold.remote(900, 2.5)]
    assert ray.get(refs, timeout=240) == [900, 900]
    rows = raysched.profiles(grow_and_hold)
    killed = rows[rows["outcome"] == "oom_killed"]
    ok = rows[rows["outcome"] == "ok"]
    assert len(ok) == 2, rows[["call_id", "attempt", "outcome", "allocated_memory_bytes"]]
    assert len(killed) >= 1
    for call_id, attempts in rows.groupby("call_id"):
        attempts = attempts.sort_values("attempt")
        assert (attempts["outcome"] == "ok").sum() == 1, "each call succeeded exactly once"
        assert attempts["outcome"].iloc[-1] == "ok" and list(attempts["attempt"]) == list(range(1, len(attempts) + 1))
        if len(attempts) > 1:
            first, last = attempts.iloc[0], attempts.iloc[-1]
            assert last["allocated_memory_bytes"] > first["allocated_memory_bytes"]
            assert last["rung"] >= 1
    for _, row in killed.iterrows():
        # The killed attempt's last live peak was recorded, and learnt from as a bumped sample.
        assert row["peak_rss_bytes"] > 300 * MiB
        assert row["memory_sample_bytes"] >= max(row["peak_rss_bytes"] + 100 * MiB, row["peak_rss_bytes"] * 1.2) - 1
        # Killed by Ray's memory monitor, or (when raysched's own monitor saw it first and the
        # task, asleep in C code, could not be stopped) by raysched: either way for memory.
        assert "memory monitor" in row["error"] or "stop_and_resubmit" in row["error"], row["error"]


def test_after_max_attempts_a_clear_error_names_every_attempt(strict_node):
    with pytest.raises(AttemptsExhausted) as info:
        ray.get(always_too_big.remote(2600), timeout=240)
    err = info.value
    assert err.function == always_too_big.name
    assert len(err.attempts) == 2
    text = str(err)
    assert "attempt 1: oom_killed with 352 MiB" in text
    assert "attempt 2: oom_killed" in text
    rows = raysched.profiles(always_too_big)
    assert list(rows["outcome"]) == ["oom_killed", "oom_killed"]


def test_workers_on_the_strict_node_see_its_kill_threshold(strict_node):
    """The node rule learns Ray's lowered threshold from what the node's workers inherited."""
    from raysched.runtime.monitor import ray_kill_threshold

    @ray.remote(num_cpus=0.5)
    def seen() -> tuple[float | None, str | None]:
        return ray_kill_threshold(), os.environ.get("RAY_memory_usage_threshold")

    threshold, raw = ray.get(seen.remote(), timeout=60)
    assert raw is not None and threshold == pytest.approx(float(raw)) and threshold < 0.95
