"""The live monitor's rules: what to do about a running attempt, decided from its live samples.

Each rule is a small frozen piece with one job: a *check* looks at one live
report of an attempt and says whether its condition holds (and what it would
do); ``AttemptRule`` adds hysteresis (the condition must hold over N consecutive
samples before a stop, so a spike between two samples never stops a task, and a
rule never flaps); ``NodePressure`` picks which attempt on a node under memory
pressure gives way.  ``recipe.build_rules`` composes them from the config, with
a comment per step.

Rules only decide.  A ``Decision`` says "stop this attempt and resubmit it on
the next ladder rung", "stop it and fail with ResourceLimitExceeded", ...; the
monitor records it and the worker applies it.  The state a rule needs between
samples (streaks, what already fired) is an immutable ``AttemptState`` handed
in and returned, so every rule is a pure function of its inputs and a test can
replay any sequence of samples.

Priorities: a higher ``priority`` number is more important; under node memory
pressure the lowest number gives way first.

Pure: imports neither ray, mlflow nor pyarrow.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from ..errors import ResourceLimitExceeded
from ..types import Allocation, MiB
from .admission import expected_peak_bytes

# --- actions ----------------------------------------------------------------------------------

NONE = "none"
WARN = "warn"  # log it and count it; the attempt runs on
RECORD_CPU = "record_cpu"  # CPU use far from the allocation: an event for the next sizing, nothing else
STOP_AND_RESUBMIT = "stop_and_resubmit"  # stop it, resubmit on the next ladder rung
STOP_LIMIT = "stop_limit"  # stop it, fail the call with ResourceLimitExceeded, no retry
CANCEL = "cancel"  # stop it, the call ends cancelled
REQUEUE_LOWEST_PRIORITY = "requeue_lowest_priority"  # stop it, resubmit unchanged: it gave way on its node
RESCALE = "rescale"  # an actor: replace it by one sized for what it uses (see policy.rescale)

ACTIONS = (NONE, WARN, RECORD_CPU, STOP_AND_RESUBMIT, STOP_LIMIT, CANCEL, REQUEUE_LOWEST_PRIORITY, RESCALE)
#: Actions that end the attempt (for an actor: its incarnation): once one is decided,
#: nothing else is evaluated for it.
STOPS = frozenset({STOP_AND_RESUBMIT, STOP_LIMIT, CANCEL, REQUEUE_LOWEST_PRIORITY, RESCALE})

#: What a live report is of: one attempt of a task, or one incarnation of an actor
#: (its ``call_id`` is the actor's id across rescales, its ``attempt`` the incarnation).
TASK = "task"
ACTOR = "actor"

#: Rule names of what the driver did about an actor's RESCALE decision, recorded as events
#: beside the decision itself: the actor was replaced, or it was left as it is (it did not
#: opt in to rescaling, or no other size would help).
ACTOR_RESCALED = "actor_rescaled"
ACTOR_RESCALE_SKIPPED = "actor_rescale_skipped"
#: ...and a rescale whose state hand-over failed (the save or restore hook raised).
ACTOR_STATE_LOST = "actor_state_lost"
#: Rule name of a call the driver cancelled because its node was lost and no alive node can
#: hold the label raysched submitted it with (``policy.stranding``, ``runtime.stranded``).
NODE_LOST = "node_lost"


# --- what the rules see and say ----------------------------------------------------------------


@dataclass(frozen=True)
class LiveReport:
    """One live sample of a running attempt, with what it was predicted and allocated.

    Memory in bytes, CPU in seconds of CPU time, wall in seconds, all totals of
    the attempt so far (``rss_bytes`` is the resident size now, ``peak_rss_bytes``
    the peak so far); ``timestamp`` is the sample's ``time.time()``.
    ``prediction_source`` is the Prediction's source ("fallback", "history",
    "model-vN"): a fallback's wall time is no prediction to judge a run by.
    """

    function: str
    code_hash: str
    call_id: str
    attempt: int
    node_id: str
    priority: int
    allocation: Allocation
    predicted_memory_upper_bytes: float
    predicted_wall_upper_s: float
    prediction_source: str
    rss_bytes: int
    peak_rss_bytes: int
    cpu_seconds: float
    wall_seconds: float
    read_bytes: int = 0
    write_bytes: int = 0
    timestamp: float = 0.0
    #: Ray's memory-monitor kill threshold on the reporting worker's node, if it knows it.
    node_kill_threshold: float | None = None
    #: The node's used and total memory as the worker saw them at ``timestamp`` (used =
    #: total - available, as Ray's memory monitor counts it); None: not measured.
    node_used_bytes: float | None = None
    node_total_bytes: float | None = None
    #: TASK or ACTOR: actors are judged by ``Rules.actor_rules`` and never chosen by the node rule.
    kind: str = TASK
    #: An actor whose class opted in to being replaced by one of another size.
    rescalable: bool = False
    #: The process tree's resident size when the attempt began (the interpreter, Ray,
    #: what earlier tasks left): part of ``rss_bytes`` that is not the task's.
    start_rss_bytes: int = 0
    #: The call's own last attempt (``@adaptive_remote(max_attempts=N)``, else the
    #: config's); None: the monitor's config says.
    max_attempts: int | None = None
    #: The wall estimate's own source: the overall ``prediction_source`` is the least
    #: informed resource's, which for a call too short to have CPU cores is CPU's fallback.
    wall_source: str = ""
    #: The largest node's memory the attempt was sized against (``AttemptSpec.largest_node_bytes``);
    #: None: unknown.  A stopped task keeps its ``memory`` label while its next attempt runs, so
    #: that attempt gets at most what this leaves beside it (``worker.climb_and_resubmit``).
    largest_node_bytes: float | None = None
    #: The most the ladder may give this attempt's next one: the largest node less the labels
    #: this task and the call's earlier tasks, waiting for this attempt, keep while it runs
    #: (``worker.ladder_room``). None: the largest node less this attempt's own label.
    ladder_room_bytes: float | None = None

    def node_memory(self) -> "NodeMemory | None":
        """The node reading this report carries, if any."""
        if self.node_used_bytes is None or not self.node_total_bytes:
            return None
        return NodeMemory(self.node_id, self.node_used_bytes, self.node_total_bytes, self.timestamp,
                          self.node_kill_threshold, source=WORKER_READING)

    @property
    def memory_label_bytes(self) -> float:
        """What the attempt may hold by its ``memory`` label, in the terms of ``rss_bytes``.

        raysched's own sizes are peaks of the whole worker process; a caller's own
        figure (``memory_is_task_only``: a fallback, or ``memory=`` given) is the task's
        memory alone, as Ray's label is, on top of what the worker held when the attempt
        began (130-180 MiB: judging the whole process by it stopped tasks that allocated nothing).
        """
        label = float(self.allocation.memory_bytes)
        if self.allocation.memory_is_task_only:
            label += float(self.start_rss_bytes)
        return label

    @property
    def expected_peak_bytes(self) -> float:
        """The most the attempt is expected to hold, in the terms of ``rss_bytes``.

        Its prediction's upper bound where raysched sized it (what the admission
        queue counts it by against a node's room: ``policy.admission.expected_peak_bytes``);
        a caller's own figure as its label says.  Judged by its label, a node
        whose queue admitted expected peaks up to its room looked set to pass its
        kill threshold whenever its tasks climbed together.
        """
        peak = expected_peak_bytes(self.predicted_memory_upper_bytes, self.allocation.memory_is_task_only)
        return self.memory_label_bytes if peak is None else peak

    @property
    def memory_headroom_bytes(self) -> float:
        """How much more the attempt is expected to hold: its expected peak less what it holds now (>= 0)."""
        return max(0.0, self.expected_peak_bytes - float(self.rss_bytes))

    @property
    def key(self) -> tuple[str, int]:
        """An attempt's identity: (call_id, attempt)."""
        return (self.call_id, self.attempt)

    @property
    def cpu_cores(self) -> float:
        """Average cores used so far: CPU seconds per wall second."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0


#: Where a node reading comes from.  A worker reads the node's memory as it sends a live
#: sample (fresh then); a node's metrics endpoint serves what Ray's reporter gathered up to
#: ~5 s before, too stale to tell how fast the node grows.
WORKER_READING = "worker"
METRICS_READING = "metrics"

#: Ray's memory monitor kills at this used fraction of a node unless its raylet was started
#: with another ``RAY_memory_usage_threshold``.
RAY_DEFAULT_KILL_THRESHOLD = 0.95


@dataclass(frozen=True)
class NodeMemory:
    """One reading of a node's memory (bytes): used = total - available, as Ray counts it."""

    node_id: str
    used_bytes: float
    total_bytes: float
    timestamp: float = 0.0
    #: The used fraction at which Ray's own memory monitor on this node starts killing
    #: (``RAY_memory_usage_threshold`` as the node's workers inherited it); None: unknown.
    kill_threshold: float | None = None
    #: WORKER_READING or METRICS_READING: only two workers' readings tell a growth rate.
    source: str = METRICS_READING
    #: Private memory of the node's idle Ray worker processes then (read where a reading
    #: can afford to look at every process: a probe of a quiet node; 0 otherwise).  Part of
    #: ``used_bytes``, but not room lost: a task Ray starts on an idle worker holds that
    #: worker's memory as its own, within its expected peak (see ``room_bytes``).
    idle_workers_bytes: float = 0.0

    @property
    def fraction(self) -> float:
        return self.used_bytes / self.total_bytes if self.total_bytes > 0 else 0.0


def resident_at(samples: Sequence[tuple[float, float]], t: float, near: float,
                ended_at: float | None = None) -> float:
    """An attempt's resident size at time ``t`` from its samples ((timestamp, bytes), oldest first).

    Between two samples, on the line between them: a task that grows 1 GB/s moves
    by 500 MiB in one live interval, and its last sample alone, set against a node
    reading taken up to an interval before or after it, put a node's room out by
    as much.  Within ``near`` before its first sample, that sample's size; after
    its last, that sample's size until ``ended_at`` (when its worker said it
    ended), or for ``near`` if it has not said.  Further out, 0: it had not
    started, or it has ended (its memory freed).
    """
    if not samples or t < samples[0][0] - near:
        return 0.0
    if t > samples[-1][0]:
        end = ended_at if ended_at is not None else samples[-1][0] + near
        return float(samples[-1][1]) if t < end else 0.0
    if t <= samples[0][0]:
        return float(samples[0][1])
    for (t0, b0), (t1, b1) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            return float(b0) if t1 <= t0 else float(b0) + (float(b1) - float(b0)) * (t - t0) / (t1 - t0)
    return float(samples[-1][1])


@dataclass(frozen=True)
class Decision:
    """What the monitor decided about one attempt, and why; one event row when not "none".

    ``measured`` and ``allocated`` are in the rule's unit (bytes for memory,
    seconds for wall, cores for CPU, a used fraction for node memory).
    """

    rule: str
    action: str
    function: str
    call_id: str
    attempt: int
    measured: float = 0.0
    allocated: float = 0.0
    detail: str = ""
    node_id: str = ""
    code_hash: str = ""
    timestamp: float = 0.0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; expected one of {ACTIONS}")

    @property
    def stops(self) -> bool:
        """Whether the attempt must stop."""
        return self.action in STOPS

    def limit_error(self) -> ResourceLimitExceeded:
        """The error a call stopped at a hard limit fails with (``stop_limit`` decisions only)."""
        if self.action != STOP_LIMIT:
            raise ValueError(f"only a {STOP_LIMIT} decision is a limit error, not {self.action!r}")
        return ResourceLimitExceeded(self.function, "memory", self.measured, self.allocated, self.attempt)

    @staticmethod
    def none(report: LiveReport) -> "Decision":
        return Decision("", NONE, report.function, report.call_id, report.attempt,
                        node_id=report.node_id, code_hash=report.code_hash, timestamp=report.timestamp)


@dataclass(frozen=True)
class Finding:
    """A check's answer when its condition holds: the action it proposes, and the figures."""

    action: str
    measured: float
    allocated: float
    detail: str


class Check(Protocol):
    """Looks at one live report; a Finding when the condition holds, else None."""

    def __call__(self, report: LiveReport) -> Finding | None: ...


def _mib(value: float) -> str:
    return f"{value / MiB:.0f} MiB"


# --- checks: one condition each ---------------------------------------------------------------


@dataclass(frozen=True)
class MemoryOverAllocation:
    """Resident memory past the allocation x tolerance: stop and resubmit one rung up.

    When no larger rung exists (the allocation was capped to the largest node, this
    is the last attempt, or a task's allocation is half the largest node or more: its
    stopped attempt keeps its ``memory`` label while the next one runs, so the ladder
    has no room for a bigger one beside it; less for an attempt whose call's earlier
    tasks wait for it, holding their labels too: ``ladder_room_bytes``) stopping would only fail the call, so the
    check warns instead and leaves Ray's own memory monitor as the backstop. So it does
    for memory the caller set (``.options(memory=...)``): that figure wins over
    raysched's sizes, and plain Ray would let the task run past it where the node
    has room (the node-pressure rule and the hard cap still apply to it).
    """

    tolerance: float
    max_attempts: int | None  # None: no last attempt (an actor's rescales are counted by AsRescale)

    def __call__(self, r: LiveReport) -> Finding | None:
        allocated = float(r.allocation.memory_bytes)
        if allocated <= 0:
            return None
        worker = r.memory_label_bytes - allocated  # the worker's start size, for a caller's own figure
        limit = r.memory_label_bytes * self.tolerance
        if r.rss_bytes <= limit:
            return None
        over = f"{_mib(allocated)} + the worker's {_mib(worker)} at the start" if worker else _mib(allocated)
        detail = f"resident {_mib(r.rss_bytes)} is over the allocation {over} x {self.tolerance:g}"
        # The call's own max_attempts when it reports one (an actor's rule has none: its
        # rescales are counted by AsRescale).
        last = None if self.max_attempts is None else (r.max_attempts or self.max_attempts)
        if r.allocation.memory_set_by_caller:
            return Finding(WARN, r.rss_bytes, allocated, f"{detail}; the caller set this memory, left running")
        # The ladder caps the next rung at what the largest node leaves beside the label this
        # task keeps while it waits, and those of the call's earlier tasks waiting for it
        # (worker.climb_and_resubmit): from there up, nothing bigger fits, and a stop failed
        # the call (AttemptsExhausted) that Ray let run.
        room = r.ladder_room_bytes
        if room is None and r.largest_node_bytes:
            room = float(r.largest_node_bytes) - allocated
        beside = r.kind == TASK and bool(r.largest_node_bytes) and room is not None and allocated >= room
        if r.allocation.capped or (last is not None and r.attempt >= last) or beside:
            # A capped allocation's reason says what capped it (the largest node, the memory limit).
            why = (r.allocation.reason or "capped at the largest node") if r.allocation.capped \
                else f"attempt {r.attempt} is the last" if last is not None and r.attempt >= last \
                else (f"a bigger one would not fit beside this one's label"
                      f"{' and those of its earlier attempts waiting for it' if r.ladder_room_bytes is not None else ''}"
                      f" on the largest node, {_mib(float(r.largest_node_bytes))}")
            return Finding(WARN, r.rss_bytes, allocated, f"{detail}; no larger rung ({why}), left running")
        return Finding(STOP_AND_RESUBMIT, r.rss_bytes, allocated, f"{detail}; resubmit on the next rung")


@dataclass(frozen=True)
class MemoryOverHardCap:
    """Resident memory past a hard cap: stop, fail with ResourceLimitExceeded, no retry.

    ``per_function`` caps win over ``global_limit``; a function is looked up by
    its full name, then by its last dotted part (``"mod.f"`` then ``"f"``).
    """

    global_limit: float | None
    per_function: Mapping[str, float] = field(default_factory=dict)

    def limit_for(self, function: str) -> float | None:
        for name in (function, function.rsplit(".", 1)[-1]):
            if name in self.per_function:
                return float(self.per_function[name])
        return float(self.global_limit) if self.global_limit is not None else None

    def __call__(self, r: LiveReport) -> Finding | None:
        limit = self.limit_for(r.function)
        if limit is None or r.rss_bytes <= limit:
            return None
        return Finding(STOP_LIMIT, r.rss_bytes, limit,
                       f"resident {_mib(r.rss_bytes)} is over the hard limit {_mib(limit)}; not retried")


@dataclass(frozen=True)
class WallOverPrediction:
    """Running longer than the predicted wall upper bound x factor: warn, or cancel if configured.

    A fallback wall estimate (no history) is the config's default, not a
    prediction, so it judges nothing: a first run is never called slow.
    ``min_over_s``: and never less than this past the upper bound. Live samples come
    every half second or so: a call predicted to take 7 ms and sampled at 22 ms was
    "slow" by the ratio alone (an audit), and with ``cancel`` any call of a few ms on a
    busy node would have been cancelled.
    """

    factor: float
    cancel: bool = False
    min_over_s: float = 0.0

    def __call__(self, r: LiveReport) -> Finding | None:
        if (r.wall_source or r.prediction_source).startswith("fallback") or r.predicted_wall_upper_s <= 0:
            return None
        limit = max(r.predicted_wall_upper_s * self.factor, r.predicted_wall_upper_s + self.min_over_s)
        if r.wall_seconds <= limit:
            return None
        detail = (f"running {_seconds(r.wall_seconds)}, over the predicted upper bound "
                  f"{_seconds(r.predicted_wall_upper_s)} x {self.factor:g}")
        return Finding(CANCEL if self.cancel else WARN, r.wall_seconds, r.predicted_wall_upper_s,
                       detail + ("; cancelled" if self.cancel else ""))


def _seconds(value: float) -> str:
    """A duration for a message: "0.0 s" said nothing of a call of a few milliseconds."""
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


@dataclass(frozen=True)
class CpuOffAllocation:
    """Average cores far below or above the allocation, once past a start-up phase: record it.

    Below is not recorded for an allocation at ``min_cpus`` (the sizing's floor): nothing
    smaller would be asked for.
    """

    low_ratio: float
    high_ratio: float
    min_wall_s: float
    min_cpus: float = 0.0

    def __call__(self, r: LiveReport) -> Finding | None:
        allocated = float(r.allocation.num_cpus)
        if r.wall_seconds < self.min_wall_s or allocated <= 0:
            return None
        used = r.cpu_cores
        if used < allocated * self.low_ratio:
            if allocated <= self.min_cpus + 1e-9:
                return None
            side = f"below {self.low_ratio:g} x"
        elif used > allocated * self.high_ratio:
            side = f"above {self.high_ratio:g} x"
        else:
            return None
        return Finding(RECORD_CPU, used, allocated,
                       f"using {used:.2f} cores, {side} the {allocated:g} allocated over {r.wall_seconds:.0f} s")


# --- hysteresis and state ---------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptRule:
    """A named check with hysteresis.

    The check must hold on ``sustain`` consecutive samples before the rule
    fires; one sample where it does not resets the count.  A rule fires at most
    once per attempt.
    """

    name: str
    check: Check
    sustain: int = 1

    def __post_init__(self) -> None:
        if self.sustain < 1:
            raise ValueError(f"sustain must be at least 1, got {self.sustain}")


@dataclass(frozen=True)
class AttemptState:
    """What the rules remember of one attempt between its samples."""

    streaks: Mapping[str, int] = field(default_factory=dict)  # rule name -> consecutive samples held
    fired: frozenset[str] = frozenset()  # rules that already fired for this attempt
    stop: Decision | None = None  # the stop decided for it, if any: nothing more is evaluated
    last_timestamp: float = float("-inf")  # of the newest sample evaluated


@dataclass(frozen=True)
class NodeState:
    """What the node rule remembers of one node between its readings."""

    streak: int = 0
    #: Of the last reading from the node's own workers, stamped by the node's clock.
    last_timestamp: float = float("-inf")
    #: The last reading itself, if a worker sent it (the start of the next growth rate).
    last_reading: "NodeMemory | None" = None
    #: Of the last reading from the node's metrics endpoint, stamped by the monitor's clock:
    #: kept apart, since a node's clock behind the monitor's by a poll interval had every
    #: worker reading after the first poll dropped as not newer.
    last_endpoint_timestamp: float = float("-inf")


@dataclass(frozen=True)
class NodePressure:
    """A node's used memory at or above ``threshold`` (a fraction of its total) for
    ``sustain`` consecutive readings: stop and requeue one attempt on it.

    The one that gives way is the lowest priority first, never a higher one
    while a lower one still runs there.  Among equals, one with attempts left (a call on
    its last attempt that gives way fails); of those, the one that started last
    of those whose memory alone brings the node back under the threshold: it
    relieves the node with one stop and loses the least work (a stop restarts an
    attempt from scratch; Ray's own killer also picks the newest task).  Of those
    that started within ``started_together_s`` of it (they lose about as much), the
    one expected to hold the least: it relieves the node as well, and its next
    attempt needs the least room to start (it waits for that room on the node, under
    its own label, which idles meanwhile).  If none is big enough, the one holding
    the most memory.  Then by call id.  After a stop the count starts again, so the
    node is re-measured before the next; and while attempts stopped there have not
    ended, what they hold counts as relief to come (no other gives way for it).

    Readings more than ``in_a_row_s`` apart are not in a row (the count starts again),
    and the count stops at ``sustain``: a node that stayed high with nothing to stop
    (an actor holds it) has a task that starts there give way on its first reading.
    """

    threshold: float
    sustain: int = 1
    #: How far below Ray's own kill threshold (a fraction of the node's memory) to act,
    #: when the node's threshold is known and lower than ``threshold``; None: ``threshold`` only.
    kill_margin: float | None = 0.01
    #: Seconds from a reading until a stop decided on the next one takes effect.  A reading
    #: whose node, growing as fast as since the last reading (but no further than its
    #: attempts' expected peaks allow), would pass Ray's kill threshold within that time counts as
    #: a high one: the count starts a reading earlier, and the victim is judged by where
    #: the node is going.  0: judge each reading as it is.
    lead_s: float = 0.0
    #: Attempts that started this close together count as started together (see above).
    started_together_s: float = 0.0
    #: Two readings further apart than this are not in a row (see above).
    in_a_row_s: float = float("inf")
    name: str = "node_memory_pressure"

    def threshold_for(self, reading: NodeMemory) -> float:
        """``threshold``, or just below Ray's kill threshold on that node if that comes first.

        A node started with a lowered ``RAY_memory_usage_threshold`` (0.3, say)
        would otherwise be killed by Ray long before raysched's 0.9 is reached.
        """
        if reading.kill_threshold is None or self.kill_margin is None:
            return self.threshold
        return max(0.0, min(self.threshold, reading.kill_threshold - self.kill_margin))

    def kill_line_for(self, reading: NodeMemory) -> float:
        """The used fraction at which Ray kills on the reading's node, as far as this rule heeds it.

        A node whose lowered threshold the rule was told to leave to Ray's killer
        (``kill_margin`` None) is judged against Ray's default, as by ``threshold`` alone.
        """
        if reading.kill_threshold is None or self.kill_margin is None:
            return RAY_DEFAULT_KILL_THRESHOLD
        return reading.kill_threshold

    def projected_bytes(self, previous: "NodeMemory | None", reading: NodeMemory,
                        running: Sequence[LiveReport]) -> float:
        """The node's used memory ``lead_s`` after ``reading``, growing as since ``previous``.

        The growth is capped by how much more the node's attempts are expected to
        hold (each up to ``LiveReport.expected_peak_bytes``): a batch of tasks that
        climbs fast and then holds does not count as a node that climbs without end.
        Other processes' growth is not projected.  Only two workers' readings tell a rate.
        """
        if (self.lead_s <= 0 or previous is None or reading.source != WORKER_READING
                or previous.source != WORKER_READING or reading.timestamp <= previous.timestamp):
            return reading.used_bytes
        rate = (reading.used_bytes - previous.used_bytes) / (reading.timestamp - previous.timestamp)
        if rate <= 0:
            return reading.used_bytes
        headroom = sum(r.memory_headroom_bytes for r in running)
        return reading.used_bytes + min(rate * self.lead_s, headroom)

    def room_bytes(self, reading: NodeMemory, attempts_bytes: float) -> float:
        """How much the node's tasks may hold together and keep it under this rule's threshold.

        What the node uses for anything but raysched's running attempts (the raylet,
        idle workers, other programs, tasks raysched does not see) is the reading
        less ``attempts_bytes``, what its attempts held then (``resident_at``); the
        room is the threshold's share of the node less that (>= 0).  An admission
        queue that keeps the expected peaks of what it admits to a node within it
        keeps the node from where this rule, and Ray's killer above it, would act,
        as long as the calls keep to their predictions: a node's ``memory`` resource
        is a label fixed at its start, which other programs' growth does not shrink.
        Idle Ray workers (``NodeMemory.idle_workers_bytes``) are not counted either: the
        tasks that start on them bring their memory within their expected peaks (~45 MiB
        of its own each, measured on the benchmark's node): counted twice, the idle workers
        a batch leaves made the node look short of room as the next batch started.
        """
        others = reading.used_bytes - attempts_bytes - reading.idle_workers_bytes
        return max(0.0, self.threshold_for(reading) * reading.total_bytes - others)

    def victim(self, running: Iterable[LiveReport], excess_bytes: float = 0.0) -> LiveReport | None:
        """The attempt that gives way; ``excess_bytes``: how far the node is (or is going) over its threshold.

        A stop relieves the node of what the attempt holds and of what it would
        still grow by (up to its expected peak) when the node is judged by where it is going.
        """
        # An actor cannot be requeued (its state lives in it): only tasks give way.
        tasks = [r for r in running if r.kind == TASK]
        if not tasks:
            return None
        lowest = min(r.priority for r in tasks)
        equals = [r for r in tasks if r.priority == lowest]
        # A call on its last attempt that gives way fails (AttemptsExhausted): of equals, one
        # with attempts left goes first.
        spare = [r for r in equals if not r.max_attempts or r.attempt < r.max_attempts]
        equals = spare or equals
        growth = self.lead_s > 0
        enough = [r for r in equals if r.rss_bytes + (r.memory_headroom_bytes if growth else 0.0) >= excess_bytes]
        if enough:
            newest = min(r.wall_seconds for r in enough)
            together = [r for r in enough if r.wall_seconds - newest <= self.started_together_s]
            return min(together, key=lambda r: (r.expected_peak_bytes, r.wall_seconds, r.call_id, r.attempt))
        return min(equals, key=lambda r: (-r.rss_bytes, r.call_id, r.attempt))


def room_left_bytes(room_bytes: float, running: Iterable[LiveReport], promised_bytes: float = 0.0) -> float:
    """What a node's room (``NodePressure.room_bytes``) leaves for one more attempt.

    Less, for each attempt running there, the most it is expected to hold: its
    expected peak, or what it holds now if that is more (it is already past its
    prediction, and the memory rule watches it).  Less ``promised_bytes``: room
    already promised to attempts about to start there, which have not reported yet.
    """
    held = sum(max(float(r.rss_bytes), r.expected_peak_bytes) for r in running)
    return room_bytes - held - promised_bytes


@dataclass(frozen=True)
class AsRescale:
    """An actor's version of a check: where the task's check would stop and resubmit, or
    record a CPU mismatch, the actor is rescaled instead; otherwise it is warned about
    (its class did not opt in, it was rescaled ``max_rescales`` times, ``changes`` says
    no other size would differ, or, for CPU, the caller set its ``num_cpus``), and its
    other findings pass through.

    A warning, not a rescale that cannot happen: a rescale is a stop, after which the
    incarnation is not judged any more, and its hard cap must still be.
    """

    check: Check
    max_rescales: int
    #: ``changes(report, finding)``: whether a rescale would give another size (None: assume so).
    changes: Callable[[LiveReport, Finding], bool] | None = None

    def __call__(self, r: LiveReport) -> Finding | None:
        finding = self.check(r)
        if finding is None or finding.action not in (STOP_AND_RESUBMIT, RECORD_CPU):
            return finding
        detail = finding.detail.replace("; resubmit on the next rung", "")
        if finding.action == RECORD_CPU and r.allocation.num_cpus_set_by_caller:
            why = "the caller set its num_cpus (held for the actor's life, as with Ray)"
        elif not r.rescalable:
            why = "its class did not opt in to rescaling (rescalable=True, or save/restore hooks)"
        elif r.attempt > self.max_rescales:
            why = f"rescaled {r.attempt - 1} times already"
        elif self.changes is not None and not self.changes(r, finding):
            why = "no other size would differ"
        else:
            return replace(finding, action=RESCALE, detail=f"{detail}; rescale the actor")
        return replace(finding, action=WARN, detail=f"{detail}; left as is: {why}")


@dataclass(frozen=True)
class Rules:
    """The monitor's rules, in precedence order.

    A rule's stop needs its condition to hold on ``sustain`` samples in a row (hysteresis
    decides *whether* to stop); the first rule, in this order, whose stop condition holds
    on the sample that stops the attempt decides *how* (a leak over its allocation and
    over the hard cap fails at the cap, even if the cap's own streak is shorter).

    ``attempt_rules`` judge task attempts, ``actor_rules`` actor incarnations.
    """

    attempt_rules: tuple[AttemptRule, ...]
    node_rule: NodePressure | None = None
    actor_rules: tuple[AttemptRule, ...] = ()

    def evaluate(self, state: AttemptState, report: LiveReport) -> tuple[AttemptState, tuple[Decision, ...]]:
        """One sample of one attempt -> its new state and the decisions that fired (none: empty).

        A sample not newer than the last one evaluated (a batch delivered twice,
        or out of order) changes nothing, so reports are idempotent.  After a stop
        nothing more is evaluated, except after a RESCALE: an actor runs on until
        the calls queued before its replacement are done, so a hard limit
        (STOP_LIMIT) still applies to it and overrides the rescale.
        """
        if report.timestamp <= state.last_timestamp:
            return state, ()
        rescaling = state.stop is not None and state.stop.action == RESCALE
        if state.stop is not None and not rescaling:
            return state, ()
        streaks = dict(state.streaks)
        fired = set(state.fired)
        stop: Decision | None = None
        decisions: list[Decision] = []
        first_stop: tuple[AttemptRule, Finding] | None = None  # of this sample, held long enough or not
        for rule in self.actor_rules if report.kind == ACTOR else self.attempt_rules:
            if rule.name in fired:
                continue
            finding = rule.check(report)
            if finding is None or (rescaling and finding.action != STOP_LIMIT):
                streaks[rule.name] = 0
                continue
            if stop is not None and finding.action not in STOPS:
                continue  # stopped on this sample: a warning or a record would be of a dead attempt
            streaks[rule.name] = streaks.get(rule.name, 0) + 1
            if finding.action in STOPS and first_stop is None:
                first_stop = (rule, finding)
            # An actor's warning is a rescale not done (AsRescale): it needs the samples the
            # rescale would. On one sample, a spike that an opted-in actor rides out warned
            # "left as is" of one that did not opt in, and used up the rule's one firing.
            needed = rule.sustain if finding.action in STOPS or report.kind == ACTOR else 1
            if streaks[rule.name] < needed or (stop is not None and finding.action in STOPS):
                continue  # not held long enough yet; or an earlier rule already stops it
            if finding.action in STOPS and first_stop[0] is not rule:  # type: ignore[index]
                # Hysteresis decides whether to stop, precedence how: the first rule whose
                # condition holds on the sample that stops the attempt says what the stop
                # is.  A leak past its allocation and past the hard cap on the same
                # sample fails at the cap; resubmitting it bigger would break the cap again.
                held_for = f"; decided when {rule.name} had held for {needed} samples"
                rule, finding = first_stop  # type: ignore[misc]
                finding = replace(finding, detail=finding.detail + held_for)
            decision = Decision(rule.name, finding.action, report.function, report.call_id, report.attempt,
                                finding.measured, finding.allocated, finding.detail, report.node_id,
                                report.code_hash, report.timestamp)
            fired.add(rule.name)
            decisions.append(decision)
            if decision.stops:
                stop = decision
        new_state = AttemptState(streaks=streaks, fired=frozenset(fired), stop=stop or state.stop,
                                 last_timestamp=report.timestamp)
        return new_state, tuple(decisions)

    def evaluate_node(
        self, state: NodeState, reading: NodeMemory, running: Sequence[LiveReport],
        stopping: Sequence[LiveReport] = (),
    ) -> tuple[NodeState, Decision | None]:
        """One memory reading of a node, with the attempts still running there (not stopping)
        and those stopped there that have not ended yet (``stopping``: their last reports).

        Returns the node's new state and the requeue decision, if one fired.
        """
        rule = self.node_rule
        from_worker = reading.source == WORKER_READING
        # Times are compared within one source only: each has its own clock (see NodeState).
        last_of_source = state.last_timestamp if from_worker else state.last_endpoint_timestamp
        if rule is None or reading.timestamp <= last_of_source:
            return state, None  # (the same reading again, or an older one)
        here = [r for r in running if r.node_id == reading.node_id]
        remembered = reading if from_worker else state.last_reading

        def after(streak: int) -> NodeState:
            if from_worker:
                return NodeState(streak, reading.timestamp, remembered, state.last_endpoint_timestamp)
            return NodeState(streak, state.last_timestamp, remembered, reading.timestamp)

        threshold = rule.threshold_for(reading)
        projected = rule.projected_bytes(state.last_reading, reading, here)
        going_over = projected > reading.used_bytes and projected >= rule.kill_line_for(reading) * reading.total_bytes
        if reading.fraction < threshold and not going_over:
            return after(0), None
        excess = max(reading.used_bytes, projected) - threshold * reading.total_bytes
        # A stop takes a moment to free its attempt's memory (one stuck in C code, until its
        # worker is killed): what the stopped attempts still hold is relief on its way, and
        # another, higher-priority one stopped for it would be stopped for nothing.
        to_be_freed = sum(r.rss_bytes for r in stopping if r.node_id == reading.node_id)
        if to_be_freed >= excess:
            return after(0), None
        in_a_row = reading.timestamp - last_of_source <= rule.in_a_row_s
        streak = min((state.streak if in_a_row else 0) + 1, rule.sustain)
        victim = rule.victim(here, excess - to_be_freed)
        if streak < rule.sustain or victim is None:
            return after(streak), None
        where = f"at {reading.fraction:.0%}"
        if going_over:
            where += f", going to {projected / reading.total_bytes:.0%} within {rule.lead_s:g} s,"
        decision = Decision(
            rule.name, REQUEUE_LOWEST_PRIORITY, victim.function, victim.call_id, victim.attempt,
            measured=reading.fraction, allocated=threshold,
            detail=(f"node {reading.node_id[:8]} {where} of {reading.total_bytes / MiB:.0f} MiB "
                    f"(threshold {threshold:.0%}"
                    + (f", Ray kills at {reading.kill_threshold:.0%}" if reading.kill_threshold is not None else "")
                    + f"); priority {victim.priority}, resident "
                    f"{_mib(victim.rss_bytes)}, gives way first"),
            node_id=reading.node_id, code_hash=victim.code_hash, timestamp=reading.timestamp,
        )
        return after(0), decision  # count again before stopping another


def with_stop(state: AttemptState, decision: Decision) -> AttemptState:
    """An attempt's state once a stop was decided for it from outside its own rules (the node rule)."""
    return replace(state, stop=state.stop or decision, fired=state.fired | {decision.rule})


__all__ = [
    "ACTIONS", "STOPS", "NONE", "WARN", "RECORD_CPU", "STOP_AND_RESUBMIT", "STOP_LIMIT", "CANCEL",
    "REQUEUE_LOWEST_PRIORITY", "RESCALE", "TASK", "ACTOR", "ACTOR_RESCALED", "ACTOR_RESCALE_SKIPPED", "ACTOR_STATE_LOST", "NODE_LOST", "AsRescale", "LiveReport", "NodeMemory", "Decision", "Finding", "Check",
    "MemoryOverAllocation", "MemoryOverHardCap", "WallOverPrediction", "CpuOffAllocation",
    "AttemptRule", "AttemptState", "NodeState", "NodePressure", "Rules", "resident_at", "room_left_bytes", "with_stop",
]
