"""Every knob raysched has, in one frozen dataclass, built once and passed down.

No knob is read from the environment anywhere else: ``RayschedConfig.from_env()``
is the one place, called once by the runtime (or replaced by the user's own
instance via ``raysched.configure``).  (The runtime's own ``ray.init()`` for a driver
that made none also reads ``RAYSCHED_LOG_TO_DRIVER``: a Ray option, not a knob.)  Pure: imports neither ray, mlflow nor pyarrow.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .errors import InvalidInput, UnknownKnob
from .types import GiB, MiB

HOME_ENV = "RAYSCHED_HOME"
DEFAULT_HOME = ".raysched"


@dataclass(frozen=True)
class RayschedConfig:
    """Every knob of raysched, with its default; set them with ``raysched.configure(**changes)``.

    ``RayschedConfig.describe()`` (or ``raysched config`` on the command line) lists each
    knob with its section, default and meaning, as commented in ``raysched/config.py``.
    """

    # --- where things live ---------------------------------------------------
    #: Folder of the profile store (Parquet), the MLflow SQLite store and its artifacts.
    home: str = DEFAULT_HOME

    # --- cold start: what a call gets with no usable history -----------------
    #: Memory for a function with no history and no user fallback. Conservative on
    #: purpose: under-requesting gets a task killed, over-requesting only idles. 0: no
    #: memory label at all (plain Ray's default) until there is history; tasks that block
    #: on their children hold their labels while they wait, which can fill a node.
    default_memory_bytes: int = 1 * GiB
    #: Cores for a function with no history and no user fallback.
    default_num_cpus: float = 1.0
    #: Wall seconds assumed for a function with no history (the monitor's slow-task rule, the queue's order).
    default_wall_seconds: float = 60.0

    # --- how much history each estimator needs --------------------------------
    #: Runs needed before history statistics replace the fallback.
    min_history_for_stats: int = 3
    #: Runs needed before the XGBoost model is trained and may replace the statistics
    #: (more than history_window: no model is ever trained).
    min_history_for_model: int = 30
    #: Newest runs per function kept for statistics and shipped to drivers.
    history_window: int = 2000
    #: When a function's use shifts (its level, beyond what input size and tags
    #: explain), size it from the runs since the shift, not the whole window
    #: (policy.shift).  A shift needs shift_min_runs runs on each side and a change of
    #: the median log use of at least shift_min_log and shift_noise_multiple times the
    #: runs' robust spread.  False: every run of the window counts alike.
    shift_detection: bool = True
    shift_min_runs: int = 8
    shift_min_log: float = 0.2
    shift_noise_multiple: float = 1.5

    # --- history statistics ----------------------------------------------------
    #: Percentile of past (input-size-normalised) use taken as the upper bound.
    stat_percentile: float = 95.0
    #: Input size must explain this share of variance (Spearman rho^2) before
    #: the statistics scale with it.
    min_input_size_correlation: float = 0.5

    # --- the model ----------------------------------------------------------------
    #: Quantiles each XGBoost model predicts; the middle one is the target.
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    #: Coverage the calibrated upper bound aims for (split-conformal).
    coverage: float = 0.95
    #: Share of rows held out for calibration and model comparison.
    holdout_fraction: float = 0.25
    #: Each XGBoost quantile model's boosting rounds, tree depth and learning rate.
    xgb_rounds: int = 120
    xgb_max_depth: int = 4
    xgb_learning_rate: float = 0.1
    #: New rows of a function that trigger a background retrain (and at least 10% of
    #: the rows held, so a function with 2,000 rows retrains every 200, not every 20).
    retrain_after_new_rows: int = 20
    #: Seconds between two trainings of one function: training competes with the
    #: tasks for the same cores, so a burst of tiny tasks must not retrain non-stop.
    min_retrain_interval_s: float = 30.0
    #: A retrain costs at most this share of the task time it learns from: the CPU
    #: seconds of the last training must be covered by ``train_cost_fraction`` x the
    #: task seconds (wall x allocated CPUs) of the rows that arrived since.  Functions
    #: of long tasks retrain as soon as the row and time limits allow; a stream of
    #: millisecond tasks does not pay a second of XGBoost and MLflow every 30 s.
    train_cost_fraction: float = 0.05
    #: Registered model versions kept per function and resource, besides those served:
    #: older ones go with their MLflow runs and artifacts (each training left ~1.7 MB).
    registry_keep_versions: int = 20

    # --- cost-aware memory sizing (the default; `raysched eval` measures both chains) -----
    #: Size memory by the expected cost of a failure against the cost of waste
    #: (policy.estimators.CostAwareEstimator) instead of a fixed-coverage upper bound.
    #: It then comes before the model and the statistics in the memory chain, and the
    #: ladder retries at the largest peak seen before doubling.  False: the
    #: fixed-coverage chain (conformal model / p95 along the input-size line).
    memory_cost_aware: bool = True
    #: Runs of a function needed before the cost-aware sizing applies.
    cost_min_history: int = 8
    #: Input size must explain this share of the variance of log memory (Spearman
    #: rho^2) before the cost-aware center follows it.
    cost_min_size_correlation: float = 0.3
    #: Share of runs, nearest in input size, whose residuals set the spread (at least cost_min_local).
    cost_local_fraction: float = 0.35
    cost_min_local: int = 8
    #: A phantom run this share of the residual spread beyond the largest residual: the unseen tail.
    cost_tail_allowance: float = 0.1
    #: Set the phantom run's distance by how many residuals there are (few runs leave more
    #: of the tail unseen): cost_tail_allowance then multiplies
    #: ``policy.estimators.unseen_tail_ratio``, where a run beyond the largest of k normal
    #: draws lands on average (1.0: that model as it is).  Measured, not the default:
    #: benchmarks/README.md, "The unseen tail by count".
    cost_tail_by_count: bool = False
    #: Never cover fewer than this share of the residuals, however cheap failures look.
    cost_min_coverage: float = 0.75
    #: A function with few runs also sizes by the residuals of its home's other functions
    #: (the trace replay's task types of a workflow): this many of them, the quantiles of
    #: all their residuals pooled (0: off), counted among a call's local residuals when
    #: those number at most cost_prior_max_local (the default: under 29 runs).
    #: benchmarks/README.md, "A prior from the other task types".
    cost_prior_runs: int = 5
    cost_prior_max_local: int = 10
    #: Growth floor of the ladder under cost-aware sizing (the OOM bump already adds >= 20%).
    cost_ladder_min_growth: float = 1.2
    #: Beyond the largest input seen, follow the log-log slope of use on input size
    #: (clipped to [0, cost_max_slope]) instead of staying at the largest fitted use.
    cost_extrapolate: bool = True
    cost_max_slope: float = 1.0
    #: Share of the runs, those with the largest inputs, that slope is fitted on.
    cost_slope_fraction: float = 0.5
    #: No allocation above the largest use seen (grown along that slope beyond the
    #: range) times exp(cost_cap_allowance); None: no such cap.
    cost_cap_allowance: float | None = 0.2
    #: Beyond the largest input seen, widen the allocation by this much log memory per
    #: unit of log input size past it (the residuals seen inside the range understate
    #: the error of an extrapolation).
    cost_extrapolation_widen: float = 0.0
    #: Beyond the largest input seen, also widen it by this quantile of leave-largest-out
    #: scores (how far each of the runs with the largest inputs, held out, rose above the
    #: curve fitted on the others plus their largest local residual, per unit of log
    #: distance past their range) times the distance past the range: a conformal offset
    #: for extrapolation; 0: off.
    cost_extrapolation_quantile: float = 0.9
    #: What a failed attempt costs beyond its own run, in seconds of its allocation: the
    #: kill is detected, a new worker starts, the inputs are fetched again, the retry waits
    #: for room, and the caller waits for all of it.  A failure of a 10 s task then weighs
    #: seven times its run, one of an hour-long task 1.02 times, so short tasks are sized
    #: to fit at almost no cost in waste (benchmarks/README.md, "A failure's fixed cost").
    cost_failure_overhead_s: float = 60.0

    # --- sizing: prediction -> Ray options -----------------------------------------
    #: Margin on top of the upper bound for memory, as the VPA recommender's 15%
    #: (fallbacks, statistics and models; not a cost-aware estimate, whose upper bound
    #: is already the allocation it chose: its margin is 0).
    memory_margin: float = 0.15
    #: The confidence multiplier for little history: the upper bound is scaled by
    #: (1 + confidence_scale / n_history) ** confidence_exponent.
    confidence_scale: float = 1.0
    confidence_exponent: float = 1.0
    #: No memory request below this.
    min_memory_bytes: int = 64 * MiB
    #: Memory requests are rounded up to this granularity.
    memory_rounding_bytes: int = 16 * MiB
    #: No CPU request below this (cores).
    min_num_cpus: float = 0.25
    #: CPU requests are rounded up to this fraction of a core.
    cpu_rounding: float = 0.25
    #: What to do when a request exceeds the largest node: "cap" it (and warn) or "error".
    oversize_policy: str = "cap"

    # --- failures: the escalation ladder -------------------------------------------
    #: Attempts per call, the first included, before raysched gives up.
    max_attempts: int = 4
    #: Each rung grows the memory by at least this factor over the previous attempt
    #: (the ladder of memory_cost_aware=False, and an actor's rescale; the cost-aware
    #: ladder, the default for tasks, uses cost_ladder_min_growth).
    ladder_min_growth: float = 1.5
    #: A bigger next attempt that has not started this many seconds after a memory kill or
    #: a monitor stop (queued behind the labels of other waiting calls) is run in the
    #: waiting task's slot.
    handover_start_timeout_s: float = 20.0
    #: Sooner, after this many seconds, when the `memory` it needs is held by raysched's own
    #: waiting calls (the cluster's free memory plus their labels would fit it): they wait
    #: for attempts that cannot start beside them, so waiting longer cannot help.
    handover_held_room_s: float = 3.0
    #: A call that gave way on its node (the node rule's requeue) waits in its own task,
    #: under the `memory` label it holds (the size its next attempt needs), until the monitor
    #: has found room on that node for its expected peak, beside the expected peaks of what
    #: runs there, in every answer for this many seconds (an attempt that just started
    #: reports within a live interval); then it runs its next attempt there. At most
    #: handover_start_timeout_s. It is resubmitted to Ray instead when another node has its
    #: labels free, or the monitor cannot tell. None: always resubmitted, as a memory kill's
    #: next attempt is; it then needs a second label beside the one its task keeps while it
    #: waits (Ray gives back a blocked task's CPU, not its memory).
    requeue_room_hold_s: float | None = 1.0
    #: VPA's OOM bump: a killed attempt's peak becomes max(peak + oom_bump_bytes, peak x oom_bump_ratio).
    oom_bump_bytes: int = 100 * MiB
    oom_bump_ratio: float = 1.2

    # --- the driver -------------------------------------------------------------------
    #: Seconds between the driver's non-blocking refreshes of its model bundle.
    refresh_interval_s: float = 2.0
    #: The profiler builds a function's bundle (its history, 10-30 ms) at most once per this
    #: many seconds while only rows changed, and every process that submits the function
    #: (drivers, and tasks that submit tasks) gets that one. A new model, or a query
    #: (``predict``, ``refresh``), always gets a fresh one. 0: build one per request.
    bundle_max_age_s: float = 1.0
    #: How long a first call of a function may wait for its first bundle (once per
    #: function per driver process, never per task).
    first_bundle_timeout_s: float = 10.0
    #: Seconds between live samples of a running task in its worker.
    live_interval_s: float = 0.5
    #: Worker-side profile rows are sent to the profiler at most this often.
    flush_interval_s: float = 0.2
    #: How long ``ray.shutdown()`` (and the driver's exit) waits at most, before Ray tears
    #: down, for the rows of the calls that finished to be stored (``raysched.flush``); 0: not at all.
    shutdown_flush_timeout_s: float = 5.0
    #: The profiler writes the batches that arrive together as one Parquet part, at most
    #: one write per this many seconds while batches keep coming (group commit; a quiet
    #: profiler writes at once).  A part costs about as much for 50 rows as for 500.
    profile_commit_interval_s: float = 0.5
    #: The profiler merges this many or more adjacent Parquet parts of one size tier
    #: into one, in the background (``ParquetTable.tidy``): a long run of many tiny tasks
    #: writes two parts a second, and every read opens each part. 0: never (merge with
    #: ``raysched compact``).
    store_tidy_fanout: int = 10
    #: Thinning of tiny calls (policy/thinning.py): once a function's calls in one worker
    #: process were short (at most short_call_wall_s of wall time, growing the process by
    #: at most short_call_rss_bytes) short_call_streak times in a row, only one call in
    #: short_call_measure_every is measured in full, and at most one per
    #: short_call_measure_gap_s seconds (of one function, in one worker process); the others
    #: are timed and counted in the ``calls`` of a row the worker sends.  Measuring costs
    #: ~0.2 ms of a core per call, and its row about as much again in the profiler: a fifth
    #: of plain Ray's cost for a 1 ms task.  short_call_measure_every=1 measures every call.
    short_call_wall_s: float = 0.005
    short_call_rss_bytes: int = 16 * MiB
    short_call_streak: int = 100
    short_call_measure_every: int = 10
    short_call_measure_gap_s: float = 0.1

    # --- the live monitor: rules over the live samples of running attempts ---------------
    #: Whether running attempts are reported to the monitor at all.
    monitor_enabled: bool = True
    #: Consecutive live samples a stopping condition must hold before the monitor stops
    #: an attempt (hysteresis: a spike between two samples never stops a task).
    monitor_sustain_samples: int = 3
    #: The same for the hard memory cap (``memory_limit_bytes``, ``memory_limits``): a task
    #: past its cap is stopped on the second sample in a row over it.  A cap is a limit the
    #: user set, not a prediction, so it waits less: a task growing at R bytes per second
    #: ends at about its cap + R x (this + 1) x ``live_interval_s`` (three samples let a
    #: 200 MiB/s leak end 56% over a 400 MiB cap: a helper's audit).
    monitor_limit_sustain_samples: int = 2
    #: Resident memory over the allocation x this factor: stop, resubmit on the next rung.
    monitor_memory_tolerance: float = 1.2
    #: A hard memory cap for every function (None: no cap). Over it a task is stopped and
    #: fails with ResourceLimitExceeded, not retried.
    memory_limit_bytes: int | None = None
    #: Hard memory caps per function, ((name, bytes), ...), overriding the global cap; a
    #: mapping is accepted and stored as a sorted tuple (the config stays hashable).
    memory_limits: tuple[tuple[str, int], ...] = ()
    #: Running past the predicted wall upper bound x this factor is slow: warned and counted.
    monitor_wall_factor: float = 3.0
    #: Cancel slow attempts instead of only warning.
    monitor_cancel_slow: bool = False
    #: A call whose label only a lost node could hold is cancelled by its driver, with a row,
    #: an event and a warning (Ray would keep its retry waiting for ever: runtime/stranded.py).
    #: False on an autoscaling cluster that brings such a node back: the call then waits for it.
    cancel_stranded_calls: bool = True
    #: Average cores below allocation x low or above allocation x high are recorded as events...
    monitor_cpu_low_ratio: float = 0.25
    monitor_cpu_high_ratio: float = 1.5
    #: ...once the attempt has run this long (a start-up phase says little about its CPU use).
    monitor_cpu_min_wall_s: float = 10.0
    #: A node whose used memory reaches this fraction of its total stops its lowest-priority
    #: task; below Ray's own memory monitor threshold (0.95) so that raysched picks the victim.
    node_memory_threshold: float = 0.9
    #: Where a node's Ray memory monitor kills below that (``RAY_memory_usage_threshold``
    #: lowered), raysched acts this far (a fraction of the node's memory) below Ray's threshold.
    #: None: judge by node_memory_threshold alone and leave such a node to Ray's killer.
    #: One point: a growing node is judged by where it is going (node_memory_projection),
    #: so the margin only covers what that does not see; at 3 points (720 MiB of a 23.5 GiB
    #: machine) the monitor benchmark requeued a task in 9 of 12 batches, at 1 point in 7
    #: of 24 (benchmarks/README.md).
    node_kill_margin: float | None = 0.01
    #: Consecutive high readings of a node before a task on it is stopped (and again
    #: before the next one).
    node_memory_sustain_readings: int = 2
    #: Judge a growing node by where it will be when a stop decided on a later reading takes
    #: effect (it grows as since its last reading, at most by what its attempts' expected
    #: peaks, their predictions' upper bounds, still allow): a reading that would then be
    #: past Ray's kill threshold counts as a high one.
    #: False: judge each reading as it is (tasks growing ~1 GB/s then pass Ray's threshold
    #: between the two readings the rule waits for).
    node_memory_projection: bool = True
    #: Seconds between reads of a node's memory (Ray's reporter updates them every 5 s).
    node_poll_interval_s: float = 5.0
    #: Seconds between two judgements of a node from the memory readings its own workers
    #: send with their live samples (fresh every live interval, unlike the endpoint's).
    node_sample_interval_s: float = 1.0
    #: A node's room for the admission queue (the memory its tasks may hold together and keep
    #: it under the threshold above) is the median of what its readings of this many seconds told.
    node_room_window_s: float = 5.0
    #: The monitor forgets an attempt it has heard nothing of for this long.
    monitor_stale_s: float = 60.0
    #: A stopped attempt still running this many live intervals after the stop was raised
    #: into its thread (stuck in C code, or it swallowed the exception) has its worker
    #: killed (SIGKILL); Ray's retry of the task then applies the stop (runtime.worker).
    monitor_hard_stop_intervals: float = 2.0
    #: How long the retry after a worker's death waits for the monitor's directive.
    monitor_directive_timeout_s: float = 2.0

    # --- the admission queue (calls submitted with a priority) --------------------------
    #: How calls of equal priority are ordered: "first_submitted", or "largest_first"
    #: (predicted memory x wall, largest first: the longest-processing-time rule; with
    #: backfill it shortens a simulated batch by 7%, tests/test_admission.py, but did not
    #: measurably shorten the monitor benchmark's, see benchmarks/README.md).
    admission_order: str = "first_submitted"
    #: Let a waiting call start ahead of a bigger one that waits for room, when by the
    #: predictions (upper wall times) it does not delay that call (EASY backfilling,
    #: policy/admission.py).  Off: strict order, room idles while the head call waits.
    admission_backfill: bool = True
    #: Calls reaching the queue within this many seconds of each other are ordered
    #: together before any is admitted (a burst goes by priority, not by arrival; room a
    #: call's end frees meanwhile goes to the calls already there).
    admission_gather_s: float = 0.01
    #: How far ahead of its room a short call may be admitted: the calls admitted before
    #: their room is free add up to at most this many seconds of the whole cluster's time,
    #: by their predicted upper wall times (policy/admission.py, "Pipelining").  It hides the
    #: round trip each admission costs (tiny calls otherwise leave the CPUs idle between
    #: them), and bounds how long an urgent call can wait behind calls of lower priority
    #: that Ray already holds.  0: a call is admitted only once its room is free.
    admission_pipeline_s: float = 0.05
    #: Admit calls only while their expected peaks (their predictions' upper bounds) fit each
    #: node's room under its memory threshold as the monitor last measured it, as well as
    #: their labels its ``memory`` label: a label is fixed when the node starts, and tasks
    #: whose labels fit it can still pass Ray's kill threshold when other programs use more
    #: (policy/admission.py).  False: labels only.
    admission_node_room: bool = True
    #: Calls without a priority go straight to Ray, which books them by their labels alone.
    #: While some node's room (as above) is below this fraction of its ``memory`` label, Ray
    #: can place there more than it holds, and its memory monitor kills what does not fit
    #: (benchmarks/README.md: 6 and 8 kills per batch on a node 1.1-1.8 GB short of its
    #: labels): such calls then wait in the admission queue at priority 0 as well, which
    #: admits by the room (policy.admission.RoomRouting).  None: never.
    route_by_room_below: float | None = 0.85
    #: ...only calls that may hold (by their label, or their expected peak where that is
    #: more) at least this share of the shortest such node's room: a stream of tiny calls
    #: keeps the straight path (the queue's round trip would cost them more than they could
    #: ever hold).
    route_by_room_min_share: float = 0.05
    #: How often a driver asks the monitor for the nodes' rooms (in a thread of its own: a
    #: submission never waits for it).
    room_check_interval_s: float = 2.0

    # --- actors (``@adaptive_remote`` on a class) -------------------------------------------
    #: A rescale for memory sizes the new actor for its resident memory x this factor
    #: (and at least ladder_min_growth x its old allocation), before margin and rounding.
    actor_memory_headroom: float = 1.5
    #: An actor is rescaled at most this many times; past it the monitor only warns.
    actor_max_rescales: int = 3
    #: Consecutive live samples with CPU use off the allocation before an actor is
    #: rescaled for its cores (longer than for memory: a CPU mismatch costs speed, not the node).
    actor_cpu_sustain_samples: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.home, os.PathLike):  # a pathlib.Path is a folder's name too
            object.__setattr__(self, "home", os.fspath(self.home))
        # Types first: a string where a number belongs would make every range check below
        # a TypeError far from its cause (or, for a flag, silently true).
        problems = _type_problems(self)
        if problems:
            raise InvalidInput("invalid RayschedConfig: " + "; ".join(problems))
        if not self.home:
            problems.append("home must name a folder")
        for names, test, wanted in _RANGES:
            for name in names:
                value = getattr(self, name)
                if value is not None and not test(value):
                    problems.append(f"{name} must be {wanted}, got {value!r}")
        if self.oversize_policy not in ("cap", "error"):
            problems.append(f"oversize_policy must be 'cap' or 'error', got {self.oversize_policy!r}")
        if not 0 < self.coverage < 1:
            problems.append("coverage must be between 0 and 1")
        # Stored as tuples, whatever sequence came (a list from JSON or YAML): the config is
        # hashed where the policy built from it is cached (policy.recipe), and compared.
        object.__setattr__(self, "quantiles", tuple(float(q) for q in self.quantiles))
        if len(self.quantiles) < 3 or any(not 0 < q < 1 for q in self.quantiles):
            problems.append("quantiles must be at least three (lower, target, upper), strictly between 0 and 1")
        if list(self.quantiles) != sorted(set(self.quantiles)):
            problems.append("quantiles must be sorted and distinct")
        if len(self.quantiles) % 2 == 0:
            problems.append(f"quantiles must be an odd number of them: the middle one is the target, got "
                            f"{self.quantiles!r}")
        if self.store_tidy_fanout == 1 or self.store_tidy_fanout < 0:
            problems.append("store_tidy_fanout must be 0 (never) or an integer of at least 2")
        if self.ladder_min_growth <= 1 or self.cost_ladder_min_growth <= 1:
            problems.append("ladder_min_growth and cost_ladder_min_growth must be above 1, or the ladder cannot "
                            "make progress")
        pairs = self.memory_limits.items() if isinstance(self.memory_limits, Mapping) else self.memory_limits
        object.__setattr__(self, "memory_limits", tuple(sorted((str(k), int(v)) for k, v in pairs)))
        names = [name for name, _ in self.memory_limits]
        if len(set(names)) != len(names):  # (one of two caps would win by the sort, silently)
            problems.append(f"memory_limits names a function twice: {sorted({n for n in names if names.count(n) > 1})}")
        if any(int(v) <= 0 for _, v in self.memory_limits):
            problems.append("memory_limits must be positive")
        if self.monitor_memory_tolerance < 1:
            problems.append("monitor_memory_tolerance must be at least 1 (a task may reach its allocation)")
        if not 0 < self.node_memory_threshold <= 1:
            problems.append("node_memory_threshold must be a fraction in (0, 1]")
        if self.node_kill_margin is not None and not 0 <= self.node_kill_margin < 1:
            problems.append("node_kill_margin must be a fraction in [0, 1), or None")
        if self.actor_memory_headroom <= 1:
            problems.append("actor_memory_headroom must be above 1")
        if not 0 <= self.monitor_cpu_low_ratio < self.monitor_cpu_high_ratio:
            problems.append("monitor_cpu_low_ratio must be at least 0 and below monitor_cpu_high_ratio")
        if self.admission_order not in ("first_submitted", "largest_first"):
            problems.append(f"admission_order must be 'first_submitted' or 'largest_first', got {self.admission_order!r}")
        if not 0 <= self.admission_gather_s <= 1:
            problems.append(f"admission_gather_s must be between 0 and 1 second, got {self.admission_gather_s!r}")
        if not 0 <= self.admission_pipeline_s <= 60:
            problems.append(f"admission_pipeline_s must be between 0 and 60 seconds, got {self.admission_pipeline_s!r}")
        if not 0 <= self.cost_extrapolation_quantile <= 1:
            problems.append("cost_extrapolation_quantile must be in [0, 1] (0: off)")
        if not problems:  # (combinations only of values each in range: else the advice can be impossible)
            problems.extend(_combination_problems(self))
        if problems:
            raise InvalidInput("invalid RayschedConfig: " + "; ".join(problems))

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser().resolve()

    def replace(self, **changes: object) -> "RayschedConfig":
        """A copy with ``changes``; a knob that does not exist is named, with the closest ones."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            names = [f.name for f in dataclasses.fields(self)]
            hints = {name: difflib.get_close_matches(name, names, n=3) for name in unknown}
            raise UnknownKnob("RayschedConfig has no knob " + "; ".join(
                f"{name!r}" + (f" (did you mean {', '.join(hints[name])}?)" if hints[name] else "") for name in unknown))
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def describe(cls) -> list[tuple[str, str, object, str]]:
        """(section, knob, default, meaning) of every knob, in the order of this file; the
        meaning is the ``#:`` comment just above the knob, or, for a knob right below
        another with no comment of its own, the comment that covers their group."""
        import inspect
        import re

        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        rows: list[tuple[str, str, object, str]] = []
        section, comment, group = "", [], ""
        for line in inspect.getsource(cls).splitlines():
            text = line.strip()
            if text.startswith("# ---"):
                section, comment, group = text.strip("# -"), [], ""
            elif text.startswith("#:"):
                comment.append(text[2:].strip())
            else:
                field = re.match(r"(\w+)\s*:", text)
                if field and field.group(1) in defaults:
                    group = " ".join(comment) or group
                    rows.append((section, field.group(1), defaults[field.group(1)], group))
                elif not text:
                    group = ""  # a blank line ends a group
                comment = [] if field or not text else comment
        return rows

    @classmethod
    def from_env(cls, **overrides: object) -> "RayschedConfig":
        """The one place that reads the environment (``RAYSCHED_HOME``)."""
        values: dict[str, object] = {}
        if os.environ.get(HOME_ENV):
            values["home"] = os.environ[HOME_ENV]
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def _is_int(v: object) -> bool:
    """An integer, or a number with an integral value (``1.5 * GiB`` bytes); never a bool."""
    return not isinstance(v, bool) and (isinstance(v, numbers.Integral)
                                        or (isinstance(v, numbers.Real) and float(v).is_integer()))


def _is_number(v: object) -> bool:
    """A finite real number: infinity passed every range check below and then failed far from
    its cause (an OverflowError in sizing, a NaN of cores)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


#: What an annotation of RayschedConfig asks of a value, how to say it, and the plain Python value kept.
_TYPES = {
    "int": (_is_int, "an integer", int),
    "float": (_is_number, "a finite number", float),
    "bool": (lambda v: isinstance(v, bool), "True or False", bool),
    "str": (lambda v: isinstance(v, str), "a string", str),
}


def _type_problems(config: RayschedConfig) -> list[str]:
    """What is of the wrong type; values of the right one are kept as plain ints and floats
    (numpy's included), so that the config pickles and compares as itself everywhere."""
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = str(f.type)
        if kind.endswith(" | None"):
            if value is None:
                continue
            kind = kind[: -len(" | None")]
        check = _TYPES.get(kind)
        if check is None:
            continue
        if not check[0](value):
            problems.append(f"{f.name} must be {check[1]}, got {value!r}")
        elif type(value) is not check[2]:
            object.__setattr__(config, f.name, check[2](value))
    if not isinstance(config.quantiles, (tuple, list)) or not all(_is_number(q) for q in config.quantiles):
        problems.append(f"quantiles must be a sequence of numbers, got {config.quantiles!r}")
    limits = config.memory_limits
    pairs = limits.items() if isinstance(limits, Mapping) else limits
    try:
        bad = [p for p in pairs if len(p) != 2 or not isinstance(p[0], str) or not _is_int(p[1])]
    except TypeError:
        bad = [limits]
    if bad:
        problems.append(f"memory_limits must map function names to bytes (integers), got {limits!r}")
    return problems


def _combination_problems(config: RayschedConfig) -> list[str]:
    """Knobs each in range whose combination cannot work."""
    problems = []
    n = config.min_history_for_model
    held = max(4, math.ceil(n * config.holdout_fraction))  # as policy.models.fit_resource_model holds out
    if n - held < 1:
        problems.append(f"min_history_for_model={n} with holdout_fraction={config.holdout_fraction} leaves no run "
                        f"to train on ({held} are held out): use at least {held + 1} runs")
    # (min_history_for_model past the window is allowed: it is how models are turned off)
    needs = {"min_history_for_stats": config.min_history_for_stats, "cost_min_history": config.cost_min_history}
    short = [f"{name}={value}" for name, value in needs.items() if value > config.history_window]
    if short:
        problems.append(f"history_window={config.history_window} keeps fewer runs than {', '.join(short)} needs: "
                        "that estimator would never be used")
    # The monitor forgets an attempt it has not heard of for monitor_stale_s: shorter than the
    # samples a rule waits for (workers report in turn), it forgot each before its rule could fire.
    samples = max(config.monitor_sustain_samples, config.monitor_limit_sustain_samples, config.actor_cpu_sustain_samples)
    stale_floor = (samples + 2) * config.live_interval_s
    if config.monitor_stale_s < stale_floor:
        problems.append(f"monitor_stale_s={config.monitor_stale_s:g} is shorter than the {samples} samples a rule "
                        f"waits for, and two more, at live_interval_s={config.live_interval_s:g}: the monitor would "
                        f"forget attempts before judging them; use at least {stale_floor:g}")
    return problems


#: (fields, test, what the test wants): the ranges RayschedConfig checks.
_RANGES: tuple[tuple[tuple[str, ...], Callable[[float], bool], str], ...] = (
    (("min_memory_bytes", "memory_rounding_bytes", "cpu_rounding", "live_interval_s",
      "flush_interval_s", "xgb_learning_rate", "confidence_scale", "cost_max_slope", "monitor_stale_s",
      "monitor_wall_factor", "monitor_hard_stop_intervals", "monitor_directive_timeout_s", "node_poll_interval_s",
      "node_sample_interval_s", "node_room_window_s", "memory_limit_bytes", "room_check_interval_s"),
     lambda v: v > 0, "positive"),
    (("default_memory_bytes", "default_num_cpus", "default_wall_seconds", "min_num_cpus", "memory_margin", "confidence_exponent",
      "min_retrain_interval_s", "train_cost_fraction", "refresh_interval_s", "bundle_max_age_s",
      "first_bundle_timeout_s", "handover_start_timeout_s", "handover_held_room_s", "requeue_room_hold_s", "oom_bump_bytes",
      "shutdown_flush_timeout_s", "profile_commit_interval_s", "short_call_wall_s", "short_call_rss_bytes",
      "short_call_measure_gap_s",
      "monitor_cpu_min_wall_s", "cost_tail_allowance", "cost_cap_allowance", "cost_extrapolation_widen",
      "cost_failure_overhead_s", "shift_min_log", "shift_noise_multiple",
      "actor_max_rescales", "cost_prior_runs", "cost_prior_max_local"), lambda v: v >= 0, "at least 0"),
    (("min_history_for_stats", "min_history_for_model", "history_window", "xgb_rounds", "xgb_max_depth",
      "retrain_after_new_rows", "registry_keep_versions", "max_attempts", "short_call_streak", "short_call_measure_every",
      "monitor_sustain_samples", "monitor_limit_sustain_samples", "node_memory_sustain_readings",
      "actor_cpu_sustain_samples"),
     lambda v: v >= 1, "at least 1"),
    (("cost_min_history", "cost_min_local", "shift_min_runs"), lambda v: v >= 2, "at least 2"),
    (("holdout_fraction",), lambda v: 0 < v < 1, "a fraction strictly between 0 and 1"),
    (("stat_percentile",), lambda v: 0 < v <= 100, "a percentile in (0, 100]"),
    (("min_input_size_correlation", "cost_min_size_correlation"), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("cost_slope_fraction", "cost_local_fraction", "cost_min_coverage", "route_by_room_below"),
     lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    (("route_by_room_min_share",), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("oom_bump_ratio",), lambda v: v >= 1, "at least 1"),
)
