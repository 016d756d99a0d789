"""Settings are read once, where a plugin is built, validated, and survive a config reset."""

from __future__ import annotations

import copy
import pickle

import dask.config
import distributed.utils_test
import pytest
from distributed.utils_test import gen_cluster

import dask_pervasive as dp
from dask_pervasive import config
from dask_pervasive._protocol import PLUGIN_NAME
from dask_pervasive._settings import SchedulerSettings, TransferSettings, WorkerSettings
from dask_pervasive.worker import plugin_on

#: One invalid value for every ``pervasive.<section>.<key>`` the plugins read.
BAD_VALUES = {
    "worker.max-bytes": "lots",
    "worker.device-max-bytes": -1,
    "worker.cache-dir": 3,
    "worker.retry-failed-after": "soon",
    "worker.budget-wait": -1,
    "scheduler.prewarm": "maybe",
    "scheduler.prewarm-backlog": 1.5,
    "scheduler.default-load-seconds": "long",
    "scheduler.interval": 0,
    "scheduler.keep-warm": "a while",
    "transfer.peers": "sometimes",
    "transfer.chunk-size": 0,
    "transfer.origin-max-concurrent": 0,
    "transfer.peer-max-uploads": "two",
    "transfer.stall-timeout": "0s",
    "transfer.retries": -1,
    "transfer.retry-backoff": "a while",
    "transfer.retry-backoff-max": -2,
    "transfer.verify": 3,
}
#: Which plugin reads which section (``worker.retry-failed-after`` is read by both).
_READERS = {
    "worker": [dp.ContextWorkerPlugin],
    "scheduler": [dp.ContextSchedulerPlugin],
    "transfer": [dp.ContextWorkerPlugin, dp.ContextSchedulerPlugin],
}


def test_every_key_is_covered():
    """BAD_VALUES names every key of the packaged worker, scheduler and transfer sections."""
    keys = {f"{section}.{key}" for section in _READERS for key in config.defaults["pervasive"][section]}
    assert keys == set(BAD_VALUES)


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_bad_value_raises_configuration_error_where_the_plugin_is_built(key):
    section = key.split(".")[0]
    readers = list(_READERS[section])
    if key == "worker.retry-failed-after":
        readers.append(dp.ContextSchedulerPlugin)
    with dask.config.set({f"pervasive.{key}": BAD_VALUES[key]}):
        for plugin_class in readers:
            with pytest.raises(dp.ConfigurationError) as info:
                plugin_class()
            # Names the key or the argument that gave the value.
            assert key.split(".")[1].replace("-", "_") in str(info.value).replace("-", "_")


def test_good_values_as_text_are_accepted():
    """Environment variables give every value as text."""
    with dask.config.set(
        {
            "pervasive.transfer.chunk-size": "64KiB",
            "pervasive.transfer.retries": "2",
            "pervasive.transfer.peers": "false",
            "pervasive.scheduler.prewarm-backlog": "3",
            "pervasive.worker.max-bytes": "0.25",
        }
    ):
        worker = WorkerSettings.from_config()
        scheduler = SchedulerSettings.from_config()
    assert (worker.transfer.chunk_size, worker.transfer.retries, worker.transfer.peers) == (65536, 2, False)
    assert scheduler.prewarm_backlog == 3 and worker.max_bytes == "0.25"
    assert scheduler.transfer == worker.transfer


def test_plugins_keep_the_settings_they_were_built_with():
    with dask.config.set({"pervasive.transfer.chunk-size": "1MiB", "pervasive.scheduler.prewarm-backlog": 5}):
        worker_plugin = dp.ContextWorkerPlugin(max_bytes="1GiB")
        scheduler_plugin = dp.ContextSchedulerPlugin(interval="2s")
    worker_plugin = pickle.loads(pickle.dumps(worker_plugin))
    scheduler_plugin = pickle.loads(pickle.dumps(scheduler_plugin))
    assert worker_plugin.settings.transfer.chunk_size == 2**20 and worker_plugin.settings.max_bytes == "1GiB"
    assert scheduler_plugin.settings.prewarm_backlog == 5 and scheduler_plugin.settings.interval == 2.0
    assert isinstance(scheduler_plugin.settings.transfer, TransferSettings)


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_client_side_transfer_limits_reach_the_coordinator(c, s, a):
    """A ``pervasive.transfer.*`` set on the client travels with the scheduler plugin (dp.install builds it there)."""
    with dask.config.set({"pervasive.transfer.origin-max-concurrent": 5, "pervasive.transfer.peer-max-uploads": 3}):
        plugin = dp.ContextSchedulerPlugin()
    assert config.get("transfer.origin-max-concurrent") == 2  # the scheduler's own config
    await c.register_plugin(plugin)
    coordinator = s.plugins[PLUGIN_NAME].transfer
    assert (coordinator.origin_max, coordinator.peer_max) == (5, 3)


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_install_raises_on_the_client(c, s, a):
    with dask.config.set({"pervasive.transfer.retries": "many"}), pytest.raises(dp.ConfigurationError, match="retries"):
        await dp.install(c, [])
    assert PLUGIN_NAME not in s.plugins and PLUGIN_NAME not in s.worker_plugins


_PRELOAD = {
    "distributed.scheduler.preload": ["dask_pervasive.preload"],
    "distributed.worker.preload": ["dask_pervasive.preload"],
}


def test_preload_plugins_survive_reset_config(monkeypatch):
    """issue 17: a config snapshot taken before our import has no ``pervasive`` key; clusters built after
    ``distributed.utils_test``'s reset to it must still get our plugins (every read falls back to the packaged
    defaults)."""
    pristine = copy.deepcopy(distributed.utils_test.original_config)
    pristine.pop("pervasive", None)
    monkeypatch.setattr(distributed.utils_test, "original_config", pristine)
    saved = copy.deepcopy(dask.config.config)
    seen = []

    @gen_cluster(client=True, nthreads=[("", 1)] * 2, config=_PRELOAD)
    async def run(c, s, a, b):
        assert "pervasive" not in dask.config.config  # reset to the snapshot without our defaults
        assert isinstance(s.plugins.get(PLUGIN_NAME), dp.ContextSchedulerPlugin)
        for w in (a, b):
            plugin = plugin_on(w)
            assert plugin is not None and plugin.settings == WorkerSettings()
        assert s.plugins[PLUGIN_NAME].settings == SchedulerSettings()
        seen.append(s.address)

    try:
        run()  # a first cluster
        run()  # and one after gen_cluster reset the config again
    finally:
        dask.config.config.clear()
        dask.config.config.update(saved)
    assert len(seen) == 2
