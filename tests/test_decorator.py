"""The decorator's driver-side shortcuts give what the general path gives (no Ray started)."""

from __future__ import annotations

import numpy as np
import pytest

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
    # A streaming result asks for a generator: refused where it is written, as plain
    # @ray.remote(num_returns="streaming") refuses a plain function (it failed at the first .remote()).
    def plain(n):
        return [n]

    for how in ("streaming", "dynamic"):
        with pytest.raises(InvalidInput, match=f"num_returns='{how}' is for generator functions"):
            adaptive_remote(num_returns=how)(plain)
        with pytest.raises(InvalidInput, match="generator functions"):
            adaptive_remote(plain).options(num_returns=how)


class _SizingClient:
    """What ``_first_spec`` asks of the profiler client: a prediction (the default fallback's) and its sizing."""

    def __init__(self):
        from raysched.config import RayschedConfig
        from raysched.policy.recipe import build_sizer

        self.config = RayschedConfig()
        self.sizer = build_sizer(self.config)

    def predict(self, name, code_hash, features, fallback, bundle):
        from raysched.types import GiB, Estimate, Prediction

        estimate = Estimate(GiB, GiB, GiB, 0.95, 0, "fallback")  # the default fallback: 1 GiB, 1 CPU
        one = Estimate(1, 1, 1, 0.95, 0, "fallback")
        return Prediction(memory=estimate, cpu=one, wall=one, source="fallback")

    def size(self, prediction, explicit, name, cluster):
        return self.sizer.size(prediction, cluster, explicit, name)


def test_a_call_pinned_by_its_ray_options_is_sized_for_the_nodes_they_allow():
    """A hard node affinity, custom resources or num_gpus restrict the nodes sizing (and the
    ladder's largest-node rung) considers; a soft node affinity does not."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raysched.runtime.options import node_constraints
    from raysched.types import GiB, ClusterShape, NodeShape

    small_id, big_id = "ab" * 28, "cd" * 28
    cluster = ClusterShape((NodeShape("ef" * 28, 0, 8 * GiB), NodeShape(small_id, 1, 1 * GiB, (("gpu_like", 1.0),)),
                            NodeShape(big_id, 2, 3 * GiB, (("GPU", 1.0),))))
    hard = NodeAffinitySchedulingStrategy(small_id, soft=False)
    soft = NodeAffinitySchedulingStrategy(small_id, soft=True)
    assert node_constraints({"scheduling_strategy": hard}) == (small_id, ())
    assert node_constraints({"scheduling_strategy": soft, "num_gpus": 0}) == (None, ())
    assert node_constraints({"resources": {"b": 2, "a": 0.5}, "num_gpus": 1}) == (None, (("GPU", 1.0), ("a", 0.5),
                                                                                       ("b", 2.0)))
    client = _SizingClient()

    def first(**options):
        call = scalar_task._call_options(options)
        return scalar_task._first_spec(client, call, scalar_task._features(call, (), {}), None, cluster)

    unpinned = first()
    assert not unpinned.allocation.capped and unpinned.largest_node_bytes == 3 * GiB
    assert first(scheduling_strategy=soft).allocation == unpinned.allocation
    for spec in (first(scheduling_strategy=hard), first(resources={"gpu_like": 1})):
        assert spec.allocation.capped and spec.allocation.memory_bytes == 1 * GiB
        assert spec.largest_node_bytes == 1 * GiB  # the ladder's last rung: the pinned node
    assert first(num_gpus=1).largest_node_bytes == 3 * GiB
    assert node_constraints({"accelerator_type": "A100"}) == (None, (("accelerator_type:A100", 0.001),))
    a100 = ClusterShape(cluster.nodes[:2] + (NodeShape(big_id, 2, 3 * GiB, (("accelerator_type:A100", 1.0),)),))
    call = scalar_task._call_options({"accelerator_type": "A100"})
    assert scalar_task._first_spec(client, call, scalar_task._features(call, (), {}), None,
                                   ClusterShape(a100.nodes[:2])).largest_node_bytes is None  # no A100 node
    assert scalar_task._first_spec(client, call, scalar_task._features(call, (), {}), None,
                                   a100).largest_node_bytes == 3 * GiB
    nowhere = first(resources={"gpu_like": 2})  # no node has it: left for Ray to report
    assert nowhere.allocation == unpinned.allocation and nowhere.largest_node_bytes is None
    from conftest import ray_takes_task_option

    if not ray_takes_task_option("label_selector"):
        return  # an older Ray refuses the option itself (tests/test_cluster_ray.py skips alike)
    labelled = ClusterShape(tuple(NodeShape(n.node_id, n.num_cpus, n.memory_bytes, n.resources,
                                            (("size", n.node_id[:2]),)) for n in cluster.nodes))
    call = scalar_task._call_options({"label_selector": {"size": "ab"}})
    spec = scalar_task._first_spec(client, call, scalar_task._features(call, (), {}), None, labelled)
    assert spec.allocation.capped and spec.allocation.memory_bytes == 1 * GiB and spec.largest_node_bytes == 1 * GiB


def test_label_selectors_are_read_from_the_options_with_their_fallbacks():
    from ray.util.scheduling_strategies import DoesNotExist, Exists, In, NodeLabelSchedulingStrategy, NotIn

    from raysched.runtime.options import label_selectors
    from raysched.types import LabelTerm

    assert label_selectors({}) == () and label_selectors({"label_selector": {}}) == ()
    assert label_selectors({"label_selector": {"b": "!x", "a": "in(y,z)"}}) == \
        ((LabelTerm("a", False, ("y", "z")), LabelTerm("b", True, ("x",))),)
    assert label_selectors({"label_selector": {"a": "x"}, "fallback_strategy": [{"label_selector": {"a": "y"}}, {}]}) \
        == ((LabelTerm.parse("a", "x"),), (LabelTerm.parse("a", "y"),), ())
    assert label_selectors({"fallback_strategy": [{"label_selector": {"a": "y"}}]}) == ((), (LabelTerm.parse("a", "y"),))
    # The older NodeLabelSchedulingStrategy: its hard terms hold wherever the call may run; soft ones do not restrict
    strategy = NodeLabelSchedulingStrategy({"z": In("a", "b"), "y": NotIn("c"), "x": Exists(), "w": DoesNotExist()},
                                           soft={"v": In("d")})
    assert label_selectors({"scheduling_strategy": strategy}) == ((
        LabelTerm("w", True, None), LabelTerm("x", False, None), LabelTerm("y", True, ("c",)), LabelTerm("z", False, ("a", "b")),
    ),)
    assert label_selectors({"scheduling_strategy": NodeLabelSchedulingStrategy({}, soft={"v": In("d")})}) == ()
    both = label_selectors({"scheduling_strategy": NodeLabelSchedulingStrategy({"x": Exists()}),
                            "label_selector": {"a": "1"}})
    assert both == ((LabelTerm.parse("a", "1"), LabelTerm("x")),)
def test_equal_ray_options_have_equal_keys_so_calls_share_a_plan():
    """A dict option (resources, runtime_env) or a strategy made anew per call was never found
    in the plan cache: every such call was predicted and sized again."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raysched.runtime.decorator import _CallOptions, option_key

    node = "ab" * 28

    def options(soft=False, env="1"):
        return {"resources": {"x": 1.0, "y": 2.0}, "runtime_env": {"env_vars": {"A": env}},
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=soft)}

    first, again = _CallOptions(options(), (), {}), _CallOptions(dict(reversed(list(options().items()))), (), {})
    assert first.key is not None and first.key == again.key and hash(first.key) == hash(again.key)
    assert _CallOptions(options(soft=True), (), {}).key != first.key
    assert _CallOptions(options(env="2"), (), {}).key != first.key
    assert option_key({"resources": {"x": 1}}) != option_key({"resources": {"x": 2}})
    assert option_key({"odd": {1, 2}}) is None and _CallOptions({"odd": [{1}]}, (), {}).key is None  # no cache


def test_an_empty_runtime_env_per_call_keeps_the_decorators_as_in_ray():
    from raysched.runtime.decorator import _CallOptions

    env = {"env_vars": {"WHERE": "decorator"}}
    for empty in (None, {}):
        assert _CallOptions({"runtime_env": empty}, (), {"runtime_env": env}).ray_options["runtime_env"] == env
    other = {"env_vars": {"WHERE": "call"}}
    assert _CallOptions({"runtime_env": other}, (), {"runtime_env": env}).ray_options["runtime_env"] == other
    assert _CallOptions({"runtime_env": None}, (), {}).ray_options["runtime_env"] is None


def test_figures_past_what_the_store_can_hold_are_refused_where_they_are_written():
    """A byte count past int64 or a priority past int32 cannot be stored: refused at the
    decorator or .options(), not discovered when the batch of rows it is in is written."""
    import numpy as np
    import pytest

    from raysched.errors import InvalidInput

    def f(x):
        return x

    for make, says in (
        (lambda: adaptive_remote(memory=2**70)(f), "at most 2\\*\\*63 - 1 bytes"),
        (lambda: adaptive_remote(priority=2**40)(f), "between -2\\*\\*31 and 2\\*\\*31 - 1"),
        (lambda: adaptive_remote(f).options(input_size=2**64), "input_size must be at most"),
        (lambda: adaptive_remote(f).options(memory=float(2**63)), "memory must be at most"),
        (lambda: adaptive_remote(f).options(priority=-(2**31) - 1), "priority must be between"),
        (lambda: adaptive_remote(f).options(priority=2.0), "priority must be an integer"),
    ):
        with pytest.raises(InvalidInput, match=says):
            make()
    g = adaptive_remote(f)
    g.options(input_size=2**63 - 1, memory=2**40, priority=np.int64(2**31 - 1))  # the largest that fit


def test_an_estimate_past_int64_is_stored_as_the_largest_byte_count_and_its_row_kept(tmp_path):
    """A huge input extrapolated along a slope can predict more bytes than int64 holds."""
    from raysched.config import RayschedConfig
    from raysched.runtime.rows import attempt_row
    from raysched.runtime.spec import AttemptSpec
    from raysched.store.profiles import ProfileStore
    from raysched.types import Allocation, Estimate, Features, Outcome, Prediction

    huge = Estimate(target=1e30, lower=1e29, upper=float("inf"), coverage=0.9, n_history=8)
    spec = AttemptSpec(function="f", code_hash="h", call_id="c0", attempt=1, features=Features(input_size=2**62),
                       prediction=Prediction(memory=huge, cpu=huge, wall=huge, source="history"),
                       allocation=Allocation(num_cpus=1.0, memory_bytes=2**40), config=RayschedConfig())
    row = attempt_row(spec, Outcome.OK, None, 1.0, 2.0)
    assert row["predicted_memory_bytes"] == row["predicted_memory_upper_bytes"] == 2**63 - 1
    store = ProfileStore(tmp_path)
    assert store.append([row]) == 1
    assert store.read("f").predicted_memory_bytes.iloc[0] == 2**63 - 1


def test_a_task_is_named_as_ray_names_it_without_the_hash_that_tells_nested_functions_apart():
    from raysched.runtime.options import ray_task_name

    assert ray_task_name("mod.outer.<locals>.step#5f9cbf98") == "step"
    assert ray_task_name("mod.<lambda>#0a1b2c3d") == "<lambda>" and ray_task_name("mod.plain") == "plain"


def test_a_ray_option_ray_refuses_with_a_type_error_is_still_a_type_error():
    """Code written for plain Ray's ``except TypeError`` keeps catching it."""
    import pytest

    from raysched.errors import InvalidInput, InvalidRayOption

    def f(x):
        return x

    with pytest.raises(TypeError, match="invalid Ray option") as caught:
        adaptive_remote(max_retries="many")(f)
    assert isinstance(caught.value, InvalidRayOption) and isinstance(caught.value, InvalidInput)
    with pytest.raises(TypeError):
        adaptive_remote(f).options(max_retries="x")


def test_wrong_types_ray_refuses_with_a_type_error_are_type_errors_here_too():
    """``memory="1G"``, ``num_cpus="2"`` and a ``functools.partial`` are TypeErrors from plain
    Ray; they were raysched ValueErrors (InvalidInput alone), which ``except TypeError`` missed.
    A value of the right type out of range stays a ValueError, as in Ray."""
    import functools

    from raysched.errors import InvalidInput

    def f(x):
        return x

    for bad in ({"memory": "1G"}, {"num_cpus": "2"}, {"memory": True}, {"num_cpus": [1]}):
        with pytest.raises(TypeError, match=next(iter(bad))) as caught:
            adaptive_remote(f).options(**bad)
        assert isinstance(caught.value, InvalidInput)
        with pytest.raises(TypeError):
            adaptive_remote(**bad)(f)
    with pytest.raises(TypeError, match="functools.partial") as caught:
        adaptive_remote(functools.partial(f, 1))
    assert isinstance(caught.value, InvalidInput)
    for bad in ({"memory": -1}, {"num_cpus": -0.5}, {"num_cpus": float("nan")}):
        with pytest.raises(InvalidInput) as caught:
            adaptive_remote(f).options(**bad)
        assert not isinstance(caught.value, TypeError)


def test_a_function_that_asks_for_gpus_runs_once_per_worker_process_as_ray_makes_it():
    """``ray.remote(num_gpus=1)`` sets ``max_calls=1`` (a library's GPU memory is freed only
    when its process ends); raysched's entry function is made before the GPUs are set by
    ``.options()``, where Ray no longer applies it: every call reused one worker."""
    from types import SimpleNamespace

    from raysched.config import RayschedConfig
    from raysched.runtime.options import definition_options

    assert definition_options({"num_gpus": 1}) == {"max_calls": 1}
    assert definition_options({"num_gpus": 0.5, "max_calls": 4}) == {"max_calls": 4}  # the user's wins
    assert definition_options({"num_gpus": 0}) == {} and definition_options({}) == {}
    assert definition_options({"num_gpus": 1}, ("concurrency_groups",)) == {}  # actors: Ray does not either

    def g(x):
        return x

    config = RayschedConfig()
    gpu = adaptive_remote(num_gpus=1)(g)
    gpu._remote_with({"num_gpus": 1}, config, SimpleNamespace(config=config))
    assert gpu._remote._default_options.get("max_calls") == 1
    cpu = adaptive_remote(g)
    cpu._remote_with({}, config, SimpleNamespace(config=config))
    assert cpu._remote._default_options.get("max_calls") in (None, 0)


def test_help_on_the_decorator_names_its_settings_and_what_it_returns():
    # help(raysched.adaptive_remote) was one line pointing elsewhere; the lazy public
    # function and the decorator it forwards to share one docstring.
    import raysched
    from raysched.runtime.decorator import adaptive_remote as decorator

    doc = raysched.adaptive_remote.__doc__
    assert doc is decorator.__doc__
    for word in ("name=", "tags=", "memory=", "priority=", "max_attempts=", "rescalable=", ".options(", ".predict("):
        assert word in doc, word


def test_declared_dependencies_are_part_of_the_functions_identity():
    from raysched.runtime.codehash import code_hash

    def work(x):
        return x

    plain = adaptive_remote(name="work")(work)
    old = adaptive_remote(name="work", dependencies=["bwa==0.7.17", "genome:hg38"])(work)
    same = adaptive_remote(name="work", dependencies=["genome:hg38", "bwa==0.7.17"])(work)
    new = adaptive_remote(name="work", dependencies=["bwa==0.7.18", "genome:hg38"])(work)
    assert plain.code_hash == code_hash(work)  # nothing declared: the code's own hash
    assert old.code_hash == same.code_hash != new.code_hash  # in any order; a new version is a new history
    assert len({plain.code_hash, old.code_hash, new.code_hash}) == 3 and len(new.code_hash) == 16


def test_the_ladders_largest_peak_is_that_of_the_runs_with_the_calls_tags():
    from types import SimpleNamespace

    from raysched.runtime.decorator import _largest_peak_for
    from raysched.types import Features, History

    history = History.from_columns({"memory": [1e8, 2e8, 4e9, 5e9],
                                    "tags": [("genome=small",), ("genome=small",), ("genome=big",), ("genome=big",)]})
    bundle = SimpleNamespace(history=history, max_peak_seen=5.2e9)
    assert _largest_peak_for(bundle, Features(tags=("genome=small",))) == 2e8  # not the big genome's 5 GB
    assert _largest_peak_for(bundle, Features(tags=("genome=new",))) == 5.2e9  # no runs of its own: all of them
    assert _largest_peak_for(bundle, Features()) == 5.2e9
    assert _largest_peak_for(None, Features()) == 0.0


def test_the_argument_count_shortcut_refuses_exactly_what_signature_bind_refuses():
    # Calls without keywords are checked by counting positional arguments (bind() cost ~10 us
    # per submission); the count must agree with bind() for every kind of parameter.
    import inspect

    import pytest

    def a(x): ...
    def b(x, y=1): ...
    def c(x, /, y, *rest): ...
    def d(*rest, k): ...  # a keyword-only parameter without default: no positional call fits
    def e(x, *, k=2, **kw): ...
    def f(): ...

    class WithInit:
        def __init__(self, x, y=0):
            pass

    for target in (a, b, c, d, e, f, WithInit):
        adaptive = adaptive_remote(target)
        signature = inspect.signature(target)
        for n in range(5):
            args = tuple(range(n))
            try:
                signature.bind(*args)
            except TypeError:
                with pytest.raises(TypeError):
                    adaptive._check_arguments(args, {})
            else:
                adaptive._check_arguments(args, {})
    with pytest.raises(TypeError, match="k"):
        adaptive_remote(d)._check_arguments((1,), {})
    adaptive_remote(d)._check_arguments((1,), {"k": 3})  # keywords take bind()'s path


def test_a_call_sharing_its_bands_plan_carries_its_own_size_and_shapes_to_its_row():
    """Calls whose sizes fall in one band share a plan (one prediction, one template); each
    one's row must still hold its own input size and argument shapes, not the first call's."""
    from raysched.config import RayschedConfig
    from raysched.runtime.client import size_band
    from raysched.runtime.rows import attempt_row
    from raysched.runtime.spec import AttemptSpec, decode_spec, encode_call, encode_features, encode_template
    from raysched.types import Allocation, Estimate, Features, Outcome, Prediction

    config = RayschedConfig()
    guess = Estimate(target=1e8, lower=1e8, upper=1e8, coverage=0.9, n_history=8)
    first = Features(input_size=1000, tags=("t",), arg_shapes=("bytes[1000]",), dependencies=("d",))
    later = Features(input_size=1001, tags=("t",), arg_shapes=("bytes[1001]",), dependencies=("d",))
    assert size_band(first.input_size) == size_band(later.input_size) and size_band(None) is None
    spec = AttemptSpec(function="f", code_hash="h", call_id="", attempt=1, features=first,
                       prediction=Prediction(memory=guess, cpu=guess, wall=guess, source="history"),
                       allocation=Allocation(num_cpus=1.0, memory_bytes=2**28))
    template = encode_template(spec)
    for _ in range(2):  # the second time from the worker's cache of decoded templates
        own = decode_spec(encode_call(template, "c" * 32, encode_features(later, None)), config)
        assert own.call_id == "c" * 32 and own.features == later and own.ray_options == spec.ray_options
        row = attempt_row(own, Outcome.OK, None, 1.0, 2.0)
        assert row["input_size"] == 1001 and row["arg_shapes"] == ("bytes[1001]",) and row["tags"] == ("t",)
        same = decode_spec(encode_call(template, "d" * 32), config)
        assert same.call_id == "d" * 32 and same.features == first
        assert attempt_row(same, Outcome.OK, None, 1.0, 2.0)["input_size"] == 1000  # the template's row is untouched
    assert decode_spec(encode_call(template, "e", encode_features(Features(None, ("t",), ()), None)), config).features \
        == Features(None, ("t",), (), ("d",))


def test_a_call_named_otherwise_than_its_plans_template_keeps_its_own_name_for_its_retries():
    """Calls that differ only in Ray's task name share a plan; a retry is submitted with the
    spec's Ray options, so each call's spec must hold its own name (or none)."""
    from raysched.config import RayschedConfig
    from raysched.runtime.decorator import _CallOptions
    from raysched.runtime.spec import AttemptSpec, decode_spec, encode_call, encode_features, encode_template
    from raysched.types import Allocation, Estimate, Features, Prediction

    assert _CallOptions({"name": "a", "max_retries": 2}, (), {}).key == _CallOptions({"max_retries": 2}, (), {}).key
    assert _CallOptions({"name": "a"}, (), {}).name == "a" and _CallOptions({}, (), {}).name is None
    config = RayschedConfig()
    guess = Estimate(target=1e8, lower=1e8, upper=1e8, coverage=0.9, n_history=8)
    spec = AttemptSpec(function="mod.step", code_hash="h", call_id="", attempt=1, features=Features(input_size=10),
                       prediction=Prediction(memory=guess, cpu=guess, wall=guess, source="history"),
                       allocation=Allocation(num_cpus=1.0, memory_bytes=2**28),
                       ray_options=(("max_retries", 2), ("name", "first")))
    template = encode_template(spec)
    renamed = decode_spec(encode_call(template, "c", encode_features(spec.features, "second")), config)
    assert dict(renamed.ray_options) == {"max_retries": 2, "name": "second"}
    unnamed = decode_spec(encode_call(template, "c", encode_features(spec.features, None)), config)
    assert dict(unnamed.ray_options) == {"max_retries": 2}  # Ray's default name, the function's own
    assert dict(decode_spec(encode_call(template, "c"), config).ray_options)["name"] == "first"


def test_configure_refuses_what_is_not_a_config_with_the_way_to_say_it():
    """A helper's audit: ``configure({"max_attempts": 3})`` failed with "'dict' object has no
    attribute 'replace'", from deep in raysched."""
    import raysched
    from raysched.errors import InvalidInput

    before = raysched.get_config()
    for wrong in ({"max_attempts": 3}, "home"):
        with pytest.raises(InvalidInput, match=r"RayschedConfig or keyword changes \(configure\(max_attempts=3\)\)"):
            raysched.configure(wrong)
    assert raysched.get_config() is before  # nothing changed


def test_configure_warns_when_a_whole_config_leaves_the_home_the_environment_names(monkeypatch, tmp_path):
    """An audit: with RAYSCHED_HOME set, ``configure(RayschedConfig(max_attempts=6))`` moved rows and
    models to ./.raysched without a word (only ``RayschedConfig.from_env`` reads the variable)."""
    import warnings

    import raysched
    from raysched.config import RayschedConfig

    before = raysched.get_config()
    monkeypatch.setenv("RAYSCHED_HOME", str(tmp_path / "named"))
    try:
        with pytest.warns(UserWarning, match=r"home is the default '.raysched', not RAYSCHED_HOME=.*from_env"):
            raysched.configure(RayschedConfig(max_attempts=6))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # what the variable names, or a home of its own: no warning
            assert raysched.configure(RayschedConfig.from_env(max_attempts=6)).home_path == tmp_path / "named"
            raysched.configure(RayschedConfig(home=str(tmp_path / "other")))
            raysched.configure(max_attempts=5)
    finally:
        raysched.configure(before)


def _resubmitted_module_function(x):
    return x


def test_a_resubmission_after_the_drivers_config_changed_runs_under_the_new_config(monkeypatch):
    """A worker keeps one Ray function per user function for its resubmissions (attempt 2 on,
    after a memory kill or a monitor stop); one made under an earlier config (an earlier
    ``configure(max_attempts=..., home=...)``, or another decoration of the same module
    function) carried that config into every later attempt: its ladder, caps and home."""
    import inspect

    from raysched.config import RayschedConfig
    from raysched.runtime import worker
    from raysched.runtime.spec import AttemptSpec
    from raysched.types import Allocation, Estimate, Features, Prediction

    made = []

    class _Remote:
        def __init__(self, entry):
            self.entry = entry

        def options(self, **options):
            return self

        def remote(self, *args, **kwargs):
            return self.entry

    def fake_ray_remote(target, definition):
        made.append(target)
        return _Remote(target)

    monkeypatch.setattr(worker, "ray_remote", fake_ray_remote)
    monkeypatch.setattr(worker, "get_config", lambda: RayschedConfig())
    monkeypatch.setattr(worker, "_remote_cache", {})
    monkeypatch.setattr(worker, "remote_options", lambda spec: {})  # (reads Ray's worker: not started here)
    guess = Estimate(target=1e8, lower=1e8, upper=1e8, coverage=0.9, n_history=8)
    spec = AttemptSpec(function="f", code_hash="h", call_id="c0", attempt=2, features=Features(input_size=10),
                       prediction=Prediction(memory=guess, cpu=guess, wall=guess, source="history"),
                       allocation=Allocation(num_cpus=1.0, memory_bytes=2**28))
    configs = [RayschedConfig(max_attempts=2), RayschedConfig(max_attempts=6)]
    for config in configs * 2:
        entry = worker._resubmitter(_resubmitted_module_function, config)(spec, (1,), {})
        assert inspect.getclosurevars(entry).nonlocals["config"] is config
    assert len(made) == 2  # one Ray function per config, each made once


def test_a_task_that_submits_calls_in_turn_does_not_need_the_home_on_its_own_node(tmp_path, monkeypatch):
    """The home is on the disk of the node whose profiler writes it (the head). A task on
    another node that calls an adaptive function made the client there, which created
    the home's folders on that node's disk, and where it could not (no such mount, no
    right to write there) the nested call failed with StoreError. Only a driver checks it."""
    from raysched.config import RayschedConfig
    from raysched.errors import StoreError
    from raysched.runtime import client

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = RayschedConfig(home=str(blocker / "home"))  # cannot be made on this "node"
    with pytest.raises(StoreError):
        client.ProfilerClient(config, handle_factory=lambda c: None)  # a driver: said at once
    monkeypatch.setattr(client, "_is_driver", lambda: False)
    worker_side = client.ProfilerClient(config, handle_factory=lambda c: None)  # a task: the profiler's business
    assert worker_side.config is config
    home = tmp_path / "elsewhere"
    client.ProfilerClient(RayschedConfig(home=str(home)), handle_factory=lambda c: None)
    assert not home.exists()  # and no empty home is left on the task's node


@pytest.mark.parametrize("value", [100, "abc"])
def test_an_input_size_in_the_decorator_is_refused_with_where_it_belongs(value):
    """``input_size=`` is per call (``.options``); in the decorator it was taken without a
    word, however wrong ("abc"), and every call was sized without it."""
    from raysched.errors import InvalidInput

    def work(x):
        return x

    class Work:
        pass

    for target in (work, Work):
        with pytest.raises(InvalidInput, match=r"per call.*\.options\(input_size="):
            adaptive_remote(input_size=value)(target)


def test_a_prediction_evicted_by_another_thread_between_its_lookup_and_its_use_is_still_served(tmp_path):
    """Threads that submit calls share the driver's client, whose prediction cache is not
    locked: a thread that found its prediction while another's insertion evicted it (the
    cache full, that entry its oldest) failed the user's .remote() with a KeyError."""
    from collections import OrderedDict

    from raysched.config import RayschedConfig
    from raysched.policy.estimators import Fallback
    from raysched.runtime.client import ProfilerClient
    from raysched.types import Features

    client = ProfilerClient(RayschedConfig(home=str(tmp_path)), handle_factory=lambda c: None)
    features = Features(input_size=1000)
    first = client.predict("f", "h", features, Fallback(), None)

    class EvictedMeanwhile(OrderedDict):
        def get(self, key, default=None):
            found = super().get(key, default)
            self.pop(key, None)  # another thread's _remember, between this lookup and move_to_end
            return found

    client._predictions = EvictedMeanwhile(client._predictions)
    assert client.predict("f", "h", features, Fallback(), None) == first


def test_only_a_functions_first_call_waits_for_a_bundle_however_late_the_profiler_answers(tmp_path):
    """A profiler that has not answered the first bundle request (starting on a busy node,
    restarting) held up every later call of the function, each for up to
    ``first_bundle_timeout_s``, until it did: the wait is once per function, never per task."""
    import concurrent.futures
    import time

    from raysched.config import RayschedConfig
    from raysched.runtime.client import ProfilerClient

    class _Silent:  # a profiler's ``bundle`` whose answer never comes
        def remote(self, *args):
            ref = type("Ref", (), {})()
            ref.future = concurrent.futures.Future
            return ref

    handle = type("Handle", (), {"bundle": _Silent()})()
    client = ProfilerClient(RayschedConfig(home=str(tmp_path), first_bundle_timeout_s=0.5),
                            handle_factory=lambda c: None)
    client._handle = handle
    started = time.monotonic()
    assert client.bundle("f", "h") is None  # the first call waited, then predicts from the fallback
    assert time.monotonic() - started >= 0.45
    started = time.monotonic()
    for _ in range(5):
        assert client.bundle("f", "h") is None
    assert time.monotonic() - started < 0.4  # not 5 x 0.5 s
    started = time.monotonic()
    client.bundle("g", "h")  # another function's first call waits once too
    assert time.monotonic() - started >= 0.45


def test_a_function_already_made_remote_is_refused_with_what_to_decorate_instead():
    """``@adaptive_remote`` stacked on ``@ray.remote`` (or on itself) was refused as "a
    functools.partial or a callable object"; it says what it got and what to decorate."""
    import ray

    from raysched.errors import InvalidRayOption

    def plain(x):
        return x

    for made in (ray.remote(plain), adaptive_remote(plain)):
        with pytest.raises(InvalidRayOption, match="already a remote function.*decorate the plain function") as caught:
            adaptive_remote(made)
        assert "partial" not in str(caught.value)


def test_a_call_stopped_at_its_hard_limit_fails_only_once_its_workers_rows_are_sent(monkeypatch):
    """The retry of a task whose worker a hard stop killed records the attempt and fails the call
    with ResourceLimitExceeded: it raised with that row still in the worker's buffer, so a
    caller that shut Ray down on the error could lose it (a row of an attempt >= 2: the driver
    counts the call as recorded by its earlier rows, and does not wait)."""
    import pytest

    from raysched import ResourceLimitExceeded, StoppedByMonitor
    from raysched.config import RayschedConfig
    from raysched.policy.rules import Decision
    from raysched.runtime import worker
    from raysched.runtime.spec import AttemptSpec
    from raysched.types import Allocation, Estimate, Features, Prediction

    events: list[str] = []

    class Sink:
        def add(self, row):
            events.append("row")

        def flush(self, wait_s=0.0):
            events.append("flush")

    monkeypatch.setattr(worker, "get_sink", lambda config: Sink())
    monkeypatch.setattr(worker, "_forget_live", lambda spec, force=False: None)
    estimate = Estimate(target=1e8, lower=1e8, upper=2e8, coverage=0.9, n_history=8)
    spec = AttemptSpec(function="f", code_hash="h", call_id="c0", attempt=2, features=Features(input_size=10),
                       prediction=Prediction(memory=estimate, cpu=estimate, wall=estimate, source="history"),
                       allocation=Allocation(num_cpus=1.0, memory_bytes=2**30), config=RayschedConfig())
    for action, error in (("stop_limit", ResourceLimitExceeded), ("cancel", StoppedByMonitor)):
        events.clear()
        decision = Decision("memory_hard_cap", action, "f", "c0", 2, measured=3e9, allocated=2e9)
        worker._record_for(spec, worker._STOP_OUTCOMES[action], None, "stopped")
        with pytest.raises(error):
            worker._apply_stop(lambda: None, spec, decision, None, "stopped", (), {}, lambda *a: None)
        assert events == ["row", "flush"], action
