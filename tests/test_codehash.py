"""The profile key of a function: its name and a hash of its code.

Stable across processes and runs for the same code, different when the code (or a constant,
or a plain-data or function value its closure holds) differs; functions that share a name
(lambdas, closures of one factory) are told apart by their code.
"""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysched import InvalidInput, adaptive_remote
from raysched.runtime.codehash import code_hash, qualified_name

ROOT = Path(__file__).resolve().parents[1]


def double(x):
    return 2 * x


def double_again(x):
    return 2 * x


def triple(x):
    return 3 * x


def make(k):
    def step():
        return k

    return step


def logged(fn):  # a decorator without functools.wraps
    def wrapper(*a, **kw):
        return fn(*a, **kw)

    return wrapper


def wrapped_lightly(fn):
    @functools.wraps(fn)
    def wrapper(*a):
        return fn(*a)

    return wrapper


def wrapped_heavily(fn):
    @functools.wraps(fn)
    def wrapper(*a):
        ballast = bytearray(10**8)  # noqa: F841 - what the wrapper costs is part of the task
        return fn(*a)

    return wrapper


def test_same_code_same_hash_other_code_other_hash():
    assert code_hash(double) == code_hash(double)
    assert code_hash(double) == code_hash(double_again)  # same code under another name: the name tells
    assert code_hash(double) != code_hash(triple)  # a constant differs
    assert len(code_hash(double)) == 16 and qualified_name(double) == f"{__name__}.double"


def test_the_hash_is_the_same_in_another_process():
    code = "from tests.test_codehash import double, make; from raysched.runtime.codehash import code_hash; " \
           "print(code_hash(double), code_hash(make(3)))"
    here = [code_hash(double), code_hash(make(3))]
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.split()
        assert out == here


def test_a_closure_over_a_long_list_of_data_is_hashed_whole_and_the_same_in_another_process():
    # Hashed by its pickle past 10,000 items: every item still counts, and across processes
    # (PYTHONHASHSEED) the hash holds, as for short lists.
    long = make(list(range(50_000)))
    changed = list(range(50_000))
    changed[25_000] = -1
    assert code_hash(long) == code_hash(make(list(range(50_000)))) != code_hash(make(changed))
    assert code_hash(make(tuple(range(50_000)))) != code_hash(long)  # a tuple is not a list
    code = "from tests.test_codehash import make; from raysched.runtime.codehash import code_hash; " \
           "print(code_hash(make(list(range(50_000)))), code_hash(make(['a'] * 20_000 + [{1, 2}])))"
    here = [code_hash(long), code_hash(make(["a"] * 20_000 + [{1, 2}]))]  # a set inside: item by item
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONHASHSEED": "3"}).stdout.split()
    assert out == here


def test_closures_of_one_factory_are_told_apart_by_what_they_hold():
    assert code_hash(make(1)) == code_hash(make(1)) and qualified_name(make(1)) == qualified_name(make(1))
    assert code_hash(make(1)) != code_hash(make(2))
    # one name would pool their histories and models
    assert qualified_name(make(1)) != qualified_name(make(2))
    assert qualified_name(make(1)).startswith(f"{__name__}.make.<locals>.step#")
    heavy, light = (lambda n: [0] * n), (lambda x: x + 1)
    assert qualified_name(heavy) != qualified_name(light) and "<lambda>#" in qualified_name(heavy)


def test_a_wrapper_counts_the_function_it_wraps_and_its_own_code():
    # Without functools.wraps: every decorated function was logged.<locals>.wrapper with one hash.
    assert code_hash(logged(double)) != code_hash(logged(triple))
    assert qualified_name(logged(double)) != qualified_name(logged(triple))
    # With functools.wraps: the name is the wrapped function's, and the wrapper's code counts too.
    assert qualified_name(wrapped_lightly(double)) == qualified_name(double)
    assert code_hash(wrapped_lightly(double)) != code_hash(wrapped_heavily(double))
    assert code_hash(wrapped_lightly(double)) == code_hash(wrapped_lightly(double))

    def outer():  # a function whose closure holds itself (recursion through a closure): the hash ends
        def f(n):
            return f(n - 1) if n else 0

        return f

    assert code_hash(outer()) == code_hash(outer())


class Scaler:
    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return self.k * x


class Factory:
    def scale(self, x):
        return 2 * x

    @classmethod
    def make(cls, x):
        return x


@pytest.mark.parametrize("target", [functools.partial(double, 2), Scaler(2), Factory().scale, Factory.make],
                         ids=["partial", "callable object", "bound method", "classmethod"])
def test_partials_callable_objects_and_bound_methods_are_refused_as_ray_refuses_them(target):
    """A partial's or a callable object's key was their type's: every partial, every Scaler, one
    history. A bound method was accepted: its object copied once, when the function was
    exported, so that its later changes in the driver never reached the tasks."""
    import ray

    with pytest.raises(TypeError, match="must be applied to either a function or a class"):
        ray.remote(target)  # what raysched follows
    with pytest.raises(InvalidInput, match="takes a function or a class, as ray.remote does") as caught:
        adaptive_remote(target)
    if inspect.ismethod(target):
        assert "a method bound to Factory" in str(caught.value)


_INC = lambda x: x + 1  # noqa: E731 - two lambdas: one qualified name, reprs alike but for the address
_DBL = lambda x: x * 2  # noqa: E731


def test_a_set_of_items_whose_reprs_differ_only_by_address_hashes_the_same_whatever_their_addresses():
    """An audit: a set's items were fed in the order of their reprs, and a lambda's (or an
    object's default) repr holds its address: the same code over {inc, dbl} hashed one way or
    the other as the two happened to lie in memory, so a new run could start a new history."""
    import types

    set_hashes, dict_hashes, orders = set(), set(), set()
    keep = []  # alive, so that addresses are not reused
    for i in range(40):
        made = [types.FunctionType(f.__code__, globals()) for f in ((_INC, _DBL) if i % 2 else (_DBL, _INC))]
        inc, dbl = made if i % 2 else made[::-1]
        keep.append(made)
        orders.add(id(inc) < id(dbl))
        set_hashes.add(code_hash(make(frozenset({inc, dbl}))))
        dict_hashes.add(code_hash(make({inc: 1, dbl: 2})))  # a dict's keys likewise
    assert orders == {True, False}, "the test made both address orders"
    assert len(set_hashes) == 1 and len(dict_hashes) == 1, (set_hashes, dict_hashes)
    assert code_hash(make({_INC: 1, _DBL: 2})) != code_hash(make({_INC: 2, _DBL: 1}))  # values still count


def test_a_nested_constant_of_a_decorated_function_counts_however_deep():
    """An audit: constants were cut at the depth of the closure that reached them, so a
    tuple nested three deep in a function wrapped by a decorator (without functools.wraps)
    was hashed by its type alone: editing a number in it kept the history."""
    source = (
        "@logged\n"
        "def task(x):\n"
        "    return [w for w in ((((\"a\", LIMIT),),),) if w == x]\n"
    )
    hashes = []
    for limit in ("1", "2"):
        namespace = {"logged": logged}
        exec(source.replace("LIMIT", limit), namespace)  # noqa: S102 - the same code, one constant apart
        hashes.append(code_hash(namespace["task"]))
    assert hashes[0] != hashes[1]
