"""An append-only table of Parquet part files in one folder, safe for many processes.

Layout: ``<folder>/part-<time_ns>-<pid>-<uuid8>.parquet``, one file per ``append``
call, written under a temporary dot-name in the same folder and renamed into
place (``os.replace`` is atomic on POSIX), so a reader sees a part whole or not
at all; the part and then its folder are fsynced, so a written part survives a power loss.  Nothing is ever rewritten in place: ``compact`` writes one merged part,
then deletes exactly the parts it merged.

Readers list the folder on every call (nothing is cached across calls, so
several processes can share a table), de-duplicate rows on ``row_id`` (keeping
the last written; writers may retry a batch) and move a part they cannot parse
to ``<folder>/quarantine/`` with a warning, so one bad file never hides the rest.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import errno
import math
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import InvalidInput, StoreError
from .schema import SCHEMA_VERSION_KEY, schema_version_of

try:  # POSIX only; without it concurrent compactions are still safe, just wasteful.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
TMP_PREFIX = ".tmp-"
QUARANTINE = "quarantine"
DEDUPE_COLUMN = "row_id"
_STALE_TMP_SECONDS = 3600.0
_READ_RETRIES = 20
_T = TypeVar("_T")
_UTC = _dt.timezone.utc
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_UTC)
_US = _dt.timedelta(microseconds=1)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class _Bad(Exception):
    """A value does not fit its column; the message says what was expected."""


class _Vanished(Exception):
    """A part disappeared between listing and reading (a concurrent compaction merged it)."""


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    if isinstance(value, np.datetime64):
        return bool(np.isnat(value))
    return False


def _converter(field: pa.Field) -> Callable[[Any], Any]:
    """A function that checks one non-missing value for ``field`` and returns what pyarrow should get.

    Stricter than pyarrow's own conversion, which would silently truncate 2.5 to
    an int column, take a bare "abc" as a list of characters or bool as a number.
    """
    t = field.type
    if pa.types.is_integer(t):
        if pa.types.is_signed_integer(t):
            lo, hi = -(2 ** (t.bit_width - 1)), 2 ** (t.bit_width - 1) - 1
        else:
            lo, hi = 0, 2**t.bit_width - 1

        def to_int(v: Any) -> int:
            if isinstance(v, (bool, np.bool_)):
                raise _Bad(f"an integer ({t})")
            if isinstance(v, (int, np.integer)):
                out = int(v)
            elif isinstance(v, (float, np.floating)) and float(v).is_integer():
                out = int(v)
            else:
                raise _Bad(f"an integer ({t})")
            if not lo <= out <= hi:
                raise _Bad(f"an integer in [{lo}, {hi}] ({t})")
            return out

        return to_int
    if pa.types.is_floating(t):

        def to_float(v: Any) -> float:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise _Bad(f"a number ({t})")
            try:
                return float(v)
            except OverflowError:  # an int past a float's range: the row's fault, not its batch's
                raise _Bad(f"a number within a float's range ({t})") from None

        return to_float
    if pa.types.is_string(t) or pa.types.is_large_string(t):

        def to_str(v: Any) -> str:
            if isinstance(v, enum.Enum) and isinstance(v.value, str):
                return v.value
            if not isinstance(v, str):
                raise _Bad("a string")
            return str(v)

        return to_str
    if pa.types.is_timestamp(t):
        per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[t.unit]

        def to_ts(v: Any) -> int:
            # Returns the integer count of t.unit since the epoch, which pyarrow takes as is.
            if isinstance(v, np.datetime64):
                v = pd.Timestamp(v)
            if isinstance(v, pd.Timestamp):
                ts = v.tz_localize(_UTC) if v.tzinfo is None else v.tz_convert(_UTC)
                return int(ts.value) // (1_000_000_000 // per_second)  # .value: ns since the epoch
            if isinstance(v, _dt.datetime):
                aware = v.replace(tzinfo=_UTC) if v.tzinfo is None else v.astimezone(_UTC)
                return (aware - _EPOCH) // _US * per_second // 1_000_000
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise _Bad("a datetime (naive means UTC) or epoch seconds")
            try:
                out = int(round(float(v) * per_second))
            except (OverflowError, ValueError):  # inf, nan, or an int past a float's range
                raise _Bad("a finite number of epoch seconds") from None
            if not _INT64_MIN <= out <= _INT64_MAX:  # pyarrow's OverflowError cost the whole batch
                raise _Bad(f"epoch seconds within the range of {t}")
            return out

        return to_ts
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _converter(t.value_field)

        def to_list(v: Any) -> list:
            if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple, np.ndarray)):
                raise _Bad(f"a list of {t.value_type}, not a bare {type(v).__name__}")
            out = []
            for item in v:
                if _is_missing(item):
                    out.append(None)
                else:
                    try:
                        out.append(inner(item))
                    except _Bad as e:
                        raise _Bad(f"a list whose items are {e}") from None
            return out

        return to_list
    if pa.types.is_boolean(t):

        def to_bool(v: Any) -> bool:
            if not isinstance(v, (bool, np.bool_)):
                raise _Bad("a bool")
            return bool(v)

        return to_bool
    raise TypeError(f"ParquetTable does not support columns of type {t} (column {field.name!r})")


_NONE = type(None)
_STR_ONLY = frozenset({str})


def _plain_types(t: pa.DataType) -> frozenset[type] | None:
    """Python types whose values pyarrow converts to ``t`` exactly as ``_converter`` would."""
    if pa.types.is_integer(t):
        return frozenset({int, _NONE})  # bool is its own type: not here; range errors fall back
    if pa.types.is_floating(t):
        return frozenset({float, int, _NONE})
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return frozenset({str, _NONE})
    if pa.types.is_timestamp(t):
        return frozenset({_dt.datetime, _NONE})  # naive is taken as UTC, aware converted, as by _converter
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
            pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)):
        return frozenset({list, tuple, _NONE})
    if pa.types.is_boolean(t):
        return frozenset({bool, _NONE})
    return None


def _pandas_dtype(t: pa.DataType) -> Any:
    """Integers read as pandas' nullable integer dtypes, so a column's dtype never depends on its nulls."""
    if pa.types.is_integer(t):
        return pd.api.types.pandas_dtype(("" if pa.types.is_signed_integer(t) else "U") + f"Int{t.bit_width}")
    return None


def _dedupe(table: pa.Table) -> pa.Table:
    """Keep the last row of each row_id (rows without one are all kept)."""
    ids = table.column(DEDUPE_COLUMN).to_pandas()
    keep = (~ids.duplicated(keep="last") | ids.isna()).to_numpy()
    return table if keep.all() else table.filter(pa.array(keep))


def _time_of(part_name: str) -> int:
    try:
        return int(part_name[len(PART_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return 0


def size_tier(size_bytes: int, fanout: int, unit_bytes: int) -> int:
    """0 under ``unit_bytes``, then one more per factor of ``fanout``."""
    tier, bound = 0, unit_bytes
    while size_bytes >= bound:
        tier, bound = tier + 1, bound * fanout
    return tier


def newest_mergeable_run(sizes: Sequence[int], fanout: int, unit_bytes: int) -> tuple[int, int] | None:
    """[start, end) of the parts to merge next (``sizes`` oldest first), or None.

    For the lowest tier t that has one, the newest run of at least ``fanout`` adjacent
    parts each of tier t or below, none of them more than half of the run's bytes.
    (Group commits straddle a tier's bound, so parts of tiers 0 and 1 alternate: runs of
    one exact tier would rarely be ``fanout`` long. The half: a merge at least doubles its
    largest part, so a row is rewritten a logarithmic number of times, never each time a
    few small parts pile up beside a big one.) Only adjacent parts are merged, so the
    rows keep their write order.
    """
    tiers = [size_tier(n, fanout, unit_bytes) for n in sizes]
    for tier in sorted(set(tiers)):
        end = len(tiers)
        while end > 0:
            if tiers[end - 1] > tier:
                end -= 1
                continue
            start = end - 1
            while start > 0 and tiers[start - 1] <= tier:
                start -= 1
            run = sizes[start:end]
            if len(run) >= fanout and 2 * max(run) <= sum(run):
                return start, end
            end = start
    return None


def _fsync_dir(folder: Path) -> None:
    """Make the folder's entries (a part just renamed into place) durable."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # not openable as a folder (Windows): the rename stays as durable as the OS makes it
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # a file system that syncs no folders
            raise
    finally:
        os.close(fd)


class Excluding:
    """A filter value: the rows whose column holds none of ``values``."""

    def __init__(self, *values: Any):
        self.values = values

    def __repr__(self) -> str:
        return f"Excluding{self.values!r}"


class ParquetTable:
    """An append-only table: a folder of immutable Parquet part files sharing one schema.

    ``schema`` may carry its version in its metadata (``raysched.schema_version``);
    it is written into every part, and parts written by a newer version are read
    by the columns this version knows (a newer version only adds columns); one whose
    columns do not read so is skipped with a warning, never quarantined.  ``allowed_values`` restricts string columns to a
    closed set of values, checked on append.
    """

    def __init__(
        self,
        folder: str | Path,
        schema: pa.Schema,
        *,
        name: str,
        allowed_values: Mapping[str, Collection[str]] | None = None,
        check_writable: bool = True,
    ) -> None:
        self.folder = Path(folder).expanduser()
        self.schema = schema
        self.name = name
        self.version = schema_version_of(schema) or 0
        metadata = dict(schema.metadata or {})
        metadata[SCHEMA_VERSION_KEY] = str(self.version).encode()
        metadata[b"raysched.table"] = name.encode()
        self._write_schema = schema.with_metadata(metadata)
        # Old parts may hold nulls where the current schema says not null; read leniently.
        self._read_schema = pa.schema([f.with_nullable(True) for f in schema], metadata=metadata)
        self._converters = {f.name: _converter(f) for f in schema}
        self._known = frozenset(schema.names)
        self._plain_types = {f.name: _plain_types(f.type) for f in schema}
        self._list_columns = {f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)}
        self._allowed = {k: frozenset(v) for k, v in (allowed_values or {}).items()}
        unknown = set(self._allowed) - set(schema.names)
        if unknown:
            raise ValueError(f"allowed_values names columns not in the schema: {sorted(unknown)}")
        self._has_row_id = DEDUPE_COLUMN in schema.names
        self._required = [f.name for f in schema if not f.nullable]  # every part of this table has them
        if self.folder.exists() and not self.folder.is_dir():  # a reader would see no rows and say nothing
            raise StoreError(f"raysched store {self.name!r}: {self.folder} is a file, not a folder; move it away "
                             "(or point RAYSCHED_HOME at another folder)")
        if check_writable:  # a reader of someone else's (read-only) home skips it; a write still says why it fails
            self._ensure_writable()

    def __repr__(self) -> str:
        return f"ParquetTable({self.name!r}, {str(self.folder)!r})"

    # ------------------------------------------------------------------ writing

    def _ensure_writable(self) -> None:
        probe = self.folder / f"{TMP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreError(
                f"raysched store {self.name!r}: cannot create or write the folder {self.folder} ({e}). "
                f"Point RAYSCHED_HOME (or RayschedConfig.home) at a writable folder."
            ) from e

    def _to_table(self, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
        names = self.schema.names
        known = self._known
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise InvalidInput(f"{self.name}: row {i} must be a mapping of column to value, got {type(row).__name__}")
            if not known.issuperset(row.keys()):
                key = next(k for k in row if k not in known)
                raise InvalidInput(
                    f"{self.name}: unknown column {key!r} in row {i}; the columns are: {', '.join(names)}"
                )
        arrays = []
        for f in self.schema:
            name = f.name  # a pyarrow property: a new str at every access, so not once per row
            values = [row.get(name) for row in rows]
            array = self._fast_array(f, values)
            if array is None:
                array = self._checked_array(f, values)
            arrays.append(array)
        return pa.Table.from_arrays(arrays, schema=self._write_schema)

    def _fast_array(self, f: pa.Field, values: list[Any]) -> pa.Array | None:
        """The column as pyarrow gets it, when every value has a plain type pyarrow converts exactly.

        One pass of ``type()`` over the column instead of a checked conversion per
        cell: the profiler stores every attempt of every task through here.  None
        when any value needs the strict per-cell path (which also words the error).
        """
        plain = self._plain_types.get(f.name)
        if plain is None or not plain.issuperset(map(type, values)):
            return None
        if f.name in self._list_columns and not _STR_ONLY.issuperset(
                type(item) for v in values if v is not None for item in v):
            return None
        if f.name == "schema_version" or not f.nullable:
            if any(v is None for v in values):
                return None
        allowed = self._allowed.get(f.name)
        if allowed is not None and not allowed.issuperset(v for v in values if v is not None):
            return None
        try:
            # from_pandas: a float NaN is a missing value, as in the checked path.
            return pa.array(values, type=f.type, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
            return None  # out of range, say: the checked path says what and where

    def _checked_array(self, f: pa.Field, values: list[Any]) -> pa.Array:
        """The column converted one cell at a time, with a clear error for the first bad one."""
        convert, allowed = self._converters[f.name], self._allowed.get(f.name)
        column: list[Any] = [None] * len(values)
        for i, value in enumerate(values):
            if _is_missing(value):
                continue
            try:
                converted = convert(value)
            except _Bad as e:
                raise InvalidInput(
                    f"{self.name}: column {f.name!r} expects {e}, got {value!r} ({type(value).__name__}) in row {i}"
                ) from None
            if allowed is not None and converted not in allowed:
                raise InvalidInput(
                    f"{self.name}: column {f.name!r} must be one of {sorted(allowed)}, got {value!r} in row {i}"
                )
            column[i] = converted
        if f.name == "schema_version":
            column = [self.version if v is None else v for v in column]
        if not f.nullable:
            missing = [i for i, v in enumerate(column) if v is None]
            if missing:
                raise InvalidInput(f"{self.name}: column {f.name!r} must not be null (row {missing[0]})")
        try:
            return pa.array(column, type=f.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:  # the checks above should have caught it
            raise InvalidInput(f"{self.name}: column {f.name!r}: {e}") from None

    def _write_part(self, table: pa.Table, time_ns: int | None = None) -> Path:
        name = f"{PART_PREFIX}{time_ns or time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}{PART_SUFFIX}"
        final = self.folder / name
        tmp = self.folder / f"{TMP_PREFIX}{name}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            # The rename is an entry of the folder: until the folder is synced a power loss can
            # undo it, leaving the rows under the temporary name (deleted as stale an hour
            # later), or, after a merge, neither the merged part nor the parts it replaced.
            _fsync_dir(self.folder)
        except BaseException as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            if isinstance(e, OSError):
                raise StoreError(f"raysched store {self.name!r}: cannot write {final} ({e})") from e
            raise
        return final

    def append(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Write ``rows`` as one new part file, all or nothing. Returns how many rows were written.

        Columns missing from a row are null; an unknown column, a value of the wrong
        type or outside its allowed set raises InvalidInput and writes nothing.
        """
        if isinstance(rows, Mapping):
            raise InvalidInput(f"{self.name}: append takes a sequence of rows, got a single mapping")
        rows = list(rows)
        if not rows:
            return 0
        table = self._to_table(rows)
        self._write_part(table)
        return len(rows)

    def append_valid(self, rows: Sequence[Mapping[str, Any]]) -> tuple[int, list[tuple[Mapping[str, Any], str]]]:
        """Write the rows that fit the schema as one part; set none of them aside for another's fault.

        Returns how many were written and, for each row that does not fit, the row
        and why (``append`` would have refused them all).
        """
        rows = list(rows)
        try:
            return self.append(rows), []
        except InvalidInput:
            pass
        good: list[Mapping[str, Any]] = []
        bad: list[tuple[Mapping[str, Any], str]] = []
        for row in rows:  # only on this rare path: a table of one row each
            try:
                self._to_table([row])
            except InvalidInput as e:
                bad.append((row, str(e).replace(" in row 0", "").replace(" (row 0)", "")))
            else:
                good.append(row)
        return (self.append(good) if good else 0), bad

    def set_aside(self, rejected: Sequence[tuple[Mapping[str, Any], str]]) -> Path:
        """Keep rows the table refused, with why, as JSON lines in its quarantine folder."""
        target_dir = self.folder / QUARANTINE
        target = target_dir / f"rejected-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            with open(target, "w", encoding="utf-8") as f:
                for row, why in rejected:
                    f.write(json.dumps({"error": why, "row": dict(row)}, default=str) + "\n")
        except OSError as e:
            raise StoreError(f"raysched store {self.name!r}: cannot write {target} ({e})") from e
        return target

    # ------------------------------------------------------------------ reading

    def _part_names(self) -> list[str]:
        try:
            with os.scandir(self.folder) as it:
                names = [
                    e.name
                    for e in it
                    if e.name.startswith(PART_PREFIX) and e.name.endswith(PART_SUFFIX) and e.is_file()
                ]
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"raysched store {self.name!r}: cannot list {self.folder} ({e})") from e
        return sorted(names)

    def parts(self) -> list[Path]:
        """The part files now present, oldest first."""
        return [self.folder / n for n in self._part_names()]

    def _quarantine(self, path: Path, error: BaseException) -> str:
        target_dir = self.folder / QUARANTINE
        target = target_dir / path.name
        try:
            target_dir.mkdir(exist_ok=True)
            if target.exists():
                target = target_dir / f"{path.stem}-{uuid.uuid4().hex[:8]}{path.suffix}"
            os.replace(path, target)
            where = f"moved it to {target}"
        except FileNotFoundError:
            where = "another process already moved it"
        except OSError as e:
            where = f"could not move it to {target_dir} ({e}); skipping it"
        return (
            f"raysched store {self.name!r}: part file {path} is unreadable "
            f"({type(error).__name__}: {error}); {where}. The other parts are read as usual."
        )

    def _conform(self, table: pa.Table, columns: Sequence[str]) -> pa.Table:
        arrays = []
        fields = []
        for name in columns:
            field = self._read_schema.field(name)
            if name in table.column_names:
                col = table.column(name)
                if col.type != field.type:
                    col = col.cast(field.type)
            else:
                col = pa.nulls(table.num_rows, field.type)
            arrays.append(col)
            fields.append(field)
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=self._read_schema.metadata))

    def _read_part(self, name: str, columns: Sequence[str]) -> tuple[pa.Table | None, str | None]:
        """(table, warning) for one part: its columns among ``columns``, in the schema's types.

        Returns (None, warning) for a part it skips or quarantines; raises _Vanished
        when the part is gone (a concurrent compaction merged it).
        """
        path = self.folder / name
        newer = False
        version = None
        try:
            pf = pq.ParquetFile(path)
            file_schema = pf.schema_arrow
            table_name = (file_schema.metadata or {}).get(b"raysched.table")
            if table_name is not None and table_name != self.name.encode():
                raise ValueError(f"it is a part of the table {table_name.decode(errors='replace')!r}, not of this one")
            version = schema_version_of(file_schema)
            # A newer version only adds columns (schema.py): its part is read by the columns
            # this code knows.  Skipped whole, a newer raysched's tidy, which stamps the parts
            # it merges (old rows included) with its version, hid all history from this one.
            newer = version is not None and version > self.version
            lacking = [c for c in self._required if c not in file_schema.names]
            if lacking:  # a Parquet file, but not one of this table's parts
                raise ValueError(f"it has no {', '.join(lacking)} column(s): not a part of this table")
            present = [c for c in columns if c in file_schema.names]
            table = pf.read(columns=present, use_threads=False)
            if any(table.schema.field(c).type != self._read_schema.field(c).type for c in present):
                table = self._conform(table, present)  # a cast that fails marks the part unreadable
        except Exception as e:
            if newer and path.exists():  # not this code's to judge, nor to move aside
                return None, (
                    f"raysched store {self.name!r}: skipping {path}: it was written with schema version "
                    f"{version}, newer than this code's version {self.version}, and its columns do not read as "
                    f"this code's ({e}). Upgrade raysched to read it."
                )
            if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno is not None and e.errno != errno.ENOENT):
                # No access, too many open files, no memory, an I/O error of the disk...: a
                # system call failed, not the parse, so the part may be fine: never quarantine it.
                # (pyarrow reports a corrupt file as ArrowInvalid, or as an OSError with no errno.)
                raise StoreError(f"raysched store {self.name!r}: cannot read {path} ({e})") from e
            if not path.exists():
                raise _Vanished(name) from e
            return None, self._quarantine(path, e)
        return table, None

    def _relisting(self, read: Callable[[list[str]], _T]) -> _T:
        """``read(part names)``, called again on a fresh listing while a part vanishes under
        it (a compaction merged and deleted parts after they were listed: the new listing
        has its merged part, and de-duplication on row_id covers parts read both ways)."""
        for _ in range(_READ_RETRIES):
            try:
                return read(self._part_names())
            except _Vanished:
                continue
        raise StoreError(f"raysched store {self.name!r}: parts kept vanishing while reading {self.folder}")

    def _read_parts(self, columns: Sequence[str]) -> tuple[list[pa.Table], list[str]]:
        """The readable parts' tables, oldest first, and the warnings to emit."""
        done: dict[str, pa.Table | None] = {}  # kept across listings: a part is read once
        messages: list[str] = []

        def read(names: list[str]) -> list[pa.Table]:
            vanished: _Vanished | None = None
            for n in names:
                if n in done:
                    continue
                try:
                    table, message = self._read_part(n, columns)
                except _Vanished as e:
                    vanished = e  # read the others first
                    continue
                done[n] = table
                if message:
                    messages.append(message)
            if vanished is not None:
                raise vanished
            return [t for t in (done.get(n) for n in names) if t is not None]

        return self._relisting(read), messages

    def _read_table(
        self, columns: Sequence[str] | None = None, filters: Mapping[str, Any] | None = None
    ) -> pa.Table:
        columns = list(self.schema.names if columns is None else columns)
        expression = self._expression(filters)
        wanted = columns + [c for c in (filters or {}) if c not in columns]
        if self._has_row_id and DEDUPE_COLUMN not in wanted:
            wanted.append(DEDUPE_COLUMN)
        tables, messages = self._read_parts(wanted)
        for message in messages:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        table = self._concat(tables, wanted)
        if self._has_row_id and table.num_rows:
            table = _dedupe(table)
        if expression is not None:
            table = table.filter(expression)
        return table.select(columns)

    def _concat(self, tables: list[pa.Table], columns: Sequence[str]) -> pa.Table:
        """Concatenate part tables into the read schema: runs of parts with one layout are
        concatenated as they are (cheap), and each run is conformed once."""
        if not tables:
            return self._read_schema.empty_table().select(columns)
        runs: list[list[pa.Table]] = []
        for t in tables:
            if runs and runs[-1][0].schema.equals(t.schema, check_metadata=False):
                runs[-1].append(t)
            else:
                runs.append([t])
        conformed = [
            self._conform(pa.concat_tables([t.replace_schema_metadata(None) for t in run]), columns) for run in runs
        ]
        return conformed[0] if len(conformed) == 1 else pa.concat_tables(conformed)

    def _expression(self, filters: Mapping[str, Any] | None) -> pc.Expression | None:
        if not filters:
            return None
        expression = None
        for column, value in filters.items():
            if column not in self.schema.names:
                raise InvalidInput(
                    f"{self.name}: cannot filter on unknown column {column!r}; the columns are: {', '.join(self.schema.names)}"
                )
            convert = self._converters[column]
            try:
                if isinstance(value, Excluding):
                    values = pa.array([convert(v) for v in value.values], type=self.schema.field(column).type)
                    term = ~pc.field(column).isin(values)  # a null is none of them
                elif isinstance(value, (list, tuple, set, frozenset)):
                    values = pa.array([convert(v) for v in value], type=self.schema.field(column).type)
                    term = pc.field(column).isin(values)
                elif _is_missing(value):
                    term = pc.field(column).is_null()
                else:
                    scalar = pa.scalar(convert(value), type=self.schema.field(column).type)
                    term = pc.field(column) == scalar
            except _Bad as e:
                raise InvalidInput(f"{self.name}: filter on {column!r} expects {e}, got {value!r}") from None
            expression = term if expression is None else expression & term
        return expression

    def read_table(
        self, columns: Sequence[str] | None = None, filters: Mapping[str, Any] | None = None
    ) -> pa.Table:
        """Like ``read`` but as a pyarrow Table, optionally of some columns only (cheaper)."""
        if columns is not None:
            unknown = [c for c in columns if c not in self.schema.names]
            if unknown:
                raise InvalidInput(f"{self.name}: unknown columns {unknown}; the columns are: {', '.join(self.schema.names)}")
        return self._read_table(columns=columns, filters=filters)

    def read(self, filters: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """Every readable row, de-duplicated on row_id, in write order and the schema's column order.

        ``filters`` maps a column to a value (equality), a list/tuple/set of values
        (membership) or None (is null).  Dtypes do not depend on the data: integers
        are pandas nullable integers (Int16/Int32/Int64, missing = pd.NA), floats
        float64 (missing = NaN), strings pandas' string dtype, timestamps
        datetime64[us, UTC], lists object cells holding numpy arrays (or None).
        """
        table = self._read_table(filters=filters)
        return table.to_pandas(types_mapper=_pandas_dtype)

    def read_recent(self, n: int, filters: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """The last ``n`` rows ``read(filters)`` would give, reading parts newest first only
        until it has them: a history window costs the parts that hold it, not the whole table."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidInput(f"{self.name}: read_recent needs a row count of at least 0, got {n!r}")
        columns = list(self.schema.names)
        expression = self._expression(filters)

        def read(names: list[str]) -> tuple[pa.Table, list[str]]:
            newest_first: list[pa.Table] = []
            messages: list[str] = []
            table = None
            have = 0

            def gathered() -> pa.Table:  # the parts read so far, oldest first, de-duplicated
                t = self._concat(newest_first[::-1], columns)
                return _dedupe(t) if self._has_row_id and t.num_rows else t

            for name in reversed(names):
                if have >= n:
                    break
                part, message = self._read_part(name, columns)  # _Vanished: listed again
                if message:
                    messages.append(message)
                if part is None:
                    continue
                part = self._concat([part], columns)
                if expression is not None:
                    part = part.filter(expression)
                newest_first.append(part)
                have += part.num_rows
                if have >= n:  # enough, unless duplicates of a retried batch were among them
                    table = gathered()
                    have = table.num_rows
            if table is None or have < n:  # every part read
                table = gathered()
            return table, messages

        table, messages = self._relisting(read)
        for message in messages:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        table = table.slice(max(0, table.num_rows - n))
        return table.to_pandas(types_mapper=_pandas_dtype)

    def count(self) -> int:
        """How many distinct rows the table holds (what ``len(read())`` would be)."""
        if self._has_row_id:
            return self._read_table(columns=[DEDUPE_COLUMN]).num_rows
        return self._read_table(columns=self.schema.names[:1]).num_rows

    # ------------------------------------------------------------------ compaction

    def compact(self, min_parts: int = 64) -> int:
        """Merge all current parts into one when there are at least ``min_parts``. Returns parts removed.

        Safe with concurrent appends (only parts it merged are deleted) and reads
        (the merged part is in place before any part is deleted; readers that meet a
        vanished part list again).  One compaction at a time per folder (a lock
        file); a second one returns 0 at once.
        """
        min_parts = max(2, min_parts)
        if len(self._part_names()) < min_parts:
            return 0
        return self._under_compaction_lock(lambda: self._merge_all(min_parts))

    def tidy(self, fanout: int = 10, unit_bytes: int = 64 << 10) -> int:
        """Merge runs of similar-sized parts, so that the part count stays logarithmic. Returns parts removed.

        Every append is a part, so a long run leaves thousands, and a read opens each one
        (about a millisecond apiece). A full ``compact`` rewrites every row each time;
        this merges only ``fanout`` or more *adjacent* parts of the lowest size tier it can
        (tier k: under ``unit_bytes`` x fanout^k bytes on disk; smaller parts among them
        are merged with them), newest run first, and repeats as merged parts fill the
        next tier. A row is rewritten once per tier (a handful of
        times in all), parts stay in write order (a run's merged part takes its oldest
        time), and at most about fanout parts per tier remain. Same safety as ``compact``.
        """
        if fanout < 2:
            raise InvalidInput(f"{self.name}: tidy needs a fanout of at least 2, got {fanout!r}")
        if len(self._part_names()) < fanout:
            return 0
        return self._under_compaction_lock(lambda: self._tidy_locked(fanout, unit_bytes))

    def _under_compaction_lock(self, merge: Callable[[], int]) -> int:
        lock_path = self.folder / ".compact.lock"
        try:
            lock = open(lock_path, "a+b")
        except OSError as e:
            raise StoreError(f"raysched store {self.name!r}: cannot open {lock_path} ({e})") from e
        with lock:
            if fcntl is not None:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return 0
            try:
                self._remove_stale_tmp()
                return merge()
            finally:
                if fcntl is not None:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _merge_all(self, min_parts: int) -> int:
        names = self._part_names()
        return self._merge(names) if len(names) >= min_parts else 0

    def _tidy_locked(self, fanout: int, unit_bytes: int) -> int:
        removed = 0
        while True:
            names = self._part_names()
            sizes = []
            for name in names:
                try:
                    sizes.append((self.folder / name).stat().st_size)
                except FileNotFoundError:  # only a compaction deletes parts, and this one holds the lock
                    sizes.append(0)
            run = newest_mergeable_run(sizes, fanout, unit_bytes)
            if run is None:
                return removed
            merged = self._merge(names[run[0]:run[1]])
            if merged == 0:
                return removed  # nothing readable to merge there: do not loop on it
            removed += merged

    def _merge(self, names: Sequence[str]) -> int:
        """Write the rows of ``names`` (adjacent parts, oldest first) as one part, then delete them."""
        columns = list(self.schema.names)
        merged: list[str] = []
        tables: list[pa.Table] = []
        messages: list[str] = []
        for name in names:
            try:
                table, message = self._read_part(name, columns)
            except _Vanished:  # only another compaction deletes parts, and it holds the lock
                continue
            if message:
                messages.append(message)
            extra = self._unknown_columns(name) if table is not None else ()
            if extra:  # merged, they would be lost: the part stays as it is (reads skip them)
                messages.append(f"raysched store {self.name!r}: not merging {self.folder / name}: its column(s) "
                                f"{', '.join(extra)} are not in this raysched's schema and would be lost")
            elif table is not None:
                merged.append(name)
                tables.append(table)
        for message in messages:
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        if len(merged) < 2:
            return 0
        table = self._concat(tables, columns)
        if self._has_row_id and table.num_rows:
            table = _dedupe(table)
        # Named with the oldest merged part's time: a part another writer named before this merge
        # and put in place after it (its rows written last) must still read after these rows.
        self._write_part(table, time_ns=min(_time_of(n) for n in merged) or None)
        removed = 0
        for name in merged:
            try:
                (self.folder / name).unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                warnings.warn(
                    f"raysched store {self.name!r}: merged {name} but could not delete it ({e}); "
                    "its rows are de-duplicated on read",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return removed

    def _unknown_columns(self, name: str) -> list[str]:
        try:
            names = pq.read_schema(self.folder / name).names
        except Exception:  # noqa: BLE001 - it was just read whole: a vanished part merges nothing
            return []
        return [c for c in names if c not in self._known]

    def _remove_stale_tmp(self) -> None:
        """Delete temporary files that crashed writers left behind (older than an hour)."""
        cutoff = time.time() - _STALE_TMP_SECONDS
        try:
            with os.scandir(self.folder) as it:
                for e in it:
                    if e.name.startswith(TMP_PREFIX):
                        try:
                            if e.stat().st_mtime < cutoff:
                                os.unlink(e.path)
                        except OSError:
                            pass
        except OSError:
            pass


__all__ = ["ParquetTable", "PART_PREFIX", "PART_SUFFIX", "QUARANTINE"]
