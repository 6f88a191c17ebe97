"""Readers of real workflow traces into one normalised table.

Two formats are understood:

- ``nextflow``: a Nextflow trace file (``trace.txt`` / ``trace_*.csv``), comma or tab
  separated, with raw numbers (``trace.raw = true``) or Nextflow's human units
  (``4 GB``, ``1m 3s``).  The task type is ``process``, the input size ``rchar``.
- ``lotaru``: the execution reports of the Lotaru paper (Bader et al., FGCS 2024).
  The task type is ``Task``, the input size ``TaskInputSize``, and the authors'
  ``Label`` column (``train-1``, ``train-2``, ``test``) says which rows are history
  and which arrive online.

Whatever the format, :func:`read_trace` returns a :class:`Trace` whose ``rows`` has
the columns of :data:`COLUMNS`, one row per usable task instance, and whose
``skipped`` counts the rows left out and why.  A row is usable when it has a
positive peak memory and a positive runtime; ``-`` or empty values are missing.
A file that is not a trace of the named format (missing columns, unreadable)
raises :class:`TraceFormatError` with the file and what is missing; it never
crashes with a pandas traceback.

Pure pandas/numpy: no ray, mlflow or pyarrow.
"""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import InvalidInput

FORMATS: tuple[str, ...] = ("nextflow", "lotaru")

#: Columns of :attr:`Trace.rows`.
#: - ``task_type``: the process / Task name;
#: - ``peak_rss``: peak resident memory in bytes (what an allocation must cover);
#: - ``realtime_ms``: the task's wall time in milliseconds;
#: - ``input_size``: bytes read (``rchar``) or the explicit ``TaskInputSize``; NaN if unknown;
#: - ``memory``: the memory the workflow requested (its preset) in bytes; NaN if none;
#: - ``attempt``: Nextflow's attempt number of the run (1 where the trace has none): a
#:   retried run's ``memory`` is already the first request x attempt (nf-core's idiom);
#: - ``cpus``: cores requested; ``cpu_pct``: measured %cpu (100 = one core);
#: - ``split``: ``"history"`` / ``"online"`` when the trace fixes the split (lotaru), else ``""``;
#: - ``row``: the row's 0-based position in the file (data rows only), for messages.
COLUMNS: tuple[str, ...] = (
    "task_type",
    "peak_rss",
    "realtime_ms",
    "input_size",
    "memory",
    "attempt",
    "cpus",
    "cpu_pct",
    "split",
    "row",
)


class TraceFormatError(InvalidInput):
    """A file is not a readable trace of the format it was given as."""


class NotATrace(TraceFormatError):
    """A file whose header is no trace's at all (another table, a text report, an HTML page, a
    binary file), as opposed to a trace that is empty or broken."""


@dataclass
class Trace:
    """One trace file, normalised."""

    name: str  # the file's stem: the workflow's name in every report
    path: str
    format: str
    rows: pd.DataFrame
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def describe_skipped(self) -> str:
        if not self.skipped:
            return "no rows skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"skipped {self.n_skipped} row(s): {parts}"


# --------------------------------------------------------------------------- units

_MEMORY_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1024,
    "MB": 1024**2,
    "GB": 1024**3,
    "TB": 1024**4,
    "PB": 1024**5,
}
_MEMORY_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGTP]?B)?\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)", re.IGNORECASE)
_DURATION_MS = {"ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0, "d": 86_400_000.0}


def _number_or_text(value: object) -> float | str:
    """A number as float, a missing value (None, "", "-") as NaN, anything else as stripped text."""
    if value is None:
        return float("nan")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    text = str(value).strip()
    return float("nan") if text in ("", "-") else text


def parse_memory(value: object) -> float:
    """Bytes from a raw number or Nextflow's ``"4 GB"`` form (binary units); NaN if missing."""
    text = _number_or_text(value)
    if isinstance(text, float):
        return text
    m = _MEMORY_RE.match(text)
    if not m:
        return float("nan")
    return float(m.group(1)) * _MEMORY_UNITS[(m.group(2) or "").upper()]


def parse_duration_ms(value: object) -> float:
    """Milliseconds from a raw number or Nextflow's ``"1h 2m 3.5s"`` / ``"120ms"`` form; NaN if missing."""
    text = _number_or_text(value)
    if isinstance(text, float):
        return text
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION_RE.findall(text)
    if not parts or _DURATION_RE.sub("", text).strip():
        return float("nan")
    return sum(float(n) * _DURATION_MS[u.lower()] for n, u in parts)


def _parse_percent(value: object) -> float:
    if value is None:
        return float("nan")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    text = str(value).strip().rstrip("%")
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _numeric(series: pd.Series, parser) -> pd.Series:
    """Numbers from a column that may hold '-', blanks or human units."""
    direct = pd.to_numeric(series, errors="coerce")
    bad = direct.isna() & series.notna()
    if bad.any():
        direct = direct.astype(float)
        direct[bad] = [parser(v) for v in series[bad]]
    return direct.astype(float)


# --------------------------------------------------------------------------- reading


#: Why rows with more fields than the header are left out (see ``_read_table``).
_EXTRA_FIELDS = "with more fields than the header (a separator inside a value?)"


def _widest_row(path: Path, sep: str) -> int:
    """The most fields any row of the file has (0 if the csv module cannot tell)."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
            return max((len(r) for r in csv.reader(fh, delimiter=sep)), default=0)
    except (csv.Error, OSError):
        return 0


def _read_table(path: Path, fmt: str) -> tuple[pd.DataFrame, int]:
    """The file's table (every cell a string or NaN) and how many rows were left out for
    having more fields than the header."""
    if not path.exists():
        raise TraceFormatError(f"{path}: no such file")
    if path.is_dir():
        raise TraceFormatError(f"{path}: is a folder; pass its .csv/.txt files (the CLI expands folders)")
    extra_rows = 0
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as fh:  # -sig: a spreadsheet's BOM
            header = fh.readline()
        # Nextflow writes a tab-separated trace.txt by default; the published traces are CSV.
        sep = "\t" if header.count("\t") > header.count(",") else ","
        options = dict(sep=sep, dtype=str, keep_default_na=False, na_values=["-", ""], encoding="utf-8-sig")
        columns = list(pd.read_csv(path, nrows=0, index_col=False, **options).columns)
        widest = _widest_row(path, sep)
        if widest > len(columns):
            # A row with more fields than the header: pandas rejected the whole file for it, or,
            # the first data row, cut it to the header's width, and a separator inside a value
            # (Nextflow writes a tag such as "[id:s1, single_end:false]" unquoted) shifted every
            # later field into the wrong column: status, peak_rss and realtime read from others.
            # Such a row is left out and counted; one whose extra fields are all empty (a
            # trailing delimiter) is read as it is.
            raw = pd.read_csv(path, header=None, skiprows=1, names=list(range(widest)), index_col=False, **options)
            extra = raw.iloc[:, len(columns):].notna().any(axis=1).to_numpy()
            extra_rows = int(extra.sum())
            frame = raw.loc[~extra, list(range(len(columns)))].reset_index(drop=True)
            frame.columns = columns
        else:
            # index_col=False: a trailing delimiter on every data row must not make the first column the index.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", pd.errors.ParserWarning)
                frame = pd.read_csv(path, index_col=False, **options)
            if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
                warnings.warn(f"{path}: some rows have more fields than the header; their extra fields were ignored",
                              RuntimeWarning, stacklevel=3)
    except pd.errors.EmptyDataError:
        raise TraceFormatError(f"{path}: empty file, not a {fmt} trace") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise TraceFormatError(f"{path}: cannot be parsed as a {fmt} trace table: {exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame, extra_rows


def _require(frame: pd.DataFrame, path: Path, fmt: str, required: Iterable[str]) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        present = ", ".join(list(frame.columns)[:12]) + (", ..." if len(frame.columns) > 12 else "")
        raise TraceFormatError(
            f"{path}: not a {fmt} trace: missing column(s) {', '.join(missing)} (found: {present or 'none'})"
        )


_MAX_REALTIME_MS = 365 * 24 * 3600 * 1000.0
#: More cores than any one task has had: a figure past it is a broken trace, not a measurement.
_MAX_CORES = 10_000


def _finish(frame: pd.DataFrame, path: Path, fmt: str, out: pd.DataFrame, skipped: dict[str, int]) -> Trace:
    out["row"] = np.arange(len(out))
    keep = np.ones(len(out), dtype=bool)

    def drop(mask: np.ndarray, reason: str) -> None:
        nonlocal keep
        hit = mask & keep
        if hit.any():
            skipped[reason] = skipped.get(reason, 0) + int(hit.sum())
        keep &= ~mask

    drop(out["task_type"].isna().to_numpy() | (out["task_type"].astype(str).str.strip() == "").to_numpy(), "without a task type")
    drop(out["peak_rss"].isna().to_numpy(), "without peak_rss")
    drop((out["peak_rss"] <= 0).to_numpy(), "with zero or negative peak_rss")
    drop(np.isinf(out["peak_rss"].to_numpy(float)), "with infinite peak_rss")
    drop(out["realtime_ms"].isna().to_numpy(), "without realtime")
    drop((out["realtime_ms"] <= 0).to_numpy(), "with zero or negative realtime")
    # A year: what no task of a trace runs for, and what keeps every figure finite downstream.
    drop(~(out["realtime_ms"].to_numpy(float) < _MAX_REALTIME_MS), "with realtime over a year")
    drop((out["peak_rss"].to_numpy(float) >= 2.0**63), "with peak_rss past 2**63 bytes")
    # Last: a broken row is counted by what is wrong with it.
    if "duplicate" in out.columns:
        # The same run twice (two copies of a trace joined): replayed twice, a copy could be in
        # the history and its twin online, scored on a job already seen (an audit). Two real
        # runs never share every field where there are ids or time stamps (Nextflow:
        # _repeated_runs), or Lotaru's dozen measured figures.
        drop(out["duplicate"].to_numpy(bool), "duplicating an earlier row")
    rows = out[keep].reset_index(drop=True)
    rows["task_type"] = rows["task_type"].astype(str).str.strip()
    for col in ("peak_rss", "realtime_ms", "input_size", "memory", "cpus", "cpu_pct"):
        rows[col] = rows[col].astype(float)
    # Memory presets of zero or less mean "no limit set": treat them as missing.
    rows.loc[rows["memory"] <= 0, "memory"] = np.nan
    # An input size that cannot be one (negative, infinite, past int64) is unknown, not a reason to drop the run.
    bad_input = (rows["input_size"] < 0) | ~(rows["input_size"] < 2.0**63)
    rows.loc[bad_input & rows["input_size"].notna(), "input_size"] = np.nan
    rows.loc[~(rows["memory"] < 2.0**63) & rows["memory"].notna(), "memory"] = np.nan
    # An attempt number that cannot be one (missing, under 1, fractional, absurd) counts as the first.
    attempt = rows["attempt"].astype(float)
    rows["attempt"] = attempt.where((attempt >= 1) & (attempt <= 1000) & (attempt == attempt.round()), 1.0)
    # Cores that cannot be (none or fewer requested, a negative, infinite or absurd %cpu) are
    # unknown: imported as they were, 1e306 cores became a prediction's upper bound (an audit).
    rows.loc[~(rows["cpus"] > 0) | ~(rows["cpus"] <= _MAX_CORES), "cpus"] = np.nan
    rows.loc[~(rows["cpu_pct"] >= 0) | ~(rows["cpu_pct"] <= 100 * _MAX_CORES), "cpu_pct"] = np.nan
    return Trace(name=path.stem, path=str(path), format=fmt, rows=rows[list(COLUMNS)], skipped=skipped)


#: Nextflow trace fields that tell two runs apart (ids and time stamps).
_RUN_IDENTITY = ("task_id", "hash", "native_id", "submit", "start", "complete")


def _repeated_runs(frame: pd.DataFrame) -> np.ndarray:
    """Rows repeating an earlier row field for field, where the fields can tell runs apart: a
    trace of only process, peak_rss and realtime has genuine runs alike (47 of chipseq's
    2,615 cut to those columns), so without an id or a time stamp no row is a repeat."""
    if not any(column in frame.columns for column in _RUN_IDENTITY):
        return np.zeros(len(frame), dtype=bool)
    return frame.duplicated().to_numpy()


def read_nextflow(path: str | Path) -> Trace:
    """Read a Nextflow trace file; only COMPLETED rows are ground truth (others are skipped, counted)."""
    path = Path(path)
    frame, extra_rows = _read_table(path, "nextflow")
    if "process" not in frame.columns and "name" in frame.columns:
        # Nextflow's default trace fields have no `process`: a task's `name` is its process
        # and, in brackets, its tag ("NFCORE_RNASEQ:RNASEQ:FASTQC (sample1)").
        # A process name has no spaces: everything from the first " (" on is the tag.
        frame = frame.assign(process=frame["name"].astype(str).str.split(" (", n=1, regex=False).str[0].str.strip())
    _require(frame, path, "nextflow", ("process", "peak_rss", "realtime"))
    skipped: dict[str, int] = {_EXTRA_FIELDS: extra_rows} if extra_rows else {}
    if "status" in frame.columns:
        status = frame["status"].fillna("").astype(str).str.strip().str.upper()
        not_done = ~status.isin(["COMPLETED", ""])
        if not_done.any():
            for s, n in status[not_done].value_counts().items():
                skipped[f"with status {s}"] = int(n)
            frame = frame[~not_done]
    n = len(frame)

    def col(name: str, parser) -> pd.Series:
        if name not in frame.columns:
            return pd.Series(np.full(n, np.nan), index=frame.index)
        return _numeric(frame[name], parser)

    out = pd.DataFrame(
        {
            "task_type": frame["process"],
            "peak_rss": col("peak_rss", parse_memory),
            "realtime_ms": col("realtime", parse_duration_ms),
            "input_size": col("rchar", parse_memory),
            "memory": col("memory", parse_memory),
            "attempt": col("attempt", parse_memory),
            "cpus": col("cpus", parse_memory),
            "cpu_pct": col("%cpu", _parse_percent),
            "split": "",
            "duplicate": _repeated_runs(frame),
        }
    ).reset_index(drop=True)
    return _finish(frame, path, "nextflow", out, skipped)


def read_lotaru(path: str | Path) -> Trace:
    """Read one Lotaru execution report; ``Label`` train-* rows are history, test rows online."""
    path = Path(path)
    frame, extra_rows = _read_table(path, "lotaru")
    _require(frame, path, "lotaru", ("Label", "Task", "Realtime", "peak_rss"))
    n = len(frame)

    def col(name: str, parser) -> pd.Series:
        if name not in frame.columns:
            return pd.Series(np.full(n, np.nan), index=frame.index)
        return _numeric(frame[name], parser)

    label = frame["Label"].fillna("").astype(str).str.strip().str.lower()
    split = np.where(label.str.startswith("train"), "history", np.where(label == "test", "online", ""))
    input_size = col("TaskInputSize", parse_memory)
    if "TaskInputSize" not in frame.columns:
        input_size = col("rchar", parse_memory)
    out = pd.DataFrame(
        {
            "task_type": frame["Task"],
            "peak_rss": col("peak_rss", parse_memory),
            "realtime_ms": col("Realtime", parse_duration_ms),
            "input_size": input_size,
            "memory": col("memory", parse_memory),
            "attempt": 1.0,
            "cpus": col("cpus", parse_memory),
            "cpu_pct": col("%cpu", _parse_percent),
            "split": split,
            "duplicate": frame.duplicated().to_numpy(),
        }
    ).reset_index(drop=True)
    skipped: dict[str, int] = {_EXTRA_FIELDS: extra_rows} if extra_rows else {}
    unknown = out["split"] == ""
    if unknown.any():
        skipped["with a Label other than train-*/test"] = int(unknown.sum())
        out.loc[unknown, "peak_rss"] = np.nan  # dropped below, counted above only once
        out = out[~unknown.to_numpy()].reset_index(drop=True)
    return _finish(frame, path, "lotaru", out, skipped)


_READERS = {"nextflow": read_nextflow, "lotaru": read_lotaru}


def sniff_format(path: str | Path) -> str:
    """Guess a file's format from its header line (``Label``+``Task`` -> lotaru; ``process``, or
    Nextflow's default ``name`` with ``peak_rss`` and ``realtime`` -> nextflow)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            header = fh.readline()
    except OSError as exc:
        raise TraceFormatError(f"{path}: cannot be read: {exc}") from None
    names = {h.strip().strip('"') for h in re.split(r"[,\t]", header)}
    if {"Label", "Task"} <= names:
        return "lotaru"
    if "process" in names or {"name", "peak_rss", "realtime"} <= names:
        return "nextflow"
    if not header.strip():
        raise TraceFormatError(f"{path}: empty file, not a trace")
    # Told apart from a table of other columns: "pass --format" does not help with these.
    if "\x00" in header or "\ufffd" in header:
        raise NotATrace(f"{path}: not a text file (binary, or compressed: decompress a .gz trace first)")
    if header.lstrip().startswith("<"):
        raise NotATrace(f"{path}: an HTML page (a Nextflow execution report?), not a trace table; pass "
                        "the trace file (Nextflow's trace.txt, nf-core's pipeline_info/execution_trace_*.txt)")
    # A header with a measurement of a trace is a trace short of columns; one with none, another table.
    error = TraceFormatError if names & {"peak_rss", "realtime", "Realtime"} else NotATrace
    raise error(
        f"{path}: cannot tell the trace format from its header; pass --format ({'|'.join(FORMATS)}). "
        "A Nextflow trace needs process (or name), peak_rss and realtime, and rchar for input sizes; "
        "a Lotaru trace Task, Label, Realtime and peak_rss"
    )


def read_trace(path: str | Path, fmt: str = "auto") -> Trace:
    """Read a trace of format ``fmt`` (``nextflow``, ``lotaru`` or ``auto`` to sniff the header)."""
    if fmt == "auto":
        fmt = sniff_format(path)
    reader = _READERS.get(fmt)
    if reader is None:
        raise TraceFormatError(f"unknown trace format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return reader(path)


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files from a mix of files and folders (a folder contributes its *.csv, *.tsv and *.txt,
    sorted); a file named twice (itself and in its folder) is read once."""
    out: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in (".csv", ".tsv", ".txt") and q.is_file())
            found = [q for q in found if q.name.lower() != "readme.txt"]
        else:
            found = [p]
        for q in found:
            if q.resolve() not in seen:
                seen.add(q.resolve())
                out.append(q)
    return out


def workflow_names(files: Sequence[Path]) -> dict[Path, str]:
    """Each file's name in the reports: its stem, or where two files share one, the stem with as
    many of its folders as tell them apart ("a/iwd", "b/iwd"). With stems alone, the JSON, keyed
    by name, kept only the last of two files called iwd.csv (an audit)."""
    names: dict[Path, str] = {}
    for f in files:
        twins = [g for g in files if g.stem == f.stem]
        if len(twins) == 1:
            names[f] = f.stem
            continue
        for depth in range(1, len(f.resolve().parts)):
            tails = ["/".join(g.resolve().parts[-depth - 1:-1] + (g.stem,)) for g in twins]
            if len(set(tails)) == len(tails):
                names[f] = "/".join(f.resolve().parts[-depth - 1:-1] + (f.stem,))
                break
        else:  # one folder, two suffixes (iwd.csv, iwd.tsv)
            names[f] = str(f.resolve())
    return names
