"""``--preload dask_pervasive.preload``: config parsing, in-process servers, the real CLI, dask-jobqueue."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import click
import dask.config
import pytest
import yaml
from distributed import Client, Worker
from distributed.utils_test import async_poll_for, gen_cluster
from preload_contexts import ANSWER, CONFIG_ENTRIES, add_answer, pid_of_answer, use_answer

import dask_pervasive as dp
from dask_pervasive.preload import contexts_from_config, dask_setup, import_object, parse_contexts
from dask_pervasive.scheduler import ContextSchedulerPlugin

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
# Tuples: click consumes argument lists in place.
PRELOAD = ("dask_pervasive.preload",)
OPTION = ("--pervasive-contexts", "preload_contexts:CONTEXTS")


# -- declarations from config and options ---------------------------------------------
def test_parse_contexts_forms():
    assert parse_contexts(None, "x") == [] and parse_contexts("", "x") == []
    assert parse_contexts("preload_contexts:CONTEXTS", "x") == [ANSWER]
    assert parse_contexts("preload_contexts.ANSWER", "x") == [ANSWER]
    assert parse_contexts(CONFIG_ENTRIES, "x") == [ANSWER]
    assert parse_contexts(CONFIG_ENTRIES[0], "x") == [ANSWER]  # a single mapping
    dotted = [{"name": "answer", "load": "preload_contexts.load_answer", "device": "cpu"}]
    assert parse_contexts(dotted, "x") == [ANSWER]
    # environment variables hold text: JSON (with null) or YAML
    assert parse_contexts(json.dumps([{**CONFIG_ENTRIES[0], "nbytes": None}]), "x") == [ANSWER]
    assert parse_contexts(yaml.safe_dump(CONFIG_ENTRIES), "x") == [ANSWER]
    assert parse_contexts("[" + json.dumps(CONFIG_ENTRIES[0]) + "]", "x") == [ANSWER]
    mixed = parse_contexts(
        [
            "preload_contexts:ANSWER",
            {"name": "gpt", "kind": "transformers", "source": "file:///models/gpt2", "model-class": "AutoModel"},
        ],
        "x",
    )
    assert [type(c).__name__ for c in mixed] == ["Context", "TransformersContext"]
    assert mixed[1].model_class == "AutoModel"


@pytest.mark.parametrize(
    "value, match",
    [
        ([{"name": "a", "load": "preload_contexts:load_answer", "kind": "torch"}], r"cfg\[0\]: unknown kind 'torch'"),
        ([{"name": "a", "load": "preload_contexts:load_answer", "weights": 1}], r"unknown key\(s\) \['weights'\]"),
        ([{"load": "preload_contexts:load_answer"}], r"cfg\[0\]: a context needs a 'name'"),
        ([{"name": "a", "load": "no_such_module_xyz:f"}], r"cfg\[0\]\.load: cannot import module 'no_such_module_xyz'"),
        ([{"name": "a", "load": "preload_contexts:nope"}], r"has no attribute 'nope'"),
        ([{"name": "a b", "load": "preload_contexts:load_answer"}], r"cfg\[0\]: Context name must match"),
        (["preload_contexts:use_answer"], r"expected a dask_pervasive.Context or a list of them, got function"),
        ([42], r"cfg\[0\]: expected a mapping or 'module:attr', got int"),
        ("nodots", r"'nodots' is not of the form 'module:attr'"),
        ("[{unclosed", r"cannot parse"),
        (3.5, r"expected a list of contexts"),
    ],
)
def test_parse_contexts_errors_name_the_entry(value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        parse_contexts(value, "cfg")


def test_contexts_from_config_env_and_yaml_file(tmp_path):
    # what DASK_PERVASIVE__CONTEXTS=... turns into
    env = {"DASK_PERVASIVE__CONTEXTS": json.dumps(CONFIG_ENTRIES)}
    with dask.config.set(dask.config.collect(paths=[], env=env)):
        assert contexts_from_config() == [ANSWER]
    env = {"DASK_PERVASIVE__CONTEXTS": "preload_contexts:CONTEXTS"}
    with dask.config.set(dask.config.collect(paths=[], env=env)):
        assert contexts_from_config() == [ANSWER]
    # what a YAML file in DASK_CONFIG turns into
    (tmp_path / "pervasive.yaml").write_text(yaml.safe_dump({"pervasive": {"contexts": CONFIG_ENTRIES}}))
    with dask.config.set(dask.config.collect(paths=[str(tmp_path)], env={})):
        assert contexts_from_config() == [ANSWER]
    assert contexts_from_config() == []  # the default


def test_bad_option_is_a_usage_error_naming_it():
    with pytest.raises(click.BadParameter, match="no_such_module_xyz") as info:
        dask_setup.make_context("dask_setup", ["--pervasive-contexts", "no_such_module_xyz:CONTEXTS"])
    assert "'--pervasive-contexts'" in info.value.format_message()
    ctx = dask_setup.make_context("dask_setup", list(OPTION))
    assert ctx.params["pervasive_contexts"] == [ANSWER]
    with pytest.raises(ValueError, match="where: cannot import"):
        import_object("no_such_module_xyz:x", "where")


def test_bad_option_stops_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "distributed.cli.dask_worker", "tcp://127.0.0.1:9", "--no-nanny"]
        + ["--preload", "dask_pervasive.preload", "--pervasive-contexts", "no_such_module_xyz:CONTEXTS"],
        env=_env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "--pervasive-contexts" in proc.stderr and "no_such_module_xyz" in proc.stderr


# -- in-process servers -------------------------------------------------------------------
@gen_cluster(client=True, nthreads=[], scheduler_kwargs={"preload": list(PRELOAD)})
async def test_preload_in_process(c, s):
    plugin = s.plugins["pervasive"]
    assert isinstance(plugin, ContextSchedulerPlugin)
    async with Worker(s.address, nthreads=2, preload=list(PRELOAD), preload_argv=list(OPTION)) as w:
        assert w.plugins["pervasive"].cache.entries.keys() == {"answer"}
        # the budget event sent from setup() was dropped (not registered yet): re-announced after registration
        await async_poll_for(lambda: w.address in plugin.budgets, timeout=10)
        assert await c.submit(use_answer, 1) == 43
        assert await c.gather(c.map(add_answer, range(5))) == [42, 43, 44, 45, 46]
        assert (await dp.where(c))["answer"]["resident"] == [w.address]
        rows = await dp.stats(c)
        assert rows.total("loads", "answer") == 1 and rows.total("hits", "answer") == 5


@gen_cluster(client=True, nthreads=[])
async def test_preload_when_scheduler_has_the_worker_plugin(c, s):
    """Registration replaces the preload's plugin with the cluster's: the contexts are declared again."""
    await dp.install(c)  # cluster-wide ContextWorkerPlugin without contexts
    with dask.config.set({"pervasive.contexts": CONFIG_ENTRIES}):
        async with Worker(s.address, nthreads=1, preload=list(PRELOAD)) as w:
            await async_poll_for(lambda: "answer" in w.plugins["pervasive"].cache.entries, timeout=10)
            assert await c.submit(pid_of_answer, 1) == os.getpid()


def test_dask_setup_rejects_other_servers():
    with pytest.raises(TypeError, match="not --preload-nanny"):
        asyncio.run(dask_setup.callback(object()))


# -- a real cluster from the command line -------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def _wait_for_file(path: Path, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"scheduler exited with {proc.returncode}")
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            info = json.loads(path.read_text())
            if info.get("address"):
                return info
        time.sleep(0.05)
    raise TimeoutError(f"no scheduler file at {path} after {timeout}s")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started with its own session, and its children (the nanny's worker)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def cli_cluster(tmp_path) -> Iterator[dict]:
    """``dask scheduler`` + two ``dask worker`` processes, all with the preload.

    The scheduler listens on a free port (``--port 0``) and writes its
    address to ``--scheduler-file``; workers get that address positionally,
    since after ``--scheduler-file`` the preload's own option would not parse.
    Worker "opt" declares contexts with ``--pervasive-contexts`` (under a
    nanny, as dask-jobqueue starts workers), worker "cfg" in a YAML config
    file found through ``DASK_CONFIG``.
    """
    procs: list[subprocess.Popen] = []
    log = open(tmp_path / "cluster.log", "w")  # noqa: SIM115 - closed in finally

    def start(args: list[str], **env: str) -> subprocess.Popen:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", *args],
                env=_env(**env),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                start_new_session=True,
            )
        )
        return procs[-1]

    try:
        sched_file = tmp_path / "scheduler.json"
        scheduler = start(
            ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0"]
            + ["--scheduler-file", str(sched_file), "--preload", *PRELOAD]
        )
        info = _wait_for_file(sched_file, scheduler, timeout=30)
        address = info["address"]
        worker = ["distributed.cli.dask_worker", address, "--nthreads", "2", "--host", "127.0.0.1"]
        start([*worker, "--name", "opt", "--preload", *PRELOAD, *OPTION])
        config_dir = tmp_path / "config"
        config_dir.mkdir()
        (config_dir / "pervasive.yaml").write_text(yaml.safe_dump({"pervasive": {"contexts": CONFIG_ENTRIES}}))
        start([*worker, "--name", "cfg", "--no-nanny", "--preload", *PRELOAD], DASK_CONFIG=str(config_dir))
        yield {"address": address, "dashboard": info["services"]["dashboard"], "log": tmp_path / "cluster.log"}
    finally:
        for proc in reversed(procs):
            _stop(proc)
        log.close()


def _plugin_state(dask_scheduler) -> dict:
    plugin = dask_scheduler.plugins.get("pervasive")
    return {"plugin": type(plugin).__name__, "budgets": sorted(plugin.budgets) if plugin is not None else []}


def _hits(metrics: str) -> dict[str, float]:
    """``{worker: hits}`` from the text of a /metrics page."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith("dask_pervasive_hits_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('worker="')[1].split('"')[0]] = float(value)
    return out


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.mark.slow
def test_cli_cluster_with_preload(cli_cluster):
    with Client(cli_cluster["address"], timeout=30) as client:
        client.wait_for_workers(2, timeout=30)
        workers = {w["name"]: addr for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        assert set(workers) == {"opt", "cfg"}
        state = client.run_on_scheduler(_plugin_state)
        assert state["plugin"] == "ContextSchedulerPlugin"
        deadline = time.monotonic() + 10  # budgets are re-announced once each worker registered
        while state["budgets"] != sorted(workers.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
            state = client.run_on_scheduler(_plugin_state)
        assert state["budgets"] == sorted(workers.values())
        for addr in workers.values():
            assert client.submit(use_answer, 1, workers=[addr], pure=False).result(timeout=30) == 43
        assert client.gather(client.map(add_answer, range(20))) == list(range(42, 62))
        rows = dp.stats(client)
        assert {r["worker"] for r in rows if r["loads"] == 1} == set(workers.values())
        assert rows.total("loads", "answer") == 2
        assert sorted(dp.where(client)["answer"]["resident"]) == sorted(workers.values())
        page = _get(f"http://127.0.0.1:{cli_cluster['dashboard']}/pervasive")
        assert all(addr in page for addr in workers.values())
        metrics = _get(f"http://127.0.0.1:{cli_cluster['dashboard']}/metrics")
        assert 'dask_pervasive_workers{context="answer",state="resident"} 2.0' in metrics
        # the preload adds the workers' counters to their heartbeats
        expected = {r["worker"]: r["hits"] for r in rows}
        deadline = time.monotonic() + 10
        while _hits(metrics) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
            metrics = _get(f"http://127.0.0.1:{cli_cluster['dashboard']}/metrics")
        assert _hits(metrics) == expected


# -- dask-jobqueue ----------------------------------------------------------------------------------
def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slurm_job_script(capsys):
    pytest.importorskip("dask_jobqueue")
    from dask_jobqueue import SLURMCluster

    example = _load_example("slurm_jobqueue")
    args = example.parse_args(["--queue", "gpu", "--gpus-per-job", "1", "--dashboard-address", ":0"])
    with SLURMCluster(**example.cluster_kwargs(args)) as cluster:
        script = cluster.job_script()
        assert isinstance(cluster.scheduler.plugins.get("pervasive"), ContextSchedulerPlugin)
    lines = script.splitlines()
    assert "#SBATCH --gres=gpu:1" in lines and "#SBATCH -p gpu" in lines
    assert any(line.startswith("export PYTHONPATH=") and "examples" in line for line in lines)
    (command,) = [line for line in lines if "distributed.cli.dask_worker" in line]
    assert command.endswith("--preload dask_pervasive.preload --pervasive-contexts slurm_jobqueue:CONTEXTS")
    assert "--scheduler-file" not in command  # the address is positional: the preload option parses
    # the contexts the job script names resolve on a node with that PYTHONPATH
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        assert [c.name for c in parse_contexts("slurm_jobqueue:CONTEXTS", "x")] == ["table"]
    finally:
        sys.path.remove(str(ROOT / "examples"))
        sys.modules.pop("slurm_jobqueue", None)

    assert example.main(["--print-script", "--gpus-per-job", "0", "--dashboard-address", ":0"]) == 0
    printed = capsys.readouterr().out
    assert "--preload dask_pervasive.preload" in printed and "--gres" not in printed


# -- the LocalCUDACluster example ------------------------------------------------------------------
def test_local_cuda_cluster_example_reports_the_real_import_error(tmp_path, monkeypatch):
    example = _load_example("local_cuda_cluster")
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # not installed
    assert example.missing_requirement().startswith("dask-cuda is not installed")
    # Installed without the CUDA bindings, as plain `pip install dask-cuda` leaves it.
    (tmp_path / "dask_cuda").mkdir()
    (tmp_path / "dask_cuda" / "__init__.py").write_text("from cuda import bindings\n")
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "dask_cuda")
    for cached in ("cuda", "cuda.bindings"):
        monkeypatch.delitem(sys.modules, cached, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    reason = example.missing_requirement()
    assert "installed but does not import" in reason and "cannot import name 'bindings' from 'cuda'" in reason


def test_local_cuda_cluster_example(capsys):
    example = _load_example("local_cuda_cluster")
    reason = example.missing_requirement()
    if reason is not None:  # what users without dask-cuda / a GPU see
        assert example.main([]) == 0
        assert f"skipped: {reason}" in capsys.readouterr().out
    # The same pipeline on a CPU cluster: one load per worker, every task on a resident copy.
    pytest.importorskip("torch")
    from distributed import LocalCluster

    args = example.parse_args(["--tasks", "12", "--size-mib", "1"])
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        results = example.run(cluster, args)
        workers = list(cluster.scheduler.workers)
    assert len(results) == 12 and {r["device"] for r in results} == {"cpu"}
    table = capsys.readouterr().out.splitlines()
    for addr in workers:  # prewarmed: one copy (one load) on each worker
        (line,) = [row for row in table if row.startswith(addr)]
        assert line.split()[2:4] == ["cpu", "1"]


@pytest.mark.slow
def test_first_transformers_load_keeps_the_worker_loop_responsive(tiny_gpt2, tmp_path):
    # A real `dask worker --preload` (nanny and all) in a fresh process: the first load there is the
    # first `import torch`/`transformers`, which in a load thread held the GIL and stalled the loop.
    from dask.utils import parse_timedelta
    from distributed import LocalCluster
    from preload_contexts import longest_tick, loop_probe, n_tokens  # cheap to import on the worker's loop

    limit = parse_timedelta(dask.config.get("distributed.admin.tick.limit"))
    contexts = [{"name": "gpt", "kind": "transformers", "source": Path(tiny_gpt2).as_uri(), "device": "cpu"}]
    log_path = tmp_path / "worker.log"
    with (
        LocalCluster(n_workers=0, processes=False, protocol="tcp", dashboard_address=":0") as cluster,
        Client(cluster) as client,
        open(log_path, "w") as log,
    ):
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address, "--nthreads", "2"]
            + ["--host", "127.0.0.1", "--no-dashboard", "--preload", *PRELOAD],
            env=_env(DASK_PERVASIVE__CONTEXTS=json.dumps(contexts)),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
        try:
            client.wait_for_workers(1, timeout=120)
            (imported,) = client.run(loop_probe).values()
            assert imported == {"torch": True, "transformers": True}  # by the preload, before any load
            assert client.gather(client.map(n_tokens, ["The Moon", "Light travels faster"])) == [2, 3]
            (longest,) = client.run(longest_tick).values()
        finally:
            _stop(worker)
    output = log_path.read_text()
    assert "Event loop was unresponsive" not in output, output
    assert longest < limit, f"the worker's loop stalled {longest:.2f}s during the first load"
