"""A trace -> profile-store rows: warm-start raysched from runs made elsewhere.

Each usable trace row becomes one successful attempt of the function named after
its task type (``function`` = ``process`` / ``Task``), with ``code_hash`` =
``"imported"`` (the runtime treats such rows as history for any code of that
name) and ``source`` = ``"import:<format>"``.  A row's id is a digest of the trace
up to and including it (the values of it and of every usable row before it), so
importing the same trace twice, or a copy of it under another name, writes nothing
new, and a trace that grew since (Nextflow appends to it) adds only its new rows.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ..errors import StoreError
from ..types import IMPORTED_CODE_HASH
from .readers import Trace

_NAMESPACE = uuid.UUID("6f1c3f0e-5a7e-4f43-9d0b-7a2f3f2b9e11")


def _int_or_none(value: float) -> int | None:
    return int(value) if value is not None and math.isfinite(value) else None


def _float_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _content_digest(path: str | Path) -> str:
    """The file's content as a short digest (its name, if it cannot be read again)."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return Path(path).name
    return digest.hexdigest()


def _legacy_row_id(trace: Trace, r: object) -> str:
    """The id a row of this trace had when ids were made from the file's name (before content
    digests): a store that imported the file then must not take it again."""
    key = f"{trace.format}:{Path(trace.path).name}:{r.row}:{r.task_type}:{r.peak_rss:.0f}:{r.realtime_ms:.0f}"  # type: ignore[attr-defined]
    return uuid.uuid5(_NAMESPACE, key).hex


def _whole_file_row_id(trace: Trace, source: str, r: object) -> str:
    """The id a row had when ids were made from the whole file's digest: a store that imported
    the file then must not take it again."""
    key = f"{trace.format}:{source}:{r.row}:{r.task_type}:{r.peak_rss:.0f}:{r.realtime_ms:.0f}"  # type: ignore[attr-defined]
    return uuid.uuid5(_NAMESPACE, key).hex


def _prefix_row_ids(trace: Trace) -> list[str]:
    """Each row's id: a digest of the trace's usable rows up to and including it."""
    running = hashlib.blake2b(trace.format.encode(), digest_size=16)
    ids = []
    for r in trace.rows.itertuples(index=False):
        running.update(f"\n{r.task_type}:{r.peak_rss!r}:{r.realtime_ms!r}:{r.input_size!r}:{r.memory!r}:"
                       f"{r.cpus!r}:{r.cpu_pct!r}".encode())
        ids.append(uuid.uuid5(_NAMESPACE, running.copy().hexdigest()).hex)
    return ids


def trace_rows(trace: Trace, now: datetime | None = None) -> list[dict[str, object]]:
    """The profile rows of a trace (see ``raysched.store.schema.PROFILE_SCHEMA``)."""
    from ..store.schema import SCHEMA_VERSION

    now = now or datetime.now(timezone.utc)
    n = len(trace.rows)
    rows = []
    # By the content, not the file's name: a copy under another name is the same runs.
    row_ids = _prefix_row_ids(trace)
    for i, r in enumerate(trace.rows.itertuples(index=False)):
        wall = r.realtime_ms / 1000.0
        cores = r.cpu_pct / 100.0 if math.isfinite(r.cpu_pct) else None
        # File order is kept as time order (oldest first), all before the import itself.
        ts = now - timedelta(microseconds=n - i)
        rows.append(
            {
                "row_id": row_ids[i],
                "schema_version": SCHEMA_VERSION,
                "function": str(r.task_type),
                "code_hash": IMPORTED_CODE_HASH,
                "attempt": 1,
                "outcome": "ok",
                "timestamp": ts,
                "started_at": ts - timedelta(seconds=wall),
                "input_size": _int_or_none(r.input_size),
                "allocated_memory_bytes": _int_or_none(r.memory),
                "allocated_num_cpus": _float_or_none(r.cpus),
                "peak_rss_bytes": int(r.peak_rss),
                "memory_sample_bytes": int(r.peak_rss),
                "cpu_cores": cores,
                "cpu_seconds": cores * wall if cores is not None else None,
                "wall_seconds": wall,
                "source": f"import:{trace.format}",
            }
        )
    return rows


def import_trace(trace: Trace, home: str | Path) -> tuple[int, dict[str, int]]:
    """Append the trace's rows that the profile store at ``home`` does not hold yet
    (row ids are derived from the rows up to each); (rows written, new rows per task type)."""
    from ..store.profiles import ProfileStore

    rows = trace_rows(trace)
    if not rows:
        return 0, {}
    try:
        store = ProfileStore(home)
        held = set(store.profiles.read_table(columns=["row_id"]).column("row_id").to_pylist())
        source = _content_digest(trace.path)
        # What earlier raysched versions named the same rows: by the file's name, then by its whole digest.
        earlier = [(_legacy_row_id(trace, r), _whole_file_row_id(trace, source, r))
                   for r in trace.rows.itertuples(index=False)]
        rows = [row for row, ids in zip(rows, earlier) if row["row_id"] not in held and not held.intersection(ids)]
        per_type: dict[str, int] = {}
        for row in rows:
            per_type[row["function"]] = per_type.get(row["function"], 0) + 1  # type: ignore[index]
        written = store.append(rows) if rows else 0
        if written:
            store.note_outside_write(per_type)  # a profiler already running serves them too
    except StoreError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot write the profile store at {home}: {exc}") from exc
    return int(written), per_type
