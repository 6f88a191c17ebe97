"""The pure policy: features, estimators, calibration, sizing, ladder. No Ray here."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from raysched.config import RayschedConfig
from raysched.errors import InvalidInput, PredictionTooLarge
from raysched.policy import calibrate, features
from raysched.policy.estimators import EstimationContext, Fallback, PercentileEstimator, WithConfidenceMultiplier
from raysched.policy.recipe import LadderState, build_ladder, build_predictor, build_sizer
from raysched.policy.samples import memory_sample, oom_bump
from raysched.types import (
    GiB,
    MiB,
    Allocation,
    AttemptRecord,
    ClusterShape,
    Estimate,
    Features,
    History,
    LabelTerm,
    NodeShape,
    Outcome,
    Prediction,
    Usage,
)

CFG = RayschedConfig()
#: The fixed-coverage memory chain (conformal model / p95 along the input-size line), the
#: default before cost-aware sizing; its tests keep pinning its behaviour.
FIXED = CFG.replace(memory_cost_aware=False)


def linear_history(n: int, seed: int = 0, noise: float = 5e6) -> History:
    rng = np.random.default_rng(seed)
    sizes = rng.uniform(1e6, 1e8, n)
    return History.from_columns(
        {
            "input_size": sizes,
            "memory": 100e6 + 4 * sizes + rng.normal(0, noise, n),
            "cpu": rng.uniform(0.9, 1.1, n),
            "wall": sizes / 1e7 + 0.1,
        }
    )


# --- features --------------------------------------------------------------------------------------


def test_a_frame_is_sized_as_memory_usage_counts_it_without_calling_it():
    # memory_usage() cost 0.4 ms per 1,000 x 10 frame, per submission: plain numpy columns are
    # counted from their dtypes instead, and must give the same figure.
    import pandas as pd

    frames = [
        pd.DataFrame(np.random.default_rng(0).random((1000, 10))),
        pd.DataFrame({"a": np.ones(7, np.float32), "b": np.ones(7, np.int8), "c": np.ones(7, bool)}),
        pd.DataFrame({"t": pd.date_range("2020", periods=5)}, index=np.arange(5) * 3),
        pd.DataFrame({"a": np.arange(4)}, index=pd.MultiIndex.from_product([[1, 2], [3, 4]])),
        pd.DataFrame({"o": np.array([object()] * 3, dtype=object)}),
        pd.DataFrame(),
        pd.Series(np.arange(1000.0)),
        # not plain numpy: memory_usage still counts these
        pd.DataFrame({"a": pd.Categorical(["x", "y"] * 50)}),
        pd.DataFrame({"s": pd.array(["x"] * 10, dtype="string")}),
        pd.DataFrame({"t": pd.date_range("2020", periods=5, tz="UTC")}),
        pd.DataFrame({"a": np.arange(3)}, index=pd.Index(["a", "b", "c"], dtype=object)),
    ]
    counted = 0
    for frame in frames:
        used = frame.memory_usage(index=True, deep=False)
        used = int(used.sum()) if hasattr(used, "sum") else int(used)
        assert features.size_of(frame) == used, frame
        counted += features._plain_frame_bytes(frame) is not None
    assert counted >= 6  # the plain ones took the short way


def test_input_size_is_derived_from_arrays_frames_bytes_strings_and_files(tmp_path):
    import pandas as pd

    path = tmp_path / "data.bin"
    path.write_bytes(b"x" * 12345)
    frame = pd.DataFrame({"a": np.arange(100, dtype=np.int64), "b": np.zeros(100)})
    args = (np.zeros((10, 10)), frame, b"abcd", str(path))
    expected = 800 + int(frame.memory_usage(index=True).sum()) + 4 + 12345
    assert features.derive_input_size(args, {}) == expected
    assert features.derive_input_size((1, 2.0, None), {}) is None
    assert features.derive_input_size((), {"x": "hello"}) == 5
    # Opaque objects (Ray ObjectRefs) are sized by the injected callback.
    assert features.derive_input_size((object(),), {}, size_of_opaque=lambda o: 77) == 77
    # A long list is sized from a prefix and extrapolated.
    assert features.size_of([b"ab"] * 1000) == 2000
    # Numbers are parameters alone, data in a container: 8 bytes each, as packed.
    assert features.size_of(3.5) is None
    assert features.size_of([1.0] * 100_000) == 800_000
    assert features.derive_input_size(([1, 2, 3], {"a": 1.5, "b": "xy"}), {}) == 24 + 8 + 2


def test_a_nested_list_argument_is_sized_from_a_bounded_sample_of_its_items():
    """Each level of a nested list was walked 256 items wide: a batch of 300 images as
    lists of rows of pixel lists cost 256 x 224 x 224 probes, 14 s of the driver per
    ``.remote()``; a 1,000 x 1,000 table of floats 10 ms. A walk now takes a bounded number
    of items per argument, the rest of each level extrapolated, as a long list already was."""
    walked = [0]

    class Counted(list):
        def __iter__(self):
            for item in list.__iter__(self):
                walked[0] += 1
                yield item

    cube = Counted([Counted([Counted([0.0] * 200)] * 200)] * 300)  # 300 x 200 x 200 floats, shared rows
    assert features.size_of(cube) == 300 * 200 * 200 * 8
    assert walked[0] <= 8 * features._MAX_ITEMS ** 1.5  # not 256 x 200 x 200 (10 million)
    walked[0] = 0
    table = Counted([Counted([1.5] * 1000) for _ in range(1000)])
    assert features.size_of(table) == 1000 * 1000 * 8
    assert walked[0] <= 8 * features._MAX_ITEMS ** 1.5
    # rows of other lengths: the first rows walked whole, each of the others from its first item and its length
    ragged = [[0.0] * (100 if i % 2 else 300) for i in range(256)]
    assert features.size_of(ragged) == 128 * (100 + 300) * 8


def test_folder_path_is_the_sum_of_its_files(tmp_path):
    for i in range(3):
        (tmp_path / f"f{i}").write_bytes(b"y" * 100)
    assert features.size_of(tmp_path) == 300


def test_separators_and_dots_alone_are_text_not_the_current_or_root_folder(tmp_path, monkeypatch):
    from raysched.policy.features import size_of

    (tmp_path / "big.bin").write_bytes(b"x" * 100_000)
    monkeypatch.chdir(tmp_path)
    for text in (".", "..", "/", "./", "//", "..."):
        assert size_of(text) == len(text)
    assert size_of("./big.bin") == 100_000 and size_of(str(tmp_path)) >= 100_000


def test_a_folder_is_walked_once_while_it_is_unchanged(tmp_path, monkeypatch):
    # Every call of a map over one data folder names it: walking it per submission cost
    # tens of ms a call. A folder whose own entries change is walked again.
    for i in range(3):
        (tmp_path / f"f{i}").write_bytes(b"y" * 100)
    walks = []
    walk = features._walk_size
    monkeypatch.setattr(features, "_walk_size", lambda path: walks.append(path) or walk(path))
    monkeypatch.setattr(features, "_DIR_SIZES", {})
    assert [features.size_of(str(tmp_path)) for _ in range(50)] == [300] * 50
    assert len(walks) == 1
    (tmp_path / "f3").write_bytes(b"y" * 50)
    os.utime(tmp_path, ns=(1, 1))  # the folder's mtime changed (set apart from the clock's granularity)
    assert features.size_of(str(tmp_path)) == 350 and len(walks) == 2
    monkeypatch.setattr(features, "_DIR_SIZE_TTL_S", 0.0)  # and a kept size expires
    assert features.size_of(str(tmp_path)) == 350 and len(walks) == 3


@pytest.mark.parametrize("bad", [-1, "10", float("nan"), True, [1], np.float32("nan"), np.float16("inf")])
def test_bad_input_size_is_a_clear_error(bad):
    with pytest.raises(InvalidInput, match="input_size"):
        features.validate_input_size(bad)
    with pytest.raises(InvalidInput, match="memory"):  # (a TypeError's subclass for a non-number, as Ray's)
        features.validate_memory(bad, "memory")


@pytest.mark.parametrize("bad", [[1, "a"], 5, {"a": 1}, b"x"])
def test_tags_must_be_strings(bad):
    with pytest.raises(InvalidInput, match="tags"):
        features.validate_tags(bad)


def test_memory_must_be_a_non_negative_number_and_zero_is_no_label():
    assert features.validate_memory(0) == 0  # as Ray's memory=0: no label at all
    with pytest.raises(InvalidInput):
        features.validate_memory(-1)
    with pytest.raises(InvalidInput):
        features.validate_memory("1GB")
    assert features.validate_memory(1.5e9) == 1500000000


def test_feature_rows_agree_between_single_call_and_history():
    x = Features(input_size=1000, tags=("a", "b"))
    vocabulary = features.tag_vocabulary([("a", "b"), ("b", "c"), ("b",)])
    assert vocabulary == ("a", "b", "c")
    row = features.feature_row(x, vocabulary)
    matrix = features.feature_matrix(np.array([1000.0]), [("a", "b")], vocabulary)
    assert np.array_equal(row, matrix[0]) and row[1:].tolist() == [1.0, 1.0, 0.0]
    # A tag the model never saw has no column; the most frequent ones get the columns there are.
    assert features.feature_row(Features(input_size=1000, tags=("z",)), vocabulary)[1:].tolist() == [0.0, 0.0, 0.0]
    assert features.tag_vocabulary([("a", "b"), ("b", "c"), ("b",), ("c",)], limit=2) == ("b", "c")
    assert features.feature_names(vocabulary) == ["log2_input_size", "tag_0", "tag_1", "tag_2"]


# --- estimators ------------------------------------------------------------------------------------------


def test_cold_start_uses_user_fallback_then_default():
    predictor = build_predictor(CFG)
    default = predictor.predict(Features())
    assert default.source == "fallback"
    assert default.memory.upper == CFG.default_memory_bytes and default.memory.n_history == 0
    declared = predictor.predict(Features(), fallback=Fallback(memory=300 * MiB, cpu=2.0))
    assert declared.memory.target == 300 * MiB and declared.cpu.target == 2.0


def test_one_or_two_runs_that_outgrew_the_declared_value_raise_it_to_what_they_used():
    """An audit: with one or two runs (fewer than min_history_for_stats) the declared 300 MiB
    was served though a run had peaked at 3 GiB: the next calls were killed in turn."""
    predictor = build_predictor(CFG)
    declared = Fallback(memory=300 * MiB, cpu=1.0, wall=10.0)

    def runs(peaks, tags=()):
        return History.from_columns({"input_size": [1e6] * len(peaks), "memory": peaks, "cpu": [3.0] * len(peaks),
                                     "wall": [5.0] * len(peaks), "tags": [tags] * len(peaks)})

    one = predictor.predict(Features(input_size=10**6), runs([3 * GiB]), fallback=declared)
    assert one.memory.upper == 3 * GiB and one.memory.source == "history" and one.memory.n_history == 1
    assert one.cpu.upper == 3.0  # cores too; a wall bound above what ran stays as declared
    assert one.wall.upper == 10.0 and one.wall.source == "fallback"
    two = predictor.predict(Features(), runs([2 * GiB, 3 * GiB]), fallback=declared)
    assert two.memory.upper == 3 * GiB and two.memory.n_history == 2
    # Runs under the declared value leave it; other tags' runs do not count for a call's tags.
    assert predictor.predict(Features(), runs([100 * MiB]), fallback=declared).memory.upper == 300 * MiB
    mixed = History.from_columns({"input_size": [1e6, 1e6], "memory": [3 * GiB, 100 * MiB],
                                  "tags": [("big",), ("small",)]})
    tagged = predictor.predict(Features(tags=("small",)), mixed, fallback=declared)
    assert tagged.memory.upper == 300 * MiB and tagged.memory.source == "fallback"
    assert predictor.predict(Features(tags=("big",)), mixed, fallback=declared).memory.upper == 3 * GiB
    # From min_history_for_stats runs on, the statistics decide, as before.
    three = predictor.predict(Features(), runs([2 * GiB, 3 * GiB, 3 * GiB]), fallback=declared)
    assert three.memory.source == "history" and three.memory.upper > 3 * GiB


def test_little_history_uses_max_scaled_by_input_size_with_confidence_multiplier():
    history = linear_history(10, noise=0)
    predictor = build_predictor(FIXED)
    small, big = predictor.predict(Features(input_size=1e6), history), predictor.predict(Features(input_size=1e8), history)
    assert small.source == "history" and small.memory.n_history == 10
    # Along the line 100 MB + 4 x size, widened by (1 + 1/10):
    assert big.memory.target == pytest.approx(100e6 + 4e8, rel=1e-3)
    assert big.memory.upper == pytest.approx((100e6 + 4e8) * 1.1, rel=1e-3)
    # Below the smallest run, read at the smallest run's size.
    assert small.memory.target == pytest.approx(100e6 + 4 * history.input_size.min(), rel=1e-3)


def test_uncorrelated_history_takes_the_max_not_the_line():
    rng = np.random.default_rng(1)
    values = rng.uniform(100e6, 200e6, 12)
    history = History.from_columns({"input_size": rng.uniform(1, 1e9, 12), "memory": values})
    est = PercentileEstimator("memory", 95, 3, 0.5, 0.95).estimate(EstimationContext(history), Features(input_size=10**12))
    assert est.upper == pytest.approx(values.max())
    assert est.target == pytest.approx(np.median(values))


def test_confidence_multiplier_worked_numbers():
    class Fixed:
        def __init__(self, n):
            self.n = n

        def estimate(self, ctx, x):
            return Estimate(1.0, 1.0, 1.0, 0.95, self.n, "history")

    for n, factor in [(3, 4 / 3), (10, 1.1), (30, 31 / 30)]:
        est = WithConfidenceMultiplier(Fixed(n), 1.0, 1.0).estimate(None, Features())
        assert est.upper == pytest.approx(factor)


def test_model_is_calibrated_and_reports_honest_coverage():
    history = linear_history(400, noise=2e7)
    predictor = build_predictor(FIXED)
    models = predictor.train(history)
    memory = models.get("memory")
    assert memory is not None
    assert 0.85 <= memory.metrics["upper_coverage"] <= 1.0
    assert memory.metrics["rows_holdout"] == 100
    # Fresh runs from the same process: the calibrated upper bound covers about 95%.
    fresh = linear_history(1000, seed=7, noise=2e7)
    _, _, upper = memory.predict(features.feature_matrix(fresh.input_size, (), memory.tags))
    assert 0.88 <= calibrate.coverage(fresh.memory, upper) <= 0.995
    pred = predictor.predict(Features(input_size=5e7), history, models)
    assert pred.source == "model" and pred.memory.lower <= pred.memory.target <= pred.memory.upper
    assert pred.memory.target == pytest.approx(300e6, rel=0.15)


def test_model_round_trips_through_its_portable_artifact():
    from raysched.policy.models import ResourceModel

    models = build_predictor(CFG).train(linear_history(100))
    memory = models.get("memory").with_version(3)
    again = ResourceModel.from_artifact(memory.to_artifact("f"))
    X = features.feature_matrix(np.array([1e6, 5e7]), (), memory.tags)
    assert np.allclose(memory.predict(X), again.predict(X)) and again.tags == memory.tags
    assert again.source == "model-v3"


# --- calibration -----------------------------------------------------------------------------------------


def test_conformal_offset_is_the_finite_sample_quantile():
    scores = np.arange(1, 20, dtype=float)  # n = 19; level ceil(20 * 0.9) / 19 = 18/19
    assert calibrate.conformal_offset(scores, 0.9) == 18.0
    # The index is exact where floating point is not: ceil(25 x 0.56) = 14, though 25 * 0.56
    # is 14.000000000000002 (whose ceiling took one score too many)
    assert calibrate.conformal_offset(np.arange(1, 25, dtype=float), 0.56) == 14.0
    assert calibrate.conformal_offset(np.arange(1, 50, dtype=float), 0.56) == 28.0
    # Too few scores for the level: the max plus the spread, never less than the max.
    assert calibrate.conformal_offset(np.array([0.1, 0.2]), 0.95) > 0.2


def test_pinball_and_allocation_scores():
    assert calibrate.pinball_loss(np.array([10.0]), np.array([8.0]), 0.9) == pytest.approx(1.8)
    assert calibrate.pinball_loss(np.array([10.0]), np.array([12.0]), 0.9) == pytest.approx(0.2)
    score = calibrate.score_allocation(np.array([100.0, 100.0, 100.0, 100.0]), np.array([150.0, 100.0, 50.0, 200.0]))
    assert score.coverage == 0.75 and score.under_allocation_rate == 0.25
    assert score.mean_over_allocation == pytest.approx((0.5 + 0 + 1.0) / 3)


# --- sizing ----------------------------------------------------------------------------------------------


def prediction(memory_upper: float, cpu: float = 1.0) -> Prediction:
    return Prediction(
        memory=Estimate(memory_upper / 2, memory_upper / 4, memory_upper, 0.95, 10, "history"),
        cpu=Estimate(cpu, cpu, cpu, 0.95, 10, "history"),
        wall=Estimate(1, 1, 1, 0.95, 10, "history"),
        source="history",
    )


def test_sizing_adds_margin_rounds_and_respects_floors():
    alloc = build_sizer(CFG).size(prediction(100 * MiB, cpu=0.3))
    assert alloc.memory_bytes == 128 * MiB  # 115 MiB rounded up to 16 MiB
    assert alloc.num_cpus == 0.5
    tiny = build_sizer(CFG).size(prediction(1 * MiB, cpu=0.01))
    assert tiny.memory_bytes == 64 * MiB and tiny.num_cpus == 0.25
    assert build_sizer(CFG).size(prediction(100 * MiB, cpu=1.0000001)).num_cpus == 1.0


def test_explicit_options_win_over_the_prediction():
    alloc = build_sizer(CFG).size(prediction(10 * GiB), explicit={"memory": 123 * MiB})
    assert alloc.memory_bytes == 123 * MiB and "set by the caller" in alloc.reason
    # the caller's figure is the task's own memory (the monitor adds the worker's start to it)
    assert alloc.memory_is_task_only and not build_sizer(CFG).size(prediction(10 * GiB)).memory_is_task_only
    fallback = Prediction(memory=Estimate(GiB, GiB, GiB, 0.95, 0, "fallback"), cpu=Estimate(1, 1, 1, 0.95, 0, "fallback"),
                          wall=Estimate(1, 1, 1, 0.95, 0, "fallback"), source="fallback")
    assert build_sizer(CFG).size(fallback).memory_is_task_only


def test_oversize_is_capped_or_an_error_as_configured():
    cluster = ClusterShape((NodeShape("small", 2, 1 * GiB), NodeShape("big", 4, 4 * GiB)))
    capped = build_sizer(CFG).size(prediction(10 * GiB), cluster)
    assert capped.capped and capped.memory_bytes == 4 * GiB
    fits = build_sizer(CFG).size(prediction(2 * GiB), cluster)
    assert not fits.capped and fits.memory_bytes > 2 * GiB
    with pytest.raises(PredictionTooLarge, match="largest node that can run it offers 4096 MiB"):
        build_sizer(CFG.replace(oversize_policy="error")).size(prediction(10 * GiB), cluster, function="f")


def test_a_size_the_caller_set_is_judged_as_it_is_against_the_nodes_not_the_prediction_it_replaces():
    """``.options(memory=...)`` wins over the prediction: a prediction larger than every node
    that the caller's own figure replaces is no PredictionTooLarge (the call asks for 2 GiB),
    and nothing is capped; the caller's num_cpus chooses the nodes the rest must fit."""
    cluster = ClusterShape((NodeShape("wide", 8, 4 * GiB), NodeShape("deep", 2, 16 * GiB)))
    error = build_sizer(CFG.replace(oversize_policy="error"))
    alloc = error.size(prediction(20 * GiB), cluster, explicit={"memory": 2 * GiB}, function="f")
    assert alloc.memory_bytes == 2 * GiB and not alloc.capped
    alloc = build_sizer(CFG).size(prediction(20 * GiB), cluster, explicit={"memory": 2 * GiB})
    assert alloc.memory_bytes == 2 * GiB and not alloc.capped and "capped" not in alloc.reason
    # 6 CPUs set by the caller: only "wide" holds them, so the predicted 10 GiB is fitted to its 4 GiB
    # (sized with the predicted 1 CPU, it fitted "deep", and the call asked for 6 CPUs and 11.5 GiB,
    # which no node has: Ray kept it pending for ever)
    alloc = build_sizer(CFG).size(prediction(10 * GiB), cluster, explicit={"num_cpus": 6})
    assert (alloc.num_cpus, alloc.memory_bytes, alloc.capped) == (6.0, 4 * GiB, True)
    with pytest.raises(PredictionTooLarge, match="offers 4096 MiB and 8 CPU"):
        error.size(prediction(10 * GiB), cluster, explicit={"num_cpus": 6}, function="f")
    # what the caller set alone fits no node: left as asked (Ray reports it, as without raysched)
    alloc = error.size(prediction(1 * GiB), cluster, explicit={"memory": 64 * GiB}, function="f")
    assert alloc.memory_bytes == 64 * GiB and not alloc.capped


def test_oversize_never_lands_on_a_cpu_less_head_however_much_memory_it_has():
    """Ray advises a head with num_cpus=0; its memory resource is still the machine's."""
    head, small, big = NodeShape("head", 0, 23 * GiB), NodeShape("small", 1, 1 * GiB), NodeShape("big", 1, 3 * GiB)
    cluster = ClusterShape((head, small, big))
    capped = build_sizer(CFG).size(prediction(8 * GiB, cpu=1.0), cluster)
    assert capped.capped and capped.memory_bytes == 3 * GiB and capped.num_cpus == 1.0
    with pytest.raises(PredictionTooLarge, match="can run it offers 3072 MiB and 1 CPU"):
        build_sizer(CFG.replace(oversize_policy="error")).size(prediction(8 * GiB, cpu=1.0), cluster, function="f")
    # More CPUs than any node: capped to the node with the most CPUs, then the most memory there
    wide = ClusterShape((head, NodeShape("a", 2, 2 * GiB), NodeShape("b", 2, 1 * GiB)))
    capped = build_sizer(CFG).size(prediction(8 * GiB, cpu=4.0), wide)
    assert (capped.num_cpus, capped.memory_bytes) == (2.0, 2 * GiB)


def test_a_callers_own_option_is_judged_with_the_prediction_it_replaces_when_fitting_a_node():
    """The caller's num_cpus / memory are submitted as they are: fitting the largest node
    judges the request with them, and caps only raysched's own figure."""
    wide, deep = NodeShape("wide", 8, 4 * GiB), NodeShape("deep", 2, 64 * GiB)
    cluster = ClusterShape((wide, deep))
    sizer, strict = build_sizer(CFG), build_sizer(CFG.replace(oversize_policy="error"))
    # 8 CPUs of the caller's: only the wide node has them, so the memory is capped to its 4 GiB
    # (it was submitted with 11.5 GiB beside them: a request no node holds)
    alloc = sizer.size(prediction(10 * GiB), cluster, explicit={"num_cpus": 8})
    assert (alloc.num_cpus, alloc.memory_bytes) == (8.0, 4 * GiB) and alloc.capped
    assert cluster.fits(alloc)
    with pytest.raises(PredictionTooLarge, match="offers 4096 MiB and 8 CPU"):
        strict.size(prediction(10 * GiB), cluster, explicit={"num_cpus": 8}, function="f")
    # 32 GiB of the caller's: only the deep node has them, so the predicted 4 cores are capped to its 2
    alloc = sizer.size(prediction(GiB, cpu=4.0), cluster, explicit={"memory": 32 * GiB})
    assert (alloc.num_cpus, alloc.memory_bytes) == (2.0, 32 * GiB) and alloc.capped and cluster.fits(alloc)
    # The caller's 2 GiB fit: a prediction past every node neither caps nor refuses the call
    for s in (sizer, strict):
        alloc = s.size(prediction(100 * GiB), cluster, explicit={"memory": 2 * GiB}, function="f")
        assert (alloc.num_cpus, alloc.memory_bytes) == (1.0, 2 * GiB) and not alloc.capped
        assert "capped" not in alloc.reason
    # What the caller's own figures make infeasible is left to Ray, as without raysched
    for explicit in ({"num_cpus": 16}, {"memory": 128 * GiB}, {"num_cpus": 8, "memory": 64 * GiB}):
        alloc = strict.size(prediction(100 * GiB, cpu=4.0), cluster, explicit=explicit, function="f")
        assert not alloc.capped


def test_a_pinned_request_is_fitted_to_the_nodes_its_options_allow():
    """A call pinned to a node (a hard node affinity) or asking for a resource only some
    nodes have is capped to those nodes, not to the largest node of the cluster."""
    head = NodeShape("head", 0, 23 * GiB)
    small = NodeShape("small", 1, 1 * GiB, (("gpu_like", 1.0),))
    big = NodeShape("big", 2, 3 * GiB, (("GPU", 2.0),))
    cluster = ClusterShape((head, small, big))
    assert cluster.eligible() is cluster and cluster.eligible(None, {"gpu_like": 0}) is cluster
    assert cluster.eligible("small").nodes == (small,)
    assert cluster.eligible(None, {"gpu_like": 1}).nodes == (small,)
    assert cluster.eligible(None, (("GPU", 1.0),)).nodes == (big,)
    assert cluster.eligible(None, {"GPU": 4}).nodes == ()  # none: Ray will say it is infeasible
    assert cluster.eligible("small", {"GPU": 1}).nodes == ()
    assert small.amount("gpu_like") == 1.0 and small.amount("GPU") == 0.0
    hash(cluster.eligible("small"))  # a cache key

    fallback_like = prediction(GiB * 1.0, cpu=1.0)  # + 15% margin: more than the small node has
    whole = build_sizer(CFG).size(fallback_like, cluster)
    assert not whole.capped and whole.memory_bytes > 1 * GiB
    for pinned in (cluster.eligible("small"), cluster.eligible(None, {"gpu_like": 1})):
        capped = build_sizer(CFG).size(fallback_like, pinned)
        assert capped.capped and (capped.memory_bytes, capped.num_cpus) == (1 * GiB, 1.0)
        assert "capped to node small" in capped.reason and "its options allow" in capped.reason
        with pytest.raises(PredictionTooLarge, match=r"offers 1024 MiB and 1 CPU \(node small; its Ray options allow only"):
            build_sizer(CFG.replace(oversize_policy="error")).size(fallback_like, pinned, function="f")
    # No eligible node: the request is left as it is (Ray reports the task as infeasible)
    nowhere = build_sizer(CFG).size(fallback_like, cluster.eligible(None, {"GPU": 4}))
    assert nowhere == whole
    # Pinned to the CPU-less head: no CPU there for it, so no size is made up (not 0 CPUs)
    assert build_sizer(CFG).size(prediction(GiB * 30, cpu=1.0), cluster.eligible("head")) == \
        build_sizer(CFG).size(prediction(GiB * 30, cpu=1.0))


def test_label_selectors_keep_the_nodes_ray_would_run_the_call_on():
    """Ray's label selector: ``v`` and ``in(...)`` need the label to have one of the values,
    ``!v`` and ``!in(...)`` need it not to (a node without the label passes); a fallback
    strategy's selectors add the nodes Ray falls back to."""
    a = NodeShape("a", 1, 1 * GiB, labels=(("zone", "a"),))
    b = NodeShape("b", 2, 3 * GiB, labels=(("tier", "big"), ("zone", "b")))
    bare = NodeShape("bare", 4, 8 * GiB)
    cluster = ClusterShape((a, b, bare))
    assert b.label("zone") == "b" and bare.label("zone") is None

    def kept(*selectors):
        terms = tuple(tuple(LabelTerm.parse(k, v) for k, v in s.items()) for s in selectors)
        return [n.node_id for n in cluster.eligible(None, (), terms).nodes]

    assert kept({"zone": "a"}) == ["a"]
    assert kept({"zone": "!a"}) == ["b", "bare"]
    assert kept({"zone": "in(a,b)"}) == ["a", "b"]
    assert kept({"zone": "!in(a,b)"}) == ["bare"]
    assert kept({"zone": "b", "tier": "big"}) == ["b"] and kept({"zone": "a", "tier": "big"}) == []
    assert kept({"tier": "!big"}) == ["a", "bare"]
    assert kept({"zone": ""}) == []  # Ray schedules such a call nowhere
    assert kept({}) == ["a", "b", "bare"]
    # Ray 2.60 reads "in(a, b)" as "a" and " b"; a later Ray may read "b": only what holds
    # both ways is kept, so a request is never capped to a node Ray refuses.
    assert kept({"zone": "in(a, b)"}) == ["a"] and kept({"zone": "!in(a, b)"}) == ["bare"]
    # fallbacks: any selector's nodes
    assert kept({"zone": "none"}, {"zone": "a"}) == ["a"] and kept({"zone": "b"}, {"zone": "a"}) == ["a", "b"]
    assert kept({"zone": "none"}, {}) == ["a", "b", "bare"]  # a step with no selector: any node
    # NodeLabelSchedulingStrategy's Exists / DoesNotExist
    assert [n.node_id for n in cluster.eligible(None, (), ((LabelTerm("tier"),),)).nodes] == ["b"]
    assert [n.node_id for n in cluster.eligible(None, (), ((LabelTerm("zone", negated=True),),)).nodes] == ["bare"]
    shape = cluster.eligible(None, (), ((LabelTerm.parse("zone", "a"),), (LabelTerm.parse("tier", "!in(x,y)"),)))
    assert shape.scope == "labels {zone: a} or {tier: !in(x,y)}"
    shape = cluster.eligible(None, (), ((LabelTerm.parse("zone", "a"),),))
    assert shape.scope == "labels {zone: a}" and shape.largest_memory_bytes == 1 * GiB
    hash(shape)  # a cache key
    capped = build_sizer(CFG).size(prediction(GiB * 2.0, cpu=1.0), shape)
    assert capped.capped and capped.memory_bytes == 1 * GiB and "labels {zone: a}" in capped.reason


def test_labels_in_a_placement_group_fit_its_bundle():
    from raysched.policy.sizing import fit_bundle

    cpu_only = [{"CPU": 1.0}, {"CPU": 2.0}]
    assert fit_bundle(1.0, 1 * GiB, cpu_only, 0) == (1.0, 0)  # no memory label: the bundle holds none
    assert fit_bundle(1.5, 1 * GiB, cpu_only, 0) == (1.0, 0)
    assert fit_bundle(1.5, 1 * GiB, cpu_only, -1) == (1.5, 0)  # any bundle: the one that holds the most
    with_memory = [{"CPU": 1.0, "memory": 512 * MiB}, {"CPU": 1.0, "memory": 2 * GiB}]
    assert fit_bundle(0.5, 1 * GiB, with_memory, 0) == (0.5, 512 * MiB)
    # Any bundle: memory cut to the smallest bundle's (the group reserved it), so the call may
    # go to any bundle; cores to the largest bundle's (oversubscribed cores slow the bundle).
    assert fit_bundle(0.5, 1 * GiB, with_memory, -1) == (0.5, 512 * MiB)
    # One bundle holding memory, one not: every call was labelled for the first bundle and ran
    # there, one after another, while the second bundle's core idled (an audit).
    mixed = [{"CPU": 1.0, "memory": 256 * MiB}, {"CPU": 1.0}]
    assert fit_bundle(1.0, 1 * GiB, mixed, -1) == (1.0, 0)
    assert fit_bundle(1.0, 1 * GiB, mixed, 0) == (1.0, 256 * MiB)
    assert fit_bundle(0.5, 1 * GiB, [], -1) == (0.5, 1 * GiB)
    # The caller's own memory kept: raysched's cores fit the bundles that hold it (a review: 2 cores
    # beside a kept 3 GiB fitted no bundle, where plain Ray's 1 core and 3 GiB fit the first).
    tune = [{"CPU": 1.0, "memory": 4 * GiB}, {"CPU": 4.0}]
    assert fit_bundle(2.0, 3 * GiB, tune, -1, keep_memory=True) == (1.0, 3 * GiB)
    assert fit_bundle(2.0, 3 * GiB, tune, -1, keep_cpus=True) == (2.0, 0)  # only the 4-core bundle holds 2
    assert fit_bundle(8.0, 3 * GiB, tune, -1, keep_cpus=True) == (8.0, 3 * GiB)  # none: left for Ray to refuse


# --- samples and ladder ---------------------------------------------------------------------------------


def test_oom_sample_is_the_vpa_bump():
    assert oom_bump(100 * MiB, CFG) == 200 * MiB  # +100 MiB beats x1.2
    assert oom_bump(1000 * MiB, CFG) == 1200 * MiB  # x1.2 beats +100 MiB
    assert memory_sample("oom_killed", 1000 * MiB, 500 * MiB, CFG) == 1200 * MiB
    assert memory_sample("oom_killed", None, 500 * MiB, CFG) == 600 * MiB
    assert memory_sample("oom_killed", 0, 500 * MiB, CFG) == 600 * MiB  # a peak of 0: nothing was measured
    assert memory_sample("oom_killed", 0, 0, CFG) is None
    assert memory_sample("ok", 300.0, 500, CFG) == 300.0
    assert memory_sample("cancelled", 300.0, 500, CFG) is None


def failed(attempt: int, memory: int, peak: int | None, rung: int = 0) -> AttemptRecord:
    usage = Usage(peak_rss_bytes=peak) if peak is not None else None
    return AttemptRecord(attempt, Allocation(1.0, memory, rung=rung), Outcome.OOM_KILLED, usage)


def test_ladder_climbs_rung_by_rung_as_a_table():
    ladder = build_ladder(FIXED)
    pred = prediction(1 * GiB)  # upper bound rung: 1.15 GiB
    state = LadderState(pred, (failed(1, 512 * MiB, 500 * MiB),), max_peak_seen=3 * GiB, largest_node_bytes=16 * GiB)
    names = [name for _, name, _ in ladder.describe(state)]
    assert names == ["upper bound", "2 x observed peak", "largest peak seen", "largest node"]
    second = ladder.next_allocation(state)
    assert (second.rung, second.reason) == (1, "upper bound")
    assert second.memory_bytes == math.ceil(1.15 * GiB / (16 * MiB)) * 16 * MiB
    state = LadderState(pred, state.attempts + (failed(2, second.memory_bytes, 1100 * MiB, 1),), 3 * GiB, 16 * GiB)
    third = ladder.next_allocation(state)
    assert (third.rung, third.memory_bytes) == (2, 2208 * MiB)  # 2 x 1100 MiB, rounded up to 16 MiB
    state = LadderState(pred, state.attempts + (failed(3, third.memory_bytes, 2000 * MiB, 2),), 3 * GiB, 16 * GiB)
    fourth = ladder.next_allocation(state)
    assert fourth.rung == 3 and fourth.memory_bytes >= 3 * GiB * 1.15
    state = LadderState(pred, state.attempts + (failed(4, fourth.memory_bytes, 3 * GiB, 3),), 3 * GiB, 16 * GiB)
    assert ladder.next_allocation(state) is None  # max_attempts = 4


def test_ladder_skips_rungs_that_do_not_grow_and_caps_at_the_largest_node():
    ladder = build_ladder(CFG.replace(max_attempts=10))
    pred = prediction(100 * MiB)
    state = LadderState(pred, (failed(1, 1 * GiB, 900 * MiB),), max_peak_seen=0, largest_node_bytes=1.5 * GiB)
    nxt = ladder.next_allocation(state)
    assert nxt.capped and nxt.memory_bytes == int(1.5 * GiB)
    state = LadderState(pred, state.attempts + (failed(2, nxt.memory_bytes, 1.4 * GiB, nxt.rung),), 0, 1.5 * GiB)
    assert ladder.next_allocation(state) is None  # nothing bigger exists



def test_an_attempt_killed_within_the_largest_allocation_is_run_there_again():
    """CI, thirty-sixth session: a call's second attempt got all the room beside its waiting
    first task (1,632 MiB) and was killed by Ray at 514 MiB, when a neighbour over its own
    allocation filled the node (Ray's killer takes the newest task first); the ladder, with
    nothing bigger to give, ended the call after 2 of its 4 attempts. What its attempts
    measured (814 MiB, bumped) fits: it runs there again, within max_attempts."""
    ladder = build_ladder(CFG)  # max_attempts 4
    room = 1632 * MiB
    first = failed(1, 464 * MiB, 814 * MiB)
    state = LadderState(prediction(400 * MiB), (first, failed(2, room, 514 * MiB, 3)), 814 * MiB, room)
    again = ladder.next_allocation(state)
    assert again.memory_bytes == room and again.rung == 3 and again.reason.startswith("again at the largest node")
    # Three attempts at it: the fourth would be the last, and still gets the same.
    state = LadderState(state.prediction, state.attempts + (failed(3, room, 600 * MiB, 3),), 814 * MiB, room)
    assert ladder.next_allocation(state).memory_bytes == room
    state = LadderState(state.prediction, state.attempts + (failed(4, room, 600 * MiB, 3),), 814 * MiB, room)
    assert ladder.next_allocation(state) is None  # max_attempts: the call ends
    # A peak that, bumped, does not fit, or none measured: nothing bigger exists, the call ends.
    for peak in (1500 * MiB, None):
        state = LadderState(prediction(400 * MiB), (first, failed(2, room, peak, 3)), 814 * MiB, room)
        assert ladder.next_allocation(state) is None, peak
    # The memory limit likewise: killed under it by a neighbour, run at it again.
    state = LadderState(prediction(200 * MiB), (failed(1, 600 * MiB, 300 * MiB),), 300 * MiB, 22 * GiB, 600 * MiB)
    assert ladder.next_allocation(state).reason.startswith("again at the memory limit")

def test_a_rung_rounded_up_never_passes_the_node_it_must_fit():
    """13,172 MiB of room left rounded up to 13,184 MiB: the attempt could not start beside
    the call's waiting tasks, and waited for a room that never came."""
    ladder = build_ladder(CFG.replace(max_attempts=10))
    room = 13172 * MiB  # not a multiple of the 16 MiB rounding
    state = LadderState(prediction(100 * MiB), (failed(1, 8 * GiB, 6.6 * GiB),), max_peak_seen=0,
                        largest_node_bytes=room)
    nxt = ladder.next_allocation(state)  # 2 x 6.6 GiB = 13,516.8 MiB: over the room, capped
    assert nxt.memory_bytes == room
    state = LadderState(prediction(100 * MiB), (failed(1, 8 * GiB, 6585 * MiB),), max_peak_seen=0,
                        largest_node_bytes=room)
    nxt = ladder.next_allocation(state)  # 2 x 6,585 MiB = 13,170 MiB: under it, rounded up past it
    assert nxt.memory_bytes == room


def test_ladder_without_measured_peak_grows_from_the_allocation():
    ladder = build_ladder(CFG)
    state = LadderState(prediction(64 * MiB), (failed(1, 256 * MiB, None),))
    nxt = ladder.next_allocation(state)
    assert nxt.memory_bytes == 512 * MiB and nxt.reason == "2 x observed peak"


def test_the_cost_aware_ladder_doubles_the_peak_again_and_keeps_the_whole_node_for_the_last_attempt():
    """A call needing ~1.3 GiB from a 128 MiB fallback: its third attempt got all of a 22 GiB
    node with one attempt left (a helper's audit); doubling the peak again fits it."""
    ladder = build_ladder(CFG)  # cost-aware by default, max_attempts 4
    node = 22 * GiB
    pred = prediction(100 * MiB)
    state = LadderState(pred, (failed(1, 128 * MiB, 472 * MiB),), max_peak_seen=472 * MiB, largest_node_bytes=node)
    second = ladder.next_allocation(state)
    assert second.reason == "2 x observed peak" and second.memory_bytes == 944 * MiB
    state = LadderState(pred, state.attempts + (failed(2, second.memory_bytes, 1265 * MiB, second.rung),),
                        1265 * MiB, node)
    third = ladder.next_allocation(state)
    assert third.reason == "2 x observed peak" and third.memory_bytes == 2544 * MiB  # 2 x 1265 MiB, rounded up
    state = LadderState(pred, state.attempts + (failed(3, third.memory_bytes, 2600 * MiB, third.rung),),
                        2600 * MiB, node)
    last = ladder.next_allocation(state)  # the fourth and last attempt: what surely fits
    assert last.reason == "largest node" and last.memory_bytes == node


def test_the_ladder_stops_at_the_functions_memory_limit():
    """A 600 MiB cap: the next rung (1072 MiB) only broke the cap again, after a whole attempt."""
    ladder = build_ladder(CFG)
    pred = prediction(200 * MiB)
    state = LadderState(pred, (failed(1, 256 * MiB, 504 * MiB),), max_peak_seen=504 * MiB,
                        largest_node_bytes=22 * GiB, limit_bytes=600 * MiB)
    nxt = ladder.next_allocation(state)
    assert nxt.capped and nxt.memory_bytes == 600 * MiB and nxt.reason.endswith("capped at the memory limit")
    state = LadderState(pred, state.attempts + (failed(2, nxt.memory_bytes, 640 * MiB, nxt.rung),), 640 * MiB,
                        22 * GiB, 600 * MiB)
    assert ladder.next_allocation(state) is None  # at the cap: nothing bigger may run


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="oversize_policy"):
        RayschedConfig(oversize_policy="maybe")
    with pytest.raises(ValueError, match="max_attempts"):
        RayschedConfig(max_attempts=0)
    for fanout in (1, -2, 2.5, True):
        with pytest.raises(ValueError, match="store_tidy_fanout"):
            RayschedConfig(store_tidy_fanout=fanout)
    assert RayschedConfig(store_tidy_fanout=0).store_tidy_fanout == 0  # never


def test_a_misspelt_knob_is_named_with_the_ones_meant():
    """``raysched.configure`` goes through ``replace``: dataclasses' own error named no alternative."""
    with pytest.raises(TypeError, match=r"no knob 'node_kill_margn' \(did you mean node_kill_margin\?\)"):
        RayschedConfig().replace(node_kill_margn=0.01)
    with pytest.raises(TypeError, match=r"no knob 'zzz'$"):
        RayschedConfig().replace(zzz=1, max_attempts=2)


def test_config_errors_are_raysched_errors_and_a_path_is_a_home(tmp_path):
    """A helper's audit: ``except raysched.RayschedError`` caught bad decorator and option
    input but not bad config (plain ValueError and TypeError); a pathlib.Path home was
    refused as "not a string"."""
    from raysched.errors import InvalidInput, RayschedError, UnknownKnob

    with pytest.raises(InvalidInput, match="max_attempts"):
        RayschedConfig(max_attempts=0)
    with pytest.raises(InvalidInput, match="max_attempts must be an integer"):
        RayschedConfig(max_attempts="3")
    with pytest.raises(UnknownKnob) as info:
        RayschedConfig().replace(max_attempt=3)
    assert isinstance(info.value, (RayschedError)) and isinstance(info.value, TypeError)
    config = RayschedConfig(home=tmp_path / "home")
    assert config.home == str(tmp_path / "home") and config.home_path == tmp_path / "home"
    assert config.replace(home=tmp_path).home == str(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"cpu_rounding": 0}, "cpu_rounding must be positive"),  # was a ZeroDivisionError at the first .remote()
    ({"live_interval_s": 0}, "live_interval_s must be positive"),  # was a failure of every task, in its worker
    ({"default_num_cpus": -2}, "default_num_cpus must be at least 0"),
    ({"memory_margin": -0.9}, "memory_margin must be at least 0"),  # was a silent 112 MiB for a 1 GiB fallback
    ({"monitor_enabled": "false"}, "monitor_enabled must be True or False"),  # was taken as True
    ({"max_attempts": "3"}, "max_attempts must be an integer"),  # was a TypeError from a comparison
    ({"memory_limit_bytes": "1GiB"}, "memory_limit_bytes must be an integer"),
    ({"memory_limits": {"f": "1GiB"}}, "memory_limits must map function names to bytes"),
    ({"history_window": 0}, "history_window must be at least 1"),
    ({"stat_percentile": 150}, "stat_percentile must be a percentile"),
    ({"holdout_fraction": 1.5}, "holdout_fraction must be a fraction"),
    ({"quantiles": (0.5,)}, "quantiles must be at least three"),
    ({"memory_rounding_bytes": 1.5}, "memory_rounding_bytes must be an integer"),
    ({"coverage": float("nan")}, "coverage must be a finite number"),
    # infinity passed every range check, then failed far from its cause (an audit):
    ({"memory_margin": float("inf")}, "memory_margin must be a finite number"),  # was an OverflowError in sizing
    ({"default_num_cpus": float("inf")}, "default_num_cpus must be a finite number"),  # was an AttributeError
    ({"cpu_rounding": float("inf")}, "cpu_rounding must be a finite number"),  # was num_cpus=nan
    ({"quantiles": (0.1, float("inf"), 0.9)}, "quantiles must be a sequence of numbers"),
    # combinations that cannot work:
    ({"quantiles": (0.1, 0.5, 0.9, 0.95)}, "quantiles must be an odd number"),  # p90 was taken as the target
    ({"min_history_for_model": 4}, "leaves no run to train on"),  # was an XGBoostError in every training
    ({"history_window": 5}, "history_window=5 keeps fewer runs than cost_min_history=8"),  # never used
    # the monitor forgot every attempt before a rule could fire (two workers reporting in turn):
    ({"monitor_stale_s": 0.4}, r"monitor_stale_s=0.4 is shorter than the 10 samples .* use at least 6"),
    ({"memory_limits": [("f", 2 * GiB), ("f", GiB)]}, r"memory_limits names a function twice: \['f'\]"),
])
def test_config_names_a_bad_value_where_it_is_set(change, message):
    with pytest.raises(ValueError, match="invalid RayschedConfig: .*" + message):
        RayschedConfig(**change)


def test_config_gives_no_advice_on_a_combination_when_a_value_is_out_of_range():
    with pytest.raises(ValueError) as info:
        RayschedConfig(holdout_fraction=1.5)  # "use at least 46 runs" was advised beside the range error
    assert "holdout_fraction must be" in str(info.value) and "leaves no run" not in str(info.value)


def test_config_keeps_plain_numbers_of_any_numeric_type():
    import numpy as np

    config = RayschedConfig(default_memory_bytes=1.5 * GiB, memory_limit_bytes=np.int64(2 * GiB),
                            default_num_cpus=np.float32(2), memory_limits={"f": GiB})
    assert type(config.default_memory_bytes) is int and config.default_memory_bytes == 3 * GiB // 2
    assert type(config.memory_limit_bytes) is int and type(config.default_num_cpus) is float
    assert config.memory_limits == (("f", GiB),)


def test_config_keeps_sequences_as_tuples_so_the_policy_built_from_it_can_be_cached():
    # Lists (as JSON or YAML give them) passed the checks, then the first .remote() failed
    # with "unhashable type: 'list'" in the policy's cache (an audit).
    from raysched.policy.recipe import build_ladder, build_predictor, build_sizer

    config = RayschedConfig(quantiles=[0.1, 0.5, 0.9], memory_limits=[("mod.f", GiB), ("mod.g", 2 * GiB)])
    assert config.quantiles == (0.1, 0.5, 0.9) and config.memory_limits == (("mod.f", GiB), ("mod.g", 2 * GiB))
    assert hash(config) == hash(RayschedConfig(quantiles=(0.1, 0.5, 0.9), memory_limits={"mod.g": 2 * GiB, "mod.f": GiB}))
    build_predictor(config), build_sizer(config), build_ladder(config)


def test_home_comes_from_the_environment_only_in_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYSCHED_HOME", str(tmp_path))
    assert RayschedConfig.from_env().home_path == tmp_path.resolve()
    assert RayschedConfig().home == ".raysched"
    assert os.environ["RAYSCHED_HOME"] == str(tmp_path)


# --- cost-aware memory sizing (the default memory chain) ---------------------------------------


def test_history_censored_defaults_to_none_and_survives_tail_and_append():
    h = History.from_columns({"memory": [1.0, 2.0, 3.0]})
    assert h.censored is None and not h.censored_mask.any()
    c = History.from_columns({"memory": [4.0, 5.0], "censored": [True, False]})
    both = h.append(c)
    assert both.censored_mask.tolist() == [False, False, False, True, False]
    assert both.tail(2).censored_mask.tolist() == [True, False]


def test_cost_aware_estimator_leaves_censored_runs_out():
    from raysched.policy.estimators import CostAwareEstimator

    est = CostAwareEstimator("memory", min_history=3, min_correlation=0.3, local_fraction=1.0, min_local=3,
                             tail_allowance=0.0, min_coverage=1.0)
    plain = History.from_columns({"memory": [100.0, 100.0, 100.0]})
    # A killed run recorded as the bumped sample 500 (censored) changes nothing...
    killed = History.from_columns({"memory": [100.0, 100.0, 100.0, 500.0], "censored": [False, False, False, True]})
    a = est.estimate(EstimationContext(plain), Features())
    b = est.estimate(EstimationContext(killed), Features())
    assert a.upper == pytest.approx(100.0) and b.upper == pytest.approx(100.0) and b.n_history == 3
    # ...while the same row taken as a real peak sets the allocation (all of it must be covered).
    c = est.estimate(EstimationContext(History.from_columns({"memory": [100.0, 100.0, 100.0, 500.0]})), Features())
    assert c.upper == pytest.approx(500.0)


def test_the_unseen_tail_by_count_moves_the_phantom_run_out_further_with_fewer_runs():
    from statistics import NormalDist

    from raysched.policy.estimators import CostAwareEstimator, unseen_tail_ratio

    # Normal theory, checked against a simulation: the mean of a draw beyond the largest of
    # k, minus that largest, as a share of (largest - median), averaged over many k-samples.
    rng = np.random.default_rng(0)
    for k in (8, 30):
        samples = rng.standard_normal((20000, k))
        largest = samples.max(axis=1)
        beyond = [NormalDist().inv_cdf(1 - (1 - NormalDist().cdf(m)) * rng.random()) for m in largest[:4000]]
        simulated = np.mean(np.array(beyond) - largest[:4000]) / np.mean(largest - np.median(samples, axis=1))
        assert unseen_tail_ratio(k) == pytest.approx(simulated, rel=0.15)
    assert unseen_tail_ratio(8) == pytest.approx(0.313, abs=0.002)
    assert unseen_tail_ratio(8) > unseen_tail_ratio(30) > unseen_tail_ratio(100) > 0
    # With min_coverage 1 the allocation is the phantom run: the largest residual plus the
    # allowance times the spread, the allowance scaled by the count when asked.
    uses = np.exp(np.linspace(-0.5, 0.5, 9)) * 1e9  # log residuals -0.5..0.5 about the median
    history = History.from_columns({"memory": uses})
    kw = dict(min_history=8, min_correlation=0.3, local_fraction=1.0, min_local=8, min_coverage=1.0)
    fixed = CostAwareEstimator("memory", tail_allowance=0.1, **kw).estimate(EstimationContext(history), Features())
    counted = CostAwareEstimator("memory", tail_allowance=1.0, tail_by_count=True, **kw).estimate(
        EstimationContext(history), Features())
    assert fixed.upper == pytest.approx(1e9 * math.exp(0.5 + 0.1 * 0.5), rel=1e-9)
    assert counted.upper == pytest.approx(1e9 * math.exp(0.5 + unseen_tail_ratio(9) * 0.5), rel=1e-9)
    assert RayschedConfig().cost_tail_by_count is False  # measured, not the default (benchmarks/README.md)


def test_history_estimators_use_the_runs_with_the_calls_tags():
    from raysched.policy.estimators import runs_with_tags

    rng = np.random.default_rng(0)
    n = 40
    tags = [("genome=small",) if i % 2 else ("genome=big", "x") for i in range(n)]
    big = np.array([t != ("genome=small",) for t in tags])
    history = History.from_columns({"input_size": rng.uniform(1e6, 1e7, n),
                                    "memory": np.where(big, 4e9, 5e8) * rng.uniform(0.95, 1.05, n),
                                    "wall": np.ones(n), "cpu": np.ones(n), "tags": tags})
    predictor = build_predictor(CFG)
    models = predictor.train(history)
    small_call = predictor.predict(Features(input_size=5e6, tags=("genome=small",)), history, models)
    big_call = predictor.predict(Features(input_size=5e6, tags=("x", "genome=big")), history, models)  # a set
    assert small_call.memory.n_history == big_call.memory.n_history == 20
    assert small_call.memory.upper < 0.6e9 and 4e9 < big_call.memory.upper < 4.7e9
    # Neither a call without tags nor one with a tag never seen has runs of its own: all runs.
    for unseen in ((), ("genome=new",)):
        assert predictor.predict(Features(input_size=5e6, tags=unseen), history, models).memory.n_history == 40
    # With too few runs of its tags the cost-aware step passes; fewer-run statistics of the
    # same runs answer (the model would, once trained on 30 runs or more).
    few = history.append(History.from_columns({"memory": [2e9] * 3, "wall": [1.0] * 3, "cpu": [1.0] * 3,
                                               "tags": [("rare",)] * 3}))
    rare = predictor.predict(Features(tags=("rare",)), few)
    assert rare.memory.n_history == 3 and 2e9 <= rare.memory.upper < 3e9
    # The selection is made once per history and tag set, and is the history itself when
    # every run has the call's tags.
    assert runs_with_tags(few, ("rare",)) is runs_with_tags(few, ("rare",))
    plain = History.from_columns({"memory": [1e9] * 4, "tags": [("a",)] * 4})
    assert runs_with_tags(plain, ("a",)) is plain


def test_the_model_tells_apart_tags_whose_hashes_met():
    # crc32 % 8 put all three in bucket 2 (and % 64 two of them in one): now each tag of
    # the training runs has a column of its own.
    names = ["genome=hg19", "genome=mm10", "genome=GRCh37"]
    n = 40
    tags = [(names[i % 3],) for i in range(3 * n)]
    use = {"genome=hg19": 200 * MiB, "genome=mm10": 6000 * MiB, "genome=GRCh37": 1000 * MiB}
    rng = np.random.default_rng(1)
    history = History.from_columns({"input_size": rng.uniform(1e6, 1e7, 3 * n),
                                    "memory": [use[t[0]] * rng.uniform(0.97, 1.03) for t in tags],
                                    "cpu": [1.0] * (3 * n), "wall": [1.0] * (3 * n), "tags": tags})
    predictor = build_predictor(CFG.replace(memory_cost_aware=False))  # memory from the model itself
    models = predictor.train(history)
    for name, peak in use.items():
        memory = predictor.predict(Features(input_size=5e6, tags=(name,)), history, models).memory
        assert memory.source.startswith("model") and peak * 0.9 < memory.target < peak * 1.1, name
    # And after the round trip through the registry's artifact, as a restarted profiler serves it.
    from raysched.policy.models import ResourceModel

    again = {"memory": ResourceModel.from_artifact(models.get("memory").to_artifact("f"))}
    memory = predictor.predict(Features(input_size=5e6, tags=("genome=hg19",)), history, again).memory
    assert 200 * MiB * 0.9 < memory.target < 200 * MiB * 1.1


def test_cost_aware_extrapolates_along_the_log_log_slope_beyond_the_largest_input():
    from raysched.policy.estimators import CostAwareEstimator, _loglog_slope, _monotone_fit

    # use = 1000 x size ** 0.5 exactly: slope 0.5 in log-log (log1p ~ log for these sizes)
    sizes = np.geomspace(1e6, 1e8, 12)
    ls, lu = np.log1p(sizes), np.log(1000 * np.sqrt(sizes))
    assert _loglog_slope(ls, lu, 1.0) == pytest.approx(0.5, abs=1e-6)
    assert _loglog_slope(ls, lu, 0.3) == 0.3  # clipped
    # One run of a second mode at the top of the range (3x the line) leaves the slope beyond
    # it as it was; a least-squares line rose to 0.57 with it.
    odd = lu.copy()
    odd[-1] += math.log(3)
    assert float(np.polyfit(ls, odd, 1)[0]) > 0.56
    assert _loglog_slope(ls, odd, 1.0) == pytest.approx(0.5, abs=0.02)
    assert _loglog_slope(ls, odd, 1.0, 0.5) == pytest.approx(0.5, abs=0.05)
    # Runs of equal size have no slope between them; many runs are thinned evenly, not cut.
    assert _loglog_slope(np.repeat(ls, 3), np.repeat(lu, 3), 1.0) == pytest.approx(0.5, abs=1e-6)
    many = np.log1p(np.geomspace(1e6, 1e8, 1000))
    assert _loglog_slope(many, 0.25 * many, 1.0) == pytest.approx(0.25, abs=1e-3)
    # 100x beyond the largest input: the largest fitted use (1e7) x 100 ** 0.5 = 1e8;
    # inside the range, the interpolated fit; below it, flat at the smallest
    q = np.log1p(np.array([1e10, 1e7, 1e3]))
    fit = np.exp(_monotone_fit(ls, lu, q, 0.5))
    assert fit == pytest.approx([1e8, 1000 * math.sqrt(1e7), 1e6], rel=1e-3)
    est = CostAwareEstimator("memory", min_history=8, min_correlation=0.3, local_fraction=0.3, min_local=8,
                             tail_allowance=0.0, min_coverage=0.75)
    history = History.from_columns({"input_size": sizes, "memory": 1000 * np.sqrt(sizes)})
    big = est.estimate(EstimationContext(history), Features(input_size=10**10))
    assert big.upper == pytest.approx(1e8, rel=1e-3)
    flat = CostAwareEstimator("memory", 8, 0.3, 0.3, 8, 0.0, 0.75, extrapolate=False)
    # Flat beyond the range: the largest use seen, times the largest cross-fitted residual (the
    # largest run left out and predicted flat from its neighbour, one step of 10 ** (2/11)
    # below it: sqrt(10 ** (2/11)) = 10 ** (1/11) = 1.2328), which the 75% floor must cover.
    flat_est = flat.estimate(EstimationContext(history), Features(input_size=10**10))
    assert flat_est.upper == pytest.approx(1e7 * 10 ** (1 / 11), rel=1e-3)


def test_cost_aware_allocation_is_capped_near_the_largest_use_seen():
    from raysched.policy.estimators import CostAwareEstimator

    # Bimodal use at the same inputs (14 MB or 5.6 GB): log residuals are huge (e^6), so
    # center x exp(max residual) would be far above anything ever seen; the cap keeps the
    # allocation at the largest use x exp(0.2) = 5.6 GB x 1.2214 = 6.84 GB.
    sizes = np.repeat(np.geomspace(1e6, 1e9, 10), 2)
    uses = np.tile([14e6, 5.6e9], 10)
    uses[:6] = 14e6  # small inputs use little: input size explains some of it
    history = History.from_columns({"input_size": sizes, "memory": uses})
    kw = dict(min_history=8, min_correlation=0.0, local_fraction=0.3, min_local=8, tail_allowance=0.0,
              min_coverage=1.0)
    capped = CostAwareEstimator("memory", **kw, cap_allowance=0.2).estimate(EstimationContext(history), Features(input_size=10**9))
    assert capped.upper == pytest.approx(5.6e9 * math.exp(0.2), rel=1e-6)
    uncapped = CostAwareEstimator("memory", **kw).estimate(EstimationContext(history), Features(input_size=10**9))
    assert uncapped.upper > 2 * capped.upper


def test_default_memory_chain_is_cost_aware_and_model_still_serves_cpu():
    assert CFG.memory_cost_aware
    history = linear_history(400, noise=2e7)
    predictor = build_predictor(CFG)
    pred = predictor.predict(Features(input_size=5e7), history, predictor.train(history))
    assert pred.memory.source == "history" and pred.cpu.source == "model"
    # 300 MB at 5e7 (100 MB + 4 x size) with N(0, 20 MB) noise: the allocation sits above
    # the center but far below the fixed chain's p95-plus-spread of large inputs
    from raysched.policy.recipe import requested_memory

    allocation = requested_memory(pred.memory, CFG.memory_margin)
    assert 300e6 < allocation < 400e6


def test_a_cost_aware_estimate_is_the_allocation_it_chose_and_bounds_the_peak():
    # The monitor benchmark's history: a call of N MiB peaks at N + 96 MiB, every time.
    # The cost-aware estimate's upper bound is the allocation it chose (margin 0), so it
    # covers the peak, and what the admission queue and the monitor count a call by is
    # that; it was the allocation / 1.15, 194 MiB under the real peak of a 1,400 MiB call.
    from raysched.policy.admission import expected_peak_bytes
    from raysched.policy.recipe import requested_memory
    from raysched.policy.sizing import size

    sizes = [200, 800, 1200, 1400, 300, 800, 700, 300, 900, 400, 1000, 800, 400, 500, 1200, 500, 700, 1200, 900, 1400]
    history = History.from_columns({"input_size": [n * MiB for n in sizes],
                                    "memory": [(n + 96) * MiB for n in sizes]})
    predictor = build_predictor(CFG)
    for n in (200, 800, 1400):
        pred = predictor.predict(Features(input_size=n * MiB), history)
        assert pred.memory.source == "history" and pred.memory.margin == 0.0
        assert pred.memory.upper >= (n + 96) * MiB * (1 - 1e-12)  # it bounds the peak (numpy 1.x: 3e-6 bytes short)
        allocation = size(pred, CFG)
        assert allocation.memory_bytes == math.ceil(pred.memory.upper / (16 * MiB)) * 16 * MiB  # no margin on top
        assert requested_memory(pred.memory, CFG.memory_margin) == pred.memory.upper
        assert expected_peak_bytes(pred.memory.upper, allocation.memory_is_task_only) == pred.memory.upper
    # An estimate without its own margin still gets the config's 15%.
    plain = Estimate(1 * GiB, 1 * GiB, 1 * GiB, 0.9, 30)
    assert requested_memory(plain, CFG.memory_margin) == pytest.approx(1.15 * GiB)
    assert size(Prediction(memory=plain, cpu=plain.scaled(1 / GiB), wall=plain.scaled(1 / GiB)), CFG).memory_bytes \
        == math.ceil(1.15 * GiB / (16 * MiB)) * 16 * MiB
    with pytest.raises(ValueError, match="margin"):
        Estimate(1.0, 1.0, 1.0, 0.9, 3, margin=-0.1)


def _steepening_history() -> tuple[np.ndarray, np.ndarray]:
    # 1 GB up to inputs of 1e8, then proportional to the input: the curve fitted on the
    # runs below the top bends upwards late, so lines fitted on the runs seen understate
    # the use of a larger input.
    sizes = np.geomspace(1e6, 1e9, 30)
    rng = np.random.default_rng(0)
    use = np.where(sizes < 1e8, 1e9, 1e9 * sizes / 1e8) * np.exp(rng.normal(0, 0.02, sizes.shape[0]))
    return sizes, use


def _cost_aware(q: float):
    from raysched.policy.estimators import CostAwareEstimator

    return CostAwareEstimator("memory", min_history=8, min_correlation=0.3, local_fraction=0.35, min_local=8,
                              tail_allowance=0.1, min_coverage=0.75, slope_fraction=0.5,
                              cap_allowance=0.2, extrapolation_quantile=q)


def test_leave_largest_out_scores_see_use_growing_faster_than_the_fit():
    from raysched.policy.estimators import _extrapolation_scores, _loglog_slope

    sizes, use = _steepening_history()
    ls, lu = np.log1p(sizes), np.log(use)
    scores = _extrapolation_scores(ls, lu, lambda x, y: _loglog_slope(x, y, 1.0, 0.5), lambda x, y, s: 0.0)
    # hold-outs of the top 10%, 20% and 30% of 30 runs: 3 + 6 + 9 scores, mostly positive
    assert scores.shape[0] == 18 and np.median(scores) > 0.3
    # a pure power law extrapolates exactly: no held-out run rises above the fit
    exact = _extrapolation_scores(ls, 0.5 * ls, lambda x, y: _loglog_slope(x, y, 1.0, 0.5), lambda x, y, s: 0.0)
    assert np.all(exact <= 1e-9)
    # too few runs of distinct sizes to hold any out: no scores
    assert _extrapolation_scores(ls[:3], lu[:3], lambda x, y: 0.0, lambda x, y, s: 0.0).shape[0] == 0
    assert _extrapolation_scores(np.ones(10), lu[:10], lambda x, y: 0.0, lambda x, y, s: 0.0).shape[0] == 0


def test_extrapolation_offset_widens_beyond_the_range_and_leaves_the_range_alone():
    sizes, use = _steepening_history()
    ctx = EstimationContext(History.from_columns({"input_size": sizes, "memory": use}))
    off, on = _cost_aware(0.0), _cost_aware(0.9)
    # 3x past the largest input the use keeps growing in proportion (30 GB): the fitted
    # slope and the local residuals alone allocate less; the offset covers it.
    truth = 1e9 * 3e9 / 1e8
    a_off = off.estimate(ctx, Features(input_size=3 * 10**9)).upper  # the allocation itself: margin 0
    a_on = on.estimate(ctx, Features(input_size=3 * 10**9)).upper
    assert a_off < truth < a_on
    # the further past the range, the wider
    far_off = off.estimate(ctx, Features(input_size=10**10)).upper
    far_on = on.estimate(ctx, Features(input_size=10**10)).upper
    assert far_on / far_off > a_on / a_off > 1
    # inside the range (and below it) nothing changes
    for x in (10**7, 5 * 10**8, 10**9):
        assert on.estimate(ctx, Features(input_size=x)) == off.estimate(ctx, Features(input_size=x))
    # a power law the curve already extrapolates exactly: no offset
    exact = EstimationContext(History.from_columns({"input_size": sizes, "memory": 1000 * np.sqrt(sizes)}))
    assert on.estimate(exact, Features(input_size=10**10)) == off.estimate(exact, Features(input_size=10**10))


def test_extrapolation_quantile_is_wired_and_validated():
    from raysched.policy.estimators import CostAwareEstimator, FirstOf, SameTags, WithMinimum
    from raysched.policy.shift import SinceShift

    chain = build_predictor(CFG.replace(cost_extrapolation_quantile=0.8)).chains["memory"]
    assert isinstance(chain, WithMinimum) and isinstance(chain.inner, SinceShift)
    assert isinstance(chain.inner.inner, FirstOf)
    same_tags = chain.inner.inner.estimators[0]
    assert isinstance(same_tags, SameTags)
    cost = same_tags.inner
    assert isinstance(cost, CostAwareEstimator) and cost.extrapolation_quantile == 0.8
    CFG.replace(cost_extrapolation_quantile=0.0)  # off is valid
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="cost_extrapolation_quantile"):
            CFG.replace(cost_extrapolation_quantile=bad)


@pytest.mark.parametrize("seed", range(20))
def test_nearest_runs_are_those_of_a_stable_sort_ties_included(seed):
    # The cost-aware estimator picks the runs nearest a call's input size on every
    # call; the linear-time pick must be the very runs a stable sort would give.
    from raysched.policy.estimators import _nearest

    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    sizes = rng.choice(rng.integers(0, 50, max(1, n // 3)), n).astype(float)  # many ties
    values = np.arange(n, dtype=float)  # each run's own index, so the set says which runs
    query = float(rng.integers(-5, 60))
    for k in {1, max(1, n // 3), n - 1} - {0}:
        distance = np.abs(sizes - query)
        expected = np.sort(values[np.argsort(distance, kind="stable")[:k]])
        assert np.array_equal(np.sort(_nearest(values, distance, k)), expected)


def test_history_statistics_are_fitted_once_per_history_and_read_per_call():
    # A driver sizes many calls from one history: the line is fitted once, and a new
    # history (rows arrived) gets a fit of its own.
    est = PercentileEstimator("memory", percentile=95.0, min_history=3, min_correlation=0.3, coverage=0.95)
    sizes = np.array([1e6, 2e6, 3e6, 4e6, 5e6])
    first = History.from_columns({"input_size": sizes, "memory": 1e8 + 10 * sizes})
    ctx = EstimationContext(history=first, models={}, fallback=Fallback())
    small, large = (est.estimate(ctx, Features(input_size=s)) for s in (1e6, 9e6))
    assert small.upper == pytest.approx(1e8 + 1e7) and large.upper == pytest.approx(1e8 + 9e7)
    unsized = est.estimate(ctx, Features(input_size=None))
    assert unsized.upper == pytest.approx(1e8 + 5e7)  # the max of 5 runs
    second = History.from_columns({"input_size": sizes, "memory": 2e8 + 10 * sizes})
    moved = est.estimate(EstimationContext(history=second, models={}, fallback=Fallback()), Features(input_size=1e6))
    assert moved.upper == pytest.approx(2e8 + 1e7)


def test_a_call_smaller_than_every_run_is_read_off_the_line_at_the_smallest_run_not_below_it():
    # An audit: with a line whose intercept is under zero (wall = 1e-8 x size - 5 s), a call of
    # a smaller input than any run was read off the line at its own size: 0 s, and a memory
    # line down to the 64 MiB floor where the smallest run had peaked at 477 MiB.
    est = PercentileEstimator("wall", percentile=95.0, min_history=3, min_correlation=0.3, coverage=0.95)
    sizes = np.linspace(1e9, 3e9, 12)
    history = History.from_columns({"input_size": sizes, "wall": 1e-8 * sizes - 5.0})
    ctx = EstimationContext(history=history, models={}, fallback=Fallback())
    tiny, smallest = (est.estimate(ctx, Features(input_size=s)) for s in (1e8, 1e9))
    assert tiny.target == pytest.approx(5.0) and tiny.upper == pytest.approx(5.0)
    assert (tiny.target, tiny.lower, tiny.upper) == (smallest.target, smallest.lower, smallest.upper)
    # Above the smallest run the line is read as before.
    assert est.estimate(ctx, Features(input_size=2e9)).target == pytest.approx(15.0)


def test_a_failures_fixed_cost_makes_short_runs_fit_and_leaves_long_runs_as_they_were():
    from raysched.policy.estimators import CostAwareEstimator

    # 20 runs of one function: 18 peak at 100-105 MB, 2 at 200 MB.  Without a fixed cost
    # per failure the least expected waste leaves those two to fail: a retry of 2 runs in
    # 20 wastes less than 95 MB more on every run.
    peaks = np.append(np.linspace(100e6, 105e6, 18), [200e6, 200e6])

    def chosen(wall_s: float, overhead_s: float) -> Estimate:
        est = CostAwareEstimator("memory", min_history=8, min_correlation=0.3, local_fraction=1.0, min_local=8,
                                 tail_allowance=0.0, min_coverage=0.5, failure_overhead_s=overhead_s)
        history = History.from_columns({"memory": peaks, "wall": np.full(20, wall_s)})
        return est.estimate(EstimationContext(history), Features())

    off = chosen(10.0, 0.0)
    assert off.coverage < 1 and off.upper < peaks.max()
    # 1 s runs: a failure's minute outweighs any waste; every run seen must fit.
    short = chosen(1.0, 60.0)
    assert short.coverage == pytest.approx(20 / 21) and short.upper == pytest.approx(peaks.max())
    # Day-long runs: a minute more per failure changes nothing.
    assert chosen(86400.0, 60.0).upper == off.upper
    # Unknown wall times (imported rows without runtimes, killed attempts): no fixed cost.
    assert chosen(float("nan"), 60.0).upper == off.upper
    # In between, the choice only rises with the fixed cost's share of a run.
    uppers = [chosen(w, 60.0).upper for w in (3600.0, 600.0, 60.0, 10.0, 1.0)]
    assert uppers == sorted(uppers) and uppers[0] < uppers[-1]


def test_the_default_charges_a_failure_a_minute_and_the_config_refuses_a_negative_one():
    from raysched.policy.estimators import CostAwareEstimator

    cost = build_predictor(CFG).chains["memory"].inner.inner.estimators[0].inner  # in SinceShift, FirstOf, SameTags
    assert isinstance(cost, CostAwareEstimator) and cost.failure_overhead_s == CFG.cost_failure_overhead_s == 60.0
    CFG.replace(cost_failure_overhead_s=0.0)  # off is valid
    with pytest.raises(ValueError, match="cost_failure_overhead_s"):
        CFG.replace(cost_failure_overhead_s=-1.0)


def test_an_argument_whose_attribute_probe_raises_is_unsized_not_a_failed_submission():
    class AttrDict:  # __getattr__ raising KeyError, as attribute-dict and proxy objects do
        def __init__(self, fields):
            self._f = fields

        def __getattr__(self, name):
            return self.__dict__["_f"][name]

    odd = AttrDict({"a": 1})
    assert features.derive_input_size((odd, b"12345"), {}) == 5
    assert features.describe_args((odd,), {"k": odd}) == ("AttrDict", "k=AttrDict")
    with pytest.raises(KeyError):
        features.size_of(odd)  # the probe itself raises: the callers above must not


def test_the_cost_aware_coverage_is_the_share_of_new_runs_that_fit():
    """The coverage an estimate claims is what a new run of the same kind sees (it was the
    share of candidates, phantom included: 1.0 claimed where 0.89-0.94 fitted)."""
    predictor = build_predictor(CFG)
    for k in (8, 15):
        claimed, fitted = [], []
        for seed in range(300):
            rng = np.random.default_rng(seed)
            use = 1e9 * np.exp(rng.normal(0, 0.3, k + 1))
            estimate = predictor.predict(Features(), History.from_columns({"memory": use[:k], "wall": np.full(k, 600.0)}))
            claimed.append(estimate.memory.coverage)
            fitted.append(use[k] <= estimate.memory.upper)
        assert abs(np.mean(claimed) - np.mean(fitted)) < 0.05, (k, np.mean(claimed), np.mean(fitted))


def test_a_model_reads_past_its_largest_input_along_the_slope_of_the_larger_runs():
    """Trees are flat past the largest input they saw: with inputs that grow over time the
    wall and CPU bounds covered 0.4-0.6 of runs where they claimed 0.95."""
    from raysched.policy.models import SLOPE_BEYOND, ResourceModel
    from raysched.types import MiB

    rng = np.random.default_rng(0)
    sizes = np.exp(rng.uniform(np.log(50 * MiB), np.log(250 * MiB), 200))
    wall = 5.0 * sizes / (50 * MiB) * np.exp(rng.normal(0, 0.05, 200))
    history = History.from_columns({"input_size": sizes, "memory": 1e8 + sizes, "cpu": np.ones(200), "wall": wall})
    models = build_predictor(CFG).train(history)
    model = models.get("wall")
    assert model.metrics[SLOPE_BEYOND] == pytest.approx(math.log(2.0), rel=0.1)  # wall proportional to size
    for size in (100 * MiB, 1000 * MiB):
        estimate = build_predictor(CFG).predict(Features(input_size=int(size)), history, models).wall
        assert estimate.source.startswith("model")
        assert estimate.target == pytest.approx(5.0 * size / (50 * MiB), rel=0.15)
    # It travels with the model (the registry's artifact, a driver's bundle).
    again = ResourceModel.from_artifact(model.to_artifact("f"))
    X = model.row(Features(input_size=1000 * MiB))[None, :]
    assert np.allclose(again.predict_log(X), model.predict_log(X))


def test_a_models_upper_bound_beyond_the_largest_input_follows_a_baseline_plus_a_proportional_part():
    """Use of 60 MiB + the input, trained on 16-128 MiB inputs: along the log-log slope of the
    larger runs alone (0.7, where the true slope climbs toward 1) the upper bound at 2 GiB was
    half the peak, for memory and wall time alike (a helper's audit)."""
    from raysched.policy.features import Features
    from raysched.policy.models import fit_resource_model

    rng = np.random.default_rng(0)
    size = rng.uniform(16, 128, 40) * MiB
    history = History.from_columns({
        "input_size": size, "memory": (60 * MiB + size) * rng.uniform(0.97, 1.03, 40),
        "wall": (0.2 + size / (100 * MiB)) * rng.uniform(0.95, 1.05, 40), "cpu": np.ones(40)})
    truth = {"memory": lambda x: 60 * MiB + x, "wall": lambda x: 0.2 + x / (100 * MiB)}
    for resource, true in truth.items():
        model = fit_resource_model(history, resource, RayschedConfig())
        for x in (64 * MiB, 512 * MiB, 2 * GiB, 8 * GiB):
            _, _, upper = model.predict(model.row(Features(input_size=x))[None, :])
            assert 1.0 <= upper[0] / true(x) <= 1.6, (resource, x / MiB, upper[0] / true(x))
    cpu = fit_resource_model(history, "cpu", RayschedConfig())
    assert "linear_share_beyond_largest_input" not in cpu.metrics  # cores do not add up with the input


def test_a_function_with_few_runs_counts_the_residuals_of_the_workflows_other_functions():
    """The shared fallback: ten runs within 2% of each other say little of how far the next
    may stray, and the trace replay's costliest failures were such near misses (a median of
    0.95 of the peak); the other functions' residuals, pooled, stand in for the unseen tail
    while a function has few runs (cost_prior_max_local), and no longer once it has more."""
    import math

    from raysched.policy.estimators import CostAwareEstimator, residual_prior

    est = CostAwareEstimator("memory", min_history=8, min_correlation=0.3, local_fraction=0.35, min_local=8,
                             tail_allowance=0.1, min_coverage=0.75, prior_max_local=10)
    tight = History.from_columns({"memory": [1e9 * (1 + 0.002 * i) for i in range(10)]})
    wide = History.from_columns({"memory": [1e9 * math.exp(0.05 * (i - 10)) for i in range(21)]})  # +-0.5 in log

    # The prior: quantiles (i + 0.5) / 5 of all residuals pooled, here those of both functions.
    prior = residual_prior([tight, wide], est, runs=5)
    pooled = np.concatenate([est.residuals(tight), est.residuals(wide)])
    assert len(pooled) == 31 and np.allclose(prior, np.quantile(pooled, [0.1, 0.3, 0.5, 0.7, 0.9]))
    assert len(residual_prior([tight], est, runs=5)) == 5  # its own 10 residuals are enough (min_pooled)...
    assert residual_prior([tight], est, runs=5, min_pooled=11) == ()  # ...fewer are not
    assert residual_prior([tight, wide], est, runs=0) == ()
    assert residual_prior([History.from_columns({"memory": [1e9] * 5})], est, runs=5) == ()  # under min_history

    alone = est.estimate(EstimationContext(tight), Features())
    helped = est.estimate(EstimationContext(tight, residual_prior=prior), Features())
    assert alone.upper < 1.03e9 < helped.upper  # the other functions' spread widens the allocation
    # With more local residuals than prior_max_local, its own runs speak for it.
    many = History.from_columns({"memory": [1e9 * (1 + 0.002 * i) for i in range(40)]})  # 14 local residuals
    assert (est.estimate(EstimationContext(many, residual_prior=prior), Features()).upper
            == est.estimate(EstimationContext(many), Features()).upper)
    off = CostAwareEstimator("memory", min_history=8, min_correlation=0.3, local_fraction=0.35, min_local=8,
                             tail_allowance=0.1, min_coverage=0.75)  # prior_max_local=0: never
    assert off.estimate(EstimationContext(tight, residual_prior=prior), Features()).upper == alone.upper
