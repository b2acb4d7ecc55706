"""DriftWatch: two windows in a row away from the converged pace re-open tuning."""

from __future__ import annotations

from _factories import metrics

from loadertune.drift import DriftWatch


def test_two_slow_windows_in_a_row_drift_one_does_not():
    watch = DriftWatch(0.25)
    watch.anchor(1000.0, 0.01)
    slow, steady = metrics(samples_per_s=700.0), metrics(samples_per_s=990.0)
    assert not watch.drifted(slow), "one slow window (a checkpoint, a GC pause)"
    assert not watch.drifted(steady)
    assert not watch.drifted(slow)
    assert watch.drifted(slow)


def test_waiting_more_drifts_only_into_the_input_bound_range():
    watch = DriftWatch(0.25)
    watch.anchor(1000.0, 0.01)
    waiting = metrics(samples_per_s=1000.0, wait_share=0.4)
    assert not watch.drifted(waiting) and watch.drifted(waiting)
    mild = DriftWatch(0.1)
    mild.anchor(1000.0, 0.0)
    a_bit = metrics(samples_per_s=1000.0, wait_share=0.15)  # +15 points, but below 20% waiting
    assert not mild.drifted(a_bit) and not mild.drifted(a_bit)


def test_without_a_reference_the_next_window_sets_it():
    watch = DriftWatch(0.25)
    assert not watch.drifted(metrics(samples_per_s=500.0))
    assert watch.rate == 500.0
    watch.forget()
    assert watch.rate is None
