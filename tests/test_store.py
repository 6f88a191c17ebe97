"""The Parquet profile store: append-only parts, validation, quarantine, de-duplication, concurrency."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import re
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysched.errors import InvalidInput, StoreError
from raysched.store.parquet import ParquetTable, newest_mergeable_run, size_tier
from raysched.store.profiles import ProfileStore
from raysched.store.schema import (
    EVENT_SCHEMA,
    PROFILE_SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    new_row_id,
)
from raysched.types import Outcome

UTC = dt.timezone.utc


def row(**overrides):
    base = {
        "row_id": new_row_id(),
        "function": "mod.f",
        "code_hash": "h1",
        "call_id": "c1",
        "attempt": 1,
        "outcome": "ok",
        "timestamp": 1_700_000_000.5,
        "peak_rss_bytes": 200 * 1024 * 1024,
        "memory_sample_bytes": 200 * 1024 * 1024,
        "cpu_seconds": 1.5,
        "wall_seconds": 2.0,
        "tags": ["a", "b"],
        "source": "ray",
    }
    base.update(overrides)
    return base


def parts(store: ProfileStore) -> list[Path]:
    return sorted((store.home / "profiles").glob("part-*.parquet"))


@pytest.fixture
def store(tmp_path):
    return ProfileStore(tmp_path / "home")


# ---------------------------------------------------------------- the home


def test_home_under_a_regular_file_raises_store_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="a-file"):
        ProfileStore(blocker / "home")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_home_under_a_read_only_folder_raises_store_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="cannot create or write"):
            ProfileStore(ro / "home")
    finally:
        ro.chmod(0o700)


def test_existing_read_only_home_raises_store_error(tmp_path):
    # Works as root too: a folder whose path component is a file can never be written.
    (tmp_path / "home").write_text("")
    with pytest.raises(StoreError, match="writable"):
        ParquetTable(tmp_path / "home" / "profiles", PROFILE_SCHEMA, name="profiles")


# ---------------------------------------------------------------- append and read


def test_round_trip_converts_types_and_timestamps(store):
    naive = dt.datetime(2024, 5, 1, 12, 0, 0, 123456)
    aware = dt.datetime(2024, 5, 1, 14, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    rows = [
        row(row_id="r1", timestamp=naive, started_at=1_714_564_800.25, outcome=Outcome.OOM_KILLED,
            attempt=np.int64(2), input_size=np.int32(7), tags=("x",), arg_shapes=np.array(["ndarray(3,)"])),
        row(row_id="r2", timestamp=aware, started_at=pd.Timestamp("2024-05-01 11:00:00"), cpu_cores=np.float32(0.5),
            allocated_memory_bytes=3.0 * 2**30, tags=[]),
    ]
    assert store.append(rows) == 2
    df = store.read()
    assert list(df.columns) == PROFILE_SCHEMA.names
    r1, r2 = df.iloc[0], df.iloc[1]
    assert r1.row_id == "r1" and r2.row_id == "r2"
    assert r1.timestamp == pd.Timestamp("2024-05-01 12:00:00.123456", tz="UTC")  # naive means UTC
    assert r2.timestamp == pd.Timestamp("2024-05-01 12:00:00", tz="UTC")  # aware converted
    assert r1.started_at == pd.Timestamp(1_714_564_800.25, unit="s", tz="UTC")
    assert r2.started_at == pd.Timestamp("2024-05-01 11:00:00", tz="UTC")
    assert r1.outcome == "oom_killed" and r1.attempt == 2 and r1.input_size == 7
    assert list(r1.tags) == ["x"] and list(r2.tags) == [] and list(r1.arg_shapes) == ["ndarray(3,)"]
    assert r2.allocated_memory_bytes == 3 * 2**30 and r2.cpu_cores == 0.5
    assert (df.schema_version == SCHEMA_VERSION).all()
    # columns a row did not give are null
    assert pd.isna(r1.error) and pd.isna(r1.worker_pid) and r1.dependencies is None and np.isnan(r1.predicted_cpu)


def test_dtypes_do_not_depend_on_data(store, tmp_path):
    empty = store.read()
    assert list(empty.columns) == PROFILE_SCHEMA.names and len(empty) == 0
    store.append([row(worker_pid=None), row(worker_pid=12, input_size=None)])
    full = store.read()
    assert empty.dtypes.equals(full.dtypes), (empty.dtypes[empty.dtypes != full.dtypes], full.dtypes)
    assert str(full.dtypes["peak_rss_bytes"]) == "Int64"
    assert str(full.dtypes["worker_pid"]) == "Int32"
    assert str(full.dtypes["timestamp"]) == "datetime64[us, UTC]"
    assert full.dtypes["cpu_seconds"] == np.float64
    events = store.events()
    assert list(events.columns) == EVENT_SCHEMA.names and len(events) == 0


def test_nan_and_missing_values_are_null(store):
    store.append([row(peak_rss_bytes=float("nan"), cpu_seconds=float("nan"), error=None, input_size=pd.NA)])
    r = store.read().iloc[0]
    assert pd.isna(r.peak_rss_bytes) and np.isnan(r.cpu_seconds) and pd.isna(r.input_size)


def test_empty_append_is_a_no_op(store):
    assert store.append([]) == 0
    assert parts(store) == []
    assert store.count() == 0


def test_each_append_writes_one_named_part_and_leaves_no_temporary_file(store):
    for _ in range(3):
        store.append([row(), row()])
    names = [p.name for p in parts(store)]
    assert len(names) == 3
    for name in names:
        assert re.fullmatch(rf"part-\d{{20}}-{os.getpid()}-[0-9a-f]{{8}}\.parquet", name), name
    assert sorted(os.listdir(store.home / "profiles")) == sorted(names)
    metadata = pq.read_schema(parts(store)[0]).metadata
    assert metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()


def test_unknown_column_is_rejected_by_name_and_nothing_is_written(store):
    with pytest.raises(InvalidInput, match="'peak_memory'"):
        store.append([row(), row(peak_memory=5)])
    assert parts(store) == [] and store.count() == 0


@pytest.mark.parametrize(
    "column, value",
    [
        ("peak_rss_bytes", "lots"),
        ("attempt", 2.5),
        ("attempt", True),
        ("rung", 70_000),  # int16
        ("cpu_seconds", "1.5"),
        ("function", 3),
        ("tags", "gpu"),  # a bare string is not a list of tags
        ("tags", ["ok", 3]),
        ("timestamp", "yesterday"),
        ("timestamp", 1.7e18),  # nanoseconds taken for seconds: past the column's range
        pytest.param("started_at", 10**400, id="started_at-past-a-float"),
        pytest.param("cpu_seconds", 10**400, id="cpu_seconds-past-a-float"),
        ("error", b"bytes"),
    ],
)
def test_wrong_type_names_column_and_value_and_writes_nothing(store, column, value):
    with pytest.raises(InvalidInput) as info:
        store.append([row(), row(**{column: value})])
    message = str(info.value)
    assert repr(column) in message and repr(value) in message
    assert parts(store) == []


def test_outcome_is_validated(store):
    with pytest.raises(InvalidInput, match="'crashed'") as info:
        store.append([row(outcome="crashed")])
    assert "oom_killed" in str(info.value)
    assert parts(store) == []
    for outcome in Outcome:
        store.append([row(outcome=outcome)])
    assert sorted(store.read().outcome) == sorted(o.value for o in Outcome)


def test_required_columns_must_be_given(store):
    for column in ("row_id", "function", "code_hash"):
        bad = row()
        del bad[column]
        with pytest.raises(InvalidInput, match=f"'{column}' must not be null"):
            store.append([bad])
    assert parts(store) == []


def test_filters(store):
    store.append([row(function="mod.f", code_hash="h1"), row(function="mod.f", code_hash="h2")])
    store.append([row(function="mod.g", code_hash="h1"), row(function="mod.f", code_hash="h1")])
    assert len(store.read()) == 4
    assert len(store.read(function="mod.f")) == 3
    assert set(store.read(function="mod.f").function) == {"mod.f"}
    assert len(store.read(function="mod.f", code_hash="h1")) == 2
    assert len(store.read(code_hash="h2")) == 1
    assert len(store.read(function="nope")) == 0
    assert list(store.read(function="nope").columns) == PROFILE_SCHEMA.names
    assert len(store.profiles.read({"function": ["mod.f", "mod.g"], "code_hash": "h1"})) == 3
    with pytest.raises(InvalidInput, match="'colour'"):
        store.profiles.read({"colour": "red"})


def test_retried_batches_are_deduplicated_keeping_the_last_write(store):
    batch = [row(row_id=f"r{i}") for i in range(5)]
    store.append(batch)
    store.append(batch)  # a writer retried
    store.append([row(row_id="r2", peak_rss_bytes=999)])
    df = store.read()
    assert sorted(df.row_id) == [f"r{i}" for i in range(5)]
    assert df.set_index("row_id").loc["r2", "peak_rss_bytes"] == 999
    assert store.count() == 5


def test_functions_summary(store):
    assert list(store.functions().columns) == ["function", "code_hash", "rows", "last_timestamp"]
    store.append([row(function="mod.f", code_hash="h1", timestamp=100.0), row(function="mod.f", code_hash="h1", timestamp=300.0)])
    store.append([row(function="mod.f", code_hash="h2", timestamp=200.0), row(function="mod.g", code_hash="h9", timestamp=50.0)])
    summary = store.functions()
    got = {(r.function, r.code_hash): (r.rows, r.last_timestamp.timestamp()) for r in summary.itertuples()}
    assert got == {("mod.f", "h1"): (2, 300.0), ("mod.f", "h2"): (1, 200.0), ("mod.g", "h9"): (1, 50.0)}


def test_events(store):
    event = dict(function="mod.f", code_hash="h1", call_id="c1", attempt=1, rule="memory_over_limit",
                 action="kill", measured=2.0e9, allocated=1.0e9, detail="over", node_id="n1", timestamp=10.0)
    store.append_events([dict(event, row_id="e1"), dict(event, row_id="e2", function="mod.g")])
    assert len(store.events()) == 2
    only = store.events("mod.g")
    assert list(only.row_id) == ["e2"] and only.iloc[0].rule == "memory_over_limit"
    assert store.count() == 0  # events live in their own table
    with pytest.raises(InvalidInput, match="'peak_rss_bytes'"):
        store.append_events([dict(event, row_id="e3", peak_rss_bytes=1)])


# ---------------------------------------------------------------- damaged and foreign parts


def test_corrupted_and_truncated_parts_are_quarantined(store):
    for i in range(3):
        store.append([row(row_id=f"r{i}-{j}") for j in range(4)])
    first, second, third = parts(store)
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])  # truncated
    first.write_bytes(b"this is not parquet" * 50)  # garbage
    with pytest.warns(RuntimeWarning) as record:
        df = store.read()
    assert sorted(df.row_id) == [f"r2-{j}" for j in range(4)]
    messages = " ".join(str(w.message) for w in record)
    assert first.name in messages and second.name in messages
    assert "moved it to" in messages
    quarantine = store.home / "profiles" / "quarantine"
    assert sorted(p.name for p in quarantine.iterdir()) == sorted([first.name, second.name])
    assert parts(store) == [third]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once moved aside, reads are quiet again
        assert store.count() == 4


def _write_foreign_part(folder: Path, table: pa.Table, version: int | None) -> Path:
    metadata = {} if version is None else {SCHEMA_VERSION_KEY: str(version).encode()}
    path = folder / f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
    pq.write_table(table.replace_schema_metadata(metadata), path)
    return path


def test_part_from_a_newer_schema_version_is_read_by_the_known_columns_and_never_merged_or_quarantined(store):
    """A newer version only adds columns: its rows read by the columns this code knows.
    Skipped whole, a newer raysched's tidy (which stamps the old rows it merges with its
    version) hid every row from this one: 0 of 1,500 rows read after a rollback."""
    store.append([row(row_id="mine")])
    newer = pa.table({"row_id": ["future"], "function": ["mod.f"], "code_hash": ["h1"], "hologram": [1.0]})
    path = _write_foreign_part(store.home / "profiles", newer, SCHEMA_VERSION + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = store.read()
    assert sorted(df.row_id) == ["future", "mine"] and "hologram" not in df
    store.append([row(row_id="again")])
    with pytest.warns(RuntimeWarning, match="hologram .* would be lost"):
        store.compact(min_parts=2)
    assert path.exists() and not (store.home / "profiles" / "quarantine").exists()
    # A newer part whose known columns do not read as this code's is skipped, not moved aside.
    odd = pa.table({"row_id": [[1, 2]], "function": ["mod.f"], "code_hash": ["h1"]})
    odd_path = _write_foreign_part(store.home / "profiles", odd, SCHEMA_VERSION + 1)
    with pytest.warns(RuntimeWarning, match=f"schema version {SCHEMA_VERSION + 1}.*Upgrade raysched"):
        assert sorted(store.read().row_id) == ["again", "future", "mine"]
    assert odd_path.exists() and not (store.home / "profiles" / "quarantine").exists()


def test_a_parquet_file_of_another_table_among_the_parts_is_quarantined_not_read_as_no_rows(store):
    """It read silently as zero rows; a file in the folder that is no part of the table is
    most likely something copied there by mistake, and the user should hear of it."""
    store.append([row(row_id="mine")])
    other = pa.table({"sample": ["a", "b"], "reads": [10, 20]})
    path = _write_foreign_part(store.home / "profiles", other, None)
    with pytest.warns(RuntimeWarning, match="no row_id, function, code_hash column.*not a part of this table"):
        df = store.read()
    assert list(df.row_id) == ["mine"]
    assert (store.home / "profiles" / "quarantine" / path.name).exists() and not path.exists()


def test_a_part_of_the_events_table_among_the_profiles_is_set_aside_not_merged_away(store):
    """It read as a profile row with no outcome, and a compaction merged it and deleted the
    file: the event's own columns were gone."""
    import shutil

    store.append([row(row_id=f"mine-{i}") for i in range(2)])
    store.append([row(row_id="mine-2")])
    store.append_events([dict(row_id="e1", function="mod.f", code_hash="h1", call_id="c1", attempt=1, rule="memory",
                              action="warn", measured=2.0e9, allocated=1.0e9, detail="over", node_id="n1",
                              timestamp=10.0)])
    event_part = sorted((store.home / "events").glob("part-*.parquet"))[0]
    stray = store.home / "profiles" / event_part.name
    shutil.copy(event_part, stray)
    with pytest.warns(RuntimeWarning, match="a part of the table 'events', not of this one"):
        assert store.profiles.compact(min_parts=2) == 2
    assert (store.home / "profiles" / "quarantine" / stray.name).exists()  # set aside whole, with its columns
    assert sorted(store.read().row_id) == ["mine-0", "mine-1", "mine-2"]


def test_a_read_error_of_the_system_leaves_the_part_in_place_and_the_next_read_sees_it(store, monkeypatch):
    """A MemoryError (pyarrow's ArrowMemoryError is one) or an I/O error of the disk said
    nothing of the file, but the part was quarantined and its rows hidden for good."""
    import errno

    for i in range(3):
        store.append([row(row_id=f"r{i}")])
    real = pq.ParquetFile
    for error in (MemoryError("out of memory"), OSError(errno.EIO, "Input/output error")):
        calls = []

        def flaky(path, *a, **kw):
            calls.append(path)
            if len(calls) == 2:
                raise error
            return real(path, *a, **kw)

        monkeypatch.setattr(pq, "ParquetFile", flaky)
        with pytest.raises(StoreError, match="cannot read"):
            store.read()
        monkeypatch.setattr(pq, "ParquetFile", real)
        assert sorted(store.read().row_id) == ["r0", "r1", "r2"]
        assert not (store.home / "profiles" / "quarantine").exists()


def test_a_part_with_columns_this_schema_lacks_is_read_but_not_merged(store):
    store.append([row(row_id="a")])
    store.append([row(row_id="b")])
    store.append([row(row_id="c")])
    path = parts(store)[-1]  # as a later raysched of the same schema version might write it
    table = pq.read_table(path)
    pq.write_table(table.append_column("gpu_peak_bytes", pa.array([7])).replace_schema_metadata(table.schema.metadata),
                   path)
    with pytest.warns(RuntimeWarning, match="gpu_peak_bytes are not in this raysched's schema"):
        assert store.profiles.compact(min_parts=2) == 2
    assert path.exists() and pq.read_schema(path).names[-1] == "gpu_peak_bytes"
    assert sorted(store.read().row_id) == ["a", "b", "c"]


def test_part_from_an_older_schema_version_reads_with_missing_columns_null(store):
    older = pa.table(
        {
            "row_id": ["old"],
            "function": ["mod.f"],
            "code_hash": ["h1"],
            "peak_rss_bytes": pa.array([123], pa.int32()),  # narrower type is cast
            "timestamp": pa.array([dt.datetime(2020, 1, 1, tzinfo=UTC)], pa.timestamp("us", tz="UTC")),
        }
    )
    _write_foreign_part(store.home / "profiles", older, 0)
    store.append([row(row_id="new")])
    df = store.read()
    assert list(df.columns) == PROFILE_SCHEMA.names
    assert list(df.row_id) == ["old", "new"]
    old = df.iloc[0]
    assert old.peak_rss_bytes == 123 and pd.isna(old.cpu_seconds) and pd.isna(old.outcome) and old.tags is None
    assert str(df.dtypes["peak_rss_bytes"]) == "Int64"
    # compaction upgrades it to the current version
    assert store.profiles.compact(min_parts=2) == 2
    assert pq.read_schema(parts(store)[0]).metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()
    assert list(store.read().row_id) == ["old", "new"]


# ---------------------------------------------------------------- compaction


def test_compact_merges_parts_and_keeps_every_row(store):
    for i in range(10):
        store.append([row(row_id=f"r{i}-{j}") for j in range(3)])
    store.append([row(row_id="r0-0", peak_rss_bytes=7)])  # a later version of an early row
    assert store.profiles.compact(min_parts=64) == 0
    assert len(parts(store)) == 11
    before = store.read()
    assert store.profiles.compact(min_parts=5) == 11
    assert len(parts(store)) == 1
    after = store.read()
    assert sorted(after.row_id) == sorted(before.row_id) and len(after) == 30
    assert after.set_index("row_id").loc["r0-0", "peak_rss_bytes"] == 7
    assert pq.read_metadata(parts(store)[0]).num_rows == 30  # duplicates dropped on disk too
    store.append([row(row_id="r0-0", peak_rss_bytes=8)])  # written after the compaction: still the last
    assert store.read().set_index("row_id").loc["r0-0", "peak_rss_bytes"] == 8


def test_size_tiers_pick_the_newest_run_of_adjacent_parts_of_one_tier():
    unit = 100
    assert [size_tier(n, 10, unit) for n in (0, 99, 100, 999, 1000, 10_000)] == [0, 0, 1, 1, 2, 3]
    # fanout 4: tiers end at 100, 400, 1600, 6400 bytes. Oldest first: a tier-3 part, four
    # tier-1 parts, four tier-0 parts
    sizes = [5000, 300, 200, 350, 150, 10, 20, 30, 40]
    assert newest_mergeable_run(sizes, 4, unit) == (5, 9)  # the lowest tier's newest run first
    # three tier-0 parts are not a run yet: the tier-1 run takes them along
    assert newest_mergeable_run(sizes[:-1], 4, unit) == (1, 8)
    # parts that straddle a tier's bound merge together, never with a bigger tier's part
    assert newest_mergeable_run([5000, 10, 150, 10, 150, 10], 5, unit) == (1, 6)
    assert newest_mergeable_run([5000, 10, 150, 10, 150], 5, unit) is None
    assert newest_mergeable_run([], 2, unit) is None


def test_tidy_keeps_the_part_count_logarithmic_and_every_row_in_write_order(store):
    """A long run writes a part per commit; merged as it goes, a read opens a few parts, not thousands."""
    table = store.profiles
    assert table.tidy(fanout=4) == 0  # nothing to merge yet
    rng = np.random.default_rng(0)  # figures that do not compress away, as measured ones do not
    for i in range(120):
        store.append([row(row_id=f"r{i:03d}-{j}", call_id=uuid.uuid4().hex, peak_rss_bytes=int(rng.integers(1 << 30)),
                          cpu_seconds=float(rng.random())) for j in range(20)])
        store.append_events([{"row_id": f"e{i}", "function": "mod.f", "rule": "r", "action": "warn",
                              "timestamp": 1_700_000_000.0}])
        if i % 4 == 3:
            table.tidy(fanout=4, unit_bytes=8 * 1024)
    # Tiers of 8 KiB x 4^k (one append is tier 0): at most 3 parts per tier stay.
    assert len(parts(store)) <= 12, [p.stat().st_size for p in parts(store)]
    read = store.read()
    assert len(read) == 2400 and list(read.row_id) == [f"r{i:03d}-{j}" for i in range(120) for j in range(20)]
    # Adjacent parts only: a tier's parts are older than the smaller tiers' parts.
    sizes = [p.stat().st_size for p in parts(store)]
    tiers = [size_tier(n, 4, 8 * 1024) for n in sizes]
    assert tiers == sorted(tiers, reverse=True) and max(tiers) >= 2, tiers  # merged parts were merged again
    assert store.tidy(fanout=4) > 0 and len(store.events()) == 120  # the event table too
    with pytest.raises(InvalidInput, match="fanout"):
        table.tidy(fanout=1)


def test_tidy_merges_only_adjacent_parts_so_the_last_written_row_still_wins(store):
    store.append([row(row_id="x", peak_rss_bytes=1)])
    for i in range(3):
        store.append([row(row_id=f"r{i}")])
    store.append([row(row_id="x", peak_rss_bytes=2)])  # a retried batch, written later
    assert store.profiles.tidy(fanout=2) == 5
    assert store.read().set_index("row_id").loc["x", "peak_rss_bytes"] == 2
    store.append([row(row_id="x", peak_rss_bytes=3)])
    assert store.read().set_index("row_id").loc["x", "peak_rss_bytes"] == 3


def test_read_recent_is_the_tail_of_read_and_opens_only_the_parts_that_hold_it(store, monkeypatch):
    for i in range(12):
        store.append([row(row_id=f"r{i}-{j}", function="f" if j % 2 else "g", call_id=f"c{i}-{j}") for j in range(4)])
    store.append([row(row_id="r11-1", function="f", call_id="again")])  # a retried batch: the last write wins
    opened = []
    original = ParquetTable._read_part
    monkeypatch.setattr(ParquetTable, "_read_part", lambda self, name, cols: opened.append(name) or original(self, name, cols))
    for n, function in ((0, "f"), (1, "f"), (3, "f"), (5, None), (24, "f"), (100, "f"), (7, "nobody")):
        expected = store.read(function)
        expected = expected.iloc[max(0, len(expected) - n):].reset_index(drop=True)
        opened.clear()
        got = store.read_recent(n, function)
        pd.testing.assert_frame_equal(got, expected)
        if n == 3:
            assert len(opened) == 3, opened  # the newest part (one row of f) and the two before it
    assert list(store.read_recent(2, "f").call_id) == ["c11-3", "again"]
    with pytest.raises(InvalidInput, match="row count"):
        store.read_recent(-1, "f")


def test_reads_list_the_parts_again_when_a_compaction_merges_them_meanwhile(store, monkeypatch):
    """A part merged and deleted between the listing and its read: both readers list again
    and find the merged part; no row is lost or read twice."""
    for i in range(6):
        store.append([row(row_id=f"r{i}-{j}", function="f", call_id=f"c{i}-{j}") for j in range(3)])
    expected = store.read("f")
    original = ParquetTable._part_names
    listings = []
    compacting = []

    def list_then_compact(self):
        names = original(self)
        if compacting:  # the compaction's own listings
            return names
        listings.append(names)
        if len(listings) == 1:
            compacting.append(True)
            assert self.compact(min_parts=2) > 0  # every listed part is gone before it is read
            compacting.clear()
        return names

    monkeypatch.setattr(ParquetTable, "_part_names", list_then_compact)
    pd.testing.assert_frame_equal(store.read("f"), expected)
    assert len(listings) == 2 and len(listings[1]) == 1
    for n in (4, 18):
        listings.clear()
        for i in range(2):
            store.append([row(row_id=f"n{n}-{i}", function="f", call_id=f"n{n}-{i}")])
        compacting.append(True)  # this read is not the one under test
        whole = store.read("f")
        compacting.clear()
        pd.testing.assert_frame_equal(store.read_recent(n, "f"), whole.iloc[len(whole) - n:].reset_index(drop=True))
        assert len(listings) == 2 and len(listings[1]) == 1


def test_compact_never_deletes_a_part_it_did_not_merge(store, monkeypatch):
    for i in range(4):
        store.append([row(row_id=f"r{i}")])
    table = store.profiles
    original = ParquetTable._read_part
    appended = []

    def read_part_while_someone_appends(self, name, columns):
        if not appended:  # another writer lands a part after the compaction listed the folder
            appended.append(store.append([row(row_id="late")]))
        return original(self, name, columns)

    monkeypatch.setattr(ParquetTable, "_read_part", read_part_while_someone_appends)
    assert table.compact(min_parts=2) == 4
    monkeypatch.setattr(ParquetTable, "_read_part", original)
    assert len(parts(store)) == 2  # the merged part and the late one
    assert sorted(store.read().row_id) == ["late", "r0", "r1", "r2", "r3"]


def test_read_lists_again_when_a_compaction_removes_parts_under_it(store, monkeypatch):
    for i in range(6):
        store.append([row(row_id=f"r{i}")])
    other = ProfileStore(store.home)  # another process's view of the same home
    original = ParquetTable._read_part
    state = {"calls": 0}

    def read_part_racing_a_compaction(self, name, columns):
        state["calls"] += 1
        if state["calls"] == 3:  # two parts read, then a compaction merges and deletes all six
            monkeypatch.setattr(ParquetTable, "_read_part", original)
            assert other.profiles.compact(min_parts=2) == 6
        return original(self, name, columns)

    monkeypatch.setattr(ParquetTable, "_read_part", read_part_racing_a_compaction)
    df = store.read()
    assert state["calls"] == 3
    assert sorted(df.row_id) == [f"r{i}" for i in range(6)]


def test_count_and_read_are_fast_enough(tmp_path):
    table = ParquetTable(tmp_path / "t", PROFILE_SCHEMA, name="profiles")
    base = pa.Table.from_pylist([row(timestamp=dt.datetime(2024, 1, 1, tzinfo=UTC)) for _ in range(500)], schema=PROFILE_SCHEMA.with_metadata(table._write_schema.metadata))
    for _ in range(100):  # 50k rows over 100 parts, written directly to keep the test quick
        ids = pa.array([uuid.uuid4().hex for _ in range(500)])
        table._write_part(base.set_column(0, PROFILE_SCHEMA.field("row_id"), ids))
    best_cpu = best_wall = float("inf")
    for _ in range(2):
        # CPU time of this process (all its threads): what the read costs, whatever else the
        # machine runs; wall time on a shared box mostly measures the neighbours.
        cpu, wall = time.process_time(), time.perf_counter()
        df = table.read()
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    assert len(df) == 50_000 and df.row_id.nunique() == 50_000
    assert best_cpu < 1.0, f"reading 50k rows over 100 parts took {best_cpu:.2f} CPU-s ({best_wall:.2f} s)"


# ---------------------------------------------------------------- many processes


def _writer(home: str, writer: int, appends: int, rows_per_append: int) -> None:
    store = ProfileStore(home)
    for a in range(appends):
        batch = [row(row_id=f"w{writer}-a{a}-r{r}", call_id=f"{writer}-{a}") for r in range(rows_per_append)]
        store.append(batch)
        if a % 10 == 0:
            store.append(batch[:2])  # a retried (partial) batch: duplicates, not new rows


def _compactor(home: str, stop, done) -> None:
    store = ProfileStore(home)
    removed = 0
    while not stop.is_set():
        removed += store.profiles.compact(min_parts=8)
        time.sleep(0.05)
    done.put(removed)


def test_concurrent_writers_and_compaction_lose_no_rows(tmp_path):
    home = str(tmp_path / "home")
    store = ProfileStore(home)
    # Separate processes (own pids, nothing shared but the folder). forkserver starts one clean
    # server process, like spawn, and forks the writers from it with pyarrow already imported:
    # 9 spawned interpreters importing pandas and pyarrow cost ~4x more on a busy 2-core machine.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["raysched.store.profiles", __name__])
    stop = ctx.Event()
    done = ctx.Queue()
    compactor = ctx.Process(target=_compactor, args=(home, stop, done))
    compactor.start()
    writers = [ctx.Process(target=_writer, args=(home, w, 50, 5)) for w in range(8)]
    for w in writers:
        w.start()
    seen = 0
    try:
        while any(w.is_alive() for w in writers):  # reads during writes and compaction never go backwards
            now = store.count()
            assert now >= seen, f"a read saw {now} rows after one saw {seen}"
            seen = now
            time.sleep(0.1)
        for w in writers:
            w.join(60)
            assert w.exitcode == 0
    finally:
        stop.set()
        compactor.join(60)
    assert compactor.exitcode == 0
    assert done.get(timeout=10) > 0, "the compaction never ran concurrently with the writers"
    df = store.read()
    assert len(df) == 2000 and df.row_id.nunique() == 2000
    expected = {f"w{w}-a{a}-r{r}" for w in range(8) for a in range(50) for r in range(5)}
    assert set(df.row_id) == expected
    store.profiles.compact(min_parts=2)
    assert len(parts(store)) == 1 and store.count() == 2000


def test_plain_columns_take_the_fast_path_and_convert_as_the_checked_path_does(store):
    """The per-column fast path (one type() pass) must write what the per-cell checks write."""
    rows = [
        row(timestamp=dt.datetime(2024, 5, 1, 12, tzinfo=UTC), started_at=dt.datetime(2024, 5, 1, 11, 59),
            cpu_seconds=float("nan"), cpu_cores=2, tags=("x", "y"), arg_shapes=[], input_size=None),
        row(timestamp=dt.datetime(2024, 5, 1, 14, tzinfo=dt.timezone(dt.timedelta(hours=2))), wall_seconds=3,
            dependencies=["d"], worker_pid=12, error="boom", outcome="error"),
    ]
    table = store.profiles
    fast = 0
    for field in PROFILE_SCHEMA:
        values = [r.get(field.name) for r in rows]
        quick = table._fast_array(field, values)
        if quick is not None:
            fast += 1
            assert quick.equals(table._checked_array(field, values)), field.name
    assert fast == len(PROFILE_SCHEMA) - 1  # all but schema_version, which no row gives
    assert table._fast_array(PROFILE_SCHEMA.field("attempt"), [1, True]) is None  # a bool is not an int
    assert table._fast_array(PROFILE_SCHEMA.field("rung"), [70_000]) is None  # out of int16: checked path says so


def test_profiles_of_a_bare_name_warns_with_the_stored_names_it_may_mean(tmp_path, monkeypatch):
    """A bare name gave an empty frame and no word: functions are stored as module.qualname."""
    import raysched
    from raysched.runtime import session

    monkeypatch.setenv("RAYSCHED_HOME", str(tmp_path))
    monkeypatch.setattr(session, "_config", None)
    ProfileStore(tmp_path).append([row(function="__main__.aggregate"), row(function="jobs.crunch")])
    with pytest.warns(UserWarning, match=r"no rows of 'aggregate'.*__main__\.aggregate"):
        assert raysched.profiles("aggregate", settle=False).empty
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(raysched.profiles("__main__.aggregate", settle=False)) == 1  # the exact name: no word
        assert raysched.profiles("nothing", settle=False).empty  # nothing it may mean: no word either
    # events() of a bare name said nothing either, where profiles() warned
    with pytest.warns(UserWarning, match=r"raysched.events: no rows of 'aggregate'.*__main__\.aggregate"):
        assert raysched.events("aggregate").empty
    monkeypatch.setattr(session, "_config", None)


def test_profiles_of_a_closures_bare_name_warns_with_its_hashed_stored_name(tmp_path, monkeypatch):
    """A closure or lambda is stored as ``mod.make.<locals>.step#<hash>``: its bare name, ``step``,
    got an empty frame and no word (the hash suffix kept it from matching)."""
    import raysched
    from raysched.runtime import session

    monkeypatch.setenv("RAYSCHED_HOME", str(tmp_path))
    monkeypatch.setattr(session, "_config", None)
    ProfileStore(tmp_path).append([row(function="jobs.make.<locals>.step#94a072d3"), row(function="jobs.crunch")])
    with pytest.warns(UserWarning, match=r"no rows of 'step'.*jobs\.make\.<locals>\.step#94a072d3"):
        assert raysched.profiles("step", settle=False).empty
    monkeypatch.setattr(session, "_config", None)


def test_profiles_and_events_take_a_function_with_its_options_as_they_take_the_function(tmp_path, monkeypatch):
    import raysched
    from raysched.runtime import session

    monkeypatch.setenv("RAYSCHED_HOME", str(tmp_path))
    monkeypatch.setattr(session, "_config", None)

    @raysched.adaptive_remote
    def crunch(x):
        return x

    bound = crunch.options(input_size=10, tags=["big"])
    assert bound.name == crunch.name
    ProfileStore(tmp_path).append([row(function=crunch.name)])
    assert len(raysched.profiles(bound, settle=False)) == 1
    assert raysched.events(bound).empty  # was InvalidInput: a bound call had no name
    monkeypatch.setattr(session, "_config", None)


@pytest.mark.parametrize("table", ["profiles", "events"])
def test_a_table_folder_that_is_a_file_is_a_clear_store_error_also_to_a_reader(tmp_path, table):
    home = tmp_path / "home"
    home.mkdir()
    (home / table).write_text("not a folder")
    for writable in (True, False):
        with pytest.raises(StoreError, match=f"{table} is a file, not a folder"):
            ProfileStore(home, writable=writable)
    assert (home / table).read_text() == "not a folder"


def test_a_part_named_before_a_compaction_and_put_in_place_after_it_reads_last(store):
    """A slow writer names its part (by the clock) before another process's compaction and
    renames it into place after: its rows were written last and must read last."""
    table = store.profiles
    store.append([row(row_id="A", call_id="a")])
    named_at = time.time_ns()  # the slow writer names its part now...
    store.append([row(row_id="C", call_id="c")])  # ...another writer's part...
    assert table.compact(min_parts=2) == 2  # ...is merged with the first
    slow = table._to_table([row(row_id="B", call_id="b")])
    table._write_part(slow, time_ns=named_at)  # ...and the slow part lands
    assert list(store.read().row_id) == ["A", "C", "B"]
    assert list(store.read_recent(1).row_id) == ["B"]


def test_a_time_past_its_columns_range_costs_only_its_own_row(store):
    """An audit: epoch seconds past the timestamp column's range (a trace's nanoseconds read as
    seconds) raised pyarrow's OverflowError, not InvalidInput: the whole batch was lost, good
    rows included, instead of that row being set aside."""
    good, bad = row(), row(timestamp=1.7e18)
    written, rejected = store.append_keeping_valid([good, bad])
    assert written == 1 and [r["row_id"] for r in rejected] == [bad["row_id"]]
    assert list(store.read()["row_id"]) == [good["row_id"]]


def test_a_new_part_is_synced_with_its_folder_so_the_rename_survives_a_power_loss(tmp_path, monkeypatch):
    """The part's bytes were fsynced, its rename into place was not: after a power loss the
    rows could sit under the temporary name (deleted as stale later), and after a merge the
    deletions of the merged parts could survive while the merged part did not."""
    import stat

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = ProfileStore(tmp_path)
    store.append([row()])
    assert synced == ["file", "folder"]
