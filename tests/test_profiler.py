"""The profiler as a plain class: fake clock, inline executor, temp store, fake registry. No Ray."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from concurrent.futures import Future

import numpy as np
import pytest

from raysched.config import RayschedConfig
from raysched.runtime.profiler import Profiler
from raysched.store.profiles import ProfileStore
from raysched.types import MiB


class InlineExecutor:
    """Runs submitted work at once, so a test sees training happen deterministically."""

    def submit(self, fn, *args, **kwargs):
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


class FakeRegistry:
    def __init__(self):
        self.logged = []

    def log_training(self, artifact, params, metrics):
        self.logged.append((artifact, dict(params), dict(metrics)))
        from dataclasses import replace

        return replace(artifact, version=len(self.logged))

    def versions(self, function, resource):
        return []

    def load(self, function, resource, version=None):
        return None


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def rows(n, start=0, function="f", noise=0.0, seed=0):
    rng = np.random.default_rng(seed + start)
    out = []
    for i in range(start, start + n):
        size = int(rng.uniform(1, 100) * MiB)
        peak = int(100 * MiB + 2 * size + rng.normal(0, noise * MiB))
        out.append({
            "row_id": uuid.uuid4().hex, "function": function, "code_hash": "h1", "call_id": f"c{i}",
            "attempt": 1, "outcome": "ok", "timestamp": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
            "input_size": size, "peak_rss_bytes": peak, "memory_sample_bytes": peak,
            "cpu_seconds": 1.0, "cpu_cores": 1.0, "wall_seconds": 1.0 + size / 1e8,
            "read_bytes": 0, "write_bytes": 0,
        })
    return out


@pytest.fixture
def profiler(tmp_path):
    # bundle_max_age_s=0: every bundle is built anew, so a test sees its rows at once (sharing: below)
    config = RayschedConfig(home=str(tmp_path), min_history_for_model=30, retrain_after_new_rows=20,
                            min_retrain_interval_s=30.0, bundle_max_age_s=0.0)
    return Profiler(config, store=ProfileStore(tmp_path), registry=FakeRegistry(), clock=Clock(),
                    executor=InlineExecutor(), load_executor=InlineExecutor())


def test_bundle_carries_history_and_versions_move(profiler):
    assert profiler.bundle("f", "h1").n_history == 0
    profiler.record(rows(5))
    bundle = profiler.bundle("f", "h1")
    assert bundle.n_history == 5 and bundle.history_scope == "code"
    assert profiler.bundle("f", "h1", have_version=bundle.version) is None  # nothing new
    assert bundle.max_peak_seen > 100 * MiB


def test_a_row_the_store_refuses_is_set_aside_and_costs_no_other_row_of_its_batch(profiler, tmp_path, caplog):
    """A worker's batch is one write: a row out of its column's range (a priority past int32
    here) used to fail the whole batch, and the worker only logged it at debug level."""
    batch = rows(6)
    batch[2]["priority"] = 2**40
    with caplog.at_level("WARNING", logger="raysched.store.profiles"):
        assert profiler.record(batch) == 5
    stored = profiler.store.read("f")
    assert sorted(stored.call_id) == sorted(r["call_id"] for i, r in enumerate(batch) if i != 2)
    assert profiler.bundle("f", "h1").n_history == 5  # nor is it in the history the actor holds
    (aside,) = (tmp_path / "profiles" / "quarantine").glob("rejected-*.jsonl")
    (kept,) = [json.loads(line) for line in aside.read_text().splitlines()]
    assert kept["row"]["call_id"] == "c2" and kept["row"]["priority"] == 2**40
    assert "'priority'" in kept["error"] and "int32" in kept["error"]
    assert "1 profile row(s) of 6 could not be stored" in caplog.text and str(aside) in caplog.text
    assert profiler.record(rows(3, start=10)) == 3  # and the next batch is stored as usual
    assert len(profiler.store.read("f")) == 8


def test_the_profiler_merges_the_parts_it_writes_as_it_goes(tmp_path):
    """Each record is a Parquet part; merged in the background, a long run does not leave
    thousands for every read to open, and no row is lost or reordered."""
    config = RayschedConfig(home=str(tmp_path), min_history_for_model=10_000, store_tidy_fanout=3,
                            profile_commit_interval_s=0.0)
    profiler = Profiler(config, store=ProfileStore(tmp_path), registry=FakeRegistry(), clock=Clock(),
                        executor=InlineExecutor(), load_executor=InlineExecutor(), tidy_executor=InlineExecutor())
    for batch in range(60):
        profiler.record(rows(5, start=5 * batch))
    parts = profiler.store.profiles.parts()
    assert len(parts) <= 12 and profiler.status()["parts_merged"] >= 48, len(parts)
    assert list(profiler.store.read("f").call_id) == [f"c{i}" for i in range(300)]
    off = Profiler(config.replace(store_tidy_fanout=0), store=ProfileStore(tmp_path / "off"), registry=FakeRegistry(),
                   clock=Clock(), executor=InlineExecutor(), load_executor=InlineExecutor(),
                   tidy_executor=InlineExecutor())
    for batch in range(10):
        off.record(rows(5, start=5 * batch))
    assert len(off.store.profiles.parts()) == 10


def test_processes_asking_within_bundle_max_age_share_one_bundle_until_a_model_or_a_query_changes_it(tmp_path):
    """Every process that submits a function asks for its bundle every 2 s, and a build costs
    10-30 ms: with many submitting processes the profiler would do little else."""
    clock = Clock()
    config = RayschedConfig(home=str(tmp_path), min_history_for_model=30, retrain_after_new_rows=20,
                            min_retrain_interval_s=0.0, bundle_max_age_s=1.0, profile_commit_interval_s=0.0)
    profiler = Profiler(config, store=ProfileStore(tmp_path), registry=FakeRegistry(), clock=clock,
                        executor=InlineExecutor(), load_executor=InlineExecutor())
    profiler.record(rows(10))
    first = profiler.bundle("f", "h1")
    profiler.record(rows(5, start=10))
    assert profiler.bundle("f", "h1") is first and first.n_history == 10  # only rows came: shared
    assert profiler.bundle("f", "h1", have_version=first.version) is None  # the asker holds it already
    assert profiler.bundle("f", "h1", reload=True).n_history == 15  # a query is always fresh
    profiler.record(rows(5, start=15))
    clock.now += 1.0
    aged = profiler.bundle("f", "h1")
    assert aged.n_history == 20 and aged is not first  # older than bundle_max_age_s: rebuilt
    profiler.record(rows(20, start=20))  # 40 rows: the first model is trained and served
    assert profiler.bundle("f", "h1").models, "a new model is served at once, however young the bundle"


def test_rows_nobody_asks_for_are_held_up_to_the_window_only(tmp_path):
    config = RayschedConfig(home=str(tmp_path), min_history_for_model=10_000, history_window=50,
                            profile_commit_interval_s=0.0, bundle_max_age_s=0.0)
    profiler = Profiler(config, store=ProfileStore(tmp_path), registry=FakeRegistry(), clock=Clock(),
                        executor=InlineExecutor(), load_executor=InlineExecutor(), tidy_executor=InlineExecutor())
    profiler.bundle("f", "h1")  # the function's state is loaded: later rows are kept in memory
    for batch in range(40):
        profiler.record(rows(10, start=10 * batch))
    state = profiler._functions["f"]
    assert len(state._pending) <= 100  # 400 rows recorded, no bundle asked for meanwhile
    assert list(state.rows["call_id"]) == [f"c{i}" for i in range(350, 400)]  # the window, exactly


def test_missing_calls_names_the_calls_whose_rows_have_not_arrived(profiler):
    """What refresh(train=True) waits on: rows of the driver's calls, received or in the store."""
    assert profiler.missing_calls("f", ["c0", "c1"]) == ["c0", "c1"]
    profiler.record(rows(2))  # c0, c1
    assert profiler.missing_calls("f", ["c0", "c1", "c2"]) == ["c2"]
    assert profiler.missing_calls("g", ["c0"]) == ["c0"]  # another function's rows do not count
    fresh = Profiler(profiler.config, store=profiler.store, registry=FakeRegistry(), clock=Clock(),
                     executor=InlineExecutor(), load_executor=InlineExecutor())
    assert fresh.missing_calls("f", ["c1", "c9"]) == ["c9"]  # read back from the store


def test_unrecorded_names_missing_calls_per_function_and_says_when_no_rows_came_for_a_while(profiler):
    """What a flush (at ray.shutdown) waits on: rows of the driver's calls, and a quiet profiler."""
    profiler.record(rows(2))  # c0, c1 of f, at the clock's now
    missing, quiet = profiler.unrecorded({"f": ["c0", "c1", "c2"], "g": ["c0"]}, quiet_s=0.5)
    assert missing == {"f": ["c2"], "g": ["c0"]} and not quiet  # rows came just now
    profiler._clock.now += 0.5
    assert profiler.unrecorded({"f": ["c0", "c1"]}, quiet_s=0.5) == ({}, True)


def test_trains_once_enough_rows_then_throttles_by_clock(profiler):
    profiler.bundle("f", "h1")
    profiler.record(rows(29))
    assert profiler.registry.logged == []  # 29 < min_history_for_model
    profiler.record(rows(1, start=29))
    first = {a.resource for a, _, _ in profiler.registry.logged}
    assert {"memory", "cpu", "wall"} <= first
    n = len(profiler.registry.logged)
    profiler.record(rows(25, start=30))  # enough new rows, but within 30 s of the last training
    assert len(profiler.registry.logged) == n
    profiler._clock.now += 31
    profiler.record(rows(1, start=55))
    assert len(profiler.registry.logged) > n
    params = profiler.registry.logged[-1][1]
    metrics = profiler.registry.logged[-1][2]
    assert {"pinball_loss", "upper_coverage", "mean_over_allocation", "under_allocation_rate", "rows_train"} <= set(metrics)
    assert params["function"] == "f"


def test_retrains_only_when_the_task_time_since_covers_the_training_cost(profiler, monkeypatch):
    """A training may cost at most train_cost_fraction (5%) of the task seconds it learns from."""
    import raysched.runtime.profiler as profiler_module

    cpu = {"now": 0.0}
    monkeypatch.setattr(profiler_module.time, "process_time", lambda: cpu["now"])
    monkeypatch.setattr(profiler_module, "_IMPORTS_PAID", True)  # as after a first training

    class CostlyPredictor:
        def __init__(self, inner):
            self.inner = inner

        def train(self, history):
            cpu["now"] += 2.0  # what XGBoost and MLflow took
            return self.inner.train(history)

    monkeypatch.setattr(profiler, "_predictor", CostlyPredictor(profiler._predictor))
    profiler.bundle("f", "h1")
    profiler.record(rows(30))  # the first training is always allowed
    assert profiler._functions["f"].last_training_cpu_s == pytest.approx(2.0)
    n = len(profiler.registry.logged)

    def tiny(batch):  # millisecond tasks: 1 ms x 1 CPU each
        for r in batch:
            r["wall_seconds"], r["allocated_num_cpus"] = 0.001, 1.0
        return batch

    profiler._clock.now += 31
    profiler.record(tiny(rows(500, start=30)))  # enough rows and time, but 0.5 task-s x 5% << 2 CPU-s
    assert len(profiler.registry.logged) == n
    profiler._clock.now += 31
    heavy = rows(60, start=530)
    for r in heavy:
        r["wall_seconds"], r["allocated_num_cpus"] = 0.5, 1.0
    profiler.record(heavy)  # 60 x 0.5 s: 30.5 task-s x 5% = 1.5 CPU-s, still short of 2 ...
    assert len(profiler.registry.logged) == n
    profiler.record(rows(20, start=590))  # ... 20 runs of 1-2 s more cover it
    assert profiler._functions["f"].task_seconds_since_training == 0.0
    assert len(profiler.registry.logged) > n


def test_serves_a_new_model_only_if_no_worse_on_the_same_holdout(profiler):
    profiler.bundle("f", "h1")
    profiler.record(rows(40))
    served = profiler.bundle("f", "h1").models["memory"]
    assert served.version is not None
    # Rows from a very different process: the new model differs; whichever is better on
    # the newest holdout is served, and the served flag says which.
    profiler.record(rows(40, start=40, noise=200.0, seed=9))
    summary = profiler.train_now("f", "h1")
    mem = summary["resources"]["memory"]
    now_served = profiler.bundle("f", "h1").models["memory"]
    assert (now_served.version == mem["version"]) == mem["served"]
    meta = json.loads(profiler.registry.logged[-1][0].meta_json)
    assert meta["served"] == mem["served"]


def test_rows_survive_in_the_store_and_a_new_profiler_sees_them(profiler, tmp_path):
    profiler.record(rows(7))
    again = Profiler(profiler.config, store=ProfileStore(tmp_path), registry=FakeRegistry(), clock=Clock(),
                     executor=InlineExecutor(), load_executor=InlineExecutor())
    assert again.bundle("f", "h1").n_history == 7


def test_other_code_hash_falls_back_to_the_name_history(profiler):
    profiler.record(rows(6))
    bundle = profiler.bundle("f", "new-hash")
    assert bundle.history_scope == "name" and bundle.n_history == 6


class KeepingRegistry(FakeRegistry):
    """Returns what was logged, as MLflow's registry would to a restarted profiler."""

    def versions(self, function, resource):
        return [{"version": str(i + 1)} for i, (a, _, _) in enumerate(self.logged)
                if a.function == function and a.resource == resource]

    def load(self, function, resource, version=None):
        from dataclasses import replace

        artifact = self.logged[int(version) - 1][0]
        return replace(artifact, version=int(version))


def test_a_changed_functions_runs_are_not_sized_by_the_old_codes_models(tmp_path):
    config = RayschedConfig(home=str(tmp_path), min_history_for_model=30, retrain_after_new_rows=20,
                            min_retrain_interval_s=30.0, bundle_max_age_s=0.0)
    profiler = Profiler(config, store=ProfileStore(tmp_path), registry=KeepingRegistry(), clock=Clock(),
                        executor=InlineExecutor(), load_executor=InlineExecutor())
    profiler.bundle("f", "h1")
    profiler.record(rows(40))  # the old code: trained, its models served
    assert set(profiler.bundle("f", "h1").models) >= {"memory", "cpu", "wall"}
    # Before the new code has runs of its own it is predicted from the old code's (documented).
    assert profiler.bundle("f", "h2").history_scope == "name" and profiler.bundle("f", "h2").models
    new_code = [dict(r, code_hash="h2", peak_rss_bytes=8 * r["peak_rss_bytes"],
                     memory_sample_bytes=8 * r["memory_sample_bytes"], cpu_cores=4.0) for r in rows(5, start=40)]
    profiler.record(new_code)
    bundle = profiler.bundle("f", "h2")
    assert bundle.history_scope == "code" and bundle.n_history == 5
    assert bundle.models == {}  # the old code's models would say 1 core and an eighth of the memory
    # The ladder's largest peak is that of this code's runs: a leaner version's is not the old one's.
    lean = [dict(r, code_hash="h3", peak_rss_bytes=r["peak_rss_bytes"] // 10,
                 memory_sample_bytes=r["memory_sample_bytes"] // 10) for r in rows(3, start=50)]
    profiler.record(lean)
    assert profiler.bundle("f", "h3").max_peak_seen == max(r["peak_rss_bytes"] for r in lean)
    from raysched.policy.recipe import build_predictor
    from raysched.types import Features

    prediction = build_predictor(config).predict(Features(input_size=50 * MiB), bundle.history, bundle.models)
    assert prediction.memory.source == prediction.cpu.source == "history"
    assert prediction.memory.upper > 8 * 150 * MiB and prediction.cpu.upper >= 4.0
    assert set(profiler.bundle("f", "h1").models) >= {"memory", "cpu", "wall"}  # the old code keeps them
    # A restarted profiler knows which code its served models were trained on.
    again = Profiler(config, store=ProfileStore(tmp_path), registry=profiler.registry, clock=Clock(),
                     executor=InlineExecutor(), load_executor=InlineExecutor())
    assert again.bundle("f", "h2").models == {}
    assert set(again.bundle("f", "h1").models) >= {"memory", "cpu", "wall"}
    assert json.loads(profiler.registry.logged[-1][0].meta_json)["history_scope"] == "code"


def test_a_new_codes_first_model_is_served_and_two_codes_in_use_keep_a_model_each(tmp_path):
    """The old code's model is never shipped to the new code, so it is no rival: a new
    code's first model used to be compared with it on the new code's holdout, lost (the
    old one had learnt from 40x the runs), and the new code went without any model."""
    config = RayschedConfig(home=str(tmp_path), min_history_for_model=30, retrain_after_new_rows=20,
                            min_retrain_interval_s=30.0, bundle_max_age_s=0.0)
    clock = Clock()
    profiler = Profiler(config, store=ProfileStore(tmp_path), registry=FakeRegistry(), clock=clock,
                        executor=InlineExecutor(), load_executor=InlineExecutor())
    for start in range(0, 1200, 100):  # the old code: many runs, its models well trained
        profiler.record(rows(100, start=start, noise=2.0))
        clock.now += 31
    old = profiler.bundle("f", "h1").models
    assert set(old) >= {"memory", "cpu", "wall"}
    # The same behaviour, new code (a refactor), and noisier: its few runs train a model
    # that scores worse on its holdout than the old code's would.
    for start in range(1200, 1240, 20):
        profiler.record([dict(r, code_hash="h2") for r in rows(20, start=start, noise=30.0)])
        clock.now += 31
    profiler.train_now("f", "h2")
    new = profiler.bundle("f", "h2").models
    assert set(new) >= {"memory", "cpu", "wall"}
    assert all(m.version != old[r].version for r, m in new.items())
    # Both versions in use (two scripts sharing a home): each keeps its own models.
    profiler.record(rows(20, start=1240, noise=2.0))
    profiler.train_now("f", "h1")
    assert {r: m.version for r, m in profiler.bundle("f", "h2").models.items()} == {r: m.version for r, m in new.items()}
    assert set(profiler.bundle("f", "h1").models) >= {"memory", "cpu", "wall"}


def test_a_stored_model_of_other_features_is_skipped_with_a_warning_and_the_rows_still_serve(tmp_path, caplog):
    from dataclasses import replace

    config = RayschedConfig(home=str(tmp_path), min_history_for_model=30, retrain_after_new_rows=20,
                            min_retrain_interval_s=30.0, bundle_max_age_s=0.0)
    profiler = Profiler(config, store=ProfileStore(tmp_path), registry=KeepingRegistry(), clock=Clock(),
                        executor=InlineExecutor(), load_executor=InlineExecutor())
    profiler.record(rows(40))
    registry = profiler.registry
    # As an older raysched wrote them: fewer tag features.
    for i, (artifact, params, metrics) in enumerate(registry.logged):
        meta = json.loads(artifact.meta_json)
        meta["feature_names"] = ["log2_input_size"] + [f"tag_{k}" for k in range(8)]
        registry.logged[i] = (replace(artifact, meta_json=json.dumps(meta)), params, metrics)
    again = Profiler(config, store=ProfileStore(tmp_path), registry=registry, clock=Clock(), executor=InlineExecutor(),
                     load_executor=InlineExecutor())
    with caplog.at_level("WARNING"):
        bundle = again.bundle("f", "h1")
    assert bundle.models == {} and bundle.n_history == 40
    assert "trained on features" in caplog.text


def test_history_read_while_rows_arrive_sees_whole_rows(profiler):
    """Training reads the history on its own thread while `record` appends: the merge of
    pending rows must not see a batch half appended (CI once failed with 'Length of values
    (7) does not match length of index (9)')."""
    import sys
    import threading

    profiler.record(rows(40))
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # thread switches as often as possible, to meet the race
    stop = threading.Event()
    errors: list[BaseException] = []

    def keep_recording():
        i = 40
        while not stop.is_set():
            profiler.record(rows(50, start=i))
            i += 50

    writer = threading.Thread(target=keep_recording)
    writer.start()
    try:
        for _ in range(60):
            try:
                history, _scope = profiler._history("f", "h1")
                assert len(history) >= 40
            except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
                errors.append(exc)
                break
    finally:
        stop.set()
        writer.join()
        sys.setswitchinterval(switch)
    assert not errors, errors[0]


# --- the driver's client: bundles arrive without a submission ever waiting for them -----------------


class _FakeRef:
    """What ``handle.bundle.remote`` returns: completed by the test, as Ray completes a reply."""

    def __init__(self):
        self.raw: Future = Future()

    def future(self):
        return self.raw


class _FakeHandle:
    def __init__(self):
        self.replies: list[tuple[tuple, _FakeRef]] = []
        handle = self

        class _Bundle:
            @staticmethod
            def remote(*args):
                ref = _FakeRef()
                handle.replies.append((args, ref))
                return ref

        self.bundle = _Bundle()


def test_the_client_loads_new_models_in_the_background_and_submissions_use_the_last_bundle_meanwhile(
        profiler, monkeypatch):
    """The first model a driver sees imports XGBoost (2.5 s here): that must never happen
    inside a submission."""
    import pickle
    import threading
    import time

    from raysched.policy import models
    from raysched.runtime.client import ProfilerClient

    clock = Clock()
    client = ProfilerClient(profiler.config, handle_factory=lambda config: None, clock=clock)
    client._handle = handle = _FakeHandle()

    def reply(i):
        args, ref = handle.replies[i]
        # As Ray carries it: pickled, so the models arrive without a loaded Booster.
        ref.raw.set_result(pickle.loads(pickle.dumps(profiler.bundle(args[0], args[1], args[2]))))

    threading.Timer(0.05, reply, args=(0,)).start()
    first = client.bundle("f", "h1")  # a function's very first call waits for its first bundle
    assert first is not None and not first.models

    profiler.record(rows(40))  # trains (inline): the profiler now serves models
    clock.now += profiler.config.refresh_interval_s + 1
    assert client.bundle("f", "h1") is first  # a refresh is due: requested, not waited for

    real_xgb, loading = models._xgb, threading.Event()

    def slow_xgb():
        loading.set()
        time.sleep(1.0)  # as slow as a first import
        return real_xgb()

    monkeypatch.setattr(models, "_xgb", slow_xgb)
    reply(1)
    assert loading.wait(5)
    started = time.monotonic()
    assert client.bundle("f", "h1") is first  # the models are still loading: the last bundle
    assert time.monotonic() - started < 0.5
    deadline = time.monotonic() + 10
    while client.bundle("f", "h1") is first and time.monotonic() < deadline:
        time.sleep(0.05)
    newer = client.bundle("f", "h1")
    assert newer is not first and set(newer.models) >= {"memory"}
    assert all(m._booster for m in newer.models.values())  # loaded before it was handed over


def test_settle_waits_while_a_record_call_is_writing_even_after_the_quiet_time(profiler):
    """A record call waits for its group commit (up to an interval): settle must wait it out."""
    import threading
    import time

    gate = threading.Event()
    real_append = profiler.store.append_keeping_valid

    def slow_append(rows):
        gate.wait(5)
        return real_append(rows)

    profiler.store.append_keeping_valid = slow_append
    profiler._clock = time.monotonic  # settle measures quiet time on the profiler's clock
    profiler._last_record = time.monotonic()
    writer = threading.Thread(target=profiler.record, args=(rows(3),))
    writer.start()
    threading.Timer(0.6, gate.set).start()  # still writing well past quiet_s
    started = time.monotonic()
    assert profiler.settle(quiet_s=0.1, timeout_s=5) == 3
    assert time.monotonic() - started >= 0.5
    writer.join(5)


def test_calls_too_short_for_cores_of_their_own_get_the_pooled_cores_capped_at_one():
    """A call under MIN_WALL_FOR_CORES records no cores (one ratio is noise); pooled over
    a second of such calls, CPU seconds per wall second size them (Ray's own work on each
    call included), never above one core."""
    import pandas as pd

    from raysched.runtime.profiler import history_from_rows

    def short_calls(n, wall, cpu_seconds, start=0):
        out = rows(n, start=start)
        for r in out:
            r.update(wall_seconds=wall, cpu_seconds=cpu_seconds, cpu_cores=None)
        return out

    # Each call is charged Ray's own ~1 ms of CPU on it too (policy.samples.RAY_TASK_OVERHEAD_S).
    io_bound = history_from_rows(pd.DataFrame(short_calls(200, 0.01, 0.001)))  # 2 s of wall, 0.1 cores
    assert np.allclose(io_bound.cpu, (0.001 + 0.001) / (0.01 + 0.001))
    waiting = history_from_rows(pd.DataFrame(short_calls(100, 0.02, 0.0002)))  # 20 ms, mostly waiting
    assert np.all(waiting.cpu < 0.06)
    too_few = history_from_rows(pd.DataFrame(short_calls(50, 0.01, 0.002)))  # 0.5 s of wall: not yet
    assert np.isnan(too_few.cpu).all()
    busy = history_from_rows(pd.DataFrame(short_calls(200, 0.01, 0.015)))  # Ray's threads counted too
    assert np.allclose(busy.cpu, 1.0)
    # 1 ms calls: mostly Ray's own work, and packing them only made Ray start more workers
    # than cores: they keep the fallback request, whatever the few that waited 50 ms say.
    waited = rows(3, start=900)
    for r in waited:
        r.update(wall_seconds=0.06, cpu_seconds=0.0006, cpu_cores=0.01)
    tiny = history_from_rows(pd.DataFrame(short_calls(1500, 0.001, 0.0001) + waited))
    assert np.isnan(tiny.cpu).all()
    mixed = history_from_rows(pd.DataFrame(rows(5, start=500) + short_calls(200, 0.01, 0.001)))
    assert np.allclose(mixed.cpu[:5], 1.0) and np.allclose(mixed.cpu[5:], 2 / 11)  # own cores kept


class _FailingRegistry(FakeRegistry):
    def log_training(self, artifact, params, metrics):
        raise RuntimeError("database disk image is malformed")


def test_a_training_mlflow_could_not_log_still_serves_its_model_and_tells_the_caller(tmp_path, monkeypatch, caplog):
    """A corrupted mlflow.db showed only in the profiler actor's log."""
    import logging

    from raysched.runtime import client as client_module
    from raysched.runtime.client import ProfilerClient

    config = RayschedConfig(home=str(tmp_path), min_history_for_model=30, min_retrain_interval_s=1e9,
                            profile_commit_interval_s=0.0)
    profiler = Profiler(config, store=ProfileStore(tmp_path), registry=_FailingRegistry(), clock=Clock(),
                        executor=InlineExecutor(), load_executor=InlineExecutor())
    profiler.record(rows(40))
    summary = profiler.train_now("f", "h1")
    assert any("database disk image is malformed" in e for e in summary["mlflow_errors"]), summary
    assert profiler.bundle("f", "h1").models  # served all the same

    # What the driver's refresh(train=True) (and so f.refresh, the demo) does with it
    handle = _FakeHandle()
    handle.settle = handle.train_now = type("M", (), {"remote": staticmethod(lambda *a, **k: summary)})
    client = ProfilerClient(config, handle_factory=lambda config: None, clock=Clock())
    client._handle = handle
    monkeypatch.setattr(client_module.ray, "get", lambda value, timeout=None: value)
    import threading

    threading.Timer(0.05, lambda: handle.replies[-1][1].raw.set_result(profiler.bundle("f", "h1", -1))).start()
    with caplog.at_level(logging.WARNING, logger="raysched.runtime.client"):
        client.refresh("f", "h1", train=True, timeout=5)
    assert "could not be logged to MLflow" in caplog.text and "malformed" in caplog.text


def test_the_registry_keeps_the_newest_and_the_served_versions_only(tmp_path):
    from raysched.store.registry import ModelRegistry

    config = RayschedConfig(home=str(tmp_path), min_history_for_model=30, retrain_after_new_rows=20,
                            min_retrain_interval_s=30.0, bundle_max_age_s=0.0, registry_keep_versions=2)
    clock = Clock()
    profiler = Profiler(config, store=ProfileStore(tmp_path), registry=ModelRegistry(tmp_path), clock=clock,
                        executor=InlineExecutor(), load_executor=InlineExecutor())
    for start in range(0, 200, 40):
        profiler.record(rows(40, start=start, noise=float(start)))  # noisier and noisier: later models may lose
        clock.now += 31
    assert profiler._functions["f"].trainings >= 4
    for resource in ("memory", "cpu", "wall"):
        kept = [v["version"] for v in profiler.registry.versions("f", resource)]
        served = profiler.bundle("f", "h1").models[resource].version
        assert served in kept and len(kept) <= 3 and kept[-2:] == sorted(kept)[-2:]
    # A restarted profiler still finds the model it served.
    again = Profiler(config, store=ProfileStore(tmp_path), registry=ModelRegistry(tmp_path), clock=Clock(),
                     executor=InlineExecutor(), load_executor=InlineExecutor())
    assert again.bundle("f", "h1").models["memory"].version == profiler.bundle("f", "h1").models["memory"].version


def test_the_drivers_cached_bounds_are_never_below_a_calls_own(tmp_path):
    """The driver shares CPU, wall and disk estimates between close input sizes; read at the
    first call's size, the bound it served the bucket's larger sizes fell short (wall upper
    bounds covered 0.88 of runs through the cache against 0.96 directly)."""
    from raysched.policy.estimators import Fallback
    from raysched.policy.recipe import build_predictor
    from raysched.runtime.client import ProfilerClient
    from raysched.runtime.profiler import Bundle
    from raysched.types import Features, History

    rng = np.random.default_rng(0)

    def runs(n):
        sizes = np.exp(rng.uniform(np.log(10 * MiB), np.log(1000 * MiB), n))
        return sizes, 10 * sizes / (100 * MiB) * np.exp(rng.normal(0, 0.05, n))

    sizes, walls = runs(300)
    history = History(input_size=sizes, memory=100 * MiB + 2 * sizes, cpu=np.ones(300), wall=walls,
                      disk=np.full(300, np.nan), version=1)
    config = RayschedConfig(home=str(tmp_path))
    predictor = build_predictor(config)
    models = predictor.train(history)
    bundle = Bundle("f", "h", 1, history, dict(models.by_resource), float(history.memory.max()))
    client = ProfilerClient(config, handle_factory=lambda c: None)
    cached, direct, fitted = [], [], []
    for size, wall in zip(*runs(400)):
        features = Features(input_size=int(size))
        cached.append(client.predict("f", "h", features, Fallback(), bundle).wall.upper)
        direct.append(predictor.predict(features, history, models).wall.upper)
        fitted.append(wall <= cached[-1])
    assert min(np.array(cached) / np.array(direct)) > 0.96  # 0.968 with XGBoost 2.0-3.0, 0.97+ after
    assert np.mean(fitted) >= 0.95

    # Memory, in bands ~1.4% wide: a band's larger call is served a bound at least its own (an
    # audit: read at the band's first call, 1.4% short at most), and no more than the band's top.
    from raysched.runtime.client import size_band

    client = ProfilerClient(config, handle_factory=lambda c: None)
    for start in (100 * MiB, 800 * MiB):
        first = later = start
        while size_band(int(first / 1.001)) == size_band(start):
            first = int(first / 1.001)  # the band's smallest size (to 0.1%)...
        while size_band(int(later * 1.001)) == size_band(start):
            later = int(later * 1.001)  # ...and its largest
        served = [client.predict("f", "h", Features(input_size=s), Fallback(), bundle).memory.upper
                  for s in (first, later)]
        own = [predictor.predict(Features(input_size=s), history, models).memory.upper for s in (first, later)]
        assert served[0] == served[1], "one band, one prediction"
        assert own[1] > own[0] and served[1] >= own[1] and served[1] <= own[1] * 1.02, (served, own)


class _SlowStore:
    """A ProfileStore whose reads of one function wait until the test lets them go."""

    def __init__(self, store, slow_function):
        self._store = store
        self._slow = slow_function
        import threading

        self.reading = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):  # everything else as the store it wraps
        return getattr(self._store, name)

    def read_history(self, n, function):
        read = self._store.read_history(n, function)
        if function == self._slow:  # read, and not returned yet: rows written now are not in it
            self.reading.set()
            assert self.release.wait(10), "the test never let the read go"
        return read

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_a_slow_history_read_holds_up_no_other_call_and_keeps_the_rows_recorded_meanwhile(tmp_path):
    # Reading a function's history from a large store takes seconds; it used to run under
    # the profiler's lock, so every record and bundle call of every function waited for it.
    import threading

    config = RayschedConfig(home=str(tmp_path), min_history_for_model=10_000, bundle_max_age_s=0.0)
    store = ProfileStore(tmp_path)
    store.append(rows(5, function="slow"))  # stored before this profiler started: read from the store
    slow = _SlowStore(store, "slow")
    profiler = Profiler(config, store=slow, registry=FakeRegistry(), clock=Clock(), executor=InlineExecutor(),
                        load_executor=InlineExecutor())
    asked = {}
    reader = threading.Thread(target=lambda: asked.update(bundle=profiler.bundle("slow", "h1")))
    reader.start()
    assert slow.reading.wait(10)
    done = threading.Event()
    meanwhile = rows(3, start=100, function="slow") + rows(2, function="other")

    def record_meanwhile():
        profiler.record(meanwhile)
        profiler.bundle("other", "h1")
        done.set()

    threading.Thread(target=record_meanwhile, daemon=True).start()
    assert done.wait(5), "a record and a bundle call waited for another function's history read"
    slow.release.set()
    reader.join(10)
    # The 3 rows were written after the read: they come from what record handed over meanwhile.
    assert asked["bundle"].n_history == 8
    assert profiler.bundle("other", "h1").n_history == 2
    assert profiler.bundle("slow", "h1", reload=True).n_history == 8


def test_rows_recorded_during_a_reload_stay_in_the_history(tmp_path):
    import threading

    config = RayschedConfig(home=str(tmp_path), min_history_for_model=10_000, bundle_max_age_s=0.0)
    store = ProfileStore(tmp_path)
    slow = _SlowStore(store, "never")
    profiler = Profiler(config, store=slow, registry=FakeRegistry(), clock=Clock(), executor=InlineExecutor(),
                        load_executor=InlineExecutor())
    profiler.record(rows(4))
    assert profiler.bundle("f", "h1").n_history == 4
    slow._slow = "f"  # the next read of f waits
    asked = {}
    reader = threading.Thread(target=lambda: asked.update(bundle=profiler.bundle("f", "h1", reload=True)))
    reader.start()
    assert slow.reading.wait(10)
    profiler.record(rows(3, start=50))
    slow.release.set()
    reader.join(10)
    assert asked["bundle"].n_history == 7
    assert profiler.bundle("f", "h1").n_history == 7


def _restartable(tmp_path, clock=None):
    from raysched.store.registry import ModelRegistry

    config = RayschedConfig(home=str(tmp_path), min_history_for_model=30, retrain_after_new_rows=20,
                            min_retrain_interval_s=30.0, bundle_max_age_s=0.0)
    return Profiler(config, store=ProfileStore(tmp_path), registry=ModelRegistry(tmp_path), clock=clock or Clock(),
                    executor=InlineExecutor(), load_executor=InlineExecutor())


def _with_code(batch, code_hash, scale):
    return [{**row, "code_hash": code_hash, "peak_rss_bytes": int(row["peak_rss_bytes"] * scale),
             "memory_sample_bytes": int(row["memory_sample_bytes"] * scale)} for row in batch]


def test_a_restarted_profiler_gives_each_code_version_its_own_served_models_back(tmp_path):
    """Two code versions under one name (two scripts sharing a home) each train and serve their
    own models; a restart restored only the newest version's, and the other's next model was
    then served against no rival."""
    first = _restartable(tmp_path)
    first.record(_with_code(rows(40), "A", 1.0))
    first.train_now("f", "A")
    first.record(_with_code(rows(40, start=40), "B", 3.0))
    first.train_now("f", "B")
    served = {code: {r: m.version for r, m in first.bundle("f", code).models.items()} for code in "AB"}
    assert served["A"] and served["B"] and served["A"] != served["B"]
    again = _restartable(tmp_path)
    assert {code: {r: m.version for r, m in again.bundle("f", code).models.items()} for code in "AB"} == served


def test_a_restarted_profilers_bundle_versions_never_repeat_an_earlier_ones(tmp_path):
    """A driver caches predictions by bundle version: a new incarnation counting from 1 again
    answered with versions whose cached predictions came from the old one's first rows."""
    first = _restartable(tmp_path)
    seen = [first.bundle("f", "h1").version]
    for start in range(0, 100, 10):
        first.record(rows(10, start=start))
        seen.append(first.bundle("f", "h1").version)
    again = _restartable(tmp_path)
    assert again.bundle("f", "h1").version > max(seen)
    assert again.bundle("f", "h1").n_history == 100


def test_rows_written_without_the_profiler_are_served_once_it_looks_again(tmp_path):
    """An audit: a running profiler served the history it read first; rows that ``raysched import``
    (or a worker that could not reach it) wrote to the store later were never part of a bundle
    that a submission asked for. The writer notes them in the home's journal; the profiler looks
    at it once a second at most and re-reads the functions named there."""
    clock = Clock()
    config = RayschedConfig(home=str(tmp_path), bundle_max_age_s=0.0)
    store = ProfileStore(tmp_path)
    store.append(rows(3, function="f"))
    profiler = Profiler(config, store=store, registry=FakeRegistry(), clock=clock,
                        executor=InlineExecutor(), load_executor=InlineExecutor())
    first = profiler.bundle("f", "h1")
    assert first.n_history == 3
    other = ProfileStore(tmp_path)  # another process: the CLI's import
    other.append(rows(5, start=3, function="f"))
    other.note_outside_write(["f"])
    # the journal was looked at just now: it is looked at again a second later
    assert profiler.bundle("f", "h1", have_version=first.version) is None
    clock.now += 1.0
    again = profiler.bundle("f", "h1", have_version=first.version)
    assert again is not None and again.n_history == 8
    # read once: the next look finds nothing new, and a partial line (a writer cut short) is
    # skipped without swallowing the next writer's line (a review: they were glued together)
    with open(tmp_path / "outside_writes.jsonl", "a") as fh:
        fh.write('\n{"t": 1, "funct')
    clock.now += 1.0
    assert profiler.bundle("f", "h1", have_version=again.version) is None
    other.append(rows(2, start=8, function="f"))
    other.note_outside_write(["f"])
    clock.now += 1.0
    last = profiler.bundle("f", "h1", have_version=again.version)
    assert last is not None and last.n_history == 10


def test_a_training_whose_mlflow_database_cannot_be_opened_still_serves_counts_and_tells_the_caller(tmp_path):
    """An audit: with an mlflow.db that is no database, the training served its model, then
    failed as a whole at the registry's clean-up (the registry is opened there again, outside
    any guard): ``train_now`` raised, and the training was never counted, nor its cost."""
    (tmp_path / "mlflow.db").write_bytes(b"not a database" * 100)
    config = RayschedConfig(home=str(tmp_path), min_history_for_model=30, min_retrain_interval_s=1e9,
                            profile_commit_interval_s=0.0)
    profiler = Profiler(config, store=ProfileStore(tmp_path), clock=Clock(), executor=InlineExecutor(),
                        load_executor=InlineExecutor())  # the registry opened as the actor opens it
    profiler._maybe_train = lambda function: None  # trained below, by hand
    profiler.record(rows(40))
    summary = profiler.train_now("f", "h1")
    assert summary["mlflow_errors"] and all("not a database" in e for e in summary["mlflow_errors"]), summary
    assert set(profiler.bundle("f", "h1").models) == {"memory", "cpu", "wall"}
    assert profiler.status()["functions"]["f"]["trainings"] == 1


def test_a_restarted_profiler_skips_a_registered_version_whose_files_are_gone(tmp_path, caplog):
    """An audit: one version whose model file was missing (removed by hand, a copy of the home
    without it) made a restarted profiler serve no model at all, for any resource: the error
    of that one load ended the whole look. The older served version serves instead."""
    import logging
    import urllib.parse
    from pathlib import Path

    first = _restartable(tmp_path)
    first.record(rows(40))  # trains version 1 of each resource
    first.train_now("f", "h1")  # version 2
    served = {r: m.version for r, m in first.bundle("f", "h1").models.items()}
    assert served == {"memory": 2, "cpu": 2, "wall": 2}
    registry = first.registry
    mv = registry._model_versions("f", "memory")[-1]
    folder = urllib.parse.urlparse(registry.client.get_model_version_download_uri(mv.name, mv.version)).path
    (Path(folder) / "model.ubj").unlink()
    with caplog.at_level(logging.WARNING, logger="raysched.runtime.profiler"):
        again = _restartable(tmp_path)
        restored = {r: m.version for r, m in again.bundle("f", "h1").models.items()}
    assert restored == {"memory": 1, "cpu": 2, "wall": 2}
    assert "skipping version 2 of the memory model" in caplog.text


@pytest.mark.parametrize("reload", [False, True], ids=["first-read", "reload"])
def test_rows_recorded_between_a_history_reads_end_and_its_use_stay_in_the_history(tmp_path, reload):
    """An audit: a read of the store stopped collecting the rows recorded meanwhile (under the
    lock) before it installed what it read (under the lock again): a record call between the
    two found neither the reader's list nor, on a first read, a state to add to, and on a
    reload added its rows to the state that the read then replaced. Rows written after the
    read had passed their part were missing from the history until the next reload."""
    import threading

    config = RayschedConfig(home=str(tmp_path), min_history_for_model=10_000, bundle_max_age_s=0.0)
    store = ProfileStore(tmp_path)
    store.append(rows(4))
    profiler = Profiler(config, store=store, registry=FakeRegistry(), clock=Clock(), executor=InlineExecutor(),
                        load_executor=InlineExecutor())
    if reload:
        assert profiler.bundle("f", "h1").n_history == 4
    read_rows = profiler._read_rows

    def read_then_let_a_record_in(function):
        got = read_rows(function)
        if function == "f" and not getattr(read_then_let_a_record_in, "done", False):
            read_then_let_a_record_in.done = True
            # another record thread runs in the window (the lock is free there)
            other = threading.Thread(target=profiler.record, args=(rows(3, start=50),))
            other.start()
            other.join(10)
        return got

    profiler._read_rows = read_then_let_a_record_in
    assert profiler.bundle("f", "h1", reload=reload).n_history == 7
    assert len(store.read(function="f")) == 7


def test_a_training_asked_for_by_hand_runs_alone_not_beside_a_background_one(tmp_path):
    """An audit: ``train_now`` (a driver's ``refresh(train=True)``, the demo, the CLI) trained
    outside the function's training slot, so rows arriving meanwhile started a background
    training of the same function beside it: both judged their models against the same
    served one, and whichever ended last was served, even when worse than the other."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    config = RayschedConfig(home=str(tmp_path), min_history_for_model=30, retrain_after_new_rows=20,
                            min_retrain_interval_s=0.0, train_cost_fraction=1.0, bundle_max_age_s=0.0)
    profiler = Profiler(config, store=ProfileStore(tmp_path), registry=FakeRegistry(), clock=Clock(),
                        executor=ThreadPoolExecutor(1), load_executor=InlineExecutor())
    profiler.record(rows(40))
    profiler.wait_for_training()
    inner, entered, release = profiler._predictor, threading.Event(), threading.Event()
    running, most = [0], [0]
    guard = threading.Lock()

    class SlowPredictor:
        def train(self, history):
            with guard:
                running[0] += 1
                most[0] = max(most[0], running[0])
            entered.set()
            release.wait(10)
            try:
                return inner.train(history)
            finally:
                with guard:
                    running[0] -= 1

    profiler._predictor = SlowPredictor()
    by_hand = threading.Thread(target=profiler.train_now, args=("f", "h1"))
    by_hand.start()
    assert entered.wait(10)
    profiler.record(rows(40, start=40))  # enough new rows for a training of their own
    time.sleep(0.3)  # a background training, if one started, is in train() by now
    release.set()
    by_hand.join(30)
    profiler.wait_for_training()
    assert most[0] == 1, "two trainings of one function ran at once"


def test_a_train_now_that_failed_raises_to_its_caller_only(tmp_path):
    """train_now holds the function's training slot with a future of its own; a failure
    kept in it was raised again to whoever waited on the slot next (wait_for_training, the
    benchmarks' and the demo's wait for the background tail), long after its caller had it."""
    from concurrent.futures import ThreadPoolExecutor

    config = RayschedConfig(home=str(tmp_path), min_history_for_model=30, retrain_after_new_rows=1000,
                            min_retrain_interval_s=0.0, train_cost_fraction=1.0)
    profiler = Profiler(config, store=ProfileStore(tmp_path), registry=FakeRegistry(), clock=Clock(),
                        executor=ThreadPoolExecutor(1), load_executor=InlineExecutor())
    profiler.record(rows(40))
    profiler.wait_for_training()

    class Broken:
        def train(self, history):
            raise RuntimeError("the trainer broke")

    profiler._predictor = Broken()
    with pytest.raises(RuntimeError, match="the trainer broke"):
        profiler.train_now("f", "h1")
    profiler.wait_for_training()  # the slot is free, and says nothing of a failure already told


def test_a_batch_sent_again_after_its_profiler_was_lost_is_held_once(profiler, tmp_path):
    """A worker sends a batch again when its profiler was lost (``RowSink``); if the old one had
    stored it, the new one read those rows from the store and added the batch on top: the
    history held them twice (20 rows for 10 calls), and the next training weighed them double."""
    batch = rows(10)
    profiler.record(batch)
    assert profiler.bundle("f", "h1").n_history == 10
    profiler.record([dict(row) for row in batch])  # the same rows, sent again
    profiler.record([dict(row) for row in batch[:3]] + rows(2, start=10))
    assert profiler.bundle("f", "h1").n_history == 12
    assert len(profiler._functions["f"].rows) == 12 == len(ProfileStore(tmp_path).read())


def imported(n, start=0, function="f"):
    """Rows as ``raysched import`` writes them: stamped at the import, after the runs made here."""
    out = rows(n, start=start, function=function)
    for i, row in enumerate(out):
        row.update(code_hash="imported", call_id=None, source="import:nextflow", memory_sample_bytes=7 * MiB,
                   peak_rss_bytes=7 * MiB, timestamp=dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)
                   + dt.timedelta(microseconds=i))
    return out


def test_a_trace_imported_after_a_functions_own_runs_does_not_push_them_out_of_its_window(tmp_path):
    """An import of more runs of a function than the window holds, after runs of its own: by
    write order alone, the window held the imported runs only, and the function was sized from
    another machine's runs; and the history, by time, took the imported runs for the newest."""
    from raysched.runtime.profiler import history_from_rows

    config = RayschedConfig(home=str(tmp_path), min_history_for_model=10_000, history_window=50,
                            profile_commit_interval_s=0.0, bundle_max_age_s=0.0)
    store = ProfileStore(tmp_path)
    own = rows(30)
    store.append(own)
    store.append(imported(80, start=100))  # 80 > the window of 50, written last
    profiler = Profiler(config, store=store, registry=FakeRegistry(), clock=Clock(),
                        executor=InlineExecutor(), load_executor=InlineExecutor(), tidy_executor=InlineExecutor())
    bundle = profiler.bundle("f", "h1")
    assert bundle.n_history == 30 and bundle.history_scope == "code"  # its own 30 runs, all of them
    held = profiler._functions["f"].rows
    assert len(held) == 50 and list(held["code_hash"]) == ["imported"] * 20 + ["h1"] * 30
    history = history_from_rows(held)
    assert list(history.memory[-30:]) == [r["memory_sample_bytes"] for r in own]  # its own runs are the newest

    profiler.record(rows(35, start=200))  # new runs of its own push the imported ones out first
    held = profiler._functions["f"].rows
    assert list(held["code_hash"]) == ["h1"] * 50
    assert list(held["call_id"]) == [f"c{i}" for i in range(15, 30)] + [f"c{i}" for i in range(200, 235)]


def test_a_history_window_of_a_function_with_imported_runs_only_is_its_newest_imported_runs(tmp_path):
    store = ProfileStore(tmp_path)
    store.append(imported(80))
    window = store.read_history(50, "f")
    assert len(window) == 50 and window["timestamp"].is_monotonic_increasing
    assert window["timestamp"].iloc[0] == dt.datetime(2026, 6, 1, 0, 0, 0, 30, tzinfo=dt.timezone.utc)
    assert len(store.read_history(50, "g")) == 0


def test_a_bundle_carries_the_memory_prior_of_the_homes_functions_worked_out_again_in_time(tmp_path):
    """The shared fallback of a function with few runs: the profiler pools the residuals of the
    functions it holds, and every bundle carries the prior (policy.recipe.memory_residual_prior);
    it is worked out again at most every PRIOR_REFRESH_S, and a function's new rows count then."""
    from raysched.policy.recipe import memory_residual_prior
    from raysched.runtime.profiler import PRIOR_REFRESH_S, history_from_rows

    config = RayschedConfig(home=str(tmp_path), min_history_for_model=10_000, bundle_max_age_s=0.0,
                            profile_commit_interval_s=0.0)
    profiler = Profiler(config, store=ProfileStore(tmp_path), registry=FakeRegistry(), clock=Clock(),
                        executor=InlineExecutor(), load_executor=InlineExecutor(), tidy_executor=InlineExecutor())
    profiler.record(rows(5, function="g"))  # too few runs for residuals of its own
    profiler.bundle("g", "h1")
    assert profiler.bundle("g", "h1", have_version=-1).residual_prior == ()  # 5 runs: nothing to pool yet
    profiler.record(rows(30, function="f", noise=40.0))
    profiler.bundle("f", "h1")
    profiler._clock.now += PRIOR_REFRESH_S
    bundle = profiler.bundle("g", "h1", have_version=-1)
    expected = memory_residual_prior([history_from_rows(profiler._functions[name].rows) for name in ("g", "f")],
                                     config)
    assert len(bundle.residual_prior) == config.cost_prior_runs == 5
    assert np.allclose(bundle.residual_prior, expected)

    profiler.record(rows(30, start=100, function="f", noise=200.0))  # f strays much further now
    assert profiler.bundle("f", "h1", have_version=-1).residual_prior == bundle.residual_prior  # within the interval
    assert profiler.bundle("g", "h1", have_version=bundle.version) is None  # nothing new for g yet
    profiler._clock.now += PRIOR_REFRESH_S
    later = profiler.bundle("g", "h1", have_version=bundle.version)  # g has no new runs, but a new prior
    assert later is not None and later.version > bundle.version
    assert max(later.residual_prior) > max(bundle.residual_prior) and later.history is not None
    # f has 60 runs: it sizes by its own residuals, and the prior's change is no news to it.
    f_version = profiler.bundle("f", "h1", have_version=-1).version
    profiler.record(rows(10, start=300, function="g", noise=300.0))  # g's 15 runs join the pool
    profiler._clock.now += PRIOR_REFRESH_S
    assert profiler.bundle("f", "h1", have_version=f_version) is None
    assert profiler.bundle("g", "h1", have_version=-1).residual_prior != later.residual_prior  # it did change

    off = Profiler(config.replace(cost_prior_runs=0), store=ProfileStore(tmp_path), registry=FakeRegistry(),
                   clock=Clock(), executor=InlineExecutor(), load_executor=InlineExecutor(),
                   tidy_executor=InlineExecutor())
    off.bundle("f", "h1")
    assert off.bundle("g", "h1").residual_prior == ()
