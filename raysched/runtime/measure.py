"""In-worker measurement of one attempt of a task.

Every attempt of a task runs inside a Ray worker process that Ray reuses for
later tasks, so per-process lifetime figures (``ru_maxrss``, ``VmHWM`` as left by
the previous task) describe the worker, not the attempt.  :class:`AttemptMeter`
resets or subtracts them at the start of the attempt and reports what happened
between :meth:`AttemptMeter.start` and :meth:`AttemptMeter.stop` as a
:class:`raysched.types.Usage`.

What each figure of the ``Usage`` means
---------------------------------------

Memory is **private resident memory**: the resident set (RSS) minus its shared
part (``RssFile + RssShmem``; ``statm``'s *shared*, top's SHR), which Ray's docs
name the measure of a worker's heap.  The shared part is pages of Ray's object
store the process mapped (a numpy argument read zero-copy, an object it put) and
of files (the interpreter's libraries, memory-mapped data): the node holds them
once whichever process maps them, the object store has a capacity of its own, and
Ray's memory monitor does not count them against a worker (it kills by private
pages, ``Private_Clean + Private_Dirty`` of ``smaps_rollup``).  Counted as the
task's own, a 1 GiB argument read in place would size every later call 1 GiB too
large, and raysched's monitor would take it for growth past the allocation.

``start_rss_bytes``
    Private resident size of the worker process when the attempt began:
    the interpreter, Ray, imported modules and whatever earlier tasks left
    behind -- plus that of descendants already alive at that moment (none,
    in a plain Ray worker; a pool or a forkserver an earlier task left).
    ``Usage.task_rss_bytes`` (peak minus start) is what the attempt added: the
    process's own peak is counted beside those descendants while they live.

What **other functions** left resident in the worker is not the attempt's: Ray
reuses a worker process for any function of the job, and a function that keeps a
300 MiB cache in a module global made every later task of another function in
that worker look 300 MiB bigger (a helper's audit: a task that only slept was
stopped by the monitor for passing its 96 MiB allocation, its worker killed, and
its function sized at 640 MiB from then on).  Each process keeps a ledger
(:class:`WorkerLedger`) of what each function's measured attempts left resident
(resident size at the end less at the start, summed per function, never below
0) and the smallest start seen in the process.  An attempt's *foreign* memory is
its start's excess over that smallest start, up to what the ledger holds for
other functions; every memory figure of its samples and ``Usage``
(``start_rss_bytes``, ``peak_rss_bytes``, live resident size) is net of it.  Memory of
theirs freed during the attempt stops counting at the next sample (the foreign figure is
never more than what is resident above the attempt's own start); the peak is then taken
net of the least foreign figure seen, so it errs high, with one exception: a task that
frees another function's memory and allocates as much again within one live interval
(before a reading sees the drop) is measured that much too low.  Calls that thinning
does not measure leave nothing in the ledger: a cache their calls fill counts as the next
attempt's own, as all memory of unknown origin does.  What
the attempt's own function left in earlier calls stays its own (a model loaded
once per worker is part of what its calls hold), and memory of unknown origin
too: the ledger only takes off what it saw another function's attempt leave.

``peak_rss_bytes``
    The largest of

    1. the worker process's kernel high-water mark ``VmHWM`` since the start of
       the attempt, minus the shared pages resident when it is read.  ``start()``
       writes ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), which restarts
       ``VmHWM`` from the current RSS, so a much bigger earlier task in the same
       worker does not leak into this figure.  The kernel updates the mark on
       every page fault, whatever the sampling rate (``peak_method == "hwm"``),
       but for the whole RSS: no private-only mark exists.  Shared pages mostly
       accumulate in a worker (it keeps the object store mapped), so the mark
       minus the shared pages of the reading is exact when none arrived after
       the peak, and the largest such figure over all readings (start, every
       live sample, stop) is kept.  A private peak that was freed before shared
       pages arrived *within one live interval* is under-counted by them (a task
       that allocates, frees, then reads a large argument, all within 0.5 s).
       When a reading finds fewer shared pages than the last one (a file
       unmapped, object-store pages evicted), the mark may still hold the pages
       that left: the most shared pages of the two readings are taken off it, and
       the mark is restarted (handed to the process's other meters first), so
       that later readings are exact again.
       At ``stop()`` the mark is read from ``getrusage``'s ``ru_maxrss`` where
       that provably equals it (see ``AttemptMeter._hwm_from_rusage``), which
       spares a read of ``/proc/self/status`` on every task (``statm``, a fifth
       of its cost, gives the shared part);
    2. the largest *sampled* private resident size of the process tree: the
       process's plus what each live descendant alone holds (its USS,
       ``Private_Clean + Private_Dirty`` of ``smaps_rollup``, as Ray's memory
       monitor counts a worker; its ``statm`` private size where that file is
       missing), summed at one sample.  A child forked from the worker maps the
       worker's pages until one of them writes them: they are the worker's, in
       its own figure, and not counted again per child.
       Samples are taken at ``start()``, at ``stop()`` and by the
       :class:`LiveSampler` thread every ``interval_s`` (0.5 s by default)
       while the attempt is registered with it.  A child whose peak falls
       between two samples is under-counted;
    3. for children that exited (and were reaped) during the attempt: the
       process's own peak (1, or its sampled peak) **plus** the largest
       ``ru_maxrss`` of a reaped child (``getrusage(RUSAGE_CHILDREN)``), but
       only if that figure grew during the attempt and is above the worker's
       own whole high-water mark (shared pages included) by more than 4 MiB
       (the kernel's counters are approximate; the mark since the reset, or,
       where it cannot be reset but is read, the process's lifetime mark,
       which is then what the kernel copies into a child; where no mark is
       read at all, every figure that grew counts).  ``RUSAGE_CHILDREN``'s
       ``ru_maxrss`` is a lifetime maximum over every child the worker ever
       reaped and cannot be reset: a short-lived child smaller than one an
       earlier task already ran is only seen through sampling (2).  A child
       that runs another program (``subprocess``: vfork + exec) starts with the
       worker's high-water mark copied into its figure by the kernel, and a
       forked one with the worker's pages resident: a figure at or below the
       worker's mark tells nothing of the child, and counting it charged every
       ``subprocess.run(["true"])`` the worker's whole size.  So a program
       smaller than the worker that ends between two samples is missed.  Adding
       the two peaks is an upper bound, since they need not have coincided, and
       the child's figure is its whole RSS (the kernel keeps no private one),
       less the most a live child was seen to share with the worker (a forked
       child's inherited pages; nothing for a child never sampled alive).
       A child that was alive when the attempt began (one an earlier task left
       running, or exited and never waited for) is not the attempt's: when one
       is found gone, the figure read then becomes the baseline, so a child of
       the attempt's own reaped within the same live interval is then seen
       through sampling only.

    Private RSS includes the memory of Ray's own threads in the worker.  Where
    ``/proc/self/clear_refs`` is not writable or ``VmHWM`` is missing
    (non-Linux, gVisor or locked-down containers), (1) is replaced by the
    sampled RSS of the process itself (``peak_method == "sampled"``), which
    misses peaks shorter than the sampling interval: expect an under-estimate
    for tasks with a brief spike. (If ``VmHWM`` is readable but not
    resettable, it is still used whenever it rises above its value at start,
    since it can only have done so during the attempt: only a spike below an
    earlier task's peak is then missed.) If another attempt starts in the same
    process while this one runs (threaded or async actors), its reset would
    hide this attempt's earlier peak; the meter hands the high-water mark read
    just before the reset to every other running meter of the process, so that
    is not lost.

``cpu_seconds``
    User + system CPU time, during the attempt, of the process (all its
    threads, Ray's included), of its live descendants (``/proc/<pid>/stat``
    utime + stime, plus the time of their own reaped children, as deltas from
    the start for descendants that already existed) and of children reaped
    during the attempt (delta of ``os.times()`` ``children_user`` +
    ``children_system``).  A descendant that was orphaned (re-parented away
    from the tree) before exiting is lost once it leaves the tree.

``wall_seconds``
    Elapsed time between ``start()`` and ``stop()`` on ``clock``
    (``time.monotonic`` by default).

``read_bytes`` / ``write_bytes``
    Bytes the process tree caused to be read from / written to the block layer
    during the attempt (``/proc/<pid>/io`` ``read_bytes`` / ``write_bytes``).
    ``write_bytes`` is counted when page-cache pages are dirtied, so it can
    include data later truncated away; files on tmpfs never reach the block
    layer and count 0.

``read_chars`` / ``write_chars``
    Bytes passed through read/write-like system calls (``rchar`` / ``wchar``):
    files, page cache, pipes, sockets and terminals alike; less what raysched's
    meters themselves read from ``/proc`` meanwhile (a sample of a task with a
    live child reads every process's ``stat``).

Every figure covers the user's function, from its call to its return: Ray's
pickling of the returned value comes after, and is not in it (a value that
pickles into a copy, such as a list of Python ints, peaks above the figure).

For the process itself the kernel folds reaped children's I/O into
``/proc/<pid>/io``; live descendants are added from their own ``/proc`` files.
Network bytes are not recorded (see :class:`raysched.types.Usage`).

Measurement never raises into the user's task: a figure that cannot be read
degrades to partial data (0, or a sampled value) with one logged warning per
meter and figure.

Live samples
------------

:class:`LiveSampler` is one daemon thread per process (``get_live_sampler``),
started on the first ``register`` and idle (blocked, no wake-ups) whenever no
meter is registered.  Every ``interval_s`` it calls ``sample()`` on each
registered meter -- which also feeds the sampled peak (2) -- and hands the
:class:`LiveSample` to the registered callback.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator

from ..types import Usage

logger = logging.getLogger(__name__)

__all__ = [
    "AttemptMeter",
    "DeferredMeter",
    "LiveSample",
    "LiveSampler",
    "get_live_sampler",
    "measure_attempt",
    "DEFAULT_INTERVAL_S",
]

#: Sampling interval when none is given (``RayschedConfig.live_interval_s``).
DEFAULT_INTERVAL_S = 0.5

_LINUX = sys.platform.startswith("linux")
try:
    _PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
    _CLK_TCK = float(os.sysconf("SC_CLK_TCK"))
except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
    _PAGE_SIZE, _CLK_TCK = 4096, 100.0

#: ru_maxrss is in KiB on Linux and in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024

_IO_FIELDS = ("read_bytes", "write_bytes", "rchar", "wchar")
_ZERO_IO = (0, 0, 0, 0)

#: How far ru_maxrss right after the VmHWM reset may exceed the RSS read just before
#: it and still be taken for the reset mark (pages touched between the two reads).
_RU_MAXRSS_SLACK = 256 * 1024

#: How far a reaped child's ``ru_maxrss`` must exceed the worker's own whole mark to be taken
#: for a program bigger than the worker.  The kernel's RSS counters are per-CPU sums read
#: without folding (up to 32 pages per CPU and counter off): the worker's mark copied into a
#: child at its ``exec`` could read a few hundred KiB above the same mark read later, and
#: ``subprocess.run(["sleep", ...])`` was charged the worker's whole size (on two busy cores).
_CHILD_OVER_MARK_SLACK = 4 * 1024 * 1024

#: [pid] once this process has seen VmHWM in its status after a reset: later attempts
#: read the cheaper statm at start.
_HWM_CONFIRMED: list[int] = []


@dataclass(frozen=True)
class LiveSample:
    """A snapshot of a running attempt, as of ``timestamp`` (``time.time()``).

    ``rss_bytes`` is the resident size of the process tree now (process plus
    live descendants), ``peak_rss_bytes`` the attempt's peak so far (same
    definition as ``Usage.peak_rss_bytes``), ``cpu_seconds`` / ``wall_seconds``
    / ``read_bytes`` / ``write_bytes`` the attempt's totals so far;
    ``start_rss_bytes`` the process tree's resident size when the attempt began.
    """

    rss_bytes: int
    peak_rss_bytes: int
    cpu_seconds: float
    wall_seconds: float
    read_bytes: int
    write_bytes: int
    timestamp: float
    start_rss_bytes: int = 0


# --------------------------------------------------------------------------- #
# /proc readers: each returns None (or raises OSError/ValueError) when the
# figure is unavailable; the meter decides how to degrade.
# --------------------------------------------------------------------------- #


def _status_field(data: bytes, key: bytes) -> int | None:
    start = data.find(key)
    if start < 0:
        return None
    end = data.find(b"\n", start + len(key))
    return int(data[start + len(key): end if end >= 0 else None].split()[0]) * 1024


#: Open descriptors of this process's own /proc files, reused with pread/pwrite:
#: opening and closing them cost more than reading them, several times a task.
_OWN_FDS: dict[str, int] = {}
_OWN_FDS_PID: list[int] = []
_OWN_FDS_LOCK = threading.Lock()


def _own_fd(name: str, flags: int) -> int | None:
    """A kept descriptor of /proc/<this pid>/<name>; None if it cannot be opened."""
    fd = _OWN_FDS.get(name)
    if fd is not None and _OWN_FDS_PID == [os.getpid()]:
        return fd  # the per-task path: no lock
    pid = os.getpid()
    with _OWN_FDS_LOCK:
        if _OWN_FDS_PID != [pid]:  # a forked child must not read its parent's files
            _OWN_FDS.clear()
            _OWN_FDS_PID[:] = [pid]
        fd = _OWN_FDS.get(name)
        if fd is None:
            try:
                fd = _OWN_FDS[name] = os.open(f"/proc/{pid}/{name}", flags | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return None
        return fd


#: Shared pages leaving between two readings below this are noise (a few library pages
#: reclaimed): not worth a restart of the mark, at most this much in a figure.
_SHARED_DROP_BYTES = 1 << 20

#: Bytes this process's meters read from /proc (``rchar`` counts them as the task's): each
#: meter takes what was read during its attempt off ``read_chars``. A plain int added to
#: without a lock: a rare lost update under threads costs a few hundred bytes of accuracy.
_METER_READ_CHARS = [0]


def _read_proc(pid: int, name: str) -> bytes:
    if pid == os.getpid():
        fd = _own_fd(name, os.O_RDONLY)
        if fd is not None:
            data = os.pread(fd, 65536, 0)
            _METER_READ_CHARS[0] += len(data)
            return data
    with open(f"/proc/{pid}/{name}", "rb") as f:
        data = f.read()
    _METER_READ_CHARS[0] += len(data)
    return data


def _read_status(pid: int) -> tuple[int | None, int | None, int]:
    """(private RSS, VmHWM, shared RSS) in bytes from /proc/<pid>/status; None where missing.

    Private is ``VmRSS`` minus the shared part, ``RssFile + RssShmem`` (kernels
    before 4.5 lack those two fields: shared is then 0).  One read and a few
    finds: this runs several times per task, and parsing the file line by line
    cost more than everything else the wrapper does.
    """
    data = _read_proc(pid, "status")
    rss = _status_field(data, b"\nVmRSS:")
    shared = (_status_field(data, b"\nRssFile:") or 0) + (_status_field(data, b"\nRssShmem:") or 0)
    return (rss - shared if rss is not None else None), _status_field(data, b"\nVmHWM:"), shared


#: The layout of /proc/<pid>/io since Linux 2.6.20: "rchar: N\nwchar: N\nsyscr: N\nsyscw: N\n
#: read_bytes: N\nwrite_bytes: N\ncancelled_write_bytes: N\n".
_IO_LAYOUT = (b"rchar:", b"wchar:", b"syscr:", b"syscw:", b"read_bytes:", b"write_bytes:")


def _read_statm(pid: int) -> tuple[int, int]:
    """(private RSS, shared RSS) in bytes from /proc/<pid>/statm: ``resident - shared``
    and ``shared`` (the same figures as status's VmRSS - RssFile - RssShmem, at a fifth
    of its cost)."""
    words = _read_proc(pid, "statm").split()
    resident, shared = int(words[1]) * _PAGE_SIZE, int(words[2]) * _PAGE_SIZE
    return resident - shared, shared


def _read_uss(pid: int) -> int | None:
    """Bytes ``pid`` alone holds (``Private_Clean + Private_Dirty`` of smaps_rollup, as Ray's
    memory monitor counts a worker), or None where smaps_rollup is missing (Linux < 4.14)."""
    try:
        data = _read_proc(pid, "smaps_rollup")
    except OSError:
        return None
    private = 0
    found = False
    for line in data.splitlines():
        if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
            private += int(line.split()[1]) * 1024
            found = True
    return private if found else None


def _read_io(pid: int) -> tuple[int, int, int, int]:
    """(read_bytes, write_bytes, rchar, wchar) from /proc/<pid>/io."""
    data = _read_proc(pid, "io")
    words = data.split()
    # One split and positional fields when the file has its usual layout (this runs
    # twice per task; a parse into a dict cost more than the read itself).
    if len(words) >= 12 and tuple(words[0:12:2]) == _IO_LAYOUT:
        return int(words[9]), int(words[11]), int(words[1]), int(words[3])
    values = dict(line.split(b": ") for line in data.splitlines() if b": " in line)
    return tuple(int(values.get(k.encode(), 0)) for k in _IO_FIELDS)  # type: ignore[return-value]


def _reset_hwm(pid: int) -> None:
    """Restart the kernel's VmHWM from the current RSS (Linux >= 4.0)."""
    if pid == os.getpid():
        fd = _own_fd("clear_refs", os.O_WRONLY)
        if fd is not None:
            os.pwrite(fd, b"5", 0)
            return
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


@dataclass(frozen=True)
class _Child:
    """One live descendant at one sample."""

    pid: int
    ppid: int
    starttime: int  # clock ticks since boot: with pid, identifies the process
    cpu: float  # utime + stime + cutime + cstime, seconds
    rss: int  # resident bytes it alone holds (USS; else resident minus shared)
    io: tuple[int, int, int, int]
    #: Anonymous pages it shares with other processes (a forked child's pages inherited
    #: from the worker and not written since): resident minus shared minus ``rss``.
    inherited: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.starttime)


def _stat_linux(pid: int) -> tuple[int, float, int, int] | None:
    """(ppid, cpu seconds incl. reaped children, starttime, rss bytes) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    _METER_READ_CHARS[0] += len(data)
    rest = data[data.rindex(b")") + 2 :].split()
    # rest[0] is field 3 (state): field n is rest[n - 3]
    ppid = int(rest[1])
    cpu = (int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])) / _CLK_TCK
    return ppid, cpu, int(rest[19]), int(rest[21]) * _PAGE_SIZE


def started_since(pid: int, since: float, slack_s: float = 0.05) -> bool:
    """Whether process ``pid`` started at or after ``since`` (a ``time.time()``), to ``slack_s``.

    On Linux by its start in clock ticks since boot (``/proc/<pid>/stat``) against
    ``CLOCK_BOOTTIME``: psutil's ``create_time()`` adds the boot time, known to a
    whole second and off from ``time.time()`` by a fraction of one (0.36 s on the
    development machine), more than the gap between a task's start and its child's.
    Elsewhere by ``create_time()``, a second's slack more.
    """
    if sys.platform.startswith("linux"):
        stat = _stat_linux(pid)
        if stat is None:
            return False
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME) - (time.time() - since)
        return stat[2] / _CLK_TCK >= since_boot - slack_s
    import psutil

    try:
        return psutil.Process(pid).create_time() >= since - slack_s - 1.0
    except psutil.Error:
        return False


def _descendants_linux(root: int) -> list[_Child]:
    """Live descendants of ``root`` by one pass over /proc (O(processes on the node))."""
    parents: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, float, int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        st = _stat_linux(pid)
        if st is None:
            continue
        stats[pid] = st
        parents.setdefault(st[0], []).append(pid)
    out: list[_Child] = []
    todo = list(parents.get(root, ()))
    while todo:
        pid = todo.pop()
        ppid, cpu, starttime, rss = stats[pid]
        inherited = 0
        try:
            rss = _read_statm(pid)[0]  # private, as for the process itself (stat has the whole RSS)
            # What it alone holds: a child forked from the worker maps the worker's pages
            # until one of them writes them; counted in the worker already, not again here.
            uss = _read_uss(pid)
            if uss is not None and uss < rss:
                rss, inherited = uss, rss - uss
        except (OSError, ValueError, IndexError):
            pass
        try:
            io = _read_io(pid)
        except (OSError, ValueError):
            io = _ZERO_IO
        out.append(_Child(pid, ppid, starttime, cpu, rss, io, inherited))
        todo.extend(parents.get(pid, ()))
    return out


def _descendants_psutil(root: int) -> list[_Child]:
    import psutil

    out: list[_Child] = []
    for proc in psutil.Process(root).children(recursive=True):
        try:
            with proc.oneshot():
                t = proc.cpu_times()
                cpu = t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
                mem = proc.memory_info()
                rss = mem.rss - getattr(mem, "shared", 0)
                try:
                    c = proc.io_counters()
                    io = (
                        getattr(c, "read_bytes", 0),
                        getattr(c, "write_bytes", 0),
                        getattr(c, "read_chars", 0),
                        getattr(c, "write_chars", 0),
                    )
                except (AttributeError, psutil.Error):
                    io = _ZERO_IO
                out.append(_Child(proc.pid, proc.ppid(), int(proc.create_time() * 100), cpu, rss, io))
        except psutil.Error:
            continue
    return out


def _has_children_self() -> bool | None:
    """Whether this process has any child (live or zombie), without reaping; None if unknown.

    ``waitid(P_ALL, WNOHANG | WNOWAIT)`` fails with ECHILD exactly when there is
    no child: a 3 us test that spares the /proc scan for the common childless task.
    """
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # type: ignore[attr-defined]
        return True
    except ChildProcessError:
        return False
    except (AttributeError, OSError):
        return None


_WARNED_IN_PROCESS: set[tuple[str, str]] = set()

# Meters of this process that rely on the kernel high-water mark, so that a
# reset by one can hand the mark over to the others first.
_HWM_METERS: "weakref.WeakSet[AttemptMeter]" = weakref.WeakSet()
_HWM_LOCK = threading.Lock()


class WorkerLedger:
    """What each function's measured attempts left resident in this worker process (see
    the module docstring, "What other functions left").  Thread-safe; one per process
    (``worker_ledger``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.baseline: int | None = None  # the smallest attempt start seen in the process
        self.retained: dict[str, int] = {}  # function -> bytes its attempts left resident
        self._total = 0  # their sum

    def foreign_at_start(self, function: str, start_rss: int) -> int:
        """Bytes of ``start_rss`` that other functions' attempts left in this process.

        The ledger learns what attempts leave, not what is freed later (a cache cleared, a
        cycle collected by another task's ``gc.collect()``): when less is resident above the
        baseline than it holds, every entry shrinks in proportion, so that no stale entry
        is taken off a later attempt (a helper's audit: an attempt that allocated 200 MiB
        after the 300 MiB another function left was freed was measured at 0).
        """
        with self._lock:
            if self.baseline is None or start_rss < self.baseline:
                self.baseline = int(start_rss)
            if self._total < _LEDGER_MIN_BYTES:
                return 0  # what little is left is not worth a sum per call (tiny calls pay this)
            above = int(start_rss) - self.baseline
            if above < self._total:
                scale = max(0.0, above / self._total)
                self.retained = {owner: int(held * scale) for owner, held in self.retained.items()
                                 if int(held * scale) > 0}
                self._total = sum(self.retained.values())
            own = self.retained.get(function, 0)
            return int(max(0, min(above - own, self._total - own)))

    def left(self, function: str, start_rss: int, end_rss: int) -> None:
        """An attempt of ``function`` ended holding ``end_rss`` (it began with ``start_rss``)."""
        with self._lock:
            before = self.retained.pop(function, 0)
            held = max(0, before + int(end_rss) - int(start_rss))
            if held > 0:
                self.retained[function] = held
            self._total += held - before
            if len(self.retained) > 1024:  # a process that ran many functions: the emptiest go
                for owner in sorted(self.retained, key=self.retained.get)[:512]:
                    self._total -= self.retained.pop(owner)


_LEDGER: list[tuple[int, WorkerLedger]] = []
#: Less than this left by every function together is not taken off anyone's figures.
_LEDGER_MIN_BYTES = 16 * 2**20


def worker_ledger() -> WorkerLedger:
    """This process's ledger (a forked child starts its own: its memory is not the parent's)."""
    pid = os.getpid()
    if not _LEDGER or _LEDGER[0][0] != pid:
        _LEDGER[:] = [(pid, WorkerLedger())]
    return _LEDGER[0][1]


class AttemptMeter:
    """Measures one attempt of a task in the current process (and its children).

    ``start()`` at the beginning of the attempt, ``stop()`` at the end (returns
    the :class:`~raysched.types.Usage`, also kept as ``usage``), ``sample()`` in
    between from any thread.  See the module docstring for what each figure
    means.  No method raises: unreadable figures degrade with a warning.
    ``pid`` defaults to the current process; another process can be measured
    where ``/proc`` allows, but without its reaped children's CPU/peak (those
    are only known to its parent through ``getrusage``).  ``owner``: the function
    the attempt runs, whose figures are then net of what other functions left in
    this process (:class:`WorkerLedger`); None: gross figures, no ledger.
    """

    def __init__(self, pid: int | None = None, clock: Callable[[], float] = time.monotonic,
                 owner: str | None = None) -> None:
        self.pid = os.getpid() if pid is None else int(pid)
        self._self = self.pid == os.getpid()
        self._owner = owner if self._self else None
        self._clock = clock
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        #: "hwm" (kernel high-water mark, reset at start) or "sampled" (fallback).
        self.peak_method = "sampled"
        self.usage: Usage | None = None
        self._started = False
        self._stopped = False
        self._reset_state()

    # -- state ---------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._t0 = 0.0
        self._start_rss = 0
        # What other functions left resident, as far as still resident (WorkerLedger): at the
        # start, then never more than the resident size above what the attempt began with of
        # its own (``_net_floor``), so that memory of theirs freed during it stops counting.
        self._foreign = 0
        self._net_floor = 0  # the start less other functions' memory then: the attempt's start
        #: The tree's resident size when stopped (gross), for the ledger; None before.
        self.end_rss: int | None = None
        self._start_total = 0  # the process's whole RSS (private + shared) at start
        self._cpu0_self = 0.0
        self._cpu0_reaped = 0.0
        self._maxrss0_children = 0
        self._io0 = _ZERO_IO
        self._io_ok = False
        self._base_children: dict[tuple[int, int], _Child] = {}
        self._gone_base: set[tuple[int, int]] = set()  # children alive at start seen gone since
        self._own_base: set[tuple[int, int]] = set()  # ...that are the attempt's own (rebase_start)
        #: The largest RUSAGE_CHILDREN ru_maxrss read above its start value (and not after a
        #: child alive at start went): the attempt's own reaped children's.
        self._reaped_max = 0
        self._peak_self = 0  # largest RSS of the process itself (sampled, or VmHWM)
        self._peak_tree = 0  # largest sampled process + live descendants
        self._peak_handed = 0  # high-water mark handed over by another meter's reset
        self._inherited_max = 0  # the most a live child was seen to share with the worker (forked)
        self._cpu_max = 0.0
        self._hwm0: int | None = None  # VmHWM before the reset (used if the reset fails)
        #: Shared pages resident at the last reading: when they drop, the mark may hold pages
        #: that are gone (a file unmapped), and it is restarted (``_restart_mark``).
        self._last_shared = 0
        #: The largest whole high-water mark read (shared pages included; before any restart):
        #: what a child's ``ru_maxrss`` can hold of the worker's (see ``_measure``).
        self._whole_mark = 0
        self._meter_reads0 = 0  # _METER_READ_CHARS at the start
        self._ru_maxrss0: int | None = None  # getrusage's ru_maxrss right after the reset

    def _warn(self, what: str, exc: BaseException) -> None:
        """Log once per meter and figure; a warning only the first time in the process
        (a platform without /proc would otherwise warn on every task), debug after."""
        if what in self._warned:
            return
        self._warned.add(what)
        first = (what, type(exc).__name__) not in _WARNED_IN_PROCESS
        _WARNED_IN_PROCESS.add((what, type(exc).__name__))
        logger.log(logging.WARNING if first else logging.DEBUG,
                   "raysched: cannot measure %s of pid %s (%s: %s); using partial data",
                   what, self.pid, type(exc).__name__, exc)

    def _absorb_peak(self, value: int) -> None:
        """Called by another meter of the same process just before it resets VmHWM."""
        if value > self._peak_handed:
            self._peak_handed = value

    def _other_meters(self) -> "list[AttemptMeter]":
        """The other running meters of this process (threaded or async actors), whose peaks a
        reset of the kernel's mark would hide. Called under ``_HWM_LOCK``."""
        return [m for m in _HWM_METERS if m is not self and m.pid == self.pid and m._started]

    def _restart_mark(self, peak_so_far: int) -> None:
        """Restart the kernel's high-water mark mid-attempt (after shared pages left it),
        handing ``peak_so_far`` to the other meters of this process first, as ``start()``
        does, so that none of them loses a peak the old mark held."""
        if not _LINUX or not self._self:
            return
        try:
            with _HWM_LOCK:
                for other in self._other_meters():
                    other._absorb_peak(peak_so_far)
                _reset_hwm(self.pid)
            self._ru_maxrss0 = None  # getrusage's figure no longer provably the mark: read status
        except Exception as exc:  # noqa: BLE001 - never raise into the task
            self._warn("VmHWM restart", exc)

    # -- raw readings ----------------------------------------------------------------

    def _rusage(self) -> tuple[float, float, int | None, int]:
        """(own user+sys s, reaped children's user+sys s, own ru_maxrss bytes or None, children's ru_maxrss bytes)."""
        if self._self:
            # getrusage has microsecond resolution; os.times() counts 10 ms clock
            # ticks, which made a 50 us task look like 0 or 200 cores.
            own = resource.getrusage(resource.RUSAGE_SELF)
            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            return (own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime,
                    int(own.ru_maxrss) * _MAXRSS_UNIT, int(kids.ru_maxrss) * _MAXRSS_UNIT)
        import psutil

        t = psutil.Process(self.pid).cpu_times()
        return t.user + t.system, getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0), None, 0

    def _rss_hwm(self) -> tuple[int | None, int | None, int]:
        """(private RSS, VmHWM or None, shared RSS) of the process, in bytes."""
        if _LINUX:
            try:
                return _read_status(self.pid)
            except (OSError, ValueError) as exc:
                self._warn("VmRSS/VmHWM", exc)
        import psutil

        mem = psutil.Process(self.pid).memory_info()
        shared = int(getattr(mem, "shared", 0))  # Linux only
        return int(mem.rss) - shared, None, shared

    def _io(self) -> tuple[int, int, int, int]:
        if _LINUX:
            return _read_io(self.pid)
        import psutil

        c = psutil.Process(self.pid).io_counters()
        return (c.read_bytes, c.write_bytes, getattr(c, "read_chars", 0), getattr(c, "write_chars", 0))

    def _children(self) -> list[_Child]:
        if self._self and _has_children_self() is False:
            return []
        if _LINUX:
            return _descendants_linux(self.pid)
        return _descendants_psutil(self.pid)

    # -- public API ---------------------------------------------------------------------

    @property
    def start_rss_bytes(self) -> int:
        """RSS of the process (and its live descendants) when ``start()`` ran."""
        return self._start_rss

    def rebase_start(self, start_rss: int | None, foreign: int = 0, since: float | None = None) -> None:
        """Take ``start_rss`` (read before ``start()``, when the call began) as the start, if
        lower, and ``foreign`` (other functions' memory then) as what its figures are net of;
        children alive at ``start()`` that began at or after ``since`` (``time.time()`` of the
        call's start) are the call's own: reaped, their figure counts as any child's."""
        with self._lock:
            own = self._own_base_since(since)
            self._own_base.update(own)
            if start_rss is not None:
                # ``start_rss`` is the process's alone: the descendants alive at ``start()`` that
                # are not the call's own were there when it began too (without them the start
                # was that much too low beside a peak of the tree that holds them).
                start_rss = int(start_rss) + sum(c.rss for key, c in self._base_children.items() if key not in own)
                self._start_rss = min(self._start_rss, start_rss) if self._start_rss else start_rss
            self._foreign, self._net_floor = int(foreign), self._start_rss - int(foreign)

    def _own_base_since(self, since: float | None) -> set[tuple[int, int]]:
        """The children alive at ``start()`` that began at or after ``since`` (``time.time()``)."""
        if since is None or not self._base_children:
            return set()
        if _LINUX:  # starttime in clock ticks since boot (see started_since)
            since_ticks = (time.clock_gettime(time.CLOCK_BOOTTIME) - (time.time() - since) - 0.05) * _CLK_TCK
        else:  # psutil's create_time, in hundredths of a second
            since_ticks = (since - 1.0) * 100
        return {key for key, c in self._base_children.items() if c.starttime >= since_ticks}

    def start(self) -> None:
        """Begin the attempt: reset VmHWM and remember the starting counters."""
        with self._lock:
            if self._started:  # a meter started again; a new one is in its initial state already
                self._reset_state()
            self._started, self._stopped, self.usage = True, False, None
            self._t0 = self._clock()
            self.peak_method = "sampled"
            rss_after = None
            try:
                if _LINUX:
                    with _HWM_LOCK:
                        others = self._other_meters() if _HWM_METERS else []
                        # The high-water mark before the reset matters only to other
                        # meters running in this process (threaded actors); a plain
                        # task worker has none and skips the read.
                        _, hwm_before, shared_before = _read_status(self.pid) if others else (None, None, 0)
                        self._hwm0 = hwm_before
                        if hwm_before is not None:
                            for other in others:
                                other._absorb_peak(hwm_before - shared_before)
                        try:
                            _reset_hwm(self.pid)
                        except Exception:
                            # No reset: the mark as it stands is the baseline growth is judged from.
                            self._hwm0 = _read_status(self.pid)[1]
                            raise
                        if self._self and _HWM_CONFIRMED == [self.pid]:
                            # VmHWM is known to exist here: statm has the RSS at a fifth of status's cost.
                            (rss_after, shared_after), hwm_ok = _read_statm(self.pid), True
                        else:
                            rss_after, hwm_after, shared_after = _read_status(self.pid)
                            hwm_ok = hwm_after is not None
                            if hwm_ok and self._self:
                                _HWM_CONFIRMED[:] = [self.pid]
                        if hwm_ok:
                            self.peak_method = "hwm"
                            _HWM_METERS.add(self)
            except Exception as exc:  # noqa: BLE001 - OSError/ValueError expected; never raise
                logger.debug("raysched: VmHWM reset unavailable for pid %s (%s); sampling the peak",
                             self.pid, exc)
            try:
                # The read right after the reset already has the RSS: no third read.
                if rss_after is None:
                    rss_after, _, shared_after = self._rss_hwm()
                self._start_rss = int(rss_after or 0)
                self._start_total = self._start_rss + int(shared_after or 0)
                self._last_shared = int(shared_after or 0)
                self._whole_mark = self._start_total
                if self.peak_method != "hwm" and self._hwm0:
                    self._whole_mark = max(self._whole_mark, self._hwm0)  # a mark not reset: as it stands
            except Exception as exc:  # noqa: BLE001 - never raise into the task
                self._warn("RSS", exc)
            self._peak_self = self._start_rss
            try:
                self._cpu0_self, self._cpu0_reaped, self._ru_maxrss0, self._maxrss0_children = self._rusage()
            except Exception as exc:  # noqa: BLE001
                self._warn("CPU time", exc)
            try:
                # Before the read: rchar counts a read only once it returned.
                self._meter_reads0 = _METER_READ_CHARS[0]
                self._io0 = self._io()
                self._io_ok = True
            except Exception as exc:  # noqa: BLE001
                self._warn("I/O counters", exc)
            try:
                self._base_children = {c.key: c for c in self._children()}
            except Exception as exc:  # noqa: BLE001
                self._warn("child processes", exc)
            self._start_rss += sum(c.rss for c in self._base_children.values())
            self._peak_tree = self._start_rss
            if self._owner is not None:
                self._foreign = worker_ledger().foreign_at_start(self._owner, self._start_rss)
            self._net_floor = self._start_rss - self._foreign

    def _still_foreign(self, rss: int | None) -> int:
        """Other functions' memory still counted: at most what is resident above the attempt's
        own start (a task that freed another function's cache and then grew would otherwise
        be measured, and capped, that much too low); it only shrinks.  Memory of theirs freed
        and the same amount allocated within one live interval is still taken off: a leak
        then passes its cap by at most what they had left."""
        if self._foreign and rss is not None:
            self._foreign = max(0, min(self._foreign, int(rss) - self._net_floor))
        return self._foreign

    def _hwm_from_rusage(self, ru_maxrss: int | None) -> int | None:
        """The high-water mark since the reset, from ``getrusage``, when it provably is one.

        ``ru_maxrss`` of a live process is the larger of the kernel's high-water
        mark (which ``start()`` reset) and a constant left by the image before
        ``exec`` (``signal->maxrss``).  Right after the reset it was either about
        the RSS (the constant is below it, so it is the mark from then on) or
        above it; in that case a value that has grown since is the mark too.
        Otherwise (None) the caller reads ``/proc/self/status``.
        """
        if ru_maxrss is None or self._ru_maxrss0 is None or self.peak_method != "hwm":
            return None
        if self._ru_maxrss0 <= self._start_total + _RU_MAXRSS_SLACK or ru_maxrss > self._ru_maxrss0:
            return ru_maxrss
        return None

    def _measure(self, final: bool = False) -> tuple[int, int, float, tuple[int, int, int, int]]:
        """One sample under the lock: (tree rss now, peak so far, cpu so far, io so far).

        ``final`` (from ``stop()``): the current RSS is not needed when the
        high-water mark has the peak, so a childless process skips the status read.
        """
        # Read the process's own cumulative counters *before* enumerating
        # children: a child reaped in between is then missed once (transient,
        # absorbed by the monotone max) rather than counted twice.
        cpu_self = cpu_reaped = ru_maxrss = maxrss_children = None
        try:
            cpu_self, cpu_reaped, ru_maxrss, maxrss_children = self._rusage()
        except Exception as exc:  # noqa: BLE001
            self._warn("CPU time", exc)
        io = _ZERO_IO
        meter_reads = _METER_READ_CHARS[0]  # the meters' reads up to (not with) this one
        if self._io_ok:
            try:
                io = self._io()
            except Exception as exc:  # noqa: BLE001
                self._warn("I/O counters", exc)
        children: list[_Child] = []
        scanned = False
        try:
            children = self._children()
            scanned = True
        except Exception as exc:  # noqa: BLE001
            self._warn("child processes", exc)
        rss = hwm = None
        shared = 0
        try:
            if final and not children and not self._base_children:
                hwm = self._hwm_from_rusage(ru_maxrss)
                if hwm is not None and _LINUX:
                    rss, shared = _read_statm(self.pid)  # the shared part, to take off the mark
                elif hwm is not None:
                    rss, _, shared = self._rss_hwm()
            if hwm is None:
                rss, hwm, shared = self._rss_hwm()
        except Exception as exc:  # noqa: BLE001
            self._warn("RSS", exc)

        # memory: private figures.  The kernel's mark counts shared pages too; those resident
        # now are taken off it.  Shared pages only accumulate in a worker (it keeps the object
        # store mapped), so at an earlier reading the mark minus the shared pages of then was
        # at least as close: the largest over all readings is kept.
        if rss is not None:
            self._peak_self = max(self._peak_self, rss)
        if hwm is not None:
            self._whole_mark = max(self._whole_mark, hwm)
            if self.peak_method == "hwm":
                # Fewer shared pages than at the last reading (a file unmapped, store pages
                # evicted): the mark may hold pages that are gone, so the most seen since
                # then is taken off, and the mark restarts from now, exact again after it.
                dropped = rss is not None and shared < self._last_shared - _SHARED_DROP_BYTES
                self._peak_self = max(self._peak_self, hwm - max(shared, self._last_shared if dropped else 0))
                if dropped and not final:
                    self._restart_mark(hwm - self._last_shared)
            elif self._hwm0 is not None and hwm > self._hwm0:
                # Not reset, but a lifetime maximum that grew was reached during the attempt.
                self._peak_self = max(self._peak_self, hwm - shared)
        if rss is not None:
            self._last_shared = shared
        self._peak_self = max(self._peak_self, self._peak_handed)
        live = {c.key: c for c in children}
        if children:
            self._inherited_max = max(self._inherited_max, max(c.inherited for c in children))
        tree_rss = (rss if rss is not None else 0) + sum(c.rss for c in children)
        self._peak_tree = max(self._peak_tree, tree_rss)
        # The start counts the descendants alive then (an earlier task's pool, a forkserver):
        # the process's own peak, read from its kernel mark between samples, counts beside
        # those still alive (the least each held), or it was measured against a start that
        # holds them and came out that much too low (300 MiB as 231 beside a 69 MiB child).
        with_base = self._peak_self + sum(min(base.rss, live[key].rss)
                                          for key, base in self._base_children.items() if key in live)
        self._peak_tree = max(self._peak_tree, with_base)
        peak = max(self._peak_self, self._peak_tree)
        gone = [key for key in self._base_children
                if key not in live and key not in self._gone_base and key not in self._own_base] if scanned else []
        if gone and self._self:
            # A child that was alive when the attempt began (an earlier task's, or a zombie it
            # left) has been reaped since: its lifetime figure may be in RUSAGE_CHILDREN now,
            # and it is not this attempt's (the attempt that reaped it was charged all of it).
            # Read after the scan that found it gone, the figure is the baseline from now on.
            self._gone_base.update(gone)
            try:
                self._maxrss0_children = max(self._maxrss0_children, self._rusage()[3])
            except Exception as exc:  # noqa: BLE001
                self._warn("CPU time", exc)
        elif maxrss_children is not None and maxrss_children > self._maxrss0_children:
            self._reaped_max = max(self._reaped_max, maxrss_children)
        # The worker's mark is known where it was reset, or at least read (Linux < 4.0 takes no
        # reset: the kernel copies the unreset mark into a child, and ``_whole_mark`` holds it).
        mark_known = self.peak_method == "hwm" or (_LINUX and self._self and self._hwm0 is not None)
        if self._reaped_max and (
                not mark_known or self._reaped_max > self._whole_mark + _CHILD_OVER_MARK_SLACK):
            # A reaped child's figure is its whole RSS: for children seen alive sharing the
            # worker's pages (forked), that share is the worker's, counted in its own peak.
            # A figure at or below the worker's own whole mark says nothing of the child: a
            # child that runs another program (subprocess: vfork + exec) starts with the
            # worker's mark copied in by the kernel, and a forked one with the worker's pages
            # resident (counted, `true` or `sleep` came out as the worker's whole size again).
            # Such a child is seen by the samples of the live tree only.
            peak = max(peak, self._peak_self + max(0, self._reaped_max - self._inherited_max))

        # cpu: own + reaped children (deltas) + live descendants (deltas from their start values)
        cpu = 0.0
        if cpu_self is not None:
            cpu += max(0.0, cpu_self - self._cpu0_self) + max(0.0, cpu_reaped - self._cpu0_reaped)
        io_delta = [max(0, now - then) for now, then in zip(io, self._io0)] if self._io_ok else [0, 0, 0, 0]
        if self._self and self._io_ok:
            # What meters read from /proc in the meantime (the live tree's scan of every
            # process, each sample) is not the task's.
            io_delta[2] = max(0, io_delta[2] - (meter_reads - self._meter_reads0))
        for key, c in live.items():
            base = self._base_children.get(key)
            cpu += c.cpu - (base.cpu if base else 0.0)
            for i in range(4):
                io_delta[i] += max(0, c.io[i] - (base.io[i] if base else 0))
        # A descendant that existed at start and has since been reaped moved its
        # lifetime counters into an ancestor's cumulative ones: take its start values off.
        for key, base in self._base_children.items():
            if key not in live:
                cpu -= base.cpu
                for i in range(4):
                    io_delta[i] -= base.io[i]
        cpu = max(cpu, self._cpu_max)
        self._cpu_max = cpu
        io_out = (max(0, io_delta[0]), max(0, io_delta[1]), max(0, io_delta[2]), max(0, io_delta[3]))
        return tree_rss, peak, cpu, io_out  # type: ignore[return-value]

    def sample(self) -> LiveSample:
        """A cheap snapshot so far; also feeds the sampled peak.  Thread-safe."""
        with self._lock:
            now = time.time()
            if self._stopped and self.usage is not None:
                u = self.usage
                return LiveSample(u.peak_rss_bytes, u.peak_rss_bytes, u.cpu_seconds, u.wall_seconds,
                                  u.read_bytes, u.write_bytes, now, u.start_rss_bytes)
            if not self._started:
                return LiveSample(0, 0, 0.0, 0.0, 0, 0, now)
            try:
                rss, peak, cpu, io = self._measure()
            except Exception as exc:  # noqa: BLE001 - belt and braces
                self._warn("sample", exc)
                rss, peak, cpu, io = self._start_rss, max(self._peak_self, self._peak_tree), self._cpu_max, _ZERO_IO
            f = self._still_foreign(rss)
            return LiveSample(max(0, int(rss) - f), max(0, int(peak) - f), float(cpu),
                              max(0.0, self._clock() - self._t0), int(io[0]), int(io[1]), now,
                              max(0, self._net_floor))

    def stop(self) -> Usage:
        """End the attempt and return its Usage (idempotent: a second call returns the same)."""
        with self._lock:
            if self._stopped and self.usage is not None:
                return self.usage
            if not self._started:
                self._warn("attempt", RuntimeError("stop() without start()"))
                self.usage = Usage(peak_rss_bytes=0)
                self._stopped = True
                return self.usage
            wall = max(0.0, self._clock() - self._t0)
            end = None
            try:
                end, peak, cpu, io = self._measure(final=True)
            except Exception as exc:  # noqa: BLE001
                self._warn("usage", exc)
                peak, cpu, io = max(self._peak_self, self._peak_tree), self._cpu_max, _ZERO_IO
            self.end_rss = int(end) if end else None
            if self._owner is not None and self.end_rss is not None:
                worker_ledger().left(self._owner, self._start_rss, self.end_rss)
            f = self._still_foreign(self.end_rss)  # the least seen (see the module docstring)
            self.usage = Usage(
                peak_rss_bytes=max(0, int(peak) - f),
                start_rss_bytes=max(0, self._net_floor),
                cpu_seconds=float(cpu),
                wall_seconds=float(wall),
                read_bytes=int(io[0]),
                write_bytes=int(io[1]),
                read_chars=int(io[2]),
                write_chars=int(io[3]),
            )
            self._stopped = True
            _HWM_METERS.discard(self)
            return self.usage


class DeferredMeter:
    """Times a call, and measures it in full only if it runs on to a live sample.

    The meter of a call that ``policy.thinning`` chose not to measure: ``start()``
    and ``stop()`` read one clock each.  When the :class:`LiveSampler` samples it
    (the call has run for up to one live interval), it starts an
    :class:`AttemptMeter` then and answers with that meter's figures from then on,
    so a thinned call that turns out long is watched and limited like any other.
    Its ``Usage`` then misses what happened before that first sample: the I/O of
    the first interval, and a peak that rose and fell within it (what the call
    still holds counts: it is in the resident set when the full meter starts, and
    its start is the private RSS read when the call began).
    ``wall_seconds`` is from the call's start, and ``cpu_seconds`` is the measured
    CPU time scaled up to it (the first interval taken at the rate measured
    after it), so that cores stay CPU seconds per wall second.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, owner: str | None = None) -> None:
        self._clock = clock
        self._owner = owner  # as AttemptMeter's
        self._lock = threading.Lock()
        self._t0 = 0.0
        self._t0_wall = 0.0
        self._start_rss: int | None = None  # private RSS of the process when the call began
        #: The call's start as the full meter counts it (with the descendants that were there),
        #: what the ledger is told; None until a full meter starts.
        self._ledger_start: int | None = None
        self._offset = 0.0  # wall time before the full meter started
        self._meter: AttemptMeter | None = None
        self._stopped = False
        #: Wall seconds of the call, once stopped.
        self.wall_seconds = 0.0

    @property
    def escalated(self) -> bool:
        """Whether a live sample started a full meter for this call."""
        return self._meter is not None

    def start(self) -> None:
        self._t0 = self._clock()
        self._t0_wall = time.time()  # children started since are the call's own
        # One cheap read (statm): a call that runs on is judged by what it added since here,
        # not since its first sample (a caller's ``memory`` is the task's own, over this).
        try:
            self._start_rss = _read_statm(os.getpid())[0] if _LINUX else None
        except (OSError, ValueError, IndexError):
            self._start_rss = None
        # The ledger is asked once a full meter starts (sample), with the start as that meter
        # counts it: this read is the process's alone, the ledger's figures hold its
        # descendants too (a child an earlier task left lowered its baseline, and what other
        # functions left came out that much too small).

    def sample(self) -> LiveSample:
        with self._lock:
            meter = self._meter
            if meter is None:
                if self._stopped:
                    return LiveSample(0, 0, 0.0, self.wall_seconds, 0, 0, time.time())
                meter = AttemptMeter(clock=self._clock)  # no owner: the ledger is this meter's
                meter.start()
                meter.rebase_start(self._start_rss, since=self._t0_wall)
                if self._owner is not None and self._start_rss is not None:
                    self._ledger_start = meter.start_rss_bytes
                    meter.rebase_start(None, worker_ledger().foreign_at_start(self._owner, self._ledger_start))
                self._offset = max(0.0, self._clock() - self._t0)
                self._meter = meter
        sample = meter.sample()
        wall = sample.wall_seconds + self._offset
        scale = wall / sample.wall_seconds if sample.wall_seconds > 0 else 1.0
        return dataclasses.replace(sample, wall_seconds=wall, cpu_seconds=sample.cpu_seconds * scale)

    def stop(self) -> Usage | None:
        """The call's Usage if a full meter ran (wall from the call's start), else None."""
        with self._lock:
            self._stopped = True
            meter = self._meter
        self.wall_seconds = max(0.0, self._clock() - self._t0)
        if meter is None:
            return None
        usage = meter.stop()
        if self._owner is not None and self._ledger_start is not None and meter.end_rss is not None:
            worker_ledger().left(self._owner, self._ledger_start, meter.end_rss)
        scale = self.wall_seconds / usage.wall_seconds if usage.wall_seconds > 0 else 1.0
        return dataclasses.replace(usage, wall_seconds=self.wall_seconds, cpu_seconds=usage.cpu_seconds * scale)


# --------------------------------------------------------------------------- #
# The per-process sampler thread
# --------------------------------------------------------------------------- #

OnSample = Callable[[Hashable, LiveSample], None]


class LiveSampler:
    """One daemon thread per process sampling the registered meters every ``interval_s``.

    The thread starts on the first ``register`` and, while nothing is
    registered, wakes only once per interval; ``register`` never wakes it, so a
    worker running only tiny tasks pays neither a thread start nor a thread
    hand-off per task; still, a meter is first sampled at most one interval
    after its ``register`` (the thread's passes are one interval apart, and the
    first pass after an idle spell is one interval after the earliest
    registration, not after the wake-up that found it).  Exceptions from ``sample()`` or a
    callback are logged and never stop the thread.  ``unregister`` waits for a
    callback of its key already running in another thread (up to
    ``UNREGISTER_WAIT_S``), so that no callback of an attempt runs after its end
    (the worker's would publish a live sample the task had deleted).
    """

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._interval = self._check_interval(interval_s)
        self._entries: dict[Hashable, tuple[AttemptMeter, OnSample | None, float]] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._live = False  # the thread runs and is not closed: register takes the lock-free path
        #: (key, thread id) of the callbacks running now (``unregister`` waits for its key's).
        self._calling: list[tuple[Hashable, int]] = []
        #: Completed sampling passes (for tests and diagnostics).
        self.ticks = 0

    #: How long ``unregister`` waits for a running callback of its key before it gives up.
    UNREGISTER_WAIT_S = 10.0

    @staticmethod
    def _check_interval(value: float) -> float:
        value = float(value)
        if not value > 0:
            raise ValueError(f"interval_s must be positive, got {value!r}")
        return value

    @property
    def interval_s(self) -> float:
        return self._interval

    @interval_s.setter
    def interval_s(self, value: float) -> None:
        self._interval = self._check_interval(value)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __len__(self) -> int:
        return len(self._entries)

    def register(self, key: Hashable, meter: AttemptMeter, on_sample: OnSample | None = None) -> None:
        """Sample ``meter`` every interval and pass each sample to ``on_sample(key, sample)``."""
        entry = (meter, on_sample, time.monotonic())  # when: its first sample is one interval on
        if self._live:
            # Once the thread runs, a registration is one dict store (atomic under the GIL;
            # the thread copies the dict under its lock): no lock and no thread check per task.
            self._entries[key] = entry
            if self._live:
                return
            # close() ran meanwhile and may have cleared it: register again, restarting the thread.
        with self._cond:
            self._entries[key] = entry
            if self._thread is None or not self._thread.is_alive():
                self._closed = False
                self._thread = threading.Thread(target=self._run, name="raysched-live-sampler", daemon=True)
                self._thread.start()
            self._live = not self._closed  # a closed thread still exiting: the next register looks again

    def unregister(self, key: Hashable) -> None:
        """Stop sampling ``key``; returns once no callback of it runs (but in this thread)."""
        self._entries.pop(key, None)  # one dict operation, atomic under the GIL
        if not self._calling:  # read without the lock: see sample_all
            return
        me = threading.get_ident()
        deadline = time.monotonic() + self.UNREGISTER_WAIT_S
        with self._cond:
            while any(k == key and t != me for k, t in self._calling):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.warning("raysched: a live-sample callback for %r still runs after %.0f s; "
                                   "unregistered without waiting for it", key, self.UNREGISTER_WAIT_S)
                    return
                self._cond.wait(remaining)

    def close(self) -> None:
        """Stop the thread (it exits at its next wake-up); ``register`` restarts it."""
        with self._cond:
            self._live = False
            self._closed = True
            self._entries.clear()
            self._cond.notify_all()

    def sample_all(self) -> None:
        """One sampling pass over the registered meters, in the calling thread."""
        with self._cond:
            entries = list(self._entries.items())
        for key, entry in entries:
            meter, on_sample, _ = entry
            try:
                sample = meter.sample()
            except Exception:  # noqa: BLE001
                logger.exception("raysched: live sample of %r failed", key)
                continue
            if on_sample is None:
                continue
            calling = (key, threading.get_ident())
            with self._cond:
                # Noted before the check: an unregister that comes after the check (its pop,
                # then its look at ``_calling``, need no lock) finds it and waits.
                self._calling.append(calling)
                if self._entries.get(key) is not entry:
                    self._calling.remove(calling)
                    continue  # unregistered meanwhile
            try:
                on_sample(key, sample)
            except Exception:  # noqa: BLE001
                logger.exception("raysched: live-sample callback for %r failed", key)
            finally:
                with self._cond:
                    self._calling.remove(calling)
                    self._cond.notify_all()
        self.ticks += 1

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            # Ended (closed, or by an exception no handler takes): the next register, whose
            # lock-free path trusts ``_live``, starts a thread again.
            with self._cond:
                if self._thread is threading.current_thread():
                    self._live = False

    def _loop(self) -> None:
        last_pass: float | None = None  # when the last sampling pass ended
        while True:
            with self._cond:
                # Idle: a timed wait, not an untimed one, so that register() never has to
                # wake the thread. Two wake-ups a second cost less than a GIL hand-off on
                # every one of a thousand tiny tasks.
                idle = last_pass is None
                while not self._entries and not self._closed:
                    idle = True
                    self._cond.wait(self._interval)
                if self._closed:
                    return
                # Sleep one interval; a register() notify must not shorten it,
                # or a stream of tiny tasks would make the thread spin.  One interval from
                # the last pass, or, after an idle spell, from the first registration
                # (not from the idle wake-up, which may come up to an interval after it:
                # a task that began just after one was first sampled nearly two in).
                registered = [entry[2] for entry in list(self._entries.values())] if idle else []
                since = min(registered) if registered else (last_pass or time.monotonic())
                deadline = since + self._interval
                while not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._closed:
                    return
            try:
                self.sample_all()
            except Exception:  # noqa: BLE001 - never let the thread die
                logger.exception("raysched: live sampler pass failed")
            last_pass = time.monotonic()


_SAMPLER: LiveSampler | None = None
_SAMPLER_PID: int | None = None
_SAMPLER_LOCK = threading.Lock()


def get_live_sampler(interval_s: float | None = None) -> LiveSampler:
    """The process's one :class:`LiveSampler`, created on first use.

    Passing an ``interval_s`` smaller than the current one lowers it for every
    user of the sampler (the most demanding caller wins).  A forked child gets
    its own sampler.
    """
    global _SAMPLER, _SAMPLER_PID
    sampler = _SAMPLER
    if sampler is not None and _SAMPLER_PID == os.getpid() and (interval_s is None or interval_s >= sampler.interval_s):
        return sampler  # every task after the first: no lock
    with _SAMPLER_LOCK:
        if _SAMPLER is None or _SAMPLER_PID != os.getpid():
            _SAMPLER = LiveSampler(DEFAULT_INTERVAL_S if interval_s is None else interval_s)
            _SAMPLER_PID = os.getpid()
        elif interval_s is not None and interval_s < _SAMPLER.interval_s:
            _SAMPLER.interval_s = interval_s
        return _SAMPLER


def _after_fork_in_child() -> None:
    global _SAMPLER, _SAMPLER_PID, _SAMPLER_LOCK, _HWM_LOCK
    _SAMPLER, _SAMPLER_PID = None, None
    _SAMPLER_LOCK = threading.Lock()
    _HWM_LOCK = threading.Lock()
    _HWM_METERS.clear()
    _HWM_CONFIRMED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def measure_attempt(
    on_sample: OnSample | None = None,
    interval_s: float | None = None,
    key: Hashable | None = None,
) -> Iterator[AttemptMeter]:
    """Measure the body of a ``with`` block; the Usage is in ``meter.usage`` afterwards.

    The meter is registered with the process's :class:`LiveSampler` for the
    duration (``key`` defaults to the meter itself).
    """
    meter = AttemptMeter()
    meter.start()
    sampler = None
    key = meter if key is None else key
    try:
        sampler = get_live_sampler(interval_s)
        sampler.register(key, meter, on_sample)
    except Exception:  # noqa: BLE001
        logger.exception("raysched: cannot start live sampling; measuring start/stop only")
    try:
        yield meter
    finally:
        if sampler is not None:
            sampler.unregister(key)
        meter.stop()
