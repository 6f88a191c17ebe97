"""A stable hash of a function's code: profile rows of different code never mix.

The hash covers the bytecode, constants (nested code objects included), the
names it uses, default arguments and closure values that are plain data or
functions (the function a decorator wraps, by its own code), and, for a function
wrapped with ``functools.wraps``, the wrapper's code as well as the wrapped one's.
It is the same in every process and every run for the same code (no ``id()``, no
salted ``hash()``), and changes when the code, a constant or such a closure value
changes.  Other values (objects, modules) are represented by their type's
qualified name only: their identity is not the function's code.

The name (``qualified_name``) is module.qualname; lambdas and functions defined
inside functions share theirs with others (every lambda of a module, every closure
a factory makes), so their names carry a short hash of their code.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import types
from typing import Any, Callable, Sequence

_PLAIN = (int, float, complex, str, bytes, bool, type(None))
_MAX_DEPTH = 4
#: The depth constants are fed at: never cut (see ``_feed_code``).
_CONSTANT = -float("inf")
#: A list or tuple longer than this is hashed by its pickle (C speed; pickles of plain data
#: are the same in every process), not item by item: a closure over 3 million numbers took
#: 1.2 s to decorate, against 0.06 s under plain Ray.
_BULK_ITEMS = 10_000


def _feed_value(h: "hashlib._Hash", value: Any, depth: int = 0) -> None:
    if isinstance(value, _PLAIN):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, types.CodeType):
        _feed_code(h, value, depth + 1)
    elif type(value) in (tuple, list) and len(value) > _BULK_ITEMS and _feed_bulk(h, value):
        pass
    elif isinstance(value, (tuple, list, frozenset, set)) and depth < _MAX_DEPTH:
        items = _in_stable_order(value, depth) if isinstance(value, (set, frozenset)) else value
        h.update(f"{type(value).__name__}[".encode())
        for item in items:
            _feed_value(h, item, depth + 1)
        h.update(b"]")
    elif isinstance(value, types.FunctionType) and depth < _MAX_DEPTH:
        h.update(b"fn(")  # a function a closure holds (what a decorator wraps): its code counts
        _feed_function(h, value, depth + 1)
        h.update(b")")
    elif isinstance(value, dict) and depth < _MAX_DEPTH:
        h.update(b"dict{")
        for key in _in_stable_order(value, depth):
            _feed_value(h, key, depth + 1)
            _feed_value(h, value[key], depth + 1)
        h.update(b"}")
    else:
        kind = type(value)
        h.update(f"<{kind.__module__}.{kind.__qualname__}>;".encode())


#: The address in a default repr (``<function <lambda> at 0x7f...>``, ``<C object at 0x...>``).
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _in_stable_order(items: Any, depth: int) -> list:
    """A set's items (a dict's keys) in an order that is the same in every process: by repr,
    as ever, but with memory addresses left out of it, and items whose reprs are then alike
    (two lambdas, two objects of default repr) by what they feed the hash. Sorted by the
    repr alone, two such items were fed in the order of their addresses, which differs
    between processes and runs: the same code got another hash now and then."""
    keyed = [(_ADDRESS.sub("", repr(item)), item) for item in items]
    if len({key for key, _ in keyed}) == len(keyed):
        return [item for _, item in sorted(keyed, key=lambda pair: pair[0])]

    def fed(item: Any) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        _feed_value(h, item, depth + 1)
        return h.digest()

    return [item for *_, item in sorted(((key, fed(item), item) for key, item in keyed), key=lambda t: t[:2])]


def _feed_bulk(h: "hashlib._Hash", value: list | tuple) -> bool:
    """Feed a long list or tuple of plain data as its pickle; False (nothing fed) if it holds anything else."""
    import pickle

    if not all(type(item) in _PLAIN for item in value):  # functions, sets...: item by item
        return False
    h.update(f"{type(value).__name__}#{len(value)}[".encode())
    h.update(hashlib.blake2b(pickle.dumps(value, protocol=5), digest_size=16).digest())
    h.update(b"]")
    return True


def _feed_code(h: "hashlib._Hash", code: types.CodeType, depth: int = 0) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_argcount,
                   code.co_kwonlyargcount)).encode())
    for const in code.co_consts:
        # Constants are literals (tuples, frozensets, code, plain data): finite and acyclic,
        # so none is cut at _MAX_DEPTH, which guards against closures that hold themselves.
        # Counted from the depth of the function they belong to, a nested tuple in a
        # decorated function's code was hashed by its type alone: changed, the hash stayed.
        _feed_value(h, const, _CONSTANT)


def code_hash(fn: Callable[..., Any]) -> str:
    """16 hex characters identifying the code of ``fn`` (a function or a class)."""
    h = hashlib.blake2b(digest_size=8)
    if inspect.isclass(fn):
        h.update(f"class {fn.__qualname__}".encode())
        for name, member in sorted(vars(fn).items()):
            target = getattr(member, "__func__", member)
            if isinstance(target, types.FunctionType):
                h.update(name.encode())
                h.update(code_hash(target).encode())
        return h.hexdigest()
    if getattr(inspect.unwrap(fn), "__code__", None) is None:
        # a builtin or a callable object: its type and name are all we have
        h.update(f"{type(fn).__module__}.{getattr(fn, '__qualname__', type(fn).__qualname__)}".encode())
        return h.hexdigest()
    layer, seen = fn, 0
    while layer is not None and seen < _MAX_DEPTH * 4:  # functools.wraps layers: each one's code counts
        _feed_function(h, layer, 0)
        layer, seen = getattr(layer, "__wrapped__", None), seen + 1
    return h.hexdigest()


def with_dependencies(code: str, dependencies: Sequence[str]) -> str:
    """``code`` (a code hash) with the function's declared dependencies folded in, in any
    order: a run with other dependencies (a tool's new version, another reference data
    set) is a run of other code as far as its resources go.  The code hash itself when
    none are declared."""
    if not dependencies:
        return code
    h = hashlib.blake2b(digest_size=8)
    h.update(code.encode())
    for dependency in sorted(set(dependencies)):
        h.update(b"\0" + dependency.encode())
    return h.hexdigest()


def _feed_function(h: "hashlib._Hash", fn: Any, depth: int) -> None:
    code = getattr(fn, "__code__", None)
    if code is None:
        h.update(f"<{type(fn).__module__}.{getattr(fn, '__qualname__', '?')}>;".encode())
        return
    _feed_code(h, code, depth)
    _feed_value(h, getattr(fn, "__defaults__", None) or (), depth)
    _feed_value(h, dict(getattr(fn, "__kwdefaults__", None) or {}), depth)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            _feed_value(h, cell.cell_contents, depth)
        except ValueError:  # an empty cell
            h.update(b"<empty>")


def qualified_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__qualname__
    if "<lambda>" in name or "<locals>" in name:
        # Shared by every lambda of the module, every closure a factory makes: one name
        # would pool their histories and models, so the code tells them apart.
        return f"{module}.{name}#{code_hash(fn)[:8]}"
    return f"{module}.{name}"
