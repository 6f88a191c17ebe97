"""``@adaptive_remote``: a Ray remote function whose resources come from its past runs.

Per call: features of the arguments -> the prediction from the bundle the driver
holds (no actor round trip) -> sizing -> one direct Ray submission of the user's
function behind a thin measuring wrapper.  The returned value is the task's own
``ObjectRef``.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from collections import OrderedDict
from typing import Any, Callable, Mapping

import numpy as np
import ray

from .._docs import ADAPTIVE_REMOTE_DOC
from ..errors import InvalidInput, InvalidRayOption
from ..policy.admission import expected_peak_bytes, order_key
from ..policy.estimators import Fallback, runs_with_tags
from ..policy.features import (call_features, validate_input_size, validate_memory, validate_num_cpus, validate_priority,
                               validate_tags)
from ..policy.sizing import largest_node_for
from ..policy.stranding import Ask, at_risk
from ..types import Prediction
from .client import ProfilerClient, get_client, note_submitted, size_band
from .codehash import code_hash, qualified_name, with_dependencies
from .options import (ACTOR_DEFINITION_OPTIONS, TASK_DEFINITION_OPTIONS, ask_a_return, captured_placement_group,
                      definition_options, eligible_cluster, label_selectors, node_constraints, placement_group_of,
                      ray_remote, ray_task_name, remote_options)
from .spec import AttemptSpec, encode_call, encode_features, encode_template
from .worker import inside_ray, make_entry

#: Per-call metadata that is raysched's, not Ray's.
_META_KEYS = ("input_size", "tags", "priority")
#: Ray options raysched sizes itself; set explicitly by the caller they win.
_SIZED_KEYS = ("num_cpus", "memory")


#: Sizes of ObjectRef arguments already looked up, by object id (an object never changes
#: size): one object passed to many calls, as a shared model or table is, costs one lookup,
#: not one per call. Keyed by the id's bytes, not the ref: a ref held here would keep Ray
#: from freeing the object.
_REF_SIZES: "OrderedDict[bytes, int]" = OrderedDict()
_REF_SIZES_MAX = 4096
#: Refs this process's core worker knew nothing of, and whose owner was asked once
#: (a round trip): not asked again for each call that passes them.
_REF_ASKED: "OrderedDict[bytes, None]" = OrderedDict()


def _ref_size(value: Any) -> int | None:
    """Ray's recorded size of an ObjectRef argument, when it has one at hand.

    Asked of this process's own core worker first (~1-2 us, no network): it knows the refs
    it owns and those it borrowed, and for an object still being made (the output of a
    task still running: a chain, a reduction) it knows there is no size yet.  Asking the
    owner instead cost a round trip of 0.15-0.3 ms per ref and call, and for a pending
    object every call asked again: chains of calls were submitted 10x slower than plain Ray's.
    """
    if not isinstance(value, ray.ObjectRef):
        return None
    key = value.binary()
    size = _REF_SIZES.get(key)
    if size is not None:
        return size
    try:
        local = ray.experimental.get_local_object_locations([value]).get(value)
    except Exception:  # noqa: BLE001 - an older Ray, or not connected: ask the owner below
        local = None
    if local is not None:
        size = local.get("object_size")
    elif key not in _REF_ASKED:
        _remember(_REF_ASKED, key, None)
        try:
            size = ray.experimental.get_object_locations([value], timeout_ms=200).get(value, {}).get("object_size")
        except Exception:  # noqa: BLE001 - owned elsewhere and out of reach: unknown
            return None
    if not size:
        return None  # not created yet (a task still running): no size, until it exists
    _remember(_REF_SIZES, key, int(size))
    return int(size)


def _remember(cache: OrderedDict, key: bytes, value: Any) -> None:
    """Put into one of the ref caches, forgetting its oldest entry beyond ``_REF_SIZES_MAX``."""
    cache[key] = value
    if len(cache) > _REF_SIZES_MAX:
        cache.popitem(last=False)


@functools.lru_cache(maxsize=2)
def _ray_option_validator(kind: str) -> Callable[[dict, bool], None] | None:
    """Ray's own check of task or actor options (its module moved between Ray versions)."""
    for module in ("ray._common.ray_option_utils", "ray._private.ray_option_utils"):
        try:
            utils = __import__(module, fromlist=["validate_task_options"])
            return utils.validate_task_options if kind == "task" else utils.validate_actor_options
        except (ImportError, AttributeError):
            continue
    return None  # pragma: no cover - Ray checks them at submission instead


def _check_ray_options(kind: str, options: Mapping[str, Any], in_options: bool) -> None:
    """Refuse a Ray option Ray would refuse, now, as raysched's InvalidInput: a typo in the
    decorator fails where it is written, not at the first submission of a batch."""
    definition_only = TASK_DEFINITION_OPTIONS if kind == "task" else ACTOR_DEFINITION_OPTIONS
    if in_options:
        for key in definition_only:
            if key in options:
                raise InvalidInput(f"{key} can only be set in @adaptive_remote(...), not per call in .options()")
    if kind == "task" and options.get("num_returns") in ("streaming", "dynamic"):
        # Ray refuses these for a function that is not a generator only when told what it
        # decorates; adaptive_remote takes no generators (``_refuse_unsupported_kind``), so
        # every such call would fail at its first .remote() (an audit).
        raise InvalidInput(f"num_returns={options['num_returns']!r} is for generator functions, which "
                           "adaptive_remote does not take: use plain @ray.remote for a streaming task")
    validate = _ray_option_validator(kind)
    if validate is None:
        return
    try:
        validate({k: v for k, v in options.items() if k not in _META_KEYS and k not in _SIZED_KEYS}, False)
    except TypeError as exc:
        raise InvalidRayOption(f"invalid Ray option: {exc}") from exc
    except ValueError as exc:
        raise InvalidInput(f"invalid Ray option: {exc}") from exc


def option_key(options: Mapping[str, Any]) -> tuple | None:
    """A hashable stand-in for Ray options, equal for equal options; None if one cannot be compared.

    ``resources={...}`` is a dict, and a scheduling strategy made anew for each call is a
    new object: keyed as they are, neither would ever find the plan or the ``.options()``
    wrapper made for an equal call, and each such call would be predicted and sized again.
    """
    try:
        return tuple(sorted((str(k), _frozen(v)) for k, v in options.items()))
    except TypeError:
        return None


def _frozen(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return ("dict",) + tuple(sorted((str(k), _frozen(v, depth + 1)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_frozen(v, depth + 1) for v in value)
    if type(value).__module__.startswith("ray.util.scheduling_strategies") and depth < 4:
        # Ray's strategies are plain holders of their arguments (a node id, a placement group...)
        return (type(value).__qualname__,) + _frozen(vars(value), depth + 1)
    hash(value)  # anything else by its own equality (a placement group: by its id); TypeError if none
    return value


def _known_wall(prediction: Any) -> float:
    """The predicted upper wall time of a call, or inf when no past run stands behind it
    (a fallback's wall time is a guess the admission queue must not count on)."""
    wall = prediction.wall
    if wall is None or wall.n_history <= 0 or not 0 < wall.upper < float("inf"):
        return float("inf")
    return float(wall.upper)


def _largest_memory_for(cluster, num_cpus: float) -> float | None:
    """The most memory one node (of those the call may run on) can give a task that needs
    ``num_cpus``: the node sizing caps to (``policy.sizing.largest_node_for``)."""
    node = largest_node_for(cluster, num_cpus)
    return float(node.memory_bytes) if node is not None else None


def _largest_peak_for(bundle: Any, features: Any) -> float:
    """The ladder's "largest peak seen" for a call: of the runs with its tags when tags tell
    its runs apart (``SameTags``), else of all the function's runs."""
    if bundle is None:
        return 0.0
    runs = runs_with_tags(bundle.history, features.tags)
    if runs is not bundle.history and len(runs):
        known = runs.memory[np.isfinite(runs.memory)]
        if known.size:
            return float(known.max())
    return float(bundle.max_peak_seen)


#: Whether this Ray tells a driver that an object exists without fetching it
#: (``ObjectRef._on_ready``, used by ``admission.EndReporter``; 2.60 does, 2.40 does not).
_WATCH_ENDS = callable(getattr(ray.ObjectRef, "_on_ready", None))


class _CallOptions:
    """Validated per-call options: raysched's metadata, explicit sizes, Ray's other options."""

    __slots__ = ("input_size", "tags", "priority", "queued", "explicit", "ray_options", "name", "key", "_straight",
                 "_routed")

    def __init__(self, options: Mapping[str, Any], base_tags: tuple[str, ...], base_ray: Mapping[str, Any]):
        self.input_size = validate_input_size(options.get("input_size"))
        self.tags = tuple(sorted(set(base_tags) | set(validate_tags(options.get("tags")))))
        # A call given a priority (per call, or for every call by the decorator) waits in
        # raysched's admission queue (runtime.admission); one without goes straight to Ray.
        priority = options.get("priority", base_ray.get("priority"))
        self.queued = priority is not None
        priority = validate_priority(priority) if self.queued else 0
        self.priority = priority
        explicit: dict[str, Any] = {}
        if options.get("memory") is not None:
            explicit["memory"] = validate_memory(options["memory"])
        if options.get("num_cpus") is not None:
            explicit["num_cpus"] = validate_num_cpus(options["num_cpus"])
        self.explicit = explicit
        ray_options = {k: v for k, v in base_ray.items() if k not in _META_KEYS}
        per_call = {k: v for k, v in options.items() if k not in _META_KEYS and k not in _SIZED_KEYS}
        if "runtime_env" in per_call and not per_call["runtime_env"] and ray_options.get("runtime_env"):
            del per_call["runtime_env"]  # as in Ray: an empty one in .options() keeps the decorator's
        ray_options.update(per_call)
        self.ray_options = ray_options
        # Ray's task name: often one per call (a task per input, named for the dashboard).
        # Calls that differ only in it share a plan, each sending its own (``_Plan.name``).
        self.name = ray_options.get("name")
        # What makes two calls' plans equal besides their features; None: not cacheable.
        self.key: tuple | None = (self.tags, priority, self.queued, tuple(sorted(explicit.items())),
                                  option_key({k: v for k, v in ray_options.items() if k != "name"}))
        if self.key[-1] is None:  # an option that cannot be told equal to another's
            self.key = None
        self._straight: _CallOptions | None = None
        self._routed: _CallOptions | None = None

    def straight(self) -> "_CallOptions":
        """These options for a call that bypasses the admission queue (``inside_ray``)."""
        if self._straight is None:
            self._straight = self._copy(queued=False)
            self._straight._straight = self._straight
        return self._straight

    def routed(self) -> "_CallOptions":
        """These options (of a call without a priority) for a call that waits in the admission
        queue at priority 0, as the node rule ranks it (``runtime.rooms``)."""
        if self._routed is None:
            self._routed = self._copy(queued=True)
        return self._routed

    def _copy(self, queued: bool) -> "_CallOptions":
        copy = object.__new__(_CallOptions)
        for name in self.__slots__:
            setattr(copy, name, getattr(self, name))
        copy.queued, copy._straight, copy._routed = queued, None, None
        copy.key = None if self.key is None else (self.key[0], self.key[1], queued, *self.key[3:])
        return copy


#: How many items of a list, tuple or dict argument are looked at for ObjectRefs (all of
#: them, once one of these is a ref: a list of numbers is not scanned to its end).
_REF_SCAN_ITEMS = 256


def _ref_inputs(args: tuple, kwargs: Mapping[str, Any]) -> list[Any]:
    """The ObjectRefs a queued call takes: its arguments, and the items of its list, tuple and
    dict arguments (one level down, as its input size is read).  Ray resolves only the first
    kind before the task starts; a task given the second kind waits for them in ``ray.get``,
    and admitted before they exist it would hold room that the calls making them need."""
    refs = []
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, ray.ObjectRef):
            refs.append(arg)
        elif type(arg) in (list, tuple, dict):
            items = list(arg.values()) if type(arg) is dict else arg
            found = [a for a in items[:_REF_SCAN_ITEMS] if isinstance(a, ray.ObjectRef)]
            if found and len(items) > _REF_SCAN_ITEMS:
                # A collection of refs: every one of them (a helper's audit: a consumer of
                # 300 producers joined the queue once the first 256 existed, was admitted
                # ahead of the other 44, and held their room while it waited on them).
                found += [a for a in items[_REF_SCAN_ITEMS:] if isinstance(a, ray.ObjectRef)]
            refs.extend(found)
    return refs


#: Plans kept per function (distinct features x options); cleared when full.
_PLANS_MAX = 1024

#: Argument types that ``call_features`` neither sizes nor describes beyond their name
#: (exact types: a subclass, or a numpy scalar with its shape, takes the general path).
_SCALAR_TYPES = frozenset({int, float, bool, complex, type(None)})


class _Plan:
    """What every call with the same options and features up to its size band is submitted
    with, while it is current.

    The calls of one band (``client.size_band``: sizes within ~1.4%) share a prediction,
    so they share the plan too; a call whose exact features are not the template's
    (``features``) sends its own along (``encode_features``) for its row.  A new bundle
    (new rows or models), a new view of the cluster or a new config makes a new plan;
    within one, a call costs a dict lookup, a call id and Ray's own submission.
    """

    __slots__ = ("bundle", "cluster", "config", "remote", "template", "features", "name", "ray_options", "allocation",
                 "wall_seconds", "wall_upper", "peak_bytes", "returns_nothing", "strand")

    def __init__(self, bundle: Any, cluster: Any, config: Any, remote: Any, template: bytes, features: Any,
                 allocation: Any, wall_seconds: float = 0.0, wall_upper: float = float("inf"),
                 peak_bytes: float | None = None, returns_nothing: bool = False, name: str | None = None,
                 ray_options: dict[str, Any] | None = None, strand: Any = None):
        self.bundle, self.cluster, self.config, self.remote, self.template = bundle, cluster, config, remote, template
        # The features and Ray task name (None: Ray's default) of the call it was made for,
        # which its template holds, and the Ray options ``remote`` was made with.
        self.features, self.name, self.ray_options = features, name, ray_options or {}
        # The predicted wall time orders a queued call (largest_first); its upper bound is
        # how long the admission queue counts on the call holding its room (backfill).
        self.allocation, self.wall_seconds, self.wall_upper = allocation, wall_seconds, wall_upper
        # What the queue counts the call to hold against the nodes' rooms (None: its label).
        self.peak_bytes = peak_bytes
        # A queued call of num_returns=0 is submitted with one return, for the queue to see it
        # end; its caller gets None, as from Ray.
        self.returns_nothing = returns_nothing
        # Where losing nodes could leave its calls with a label no alive node holds: the
        # driver's watcher of them (``stranded.StrandGroup``); None: its calls cannot be stranded.
        self.strand = strand

    def order_key(self, now: float) -> float:
        """Where a queued call of this plan goes among calls of its priority."""
        return order_key(self.config.admission_order, now, self.allocation.memory_bytes, self.wall_seconds)

    def current(self, bundle: Any, cluster: Any, config: Any) -> bool:
        return self.bundle is bundle and self.cluster is cluster and self.config is config


def _positional_arity(signature: inspect.Signature | None) -> tuple[int, float] | None:
    """(fewest, most) positional arguments that fit ``signature`` in a call without keywords,
    or None where a count cannot tell (no signature; a keyword-only parameter without default)."""
    if signature is None:
        return None
    fewest, most = 0, 0.0
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            most += 1
            fewest += parameter.default is parameter.empty
        elif parameter.kind is parameter.VAR_POSITIONAL:
            most = float("inf")
        elif parameter.kind is parameter.KEYWORD_ONLY and parameter.default is parameter.empty:
            return None
    return fewest, most


class _Adaptive:
    """What a function and an actor class decorated by ``adaptive_remote`` share: their
    profile key, fallbacks, tags and dependencies, the features of a call, and the spec
    of a first attempt (or incarnation) sized from the bundle the driver holds."""

    #: Which of Ray's option sets applies: "task" (functions) or "actor" (classes).
    _ray_kind = "task"

    def __init__(self, target: Any, name: Any, tags: Any, num_cpus: Any, memory: Any, dependencies: Any,
                 ray_options: Mapping[str, Any]):
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise InvalidInput(f"name must be a non-empty string, got {name!r}")
        self.name = name or qualified_name(target)
        self.fallback = Fallback(memory=validate_memory(memory), cpu=validate_num_cpus(num_cpus))
        self.tags = validate_tags(tags)
        self.dependencies = validate_tags(dependencies, "dependencies")
        # New dependencies start a new history, as new code does (runtime.codehash).
        self.code_hash = with_dependencies(code_hash(target), self.dependencies)
        if "input_size" in ray_options:
            # The size of one call's arguments: taken nowhere from here, so every call was
            # sized without it (and a wrong value went unseen).
            raise InvalidInput("input_size is set per call, with .options(input_size=...), not in @adaptive_remote(...)")
        if ray_options.get("priority") is not None:
            validate_priority(ray_options["priority"])  # where it is written, not at the first call
        _check_ray_options(self._ray_kind, ray_options, in_options=False)
        self._ray_options = dict(ray_options)
        self._scalar_features: dict[tuple, Any] = {}
        try:  # Ray checks a call's (a constructor's) arguments at .remote(): so does raysched
            self._signature: inspect.Signature | None = inspect.signature(target)
        except (TypeError, ValueError):  # a builtin without one: the worker's call will say
            self._signature = None
        self._positional_arity = _positional_arity(self._signature)

    def _check_arguments(self, args: tuple, kwargs: Mapping[str, Any]) -> None:
        """Raise Ray's TypeError for arguments that do not fit the signature, before anything
        is submitted, started or recorded."""
        arity = self._positional_arity
        if not kwargs and arity is not None and arity[0] <= len(args) <= arity[1]:
            return  # what bind() would conclude, at a tenth of its cost (it ran on every call)
        if self._signature is not None:
            try:
                self._signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(str(exc)) from None

    def _call_options(self, options: Mapping[str, Any]) -> _CallOptions:
        if options:
            _check_ray_options(self._ray_kind, options, in_options=True)
        return _CallOptions(options, self.tags, self._ray_options)

    def _features(self, options: _CallOptions, args: tuple, kwargs: Mapping[str, Any]):
        if not kwargs and all(type(a) in _SCALAR_TYPES for a in args):
            # Scalars have no size and are described by their type alone: the features of
            # such a call follow from the types and the options, so they are made once.
            key = (options.input_size, options.tags, tuple(map(type, args)))
            features = self._scalar_features.get(key)
            if features is None:
                if len(self._scalar_features) >= _PLANS_MAX:
                    self._scalar_features.clear()
                features = self._scalar_features[key] = self._derive_features(options, args, kwargs)
            return features
        return self._derive_features(options, args, kwargs)

    def _derive_features(self, options: _CallOptions, args: tuple, kwargs: Mapping[str, Any]):
        return call_features(
            args, kwargs, input_size=options.input_size, tags=options.tags,
            dependencies=self.dependencies, size_of_opaque=_ref_size,
        )

    def _first_spec(self, client: ProfilerClient, options: _CallOptions, features: Any, bundle: Any, cluster: Any,
                    call_id: str = "", **extra: Any) -> AttemptSpec:
        """The spec of a first attempt with these features: predicted, sized, with the caller's options."""
        prediction = client.predict(self.name, self.code_hash, features, self.fallback, bundle)
        # Sized for the nodes the caller's options let it run on (a pinned call: that node).
        cluster = eligible_cluster(cluster, options.ray_options)
        explicit = options.explicit
        declared = self.fallback.memory if self.fallback.memory is not None else client.config.default_memory_bytes
        if declared == 0 and prediction.memory.source == "fallback" and "memory" not in explicit:
            # A fallback (or default) of memory=0 is Ray's memory=0: no label until there is history.
            explicit = {**explicit, "memory": 0}
        declared_cpu = self.fallback.cpu if self.fallback.cpu is not None else client.config.default_num_cpus
        if declared_cpu == 0 and prediction.cpu.source == "fallback" and "num_cpus" not in explicit:
            # So is a fallback (or default) of num_cpus=0 (a task that only waits on others): no
            # CPU slot, not the minimum share, until its runs say what it uses.
            explicit = {**explicit, "num_cpus": 0.0}
        allocation = client.size(prediction, explicit, self.name, cluster)
        return AttemptSpec(
            function=self.name,
            code_hash=self.code_hash,
            call_id=call_id,
            attempt=1,
            features=features,
            prediction=prediction,
            allocation=allocation,
            max_peak_seen=_largest_peak_for(bundle, features),
            largest_node_bytes=_largest_memory_for(cluster, allocation.num_cpus),
            priority=options.priority,
            ray_options=tuple(sorted(options.ray_options.items())),
            **extra,
        )


def _refuse_unsupported_kind(fn: Callable[..., Any]) -> None:
    """Refuse, where it is decorated, a function whose calls raysched would get wrong.

    Not a function (a ``functools.partial``, a callable object, a bound method): Ray refuses those.
    An ``async def`` function: Ray refuses it as a task too. A generator: raysched's
    measuring wrapper returns the user's value, so Ray would see a plain function
    returning one generator object, and the items after the first would be lost
    without an error; its escalation ladder hands a killed attempt's value over as one
    value, not as a stream.
    """
    name = getattr(fn, "__qualname__", repr(fn))
    if isinstance(fn, (ray.remote_function.RemoteFunction, AdaptiveFunction)):
        # @adaptive_remote stacked on @ray.remote (or on itself): say so, not "a callable object".
        raise InvalidRayOption(
            f"adaptive_remote got {name}, which is already a remote function "
            f"({type(fn).__module__}.{type(fn).__qualname__}): decorate the plain function with "
            "@adaptive_remote alone, in place of @ray.remote (Ray options go into @adaptive_remote(...))"
        )
    if inspect.ismethod(fn):
        # Ray refuses these too. The instance (or class) it is bound to would be pickled once,
        # when the function is exported: its later changes in the driver never reach the tasks.
        raise InvalidRayOption(
            f"adaptive_remote takes a function or a class, as ray.remote does; got {name}, a method bound "
            f"to {type(fn.__self__).__qualname__ if not isinstance(fn.__self__, type) else fn.__self__.__qualname__}"
            " (its object would be copied once, when the function is exported): decorate a plain function "
            "that takes what it needs as arguments, or the class itself (an actor)"
        )
    if not inspect.isroutine(fn):
        # Ray refuses these too. Their profile key would be their type's: every partial, and
        # every instance of a class, would share one history whatever they compute.
        # A TypeError as well, as Ray's refusal is.
        raise InvalidRayOption(
            f"adaptive_remote takes a function or a class, as ray.remote does; got a "
            f"{type(fn).__module__}.{type(fn).__qualname__} (a functools.partial or a callable object): "
            "call it from a def and decorate that"
        )
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise InvalidInput(
            f"{name} is an 'async def' function: Ray does not run those as tasks, and neither does "
            f"adaptive_remote. Wrap it in a plain function that calls asyncio.run(...), or use an actor."
        )
    if inspect.isgeneratorfunction(fn):
        raise InvalidInput(
            f"{name} is a generator function: adaptive_remote does not run generator tasks "
            f"(num_returns='streaming' or 'dynamic'); decorate it with @ray.remote, or return a list."
        )


class AdaptiveFunction(_Adaptive):
    """A function run as a Ray task with resources learnt from its past runs.

    Use it as ``@ray.remote``: ``f.remote(...)`` returns an ``ObjectRef``;
    ``f.options(input_size=..., tags=..., priority=..., **ray_options)`` returns a
    handle with per-call metadata; ``f.predict(...)`` returns the Prediction for
    such a call without running it.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        tags: Any = (),
        num_cpus: Any = None,
        memory: Any = None,
        max_attempts: int | None = None,
        dependencies: Any = (),
        measure_every_call: bool = False,
        **ray_options: Any,
    ):
        if not callable(fn):
            raise InvalidInput(f"adaptive_remote needs a function, got {fn!r} ({type(fn).__name__})")
        _refuse_unsupported_kind(fn)
        if max_attempts is not None and (isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1):
            raise InvalidInput(f"max_attempts must be a positive integer, got {max_attempts!r}")
        if not isinstance(measure_every_call, bool):
            raise InvalidInput(f"measure_every_call must be True or False, got {measure_every_call!r}")
        super().__init__(fn, name, tags, num_cpus, memory, dependencies, ray_options)
        self._fn = fn
        self.max_attempts = max_attempts
        #: Never thin this function's short calls (policy/thinning.py): a row for every call.
        self.measure_every_call = measure_every_call
        self._remote: Any = None
        self._bound: dict[tuple, Any] = {}
        self._remote_config: Any = None
        self._config_for: tuple[Any, Any] | None = None
        self._plans: dict[tuple, _Plan] = {}
        self._default_options = self._call_options({})  # checks the decorator's own options now
        functools.update_wrapper(self, fn)

    #: What this process learnt and built for its own submissions (plans holding bundles and
    #: models, Ray remote functions): not sent when the function travels to a task that calls
    #: it (a warm one pickled to about a megabyte); the receiving process builds its own.
    _LOCAL_CACHES = ("_remote", "_bound", "_remote_config", "_config_for", "_plans", "_scalar_features")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in self._LOCAL_CACHES:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._remote = self._remote_config = self._config_for = None
        self._bound, self._plans, self._scalar_features = {}, {}, {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"Remote functions cannot be called directly. Instead of running '{self.name}()', "
            f"try '{self.name.rsplit('.', 1)[-1]}.remote()'."
        )

    def __repr__(self) -> str:
        return f"AdaptiveFunction({self.name}, code_hash={self.code_hash})"

    # --- the one path every call takes ---------------------------------------------------------
    def _config(self, client: ProfilerClient):
        # The function's own settings go into the config it ships; built once per client.
        if self._config_for is None or self._config_for[0] is not client.config:
            config = client.config
            if self.max_attempts is not None:
                config = config.replace(max_attempts=self.max_attempts)
            if self.measure_every_call:
                config = config.replace(short_call_measure_every=1)
            self._config_for = (client.config, config)
        return self._config_for[1]

    def _submit(self, options: _CallOptions, args: tuple, kwargs: Mapping[str, Any]) -> ray.ObjectRef:
        self._check_arguments(args, kwargs)
        if options.queued and inside_ray():
            options = options.straight()  # made inside a task or an actor: see inside_ray
        client = get_client()
        features = self._features(options, args, kwargs)
        bundle = client.bundle(self.name, self.code_hash)
        cluster = client.cluster.get()
        # Inside a task that captures its children into a placement group, labels fit its bundles.
        # The rest of the features need no place in the key: tags are the options' (in their
        # key), dependencies the function's, and a call's own size and shapes travel with it.
        captured = captured_placement_group()
        plan = self._plan(options, features, bundle, cluster, client, captured)
        rooms = client.rooms
        if (rooms is not None and rooms.shortest_room is not None and not options.queued and captured is None
                and placement_group_of(plan.ray_options) is None
                and rooms.routes(max(plan.allocation.memory_bytes, plan.peak_bytes or 0.0))):
            # A node's room is well below its label: Ray could place this call where it does
            # not fit, so it waits in the queue, which admits by the room (runtime.rooms).
            options = options.routed()
            plan = self._plan(options, features, bundle, cluster, client, captured)
        call_id = os.urandom(16).hex()
        remote = plan.remote
        if options.name == plan.name:
            own = b"" if features == plan.features else encode_features(features, options.name)
        else:
            # As plain Ray's ``.options(name=...)``: one wrapper per call.
            remote = self._remote.options(**{**plan.ray_options, "name": options.name or ray_task_name(self.name)})
            own = encode_features(features, options.name)
        spec_bytes = encode_call(plan.template, call_id, own)
        if options.queued:
            # The task waits for its admission (an argument Ray resolves before it starts);
            # the queue frees its room when the task's own ref exists.
            queue = client.admission
            # The driver reports the call's end (one actor call per queued call, not two) where
            # Ray can watch a ref without fetching it; else the actor waits on the ref (track).
            ends, job_id = client.admission_ends if _WATCH_ENDS else (None, None)
            # Its ObjectRef arguments, nested so that Ray hands them over unresolved: the queue
            # counts the call only once they exist (Ray resolves only top-level ones, as here).
            inputs = _ref_inputs(args, kwargs)
            admitted = queue.admit.remote(call_id, options.priority, plan.allocation.num_cpus,
                                          plan.allocation.memory_bytes, plan.order_key(time.time()), plan.wall_upper,
                                          [inputs] if inputs else (), plan.peak_bytes, job_id)
            try:
                ref = remote.remote(spec_bytes, admitted, *args, **kwargs)
            except BaseException:
                # Ray refused the submission (an argument it cannot serialise...): the call never
                # existed, and the queue must not hold its room for ever.
                queue.finish.remote(call_id)
                raise
            # The call ends when its (first) return value exists: with num_returns=k Ray gives
            # a list of refs, with num_returns=0 none, and the plan asked for one (_make_plan).
            first = ref[0] if isinstance(ref, list) else ref
            if ends is not None and callable(getattr(first, "_on_ready", None)):  # (not a Ray Client ref)
                ends.watch(call_id, first)
            else:
                queue.track.remote(call_id, [first])
            if plan.strand is not None:
                plan.strand.add(call_id, first, spec_bytes)
            if plan.returns_nothing:
                ref = None
        else:
            ref = remote.remote(spec_bytes, *args, **kwargs)
            if plan.strand is not None and ref is not None:  # (num_returns=0: no ref to watch or cancel)
                plan.strand.add(call_id, ref[0] if isinstance(ref, list) else ref, spec_bytes)
        note_submitted(self.name, call_id)
        return ref

    def _plan(self, options: _CallOptions, features: Any, bundle: Any, cluster: Any, client: ProfilerClient,
              captured: Any) -> "_Plan":
        """The current plan of calls with these options and features up to their size band, made if need be."""
        key = (size_band(features.input_size), options.key, captured) if options.key is not None else None
        plan = self._plans.get(key) if key is not None else None
        if plan is None or not plan.current(bundle, cluster, client.config):
            plan = self._make_plan(options, features, bundle, cluster, client)
            if key is not None:
                if len(self._plans) >= _PLANS_MAX:
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def _make_plan(self, options: _CallOptions, features: Any, bundle: Any, cluster: Any,
                   client: ProfilerClient) -> "_Plan":
        """Prediction, allocation, Ray options and the encoded spec, for every call with these features."""
        spec = self._first_spec(client, options, features, bundle, cluster, queued=options.queued)
        ray_options = remote_options(spec)
        returns_nothing = options.queued and ask_a_return(ray_options)  # the queue tracks its end
        config = self._config(client)
        remote = self._remote_with(ray_options, config, client)
        peak = expected_peak_bytes(spec.prediction.memory.upper, spec.allocation.memory_is_task_only)
        return _Plan(bundle, cluster, client.config, remote, encode_template(spec), features, spec.allocation,
                     float(spec.prediction.wall.target), _known_wall(spec.prediction), peak, returns_nothing,
                     options.name, ray_options, self._strand_group(options, ray_options, cluster, client, config))

    def _strand_group(self, options: _CallOptions, ray_options: dict[str, Any], cluster: Any,
                      client: ProfilerClient, config: Any) -> Any:
        """The watcher's group for a plan whose calls a lost node could strand (``policy.stranding``),
        or None (a cluster of equal nodes, labels the caller set, a placement group, a Ray that
        cannot watch a ref without fetching it): decided once per plan, not per call."""
        if (not _WATCH_ENDS or cluster is None or not config.cancel_stranded_calls
                or placement_group_of(ray_options) is not None):
            return None
        label = Ask.label(ray_options)
        plain = label.plain(options.explicit)
        node_id, demands = node_constraints(ray_options)
        selectors = label_selectors(ray_options)
        if not at_risk(label, plain, cluster.eligible(node_id, demands, selectors).nodes):
            return None
        return client.strand_watch.group(function=self.name, code_hash=self.code_hash, config=config, label=label,
                                         plain=plain, node_id=node_id, demands=demands, selectors=selectors)

    def _remote_with(self, options: dict[str, Any], config: Any, client: ProfilerClient) -> Any:
        """Ray's ``.options()`` builds a new wrapper each call: keep one per distinct sizing."""
        if self._remote is None or self._remote_config is not config:
            # The config travels once, inside the exported entry function.
            definition = definition_options(self._ray_options)  # max_calls: Ray takes it only here
            self._remote = ray_remote(make_entry(self._fn, config, definition.get("max_calls"), client.config),
                                      definition)
            self._remote_config, self._bound = config, {}
        key = option_key(options)
        if key is None:  # an option that cannot be told equal to another's: no cache for this call
            return self._remote.options(**options)
        bound = self._bound.get(key)
        if bound is None:
            if len(self._bound) > 256:
                self._bound.clear()
            bound = self._bound[key] = self._remote.options(**options)
        return bound

    # --- public API ------------------------------------------------------------------------------
    def remote(self, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        """Submit a call sized from the function's past runs; a real ``ray.ObjectRef``
        (a list of them with ``num_returns=k``, None with 0), as ``ray.remote`` gives.
        The driver never waits on an actor here: it predicts from the bundle it holds."""
        return self._submit(self._default_options, args, kwargs)

    def options(self, **options: Any) -> "BoundCall":
        """The function with per-call settings: raysched's ``input_size=`` (bytes; derived
        from the arguments otherwise), ``tags=``, ``priority=``, and any Ray option, which
        wins over the prediction (``memory=``, ``num_cpus=``, ``scheduling_strategy=``...).
        The result has ``.remote``, ``.predict`` and ``.bind``."""
        return BoundCall(self, self._call_options(options), options)

    def bind(self, *args: Any, **kwargs: Any) -> Any:
        """A node of a Ray DAG (``ray.dag``), as ``ray.remote`` functions have: run by
        ``.execute()``, each call sized and measured as ``.remote()`` would."""
        return _adaptive_node(self, args, kwargs, {})

    def predict(self, *args: Any, **kwargs: Any) -> Prediction:
        """The ``Prediction`` (memory, cpu, wall: target, lower, upper, coverage, n_history,
        source) for a call with these arguments, without running it; it fetches the newest
        bundle first."""
        return self._predict(self._call_options({}), args, kwargs)

    def _predict(self, options: _CallOptions, args: tuple, kwargs: Mapping[str, Any]) -> Prediction:
        self._check_arguments(args, kwargs)  # as .remote() would: a call Python refuses has no prediction
        client = get_client()
        client.refresh(self.name, self.code_hash)  # a query, not a submission: it may wait for the newest
        bundle = client.bundle(self.name, self.code_hash)
        return client.predict(self.name, self.code_hash, self._features(options, args, kwargs), self.fallback, bundle)

    def refresh(self, train: bool = False, timeout: float = 120.0) -> None:
        """Fetch the newest bundle now; with ``train=True`` train on every row first
        (waiting up to 10 s for rows of this driver's calls that are still on their way)."""
        get_client().refresh(self.name, self.code_hash, train=train, timeout=timeout)


class BoundCall:
    """``f.options(...)``: the same function with per-call metadata and Ray options."""

    def __init__(self, fn: AdaptiveFunction, options: _CallOptions, raw: Mapping[str, Any] | None = None):
        self._fn = fn
        self._options = options
        self._raw = dict(raw or {})

    @property
    def name(self) -> str:
        """The function's name, as ``f.name``: ``raysched.profiles`` and ``events`` take either."""
        return self._fn.name

    def remote(self, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        return self._fn._submit(self._options, args, kwargs)

    def bind(self, *args: Any, **kwargs: Any) -> Any:
        return _adaptive_node(self._fn, args, kwargs, self._raw)

    def predict(self, *args: Any, **kwargs: Any) -> Prediction:
        return self._fn._predict(self._options, args, kwargs)


def _adaptive_node(fn: AdaptiveFunction, args: Any, kwargs: Mapping[str, Any], options: Mapping[str, Any],
                   other_args_to_resolve: Mapping[str, Any] | None = None) -> Any:
    """Ray's ``FunctionNode`` for a raysched function (Ray's own would run the body with a
    plain ``ray.remote``, bypassing raysched). The class is made at the first ``bind``:
    ``ray.dag`` costs 10 ms to import, which a program without DAGs should not pay."""
    if not _NODE_CLASS:
        from ray.dag.function_node import FunctionNode

        class AdaptiveFunctionNode(FunctionNode):
            def _copy_impl(self, new_args, new_kwargs, new_options, new_other_args_to_resolve):
                return _adaptive_node(self._body, new_args, new_kwargs, new_options, new_other_args_to_resolve)

            def _execute_impl(self, *_args, **_kwargs):
                return self._body.options(**self._bound_options).remote(*self._bound_args, **self._bound_kwargs)

        _NODE_CLASS.append(AdaptiveFunctionNode)
    return _NODE_CLASS[0](fn, list(args), dict(kwargs), dict(options),
                          other_args_to_resolve=dict(other_args_to_resolve) if other_args_to_resolve else None)


_NODE_CLASS: list[type] = []


def _wrap(target: Any, settings: Mapping[str, Any]) -> Any:
    if isinstance(target, type):
        from .actors import AdaptiveActorClass

        return AdaptiveActorClass(target, **settings)
    return AdaptiveFunction(target, **settings)


def adaptive_remote(fn: Callable[..., Any] | None = None, /, **settings: Any):
    # Its docstring, ADAPTIVE_REMOTE_DOC, is set below: raysched.adaptive_remote shares it.
    if fn is None:
        return lambda f: _wrap(f, settings)
    if settings:
        raise InvalidInput("use @adaptive_remote or @adaptive_remote(**settings), not both")
    return _wrap(fn, {})


adaptive_remote.__doc__ = ADAPTIVE_REMOTE_DOC
