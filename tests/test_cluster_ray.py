"""A multi-node ray.cluster_utils.Cluster where one node is too small for a predicted task,
calls pinned to that node by their Ray options, and a call that gives way on its node while
another has room for it."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import In, NodeAffinitySchedulingStrategy, NodeLabelSchedulingStrategy

import raysched
from raysched import PredictionTooLarge, adaptive_remote
from raysched.types import GiB, MiB

from conftest import environment, ray_takes_task_option, wait_for

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head with 1 CPU, 512 MiB, a custom resource (``gpu_like``) and the label ``tier=small``, a
    worker node with 2 CPUs, 3 GiB and ``tier=big``, and a node with no CPU, 6 GiB and no label
    (as a head kept free of tasks has: Ray still counts its memory)."""
    with environment(RAYSCHED_HOME=str(tmp_path_factory.mktemp("raysched_cluster_home"))):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "memory": 512 * MiB,
                                                                "resources": {"gpu_like": 1},
                                                                "labels": {"tier": "small"}})
        big = cluster.add_node(num_cpus=2, memory=3 * GiB, labels={"tier": "big"})
        cluster.add_node(num_cpus=0, memory=6 * GiB)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="raysched", log_to_driver=False)
        try:
            yield big.node_id
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture(scope="module")
def small_head(two_nodes):
    """The head's node id: the only node with ``gpu_like``."""
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("gpu_like"))


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


# No fallback given: the default (1 GiB + 15%) is more than the head's 512 MiB. One function
# per case, so that no row of an earlier case sizes a later one.
@adaptive_remote
def pinned_by_affinity():
    return ray.get_runtime_context().get_node_id()


@adaptive_remote
def pinned_by_resource():
    return ray.get_runtime_context().get_node_id()


@adaptive_remote
def softly_pinned():
    return ray.get_runtime_context().get_node_id()


@adaptive_remote
def pinned_and_refused():
    return ray.get_runtime_context().get_node_id()


@adaptive_remote(memory=1 * GiB)
class PinnedActor:
    def node(self):
        return ray.get_runtime_context().get_node_id()


def test_a_call_pinned_to_a_small_node_is_capped_to_that_node(two_nodes, small_head):
    """A hard node affinity or a resource only the small head has restricts the nodes sizing
    fits the request to (plain Ray runs these calls there); a soft affinity does not."""
    hard = NodeAffinitySchedulingStrategy(small_head, soft=False)
    assert ray.get(pinned_by_affinity.options(scheduling_strategy=hard).remote(), timeout=60) == small_head
    assert ray.get(pinned_by_resource.options(resources={"gpu_like": 1}).remote(), timeout=60) == small_head
    for fn in (pinned_by_affinity, pinned_by_resource):
        row = raysched.profiles(fn).iloc[-1]
        assert row["outcome"] == "ok" and row["node_id"] == small_head
        assert row["allocated_memory_bytes"] == 512 * MiB and row["allocated_num_cpus"] == 1.0
    # Soft: Ray may run it elsewhere, so it is sized for the whole cluster and runs on the big node
    soft = NodeAffinitySchedulingStrategy(small_head, soft=True)
    assert ray.get(softly_pinned.options(scheduling_strategy=soft).remote(), timeout=60) == two_nodes
    assert raysched.profiles(softly_pinned).iloc[-1]["allocated_memory_bytes"] > 1 * GiB
    # An actor pinned to the head is created there, its memory label capped to the head's
    actor = PinnedActor.options(scheduling_strategy=hard).remote()
    try:
        assert ray.get(actor.node.remote(), timeout=60) == small_head
    finally:
        ray.kill(actor)


@adaptive_remote
def pinned_by_label():
    return ray.get_runtime_context().get_node_id()


@adaptive_remote
def pinned_by_fallback_label():
    return ray.get_runtime_context().get_node_id()


@adaptive_remote(memory=1 * GiB)
class LabelledActor:
    def node(self):
        return ray.get_runtime_context().get_node_id()


@pytest.mark.skipif(not ray_takes_task_option("label_selector"), reason="this Ray has no label_selector option")
def test_a_call_whose_label_selector_picks_the_small_node_is_capped_to_it(two_nodes, small_head):
    """``label_selector`` (and the selectors of ``fallback_strategy``) restrict the nodes as
    a hard affinity does: sized for the whole cluster (the cold default, 1 GiB + 15%), the
    call would ask for more than the only node it may run on has, and never start."""
    assert ray.get(pinned_by_label.options(label_selector={"tier": "small"}).remote(), timeout=60) == small_head
    # "!big": the head, or the CPU-less node (no label); only the head has the CPU
    assert ray.get(pinned_by_label.options(label_selector={"tier": "!big"}).remote(), timeout=60) == small_head
    # No node is tier=huge, so Ray falls back to the next selector
    fallback = dict(label_selector={"tier": "huge"}, fallback_strategy=[{"label_selector": {"tier": "in(small)"}}])
    assert ray.get(pinned_by_fallback_label.options(**fallback).remote(), timeout=60) == small_head
    # The older NodeLabelSchedulingStrategy, whose hard terms Ray still enforces
    by_strategy = NodeLabelSchedulingStrategy({"tier": In("small")})
    assert ray.get(pinned_by_label.options(scheduling_strategy=by_strategy).remote(), timeout=60) == small_head
    for fn in (pinned_by_label, pinned_by_fallback_label):
        rows = raysched.profiles(fn)
        assert (rows["outcome"] == "ok").all() and (rows["node_id"] == small_head).all()
        assert (rows["allocated_memory_bytes"] == 512 * MiB).all()
    # A label that takes the big node leaves the request as it was sized for the cluster
    assert ray.get(pinned_by_label.options(label_selector={"tier": "big"}).remote(), timeout=60) == two_nodes
    assert raysched.profiles(pinned_by_label).iloc[-1]["allocated_memory_bytes"] > 512 * MiB
    actor = LabelledActor.options(label_selector={"tier": "small"}).remote()
    try:
        assert ray.get(actor.node.remote(), timeout=60) == small_head
    finally:
        ray.kill(actor)


def test_a_pinned_call_too_big_for_its_node_names_it_when_configured(two_nodes, small_head):
    raysched.configure(oversize_policy="error")
    try:
        with pytest.raises(PredictionTooLarge, match=f"offers 512 MiB and 1 CPU \\(node {small_head}"):
            pinned_and_refused.options(scheduling_strategy=NodeAffinitySchedulingStrategy(small_head, soft=False)).remote()
    finally:
        raysched.configure(oversize_policy="cap")


@adaptive_remote(memory=256 * MiB, num_cpus=1, max_attempts=4)
def busy_on_some_node(marker: str, seconds: float) -> str:
    import time

    with open(marker, "a") as f:  # one line per attempt body
        f.write("started\n")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # Python between sleeps: a stop is raised into this loop
        time.sleep(0.05)
    return ray.get_runtime_context().get_node_id()


def test_a_call_that_gives_way_while_another_node_has_room_is_resubmitted_not_held(two_nodes, tmp_path):
    """The node rule (every reading counts as pressure, for as long as it takes to stop one
    attempt) stops the call; another node has its CPU and `memory` free, so its next attempt
    is resubmitted to Ray (another worker process), not waited for in place."""
    from raysched.runtime.monitor import get_or_create_monitor
    from raysched.runtime.session import get_config

    monitor = get_or_create_monitor(get_config())
    status = lambda: ray.get(monitor.status.remote(), timeout=30)  # noqa: E731
    marker = tmp_path / "busy"
    ref = busy_on_some_node.remote(str(marker), 6.0)
    assert wait_for(lambda: marker.exists(), timeout=90)
    assert wait_for(lambda: sum(n for f, n in status()["running_by_function"].items()
                                if f.endswith("busy_on_some_node")) == 1, timeout=30)

    def judge_nodes_by(**changes):
        config = raysched.configure(**changes)
        ray.get(monitor.reconfigure.remote(config), timeout=60)

    before = status()["decisions"]
    judge_nodes_by(node_memory_threshold=0.01, node_memory_sustain_readings=1, node_poll_interval_s=1.0)
    try:
        assert wait_for(lambda: status()["decisions"] > before, timeout=60, step=0.05)
    finally:
        judge_nodes_by(node_memory_threshold=0.9, node_memory_sustain_readings=2, node_poll_interval_s=5.0)
    assert ray.get(ref, timeout=120) in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    rows = raysched.profiles(busy_on_some_node).sort_values("attempt")
    assert rows["outcome"].iloc[0] == "cancelled" and "node_memory_pressure" in rows["error"].iloc[0]
    assert rows["outcome"].iloc[-1] == "ok"
    assert rows["worker_pid"].iloc[1] != rows["worker_pid"].iloc[0], rows[["attempt", "worker_pid", "node_id"]]


@ray.remote(num_cpus=0)
def start_services_here(home: str) -> str:
    """What a worker's live reporter or row sink does when the service actors are missing."""
    from raysched.runtime.monitor import get_or_create_monitor
    from raysched.runtime.profiler import get_or_create_profiler

    config = raysched.RayschedConfig(home=home)
    for handle in (get_or_create_monitor(config), get_or_create_profiler(config)):
        ray.get(handle.__ray_ready__.remote(), timeout=60)
    return ray.get_runtime_context().get_node_id()


def test_the_service_actors_live_on_the_head_whichever_node_creates_them(two_nodes, small_head, tmp_path):
    # Created from a task on the big worker node (Ray would place them beside it), the
    # profiler and the monitor still land on the head: the store is on one disk, and the
    # loss of a worker node takes neither.
    home = str(tmp_path / "home_of_a_worker_node")
    node = ray.get(start_services_here.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(two_nodes, soft=False)).remote(home), timeout=120)
    assert node == two_nodes != small_head
    from raysched.runtime.session import NAMESPACE, monitor_name, profiler_name

    config = raysched.RayschedConfig(home=home)
    for name in (monitor_name(config), profiler_name(config)):
        handle = ray.get_actor(name, namespace=NAMESPACE)
        assert ray._private.state.actors(handle._actor_id.hex())["Address"]["NodeID"] == small_head, name
        ray.kill(handle, no_restart=True)
