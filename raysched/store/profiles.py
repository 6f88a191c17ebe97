"""The profile store: one row per task attempt, plus the runtime monitor's events.

Both are append-only ParquetTables under the raysched home::

    <home>/profiles/part-*.parquet   PROFILE_SCHEMA
    <home>/events/part-*.parquet     EVENT_SCHEMA
    <home>/outside_writes.jsonl      functions written without the profiler (OUTSIDE_WRITES)

Every process (driver, profiler actor, trainer, CLI) may open its own
ProfileStore on the same home; nothing is cached between calls.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from ..types import IMPORTED_CODE_HASH
from .parquet import Excluding, ParquetTable
from .schema import EVENT_SCHEMA, PROFILE_ALLOWED_VALUES, PROFILE_SCHEMA

logger = logging.getLogger(__name__)

PROFILES_DIR = "profiles"
EVENTS_DIR = "events"
#: One JSON line per write that did not go through the home's profiler actor (``raysched
#: import``, a worker's rows stored directly while the profiler was unreachable): the names of
#: the functions written. A running profiler reads what was added since its last look and
#: re-reads those functions' rows, or it would go on serving the history it read first.
OUTSIDE_WRITES = "outside_writes.jsonl"


def short_name(function: str) -> str:
    """What a user may type for a stored name: the last part, without the code-hash suffix
    of a closure or lambda (``mod.make.<locals>.step#94a072d3`` -> ``step``)."""
    return function.rsplit(".", 1)[-1].split("#", 1)[0]


def calls_without_rows(rows: pd.DataFrame, call_ids: Sequence[str]) -> list[str]:
    """Those of ``call_ids`` whose rows may still be on their way to ``rows``.

    A call of a thinned function (``policy.thinning``) may have no row of its own,
    only a count in another row's ``calls``: every counted call of ``rows`` is
    taken for one of the missing ones (so a wait for the rest may end early, never
    run long).  The newest missing calls are the ones kept.
    """
    have = set(rows["call_id"].dropna()) if "call_id" in rows else set()
    missing = [c for c in call_ids if c not in have]
    if not missing or "calls" not in rows:
        return missing
    if "source" in rows:
        # Rows imported from a trace have no call id either, and stand for no call of
        # this cluster's: counted, 40 imported rows let a wait for 40 calls end at once.
        rows = rows[~rows["source"].fillna("").astype(str).str.startswith("import")]
    counted = int(rows["calls"].fillna(1).sum()) - int(rows["call_id"].notna().sum())
    return missing[max(0, counted):]


class ProfileStore:
    """Profile rows and monitor events of one raysched home.

    Rows are mappings of column name to value (see ``raysched.store.schema``);
    each needs a ``row_id`` (``schema.new_row_id()``, made once per attempt so a
    retried write is de-duplicated), ``function`` and ``code_hash``.  Timestamps
    may be datetimes (naive means UTC) or epoch seconds.
    """

    def __init__(self, home: str | Path, writable: bool = True) -> None:
        """``writable=False``: only to read, so a home this process may not write is no error."""
        self.home = Path(home).expanduser()
        self.profiles = ParquetTable(
            self.home / PROFILES_DIR, PROFILE_SCHEMA, name="profiles", allowed_values=PROFILE_ALLOWED_VALUES,
            check_writable=writable,
        )
        self.event_table = ParquetTable(self.home / EVENTS_DIR, EVENT_SCHEMA, name="events", check_writable=writable)

    def __repr__(self) -> str:
        return f"ProfileStore({str(self.home)!r})"

    def append(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Write attempt rows (one part file, all or nothing). Returns how many were written."""
        return self.profiles.append(rows)

    def append_keeping_valid(self, rows: Sequence[Mapping[str, Any]]) -> tuple[int, list[Mapping[str, Any]]]:
        """Write attempt rows as ``append`` does, but a row that does not fit the schema (a
        figure past its column's range, say) costs only itself: it is set aside, with why, in
        ``profiles/quarantine/rejected-*.jsonl`` and named in a warning, and the rest are written.
        The runtime stores every batch from its workers through here.  Returns how many rows
        were written, and the rows set aside."""
        written, rejected = self.profiles.append_valid(rows)
        if rejected:
            where = self.profiles.set_aside(rejected)
            logger.warning(
                "raysched: %d profile row(s) of %d could not be stored (%s: %s); set aside in %s. "
                "The other %d were stored.",
                len(rejected), len(rejected) + written, rejected[0][0].get("function"), rejected[0][1], where, written,
            )
        return written, [row for row, _ in rejected]

    def note_outside_write(self, functions: Iterable[str]) -> None:
        """Tell a running profiler of this home that ``functions`` have rows it did not write.
        One line appended (``O_APPEND``: lines of several writers do not mix); best effort,
        as the rows are stored already: a profiler started later reads them anyway."""
        names = sorted({str(f) for f in functions})
        if not names:
            return
        # A newline first as well as last: a line a crashed writer cut short is closed by the
        # next one, not glued to it (the two would fail to parse together; a review).
        line = "\n" + json.dumps({"t": time.time(), "functions": names}) + "\n"
        try:
            with open(self.home / OUTSIDE_WRITES, "a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError as exc:
            logger.warning("raysched: could not tell a running profiler of %s about new rows (%s); it serves "
                           "them once it reads %s again (raysched.flush() or a restart)", self.home, exc, names)

    def outside_writes_end(self) -> int:
        """Where the journal ends now: a new reader looks from here on."""
        try:
            return (self.home / OUTSIDE_WRITES).stat().st_size
        except OSError:
            return 0

    def outside_writes(self, offset: int) -> tuple[set[str], int]:
        """The functions noted by ``note_outside_write`` from byte ``offset`` of the journal on,
        and the offset to look from next time (only whole lines are taken)."""
        path = self.home / OUTSIDE_WRITES
        try:
            if path.stat().st_size <= offset:
                return set(), offset
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except OSError:
            return set(), offset
        whole = data[: data.rfind(b"\n") + 1]
        functions: set[str] = set()
        for line in whole.splitlines():
            if not line.strip():
                continue
            try:
                functions.update(json.loads(line)["functions"])
            except (ValueError, KeyError, TypeError):
                continue  # a line a crash cut short: the rows it named are read at the next reload
        return functions, offset + len(whole)

    def append_events(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Write monitor events (one part file, all or nothing). Returns how many were written."""
        return self.event_table.append(rows)

    def read(self, function: str | None = None, code_hash: str | None = None) -> pd.DataFrame:
        """Attempt rows, oldest written first, optionally of one function and/or code hash.

        Dtypes are fixed whatever the data (see ``ParquetTable.read``): integer
        columns are pandas nullable integers (missing = pd.NA; use
        ``.astype(float)`` for NaN), floats float64, timestamps datetime64[us, UTC].
        """
        return self.profiles.read(_filters(function=function, code_hash=code_hash))

    def read_recent(self, n: int, function: str | None = None, code_hash: str | None = None) -> pd.DataFrame:
        """The newest ``n`` of the rows ``read`` gives, without reading older parts than it needs."""
        return self.profiles.read_recent(n, _filters(function=function, code_hash=code_hash))

    def read_history(self, n: int, function: str) -> pd.DataFrame:
        """A function's history window: its newest ``n`` rows, its own runs before imported ones.

        Rows of ``raysched import`` are written when the trace is imported, after the runs
        measured here until then: by write order alone, a trace with ``n`` runs of the
        function pushed every run of its own out of the window, and the function was sized
        from another machine's runs.  Imported rows fill what its own leave of the window,
        and come first: older than any run measured here.
        """
        rows = self.profiles.read_recent(n, _filters(function=function))
        imported = (rows["code_hash"] == IMPORTED_CODE_HASH).to_numpy(dtype=bool)
        if not imported.any():
            return rows
        if len(rows) < n:  # every row of the function is here
            own = rows[~imported]
        else:  # older runs of its own may be behind the imported ones: read them
            own = self.profiles.read_recent(n, _filters(function=function, code_hash=Excluding(IMPORTED_CODE_HASH)))
        room = n - len(own)
        kept = rows[imported].iloc[max(0, int(imported.sum()) - room):] if room > 0 else rows.iloc[:0]
        return pd.concat([kept, own], ignore_index=True)

    def events(self, function: str | None = None) -> pd.DataFrame:
        """Monitor events, oldest written first, optionally of one function."""
        return self.event_table.read(_filters(function=function))

    def recent_events(self, n: int, function: str | None = None) -> pd.DataFrame:
        """The newest ``n`` of the events ``events`` gives, without reading older parts than it needs."""
        return self.event_table.read_recent(n, _filters(function=function))

    def event_functions(self) -> set[str]:
        """The functions that have events (reads that column alone)."""
        return set(self.event_table.read_table(columns=["function"]).column("function").to_pylist())

    def functions(self) -> pd.DataFrame:
        """One row per (function, code_hash): ``rows`` (attempt rows stored) and ``last_timestamp``.

        Sorted by function, then newest last_timestamp first.
        """
        table = self.profiles.read_table(columns=["function", "code_hash", "timestamp"])
        df = table.to_pandas()
        if df.empty:
            return pd.DataFrame(
                {
                    "function": pd.Series([], dtype=df["function"].dtype),
                    "code_hash": pd.Series([], dtype=df["code_hash"].dtype),
                    "rows": pd.Series([], dtype="int64"),
                    "last_timestamp": pd.Series([], dtype=df["timestamp"].dtype),
                }
            )
        out = (
            df.groupby(["function", "code_hash"], sort=False, dropna=False)
            .agg(rows=("timestamp", "size"), last_timestamp=("timestamp", "max"))
            .reset_index()
        )
        out["rows"] = out["rows"].astype("int64")
        return out.sort_values(["function", "last_timestamp"], ascending=[True, False], ignore_index=True)

    def count(self) -> int:
        """How many distinct attempt rows are stored."""
        return self.profiles.count()

    def compact(self, min_parts: int = 64) -> int:
        """Compact both tables; returns the part files removed."""
        return self.profiles.compact(min_parts) + self.event_table.compact(min_parts)

    def tidy(self, fanout: int = 10) -> int:
        """Merge runs of similar-sized parts of both tables (``ParquetTable.tidy``); returns parts removed."""
        return self.profiles.tidy(fanout) + self.event_table.tidy(fanout)


def _filters(**values: Any) -> dict[str, Any] | None:
    filters = {k: v for k, v in values.items() if v is not None}
    return filters or None


__all__ = ["ProfileStore", "PROFILES_DIR", "EVENTS_DIR"]
