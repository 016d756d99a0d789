"""dask-jobqueue's SLURMCluster on a real one-host SLURM, running a context pipeline through faults.

The scheduler runs in this process with ``--preload dask_pervasive.preload``; each worker is an
sbatch job (one CPU) with the same preload and the context declared through
``DASK_PERVASIVE__CONTEXTS`` in the job script. Every input's result must arrive exactly once and
be right when a warm worker's job is cancelled, preempted by a higher-priority job, or SIGKILLed;
``adapt(minimum=1, maximum=3)`` must keep the warm worker when it scales down and bootstrap the
next burst's workers from it.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
from distributed import Event
from slurm_harness import collect_once, jobs_of_workers, slurm_cluster, slurm_up, wait_until, worker_addresses
from slurm_tasks import CONTEXT, expected, infer, make_source, plain

import dask_pervasive as dp

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]

N = 60
FILES, SIZE = 2, 512 * 1024


@pytest.fixture(scope="module")
def slurm() -> Iterator:
    with slurm_up() as running:
        yield running


# -- a warm worker's job hit mid-run ------------------------------------------------------------------
def run_with_fault(slurm, tmp_path, inject):
    """Three warm workers, N context tasks; ``inject(slurm, jobs)`` hits one job mid-run and returns its id.

    Returns the victim's job id, its ``scontrol show job`` record and its job logs.
    """
    source = make_source(str(tmp_path / "origin"), FILES, SIZE)
    with slurm_cluster(slurm, source, tmp_path / "jobs") as (cluster, client):
        cluster.scale(3)
        client.wait_for_workers(3, timeout=60)
        jobs = jobs_of_workers(client)  # {address: job id}
        assert sorted(dp.prewarm(client, CONTEXT, progress=False)) == sorted(jobs)

        futures = client.map(infer, range(N), seconds=0.1)
        wait_until(lambda: sum(f.done() for f in futures) >= N // 4, 60, f"{N // 4} results")
        resident = set(dp.where(client)[CONTEXT]["resident"])
        t0 = time.monotonic()
        victim_job = inject(slurm, jobs)
        done_at_fault = sum(f.done() for f in futures)
        victim = next(a for a, j in jobs.items() if j == victim_job)
        assert victim in resident, (victim, resident)  # a warm worker was hit ...
        wait_until(lambda: victim not in worker_addresses(client), 30, f"the scheduler to drop {victim}")
        dropped_after = time.monotonic() - t0
        assert done_at_fault < N, done_at_fault  # ... mid-run

        results = collect_once(futures)
        assert sorted(results) == list(range(N))
        assert all(value == expected(x, FILES * SIZE) for x, (value, _) in results.items())
        wait_until(lambda: victim_job not in slurm.queued(), 30, f"job {victim_job} to leave the queue")
        record = slurm.job(victim_job)
        by_job = {j: sum(1 for _, jj in results.values() if jj == j) for j in jobs.values()}
        survivors = set(jobs.values()) - {victim_job}
        assert all(by_job[j] > 0 for j in survivors), by_job
        assert dp.stats(client).total("failures", CONTEXT) == 0
        logs = {p.name: p.read_text() for p in (tmp_path / "jobs").glob(f"*-{victim_job}.*")}
        print(
            f"victim job {victim_job} ({victim}): JobState={record.get('JobState')} Reason={record.get('Reason')} "
            f"ExitCode={record.get('ExitCode')}; {done_at_fault}/{N} done at the fault; worker dropped after "
            f"{dropped_after:.2f}s; results per job {by_job}"
        )
        return victim_job, record, logs


def test_scancel_warm_worker(slurm, tmp_path):
    def inject(slurm, jobs):
        job = min(jobs.values(), key=int)
        slurm.run("scancel", job)
        return job

    job, record, logs = run_with_fault(slurm, tmp_path, inject)
    assert record["JobState"] == "CANCELLED", record
    assert any(f"JOB {job} ON" in text and "CANCELLED" in text for text in logs.values()), logs


def test_preempted_by_urgent_job(slurm, tmp_path):
    """``sbatch -p urgent -c 2`` with one slot free: SLURM cancels one worker job to make room."""
    urgent = []

    def inject(slurm, jobs):
        out = slurm.run(
            "sbatch", "--parsable", "-p", "urgent", "-c", "2", "--mem=100M", "-o", os.devnull,
            "-J", "urgent", "--wrap", "sleep 120",
        )  # fmt: skip
        urgent.append(out.strip())
        wait_until(lambda: slurm.job(urgent[0]).get("JobState") == "RUNNING", 30, "the urgent job to start")
        preempted = [j for j in jobs.values() if slurm.job(j).get("JobState") in ("PREEMPTED", "CANCELLED")]
        assert len(preempted) == 1, {j: slurm.job(j).get("JobState") for j in jobs.values()}
        return preempted[0]

    _, record, logs = run_with_fault(slurm, tmp_path, inject)
    assert record["JobState"] == "PREEMPTED", record
    assert any("DUE TO PREEMPTION" in text for text in logs.values()), logs


def test_kill_9_worker_job(slurm, tmp_path):
    """SIGKILL every process of the job (``scontrol listpids``): no warning at all."""

    def inject(slurm, jobs):
        job = max(jobs.values(), key=int)
        pids = slurm.listpids(job)
        assert pids, f"scontrol listpids {job} listed nothing"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return job

    _, record, _ = run_with_fault(slurm, tmp_path, inject)
    assert record["JobState"] == "FAILED", record  # the batch shell died of SIGKILL (ExitCode=0:9)


# -- adapt: scale down to the warm worker, bootstrap the next burst from it ------------------------------
@pytest.mark.timeout(240)
def test_adapt_keeps_warm_worker_and_bootstraps_from_peer(slurm, tmp_path):
    """Burst 1: a few context tasks warm the first worker, then plain tasks make Adaptive grow to
    three jobs (the context stays on one worker). When idle, Adaptive retires two: the one left must
    be the warm one (Dask alone picks among idle workers arbitrarily; context-aware retirement is
    what makes this hold). Burst 2: a context backlog grows the cluster again and the new workers
    copy the context files from the warm peer, not from the origin.
    """
    source = make_source(str(tmp_path / "origin"), FILES, SIZE)
    with slurm_cluster(slurm, source, tmp_path / "jobs") as (cluster, client):
        cluster.adapt(minimum=1, maximum=3)
        client.wait_for_workers(1, timeout=60)
        (first,) = worker_addresses(client)
        t0 = time.monotonic()
        timeline = []

        def mark(what):
            timeline.append(f"{time.monotonic() - t0:.1f}s {what}")

        # Burst 1: the context on the first worker only, then plain tasks that wait at a gate
        # until Adaptive has grown to three workers.
        warmup = collect_once(client.map(infer, range(4), seconds=0.25))
        assert {x: v for x, (v, _) in warmup.items()} == {x: expected(x, FILES * SIZE) for x in range(4)}
        gate1, gate2 = Event(f"burst-1-{uuid.uuid4().hex}"), Event(f"burst-2-{uuid.uuid4().hex}")
        burst = client.map(plain, range(40), gate=gate1.name)
        wait_until(lambda: len(worker_addresses(client)) == 3, 90, "Adaptive to grow to 3 workers")
        mark("3 workers")
        gate1.set()
        assert sorted(client.gather(burst)) == list(range(40))
        mark("burst 1 done")
        peak = worker_addresses(client)
        warm_at_peak = set(dp.where(client)[CONTEXT]["resident"])
        assert warm_at_peak == {first}, (warm_at_peak, peak)  # one warm worker, two cold ones
        del burst, warmup

        # Idle: Adaptive scales down to its minimum.
        wait_until(lambda: len(worker_addresses(client)) == 1, 90, "Adaptive to shrink to 1 worker")
        (kept,) = worker_addresses(client)
        mark("1 worker")
        assert kept == first, f"scale-down kept a cold worker ({kept}) and retired the warm one ({first})"

        # Burst 2: a context backlog (held at a gate until Adaptive has grown to three again);
        # the new workers bootstrap from the kept one.
        futures = client.map(infer, range(100, 180), seconds=0.05, gate=gate2.name)
        wait_until(lambda: len(worker_addresses(client)) == 3, 90, "Adaptive to grow to 3 workers again")
        mark("3 workers")
        gate2.set()
        results = collect_once(futures)
        mark("burst 2 done")
        assert sorted(results) == list(range(100, 180))
        assert all(value == expected(x, FILES * SIZE) for x, (value, _) in results.items())
        jobs = jobs_of_workers(client)
        rows = {r["worker"]: r for r in dp.stats(client) if r["context"] == CONTEXT}
        assert rows[kept]["loads"] == 1, rows[kept]  # still the copy loaded in burst 1
        newcomers = {a: rows[a] for a in rows if a != kept and rows[a]["loads"] > 0}
        assert newcomers, f"no new worker loaded the context: {rows}"
        for address, row in newcomers.items():
            assert row["bytes_from_peers"] > 0 and row["bytes_from_origin"] == 0, (address, row)
        ran_on = {job for _, job in results.values()}
        print(
            f"adapt: kept worker job {jobs.get(kept)}; peak {len(peak)} workers; burst 2 ran on jobs "
            f"{sorted(ran_on)}; newcomers' bytes from peers "
            f"{ {jobs.get(a, a): r['bytes_from_peers'] for a, r in newcomers.items()} }; {timeline}"
        )
