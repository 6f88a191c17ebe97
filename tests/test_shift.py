"""A shift in a function's use: the runs since it size the calls (policy.shift). No Ray."""

from __future__ import annotations

import numpy as np
import pytest

from raysched.config import RayschedConfig
from raysched.policy.models import fit_resource_model
from raysched.policy.recipe import build_predictor, shift_test
from raysched.policy.samples import oom_bump
from raysched.policy.shift import runs_since_shift
from raysched.types import Features, GiB, History, MiB

CFG = RayschedConfig(min_history_for_model=30)


def runs(n, level, seed, sigma=0.1, sizes=None, tags=None, cores=1.0, censored=None):
    rng = np.random.default_rng(seed)
    sizes = rng.uniform(10 * MiB, 1000 * MiB, n) if sizes is None else np.asarray(sizes, float)
    noise = np.exp(rng.normal(0, sigma, n))
    columns = {"input_size": sizes, "memory": level * (1 + sizes / GiB) * noise,
               "cpu": cores * np.exp(rng.normal(0, 0.05, n)), "wall": 10 * cores * noise}
    if tags is not None:
        columns["tags"] = tags
    if censored is not None:
        columns["censored"] = censored
    return History.from_columns(columns)


def memory_upper(history, models=None, size=500 * MiB):
    return build_predictor(CFG).predict(Features(input_size=int(size)), history, models).memory.upper


def test_after_a_halving_the_runs_since_size_the_calls_within_a_few_calls():
    before = runs(1500, 1 * GiB, seed=0)
    steady = memory_upper(before)
    halved = before.append(runs(16, 0.5 * GiB, seed=1))
    assert len(runs_since_shift(halved, "memory", shift_test(CFG))) == 16
    assert memory_upper(halved) < 0.65 * steady
    # Turned off, the 1,500 old runs keep deciding.
    off = RayschedConfig(min_history_for_model=30, shift_detection=False)
    assert build_predictor(off).predict(Features(input_size=500 * MiB), halved).memory.upper > 0.9 * steady


def test_after_a_doubling_killed_attempts_and_their_retries_move_the_size_up():
    before = runs(1500, 1 * GiB, seed=0)
    steady = memory_upper(before)
    # Eight calls after the change: each first attempt killed at its allocation (a bumped,
    # censored sample), then retried and measured at the new level.
    new = runs(8, 2 * GiB, seed=2)
    killed = [oom_bump(steady, CFG) for _ in range(8)]
    rows = History.from_columns({
        "input_size": np.repeat(new.input_size, 2), "memory": np.ravel(list(zip(killed, new.memory))),
        "cpu": np.repeat(new.cpu, 2), "wall": np.repeat(new.wall, 2), "censored": [True, False] * 8})
    doubled = before.append(rows)
    assert 16 <= len(runs_since_shift(doubled, "memory", shift_test(CFG))) <= 24  # the point is found to a few runs
    assert memory_upper(doubled) > 1.6 * steady


def test_a_model_of_the_old_level_is_set_aside_and_a_new_one_learns_from_the_runs_since():
    before = runs(600, 1 * GiB, seed=0, cores=2.0)
    models = build_predictor(CFG).train(before)
    assert models.get("cpu").n_train > 400
    after = before.append(runs(40, 1 * GiB, seed=3, cores=1.0))  # the function now uses half the cores
    predict = build_predictor(CFG).predict
    stale = predict(Features(input_size=500 * MiB), after, models).cpu
    assert stale.source == "history" and stale.upper < 1.3  # the old model would say ~2 cores
    retrained = build_predictor(CFG).train(after)
    assert retrained.get("cpu").n_train + retrained.get("cpu").metrics["rows_holdout"] == 40
    fresh = predict(Features(input_size=500 * MiB), after, retrained).cpu
    assert fresh.source.startswith("model") and fresh.target < 1.2
    assert fit_resource_model(after, "cpu", RayschedConfig(shift_detection=False)).n_train > 400


@pytest.mark.parametrize("seed", range(6))
def test_steady_noisy_use_is_no_shift(seed):
    rng = np.random.default_rng(seed)
    for sigma in (0.1, 0.3, 0.6):
        steady = runs(int(rng.integers(40, 2000)), 1 * GiB, seed=seed, sigma=sigma)
        assert runs_since_shift(steady, "memory", shift_test(CFG)) is steady
        assert runs_since_shift(steady, "cpu", shift_test(CFG)) is steady


def test_a_change_in_which_inputs_or_tags_arrive_is_no_shift():
    # Small inputs first, then large ones: use follows size, the function is the same.
    sizes = np.concatenate([np.linspace(10 * MiB, 100 * MiB, 300), np.linspace(2 * GiB, 8 * GiB, 40)])
    growing = runs(340, 1 * GiB, seed=0, sizes=sizes)
    assert runs_since_shift(growing, "memory", shift_test(CFG)) is growing
    # One genome for 300 calls, then another that needs 4x: the tags say the calls differ.
    tags = [("genome=small",)] * 300 + [("genome=big",)] * 40
    level = np.where(np.arange(340) < 300, 1.0, 4.0)
    tagged = runs(340, 1 * GiB, seed=0, tags=tags)
    tagged = History.from_columns({"input_size": tagged.input_size, "memory": tagged.memory * level,
                                   "cpu": tagged.cpu, "wall": tagged.wall, "tags": tags})
    assert runs_since_shift(tagged, "memory", shift_test(CFG)) is tagged


def test_of_several_shifts_the_newest_counts_and_the_config_checks_its_knobs():
    history = runs(400, 1 * GiB, seed=0).append(runs(200, 3 * GiB, seed=1)).append(runs(30, 1.5 * GiB, seed=2))
    assert 30 <= len(runs_since_shift(history, "memory", shift_test(CFG))) <= 38
    with pytest.raises(ValueError, match="shift_min_runs"):
        RayschedConfig(shift_min_runs=1)
    with pytest.raises(ValueError, match="shift_min_log"):
        RayschedConfig(shift_min_log=-0.1)



@pytest.mark.parametrize("level", [2 * GiB, 0.5 * GiB])
def test_the_shift_is_placed_where_it_happened_and_stays_there_as_runs_arrive(level):
    """The sign test's best split lands a few runs early when old runs just before the shift
    were above the overall median by chance (9 runs in one of these): the estimators were
    handed old runs with the new, and the cut moved back and forth as runs arrived."""
    for seed in range(8):
        before = runs(300, 1 * GiB, seed=seed, sizes=np.full(300, 100 * MiB))
        after = runs(40, level, seed=seed + 100, sizes=np.full(40, 100 * MiB))
        cuts = []
        for k in range(1, 41):
            history = before.append(after._rows(slice(0, k)))
            since = runs_since_shift(history, "memory", shift_test(CFG))
            if since is not history:
                cuts.append(len(since) - k)  # old runs counted as new (negative: new ones left out)
        assert len(cuts) >= 28, (seed, cuts)  # found once 8-12 runs have come
        assert max(cuts) <= 1 and min(cuts) >= 0, (seed, cuts)


def test_a_history_is_not_kept_alive_by_the_work_cached_on_it():
    """The fits an estimator makes on a history are kept while the history lives (a weak
    key). A selection that kept every run (no shift, no other tags) is the history itself:
    stored as the value, it kept its own weak key alive, and every history a profiler
    trained on or a driver sized calls from stayed in memory with all its fits (0.13 MiB
    more per training of a plain Profiler on a 5,000-row history)."""
    import gc
    import weakref

    history = runs(200, 1 * GiB, seed=3, tags=[("a",)] * 200)
    assert memory_upper(history) > 0  # the whole chain, shift test and tag selection included
    assert runs_since_shift(history, "memory", shift_test(CFG)) is history  # no shift: itself, from the cache too
    assert runs_since_shift(history, "memory", shift_test(CFG)) is history
    gone = weakref.ref(history)
    del history
    gc.collect()
    assert gone() is None
