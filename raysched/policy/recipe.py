"""The one place that composes raysched's policy from the config.

``build_predictor``, ``build_sizer``, ``build_ladder`` and ``build_rules`` each
read the one ``RayschedConfig`` and wire the small pieces of ``estimators``,
``sizing``, ``ladder`` and ``rules`` together, with a comment per step.  The
Ray runtime and the trace replay both call these, so a benchmark measures what
users run.

Pure: imports neither ray, mlflow nor pyarrow.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ..config import RayschedConfig
from ..types import Estimate, Features, History, Prediction
from .estimators import (
    AtLeastFewRuns,
    ConstantEstimator,
    CostAwareEstimator,
    EstimationContext,
    Estimator,
    Fallback,
    FirstOf,
    PercentileEstimator,
    QuantileModelEstimator,
    SameTags,
    WithConfidenceMultiplier,
    WithMinimum,
    residual_prior,
)
from .ladder import Ladder, LadderState, Rung
from .models import ResourceModel, fit_resource_model
from .rules import (
    AsRescale,
    AttemptRule,
    CpuOffAllocation,
    MemoryOverAllocation,
    MemoryOverHardCap,
    NodePressure,
    Rules,
    WallOverPrediction,
)
from .rescale import CPU_RULE, MEMORY_RULE, rescale_target
from .samples import oom_bump
from .shift import ShiftTest, SinceShift
from .sizing import AddMemoryMargin, AtLeast, FitLargestNode, RoundUp, Sizer

#: Resources the predictor always answers for; disk is added when history has it.
PREDICTED = ("memory", "cpu", "wall")
MODELLED = ("memory", "cpu", "wall", "disk")


@dataclass(frozen=True, eq=False)
class TrainedModels:
    """The models trained (or served) for one function, per resource."""

    by_resource: Mapping[str, ResourceModel] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.by_resource)

    def get(self, resource: str) -> ResourceModel | None:
        return self.by_resource.get(resource)


@dataclass(frozen=True, eq=False)
class Predictor:
    """Per-resource estimator chains, plus how to train the models they consult."""

    config: RayschedConfig
    chains: Mapping[str, Estimator]

    def train(self, history: History, seed: int = 0) -> TrainedModels:
        """Fit a quantile model per resource that has enough history; pure and deterministic."""
        models = {}
        for resource in MODELLED:
            model = fit_resource_model(history, resource, self.config, seed=seed)
            if model is not None:
                models[resource] = model
        return TrainedModels(models)

    def predict(
        self,
        features: Features,
        history: History | None = None,
        models: TrainedModels | Mapping[str, ResourceModel] | None = None,
        fallback: Fallback | None = None,
        residual_prior: tuple[float, ...] = (),
    ) -> Prediction:
        return compose(self.estimates(features, history, models, fallback, residual_prior=residual_prior))

    def estimates(
        self,
        features: Features,
        history: History | None = None,
        models: TrainedModels | Mapping[str, ResourceModel] | None = None,
        fallback: Fallback | None = None,
        resources: tuple[str, ...] = MODELLED,
        residual_prior: tuple[float, ...] = (),
    ) -> dict[str, Estimate | None]:
        """The estimates of some resources only (``compose`` makes a Prediction of all four);
        ``residual_prior``: ``memory_residual_prior`` of the home's functions."""
        by_resource = models.by_resource if isinstance(models, TrainedModels) else (models or {})
        ctx = EstimationContext(history=history if history is not None else History.empty(),
                                models=by_resource, fallback=fallback or Fallback(), residual_prior=residual_prior)
        return {r: self.chains[r].estimate(ctx, features) for r in resources}


def _cost_aware(resource: str, config: RayschedConfig) -> CostAwareEstimator:
    return CostAwareEstimator(
        resource,
        min_history=config.cost_min_history,
        min_correlation=config.cost_min_size_correlation,
        local_fraction=config.cost_local_fraction,
        min_local=config.cost_min_local,
        tail_allowance=config.cost_tail_allowance,
        min_coverage=config.cost_min_coverage,
        max_slope=config.cost_max_slope,
        extrapolate=config.cost_extrapolate,
        slope_fraction=config.cost_slope_fraction,
        cap_allowance=config.cost_cap_allowance if config.cost_cap_allowance is not None else math.inf,
        widen=config.cost_extrapolation_widen,
        extrapolation_quantile=config.cost_extrapolation_quantile,
        failure_overhead_s=config.cost_failure_overhead_s,
        tail_by_count=config.cost_tail_by_count,
        prior_max_local=config.cost_prior_max_local if config.cost_prior_runs > 0 else 0,
    )


#: The newest runs of each function that the prior pools: a function with thousands of runs
#: would outweigh the others, and cost the profiler a fit of them all.
PRIOR_RUNS_PER_FUNCTION = 200


def memory_residual_prior(histories: Iterable[History], config: RayschedConfig) -> tuple[float, ...]:
    """The memory chain's ``residual_prior`` from the histories of a home's (a workflow's)
    functions: the same estimator's residuals of each one's newest ``PRIOR_RUNS_PER_FUNCTION``
    runs, pooled (``estimators.residual_prior``)."""
    if not config.memory_cost_aware or config.cost_prior_runs <= 0:
        return ()
    return residual_prior((h.tail(PRIOR_RUNS_PER_FUNCTION) for h in histories), _cost_aware("memory", config),
                          config.cost_prior_runs)


def compose(estimates: Mapping[str, Estimate | None]) -> Prediction:
    """A Prediction from the estimates of memory, cpu, wall (never None: they have
    defaults) and disk (None without history); its source is the least informed one."""
    sources = [estimates[r].source for r in PREDICTED if estimates[r] is not None]  # type: ignore[union-attr]
    return Prediction(
        memory=estimates["memory"],  # type: ignore[arg-type]
        cpu=estimates["cpu"],  # type: ignore[arg-type]
        wall=estimates["wall"],  # type: ignore[arg-type]
        disk=estimates["disk"],
        source=_weakest(sources),
    )


def _weakest(sources: list[str]) -> str:
    """The least informed source among the resources: fallback < history < model."""
    for prefix in ("fallback", "history"):
        if any(s.startswith(prefix) for s in sources):
            return prefix
    return min(sources, key=lambda s: (len(s), s)) if sources else "fallback"


def _chain(resource: str, default: float | None, minimum: float, config: RayschedConfig) -> Estimator:
    stats = PercentileEstimator(
        resource,
        percentile=config.stat_percentile,
        min_history=config.min_history_for_stats,
        min_correlation=config.min_input_size_correlation,
        coverage=config.coverage,
    )
    steps: list[Estimator] = []
    if resource == "memory" and config.memory_cost_aware:
        # 0. With 8 runs or more (the default), the allocation of least expected waste, failures
        #    counted at their full cost (see CostAwareEstimator): it already weighs the
        #    uncertainty, so it comes before the model's fixed-coverage bound.
        #    Only the runs with the call's tags (SameTags): tags say the calls differ.
        #    With few runs, the residuals of the home's other functions count too (the
        #    context's residual_prior, ``memory_residual_prior``).
        steps.append(SameTags(_cost_aware(resource, config)))
    steps += [
        # 1. With enough history, the XGBoost quantile model whose upper quantile is
        #    conformally calibrated on held-out runs: already honest, no multiplier.
        QuantileModelEstimator(resource),
        # 2. With a few runs, the p95 (the max below 20 runs) of past use, along the
        #    input-size line where size explains use, widened for little history:
        #    3 runs x1.33, 10 runs x1.10, 30 runs x1.03; of the runs with the call's tags.
        SameTags(WithConfidenceMultiplier(stats, config.confidence_scale, config.confidence_exponent)),
    ]
    if default is not None:
        # 3. No usable history: the user's declared value, or the config's
        #    conservative default (1 GiB, 1 CPU, 60 s); with one or two runs (of the
        #    call's tags), at least the most they used: the value they outgrew is short.
        steps.append(SameTags(AtLeastFewRuns(ConstantEstimator(resource, default, config.coverage), resource,
                                             config.min_history_for_stats)))
    chain: Estimator = FirstOf(tuple(steps))
    if config.shift_detection:
        # 4. Every step sees only the runs since the newest shift of this resource's use
        #    (and no model that learnt from the level before it): old runs must not
        #    size a function whose use halved or doubled for the rest of the window.
        chain = SinceShift(chain, resource, shift_test(config))
    # 5. Never below the floor: no worker lives in less than 64 MiB.
    return WithMinimum(chain, minimum)


def shift_test(config: RayschedConfig) -> ShiftTest:
    """What counts as a shift of a function's use, from the config (``policy.shift``)."""
    return ShiftTest(min_runs=config.shift_min_runs, min_log=config.shift_min_log,
                     noise_multiple=config.shift_noise_multiple)


@functools.lru_cache(maxsize=32)
def build_predictor(config: RayschedConfig) -> Predictor:
    return Predictor(
        config=config,
        chains={
            "memory": _chain("memory", config.default_memory_bytes, config.min_memory_bytes, config),
            "cpu": _chain("cpu", config.default_num_cpus, 0.0, config),
            "wall": _chain("wall", config.default_wall_seconds, 0.0, config),
            # Disk has no default: without history there is no disk estimate at all.
            "disk": _chain("disk", None, 0.0, config),
        },
    )


@functools.lru_cache(maxsize=32)
def build_sizer(config: RayschedConfig) -> Sizer:
    return Sizer(
        steps=(
            # 1. Memory: the calibrated upper bound plus the margin (15%: VPA's), so
            #    that a run at the bound does not sit at the edge of its request; an
            #    estimate that chose its allocation itself (cost-aware) carries margin 0.
            AddMemoryMargin(config.memory_margin),
            # 2. Floors: 64 MiB and a quarter core; Ray schedules nothing smaller usefully.
            AtLeast(config.min_memory_bytes, config.min_num_cpus),
            # 3. Round up: memory to 16 MiB, CPU to a quarter core, so that near-equal
            #    predictions give equal requests (and Ray's scheduling classes stay few).
            RoundUp(config.memory_rounding_bytes, config.cpu_rounding),
            # 4. Last, fit the largest node: cap to it, or raise PredictionTooLarge.
            FitLargestNode(config.oversize_policy),
        )
    )


@functools.lru_cache(maxsize=32)
def build_ladder(config: RayschedConfig) -> Ladder:
    margin = 1.0 + config.memory_margin
    if config.memory_cost_aware:
        return Ladder(
            rungs=(
                # Rung 1: the upper bound with its margin (a cost-aware one has none), for
                #   a first attempt that a cap or an explicit request cut below it.
                Rung("upper bound", lambda s: requested_memory(s.prediction.memory, config.memory_margin)),
                # Rung 2: jump to the ceiling, the largest peak recorded with the
                #   margin: cost-aware sizing expects rare failures, and a failure
                #   already cost a whole attempt, so the retry must fit.
                Rung("largest peak seen", lambda s: s.max_peak_seen * margin if s.max_peak_seen > 0 else None),
                # Rung 3: bigger than anything seen: twice the peak the killed attempt reached,
                #   again after each attempt it does not fit (it gave the third attempt of a
                #   call that needed 1.3 GiB all of a 22 GiB node, with one attempt left).
                Rung("2 x observed peak", lambda s: 2.0 * s.observed_peak, repeat=True),
                # Rung 4: all of the largest node, for the last attempt allowed: one that
                #   fails loses the call.
                Rung("largest node", lambda s: s.largest_node_bytes, final=True),
            ),
            max_attempts=config.max_attempts,
            min_growth=config.cost_ladder_min_growth,
            bump=functools.partial(oom_bump, config=config),
            rounding_bytes=config.memory_rounding_bytes,
        )
    return Ladder(
        rungs=(
            # Rung 1: the prediction's calibrated upper bound with the margin: the
            #   first allocation may have been cut by an explicit or capped request.
            Rung("upper bound", lambda s: requested_memory(s.prediction.memory, config.memory_margin)),
            # Rung 2: twice the peak the killed attempt reached: it died still growing.
            Rung("2 x observed peak", lambda s: 2.0 * s.observed_peak),
            # Rung 3: the largest peak ever recorded for this function, with the margin.
            Rung("largest peak seen", lambda s: s.max_peak_seen * margin if s.max_peak_seen > 0 else None),
            # Rung 4: all of the largest node.
            Rung("largest node", lambda s: s.largest_node_bytes),
        ),
        max_attempts=config.max_attempts,
        # Every step grows at least x1.5 and past the killed attempt's bumped peak,
        # so that the ladder always makes progress (4 attempts reach >= x3.4).
        min_growth=config.ladder_min_growth,
        bump=functools.partial(oom_bump, config=config),
        rounding_bytes=config.memory_rounding_bytes,
    )


def requested_memory(estimate: Estimate, default_margin: float) -> float:
    """What a memory estimate asks for before floors and rounding: its upper bound plus
    its own margin, or ``default_margin`` (the config's) when it has none."""
    return estimate.upper * (1.0 + estimate.margin_or(default_margin))


def _rescale_changes(rule: str, config: RayschedConfig):
    """Whether rescaling an actor for ``rule`` would give it another size (the cluster aside:
    the driver caps to the largest node when it rescales)."""
    sizer = build_sizer(config)

    def changes(report, finding) -> bool:
        return rescale_target(rule, finding.measured, report.allocation, sizer, config) is not None

    return changes


def _node_lead_s(config: RayschedConfig) -> float:
    """Seconds from a node reading until a stop decided on a later one takes effect (0: off).

    A reading that does not count leaves the next one, a reading interval later, to
    start the count; then ``sustain - 1`` more readings; then the stop reaches its
    worker in the reply to the worker's next live sample.
    """
    if not config.node_memory_projection:
        return 0.0
    return config.node_memory_sustain_readings * config.node_sample_interval_s + config.live_interval_s


@functools.lru_cache(maxsize=32)
def build_rules(config: RayschedConfig) -> Rules:
    n = config.monitor_sustain_samples
    return Rules(
        attempt_rules=(
            # Precedence is the order: of the rules whose stop condition holds on the sample
            # that stops an attempt (one rule's for n samples in a row), the first decides.
            # 1. A hard cap (per function, else global) first: over it the call fails with
            #    ResourceLimitExceeded; resubmitting it bigger would only break the cap again.
            #    Two samples in a row, not three: a cap is the user's limit, not a prediction.
            AttemptRule("memory_hard_limit", MemoryOverHardCap(config.memory_limit_bytes, dict(config.memory_limits)),
                        config.monitor_limit_sustain_samples),
            # 2. Resident memory past the allocation x 1.2 for n samples in a row: stop and
            #    resubmit on the next ladder rung before it starves its node (a warning
            #    instead when no larger rung exists: capped, or the last attempt).
            AttemptRule(MEMORY_RULE,
                        MemoryOverAllocation(config.monitor_memory_tolerance, config.max_attempts), n),
            # 3. Past the predicted wall upper bound x 3, and by more than n live intervals
            #    (the samples cannot judge a call of a few ms), never judged on a fallback:
            #    a warning and a metric; cancelled only when monitor_cancel_slow is set.
            AttemptRule("wall_over_prediction",
                        WallOverPrediction(config.monitor_wall_factor, config.monitor_cancel_slow,
                                           n * config.live_interval_s), n),
            # 4. Average cores below x0.25 or above x1.5 of the allocation after 10 s:
            #    recorded as an event (`raysched.events`); nothing is stopped (the next
            #    sizing learns the cores from the attempt's row, as from every row).
            AttemptRule(CPU_RULE,
                        CpuOffAllocation(config.monitor_cpu_low_ratio, config.monitor_cpu_high_ratio,
                                         config.monitor_cpu_min_wall_s, config.min_num_cpus), n),
        ),
        # 5. A node at 90% of its memory (or 1 point below Ray's own kill threshold there,
        #    if that is lower) for 2 readings in a row: its lowest-priority task gives way
        #    (stopped and requeued unchanged), one at a time.  A reading counts as high too
        #    when the node, growing on, would pass Ray's kill threshold before a stop could
        #    take effect: 2 readings 1 s apart plus a live interval (_node_lead_s).  Of the
        #    tasks that started within a live interval of the newest one that is enough to
        #    relieve the node, the smallest gives way.  Readings further apart than two of
        #    the slower reading interval (the metrics endpoint's) are not in a row.
        node_rule=NodePressure(config.node_memory_threshold, config.node_memory_sustain_readings,
                               config.node_kill_margin, lead_s=_node_lead_s(config),
                               started_together_s=config.live_interval_s,
                               in_a_row_s=2 * max(config.node_sample_interval_s, config.node_poll_interval_s)),
        # Actors: one incarnation is judged as one attempt; an actor is never requeued by
        # the node rule (its state lives in it) and is replaced, not resubmitted.
        actor_rules=(
            # A1. The same hard cap: over it the actor is stopped and calls through its handle
            #     fail with ResourceLimitExceeded.
            AttemptRule("memory_hard_limit", MemoryOverHardCap(config.memory_limit_bytes, dict(config.memory_limits)),
                        config.monitor_limit_sustain_samples),
            # A2. Resident memory past the allocation x 1.2 for n samples: rescale, to 1.5 x what
            #     it holds (policy.rescale); a warning when capped or after actor_max_rescales.
            AttemptRule(MEMORY_RULE,
                        AsRescale(MemoryOverAllocation(config.monitor_memory_tolerance, None),
                                  config.actor_max_rescales, _rescale_changes(MEMORY_RULE, config)), n),
            # A3. Average cores below x0.25 or above x1.5 of the allocation after 10 s, for
            #     actor_cpu_sustain_samples in a row: rescale to the cores it uses.
            AttemptRule(CPU_RULE,
                        AsRescale(CpuOffAllocation(config.monitor_cpu_low_ratio, config.monitor_cpu_high_ratio,
                                                   config.monitor_cpu_min_wall_s, config.min_num_cpus),
                                  config.actor_max_rescales,
                                  _rescale_changes(CPU_RULE, config)),
                        config.actor_cpu_sustain_samples),
        ),
    )


__all__ = ["build_predictor", "build_sizer", "build_ladder", "build_rules", "Predictor", "TrainedModels",
           "LadderState", "Fallback", "Rules"]
