"""What one finished attempt teaches the estimators. Pure.

An out-of-memory kill is data, not a special path (as in the Kubernetes VPA
recommender's ``RecordOOM``): the attempt's last known peak becomes an
artificial sample of ``max(peak + bump, peak x ratio)``, and the normal
estimators do the rest.  A killed attempt's peak is only a lower bound of what
it needed, which is why it is bumped.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import RayschedConfig
from ..types import Outcome


def oom_bump(peak_bytes: float, config: RayschedConfig) -> float:
    """VPA's OOM sample: max(peak + 100 MiB, peak x 1.2) with the default config."""
    return max(peak_bytes + config.oom_bump_bytes, peak_bytes * config.oom_bump_ratio)


def memory_sample(
    outcome: Outcome | str,
    peak_rss_bytes: float | None,
    allocated_memory_bytes: float | None,
    config: RayschedConfig,
) -> float | None:
    """The memory value an attempt contributes to its function's history, or None.

    - ok, or error with a measured peak: the peak as measured;
    - killed for memory: the bumped sample of the last measured peak, or of the
      allocation when nothing was measured (Ray kills for node pressure, not for
      exceeding the ``memory`` label, so a known peak is the better lower bound);
    - stopped at a raysched hard limit: the peak as measured, unbumped;
    - cancelled, or an error with nothing measured: nothing.
    """
    if not isinstance(outcome, Outcome):  # an Enum call costs more than the rest: only for strings
        outcome = Outcome(outcome)
    peak = float(peak_rss_bytes) if peak_rss_bytes is not None and math.isfinite(peak_rss_bytes) else None
    if outcome in (Outcome.OOM_KILLED, Outcome.LIMIT_STOPPED):
        if outcome is Outcome.LIMIT_STOPPED:
            # Stopped by a hard cap: what it reached is what it used; bumping would
            # teach the predictor to ask for more than the cap it is not allowed.
            return peak
        # A peak of 0 is nothing measured (a live sample taken before any reading): the
        # allocation then, or the kill would teach nothing.
        base = peak if peak else float(allocated_memory_bytes or 0.0)
        return oom_bump(base, config) if base > 0 else None
    if outcome is Outcome.CANCELLED:
        return None
    return peak


#: Short calls' pooled cores count once their wall seconds add up to this much.
POOLED_CORES_MIN_WALL_S = 1.0

#: CPU time Ray itself spends on a task in its worker, outside the user's function: about
#: 1 ms on the development machine (plain Ray's workers, per tiny task, in
#: benchmarks/README.md's throughput runs).  It runs on the node whatever the function does.
RAY_TASK_OVERHEAD_S = 0.001

#: A function whose calls last less than this (median wall) is not sized for CPU: such calls
#: are mostly Ray's own work, and their wall time mostly noise (a preemption or a garbage
#: collection in one makes it 10x, and a pool of them looks idle), so the function keeps its
#: fallback CPU request, as plain Ray's default of one CPU.
POOLED_CORES_MIN_CALL_S = 0.005


def pooled_short_cores(cores: np.ndarray, cpu_seconds: np.ndarray, wall: np.ndarray,
                       overhead_s: float = RAY_TASK_OVERHEAD_S) -> np.ndarray:
    """Cores for the complete calls too short to have their own (NaN in ``cores``).

    The ratio of one short call is noise, but their CPU seconds over their wall seconds,
    pooled, are a fair figure once the wall seconds add up: without it a function of only
    short calls kept the fallback CPU request for ever.  Each call is charged Ray's own
    work on it too (``overhead_s`` of CPU and of wall), and a function whose calls last
    under ``POOLED_CORES_MIN_CALL_S`` (median) gets no cores at all: a 20 ms call that
    mostly waits is sized at a fraction of a core and packs, but a 1 ms call is not,
    since Ray's part of it keeps a core busy, and packing such calls only made Ray start
    (and, once idle, end) more worker processes than the node has cores
    (benchmarks/README.md, "Pooled cores of 1 ms calls").  Capped at one core: in a
    window of a few ms the process's CPU also counts Ray's own threads, so the pool may
    size short calls down, never up.
    """
    ran = np.nan_to_num(wall) > 0
    if ran.any() and np.median(wall[ran]) < POOLED_CORES_MIN_CALL_S:
        # Its typical call is too short to size; the few calls long enough to have cores
        # of their own are the ones that waited (preempted, or blocked), and would size
        # the function at the smallest fraction of a core.
        return np.full_like(cores, np.nan)
    short = np.isnan(cores) & ~np.isnan(cpu_seconds) & ran
    if not short.any() or wall[short].sum() < POOLED_CORES_MIN_WALL_S:
        return cores
    n = int(short.sum())
    pooled = (cpu_seconds[short].sum() + n * overhead_s) / (wall[short].sum() + n * overhead_s)
    return np.where(short, min(1.0, float(pooled)), cores)
