"""An attempt's profile row, and the worker's sink that sends rows to the profiler in batches."""

from __future__ import annotations

import atexit
import datetime as dt
import hashlib
import logging
import os
import pickle
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ray

from ..config import RayschedConfig
from ..policy.samples import memory_sample
from ..types import Outcome, Usage
from .session import NAMESPACE, RECORD_GROUP, _home_key, profiler_name
from .spec import AttemptSpec

logger = logging.getLogger(__name__)


MIN_WALL_FOR_CORES = 0.05  # seconds


# --- rows ---------------------------------------------------------------------------------------


def attempt_row_id(spec: AttemptSpec) -> str:
    """The row id of a task attempt's row: the same whichever process writes it.

    An attempt's row is written by its own worker, or, when that worker died before it
    could say the row was written (a stop marker, a hand-over marker), by the Ray retry of
    its task, by the task that waited for it, or by the driver. Both may reach the store:
    a worker that died after its row was sent but before its marker was written, and the
    retry that recorded the attempt again. With one id per (call, attempt) the store and
    the profiler keep one of them (``store.parquet``: de-duplicated on ``row_id``).
    """
    return hashlib.blake2b(f"{spec.call_id}:{spec.attempt}".encode(), digest_size=16).hexdigest()


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, tz=dt.timezone.utc)


def attempt_row(
    spec: AttemptSpec,
    outcome: Outcome,
    usage: Usage | None,
    started_at: float,
    ended_at: float,
    error: str = "",
    node_id: str = "",
    worker_pid: int | None = None,
    row_id: str | None = None,
) -> dict[str, Any]:
    """One profile row (the store's PROFILE_SCHEMA) for one attempt."""
    peak = usage.peak_rss_bytes if usage is not None else None
    sample = memory_sample(outcome, peak, spec.allocation.memory_bytes, spec.config)
    row = dict(spec.static_row)
    row["row_id"] = row_id or os.urandom(16).hex()
    row["call_id"] = spec.call_id
    row["outcome"] = outcome.value
    row["error"] = error[:2000] or None
    row["timestamp"] = _utc(ended_at)
    row["started_at"] = _utc(started_at)
    row["node_id"] = node_id or None
    row["worker_pid"] = worker_pid
    row["peak_rss_bytes"] = peak
    row["memory_sample_bytes"] = int(sample) if sample is not None else None
    row["calls"] = 1
    if usage is None:
        return row
    row["start_rss_bytes"] = usage.start_rss_bytes
    row["cpu_seconds"] = usage.cpu_seconds
    # Cores are CPU seconds per wall second; below MIN_WALL_FOR_CORES the ratio is
    # mostly scheduler noise and would size a 50 us task at whole cores.
    row["cpu_cores"] = usage.cpu_cores if usage.wall_seconds >= MIN_WALL_FOR_CORES else None
    row["wall_seconds"] = usage.wall_seconds
    row["read_bytes"] = usage.read_bytes
    row["write_bytes"] = usage.write_bytes
    row["read_chars"] = usage.read_chars
    row["write_chars"] = usage.write_chars
    return row


# --- the row sink: buffered, sent to the profiler actor off the task's path -----------------------


class RowSink:
    """Buffers rows in the worker process and sends them to the profiler in batches.

    A flush thread sends the buffer ``flush_interval_s`` after the first row of a
    batch arrives, so a burst of tiny tasks costs one actor call, not one each.
    An attempt that ended is buffered as the arguments of its row (``add_attempt``)
    and the row is built at the flush, for the whole batch at once: built one at
    a time, at the end of each task, rows cost a tiny task several times more
    (each one touched cold code and memory between two tasks of Ray's).
    The profiler actor is restarted by Ray if it dies and Ray retries the call
    (``max_task_retries=-1``), and the store de-duplicates rows by ``row_id``.
    Without a reachable profiler the rows go straight to the Parquet store under
    the home folder, so the task's record is never dropped.

    Ray ends a worker that has been idle for a second unless it owns an object or
    has a call in flight.  From a batch's first row until it is sent, the flush
    thread holds an object of its own (``hold``); from then on the call is in
    flight, and the thread keeps its ref until the profiler has taken the batch
    (``unfinished`` says which refs are not done yet).  A batch is so never cut off
    by an idle worker being ended (seen in CI: one row of 36).  The thread does not
    wait for one batch to be taken before it sends the next: the profiler writes
    batches together (group commit) and takes a while under load, and rows waiting
    in a worker are the ones a killed worker loses.
    """

    #: How often the flush thread looks whether the batches in flight were taken (each look
    #: is a ``ray.wait``; a ref dropped a little late only delays an idle worker's end)...
    POLL_S = 0.25
    #: ...and how often ``flush(wait_s)`` does, at a worker's exit.
    WAIT_POLL_S = 0.02

    def __init__(self, flush_interval_s: float, send: Callable[[list[dict]], Any],
                 hold: Callable[[], Any] | None = None,
                 unfinished: Callable[[list[Any]], list[Any]] | None = None,
                 failure: Callable[[Any], BaseException | None] | None = None,
                 resend: Callable[[list[dict], bool], Any] | None = None):
        self._interval = flush_interval_s
        self._send = send
        #: ``resend(rows, direct)``: send a batch again after its profiler was lost (looked up
        #: anew), or, ``direct``, write it to the store; what it returns is tracked as ``send``'s.
        self._resend = resend
        self._hold = hold
        self._held: Any = None
        self._unfinished = unfinished or _unfinished_refs
        self._failure = failure or _batch_failure
        self._rows: list[Any] = []  # row dicts, argument tuples of attempt_row, and _Tally
        self._tallies: dict[tuple[str, str], _Tally] = {}  # the batch's counts of unmeasured calls, by function
        self._first_at = 0.0  # when the oldest buffered row arrived
        self._in_flight: list[_Batch] = []  # batches sent and not yet taken
        self._sending = 0  # flushes that took rows and have not put their batch in flight yet
        self._cond = threading.Condition()
        self._taking = threading.Lock()  # held while the batches in flight are looked at
        self._thread: threading.Thread | None = None

    def add(self, row: dict) -> None:
        self._buffer(row)

    def add_attempt(self, spec: AttemptSpec, outcome: Outcome, usage: Usage | None, started_at: float,
                    ended_at: float, error: str = "", node_id: str = "", worker_pid: int | None = None) -> None:
        """Buffer the row ``attempt_row`` makes of these (built at the flush)."""
        self._buffer((spec, outcome, usage, started_at, ended_at, error, node_id, worker_pid))

    def add_unmeasured(self, spec: AttemptSpec, started_at: float, ended_at: float) -> None:
        """Count a call that ran and returned but was not measured (``policy.thinning``).

        At the flush the batch's count is added to the ``calls`` of a measured ok row
        of the same function in the batch, or becomes a row of its own that stands
        for the counted calls only (no call id, no usage).
        """
        with self._cond:
            key = (spec.function, spec.code_hash)  # one code may serve under two names
            tally = self._tallies.get(key)
            if tally is None:
                tally = self._tallies[key] = _Tally(spec, started_at)
                self._append_locked(tally)
            tally.calls += 1
            tally.last_ended = ended_at

    def _buffer(self, item: Any) -> None:
        with self._cond:
            self._append_locked(item)

    def _append_locked(self, item: Any) -> None:
        self._rows.append(item)
        if len(self._rows) > 1:
            return  # the flush thread was woken by the batch's first row
        self._first_at = time.monotonic()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="raysched-row-sink", daemon=True)
            self._thread.start()
        self._cond.notify()

    @property
    def in_flight(self) -> int:
        """Batches sent that the profiler has not taken yet."""
        with self._cond:
            return len(self._in_flight)

    def flush(self, wait_s: float = 0.0) -> Any:
        """Send the buffered rows now; returns what ``send`` returned (a Ray ref, or None).

        ``wait_s`` > 0: also wait up to that long until the profiler has taken them
        and every batch sent before (a worker process about to exit must not leave
        them in flight).
        """
        with self._cond:
            items, self._rows, self._tallies = self._rows, [], {}
            self._sending += 1
        try:
            rows = _build_rows(items) if items else []
            sent = self._send(rows) if rows else None
        finally:
            with self._cond:
                self._sending -= 1
        with self._cond:
            if sent is not None:
                self._in_flight.append(_Batch(sent, rows))
            pending = bool(self._in_flight) or self._sending > 0
        if wait_s > 0 and pending:
            # Batches another thread is sending count too: the flush thread may have taken the
            # rows before this call, and be still looking the profiler up when the worker exits.
            deadline = time.monotonic() + wait_s
            while (self._forget_taken() or self._sending_now()) and time.monotonic() < deadline:
                time.sleep(self.WAIT_POLL_S)
        return sent

    def _sending_now(self) -> bool:
        with self._cond:
            return self._sending > 0

    def _forget_taken(self) -> bool:
        """Drop the refs of batches the profiler has taken (an owned ref keeps the worker from
        idling out); True while some batch is still in flight (or could not be checked)."""
        # One look at a time (the flush thread's, and a flush(wait_s) at a worker's exit): two
        # would both send a lost batch again.
        with self._taking:
            with self._cond:
                batches = list(self._in_flight)
            if not batches:
                return False
            try:
                left = set(self._unfinished([b.ref for b in batches]))
            except Exception:  # noqa: BLE001 - the rows were sent; Ray retries the call if the actor restarts
                logger.debug("raysched: could not check the batches in flight", exc_info=True)
                return False
            ended = [b for b in batches if b.ref not in left]
            again = [b for batch in ended for b in self._after_taken(batch)]
            with self._cond:
                self._in_flight = [b for b in self._in_flight if not any(b is e for e in ended)] + again
                return bool(self._in_flight)

    def _after_taken(self, batch: "_Batch") -> list["_Batch"]:
        """A batch whose call ended: nothing to do if the profiler stored it.  Its profiler was
        lost (killed, its node gone): sent again, to the profiler found by name now, or
        written to the store (the store drops rows it already has, by ``row_id``); returns
        the batch as sent again, if it was.  Any other failure (its folder unwritable, say)
        is said out loud, and the worker writes the batch itself (``resend(rows, True)``;
        kept on its node if that fails too)."""
        try:
            error = self._failure(batch.ref)
        except Exception:  # noqa: BLE001
            return []
        if error is None:
            return []
        if self._resend is not None and _profiler_lost(error):
            direct = batch.resends >= _MAX_RESENDS
            logger.warning("raysched: the profiler was lost (%s); %s %d profile rows", type(error).__name__,
                           "writing to the store" if direct else "sending again", len(batch.rows))
            try:
                ref = self._resend(batch.rows, direct)
            except Exception:  # noqa: BLE001
                logger.exception("raysched: could not send %d profile rows again", len(batch.rows))
                return []
            return [_Batch(ref, batch.rows, batch.resends + 1)] if ref is not None else []
        if self._resend is None:
            logger.warning("raysched: the profiler could not store a batch of this worker's profile rows: %s", error)
            return []
        # Its home unwritable for the profiler, say: the worker writes the batch itself, and keeps
        # it on its node when that fails too (``_ProfilerSender._write``); dropped, the rows were lost.
        logger.warning("raysched: the profiler could not store a batch of this worker's profile rows (%s); "
                       "writing its %d rows to the store directly", error, len(batch.rows))
        try:
            self._resend(batch.rows, True)
        except Exception:  # noqa: BLE001
            logger.exception("raysched: could not write %d profile rows", len(batch.rows))
        return []

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._rows and not self._in_flight:
                    self._cond.wait()
                due = self._first_at + self._interval if self._rows else None
            if due is not None:
                if self._held is None and self._hold is not None:
                    try:
                        self._held = self._hold()
                    except Exception:  # noqa: BLE001 - no guard: the batch is still sent
                        logger.debug("raysched: could not hold an object while rows are buffered", exc_info=True)
                if time.monotonic() >= due:
                    try:
                        self.flush()
                    except Exception:  # noqa: BLE001 - a lost batch is logged, the thread lives on
                        logger.exception("raysched: could not send profile rows")
                    self._held = None  # the batch's call is in flight now (or given up on)
            self._forget_taken()
            # Sleep until the next batch is due (a row arriving meanwhile does not shorten a
            # batch's gathering), or until the next look at the batches in flight.
            with self._cond:
                nap = self._first_at + self._interval - time.monotonic() if self._rows else None
                if self._in_flight:
                    nap = self.POLL_S if nap is None else min(nap, self.POLL_S)
            if nap is not None and nap > 0:
                time.sleep(nap)


class _Batch:
    """A batch of rows on its way to the profiler: kept until it is taken, to be sent again
    if the profiler is lost meanwhile."""

    __slots__ = ("ref", "rows", "resends")

    def __init__(self, ref: Any, rows: list[dict], resends: int = 0):
        self.ref, self.rows, self.resends = ref, rows, resends


#: Times a batch is sent again to a profiler found anew before it is written to the store itself.
_MAX_RESENDS = 2


def _profiler_lost(error: BaseException) -> bool:
    """Whether a batch failed because its profiler actor died or became unreachable, not
    because of what the profiler did with it."""
    return isinstance(error, ray.exceptions.RayActorError)


def _batch_failure(ref: Any) -> BaseException | None:
    """The error of a batch's ``record`` call that has finished, or None when it stored the rows."""
    if not isinstance(ref, ray.ObjectRef):
        return None
    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.GetTimeoutError:
        return None
    except Exception as exc:  # noqa: BLE001 - what the profiler raised, as Ray hands it back
        return exc
    return None


def _unfinished_refs(sent: list[Any]) -> list[Any]:
    """Those of ``sent`` (what ``send`` returned: Ray refs of batches in flight) not done yet."""
    refs = [r for r in sent if isinstance(r, ray.ObjectRef)]
    if not refs:
        return []
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
    return pending


class _Tally:
    """The calls of one function counted, not measured, in one batch (``RowSink.add_unmeasured``)."""

    __slots__ = ("spec", "calls", "first_started", "last_ended")

    def __init__(self, spec: AttemptSpec, started_at: float):
        self.spec = spec
        self.calls = 0
        self.first_started = started_at
        self.last_ended = started_at

    def row(self, row_id: str) -> dict[str, Any]:
        """A row of its own, for a batch with no measured row of the function to add the count to."""
        row = attempt_row(self.spec, Outcome.OK, None, self.first_started, self.last_ended, row_id=row_id)
        row["call_id"] = None  # it stands for several calls
        row["calls"] = self.calls
        return row


def _build_rows(items: list[Any]) -> list[dict]:
    """The rows of a batch: dicts as they are, attempts' arguments made into rows (one random read for
    all ids), counts of unmeasured calls added to the last measured ok row of their function."""
    ids = os.urandom(16 * len(items)).hex()
    rows = []
    tallies = []
    last_ok: dict[tuple[str, str], dict] = {}  # (function, code hash) -> the batch's last measured ok row
    for i, item in enumerate(items):
        if type(item) is _Tally:
            tallies.append((i, item))
            continue
        if type(item) is tuple:
            try:
                # A task attempt's own row (``add_attempt``): its id is the attempt's, so that
                # a retry that records it again (its worker died first) does not double it.
                item = attempt_row(*item, row_id=attempt_row_id(item[0]) if item[0].call_id
                                   else ids[32 * i: 32 * i + 32])
            except Exception:  # noqa: BLE001 - one bad row must not cost the batch
                logger.exception("raysched: could not build the profile row of %s", getattr(item[0], "live_key", "?"))
                continue
            if item["outcome"] == "ok":
                last_ok[item["function"], item["code_hash"]] = item
        rows.append(item)
    for i, tally in tallies:
        into = last_ok.get((tally.spec.function, tally.spec.code_hash))
        if into is not None:
            into["calls"] += tally.calls
            continue
        try:
            rows.append(tally.row(ids[32 * i: 32 * i + 32]))
        except Exception:  # noqa: BLE001
            logger.exception("raysched: could not build the count row of %s", tally.spec.function)
    return rows


#: How long a worker at exit waits for the profiler to take its last batches.
_SEND_WAIT_S = 30.0


class _ProfilerSender:
    """Sends a worker's batches to its home's profiler actor; without one, writes them to the store."""

    def __init__(self, config: RayschedConfig):
        self._config = config
        self._handle: list[Any] = []
        self._spool_checked = -float("inf")
        self._home_seen = False  # this node sees the profiler's folder (``_sees_home``)
        self._spool_sent: dict[Path, Any] = {}  # kept files sent to the profiler -> their record call

    def __call__(self, rows: list[dict]) -> Any:
        try:
            self._maybe_store_spooled()
        except Exception:  # noqa: BLE001 - they wait for the next look
            logger.debug("raysched: could not store the profile rows kept on this node", exc_info=True)
        try:
            # One plain pickle of the batch: Ray's own serialisation of a list of dicts
            # (msgpack with a pickle per datetime) cost four times as much per row.
            return self._profiler_record(pickle.dumps(rows, protocol=5))
        except Exception as exc:  # noqa: BLE001 - the actor is gone: write the rows ourselves
            logger.warning("raysched: profiler unreachable (%s); storing %d rows without it", exc, len(rows))
            self._write(rows)
            return None

    def resend(self, rows: list[dict], direct: bool) -> Any:
        """A batch again, after the profiler it went to was lost.  The handle is dropped: a
        call to a killed actor's handle fails only later, on its ref, so every later batch
        went to the dead actor too (a helper's audit: 532 of 600 rows lost after the README's
        ``ray.kill`` of the profiler, also of calls made after a new one had started)."""
        self._handle.clear()
        if direct:
            self._write(rows)
            return None
        return self(rows)

    def _write(self, rows: list[dict]) -> None:
        """Write rows to the store; when that fails (the home unwritable, the disk full), keep them
        on this node (``spool_rows``) until a later write stores them.  On a node that does not
        see the profiler's folder (no shared storage), keep them on the node at once: the folder
        of the same path there is read by nobody; they go to the profiler once it answers."""
        from ..store.profiles import ProfileStore

        if not self._sees_home():
            spool_rows(self._config, rows, None)
            return
        try:
            store = ProfileStore(self._config.home_path)
            written, _ = store.append_keeping_valid(rows)
        except Exception as exc:  # noqa: BLE001 - the rows must not be lost with the error
            spool_rows(self._config, rows, exc)
            return
        if written:
            # The profiler may be alive, only slow to answer: it re-reads these functions.
            store.note_outside_write(row["function"] for row in rows)
        store_spooled(self._config, store)

    def _sees_home(self) -> bool:
        """Whether this node sees the profiler's folder (``session.sees_profilers_home``); a yes
        is kept, a no is asked again at the next spool check (the profiler may have moved)."""
        if not self._home_seen:
            from .session import sees_profilers_home

            self._home_seen = sees_profilers_home(self._config)
        return self._home_seen

    def _maybe_store_spooled(self) -> None:
        """Every ``_SPOOL_CHECK_S`` at most, store rows kept on this node (one listing when there are
        none): written to the store, or, from a node without the profiler's folder, sent to it."""
        now = time.monotonic()
        if now - self._spool_checked < _SPOOL_CHECK_S:
            return
        self._spool_checked = now
        self._take_sent()
        if not _spooled_names(spool_dir(self._config)):
            return
        if self._sees_home():
            store_spooled(self._config)
        else:
            self._send_spooled()

    def _send_spooled(self) -> None:
        """Send each file this node kept to the profiler (a file already on its way is not sent
        again); it is deleted once the profiler has stored it (``_take_sent``).  A file sent
        twice, by two workers of the node, is stored once: rows are de-duplicated by id."""
        folder = spool_dir(self._config)
        for name in _spooled_names(folder):
            path = folder / name
            if path in self._spool_sent:
                continue
            try:
                with open(path, "rb") as fh:
                    payload = fh.read()
                pickle.loads(payload)  # a file cut short is not sent: the profiler would refuse it each time
            except FileNotFoundError:
                continue  # another worker of the node sent it, and it was stored
            except Exception as exc:  # noqa: BLE001
                _set_aside(path, exc)
                continue
            try:
                self._spool_sent[path] = self._profiler_record(payload)
            except Exception:  # noqa: BLE001 - no profiler: the files wait for the next look
                return

    def _take_sent(self) -> None:
        """Delete the kept files whose rows the profiler stored; those it did not store are sent again."""
        if not self._spool_sent:
            return
        ready, _ = ray.wait(list(self._spool_sent.values()), num_returns=len(self._spool_sent), timeout=0)
        ready_set = set(ready)
        for path, ref in list(self._spool_sent.items()):
            if ref not in ready_set:
                continue
            del self._spool_sent[path]
            try:
                ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 - the profiler was lost or could not store them: sent again
                continue
            try:
                path.unlink()
            except OSError:
                pass
            logger.warning("raysched: sent the profile rows kept in %s to the profiler", path)

    def _profiler_record(self, payload: bytes) -> Any:
        """``record`` of the home's profiler with a pickled batch (its ref); raises without a profiler."""
        try:
            if not self._handle:
                actor = ray.get_actor(profiler_name(self._config), namespace=NAMESPACE)
                # The actor's handle is kept with its method: a method holds its actor weakly
                # (Ray 2.40), and once the handle was dropped every batch failed with "Lost
                # reference to actor" and was written to the store behind the profiler's back.
                self._handle.extend((actor.record.options(concurrency_group=RECORD_GROUP), actor))
            return self._handle[0].remote(payload)
        except Exception:
            self._handle.clear()
            raise


# --- rows that could not be stored, kept on the node until a later write stores them -------------

#: How often, at most, a worker's sender looks for rows kept on its node.
_SPOOL_CHECK_S = 10.0
_SPOOL_PREFIX, _SPOOL_SUFFIX = "rows-", ".pkl"


def spool_dir(config: RayschedConfig) -> Path:
    """Where this node keeps the rows of ``config``'s home it could not store: under the node's
    temp folder (``TMPDIR``), as the home itself may be what cannot be written."""
    return Path(tempfile.gettempdir()) / f"raysched-spool-{os.getuid()}" / _home_key(str(config.home_path))


def _spooled_names(folder: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(folder) if n.startswith(_SPOOL_PREFIX) and n.endswith(_SPOOL_SUFFIX))
    except OSError:
        return []


def spool_rows(config: RayschedConfig, rows: list[dict], error: BaseException | None) -> Path | None:
    """Keep rows that could not be stored (``error``; None: this node does not see the profiler's
    folder) in a file of this node's spool folder; ``store_spooled`` writes them to the store
    later, or a worker's sender sends them to the profiler.  Returns the file, or None if even
    that failed (then the rows are lost, and an error says so)."""
    folder = spool_dir(config)
    name = f"{_SPOOL_PREFIX}{time.time_ns():020d}-{os.getpid()}-{os.urandom(4).hex()}{_SPOOL_SUFFIX}"
    tmp = folder / f".tmp-{name}"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(tmp, "wb") as fh:
            pickle.dump(list(rows), fh, protocol=5)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / name)
    except Exception as exc:  # noqa: BLE001
        try:
            tmp.unlink()
        except OSError:
            pass
        logger.error("raysched: %d profile rows are LOST: they could not be stored in %s (%s), nor kept in %s (%s)",
                     len(rows), config.home_path, error or _NOT_THE_PROFILERS, folder, exc)
        return None
    if error is None:
        logger.warning("raysched: the profiler did not answer, and %s; kept %d profile rows in %s: they go to "
                       "the profiler at this node's next batch once it answers", _NOT_THE_PROFILERS, len(rows),
                       folder / name)
    else:
        logger.warning("raysched: could not store %d profile rows in %s (%s); kept them in %s: they are stored at "
                       "this node's next successful write there, or when the home's profiler starts",
                       len(rows), config.home_path, error, folder / name)
    return folder / name


_NOT_THE_PROFILERS = "this node's folder of the home's path is not the profiler's (no shared storage)"


def _set_aside(path: Path, error: BaseException) -> None:
    """A kept file that cannot be read (cut short): renamed ``.bad``, not read again and again."""
    logger.warning("raysched: could not read the kept profile rows of %s (%s); left as %s.bad", path, error, path)
    try:
        os.replace(path, path.with_name(path.name + ".bad"))
    except OSError:
        pass


def store_spooled(config: RayschedConfig, store: Any = None) -> int:
    """Write the rows this node kept for ``config``'s home (``spool_rows``) to its store, oldest
    first, and delete each file once stored; returns how many rows were stored.  A write that
    fails leaves the files for the next time.  One process at a time (a lock file)."""
    folder = spool_dir(config)
    if not _spooled_names(folder):
        return 0
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no spool is ever drained concurrently there
        fcntl = None  # type: ignore[assignment]
    try:
        lock = open(folder / ".lock", "a")
    except OSError:
        return 0
    stored = 0
    try:
        if fcntl is not None:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0  # another process is storing them
        if store is None:
            from ..store.profiles import ProfileStore

            store = ProfileStore(config.home_path)
        for name in _spooled_names(folder):
            path = folder / name
            try:
                with open(path, "rb") as fh:
                    rows = pickle.load(fh)
            except FileNotFoundError:
                continue
            except Exception as exc:  # noqa: BLE001
                _set_aside(path, exc)
                continue
            store.append_keeping_valid(rows)
            store.note_outside_write(row["function"] for row in rows if "function" in row)
            path.unlink()
            stored += len(rows)
    except Exception as exc:  # noqa: BLE001 - the home still cannot be written: the files wait
        logger.debug("raysched: could not store the profile rows kept in %s: %s", folder, exc)
    finally:
        lock.close()
    if stored:
        logger.warning("raysched: stored %d profile rows in %s that were kept in %s after a write had failed",
                       stored, config.home_path, folder)
    return stored



class OnePerHome:
    """One object per home (keyed by the name of its profiler or monitor), made on first use.

    A driver that calls ``configure(home=...)`` after tasks ran gets workers whose later
    tasks carry the new config: their rows and live samples must go to the new home's
    actors, not to those the worker's first task named.  A task finds its object by its
    config's id (every task of a plan carries the same config object), without a lock.
    """

    def __init__(self, name_of: Callable[[RayschedConfig], str], make: Callable[[RayschedConfig], Any]):
        self._name_of, self._make = name_of, make
        self._by_home: dict[str, Any] = {}
        self._by_config: dict[int, tuple[RayschedConfig, Any]] = {}  # id(config) -> (config, its object)
        self._lock = threading.Lock()

    def get(self, config: RayschedConfig, create: bool = True) -> Any:
        """The object of ``config``'s home; None if there is none yet and not ``create``."""
        hit = self._by_config.get(id(config))
        if hit is not None and hit[0] is config:
            return hit[1]
        if not create:
            return None
        with self._lock:
            key = self._name_of(config)
            found = self._by_home.get(key)
            if found is None:
                found = self._by_home[key] = self._make(config)
            self._by_config[id(config)] = (config, found)
            return found

    def all(self) -> list[Any]:
        with self._lock:
            return list(self._by_home.values())

    def clear(self) -> None:
        with self._lock:
            self._by_home.clear()
            self._by_config.clear()


def _new_sink(config: RayschedConfig) -> RowSink:
    sender = _ProfilerSender(config)
    sink = RowSink(config.flush_interval_s, sender, hold=lambda: ray.put(None), resend=sender.resend)
    atexit.register(sink.flush, wait_s=_SEND_WAIT_S)
    return sink


#: This process's row sinks, one per profiler (per home).
_sinks = OnePerHome(profiler_name, _new_sink)


def get_sink(config: RayschedConfig) -> RowSink:
    return _sinks.get(config)


def flush_all_sinks(wait_s: float) -> None:
    """Send every sink's rows now and wait up to ``wait_s`` for them (this process is about to end)."""
    for sink in _sinks.all():
        sink.flush(wait_s=wait_s)
