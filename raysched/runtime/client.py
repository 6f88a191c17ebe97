"""The driver's side of the profiler: bundles held locally, refreshed without blocking.

A submission never waits on the profiler actor.  The client keeps the newest
bundle it has per function and, at most every ``refresh_interval_s``, sends one
asynchronous request for a newer one, which a later submission picks up once
the reply's future (completed by Ray) is done.  The one exception is the very first call of a function
in a driver process, which may wait up to ``first_bundle_timeout_s`` for its
first bundle: once per function, never per task.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import functools
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

import ray
from ray.util.client import ray as _CLIENT_MODE  # Ray Client's connection state

from ..config import RayschedConfig
from ..errors import RayschedError
from ..policy.estimators import Fallback
from ..policy.recipe import build_predictor, build_sizer, compose
from ..types import Allocation, ClusterShape, Features, Prediction
from .profiler import Bundle, get_or_create_profiler
from .session import ClusterShapeCache, configured_here, ensure_ray, get_config, monitor_name, session_key

logger = logging.getLogger(__name__)

#: Predictions are cached per bundle version and input size on a log scale, each made
#: at its bucket's largest size (``_at_bucket_top``), with this many buckets per
#: doubling: sizes within ~1.4% share a memory prediction...
_SIZE_BUCKETS_PER_DOUBLING = 50
#: ...and sizes within ~9% their CPU, wall and disk ones: a model's prediction costs
#: ~0.5 ms (XGBoost's per-call overhead) and CPUs are rounded anyway, while memory is
#: what a too-coarse bucket would waste.
_COARSE_BUCKETS_PER_DOUBLING = 8
_COARSE_RESOURCES = ("cpu", "wall", "disk")
_CACHE_SIZE = 4096

#: ``refresh(train=True)`` waits up to this long for the rows of this driver's last
#: ``_ROWS_WAIT_CALLS`` calls of the function before it trains.
_ROWS_WAIT_S = 10.0
#: How often the driver looks the admission actor up by name again (``Client.admission``).
ADMISSION_RELOOK_S = 5.0
_ROWS_WAIT_CALLS = 500


def _bucket(input_size: int | None, per_doubling: int) -> int | None:
    """The bucket of ``input_size`` on a log scale of ``per_doubling`` buckets (None: no size known)."""
    return None if input_size is None else round(math.log2(1 + input_size) * per_doubling)


def _at_bucket_top(features: Features, bucket: int | None, per_doubling: int) -> Features:
    """The call's features with its input size at its bucket's largest: a prediction made
    there gives every call of the bucket an upper bound at least its own (read at the first
    call's size, it served the bucket's larger sizes short: wall bounds covered 0.88, not 0.95)."""
    if bucket is None:
        return features
    top = int(2 ** ((bucket + 0.5) / per_doubling) - 1)
    return dataclasses.replace(features, input_size=max(features.input_size, top))


def size_band(input_size: int | None) -> int | None:
    """The band of input sizes that share one memory prediction (None: no size known).

    The decorator keys its plans on it as well: calls in one band are submitted with
    one plan, each carrying its own exact features for its row.
    """
    return _bucket(input_size, _SIZE_BUCKETS_PER_DOUBLING)


class ProfilerClient:
    def __init__(
        self,
        config: RayschedConfig,
        handle_factory: Callable[[RayschedConfig], Any] = get_or_create_profiler,
        clock: Callable[[], float] = time.monotonic,
    ):
        from ..store.profiles import ProfileStore

        # Fail here, in the driver, with a clear StoreError if the home is unusable,
        # rather than as a dead actor later. Not in a task or an actor that submits calls in
        # turn: the home is on the profiler's node (the head), and on another node that check
        # made its folders there, or failed the call where it could not.
        if _is_driver():
            ProfileStore(config.home_path)
        self.config = config
        self._handle_factory = handle_factory
        self._handle: Any = None
        self._admission: Any = None
        self._admission_looked_at = -math.inf
        self._admission_ends: Any = None
        self._clock = clock
        self._lock = threading.Lock()
        self._bundles: dict[tuple[str, str], Bundle] = {}
        self._pending: dict[tuple[str, str], Any] = {}
        self._waited: set[tuple[str, str]] = set()  # functions whose first call waited for a bundle
        self._next_refresh: dict[tuple[str, str], float] = {}
        self._predictions: OrderedDict[tuple, Any] = OrderedDict()  # Predictions, and estimate dicts of coarse buckets
        self._allocations: dict[tuple, Allocation] = {}
        self._predictor = build_predictor(config)
        self._sizer = build_sizer(config)
        self.cluster = ClusterShapeCache()
        self._strand_watch: Any = None
        # Which calls without a priority wait in the admission queue too (runtime.rooms): a
        # driver's, asking the monitor in a thread of its own from now on, so that its first
        # answer is there before most submissions; None where routing is off.
        self.rooms: Any = None
        if _is_driver() and handle_factory is get_or_create_profiler:
            from .rooms import ray_room_watch

            self.rooms = ray_room_watch(config, self.cluster.get)

    def close(self) -> None:
        """Stop what this client runs beside the driver (a new session or config replaces it)."""
        if self._strand_watch is not None:
            self._strand_watch.close()  # its calls were of the old session (or config)
        if self.rooms is not None:
            self.rooms.close()

    @property
    def handle(self) -> Any:
        if self._handle is None:
            ensure_ray()
            self._handle = self._handle_factory(self.config)
            if configured_here() and self._handle_factory is get_or_create_profiler:
                # The actor may predate this process's configure(...): it trains by this config from now on.
                self._handle.reconfigure.remote(self.config)
            if self.config.monitor_enabled and self._handle_factory is get_or_create_profiler:
                # The live monitor comes up beside the profiler, in the background: no
                # submission waits on it, and workers find it by name once it is there.
                threading.Thread(target=_start_monitor, args=(self.config,), name="raysched-monitor-start",
                                 daemon=True).start()
        return self._handle

    @property
    def admission(self) -> Any:
        """The cluster's admission queue actor (for calls submitted with a priority).

        Looked up by name again every ``ADMISSION_RELOOK_S`` (one GCS lookup, no actor call):
        Ray restarts the actor after a crash, but one ended for good (``ray.kill``) released
        its name, and the handle held here sent every later call with a priority to the dead
        actor (each failed with ActorDiedError) until the driver restarted. The lookup
        finds the live one, or starts it again."""
        now = time.monotonic()
        if self._admission is not None and now - self._admission_looked_at < ADMISSION_RELOOK_S:
            return self._admission
        from .admission import get_or_create_admission

        rooms = self.config.admission_node_room and self.config.monitor_enabled
        monitor = monitor_name(self.config) if rooms else None
        found = get_or_create_admission(self.config.admission_backfill, self.config.admission_gather_s,
                                        monitor=monitor, pipeline_s=self.config.admission_pipeline_s)
        self._admission_looked_at = now
        if self._admission is not None and found._actor_id == self._admission._actor_id:
            return self._admission
        self._admission = found
        if configured_here():
            # The actor may predate this process's configure(...), and it serves every driver.
            self._admission.reconfigure.remote(self.config.admission_backfill, self.config.admission_gather_s,
                                               monitor, self.config.admission_pipeline_s)
        return self._admission

    @property
    def admission_ends(self) -> Any:
        """This driver's reporter of its queued calls' ends (``admission.EndReporter``), and its job id."""
        if self._admission_ends is None:
            from .admission import EndReporter

            self.admission  # noqa: B018 - looked up (or started) before its first end is sent
            # The handle of now, not of the reporter's start: the actor may be started again.
            self._admission_ends = (EndReporter(lambda tokens: self._admission.ended.remote(tokens)),
                                    ray.get_runtime_context().get_job_id())
        return self._admission_ends

    @property
    def strand_watch(self) -> Any:
        """This driver's watcher of its calls that a lost node could leave with a label no alive
        node can hold (``stranded.StrandWatch``); made at the first such call."""
        if self._strand_watch is None:
            from .session import read_cluster_shape
            from .stranded import StrandWatch

            with self._lock:
                if self._strand_watch is None:
                    self._strand_watch = StrandWatch(read_cluster_shape, on_shrink=self.cluster.invalidate)
        return self._strand_watch

    def _request(self, key: tuple[str, str], reload: bool = False, fresh: bool = False) -> "_Reply":
        have = -1 if reload or key not in self._bundles else self._bundles[key].version
        call = (key[0], key[1], have, reload, True) if fresh else (key[0], key[1], have, reload)
        return _Reply(self.handle.bundle.remote(*call), lambda: self._bundles.get(key))

    def _take(self, key: tuple[str, str], reply: "_Reply", timeout: float) -> bool:
        """Collect a bundle reply if it is ready within ``timeout``; True if it was."""
        try:
            bundle = reply.future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return False
        except Exception as exc:  # noqa: BLE001 - the profiler restarting: keep what we hold
            self._pending.pop(key, None)
            logger.warning("raysched: bundle refresh for %s failed (%s); keeping the last one", key[0], exc)
            self._handle = None
            return True
        self._pending.pop(key, None)
        if bundle is not None:
            self._bundles[key] = bundle  # its shared models already swapped for the loaded ones (_Reply)
        elif key not in self._bundles:
            self._bundles[key] = Bundle(key[0], key[1], -1, _empty_history())
        return True

    def bundle(self, function: str, code_hash: str) -> Bundle | None:
        """The newest bundle held for the function; starts a refresh when one is due."""
        key = (function, code_hash)
        now = self._clock()
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None:
                # A reply still in flight costs a look at its future, not a ray.wait per
                # submission (which took ~40% of the driver's time while the profiler was busy).
                if key not in self._bundles:
                    self._take(key, pending, self._first_wait(key))
                elif pending.future.done():
                    self._take(key, pending, 0)
            elif now >= self._next_refresh.get(key, 0.0):
                reply = self._ask(key)
                if reply is not None and key not in self._bundles:
                    self._take(key, reply, self._first_wait(key))
            return self._bundles.get(key)

    def _first_wait(self, key: tuple[str, str]) -> float:
        """How long a call of a function that has no bundle yet waits for one: the first call
        ``first_bundle_timeout_s``, the next ones not at all (they look at the reply and go on
        with the fallback). A profiler slow to answer held up every call, each for up to that
        long, until it did; one that failed was asked again, and waited for again, every
        ``refresh_interval_s``. Called under ``_lock``."""
        if key in self._waited:
            return 0.0
        self._waited.add(key)
        return self.config.first_bundle_timeout_s

    def _ask(self, key: tuple[str, str], fresh: bool = False) -> "_Reply | None":
        """Send a bundle request (held as pending until taken); None when the profiler cannot
        be reached, then predictions come from what is held.  Called under ``_lock``."""
        self._next_refresh[key] = self._clock() + self.config.refresh_interval_s
        try:
            reply = self._pending[key] = self._request(key, fresh=fresh)
        except Exception as exc:  # noqa: BLE001 - no profiler: predict from what we hold
            logger.warning("raysched: cannot reach the profiler (%s)", exc)
            self._handle = None
            return None
        return reply

    def fresh_bundle(self, function: str, code_hash: str) -> Bundle | None:
        """The profiler's newest bundle for the function, waited for (one round trip, at most
        ``first_bundle_timeout_s``): for what is made rarely and held long, an actor, which
        ``bundle`` would size from what was known when the class last made one (a helper's
        audit: five actors in a row on the fallback, the rows of the earlier ones stored)."""
        key = (function, code_hash)
        with self._lock:
            reply = self._ask(key, fresh=True)
            if reply is not None:
                self._take(key, reply, self.config.first_bundle_timeout_s)  # late: taken by the next call
            return self._bundles.get(key)

    def refresh(self, function: str, code_hash: str, train: bool = False, timeout: float = 120.0) -> Bundle | None:
        """Block until the profiler has answered (after training, if asked): for predict() and tools."""
        key = (function, code_hash)
        if train:
            ray.get(self.handle.settle.remote(min_wait_s=rows_sent_within_s(self.config)), timeout=timeout)
            self._wait_for_rows(function, min(timeout, _ROWS_WAIT_S))
            trained = ray.get(self.handle.train_now.remote(function, code_hash), timeout=timeout)
            for error in (trained or {}).get("mlflow_errors", ()):
                logger.warning("raysched: %s was trained and its model is served, but it could not be logged "
                               "to MLflow under %s (%s)", function, self.config.home_path, error)
        with self._lock:
            self._pending.pop(key, None)
            reply = self._request(key, reload=True)
            self._next_refresh[key] = self._clock() + self.config.refresh_interval_s
            self._take(key, reply, timeout)
            return self._bundles.get(key)

    def _wait_for_rows(self, function: str, timeout: float) -> None:
        """Wait (at most ``timeout``) until the profiler holds a row of each of this driver's
        latest calls of ``function``: a quiet profiler is not proof, since a loaded worker
        can send its batch late.  A call still running has no row yet: then the wait ends
        at ``timeout``, and training goes on with what arrived."""
        expected = recent_calls(function, _ROWS_WAIT_CALLS)
        if expected:
            _await_rows(self.handle, {function: expected}, timeout, give_up_when_quiet_after=None)

    def predict(self, function: str, code_hash: str, features: Features, fallback: Fallback,
                bundle: Bundle | None) -> Prediction:
        version = bundle.version if bundle else None
        band = size_band(features.input_size)
        key = (function, code_hash, version, band, features.tags, fallback)
        cached = self._predictions.get(key)
        if cached is not None:
            try:
                self._predictions.move_to_end(key)
            except KeyError:  # evicted meanwhile by another submitting thread (the cache is not locked)
                pass
            return cached
        history, models = (bundle.history, bundle.models) if bundle else (None, None)
        coarse_bucket = _bucket(features.input_size, _COARSE_BUCKETS_PER_DOUBLING)
        coarse_key = ("coarse", function, code_hash, version, coarse_bucket, features.tags, fallback)
        others = self._predictions.get(coarse_key)
        if others is None:
            at = _at_bucket_top(features, coarse_bucket, _COARSE_BUCKETS_PER_DOUBLING)
            others = self._predictor.estimates(at, history, models, fallback, _COARSE_RESOURCES)
            self._remember(coarse_key, others)
        at = _at_bucket_top(features, band, _SIZE_BUCKETS_PER_DOUBLING)
        prior = bundle.residual_prior if bundle else ()
        prediction = compose({**others, **self._predictor.estimates(at, history, models, fallback, ("memory",),
                                                                    residual_prior=prior)})
        self._remember(key, prediction)
        return prediction

    def _remember(self, key: tuple, value: Any) -> None:
        self._predictions[key] = value
        if len(self._predictions) > _CACHE_SIZE:
            self._predictions.popitem(last=False)

    def size(self, prediction: Prediction, explicit: dict[str, Any], function: str,
             cluster: ClusterShape | None) -> Allocation:
        key = (prediction, tuple(sorted(explicit.items())), cluster, function)
        allocation = self._allocations.get(key)
        if allocation is None:
            allocation = self._sizer.size(prediction, cluster, explicit, function)
            if len(self._allocations) > _CACHE_SIZE:
                self._allocations.clear()
            self._allocations[key] = allocation
        return allocation


def _keep_loaded_models(old: Bundle | None, new: Bundle) -> Bundle:
    """The new bundle, with the models it shares with the old one kept as the old objects.

    A bundle arrives whenever rows were added (every refresh of a busy function), each
    time with fresh copies of the same models: loading a Booster again cost ~10 ms on
    the first prediction after every refresh.
    """
    if old is None or not old.models or not new.models:
        return new
    models, kept = dict(new.models), False
    for resource, model in new.models.items():
        held = old.models.get(resource)
        if held is not None and held is not model and held.version == model.version \
                and held.offset == model.offset and held.booster_raw == model.booster_raw:
            models[resource], kept = held, True
    return dataclasses.replace(new, models=models) if kept else new


#: Loads the models of bundles that arrive, off the submit path (one thread: loads are rare).
_MODEL_LOADER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="raysched-model-load")


class _Reply:
    """A bundle request in flight: its ref (kept, so the reply is not dropped) and a future
    completed once the reply has arrived and the models it brings are loaded.

    The loading runs in a background thread: the first model a driver process sees
    imports XGBoost (seconds: it pulls in scikit-learn and SciPy), and a submission
    must never wait for that.  Until the future is done, submissions use the last
    bundle held.  ``held`` returns that bundle: models the new bundle shares with it
    are kept as they are, already loaded.
    """

    __slots__ = ("ref", "future")

    def __init__(self, ref: Any, held: Callable[[], Bundle | None]):
        self.ref = ref
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        # Ray runs done-callbacks on its own thread: hand the loading over at once.
        ref.future().add_done_callback(lambda raw: _MODEL_LOADER.submit(self._load, raw, held))

    def _load(self, raw: concurrent.futures.Future, held: Callable[[], Bundle | None]) -> None:
        try:
            bundle = raw.result()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever takes the reply
            self.future.set_exception(exc)
            return
        try:
            if bundle is not None:
                bundle = _keep_loaded_models(held(), bundle)
                for model in bundle.models.values():
                    model.booster()
        except Exception:  # noqa: BLE001 - a model that does not load says so when it predicts
            logger.debug("raysched: could not load the models of %s ahead of use", bundle.function, exc_info=True)
        self.future.set_result(bundle)


def _start_monitor(config: RayschedConfig) -> None:
    """Create the monitor actor (or find it) and hand it this driver's config (its caps and rules)."""
    try:
        from .monitor import get_or_create_monitor

        # The handle is held while the call is sent: Ray 2.40 loses the call of a
        # handle dropped at once ("Lost reference to actor").
        monitor = get_or_create_monitor(config)
        monitor.reconfigure.remote(config)
    except Exception as exc:  # noqa: BLE001 - tasks run unwatched without it
        logger.warning("raysched: could not start the live monitor (%s); tasks run unwatched", exc)


def _empty_history():
    from ..types import History

    return History.empty()


_client: ProfilerClient | None = None
_client_lock = threading.Lock()


_client_session: Any = None  # session.session_key() of the client's session


def get_client() -> ProfilerClient:
    """The driver's client, renewed when Ray was restarted (a new session, a new actor)."""
    global _client, _client_session
    ensure_ray()
    if _CLIENT_MODE.is_connected():  # 0.3 us
        _refuse_ray_client()
    token = session_key()
    with _client_lock:
        if _client is None or token != _client_session:
            if _client_session is not None and token != _client_session:
                # Calls of the ended session that have no row by now never get one.
                forget_calls(None)
            if _client is not None:
                _client.close()
            _client, _client_session = ProfilerClient(get_config()), token
            _flush_at_shutdown()
        return _client


def _refuse_ray_client() -> None:
    """Ray Client (``ray.init("ray://...")``) runs the driver's Ray API through a proxy that
    has none of the worker internals raysched's submission path reads (the core worker,
    placement-group capture, object locations, the internal KV): refuse it clearly."""
    raise RayschedError(
        "raysched does not run over Ray Client (ray.init('ray://...')): submit the driver to the "
        "cluster with `ray job submit` (see the README's 'On a cluster, and with Ray Jobs'), or run it "
        "on a node of the cluster with ray.init(address='auto')"
    )


def reset_client() -> None:
    """Forget bundles and the actor handle (after ``configure`` or a new Ray session)."""
    global _client
    with _client_lock:
        if _client is not None and _client.rooms is not None:
            _client.rooms.close()  # (its strand watch goes on: the calls it watches still run)
        _client = None


#: Calls submitted by this driver, per function, whose rows no wait has seen (or given
#: up on) yet: ``profiles()`` and ``flush()`` wait briefly for their rows.  Bounded, so a
#: long-running driver does not grow without end.
_SUBMITTED: dict[str | None, "deque[str]"] = {}
_SUBMITTED_MAX = 10_000
_SUBMITTED_LOCK = threading.Lock()


def note_submitted(function: str, call_id: str) -> None:
    with _SUBMITTED_LOCK:
        calls = _SUBMITTED.get(function)
        if calls is None:
            calls = _SUBMITTED[function] = deque(maxlen=_SUBMITTED_MAX)
        calls.append(call_id)


def recent_calls(function: str, n: int) -> list[str]:
    """The last ``n`` calls of ``function`` still waited for (``_SUBMITTED``), oldest first."""
    with _SUBMITTED_LOCK:
        calls = _SUBMITTED.get(function)
        return list(calls)[-n:] if calls else []


def submitted_calls(function: str | None) -> set[str]:
    """The calls of ``function`` (None: of every function) still waited for (``_SUBMITTED``)."""
    with _SUBMITTED_LOCK:
        if function is None:
            return {c for calls in _SUBMITTED.values() for c in calls}
        return set(_SUBMITTED.get(function, ()))


def forget_calls(function: str | None, call_ids: Iterable[str] | None = None) -> None:
    """Stop waiting for these calls' rows (of ``function``, or of any function; None: all calls).

    A wait forgets the calls whose rows it saw, and those it gave up on: a call
    cancelled before it started, force-cancelled or crashed never gets a row, and
    every later wait would otherwise wait it out in full.
    """
    with _SUBMITTED_LOCK:
        functions = list(_SUBMITTED) if function is None else [function]
        if call_ids is None:
            for name in functions:
                _SUBMITTED.pop(name, None)
            return
        drop = set(call_ids)
        for name in functions:
            calls = _SUBMITTED.get(name)
            if calls and drop:
                _SUBMITTED[name] = deque((c for c in calls if c not in drop), maxlen=_SUBMITTED_MAX)


def rows_sent_within_s(config: RayschedConfig) -> float:
    """How long after a call ends its worker has surely sent its row (one flush interval, with room)."""
    return max(1.0, 3 * config.flush_interval_s)


#: How often ``flush`` asks the profiler which calls still lack rows...
_FLUSH_POLL_S = 0.1
#: ...and how long the profiler must have taken no rows, once the workers have sent theirs
#: (``rows_sent_within_s``), before a flush gives up on the calls left: still running,
#: or cancelled, crashed, killed with their worker.
_FLUSH_QUIET_S = 0.5


def flush(timeout_s: float) -> bool:
    """Wait (at most ``timeout_s``) until the profiler has stored the rows of this
    process's finished calls; True if every call it is waiting for has its row.

    The last ``_ROWS_WAIT_CALLS`` calls of each function are waited for: until they
    all have rows, or, once their workers have sent what they hold, until the
    profiler is quiet (the calls left are still running, or never get a row).
    """
    with _SUBMITTED_LOCK:
        calls = {f: list(ids)[-_ROWS_WAIT_CALLS:] for f, ids in _SUBMITTED.items() if ids}
    if not calls:
        return True
    if not ray.is_initialized():
        return False
    from .session import NAMESPACE, profiler_name

    config = get_config()
    try:
        profiler = ray.get_actor(profiler_name(config), namespace=NAMESPACE)
    except Exception:  # noqa: BLE001 - no profiler: ended for good (``ray.kill``'s default no_restart)
        # Started again, as the next call would: workers send it the rows they hold, and
        # it tells which are stored (with none, the wait before ray.shutdown() ended at
        # once, and the rows of calls that ended in the last flush interval died with
        # their workers: a helper's audit lost 1-8 of 500).
        try:
            profiler = get_or_create_profiler(config)
        except Exception as exc:  # noqa: BLE001 - cannot make one: nothing to wait on
            logger.debug("raysched: no profiler to wait on (%s)", exc)
            return False
    return _await_rows(profiler, calls, timeout_s, give_up_when_quiet_after=rows_sent_within_s(config))


def _await_rows(profiler: Any, calls: dict[str, list[str]], timeout_s: float,
                give_up_when_quiet_after: float | None) -> bool:
    """Poll the profiler until it holds a row of each of ``calls`` (per function); True
    if it does. Gives up at ``timeout_s`` or, when ``give_up_when_quiet_after`` is set,
    once the profiler is quiet that many seconds in (the calls left are still running,
    or never get a row). Every call seen with a row, or given up on, is forgotten
    (``forget_calls``)."""
    started = time.monotonic()
    deadline = started + timeout_s
    quiet_by = started + give_up_when_quiet_after if give_up_when_quiet_after is not None else math.inf
    while True:
        try:
            missing, quiet = ray.get(profiler.unrecorded.remote(calls, _FLUSH_QUIET_S),
                                     timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - a profiler restarting, or busy past the timeout
            logger.debug("raysched: waiting for rows: %s", exc)
            return False
        for function, ids in calls.items():
            left = set(missing.get(function, ()))
            forget_calls(function, [c for c in ids if c not in left])
        if not missing:
            return True
        now = time.monotonic()
        if now >= deadline or (quiet and now >= quiet_by):
            for function, ids in missing.items():
                forget_calls(function, ids)
            return False
        calls = missing
        time.sleep(_FLUSH_POLL_S)


def _is_driver() -> bool:
    """Whether this process is a driver (a script, a Ray Job, a Ray Client), not a worker."""
    try:
        from ray._private.worker import WORKER_MODE, global_worker

        return global_worker.mode != WORKER_MODE
    except Exception:  # noqa: BLE001 - Ray's internals moved: treat it as a driver
        return True


def _flush_before_shutdown() -> None:
    """Keep the rows of the calls that finished: Ray kills the workers holding them (up to
    one flush interval) and the profiler writing them (up to a commit interval)."""
    try:
        timeout = get_config().shutdown_flush_timeout_s
        if timeout > 0 and ray.is_initialized():
            flush(timeout)
    except BaseException as exc:  # noqa: BLE001 - a shutdown must go on, even after a Ctrl-C here
        logger.debug("raysched: flush before shutdown: %s", exc)


def _flush_at_shutdown() -> None:
    """Flush before ``ray.shutdown()`` and before the process exits (once per process).

    Ray has no shutdown hook: ``ray.shutdown`` is wrapped.  At a plain exit Ray's own
    atexit handler calls its original ``shutdown``; the handler registered here runs
    before it (atexit runs the last registered first).
    """
    if getattr(ray.shutdown, "_raysched_flushes", False) or not _is_driver():
        return
    original = ray.shutdown

    @functools.wraps(original)
    def shutdown(*args: Any, **kwargs: Any) -> Any:
        _flush_before_shutdown()
        return original(*args, **kwargs)

    shutdown._raysched_flushes = True  # type: ignore[attr-defined]
    ray.shutdown = shutdown
    atexit.register(_flush_before_shutdown)
