"""The Parquet schemas of raysched's tables, versioned.

``SCHEMA_VERSION`` is written into every Parquet file's metadata under
``SCHEMA_VERSION_KEY``.  Readers read files written by a newer version by the
columns they know (skipping, with a warning, one whose columns do not read so, and
never merging one with columns they do not know), and read older files with the
columns those lacked as null.  Bump the version whenever a column is added; never change a column's
type or meaning in place (add a new column instead).

Nullability: every column is nullable except the few marked ``nullable=False``.
"""

from __future__ import annotations

import uuid
from typing import Mapping

import pyarrow as pa

from ..types import Outcome

#: 2: ``calls`` (the calls a row stands for, when short calls are thinned).
SCHEMA_VERSION = 2
#: Key of the schema version in a Parquet file's (and a pa.Schema's) metadata.
SCHEMA_VERSION_KEY = b"raysched.schema_version"

_TS = pa.timestamp("us", tz="UTC")
_STRINGS = pa.list_(pa.string())


def _schema(fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})


#: One row per task attempt (measured by Ray or imported from a trace).
PROFILE_SCHEMA: pa.Schema = _schema(
    [
        pa.field("row_id", pa.string(), nullable=False),  # uuid of the attempt: the "attempt_id"
        pa.field("schema_version", pa.int16()),
        pa.field("function", pa.string(), nullable=False),
        pa.field("code_hash", pa.string(), nullable=False),
        pa.field("call_id", pa.string()),
        pa.field("attempt", pa.int32()),  # 1 for the first attempt of a call, 2 for the next...
        pa.field("outcome", pa.string()),  # one of Outcome's values
        pa.field("error", pa.string()),
        pa.field("timestamp", _TS),  # when the attempt ended
        pa.field("started_at", _TS),
        pa.field("node_id", pa.string()),
        pa.field("worker_pid", pa.int32()),
        pa.field("input_size", pa.int64()),
        pa.field("tags", _STRINGS),
        pa.field("arg_shapes", _STRINGS),
        pa.field("dependencies", _STRINGS),
        pa.field("priority", pa.int32()),
        pa.field("prediction_source", pa.string()),
        pa.field("predicted_memory_bytes", pa.int64()),
        pa.field("predicted_memory_upper_bytes", pa.int64()),
        pa.field("predicted_cpu", pa.float64()),
        pa.field("predicted_wall_seconds", pa.float64()),
        pa.field("allocated_num_cpus", pa.float64()),
        pa.field("allocated_memory_bytes", pa.int64()),
        pa.field("rung", pa.int16()),
        pa.field("peak_rss_bytes", pa.int64()),
        pa.field("start_rss_bytes", pa.int64()),
        # What estimators learn from: peak_rss_bytes for ok rows, the bumped sample for oom_killed rows.
        pa.field("memory_sample_bytes", pa.int64()),
        pa.field("cpu_seconds", pa.float64()),
        pa.field("cpu_cores", pa.float64()),
        pa.field("wall_seconds", pa.float64()),
        pa.field("read_bytes", pa.int64()),
        pa.field("write_bytes", pa.int64()),
        pa.field("read_chars", pa.int64()),
        pa.field("write_chars", pa.int64()),
        pa.field("source", pa.string()),  # "ray" for measured rows, "import:nextflow" / "import:lotaru"...
        # The calls this row stands for: 1, or 1 + the calls of a thinned function that
        # its worker counted, not measured, in the same batch (policy/thinning.py); a row
        # with no call_id and no usage stands for counted calls only.  Null (rows written
        # before schema 2, imported rows) means 1.
        pa.field("calls", pa.int32()),
    ]
)

#: One row per decision of the runtime monitor (a rule fired, an action taken).
EVENT_SCHEMA: pa.Schema = _schema(
    [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("schema_version", pa.int16()),
        pa.field("function", pa.string(), nullable=False),
        pa.field("code_hash", pa.string()),
        pa.field("call_id", pa.string()),
        pa.field("attempt", pa.int32()),
        pa.field("rule", pa.string()),
        pa.field("action", pa.string()),
        pa.field("measured", pa.float64()),
        pa.field("allocated", pa.float64()),
        pa.field("detail", pa.string()),
        pa.field("node_id", pa.string()),
        pa.field("timestamp", _TS),
    ]
)

#: Columns whose values must come from a closed set, checked on append.
PROFILE_ALLOWED_VALUES: Mapping[str, frozenset[str]] = {
    "outcome": frozenset(o.value for o in Outcome),
}


def new_row_id() -> str:
    """A fresh row id. Generate it once per attempt, before the first write, so a retried write dedupes."""
    return uuid.uuid4().hex


def schema_version_of(schema: pa.Schema | None) -> int | None:
    """The raysched schema version recorded in a schema's metadata, or None when absent."""
    metadata = (schema.metadata or {}) if schema is not None else {}
    raw = metadata.get(SCHEMA_VERSION_KEY)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


__all__ = [
    "SCHEMA_VERSION",
    "SCHEMA_VERSION_KEY",
    "PROFILE_SCHEMA",
    "EVENT_SCHEMA",
    "PROFILE_ALLOWED_VALUES",
    "new_row_id",
    "schema_version_of",
]
