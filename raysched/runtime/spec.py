"""An attempt's spec, and how it travels with its Ray task.

The driver pickles a spec once per plan (``encode_template``); each call adds its
call id, and its own features when they differ from its plan's (``encode_call``).
A worker decodes the task's first argument from a per-process cache of templates
(``decode_spec``); an adaptive actor's incarnation is made from one the same way.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass, replace
from typing import Any

from ..config import RayschedConfig
from ..types import MAX_BYTES, Allocation, AttemptRecord, Features, Prediction


@dataclass(frozen=True)
class AttemptSpec:
    """Everything an attempt needs besides the user's arguments; travels with the task."""

    function: str
    code_hash: str
    call_id: str
    attempt: int  # 1 for the first attempt of a call
    features: Features
    prediction: Prediction
    allocation: Allocation
    #: Not shipped with every task: the entry function carries it (see ``make_entry``).
    config: RayschedConfig | None = None
    prior: tuple[AttemptRecord, ...] = ()  # failed attempts of this call, oldest first
    max_peak_seen: float = 0.0
    largest_node_bytes: float | None = None
    priority: int = 0
    ray_options: tuple[tuple[str, Any], ...] = ()  # the caller's other Ray options, kept for resubmission
    rescalable: bool = False  # an actor's incarnation whose class opted in to rescaling (tasks: unused)
    #: An actor given no num_cpus, with no CPU history: it takes Ray's default for an actor
    #: (1 CPU to be placed, none while it runs), which its allocation's 0 CPUs record (tasks: unused).
    ray_default_cpus: bool = False
    #: Submitted behind raysched's admission queue: the task's first argument after the spec
    #: is its admission, not the user's (resubmitted attempts are not queued again).
    queued: bool = False
    #: Reruns of this call so far after failures that were not raysched's business (a worker
    #: death that was neither a memory kill nor a monitor stop, an exception retried under
    #: ``retry_exceptions``): counted against the caller's ``max_retries`` (``retry_budget``).
    reruns: int = 0

    @property
    def live_key(self) -> str:
        return f"{self.call_id}:{self.attempt}"

    def with_call_id(self, call_id: str, features: Features | None = None,
                     ray_options: tuple[tuple[str, Any], ...] | None = None) -> "AttemptSpec":
        """This spec for another call (with its own ``features`` and ``ray_options``, if given):
        a copy of the instance dict, cached row part included (with the call's own features in it).

        ``dataclasses.replace`` would re-run ``__init__`` over every field; this runs
        once per task in the worker, on a spec decoded from a cached template.
        """
        copy = object.__new__(AttemptSpec)
        copy.__dict__.update(self.__dict__)
        copy.__dict__["call_id"] = call_id
        if features is not None:
            copy.__dict__["features"] = features
            row = self.__dict__.get("static_row")
            if row is not None:
                copy.__dict__["static_row"] = {**row, "input_size": features.input_size,
                                               "arg_shapes": features.arg_shapes}
        if ray_options is not None:
            copy.__dict__["ray_options"] = ray_options
        return copy

    @functools.cached_property
    def static_row(self) -> dict[str, Any]:
        """The columns of this spec's profile rows that do not depend on the call or the run."""
        pred, alloc, feats = self.prediction, self.allocation, self.features
        return {
            "function": self.function,
            "code_hash": self.code_hash,
            "attempt": self.attempt,
            "input_size": feats.input_size,
            "tags": feats.tags,
            "arg_shapes": feats.arg_shapes,
            "dependencies": feats.dependencies,
            "priority": self.priority,
            "prediction_source": pred.source,
            "predicted_memory_bytes": _stored_bytes(pred.memory.target),
            "predicted_memory_upper_bytes": _stored_bytes(pred.memory.upper),
            "predicted_cpu": float(pred.cpu.target),
            "predicted_wall_seconds": float(pred.wall.target),
            "allocated_num_cpus": float(alloc.num_cpus),
            "allocated_memory_bytes": _stored_bytes(alloc.memory_bytes),
            "rung": alloc.rung,
            "source": "ray",
        }


def _stored_bytes(value: float) -> int | None:
    """A byte count as the store's int64 columns take it: NaN is unknown, and a figure past
    int64 (an estimate extrapolated from a huge input) is stored as the largest one, so
    that the row is kept."""
    if value != value:
        return None
    return int(min(value, MAX_BYTES))


def encode_template(spec: AttemptSpec) -> bytes:
    """Everything of a spec but its call id and config, pickled: the same for every call of one plan.

    Plain pickle: cloudpickle (what Ray would use on the dataclass) costs several
    times more on these importable classes.  The config, the largest part,
    travels once with the exported entry function instead.  Ray options may hold
    the user's own classes (``retry_exceptions=[Transient]``): one defined in the
    driver's script pickles by reference to ``__main__``, which a worker does not
    have, so such a spec, and any plain pickle refuses, goes by value with Ray's
    cloudpickle (its output is read by ``pickle.loads`` as well).
    """
    template = replace(spec, call_id="", config=None)
    if not _by_value_needed(spec.ray_options):
        try:
            return pickle.dumps(template, protocol=5)
        except (pickle.PicklingError, AttributeError, TypeError):
            pass  # a class or function defined inside a function
    from ray import cloudpickle

    return cloudpickle.dumps(template, protocol=5)


def _by_value_needed(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` holds a class, function or object of the driver's ``__main__``."""
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        return False
    if getattr(value, "__module__", None) == "__main__" or type(value).__module__ == "__main__":
        return True
    if depth >= 4:
        return False
    if isinstance(value, dict):
        value = list(value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_by_value_needed(v, depth + 1) for v in value)
    return False


def encode_call(template: bytes, call_id: str, own_features: bytes = b"") -> bytes:
    """The task's first argument: the template, the call's own features (``encode_features``;
    empty when they are the template's), the call id, then the features' length in four
    bytes and the call id's in one."""
    cid = call_id.encode("ascii")
    if len(cid) > 255:
        raise ValueError(f"call id too long: {call_id!r}")
    return b"".join((template, own_features, cid, len(own_features).to_bytes(4, "little"), bytes((len(cid),))))


def encode_features(features: Features, name: str | None) -> bytes:
    """What a call adds to its plan's template: the features a row records per call, and its
    Ray task name (None: Ray's default).

    A plan serves every call whose input size falls in one band (``client.size_band``) and
    whose options differ at most in ``name``: they share the prediction and the allocation,
    but each call's row keeps its own exact size and argument shapes, and its retries its
    name.  Its tags and dependencies are the plan's (the same for every call of its options).
    """
    return pickle.dumps((features.input_size, features.arg_shapes, name), protocol=5)


def encode_spec(spec: AttemptSpec) -> bytes:
    return encode_call(encode_template(spec), spec.call_id)


#: Decoded templates of this worker process: a task of a plan seen before costs a
#: dict lookup and a copy instead of an unpickling (which cost ~0.1 ms per task).
_TEMPLATES: dict[bytes, AttemptSpec] = {}
_TEMPLATES_MAX = 256


def decode_spec(data: bytes, config: RayschedConfig) -> AttemptSpec:
    n = data[-1]
    m = int.from_bytes(data[-5:-1], "little")
    end = len(data) - 5 - n
    template, call_id = data[: end - m], data[end: -5].decode("ascii")
    base = _TEMPLATES.get(template)
    if base is None or base.config is not config:
        base = replace(pickle.loads(template), config=config)
        base.static_row  # computed once here, then copied with the instance dict to every call's spec
        if len(_TEMPLATES) >= _TEMPLATES_MAX:
            _TEMPLATES.clear()
        _TEMPLATES[template] = base
    if not m:
        return base.with_call_id(call_id)
    input_size, arg_shapes, name = pickle.loads(data[end - m: end])
    options, own_options = dict(base.ray_options), None
    if options.get("name") != name:  # the call's own, kept for its resubmissions
        options.pop("name", None)
        own_options = tuple(sorted({**options, "name": name}.items() if name is not None else options.items()))
    return base.with_call_id(call_id, replace(base.features, input_size=input_size, arg_shapes=arg_shapes),
                             own_options)
