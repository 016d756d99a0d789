"""Contexts from dask collections: delayed, bag, array, xarray, as_completed."""

from __future__ import annotations

import dask
import dask.array as da
import dask.bag as db
import numpy as np
import pytest
from distributed import Client, LocalCluster, as_completed, wait
from distributed.utils_test import gen_cluster

import dask_pervasive as dp

SCALE = dp.Context("scale", load=lambda path, device: {"factor": 3.0}, device="cpu")


@dp.uses_context("scale")
def scale_block(ctx, block):
    return block * ctx["factor"]


def scale_annotated(block):
    return block * dp.get_context()["factor"]


def restricted_context_tasks(s) -> int:
    plugin = s.plugins["pervasive"]
    n = 0
    for key in plugin.task_context:
        ts = s.tasks.get(key)
        assert ts is not None and ts.worker_restrictions, key
        n += 1
    return n


@gen_cluster(client=True)
async def test_bag_map_and_map_partitions(c, s, a, b):
    await dp.install(c, [SCALE])
    bag = db.from_sequence(range(8), npartitions=4)
    mapped, parts = c.persist([bag.map(scale_block), bag.map_partitions(lambda p: [scale_block(x) for x in p])])
    await wait([mapped, parts])
    assert await c.compute(mapped) == [3.0 * x for x in range(8)]
    assert await c.compute(parts) == [3.0 * x for x in range(8)]
    assert restricted_context_tasks(s) >= 4  # the map_partitions lambda is not decorated


@gen_cluster(client=True)
async def test_array_map_blocks_decorated(c, s, a, b):
    await dp.install(c, [SCALE])
    x = da.arange(20, chunks=5, dtype=float)
    # meta= avoids dask calling the function on the client to infer the output
    y = c.persist(x.map_blocks(scale_block, meta=np.array((), dtype=float)))
    await wait(y)
    np.testing.assert_array_equal(await c.compute(y), np.arange(20) * 3.0)
    assert restricted_context_tasks(s) == 4


@gen_cluster(client=True)
async def test_array_annotation_around_compute(c, s, a, b):
    await dp.install(c, [SCALE])
    x = da.arange(20, chunks=5, dtype=float).map_blocks(scale_annotated, meta=np.array((), dtype=float))
    with dask.annotate(context="scale"):
        result = await c.compute(x.sum())
    assert result == 3.0 * sum(range(20))


def test_xarray_map_blocks_and_apply_ufunc():
    xr = pytest.importorskip("xarray")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        dp.install(client, [SCALE])
        field = xr.DataArray(np.arange(24.0).reshape(4, 6), dims=("y", "x")).chunk({"y": 2})
        out = xr.map_blocks(scale_block, field, template=field)
        np.testing.assert_array_equal(out.compute().values, field.values * 3)
        uf = xr.apply_ufunc(scale_block, field, dask="parallelized", output_dtypes=[float])
        np.testing.assert_array_equal(uf.compute().values, field.values * 3)
        with dask.annotate(context="scale"):
            annotated = xr.map_blocks(scale_annotated, field, template=field).compute()
        np.testing.assert_array_equal(annotated.values, field.values * 3)
        assert dp.stats(client).total("loads") <= 2


def test_xarray_map_blocks_without_template_is_clear():
    xr = pytest.importorskip("xarray")
    field = xr.DataArray(np.arange(6.0), dims="x").chunk(3)
    with pytest.raises(Exception, match="template") as info:
        xr.map_blocks(scale_block, field)
    assert isinstance(info.value.__cause__ or info.value.__context__, dp.PervasiveError)


@gen_cluster(client=True)
async def test_delayed_and_as_completed_pipeline(c, s, a, b):
    await dp.install(c, [SCALE])
    parts = [dask.delayed(scale_block)(np.ones(3) * i) for i in range(6)]
    futures = c.compute(parts)
    seen = []
    async for fut in as_completed(futures):
        block = await fut
        seen.append(block[0])
        if len(seen) == 3:  # streaming: feed more work as results arrive
            futures_more = c.map(scale_block, [np.ones(2)] * 3)
            for f in futures_more:
                seen.append((await f)[0])
    assert sorted(seen) == sorted([3.0 * i for i in range(6)] + [3.0] * 3)
    assert (await dp.stats(c)).total("loads") <= 2
