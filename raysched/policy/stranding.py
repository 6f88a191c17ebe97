"""Whether a call submitted with raysched's labels can still run after nodes left. Pure.

A Ray task spec cannot change once submitted: a call whose ``memory`` / ``num_cpus``
label was sized to fit only the biggest node keeps that label when Ray retries it
after the node died (a system-failure retry; a finished call's value lost with
the node is rebuilt by lineage under the same label too, which nothing here watches), and waits in Ray's queue
for ever if no alive node can hold it, where plain Ray, which labels nothing,
would rerun it on a surviving node.  The driver (``runtime/stranded.py``) watches
its own calls in flight whose labels could strand them (``at_risk``, decided once
per plan) and ends those it finds ``stranded``.

The comparison is against what plain Ray would ask for the same call (``Ask.plain``):
the caller's own ``memory`` / ``num_cpus`` (set per call, ``.options(...)``) are
Ray's semantics, binding on plain Ray too, so a call that no node can hold because
of them is left to Ray as it is; only raysched's own sizing is judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from ..types import ClusterShape, NodeShape
from .sizing import largest_node_for

#: Plain Ray's CPU request for a task that names none.
RAY_DEFAULT_TASK_CPUS = 1.0


@dataclass(frozen=True)
class Ask:
    """The CPUs and memory bytes a task asks of one node."""

    num_cpus: float
    memory_bytes: int

    @staticmethod
    def label(ray_options: Mapping[str, object]) -> "Ask":
        """What a task submitted with these Ray options asks (Ray's defaults where they name none)."""
        cpus = ray_options.get("num_cpus")
        return Ask(float(RAY_DEFAULT_TASK_CPUS if cpus is None else cpus), int(ray_options.get("memory") or 0))  # type: ignore[arg-type]

    def plain(self, explicit: Mapping[str, float]) -> "Ask":
        """What plain Ray would ask for the same call: the caller's own values (``explicit``:
        ``memory`` / ``num_cpus`` set per call), else no memory and Ray's one CPU, never more
        than this ask (a fallback of fewer CPUs is the user's word that the call needs fewer)."""
        cpus = explicit.get("num_cpus")
        memory = explicit.get("memory")
        return Ask(float(min(RAY_DEFAULT_TASK_CPUS, self.num_cpus) if cpus is None else cpus),
                   int(0 if memory is None else memory))


def holds(node: NodeShape, ask: Ask) -> bool:
    """Whether the node's total resources can hold the ask (Ray's feasibility, not its free room)."""
    return node.num_cpus >= ask.num_cpus and node.memory_bytes >= ask.memory_bytes


def at_risk(label: Ask, plain: Ask, nodes: Iterable[NodeShape]) -> bool:
    """Whether losing nodes could strand a call with this label: some node the call may run on
    would run it under plain Ray's ask, but cannot hold raysched's label.  On a cluster of equal
    nodes no call is at risk (the driver then watches nothing)."""
    return any(holds(n, plain) and not holds(n, label) for n in nodes)


def stranded(label: Ask, plain: Ask, nodes: Iterable[NodeShape]) -> bool:
    """Whether a call with this label can no longer run, only because of raysched's sizing:
    no node it may run on (``nodes``: the alive ones its options allow) holds its label, while
    one would run it under plain Ray's ask.  No such node at all: plain Ray would wait too (an
    autoscaler may bring one), so it is not raysched's to end."""
    nodes = tuple(nodes)
    return not any(holds(n, label) for n in nodes) and any(holds(n, plain) for n in nodes)


def largest_node(nodes: Iterable[NodeShape], num_cpus: float) -> NodeShape | None:
    """The node a call needing ``num_cpus`` could be given the most memory on, as sizing
    caps to it (``sizing.largest_node_for``: a CPU-less head does not count), for a
    message; None when there is none."""
    return largest_node_for(ClusterShape(tuple(nodes)), num_cpus)


__all__ = ["Ask", "RAY_DEFAULT_TASK_CPUS", "at_risk", "holds", "largest_node", "stranded"]
