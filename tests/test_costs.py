"""JobCosts: what rebuilds and worker start-up cost the job."""

from __future__ import annotations

import pytest

from loadertune.costs import JobCosts


def test_note_stall_keeps_the_largest_and_forgets_slowly():
    c = JobCosts(min_horizon_s=30.0)
    c.note_stall(10.0)
    c.note_stall(0.5)
    assert c.stall_s == pytest.approx(8.1)
    c.note_stall(float("nan"))
    assert c.stall_s == pytest.approx(8.1)


def test_only_new_workers_stall_and_a_revert_is_priced_over_the_horizon():
    from loadertune.config import LoaderConfig

    c = JobCosts(min_horizon_s=30.0)
    two, four = LoaderConfig(num_workers=2, batch_size=32), LoaderConfig(num_workers=4, batch_size=32)
    assert c.expected_stall(two, four) == 0.0, "nothing measured yet"
    c.note_stall(3.0)
    assert c.expected_stall(two, four) == 3.0
    assert c.expected_stall(two, two.replace(prefetch_factor=4)) == 0.0, "no workers start"
    assert c.expected_stall(two, two.replace(persistent_workers=True)) == 0.0
    c.started(100.0)
    assert c.horizon(110.0) == 30.0, "at least the minimum"
    assert c.horizon(160.0) == 60.0, "then the run's age"
    assert c.revert_cost(four, two, 160.0) == pytest.approx(3.0 / 60.0)


def test_startup_share_needs_both_figures():
    c = JobCosts(min_horizon_s=30.0)
    c.note_startup(1.0, None)
    assert c.startup_share() is None
    c.note_startup(None, 3.0)
    assert c.startup_share() == pytest.approx(0.25)
