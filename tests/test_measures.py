"""Load times by source (dask_pervasive._measures): what a cold load is expected to cost."""

from __future__ import annotations

import pytest

from dask_pervasive._measures import ContextPlan, fetch_source


def test_origin_reads_and_peer_copies_are_kept_apart():
    plan = ContextPlan("m")
    assert plan.origin_load_seconds() is None and plan.peer_load_seconds(0.5) is None
    plan.observe_load(5.0, 4.5, fetch_source(origin_bytes=100))  # the first worker reads the origin
    assert plan.setup_seconds == pytest.approx(0.5)
    assert plan.origin_load_seconds() == pytest.approx(5.0)
    # before any peer copy was timed: setup + the prior
    assert plan.peer_load_seconds(0.25) == pytest.approx(0.75)
    plan.observe_load(0.9, 0.4, fetch_source(peer_bytes=100, holder_at_start=True))
    assert plan.peer_fetch_seconds == pytest.approx(0.4)
    assert plan.peer_load_seconds(10.0) == pytest.approx(0.5 * 0.5 + 0.5 * 0.5 + 0.4)  # the prior no longer counts
    # the origin figure is not pulled down by the copy (the average of every load is)
    assert plan.origin_fetch_seconds == pytest.approx(4.5)
    assert plan.load_seconds == pytest.approx((5.0 + 0.9) / 2)


def test_a_copy_that_streamed_behind_an_origin_read_times_neither_source():
    plan = ContextPlan("m")
    plan.observe_load(5.0, 4.5, fetch_source(origin_bytes=100))
    plan.observe_load(4.9, 4.4, fetch_source(peer_bytes=100, holder_at_start=False))  # waited for the first read
    plan.observe_load(4.9, 4.4, fetch_source(origin_bytes=40, peer_bytes=60, holder_at_start=True))  # mixed
    assert plan.peer_fetch_seconds is None
    assert plan.origin_fetch_seconds == pytest.approx(4.5)


def test_cached_files_and_contexts_without_files_time_the_setup():
    plan = ContextPlan("m")
    plan.observe_load(2.0)  # no files: the whole load is setup
    assert plan.expected_load_seconds() == pytest.approx(2.0)
    assert plan.origin_fetch_seconds is None and plan.peer_fetch_seconds is None
    plan.observe_load(6.0, 4.0, fetch_source(origin_bytes=10))
    assert plan.expected_load_seconds(fetch_source(origin_bytes=10)) == pytest.approx(plan.setup_seconds + 4.0)
    assert plan.expected_load_seconds() == pytest.approx(plan.setup_seconds)


def test_pending_tasks_are_counted_per_prefix_and_a_new_backlog_is_dated():
    plan = ContextPlan("m")
    plan.add_pending("f-1", "f")
    first = plan.demand_since
    assert first is not None
    plan.add_pending("f-1", "f")  # the same key again counts once
    plan.add_pending("f-2", "f")
    plan.add_pending("g-1", "g")
    assert plan.pending_prefixes == {"f": 2, "g": 1} and len(plan.pending) == 3
    plan.discard_pending("f-1")
    plan.discard_pending("g-1")
    plan.discard_pending("nope")
    assert plan.pending_prefixes == {"f": 1} and list(plan.pending) == ["f-2"]
    plan.discard_pending("f-2")
    assert plan.pending_prefixes == {} and not plan.pending
    # Drained with its set kept (the grace period): more tasks continue the same backlog.
    plan.members = {"w1"}
    plan.add_pending("f-3", "f")
    assert plan.demand_since == first
    # Drained and released: the next task starts a new one.
    plan.discard_pending("f-3")
    plan.members = set()
    plan.add_pending("f-4", "f")
    assert plan.demand_since >= first
