"""The ``/pervasive`` page in a real headless browser (Debian's ``chromium``).

``chromium-up.sh`` (next to this file) finds chromium, or installs it when
running as root; without it these tests skip with its reason. The page is
checked after its script ran: charts drawn from ``data.json``, the warm map
filled in, and (with Bokeh) the dashboard's "More..." menu linking to it.
``DP_DASHBOARD_SCREENSHOT=PATH`` also saves a screenshot there (how
docs/_static/pervasive-dashboard.png is made).
"""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest
from distributed import Client, LocalCluster

import dask_pervasive as dp

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def chromium() -> str:
    proc = subprocess.run([str(HERE / "chromium-up.sh")], check=False, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(proc.stderr.strip() or "chromium-up.sh failed")
    return proc.stdout.strip().splitlines()[-1]


def browse(chromium: str, url: str, tmp_path: pathlib.Path, screenshot: str | None = None) -> str:
    """The DOM of ``url`` after its scripts ran for a few (virtual) seconds."""
    args = [
        chromium,
        "--headless",
        "--no-sandbox",  # as root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,1000",
        "--virtual-time-budget=5000",
    ]
    if screenshot is not None:
        subprocess.run([*args, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=120)
    proc = subprocess.run([*args, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120)
    return proc.stdout


def load_lexicon(path, device):
    return {"good": 1, "bad": -1}


@dp.uses_context("lexicon")
def score(lexicon, text):
    return sum(lexicon.get(w, 0) for w in text.split())


@pytest.fixture(scope="module")
def cluster_with_history():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        lexicon = dp.Context("lexicon", load=load_lexicon, device="cpu")
        dp.install(client, [lexicon], max_bytes="1GiB")
        from dask_pervasive.dashboard import add_dashboard_page, history_of

        client.run_on_scheduler(lambda dask_scheduler: add_dashboard_page(dask_scheduler))
        assert client.gather(client.map(score, ["good good", "bad"] * 20)) == [2, -1] * 20
        dp.prewarm(client, "lexicon", n_workers=2)

        def sampled(dask_scheduler) -> int:
            history = history_of(dask_scheduler)
            history.sample()  # one sample now that both loads are done, without waiting for the timer
            return len(history.samples)

        assert client.run_on_scheduler(sampled) >= 2
        yield cluster, client


def test_page_renders_live_charts_and_warm_map(chromium, cluster_with_history, tmp_path):
    cluster, client = cluster_with_history
    url = cluster.dashboard_link.replace("/status", "/pervasive")
    shot = os.environ.get("DP_DASHBOARD_SCREENSHOT")
    dom = browse(chromium, url, tmp_path, screenshot=shot)
    # Drawn by the page's script from data.json: a failed fetch or a script error leaves these out.
    assert "updated " in dom, dom[-3000:]
    assert dom.count('<svg class="chart" width="560"') == 3  # rendered, not the script's template
    for title in ("Loads per context @ worker", "Evictions per context @ worker", "from peers vs from the origin"):
        assert title in dom
    workers = list(client.scheduler_info()["workers"])
    for addr in workers:
        assert f"lexicon @ {addr}: 1" in dom  # legend: one load on each worker
        assert addr in dom  # warm map row
    assert dom.count('class="resident"') == len(workers)
    assert 'href="status"' in dom  # back to the dashboard


def test_dashboard_menu_links_to_the_page(chromium, cluster_with_history, tmp_path):
    pytest.importorskip("bokeh", reason="no Bokeh: distributed serves no dashboard to put a menu entry in")
    cluster, _ = cluster_with_history
    dom = browse(chromium, cluster.dashboard_link, tmp_path)  # the dashboard's own /status page
    assert '<a href="pervasive">Pervasive</a>' in dom, dom[:3000]
