"""The escalation ladder: what the next attempt gets after an attempt was killed for memory.

A ladder is data, not branches (tenacity's ``wait_chain``): a tuple of named
rungs, each a small function of the ladder state that proposes a memory size.
After a failed attempt the next rung whose proposal grows the allocation enough
is taken; ``recipe.build_ladder`` lists the rungs with a comment each, and
``Ladder.describe`` prints the table.  Pure: no ray, mlflow or pyarrow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from ..types import Allocation, AttemptRecord, Prediction


@dataclass(frozen=True)
class LadderState:
    """What the ladder knows when an attempt has failed.

    ``attempts`` are the failed attempts of this call so far, oldest first;
    ``max_peak_seen`` the largest memory use ever recorded for the function
    (0 if none); ``largest_node_bytes`` the largest node's memory (None if
    unknown, as in trace replay); ``limit_bytes`` the function's hard memory cap
    (``memory_limits``; None: none): a rung above it only breaks the cap again, so
    the ladder stops there and the cap's rule decides.
    """

    prediction: Prediction
    attempts: tuple[AttemptRecord, ...]
    max_peak_seen: float = 0.0
    largest_node_bytes: float | None = None
    limit_bytes: float | None = None

    @property
    def last(self) -> AttemptRecord:
        return self.attempts[-1]

    @property
    def observed_peak(self) -> float:
        """The largest peak measured in the failed attempts; their allocation where none was measured."""
        peaks = [a.usage.peak_rss_bytes for a in self.attempts if a.usage is not None and a.usage.peak_rss_bytes > 0]
        return float(max(peaks)) if peaks else float(self.last.allocation.memory_bytes)


@dataclass(frozen=True)
class Rung:
    name: str
    propose: Callable[[LadderState], float | None]
    #: The rung may be taken again by the next attempt (a proposal that grows with the
    #: peaks measured, such as doubling the observed peak); others are climbed past.
    repeat: bool = False
    #: The rung the call's last allowed attempt takes, if it proposes enough: a last
    #: attempt that fails loses the call, so it gets what surely fits (the largest node).
    final: bool = False

    def __repr__(self) -> str:
        return f"Rung({self.name!r})"


@dataclass(frozen=True)
class Ladder:
    rungs: tuple[Rung, ...]
    max_attempts: int
    #: Each new allocation is at least this factor above the previous one.
    min_growth: float
    #: A proposal below the previous allocation's bumped peak is not progress either.
    bump: Callable[[float], float]
    rounding_bytes: int

    def _round(self, value: float) -> int:
        step = self.rounding_bytes
        return int(math.ceil(value / step) * step)

    def next_allocation(self, state: LadderState) -> Allocation | None:
        """The next attempt's allocation, or None when the ladder is exhausted."""
        if not state.attempts:
            raise ValueError("the ladder is climbed after a failed attempt; none given")
        if len(state.attempts) >= self.max_attempts:
            return None
        last = state.last.allocation
        largest, bound_name = state.largest_node_bytes, "the largest node"
        if state.limit_bytes is not None and (largest is None or state.limit_bytes < largest):
            largest, bound_name = state.limit_bytes, "the memory limit"
        if largest is not None and last.memory_bytes >= largest:
            # Already had the largest node (or the cap): nothing bigger exists.  But where
            # what the attempts measured, bumped, fits in it, the kill was not for the call's
            # own use (a neighbour grew, and Ray's killer takes the newest task first, which a
            # resubmitted attempt is): run it there again rather than end the call.
            if state.last.usage is None or self.bump(state.observed_peak) > largest:
                return None
            return replace(last, reason=f"again at {bound_name}: killed within it "
                                        f"(peak {state.observed_peak / 2**20:.0f} MiB)")
        floor = max(last.memory_bytes * self.min_growth, self.bump(state.observed_peak))
        # Rungs are numbered from 1; rung 0 is the first submission's sizing.
        chosen_value, chosen_rung, chosen_name = floor, None, "growth floor"
        start = last.rung - 1 if last.rung >= 1 and self.rungs[last.rung - 1].repeat else last.rung
        order = list(range(start, len(self.rungs)))
        if len(state.attempts) + 1 == self.max_attempts:
            order = [i for i in order if self.rungs[i].final] + [i for i in order if not self.rungs[i].final]
        for index in order:
            rung = self.rungs[index]
            proposal = rung.propose(state)
            if proposal is not None and math.isfinite(proposal) and proposal >= floor:
                chosen_value, chosen_rung, chosen_name = proposal, index + 1, rung.name
                break
        capped = largest is not None and chosen_value > largest
        if capped:
            chosen_value, chosen_name = float(largest), f"{chosen_name}, capped at {bound_name}"
        memory = int(chosen_value) if capped else self._round(chosen_value)
        if largest is not None and memory > largest:
            memory = int(largest)  # rounded up past the node it must fit
        return Allocation(
            num_cpus=last.num_cpus,
            memory_bytes=memory,
            rung=chosen_rung if chosen_rung is not None else last.rung,
            capped=capped,
            reason=chosen_name,
        )

    def describe(self, state: LadderState) -> list[tuple[int, str, float | None]]:
        """(rung number, name, proposal in bytes) for each rung: the ladder as a table."""
        return [(i + 1, r.name, r.propose(state)) for i, r in enumerate(self.rungs)]
