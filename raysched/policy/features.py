"""A call's arguments and metadata -> Features; Features -> the model's numeric row.

Pure: imports neither ray, mlflow nor pyarrow.  Sizes are found by duck typing
(``nbytes``, ``memory_usage``, ``__len__``), so numpy and pandas need not be
imported here either; Ray ObjectRefs are sized by a callback the runtime injects.
"""

from __future__ import annotations

import math
import numbers
import os
import stat
import time
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..errors import InvalidInput, InvalidRayOption
from ..types import MAX_BYTES, Features

#: A callback that returns the size in bytes of an opaque object (a Ray ObjectRef),
#: or None when it is not known.
SizeOf = Callable[[Any], Optional[int]]

#: Containers are walked this deep and this wide; a list of a million items is
#: sized from its first items and extrapolated, never walked whole on submission.
_MAX_DEPTH = 3
_MAX_ITEMS = 256
#: ...and at most this many items are taken from the containers of one argument in all; once
#: they are spent, each container further in is sized from its first item (at least one, so
#: that every level is still extrapolated). Each level 256 items wide, a batch of images as
#: nested lists cost ~13 million probes (14 s of the driver per submission).
_MAX_WALK = 4096
_MAX_DIR_FILES = 10_000
_MAX_SHAPES = 16

#: A model gives each of the most frequent tags of its training runs a feature of its
#: own (its ``tags``: a vocabulary kept with the model, so that the driver, the profiler
#: and the replay agree); a rarer tag, or one the model never saw, has none.  Hashed
#: buckets made two tags one to the model whenever their hashes met.
MAX_TAG_FEATURES = 64


# --- validation: bad input gets a clear error -----------------------------------------


#: Priorities are stored as int32.
MIN_PRIORITY, MAX_PRIORITY = -(2**31), 2**31 - 1


def validate_input_size(value: Any, what: str = "input_size") -> int | None:
    """None, or a non-negative integer number of bytes (at most ``MAX_BYTES``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInput(f"{what} must be a non-negative number of bytes, got {value!r} ({type(value).__name__})")
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):  # numpy's float32 NaN too
        raise InvalidInput(f"{what} must be finite, got {value!r}")
    if value < 0:
        raise InvalidInput(f"{what} must be non-negative, got {value!r}")
    if value > MAX_BYTES:
        raise InvalidInput(f"{what} must be at most 2**63 - 1 bytes, got {value!r}")
    return int(value)


def _refuse_non_number(value: Any, what: str, unit: str) -> None:
    """A Ray resource option that is not a number: a TypeError, as Ray's own check raises,
    so that code written for plain Ray's ``except TypeError`` catches it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRayOption(f"{what} must be a non-negative number of {unit}, got {value!r} ({type(value).__name__})")


def validate_memory(value: Any, what: str = "memory") -> int | None:
    """None, or a non-negative number of bytes (as Ray's ``memory`` option: 0 asks no label)."""
    if value is not None:
        _refuse_non_number(value, what, "bytes")
    return validate_input_size(value, what)


def validate_priority(value: Any, what: str = "priority") -> int:
    """An integer that fits the store's int32 column (larger runs first in the admission queue)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInput(f"{what} must be an integer, got {value!r}")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidInput(f"{what} must be between -2**31 and 2**31 - 1, got {value!r}")
    return int(value)


def validate_num_cpus(value: Any, what: str = "num_cpus") -> float | None:
    if value is None:
        return None
    _refuse_non_number(value, what, "cores")
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(f"{what} must be a non-negative number of cores, got {value!r}")
    return float(value)


def validate_tags(tags: Any, what: str = "tags") -> tuple[str, ...]:
    """A string or an iterable of strings -> a sorted, de-duplicated tuple."""
    if tags is None:
        return ()
    if isinstance(tags, str):
        return (tags,)
    if isinstance(tags, (bytes, Mapping)) or not isinstance(tags, Iterable):
        raise InvalidInput(f"{what} must be a string or a list of strings, got {tags!r}")
    out = []
    for tag in tags:
        if not isinstance(tag, str):
            raise InvalidInput(f"{what} must all be strings, got {tag!r} ({type(tag).__name__})")
        out.append(tag)
    return tuple(sorted(set(out)))


# --- sizes of arguments ------------------------------------------------------------------


def _path_size(path: str) -> int | None:
    """Size of a file, or of the files under a folder; None if the string names neither."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISDIR(st.st_mode):
        return int(st.st_size)
    # A folder named by every call of a map would be walked on every submission (tens of
    # ms for a few thousand files): its size is kept while the folder itself is
    # unchanged, for at most _DIR_SIZE_TTL_S (a file changed deeper down does not touch
    # the folder's own mtime).
    key = (path, st.st_dev, st.st_ino, st.st_mtime_ns)
    now = time.monotonic()
    known = _DIR_SIZES.get(key)
    if known is not None and now - known[1] < _DIR_SIZE_TTL_S:
        return known[0]
    total = _walk_size(path)
    if len(_DIR_SIZES) >= _DIR_SIZES_MAX:
        _DIR_SIZES.clear()
    _DIR_SIZES[key] = (total, now)
    return total


#: Folder sizes by (path, device, inode, mtime): (bytes, when walked).
_DIR_SIZES: dict[tuple, tuple[int, float]] = {}
_DIR_SIZES_MAX = 1024
_DIR_SIZE_TTL_S = 30.0


def _walk_size(path: str) -> int:
    """Bytes of the files under a folder (the first ``_MAX_DIR_FILES`` of them)."""
    total, seen = 0, 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            seen += 1
            if seen > _MAX_DIR_FILES:
                return total
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


#: Bytes a number inside a list, tuple, set or mapping counts for.
_PACKED_NUMBER = 8


def size_of(value: Any, size_of_opaque: SizeOf | None = None, _depth: int = 0,
            _budget: list[int] | None = None) -> int | None:
    """Best-effort size in bytes of one argument; None when nothing about it is sized.

    ``_budget``: the items its containers may still yield (``_MAX_WALK``), shared by its levels."""
    if value is None or isinstance(value, (bool, numbers.Number)):
        return None
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, memoryview):
        return value.nbytes
    if isinstance(value, os.PathLike):
        return _path_size(os.fspath(value))
    if isinstance(value, str):
        # A string that names a file is that file; any other string is its text.  One made
        # of separators and dots alone ("." as a sep=, "/" as a delimiter) is a parameter,
        # not the current or root folder (walking "/" took 0.3 s per submission).
        if len(value) < 4096 and (os.sep in value or "." in value) and value.strip(os.sep + "."):
            found = _path_size(value)
            if found is not None:
                return found
        return len(value.encode("utf-8", "surrogatepass"))
    memory_usage = getattr(value, "memory_usage", None)
    if callable(memory_usage) and hasattr(value, "shape"):  # pandas DataFrame / Series
        plain = _plain_frame_bytes(value)
        if plain is not None:
            return plain
        try:
            used = memory_usage(index=True, deep=False)
            return int(used.sum()) if hasattr(used, "sum") else int(used)
        except Exception:  # noqa: BLE001 - an odd object must never break submission
            pass
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, numbers.Integral) and not isinstance(nbytes, bool):  # numpy, arrow, torch...
        return int(nbytes)
    if size_of_opaque is not None:
        opaque = size_of_opaque(value)
        if opaque is not None:
            return int(opaque)
    if _depth >= _MAX_DEPTH:
        return None
    if isinstance(value, Mapping):
        container: Any = value.values()
    elif isinstance(value, (list, tuple, set, frozenset)):
        container = value
    else:
        return None
    if _budget is None:
        _budget = [_MAX_WALK]
    items = [item for _, item in zip(range(max(1, min(_MAX_ITEMS, _budget[0]))), container)]
    _budget[0] -= len(items)
    # Inside a container a number is data, 8 bytes as packed (a list of a million floats
    # is a big input); alone, it is a parameter and has no size.
    sizes = [_PACKED_NUMBER if isinstance(item, numbers.Number) else size_of(item, size_of_opaque, _depth + 1, _budget)
             for item in items]
    known = [s for s in sizes if s is not None]
    if not known:
        return None
    total = sum(known)
    if len(value) > len(items):  # extrapolate from the walked prefix
        total = int(total * len(value) / len(items))
    return total


def _plain_frame_bytes(frame: Any) -> int | None:
    """What ``memory_usage(index=True, deep=False).sum()`` gives for a frame or series of plain
    numpy columns (numbers, bools, datetimes, objects at 8 bytes each), counted from the
    dtypes: memory_usage builds a Series per call, 0.4 ms for a 1,000 x 10 frame (eight
    times Ray's pickling of it). None for anything else (extension, categorical or
    string dtypes), which memory_usage then counts."""
    try:
        dtypes = frame.dtypes
        dtypes = list(dtypes) if hasattr(dtypes, "__iter__") else [dtypes]  # a Series: one dtype
        index = frame.index
        if not all(isinstance(d, np.dtype) for d in dtypes) or not isinstance(index.dtype, np.dtype):
            return None
        return int(len(frame) * sum(d.itemsize for d in dtypes) + index.nbytes)
    except Exception:  # noqa: BLE001 - an odd object: memory_usage decides
        return None


def derive_input_size(args: Sequence[Any], kwargs: Mapping[str, Any], size_of_opaque: SizeOf | None = None) -> int | None:
    """Sum of the sizes of all arguments that can be sized; None if none can."""
    sizes = [_size_or_none(a, size_of_opaque) for a in args] + [_size_or_none(v, size_of_opaque) for v in kwargs.values()]
    known = [s for s in sizes if s is not None]
    return sum(known) if known else None


def _size_or_none(value: Any, size_of_opaque: SizeOf | None) -> int | None:
    """``size_of``, or None when probing the argument raises: Ray would pass it as it is, so
    its size is unknown, not a failed submission (an attribute-dict's ``__getattr__`` raises
    KeyError where ``getattr(value, "nbytes", None)`` expects AttributeError)."""
    try:
        return size_of(value, size_of_opaque)
    except Exception:  # noqa: BLE001 - an odd object must never break submission
        return None


def describe_arg(value: Any) -> str:
    """A short, stable description of an argument: type name and shape, never its content."""
    kind = type(value).__name__
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and all(isinstance(d, numbers.Integral) for d in shape):
        dtype = getattr(value, "dtype", None)
        dims = "x".join(str(int(d)) for d in shape)
        return f"{kind}[{dims}]" + (f":{dtype}" if dtype is not None and not hasattr(value, "columns") else "")
    if isinstance(value, (bytes, bytearray, str, list, tuple, dict, set)):
        return f"{kind}[{len(value)}]"
    return kind


def describe_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    described = [_described(a) for a in args] + [f"{k}={_described(v)}" for k, v in sorted(kwargs.items())]
    return tuple(described[:_MAX_SHAPES])


def _described(value: Any) -> str:
    """``describe_arg``, or the type's name when probing the argument raises."""
    try:
        return describe_arg(value)
    except Exception:  # noqa: BLE001 - as in _size_or_none
        return type(value).__name__


def call_features(
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    input_size: Any = None,
    tags: Any = (),
    dependencies: Sequence[str] = (),
    size_of_opaque: SizeOf | None = None,
) -> Features:
    """Everything raysched knows about a call before it runs."""
    size = validate_input_size(input_size)
    if size is None:
        size = derive_input_size(args, kwargs, size_of_opaque)
    return Features(
        input_size=size,
        tags=validate_tags(tags),
        arg_shapes=describe_args(args, kwargs),
        dependencies=tuple(dependencies),
    )


# --- the model's numeric row -------------------------------------------------------------


def tag_vocabulary(tags_per_run: Iterable[Sequence[str]], limit: int = MAX_TAG_FEATURES) -> tuple[str, ...]:
    """The tags a model gives features to: the ``limit`` most frequent, sorted."""
    counts = Counter(tag for run in tags_per_run for tag in run)
    frequent = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return tuple(sorted(tag for tag, _ in frequent))


def feature_names(vocabulary: Sequence[str] = ()) -> list[str]:
    """The model's column names: input size, then one per tag of its vocabulary, by position
    (XGBoost refuses some characters a tag may hold; the tags themselves are kept apart)."""
    return ["log2_input_size", *(f"tag_{i}" for i in range(len(vocabulary)))]


def log2_size(size: float | None) -> float:
    if size is None or not math.isfinite(size):
        return math.nan
    return math.log2(1.0 + max(0.0, float(size)))


def feature_row(features: Features, vocabulary: Sequence[str] = ()) -> np.ndarray:
    """One row of ``feature_names(vocabulary)``; NaN where unknown (XGBoost handles it)."""
    row = np.zeros(1 + len(vocabulary), dtype=np.float32)
    row[0] = log2_size(features.input_size)
    _mark_tags(row[1:], features.tags, _positions(vocabulary))
    return row


def feature_matrix(input_size: np.ndarray, tags: Sequence[Sequence[str]] = (),
                   vocabulary: Sequence[str] = ()) -> np.ndarray:
    """Rows of ``feature_names(vocabulary)`` for a history (arrays of equal length)."""
    n = input_size.shape[0]
    X = np.zeros((n, 1 + len(vocabulary)), dtype=np.float32)
    with np.errstate(invalid="ignore"):
        X[:, 0] = np.log2(1.0 + np.clip(input_size, 0, None))
    positions = _positions(vocabulary)
    for i, row_tags in enumerate(tags or ()):
        _mark_tags(X[i, 1:], row_tags, positions)
    return X


def _positions(vocabulary: Sequence[str]) -> dict[str, int]:
    return {tag: i for i, tag in enumerate(vocabulary)}


def _mark_tags(columns: np.ndarray, tags: Sequence[str], positions: Mapping[str, int]) -> None:
    for tag in tags:
        i = positions.get(tag)
        if i is not None:
            columns[i] = 1.0
