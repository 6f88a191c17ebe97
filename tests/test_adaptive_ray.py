"""@adaptive_remote on a real local Ray: ObjectRef semantics, options, profiles, learning, bad input."""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import ray

from conftest import wait_for

import raysched
from raysched import InvalidInput, adaptive_remote
from raysched.types import GiB, MiB

pytestmark = pytest.mark.ray

PROFILE_COLUMNS = [
    "function", "code_hash", "attempt", "outcome", "input_size", "peak_rss_bytes", "cpu_seconds",
    "wall_seconds", "read_bytes", "write_bytes", "allocated_num_cpus", "allocated_memory_bytes",
    "predicted_memory_bytes", "timestamp",
]


@adaptive_remote
def add_one(x):
    return x + 1


@adaptive_remote(tags=["unit"], memory=300 * MiB, num_cpus=0.5)
def array_sum(a):
    return float(np.asarray(a).sum())


@adaptive_remote(name="grows_with_input")
def grows(n_bytes):
    block = np.ones(max(1, n_bytes // 8))
    return int(block.nbytes)


class Boom(ValueError):
    pass


@adaptive_remote
def fails(x):
    raise Boom(f"bad {x}")


@adaptive_remote(measure_every_call=True)
def byte_count(data):
    return len(data)


@adaptive_remote
def own_task_name(x):
    get_name = getattr(ray.get_runtime_context(), "get_task_name", None)  # not in Ray 2.40
    return x, get_name() if get_name is not None else None


@ray.remote
def plain_double(x):
    return 2 * x


@adaptive_remote
def naps(seconds):
    time.sleep(seconds)
    return seconds


def test_remote_returns_a_real_object_ref(ray_session):
    ref = add_one.remote(41)
    assert isinstance(ref, ray.ObjectRef)
    ready, _ = ray.wait([ref], timeout=60)
    assert ready == [ref]
    assert ray.get(ref) == 42
    # Another task, plain or adaptive, takes it as an argument.
    assert ray.get(plain_double.remote(ref)) == 84
    assert ray.get(add_one.remote(add_one.remote(1))) == 3


def test_calling_directly_is_an_error_like_ray(ray_session):
    with pytest.raises(TypeError, match="remote"):
        add_one(1)


def test_user_exception_keeps_its_type_and_is_recorded(ray_session):
    with pytest.raises(Boom, match="bad 7"):
        ray.get(fails.remote(7))
    rows = raysched.profiles(fails)
    assert list(rows["outcome"]) == ["error"]
    assert "Boom" in rows["error"].iloc[0]


def test_the_traceback_of_a_users_error_starts_at_the_users_code_as_in_ray(ray_session):
    # Plain Ray shows the task's traceback from the user's function on; raysched's entry
    # and measuring wrapper used to stand in front of it.
    with pytest.raises(Boom) as caught:
        ray.get(fails.remote(8))
    shown = str(caught.value)
    assert 'raise Boom(f"bad {x}")' in shown and "test_adaptive_ray.py" in shown, shown
    assert "raysched/runtime" not in shown, shown


def test_profiles_have_the_documented_columns_and_real_measurements(ray_session):
    arr = np.ones(2_000_000)  # 16 MB
    assert ray.get(array_sum.remote(arr)) == 2_000_000.0
    rows = raysched.profiles(array_sum)
    assert isinstance(rows, pd.DataFrame)
    for column in PROFILE_COLUMNS:
        assert column in rows.columns, column
    row = rows.iloc[-1]
    assert row["function"] == array_sum.name and row["code_hash"] == array_sum.code_hash
    assert row["attempt"] == 1 and row["outcome"] == "ok"
    assert row["input_size"] == arr.nbytes
    assert row["peak_rss_bytes"] > 30 * MiB  # a Python worker with numpy is never smaller
    assert row["wall_seconds"] > 0 and row["cpu_seconds"] >= 0
    # Cold start: the decorator's fallbacks, with the margin and rounding.
    assert row["allocated_num_cpus"] == 0.5
    assert row["allocated_memory_bytes"] == 352 * MiB  # 300 MiB x 1.15 rounded up to 16 MiB
    assert row["predicted_memory_bytes"] == 300 * MiB
    assert list(row["tags"]) == ["unit"]


def test_options_carry_metadata_and_explicit_resources_win(ray_session):
    ref = array_sum.options(input_size=12345, tags=["extra"], priority=3, num_cpus=1, memory=200 * MiB).remote([1, 2])
    assert ray.get(ref) == 3.0
    row = raysched.profiles(array_sum).iloc[-1]
    assert row["input_size"] == 12345
    assert sorted(row["tags"]) == ["extra", "unit"]
    assert row["priority"] == 3
    assert row["allocated_num_cpus"] == 1.0 and row["allocated_memory_bytes"] == 200 * MiB


def test_calls_of_one_size_band_share_a_plan_and_each_row_keeps_its_own_size(ray_session):
    """A batch whose inputs all differ a little (files, arrays) made a plan per call: the
    prediction, the allocation and a pickled template each time, ~100 us of driver CPU."""
    from raysched.runtime.client import size_band

    data = [b"x" * n for n in (99_334, 99_341, 99_100, 99_600)]  # one band: ~1.4% wide, around 99,334
    assert len({size_band(len(d)) for d in data}) == 1
    before = len(byte_count._plans)
    assert ray.get([byte_count.remote(d) for d in data]) == [len(d) for d in data]
    assert len(byte_count._plans) == before + 1
    rows = raysched.profiles(byte_count)
    assert sorted(rows["input_size"]) == sorted(len(d) for d in data)
    assert sorted(shapes[0] for shapes in rows["arg_shapes"]) == sorted(f"bytes[{len(d)}]" for d in data)
    assert rows["allocated_memory_bytes"].nunique() == 1


def test_calls_named_one_by_one_share_a_plan_and_each_task_runs_under_its_own_name(ray_session):
    """A per-call task name (for the dashboard) made a plan per call, as a new input size did."""
    before = len(own_task_name._plans)
    refs = [own_task_name.options(name=f"item-{i}").remote(i) for i in range(4)] + [own_task_name.remote(4)]
    values = ray.get(refs)
    assert len(own_task_name._plans) == before + 1
    if values[0][1] is None:
        pytest.skip("this Ray cannot tell a task its own name (RuntimeContext.get_task_name)")
    assert values == [(i, f"item-{i}") for i in range(4)] + [(4, "own_task_name")]


def test_input_size_of_an_object_ref_argument_is_known(ray_session):
    arr = np.ones(500_000)
    ref = ray.put(arr)
    assert ray.get(array_sum.remote(ref)) == 500_000.0
    row = raysched.profiles(array_sum).iloc[-1]
    assert row["input_size"] >= arr.nbytes
    # Looked up once per object: the same object passed again costs no round trip, and the
    # lookup holds no reference to it (Ray frees it once the caller drops it).
    from raysched.runtime import decorator

    lookups = []
    original = ray.experimental.get_object_locations
    ray.experimental.get_object_locations = lambda *a, **k: lookups.append(1) or original(*a, **k)
    try:
        assert ray.get([array_sum.remote(ref) for _ in range(3)]) == [500_000.0] * 3
    finally:
        ray.experimental.get_object_locations = original
    assert lookups == [] and decorator._REF_SIZES[ref.binary()] >= arr.nbytes
    assert all(type(k) is bytes for k in decorator._REF_SIZES)


@ray.remote
def _slow_ones(n):
    time.sleep(1.0)
    return np.ones(n)


def test_an_object_ref_still_being_made_costs_no_round_trip_per_call(ray_session):
    # The output of a task still running (a chain, a reduction) has no size yet: each call
    # that passed it asked its owner again (0.15-0.3 ms), chains were submitted 10x slower.
    from raysched.runtime import decorator

    pending = _slow_ones.remote(400_000)
    lookups = []
    original = ray.experimental.get_object_locations
    ray.experimental.get_object_locations = lambda *a, **k: lookups.append(1) or original(*a, **k)
    try:
        refs = [array_sum.remote(pending) for _ in range(5)]
        assert lookups == []
        assert ray.get(refs) == [400_000.0] * 5
        assert ray.get(array_sum.remote(pending)) == 400_000.0  # made now: its size is known at once
    finally:
        ray.experimental.get_object_locations = original
    assert lookups == [] and decorator._REF_SIZES[pending.binary()] >= 400_000 * 8
    # Its row has the size: a function measured on every call (array_sum's calls, tiny by now,
    # are thinned, so its last row may stand for an earlier call, made while the object was not).
    assert ray.get(byte_count.remote(pending)) == 400_000
    assert (raysched.profiles(byte_count)["input_size"] >= 400_000 * 8).any()


@adaptive_remote(memory=64 * MiB, max_attempts=2)
def reads_zero_copy(a, seconds):
    total = float(a.sum())  # touches every page of the argument, where the object store holds it
    time.sleep(seconds)  # long enough for the monitor's samples in a row
    return total


def test_an_argument_read_zero_copy_is_not_the_tasks_memory(ray_session):
    # Ray maps a numpy argument out of the object store: its pages are shared memory,
    # which the node holds once whichever task reads it, and which Ray's memory monitor
    # does not count against the task.  Counted as the task's own, they made the monitor
    # stop this call as "growing past its allocation" and resubmit it with ~5x the label.
    arr = np.ones(300 * MiB // 8)
    ref = ray.put(arr)
    assert ray.get(reads_zero_copy.remote(ref, 2.5), timeout=120) == float(arr.size)
    rows = raysched.profiles(reads_zero_copy)
    assert rows.attempt.tolist() == [1] and rows.outcome.tolist() == ["ok"], rows
    assert rows.peak_rss_bytes.iloc[0] - rows.start_rss_bytes.iloc[0] < 40 * MiB, rows.iloc[0]
    assert raysched.events(reads_zero_copy).empty


def test_predict_uses_per_call_input_size(ray_session):
    prediction = grows.options(input_size=10**6).predict(10**6)
    for resource in ("memory", "cpu", "wall"):
        est = prediction[resource]
        assert est.lower <= est.target <= est.upper
        assert est.n_history == 0
    assert prediction.source == "fallback"


def test_learns_from_history_then_from_the_model(ray_session):
    # Wall times of calls this short follow the machine's load: beside another test worker they
    # "shifted" mid-test, and the wall chain stood on the 26 runs since (no model under 30).
    # Shifts have tests of their own; here the whole history counts.
    base = raysched.get_config()
    raysched.configure(shift_detection=False)
    try:
        _learns_from_history_then_from_the_model(ray_session)
    finally:
        raysched.configure(base)


def _learns_from_history_then_from_the_model(ray_session):
    sizes = [int(s) for s in np.linspace(8 * MiB, 160 * MiB, 36)]
    first, rest = sizes[::7], [s for i, s in enumerate(sizes) if i % 7]  # 6 spread over the range
    # An int argument has no size of its own: the caller says how big the input is.
    ray.get([grows.options(input_size=s).remote(s) for s in first])
    raysched.profiles(grows)  # let the rows land
    small = grows.options(input_size=8 * MiB).predict(8 * MiB)
    big = grows.options(input_size=160 * MiB).predict(160 * MiB)
    assert len(raysched.profiles(grows)) == 6, raysched.profiles(grows)[["outcome", "input_size", "peak_rss_bytes", "memory_sample_bytes"]]
    # Memory from the 6 runs. (Not the prediction's overall source: that is the least informed
    # resource's, and CPU cores are recorded only for runs of 50 ms or more, which these
    # calls are not on a fast machine: then CPU, and the overall source, are the fallback.)
    assert small.memory.source == "history" and small.memory.n_history == 6
    assert big.memory.target > small.memory.target + 80 * MiB  # scales with input size
    ray.get([grows.options(input_size=s).remote(s) for s in rest])
    grows.refresh(train=True)
    learned = grows.options(input_size=160 * MiB).predict(160 * MiB)
    # Wall time comes from its XGBoost model now; memory from the cost-aware estimator,
    # which ranks before the memory model by default (memory_cost_aware). (CPU cores are
    # only recorded for runs of 50 ms or more, so CPU may still lack a model here.)
    assert learned.wall.source.startswith("model-v")
    assert learned.memory.source == "history" and learned.memory.n_history == 36
    assert learned.memory.target == pytest.approx(160 * MiB + 100 * MiB, rel=0.5)
    # A warm submission is sized from what was learnt, not from the 1 GiB cold default.
    ray.get(grows.options(input_size=64 * MiB).remote(64 * MiB))
    warm = raysched.profiles(grows).iloc[-1]
    assert warm["predicted_memory_bytes"] < 512 * MiB  # (its overall source may be CPU's fallback, see above)
    assert warm["allocated_memory_bytes"] < 512 * MiB
    assert warm["peak_rss_bytes"] <= warm["allocated_memory_bytes"] * 1.1
    # The training is in MLflow's registry, in XGBoost's own format.
    from raysched.store.registry import ModelRegistry

    versions = ModelRegistry(ray_session).versions("grows_with_input", "memory")
    assert versions and all("pinball_loss" in v["metrics"] for v in versions)


@adaptive_remote(name="holds_by_tag", num_cpus=0.25)
def holds(mib):
    block = np.ones(mib * MiB // 8)
    return int(block.nbytes)


def test_calls_with_other_tags_are_sized_from_their_own_runs(ray_session):
    # The same argument type and no input size: only the tag tells a small genome's calls
    # from a big one's, as a user says it with .options(tags=...).
    small, big = holds.options(tags=["genome=small"]), holds.options(tags=["genome=big"])
    ray.get([small.remote(8) for _ in range(8)] + [big.remote(240) for _ in range(8)])
    wait_for(lambda: len(raysched.profiles(holds)) == 16, timeout=30)
    holds.refresh()
    for_small, for_big = small.predict(8), big.predict(240)
    # Each from its own 8 runs (the cost-aware estimator), not from the 16 pooled.
    assert for_small.memory.source == for_big.memory.source == "history"
    assert for_small.memory.n_history == for_big.memory.n_history == 8
    assert for_big.memory.upper > for_small.memory.upper + 200 * MiB
    # A small call is submitted with a label that fits its own peaks, not the big ones'.
    ray.get(small.remote(8))
    row = raysched.profiles(holds).iloc[-1]
    assert sorted(row["tags"]) == ["genome=small"]
    assert row["allocated_memory_bytes"] < row["peak_rss_bytes"] + 150 * MiB
    # A tag never seen starts from all the function's runs.
    assert holds.options(tags=["genome=new"]).predict(8).memory.n_history == 17  # the warm call included


@adaptive_remote(name="holds_then_less", num_cpus=0.25)
def holds_less(mib):
    block = np.ones(mib * MiB // 8)
    return int(block.nbytes)


def test_a_function_whose_use_shifted_is_sized_from_the_runs_since(ray_session):
    # The same code and no input size (a number alone is a parameter): from some call on
    # the function needs a fifth of its memory, as when a job's data shrank.
    ray.get([holds_less.remote(300) for _ in range(10)])
    ray.get([holds_less.remote(20) for _ in range(10)])
    wait_for(lambda: len(raysched.profiles(holds_less)) == 20, timeout=30)
    holds_less.refresh()
    since = holds_less.predict(20).memory
    assert since.n_history == 10  # the ten runs since the shift, not all twenty
    rows = raysched.profiles(holds_less).sort_values("timestamp")  # (stored in the order batches came)
    small_peak = rows["peak_rss_bytes"].iloc[10:].max()
    assert since.upper < small_peak + 100 * MiB < rows["peak_rss_bytes"].iloc[:10].min()
    # The next call is submitted with a label that fits its own level, not the old one.
    ray.get(holds_less.remote(20))
    newest = raysched.profiles(holds_less).sort_values("timestamp").iloc[-1]
    assert newest["allocated_memory_bytes"] < small_peak + 100 * MiB


@pytest.mark.parametrize(
    "make",
    [
        lambda: adaptive_remote(5),
        lambda: adaptive_remote(memory="1GB")(lambda x: x),
        lambda: adaptive_remote(memory=-5)(lambda x: x),
        lambda: adaptive_remote(tags=[1, 2])(lambda x: x),
        lambda: adaptive_remote(max_attempts=0)(lambda x: x),
        lambda: adaptive_remote(measure_every_call="yes")(lambda x: x),
        lambda: adaptive_remote(measure_every_call=True)(type("Counter", (), {})),  # tasks only
        lambda: add_one.options(input_size=-1),
        lambda: add_one.options(input_size="big"),
        lambda: add_one.options(tags=[None]),
        lambda: add_one.options(memory=-1),
        lambda: add_one.options(priority="high"),
        # Ray's own option checks, made when the decorator or .options() runs
        lambda: adaptive_remote(num_gpu=1)(lambda x: x),
        lambda: adaptive_remote(max_retries="many")(lambda x: x),
        lambda: add_one.options(max_calls=1),  # Ray takes max_calls only where the function is made
        lambda: add_one.options(scheduling_strategy=42),
    ],
)
def test_bad_input_is_a_clear_error(ray_session, make):
    with pytest.raises(InvalidInput):
        make()


@adaptive_remote(memory=0)
def no_label(x):
    return x


class _UnreadableError(Exception):
    def __str__(self):
        raise RuntimeError("no message for you")


@adaptive_remote
def raises_unreadable():
    raise _UnreadableError()


def test_wrong_arguments_fail_at_remote_as_in_ray_and_run_nothing(ray_session):
    before = len(raysched.profiles(add_one))
    with pytest.raises(TypeError, match="too many positional arguments"):
        add_one.remote(1, 2)
    with pytest.raises(TypeError, match="missing a required argument: 'x'"):
        add_one.options(input_size=5).remote()
    with pytest.raises(TypeError, match="unexpected keyword argument 'y'"):
        add_one.remote(1, y=2)
    assert len(raysched.profiles(add_one)) == before  # nothing ran, nothing recorded


@adaptive_remote(num_cpus=0)
def no_cpu_slot(x):
    return x


def test_a_fallback_of_num_cpus_zero_asks_no_cpu_as_in_ray(ray_session):
    """``@adaptive_remote(num_cpus=0)`` (a task that only waits on others) got the minimum
    share, 0.25 CPU, where ``@ray.remote(num_cpus=0)`` takes no CPU slot."""
    assert no_cpu_slot.predict(1).cpu.source == "fallback"
    assert ray.get([no_cpu_slot.remote(i) for i in range(3)], timeout=60) == [0, 1, 2]
    rows = raysched.profiles(no_cpu_slot)
    assert len(rows) == 3 and (rows["allocated_num_cpus"] == 0).all()


@adaptive_remote
def waits_only(x):
    return x


def test_a_default_of_num_cpus_zero_asks_no_cpu_as_a_fallback_of_zero_does(ray_session):
    """``configure(default_num_cpus=0)`` gave cold calls the minimum share, 0.25 CPU, where the
    same default for memory (and a decorator's ``num_cpus=0``) asks no slot (a helper's audit)."""
    raysched.configure(default_num_cpus=0)
    try:
        assert waits_only.predict(1).cpu.source == "fallback"
        assert ray.get([waits_only.remote(i) for i in range(3)], timeout=60) == [0, 1, 2]
    finally:
        raysched.configure(default_num_cpus=1.0)
    rows = raysched.profiles(waits_only)
    assert len(rows) == 3 and (rows["allocated_num_cpus"] == 0).all()


def test_predict_refuses_arguments_the_function_would_refuse(ray_session):
    """``f.predict(1, 2, 3)`` returned a Prediction for a call ``f.remote(1, 2, 3)`` refuses."""
    with pytest.raises(TypeError, match="too many positional arguments"):
        add_one.predict(1, 2, 3)
    with pytest.raises(TypeError, match="missing a required argument: 'x'"):
        add_one.options(input_size=5).predict()
    assert add_one.predict(1).memory.upper > 0


def test_memory_zero_asks_no_memory_label_as_in_ray(ray_session):
    """``.options(memory=0)`` is Ray's way to ask no label; as a fallback it starts cold without one."""
    assert ray.get([no_label.remote(1), add_one.options(memory=0).remote(1)], timeout=60) == [1, 2]
    cold = raysched.profiles(no_label).iloc[-1]
    assert cold["allocated_memory_bytes"] == 0 and cold["outcome"] == "ok"
    explicit = raysched.profiles(add_one).iloc[-1]
    assert explicit["allocated_memory_bytes"] == 0


@adaptive_remote
def nests(n):
    return 0 if n == 0 else ray.get(nests.remote(n - 1)) + 1


def test_a_default_memory_of_zero_leaves_cold_calls_unlabelled(ray_session):
    """Parents blocked on their children keep their labels: with the 1 GiB default, a nested
    program fills a 16 GiB node at depth 14 and stops there. With default_memory_bytes=0
    cold calls ask no memory label, as in plain Ray. The calls the tasks make count too: a
    worker takes the config of the driver whose task it runs (it read its environment's)."""
    raysched.configure(default_memory_bytes=0)
    try:
        assert ray.get(nests.remote(3), timeout=120) == 3
    finally:
        raysched.configure(default_memory_bytes=GiB)
    rows = raysched.profiles(nests)
    assert len(rows) == 4 and (rows["allocated_memory_bytes"] == 0).all() and (rows["outcome"] == "ok").all()


@pytest.mark.filterwarnings("ignore:DAGNode.execute:DeprecationWarning")  # Ray 2.60 deprecates it; it works
def test_bind_builds_a_ray_dag_whose_calls_raysched_sizes_and_measures(ray_session):
    from ray.dag import InputNode

    before = len(raysched.profiles(add_one))
    with InputNode() as start:
        dag = plain_double.bind(add_one.options(input_size=8).bind(add_one.bind(start)))
    assert ray.get(dag.execute(3), timeout=60) == 10  # (3 + 1 + 1) x 2
    assert ray.get(add_one.bind(41).execute(), timeout=60) == 42
    rows = raysched.profiles(add_one)
    assert len(rows) == before + 3 and (rows["outcome"].iloc[before:] == "ok").all()
    assert 8 in set(rows["input_size"].iloc[before:])  # the options bound with it count


def test_a_function_sent_to_a_task_leaves_its_caches_behind(ray_session):
    """Captured by a task, a warm function carried its plans, bundles and models (0.9 MB after
    800 calls); the task builds its own."""
    import ray.cloudpickle as cloudpickle

    cold = len(cloudpickle.dumps(array_sum))
    ray.get([array_sum.remote(np.ones(n)) for n in (10, 100, 1000, 10_000)], timeout=60)
    assert array_sum._plans  # warm here
    assert len(cloudpickle.dumps(array_sum)) <= cold + 100
    copy = cloudpickle.loads(cloudpickle.dumps(array_sum))
    assert copy._plans == {} and copy.code_hash == array_sum.code_hash

    @ray.remote
    def calls_it(n):
        return ray.get(array_sum.remote(np.ones(n)))

    assert ray.get(calls_it.remote(7), timeout=60) == 7.0


def test_an_exception_whose_message_raises_is_recorded_as_an_error(ray_session):
    """Its f-string raised before the outcome was set, and the attempt was recorded as ok."""
    with pytest.raises(ray.exceptions.RayTaskError):  # what plain Ray raises for it too (a RuntimeError)
        ray.get(raises_unreadable.remote(), timeout=60)
    row = raysched.profiles(raises_unreadable).iloc[-1]
    assert row["outcome"] == "error" and row["error"] == "_UnreadableError (its message could not be read)"


@adaptive_remote(max_calls=1)
def pid_once(_):
    return os.getpid()


def test_max_calls_is_applied_where_ray_takes_it(ray_session):
    """Ray refuses max_calls in .options(): raysched puts it on the remote function, so each
    call gets a fresh worker process, and every call is still measured and recorded."""
    pids = [ray.get(pid_once.remote(i)) for i in range(3)]
    assert len(set(pids)) == 3, pids
    assert wait_for(lambda: len(raysched.profiles(pid_once)) >= 3, timeout=30)
    rows = raysched.profiles(pid_once)
    assert sorted(rows["worker_pid"]) == sorted(pids)
    assert (rows["outcome"] == "ok").all()


@adaptive_remote
def short_wait(i):
    import time

    time.sleep(0.02)  # 20 ms, mostly waiting: too short for cores of its own
    return i


def test_short_calls_are_sized_from_their_pooled_cores(ray_session):
    """Calls under 50 ms record no cores each; once they add up to a second of wall time
    the pooled ratio sizes the next calls (I/O-bound: the minimum fraction of a core)."""
    assert ray.get([short_wait.remote(i) for i in range(80)]) == list(range(80))
    assert wait_for(lambda: len(raysched.profiles(short_wait)) >= 80, timeout=30)
    rows = raysched.profiles(short_wait)
    short = rows["wall_seconds"] < 0.05  # a 20 ms sleep preempted past 50 ms has cores of its own
    assert short.sum() >= 70 and rows.loc[short, "cpu_cores"].isna().all()
    assert rows.loc[~short, "cpu_cores"].notna().all()
    short_wait.refresh()
    prediction = short_wait.predict(0)
    assert prediction.cpu.n_history >= 80 and prediction.cpu.target < 0.25, prediction.cpu
    assert ray.get([short_wait.remote(i) for i in range(5)]) == list(range(5))
    assert wait_for(lambda: len(raysched.profiles(short_wait)) >= 85, timeout=30)
    later = raysched.profiles(short_wait).tail(5)
    assert (later["allocated_num_cpus"] == raysched.get_config().min_num_cpus).all(), later["allocated_num_cpus"]


@adaptive_remote
def tiny(x):
    if x < 0:
        import time

        time.sleep(-x)
    return x + 1


@adaptive_remote(measure_every_call=True)
def tiny_audited(x):
    return x + 1


def test_tiny_calls_are_thinned_and_every_call_is_still_counted(ray_session):
    """Once a worker's calls of a function were short 5 times in a row, it measures only one
    in 1,000 and counts the others into the rows it sends (``calls``); a counted call that
    then runs long is measured in full from its first live sample: its row has its use,
    with the wall time from its start."""
    base = raysched.get_config()
    raysched.configure(short_call_streak=5, short_call_measure_every=1000)
    try:
        assert ray.get([tiny.remote(i) for i in range(300)]) == list(range(1, 301))
        for i in range(40):  # one by one: every worker that ran them is thinning now
            assert ray.get(tiny.remote(i)) == i + 1
        assert ray.get(tiny.remote(-1.25)) == -0.25
        assert wait_for(lambda: raysched.profiles(tiny)["calls"].sum() == 341, timeout=30)
        rows = raysched.profiles(tiny)
        assert (rows["outcome"] == "ok").all()
        counted = rows[rows["calls"] > 1]
        # Counts go into a measured row of the same batch, or (when its batch has none, which
        # depends on timing) into a row of their own that carries no use and no call id.
        assert len(counted)
        own = rows[rows["peak_rss_bytes"].isna()]
        assert (own["calls"] >= 1).all() and own["call_id"].fillna("").eq("").all(), own
        assert len(rows) < 341 / 4, "calls were not thinned"
        slow = rows[rows["wall_seconds"] >= 1.25]
        assert len(slow) == 1 and slow["wall_seconds"].iloc[0] < 5
        assert slow["peak_rss_bytes"].notna().all() and slow["cpu_seconds"].notna().all()
        # It ran in a worker that was counting, not measuring, this function's calls.
        assert slow["worker_pid"].iloc[0] in set(counted["worker_pid"])
        # A function that opted out keeps a fully measured row per call.
        assert ray.get([tiny_audited.remote(i) for i in range(100)]) == list(range(1, 101))
        assert wait_for(lambda: len(raysched.profiles(tiny_audited)) == 100, timeout=30)
        audited = raysched.profiles(tiny_audited)
        assert (audited["calls"] == 1).all() and audited["peak_rss_bytes"].notna().all()
    finally:
        raysched.configure(base)


def test_corrupt_part_file_is_set_aside_and_other_rows_still_read(ray_session):
    ray.get(add_one.remote(1))
    before = len(raysched.profiles(add_one))
    (ray_session / "profiles" / "part-0000000000000000001-1-deadbeef.parquet").write_bytes(b"not parquet at all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = raysched.profiles(add_one)
    assert len(after) == before
    assert any("quarantine" in str(w.message) for w in caught)


@adaptive_remote(memory=300 * MiB, num_cpus=0.5)
def sum_in_group(a):
    return float(np.asarray(a).sum())


@ray.remote
def run_inside_group(x):
    # a plain task placed in a group that captures its children: raysched's call inherits it
    return ray.get(sum_in_group.remote([x, 1]))


def test_calls_run_inside_placement_groups(ray_session):
    # Bundles rarely hold `memory`: raysched's labels are cut to the bundle, or Ray
    # would refuse the task ("cannot fit into any bundles").
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([{"CPU": 0.5}, {"CPU": 0.5, "memory": 200 * MiB}])
    ray.get(group.ready(), timeout=30)
    try:
        for index in (0, 1, -1):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
            assert ray.get(sum_in_group.options(scheduling_strategy=strategy).remote(np.ones(10)), timeout=60) == 10.0
        captured = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
        assert ray.get(run_inside_group.options(scheduling_strategy=captured, num_cpus=0).remote(1), timeout=60) == 2.0
        # 300 MiB and 0.5 CPU asked: the labels fit the bundle, the allocation is kept. (The
        # fourth call may already be sized from the first three's runs, ~100 MiB: whether
        # their rows reached the profiler before it asks is a race, so only the first three.)
        rows = raysched.profiles(sum_in_group).sort_values("timestamp")
        assert len(rows) == 4 and (rows["outcome"] == "ok").all(), rows
        assert (rows["allocated_memory_bytes"].head(3) >= 300 * MiB).all(), rows["allocated_memory_bytes"]
    finally:
        remove_placement_group(group)


def test_calls_in_a_group_with_one_bundle_holding_memory_use_every_bundle(ray_session):
    """An audit: in a group like [{CPU: 1, memory: 256 MiB}, {CPU: 1}] every call's label was cut
    to the first bundle's, and the calls ran there one after another: two 1.5 s calls took 3 s
    where plain Ray's took 1.5 s. And a caller's own num_cpus was cut to the bundle silently
    (run with 1 core, recorded as 2): it is left to Ray, which refuses it as for plain Ray."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([{"CPU": 1, "memory": 256 * MiB}, {"CPU": 1}])
    ray.get(group.ready(), timeout=30)
    try:
        strategy = PlacementGroupSchedulingStrategy(group)
        ray.get(stamps_its_span.options(scheduling_strategy=strategy).remote(0.0), timeout=60)  # a warm worker
        spans = ray.get([stamps_its_span.options(scheduling_strategy=strategy).remote(1.5) for _ in range(2)],
                        timeout=60)
        (start_a, end_a), (start_b, end_b) = sorted(spans)
        assert start_b < end_a, f"the calls ran one after another: {spans}"
        with pytest.raises(ValueError, match="cannot fit into any bundles"):
            stamps_its_span.options(scheduling_strategy=strategy, num_cpus=2).remote(0.0)
    finally:
        remove_placement_group(group)


@adaptive_remote(memory=1 * GiB, num_cpus=1)
def stamps_its_span(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def test_a_call_cancelled_before_it_started_makes_profiles_wait_once_at_most(ray_session):
    """profiles() waits for rows of this driver's calls; one cancelled while queued never
    gets one, and every later profiles() waited out the whole deadline (3 s) for it."""
    ray.get([naps.remote(0.1) for _ in range(2)])
    blockers = [naps.options(num_cpus=1).remote(3) for _ in range(2)]  # the cluster's 2 CPUs
    time.sleep(0.5)
    queued = naps.remote(1)
    time.sleep(0.3)
    ray.cancel(queued)
    assert ray.get(blockers) == [3, 3]
    raysched.profiles(naps)
    settles = []
    original = raysched._settle
    raysched._settle = lambda: settles.append(1) or original()
    try:
        rows = raysched.profiles(naps)
    finally:
        raysched._settle = original
    assert settles == []  # every call has its row or was given up on: nothing to wait for at all
    assert len(rows) == 4 and (rows["outcome"] == "ok").all()


# --- exceptions Ray retries, and exits, in a session without the dashboard ---------------------------


def _raise_counted(path: str) -> None:
    with open(path, "a") as f:
        f.write("x")
    raise ValueError("always")


def _exit_counted(path: str) -> None:
    with open(path, "a") as f:
        f.write("x")
    raise SystemExit(3)


def _live_keys() -> list[bytes]:
    from ray.experimental import internal_kv

    from raysched.runtime.worker import LIVE_KV_NAMESPACE

    return internal_kv._internal_kv_list("", namespace=LIVE_KV_NAMESPACE)


def test_retried_exceptions_without_the_dashboard_rerun_as_in_ray_and_leave_no_keys(ray_session, tmp_path):
    # Without the dashboard Ray's state API cannot say why an attempt's task was retried;
    # raysched saw the exception itself. It used to take the retry for a memory kill: the
    # ladder climbed (to 15 GiB), each rung waited out the hand-over, and the call ran once
    # more than under plain Ray. And every such call left a marker in Ray's KV for good.
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(ValueError):
        ray.get(ray.remote(max_retries=2, retry_exceptions=True)(_raise_counted).remote(str(plain)), timeout=120)
    function = adaptive_remote(name="raises_without_dashboard", memory=128 * MiB, max_retries=2,
                               retry_exceptions=True)(_raise_counted)
    mine = tmp_path / "mine"
    mine.write_text("")
    started = time.monotonic()
    with pytest.raises(ValueError):
        ray.get(function.remote(str(mine)), timeout=120)
    assert len(mine.read_text()) == len(plain.read_text()) == 3
    assert time.monotonic() - started < 15  # no hand-over timeouts
    rows = raysched.profiles(function).sort_values("attempt")
    assert list(rows["attempt"]) == [1, 2, 3] and set(rows["outcome"]) == {"error"}, rows[["attempt", "outcome"]]
    assert rows["allocated_memory_bytes"].nunique() == 1, rows["allocated_memory_bytes"]
    markers = lambda: [k for k in _live_keys() if k.startswith((b"rerun:", b"raised:"))]  # noqa: E731
    assert wait_for(lambda: not markers(), timeout=10), markers()


class Transient(Exception):
    pass


# As a class defined in the driver's script is: pickled by reference to a ``__main__`` that a
# worker does not have.  Options naming it made every call fail before the user's code ran.
Transient.__module__ = "__main__"


def _transient_once(path: str, x: int) -> int:
    with open(path, "a") as f:
        f.write("x")
    if len(open(path).read()) == 1:
        raise Transient("the first run fails")
    return 2 * x


_transient_once.__module__ = "__main__"  # a function of the script too: pickled by value, with the class


def test_retry_exceptions_naming_a_class_of_the_drivers_script_works_as_in_ray(ray_session, tmp_path):
    plain = tmp_path / "plain"
    assert ray.get(ray.remote(max_retries=2, retry_exceptions=[Transient])(_transient_once)
                   .remote(str(plain), 21), timeout=120) == 42
    function = adaptive_remote(name="retries_a_main_class", memory=128 * MiB, max_retries=2,
                               retry_exceptions=[Transient])(_transient_once)
    mine = tmp_path / "mine"
    assert ray.get(function.remote(str(mine), 21), timeout=120) == 42
    again = tmp_path / "again"  # and per call, through .options()
    assert ray.get(function.options(retry_exceptions=[Transient, KeyError]).remote(str(again), 5), timeout=120) == 10
    assert len(mine.read_text()) == len(plain.read_text()) == len(again.read_text()) == 2
    rows = raysched.profiles(function)
    assert sorted(rows["outcome"]) == ["error", "error", "ok", "ok"], rows[["attempt", "outcome"]]


def test_a_call_that_exits_keeps_its_row_and_fails_as_a_dead_worker(ray_session, tmp_path):
    # sys.exit() in a task ends its worker process: the rows it buffered died with it, and
    # without the dashboard Ray's retry (raysched always leaves one) took it for a memory kill.
    function = adaptive_remote(name="exits", memory=128 * MiB, max_retries=0)(_exit_counted)
    runs = tmp_path / "runs"
    runs.write_text("")
    with pytest.raises(ray.exceptions.WorkerCrashedError) as raised:
        ray.get(function.remote(str(runs)), timeout=120)
    assert isinstance(raised.value, raysched.WorkerDied) and "sys.exit" in str(raised.value), str(raised.value)
    assert len(runs.read_text()) == 1
    rows = raysched.profiles(function)
    assert list(rows["attempt"]) == [1] and list(rows["outcome"]) == ["error"], rows[["attempt", "outcome", "error"]]
    assert "SystemExit" in rows["error"].iloc[0]


@adaptive_remote(name="modules_at_start")
def modules_at_start():
    import sys

    return sorted(m for m in ("pandas", "pyarrow.parquet", "mlflow", "xgboost", "raysched.policy.estimators")
                  if m in sys.modules)


def test_a_workers_first_call_does_not_wait_for_the_drivers_libraries(ray_session):
    # A task's first run in a worker process took ~0.2 s more than plain Ray's (0.7 s on busy
    # cores: a batch's first task started that much later): taking the driver's config
    # imported the driver's client, and with it pandas and pyarrow. The worker needs neither.
    # Nor the estimators and the ladder, needed only when an attempt is stopped: their
    # modules were ~60 ms of the ~90 ms raysched's first call cost a worker that had run
    # plain tasks (benchmarks/README.md, "A worker's first call, again").
    # An env var of its own gives the call a fresh worker process.
    loaded = ray.get(modules_at_start.options(runtime_env={"env_vars": {"RAYSCHED_TEST_FRESH": "1"}}).remote())
    assert loaded == []


@ray.remote
def policy_loaded_by_handles(profiler: str, monitor: str, namespace: str):
    import sys

    ray.get_actor(profiler, namespace=namespace)
    ray.get_actor(monitor, namespace=namespace)
    return sorted(m for m in ("raysched.policy.estimators", "raysched.policy.recipe", "raysched.policy.models")
                  if m in sys.modules)


def test_a_workers_handles_on_raysched_actors_do_not_import_the_estimators(ray_session):
    # A worker gets a handle on the profiler when it sends its first rows, and on the monitor
    # at its first live sample; Ray imports each actor's module for it, and those imported
    # the whole policy (~0.12 s of CPU in every new worker, while its first call ran).
    from raysched.runtime.session import NAMESPACE, monitor_name, profiler_name

    assert ray.get(add_one.remote(1), timeout=60) == 2  # both actors are up
    config = raysched.get_config()
    loaded = ray.get(policy_loaded_by_handles.options(runtime_env={"env_vars": {"RAYSCHED_TEST_FRESH": "2"}})
                     .remote(profiler_name(config), monitor_name(config), NAMESPACE), timeout=60)
    assert loaded == []


@adaptive_remote
def takes_spec_bytes(x, spec_bytes=0):
    return x, spec_bytes


def test_a_parameter_named_as_raysched_own_first_argument_can_be_passed_by_keyword(ray_session):
    assert ray.get(takes_spec_bytes.remote(1, spec_bytes=5), timeout=60) == (1, 5)


@adaptive_remote(memory=1 * GiB, name="warmed_by_import")
def warmed_by_import(x):
    return x


def test_a_trace_imported_while_the_profiler_runs_sizes_the_next_submissions(ray_session, tmp_path):
    """An audit: on a running cluster, ``raysched import`` wrote the rows to the store, but the
    profiler went on serving the history it had read, and calls kept the 1 GiB fallback."""
    from click.testing import CliRunner

    from raysched.replay.commands import import_command

    assert ray.get(warmed_by_import.remote(1)) == 1  # the profiler holds this function, with no runs
    raysched.flush()
    trace = tmp_path / "trace.csv"
    header = "task_id,hash,process,status,cpus,memory,realtime,%cpu,peak_rss,rchar\n"
    trace.write_text(header + "".join(f"{i},{i:02x}/ab,warmed_by_import,COMPLETED,1,2000000000,4000,100,"
                                      f"{(300 + i) * MiB},{i * 1000}\n" for i in range(1, 13)))
    res = CliRunner().invoke(import_command, [str(trace), "--format", "nextflow", "--home", str(ray_session)])
    assert res.exit_code == 0 and "12 new row(s)" in res.output, res.output
    # Submissions only (a query such as profiles() re-reads the store itself). The driver refreshes
    # its bundle at most every 2 s, in the background of a submission, which itself goes with the
    # bundle it had: the second call after the pause is sized by what the profiler served then.
    # With one run of its own (fewer than 3), the function is sized by its name's history.
    time.sleep(2.5)
    assert ray.get(warmed_by_import.remote(2)) == 2
    time.sleep(1.0)
    assert ray.get(warmed_by_import.remote(3)) == 3
    raysched.flush()
    own = raysched.profiles(warmed_by_import).query("code_hash != 'imported'")
    assert len(own) == 3
    # the imported peaks (301-312 MiB) with a margin, not the 1 GiB fallback (1,184 MiB)
    assert 300 * MiB < int(own["allocated_memory_bytes"].iloc[-1]) < 700 * MiB, own["allocated_memory_bytes"]


@ray.remote
def sees_home(config):
    from raysched.runtime.session import sees_profilers_home

    return sees_profilers_home(config)


def test_the_profiler_names_its_folder_and_a_node_tells_its_own_folder_of_the_same_path_from_it(ray_session,
                                                                                                 tmp_path):
    """The profiler publishes its folder's id in Ray's KV, so that a worker on a node without
    shared storage keeps its rows for the profiler instead of writing them into a folder of the
    same path that nobody reads (``tests/test_rowsink.py`` has the worker's side)."""
    from raysched.runtime import session

    assert ray.get(add_one.remote(1), timeout=60) == 2  # the home's profiler is up
    config = raysched.get_config()
    assert session.published_home_id(config) == session.read_home_id(config) is not None
    assert ray.get(sees_home.remote(config), timeout=60) is True

    other = config.replace(home=str(tmp_path / "a-home"))  # a home whose profiler is elsewhere
    assert ray.get(sees_home.remote(other), timeout=60) is True  # no id published: as before ids
    published = session.publish_home_id(other)
    assert published and session.published_home_id(other) == published
    (other.home_path / session.HOME_ID_FILE).write_text("a folder of the same path on another node")
    assert ray.get(sees_home.remote(other), timeout=60) is False
