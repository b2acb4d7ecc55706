"""Controller: apply mode's change, measure, keep-or-revert, hold and re-tune."""

from __future__ import annotations

import pytest
from _factories import GIB, conv_net_with_jpeg_decode_at_zero, latency_bound_at_zero, metrics

from loadertune.config import LoaderConfig
from loadertune.controller import Controller
from loadertune.diagnosis import diagnose
from loadertune.planning import Bounds, plan

BOUNDS = Bounds(usable_cpus=2, max_workers=16, ram_budget_bytes=8 * GIB)


def _controller(cfg=None, **kw):
    return Controller(cfg or LoaderConfig(num_workers=0, batch_size=32), BOUNDS, **kw)


def test_change_then_keep_when_throughput_rises():
    c = _controller()
    m0 = latency_bound_at_zero()
    d = c.decide(m0, diagnose(m0, c.config), now_s=0.0)
    assert d.action == "change" and d.config.num_workers == 8
    m1 = metrics(samples_per_s=1500.0, wait_share=0.02)
    k = c.decide(m1, diagnose(m1, c.config), now_s=3.0)
    assert k.action == "keep" and k.before_samples_per_s == 216.0 and k.after_samples_per_s == 1500.0
    assert c.config.num_workers == 8


def _decide_until_not_measuring(c, m, now_s, limit=60):
    """Feeds the same window until the controller stops measuring; returns (decision, windows)."""
    for i in range(1, limit + 1):
        d = c.decide(m, diagnose(m, c.config), now_s + i)
        if d.action != "measure":
            return d, i
    raise AssertionError("still measuring")


def test_revert_within_noise_sets_a_ceiling_and_converges():
    cfg = LoaderConfig(num_workers=4, batch_size=32)
    c = _controller(cfg)
    m0 = metrics(wait_share=0.3, wait_s_per_batch=0.006, compute_s_per_batch=0.014, batches_per_s=50, samples_per_s=1600, loader_cpu_s_per_batch=0.001)
    # A gain of at most ~43%: the current configuration is measured to ±1% before trying.
    d, windows = _decide_until_not_measuring(c, m0, 0.0)
    assert d.action == "change" and d.config.num_workers > 4 and windows > 1
    tried = d.config.num_workers
    m1 = metrics(samples_per_s=1630.0, wait_share=0.28)
    # +1.9% for more workers: inside the 3% band, so the cheaper configuration wins.
    r, _ = _decide_until_not_measuring(c, m1, 200.0)
    assert r.action == "revert" and r.config == cfg
    assert c.ceiling_workers == tried and c.converged
    # Converged: holds even though waiting persists.
    h = c.decide(m1, diagnose(m1, c.config), now_s=400.0)
    assert h.action == "hold"


def test_a_noisy_window_does_not_decide_but_repeated_ones_do():
    c = _controller(LoaderConfig(num_workers=4, batch_size=32))
    m0 = metrics(wait_share=0.3, wait_s_per_batch=0.006, compute_s_per_batch=0.014, batches_per_s=50, rate_rel_stderr=0.08)
    d, _ = _decide_until_not_measuring(c, m0, 0.0)
    assert d.action == "change"
    m1 = metrics(samples_per_s=1600 * 1.12, rate_rel_stderr=0.08)
    # +12% measured with 8% noise in one window: another window is needed.
    assert c.decide(m1, diagnose(m1, c.config), now_s=100.0).action == "measure"
    k, _ = _decide_until_not_measuring(c, m1, 110.0)
    assert k.action == "keep" and k.after_samples_per_s == pytest.approx(1792.0)


def test_measured_spread_between_windows_replaces_the_prior():
    c = _controller(LoaderConfig(num_workers=4, batch_size=32))
    assert c.window_noise == pytest.approx(0.02)
    steady = metrics()
    for i in range(6):
        c.decide(steady, diagnose(steady, c.config), float(i))
    c.note_external_change(LoaderConfig(num_workers=3, batch_size=32))
    # Six identical windows: no spread beyond their own noise, so the estimate shrinks.
    assert c.window_noise < 0.02


def test_drift_reopens_tuning_after_two_slow_windows():
    c = _controller(LoaderConfig(num_workers=4, batch_size=32))
    m = metrics()
    assert c.decide(m, diagnose(m, c.config), 0.0).action == "hold"
    assert c.converged
    slow = metrics(samples_per_s=600.0, wait_share=0.6, wait_s_per_batch=0.03, compute_s_per_batch=0.02, batches_per_s=20)
    assert c.decide(slow, diagnose(slow, c.config), 5.0).action == "hold"
    assert c.decide(slow, diagnose(slow, c.config), 7.0).action == "retune"
    assert c.decide(slow, diagnose(slow, c.config), 9.0).action == "change"


def test_a_single_slow_window_is_not_drift():
    c = _controller(LoaderConfig(num_workers=4, batch_size=32))
    m = metrics()
    c.decide(m, diagnose(m, c.config), 0.0)
    slow = metrics(samples_per_s=600.0)
    c.decide(slow, diagnose(slow, c.config), 5.0)
    assert c.decide(m, diagnose(m, c.config), 7.0).action == "hold"
    assert c.decide(slow, diagnose(slow, c.config), 9.0).action == "hold"


def test_cooldown_holds_between_changes():
    c = _controller(cooldown_s=10.0)
    m0 = latency_bound_at_zero()
    c.decide(m0, diagnose(m0, c.config), now_s=0.0)
    m1 = latency_bound_at_zero(samples_per_s=800.0)
    # Kept (a large gain) but still starved: the next change waits for the cooldown.
    c.decide(m1, diagnose(m1, c.config), now_s=2.0)
    assert c.decide(m1, diagnose(m1, c.config), now_s=4.0).action == "hold"
    assert c.decide(m1, diagnose(m1, c.config), now_s=12.0).action in ("change", "hold")


def test_batch_growth_revert_restores_lr_and_caps_batch():
    cfg = LoaderConfig(num_workers=4, batch_size=32)
    c = _controller(cfg, allow_batch_size=True, lr_exponent=1.0)
    m = metrics(gpu_util_mean_pct=40, gpu_util_std_pct=4, gpu_mem_used_bytes=10 * GIB)
    d, _ = _decide_until_not_measuring(c, m, 0.0)
    assert d.action == "change" and d.config.batch_size == 128 and d.lr_factor == 4.0
    r, _ = _decide_until_not_measuring(c, metrics(samples_per_s=1610.0), 100.0)
    assert r.action == "revert" and r.config.batch_size == 32 and r.lr_factor == 0.25
    assert c.batch_ceiling == 32


def test_over_provisioned_cpu_heavy_start_is_moved_down():
    # Issue 13: --workers 4 on 2 CPUs, CPU-heavy loading, the job fills the CPUs, loop waits little.
    cfg = LoaderConfig(num_workers=4, batch_size=32)
    m = metrics(
        wait_share=0.02, wait_s_per_batch=0.006, compute_s_per_batch=0.3, batches_per_s=3.3,
        samples_per_s=106, cpu_pct=99.0, usable_cpus=2, process_cpu_pct=110.0, workers_cpu_pct=85.0,
        loader_cpu_s_per_batch=0.26, workers_runqueue_pct=60.0, loader_runqueue_s_per_batch=0.18,
        loop_cpu_cores=1.1,
    )
    d = diagnose(m, cfg)
    assert d.kind == "balanced" and any("use at most 1" in a for a in d.advice)
    rec = plan(m, d, cfg, BOUNDS)
    assert rec.config.num_workers == 1 and "fight the training step" in rec.reason
    c = _controller(cfg)
    first = c.decide(m, d, 0.0)
    assert first.action in ("measure", "change")


def test_memory_growing_after_convergence_still_steps_down():
    c = _controller(LoaderConfig(num_workers=6, batch_size=32))
    small = metrics(worker_mem_bytes=GIB)  # caches still filling: 6 GiB within the 8 GiB budget
    assert c.decide(small, diagnose(small, c.config), 0.0).action == "hold" and c.converged
    grown = metrics(worker_mem_bytes=2 * GIB)  # now 12 GiB: over the budget
    d = c.decide(grown, diagnose(grown, c.config), 5.0)
    assert d.action == "change" and d.config.num_workers == 4


def _advice(c, wait_s):
    m = latency_bound_at_zero(wait_s_per_batch=wait_s)
    return c.recommend(m, diagnose(m, c.config), allow_batch_size=False)


def test_recommend_returns_the_same_advice_while_estimates_wobble():
    c = _controller()
    first = _advice(c, 0.128)
    assert first.config.num_workers == 8
    # Issue 13: 8 -> 16 -> 11 -> 16 -> 10 from one window to the next is noise, not new advice.
    for wait in (0.3, 0.18, 0.3, 0.16, 0.12, 0.13):
        assert _advice(c, wait) is first
    # A different advice that two windows in a row agree on is a real change.
    assert _advice(c, 0.05) is first
    changed = _advice(c, 0.052)
    assert changed is not first and changed.config.num_workers == 4
    assert _advice(c, 0.05) is changed


def test_recommend_at_the_cap_says_at_least_once():
    c = _controller()
    capped = _advice(c, 0.3)
    assert capped.at_least and capped.config.num_workers == 16
    assert "num_workers=0->≥16" in capped.describe()
    # Estimates anywhere above the cap are the same "≥ 16".
    for wait in (0.5, 0.3, 1.0, 0.4):
        assert _advice(c, wait) is capped


def test_recommend_starts_over_after_an_external_change():
    c = _controller()
    a = _advice(c, 0.128)
    c.note_external_change(LoaderConfig(num_workers=2, batch_size=32))
    m = latency_bound_at_zero(wait_share=0.5, batches_per_s=20)
    b = c.recommend(m, diagnose(m, c.config), allow_batch_size=False)
    assert b is not a


def test_forced_step_down_needs_no_trial():
    c = _controller(LoaderConfig(num_workers=6, batch_size=32))
    m = metrics(worker_mem_bytes=2 * GIB)
    d = c.decide(m, diagnose(m, c.config), 0.0)
    assert d.action == "change" and d.config.num_workers == 4 and d.recommendation.forced
    # The next window is an ordinary one: no keep/revert of a change a limit demanded.
    assert c.decide(metrics(samples_per_s=800.0), diagnose(metrics(), c.config), 5.0).action == "hold"


# -- issue 13: what the job pays end to end -------------------------------------------------------
def test_a_measured_rebuild_stall_holds_a_change_that_cannot_pay_it_back():
    cfg = LoaderConfig(num_workers=4, batch_size=32)
    c = _controller(cfg)
    c.costs.note_stall(12.0)  # spawn: workers take 12 s to start again
    m0 = metrics(wait_share=0.2, wait_s_per_batch=0.004, compute_s_per_batch=0.016, batches_per_s=50, samples_per_s=1600, loader_cpu_s_per_batch=0.001)
    d, _ = _decide_until_not_measuring(c, m0, 0.0)
    # At most +25% over the 30 s horizon (7.5 s) cannot pay a 12 s stall there and back.
    assert d.action == "hold" and "stalls the loop" in d.reason and c.config == cfg


def test_without_a_measured_stall_the_same_change_is_tried():
    c = _controller(LoaderConfig(num_workers=4, batch_size=32))
    m0 = metrics(wait_share=0.2, wait_s_per_batch=0.004, compute_s_per_batch=0.016, batches_per_s=50, samples_per_s=1600, loader_cpu_s_per_batch=0.001)
    d, _ = _decide_until_not_measuring(c, m0, 0.0)
    assert d.action == "change"


def test_a_costly_revert_keeps_a_change_that_is_not_slower():
    cfg = LoaderConfig(num_workers=4, batch_size=32)
    m0 = metrics(wait_share=0.3, wait_s_per_batch=0.006, compute_s_per_batch=0.014, batches_per_s=50, samples_per_s=1600, loader_cpu_s_per_batch=0.001)
    m1 = metrics(samples_per_s=1630.0, wait_share=0.28)  # +1.9%: inside the 3% band
    cheap = _controller(cfg)
    d, _ = _decide_until_not_measuring(cheap, m0, 0.0)
    assert d.action == "change"
    assert _decide_until_not_measuring(cheap, m1, 200.0)[0].action == "revert"
    costly = _controller(cfg)
    d, _ = _decide_until_not_measuring(costly, m0, 0.0)
    assert d.action == "change"
    costly.costs.note_stall(10.0)  # the rebuild just measured: going back costs as much again
    k, _ = _decide_until_not_measuring(costly, m1, 200.0)
    assert k.action == "keep" and costly.config.num_workers > 4


def test_worker_start_up_at_every_epoch_switches_to_persistent_workers():
    cfg = LoaderConfig(num_workers=4, batch_size=32)
    c = _controller(cfg)
    c.costs.note_startup(6.0, 20.0)  # 6 s of start-up per 20 s epoch
    m = metrics()
    d = c.decide(m, diagnose(m, c.config), now_s=1.0)
    assert d.action == "change" and d.config == cfg.replace(persistent_workers=True)
    assert d.recommendation.forced and c.config.persistent_workers
    # Once persistent, nothing more to do for start-up.
    assert c.decide(m, diagnose(m, c.config), now_s=10.0).action != "change" or c.config.persistent_workers


def test_start_up_and_a_worker_step_go_in_one_change():
    # Spawn-started workers (issue 13): a window more for the step costs seconds of a slow start,
    # so persistence and the step go together; the step is judged against the persistent start.
    cfg = LoaderConfig(num_workers=2, batch_size=16)
    c = _controller(cfg)
    c.costs.note_startup(1.9, 6.0)
    m0 = metrics(wait_share=0.6, wait_s_per_batch=0.03, compute_s_per_batch=0.02, batches_per_s=20, samples_per_s=320)
    d = c.decide(m0, diagnose(m0, cfg), now_s=5.0)
    assert d.action == "change" and d.config.persistent_workers and d.config.num_workers > 2
    assert "persistent_workers=True starts them once; " in d.reason and "workers keep up" in d.reason
    r, _ = _decide_until_not_measuring(c, metrics(samples_per_s=200.0), 10.0)
    assert r.action == "revert" and r.config == cfg.replace(persistent_workers=True)


def test_small_start_up_or_no_permission_keeps_workers_as_they_are():
    cfg = LoaderConfig(num_workers=4, batch_size=32)
    c = _controller(cfg)
    c.costs.note_startup(0.1, 600.0)  # fork start-up on long epochs: nothing to win
    m = metrics()
    assert c.decide(m, diagnose(m, cfg), now_s=1.0).action == "hold"
    lightning = _controller(cfg, allow_persistent=False)
    lightning.costs.note_startup(6.0, 20.0)
    assert lightning.decide(m, diagnose(m, cfg), now_s=1.0).action == "hold"


def test_persistence_during_a_trial_carries_to_the_configuration_a_revert_returns_to():
    cfg = LoaderConfig(num_workers=4, batch_size=32)
    c = _controller(cfg)
    m0 = metrics(wait_share=0.6, wait_s_per_batch=0.03, compute_s_per_batch=0.02, batches_per_s=20, samples_per_s=640)
    d = c.decide(m0, diagnose(m0, cfg), now_s=0.0)
    assert d.action == "change" and d.config.num_workers > 4
    c.costs.note_startup(5.0, 10.0)
    p = c.decide(metrics(), diagnose(metrics(), c.config), now_s=5.0)
    assert p.action == "change" and p.config.persistent_workers and p.config.num_workers == d.config.num_workers
    slower = metrics(samples_per_s=300.0)
    r, _ = _decide_until_not_measuring(c, slower, 10.0)
    assert r.action == "revert" and r.config == cfg.replace(persistent_workers=True)


def test_jpeg_conv_net_trial_goes_to_the_usable_cpus_not_one_worker():
    c = Controller(LoaderConfig(num_workers=0, batch_size=32), BOUNDS)
    m = conv_net_with_jpeg_decode_at_zero()
    d = None
    for i in range(30):
        d = c.decide(m, diagnose(m, c.config), now_s=2.0 * (i + 1))
        if d.action == "change":
            break
    assert d.action == "change" and d.config.num_workers == 2


def test_short_epochs_switch_to_persistent_workers_on_a_short_start_up():
    # Short epochs (issue 13): a 0.1 s fork start-up on 0.25 s epochs is 29% of the job.
    cfg = LoaderConfig(num_workers=9, batch_size=16)
    c = _controller(cfg)
    c.costs.note_startup(0.1, 0.25)
    m = metrics()
    d = c.decide(m, diagnose(m, cfg), now_s=1.0)
    assert d.action == "change" and d.config.persistent_workers and d.config.num_workers == 9
    # A wait's noise (10 ms) on short epochs is not start-up.
    quiet = _controller(cfg)
    quiet.costs.note_startup(0.01, 0.25)
    assert quiet.decide(m, diagnose(m, cfg), now_s=1.0).action != "change" or not quiet.config.persistent_workers


def test_a_larger_batch_at_low_utilization_is_tried_at_once_not_after_windows_of_measuring():
    # GPU steadily 14% busy with memory free, no waiting: the batch-size step's gain (about 2.8x
    # at 4x the batch under the overhead model) shows through any noise, like a long wait does.
    c = Controller(LoaderConfig(batch_size=16), Bounds(usable_cpus=2, max_workers=8), allow_batch_size=True)
    m = metrics(
        wait_share=0.0, wait_s_per_batch=0.0, gpu_util_mean_pct=14.0, gpu_util_std_pct=1.0,
        gpu_mem_used_bytes=2 * GIB, gpu_mem_total_bytes=80 * GIB, rate_rel_stderr=0.05,
    )
    d = c.decide(m, diagnose(m, c.config), now_s=2.0)
    assert d.action == "change" and d.config.batch_size > 16, d
    # A rebuild stall measured earlier does not veto it: the gain, not the wait, pays for it.
    c2 = Controller(LoaderConfig(batch_size=16), Bounds(usable_cpus=2, max_workers=8), allow_batch_size=True)
    c2.costs.note_stall(0.5)
    d2 = c2.decide(m, diagnose(m, c2.config), now_s=2.0)
    assert d2.action == "change" and d2.config.batch_size > 16, d2


def test_slowly_starting_workers_double_per_change():
    c = _controller(LoaderConfig(num_workers=1, batch_size=32))
    c.slow_start = True
    m0 = latency_bound_at_zero()
    d = c.decide(m0, diagnose(m0, c.config), now_s=0.0)
    assert d.action == "change" and d.config.num_workers == 2
    # The step was kept and the loop still waits: the next change doubles again.
    m1 = latency_bound_at_zero(samples_per_s=432.0, batches_per_s=13.5, wait_share=0.6)
    k = c.decide(m1, diagnose(m1, c.config), now_s=3.0)
    assert k.action == "keep"
    d = c.decide(m1, diagnose(m1, c.config), now_s=6.0)
    assert d.action == "change" and d.config.num_workers == 4


def test_a_start_up_under_a_second_is_said_in_milliseconds():
    from loadertune.controller import _duration

    assert _duration(0.04) == "40 ms"  # was "~0.0 s to start" in the reason for persistence
    assert _duration(0.949) == "949 ms"
    assert _duration(1.36) == "1.4 s"


def test_one_borderline_starved_window_does_not_settle_the_run():
    # A JPEG job beside another process: its first window waited 9% (no change worth a rebuild),
    # the next ones 11-15%. Converging on the first kept it at 0 workers for the whole run, silent.
    c = _controller()
    m = latency_bound_at_zero(
        wait_share=0.09, wait_s_per_batch=0.0198, compute_s_per_batch=0.2, batches_per_s=4.5, samples_per_s=144.0
    )
    d = c.decide(m, diagnose(m, c.config), now_s=0.0)
    assert d.action == "hold" and d.telling and not c.converged
    assert "waits 9%" in d.reason
    m2 = latency_bound_at_zero(
        wait_share=0.3, wait_s_per_batch=0.086, compute_s_per_batch=0.2, batches_per_s=3.5, samples_per_s=112.0
    )
    assert c.decide(m2, diagnose(m2, c.config), now_s=3.0).action in ("measure", "change")
