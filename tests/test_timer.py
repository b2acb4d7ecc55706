from __future__ import annotations

import pytest

from loadertune.timer import LoopTimer


def _run(timer, waits, computes, start=0.0, samples=8):
    t = start
    for wait, compute in zip(waits, computes, strict=True):
        timer.record(t, t + wait, samples)
        t += wait + compute
    return t


def test_wait_and_compute_are_split():
    timer = LoopTimer()
    _run(timer, [0.01] * 10, [0.03] * 10)
    w = timer.take()
    assert w.batches == 10 and w.samples == 80
    assert w.wait_s == pytest.approx(0.1)
    # Compute before the first batch is not seen; nine gaps are.
    assert w.compute_s == pytest.approx(0.27) and w.gaps == 9
    assert w.max_wait_s == pytest.approx(0.01)


def test_windows_are_contiguous():
    timer = LoopTimer()
    end = _run(timer, [0.01] * 5, [0.01] * 5)
    timer.take()
    _run(timer, [0.01] * 5, [0.01] * 5, start=end)
    w = timer.take()
    # The gap between the windows (the last compute of the first) counts in the second.
    assert w.compute_s == pytest.approx(0.05)


def test_discard_skips_warmup_batches():
    timer = LoopTimer()
    timer.discard(3)
    _run(timer, [1.0, 1.0, 1.0, 0.01, 0.01], [0.01] * 5)
    w = timer.take()
    assert w.batches == 2
    assert w.wait_s == pytest.approx(0.02)


def test_epoch_start_wait_is_kept_apart_and_gap_is_not_compute():
    timer = LoopTimer()
    end = _run(timer, [0.01] * 3, [0.01] * 3)
    timer.epoch_started()
    # An evaluation pause between epochs, then a slow first batch.
    _run(timer, [0.5, 0.01], [0.01, 0.01], start=end + 10.0)
    w = timer.take()
    assert w.epoch_starts == 1
    assert w.epoch_start_wait_s == pytest.approx(0.5)
    assert w.compute_s < 1.0


def test_rate_noise_is_zero_for_regular_batches_and_positive_otherwise():
    timer = LoopTimer()
    _run(timer, [0.01] * 50, [0.01] * 50)
    assert timer.take().rate_rel_stderr == pytest.approx(0.0, abs=1e-6)
    _run(timer, [0.001, 0.05] * 25, [0.01] * 50, start=100.0)
    assert timer.take().rate_rel_stderr > 0.01


def test_wait_share_so_far():
    timer = LoopTimer()
    assert timer.wait_share == 0.0
    _run(timer, [0.03] * 4, [0.01] * 4)
    # Three compute gaps are seen (0.03 s) against 0.12 s of waiting.
    assert timer.wait_share == pytest.approx(0.12 / 0.15)


def test_cpu_is_summed_over_the_batches_and_gaps_timed():
    timer = LoopTimer()
    for i in range(4):
        timer.record(i * 1.0, i * 1.0 + 0.5, 4, cpu_s=0.1, loop_cpu_s=0.2)
    timer.record(4.0, 4.5, 4)  # not timed
    w = timer.take()
    # The first batch has no gap before it in this window, so its loop CPU is not counted.
    assert w.loop_cpu_s == pytest.approx(0.6) and w.loop_cpu_n == 3
    assert w.loader_cpu_s == pytest.approx(0.4) and w.loader_cpu_n == 4 and w.batches == 5


def test_an_epochs_first_batch_is_not_a_batchs_loading_cpu():
    # The demo's first look (issue 13 follow-up): shuffling a million indices at the epoch's first
    # batch read as 59 ms of loading CPU per batch over 4 batches (2.7 ms each after), which
    # capped the first step at 4-5 workers "by CPU" on a load that only waits.
    timer = LoopTimer()
    timer.epoch_started()
    timer.record(0.0, 0.2, 32, cpu_s=0.22)
    for i in range(1, 4):
        timer.record(i * 0.2, i * 0.2 + 0.13, 32, cpu_s=0.003)
    w = timer.take()
    assert w.loader_cpu_n == 3 and w.loader_cpu_s == pytest.approx(0.009)
    assert w.batches == 4 and w.epoch_starts == 1


def test_regular_loop_reads_no_noise_in_every_window():
    # Issue 13: a fresh 10-batch window (the first, or the first after a warm-up discard) read
    # 8-10% relative error for a perfectly regular loop, later windows 0.
    timer = LoopTimer()
    t = _run(timer, [0.01] * 10, [0.29] * 10)
    first = timer.take()
    t = _run(timer, [0.01] * 10, [0.29] * 10, start=t)
    later = timer.take()
    timer.discard(3)
    _run(timer, [0.01] * 13, [0.29] * 13, start=t)
    fresh = timer.take()
    assert (first.intervals, later.intervals, fresh.intervals) == (9, 10, 9)
    for w in (first, later, fresh):
        assert w.rate_rel_stderr == pytest.approx(0.0, abs=1e-9)


def test_rate_noise_is_unbiased_for_independent_intervals():
    import numpy as np

    rng = np.random.default_rng(13)
    cv, n = 0.15, 10
    timer = LoopTimer()
    t, estimates, means = 0.0, [], []
    for _ in range(4000):
        steps = 0.3 * rng.lognormal(-cv**2 / 2, cv, n)
        t = _run(timer, [0.0] * n, list(steps), start=t)
        w = timer.take()
        estimates.append(w.rate_rel_stderr**2)
        means.append(w.interval_sum_s / w.intervals)
    # The mean squared estimate matches the true variance of the window's mean interval.
    true_rel_var = np.var(means) / np.mean(means) ** 2
    assert np.mean(estimates) == pytest.approx(true_rel_var, rel=0.1)
