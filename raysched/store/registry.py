"""The model registry: trained XGBoost models in MLflow, embedded by default.

Everything lives under the raysched home::

    <home>/mlflow.db       tracking and registry store (SQLite)
    <home>/mlartifacts/    artifacts: the models (XGBoost UBJSON) and their meta.json

so ``mlflow ui --backend-store-uri sqlite:///<home>/mlflow.db`` shows every
training run, its metrics and the registered versions.

One training of one resource of one function is one MLflow run named
``<function>/<resource>``, whose model is registered as a new version of the
registered model ``registered_name(function, resource)``.  Models are stored in
XGBoost's own format (UBJSON), never pickled.

The process-wide MLflow tracking URI is never changed for good: this module
talks to MLflow through its own ``MlflowClient``; only ``mlflow.xgboost.log_model``
(which reads the global URI) runs with it set, under a lock, and restored after.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import mlflow
import mlflow.xgboost
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from ..errors import InvalidInput, StoreError
from ..types import ModelArtifact

logger = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MODEL_NAME = "model"  # the logged model's name inside its run
META_FILE = "meta.json"
BOOSTER_FILE = "model.ubj"  # what mlflow.xgboost writes for model_format="ubj"

#: Serialises the moments the process-wide MLflow tracking URI is borrowed.
_GLOBAL_URI_LOCK = threading.RLock()
_NOISY_LOGGERS = ("mlflow", "alembic")
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]")


def registered_name(function: str, resource: str) -> str:
    """The registered model name of one resource of one function: deterministic and MLflow-safe.

    ``raysched-<function>-<resource>`` with every character outside ``[A-Za-z0-9._-]``
    replaced by ``_``; when anything had to be replaced (or the name is long) a
    short hash of the original is appended, so distinct functions never collide.
    """
    if not function or not resource:
        raise InvalidInput("registered_name needs a function and a resource")
    raw = f"{function}-{resource}"
    safe = _NAME_OK.sub("_", raw)
    if safe != raw or len(safe) > 180:
        digest = hashlib.sha1(raw.encode()).hexdigest()[:10]
        safe = f"{safe[:180]}-{digest}"
    return f"raysched-{safe}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """While we call MLflow: hold its and alembic's INFO chatter (table creation, migrations) and
    the deprecation warnings its internals raise (e.g. SQLAlchemy's), none of which a raysched
    user can act on."""
    saved = []
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(mlflow|sqlalchemy|alembic)\b")
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(mlflow|sqlalchemy|alembic)\b")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


@contextlib.contextmanager
def _borrowed_tracking_uri(uri: str) -> Iterator[None]:
    """Set the process-wide tracking URI for the duration of a fluent MLflow call, then restore it.

    Restores the exact previous state, "unset" included (``mlflow.get_tracking_uri()``
    would report a resolved default instead), and the MLFLOW_TRACKING_URI variable
    that ``set_tracking_uri`` also writes.
    """
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _GLOBAL_URI_LOCK:
        previous = getattr(tracking_utils, "_tracking_uri", None)
        previous_env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None: back to unset
            if previous_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous_env


def _dispose_engines(uri: str) -> None:
    """Close and forget MLflow's cached SQLAlchemy engines of ``uri`` (a file about to be
    renamed; each store class keeps its engines in a class-level ``_engine_map``)."""
    import importlib

    for module in ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store"):
        with contextlib.suppress(Exception):  # MLflow's private cache: closing it is a courtesy
            engines = importlib.import_module(module).SqlAlchemyStore._engine_map
            engine = engines.pop(uri, None)
            if engine is not None:
                engine.dispose()


def _code_hash(meta_json: str) -> str | None:
    try:
        meta = json.loads(meta_json)
    except (TypeError, ValueError):
        return None
    value = meta.get("code_hash") if isinstance(meta, dict) else None
    return str(value) if value else None


class ModelRegistry:
    """Training runs and registered models of one raysched home, in MLflow."""

    def __init__(self, home: str | Path, experiment: str = "raysched") -> None:
        self.home = Path(home).expanduser().resolve()
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            (self.home / ARTIFACTS_DIR).mkdir(exist_ok=True)
        except OSError as e:
            raise StoreError(f"raysched registry: cannot create {self.home} ({e})") from e
        db = self.home / DB_FILE
        self._uri = f"sqlite:///{db}"
        self.experiment_name = experiment
        if db.exists() and not db.is_file():  # MLflow would retry for minutes before saying so
            raise StoreError(f"raysched registry: {db} is not a file; move it away so that MLflow can create its database")
        with _quiet():
            try:
                if not db.exists():
                    self._create_database(db, experiment)
                self.client = MlflowClient(tracking_uri=self._uri, registry_uri=self._uri)
                self.experiment_id = self._experiment_id(experiment)
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001 - SQLAlchemy's errors on a file that is no SQLite database
                raise StoreError(f"raysched registry: cannot open MLflow's database {db} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else e!r}); the profile rows are not in it "
                                 "and are kept: move the file away to start the model registry afresh") from e

    def __repr__(self) -> str:
        return f"ModelRegistry({self._uri!r}, experiment={self.experiment_name!r})"

    def _create_database(self, db: Path, experiment: str) -> None:
        """Create MLflow's database beside ``db`` and move it into place whole.

        MLflow builds a new database by running its migrations, ~1 s of statements that
        are not one transaction.  Made in place, a process ended within that second (a
        short script's ``ray.shutdown()`` ends the profiler that was making it) left a
        half-migrated file that no later open could use ("table ... already exists"),
        and every training after it went unlogged.  Made under a temporary name and
        linked into place only when complete, the database is whole or absent; a
        process that loses the race to another keeps the other's.
        """
        for stale in db.parent.glob(f".{db.name}.init-*"):  # left by a process that ended mid-way
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > 600:
                    stale.unlink()
        tmp = db.with_name(f".{db.name}.init-{os.getpid()}-{threading.get_ident()}-{time.time_ns()}")
        tmp_uri = f"sqlite:///{tmp}"
        try:
            client = MlflowClient(tracking_uri=tmp_uri, registry_uri=tmp_uri)
            client.create_experiment(experiment, artifact_location=self.artifact_location)
            client.search_registered_models(max_results=1)  # the registry's tables too
            _dispose_engines(tmp_uri)
            try:
                os.link(tmp, db)
            except FileExistsError:
                pass  # another process made it first: theirs is whole too
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
                with contextlib.suppress(OSError):
                    leftover.unlink()

    @property
    def tracking_uri(self) -> str:
        """``sqlite:///<home>/mlflow.db``: pass it to ``mlflow ui --backend-store-uri``."""
        return self._uri

    @property
    def artifact_location(self) -> str:
        return (self.home / ARTIFACTS_DIR).as_uri()

    def _experiment_id(self, name: str) -> str:
        try:
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None and not self._is_here(experiment.artifact_location):
                # The home was moved or copied: its experiment still puts artifacts where the
                # home was made (absolute), so every new model went outside this home, into a
                # folder made anew there. That experiment keeps its runs under another name;
                # their artifacts are read from this home (``_local``), and new ones go here.
                with contextlib.suppress(MlflowException):  # another process renamed it first
                    self.client.rename_experiment(experiment.experiment_id,
                                                  f"{name}-moved-{experiment.experiment_id}")
                experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                return experiment.experiment_id
            try:
                return self.client.create_experiment(name, artifact_location=self.artifact_location)
            except MlflowException:  # another process created it first
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
                return experiment.experiment_id
        except MlflowException as e:
            raise StoreError(f"raysched registry: cannot open experiment {name!r} at {self._uri} ({e})") from e

    def _is_here(self, uri: str | None) -> bool:
        """Whether an artifact location is this home's artifact folder."""
        parsed = urllib.parse.urlparse(uri or "")
        if parsed.scheme not in ("", "file"):
            return True  # a remote store the user set up: not ours to move
        try:
            return Path(urllib.request.url2pathname(parsed.path)).resolve() == (self.home / ARTIFACTS_DIR).resolve()
        except (OSError, ValueError):
            return False

    def _local(self, uri: str) -> Path | None:
        """The local folder of an artifact URI (None: not a local one). A URI recorded before
        the home was moved or copied names a folder under the old place: the same folder
        under this home's ``mlartifacts/`` is taken when there is one (a copied home reads
        and prunes its own copy, never the original's)."""
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme not in ("", "file"):
            return None
        path = Path(urllib.request.url2pathname(parsed.path))
        if ARTIFACTS_DIR not in path.parts:
            return path
        parts = path.parts
        below = parts[len(parts) - parts[::-1].index(ARTIFACTS_DIR):]  # after the last "mlartifacts"
        moved = self.home.joinpath(ARTIFACTS_DIR, *below)
        return moved if moved.exists() else path

    def _read(self, base_uri: str, relative: str) -> bytes:
        local = self._local(base_uri)
        if local is not None:
            return (local / relative).read_bytes()
        return _read_artifact(base_uri, relative)

    # ------------------------------------------------------------------ writing

    def log_training(
        self, artifact: ModelArtifact, params: Mapping[str, Any], metrics: Mapping[str, float]
    ) -> ModelArtifact:
        """Log one training as an MLflow run and register its model as a new version.

        The run is named ``<function>/<resource>`` and tagged with the function,
        resource and (when ``meta_json`` has one) code_hash; it holds ``params``,
        ``metrics``, the booster (``mlflow.xgboost`` flavour, UBJSON) and
        ``meta.json``.  Returns ``artifact`` with ``version`` set.
        """
        import xgboost as xgb

        if not isinstance(artifact.booster, (bytes, bytearray)) or not artifact.booster:
            raise InvalidInput("ModelArtifact.booster must be the bytes of Booster.save_raw('ubj')")
        try:
            json.loads(artifact.meta_json)
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"ModelArtifact.meta_json must be JSON ({e})") from None
        booster = xgb.Booster()
        try:
            booster.load_model(bytearray(artifact.booster))
        except xgb.core.XGBoostError as e:
            raise InvalidInput(f"ModelArtifact.booster is not an XGBoost model ({e})") from None

        metric_list = [Metric(k, _metric(k, v), _now_ms(), 0) for k, v in metrics.items()]
        param_list = [Param(k, _param(v)) for k, v in params.items()]
        name = registered_name(artifact.function, artifact.resource)
        tags = {"function": artifact.function, "resource": artifact.resource, "raysched.registered_name": name}
        code_hash = _code_hash(artifact.meta_json)
        if code_hash:
            tags["code_hash"] = code_hash
        with _quiet():
            try:
                run = self.client.create_run(
                    self.experiment_id, run_name=f"{artifact.function}/{artifact.resource}", tags=tags
                )
            except MlflowException as e:
                raise StoreError(f"raysched registry: cannot start a run in {self._uri} ({e})") from e
            run_id = run.info.run_id
            try:
                self.client.log_batch(run_id, metrics=metric_list, params=param_list)
                self.client.log_text(run_id, artifact.meta_json, META_FILE)
                # Created here, in our experiment: left to log_model, the logged model would land in
                # the process's active experiment (by default "Default", artifacts under ./mlruns).
                logged = self.client.create_logged_model(
                    self.experiment_id,
                    name=MODEL_NAME,
                    source_run_id=run_id,
                    tags=tags,
                    params={p.key: p.value for p in param_list},
                )
                # log_model reads the global tracking URI, and so does the SQL registry store when it
                # resolves a "models:/<model_id>" source: both run with ours borrowed.
                with _borrowed_tracking_uri(self._uri):
                    info = mlflow.xgboost.log_model(
                        booster,
                        name=MODEL_NAME,
                        model_format="ubj",
                        pip_requirements=[],  # skip requirement inference: slow, and not needed to load
                        run_id=run_id,  # passed through to Model.log: no active run needed
                        model_id=logged.model_id,
                    )
                    version = self._register(name, info, run_id, tags)
            except BaseException as e:
                with contextlib.suppress(Exception):
                    self.client.set_terminated(run_id, "FAILED")
                if isinstance(e, MlflowException):
                    raise StoreError(f"raysched registry: logging {name} failed ({e})") from e
                raise
            self.client.set_terminated(run_id, "FINISHED")
        return ModelArtifact(
            function=artifact.function,
            resource=artifact.resource,
            booster=bytes(artifact.booster),
            meta_json=artifact.meta_json,
            version=version,
        )

    def _register(self, name: str, info: Any, run_id: str, tags: Mapping[str, str]) -> int:
        try:
            self.client.create_registered_model(name, tags={"function": tags["function"], "resource": tags["resource"]})
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        model_version = self.client.create_model_version(
            name,
            source=info.model_uri,
            run_id=run_id,
            tags=dict(tags),
            model_id=getattr(info, "model_id", None),
        )
        return int(model_version.version)

    def prune(self, function: str, resource: str, keep_newest: int, keep: Iterable[int] = ()) -> int:
        """Delete the registered versions of a function's resource model but the newest
        ``keep_newest`` and those in ``keep`` (the versions being served), with their runs
        and their artifacts; returns how many went.

        A function of steady work retrains every few minutes, and each training left
        ~1.7 MB of artifacts and a run per resource for ever (1.2 GB a day for one
        function at 2 calls/s); a restart also read every version to find the served
        one.  A deleted run is marked deleted in the database (MLflow's own ``mlflow
        gc`` removes such rows); its artifact folders under this home are removed here.
        """
        versions = self._model_versions(function, resource)
        kept = {int(v) for v in keep}
        doomed = [mv for mv in versions[:max(0, len(versions) - keep_newest)] if int(mv.version) not in kept]
        removed = 0
        with _quiet():
            for mv in doomed:
                try:
                    model_id = getattr(mv, "model_id", None)
                    if not model_id and str(getattr(mv, "source", "")).startswith("models:/"):
                        model_id = str(mv.source)[len("models:/"):].split("/")[0]  # (searches leave model_id out)
                    folders = []
                    if mv.run_id:
                        folders.append(self.client.get_run(mv.run_id).info.artifact_uri)
                    if model_id:
                        folders.append(self.client.get_logged_model(model_id).artifact_location)
                    self.client.delete_model_version(mv.name, mv.version)
                    if model_id:
                        self.client.delete_logged_model(model_id)
                    if mv.run_id:
                        self.client.delete_run(mv.run_id)
                except MlflowException as e:
                    logger.warning("raysched: could not delete %s version %s (%s)", mv.name, mv.version, e)
                    continue
                for uri in folders:
                    self._remove_artifact_folder(uri)
                removed += 1
        return removed

    def _remove_artifact_folder(self, uri: str) -> None:
        """The folder of one run's or logged model's artifacts (``.../<id>/artifacts``), if it
        lies under this home's artifact folder; anything elsewhere is left alone."""
        import shutil

        folder = self._local(uri)
        if folder is None:
            return
        if folder.name == "artifacts":
            folder = folder.parent
        root = (self.home / ARTIFACTS_DIR).resolve()
        try:
            folder.resolve().relative_to(root)
        except ValueError:
            return
        if folder.resolve() != root:
            shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ reading

    def _model_versions(self, function: str, resource: str) -> list[Any]:
        name = registered_name(function, resource)
        with _quiet():
            try:
                found = self.client.search_model_versions(f"name = '{name}'")
            except MlflowException as e:
                if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return []
                raise StoreError(f"raysched registry: cannot list versions of {name} ({e})") from e
        return sorted(found, key=lambda mv: int(mv.version))

    def load(self, function: str, resource: str, version: int | None = None) -> ModelArtifact | None:
        """The registered model (newest, or ``version``), or None when there is none."""
        versions = self._model_versions(function, resource)
        if version is not None:
            versions = [mv for mv in versions if int(mv.version) == int(version)]
        if not versions:
            return None
        mv = versions[-1]
        with _quiet():
            try:
                model_uri = self.client.get_model_version_download_uri(mv.name, mv.version)
                booster = self._read(model_uri, BOOSTER_FILE)
                run_artifacts = self.client.get_run(mv.run_id).info.artifact_uri
                meta_json = self._read(run_artifacts, META_FILE).decode()
            except (MlflowException, OSError) as e:
                raise StoreError(
                    f"raysched registry: cannot load {mv.name} version {mv.version} from {self._uri} ({e})"
                ) from e
        return ModelArtifact(
            function=function, resource=resource, booster=booster, meta_json=meta_json, version=int(mv.version)
        )

    def versions(self, function: str, resource: str) -> list[dict]:
        """Registered versions, oldest first: ``version``, ``run_id``, ``metrics`` (dict), ``created`` (UTC datetime)."""
        out = []
        for mv in self._model_versions(function, resource):
            metrics: dict[str, float] = {}
            if mv.run_id:
                with _quiet(), contextlib.suppress(MlflowException):
                    metrics = dict(self.client.get_run(mv.run_id).data.metrics)
            out.append(
                {
                    "version": int(mv.version),
                    "run_id": mv.run_id,
                    "metrics": metrics,
                    "created": _dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=_dt.timezone.utc),
                }
            )
        return out


def _read_artifact(base_uri: str, relative: str) -> bytes:
    """One artifact file's bytes: read in place when the store is local (the embedded default),
    downloaded (without MLflow's progress bar) otherwise."""
    parsed = urllib.parse.urlparse(base_uri)
    if parsed.scheme in ("", "file"):
        return Path(urllib.request.url2pathname(parsed.path), relative).read_bytes()
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with tempfile.TemporaryDirectory(prefix="raysched-artifact-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{base_uri.rstrip('/')}/{relative}", dst_path=tmp)
            return Path(local).read_bytes()
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous


def _now_ms() -> int:
    return int(time.time() * 1000)


def _metric(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"metric {key!r} must be a number, got {value!r}") from None
    return number if not math.isinf(number) else math.copysign(1.7976931348623157e308, number)


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]


__all__ = ["ModelRegistry", "registered_name", "DB_FILE", "ARTIFACTS_DIR"]
