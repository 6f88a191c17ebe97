"""The profiler: records every attempt, trains the models, serves bundles to drivers.

``Profiler`` is a plain class that tests drive directly with a fake clock and
in-process executors; ``get_or_create_profiler`` is the one place that makes it
a named, detached, restartable Ray actor (as Ray Data's autoscaling coordinator
does).  The driver never waits on it to submit a task: it polls for bundles and
uses the last one it has.
"""

from __future__ import annotations

# pandas and the store (pyarrow) are imported where they are used: a worker's first
# handle on this actor imports this module, and they cost it ~0.2 s of CPU.
import json
import logging
import math
import pickle
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ..config import RayschedConfig
from ..store.group_commit import GroupCommit
from ..types import IMPORTED_CODE_HASH, History
from .session import PROFILER_BASE, RECORD_GROUP, profiler_name

if TYPE_CHECKING:
    from ..policy.models import ResourceModel

# The policy's models and estimators are imported where the actor uses them: a
# worker that sends its rows gets a handle on this actor, and Ray imports the actor's module
# for it (~0.12 s of a worker's first call, all of the policy, until these were moved).

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

#: Base name; the actor of a home is ``session.profiler_name(config)``.
PROFILER_NAME = PROFILER_BASE
#: Threads of the actor's ``record`` pool: a worker's call waits there for its group commit
#: (up to ``profile_commit_interval_s``), so those calls get threads of their own.
RECORD_THREADS = 64

#: How often, at most, the memory prior bundles carry is worked out again (``Profiler._refresh_prior``).
PRIOR_REFRESH_S = 30.0

#: Outcomes whose CPU and wall time describe a whole run of the function.
_COMPLETE = {"ok"}


@dataclass(frozen=True, eq=False)
class Bundle:
    """What a driver needs to predict one function locally: its history and served models."""

    function: str
    code_hash: str
    version: int
    history: History
    models: Mapping[str, ResourceModel] = field(default_factory=dict)
    max_peak_seen: float = 0.0
    history_scope: str = "code"  # "code": rows of this code hash; "name": all rows of the name
    #: The memory chain's prior from the home's functions (``policy.recipe.memory_residual_prior``).
    residual_prior: tuple[float, ...] = ()

    @property
    def n_history(self) -> int:
        return len(self.history)


def history_from_rows(rows: pd.DataFrame) -> History:
    """The estimators' view of profile rows: memory samples, and CPU/wall of complete runs."""
    import pandas as pd

    from ..policy.samples import pooled_short_cores
    if rows.empty:
        return History.empty()
    # In the order the attempts ended, not the order their batches arrived: workers
    # send their rows in batches of their own, so arrival interleaves them, and the
    # history's order is time to the policy (a shift in use, the newest runs held out).
    if "code_hash" in rows and (rows["code_hash"] == IMPORTED_CODE_HASH).any():
        # Runs of ``raysched import`` first, whenever they were imported: older than any
        # run measured here. Stamped at the import, they came after the runs made before
        # it, and the policy took them for the newest (a shift: sized from them alone).
        own = rows["code_hash"] != IMPORTED_CODE_HASH
        keys = ["_own", "timestamp"] if "timestamp" in rows else ["_own"]
        rows = rows.assign(_own=own).sort_values(keys, kind="stable", na_position="first")
    elif "timestamp" in rows and not rows["timestamp"].is_monotonic_increasing:
        rows = rows.sort_values("timestamp", kind="stable", na_position="first")
    complete = rows["outcome"].isin(_COMPLETE).to_numpy()

    def col(name: str) -> np.ndarray:
        if name not in rows:
            return np.full(len(rows), np.nan)
        return pd.to_numeric(rows[name], errors="coerce").astype(float).to_numpy()

    cpu = np.where(complete, col("cpu_cores"), np.nan)
    wall = np.where(complete, col("wall_seconds"), np.nan)
    cpu = pooled_short_cores(cpu, np.where(complete, col("cpu_seconds"), np.nan), wall)
    disk = np.where(complete, np.nansum(np.vstack([col("read_bytes"), col("write_bytes")]), axis=0), np.nan)
    disk = np.where(np.isnan(col("read_bytes")) & np.isnan(col("write_bytes")), np.nan, disk)
    tag_column = rows["tags"] if "tags" in rows else [None] * len(rows)
    tags = tuple(tuple(t) if t is not None and not (isinstance(t, float) and math.isnan(t)) else () for t in tag_column)
    return History(
        input_size=col("input_size"),
        memory=col("memory_sample_bytes"),
        cpu=cpu,
        wall=wall,
        disk=disk,
        tags=tags,
        version=len(rows),
        censored=(rows["outcome"] == "oom_killed").to_numpy(),  # the memory value is a bumped lower bound
    )


#: Whether a training already ran in this process (and paid the imports).
_IMPORTS_PAID = False


def _task_seconds(row: Mapping[str, Any]) -> float:
    """The cluster time an attempt held: wall seconds x the CPUs it was allocated (1 if unknown),
    times the calls the row stands for (a thinned function's measured row stands for the calls
    counted with it, which took about as long)."""
    wall, cpus, calls = row.get("wall_seconds"), row.get("allocated_num_cpus"), row.get("calls")
    if not isinstance(wall, (int, float)) or not wall > 0:
        return 0.0
    per_call = float(wall) * (float(cpus) if isinstance(cpus, (int, float)) and cpus > 0 else 1.0)
    return per_call * (calls if isinstance(calls, int) and calls > 1 else 1)


class _FunctionState:
    """Rows and models of one function name, loaded lazily from the store.

    New rows are kept as the dicts they arrived as and merged into the frame only
    when a bundle or a training needs it: a concat per batch cost more than the
    Parquet write itself.
    """

    def __init__(self, rows: pd.DataFrame, window: int, arrived: Sequence[Mapping[str, Any]] = ()):
        self.window = window
        self._set_rows(rows, arrived)
        # Unique across the profiler's incarnations (microseconds of the clock, then +1 per
        # change): a driver caches predictions by bundle version, and a restarted profiler
        # counting from 1 again answered with versions whose cached predictions were made
        # from an old incarnation's first rows, or none (a helper's audit: sized from the
        # 3 GiB fallback, with 25 runs of 64 MiB in the bundle).
        self.version = time.time_ns() // 1000
        self.new_rows = 0
        #: resource -> the model served last, whichever rows trained it: what a code
        #: version without runs of its own is sized by (the name's history)
        self.models: dict[str, ResourceModel] = {}
        #: code hash -> resource -> the model served to that code, trained on its own rows.
        #: One slot per code: two versions in use under one name (two scripts sharing a
        #: home) each keep theirs, and a new version's first model competes with none.
        self.models_by_code: dict[str, dict[str, ResourceModel]] = {}
        #: code hash -> (clock time it was built, the bundle, the served models then): shared
        #: by the processes that ask
        self.bundles: dict[str | None, tuple[float, Bundle, dict]] = {}
        self.training: Future | None = None
        self.trainings = 0
        self.last_trained = -float("inf")
        self.last_training_cpu_s = 0.0  # CPU seconds the last training took
        self.task_seconds_since_training = 0.0  # sum of wall x allocated CPUs of rows since

    def add(self, rows: list[Mapping[str, Any]]) -> None:
        # A batch sent again after its profiler was lost (``rows.RowSink``) may hold rows this
        # history has already (stored before the loss, then read from the store): counted twice,
        # they weighed double in the next training.
        ids = self._ids
        if any(row.get("row_id") in ids for row in rows):
            rows = [row for row in rows if row.get("row_id") not in ids]
            if not rows:
                return
        ids.update(row.get("row_id") for row in rows)
        ids.discard(None)
        self._pending.extend(rows)
        if len(self._pending) > 2 * self.window:
            # Nobody asked for a bundle for a while (the function's drivers are gone): the
            # frame would keep only the newest `window` rows anyway, so hold no more than that.
            del self._pending[: len(self._pending) - self.window]
        if len(ids) > 4 * max(self.window, 256):  # the ids of rows no longer held: forgotten
            self._ids = self._held_ids()
        self.n_rows = min(self.window, self.n_rows + len(rows))
        self.n_usable += sum(1 for r in rows if r.get("memory_sample_bytes") is not None)
        self.new_rows += len(rows)
        self.task_seconds_since_training += sum(_task_seconds(r) for r in rows)
        self.version += 1

    def replace_rows(self, rows: pd.DataFrame, arrived: Sequence[Mapping[str, Any]] = ()) -> None:
        """The store's rows, newest last, read while ``arrived`` were recorded (``Profiler._read_rows``)."""
        if len(rows) != self.n_rows or self._pending or arrived:
            self.version += 1
        self._set_rows(rows, arrived)

    def _set_rows(self, rows: pd.DataFrame, arrived: Sequence[Mapping[str, Any]]) -> None:
        # A row recorded during the read may be in it already (written before the read
        # reached its part) or not: kept once, by its id.
        stored = set(rows["row_id"]) if "row_id" in rows.columns and len(rows) else set()
        self._frame = rows
        self._pending = []
        for row in arrived:
            row_id = row.get("row_id")
            if row_id is None or row_id not in stored:
                self._pending.append(row)
                stored.add(row_id)
        stored.discard(None)
        #: The row ids of this history (the frame's and the pending rows', and maybe some
        #: the window dropped since), for ``add``.
        self._ids = stored
        self.n_rows = min(self.window, len(rows) + len(self._pending))
        self.n_usable = (int(rows["memory_sample_bytes"].notna().sum()) if len(rows) else 0) + sum(
            1 for row in self._pending if row.get("memory_sample_bytes") is not None)

    def _held_ids(self) -> set:
        frame = self._frame
        ids = set(frame["row_id"]) if "row_id" in frame.columns and len(frame) else set()
        ids.update(row.get("row_id") for row in self._pending)
        ids.discard(None)
        return ids

    @property
    def rows(self) -> pd.DataFrame:
        """Merges pending rows; callers hold the profiler's lock, as `add` runs on other threads."""
        if self._pending:
            import pandas as pd

            pending, self._pending = self._pending, []
            part = pd.DataFrame(pending)
            if not self._frame.empty:
                part = part.reindex(columns=self._frame.columns)
                part = pd.concat([self._frame, part], ignore_index=True)
            self._frame = part.tail(self.window)
        return self._frame


#: How often, at most, a bundle request looks for rows written to the store without the profiler.
OUTSIDE_CHECK_S = 1.0


class Profiler:
    """Records attempt rows, trains per-function models in the background, serves bundles."""

    def __init__(
        self,
        config: RayschedConfig,
        store: Any = None,
        registry: Any = None,
        clock: Callable[[], float] = time.monotonic,
        executor: Executor | None = None,
        tidy_executor: Executor | None = None,
        load_executor: Executor | None = None,
    ):
        from ..store.profiles import ProfileStore

        self.config = config
        self.store = store if store is not None else ProfileStore(config.home_path)
        self._registry = registry
        self._clock = clock
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="raysched-train")
        self._lock = threading.RLock()
        self._functions: dict[str, _FunctionState] = {}
        # The memory prior bundles carry, from the histories of the functions loaded here: each
        # function's History kept per version (the estimator's fit is cached on the object).
        self._prior: tuple[float, ...] = ()
        self._prior_at = -math.inf
        self._prior_histories: dict[str, tuple[int, History]] = {}
        #: Functions whose rows a thread is reading from the store (``_state``): set when done.
        self._loading: dict[str, threading.Event] = {}
        #: function -> the lists of rows recorded during each store read of it under way
        #: (``_read_rows``): a read of a large store takes seconds, and holds no lock.
        self._arrivals: dict[str, list[list[Mapping[str, Any]]]] = {}
        # Where a record call that finds a function not loaded yet has its history read.
        self._load_executor = load_executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="raysched-load")
        self._last_record = clock()
        self._in_flight = 0  # record calls writing right now
        self.rows_received = 0
        from ..policy.recipe import build_predictor

        self._predictor = build_predictor(config)
        # Batches from many workers become one Parquet part per commit interval under load.
        self._commit = GroupCommit(self._write_rows, config.profile_commit_interval_s)
        self._rejected: set[int] = set()  # ids of rows just set aside by the store (``_write_rows``)
        # Every commit is a Parquet part: they are merged in the background (store.tidy), on
        # a thread of its own so that neither a training nor a record call waits for it.
        self._tidy_executor = tidy_executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="raysched-tidy")
        self._tidying: Future | None = None
        self._records_since_tidy = 0
        self.parts_merged = 0
        # Rows this node's workers could not store (the home unwritable, the disk full, a while):
        # stored now, before the functions' histories are read (``rows.spool_rows``).
        if store is None:
            from .rows import store_spooled
            from .session import publish_home_id

            store_spooled(config, self.store)
            # Workers on a node without this folder (no shared storage) then send their
            # rows here, never into a folder of the same path that nobody reads.
            publish_home_id(config)
        # Rows written to the store without this actor (``raysched import``, a worker that could
        # not reach it): functions loaded before are re-read at their next bundle request.
        # From the journal's end: what was written before this start is read as functions load.
        self._outside_offset = self.store.outside_writes_end()
        self._outside_checked = -float("inf")
        self._outside_stale: set[str] = set()

    def _written_outside(self, function: str) -> bool:
        """Whether ``function``'s rows were written to the store by another process since this
        actor read them: the journal is looked at once per OUTSIDE_CHECK_S at most (one stat)."""
        now = self._clock()
        with self._lock:
            due = now - self._outside_checked >= OUTSIDE_CHECK_S
            if due:
                self._outside_checked = now
        if due:
            functions, offset = self.store.outside_writes(self._outside_offset)
            with self._lock:
                self._outside_offset = offset
                # (others are read when first asked for; one being read now may have missed them)
                self._outside_stale |= {f for f in functions if f in self._functions or f in self._loading}
        with self._lock:
            if function in self._outside_stale:
                self._outside_stale.discard(function)
                return True
        return False

    # --- the registry is created on first use: MLflow's import costs seconds ---------------
    @property
    def registry(self):
        if self._registry is None:
            from ..store.registry import ModelRegistry

            self._registry = ModelRegistry(self.config.home_path)
        return self._registry

    def _state(self, function: str) -> _FunctionState:
        """The function's state, read from the store on first use.  Never called with the lock
        held: the read of a large store can take seconds (up to 2.8 s measured on a home of
        2.4 million rows), and under the lock every record and bundle call of every function
        waited for it (benchmarks/bench_profiler_start.py)."""
        while True:
            with self._lock:
                state = self._functions.get(function)
                if state is not None:
                    return state
                loading = self._loading.get(function)
                if loading is None:
                    loading = self._loading[function] = threading.Event()
                    break
            loading.wait()  # another thread reads it: then it is there (or, if its read failed, ours)
        try:
            rows, arrived = self._read_rows(function)
            with self._lock:
                try:
                    state = self._functions[function] = _FunctionState(rows, self.config.history_window, arrived)
                finally:
                    self._end_read(function, arrived)  # in the same hold of the lock as the state's install
                if (self.config.home_path / "mlflow.db").exists() or self._registry is not None:
                    # Off the request path: importing MLflow alone takes seconds.
                    state.training = self._executor.submit(self._load_served, function, state)
                return state
        finally:
            with self._lock:
                self._loading.pop(function, None)
            loading.set()

    def _read_rows(self, function: str) -> tuple[pd.DataFrame, list[Mapping[str, Any]]]:
        """The function's newest rows in the store, read without the lock, and the rows
        ``record`` handed over meanwhile (some may be in the read as well).  ``record`` goes
        on handing rows over until the caller installs what it read and calls ``_end_read``,
        both in one hold of the lock: ended here, a record call between the two found
        neither this list nor (on a first read) a state, and its rows were in no history."""
        arrived: list[Mapping[str, Any]] = []
        with self._lock:
            self._arrivals.setdefault(function, []).append(arrived)
        try:
            rows = self.store.read_history(self.config.history_window, function)
        except BaseException:
            with self._lock:
                self._end_read(function, arrived)
            raise
        return rows, arrived

    def _end_read(self, function: str, arrived: list[Mapping[str, Any]]) -> None:
        """Stop handing rows over to the read that ``arrived`` belongs to (the lock held)."""
        readers = self._arrivals.get(function, [])
        for i, r in enumerate(readers):
            if r is arrived:
                del readers[i]
                break
        if not readers:
            self._arrivals.pop(function, None)

    def _load_served(self, function: str, state: _FunctionState) -> None:
        """After a restart: per resource, the newest registered model that was served, and the
        newest served to each code version on its own rows (two versions in use under one
        name each get theirs back: a helper's audit found only the newest restored)."""
        from ..policy.models import IncompatibleModel, ResourceModel
        from ..policy.recipe import MODELLED

        latest: dict[str, ResourceModel] = {}  # resource -> the model served last
        by_code: dict[str, dict[str, ResourceModel]] = {}  # code hash -> resource -> its own model
        try:
            for resource in MODELLED:
                # Newest first; a version registered but judged worse than the one served
                # then (meta "served": false) is skipped, as it was before the restart.
                for entry in sorted(self.registry.versions(function, resource), key=lambda v: -int(v["version"])):
                    try:
                        artifact = self.registry.load(function, resource, int(entry["version"]))
                        meta = json.loads(artifact.meta_json) if artifact is not None else {}
                    except Exception as exc:  # noqa: BLE001 - its files gone, say: an older version may serve
                        # (Raised to the guard below, it cost every resource its model.)
                        logger.warning("raysched: skipping version %s of the %s model of %s: %s",
                                       entry.get("version"), resource, function, exc)
                        continue
                    if artifact is None or not meta.get("served", True):
                        continue
                    # (a model registered before the scope was recorded: taken as its code's own)
                    code = meta.get("code_hash") if meta.get("history_scope", "code") == "code" else None
                    if resource in latest and (code is None or resource in by_code.get(code, {})):
                        continue  # an older model of a slot already filled
                    try:
                        model = ResourceModel.from_artifact(artifact)
                    except IncompatibleModel as exc:  # an older raysched's features: retrained from the rows
                        logger.warning("raysched: not serving %s: %s", function, exc)
                        break
                    latest.setdefault(resource, model)
                    if code is not None:
                        by_code.setdefault(code, {}).setdefault(resource, model)
        except Exception:  # noqa: BLE001 - no registry yet, or an unreadable model: serve statistics
            logger.exception("raysched: could not load registered models of %s", function)
        with self._lock:
            for resource, model in latest.items():  # a model trained meanwhile is newer
                state.models.setdefault(resource, model)
            for code, models in by_code.items():
                for resource, model in models.items():
                    state.models_by_code.setdefault(code, {}).setdefault(resource, model)
            if latest:
                state.version += 1

    # --- the write path -------------------------------------------------------------------------
    def record(self, rows: Sequence[Mapping[str, Any]] | bytes) -> int:
        """Store attempt rows, then maybe start a background retrain.

        Workers send their batches pickled (``bytes``), which Ray carries as is.
        Returns once the rows are written: together with the batches of other
        callers, one Parquet part per ``profile_commit_interval_s`` under load
        (``store.group_commit``).  Called in the actor's ``record`` concurrency
        group, so that callers waiting for a commit never hold up a bundle request.
        """
        if isinstance(rows, (bytes, bytearray)):
            rows = pickle.loads(rows)
        if not rows:
            return 0
        with self._lock:
            self._in_flight += 1
            self._last_record = self._clock()
        try:
            written = self._commit.submit(rows)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_record = self._clock()
        by_function: dict[str, list[Mapping[str, Any]]] = {}
        with self._lock:
            if self._rejected:
                ids = set(map(id, rows))
                rows = [row for row in rows if id(row) not in self._rejected]
                self._rejected -= ids
                written = len(rows)  # a shared commit counts a whole submission as written
        for row in rows:
            by_function.setdefault(row["function"], []).append(row)
        with self._lock:
            self.rows_received += written
            for function, part in by_function.items():
                state = self._functions.get(function)
                if state is not None:  # else loaded from the store (rows included) when first asked for
                    state.add(part)
                for arrived in self._arrivals.get(function, ()):
                    arrived.extend(part)  # a read of the store under way may have missed them
            for function in by_function:
                self._maybe_train(function)
            self._maybe_tidy()
        return written

    def reconfigure(self, config: RayschedConfig) -> None:
        """Train and predict by ``config`` from now on: a driver's ``configure(...)`` made after
        this actor started (the actor outlives the driver that created it). Rows, histories and
        served models are kept."""
        from ..policy.recipe import build_predictor

        predictor = build_predictor(config)
        with self._lock:
            self.config, self._predictor = config, predictor
            self._commit.interval_s = float(config.profile_commit_interval_s)
            self._prior_at = -math.inf  # the prior by the new config at the next bundle

    def _write_rows(self, rows: list[Mapping[str, Any]]) -> int:
        """The group commit's write: a row the store refuses is set aside there, and kept out
        of the history this actor holds."""
        written, rejected = self.store.append_keeping_valid(rows)
        if rejected:
            with self._lock:
                self._rejected.update(map(id, rejected))
        return written

    def _maybe_tidy(self) -> None:
        """Every ``store_tidy_fanout`` record calls, merge the store's parts unless a merge still runs
        (a look costs one listing of the folder; most find nothing to merge)."""
        fanout = self.config.store_tidy_fanout
        self._records_since_tidy += 1
        if not fanout or self._records_since_tidy < fanout:
            return
        if self._tidying is not None and not self._tidying.done():
            return
        self._records_since_tidy = 0
        self._tidying = self._tidy_executor.submit(self._tidy, fanout)

    def _tidy(self, fanout: int) -> int:
        try:
            merged = self.store.tidy(fanout)
        except Exception:  # noqa: BLE001 - the parts stay as they are; reads are only slower
            logger.exception("raysched: could not merge the profile store's parts")
            return 0
        with self._lock:
            self.parts_merged += merged
        return merged

    def _maybe_train(self, function: str) -> None:
        """Start a training if the function's new rows call for one.  Called with the lock held:
        a function not loaded yet is read in the background, which then looks again."""
        from ..policy.models import retrain_due

        state = self._functions.get(function)
        if state is None:
            if function not in self._loading:
                self._load_executor.submit(self._load_then_maybe_train, function)
            return
        if state.training is not None and not state.training.done():
            return
        usable = state.n_usable
        enough_new = retrain_due(state.new_rows, state.n_rows, self.config)
        rested = self._clock() - state.last_trained >= self.config.min_retrain_interval_s
        affordable = (state.task_seconds_since_training * self.config.train_cost_fraction
                      >= state.last_training_cpu_s)
        first = not state.models and state.trainings == 0
        if usable >= self.config.min_history_for_model and (first or (enough_new and rested and affordable)):
            state.new_rows = 0
            state.task_seconds_since_training = 0.0
            state.last_trained = self._clock()
            state.training = self._executor.submit(self._train, function)

    def _load_then_maybe_train(self, function: str) -> None:
        try:
            self._state(function)
        except Exception:  # noqa: BLE001 - read again by the next request that needs it
            logger.exception("raysched: could not read the history of %s", function)
            return
        with self._lock:
            self._maybe_train(function)

    # --- training ----------------------------------------------------------------------------------
    def _history(self, function: str, code_hash: str | None) -> tuple[History, str]:
        state = self._state(function)
        with self._lock:  # `record` appends to the pending rows from the actor's other threads
            rows = state.rows
        if code_hash is not None and not rows.empty:
            own = rows[rows["code_hash"] == code_hash]
            if len(own) >= self.config.min_history_for_stats:
                return history_from_rows(own), "code"
        return history_from_rows(rows), "name"

    def _train(self, function: str, code_hash: str | None = None) -> dict[str, Any]:
        """Fit, compare with the served model on the same holdout, log and register, maybe serve."""
        from ..policy.models import replaces_served

        started, cpu_started = time.perf_counter(), time.process_time()
        state = self._state(function)
        with self._lock:
            if code_hash is None and not state.rows.empty:
                code_hash = str(state.rows["code_hash"].iloc[-1])
        history, scope = self._history(function, code_hash)
        trained = self._predictor.train(history)
        summary: dict[str, Any] = {"function": function, "rows": len(history), "resources": {}}
        with self._lock:
            # Compared with what this scope's calls are served now: a model of the
            # code's own runs with that code's model (another code's is never shipped
            # to it, so it is no rival); one of the name's rows with the last served.
            rivals = dict(state.models_by_code.get(code_hash, {}) if scope == "code" else state.models)
        for resource, model in trained.by_resource.items():
            better, served_loss = replaces_served(model, rivals.get(resource), history, resource, self.config)
            params = {
                "function": function,
                "code_hash": code_hash or "",
                "resource": resource,
                "history_scope": scope,
                "quantiles": ",".join(map(str, self.config.quantiles)),
                "coverage_target": self.config.coverage,
                "xgb_rounds": self.config.xgb_rounds,
                "xgb_max_depth": self.config.xgb_max_depth,
                "served": better,
            }
            metrics = {k: float(v) for k, v in model.metrics.items() if v is not None and math.isfinite(v)}
            metrics["served_model_pinball_loss"] = served_loss if math.isfinite(served_loss) else -1.0
            version = None
            try:
                artifact = self.registry.log_training(
                    model.to_artifact(function, {"code_hash": code_hash, "served": better, "history_scope": scope}),
                    params, metrics
                )
                version = artifact.version
            except Exception as exc:  # noqa: BLE001 - MLflow down must not stop serving a better model
                logger.exception("raysched: could not log the %s model of %s to MLflow", resource, function)
                # Said to whoever asked for this training too: the actor's log is not where one looks.
                summary.setdefault("mlflow_errors", []).append(f"{resource}: {type(exc).__name__}: {exc}")
            if better:
                with self._lock:
                    state.models[resource] = model.with_version(version) if version is not None else model
                    if scope == "code":
                        state.models_by_code.setdefault(code_hash, {})[resource] = state.models[resource]
                    state.version += 1
            summary["resources"][resource] = {"version": version, "served": better, **metrics}
        self._prune_registry(function, state, summary)
        with self._lock:
            state.trainings += 1
            # Process CPU, so XGBoost's and MLflow's threads count (and rows recorded meanwhile:
            # conservative).  The first training of a process also imports XGBoost and MLflow,
            # seconds that later ones do not pay: it does not set the budget.
            global _IMPORTS_PAID
            state.last_training_cpu_s = time.process_time() - cpu_started if _IMPORTS_PAID else 0.0
            _IMPORTS_PAID = True
        summary["seconds"] = time.perf_counter() - started
        summary["cpu_seconds"] = state.last_training_cpu_s
        return summary

    def _prune_registry(self, function: str, state: _FunctionState, summary: dict[str, Any]) -> None:
        """Keep the newest ``registry_keep_versions`` versions of each of the function's models
        and every version served (to any of its code versions); the rest go (``ModelRegistry.prune``)."""
        try:
            registry = self.registry
        except Exception as exc:  # noqa: BLE001 - MLflow's database unusable: logged by the training already
            logger.warning("raysched: not pruning the models of %s: %s", function, exc)
            return
        if not hasattr(registry, "prune"):
            return
        with self._lock:
            served = [state.models, *state.models_by_code.values()]
        for resource in summary["resources"]:
            keep = {m.version for models in served for r, m in models.items() if r == resource and m.version is not None}
            try:
                registry.prune(function, resource, self.config.registry_keep_versions, keep)
            except Exception as exc:  # noqa: BLE001 - a failed clean-up must not stop serving
                logger.warning("raysched: could not prune the %s models of %s: %s", resource, function, exc)

    def train_now(self, function: str, code_hash: str | None = None) -> dict[str, Any]:
        """Train synchronously (after any training already under way); for tests, the demo, the CLI."""
        state = self._state(function)
        while True:
            with self._lock:
                pending = state.training
                if pending is None or pending.done():
                    # Holds the function's training slot: a background training started beside
                    # this one judged its model against the same served one, and whichever
                    # ended last was served, even the worse of the two.
                    mine: Future = Future()
                    state.training = mine
                    break
            pending.result()
        try:
            return self._train(function, code_hash)
        finally:
            # The slot is free. Its error (if any) reached this caller; kept in the future, it
            # would be raised again by whoever waits on the slot next (wait_for_training).
            mine.set_result(None)

    # --- the read path ---------------------------------------------------------------------------
    def bundle(self, function: str, code_hash: str, have_version: int = -1, reload: bool = False,
               fresh: bool = False) -> Bundle | None:
        """The function's bundle, or None when the caller's ``have_version`` is current.

        ``reload`` re-reads the function's rows from the store first: rows that a
        worker wrote there directly while this actor was unreachable (or restarting)
        are then part of the history.  Queries ask for it; submissions never do.
        ``fresh``: built from every row received, not one built within ``bundle_max_age_s``
        that many submitting processes share (an actor's creation asks for it).
        """
        reload = self._written_outside(function) or reload
        state = self._state(function)
        if reload:
            rows, arrived = self._read_rows(function)
            with self._lock:
                try:
                    state.replace_rows(rows, arrived)
                finally:
                    self._end_read(function, arrived)
        with self._lock:
            now = self._clock()
            self._refresh_prior(now)
            if have_version == state.version:
                return None
            built_at, cached, served_then = state.bundles.get(code_hash, (None, None, None))
            if cached is not None and not reload and (
                    cached.version == state.version
                    # (models compare by identity: a model served since makes a new bundle at once)
                    or (not fresh and now - built_at < self.config.bundle_max_age_s
                        and served_then == state.models)):
                # Only rows came since (or nothing): many processes asking within a second share one build.
                return None if have_version == cached.version else cached
            history, scope = self._history(function, code_hash)
            import pandas as pd

            rows = state.rows
            if scope == "code":  # the largest peak of this code's runs: another version's is no guide
                rows = rows[rows["code_hash"] == code_hash]
            peaks = pd.to_numeric(rows.get("peak_rss_bytes", pd.Series(dtype=float)), errors="coerce")
            max_peak = float(peaks.max()) if len(peaks) and peaks.notna().any() else 0.0
            if scope == "code":
                # The code has runs of its own: models trained on other code (a changed
                # function's old version) would size it by what the old code used.
                models = dict(state.models_by_code.get(code_hash, {}))
            else:
                models = dict(state.models)
            bundle = Bundle(function, code_hash, state.version, history, models, max_peak, scope, self._prior)
            state.bundles[code_hash] = (now, bundle, dict(state.models))
            return bundle

    def _refresh_prior(self, now: float) -> None:
        """Work out the memory prior of the functions loaded here again, every ``PRIOR_REFRESH_S``
        at most (the lock held: a function's history is built again only when it has new rows).

        A prior that changed is news to the functions it sizes (those with few runs): their
        version moves on, so that their next bundle, and their drivers, have it."""
        if now - self._prior_at < PRIOR_REFRESH_S:
            return
        from ..policy.recipe import PRIOR_RUNS_PER_FUNCTION, memory_residual_prior

        self._prior_at = now
        try:
            for name, state in self._functions.items():
                held = self._prior_histories.get(name)
                if held is None or held[0] != state.version:
                    rows = state.rows.tail(PRIOR_RUNS_PER_FUNCTION)
                    self._prior_histories[name] = (state.version, history_from_rows(rows))
            prior = memory_residual_prior([h for _, h in self._prior_histories.values()], self.config)
        except Exception:  # noqa: BLE001 - bundles keep the last prior
            logger.exception("raysched: could not work out the memory prior of the home's functions")
            return
        if prior == self._prior:
            return
        self._prior = prior
        few = self.config.cost_prior_max_local / self.config.cost_local_fraction  # runs it still sizes
        for name, state in self._functions.items():
            if state.n_usable <= few:
                state.version += 1
                self._prior_histories[name] = (state.version, self._prior_histories[name][1])

    def settle(self, min_wait_s: float = 0.0, quiet_s: float = 0.3, timeout_s: float = 10.0) -> int:
        """Wait until no rows have arrived for ``quiet_s`` (rows in flight have landed)."""
        deadline = self._clock() + timeout_s
        time.sleep(min_wait_s)
        while self._clock() < deadline:
            with self._lock:
                idle = self._clock() - self._last_record
                busy = self._in_flight > 0
            if idle >= quiet_s and not busy:
                break
            time.sleep(max(0.0, min(quiet_s - idle, 0.05)) + 0.01)  # busy: rows are being written
        return self.rows_received

    def missing_calls(self, function: str, call_ids: Sequence[str]) -> list[str]:
        """Those of ``call_ids`` that no row of ``function`` held here accounts for yet."""
        state = self._state(function)
        from ..store.profiles import calls_without_rows

        with self._lock:
            rows = state.rows
        return calls_without_rows(rows, call_ids)

    def unrecorded(self, calls: Mapping[str, Sequence[str]], quiet_s: float = 0.3) -> tuple[dict[str, list[str]], bool]:
        """Per function, those of its ``calls`` that no row held here accounts for yet; and
        whether the profiler is quiet: no rows arrived for ``quiet_s`` and none are being written."""
        missing = {}
        for function, call_ids in calls.items():
            left = self.missing_calls(function, call_ids)
            if left:
                missing[function] = left
        with self._lock:
            quiet = self._in_flight == 0 and self._clock() - self._last_record >= quiet_s
        return missing, quiet

    def wait_for_training(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        for state in list(self._functions.values()):
            if state.training is not None:
                state.training.result(timeout=max(0.0, deadline - time.monotonic()))

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rows_received": self.rows_received,
                "parts_merged": self.parts_merged,
                "home": str(self.config.home_path),
                "functions": {
                    name: {
                        "rows": s.n_rows,
                        "version": s.version,
                        "trainings": s.trainings,
                        "models": {r: m.version for r, m in s.models.items()},
                        "training": bool(s.training is not None and not s.training.done()),
                    }
                    for name, s in self._functions.items()
                },
            }

    def ping(self) -> bool:
        return True


def get_or_create_profiler(config: RayschedConfig):
    """The profiler actor of the config's home: found by name, created on first use, restarted by Ray."""
    from .session import get_or_create_actor

    return get_or_create_actor(Profiler, profiler_name(config), config,
                               concurrency_groups={RECORD_GROUP: RECORD_THREADS})
