"""How big an actor becomes when the monitor rescales it. Pure.

A task that outgrows its allocation is stopped and resubmitted one rung up the
ladder.  An actor cannot be resubmitted (its state lives in it): it is replaced
by a new one sized for what the old one used, through the same sizing chain as
a first submission (margin, floors, rounding, the largest node), so a rescaled
actor asks for what a task predicted at that size would ask for.

- memory (``memory_over_allocation``): the resident memory it reached x
  ``actor_memory_headroom``, and at least ``ladder_min_growth`` x the old
  allocation (an actor past its allocation is usually still growing); its CPUs
  stay;
- CPU (``cpu_off_allocation``): the average cores it used; its memory stays.

What stays stays with its meaning: a caller's ``num_cpus`` through a memory rescale, and
through a CPU rescale a memory that is the task's own figure (a fallback, or the caller's),
judged on top of the worker's start size as before.  (A CPU rescale of a ``num_cpus`` the
caller set does not happen: ``rules.AsRescale`` warns instead.)

None when the new size would not differ (capped at the largest node already).

Pure: imports neither ray, mlflow nor pyarrow.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import RayschedConfig
from ..types import Allocation, ClusterShape, MiB
from .sizing import Request, Sizer

MEMORY_RULE = "memory_over_allocation"
CPU_RULE = "cpu_off_allocation"
#: The rules whose RESCALE decisions this module sizes.
RESCALE_RULES = (MEMORY_RULE, CPU_RULE)


def rescale_target(
    rule: str,
    measured: float,
    current: Allocation,
    sizer: Sizer,
    config: RayschedConfig,
    cluster: ClusterShape | None = None,
    function: str = "",
) -> Allocation | None:
    """The allocation of the actor replacing one whose ``rule`` fired at ``measured``.

    ``measured`` is in the rule's unit: resident bytes for memory, average cores for CPU.
    """
    rung = current.rung + 1
    if rule == MEMORY_RULE:
        wanted = max(measured * config.actor_memory_headroom, current.memory_bytes * config.ladder_min_growth)
        reason = (f"rescaled: resident {measured / MiB:.0f} MiB over the {current.memory_bytes / MiB:.0f} MiB "
                  f"allocated, x {config.actor_memory_headroom:g} headroom")
        new = sizer.size_request(Request(wanted, current.num_cpus), cluster, {"num_cpus": current.num_cpus},
                                 function, reason, rung)
        new = replace(new, num_cpus_set_by_caller=current.num_cpus_set_by_caller)  # (memory: a measured peak now)
        return new if new.memory_bytes > current.memory_bytes else None
    if rule == CPU_RULE:
        reason = f"rescaled: using {measured:.2f} cores of the {current.num_cpus:g} allocated"
        new = sizer.size_request(Request(current.memory_bytes, measured), cluster,
                                 {"memory": current.memory_bytes}, function, reason, rung)
        new = replace(new, memory_is_task_only=current.memory_is_task_only,
                      memory_set_by_caller=current.memory_set_by_caller)
        return new if new.num_cpus != current.num_cpus else None
    raise ValueError(f"no rescale is sized for rule {rule!r}; expected one of {RESCALE_RULES}")


__all__ = ["rescale_target", "RESCALE_RULES", "MEMORY_RULE", "CPU_RULE"]
