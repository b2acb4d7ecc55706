"""plan(): the configuration one window's measurements call for."""

from __future__ import annotations

import pytest
from _factories import GIB, conv_net_with_jpeg_decode_at_zero, latency_bound_at_zero, metrics

from loadertune.config import LoaderConfig
from loadertune.diagnosis import diagnose
from loadertune.planning import Bounds, default_max_workers, estimate_workers, plan

BOUNDS = Bounds(usable_cpus=2, max_workers=16, ram_budget_bytes=8 * GIB)


def test_latency_bound_at_zero_workers_aims_at_the_rate_that_keeps_up():
    cfg = LoaderConfig(num_workers=0, batch_size=32)
    m = latency_bound_at_zero()
    est = estimate_workers(m, cfg, BOUNDS)
    # 128 ms per batch per worker against 50 batches/s: ~6.4 workers, aimed a bit above.
    assert est.needed == 8 and est.limited_by == "rates"
    assert est.cpu_cap > 16
    rec = plan(m, diagnose(m, cfg), cfg, BOUNDS)
    assert rec.config.num_workers >= 3
    assert rec.changes["num_workers"] == (0, 8)
    assert rec.expected_speedup > 3
    assert rec.lr_factor is None


def test_cpu_bound_load_is_capped_by_the_cores():
    cfg = LoaderConfig(num_workers=0, batch_size=32)
    # Loading burns all of its time on the CPU.
    m = latency_bound_at_zero(loader_cpu_s_per_batch=0.125, process_cpu_pct=95.0)
    est = estimate_workers(m, cfg, BOUNDS)
    assert est.limited_by == "cpu" and est.target == 2


def test_oversubscribed_cpu_bound_load_steps_down_to_the_cores():
    cfg = LoaderConfig(num_workers=6, batch_size=32)
    m = metrics(
        wait_share=0.5, wait_s_per_batch=0.02, compute_s_per_batch=0.02, batches_per_s=25,
        cpu_pct=99.0, usable_cpus=2, process_cpu_pct=10.0, loader_cpu_s_per_batch=0.08,
    )
    d = diagnose(m, cfg)
    assert d.kind == "cpu_bound"
    rec = plan(m, d, cfg, BOUNDS)
    assert rec is not None and rec.config.num_workers == 2


def test_cpu_bound_within_the_cores_recommends_no_more_workers():
    cfg = LoaderConfig(num_workers=2, batch_size=32)
    m = metrics(
        wait_share=0.5, wait_s_per_batch=0.02, compute_s_per_batch=0.02, batches_per_s=25,
        cpu_pct=99.0, usable_cpus=2, process_cpu_pct=10.0, loader_cpu_s_per_batch=0.08,
    )
    assert plan(m, diagnose(m, cfg), cfg, BOUNDS) is None


def test_ram_budget_bounds_workers():
    cfg = LoaderConfig(num_workers=2, batch_size=32)
    m = latency_bound_at_zero(wait_s_per_batch=0.05, batches_per_s=10, worker_mem_bytes=3 * GIB)
    est = estimate_workers(m, cfg, BOUNDS)
    assert est.ram_cap == 2 and est.target == 2 and est.limited_by == "ram"


def test_shm_bounds_workers():
    cfg = LoaderConfig(num_workers=0, batch_size=32)
    bounds = Bounds(usable_cpus=2, max_workers=16, batch_bytes=256 * 2**20)
    m = latency_bound_at_zero(shm_free_bytes=2 * GIB)
    est = estimate_workers(m, cfg, bounds)
    # 90% of (2 GiB free + the loop's one 256 MiB batch) holds 8 batches, one the loop's: 7
    # workers at prefetch_factor 1 (the pipeline fits the prefetch to the room; issue 14).
    assert est.shm_cap == 7 and est.target == 7 and est.limited_by == "shm"


def test_batch_headroom_aims_at_high_utilization_within_memory_with_lr_factor():
    cfg = LoaderConfig(num_workers=4, batch_size=32)
    # 40% busy: ~8.5x the batch would reach 85%; one step grows it at most 4x.
    m = metrics(gpu_util_mean_pct=40, gpu_util_std_pct=4, gpu_mem_used_bytes=10 * GIB)
    d = diagnose(m, cfg)
    rec = plan(m, d, cfg, BOUNDS, lr_exponent=0.5)
    assert rec.config.batch_size == 128
    assert rec.lr_factor == pytest.approx(2.0)
    # 70% busy needs less; memory (35 of 80 GiB in use) allows less still.
    m2 = metrics(gpu_util_mean_pct=45, gpu_util_std_pct=4, gpu_mem_used_bytes=35 * GIB)
    assert plan(m2, diagnose(m2, cfg), cfg, BOUNDS).config.batch_size == 56
    assert plan(m, d, cfg, BOUNDS, allow_batch_size=False) is None
    capped = plan(m, d, cfg, Bounds(usable_cpus=2, max_workers=16, max_batch_size=48))
    assert capped.config.batch_size == 48


def test_balanced_needs_nothing():
    cfg = LoaderConfig(num_workers=4, batch_size=32)
    assert plan(metrics(), diagnose(metrics(), cfg), cfg, BOUNDS) is None


def test_default_max_workers_goes_beyond_the_cores():
    assert default_max_workers(1) == 8 and default_max_workers(2) == 16 and default_max_workers(64) == 64


def test_small_waits_are_not_worth_a_rebuild():
    cfg = LoaderConfig(num_workers=8, batch_size=32)
    # 6% waiting: removing it all gains ~6%, below the 10% a change must promise.
    m = metrics(wait_share=0.06, wait_s_per_batch=0.0013, compute_s_per_batch=0.02, batches_per_s=47, samples_per_s=1500)
    assert diagnose(m, cfg).kind == "data_starved"
    assert plan(m, diagnose(m, cfg), cfg, BOUNDS) is None
    assert plan(m, diagnose(m, cfg), cfg, BOUNDS, min_gain=0.05) is not None


def test_step_past_the_estimate_respects_the_resource_caps():
    cfg = LoaderConfig(num_workers=4, batch_size=32)
    # Starved at the RAM cap (4 x 2 GiB within an 8 GiB budget): no step past it.
    m = metrics(wait_share=0.3, wait_s_per_batch=0.008, compute_s_per_batch=0.02, batches_per_s=36, worker_mem_bytes=2 * GIB)
    assert plan(m, diagnose(m, cfg), cfg, BOUNDS) is None


def test_over_the_ram_budget_steps_down_whatever_the_diagnosis():
    cfg = LoaderConfig(num_workers=6, batch_size=32)
    m = metrics(worker_mem_bytes=2 * GIB)
    rec = plan(m, diagnose(m, cfg), cfg, BOUNDS)
    assert rec.config.num_workers == 4 and "RAM budget" in rec.reason


def test_known_load_time_tempers_the_estimate_when_workers_idle():
    cfg = LoaderConfig(num_workers=8, batch_size=32)
    m = metrics(wait_share=0.1, wait_s_per_batch=0.002, compute_s_per_batch=0.02, batches_per_s=45)
    loose = estimate_workers(m, cfg, BOUNDS)
    tight = estimate_workers(m, cfg, BOUNDS, known_load_s=0.128)
    assert tight.load_s_per_batch == pytest.approx(0.128)
    assert tight.load_s_per_batch < loose.load_s_per_batch
    assert tight.needed < loose.needed


def test_busy_machine_with_spare_share_for_the_job_adds_workers_and_says_so():
    cfg = LoaderConfig(num_workers=1, batch_size=32)
    # 95% busy in all, but this job keeps ~1 of the 2 CPUs busy: others hold the rest.
    m = metrics(
        wait_share=0.5, wait_s_per_batch=0.02, compute_s_per_batch=0.02, batches_per_s=25,
        cpu_pct=95.0, usable_cpus=2, process_cpu_pct=5.0, loader_cpu_s_per_batch=0.04,
    )
    d = diagnose(m, cfg)
    assert d.kind == "data_starved" and "other processes" in d.summary
    assert plan(m, d, cfg, BOUNDS).config.num_workers >= 2


def test_cpu_bound_never_recommends_more_workers():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(
        w=st.integers(0, 12),
        wait=st.floats(0.0, 0.95),
        cpu=st.floats(0.0, 100.0),
        proc=st.floats(0.0, 200.0),
        loader=st.floats(0.0, 0.2),
        workers_cpu=st.one_of(st.none(), st.floats(0.0, 400.0)),
    )
    def check(w, wait, cpu, proc, loader, workers_cpu):
        cfg = LoaderConfig(num_workers=w, batch_size=32)
        m = metrics(
            wait_share=wait, wait_s_per_batch=0.05 * wait, compute_s_per_batch=0.02, batches_per_s=25,
            samples_per_s=800, cpu_pct=cpu, usable_cpus=2, process_cpu_pct=proc,
            loader_cpu_s_per_batch=loader, workers_cpu_pct=workers_cpu,
        )
        d = diagnose(m, cfg)
        rec = plan(m, d, cfg, BOUNDS)
        # The sentence and the advice never contradict (issue 13).
        if "will not help" in d.summary and rec is not None:
            assert rec.config.num_workers <= w

    check()


def test_cpu_heavy_loading_beside_a_cpu_busy_loop_aims_at_the_usable_cpus():
    cfg = LoaderConfig(num_workers=0, batch_size=32)
    m = conv_net_with_jpeg_decode_at_zero()
    # Rates alone: 0.2 s of loading against 3.7 batches/s of compute -> one worker.
    assert estimate_workers(m, cfg, BOUNDS).needed == 2
    rec = plan(m, diagnose(m, cfg), cfg, BOUNDS)
    assert rec is not None and rec.config.num_workers == 2
    # The same loading beside a loop that sleeps (no CPU of its own) keeps the rate estimate.
    idle = conv_net_with_jpeg_decode_at_zero(loop_cpu_cores=0.05, process_cpu_pct=45.0)
    assert estimate_workers(idle, cfg, BOUNDS).needed == 1
    # I/O-bound loading (a worker mostly waits) is not a CPU share question either.
    io = conv_net_with_jpeg_decode_at_zero(loader_cpu_s_per_batch=0.01)
    assert estimate_workers(io, cfg, BOUNDS).needed == 1
    # More CPUs than the contention calls for: the aim stops at the rates x (1 + loop cores).
    wide = Bounds(usable_cpus=16, max_workers=64, ram_budget_bytes=8 * GIB)
    assert estimate_workers(m, cfg, wide).needed == 3


def test_slowly_starting_workers_grow_at_most_to_the_step_limit():
    # 8 workers would keep up; workers that start slowly (spawn) go to the step's limit first.
    cfg = LoaderConfig(num_workers=0, batch_size=32)
    m = latency_bound_at_zero()
    rec = plan(m, diagnose(m, cfg), cfg, BOUNDS, max_step_workers=2)
    assert rec.changes["num_workers"] == (0, 2)
    assert "about 8 workers keep up; 2 first" in rec.reason
    # A limit at or above the aim changes nothing.
    assert plan(m, diagnose(m, cfg), cfg, BOUNDS, max_step_workers=8).changes["num_workers"] == (0, 8)


def test_cpu_heavy_loading_beside_another_process_aims_past_the_cores():
    # 2 CPUs saturated, this job keeps ~1 busy: another process holds the other. CPU-heavy
    # workers then win a share of it, so the aim goes one worker past the cores.
    cfg = LoaderConfig(num_workers=0, batch_size=16)
    busy = dict(
        wait_share=0.85, wait_s_per_batch=0.024, compute_s_per_batch=0.0042, batches_per_s=35, samples_per_s=560,
        usable_cpus=2, process_cpu_pct=100.0, loader_cpu_s_per_batch=0.024,
    )
    m = metrics(cpu_pct=100.0, **busy)
    d = diagnose(m, cfg)
    assert d.kind == "data_starved" and "other processes" in d.summary
    assert estimate_workers(m, cfg, BOUNDS).cpu_cap == 3
    assert plan(m, d, cfg, BOUNDS).config.num_workers == 3
    # The same load on a machine nobody else uses stops at the cores.
    quiet = metrics(cpu_pct=50.0, **busy)
    assert plan(quiet, diagnose(quiet, cfg), cfg, BOUNDS).config.num_workers == 2
