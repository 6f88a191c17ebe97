"""Thinning of tiny calls: the pure decision, the deferred meter and the row sink's counts (no Ray)."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from conftest import wait_for

from raysched.config import RayschedConfig
from raysched.policy.thinning import ShortCallThinning, thinning_from_config
from raysched.runtime.measure import DeferredMeter, LiveSampler
from raysched.runtime.rows import RowSink, _build_rows
from raysched.runtime.spec import AttemptSpec
from raysched.types import Allocation, Estimate, Features, MiB, Outcome, Prediction, Usage


def drive(thinning: ShortCallThinning, calls: list[tuple[bool, float, int]]) -> str:
    """Run (ok, wall_s, rss growth) calls through the decision; 'M' for a measured call, '.' for a counted one."""
    out = []
    for ok, wall, growth in calls:
        measured = thinning.measure_next()
        out.append("M" if measured else ".")
        thinning.observe(measured, ok, wall, growth if measured else None)
    return "".join(out)


SHORT = (True, 0.001, 0)


def test_calls_are_measured_until_a_streak_of_short_ones_then_one_in_k():
    thinning = ShortCallThinning(wall_s=0.005, rss_bytes=MiB, streak=3, every=4)
    assert drive(thinning, [SHORT] * 15) == "MMM...M...M...M"


def test_anything_unusual_ends_the_thinning_until_a_new_streak():
    for unusual in [(False, 0.001, 0), (True, 0.5, 0)]:  # an error, a long call
        for before in (3, 4):  # the unusual call counted, or measured
            thinning = ShortCallThinning(wall_s=0.005, rss_bytes=MiB, streak=2, every=3)
            assert drive(thinning, [SHORT] * before + [unusual] + [SHORT] * 5) == "MM..M"[: before + 1] + "MM..M"
    # A measured call that grew the process past the bound ends it too; a counted one cannot tell.
    thinning = ShortCallThinning(wall_s=0.005, rss_bytes=MiB, streak=2, every=3)
    assert drive(thinning, [SHORT] * 4 + [(True, 0.001, 2 * MiB)] + [SHORT] * 3) == "MM..M" + "MM."


def test_a_fast_stream_is_measured_at_most_once_per_gap_a_slow_one_one_in_k():
    def timed(thinning: ShortCallThinning, starts: list[float]) -> str:
        out = []
        for at in starts:
            measured = thinning.measure_next(at)
            out.append("M" if measured else ".")
            thinning.observe(measured, True, 0.001, 0 if measured else None, at)
        return "".join(out)

    # 1 ms apart: after the streak, one call each 0.1 s (100 calls), not one in 4.
    fast = timed(ShortCallThinning(wall_s=0.005, rss_bytes=MiB, streak=3, every=4, gap_s=0.0995),
                 [i * 0.001 for i in range(303)])
    assert fast.startswith("MMM.") and fast.count("M") == 3 + 3
    assert [i for i, c in enumerate(fast) if c == "M"][3:] == [102, 202, 302]
    # 1 s apart: the gap never holds a call back; one in 4 as without it.
    assert timed(ShortCallThinning(wall_s=0.005, rss_bytes=MiB, streak=3, every=4, gap_s=0.1),
                 [float(i) for i in range(15)]) == "MMM...M...M...M"
    # Driven without a clock, the gap does not apply (it never holds measuring back for good).
    assert drive(thinning_from_config(RayschedConfig(short_call_streak=3, short_call_measure_every=4)),
                 [SHORT] * 11) == "MMM...M...M"
    # Its default comes from the config.
    assert thinning_from_config(RayschedConfig()).gap_s == RayschedConfig().short_call_measure_gap_s == 0.1
    with pytest.raises(ValueError, match="short_call_measure_gap_s"):
        RayschedConfig(short_call_measure_gap_s=-1)


def test_every_one_measures_every_call_and_the_config_builds_it():
    assert drive(ShortCallThinning(wall_s=1.0, rss_bytes=MiB, streak=1, every=1), [SHORT] * 20) == "M" * 20
    thinning = thinning_from_config(RayschedConfig(short_call_streak=7, short_call_measure_every=3))
    assert (thinning.streak, thinning.every, thinning.wall_s) == (7, 3, RayschedConfig().short_call_wall_s)
    with pytest.raises(ValueError, match="short_call_measure_every"):
        RayschedConfig(short_call_measure_every=0)


def test_a_deferred_meter_only_times_a_call_that_is_never_sampled():
    meter = DeferredMeter()
    meter.start()
    time.sleep(0.02)
    assert meter.stop() is None
    assert not meter.escalated and 0.02 <= meter.wall_seconds < 1.0


def test_a_deferred_meter_measures_in_full_from_its_first_live_sample():
    """A thinned call that runs on is watched like any other: the sampler's first look
    starts a full meter, and what the call holds by then is in its peak, as its own."""
    sampler = LiveSampler(interval_s=0.05)
    seen = []
    meter = DeferredMeter()
    meter.start()
    sampler.register("call", meter, lambda key, sample: seen.append(sample))
    try:
        held = np.ones(64 * MiB // 8)  # allocated before the first sample
        assert wait_for(lambda: seen, timeout=10)  # waiting (the GIL free): the sampler's first look
        assert meter.escalated
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:  # busy: CPU time to measure
            pass
    finally:
        sampler.unregister("call")
        sampler.close()
    usage = meter.stop()
    assert isinstance(usage, Usage)
    assert usage.wall_seconds >= 0.4 and usage.wall_seconds == meter.wall_seconds  # from the call's start
    assert usage.peak_rss_bytes >= usage.start_rss_bytes > 0
    # What it holds counts as the call's own: its start is read when the call began, not at
    # the first sample (the monitor judges a caller's memory= over that start); read at the
    # first sample, it would be ~0. Not >= 60 MiB: under pytest-xdist this process is ~550 MB,
    # and what other tests' threads free meanwhile came off it (54 MiB seen once in CI).
    assert usage.task_rss_bytes >= 40 * MiB, usage
    assert seen[-1].peak_rss_bytes - seen[-1].start_rss_bytes >= 40 * MiB, seen[-1]
    assert 0.3 <= usage.cpu_cores <= 1.5  # CPU scaled to the whole call: about one busy core (less on a loaded machine)
    assert seen[-1].wall_seconds >= seen[0].wall_seconds > 0
    del held


def spec(name: str, code_hash: str) -> AttemptSpec:
    estimate = Estimate(target=1.0, lower=1.0, upper=1.0, coverage=0.9, n_history=0)
    prediction = Prediction(memory=estimate, cpu=estimate, wall=estimate, source="fallback")
    return AttemptSpec(function=name, code_hash=code_hash, call_id="c0", attempt=1,
                       features=Features(input_size=0), prediction=prediction,
                       allocation=Allocation(num_cpus=1.0, memory_bytes=64 * MiB),
                       config=RayschedConfig())


def test_counted_calls_are_added_to_a_measured_row_of_their_function_or_get_a_row_of_their_own():
    f, g = spec("f", "hash-f"), spec("g", "hash-f")  # one code under two names: two counts
    sink = RowSink(60.0, lambda rows: None)
    usage = Usage(peak_rss_bytes=100 * MiB, start_rss_bytes=90 * MiB, cpu_seconds=0.001, wall_seconds=0.001)
    for _ in range(3):
        sink.add_unmeasured(f, 1.0, 2.0)
    sink.add_attempt(f, Outcome.OK, usage, 2.0, 3.0)  # measured after the counted ones
    sink.add_attempt(f, Outcome.ERROR, None, 3.0, 4.0, "boom")  # an error is never a count
    for _ in range(5):
        sink.add_unmeasured(g, 5.0, 6.0)  # no measured row of g in this batch
    rows = _build_rows(sink._rows)
    by = {(r["function"], r["outcome"]): r for r in rows}
    assert len(rows) == 3
    assert by["f", "ok"]["calls"] == 4 and by["f", "ok"]["peak_rss_bytes"] == 100 * MiB
    assert by["f", "error"]["calls"] == 1
    counted = by["g", "ok"]
    assert counted["calls"] == 5 and counted["call_id"] is None
    assert counted["peak_rss_bytes"] is None and counted["memory_sample_bytes"] is None
    assert sum(r["calls"] for r in rows) == 3 + 1 + 1 + 5  # every call accounted for


def test_a_flush_starts_a_new_count():
    sent = []
    sink = RowSink(60.0, lambda rows: sent.append(rows))
    f = spec("f", "hash-f")
    sink.add_unmeasured(f, 1.0, 2.0)
    sink.flush()
    sink.add_unmeasured(f, 3.0, 4.0)
    sink.add_unmeasured(f, 3.0, 5.0)
    sink.flush()
    assert [[r["calls"] for r in batch] for batch in sent] == [[1], [2]]
    assert sent[1][0]["timestamp"].timestamp() == 5.0 and sent[1][0]["started_at"].timestamp() == 3.0


def test_no_one_waits_for_rows_of_calls_that_were_counted():
    """``raysched.profiles`` and a training's ``refresh`` wait a little for rows of calls this
    driver submitted; a counted call has no row of its own, and the counts in ``calls``
    stand for it."""
    import pandas as pd

    from raysched.store.profiles import calls_without_rows

    frame = pd.DataFrame({"call_id": ["a", None, "c"], "calls": pd.array([3, 2, None], dtype="Int64")})
    # b, d, e, f have no row of their own; rows a and the count row stand for 2 + 2 more calls
    assert calls_without_rows(frame, ["a", "b", "c", "d", "e", "f"]) == []
    assert len(calls_without_rows(frame, ["a", "b", "c", "d", "e", "f", "g"])) == 1  # one still on its way
    assert calls_without_rows(frame.drop(columns="calls"), ["a", "b"]) == ["b"]  # rows of before schema 2
    # Rows imported from a trace (no call id, no count) stand for no call of this cluster:
    # 40 of them made a flush() or profiles() right after a call return before its row.
    imported = pd.DataFrame({"call_id": [None] * 40, "calls": pd.array([None] * 40, dtype="Int64"),
                             "source": ["import:nextflow"] * 40})
    assert calls_without_rows(imported, ["c1", "c2", "c3"]) == ["c1", "c2", "c3"]
    both = pd.concat([imported, frame.assign(source="ray")], ignore_index=True)
    assert calls_without_rows(both, ["a", "b", "c", "d", "e", "f"]) == []
    assert len(calls_without_rows(both, ["a", "b", "c", "d", "e", "f", "g"])) == 1


def test_the_profilers_training_budget_counts_the_calls_a_row_stands_for():
    """Retraining is paid for by the task time that arrived (train_cost_fraction): a measured
    row of a thinned function stands for the calls counted with it."""
    from raysched.runtime.profiler import _task_seconds

    row = {"wall_seconds": 0.002, "allocated_num_cpus": 0.5}
    assert _task_seconds(row) == pytest.approx(0.001)
    assert _task_seconds({**row, "calls": 10}) == pytest.approx(0.01)
    assert _task_seconds({"calls": 10, "allocated_num_cpus": 1.0}) == 0.0  # a count row: no wall


LATE_PEAK_CHILD = "import time, numpy as np; time.sleep(0.5); block = np.ones(300 * 1024 * 1024 // 8)"


def _a_thinned_call_whose_child_peaks_after_the_first_sample(out):
    """A thinned call starts a program, is sampled (its full meter starts, the child alive
    and small), and reaps the program after its 300 MiB peak (see the test below)."""
    import subprocess
    import sys

    meter = DeferredMeter()
    meter.start()
    proc = subprocess.Popen([sys.executable, "-c", LATE_PEAK_CHILD])
    time.sleep(0.1)
    meter.sample()  # the first live sample: the full meter starts with the child alive
    assert meter.escalated
    proc.wait()
    out.put(meter.stop().task_rss_bytes)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's rusage of reaped children (Linux)")
def test_a_child_a_thinned_call_started_before_its_first_sample_is_its_own():
    """A child alive when a full meter starts is an earlier task's, and its reaped figure not
    the attempt's; but the full meter of a thinned call starts at its first sample, and
    children the call started before that are the call's own: its peak counts when reaped."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")  # a fresh process: RUSAGE_CHILDREN starts at 0
    out = spawn.Queue()
    proc = spawn.Process(target=_a_thinned_call_whose_child_peaks_after_the_first_sample, args=(out,))
    proc.start()
    task = out.get(timeout=120)
    proc.join(timeout=30)
    assert task >= 280 * MiB, task / MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_child_alive_before_a_thinned_call_is_not_the_calls_own_memory():
    """The call's start is read before its full meter starts, from the process alone; the
    full meter's peak holds the descendants alive by then. A child an earlier task left (here
    100 MiB) was counted as the call's: 200 MiB allocated measured 300."""
    from conftest import a_child_holding

    with a_child_holding(100):
        meter = DeferredMeter()
        meter.start()
        block = np.ones(200 * MiB // 8)
        meter.sample()  # the first live sample: the full meter starts, the child alive
        assert meter.escalated
        del block
        usage = meter.stop()
    assert abs(usage.task_rss_bytes / MiB - 200) <= 30, usage
