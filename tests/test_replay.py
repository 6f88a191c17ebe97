"""Trace replay: readers, the Sizey-protocol accounting, the baselines, on hand-made traces.

Every expected number here is worked out by hand in the comments.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from raysched.errors import InvalidInput
from raysched.replay.baselines import (
    VPA,
    DecayingHistogram,
    Oracle,
    Presets,
    Tovar,
    WittLR,
    WittPercentile,
    tovar_min_waste,
)
from raysched.replay.harness import BYTE_MS_TO_GBH, ReplayError, account, replay_trace, split_trace
from raysched.replay.methods import Job, Method, TaskHistory, TaskSizer
from raysched.replay.readers import (
    TraceFormatError,
    parse_duration_ms,
    parse_memory,
    read_trace,
    sniff_format,
)

FIXTURES = Path(__file__).parent / "fixtures" / "replay"
NEXTFLOW = FIXTURES / "nextflow_small.csv"
LOTARU = FIXTURES / "lotaru_small.csv"
GB = 1e9
HOUR_MS = 3_600_000.0


# --------------------------------------------------------------------------- accounting


def test_account_success_first_try():
    # 3 GB for a 2 GB peak over 2 h: (3 - 2) x 2 = 2 GBh over, nothing failed.
    t = account([3 * GB], 2 * GB, 2 * HOUR_MS)
    assert t.failures == 0 and t.tasks == 1
    assert t.wastage_gbh == pytest.approx(2.0)
    assert t.used_gbh == pytest.approx(4.0)
    assert t.maq == pytest.approx(4 / 6)


def test_account_failures_count_the_whole_failed_allocation():
    # 1 GB and 2 GB fail for a 3 GB peak over 1 h, 4 GB fits:
    # failed 1 + 2 = 3 GBh, over (4 - 3) = 1 GBh: 4 GBh and two failures.
    t = account([1 * GB, 2 * GB, 4 * GB], 3 * GB, HOUR_MS)
    assert t.failures == 2
    assert t.under * BYTE_MS_TO_GBH == pytest.approx(3.0)
    assert t.over * BYTE_MS_TO_GBH == pytest.approx(1.0)
    assert t.wastage_gbh == pytest.approx(4.0)
    assert t.maq == pytest.approx(3 / 7)


def test_account_exact_fit_wastes_nothing():
    t = account([5 * GB], 5 * GB, HOUR_MS)
    assert t.wastage_gbh == 0 and t.maq == 1.0


def test_account_rejects_inconsistent_sequences():
    with pytest.raises(ValueError):
        account([1 * GB], 2 * GB, HOUR_MS)  # the last allocation must fit
    with pytest.raises(ValueError):
        account([3 * GB, 4 * GB], 2 * GB, HOUR_MS)  # a fitting attempt is the last one


# --------------------------------------------------------------------------- the lotaru fixture, by hand


def test_lotaru_fixture_replay_by_hand():
    trace = read_trace(LOTARU, "lotaru")
    result = replay_trace(trace, [Presets(), WittPercentile(), Tovar(), Oracle()], seed=3)
    # V has history rows only: skipped with its count.
    assert result.skipped_types == {"V": 2}
    assert result.task_types == 2
    r = result.methods
    # Task T: history peaks 1, 2, 3, 4 GB (1 h each); one online job: 5 GB for 2 h, preset 4 GB.
    #   presets: 4 GB fails (4 x 2 = 8 GBh), 4 x 2 = 8 GB fits ((8 - 5) x 2 = 6 GBh): 14 GBh, 1 failure.
    #   witt_percentile: p95 of 1..4 = 3.85 GB fails (7.7 GBh), doubled 7.7 GB fits (5.4 GBh): 13.1 GBh.
    #   tovar: every candidate costs 4 GBh per task (a + 4 x P(peak > a)), the tie goes to the
    #     largest, 4 GB: fails (8 GBh), 4 GB is the maximum seen so it doubles to 8 GB (6 GBh): 14 GBh.
    # Task U: history 1, 1 GB; online 0.5 GB for 1 h, preset 2 GB.
    #   presets 1.5 GBh; witt_percentile and tovar allocate 1 GB: 0.5 GBh.
    assert r["presets"].wastage_gbh == pytest.approx(14 + 1.5)
    assert r["witt_percentile"].wastage_gbh == pytest.approx(13.1 + 0.5)
    assert r["tovar"].wastage_gbh == pytest.approx(14 + 0.5)
    assert r["oracle"].wastage_gbh == 0
    for name in ("presets", "witt_percentile", "tovar"):
        assert r[name].failures == 1
        assert r[name].tasks == 2
    assert r["oracle"].failures == 0
    # used = 5 x 2 + 0.5 x 1 = 10.5 GBh; MAQ = used / (used + wasted)
    assert r["presets"].maq == pytest.approx(10.5 / (10.5 + 15.5))
    assert r["oracle"].maq == 1.0
    d = result.as_dict()["methods"]["presets"]
    assert set(d) == {"wastage_gbh", "failures", "tasks", "maq", "seconds"}


def test_lotaru_fixture_split_follows_labels():
    trace = read_trace(LOTARU, "lotaru")
    runs, skipped = split_trace(trace, seed=0)
    by = {r.task_type: r for r in runs}
    assert sorted(by) == ["T", "U"]
    assert sorted(by["T"].history.peak_rss) == [1 * GB, 2 * GB, 3 * GB, 4 * GB]
    assert list(by["T"].online["peak_rss"]) == [5 * GB]


# --------------------------------------------------------------------------- the nextflow fixture


def test_nextflow_fixture_skips_and_counts():
    trace = read_trace(NEXTFLOW, "nextflow")
    # 40 good "align" rows + 5 "tiny"; skipped: '-' peak, zero realtime, '-' realtime, a FAILED row.
    assert len(trace.rows) == 45
    assert trace.skipped == {
        "without peak_rss": 1,
        "with zero or negative realtime": 1,
        "without realtime": 1,
        "with status FAILED": 1,
    }
    assert "skipped 4 row(s)" in trace.describe_skipped()


def test_nextflow_fixture_replay_by_hand():
    trace = read_trace(NEXTFLOW, "nextflow")
    result = replay_trace(trace, [Presets(), WittPercentile(), Tovar(), Oracle(), VPA(), WittLR()], seed=7)
    # "tiny" has 5 rows < 34: skipped. "align": 40 rows, ceil(0.7 x 40) = 28 online.
    assert result.skipped_types == {"tiny": 5}
    r = result.methods
    assert all(t.tasks == 28 for t in r.values())
    # Every align job peaks at 1 GB for 1 h with a 1.5 GB preset: presets waste 0.5 GBh each.
    assert r["presets"].wastage_gbh == pytest.approx(28 * 0.5)
    assert r["presets"].maq == pytest.approx(28 / (28 + 14))
    # A constant peak: percentile, Tovar and the regression allocate exactly 1 GB.
    for name in ("witt_percentile", "tovar", "witt_lr", "oracle"):
        assert r[name].wastage_gbh == pytest.approx(0.0, abs=1e-9), name
        assert r[name].failures == 0
    # VPA: the end of the histogram bucket holding 1 GB, plus 15%: over, never under.
    assert r["vpa"].failures == 0
    assert 0.15 * 28 <= r["vpa"].wastage_gbh <= 0.25 * 28


def test_split_is_seeded_and_thirty_percent():
    trace = read_trace(NEXTFLOW, "nextflow")
    a, _ = split_trace(trace, seed=1)
    b, _ = split_trace(trace, seed=1)
    c, _ = split_trace(trace, seed=2)
    assert len(a[0].history) == 12 and len(a[0].online) == 28
    # rows are identical in this fixture, so compare the permutation through the 'row' ids
    assert list(a[0].online["row"]) == list(b[0].online["row"])
    assert list(a[0].online["row"]) != list(c[0].online["row"])


# --------------------------------------------------------------------------- the harness guards


class _Stuck(Method):
    name = "stuck"

    class _S(TaskSizer):
        def first(self, job):
            return 1.0

        def retry(self, job, failed):
            return failed[-1]  # no progress

    def sizer(self, history):
        return self._S()


def test_a_method_that_makes_no_progress_is_reported_not_looped():
    trace = read_trace(LOTARU, "lotaru")
    with pytest.raises(ReplayError, match="no larger"):
        replay_trace(trace, [_Stuck()], seed=0)


class _Proposes(Method):
    """A first allocation, then retries, as given."""

    name = "proposes"

    def __init__(self, first, retry):
        self._first, self._retry = first, retry

    def sizer(self, history):
        method = self

        class _S(TaskSizer):
            def first(self, job):
                return method._first

            def retry(self, job, failed):
                return method._retry

        return _S()


@pytest.mark.parametrize("first, retry, proposed", [(1.0, math.inf, "inf"), (0.0, 2.0, "0.0"), (-5.0, 2.0, "-5.0"),
                                                    (math.nan, 2.0, "nan")])
def test_every_allocation_a_method_proposes_must_be_a_finite_positive_size(first, retry, proposed):
    """An audit: a retry of inf was accepted (larger than the last), and the wastage and the
    JSON became infinite; a first allocation of 0 was reported as a retry "no larger"."""
    trace = read_trace(LOTARU, "lotaru")
    with pytest.raises(ReplayError, match=f"proposed {proposed} bytes"):
        replay_trace(trace, [_Proposes(first, retry)], seed=0)


class _Creeping(Method):
    """Nextflow's ``memory x attempt`` from a preset far below the peak."""

    name = "creeping"

    class _S(TaskSizer):
        def first(self, job):
            return 1.0

        def retry(self, job, failed):
            return failed[0] * (len(failed) + 1)

    def sizer(self, history):
        return self._S()


def test_a_method_that_never_reaches_a_peak_gives_that_job_up_and_the_replay_goes_on():
    """A preset of 512 KB for 300 MB tasks (``memory x attempt``) aborted the replay of the
    whole file, every method's results lost; now that method gives the job up after
    MAX_ATTEMPTS attempts, each charged as a failure, and the others are scored as before."""
    from raysched.replay.harness import MAX_ATTEMPTS, account_given_up
    from raysched.replay.results import text_table

    trace = read_trace(LOTARU, "lotaru")
    result = replay_trace(trace, [_Creeping(), Oracle()], seed=0)
    creeping, oracle = result.methods["creeping"], result.methods["oracle"]
    assert creeping.tasks == oracle.tasks > 0 and creeping.given_up == creeping.tasks
    assert creeping.failures == MAX_ATTEMPTS * creeping.tasks and creeping.used == 0
    assert creeping.wastage_gbh > 0 and oracle.given_up == 0 and oracle.wastage_gbh == 0
    assert result.as_dict()["methods"]["creeping"]["given_up"] == creeping.tasks
    assert f"given up after {MAX_ATTEMPTS} attempts" in text_table(result)
    t = account_given_up([1.0, 2.0, 3.0], 10.0, 1000.0)
    assert (t.under, t.failures, t.tasks, t.given_up, t.used) == (6000.0, 3, 1, 1, 0.0)
    with pytest.raises(ValueError):
        account_given_up([1.0, 20.0], 10.0, 1.0)


def test_sizers_never_see_the_peak_before_it_fits():
    seen = []

    class Spy(Method):
        name = "spy"

        class _S(TaskSizer):
            def first(self, job):
                seen.append(job)
                return 2 * GB

            def retry(self, job, failed):
                return failed[-1] * 2

        def sizer(self, history):
            return self._S()

    replay_trace(read_trace(LOTARU, "lotaru"), [Spy()], seed=0)
    assert seen and all(isinstance(j, Job) for j in seen)
    assert not any(hasattr(j, "peak_rss") or hasattr(j, "realtime_ms") for j in seen)


# --------------------------------------------------------------------------- baselines in isolation


def test_tovar_min_waste_small_example():
    # peaks 1 and 10, 1 h each: a = 10 costs 10; a = 1 costs 1 + 10 x 1/2 = 6 -> 1.
    assert tovar_min_waste(np.array([1.0, 10.0]), np.array([1.0, 1.0])) == 1.0
    # a long big job tips it: times 1 and 9: a = 10 costs 10 x 5 = 50; a = 1 costs 5 + 10 x 9/2 = 50 -> tie -> 10
    assert tovar_min_waste(np.array([1.0, 10.0]), np.array([1.0, 9.0])) == 10.0


def test_vpa_histogram_percentile_and_oom_bump():
    h = DecayingHistogram(half_life=1e12)  # no decay: plain weighted percentile
    for v in (1e8, 2e8, 3e8, 4e8, 5e8, 6e8, 7e8, 8e8, 9e8, 1e9):
        h.add(v)
    p90 = h.percentile(0.9)
    assert 9e8 <= p90 <= 9e8 * 1.06  # the end of the bucket holding 900 MB
    # with decay the newest samples weigh more: the same samples, newest last, push p90 up
    d = DecayingHistogram(half_life=2.0)
    for v in (1e8, 2e8, 3e8, 4e8, 5e8, 6e8, 7e8, 8e8, 9e8, 1e9):
        d.add(v)
    assert d.percentile(0.9) >= 1e9
    hist = TaskHistory("x", np.array([1e9] * 5), np.ones(5), np.ones(5), np.ones(5), np.ones(5))
    sizer = VPA().sizer(hist)
    job = Job("x", 1.0, float("nan"), 1.0)
    first = sizer.first(job)
    assert first == pytest.approx(h.starts[h.bucket(1e9) + 1] * 1.15)
    # after an OOM at 10 GB VPA records the sample max(10 GB + 100 MiB, 10 GB x 1.2) = 12 GB;
    # the newest of six samples holds p90, so the new target is that bucket's end + 15%
    nxt = sizer.retry(job, [10e9])
    assert nxt >= 12e9
    assert nxt == pytest.approx(h.starts[h.bucket(12e9) + 1] * 1.15)


def test_witt_lr_follows_input_size():
    x = np.array([1.0, 2.0, 3.0, 4.0]) * 1e9
    hist = TaskHistory("x", 2 * x, np.ones(4), x, np.ones(4), np.ones(4))
    sizer = WittLR().sizer(hist)
    # a perfect line: no residuals, no offset, 2 x input
    assert sizer.first(Job("x", 5e9, float("nan"), 1.0)) == pytest.approx(10e9)


# --------------------------------------------------------------------------- malformed traces


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_missing_columns_is_a_clear_error(tmp_path):
    p = _write(tmp_path, "bad.csv", "process,realtime\nA,100\n")
    with pytest.raises(TraceFormatError, match="missing column.*peak_rss"):
        read_trace(p, "nextflow")
    with pytest.raises(TraceFormatError, match="missing column.*Label"):
        read_trace(p, "lotaru")


def test_errors_are_invalid_input_for_callers():
    assert issubclass(TraceFormatError, InvalidInput)


def test_unknown_format_is_a_clear_error(tmp_path):
    with pytest.raises(TraceFormatError, match="unknown trace format 'slurm'"):
        read_trace(NEXTFLOW, "slurm")
    p = _write(tmp_path, "what.csv", "a,b\n1,2\n")
    with pytest.raises(TraceFormatError, match="cannot tell the trace format"):
        read_trace(p, "auto")


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(TraceFormatError, match="empty file"):
        read_trace(_write(tmp_path, "empty.csv", ""), "nextflow")
    with pytest.raises(TraceFormatError, match="no such file"):
        read_trace(tmp_path / "nope.csv", "nextflow")


def test_dashes_zero_runtimes_and_garbage_are_skipped_with_counts(tmp_path):
    text = (
        "process,status,peak_rss,realtime,memory,rchar\n"
        "A,COMPLETED,100,10,-,-\n"  # fine: no preset, no input size
        "A,COMPLETED,-,10,200,5\n"  # no peak
        "A,COMPLETED,100,0,200,5\n"  # zero runtime
        "A,COMPLETED,lots,10,200,5\n"  # garbage peak
        "A,COMPLETED,,10,200,5\n"  # empty peak
        "A,COMPLETED,0,10,200,5\n"  # zero peak
        ",COMPLETED,100,10,200,5\n"  # no process
    )
    trace = read_trace(_write(tmp_path, "t.csv", text), "nextflow")
    assert len(trace.rows) == 1
    assert trace.skipped == {
        "without peak_rss": 3,
        "with zero or negative realtime": 1,
        "with zero or negative peak_rss": 1,
        "without a task type": 1,
    }
    row = trace.rows.iloc[0]
    assert math.isnan(row["memory"]) and math.isnan(row["input_size"])
    # and replaying it does not crash: the lone type is too small and is skipped with its count
    result = replay_trace(trace, [Presets()], seed=0)
    assert result.skipped_types == {"A": 1} and result.methods["presets"].tasks == 0


def test_infinite_and_out_of_range_figures_are_skipped_with_counts_or_read_as_unknown(tmp_path):
    """inf read as a number went on to crash the importer (timedelta, int) and XGBoost."""
    text = (
        "process,status,peak_rss,realtime,memory,rchar\n"
        "A,COMPLETED,100,10,200,5\n"
        "A,COMPLETED,inf,10,200,5\n"  # infinite peak
        "A,COMPLETED,100,1e30,200,5\n"  # a realtime past any task's
        "A,COMPLETED,1e400,10,200,5\n"  # overflows to inf
        "A,COMPLETED,-5,10,200,5\n"  # negative peak
        "A,COMPLETED,100,10,inf,1e400\n"  # kept: its preset and input size unknown
    )
    trace = read_trace(_write(tmp_path, "t.csv", text), "nextflow")
    assert trace.skipped == {"with infinite peak_rss": 2, "with realtime over a year": 1,
                             "with zero or negative peak_rss": 1}
    assert len(trace.rows) == 2
    last = trace.rows.iloc[1]
    assert math.isnan(last["memory"]) and math.isnan(last["input_size"])


def test_presets_replay_a_retried_runs_first_request_and_its_failure(tmp_path):
    """An audit: a run Nextflow retried has ``memory`` already doubled (nf-core's
    ``X.GB * task.attempt``); presets started from it, never charged the first attempt's
    failure, and so were scored better than Nextflow ran."""
    rows = "".join(f"A,COMPLETED,{100 + i},10,200,1\n" for i in range(40))  # 40 runs that fit their 200 B
    text = "process,status,peak_rss,realtime,memory,attempt\n" + rows + "A,COMPLETED,300,10,400,2\n" \
        + "A,COMPLETED,100,10,200,x\n"  # an attempt that is no number counts as the first
    trace = read_trace(_write(tmp_path, "t.csv", text), "nextflow")
    assert list(trace.rows["attempt"]) == [1.0] * 40 + [2.0, 1.0]
    history, _ = split_trace(trace, seed=1)
    result = replay_trace(trace, [Presets()], seed=1)
    assert 300.0 in set(history[0].online["peak_rss"])  # seed 1 puts the retried run online
    # There it fails at 200 B (charged 200 x 10 ms) and fits at 400 B, as it did in Nextflow.
    presets = result.methods["presets"]
    assert presets.failures == 1 and presets.under == 200 * 10
    lotaru = "Label,Task,Realtime,peak_rss,memory,TaskInputSize\ntrain-1,A,10,100,200,1\ntest,A,10,100,200,1\n"
    assert list(read_trace(_write(tmp_path, "l.csv", lotaru), "lotaru").rows["attempt"]) == [1.0, 1.0]


def test_a_trailing_delimiter_on_every_row_does_not_shift_the_columns(tmp_path):
    text = "process,status,peak_rss,realtime\nA,COMPLETED,100,10,\nB,COMPLETED,200,20,\n"
    trace = read_trace(_write(tmp_path, "t.csv", text), "nextflow")
    assert list(trace.rows["task_type"]) == ["A", "B"] and list(trace.rows["peak_rss"]) == [100.0, 200.0]
    assert not trace.skipped


def test_a_header_with_a_bom_is_read_and_sniffed(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_text("process,status,peak_rss,realtime\nA,COMPLETED,100,10\n", encoding="utf-8-sig")
    assert sniff_format(path) == "nextflow" and list(read_trace(path).rows["task_type"]) == ["A"]


def test_rows_with_more_fields_than_the_header_are_skipped_and_counted_wherever_they_are(tmp_path):
    """Nextflow writes values unquoted: in a comma-separated trace a tag such as
    "[id:s1, single_end:false]" is two fields. As the first data row such a row was cut to the
    header's width, every later field read from the wrong column (here a peak of 7 bytes and a
    realtime of 100 ms); anywhere else it made the whole trace unreadable."""
    first = _write(tmp_path, "first.csv", "process,tag,peak_rss,realtime\nA,x,7,100,10\nA,s2,200,20\n")
    later = _write(tmp_path, "later.csv", "process,tag,peak_rss,realtime\nA,s2,200,20\nA,x,7,100,10\nA,s3,300,30\n")
    for path, peaks in ((first, [200.0]), (later, [200.0, 300.0])):
        trace = read_trace(path, "nextflow")
        assert list(trace.rows["peak_rss"]) == peaks, path
        assert trace.skipped == {"with more fields than the header (a separator inside a value?)": 1}, path
    lotaru = _write(tmp_path, "l.csv", "Label,Task,Realtime,peak_rss\ntrain-1,A,10,100\ntest,A,x,y,10,100\n")
    assert read_trace(lotaru, "lotaru").n_skipped == 1


def test_a_trace_with_no_usable_rows_replays_to_zero(tmp_path):
    text = "process,peak_rss,realtime\nA,-,-\nB,-,0\n"
    trace = read_trace(_write(tmp_path, "t.csv", text), "nextflow")
    assert len(trace.rows) == 0 and trace.n_skipped == 2
    result = replay_trace(trace, [Presets(), Oracle()], seed=0)
    assert result.methods["presets"].tasks == 0 and result.methods["presets"].maq == 1.0


def test_lotaru_unknown_labels_are_skipped(tmp_path):
    text = "Label,Task,Realtime,peak_rss,memory,TaskInputSize\ntrain-1,A,10,100,200,1\nvalidation,A,10,100,200,1\ntest,A,10,100,200,1\n"
    trace = read_trace(_write(tmp_path, "l.csv", text), "lotaru")
    assert len(trace.rows) == 2
    assert trace.skipped == {"with a Label other than train-*/test": 1}


def test_nextflow_human_units_and_tabs(tmp_path):
    text = "process\tpeak_rss\trealtime\tmemory\trchar\t%cpu\nA\t1.5 GB\t1m 30s\t2 GB\t10 MB\t150.5%\n"
    trace = read_trace(_write(tmp_path, "trace.txt", text), "nextflow")
    row = trace.rows.iloc[0]
    assert row["peak_rss"] == 1.5 * 1024**3
    assert row["realtime_ms"] == 90_000
    assert row["memory"] == 2 * 1024**3
    assert row["input_size"] == 10 * 1024**2
    assert row["cpu_pct"] == 150.5


def test_unit_parsers():
    assert parse_memory("512 MB") == 512 * 1024**2
    assert parse_memory("-") != parse_memory("-")  # NaN
    assert parse_duration_ms("1h 2m 3s") == 3_723_000
    assert parse_duration_ms("250ms") == 250
    assert math.isnan(parse_duration_ms("soon"))


def test_sniff_format():
    assert sniff_format(NEXTFLOW) == "nextflow"
    assert sniff_format(LOTARU) == "lotaru"


def test_a_trace_with_nextflows_default_fields_reads_its_process_from_the_task_name(tmp_path):
    # trace.fields by default: no `process`, but `name` = process + " (tag)"; tab-separated, human units.
    text = ("task_id\thash\tnative_id\tname\tstatus\texit\tsubmit\tduration\trealtime\t%cpu\tpeak_rss\t"
            "peak_vmem\trchar\twchar\n"
            "1\tab/cdef12\t101\tNFCORE_RNASEQ:RNASEQ:FASTQC (sample1)\tCOMPLETED\t0\t2026-01-01 10:00:00.000\t"
            "1m 3s\t1m 1s\t164.0%\t386.8 MB\t1 GB\t2.1 GB\t10 MB\n"
            "2\tab/cdef13\t102\tNFCORE_RNASEQ:RNASEQ:FASTQC (sample (2))\tCOMPLETED\t0\t2026-01-01 10:00:01.000\t"
            "2m\t1m 50s\t150.0%\t412 MB\t1 GB\t3.5 GB\t10 MB\n"
            "3\tab/cdef14\t103\tMULTIQC\tCOMPLETED\t0\t2026-01-01 10:09:00.000\t20s\t18s\t90.0%\t200 MB\t"
            "500 MB\t50 MB\t5 MB\n")
    path = _write(tmp_path, "trace.txt", text)
    assert sniff_format(path) == "nextflow"
    trace = read_trace(path, "auto")
    assert list(trace.rows["task_type"]) == ["NFCORE_RNASEQ:RNASEQ:FASTQC"] * 2 + ["MULTIQC"]
    assert trace.rows["peak_rss"].iloc[0] == pytest.approx(386.8 * 2**20, rel=1e-6)
    assert trace.rows["input_size"].iloc[0] == pytest.approx(2.1 * 2**30, rel=1e-6)
    with pytest.raises(TraceFormatError, match="process \\(or name\\), peak_rss and realtime"):
        sniff_format(_write(tmp_path, "other.txt", "task_id\tname\tstatus\n1\tx\tCOMPLETED\n"))


# --------------------------------------------------------------------------- the cost-aware estimator (policy)


def test_cost_aware_estimator_follows_a_saturating_input_size():
    from raysched.config import RayschedConfig
    from raysched.policy.recipe import build_predictor, requested_memory
    from raysched.types import Features, History

    # peak grows with input up to 10 GB, then stays there (as bwa's does)
    sizes = np.geomspace(1e6, 1e11, 40)
    peaks = np.minimum(1e9 * (1 + np.log10(sizes / 1e6) * 2), 10e9)
    hist = History.from_columns({"input_size": sizes, "memory": peaks})
    cfg = RayschedConfig(memory_cost_aware=True)
    pred = build_predictor(cfg).predict(Features(input_size=int(1e11)), hist)
    allocation = requested_memory(pred.memory, cfg.memory_margin)
    assert 10e9 <= allocation <= 10.5e9  # the plateau, not a line through it
    small = build_predictor(cfg).predict(Features(input_size=int(1e6)), hist)
    assert requested_memory(small.memory, cfg.memory_margin) < 3e9


def test_cost_aware_ladder_jumps_to_the_largest_peak_seen():
    from raysched.config import RayschedConfig
    from raysched.policy.recipe import LadderState, build_ladder
    from raysched.types import GiB, Allocation, AttemptRecord, Estimate, Outcome, Prediction, Usage

    cfg = RayschedConfig(memory_cost_aware=True)
    est = Estimate(10 * GiB, 9 * GiB, 10 * GiB, 0.9, 30)
    pred = Prediction(memory=est, cpu=Estimate(1, 1, 1, 0.9, 30), wall=Estimate(1, 1, 1, 0.9, 30))
    failed = AttemptRecord(1, Allocation(1.0, int(11.5 * GiB)), Outcome.OOM_KILLED, Usage(peak_rss_bytes=int(11.5 * GiB)))
    nxt = build_ladder(cfg).next_allocation(LadderState(pred, (failed,), max_peak_seen=12 * GiB))
    # 12 GiB x 1.15 = 13.8 GiB (>= the x1.2 floor of 13.8 GiB), not 2 x 11.5 = 23 GiB
    assert nxt.reason == "largest peak seen"
    assert nxt.memory_bytes < 14.5 * GiB



def _one_type_trace(history_peaks, online_peaks, input_sizes=None):
    """A Lotaru-style trace of one task type: history rows, then online rows, as given."""
    import pandas as pd

    from raysched.replay.readers import Trace

    peaks = list(history_peaks) + list(online_peaks)
    df = pd.DataFrame({"task_type": "A", "peak_rss": peaks, "realtime_ms": 1000.0,
                       "input_size": 1e6 if input_sizes is None else input_sizes, "memory": np.nan, "attempt": 1.0,
                       "cpus": 1, "cpu_pct": 100.0})
    df["split"] = ["history"] * len(history_peaks) + ["online"] * len(online_peaks)
    df["row"] = range(len(df))
    return Trace("t", "t", "lotaru", df, {})


def test_a_job_whose_ladder_ran_out_is_counted_once():
    """An audit: one job past raysched's ladder counted 7 (each doubling after it gave up)."""
    from raysched.replay.raysched_method import RayschedMethod

    method = RayschedMethod()
    result = replay_trace(_one_type_trace([2**30] * 10, [1000 * 2**30]), [method])
    assert result.methods["raysched"].tasks == 1 and result.methods["raysched"].failures > 4
    assert method.exhausted == 1


def test_the_replay_retrains_and_serves_models_by_the_profilers_rules():
    """An audit: the replay refitted every 20 rows and always served the newest, where the
    profiler also waits for a tenth of the history and keeps a model no worse on holdout."""
    from raysched.config import RayschedConfig
    from raysched.policy.models import fit_resource_model, replaces_served, retrain_due
    from raysched.replay.raysched_method import RayschedMethod
    from raysched.types import History

    config = RayschedConfig(memory_cost_aware=False)  # the model sizes memory
    assert not retrain_due(19, 100, config) and retrain_due(20, 100, config)
    assert not retrain_due(20, 1000, config) and retrain_due(100, 1000, config)
    sizes = np.random.default_rng(0).uniform(1e8, 1e9, 400)
    peaks = 1e8 + 2.0 * sizes
    method = RayschedMethod(config)
    replay_trace(_one_type_trace(peaks[:200], peaks[200:], sizes), [method])
    # 200 history rows and 200 online: the first fit, then one each time 20 rows and a tenth
    # of the history have arrived (at 223, 248, 276, 307, 341 and 379 rows): 7 fits, where
    # every 20 rows made 10.
    assert method.trainings == 7, method.trainings

    # A new model is served only if it is no worse on its holdout than the served one.
    history = History.from_columns({"input_size": sizes, "memory": peaks})
    good = fit_resource_model(history, "memory", config)
    bad = fit_resource_model(History.from_columns({"input_size": sizes, "memory": peaks[::-1] * 3}), "memory", config)
    assert replaces_served(good, None, history, "memory", config)[0]
    assert replaces_served(good, bad, history, "memory", config)[0]
    assert not replaces_served(bad, good, history, "memory", config)[0]


def test_an_html_report_or_a_compressed_trace_is_named_as_such_not_sent_to_format(tmp_path):
    """nf-core's pipeline_info holds execution_report_*.html beside execution_trace_*.txt, and a
    trace may be gzipped: both got 'cannot tell the trace format from its header; pass --format',
    and with --format, a missing-column list or "'utf-8' codec can't decode byte 0x8b"."""
    import gzip

    html = _write(tmp_path, "execution_report.html", "<!DOCTYPE html>\n<html><body>report</body></html>\n")
    with pytest.raises(TraceFormatError, match="an HTML page .* not a trace table; pass the trace file"):
        read_trace(html)
    packed = tmp_path / "trace.txt.gz"
    packed.write_bytes(gzip.compress(NEXTFLOW.read_bytes()))
    with pytest.raises(TraceFormatError, match=r"not a text file \(binary, or compressed"):
        read_trace(packed)


def test_the_replayed_raysched_sizes_a_type_with_few_runs_by_the_workflows_other_types_too():
    """The runtime's shared fallback, replayed: RayschedMethod.begin_workflow pools every task
    type's residuals (policy.recipe.memory_residual_prior), as the profiler does for a home's
    functions, and a type with ten runs within 0.2% of each other is sized wider by it."""
    from raysched.config import RayschedConfig
    from raysched.replay.methods import Job, TaskHistory
    from raysched.replay.raysched_method import RayschedMethod

    nan = np.full(10, np.nan)
    tight = TaskHistory("tight", 1e9 * (1 + 0.002 * np.arange(10)), np.full(10, 60_000.0), nan, nan, nan)
    n = 21
    wide = TaskHistory("wide", 1e9 * np.exp(0.05 * (np.arange(n) - 10)), np.full(n, 60_000.0),
                       np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan))
    job = Job("tight", float("nan"), float("nan"), float("nan"))

    firsts = {}
    for runs in (0, 5):
        method = RayschedMethod(RayschedConfig(cost_prior_runs=runs))
        method.begin_workflow([tight, wide])
        assert len(method.residual_prior) == runs
        firsts[runs] = method.sizer(tight).first(job)
    assert firsts[0] < 1.05e9 <= firsts[5]  # a run 5% above the largest seen: a failure without the prior
