"""Fault injection: bad input everywhere. Each mistake gets a specific error, early, naming what to fix."""

from __future__ import annotations

import math
import pickle
import threading
import time

import dask
import pytest
from distributed.utils_test import captured_logger, gen_cluster
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from loaders import load_array, load_slow

import dask_pervasive as dp
from dask_pervasive.cache import ContextCache
from dask_pervasive.worker import resolve_budget

VALUE = dp.Context("v", load=load_array, device="cpu")


def annotated(x):
    return len(dp.get_context()) + x


@dp.uses_context("v")
def decorated(model, x):
    return len(model) + x


def by_name(name):
    return len(dp.get_context(name))


def quick(path, device):
    return [device]


# -- unknown names --------------------------------------------------------------------------
@gen_cluster(client=True, nthreads=[("", 2)] * 2)
async def test_unknown_context_fails_fast_everywhere(c, s, a, b):
    """Raised when the task runs (the client has no hook at submit), at once, listing known names."""
    await dp.install(c, [VALUE])  # with the scheduler plugin: it must not plan a loop for the name
    start = time.monotonic()
    with pytest.raises(dp.UnknownContextError, match="known contexts: 'v'") as info:
        await c.submit(by_name, "nope")
    assert info.value.name == "nope" and info.value.known == ["v"]
    with dask.annotate(context="nope"), pytest.raises(dp.UnknownContextError, match="'nope'"):
        await c.submit(annotated, 1)
    with pytest.raises(dp.UnknownContextError):
        await c.submit(dp.uses_context("nope")(lambda ctx: ctx))
    assert time.monotonic() - start < 20  # no retry loop, no hang
    with pytest.raises(dp.UnknownContextError, match="known contexts: 'v'"):
        await dp.prewarm(c, "nope", progress=False)
    with pytest.raises(dp.UnknownContextError):
        await dp.evict(c, "nope")
    assert await c.submit(decorated, 1) == 2**17 + 1  # the cluster is fine
    assert all(r["failures"] == 0 for r in await dp.stats(c))


# -- duplicate names --------------------------------------------------------------------------
@gen_cluster(client=True, nthreads=[("", 1)])
async def test_redefinition_names_both_definitions(c, s, a):
    await dp.install(c, [VALUE], scheduler=False)
    other = dp.Context("v", load=load_slow, device="cpu")
    with pytest.raises(dp.ContextDefinitionError) as info:
        await dp.register(c, other)
    msg = str(info.value)
    assert "loaders.load_array" in msg and "loaders.load_slow" in msg and "another name" in msg
    assert info.value.context == "v" and isinstance(info.value, ValueError)
    assert a.plugins["pervasive"].cache.entries["v"].context == VALUE
    with pytest.raises(dp.ContextDefinitionError, match="load_slow"):
        await dp.install(c, [other], scheduler=False)
    assert await c.submit(decorated, 1) == 2**17 + 1  # the original is still in use
    assert await dp.register(c, dp.Context("v", load="loaders:load_array", device="cpu")) is False  # same thing


def test_two_definitions_in_one_list():
    with pytest.raises(dp.ContextDefinitionError, match="load_array.*load_slow"):
        dp.ContextWorkerPlugin([VALUE, dp.Context("v", load=load_slow, device="cpu")])


# -- load not importable ---------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["nomodule", "a:b:c", "1x:y", "mod:", ":fn", "mod:fn()", "mod fn"])
def test_malformed_import_path_rejected_on_client(spec):
    with pytest.raises(dp.ContextDefinitionError, match="module:function"):
        dp.Context("x", load=spec)


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_import_path_resolved_on_workers(c, s, a):
    missing = dp.Context("missing", load="no_such_module_xyz.models:load", device="cpu")  # fine on the client
    no_attr = dp.Context("noattr", load="loaders:no_such_function", device="cpu")
    good = dp.Context("good", load="loaders:load_array", device="cpu")
    assert good == dp.Context("good", load=load_array, device="cpu")  # same identity as the function
    await dp.install(c, [missing, no_attr, good], scheduler=False)
    assert await c.submit(by_name, "good") == 2**17
    with pytest.raises(dp.ContextLoadError, match="no_such_module_xyz.models:load") as info:
        await c.submit(by_name, "missing")
    assert isinstance(info.value.cause, ImportError) and info.value.worker == a.address
    with pytest.raises(dp.ContextLoadError, match="no attribute 'no_such_function'"):
        await c.submit(by_name, "noattr")
    with pytest.raises(dp.ContextLoadError):  # fail fast: no second import attempt
        await c.submit(by_name, "missing", pure=False)
    rows = {r["context"]: r for r in await dp.stats(c)}
    assert rows["missing"]["failures"] == 1


# -- objects that cannot be pickled -------------------------------------------------------------
def test_unpicklable_declarations_rejected_at_declaration():
    lock = threading.Lock()
    with pytest.raises(dp.ContextDefinitionError, match="cannot be pickled") as info:
        dp.Context("a", load=lambda path, device: lock)
    assert info.value.context == "a"
    with pytest.raises(dp.ContextDefinitionError, match="storage_options cannot be pickled"):
        dp.Context("a", load=load_array, source="memory://x/y", storage_options={"session": lock})


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_unpicklable_after_declaration_rejected_by_install_and_register(c, s, a):
    ctx = dp.Context("later", load=load_array, source="memory://x/y", storage_options={"anon": True})
    ctx.storage_options["session"] = threading.Lock()  # changed after validation
    with pytest.raises(dp.ContextDefinitionError, match="'later' cannot be pickled"):
        await dp.install(c, [ctx], scheduler=False)
    with pytest.raises(dp.ContextDefinitionError, match="'later' cannot be pickled"):
        await dp.register(c, ctx)
    assert "pervasive-context-later" not in s.worker_plugins
    with pytest.raises(dp.ContextDefinitionError, match="takes one dask_pervasive.Context"):
        await dp.register(c, "later")
    with pytest.raises(dp.ContextDefinitionError, match="list of dask_pervasive.Context"):
        await dp.install(c, "v", scheduler=False)
    await dp.install(c, VALUE, scheduler=False)  # a single Context is fine
    assert await c.submit(decorated, 0) == 2**17


# -- annotations of the wrong type ----------------------------------------------------------------
@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_bad_annotation_types(c, s, a, b):
    await dp.install(c, [VALUE])
    for bad in (123, ["v"], {"name": "v"}):
        with (
            captured_logger("dask_pervasive.scheduler") as log,
            dask.annotate(context=bad),
            pytest.raises(dp.ContextUsageError, match="must be a string"),
        ):
            await c.submit(annotated, 1, pure=False)
        assert "not a string" in log.getvalue()
        with dask.annotate(context=bad):  # a decorated function still gets its context (and placement)
            assert await c.submit(decorated, 1, pure=False) == 2**17 + 1
    plugin = s.plugins["pervasive"]
    assert set(plugin.plans) == {"v"}  # nothing but real names reached placement
    with dask.annotate(context="v"):
        assert await c.submit(annotated, 2) == 2**17 + 2  # the scheduler is fine
    with pytest.raises(dp.ContextUsageError, match="must be a string"):
        await c.submit(by_name, 3.5)


# -- plugins missing ------------------------------------------------------------------------------
@gen_cluster(client=True, nthreads=[("", 1)])
async def test_scheduler_plugin_alone(c, s, a):
    with captured_logger("dask_pervasive.scheduler") as log:
        await c.register_plugin(dp.ContextSchedulerPlugin())
        with pytest.raises(dp.PluginNotInstalledError, match="ContextWorkerPlugin is not installed") as info:
            await c.submit(decorated, 1)
    assert "dask_pervasive.install" in str(info.value) and "'v'" in str(info.value)
    assert "ContextWorkerPlugin is not registered" in log.getvalue()
    with pytest.raises(dp.PluginNotInstalledError):
        await dp.prewarm(c, "v", workers=[a.address], progress=False)
    await dp.install(c, [VALUE])  # installing it afterwards fixes it
    assert await c.submit(decorated, 1, pure=False) == 2**17 + 1


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_worker_plugin_alone_uses_default_scheduling(c, s, a, b):
    await c.register_plugin(dp.ContextWorkerPlugin([VALUE]))
    assert "pervasive" not in s.plugins
    assert await c.gather(c.map(decorated, range(10))) == [2**17 + i for i in range(10)]
    with dask.annotate(context="v"):
        assert await c.submit(annotated, 1) == 2**17 + 1


# -- helper arguments ------------------------------------------------------------------------------
@gen_cluster(client=True, nthreads=[("", 1)])
async def test_helper_arguments(c, s, a):
    await dp.install(c, [VALUE], scheduler=False)
    start = time.monotonic()
    with pytest.raises(dp.ContextUsageError, match="unknown worker"):
        await dp.prewarm(c, "v", workers=["tcp://10.255.255.1:1"], progress=False)
    with pytest.raises(dp.ContextUsageError, match="unknown worker"):
        await dp.evict(c, "v", workers=["tcp://10.255.255.1:1"])
    assert time.monotonic() - start < 10  # no connection attempt to a made-up address
    for n in (-1, 1.5, "2", True):
        with pytest.raises(dp.ContextUsageError, match="n_workers"):
            await dp.prewarm(c, "v", n_workers=n, progress=False)
    with pytest.raises(dp.ContextUsageError, match="must be a string"):
        await dp.evict(c, 123)
    assert await dp.prewarm(c, "v", workers=a.address, progress=False) == [a.address]
    with pytest.raises(dp.ContextUsageError):
        dp.uses_context(3)
    with pytest.raises(dp.ContextUsageError, match="inside a task"):
        dp.get_context("v")


# -- budgets -------------------------------------------------------------------------------------
BAD_BUDGETS = ["lots", -1, 0, 1.5, "-1GiB", "0", "1e999", float("nan"), float("inf"), -0.5, True, [1], {"a": 1}]


@pytest.mark.parametrize("value", BAD_BUDGETS)
def test_bad_budgets_rejected_on_client(value):
    for kw in ("max_bytes", "device_max_bytes"):
        with pytest.raises(dp.ConfigurationError, match=kw) as info:
            dp.ContextWorkerPlugin(**{kw: value})
        assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "value, total, expected",
    [("8GiB", None, 8 * 2**30), (0.5, 1000, 500), (2**30, None, 2**30), (8e9, None, 8 * 10**9), ("0.25", 1000, 250)]
    + [("unlimited", 10, None), (None, 10, None), (1.0, 1000, 1000), (0.5, None, None)],
)
def test_good_budgets(value, total, expected):
    assert resolve_budget(value, total) == expected


def test_bad_budget_in_config_fails_on_client():
    with dask.config.set({"pervasive.worker.max-bytes": "lots"}), pytest.raises(dp.ConfigurationError):
        dp.ContextWorkerPlugin()
    bad = [
        ("budget-wait", "soon"),
        ("budget-wait", "-1s"),
        ("budget-wait", None),
        ("budget-wait", float("inf")),
        ("retry-failed-after", "never"),
    ]
    for key, value in bad:
        with dask.config.set({f"pervasive.worker.{key}": value}), pytest.raises(dp.ConfigurationError, match=key):
            dp.ContextWorkerPlugin()


_budget_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.builds(lambda n, u: f"{n}{u}", st.integers(-5, 10**6), st.sampled_from(["", "B", " kB", "KiB", "MiB", "GB"])),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(value=_budget_values, total=st.one_of(st.none(), st.integers(1, 2**50)))
@example(value=1.5, total=100)
@example(value="1e999", total=100)
def test_budget_parsing_property(value, total):
    """Any value: no limit, a positive byte count (≤ total for fractions), or ConfigurationError."""
    try:
        out = resolve_budget(value, total)
    except dp.ConfigurationError:
        return
    assert out is None or (isinstance(out, int) and out > 0) or (out == 0 and total is not None)
    if isinstance(value, float) and 0 < value <= 1 and out is not None:
        assert out <= total
    if isinstance(value, int) and not isinstance(value, bool):
        assert out == value
    if isinstance(value, float) and value > 1:
        assert math.isfinite(value) and value.is_integer()


# -- devices ------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cuda:x", "tpu", "gpu", "cuda:0\n", " cpu", "CUDA", "cuda:-1", None, 0])
def test_bad_device_strings(device):
    with pytest.raises(dp.ContextDefinitionError, match="device") as info:
        dp.Context("d", load=load_array, device=device)
    assert info.value.context == "d"


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_cuda_device_on_a_worker_without_it(c, s, a):
    from dask_pervasive.devices import cuda_device_count

    n = cuda_device_count()
    await dp.install(c, [dp.Context("gpu", load=load_array, device=f"cuda:{n}")], scheduler=False)
    with pytest.raises(dp.ContextLoadError, match=f"sees {n} CUDA device") as info:
        await c.submit(by_name, "gpu")
    assert isinstance(info.value.cause, dp.DeviceUnavailableError)


# -- names and sizes (property-based) -----------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(st.text(max_size=140), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,130}", fullmatch=True)))
@example(name="a\n")
@example(name="x" * 128)
@example(name="..")
def test_any_name_is_accepted_and_usable_or_rejected(name, tmp_path_factory):
    try:
        ctx = dp.Context(name, load=quick, device="cpu")
    except dp.ContextDefinitionError as exc:
        assert isinstance(exc, ValueError) and "Context name" in str(exc)
        return
    assert ctx.name == name and "\n" not in name and "/" not in name and len(name) <= 128
    assert pickle.loads(pickle.dumps(ctx)) == ctx
    root = tmp_path_factory.mktemp("names")
    cache = ContextCache("tcp://w:1", str(root))
    cache.declare(ctx)
    assert cache.files_dir(ctx).startswith(str(root) + "/" + name + "/")
    assert cache.acquire(name) == ["cpu"]
    with pytest.raises(dp.UnknownContextError) as info:
        cache.acquire(name + "-other")
    assert info.value.known == [name]


@settings(max_examples=200, deadline=None)
@given(
    nbytes=st.one_of(
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.booleans(),
        st.lists(st.integers(), max_size=1),
    )
)
@example(nbytes=float("inf"))
@example(nbytes="1e999")
@example(nbytes=True)
def test_any_nbytes_is_positive_int_or_rejected(nbytes):
    try:
        ctx = dp.Context("n", load=load_array, nbytes=nbytes)
    except dp.ContextDefinitionError as exc:
        assert "nbytes" in str(exc)
        return
    assert isinstance(ctx.nbytes, int) and ctx.nbytes > 0
    assert not isinstance(nbytes, bool)  # True is not "1 byte"
    if isinstance(nbytes, (int, float)):
        assert ctx.nbytes == nbytes


@settings(max_examples=100, deadline=None)
@given(name=st.one_of(st.text(max_size=30), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2)))
def test_any_lookup_name_never_crashes_the_cache(name):
    cache = ContextCache("tcp://w:1", "/nonexistent-not-used")
    cache.declare(dp.Context("v", load=quick, device="cpu"))
    try:
        cache.acquire(name)
    except dp.UnknownContextError as exc:
        assert exc.known == ["v"]
    except TypeError:  # unhashable: only reachable by calling the cache directly (get_context checks str)
        assert not isinstance(name, (str, int, type(None)))
    else:
        assert name == "v"
