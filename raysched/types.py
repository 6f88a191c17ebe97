"""Frozen value types that flow through raysched.

Data flows one way: submit -> predict -> allocate -> run and measure -> monitor ->
store -> train -> predict.  Each stage hands the next one of these immutable
records, never a dict, so that a decision can be logged, compared and replayed.

This module is pure: it imports neither ray, mlflow nor pyarrow.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from typing import Iterator, Mapping

import numpy as np

MiB = 1024 * 1024
GiB = 1024 * MiB
#: The largest byte count raysched records: the profile store's byte columns are int64.
MAX_BYTES = 2**63 - 1

#: The resources raysched predicts, in the order they appear everywhere.
RESOURCES: tuple[str, ...] = ("memory", "cpu", "wall", "disk")

#: The ``code_hash`` of profile rows loaded from a trace (``raysched import``): runs made
#: elsewhere, history for any code of their name, and older than any run measured here.
IMPORTED_CODE_HASH = "imported"


class Outcome(str, enum.Enum):
    """How one attempt of a task ended."""

    OK = "ok"
    ERROR = "error"  # the user's function raised, or its worker died for a reason other than memory
    OOM_KILLED = "oom_killed"  # Ray's memory monitor (or raysched's, before it) killed it for memory
    LIMIT_STOPPED = "limit_stopped"  # a raysched hard limit stopped it
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # so that f"{outcome}" prints "ok", not "Outcome.OK"
        return self.value


@dataclass(frozen=True)
class TaskKey:
    """What a profile row is keyed by: the function's name and the hash of its code."""

    function: str
    code_hash: str


@dataclass(frozen=True)
class Features:
    """What raysched knows about one call before it runs.

    ``input_size`` is in bytes (None when it cannot be derived); ``arg_shapes`` is a
    short, stable description of the arguments (type name and shape), kept in the
    profile for inspection: not a feature, since shapes are nearly unique per call and
    their bytes are already in ``input_size``.  ``tags`` are: the history estimators
    use the runs with the call's tags (``policy.estimators.SameTags``), the model
    takes them as features.
    """

    input_size: int | None = None
    tags: tuple[str, ...] = ()
    arg_shapes: tuple[str, ...] = ()
    dependencies: tuple[str, ...] = ()

    @property
    def has_input_size(self) -> bool:
        return self.input_size is not None


@dataclass(frozen=True)
class Estimate:
    """A prediction for one resource.

    ``target`` is the central estimate, ``upper`` the bound that an allocation
    should cover with probability ``coverage`` (calibrated on held-out runs where
    a model is behind it), ``n_history`` how many past runs stand behind it.
    Units: bytes for memory and disk, cores for cpu, seconds for wall.

    ``margin`` is the share the sizer adds over ``upper`` for a memory request:
    None for the config's ``memory_margin``.  An estimator that already chose the
    allocation itself, weighing a failure against waste (``CostAwareEstimator``),
    says 0, so that ``upper`` is what it expects the call to hold at most, as it is
    for every other estimator; the admission queue and the monitor count a call by it.
    """

    target: float
    lower: float
    upper: float
    coverage: float
    n_history: int
    source: str = "fallback"
    margin: float | None = None

    def __post_init__(self) -> None:
        for name in ("target", "lower", "upper", "coverage"):
            value = getattr(self, name)
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"Estimate.{name} must be a number, got {value!r}") from None
            if math.isnan(number) or number < 0:
                raise ValueError(f"Estimate.{name} must be a non-negative number, got {value!r}")
            object.__setattr__(self, name, number)  # numpy scalars become plain floats
        object.__setattr__(self, "n_history", int(self.n_history))
        if not (self.lower <= self.target <= self.upper):
            raise ValueError(
                f"Estimate bounds out of order: lower={self.lower} target={self.target} upper={self.upper}"
            )
        if self.margin is not None and not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"Estimate.margin must be None or a non-negative number, got {self.margin!r}")

    def scaled(self, factor: float, source: str | None = None) -> "Estimate":
        return replace(self, target=self.target * factor, lower=self.lower * factor, upper=self.upper * factor,
                       source=source or self.source)

    def margin_or(self, default: float) -> float:
        """The share a memory request adds over ``upper``: this estimate's own, else ``default``."""
        return default if self.margin is None else self.margin


@dataclass(frozen=True)
class Prediction:
    """One Estimate per resource for one call, and where it came from.

    ``source`` is ``"fallback"``, ``"history"`` (robust statistics of past runs) or
    ``"model-vN"`` (the XGBoost quantile model registered as version N).  When the
    resources disagree the source names the weakest one, so a reader is never told
    "model" while memory still comes from a fallback.
    """

    memory: Estimate
    cpu: Estimate
    wall: Estimate
    disk: Estimate | None = None
    source: str = "fallback"

    def __getitem__(self, resource: str) -> Estimate:
        if resource not in RESOURCES:
            raise KeyError(f"unknown resource {resource!r}; expected one of {RESOURCES}")
        value = getattr(self, resource)
        if value is None:
            raise KeyError(f"no {resource} estimate in this prediction")
        return value

    def __iter__(self) -> Iterator[str]:
        return (r for r in RESOURCES if getattr(self, r) is not None)

    def items(self) -> Iterator[tuple[str, Estimate]]:
        return ((r, getattr(self, r)) for r in self)

    @property
    def n_history(self) -> int:
        return self.memory.n_history


@dataclass(frozen=True)
class Allocation:
    """The Ray resources one attempt is submitted with.

    ``rung`` is the escalation-ladder step that produced it (0: the first
    submission, sized from the prediction), ``capped`` whether the largest node
    limited it, and ``reason`` one human sentence on why this size.
    ``memory_is_task_only``: the memory is the caller's figure (a cold-start
    fallback, or ``memory=`` set explicitly), which means the task's own memory, as
    Ray's ``memory`` label does; raysched's own sizes are measured peaks of the whole
    worker process, the interpreter and Ray included.
    ``memory_set_by_caller``: the call's own ``.options(memory=...)``, which wins over
    raysched's sizes: the monitor does not stop it for outgrowing that figure (the
    next rung would overrule the caller), only for a hard cap or a node under pressure.
    ``num_cpus_set_by_caller``: the call's own ``.options(num_cpus=...)``. Inside a
    placement group, labels the caller set are left as they are (Ray refuses a request
    that fits no bundle, as for plain Ray); raysched's own are cut to the bundle.
    """

    num_cpus: float
    memory_bytes: int
    rung: int = 0
    capped: bool = False
    reason: str = ""
    memory_is_task_only: bool = False
    memory_set_by_caller: bool = False
    num_cpus_set_by_caller: bool = False

    def ray_options(self) -> dict[str, float | int]:
        return {"num_cpus": self.num_cpus, "memory": int(self.memory_bytes)}


@dataclass(frozen=True)
class Usage:
    """What one attempt used, measured inside its worker.

    - ``peak_rss_bytes``: the highest private resident size (RSS minus shared
      pages: Ray's object store read zero-copy, mapped files) of the worker
      process during this attempt (from its kernel high-water mark, reset when
      the attempt starts) plus the peak of the child processes it started;
    - ``start_rss_bytes``: the worker's private resident size when the attempt
      began (the interpreter, Ray and whatever earlier tasks left behind);
    - ``cpu_seconds``: user + system CPU time of the process and its children;
    - ``wall_seconds``: elapsed time of the user's function;
    - ``read_bytes`` / ``write_bytes``: bytes that reached the block layer
      (Linux /proc/<pid>/io), ``read_chars`` / ``write_chars`` all bytes passed
      through read/write system calls (includes the page cache and pipes).
    Network bytes are not recorded: Linux counts them per network namespace, not
    per process, so they cannot be attributed to one task honestly.
    """

    peak_rss_bytes: int
    start_rss_bytes: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    read_bytes: int = 0
    write_bytes: int = 0
    read_chars: int = 0
    write_chars: int = 0

    @property
    def cpu_cores(self) -> float:
        """Effective cores: CPU seconds per wall second."""
        if self.wall_seconds <= 0:
            return 0.0
        return self.cpu_seconds / self.wall_seconds

    @property
    def task_rss_bytes(self) -> int:
        """Peak above the worker's own baseline: what the function itself added."""
        return max(0, self.peak_rss_bytes - self.start_rss_bytes)


@dataclass(frozen=True)
class NodeShape:
    """The schedulable resources of one Ray node.

    ``resources``: its other resources (``GPU``, custom ones, ``node:<ip>``...) as
    (name, amount) pairs sorted by name, and ``labels`` its node labels (``ray start
    --labels``, ``ray.io/...``) as (key, value) pairs sorted by key, so that the shape
    stays hashable.
    """

    node_id: str
    num_cpus: float
    memory_bytes: int
    resources: tuple[tuple[str, float], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def amount(self, resource: str) -> float:
        """How much of ``resource`` the node has (0 if none)."""
        for name, amount in self.resources:
            if name == resource:
                return amount
        return 0.0

    def label(self, key: str) -> str | None:
        """The node's value of label ``key`` (None if it has no such label)."""
        for name, value in self.labels:
            if name == key:
                return value
        return None

    def satisfies(self, selector: "tuple[LabelTerm, ...]") -> bool:
        """Whether the node's labels satisfy every term of one label selector."""
        return all(term.holds(self.label(term.key)) for term in selector)


@dataclass(frozen=True)
class LabelTerm:
    """One term of a Ray label selector, as Ray's scheduler judges it: the label ``key``
    has one of ``values`` (not: has none of them; a node without the label has none), or,
    with ``values`` None, the label exists (not: does not).

    Ray 2.60 splits ``in(a, b)`` at the commas without trimming the spaces (so ``b``
    never equals `` b``); a later Ray may trim. A term holds here only if it holds
    either way: a node counted in may then be smaller than Ray allows, never one Ray
    refuses, which would leave a request capped to it unschedulable.
    """

    key: str
    negated: bool = False
    values: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, key: str, expression: str) -> "LabelTerm":
        """A ``label_selector`` entry: ``v``, ``!v``, ``in(v1,v2)`` or ``!in(v1,v2)``."""
        negated = expression.startswith("!")
        body = expression[1:] if negated else expression
        values = body[3:-1].split(",") if body.startswith("in(") and body.endswith(")") else [body]
        return cls(key, negated, tuple(values))

    def holds(self, value: str | None) -> bool:
        if self.values is None:
            return (value is not None) != self.negated
        return all((value in values) != self.negated
                   for values in (set(self.values), {v.strip() for v in self.values}))

    def __str__(self) -> str:
        if self.values is None:
            return f"{self.key} {'does not exist' if self.negated else 'exists'}"
        shown = self.values[0] if len(self.values) == 1 else f"in({','.join(self.values)})"
        return f"{self.key}: {'!' if self.negated else ''}{shown}"


@dataclass(frozen=True)
class ClusterShape:
    """What sizing needs to know of the cluster: its nodes' capacities.

    ``scope`` is empty for the whole cluster; for the shape ``eligible`` returns, it
    says which nodes it keeps (for a reason or an error message).
    """

    nodes: tuple[NodeShape, ...] = ()
    scope: str = ""

    def eligible(self, node_id: str | None = None,
                 demands: "Mapping[str, float] | tuple[tuple[str, float], ...]" = (),
                 selectors: "tuple[tuple[LabelTerm, ...], ...]" = ()) -> "ClusterShape":
        """The nodes a task or actor may run on: only ``node_id`` if given (a hard node
        affinity), only those with at least ``demands`` (resource name -> amount, as
        Ray's ``num_gpus`` (``GPU``) and ``resources={...}``), and only those whose labels
        satisfy one of ``selectors`` (each a tuple of terms: Ray's ``label_selector``, then
        those of its ``fallback_strategy``; Ray falls back to the next when no node
        satisfies one, so any of them may be where it runs).
        Unrestricted: this shape itself. No node may be eligible: the shape is then
        empty, and sizing leaves Ray to report the task as infeasible."""
        pairs = demands.items() if isinstance(demands, Mapping) else demands
        wanted = tuple(sorted((str(name), float(amount)) for name, amount in pairs if amount and amount > 0))
        if node_id is None and not wanted and not selectors:
            return self
        nodes = tuple(
            n for n in self.nodes
            if (node_id is None or n.node_id == node_id) and all(n.amount(r) >= a for r, a in wanted)
            and (not selectors or any(n.satisfies(selector) for selector in selectors))
        )
        scope = ([f"node {node_id[:8]}"] if node_id is not None else []) + [f"{r}>={a:g}" for r, a in wanted]
        if selectors:
            scope.append("labels " + " or ".join("{" + ", ".join(map(str, selector)) + "}" for selector in selectors))
        return ClusterShape(nodes, scope=", ".join(([self.scope] if self.scope else []) + scope))

    @property
    def largest_memory_bytes(self) -> int:
        return max((n.memory_bytes for n in self.nodes), default=0)

    @property
    def largest_num_cpus(self) -> float:
        return max((n.num_cpus for n in self.nodes), default=0.0)

    def fits(self, allocation: Allocation) -> bool:
        return any(
            n.num_cpus >= allocation.num_cpus and n.memory_bytes >= allocation.memory_bytes
            for n in self.nodes
        )


@dataclass(frozen=True)
class AttemptRecord:
    """What one finished (or killed) attempt used and had: a row of the ladder's input."""

    attempt: int
    allocation: Allocation
    outcome: Outcome
    usage: Usage | None = None
    error: str = ""

    def describe(self) -> str:
        used = (
            f"peak {self.usage.peak_rss_bytes / MiB:.0f} MiB, {self.usage.cpu_seconds:.1f} CPU-s"
            if self.usage
            else "use unknown"
        )
        return (
            f"attempt {self.attempt}: {self.outcome.value} with {self.allocation.memory_bytes / MiB:.0f} MiB"
            f" / {self.allocation.num_cpus:g} CPU ({used})" + (f": {self.error}" if self.error else "")
        )


@dataclass(frozen=True, eq=False)
class History:
    """Past runs of one function, as parallel numpy columns, oldest first.

    ``memory`` holds the samples the estimators learn from: the measured peak of
    a successful run, and for a run killed for memory the bumped sample
    ``max(peak + 100 MiB, peak x 1.2)`` (as the Kubernetes VPA recommender does,
    see ``policy.samples``).  Missing values are NaN.  ``version`` grows when rows
    are added, so a cache can tell a newer history from an older one.

    ``censored`` marks the runs whose memory value is only a lower bound of what
    they needed (killed for memory: the true peak is above it); None means no run
    is censored, so existing callers need not pass it.
    """

    input_size: np.ndarray
    memory: np.ndarray
    cpu: np.ndarray
    wall: np.ndarray
    disk: np.ndarray
    tags: tuple[tuple[str, ...], ...] = ()
    version: int = 0
    censored: np.ndarray | None = None

    @property
    def censored_mask(self) -> np.ndarray:
        """A boolean array, one per run: True where the memory value is a lower bound."""
        if self.censored is None:
            return np.zeros(len(self), dtype=bool)
        return np.asarray(self.censored, dtype=bool)

    def __len__(self) -> int:
        return int(self.memory.shape[0])

    def column(self, resource: str) -> np.ndarray:
        return getattr(self, resource)

    def tail(self, n: int) -> "History":
        if len(self) <= n:
            return self
        return self._rows(slice(len(self) - n, None))

    def select(self, mask: np.ndarray) -> "History":
        """The runs where ``mask`` is True, in order (the same version: a view of these rows)."""
        return self._rows(np.flatnonzero(mask))

    def _rows(self, rows: "slice | np.ndarray") -> "History":
        """These runs (a slice keeps numpy views), with the same version."""
        if not self.tags:
            tags: tuple[tuple[str, ...], ...] = ()
        else:
            tags = self.tags[rows] if isinstance(rows, slice) else tuple(self.tags[i] for i in rows)
        return History(
            input_size=self.input_size[rows],
            memory=self.memory[rows],
            cpu=self.cpu[rows],
            wall=self.wall[rows],
            disk=self.disk[rows],
            tags=tags,
            version=self.version,
            censored=self.censored[rows] if self.censored is not None else None,
        )

    def append(self, other: "History") -> "History":
        return History(
            input_size=np.concatenate([self.input_size, other.input_size]),
            memory=np.concatenate([self.memory, other.memory]),
            cpu=np.concatenate([self.cpu, other.cpu]),
            wall=np.concatenate([self.wall, other.wall]),
            disk=np.concatenate([self.disk, other.disk]),
            tags=(self.tags or tuple(() for _ in range(len(self))))
            + (other.tags or tuple(() for _ in range(len(other)))),
            version=self.version + len(other),
            censored=(None if self.censored is None and other.censored is None
                      else np.concatenate([self.censored_mask, other.censored_mask])),
        )

    @staticmethod
    def empty() -> "History":
        return History.from_columns({})

    @staticmethod
    def from_columns(columns: Mapping[str, object], version: int = 0) -> "History":
        """Build from any mapping of equal-length sequences; missing columns become NaN."""
        lengths = {len(v) for k, v in columns.items() if k != "tags" and v is not None}  # type: ignore[arg-type]
        if len(lengths) > 1:
            raise ValueError(f"History columns differ in length: {sorted(lengths)}")
        n = lengths.pop() if lengths else 0

        def col(name: str) -> np.ndarray:
            values = columns.get(name)
            if values is None:
                return np.full(n, np.nan)
            return np.array([np.nan if v is None else v for v in values], dtype=float)  # type: ignore[union-attr]

        tags_col = columns.get("tags")
        tags = tuple(tuple(t) if t is not None else () for t in tags_col) if tags_col is not None else ()  # type: ignore[union-attr]
        censored_col = columns.get("censored")
        return History(
            input_size=col("input_size"),
            memory=col("memory"),
            cpu=col("cpu"),
            wall=col("wall"),
            disk=col("disk"),
            tags=tags,
            version=version,
            censored=np.array([bool(v) for v in censored_col], dtype=bool) if censored_col is not None else None,  # type: ignore[union-attr]
        )


@dataclass(frozen=True)
class ModelArtifact:
    """A trained model for one resource of one function, in a portable form.

    ``booster`` is the XGBoost model in XGBoost's own UBJSON format (``Booster.save_raw("ubj")``,
    never pickle); ``meta_json`` a JSON object with the feature names, quantiles,
    calibration offsets and holdout metrics.  ``version`` is the MLflow registry
    version once registered.
    """

    function: str
    resource: str
    booster: bytes
    meta_json: str
    version: int | None = None
