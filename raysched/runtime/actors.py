"""``@adaptive_remote`` on a class: an actor sized from the past runs of its class, rescaled when its use diverges.

An actor's *incarnation* is measured like a task's attempt: from the start of its
``__init__`` to its end, in its own worker process (peak resident memory over
its life, CPU seconds and average cores, wall seconds, I/O), and recorded as one
profile row under the class's name and code hash.  The next actor of the class
is sized from those rows by the same predictor and sizing chain as a task; one
given no ``num_cpus`` and with no CPU history takes Ray's default for an actor
(1 CPU to be placed, none while it runs).

While it lives, the actor's process reports live samples to the monitor like a
running task (``kind="actor"``), and the monitor judges them by its actor rules
(``recipe.build_rules``): past a hard cap the actor is stopped and calls through
its handle fail with ``ResourceLimitExceeded``; memory past its allocation x
tolerance, or CPU use far off its allocation, held over several samples, is a
``rescale`` decision.

The rescale itself is done by the driver that holds the handle, in a background
thread (a submission never waits on it), and only for a class that opts in:
``rescalable=True`` (its state can be rebuilt by ``__init__``), or both hooks
``raysched_save_state(self) -> state`` and ``raysched_restore_state(self, state)``.
The handle then

1. asks the old actor for its state (queued after every call already sent to it),
2. creates the new actor with the new size and the same constructor arguments,
   and hands it the state as an ObjectRef (the driver does not wait for it),
3. sends every later call to the new actor (Ray runs them after the restore),
4. has the old actor record its row (an ``ok`` one: what it used is real) and
   exit once its queue is done (with the hooks: once the restore worked; if the save
   or the restore raised, the old actor serves on and its handle sends calls back to it),

and notes the rescale as an event.  Calls made before the switch finish on the
old actor, calls after it run on the new one: none is lost or run twice.  That order
holds only for an actor that runs one call at a time: an async or threaded one with
the hooks is not replaced (``actor_rescale_skipped``); nor is a named actor, or one whose
handle was passed on (a task's or an actor's argument, ``ray.put``): the handles others
hold would not follow the successor.

The row is recorded when the incarnation ends through its handle: ``raysched.terminate()``,
a rescale, or the handle dropped (``__del__`` sends the actor one last call).  A handle's
drop does not end a detached, named or passed-on actor's measurement: it may live on.
The code that runs inside the actor's process is in ``runtime.actor_worker``.

Limits: an actor that dies abruptly (SIGKILL, its node lost), or still runs when
its driver exits, records no row for that incarnation (Ray kills an exiting
actor's process within ~100 ms, too soon for a row); Ray's own ``max_restarts`` is
0 unless the caller sets it.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, replace
from typing import Any, Mapping

import ray

from ..config import RayschedConfig
from ..errors import InvalidInput, RayschedError
from ..policy.rescale import CPU_RULE
from ..policy.rules import ACTOR_RESCALE_SKIPPED, ACTOR_RESCALED, ACTOR_STATE_LOST, RESCALE, STOP_LIMIT, WARN, Decision
from ..types import Allocation, Outcome
from .client import note_submitted
from .actor_worker import RESTORE_HOOK, SAVE_HOOK, _is_async, actor_options, make_actor_class
from .decorator import _WATCH_ENDS as _ON_READY, _Adaptive
from .options import ACTOR_DEFINITION_OPTIONS, definition_options, eligible_cluster, ray_remote
from .session import NAMESPACE, monitor_name, session_token
from .spec import AttemptSpec, encode_spec

logger = logging.getLogger(__name__)

#: How long a replaced incarnation that died before finishing its queue is still asked
#: about: the monitor's stop for it (a hard limit) says whether the actor must fail.
_DEAD_INCARNATION_WATCH_S = 10.0
#: How long after ``ray.kill`` read a handle's actor id a rescale waits (the kill lands in
#: milliseconds; the monitor gives the same decision again at the watcher's next round).
_KILL_SETTLE_S = 1.0


# --- in the driver --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rescale:
    """One replacement of an actor: when, from which size to which, and the decision behind it."""

    incarnation: int  # of the new actor
    old: Allocation
    new: Allocation
    decision: Decision
    at: float  # time.time()


class AdaptiveActorClass(_Adaptive):
    """A class run as a Ray actor with resources learnt from the past runs of the class.

    ``Cls.remote(*args, **kwargs)`` returns an :class:`AdaptiveActorHandle`;
    ``Cls.options(input_size=..., tags=..., priority=..., **ray_options)`` one with
    per-actor metadata (a ``priority`` is only recorded in the actor's rows: actors are
    not queued, and the node-pressure rule never picks one); ``Cls.predict(*args,
    **kwargs)`` the Prediction for such an actor without creating it.
    """

    _ray_kind = "actor"

    def __init__(self, cls: type, *, name: str | None = None, tags: Any = (), num_cpus: Any = None,
                 memory: Any = None, dependencies: Any = (), rescalable: bool | None = None,
                 max_attempts: Any = None, measure_every_call: Any = None, **ray_options: Any):
        if max_attempts is not None:
            raise InvalidInput("max_attempts is for tasks; an actor is rescaled at most "
                               "config.actor_max_rescales times")
        if measure_every_call is not None:
            raise InvalidInput("measure_every_call is for tasks; an actor is measured as a whole, "
                               "one row per incarnation")
        has_save, has_restore = callable(getattr(cls, SAVE_HOOK, None)), callable(getattr(cls, RESTORE_HOOK, None))
        if has_save != has_restore:
            raise InvalidInput(f"{cls.__qualname__} defines {SAVE_HOOK if has_save else RESTORE_HOOK} without "
                               f"{RESTORE_HOOK if has_save else SAVE_HOOK}: define both, or neither")
        if callable(getattr(cls, API_ATTRIBUTE, None)):
            raise InvalidInput(f"{cls.__qualname__} defines a method {API_ATTRIBUTE!r}: on an adaptive actor's handle "
                               f"that name is raysched's own (handle.{API_ATTRIBUTE}.allocation, ...); rename it")
        if rescalable is not None and not isinstance(rescalable, bool):
            raise InvalidInput(f"rescalable must be True or False, got {rescalable!r}")
        super().__init__(cls, name, tags, num_cpus, memory, dependencies, ray_options)
        self._cls = cls
        #: Whether the monitor may replace its actors: declared, or implied by the two hooks.
        self.rescalable = has_save if rescalable is None else rescalable
        #: Whether a rescale hands the old actor's state to the new one (the two hooks).
        self.hands_over_state = has_save
        #: Whether Ray runs its calls as coroutines on one event loop (an async actor).
        self.is_async = _is_async(cls)
        self._ray_class: Any = None
        self._ray_class_config: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"Actors cannot be instantiated directly. Instead of '{self.name}()', "
                        f"use '{self.name.rsplit('.', 1)[-1]}.remote()'.")

    def __repr__(self) -> str:
        return f"AdaptiveActorClass({self.name}, code_hash={self.code_hash})"

    def ray_class(self, config: RayschedConfig) -> Any:
        """The Ray actor class behind every incarnation (one per config)."""
        if self._ray_class is None or self._ray_class_config is not config:
            definition = definition_options(self._ray_options, ACTOR_DEFINITION_OPTIONS)
            self._ray_class = ray_remote(make_actor_class(self._cls, config), definition)
            self._ray_class_config = config
        return self._ray_class

    def _plan(self, options: Any, args: tuple, kwargs: Mapping[str, Any]):
        """The first incarnation's spec, and the client it was sized with."""
        from .client import get_client

        client = get_client()
        spec = self._first_spec(client, options, self._features(options, args, kwargs),
                                client.fresh_bundle(self.name, self.code_hash), client.cluster.get(),
                                call_id="actor-" + os.urandom(12).hex(), rescalable=self.rescalable)
        if self.fallback.cpu is None and "num_cpus" not in options.explicit and spec.prediction.cpu.n_history == 0:
            # Nothing says how many cores it needs: as a plain Ray actor, 1 CPU to be placed
            # and none while it runs. Holding the fallback's CPU for its whole life would let
            # N idle actors on N CPUs starve every other actor and task.
            allocation = replace(spec.allocation, num_cpus=0.0,
                                 reason=f"{spec.allocation.reason}; CPU: Ray's actor default (1 to be placed, "
                                        f"0 while it runs)")
            spec = replace(spec, allocation=allocation, ray_default_cpus=True)
        if self.fallback.memory is None and "memory" not in options.explicit and spec.prediction.memory.n_history == 0:
            # Nor how much memory: as a plain Ray actor, no `memory` label. The default
            # fallback (1 GiB) held for an actor's whole life would keep a handful of
            # light actors from fitting a node. The rows of its incarnations size the later
            # ones, once there are min_history_for_stats of them (as for a task).
            allocation = replace(spec.allocation, memory_bytes=0, memory_is_task_only=False,
                                 reason=f"{spec.allocation.reason}; memory: Ray's actor default (no label)")
            spec = replace(spec, allocation=allocation)
        return client, spec

    def _create(self, options: Any, args: tuple, kwargs: Mapping[str, Any]) -> "AdaptiveActorHandle":
        self._check_arguments(args, kwargs)
        client, spec = self._plan(options, args, kwargs)
        return AdaptiveActorHandle(self, client, spec, args, dict(kwargs))

    def remote(self, *args: Any, **kwargs: Any) -> "AdaptiveActorHandle":
        return self._create(self._call_options({}), args, kwargs)

    def options(self, **options: Any) -> "_BoundActorClass":
        return _BoundActorClass(self, self._call_options(options))

    def predict(self, *args: Any, **kwargs: Any):
        return self._predict(self._call_options({}), args, kwargs)

    def _predict(self, options: Any, args: tuple, kwargs: Mapping[str, Any]):
        from .client import get_client

        get_client().refresh(self.name, self.code_hash)  # a query, not a creation: it may wait for the newest
        return self._plan(options, args, kwargs)[1].prediction

    def refresh(self, train: bool = False, timeout: float = 120.0) -> None:
        """Fetch the newest bundle now; with ``train=True`` train on every row first."""
        from .client import get_client

        get_client().refresh(self.name, self.code_hash, train=train, timeout=timeout)


class _BoundActorClass:
    """``Cls.options(...)``: the same class with per-actor metadata and Ray options."""

    def __init__(self, actor_class: AdaptiveActorClass, options: Any):
        self._class, self._options = actor_class, options

    def remote(self, *args: Any, **kwargs: Any) -> "AdaptiveActorHandle":
        return self._class._create(self._options, args, kwargs)

    def predict(self, *args: Any, **kwargs: Any):
        return self._class._predict(self._options, args, kwargs)


class _Method:
    """``handle.method``: ``.remote(...)`` sends the call to the actor's current incarnation."""

    __slots__ = ("_handle", "_name", "_ray_options")

    def __init__(self, handle: "AdaptiveActorHandle", name: str, ray_options: Mapping[str, Any] | None = None):
        self._handle, self._name, self._ray_options = handle, name, dict(ray_options or {})

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._handle._call(self._name, self._ray_options, args, kwargs)

    def options(self, **ray_options: Any) -> "_Method":
        return _Method(self._handle, self._name, {**self._ray_options, **ray_options})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hint = (f" (raysched's own {self._name} is handle.{API_ATTRIBUTE}.{self._name})"
                if self._name in _LEGACY_ATTRIBUTES else "")
        raise TypeError(f"Actor methods cannot be called directly. Instead of running "
                        f"'object.{self._name}()', try 'object.{self._name}.remote()'{hint}.")


#: The one attribute of a handle that is raysched's, not the user's: ``handle.raysched``.
#: A class that defines a method of that name is refused (its handle could not reach both).
API_ATTRIBUTE = "raysched"
#: Attributes a handle had before ``handle.raysched``: still answered, as aliases of
#: ``handle.raysched.<name>``, for a class that has no method of that name (a method wins).
_LEGACY_ATTRIBUTES = frozenset({"actor_id", "incarnation", "allocation", "prediction", "ray_handle", "rescales",
                                "terminate"})
#: Methods Ray adds to every actor (``handle.__ray_ready__.remote()`` is the usual wait until
#: it is up): sent, as on Ray's handle, to the current incarnation.
_RAY_ACTOR_METHODS = frozenset({"__ray_ready__", "__ray_terminate__", "__ray_call__"})


class AdaptiveActorAPI:
    """raysched's side of an adaptive actor's handle, ``handle.raysched``.

    Kept out of the handle's own namespace so that a user method of any other name
    (``terminate``, ``prediction``, ...) is called as with Ray's handle.
    """

    __slots__ = ("_handle",)

    def __init__(self, handle: "AdaptiveActorHandle"):
        self._handle = handle

    @property
    def actor_id(self) -> str:
        """raysched's id of this actor, the same across rescales (its rows' and events' ``call_id``)."""
        return self._handle._spec.call_id

    @property
    def incarnation(self) -> int:
        """1 for the first actor, +1 per rescale."""
        return self._handle._spec.attempt

    @property
    def allocation(self) -> Allocation:
        """What the current incarnation was created with."""
        return self._handle._spec.allocation

    @property
    def prediction(self):
        """The Prediction the first incarnation was sized from."""
        return self._handle._spec.prediction

    @property
    def ray_handle(self) -> Any:
        """The current incarnation's Ray ``ActorHandle``."""
        return self._handle._actor

    @property
    def rescales(self) -> list[Rescale]:
        """Every rescale of this actor, oldest first."""
        return self._handle._rescales

    def terminate(self) -> Any:
        """Record the actor's row and end it after the calls already sent; returns the ref of its Usage."""
        return self._handle._terminate()

    def __repr__(self) -> str:
        return f"AdaptiveActorAPI({self._handle!r})"


class AdaptiveActorHandle(ray.actor.ActorHandle):
    """A handle to an adaptive actor; it follows the actor across rescales.

    A Ray ``ActorHandle`` to Ray's own functions: ``ray.kill(handle)`` kills the current
    incarnation (and a rescale never replaces a dead one); passed to a task or another
    actor, or ``ray.put``, it arrives as the current incarnation's Ray handle.  None of
    Ray's ``ActorHandle`` state is set: Ray reads only ``_ray_actor_id`` (kill) and
    ``_serialization_helper`` (a task's argument), both the current incarnation's.

    ``handle.method.remote(...)`` returns the method's ``ObjectRef`` as Ray's handle
    does, for every method of the class.  raysched's own API is ``handle.raysched``:
    ``allocation`` and ``incarnation`` say what the actor runs with now, ``rescales``
    what changed, ``ray_handle`` is the current Ray ``ActorHandle``; ``terminate()``
    records the actor's row and ends it.  Those names also work on the handle itself
    (``handle.allocation``) unless the class has a method of that name.
    """

    def __init__(self, actor_class: AdaptiveActorClass, client: Any, spec: AttemptSpec, args: tuple,
                 kwargs: dict[str, Any]):
        self._class = actor_class
        self._client = client
        self._config = client.config
        self._lock = threading.RLock()
        self._args, self._kwargs = args, kwargs  # kept: a rescale constructs the actor again
        #: Whether this handle was passed on (to a task, another actor, ray.put): the actor may then
        #: outlive it, so dropping it does not end the actor's measurement (``__del__``).
        self._passed = False
        self._spec = spec
        #: The calls sent to an actor that runs calls at once and not ended yet (None: it runs
        #: one at a time, in order, and its row's recording comes after them by itself).
        self._in_flight = _InFlight() if _concurrency(actor_class, spec.ray_options) else None
        self._actor = self._start(spec)
        self._stopped: BaseException | None = None
        self._id_read_at = float("-inf")  # when Ray (ray.kill) last read the current actor's id
        self._handled: set[tuple[int, str]] = set()  # (incarnation, rule) already acted on
        #: Replaced incarnations still running the calls queued before the switch: live key ->
        #: (their spec, the ref of their final row). Their hard cap still applies.
        self._draining: dict[str, tuple[AttemptSpec, Any, float | None]] = {}
        self._rescales: list[Rescale] = []
        #: The last rescale's state hand-over (the refs of its restore and of the saved state,
        #: the new incarnation's spec) until it is known to have worked.
        self._restoring: tuple[Any, Any, AttemptSpec] | None = None
        _watcher().watch(self)

    def _start(self, spec: AttemptSpec) -> Any:
        cls = self._class.ray_class(self._config)
        return cls.options(**actor_options(spec)).remote(encode_spec(spec), *self._args, **self._kwargs)

    @property
    def _raysched_actor_id(self) -> str:
        return self._spec.call_id

    # --- what the user sees ------------------------------------------------------------------------------
    @property
    def raysched(self) -> AdaptiveActorAPI:
        """raysched's API of this handle (a property: no user method can hide it). Made anew on each
        access: kept on the handle, it and the handle would be a cycle, and a dropped handle would
        end its actor only at the next garbage collection instead of at once, as Ray's does."""
        return AdaptiveActorAPI(self)

    def __getattr__(self, name: str) -> Any:
        if name in _RAY_ACTOR_METHODS:
            return _Method(self, name)
        cls = self.__dict__.get("_class")  # absent while __init__ runs (or after it failed)
        if cls is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        if callable(getattr(cls._cls, name, None)):
            return _Method(self, name)  # the user's method (a _private one too, as on Ray's handle) wins
        if name.startswith("_"):
            raise AttributeError(name)
        if name in _LEGACY_ATTRIBUTES:
            return getattr(self.raysched, name)
        raise AttributeError(f"{self._class.name} has no method {name!r}")

    def __del__(self) -> None:
        # Dropped without terminate(): have the actor record its row first. Ray runs the
        # calls already sent to an actor before it ends one whose handles are all gone.
        try:
            if self._stopped is None and not self._outlives_handle() and ray.is_initialized():
                self._actor._raysched_finish.remote(Outcome.OK.value, "", self._calls_before())
        except Exception:  # noqa: BLE001 - a driver shutting down: the row is lost, nothing else
            pass

    def _outlives_handle(self) -> bool:
        """Whether the actor may live on once this handle is gone: detached, named (others reach
        it by ray.get_actor or get_if_exists), or passed on. Such an actor keeps being measured
        and held to its hard cap; its row is recorded by ``terminate()``, or lost with its process."""
        options = dict(self._spec.ray_options)
        return self._passed or bool(options.get("name")) or options.get("lifetime") == "detached"

    def __reduce__(self):
        # Passed to a task or another actor, the handle travels as the current incarnation's
        # Ray ActorHandle: calls from there go to that actor, which a rescale ends once its
        # queue is done (the rescale and its state hand-over are this driver's business).
        self._passed = True
        return (_current_actor, (self._actor,))

    # --- what Ray reads of an ActorHandle -------------------------------------------------------------------
    @property
    def _ray_actor_id(self) -> Any:
        """The current incarnation's actor id: what ``ray.kill`` kills."""
        with self._lock:
            # ray.kill reads it just before it kills: a rescale waits until the kill has landed
            # (then it finds the actor dead), or it could replace the actor being killed.
            self._id_read_at = time.monotonic()
            return self._actor._ray_actor_id

    def _serialization_helper(self) -> Any:
        # Ray serializes an ActorHandle that is a task's argument (not nested in another
        # object) or ray.put's value by this, not by __reduce__: the same hand-over.
        self._passed = True
        return self._actor._serialization_helper()

    __eq__ = object.__eq__  # one handle is one actor across rescales; Ray's compare actor ids
    __hash__ = object.__hash__

    def __dir__(self) -> list[str]:
        methods = [n for n in dir(self._class._cls) if not n.startswith("_") and callable(getattr(self._class._cls, n))]
        return sorted({*methods, API_ATTRIBUTE})

    def __repr__(self) -> str:
        a = self._spec.allocation
        return (f"AdaptiveActorHandle({self._class.name}, incarnation={self._spec.attempt}, "
                f"num_cpus={a.num_cpus:g}, memory={a.memory_bytes // 2**20} MiB)")

    def _call(self, name: str, ray_options: Mapping[str, Any], args: tuple, kwargs: Mapping[str, Any]) -> Any:
        with self._lock:  # a rescale swaps the actor under this lock: a call goes wholly to one or the other
            if self._stopped is not None:
                raise self._stopped
            if name == "__ray_terminate__":
                # Ray's graceful exit, asked through this handle: the actor records its row first
                # (after its exit Ray gives it no time to), and no rescale brings it back.
                _watcher().unwatch(self)
                self._actor._raysched_finish.remote(Outcome.OK.value, "terminated by __ray_terminate__",
                                                    self._calls_before())
            method = getattr(self._actor, name)
            if ray_options:
                method = method.options(**ray_options)
            result = method.remote(*args, **kwargs)
            if self._in_flight is not None:
                self._in_flight.add(result)
            return result

    def _calls_before(self) -> list:
        """For ``_raysched_finish``: [the refs of the calls still running on an actor that runs
        calls at once] (nested in a list: Ray hands them over unresolved)."""
        return [self._in_flight.pending()] if self._in_flight is not None else []

    def _terminate(self) -> Any:
        with self._lock:
            _watcher().unwatch(self)
            if self._stopped is not None:
                return None
            self._stopped = InvalidInput(f"actor {self._class.name} ({self._spec.call_id}) was terminated")
            actor = self._actor
            ref = actor._raysched_finish.remote(Outcome.OK.value, "terminated by its handle", self._calls_before())
            if self._in_flight is not None:
                # Its calls run at once: sent now, the end could overtake the row's recording
                # (whose ref then failed with ActorDiedError). End it once the row is in.
                threading.Thread(target=_end_after, args=(actor, ref), name="raysched-actor-end", daemon=True).start()
            else:
                actor.__ray_terminate__.remote()  # runs after the recording: calls run in order
            return ref

    # --- what the watcher does ------------------------------------------------------------------------------
    def _watch_keys(self) -> list[str]:
        """The monitor's keys of this actor's incarnations still running: the current one, and
        replaced ones still working through their queue (or dead, until the monitor says why)."""
        with self._lock:
            if self._restoring is not None:
                self._check_restored()
            if self._draining:
                refs = [entry[1] for entry in self._draining.values() if entry[2] is None]
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
                now = time.monotonic()
                for key, (spec, ref, gone_at) in list(self._draining.items()):
                    if gone_at is None and ref in done:
                        try:
                            ray.get(ref, timeout=0)
                        except Exception:  # noqa: BLE001 - it died first: ask the monitor a while longer
                            self._draining[key] = (spec, ref, now)
                            continue
                        del self._draining[key]  # finished its queue and recorded its row
                    elif gone_at is not None and now - gone_at > _DEAD_INCARNATION_WATCH_S:
                        logger.warning("raysched: actor %s incarnation %d died before finishing its queue",
                                       spec.function, spec.attempt)
                        del self._draining[key]
            return [self._spec.live_key, *self._draining]

    def _check_restored(self) -> None:
        """Whether the last rescale's state reached the new incarnation; if its save or restore
        raised, the incarnation ended (``_raysched_restore``): later calls fail saying why."""
        restored, state, spec, old_actor, old_spec = self._restoring
        done, _ = ray.wait([restored], timeout=0, fetch_local=False)
        if not done:
            return
        self._restoring = None
        try:
            ray.get(restored, timeout=0)
            return
        except Exception:  # noqa: BLE001 - the save or the restore raised (the incarnation ended), or it died
            pass
        old_died = False
        try:
            ray.get(state, timeout=0)  # the save's own error says the most
            cause = "its restore hook raised, or it died (its row in raysched.profiles says which)"
        except ray.exceptions.RayActorError as exc:
            old_died, cause = True, f"its predecessor died before its state was saved: {exc}"
        except Exception as exc:  # noqa: BLE001
            cause = f"its predecessor's save hook raised: {exc}"
        if self._stopped is None and spec.attempt == self._spec.attempt and not old_died and not _is_dead(old_actor):
            # The predecessor still holds the state (nothing was sent to it after the save,
            # and it did not end: _raysched_retire): calls go back to it. Only those sent to
            # the failed successor meanwhile fail (with ActorDiedError), having never run.
            # The rescale goes first: one who sees the old incarnation serve again sees it undone
            # (the other order left a moment with incarnation 1 and the rescale to 2 listed).
            rescale = self._rescales.pop() if self._rescales and self._rescales[-1].incarnation == spec.attempt else None
            self._actor, self._spec = old_actor, old_spec
            self._draining.pop(old_spec.live_key, None)
            if rescale is not None:
                self._skip(replace(rescale.decision, timestamp=time.time()),
                           f"the state could not be handed over to its incarnation {spec.attempt} ({cause}); "
                           f"incarnation {old_spec.attempt} serves on with its state", warn=True)
            return
        if self._stopped is None and spec.attempt == self._spec.attempt:
            self._stopped = RayschedError(
                f"actor {self._class.name} ({spec.call_id}): its state could not be handed over to its incarnation "
                f"{spec.attempt} at a rescale, which therefore ended (calls sent to it fail): {cause}")
            _watcher().unwatch(self)
            logger.warning("raysched: %s", self._stopped)
            self._note(Decision(ACTOR_STATE_LOST, WARN, spec.function, spec.call_id, spec.attempt,
                                detail=str(self._stopped)[:2000], code_hash=spec.code_hash, timestamp=time.time()))

    def _apply(self, decision: Decision) -> Rescale | None:
        """Act on the monitor's decision for one of this actor's incarnations (the watcher's thread)."""
        with self._lock:
            spec = self._spec
            key = (decision.attempt, decision.rule)
            current = decision.attempt == spec.attempt
            draining = any(entry[0].attempt == decision.attempt for entry in self._draining.values())
            if self._stopped is not None or not (current or draining) or key in self._handled:
                return None
            if decision.action == RESCALE and time.monotonic() - self._id_read_at < _KILL_SETTLE_S:
                return None  # a ray.kill may be on its way: the monitor still says so next round
            self._handled.add(key)
            if decision.action == STOP_LIMIT:
                # Over its hard cap: the incarnation stops itself (runtime.actors._Incarnation).
                # If it was being replaced, its state never reached its successor: end that too.
                self._stopped = decision.limit_error()
                # Its row is on its way from the stopped process: raysched.profiles(Cls) waits
                # for it, as for a task this process submitted.
                note_submitted(self._class.name, spec.call_id)
                _watcher().unwatch(self)
                if not current:
                    self._actor._raysched_finish.remote(Outcome.CANCELLED.value,
                                                        "its predecessor's state was lost at its hard limit")
                    self._actor.__ray_terminate__.remote()
                return None
            if decision.action != RESCALE or not current:
                return None
            if _is_dead(self._actor):
                # ray.kill(handle), or its process ended: a rescale would bring it back.
                _watcher().unwatch(self)
                self._skip(decision, "the actor is dead (ray.kill, or its process ended)")
                return None
            name = dict(spec.ray_options).get("name")
            if name:
                # Ray lets one live actor hold a name: a successor could take it only once the old
                # actor has ended, holding back every call sent meanwhile; and the handles others
                # got by ray.get_actor(name) would not follow it.
                self._skip(decision, f"a named actor ({name!r}) is never replaced: the new actor could not take "
                                     f"its name while the old one lives", warn=True)
                return None
            if self._passed:
                # Its Ray handle was handed over (a task's or an actor's argument, ray.put): the
                # holders there would keep calling this incarnation, which a rescale ends, and their
                # calls would fail with ActorDiedError (or, with the hooks, lose their effects).
                self._skip(decision, "its handle was passed to a task, an actor or ray.put, and the handles "
                                     "there would not follow a successor", warn=True)
                return None
            concurrency = _concurrency(self._class, spec.ray_options)
            if concurrency and self._class.hands_over_state:
                # The hand-over relies on Ray's call order: the save after every call already
                # sent, the restore before every later one. An actor that runs calls at once
                # (threads, coroutines) breaks both, and its calls' effects would be lost silently.
                self._skip(decision, f"{concurrency}: its state could not be handed over without losing "
                                     f"the effects of calls running meanwhile", warn=True)
                return None
            from ..policy.recipe import build_sizer
            from ..policy.rescale import rescale_target

            cluster = eligible_cluster(self._client.cluster.get(), spec.ray_options)  # a pinned actor: its node
            target = rescale_target(decision.rule, decision.measured, spec.allocation, build_sizer(self._config),
                                    self._config, cluster, spec.function)
            if target is None:  # capped by the largest node (the monitor judged without the cluster)
                self._skip(decision, "no other size would help")
                return None
            old_actor, old_spec = self._actor, spec
            new_spec = replace(spec, attempt=spec.attempt + 1, allocation=target)
            try:
                new_actor = self._start(new_spec)
            except Exception as exc:  # noqa: BLE001 - e.g. an option Ray takes for one actor only
                self._skip(decision, f"creating its successor failed: {type(exc).__name__}: {exc}", warn=True)
                return None
            state = old_actor._raysched_save.remote()  # after every call already sent to it
            # Before every call sent from now on; and to an actor that runs one call at a time,
            # after the old one has run every call sent before (Ray's order for one caller), even
            # with nothing to hand over. One that runs calls at once promises no order.
            restored = new_actor._raysched_restore.remote([] if concurrency else [state])
            self._actor, self._spec = new_actor, new_spec
            # Its row is an ordinary "ok" one (outcomes are a fixed set); the rescale is an event.
            if self._class.hands_over_state:
                # It runs one call at a time (else skipped above). It records its row and ends once
                # the restore worked; if the save or the restore failed it serves on, on its state,
                # and the watcher (_check_restored) sends the calls back to it.
                self._restoring = (restored, state, new_spec, old_actor, old_spec)
                finished = old_actor._raysched_retire.remote([restored])
                old_actor._raysched_end.remote()
            else:
                finished = old_actor._raysched_finish.remote(Outcome.OK.value, "", self._calls_before())
                if self._in_flight is not None:
                    # Its calls run at once: ended now, it could end before its row is recorded.
                    self._in_flight = _InFlight()  # the successor's calls from here on
                    threading.Thread(target=_end_after, args=(old_actor, finished), name="raysched-actor-end",
                                     daemon=True).start()
                else:
                    old_actor.__ray_terminate__.remote()
            self._draining[old_spec.live_key] = (old_spec, finished, None)
            done = Rescale(new_spec.attempt, old_spec.allocation, target, decision, time.time())
            self._rescales.append(done)
        logger.warning("raysched: actor %s rescaled: %s -> %s (%s)", spec.function, _size(old_spec.allocation),
                       _size(target), decision.detail)
        # The new size against the old, in the unit of what was rescaled: cores or bytes.
        cores = decision.rule == CPU_RULE
        self._note(Decision(ACTOR_RESCALED, RESCALE, spec.function, new_spec.live_key, new_spec.attempt,
                            measured=float(target.num_cpus if cores else target.memory_bytes),
                            allocated=float(old_spec.allocation.num_cpus if cores else old_spec.allocation.memory_bytes),
                            detail=f"{_size(old_spec.allocation)} -> {_size(target)}: {target.reason}",
                            node_id=decision.node_id, code_hash=spec.code_hash, timestamp=time.time()))
        return done

    def _skip(self, decision: Decision, why: str, warn: bool = False) -> None:
        """Leave the actor as it is: an event that says why, and with ``warn`` a warning too."""
        if warn:
            logger.warning("raysched: actor %s not rescaled: %s (%s)", decision.function, why, decision.detail)
        self._note(replace(decision, rule=ACTOR_RESCALE_SKIPPED, action=WARN,
                           detail=f"not rescaled: {why}; {decision.detail}"))

    def _note(self, decision: Decision) -> None:
        """An event for what this driver did; fire-and-forget to the monitor."""
        try:
            monitor = ray.get_actor(monitor_name(self._config), namespace=NAMESPACE)
            monitor.note.remote([decision])  # sent while the handle is held (see client._start_monitor)
        except Exception as exc:  # noqa: BLE001 - no monitor: the decision is logged only
            logger.warning("raysched: could not record %s for %s: %s", decision.rule, decision.function, exc)


def _concurrency(actor_class: AdaptiveActorClass, ray_options: Any) -> str:
    """How the actor runs several calls at once ("" if it runs one at a time, in order)."""
    options = dict(ray_options)
    if actor_class.is_async:
        return "an async actor interleaves its calls"
    if (options.get("max_concurrency") or 1) > 1:
        return f"a threaded actor (max_concurrency={options['max_concurrency']}) runs calls at once"
    if options.get("concurrency_groups"):
        return "an actor with concurrency groups runs calls at once"
    return ""


class _InFlight:
    """The calls a handle sent to an actor that runs calls at once, until each has ended: the
    actor's row waits for them (``_raysched_finish``). A ref is held only until it exists
    (Ray drops the callback of a ref nobody holds); without ``_on_ready`` (Ray 2.40) the ones
    that ended are found by ``ray.wait`` when there are many, and when they are asked for."""

    _PRUNE_AT = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[int, Any] = {}
        self._next = 0

    def add(self, result: Any) -> None:
        ref = result[0] if isinstance(result, list) and result else result
        if not isinstance(ref, ray.ObjectRef):
            return  # num_returns=0, or a generator: nothing to wait on
        with self._lock:
            self._next += 1
            key = self._next
            self._refs[key] = ref
            prune = not _ON_READY and len(self._refs) > self._PRUNE_AT
        if _ON_READY:
            ref._on_ready(lambda _exc, key=key: self._ended(key))  # outside the lock: it may run at once
        elif prune:
            self.pending()

    def _ended(self, key: int) -> None:  # on a Ray thread: quick
        with self._lock:
            self._refs.pop(key, None)

    def pending(self) -> list:
        with self._lock:
            items = list(self._refs.items())
        if items and not _ON_READY:
            done, _ = ray.wait([r for _, r in items], num_returns=len(items), timeout=0, fetch_local=False)
            ended = {id(r) for r in done}
            with self._lock:
                for key, ref in items:
                    if id(ref) in ended:
                        self._refs.pop(key, None)
            items = [(k, r) for k, r in items if id(r) not in ended]
        return [r for _, r in items]


def _end_after(actor: Any, ref: Any, timeout_s: float | None = None) -> None:
    """End ``actor`` once ``ref`` (its row's recording) has resolved, or after ``timeout_s``."""
    try:
        ray.wait([ref], timeout=timeout_s)
        actor.__ray_terminate__.remote()
    except Exception as exc:  # noqa: BLE001 - a thread: say it, never raise
        logger.warning("raysched: could not end actor %s: %s", actor, exc)


def _current_actor(actor: Any) -> Any:
    return actor


def _is_dead(actor: Any) -> bool:
    """Whether Ray's GCS has this actor dead; asked there, not of the driver's copy of its
    state, which learns of a ``ray.kill`` only a moment after the call returns."""
    try:
        info = ray._private.state.actors(actor._actor_id.hex())
    except Exception as exc:  # noqa: BLE001 - the GCS not answering: act as before, on the decision
        logger.debug("raysched: could not look up actor %s: %s", actor, exc)
        return False
    return bool(info) and info.get("State") == "DEAD"


def _size(a: Allocation) -> str:
    return f"{a.num_cpus:g} CPU / {a.memory_bytes // 2**20} MiB"


class ActorWatcher:
    """The driver's one thread that asks the monitor about its adaptive actors and applies the answers.

    Every ``interval_s`` it sends one ``directives`` request for the running
    incarnations of all live handles (weakly held: a dropped handle is not
    watched) and hands each stop or rescale to its handle.  ``directives(ids) -> {id: Decision}`` is injected, so a test can
    drive it without Ray; it runs in its own thread, never on a submission's path.
    """

    def __init__(self, directives: Any, interval_s: float):
        self._directives = directives
        self._interval = interval_s
        self._handles: "weakref.WeakValueDictionary[str, AdaptiveActorHandle]" = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, handle: Any) -> None:
        with self._lock:
            self._handles[handle._raysched_actor_id] = handle
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="raysched-actor-watcher", daemon=True)
                self._thread.start()

    def unwatch(self, handle: Any) -> None:
        with self._lock:
            self._handles.pop(handle._raysched_actor_id, None)

    def check_once(self) -> list[Rescale]:
        """Ask once and apply the answers; returns the rescales done."""
        with self._lock:
            handles = list(self._handles.values())
        by_key = {key: handle for handle in handles for key in handle._watch_keys()}
        if not by_key:
            return []
        done = []
        for key, decision in self._directives(sorted(by_key)).items():
            handle = by_key.get(key)
            if handle is not None and decision.stops:
                rescale = handle._apply(decision)
                if rescale is not None:
                    done.append(rescale)
        return done

    def _run(self) -> None:
        while True:
            time.sleep(self._interval)
            with self._lock:
                if not self._handles or not ray.is_initialized():
                    self._thread = None
                    return
            try:
                self.check_once()
            except SystemExit:  # Ray shutting down under a pending call: the driver is leaving
                return
            except Exception as exc:  # noqa: BLE001 - the monitor restarting: ask again next time
                logger.debug("raysched: actor watcher: %s", exc)


def _ray_directives(config: RayschedConfig):
    handle: list[Any] = []
    session: list[str | None] = [None]

    def directives(ids: list[str]) -> dict[str, Decision]:
        token = session_token()
        if session[0] != token:  # Ray restarted in this process: the old handle is of a dead cluster
            handle.clear()
            session[0] = token
        if not handle:
            handle.append(ray.get_actor(monitor_name(config), namespace=NAMESPACE))
        try:
            return ray.get(handle[0].directives.remote(ids), timeout=config.monitor_directive_timeout_s)
        except Exception:
            handle.clear()
            raise

    return directives


_WATCHER: ActorWatcher | None = None
_WATCHER_LOCK = threading.Lock()


def _watcher() -> ActorWatcher:
    global _WATCHER
    with _WATCHER_LOCK:
        if _WATCHER is None:
            from .session import get_config

            config = get_config()
            _WATCHER = ActorWatcher(_ray_directives(config), config.live_interval_s)
        return _WATCHER


__all__ = ["AdaptiveActorClass", "AdaptiveActorHandle", "AdaptiveActorAPI", "ActorWatcher", "Rescale", "make_actor_class",
           "actor_options"]
