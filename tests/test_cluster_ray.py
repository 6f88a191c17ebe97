"""A multi-node ray.cluster_utils.Cluster where one node is too small for a predicted task."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

import raysched
from raysched import PredictionTooLarge, adaptive_remote
from raysched.types import GiB, MiB

from conftest import environment

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head with 1 CPU and 512 MiB, a worker node with 2 CPUs and 3 GiB, and a node with no
    CPU and 6 GiB (as a head kept free of tasks has: Ray still counts its memory)."""
    with environment(RAYSCHED_HOME=str(tmp_path_factory.mktemp("raysched_cluster_home"))):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "memory": 512 * MiB})
        big = cluster.add_node(num_cpus=2, memory=3 * GiB)
        cluster.add_node(num_cpus=0, memory=6 * GiB)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="raysched", log_to_driver=False)
        try:
            yield big.node_id
        finally:
            ray.shutdown()
            cluster.shutdown()


@adaptive_remote(memory=1 * GiB)
def needs_a_gib():
    return ray.get_runtime_context().get_node_id()


@adaptive_remote(memory=8 * GiB)
def needs_more_than_any_node():
    return ray.get_runtime_context().get_node_id()


def test_a_task_too_big_for_the_small_node_runs_on_the_big_one(two_nodes):
    nodes = set(ray.get([needs_a_gib.remote() for _ in range(4)], timeout=120))
    assert nodes == {two_nodes}
    rows = raysched.profiles(needs_a_gib)
    assert set(rows["node_id"]) == {two_nodes}
    assert (rows["allocated_memory_bytes"] > 512 * MiB).all()


def test_a_task_too_big_for_every_node_is_capped_by_default(two_nodes):
    # capped to the largest node that has a CPU for it, not to the CPU-less node with more memory
    assert ray.get(needs_more_than_any_node.remote(), timeout=120) == two_nodes
    row = raysched.profiles(needs_more_than_any_node).iloc[-1]
    assert row["allocated_memory_bytes"] == 3 * GiB and row["allocated_num_cpus"] == 1.0


def test_or_a_clear_error_when_configured(two_nodes):
    raysched.configure(oversize_policy="error")
    try:
        with pytest.raises(PredictionTooLarge, match="largest node that can run it offers 3072 MiB"):
            needs_more_than_any_node.remote()
    finally:
        raysched.configure(oversize_policy="cap")
