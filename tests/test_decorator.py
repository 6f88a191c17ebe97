"""The decorator's driver-side shortcuts give what the general path gives (no Ray started)."""

from __future__ import annotations

import numpy as np

from raysched import adaptive_remote


@adaptive_remote(tags=["t"])
def scalar_task(*args, **kwargs):
    return args


class _Int(int):
    shape = (3,)  # a subclass may describe itself: it must take the general path


def test_features_of_scalar_calls_are_made_once_and_equal_the_general_derivation():
    for options in (scalar_task._call_options({}), scalar_task._call_options({"input_size": 10, "tags": ["u"]})):
        for args in [(1,), (1.5, None), (True, 2, 3j), ()]:
            first = scalar_task._features(options, args, {})
            assert first == scalar_task._derive_features(options, args, {})
            assert scalar_task._features(options, args, {}) is first  # cached, not derived again


def test_calls_with_other_arguments_take_the_general_path():
    options = scalar_task._call_options({})
    for args, kwargs in [((np.float64(1.0),), {}), ((_Int(1),), {}), (("a/b.txt",), {}), ((1,), {"x": 2}),
                         ((b"abc",), {})]:
        assert scalar_task._features(options, args, kwargs) == scalar_task._derive_features(options, args, kwargs)
    assert scalar_task._features(options, (np.float64(1.0),), {}).arg_shapes != ("float",)
    assert scalar_task._features(options, (b"abc",), {}).input_size == 3


def test_generator_and_async_functions_are_refused_where_they_are_decorated():
    # A generator's items after the first would be lost without an error, and an
    # async def task fails only when it runs: both are refused at once, as Ray refuses async.
    import pytest

    from raysched.errors import InvalidInput

    def numbers(n):
        yield from range(n)

    async def later(x):
        return x

    async def stream(n):
        yield n

    for fn, says in ((numbers, "generator"), (later, "async def"), (stream, "async def")):
        with pytest.raises(InvalidInput, match=says):
            adaptive_remote(fn)
        with pytest.raises(InvalidInput, match=says):
            adaptive_remote(memory=2**28)(fn)
