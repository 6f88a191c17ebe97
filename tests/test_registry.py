"""The MLflow model registry, embedded in the raysched home (SQLite + local artifacts)."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import xgboost as xgb
from mlflow import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils

from raysched.errors import InvalidInput
from raysched.store.registry import ModelRegistry, registered_name
from raysched.types import ModelArtifact

METRICS = {
    "rows_train": 80,
    "rows_holdout": 20,
    "pinball_loss": 0.125,
    "upper_coverage": 0.95,
    "mean_over_allocation": 0.3,
    "under_allocation_rate": 0.05,
}


def train(seed: int = 0, rounds: int = 5) -> tuple[xgb.Booster, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((200, 3))
    y = 100 * x[:, 0] + 10 * rng.random(200) + seed
    booster = xgb.train(
        {"objective": "reg:quantileerror", "quantile_alpha": [0.1, 0.5, 0.9], "seed": seed},
        xgb.DMatrix(x, label=y),
        rounds,
    )
    return booster, x


def artifact(function: str, booster: xgb.Booster, resource: str = "memory", **meta) -> ModelArtifact:
    meta = {"features": ["f0", "f1", "f2"], "quantiles": [0.1, 0.5, 0.9], **meta}
    return ModelArtifact(function, resource, bytes(booster.save_raw("ubj")), json.dumps(meta))


def predict(raw: bytes, x: np.ndarray) -> np.ndarray:
    booster = xgb.Booster()
    booster.load_model(bytearray(raw))
    return booster.predict(xgb.DMatrix(x))


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> ModelRegistry:
    # One registry for the module: creating the SQLite schema takes MLflow a few seconds.
    return ModelRegistry(tmp_path_factory.mktemp("home"))


@pytest.fixture
def clean_global_mlflow(monkeypatch, tmp_path):
    """Run in an empty cwd with MLflow's process-wide tracking URI unset, and put it back after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = tracking_utils._tracking_uri
    tracking_utils._tracking_uri = None
    yield tmp_path
    tracking_utils._tracking_uri = previous


def test_log_and_load_round_trip(registry):
    booster, x = train(seed=1)
    logged = registry.log_training(artifact("mod.roundtrip", booster, code_hash="abc123"), {"rounds": 5}, METRICS)
    assert logged.version == 1
    loaded = registry.load("mod.roundtrip", "memory")
    assert loaded is not None
    assert (loaded.function, loaded.resource, loaded.version) == ("mod.roundtrip", "memory", 1)
    assert json.loads(loaded.meta_json) == json.loads(logged.meta_json)
    assert loaded.booster[:1] == b"{"  # UBJSON, not a pickle
    expected = booster.predict(xgb.DMatrix(x))
    assert expected.shape == (200, 3)
    np.testing.assert_array_equal(predict(loaded.booster, x), expected)


def test_versions_newest_and_by_number(registry):
    first, x = train(seed=2)
    second, _ = train(seed=3, rounds=8)
    v1 = registry.log_training(artifact("mod.versions", first), {"rounds": 5}, {**METRICS, "pinball_loss": 0.5})
    v2 = registry.log_training(artifact("mod.versions", second), {"rounds": 8}, {**METRICS, "pinball_loss": 0.25})
    assert (v1.version, v2.version) == (1, 2)
    versions = registry.versions("mod.versions", "memory")
    assert [v["version"] for v in versions] == [1, 2]
    assert [v["metrics"]["pinball_loss"] for v in versions] == [0.5, 0.25]
    assert versions[0]["run_id"] != versions[1]["run_id"]
    assert versions[0]["created"] <= versions[1]["created"] and versions[1]["created"].tzinfo is not None
    newest = registry.load("mod.versions", "memory")
    assert newest.version == 2
    np.testing.assert_array_equal(predict(newest.booster, x), second.predict(xgb.DMatrix(x)))
    oldest = registry.load("mod.versions", "memory", version=1)
    assert oldest.version == 1
    np.testing.assert_array_equal(predict(oldest.booster, x), first.predict(xgb.DMatrix(x)))
    assert registry.load("mod.versions", "memory", version=7) is None
    assert registry.load("mod.versions", "cpu") is None  # each resource is its own registered model


def test_nothing_registered(registry):
    assert registry.load("mod.never", "memory") is None
    assert registry.versions("mod.never", "memory") == []


def test_run_is_visible_to_a_fresh_client_at_the_documented_uri(registry):
    booster, _ = train(seed=4)
    registry.log_training(artifact("mod.visible", booster, resource="wall", code_hash="h42"), {"rounds": 5, "max_depth": 4}, METRICS)
    uri = f"sqlite:///{registry.home}/mlflow.db"  # what `mlflow ui --backend-store-uri` gets
    assert registry.tracking_uri == uri
    assert Path(registry.home, "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("raysched")
    assert experiment.artifact_location == (registry.home / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.function = 'mod.visible'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "mod.visible/wall" and run.info.status == "FINISHED"
    assert run.data.metrics == pytest.approx({k: float(v) for k, v in METRICS.items()})
    assert run.data.params == {"rounds": "5", "max_depth": "4"}
    assert {"function": "mod.visible", "resource": "wall", "code_hash": "h42"}.items() <= run.data.tags.items()
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["meta.json"]
    (version,) = client.search_model_versions(f"name = '{registered_name('mod.visible', 'wall')}'")
    assert version.run_id == run.info.run_id
    model_dir = Path(mlflow.artifacts.download_artifacts(client.get_model_version_download_uri(version.name, version.version)))
    files = {p.name for p in model_dir.iterdir()}
    assert "model.ubj" in files and not any(f.endswith((".pkl", ".pickle")) for f in files)
    assert "model_format: ubj" in (model_dir / "MLmodel").read_text()
    assert str(model_dir).startswith(str(registry.home))  # the artifacts live in the home


def test_registered_name_is_deterministic_safe_and_distinct():
    assert registered_name("mod.f", "memory") == "raysched-mod.f-memory"
    assert registered_name("mod.f", "memory") == registered_name("mod.f", "memory")
    odd = registered_name("pkg.mod:Cls.<locals>/f", "cpu")
    assert "/" not in odd and ":" not in odd and "<" not in odd
    assert odd == registered_name("pkg.mod:Cls.<locals>/f", "cpu")
    assert registered_name("a:b", "memory") != registered_name("a_b", "memory")
    assert len(registered_name("x" * 500, "memory")) < 220


def test_odd_function_names_register_and_load(registry):
    booster, x = train(seed=5)
    function = "pkg.mod:Cls.<locals>/f"
    registry.log_training(artifact(function, booster), {}, METRICS)
    loaded = registry.load(function, "memory")
    assert loaded.function == function and loaded.version == 1
    np.testing.assert_array_equal(predict(loaded.booster, x), booster.predict(xgb.DMatrix(x)))


def test_bad_artifacts_and_metrics_are_rejected_before_anything_is_logged(registry):
    booster, _ = train(seed=6)
    good = artifact("mod.bad", booster)
    with pytest.raises(InvalidInput, match="XGBoost"):
        registry.log_training(ModelArtifact("mod.bad", "memory", b"not a model", good.meta_json), {}, METRICS)
    with pytest.raises(InvalidInput, match="JSON"):
        registry.log_training(ModelArtifact("mod.bad", "memory", good.booster, "{not json"), {}, METRICS)
    with pytest.raises(InvalidInput, match="pinball_loss"):
        registry.log_training(good, {}, {"pinball_loss": "low"})
    assert registry.versions("mod.bad", "memory") == []
    runs = registry.client.search_runs([registry.experiment_id], filter_string="tags.function = 'mod.bad'")
    assert runs == []


def test_global_mlflow_state_is_left_alone(registry, clean_global_mlflow):
    cwd = clean_global_mlflow
    booster, _ = train(seed=7)
    registry.log_training(artifact("mod.global", booster), {}, METRICS)
    assert registry.load("mod.global", "memory").version == 1
    assert tracking_utils._tracking_uri is None  # still unset, not a resolved default
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert list(cwd.iterdir()) == []  # no ./mlruns, no ./mlflow.db

    elsewhere = f"sqlite:///{cwd}/elsewhere.db"
    mlflow.set_tracking_uri(elsewhere)
    try:
        registry.log_training(artifact("mod.global", booster), {}, METRICS)
        assert mlflow.get_tracking_uri() == elsewhere
        assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert registry.versions("mod.global", "memory")[-1]["version"] == 2
    assert list(cwd.iterdir()) == []


def test_a_new_home_and_its_first_training_are_quiet_and_fast(tmp_path, capfd, caplog):
    capfd.readouterr()
    booster, _ = train(seed=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = ModelRegistry(tmp_path / "home")  # creates the SQLite schema: MLflow logs INFO lines
        cpu, wall = time.process_time(), time.perf_counter()
        registry.log_training(artifact("mod.quiet", booster), {"rounds": 5}, METRICS)
        elapsed, elapsed_wall = time.process_time() - cpu, time.perf_counter() - wall
        registry.load("mod.quiet", "memory")
        registry.versions("mod.quiet", "memory")
    out, err = capfd.readouterr()
    # CPU time, so a busy machine does not fail it; about 0.2-1 s wall on an idle one.
    assert elapsed < 5.0, f"log_training took {elapsed:.2f} CPU-s ({elapsed_wall:.2f} s)"
    assert out == "" and err == "", (out, err)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith(("mlflow", "alembic"))] == []


def test_a_database_that_is_not_one_is_a_clear_early_store_error(tmp_path):
    from raysched.errors import StoreError

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "mlflow.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open MLflow's database .* move the file away"):
        ModelRegistry(garbage)
    assert (garbage / "mlflow.db").read_bytes() == b"this is not sqlite" * 100  # left as it was
    folder = tmp_path / "folder"
    (folder / "mlflow.db").mkdir(parents=True)
    started = time.monotonic()
    with pytest.raises(StoreError, match="is not a file"):
        ModelRegistry(folder)
    assert time.monotonic() - started < 5  # MLflow alone retried for about 100 s


def test_a_home_whose_first_open_ended_midway_has_no_half_made_database(tmp_path, monkeypatch):
    """MLflow makes a new database by migrations over ~1 s, not in one transaction: a
    process ended within it (a short script's ray.shutdown() ends the profiler making
    it) left a file no later open could use, and no training was logged again."""
    from mlflow import MlflowClient

    home = tmp_path / "home"

    def dies(self, *args, **kwargs):
        raise KeyboardInterrupt  # the process ends here, half-way through making the database

    with monkeypatch.context() as patched:
        patched.setattr(MlflowClient, "create_experiment", dies)
        with pytest.raises(KeyboardInterrupt):
            ModelRegistry(home)
    assert not (home / "mlflow.db").exists()  # whole or absent, never half made
    assert [p.name for p in home.iterdir() if p.name.startswith(".mlflow.db")] == []
    registry = ModelRegistry(home)  # the next open makes it afresh
    assert registry.versions("f", "memory") == [] and (home / "mlflow.db").is_file()


def test_prune_keeps_the_newest_and_the_served_versions_and_removes_the_rest_with_their_files(tmp_path):
    registry = ModelRegistry(tmp_path)
    booster, _ = train()
    for _ in range(6):
        registry.log_training(artifact("pruned", booster), {"a": 1}, {"pinball_loss": 0.1})
    registry.log_training(artifact("other", booster), {"a": 1}, {"pinball_loss": 0.1})

    def files():
        return sum(1 for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file())

    before = files()
    assert registry.prune("pruned", "memory", keep_newest=2, keep=[2]) == 3
    assert [v["version"] for v in registry.versions("pruned", "memory")] == [2, 5, 6]
    assert files() < before * 4 / 7 + 1  # three trainings' files of seven gone
    assert registry.load("pruned", "memory", 2).version == 2 and registry.load("pruned", "memory").version == 6
    assert [v["version"] for v in registry.versions("other", "memory")] == [1]  # another model untouched
    assert registry.prune("pruned", "memory", keep_newest=2, keep=[2]) == 0


def test_a_moved_home_loads_its_models_and_keeps_new_ones_under_itself(tmp_path):
    """An audit: MLflow records artifact locations as absolute paths, so a home moved or copied
    elsewhere (then named by RAYSCHED_HOME) could load none of its models (a restarted profiler
    served none), and every new training wrote its model under the old place, made anew."""
    import shutil

    first, moved = tmp_path / "first", tmp_path / "moved"
    registry = ModelRegistry(first)
    booster, x = train()
    for _ in range(3):
        registry.log_training(artifact("f", booster, code_hash="c1"), {"a": 1}, {"pinball_loss": 0.1})
    del registry
    shutil.move(str(first), str(moved))

    registry = ModelRegistry(moved)
    loaded = registry.load("f", "memory", 2)
    assert loaded.version == 2 and np.allclose(predict(loaded.booster, x), predict(bytes(booster.save_raw("ubj")), x))
    assert json.loads(loaded.meta_json)["code_hash"] == "c1"
    assert registry.log_training(artifact("f", booster), {"a": 1}, {"pinball_loss": 0.1}).version == 4
    assert not first.exists(), "a training wrote outside the home"
    assert registry.load("f", "memory").version == 4
    assert registry.prune("f", "memory", keep_newest=1) == 3  # the moved versions' files go too
    assert [v["version"] for v in registry.versions("f", "memory")] == [4]
    assert ModelRegistry(moved).load("f", "memory").version == 4  # opened again: no second move
    assert sum(1 for p in (moved / "mlartifacts").rglob("model.ubj")) == 1


def test_a_copied_home_reads_and_prunes_its_own_copy_never_the_original(tmp_path):
    import shutil

    original, copy = tmp_path / "original", tmp_path / "copy"
    registry = ModelRegistry(original)
    booster, _ = train()
    for _ in range(2):
        registry.log_training(artifact("f", booster), {"a": 1}, {"pinball_loss": 0.1})
    shutil.copytree(original, copy)
    copied = ModelRegistry(copy)
    assert copied.prune("f", "memory", keep_newest=1) == 1
    assert sum(1 for _ in (copy / "mlartifacts").rglob("model.ubj")) == 1
    assert sum(1 for _ in (original / "mlartifacts").rglob("model.ubj")) == 2  # untouched
    assert registry.load("f", "memory", 1).version == 1
    assert copied.load("f", "memory").version == 2
