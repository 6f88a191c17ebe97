"""AttemptMeter and LiveSampler in the current process: no Ray."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import a_child_holding
from raysched.runtime import measure
from raysched.runtime.measure import AttemptMeter, LiveSample, LiveSampler, get_live_sampler, measure_attempt
from raysched.types import MiB, Usage

LINUX = sys.platform.startswith("linux")


def allocate(n_mib: int) -> np.ndarray:
    """n MiB of touched pages (np.ones writes every page)."""
    return np.ones(n_mib * MiB // 8, dtype=np.float64)


def close_to(measured_bytes: int, expected_mib: float) -> bool:
    """Within 10% or 30 MiB of the expectation, whichever is looser."""
    return abs(measured_bytes / MiB - expected_mib) <= max(0.10 * expected_mib, 30)


def test_peak_of_an_allocation_in_this_process():
    meter = AttemptMeter()
    meter.start()
    block = allocate(300)
    block.sum()
    del block
    usage = meter.stop()
    assert isinstance(usage, Usage)
    assert usage.start_rss_bytes > 0
    assert close_to(usage.task_rss_bytes, 300), usage
    assert usage.wall_seconds > 0


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_a_child_alive_before_the_attempt_does_not_hide_the_attempts_own_allocation():
    """The start counts the descendants alive then (a pool or a forkserver an earlier task left;
    here, after tests/test_store.py, its forkserver), the peak read from the process's own
    kernel mark did not: 300 MiB allocated beside a 69 MiB child measured 231 MiB."""
    with a_child_holding(100):
        meter = AttemptMeter()
        meter.start()
        assert meter.start_rss_bytes >= 100 * MiB  # the child is part of the start
        block = allocate(300)
        block.sum()
        del block
        usage = meter.stop()
    assert close_to(usage.task_rss_bytes, 300), usage


@pytest.fixture(params=[0, 100], ids=["alone", "beside-a-child"])
def child_left_running(request):
    """Nothing, or a 100 MiB child an earlier task left running (a pool, a forkserver): the
    figures must not depend on it (a thinned call's start, read from the process alone, set
    the ledger's baseline below its other starts, which hold the child: what another function
    left came out 100 MiB too small)."""
    if not request.param:
        yield
        return
    with a_child_holding(request.param):
        yield


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_what_another_function_left_in_the_worker_is_not_the_next_attempts(monkeypatch, child_left_running):
    """A function keeping a 300 MiB cache in a module global made every later task of another
    function in that worker look 300 MiB bigger: the monitor stopped a task that only slept
    (a helper's audit). The function's own cache stays its own."""
    monkeypatch.setattr(measure, "_LEDGER", [])  # this process's ledger, fresh
    cacher = AttemptMeter(owner="mod.warm_cache")
    cacher.start()
    cache = allocate(300)
    cached = cacher.stop()
    assert close_to(cached.task_rss_bytes, 300)
    base = cached.start_rss_bytes

    other = AttemptMeter(owner="mod.tiny")
    other.start()
    small = allocate(20)
    live = other.sample()
    usage = other.stop()
    del small
    assert usage.start_rss_bytes < base + 30 * MiB
    assert close_to(usage.peak_rss_bytes - base, 20), usage
    assert live.rss_bytes < base + 60 * MiB and live.start_rss_bytes < base + 30 * MiB

    thinned = measure.DeferredMeter(owner="mod.tiny")  # a thinned call that runs on to a sample
    thinned.start()
    assert thinned.sample().rss_bytes < base + 60 * MiB
    assert thinned.stop().start_rss_bytes < base + 30 * MiB

    again = AttemptMeter(owner="mod.warm_cache")  # its own next call: the cache is its own
    again.start()
    assert again.stop().start_rss_bytes > base + 250 * MiB
    unowned = AttemptMeter()  # no owner (an actor's incarnation): gross, as before
    unowned.start()
    assert unowned.stop().start_rss_bytes > base + 250 * MiB
    del cache


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_another_functions_memory_freed_before_or_during_an_attempt_stops_counting(monkeypatch):
    """The ledger learnt what attempts left, not what was freed later: an attempt that freed
    another function's 300 MiB cache and then allocated 200 MiB was measured at 0, a leak in
    it passed its cap by the cache's size, and a function's own cache was taken off its own
    figures once an entry was stale (a helper's audit)."""
    monkeypatch.setattr(measure, "_LEDGER", [])
    cache = {}

    def attempt(owner, *steps):
        """Each step, then a live sample (as the sampler takes one every live interval)."""
        meter = AttemptMeter(owner=owner)
        meter.start()
        samples = []
        for step in steps:
            step()
            samples.append(meter.sample())
        return meter.stop(), samples

    cached, _ = attempt("mod.load", lambda: cache.update(a=allocate(300)))
    base = cached.start_rss_bytes
    # Another function's cache, freed by this attempt, which then allocates (a leak would grow
    # on from there: the hard cap judges the same samples).
    usage, samples = attempt("mod.clear_then_allocate", cache.clear, lambda: cache.update(b=allocate(200)))
    assert close_to(samples[-1].rss_bytes - base, 200), samples  # what the monitor and the hard cap judge
    # The row's peak errs high, never low: the kernel's mark does not say whether it was
    # reached before the cache was freed (then, the cache's 300 MiB) or after.
    assert 200 * MiB - 30 * MiB <= usage.peak_rss_bytes - base <= 300 * MiB + 30 * MiB, usage
    cache.clear()
    # A stale entry (300 MiB of mod.load's, long freed) takes nothing off a later attempt, nor
    # off a function's own cache.
    first, _ = attempt("mod.own", lambda: cache.update(own=allocate(250)))
    again, _ = attempt("mod.own", lambda: None)
    assert close_to(first.peak_rss_bytes - base, 250) and close_to(again.start_rss_bytes - base, 250), (first, again)
    cache.clear()


@pytest.mark.skipif(not LINUX, reason="the VmHWM reset is Linux-only")
def test_second_meter_is_not_fooled_by_an_earlier_bigger_peak():
    first = AttemptMeter()
    first.start()
    big = allocate(800)
    del big
    assert close_to(first.stop().task_rss_bytes, 800)

    second = AttemptMeter()
    second.start()
    small = allocate(100)
    del small
    usage = second.stop()
    assert second.peak_method == "hwm"
    # Without the reset the process's VmHWM would still say ~800 MiB above start.
    assert close_to(usage.task_rss_bytes, 100), usage


def test_sampled_fallback_when_hwm_cannot_be_reset(monkeypatch):
    def refuse(pid):
        raise PermissionError("clear_refs is read-only here")

    monkeypatch.setattr(measure, "_reset_hwm", refuse)
    meter = AttemptMeter()
    meter.start()
    assert meter.peak_method == "sampled"
    block = allocate(120)
    meter.sample()  # the fallback only sees what a sample sees
    del block
    usage = meter.stop()
    assert close_to(usage.task_rss_bytes, 120), usage


def touch_shared(n_mib: int):
    """n MiB of touched shared memory (an anonymous MAP_SHARED mapping is shmem, as Ray's
    object store is: a task reading an argument zero-copy maps its pages)."""
    import mmap

    area = mmap.mmap(-1, n_mib * MiB)
    view = np.frombuffer(area, dtype=np.uint8)
    view[::4096] = 1  # one write per page
    return area, view


@pytest.mark.skipif(not LINUX, reason="shared pages are told apart through /proc")
def test_shared_memory_a_task_maps_is_not_its_own():
    # What Ray's docs call the worker's heap (RSS minus SHR), what its memory monitor
    # counts (private pages): a 300 MiB argument read zero-copy out of the object store
    # adds nothing the node does not already hold.
    meter = AttemptMeter()
    meter.start()
    area, view = touch_shared(300)
    usage = meter.stop()
    del view
    area.close()
    assert usage.task_rss_bytes < 30 * MiB, usage

    # ...while the same task's own allocation beside it still counts.
    meter = AttemptMeter()
    meter.start()
    area, view = touch_shared(300)
    block = allocate(150)
    usage = meter.stop()
    del view, block
    area.close()
    assert close_to(usage.task_rss_bytes, 150), usage


@pytest.mark.skipif(not LINUX, reason="shared pages are told apart through /proc")
def test_a_private_peak_before_shared_pages_arrive_is_kept_by_a_sample():
    # The kernel's mark counts shared pages too, and what is taken off it is the shared
    # part at the reading: a private peak that was freed before shared pages arrived is
    # judged at the reading after it (a live sample, every 0.5 s in a task).
    meter = AttemptMeter()
    meter.start()
    block = allocate(200)
    del block
    meter.sample()
    area, view = touch_shared(300)
    usage = meter.stop()
    del view
    area.close()
    assert close_to(usage.task_rss_bytes, 200), usage


CHILD = """
import time, numpy as np
block = np.ones(200 * 1024 * 1024 // 8)
print("ready", flush=True)
time.sleep(1.5)
"""


def _measure_a_child(_=None):
    """Measures a child process from a fresh process (see the test below)."""
    sampler = get_live_sampler(0.25)
    samples: list[LiveSample] = []
    meter = AttemptMeter()
    meter.start()
    sampler.register("child-test", meter, lambda key, s: samples.append(s))
    try:
        proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        # while the child lives, a live sample sees its memory
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not any(s.rss_bytes - meter.start_rss_bytes >= 190 * MiB for s in samples):
            time.sleep(0.05)
        assert proc.wait(timeout=10) == 0
    finally:
        sampler.unregister("child-test")
    usage = meter.stop()
    return usage, samples


def test_child_process_counted_by_sampling():
    # In a fresh process: the pytest process has run Ray drivers and big arrays
    # before this test, and whatever its own threads allocate meanwhile would count
    # in the process's own peak (the measurement is right; the figure would not be
    # the child's alone).
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        usage, samples = pool.apply(_measure_a_child)
    assert samples, "the sampler thread produced no sample"
    assert max(s.rss_bytes for s in samples) - usage.start_rss_bytes >= 190 * MiB
    # 200 MiB of array plus an interpreter with numpy (~30-60 MiB)
    assert 190 * MiB <= usage.task_rss_bytes <= 300 * MiB, usage
    assert usage.cpu_seconds > 0.05  # the child's numpy import and page faults, via RUSAGE_CHILDREN


def _idle(seconds):
    time.sleep(seconds)


def _writer(seconds):
    block = allocate(100)  # its own pages: counted
    time.sleep(seconds)
    return float(block[0])


def _measure_forked_children(out):
    """A process holding 300 MiB forks two idle children and one that allocates 100 MiB,
    sampled while they live, joined before the attempt ends (see the test below)."""
    import multiprocessing

    held = allocate(300)
    meter = AttemptMeter()
    meter.start()
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=_idle, args=(1.5,)) for _ in range(2)] + [fork.Process(target=_writer, args=(1.5,))]
    for child in children:
        child.start()
    time.sleep(1.0)
    meter.sample()  # a live sample while they run
    for child in children:
        child.join()
    usage = meter.stop()
    del held
    out.put((usage.task_rss_bytes, usage.peak_rss_bytes, usage.start_rss_bytes))


@pytest.mark.skipif(not LINUX or not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux >= 4.14")
def test_forked_children_count_what_they_hold_alone_not_the_workers_pages_again():
    """Each forked child counted the 300 MiB it inherited and never wrote: three children
    made a 100 MiB task a ~1 GiB one (and the reaped children's figure added 300 more)."""
    import multiprocessing

    # In a fresh, non-daemonic process (a pool's workers may not have children).
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    proc = spawn.Process(target=_measure_forked_children, args=(out,))
    proc.start()
    task, peak, start = out.get(timeout=60)
    proc.join(timeout=30)
    # The writer's 100 MiB, the children's own interpreter pages; not 3 (or 4) x 300 MiB.
    assert 90 * MiB <= task <= 250 * MiB, (task / MiB, peak / MiB, start / MiB)


BIG_CHILD = "import numpy as np; block = np.ones(600 * 1024 * 1024 // 8); block.sum()"


def _refuse_reset(pid):
    raise OSError(22, "clear_refs takes no 5 on this kernel (< 4.0)")


def _measure_programs_run_from_a_big_worker(out, resettable=True):
    """A process holding 300 MiB runs short programs (see the test below)."""
    if not resettable:
        measure._reset_hwm = _refuse_reset  # in this fresh process only
    held = allocate(300)
    figures = []
    for argv in (["true"], ["sleep", "0.2"], [sys.executable, "-c", BIG_CHILD]):
        meter = AttemptMeter()
        meter.start()
        subprocess.run(argv, check=True)  # vfork + exec, reaped before any live sample
        usage = meter.stop()
        figures.append(usage.task_rss_bytes)
    del held
    out.put(figures)


@pytest.mark.skipif(not LINUX, reason="the kernel's rusage of reaped children (Linux)")
@pytest.mark.parametrize("resettable", [True, False], ids=["hwm", "sampled"])
def test_a_program_a_task_runs_is_not_charged_the_workers_whole_size(resettable):
    """``subprocess.run(["true"])`` in a worker holding 300 MiB measured ~350 MiB: the kernel
    copies the worker's high-water mark into a child that execs (``ru_maxrss``), and that
    was added to the worker's own peak (a helper's audit: `true` after a 1 GiB task came
    out at 2.9 GiB). A program bigger than the worker still counts, from its rusage
    alone (one smaller than the worker that ends between two samples is not seen).
    So where the mark cannot be reset (Linux < 4.0: the sampled fallback) but is read: the
    kernel copies it into the child all the same, and `true` was charged the whole worker."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")  # a fresh process: RUSAGE_CHILDREN starts at 0
    out = spawn.Queue()
    proc = spawn.Process(target=_measure_programs_run_from_a_big_worker, args=(out, resettable))
    proc.start()
    true_, sleep_, big = out.get(timeout=120)
    proc.join(timeout=30)
    assert true_ < 30 * MiB and sleep_ < 30 * MiB, (true_ / MiB, sleep_ / MiB)
    assert big >= 580 * MiB, big / MiB  # 600 MiB of its own (seen through its rusage alone)


def _measure_an_unmapped_file(path, out):
    """A mapping an earlier call left open is closed by the next (see the test below)."""
    import mmap

    with open(path, "r+b") as f:
        area = mmap.mmap(f.fileno(), 0)
    view = np.frombuffer(area, dtype=np.uint8)
    view[:: 4096].sum()  # resident: shared file pages of this process
    del view

    meter = AttemptMeter()  # an attempt that only closes it
    meter.start()
    area.close()
    closed = meter.stop().task_rss_bytes

    with open(path, "r+b") as f:
        area = mmap.mmap(f.fileno(), 0)
    view = np.frombuffer(area, dtype=np.uint8)
    view[:: 4096].sum()
    del view
    meter = AttemptMeter()  # closes it, then (after a live sample) allocates 150 MiB and frees it
    meter.start()
    area.close()
    meter.sample()
    block = allocate(150)
    del block
    after = meter.stop().task_rss_bytes
    out.put((closed, after))


@pytest.mark.skipif(not LINUX, reason="shared pages are told apart through /proc")
def test_shared_pages_that_leave_during_an_attempt_are_not_its_own(tmp_path):
    """The mark counts shared pages too, and the shared pages *at the reading* were taken off
    it: closing a 300 MiB file mapping an earlier call left measured 300 MiB (a helper's
    audit). The pages gone since the last reading are taken off, and the mark restarts, so
    that a private peak after it is still seen by the mark."""
    import multiprocessing

    path = tmp_path / "mapped.bin"
    with open(path, "wb") as f:
        f.truncate(300 * MiB)
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    proc = spawn.Process(target=_measure_an_unmapped_file, args=(str(path), out))
    proc.start()
    closed, after = out.get(timeout=120)
    proc.join(timeout=30)
    assert closed < 30 * MiB, closed / MiB
    assert close_to(after, 150), after / MiB


@pytest.mark.skipif(not LINUX, reason="/proc/<pid>/io is Linux-only")
def test_the_meters_own_reads_of_proc_are_not_the_tasks():
    """While a child lives, each sample reads every process's /proc/<pid>/stat: that was
    counted in the task's read_chars (0.5 MiB for a task that only ran `sleep 10`)."""
    meter = AttemptMeter()
    meter.start()
    child = subprocess.Popen(["sleep", "1"])
    for _ in range(20):
        meter.sample()
        time.sleep(0.02)
    child.wait()
    usage = meter.stop()
    assert usage.read_chars < 8192, usage


def test_cpu_seconds_of_a_busy_loop():
    meter = AttemptMeter()
    t0, c0 = time.perf_counter(), time.process_time()
    meter.start()
    x = 0
    while time.perf_counter() - t0 < 0.5:
        x += 1
    usage = meter.stop()
    independent = time.process_time() - c0
    assert usage.cpu_seconds == pytest.approx(independent, rel=0.2, abs=0.03)
    loaded = independent < 0.45  # the loop had under 90% of a core (beside another test worker: 0.41)
    assert usage.cpu_seconds == pytest.approx(0.5, rel=0.2) or loaded
    assert 0.7 <= usage.cpu_cores <= 1.2 or loaded, usage


def test_cpu_seconds_of_a_child_that_exited():
    meter = AttemptMeter()
    meter.start()
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
    subprocess.run([sys.executable, "-c", code], check=True)
    usage = meter.stop()
    assert usage.cpu_seconds >= 0.4 * 0.8, usage


@pytest.mark.skipif(not LINUX, reason="/proc/<pid>/io is Linux-only")
def test_io_counters_of_a_written_file(tmp_path):
    meter = AttemptMeter()
    meter.start()
    path = tmp_path / "blob.bin"
    chunk = os.urandom(1 * MiB)
    with open(path, "wb") as f:
        for _ in range(20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        while f.read(4 * MiB):
            pass
    usage = meter.stop()
    assert usage.write_chars >= 20 * MiB, usage
    assert usage.read_chars >= 20 * MiB, usage
    assert usage.write_bytes >= 0 and usage.read_bytes >= 0


def test_samples_are_monotone():
    # What a sample costs is measured in benchmarks/ (per-task overhead), not timed here.
    meter = AttemptMeter()
    meter.start()
    samples = [meter.sample() for _ in range(50)]
    meter.stop()
    cpus = [s.cpu_seconds for s in samples]
    walls = [s.wall_seconds for s in samples]
    assert cpus == sorted(cpus) and walls == sorted(walls)
    assert all(s.peak_rss_bytes >= s.rss_bytes > 0 for s in samples)


def test_sample_concurrent_with_stop_and_after():
    meter = AttemptMeter()
    meter.start()
    errors: list[BaseException] = []
    done = threading.Event()

    def hammer():
        try:
            while not done.is_set():
                meter.sample()
        except BaseException as exc:  # pragma: no cover - the failure being tested
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    block = allocate(50)
    del block
    usage = meter.stop()
    done.set()
    for t in threads:
        t.join()
    assert not errors
    assert meter.stop() is usage  # idempotent
    after = meter.sample()
    assert after.peak_rss_bytes == usage.peak_rss_bytes and after.cpu_seconds == usage.cpu_seconds


def test_measurement_errors_degrade_to_partial_data(monkeypatch, caplog):
    def broken(pid):
        raise OSError("no /proc/<pid>/io in this sandbox")

    monkeypatch.setattr(measure, "_read_io", broken)
    with caplog.at_level(logging.WARNING, logger="raysched.runtime.measure"):
        meter = AttemptMeter()
        meter.start()
        meter.sample()
        usage = meter.stop()
    assert usage.read_chars == 0 and usage.write_chars == 0
    assert usage.peak_rss_bytes > 0 and usage.wall_seconds > 0
    assert sum("I/O counters" in r.getMessage() for r in caplog.records) == 1  # warned once


def test_stop_without_start_does_not_raise():
    usage = AttemptMeter().stop()
    assert usage.peak_rss_bytes == 0


@pytest.mark.skipif(not LINUX, reason="the VmHWM reset is Linux-only")
def test_a_later_meter_reset_does_not_hide_an_earlier_meters_peak():
    outer = AttemptMeter()
    outer.start()
    block = allocate(200)
    del block
    inner = AttemptMeter()  # e.g. a second thread of a threaded actor
    inner.start()  # resets VmHWM for the whole process
    inner.stop()
    assert close_to(outer.stop().task_rss_bytes, 200)


def test_measure_attempt_context_manager_publishes_samples():
    seen: list[tuple[object, LiveSample]] = []
    with measure_attempt(on_sample=lambda k, s: seen.append((k, s)), interval_s=0.25, key="ctx") as meter:
        time.sleep(0.7)
    assert meter.usage is not None and meter.usage.wall_seconds >= 0.7
    assert seen and all(k == "ctx" for k, _ in seen)
    n = len(seen)
    time.sleep(0.4)
    assert len(seen) == n  # unregistered: no more callbacks


def test_sampler_survives_failing_callbacks_and_idles():
    sampler = LiveSampler(interval_s=0.05)
    assert not sampler.running  # nothing registered: no thread at all
    good: list[LiveSample] = []
    meter = AttemptMeter()
    meter.start()

    def bad(key, sample):
        raise RuntimeError("publisher down")

    sampler.register("bad", meter, bad)
    sampler.register("good", meter, lambda k, s: good.append(s))
    time.sleep(0.3)
    assert sampler.running and len(good) >= 2
    sampler.unregister("bad")
    sampler.unregister("good")
    time.sleep(0.1)
    ticks = sampler.ticks
    time.sleep(0.3)
    assert sampler.ticks == ticks  # idle while empty
    assert sampler.running  # the same thread is reused on the next register
    thread = sampler._thread
    sampler.register("again", meter)
    time.sleep(0.15)
    assert sampler._thread is thread and sampler.ticks > ticks
    sampler.close()
    meter.stop()


def test_get_live_sampler_is_a_process_singleton():
    a = get_live_sampler()
    b = get_live_sampler(0.25)
    assert a is b
    assert a.interval_s <= 0.5
    with pytest.raises(ValueError):
        LiveSampler(interval_s=0)


def test_an_attempt_registered_with_an_idle_sampler_is_sampled_within_one_interval():
    """The idle sampler wakes once per interval and then slept a whole interval more from
    that wake-up: a task that began just after a wake-up (every task of a worker whose
    previous one ended before the sampler's last look) got its first sample nearly two
    intervals in, so a call of 1.5 intervals was never watched by the monitor, nor measured
    when thinned, against "every attempt that runs longer than one live interval is reported"."""
    interval = 0.5
    sampler = LiveSampler(interval_s=interval)
    meter = AttemptMeter()
    meter.start()
    passes: list[float] = []

    def first(key, sample):  # unregisters itself within the pass: the thread then idles from its end
        passes.append(time.monotonic())
        sampler.unregister(key)

    try:
        sampler.register("first", meter, first)
        deadline = time.monotonic() + 5
        while not passes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert passes
        # The idle thread wakes at about passes[0] + k x interval: register just after its first wake-up.
        time.sleep(max(0.0, passes[0] + interval + 0.1 - time.monotonic()))
        seen: list[float] = []
        registered = time.monotonic()
        sampler.register("second", meter, lambda k, s: seen.append(time.monotonic()))
        while not seen and time.monotonic() < registered + 5:
            time.sleep(0.01)
        assert seen
        # One interval after registering (the old thread: nearly two, 0.9 s here).
        assert seen[0] - registered < interval + 0.2, seen[0] - registered
    finally:
        sampler.close()
        meter.stop()


def test_unregister_waits_for_a_callback_of_its_key_already_running():
    """A callback that had passed its "still registered?" check ran on after ``unregister``
    returned: the worker's, publishing the attempt's live sample to Ray's KV and reporting
    it to the monitor, then did so after the task had deleted that sample and told the
    monitor it ended (a stale sample left in the KV for good, read as a still running
    attempt by ``_ended_within``; a report of an ended attempt)."""
    sampler = LiveSampler(interval_s=0.05)
    meter = AttemptMeter()
    meter.start()
    entered, events = threading.Event(), []

    def slow(key, sample):
        entered.set()
        time.sleep(0.3)
        events.append("callback done")

    try:
        sampler.register("slow", meter, slow)
        assert entered.wait(5)
        sampler.unregister("slow")
        events.append("unregistered")
        time.sleep(0.4)
        assert events == ["callback done", "unregistered"], events
        # A callback that unregisters its own key (an actor stopping itself) does not wait for itself.
        done = threading.Event()

        def own(key, sample):
            sampler.unregister(key)
            done.set()

        sampler.register("own", meter, own)
        assert done.wait(5)
    finally:
        sampler.close()
        meter.stop()


LEFTOVER_CHILD = "import sys, time, numpy as np; block = np.ones(300 * 1024 * 1024 // 8); time.sleep(float(sys.argv[1]))"


def _measure_a_leftover_child_reaped_by_the_next_attempt(lives_on, out):
    """An attempt starts a 300 MiB program and returns without waiting for it; the next
    attempt of the worker reaps it (see the test below)."""
    first = AttemptMeter()
    first.start()
    proc = subprocess.Popen([sys.executable, "-c", LEFTOVER_CHILD, "1.5" if lives_on else "0"])
    if not lives_on:
        while measure._stat_linux(proc.pid)[3]:  # until it exited (a zombie: nothing resident)
            time.sleep(0.05)
    first.stop()
    second = AttemptMeter()
    second.start()
    if lives_on == "scan fails":  # one sample cannot list the children: not taken for the child's end
        scan = second._children
        second._children = lambda: (_ for _ in ()).throw(OSError("no /proc"))
        second.sample()
        second._children = scan
    proc.wait()  # as subprocess.run or multiprocessing do with the finished children they find
    second.sample()
    out.put(second.stop().task_rss_bytes)


@pytest.mark.skipif(not LINUX, reason="the kernel's rusage of reaped children (Linux)")
@pytest.mark.parametrize("lives_on", [True, False, "scan fails"], ids=["alive", "zombie", "scan_fails"])
def test_a_child_an_earlier_attempt_left_is_not_charged_to_the_attempt_that_reaps_it(lives_on):
    """``RUSAGE_CHILDREN`` grows when any child is reaped: a 300 MiB program an earlier task
    started and left (alive, or exited and not yet waited for) made the attempt that reaped
    it -- a ``subprocess.run`` of its own reaps the worker's finished children -- measure
    300 MiB, though it was a child that existed when that attempt began."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")  # a fresh process: RUSAGE_CHILDREN starts at 0
    out = spawn.Queue()
    proc = spawn.Process(target=_measure_a_leftover_child_reaped_by_the_next_attempt, args=(lives_on, out))
    proc.start()
    task = out.get(timeout=120)
    proc.join(timeout=30)
    assert task < 30 * MiB, task / MiB


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death it provokes
def test_a_sampler_thread_that_died_is_started_again_by_the_next_register():
    """Once the thread ran, ``register`` took a lock-free path that never looked at it again:
    a thread ended by an exception that is not an ``Exception`` (SystemExit from a callback)
    left every later attempt of the process unsampled, unseen by the monitor."""
    sampler = LiveSampler(interval_s=0.05)
    meter = AttemptMeter()
    meter.start()

    def fatal(key, sample):
        raise SystemExit("gone")

    try:
        sampler.register("fatal", meter, fatal)
        deadline = time.monotonic() + 5
        while sampler.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not sampler.running
        sampler.unregister("fatal")
        seen: list[LiveSample] = []
        sampler.register("next", meter, lambda k, s: seen.append(s))
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen, "no sample after the thread died"
    finally:
        sampler.close()
        meter.stop()
