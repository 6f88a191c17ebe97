"""The Ray options an attempt is submitted with, and what they say about where it may run."""

from __future__ import annotations

from typing import Any, Mapping

import ray

from ..policy.sizing import fit_bundle
from ..types import Allocation, ClusterShape, LabelTerm
from .spec import AttemptSpec


#: Options Ray takes only where a remote function or an actor class is made
#: (``ray.remote(...)``), never in ``.options()``: raysched applies them there.
TASK_DEFINITION_OPTIONS = ("max_calls",)
ACTOR_DEFINITION_OPTIONS = ("concurrency_groups",)


def definition_options(ray_options: Any, keys: tuple[str, ...] = TASK_DEFINITION_OPTIONS) -> dict[str, Any]:
    """The options among ``ray_options`` (a mapping or pairs) that go to ``ray.remote(...)``.

    A task that asks for GPUs runs once per worker process unless ``max_calls`` says
    otherwise, as ``ray.remote(num_gpus=...)`` decides it (Ray's ``RemoteFunction``: a
    library's GPU memory is freed only when its process ends). raysched's entry function
    is made with ``ray.remote`` before the GPUs are set by ``.options()``, where Ray no
    longer applies that default, so it is applied here.
    """
    ray_options = dict(ray_options)
    chosen = {k: v for k, v in ray_options.items() if k in keys}
    if "max_calls" in keys and chosen.get("max_calls") is None and (ray_options.get("num_gpus") or 0) > 0:
        chosen["max_calls"] = 1
    return chosen


def ray_remote(target: Any, definition: Mapping[str, Any]) -> Any:
    """``ray.remote`` of a function or class with its definition-only options (Ray refuses
    ``ray.remote()`` with no argument at all)."""
    return ray.remote(**definition)(target) if definition else ray.remote(target)


def _placement_group_target(options: Mapping[str, Any]) -> tuple[Any, int] | None:
    """The placement group (and bundle index) Ray will place a task with these options
    in, if any: as Ray's own ``RemoteFunction._remote`` decides it, a captured parent's
    group included."""
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = options.get("scheduling_strategy")
    if isinstance(strategy, PlacementGroupSchedulingStrategy):
        group, index = strategy.placement_group, strategy.placement_group_bundle_index
        capture = strategy.placement_group_capture_child_tasks
    elif strategy is None:
        group = options.get("placement_group", "default")
        index = options.get("placement_group_bundle_index", -1)
        capture = options.get("placement_group_capture_child_tasks")
    else:
        return None  # another strategy (SPREAD, node affinity...): no group
    if isinstance(group, str) and group == "default":
        if capture is None:
            capture = ray._private.worker.global_worker.should_capture_child_tasks_in_placement_group
        group = get_current_placement_group() if capture else None
    if group is None or group.is_empty:
        return None
    return group, int(index if index is not None else -1)


def placement_group_of(options: Mapping[str, Any]) -> Any:
    """The placement group a task or actor with these options is placed in (None: none)."""
    target = _placement_group_target(options)
    return None if target is None else target[0]


def node_constraints(options: Mapping[str, Any]) -> tuple[str | None, tuple[tuple[str, float], ...]]:
    """What in a task's or actor's Ray options restricts the nodes it may run on: the node of
    a hard ``NodeAffinitySchedulingStrategy`` (None: none, or a soft one, which Ray may leave
    for another node), and the resources asked for besides CPU and memory (``num_gpus`` as
    ``GPU``, ``accelerator_type``, ``resources={...}``), as sorted (name, amount) pairs."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = options.get("scheduling_strategy")
    node_id = strategy.node_id if isinstance(strategy, NodeAffinitySchedulingStrategy) and not strategy.soft else None
    demands = dict(options.get("resources") or {})
    if options.get("num_gpus"):
        demands["GPU"] = options["num_gpus"]
    if options.get("accelerator_type"):
        # Ray asks for a sliver of the node resource it names each node's accelerator by.
        demands[f"accelerator_type:{options['accelerator_type']}"] = 0.001
    return node_id, tuple(sorted((str(k), float(v)) for k, v in demands.items() if v))


def label_selectors(options: Mapping[str, Any]) -> tuple[tuple[LabelTerm, ...], ...]:
    """The label selectors a task's or actor's options put on its node, each a tuple of
    terms sorted by key: its ``label_selector`` and then those of its ``fallback_strategy``
    (Ray tries them in order), each with the hard terms of a ``NodeLabelSchedulingStrategy``
    added (all must hold); () when there are none."""
    from ray.util.scheduling_strategies import DoesNotExist, Exists, NodeLabelSchedulingStrategy, NotIn

    selectors = [options.get("label_selector")]
    selectors += [(step or {}).get("label_selector") for step in options.get("fallback_strategy") or ()]
    strategy = options.get("scheduling_strategy")
    hard = strategy.hard if isinstance(strategy, NodeLabelSchedulingStrategy) else []
    if not any(selectors) and not hard:
        return ()
    hard_terms = tuple(
        LabelTerm(str(e.key), isinstance(e.operator, (NotIn, DoesNotExist)),
                  None if isinstance(e.operator, (Exists, DoesNotExist)) else tuple(map(str, e.operator.values)))
        for e in hard
    )
    # A step without a selector (or an empty one) lets the call run on any node its hard terms allow.
    return tuple(
        tuple(sorted(tuple(LabelTerm.parse(str(k), str(v)) for k, v in (selector or {}).items()) + hard_terms,
                     key=lambda term: term.key))
        for selector in selectors
    )


def eligible_cluster(cluster: ClusterShape | None, options: Mapping[str, Any]) -> ClusterShape | None:
    """The part of ``cluster`` a task or actor with these Ray options (a mapping or pairs) may
    run on, which sizing fits its request to: a call pinned to a node, or to nodes with
    some labels, asks for no more than they have."""
    if cluster is None:
        return None
    options = dict(options)
    node_id, demands = node_constraints(options)
    return cluster.eligible(node_id, demands, label_selectors(options))


def captured_placement_group() -> str | None:
    """The id of the placement group this process's tasks capture their children into,
    if any (None on a driver): a plan made here is only good inside it."""
    worker = ray._private.worker.global_worker
    if not getattr(worker, "should_capture_child_tasks_in_placement_group", False):
        return None
    group_id = worker.placement_group_id
    return None if group_id.is_nil() else group_id.hex()


def fit_placement_group(options: dict[str, Any], allocation: Allocation | None = None) -> None:
    """Cut raysched's ``num_cpus`` / ``memory`` labels in ``options`` to the bundle of the
    placement group Ray will place the task or actor in, if any: the bundle is the
    reservation, and labels larger than it (a memory label where the bundle has none)
    would make Ray refuse the submission. A label the caller set (``allocation``'s
    ``*_set_by_caller``) is left as it is: Ray then refuses it as it would for plain Ray,
    where a silent cut ran a call with 1 core while its row said the 2 it asked for."""
    target = _placement_group_target(options)
    if target is None:
        return
    group, index = target
    keep_cpus = allocation is not None and allocation.num_cpus_set_by_caller
    keep_memory = allocation is not None and allocation.memory_set_by_caller
    # an actor left at Ray's default CPU has no num_cpus here: only its memory is fitted
    cpus, memory = fit_bundle(options.get("num_cpus", 0.0), options.get("memory", 0), group.bundle_specs, index,
                              keep_cpus=keep_cpus, keep_memory=keep_memory)
    if "num_cpus" in options and not keep_cpus:
        options["num_cpus"] = cpus
    if "memory" in options and not keep_memory:
        if memory > 0:
            options["memory"] = memory
        else:
            del options["memory"]


def remote_options(spec: AttemptSpec) -> dict[str, Any]:
    """The Ray options an attempt is submitted with: the caller's, then raysched's sizing."""
    options = {k: v for k, v in spec.ray_options if k not in TASK_DEFINITION_OPTIONS}
    options.update(spec.allocation.ray_options())
    fit_placement_group(options, spec.allocation)
    budget = retry_budget(spec)
    if budget >= 0:
        left = max(0, budget - spec.reruns)
        if left and options.get("retry_exceptions"):
            # Ray counts retried exceptions against max_retries too, and raysched cannot
            # refuse a retry Ray grants: no spare retry, so that exceptions rerun exactly
            # as often as the caller asked.
            options["max_retries"] = left
        else:
            # One Ray retry more than the caller's budget: it is how a memory-killed attempt
            # hands over to the ladder, and how the death that spends the budget is recorded
            # (``recover`` then fails the call instead of rerunning it).
            options["max_retries"] = left + 1
            if not left:
                options["retry_exceptions"] = False
    options.setdefault("name", ray_task_name(spec.function))
    return options


def ask_a_return(options: dict[str, Any]) -> bool:
    """Give a task the caller asked no return of (``num_returns=0``) one, so that raysched can
    see it end (its caller is still handed None); True when it did."""
    if options.get("num_returns") == 0:
        options["num_returns"] = 1
        return True
    return False


def ray_task_name(function: str) -> str:
    """As Ray names a task: the function's own name, without its module, nor the hash raysched
    adds to tell apart nested functions of one name (``codehash.qualified_name``)."""
    return function.rsplit(".", 1)[-1].split("#", 1)[0]


#: Ray's own default ``max_retries`` for tasks.
RAY_DEFAULT_MAX_RETRIES = 3


def retry_budget(spec: AttemptSpec) -> int:
    """The caller's ``max_retries`` (Ray's default if not given; -1: unlimited): how often a
    call may be rerun after failures that are not raysched's business (``AttemptSpec.reruns``)."""
    return int(dict(spec.ray_options).get("max_retries", RAY_DEFAULT_MAX_RETRIES))
