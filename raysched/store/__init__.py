"""raysched's storage layer: the only package that imports pyarrow and mlflow.

- ``ProfileStore`` (``profiles.py``): attempt rows and monitor events, append-only Parquet;
- ``ParquetTable`` (``parquet.py``): the append-only, multi-process-safe Parquet table under it;
- ``PROFILE_SCHEMA`` / ``EVENT_SCHEMA`` / ``SCHEMA_VERSION`` (``schema.py``);
- ``ModelRegistry`` (``registry.py``): trained models in MLflow (SQLite + local artifacts).

Names are imported lazily, so ``import raysched.store`` stays cheap and importing the
profile store does not pull in MLflow (several seconds to import).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ProfileStore": "profiles",
    "ParquetTable": "parquet",
    "PROFILE_SCHEMA": "schema",
    "EVENT_SCHEMA": "schema",
    "SCHEMA_VERSION": "schema",
    "new_row_id": "schema",
    "ModelRegistry": "registry",
    "registered_name": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'raysched.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
