"""A Prediction -> the Ray resources one attempt asks for. Pure.

Sizing is a chain of small steps over a ``Request`` (memory from the upper
bound, CPU from the target), each doing one thing: add the margin, hold a
minimum, round, fit the largest node.  ``recipe.build_sizer`` composes them from
the config.  CPU is sized from the target, not the upper bound: a CPU shortfall
slows a task, a memory shortfall kills it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

from ..config import RayschedConfig
from ..errors import PredictionTooLarge
from ..types import Allocation, ClusterShape, NodeShape, Prediction


@dataclass(frozen=True)
class Request:
    memory_bytes: float
    num_cpus: float
    capped: bool = False
    notes: tuple[str, ...] = ()
    #: The margin over ``memory_bytes`` the estimate asks for (``Estimate.margin``); None: the sizer's.
    memory_margin: float | None = None


@dataclass(frozen=True)
class SizingContext:
    function: str = ""
    cluster: ClusterShape | None = None
    #: The caller's own ``memory`` / ``num_cpus`` (None: raysched sizes it): the request is
    #: submitted with them whatever the steps make of its own figure, so a step that judges
    #: the request as a whole (``FitLargestNode``) judges it with them.
    kept_memory_bytes: float | None = None
    kept_num_cpus: float | None = None


SizingStep = Callable[[Request, SizingContext], Request]


@dataclass(frozen=True)
class AddMemoryMargin:
    margin: float

    def __call__(self, r: Request, ctx: SizingContext) -> Request:
        margin = self.margin if r.memory_margin is None else r.memory_margin
        return replace(r, memory_bytes=r.memory_bytes * (1.0 + margin))


@dataclass(frozen=True)
class AtLeast:
    memory_bytes: float
    num_cpus: float

    def __call__(self, r: Request, ctx: SizingContext) -> Request:
        return replace(r, memory_bytes=max(r.memory_bytes, self.memory_bytes), num_cpus=max(r.num_cpus, self.num_cpus))


@dataclass(frozen=True)
class RoundUp:
    memory_step: int
    cpu_step: float

    def __call__(self, r: Request, ctx: SizingContext) -> Request:
        # The small epsilon keeps 1.0000001 cores (float noise of cpu_seconds / wall)
        # from rounding up to 1.25.
        cpus = math.ceil(r.num_cpus / self.cpu_step - 1e-6) * self.cpu_step
        return replace(r, memory_bytes=math.ceil(r.memory_bytes / self.memory_step) * self.memory_step,
                       num_cpus=round(cpus, 4))


@dataclass(frozen=True)
class FitLargestNode:
    """Cap a request to the largest node that can run it, or raise PredictionTooLarge, as configured.

    The cluster is the nodes the caller's options allow (``ClusterShape.eligible``: a
    task pinned to a node is fitted to that node). None eligible: the request is left
    as it is, and Ray reports the task as infeasible."""

    policy: str  # "cap" or "error"

    def __call__(self, r: Request, ctx: SizingContext) -> Request:
        cluster = ctx.cluster
        if cluster is None or not cluster.nodes:
            return r
        # Judged as it is submitted: a figure the caller set is taken as it is, so only
        # raysched's own figure may be capped (a caller's num_cpus=8 beside a predicted
        # memory no 8-CPU node has was submitted unschedulable; a caller's memory that fits
        # was refused with PredictionTooLarge for the prediction it replaces).
        memory = r.memory_bytes if ctx.kept_memory_bytes is None else ctx.kept_memory_bytes
        cpus = r.num_cpus if ctx.kept_num_cpus is None else ctx.kept_num_cpus
        # A node that fits both at once, not the largest of each on different nodes.
        if any(n.memory_bytes >= memory and n.num_cpus >= cpus for n in cluster.nodes):
            return r
        if ctx.kept_memory_bytes is not None and ctx.kept_num_cpus is not None:
            return r  # both the caller's: Ray reports it, as it would without raysched
        if ctx.kept_memory_bytes is not None:
            # Only the cores are raysched's: the node with the most of them among those
            # with the caller's memory (one that can run a task that asks for a CPU).
            holding = [n for n in cluster.nodes if n.memory_bytes >= memory and (n.num_cpus > 0 or cpus <= 0)]
            best = max(holding, key=lambda n: (n.num_cpus, n.memory_bytes)) if holding else None
        else:
            best = largest_node_for(cluster, cpus)
            if best is not None and ctx.kept_num_cpus is not None and best.num_cpus < cpus:
                best = None  # no node has the caller's cores: Ray reports it, as it would without raysched
        if best is None:
            return r  # only CPU-less nodes for a task that asks for CPU: Ray reports it, as it would without raysched
        if self.policy == "error":
            raise PredictionTooLarge(ctx.function, int(memory), cpus, best.memory_bytes, best.num_cpus,
                                     best.node_id, cluster.scope)
        allowed = f" (its options allow {cluster.scope})" if cluster.scope else ""
        return replace(r, memory_bytes=min(r.memory_bytes, best.memory_bytes),
                       num_cpus=min(r.num_cpus, best.num_cpus), capped=True,
                       notes=r.notes + (f"capped to node {best.node_id[:8]}{allowed}",))


def largest_node_for(cluster: ClusterShape, num_cpus: float) -> NodeShape | None:
    """The node with the most memory among those with the CPUs ``num_cpus`` asks for (or, if
    none has that many, among those with the most CPUs). A CPU-less node (a head kept free
    of tasks, as Ray advises) never runs a task that asks for a CPU, however much memory it
    has: None if every node is CPU-less (say a call pinned to such a head)."""
    enough = [n for n in cluster.nodes if n.num_cpus >= num_cpus]
    if not enough and cluster.nodes:
        most = max(n.num_cpus for n in cluster.nodes)
        enough = [n for n in cluster.nodes if n.num_cpus == most and n.num_cpus > 0]
    return max(enough, key=lambda n: (n.memory_bytes, n.num_cpus)) if enough else None


@dataclass(frozen=True)
class Sizer:
    steps: tuple[SizingStep, ...]

    def size(
        self,
        prediction: Prediction,
        cluster: ClusterShape | None = None,
        explicit: Mapping[str, object] | None = None,
        function: str = "",
    ) -> Allocation:
        """The allocation for a prediction; options the user set explicitly win."""
        request = Request(memory_bytes=prediction.memory.upper, num_cpus=prediction.cpu.target,
                          memory_margin=prediction.memory.margin)
        reason = f"{prediction.source}: memory from the upper bound, CPU from the target"
        explicit = explicit or {}
        if "memory" in explicit or "num_cpus" in explicit:
            reason += "; " + ", ".join(k for k in ("memory", "num_cpus") if k in explicit) + " set by the caller"
        allocation = self.size_request(request, cluster, explicit, function, reason)
        if "memory" in explicit or prediction.memory.source == "fallback":
            allocation = replace(allocation, memory_is_task_only=True, memory_set_by_caller="memory" in explicit)
        if "num_cpus" in explicit:
            allocation = replace(allocation, num_cpus_set_by_caller=True)
        return allocation

    def size_request(
        self,
        request: Request,
        cluster: ClusterShape | None = None,
        keep: Mapping[str, object] | None = None,
        function: str = "",
        reason: str = "",
        rung: int = 0,
    ) -> Allocation:
        """The allocation for a raw request (before margin, floors and rounding); ``keep``'s
        ``memory`` / ``num_cpus`` are taken as they are."""
        keep = keep or {}
        ctx = SizingContext(function=function, cluster=cluster,
                            kept_memory_bytes=_kept(keep.get("memory")), kept_num_cpus=_kept(keep.get("num_cpus")))
        for step in self.steps:
            request = step(request, ctx)
        memory = keep.get("memory", request.memory_bytes)
        cpus = keep.get("num_cpus", request.num_cpus)
        if request.notes:
            reason += "; " + "; ".join(request.notes)
        return Allocation(num_cpus=float(cpus), memory_bytes=int(memory), rung=rung,  # type: ignore[arg-type]
                          capped=request.capped, reason=reason)


def _kept(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def size(
    prediction: Prediction,
    config: RayschedConfig,
    cluster: ClusterShape | None = None,
    explicit: Mapping[str, object] | None = None,
    function: str = "",
) -> Allocation:
    """Convenience: size with the chain ``recipe.build_sizer(config)`` composes."""
    from .recipe import build_sizer

    return build_sizer(config).size(prediction, cluster, explicit, function)


def fit_bundle(num_cpus: float, memory_bytes: int, bundles: Sequence[Mapping[str, float]],
               index: int = -1, keep_cpus: bool = False, keep_memory: bool = False) -> tuple[float, int]:
    """The ``num_cpus`` and ``memory`` labels of a task placed in a placement group.

    The group's bundles are the user's reservation, and Ray refuses a task whose
    request fits none of them (most bundles hold no ``memory`` at all): each label is
    cut to what the bundle holds (``index``). For -1 (any bundle), memory is cut to
    the smallest bundle's and CPU to the largest bundle's: the group has already
    reserved the memory, so a label larger than the smallest bundle's only narrows
    where Ray may put the call (a group with one bundle holding memory and others
    holding CPUs ran every call on that one bundle, one after another, an audit
    found), while cores are kept as close to the prediction as a bundle allows,
    since oversubscribed cores slow every call in the bundle. raysched still judges
    the attempt by its allocation; only the labels Ray counts shrink. Memory 0
    means no ``memory`` label. ``keep_cpus`` / ``keep_memory``: that label is the
    caller's and stays as it is; the other is fitted to the bundles that can hold it
    (cores cut to the largest bundle's whatever the caller's memory made a request
    no bundle holds, a review found).
    """
    candidates = [bundles[index]] if 0 <= index < len(bundles) else list(bundles)
    if keep_memory:
        candidates = [b for b in candidates if float(b.get("memory", 0.0)) >= memory_bytes]
    if keep_cpus:
        candidates = [b for b in candidates if float(b.get("CPU", 0.0)) >= num_cpus]
    if not candidates:  # nothing holds the caller's own label: Ray refuses it, as for plain Ray
        return num_cpus, memory_bytes
    memory = min(float(memory_bytes), *(float(b.get("memory", 0.0)) for b in candidates))
    cpus = min(num_cpus, max(float(b.get("CPU", 0.0)) for b in candidates))
    return (num_cpus if keep_cpus else cpus), (memory_bytes if keep_memory else int(memory))
