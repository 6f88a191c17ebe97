"""The part of an adaptive actor that runs inside its own process (see ``runtime.actors``).

Light on purpose: a Ray worker imports this module to unpickle the actor class,
so it imports neither pandas, pyarrow, MLflow nor the driver's client.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from ..config import RayschedConfig
from ..policy.rules import ACTOR, STOP_LIMIT
from ..types import Outcome, Usage
from .measure import AttemptMeter, get_live_sampler
from .session import adopt_config
from .options import ACTOR_DEFINITION_OPTIONS, fit_placement_group
from .rows import attempt_row, get_sink
from .spec import AttemptSpec, decode_spec
from .worker import _node_id, end_child_processes, get_reporter

logger = logging.getLogger(__name__)

SAVE_HOOK = "raysched_save_state"
RESTORE_HOOK = "raysched_restore_state"
#: How long a replaced incarnation waits for its successor's restore before it ends anyway
#: (``_raysched_retire``): a successor that cannot be placed while it lives must not wait for ever.
_HAND_OVER_WAIT_S = 30.0


# --- inside the actor's process ------------------------------------------------------------------------


class _Incarnation:
    """One incarnation of an adaptive actor, measured in its process from ``__init__`` to its end."""

    def __init__(self, spec: AttemptSpec):
        self.spec = spec
        self._lock = threading.Lock()
        self._finished = False
        self._meter = AttemptMeter()
        self._started = time.time()
        self._meter.start()
        #: Ray restarted this process (the caller's max_restarts) after its predecessor died: a
        #: stop the monitor decided for that one is not this one's to record again.
        self._restarted = _was_restarted()
        self._sampler = get_live_sampler(spec.config.live_interval_s)
        self._sampler.register(spec.live_key, self._meter, self._on_sample)
        # No atexit hook: Ray kills an exiting actor's process within ~100 ms, before a row
        # could be sent or written. The handle records the row instead (terminate, __del__).

    def _on_sample(self, _key: Any, sample: Any) -> None:
        reporter = get_reporter(self.spec.config)
        if reporter is None:
            return
        from .monitor import report_from

        reporter.add(report_from(self.spec, sample, _node_id(), kind=ACTOR))
        decision = reporter.directive(self.spec.live_key, self.spec.attempt)
        if decision is not None and decision.action == STOP_LIMIT:
            # A runaway: record what it reached, and end the process now, before the node's
            # OOM killer picks a victim. The handle fails later calls with ResourceLimitExceeded.
            # Ray must not restart it (max_restarts): a restart would meet the same standing
            # stop, and record it and die again until its restarts ran out (a helper's audit).
            if self._restarted:  # the stop was its predecessor's, whose row says it
                with self._lock:
                    self._finished = True
                self._sampler.unregister(self.spec.live_key)
                _end_without_restart()
                return
            logger.warning("raysched: actor %s over its hard limit (%s); stopping it", self.spec.function,
                           decision.detail)
            self.finish(Outcome.LIMIT_STOPPED, f"stopped by raysched's monitor ({decision.rule}): {decision.detail}",
                        wait_s=5.0)
            end_child_processes(self._started, grace_s=0.0)  # they would outlive it, holding their memory
            _end_without_restart()  # the row is in; if the kill below outruns it, the restart ends itself
            os.kill(os.getpid(), signal.SIGKILL)

    def finish(self, outcome: Outcome, reason: str = "", wait_s: float = 0.0) -> Usage | None:
        """Record this incarnation's row (once); with ``wait_s``, wait that long for it to be sent."""
        with self._lock:
            if self._finished:
                return None
            self._finished = True
        self._sampler.unregister(self.spec.live_key)
        usage = self._meter.stop()
        sink = get_sink(self.spec.config)
        sink.add(attempt_row(self.spec, outcome, usage, self._started, time.time(),
                             reason if outcome is not Outcome.OK else "", _node_id(), os.getpid()))
        sink.flush(wait_s=wait_s)
        return usage


def _was_restarted() -> bool:
    """Whether Ray restarted this actor's process (``max_restarts``) rather than created it."""
    try:
        import warnings

        import ray

        # Ray's property reads its own deprecated ``actor_id``: without this, every
        # adaptive actor printed a RayDeprecationWarning to its driver's output.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - outside an actor (tests), or Ray's API moved
        return False


def _end_without_restart() -> None:
    """Ask Ray to end this actor for good (no restart), whatever its ``max_restarts``."""
    try:
        import ray

        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
    except Exception as exc:  # noqa: BLE001 - the SIGKILL that follows still ends it
        logger.debug("raysched: could not end this actor without restart: %s", exc)


def _is_async(cls: type) -> bool:
    """Whether Ray runs ``cls`` as an async actor (it has a coroutine method)."""
    import inspect

    return any(inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f)
               for _, f in inspect.getmembers(cls, inspect.isfunction))


def _finish_after(incarnation: _Incarnation, outcome: str, reason: str, calls: list | None) -> Usage | None:
    """Record the incarnation's row once every ref in ``calls[0]`` exists (not fetched)."""
    refs = list(calls[0]) if calls else []
    if refs:
        import ray

        ray.wait(refs, num_returns=len(refs), fetch_local=False)
    return incarnation.finish(Outcome(outcome), reason, wait_s=5.0)


def make_actor_class(cls: type, config: RayschedConfig) -> type:
    """``cls`` with raysched's measuring ``__init__`` and the methods its handle calls."""

    class AdaptiveActor(cls):  # type: ignore[misc, valid-type]
        def __init__(self, _raysched_spec: bytes, /, *args: Any, **kwargs: Any):  # the user's may use the name
            adopt_config(config)  # the calls the actor submits are sized as its driver configured them
            self._raysched_incarnation = _Incarnation(decode_spec(_raysched_spec, config))
            try:
                super().__init__(*args, **kwargs)
            except BaseException as exc:
                self._raysched_incarnation.finish(Outcome.ERROR, f"{type(exc).__name__}: {exc}", wait_s=5.0)
                raise

        def _raysched_save(self) -> Any:
            save = getattr(self, SAVE_HOOK, None)
            return save() if save is not None else None

        def _raysched_restore(self, state: Any) -> None:
            # ``state``: [the ref of the predecessor's saved state] (nested: resolved here, so
            # that a save that raised reaches this method instead of failing it unseen).
            import ray

            restore = getattr(self, RESTORE_HOOK, None)
            if restore is None:
                # Nothing to hand over (rescalable=True without hooks): a predecessor that died
                # first (its node lost before Ray marked it dead) must not end this one too. But
                # as with one Ray actor, a caller's later calls run after its earlier ones: they
                # wait here until the predecessor has run those (its save comes after them).
                # They ran at once on the new actor, overtaking calls still queued on the old.
                if state:
                    ray.wait([state[0]], fetch_local=False)
                return
            try:
                restore(ray.get(state[0]))
            except Exception as exc:
                # Serving calls on the state __init__ built would lose the predecessor's without
                # a word (a helper's audit): this incarnation records why and ends, no restart;
                # the calls sent to it fail, and its handle says why. A predecessor that died
                # first (stopped at its hard cap, say) cancels it; a hook that raised is an error.
                died = isinstance(exc, ray.exceptions.RayActorError)
                self._raysched_incarnation.finish(
                    Outcome.CANCELLED if died else Outcome.ERROR,
                    f"its predecessor's state could not be handed over: {type(exc).__name__}: {exc}", wait_s=5.0)
                ray.actor.exit_actor()

        def _raysched_retire(self, restored: list) -> Usage | None:
            # A rescale's hand-over, after the save: ``restored`` is [the ref of the successor's
            # restore] (nested: unresolved). Once it worked, record this incarnation's row (the
            # ``_raysched_end`` that follows ends it). If the save or the restore failed, this
            # one keeps serving on its state (no call was sent to it after the save): ending
            # it lost the actor's state for good (a helper's audit). A successor not restored
            # within _HAND_OVER_WAIT_S (not placed: it may need what this one holds) ends it
            # as before: its state is then only in the saved object.
            import ray

            ready, _ = ray.wait([restored[0]], timeout=_HAND_OVER_WAIT_S, fetch_local=False)
            if ready:
                try:
                    ray.get(restored[0])
                except Exception as exc:  # noqa: BLE001 - the hook raised, or the successor died
                    self._raysched_kept = f"{type(exc).__name__}: {exc}"
                    return None
            return self._raysched_incarnation.finish(Outcome.OK, "", wait_s=5.0)

        def _raysched_end(self) -> bool:
            # Ray's __ray_terminate__, unless ``_raysched_retire`` kept this incarnation serving.
            if getattr(self, "_raysched_kept", None) is not None:
                self._raysched_kept = None  # a later rescale's hand-over starts afresh
                return False
            import ray

            ray.actor.exit_actor()
            return True

        def _raysched_finish(self, outcome: str, reason: str = "", calls: list | None = None) -> Usage | None:
            # ``calls``: [refs of the calls the handle sent before this one and that had not
            # ended] (nested: Ray passes them unresolved). An actor that runs calls at once
            # runs this one beside them: its row must wait for them, or it recorded none of
            # their use (a helper's audit: 62 MiB and 0 s of CPU for a 600 MiB, 1.4 s call).
            return _finish_after(self._raysched_incarnation, outcome, reason, calls)

    if _is_async(cls):
        # In an async actor a plain method runs on the event loop: waiting there would stop
        # the very calls it waits for. This one waits, and records, in a thread.
        async def _raysched_finish_async(self, outcome: str, reason: str = "", calls: list | None = None) -> Any:
            import asyncio

            return await asyncio.get_running_loop().run_in_executor(
                None, _finish_after, self._raysched_incarnation, outcome, reason, calls)

        _raysched_finish_async.__name__ = _raysched_finish_async.__qualname__ = "_raysched_finish"
        AdaptiveActor._raysched_finish = _raysched_finish_async

    for attr in ("__name__", "__qualname__", "__module__", "__doc__"):
        setattr(AdaptiveActor, attr, getattr(cls, attr, None))
    return AdaptiveActor


def actor_options(spec: AttemptSpec) -> dict[str, Any]:
    """The Ray options one incarnation is created with: the caller's, then raysched's sizing."""
    options = {k: v for k, v in spec.ray_options if k not in ACTOR_DEFINITION_OPTIONS}
    options.update(spec.allocation.ray_options())
    if spec.ray_default_cpus:
        del options["num_cpus"]  # Ray's own default for an actor, not 0 CPUs to be placed with
    if not options.get("memory"):
        options.pop("memory", None)  # no label, as Ray's default (``AdaptiveActorClass._plan``)
    fit_placement_group(options, spec.allocation)
    options.setdefault("max_restarts", 0)  # raysched replaces an actor; Ray restarting it unchanged would not help
    return options


__all__ = ["make_actor_class", "actor_options", "SAVE_HOOK", "RESTORE_HOOK"]
