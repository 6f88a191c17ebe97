"""What one finished attempt teaches the estimators. Pure.

An out-of-memory kill is data, not a special path (as in the Kubernetes VPA
recommender's ``RecordOOM``): the attempt's last known peak becomes an
artificial sample of ``max(peak + bump, peak x ratio)``, and the normal
estimators do the rest.  A killed attempt's peak is only a lower bound of what
it needed, which is why it is bumped.
"""

from __future__ import annotations

import math

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
        base = peak if peak is not None else float(allocated_memory_bytes or 0.0)
        return oom_bump(base, config) if base > 0 else None
    if outcome is Outcome.CANCELLED:
        return None
    return peak
