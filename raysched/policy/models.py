"""XGBoost quantile models, one per resource, with a conformal offset on the upper quantile.

Pure policy: imports xgboost and numpy, never ray, mlflow or pyarrow, so the
profiler actor and the trace replay train exactly the same model.  Targets are
learnt in log space: resource use spans orders of magnitude, and its errors are
multiplicative.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from ..config import RayschedConfig
from ..types import History, ModelArtifact
from .calibrate import cross_conformal, log_values, pinball_loss, score_allocation
from .features import feature_matrix, feature_names, feature_row, tag_vocabulary

# Minimum spread kept between quantiles, in log space, so that a model trained on
# identical runs still reports an interval rather than a point.
_MIN_LOG_SPREAD = 0.01


def _xgb():
    import xgboost  # imported lazily: a driver that never sees a model never pays for it

    return xgboost


class IncompatibleModel(ValueError):
    """A stored model trained on other features than this raysched computes."""


@dataclass(frozen=True, eq=False)
class ResourceModel:
    """A trained quantile model for one resource of one function."""

    resource: str
    quantiles: tuple[float, ...]
    booster_raw: bytes  # XGBoost's own UBJSON format
    offset: float  # conformal offset added to log(upper quantile)
    coverage_target: float
    n_train: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    version: int | None = None
    #: The tags with a feature of their own (``features.tag_vocabulary`` of its training runs).
    tags: tuple[str, ...] = ()
    _booster: list = field(default_factory=list, repr=False)  # lazily loaded Booster
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __reduce__(self):
        # The loaded Booster and its lock stay behind; the raw bytes travel.
        return (ResourceModel, (self.resource, self.quantiles, self.booster_raw, self.offset,
                                self.coverage_target, self.n_train, dict(self.metrics), self.version, self.tags))

    def row(self, features: Any) -> np.ndarray:
        """A call's features as this model's input row."""
        return feature_row(features, self.tags)

    def matrix(self, runs: "Runs") -> np.ndarray:
        """Runs as this model's input rows."""
        return feature_matrix(runs.input_size, runs.tags, self.tags)

    @property
    def source(self) -> str:
        return f"model-v{self.version}" if self.version is not None else "model"

    def booster(self):
        with self._lock:
            if not self._booster:
                booster = _xgb().Booster()
                booster.load_model(bytearray(self.booster_raw))
                booster.set_param({"nthread": 1})
                self._booster.append(booster)
            return self._booster[0]

    def predict_log(self, X: np.ndarray) -> np.ndarray:
        """Log-space quantile predictions, shape (n, len(quantiles)), non-crossing.

        Trees are flat beyond the largest input they were trained on: there, every
        quantile follows the log-log slope of the training runs with the larger inputs
        (``SLOPE_BEYOND``, per unit of log2 input size), as the cost-aware memory center
        does.  With inputs that grow over time (the newest, largest runs are the held-out
        ones) the bounds otherwise covered 0.4-0.6 of runs where they claimed 0.95.
        """
        out = np.asarray(self.booster().inplace_predict(X), dtype=float)
        if out.ndim == 1:
            out = out[:, None]
        largest, slope = self.metrics.get(LARGEST_LOG2_SIZE), self.metrics.get(SLOPE_BEYOND)
        share = self.metrics.get(LINEAR_SHARE_BEYOND) or 0.0
        if largest is not None and (slope or share) and math.isfinite(largest) and X.shape[0]:
            with np.errstate(invalid="ignore"):
                past = np.nan_to_num(np.maximum(X[:, 0].astype(float) - largest, 0.0))
            along = (slope or 0.0) * past
            out = out + along[:, None]
            # The upper quantile rises at least along the straight line through the top runs
            # (use = a + b x size): a baseline plus a proportional part, whose log-log slope
            # climbs with the input (see _beyond_range).
            line = np.log1p(share * np.expm1(past * math.log(2.0)))
            out[:, -1] += np.maximum(line - along, 0.0)
        return np.sort(out, axis=1)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lower, target, calibrated upper) in natural units."""
        q = self.predict_log(X)
        mid = q.shape[1] // 2
        lower, target = q[:, 0], q[:, mid]
        upper = np.maximum(q[:, -1] + self.offset, target + _MIN_LOG_SPREAD)
        return np.exp(np.minimum(lower, target)), np.exp(target), np.exp(upper)

    def with_version(self, version: int) -> "ResourceModel":
        # A fresh lazy-booster slot and lock: the copy must not share the original's.
        return replace(self, metrics=dict(self.metrics), version=version, _booster=[], _lock=threading.Lock())

    # --- portable form, for the registry and for shipping to drivers --------------------
    def to_artifact(self, function: str, extra: Mapping[str, Any] | None = None) -> ModelArtifact:
        meta = {
            "resource": self.resource,
            "quantiles": list(self.quantiles),
            "offset": self.offset,
            "coverage_target": self.coverage_target,
            "n_train": self.n_train,
            "feature_names": feature_names(self.tags),
            "tag_vocabulary": list(self.tags),
            "metrics": dict(self.metrics),
            **(extra or {}),
        }
        return ModelArtifact(function=function, resource=self.resource, booster=self.booster_raw,
                             meta_json=json.dumps(meta), version=self.version)

    @staticmethod
    def from_artifact(artifact: ModelArtifact) -> "ResourceModel":
        meta = json.loads(artifact.meta_json)
        vocabulary = meta.get("tag_vocabulary")
        if not isinstance(vocabulary, list) or list(meta.get("feature_names", [])) != feature_names(vocabulary):
            raise IncompatibleModel(
                f"model for {artifact.function}/{artifact.resource} was trained on features "
                f"{meta.get('feature_names')} (tags {vocabulary}), which this raysched does not compute"
            )
        return ResourceModel(
            resource=artifact.resource,
            quantiles=tuple(meta["quantiles"]),
            booster_raw=bytes(artifact.booster),
            offset=float(meta["offset"]),
            coverage_target=float(meta["coverage_target"]),
            n_train=int(meta["n_train"]),
            metrics=dict(meta.get("metrics", {})),
            version=artifact.version,
            tags=tuple(vocabulary),
        )


def usable_rows(history: History, resource: str) -> np.ndarray:
    """Indices of runs whose value for ``resource`` is known and positive."""
    values = history.column(resource)
    return np.flatnonzero(np.isfinite(values) & (values > 0))


@dataclass(frozen=True)
class Runs:
    """Some runs of a history, as a model reads them: input sizes and tags (one per run)."""

    input_size: np.ndarray
    tags: tuple[tuple[str, ...], ...]

    @staticmethod
    def of(history: History, rows: np.ndarray) -> "Runs":
        return Runs(history.input_size[rows], tuple(history.tags[i] for i in rows) if history.tags else ())


def _train_booster(X: np.ndarray, y: np.ndarray, config: RayschedConfig, seed: int, names: list[str]):
    xgb = _xgb()
    dtrain = xgb.DMatrix(X, label=y, feature_names=names)
    params = {
        "objective": "reg:quantileerror",
        "quantile_alpha": np.array(config.quantiles),
        "tree_method": "hist",
        "max_depth": config.xgb_max_depth,
        "learning_rate": config.xgb_learning_rate,
        "min_child_weight": 2.0,
        "nthread": 1,
        "seed": seed,
        "verbosity": 0,
    }
    return xgb.train(params, dtrain, num_boost_round=config.xgb_rounds)


def evaluate(model: ResourceModel, runs: Runs, true: np.ndarray) -> dict[str, float]:
    """Holdout metrics of a model on runs and their true values: what decides which model is served."""
    X = model.matrix(runs)
    q = model.predict_log(X)
    log_true = log_values(true)
    loss = float(np.mean([pinball_loss(log_true, q[:, i], a) for i, a in enumerate(model.quantiles)]))
    _, _, upper = model.predict(X)
    return {"pinball_loss": loss, **score_allocation(true, upper).as_metrics()}


def _since_shift(history: History, resource: str, config: RayschedConfig) -> History:
    """The runs a model learns from: those since the newest shift of the resource's use
    (``policy.shift``), so that a model trained after a shift does not mix the two levels."""
    if not config.shift_detection:
        return history
    from .recipe import shift_test
    from .shift import runs_since_shift

    return runs_since_shift(history, resource, shift_test(config))


#: Metrics a model keeps for reading beyond its training range (``predict_log``).
LARGEST_LOG2_SIZE = "largest_log2_input_size"
SLOPE_BEYOND = "slope_beyond_largest_input"
LINEAR_SHARE_BEYOND = "linear_share_beyond_largest_input"


def _beyond_range(log2_size: np.ndarray, log_use: np.ndarray, linear: bool = True) -> dict[str, float]:
    """How a model reads beyond the largest input it was trained on, per ``predict_log``:
    the largest log2 input size; the log-log slope of use over the half of the runs with
    the larger inputs (clipped to use proportional to size at most), per unit of log2
    size; and the share of use that grows in proportion to the input at the largest one,
    ``b x size / (a + b x size)`` of the straight line ``use = a + b x size`` (a, b >= 0)
    through those runs, which the upper bound follows at least.

    Use that is a baseline plus a part proportional to the input has a local log-log
    slope below 1 that climbs with the input: along the slope alone, an input 16x the
    largest was sized at half its peak (a helper's audit).  ``linear``: False for a
    resource that does not add up with the input (cores).  Empty without input sizes.
    """
    from .estimators import _loglog_slope

    known = np.isfinite(log2_size)
    if known.sum() < 3:
        return {}
    ln_size, use = log2_size[known] * math.log(2.0), log_use[known]
    slope = _loglog_slope(ln_size, use, max_slope=1.0, fraction=0.5)
    out = {LARGEST_LOG2_SIZE: float(log2_size[known].max()), SLOPE_BEYOND: slope * math.log(2.0)}
    k = max(3, int(math.ceil(ln_size.shape[0] * 0.5)))
    top = np.argsort(ln_size, kind="stable")[-k:]
    x, y = np.exp(ln_size[top]), np.exp(use[top])
    if linear and np.ptp(x) > 0:
        b, a = np.polyfit(x, y, 1)
        b, edge = max(float(b), 0.0), float(x.max())
        a = max(float(a), 0.0)
        out[LINEAR_SHARE_BEYOND] = b * edge / (a + b * edge) if a + b * edge > 0 else 0.0
    return out


def fit_resource_model(history: History, resource: str, config: RayschedConfig, seed: int = 0) -> ResourceModel | None:
    """Train the quantile model for one resource on a function's history.

    The newest ``holdout_fraction`` of runs is held out: the conformal offset and
    every reported metric come from them, so what is reported is what the next
    runs will see.  Returns None with too little history.
    """
    history = _since_shift(history, resource, config)
    rows = usable_rows(history, resource)
    if rows.shape[0] < config.min_history_for_model:
        return None
    y_all = history.column(resource)[rows]
    n_hold = max(4, int(math.ceil(rows.shape[0] * config.holdout_fraction)))
    train_runs, held = Runs.of(history, rows[:-n_hold]), Runs.of(history, rows[-n_hold:])
    vocabulary = tag_vocabulary(train_runs.tags)
    X_train = feature_matrix(train_runs.input_size, train_runs.tags, vocabulary)
    y_train, y_hold = y_all[:-n_hold], y_all[-n_hold:]
    booster = _train_booster(X_train, log_values(y_train), config, seed, feature_names(vocabulary))
    raw = bytes(booster.save_raw(raw_format="ubj"))
    beyond = _beyond_range(X_train[:, 0].astype(float), log_values(y_train), linear=resource != "cpu")
    uncalibrated = ResourceModel(resource, tuple(config.quantiles), raw, 0.0, config.coverage, int(X_train.shape[0]),
                                 dict(beyond), tags=vocabulary)
    scores = log_values(y_hold) - uncalibrated.predict_log(uncalibrated.matrix(held))[:, -1]
    offset, measured = cross_conformal(scores, config.coverage)
    model = ResourceModel(resource, tuple(config.quantiles), raw, offset, config.coverage, int(X_train.shape[0]),
                          dict(beyond), tags=vocabulary)
    metrics = evaluate(model, held, y_hold)
    metrics.update(beyond)
    metrics.update(
        rows_train=float(X_train.shape[0]),
        rows_holdout=float(n_hold),
        # In-sample coverage on the holdout is >= target by construction; the
        # cross-fitted figure is the honest one.
        upper_coverage=measured if math.isfinite(measured) else metrics["upper_coverage"],
    )
    return ResourceModel(resource, tuple(config.quantiles), raw, offset, config.coverage, int(X_train.shape[0]), metrics,
                         tags=vocabulary)


def holdout(history: History, resource: str, config: RayschedConfig) -> tuple[Runs, np.ndarray]:
    """The runs ``fit_resource_model`` holds out, to compare a served model on the same runs."""
    history = _since_shift(history, resource, config)
    rows = usable_rows(history, resource)
    n_hold = max(4, int(math.ceil(rows.shape[0] * config.holdout_fraction)))
    rows = rows[-n_hold:]
    return Runs.of(history, rows), history.column(resource)[rows]


def retrain_due(new_rows: int, n_rows: int, config: RayschedConfig) -> bool:
    """Whether the rows that arrived since the last training call for another: at least
    ``retrain_after_new_rows`` of them and a tenth of the history (a model of 2,000 runs
    is not refitted for every 20 more). The profiler adds its clock
    (``min_retrain_interval_s``) and the training's cost; a trace replay has neither."""
    return new_rows >= max(config.retrain_after_new_rows, 0.1 * n_rows)


def replaces_served(new: ResourceModel, served: ResourceModel | None, history: History, resource: str,
                    config: RayschedConfig) -> tuple[bool, float]:
    """Whether a newly trained model is served instead of ``served``: no worse on the runs it
    was held out on (the newest), scored by the same pinball loss; and the served model's loss
    there (inf with none served)."""
    if served is None:
        return True, math.inf
    held, y_hold = holdout(history, resource, config)
    served_loss = evaluate(served, held, y_hold)["pinball_loss"]
    return new.metrics["pinball_loss"] <= served_loss + 1e-12, served_loss
