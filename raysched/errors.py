"""raysched's exceptions. Each carries what a user needs to act, in its message."""

from __future__ import annotations

from typing import Sequence

from .types import AttemptRecord, MiB


class RayschedError(Exception):
    """Base class of every error raysched raises on its own account."""


class InvalidInput(RayschedError, ValueError):
    """A caller passed something raysched cannot use (bad input_size, tags, memory...)."""


class InvalidRayOption(InvalidInput, TypeError):
    """What Ray itself would refuse with a TypeError (an option of the wrong type, such as
    ``max_retries="x"`` or ``memory="1G"``; a ``functools.partial`` to decorate): still one,
    so that code written for plain Ray's ``except TypeError`` catches it."""


class UnknownKnob(InvalidInput, TypeError):
    """A config knob that does not exist (``configure(max_attempt=3)``): a TypeError too, as an
    unknown keyword argument is in Python."""


class StoreError(RayschedError):
    """The profile store cannot be read or written (for example an unwritable home)."""


class PredictionTooLarge(RayschedError):
    """A request exceeds every node that may run it and the config says not to cap it.

    ``node_id`` is the largest of those nodes (the one a capped request would go to);
    ``scope`` which nodes the call's Ray options allow ("" for every node).
    """

    def __init__(self, function: str, memory_bytes: int, num_cpus: float, largest_memory: int, largest_cpus: float,
                 node_id: str = "", scope: str = ""):
        self.function = function
        self.memory_bytes = memory_bytes
        self.num_cpus = num_cpus
        self.largest_memory = largest_memory
        self.largest_cpus = largest_cpus
        self.node_id = node_id
        self.scope = scope
        which = f" (node {node_id}" + (f"; its Ray options allow only {scope}" if scope else "") + ")" if node_id else ""
        advice = "Pin it to a bigger node" if scope else "Add a bigger node"
        super().__init__(
            f"{function}: needs {memory_bytes / MiB:.0f} MiB and {num_cpus:g} CPU, but the largest node that can "
            f"run it offers {largest_memory / MiB:.0f} MiB and {largest_cpus:g} CPU{which}. {advice}, or set "
            f"oversize_policy='cap' to run it capped."
        )

    def __reduce__(self):  # keep the exception picklable across Ray processes
        return (
            PredictionTooLarge,
            (self.function, self.memory_bytes, self.num_cpus, self.largest_memory, self.largest_cpus,
             self.node_id, self.scope),
        )


class AttemptsExhausted(RayschedError):
    """Every attempt of a call failed; lists what each attempt had and used."""

    def __init__(self, function: str, attempts: Sequence[AttemptRecord], reason: str = ""):
        self.function = function
        self.attempts = tuple(attempts)
        self.reason = reason
        lines = "\n  ".join(a.describe() for a in self.attempts)
        super().__init__(
            f"{function}: gave up after {len(self.attempts)} attempt(s)"
            + (f" ({reason})" if reason else "")
            + (f":\n  {lines}" if lines else "")
        )

    def __reduce__(self):
        return (AttemptsExhausted, (self.function, self.attempts, self.reason))


class ResourceLimitExceeded(RayschedError):
    """A task went over a hard limit and was stopped; it is not retried."""

    def __init__(self, function: str, resource: str, measured: float, limit: float, attempts: int):
        self.function = function
        self.resource = resource
        self.measured = measured
        self.limit = limit
        self.attempts = attempts
        unit = (lambda v: f"{v / MiB:.0f} MiB") if resource == "memory" else (lambda v: f"{v:.1f}")
        super().__init__(
            f"{function}: {resource} use {unit(measured)} exceeded the hard limit {unit(limit)} "
            f"on attempt {attempts}; stopped and not retried."
        )

    def __reduce__(self):
        return (ResourceLimitExceeded, (self.function, self.resource, self.measured, self.limit, self.attempts))


class StoppedByMonitor(RayschedError):
    """The live monitor cancelled a running attempt (``monitor_cancel_slow``); it is not retried."""

    def __init__(self, function: str, attempt: int, rule: str, detail: str):
        self.function = function
        self.attempt = attempt
        self.rule = rule
        self.detail = detail
        super().__init__(f"{function}: attempt {attempt} was cancelled by raysched's monitor ({rule}): {detail}")

    def __reduce__(self):
        return (StoppedByMonitor, (self.function, self.attempt, self.rule, self.detail))
