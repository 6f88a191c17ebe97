"""Whether a lost node left a call with a label no alive node holds (policy.stranding), and the
driver's watcher's decisions (runtime.stranded.StrandWatch) without Ray: fake shapes and refs."""

from __future__ import annotations

from raysched.policy.stranding import Ask, at_risk, holds, largest_node, stranded
from raysched.types import ClusterShape, GiB, MiB, NodeShape

HEAD = NodeShape("head", 0.0, 20 * GiB)
BIG = NodeShape("big", 2.0, 3 * GiB)
MID = NodeShape("mid", 2.0, 1536 * MiB)
LABEL = Ask(1.0, 2368 * MiB)  # a cold 2 GiB fallback + 15%: only BIG holds it


def test_an_ask_is_read_from_ray_options_with_rays_defaults():
    assert Ask.label({"num_cpus": 0.5, "memory": 100}) == Ask(0.5, 100)
    assert Ask.label({}) == Ask(1.0, 0)
    assert Ask.label({"memory": None}) == Ask(1.0, 0)


def test_plain_rays_ask_is_the_callers_own_values_else_no_memory_and_at_most_one_cpu():
    assert LABEL.plain({}) == Ask(1.0, 0)
    assert Ask(0.25, 10).plain({}) == Ask(0.25, 0)  # a fallback of fewer CPUs is the user's word
    assert Ask(2.0, 10).plain({}) == Ask(1.0, 0)
    assert LABEL.plain({"memory": 2 * GiB}) == Ask(1.0, 2 * GiB)
    assert LABEL.plain({"memory": 2 * GiB, "num_cpus": 1.0}) == Ask(1.0, 2 * GiB)


def test_a_label_only_the_biggest_node_holds_is_at_risk_and_stranded_once_it_is_gone():
    plain = LABEL.plain({})
    assert holds(BIG, LABEL) and not holds(MID, LABEL)
    assert at_risk(LABEL, plain, (HEAD, BIG, MID))
    assert not stranded(LABEL, plain, (HEAD, BIG, MID))
    assert stranded(LABEL, plain, (HEAD, MID))  # the CPU-less head holds the memory, not the CPU


def test_no_call_is_at_risk_on_a_cluster_of_equal_nodes():
    plain = LABEL.plain({})
    assert not at_risk(LABEL, plain, (HEAD, BIG, BIG))
    assert not at_risk(Ask(1.0, 1 * GiB), Ask(1.0, 0), (MID, MID))


def test_the_callers_own_label_is_never_raysched_s_to_end():
    plain = LABEL.plain({"memory": LABEL.memory_bytes, "num_cpus": LABEL.num_cpus})
    assert plain == LABEL
    assert not at_risk(LABEL, plain, (HEAD, BIG, MID))
    assert not stranded(LABEL, plain, (HEAD, MID))  # plain Ray would wait for a node too


def test_no_node_the_call_may_run_on_means_plain_ray_would_wait_too():
    assert not stranded(LABEL, LABEL.plain({}), ())
    assert not stranded(LABEL, LABEL.plain({}), (HEAD,))  # no node with a CPU at all


def test_a_label_that_still_fits_a_node_is_not_stranded():
    small = Ask(1.0, 304 * MiB)
    assert not at_risk(small, small.plain({}), (HEAD, BIG, MID))
    assert not stranded(small, small.plain({}), (HEAD, MID))


def test_the_largest_node_named_is_one_that_has_the_cpus():
    assert largest_node((HEAD, MID), 1.0) == MID
    assert largest_node((HEAD, BIG, MID), 1.0) == BIG
    assert largest_node((), 1.0) is None


# --- the watcher, without Ray ------------------------------------------------------------------------


class _Ref:
    def __init__(self):
        self.callbacks = []

    def _on_ready(self, callback):
        self.callbacks.append(callback)

    def end(self):
        for callback in self.callbacks:
            callback(None)


def _watch(shapes, ended, shrinks):
    from raysched.runtime.stranded import StrandWatch

    class Watch(StrandWatch):
        def _end_all(self, found):  # (rows, events and cancels need Ray: tests/test_node_loss_ray.py)
            for group, call_id, _ref, _spec, nodes in found:
                ended.append((call_id, tuple(n.node_id for n in nodes)))
                group.calls.pop(call_id, None)
            return [call_id for _, call_id, _, _, _ in found]

    watch = Watch(lambda: shapes[0], on_shrink=lambda: shrinks.append(True), interval_s=3600)
    watch._thread = _NoThread()  # the test looks by hand (check)
    return watch


class _NoThread:
    def is_alive(self):
        return True


def test_the_watcher_ends_a_stranded_call_after_two_looks_and_leaves_the_rest():
    shapes, ended, shrinks = [ClusterShape((HEAD, BIG, MID))], [], []
    watch = _watch(shapes, ended, shrinks)
    group = watch.group(function="f", code_hash="h", config=None, label=LABEL, plain=LABEL.plain({}),
                        node_id=None, demands=(), selectors=())
    small = Ask(1.0, 304 * MiB)
    other = watch.group(function="g", code_hash="h", config=None, label=small, plain=small.plain({}),
                        node_id=None, demands=(), selectors=())
    refs = [_Ref() for _ in range(3)]
    group.add("a", refs[0], b"")
    group.add("b", refs[1], b"")
    other.add("c", refs[2], b"")
    assert watch.in_flight() == 3
    refs[1].end()  # "b" finished before the node was lost: never ended by the watcher
    assert watch.in_flight() == 2
    assert watch.check() == [] and not shrinks
    shapes[0] = ClusterShape((HEAD, MID))  # BIG lost
    assert watch.check() == [] and shrinks == [True]  # one look is not enough
    assert watch.check() == ["a"]
    assert ended == [("a", ("head", "mid"))]
    assert watch.in_flight() == 1  # "c" still fits MID: left to Ray's retry
    assert watch.check() == []


def test_a_node_back_before_the_second_look_ends_nothing():
    shapes, ended, shrinks = [ClusterShape((HEAD, MID))], [], []
    watch = _watch(shapes, ended, shrinks)
    group = watch.group(function="f", code_hash="h", config=None, label=LABEL, plain=LABEL.plain({}),
                        node_id=None, demands=(), selectors=())
    group.add("a", _Ref(), b"")
    assert watch.check() == []
    shapes[0] = ClusterShape((HEAD, BIG, MID))
    assert watch.check() == []
    shapes[0] = ClusterShape((HEAD, MID))
    assert watch.check() == [] and not ended


def test_a_call_pinned_by_labels_is_judged_on_the_nodes_it_may_run_on():
    gpu = NodeShape("gpu", 2.0, 1 * GiB, resources=(("GPU", 1.0),))
    shapes, ended, shrinks = [ClusterShape((HEAD, BIG, gpu))], [], []
    watch = _watch(shapes, ended, shrinks)
    label = Ask(1.0, 2 * GiB)
    group = watch.group(function="f", code_hash="h", config=None, label=label, plain=label.plain({}),
                        node_id=None, demands=(("GPU", 1.0),), selectors=())
    group.add("a", _Ref(), b"")
    shapes[0] = ClusterShape((HEAD, MID, gpu))
    watch.check()
    assert watch.check() == ["a"] and ended == [("a", ("gpu",))]


def test_turned_off_mid_run_the_watcher_leaves_the_calls_in_flight_waiting(monkeypatch):
    """A review: configure(cancel_stranded_calls=False) for an autoscaling cluster left the
    watcher of the calls already in flight running, and they were still cancelled."""
    import raysched

    shapes, ended, shrinks = [ClusterShape((HEAD, BIG, MID))], [], []
    watch = _watch(shapes, ended, shrinks)
    group = watch.group(function="f", code_hash="h", config=None, label=LABEL, plain=LABEL.plain({}),
                        node_id=None, demands=(), selectors=())
    group.add("a", _Ref(), b"")
    before = raysched.get_config()
    raysched.configure(cancel_stranded_calls=False)
    try:
        shapes[0] = ClusterShape((HEAD, MID))
        assert watch.check() == [] and watch.check() == [] and not ended and watch.in_flight() == 1
    finally:
        raysched.configure(before)
    assert watch.check() == [] and watch.check() == ["a"]  # turned on again: two looks, as ever


def test_a_plan_watches_its_calls_only_where_they_could_be_stranded_and_when_configured():
    """Decided once per plan (``AdaptiveFunction._strand_group``): a label only the big node
    holds is watched, unless ``cancel_stranded_calls`` is off (an autoscaling cluster brings
    such a node back); on equal nodes nothing is."""
    from raysched import adaptive_remote
    from raysched.config import RayschedConfig
    from raysched.runtime.decorator import _WATCH_ENDS, _CallOptions

    if not _WATCH_ENDS:
        return  # a Ray that cannot watch a ref without fetching it watches nothing
    f = adaptive_remote(memory=2 * GiB)(lambda x: x)

    class Client:
        strand_watch = __import__("raysched.runtime.stranded", fromlist=["StrandWatch"]).StrandWatch(lambda: None)

    options = _CallOptions({}, (), {})
    # (a strategy named: no placement group to look up, which needs a Ray session)
    ray_options = {"num_cpus": 1.0, "memory": 2368 * MiB, "scheduling_strategy": "DEFAULT"}
    mixed, equal = ClusterShape((HEAD, BIG, MID)), ClusterShape((BIG, BIG))
    assert f._strand_group(options, ray_options, mixed, Client(), RayschedConfig()) is not None
    assert f._strand_group(options, ray_options, mixed, Client(), RayschedConfig(cancel_stranded_calls=False)) is None
    assert f._strand_group(options, ray_options, equal, Client(), RayschedConfig()) is None
