"""`raysched eval` and `raysched import` on the hand-made fixtures (and, when present, the shared traces)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from raysched.replay.commands import eval_command, import_command

FIXTURES = Path(__file__).parent / "fixtures" / "replay"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"


def test_eval_writes_json_plot_and_markdown(tmp_path):
    out = tmp_path / "r.json"
    png = tmp_path / "r.png"
    md = tmp_path / "r.md"
    res = CliRunner().invoke(
        eval_command,
        [str(FIXTURES / "lotaru_small.csv"), "--format", "lotaru", "--seed", "1",
         "--json", str(out), "--plot", str(png), "--markdown", str(md)],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    methods = data["workflows"]["lotaru_small"]["methods"]
    assert set(methods) == {"raysched", "raysched_fixed", "presets", "tovar", "witt_percentile", "witt_lr", "vpa", "oracle"}
    for m in methods.values():
        assert set(m) >= {"wastage_gbh", "failures", "tasks", "maq", "seconds"}
    assert methods["presets"]["wastage_gbh"] == pytest.approx(15.5)  # worked out in test_replay.py
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lotaru_small |" in md.read_text()


def test_eval_on_a_folder_and_method_subset(tmp_path):
    res = CliRunner().invoke(eval_command, [str(FIXTURES), "--methods", "presets,oracle"])
    assert res.exit_code == 0, res.output
    assert "nextflow_small" in res.output and "lotaru_small" in res.output


def test_eval_malformed_is_a_clear_error_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("process,realtime\nA,1\n")
    res = CliRunner().invoke(eval_command, [str(bad), "--format", "nextflow"])
    assert res.exit_code == 1
    assert "missing column(s) peak_rss" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    res = CliRunner().invoke(eval_command, [str(bad), "--format", "slurm"])
    assert res.exit_code == 2 and "slurm" in res.output
    res = CliRunner().invoke(eval_command, [str(bad), "--methods", "magic"])
    assert res.exit_code == 2 and "unknown method" in res.output and "--methods" in res.output


def test_eval_refuses_bad_options_and_unwritable_outputs_before_it_replays(tmp_path, monkeypatch):
    from raysched.replay import commands

    replayed = []
    monkeypatch.setattr("raysched.replay.harness.replay_trace", lambda *a, **k: replayed.append(a))
    trace = str(FIXTURES / "lotaru_small.csv")
    (tmp_path / "file").write_text("")
    for extra, says in [(["--seed", "-1"], "--seed"), (["--methods", ","], "at least one method"),
                        (["--json", str(tmp_path / "file" / "r.json")], "is a file, not a folder"),
                        (["--plot", "/proc/no/r.png"], "cannot write /proc/no/r.png"),
                        # a traceback after the whole replay, before (a helper's audit)
                        (["--plot", str(tmp_path / "r.xyz")], "cannot write a plot as .xyz"),
                        (["--markdown", str(tmp_path)], "directory")]:
        res = CliRunner().invoke(commands.eval_command, [trace, *extra])
        assert res.exit_code == 2 and says in res.output, (extra, res.output)
    assert not replayed and not list(tmp_path.glob("r.*"))


def test_eval_plot_without_an_extension_says_the_file_it_wrote(tmp_path):
    """``--plot out`` wrote ``out.png`` (matplotlib's default) and said ``wrote out``."""
    out = tmp_path / "wastage"
    res = CliRunner().invoke(eval_command, [str(FIXTURES / "lotaru_small.csv"), "--methods", "presets,oracle",
                                   "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "wastage.png").exists() and f"wrote {out}.png" in res.output


def test_eval_of_a_trace_with_nothing_to_replay_says_so_and_fails(tmp_path):
    """It printed a table of zeros, "raysched / best other (presets): 1.00 -> LOSES", and exited 0."""
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("process,peak_rss,realtime\nA,100,10\nA,120,12\n")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(eval_command, [str(tiny), "--format", "nextflow", "--json", str(out)])
    assert res.exit_code == 1, res.output
    assert "nothing to replay" in res.output and "nothing was replayed" in res.output
    assert "LOSES" not in res.output and not out.exists()
    only_train = tmp_path / "train.csv"
    text = (FIXTURES / "lotaru_small.csv").read_text().splitlines()
    label = text[0].split(",").index("Label")
    only_train.write_text("\n".join([text[0]] + [r for r in text[1:] if r.split(",")[label].startswith("train")]) + "\n")
    res = CliRunner().invoke(eval_command, [str(only_train), "--format", "lotaru"])
    assert res.exit_code == 1 and "without both history and online rows" in res.output, res.output


def test_eval_set_replays_raysched_with_a_changed_config_and_refuses_bad_keys(tmp_path):
    def wastage(*extra):
        out = tmp_path / "r.json"
        res = CliRunner().invoke(eval_command, [str(FIXTURES / "lotaru_small.csv"), "--methods", "raysched,tovar",
                                                "--json", str(out), *extra])
        assert res.exit_code == 0, res.output
        assert "goal (wastage <= 0.75" in res.output  # the summary line
        return json.loads(out.read_text())["workflows"]["lotaru_small"]["methods"]["raysched"]["wastage_gbh"]

    default = wastage()
    assert wastage("--set", "memory_margin=1.0") > default  # twice the headroom wastes more
    for bad, says in [("nope=1", "RayschedConfig field"), ("cost_min_coverage=2", "cost_min_coverage"),
                      ("cost_tail_allowance=lots", "could not convert"), ("memory_cost_aware=maybe", "true or false")]:
        res = CliRunner().invoke(eval_command, [str(FIXTURES / "lotaru_small.csv"), "--set", bad])
        assert res.exit_code == 2 and says in res.output, (bad, res.output)


def test_eval_with_a_tiny_or_bad_min_rows_skips_or_refuses_never_a_traceback(tmp_path):
    res = CliRunner().invoke(eval_command, [str(FIXTURES / "nextflow_small.csv"), "--min-rows", "0"])
    assert res.exit_code == 2 and "--min-rows" in res.output
    # Types of 1-3 rows leave no history (or no online row) after a 30/70 split: skipped, counted.
    res = CliRunner().invoke(eval_command, [str(FIXTURES / "nextflow_small.csv"), "--min-rows", "1",
                                            "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["workflows"]["nextflow_small"]["methods"]


def test_a_store_imported_with_name_based_ids_takes_the_same_file_again_as_nothing_new(tmp_path):
    """Row ids were made from the file's name before content digests: no duplicate after an upgrade."""
    from raysched.replay import importer
    from raysched.replay.readers import read_trace
    from raysched.store.profiles import ProfileStore

    trace = read_trace(FIXTURES / "nextflow_small.csv", "nextflow")
    rows = importer.trace_rows(trace)
    for row, r in zip(rows, trace.rows.itertuples(index=False)):
        row["row_id"] = importer._legacy_row_id(trace, r)  # as an earlier raysched wrote them
    ProfileStore(tmp_path / "h").append(rows)
    assert importer.import_trace(trace, tmp_path / "h") == (0, {})


def test_a_store_imported_with_whole_file_digest_ids_takes_the_same_file_again_as_nothing_new(tmp_path):
    from raysched.replay import importer
    from raysched.replay.readers import read_trace
    from raysched.store.profiles import ProfileStore

    trace = read_trace(FIXTURES / "nextflow_small.csv", "nextflow")
    rows = importer.trace_rows(trace)
    source = importer._content_digest(trace.path)
    for row, r in zip(rows, trace.rows.itertuples(index=False)):
        row["row_id"] = importer._whole_file_row_id(trace, source, r)  # as the last raysched wrote them
    ProfileStore(tmp_path / "h").append(rows)
    assert importer.import_trace(trace, tmp_path / "h") == (0, {})


def test_a_trace_that_grew_since_its_import_adds_only_its_new_rows(tmp_path):
    """Nextflow appends to its trace (-resume): ids made from the whole file's digest made
    every row of the grown file new, and each earlier row was stored twice."""
    from raysched.store.profiles import ProfileStore

    lines = (FIXTURES / "nextflow_small.csv").read_text().splitlines(keepends=True)
    first, grown = tmp_path / "first.csv", tmp_path / "grown.csv"
    first.write_text("".join(lines[:-5]))
    grown.write_text("".join(lines))
    home = tmp_path / "home"
    for path in (first, grown, grown):
        res = CliRunner().invoke(import_command, [str(path), "--format", "nextflow", "--home", str(home)])
        assert res.exit_code == 0, res.output
    df = ProfileStore(home).read()
    assert len(df) == 45 and df.row_id.is_unique  # every usable row of the grown trace, once


def test_import_then_history_is_in_the_store(tmp_path):
    pytest.importorskip("pyarrow")
    from raysched.store.profiles import ProfileStore

    home = tmp_path / "home"
    args = [str(FIXTURES / "nextflow_small.csv"), "--format", "nextflow", "--home", str(home)]
    res = CliRunner().invoke(import_command, args)
    assert res.exit_code == 0, res.output
    assert "45 new row(s)" in res.output and "skipped 4 row(s)" in res.output
    parts = len(ProfileStore(home).profiles.parts())
    # importing twice keeps one copy, writes nothing and says so
    again = CliRunner().invoke(import_command, args)
    assert again.exit_code == 0 and "imported 0 new row(s)" in again.output, again.output
    assert "imported before" in again.output and len(ProfileStore(home).profiles.parts()) == parts
    # ...and so does a copy under another name (ids come from the content, not the name)
    import shutil

    copy = tmp_path / "renamed.csv"
    shutil.copy(FIXTURES / "nextflow_small.csv", copy)
    renamed = CliRunner().invoke(import_command, [str(copy), "--format", "nextflow", "--home", str(home)])
    assert renamed.exit_code == 0 and "imported 0 new row(s)" in renamed.output, renamed.output
    df = ProfileStore(home).read(function="align")
    assert len(df) == 40
    row = df.iloc[0]
    assert row["code_hash"] == "imported" and row["source"] == "import:nextflow" and row["outcome"] == "ok"
    assert row["memory_sample_bytes"] == 1_000_000_000 and row["allocated_memory_bytes"] == 1_500_000_000
    assert row["wall_seconds"] == pytest.approx(3600.0) and row["cpu_cores"] == pytest.approx(0.985)
    assert row["input_size"] == 100_000_000


def test_imported_history_gives_a_prediction(tmp_path):
    """Warm start: the imported rows, read back as a History, give a non-fallback prediction."""
    from raysched.config import RayschedConfig
    from raysched.policy.recipe import build_predictor
    from raysched.store.profiles import ProfileStore
    from raysched.types import Features, History

    home = tmp_path / "home"
    CliRunner().invoke(import_command, [str(FIXTURES / "lotaru_small.csv"), "--home", str(home)])
    df = ProfileStore(home).read(function="T", code_hash="imported")
    assert len(df) == 5
    hist = History.from_columns({
        "input_size": df["input_size"].astype(float).tolist(),
        "memory": df["memory_sample_bytes"].astype(float).tolist(),
        "cpu": df["cpu_cores"].astype(float).tolist(),
        "wall": df["wall_seconds"].astype(float).tolist(),
    })
    predictor = build_predictor(RayschedConfig())
    pred = predictor.predict(Features(input_size=500), hist, predictor.train(hist))
    assert pred.memory.source != "fallback"
    assert pred.memory.upper >= 4e9


@pytest.mark.traces
def test_import_shared_trace(tmp_path):
    path = SHARED / "nextflow" / "iwd.csv"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared traces are not part of a clone)")
    res = CliRunner().invoke(import_command, [str(path), "--home", str(tmp_path / "h")])
    assert res.exit_code == 0, res.output
    assert "imported 1661 new row(s)" in res.output


def test_profiles_command_reads_without_creating_a_home_and_refuses_a_bad_limit(tmp_path, monkeypatch):
    from raysched.cli import main
    from raysched.runtime import session

    monkeypatch.setenv("RAYSCHED_HOME", str(tmp_path / "nowhere"))
    monkeypatch.setattr(session, "_config", None)
    res = CliRunner().invoke(main, ["profiles"])
    assert res.exit_code == 0 and "no profiles yet" in res.output, res.output
    assert not (tmp_path / "nowhere").exists()
    res = CliRunner().invoke(main, ["profiles", "--limit", "-1"])
    assert res.exit_code == 2 and "--limit" in res.output
    # A home that is a file (or under one) is an error, as from the Python API; it said
    # "no profiles yet: no store at ..." and exited 0.
    (tmp_path / "a_file").write_text("")
    for command in (["profiles"], ["events"], ["compact"]):
        for home in (tmp_path / "a_file", tmp_path / "a_file" / "home"):
            monkeypatch.setenv("RAYSCHED_HOME", str(home))
            monkeypatch.setattr(session, "_config", None)
            res = CliRunner().invoke(main, command)
            assert res.exit_code == 1 and "is a file, not a folder" in res.output, (command, home, res.output)
        res = CliRunner().invoke(main, [*command, "--home", str(tmp_path / "a_file" / "home")])
        assert res.exit_code == 1 and "is a file, not a folder" in res.output, (command, res.output)
    # A home whose profiles folder is a file says so, not "no profiles yet".
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "profiles").write_text("x")
    for command in (["profiles"], ["events"], ["compact"]):
        res = CliRunner().invoke(main, [*command, "--home", str(tmp_path / "odd")])
        assert res.exit_code == 1 and "is a file, not a folder" in res.output, res.output
    monkeypatch.setattr(session, "_config", None)


def test_events_command_shows_the_monitors_newest_decisions_of_one_function_or_all(tmp_path):
    from raysched.cli import main
    from raysched.store.profiles import ProfileStore

    home = tmp_path / "h"
    res = CliRunner().invoke(main, ["events", "--home", str(home)])
    assert res.exit_code == 0 and "no profiles yet: no store at" in res.output and not home.exists()
    store = ProfileStore(home)
    event = dict(code_hash="h1", call_id="c1", attempt=1, action="stop_and_resubmit", measured=2.0e9,
                 allocated=1.0e9, node_id="n1")
    store.append_events([dict(event, row_id=f"e{i}", function="jobs.etl.load", rule="memory_over_allocation",
                              detail=f"grew past its allocation, sample {i}", timestamp=10.0 + i) for i in range(3)])
    store.append_events([dict(event, row_id="g1", function="jobs.etl.parse", rule="wall_over_prediction",
                              action="warn", detail="ran past its predicted upper bound", timestamp=20.0)])
    res = CliRunner().invoke(main, ["events", "--home", str(home)])
    assert res.exit_code == 0, res.output
    assert res.output.count("memory_over_allocation") == 3 and "wall_over_prediction" in res.output
    res = CliRunner().invoke(main, ["events", "jobs.etl.load", "--limit", "2", "--home", str(home)])
    assert res.exit_code == 0 and res.output.count("memory_over_allocation") == 2, res.output
    assert "sample 2" in res.output and "sample 0" not in res.output and "parse" not in res.output
    res = CliRunner().invoke(main, ["events", "parse", "--home", str(home)])  # its name without the module
    assert res.exit_code == 0 and "(showing jobs.etl.parse" in res.output and "past its predicted" in res.output
    store.append([dict(row_id="q1", function="jobs.etl.quiet", code_hash="h1", call_id="q", attempt=1,
                       outcome="ok", timestamp=30.0, peak_rss_bytes=1, memory_sample_bytes=1, cpu_seconds=0.1,
                       wall_seconds=0.2, source="ray")])  # a function with runs and no events
    res = CliRunner().invoke(main, ["events", "jobs.etl.quiet", "--home", str(home)])
    assert res.exit_code == 0 and "no events of jobs.etl.quiet yet" in res.output, res.output
    res = CliRunner().invoke(main, ["events", "transform", "--home", str(home)])
    assert res.exit_code == 0, res.output
    assert "no events of 'transform'; the store has: jobs.etl.load, jobs.etl.parse, jobs.etl.quiet" in res.output
    res = CliRunner().invoke(main, ["events", "--limit", "0", "--home", str(home)])
    assert res.exit_code == 2 and "--limit" in res.output
    assert len(store.events()) == 4  # a query leaves the store as it was


def test_a_home_this_process_cannot_write_is_still_read_and_a_write_says_why(tmp_path, monkeypatch):
    """Reading demanded a writable home: raysched.profiles() and `raysched profiles` raised
    StoreError (the CLI with a traceback) on a home whose rows were all there."""
    import os

    import raysched
    from raysched.cli import main
    from raysched.runtime import session

    home = tmp_path / "h"
    res = CliRunner().invoke(import_command, [str(FIXTURES / "nextflow_small.csv"), "--home", str(home)])
    assert res.exit_code == 0, res.output
    monkeypatch.setenv("RAYSCHED_HOME", str(home))
    monkeypatch.setattr(session, "_config", None)
    os.chmod(home / "profiles", 0o555)
    if os.access(home / "profiles", os.W_OK):  # root writes it anyway: refuse the writes as the kernel would
        from raysched.errors import StoreError
        from raysched.store.parquet import ParquetTable

        def refuse(table, *args, **kwargs):
            raise StoreError(f"raysched store {table.name!r}: cannot create or write the folder {table.folder} "
                             f"([Errno 13] Permission denied)")

        monkeypatch.setattr(ParquetTable, "_ensure_writable", refuse)
        monkeypatch.setattr(ParquetTable, "_write_part", refuse)
    try:
        assert len(raysched.profiles("align", settle=False)) > 0
        assert len(raysched.events()) == 0
        res = CliRunner().invoke(main, ["profiles", "align"])
        assert res.exit_code == 0 and "align" in res.output, res.output
        res = CliRunner().invoke(main, ["events"])
        assert res.exit_code == 0 and "no events yet" in res.output, res.output
        res = CliRunner().invoke(main, ["compact", "--all"])
        assert res.exit_code == 1 and "cannot create or write the folder" in res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
    finally:
        os.chmod(home / "profiles", 0o755)
        monkeypatch.setattr(session, "_config", None)


def test_compact_command_merges_the_stores_parts(tmp_path, monkeypatch):
    from raysched.cli import main
    from raysched.runtime import session
    from raysched.store.profiles import ProfileStore

    monkeypatch.setenv("RAYSCHED_HOME", str(tmp_path / "h"))
    monkeypatch.setattr(session, "_config", None)
    res = CliRunner().invoke(main, ["compact"])
    assert res.exit_code == 0 and "no profiles yet" in res.output and not (tmp_path / "h").exists()
    store = ProfileStore(tmp_path / "h")
    for i in range(25):
        store.append([{"row_id": f"r{i}", "function": "f", "code_hash": "h", "attempt": 1, "outcome": "ok",
                       "timestamp": 1_700_000_000.0 + i}])
    res = CliRunner().invoke(main, ["compact"])
    assert res.exit_code == 0 and "25 part file(s) -> " in res.output, res.output
    assert len(store.profiles.parts()) < 25
    res = CliRunner().invoke(main, ["compact", "--all"])
    assert res.exit_code == 0 and "-> 1 " in res.output, res.output
    assert list(store.read().row_id) == [f"r{i}" for i in range(25)]
    monkeypatch.setattr(session, "_config", None)


def test_a_folder_with_a_bad_file_is_done_but_for_it_and_says_so(tmp_path):
    """The first bad file of a folder stopped the import (and the replay) half done."""
    import shutil

    folder = tmp_path / "traces"
    folder.mkdir()
    shutil.copy(FIXTURES / "nextflow_small.csv", folder / "b_good.csv")
    (folder / "a_empty.csv").write_text("")
    header = (FIXTURES / "nextflow_small.csv").read_text().splitlines()[0]
    (folder / "c_header_only.csv").write_text(header + "\n")
    res = CliRunner().invoke(import_command, [str(folder), "--home", str(tmp_path / "h")])
    assert res.exit_code == 1, res.output
    assert "b_good.csv: " in res.output and "new row(s)" in res.output
    assert "c_header_only.csv: 0 new row(s) of 0 task type(s)" in res.output and "(it has no rows)" in res.output
    assert "1 file(s) skipped, every other one done" in res.output and "a_empty.csv" in res.output
    res = CliRunner().invoke(eval_command, [str(folder), "--methods", "raysched,presets,oracle"])
    assert res.exit_code == 1 and "1 file(s) skipped" in res.output, res.output
    assert "met on" in res.output and "of 1 workflow(s)" in res.output  # the header-only one does not count


def test_profiles_of_a_bare_function_name_finds_its_module_or_names_what_there_is(tmp_path, monkeypatch):
    from raysched.cli import main
    from raysched.runtime import session
    from raysched.store.profiles import ProfileStore

    monkeypatch.setenv("RAYSCHED_HOME", str(tmp_path / "h"))
    monkeypatch.setattr(session, "_config", None)
    store = ProfileStore(tmp_path / "h")
    store.append([{"row_id": f"r{i}", "function": f, "code_hash": "h", "attempt": 1, "outcome": "ok",
                   "timestamp": 1_700_000_000.0} for i, f in enumerate(["__main__.aggregate", "jobs.crunch"])])
    res = CliRunner().invoke(main, ["profiles", "aggregate"])
    assert res.exit_code == 0 and "showing __main__.aggregate" in res.output and "no profiles" not in res.output
    res = CliRunner().invoke(main, ["profiles", "agregate"])
    assert "no profiles of 'agregate'; the store has: __main__.aggregate, jobs.crunch" in res.output
    res = CliRunner().invoke(main, ["demo", "--tasks", "0"])
    assert res.exit_code == 2 and "--tasks" in res.output  # refused before a cluster is started
    monkeypatch.setattr(session, "_config", None)


def test_profiles_of_a_closures_bare_name_shows_its_hashed_stored_name(tmp_path, monkeypatch):
    """A closure is stored as ``mod.make.<locals>.step#<hash>``: ``raysched profiles step`` listed
    every stored name instead of showing it (the hash suffix kept it from matching)."""
    from raysched.cli import main
    from raysched.runtime import session
    from raysched.store.profiles import ProfileStore

    monkeypatch.setenv("RAYSCHED_HOME", str(tmp_path / "h"))
    monkeypatch.setattr(session, "_config", None)
    store = ProfileStore(tmp_path / "h")
    store.append([{"row_id": f"r{i}", "function": f, "code_hash": "h", "attempt": 1, "outcome": "ok",
                   "timestamp": 1_700_000_000.0}
                  for i, f in enumerate(["jobs.make.<locals>.step#94a072d3", "jobs.crunch"])])
    res = CliRunner().invoke(main, ["profiles", "step"])
    assert res.exit_code == 0 and "showing jobs.make.<locals>.step#94a072d3" in res.output, res.output
    monkeypatch.setattr(session, "_config", None)


def test_the_demo_says_how_far_an_under_allocated_task_went_over():
    """'4 of 16 tasks used more than requested' read like a failure when each was 1-3 MiB over."""
    from raysched.demo import allocation_summary
    from raysched.types import GiB, MiB

    pairs = [(1 * GiB, 700 * MiB), (368 * MiB, 371 * MiB), (200 * MiB, 210 * MiB), (512 * MiB, 512 * MiB)]
    over, under, worst_mib, worst_share = allocation_summary(pairs)
    assert over == pytest.approx(324 / 1024)  # only the first asked for more than it used
    assert under == 2 and worst_mib == pytest.approx(10) and worst_share == pytest.approx(0.05)
    assert allocation_summary([]) == (0.0, 0, 0.0, 0.0)


def test_a_home_that_holds_demo_runs_gives_the_next_demo_a_new_home_so_its_first_round_is_cold(tmp_path):
    # Run twice in one folder, the demo's "cold" round was sized from the first run's history
    # (source `history`), and "warm over-allocation is X% of cold" compared nothing.
    from raysched.demo import DEMO_FUNCTION, home_for_a_cold_start
    from raysched.store.profiles import ProfileStore

    assert home_for_a_cold_start(tmp_path, 0, 0.0) == tmp_path
    ProfileStore(tmp_path).append([{"row_id": "r1", "function": DEMO_FUNCTION, "code_hash": "h", "attempt": 1,
                                    "outcome": "ok", "timestamp": 1_700_000_000.0}])
    runs = len(ProfileStore(tmp_path, writable=False).read(function=DEMO_FUNCTION))
    fresh = home_for_a_cold_start(tmp_path, runs, 1_800_000_000.0)
    assert runs == 1 and fresh == tmp_path / "demo-runs" / "20270115-080000"
    assert len(ProfileStore(fresh, writable=False).read(function=DEMO_FUNCTION)) == 0


def test_the_demo_points_at_mlflow_only_when_it_holds_runs(tmp_path):
    # The profiler may create mlflow.db before it trains anything: the demo pointed at an
    # empty MLflow store (16 tasks train no model).
    import sqlite3

    from raysched.demo import _mlflow_runs

    db = tmp_path / "mlflow.db"
    assert _mlflow_runs(db) == 0
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE runs (run_uuid TEXT)")
    assert _mlflow_runs(db) == 0
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO runs VALUES ('a'), ('b')")
    assert _mlflow_runs(db) == 2
    db.write_bytes(b"not a database")
    assert _mlflow_runs(db) == 0


def test_profiles_and_compact_take_a_home_as_import_does(tmp_path, monkeypatch):
    from raysched.cli import main
    from raysched.store.profiles import ProfileStore

    monkeypatch.delenv("RAYSCHED_HOME", raising=False)
    monkeypatch.chdir(tmp_path)  # the default home, ./.raysched, has no store
    other = tmp_path / "elsewhere"
    store = ProfileStore(other)
    for i in range(3):
        store.append([{"row_id": f"r{i}", "function": "jobs.crunch", "code_hash": "h", "attempt": 1, "outcome": "ok",
                       "timestamp": 1_700_000_000.0 + i}])
    res = CliRunner().invoke(main, ["profiles", "--home", str(other)])
    assert res.exit_code == 0 and res.output.count("jobs.crunch") == 3, res.output
    res = CliRunner().invoke(main, ["compact", "--all", "--home", str(other)])
    assert res.exit_code == 0 and "3 part file(s) -> 1" in res.output, res.output
    res = CliRunner().invoke(main, ["profiles", "--home", str(tmp_path / "none")])
    assert "no store at" in res.output and "(--home)" in res.output
    assert not (tmp_path / "none").exists() and not (tmp_path / ".raysched").exists()


def test_the_config_command_lists_every_knob_with_its_value_and_meaning(monkeypatch, tmp_path):
    # help(RayschedConfig) showed a signature of ~90 knobs and none of their comments.
    import dataclasses

    from raysched.cli import main
    from raysched.config import RayschedConfig

    rows = RayschedConfig.describe()
    assert [r[1] for r in rows] == [f.name for f in dataclasses.fields(RayschedConfig)]
    meanings = {name: meaning for _, name, _, meaning in rows}
    assert meanings["min_history_for_model"].startswith("Runs needed before the XGBoost model is trained")
    assert [name for name, meaning in meanings.items() if not meaning] == []  # 18 of 93 had none
    # A knob below another, with no comment of its own, has its group's comment; a blank line ends a group.
    assert meanings["short_call_streak"] == meanings["short_call_wall_s"]
    assert meanings["default_num_cpus"] != meanings["default_memory_bytes"]
    monkeypatch.setenv("RAYSCHED_HOME", str(tmp_path))
    res = CliRunner().invoke(main, ["config"])
    assert res.exit_code == 0 and f"home = {str(tmp_path)!r}" in res.output
    assert "cost_failure_overhead_s = 60.0" in res.output and "# cold start" in res.output
    res = CliRunner().invoke(main, ["config", "overhead"])
    assert res.exit_code == 2 and "cost_failure_overhead_s" in res.output
    res = CliRunner().invoke(main, ["config", "memory_margn"])  # a misspelling: configure() names it, so does this
    assert res.exit_code == 2 and "did you mean memory_margin" in res.output
    assert "describe()" in RayschedConfig.__doc__


def test_profiles_command_reads_only_the_newest_parts_it_shows(tmp_path, monkeypatch):
    """It read every row of the home to print the last few: 21 s and 8 GB at 7 million rows."""
    from raysched.cli import main
    from raysched.store import parquet
    from raysched.store.profiles import ProfileStore

    sys_path = str(Path(__file__).resolve().parent)
    monkeypatch.syspath_prepend(sys_path)
    from test_store import row

    store = ProfileStore(tmp_path)
    for part in range(12):
        store.append([row(call_id=f"c{part}-{i}", peak_rss_bytes=part * 1000 + i) for i in range(5)])
    read = []
    original = parquet.ParquetTable._read_part
    monkeypatch.setattr(parquet.ParquetTable, "_read_part", lambda self, name, columns: (read.append(name),
                                                                                          original(self, name, columns))[1])
    res = CliRunner().invoke(main, ["profiles", "mod.f", "--limit", "3", "--home", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "11004" in res.output and "11002" in res.output and "11001" not in res.output
    assert len(read) == 1  # the newest part holds the three rows shown


def test_the_demo_refuses_an_unusable_home_in_one_line_before_starting_ray(monkeypatch, tmp_path):
    # It printed a four-part traceback, after ~11 s of Ray start-up for an unwritable home.
    from raysched.cli import main

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    monkeypatch.setenv("RAYSCHED_HOME", str(a_file))
    res = CliRunner().invoke(main, ["demo", "--tasks", "2"])
    assert res.exit_code == 1, res.output
    assert "Error: raysched store" in res.output and "Traceback" not in res.output
    assert "Starting a local Ray cluster" not in res.output


def test_a_best_other_method_that_wastes_nothing_is_said_so_and_the_json_stays_json(tmp_path):
    """The README's own example (``raysched eval tests/fixtures/replay --min-rows 10``)
    printed "raysched / best other (tovar): inf -> LOSES" and a median ratio of inf, and
    ``--json`` wrote ``Infinity``, which strict JSON readers refuse (a helper's audit)."""
    out = tmp_path / "r.json"
    res = CliRunner().invoke(eval_command, [str(FIXTURES), "--min-rows", "10", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "best other wastes 0" in res.output and "inf" not in res.output.replace("info", "")

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    found = json.loads(out.read_text(), parse_constant=refuse)
    verdicts = [w["raysched_vs_best_other"] for w in found["workflows"].values() if "raysched_vs_best_other" in w]
    assert any(v["ratio"] is None and v["best_other_wastes_nothing"] for v in verdicts)


def test_two_traces_of_one_name_are_both_in_the_json_and_a_file_named_twice_is_read_once(tmp_path):
    """An audit: the JSON is keyed by workflow name, and the name was the file's stem: of
    a/iwd.csv and b/iwd.csv only the last was kept, without a word."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "trace.csv").write_text((FIXTURES / "nextflow_small.csv").read_text())
    out = tmp_path / "r.json"
    first = tmp_path / "a" / "trace.csv"
    res = CliRunner().invoke(eval_command, [str(first), str(tmp_path / "b"), str(first), "--format", "nextflow",
                                            "--methods", "presets,oracle", "--json", str(out)])
    assert res.exit_code == 0, res.output
    workflows = json.loads(out.read_text())["workflows"]
    assert list(workflows) == ["a/trace", "b/trace"]
    assert workflows["a/trace"]["path"] == str(first)
    for method in ("presets", "oracle"):
        a, b = workflows["a/trace"]["methods"][method], workflows["b/trace"]["methods"][method]
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_a_run_repeated_in_a_trace_is_skipped_and_counted_and_impossible_cores_are_unknown(tmp_path):
    """An audit: a trace holding its runs twice (two copies joined) was replayed with twice the
    tasks and imported with twice the rows; a %cpu of 1e308 became a prediction of 1e306 cores."""
    from raysched.replay.readers import read_trace
    from raysched.store.profiles import ProfileStore

    lines = (FIXTURES / "nextflow_small.csv").read_text().splitlines(keepends=True)
    doubled = tmp_path / "doubled.csv"
    doubled.write_text("".join(lines) + "".join(lines[1:]))
    once, twice = read_trace(FIXTURES / "nextflow_small.csv", "nextflow"), read_trace(doubled, "nextflow")
    # every copy of a usable row: the second copies of broken rows are counted by their defect
    assert len(twice.rows) == len(once.rows) and twice.skipped["duplicating an earlier row"] == len(once.rows)
    # Without an id or a time stamp, runs alike are genuine runs (a review: 47 of chipseq's cut
    # to process, peak_rss and realtime were dropped): nothing is a repeat.
    import pandas as pd

    bare = tmp_path / "bare.csv"
    pd.read_csv(doubled)[["process", "peak_rss", "realtime"]].to_csv(bare, index=False)
    assert len(read_trace(bare, "nextflow").rows) == 2 * len(once.rows) + 2  # (+ the two FAILED, no status now)
    home = tmp_path / "home"
    res = CliRunner().invoke(import_command, [str(doubled), "--format", "nextflow", "--home", str(home)])
    assert res.exit_code == 0 and "45 new row(s)" in res.output, res.output
    header = lines[0].rstrip("\n").split(",")
    bad = tmp_path / "bad_cores.csv"
    rows = [line.rstrip("\n").split(",") for line in lines[1:4]]
    rows[0][header.index("%cpu")], rows[1][header.index("%cpu")], rows[2][header.index("cpus")] = "1e308", "-50", "-1"
    bad.write_text(lines[0] + "".join(",".join(r) + "\n" for r in rows))
    trace = read_trace(bad, "nextflow")
    assert trace.rows["cpu_pct"].isna().tolist()[:2] == [True, True] and trace.rows["cpus"].isna().iloc[2]
    assert len(ProfileStore(home).read()) == 45


def test_version_is_printed_without_an_installed_distribution():
    """``raysched --version`` read the installed package's metadata: run from a checkout on
    PYTHONPATH, or shipped to a cluster as ``py_modules``, it raised RuntimeError instead."""
    import raysched
    from raysched.cli import main

    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert res.output.strip() == f"raysched, version {raysched.__version__}"
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert f'version = "{raysched.__version__}"' in pyproject.read_text()  # the one pip installs


def test_a_demo_told_to_join_a_cluster_that_is_not_there_says_so_in_one_line(tmp_path):
    """``raysched demo --address HOST:PORT`` with nothing listening there waited minutes in
    Ray's retries, printing its warnings, before Ray's full traceback (a helper's audit).
    (Not ``auto``: Ray's ``auto`` falls back to any Ray cluster it finds among the machine's
    processes, so with another test's cluster up the demo joined that one.)"""
    import os
    import subprocess
    import sys

    from conftest import free_port

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAYSCHED_HOME=str(tmp_path / "h"), RAY_AUTH_MODE="disabled")
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "raysched.cli", "demo", "--address", address], env=env,
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert f"Error: cannot join the Ray cluster at '{address}': nothing answers at {address}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and time.monotonic() - started < 30, res.stderr


def test_an_import_that_finds_some_rows_held_already_says_how_many(tmp_path):
    """Lotaru's methylseq_n2.csv repeats the 154 training runs of methylseq_c2.csv: imported
    after it, the command said '35 new row(s)' of a 189-row trace and nothing of the others."""
    lines = (FIXTURES / "nextflow_small.csv").read_text().splitlines(keepends=True)
    first, grown = tmp_path / "first.csv", tmp_path / "grown.csv"
    first.write_text("".join(lines[:-5]))
    grown.write_text("".join(lines))
    home = tmp_path / "home"
    assert CliRunner().invoke(import_command, [str(first), "--home", str(home)]).exit_code == 0
    res = CliRunner().invoke(import_command, [str(grown), "--home", str(home)])
    assert res.exit_code == 0, res.output
    assert "grown.csv: 5 new row(s)" in res.output, res.output
    assert "(40 more of its rows were imported before)" in res.output, res.output


def test_a_method_named_twice_is_replayed_once(tmp_path):
    """--methods presets,presets replayed presets twice and gave the Markdown two presets columns."""
    md = tmp_path / "r.md"
    res = CliRunner().invoke(eval_command, [str(FIXTURES / "nextflow_small.csv"), "--min-rows", "10",
                                            "--methods", "presets,oracle,presets", "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    assert md.read_text().splitlines()[0].split(" | ")[1:4] == ["presets", "oracle", "best other"], md.read_text()


def test_a_file_of_a_folder_that_is_no_trace_is_passed_over_not_a_failure(tmp_path):
    """nf-core's pipeline_info holds pipeline_report.txt beside execution_trace_*.txt: `raysched
    import pipeline_info` imported the trace and then failed (exit 1, '1 file(s) skipped')."""
    import shutil

    folder = tmp_path / "pipeline_info"
    folder.mkdir()
    shutil.copy(FIXTURES / "nextflow_small.csv", folder / "execution_trace_2026-12-01.txt")
    (folder / "pipeline_report.txt").write_text("--------\n  nf-core/rnaseq v3.14\n--------\nRun Name: x\n")
    res = CliRunner().invoke(import_command, [str(folder), "--home", str(tmp_path / "h")])
    assert res.exit_code == 0, res.output
    assert "imported 45 new row(s)" in res.output and "pipeline_report.txt: passed over, not a trace" in res.output
    res = CliRunner().invoke(eval_command, [str(folder), "--methods", "presets,oracle", "--min-rows", "10"])
    assert res.exit_code == 0 and "passed over" in res.output, res.output
    # Named on the command line, it is still an error; and a folder of no trace at all is one too.
    res = CliRunner().invoke(import_command, [str(folder / "pipeline_report.txt"), "--home", str(tmp_path / "h")])
    assert res.exit_code == 1 and "cannot tell the trace format" in res.output, res.output
    (folder / "execution_trace_2026-12-01.txt").unlink()
    for command in (import_command, eval_command):
        res = CliRunner().invoke(command, [str(folder)])
        assert res.exit_code == 2 and "no trace files found" in res.output, res.output
