from __future__ import annotations

import numpy as np
import pytest

from loadertune.config import LoaderConfig
from loadertune.metrics import compute_metrics
from loadertune.sampler import SAMPLE_FIELDS, SampleWindow
from loadertune.timer import LoopWindow


def _loop(**kw):
    base = dict(
        start_s=0.0, end_s=2.0, batches=100, samples=800, wait_s=0.5, compute_s=1.5,
        interval_sq_sum_s2=100 * 0.02**2, loader_cpu_s=0.2, max_wait_s=0.05,
        epoch_start_wait_s=0.0, epoch_starts=0, loop_cpu_s=0.5, gaps=100, loader_cpu_n=100, loop_cpu_n=100,
    )
    base.update(kw)
    return LoopWindow(**base)


def _ticks(**columns):
    n = len(next(iter(columns.values())))
    cols = {name: np.full(n, np.nan) for name in SAMPLE_FIELDS}
    for name, values in columns.items():
        cols[name] = np.asarray(values, dtype=float)
    return SampleWindow(times_s=np.arange(n, dtype=float), columns=cols)


def test_rates_and_shares_from_the_loop():
    m = compute_metrics(_loop(), None, LoaderConfig(num_workers=0, batch_size=8))
    assert m.samples_per_s == pytest.approx(400.0)
    assert m.batches_per_s == pytest.approx(50.0)
    assert m.wait_share == pytest.approx(0.25)
    assert m.wait_s_per_batch == pytest.approx(0.005)
    assert m.compute_s_per_batch == pytest.approx(0.015)
    # At num_workers=0 the loading CPU is the training thread's.
    assert m.loader_cpu_s_per_batch == pytest.approx(0.002)
    # The loop's thread burned 0.5 s of CPU over 2 s: a quarter of a core.
    assert m.loop_cpu_cores == pytest.approx(0.25)
    assert m.gpu_util_mean_pct is None and m.ticks == 0


def test_gpu_jitter_idle_share_and_memory_from_ticks():
    ticks = _ticks(
        gpu_util_pct=[100, 0, 100, 0, 100, 5],
        gpu_mem_used_bytes=[1, 2, 3, 4, 5, 6],
        gpu_mem_total_bytes=[10] * 6,
        ram_available_bytes=[9, 7, 8, 9, 9, 9],
        workers_cpu_pct=[50, 50, 50, 50, 50, 50],
        worker_count=[2] * 6,
        workers_rss_bytes=[400] * 6,
    )
    m = compute_metrics(_loop(), ticks, LoaderConfig(num_workers=2, batch_size=8))
    assert m.gpu_util_mean_pct == pytest.approx(305 / 6)
    assert m.gpu_util_std_pct > 40
    assert m.gpu_idle_share == pytest.approx(0.5)
    assert m.gpu_mem_used_bytes == 6 and m.gpu_mem_total_bytes == 10
    assert m.gpu_mem_free_share == pytest.approx(0.4)
    assert m.ram_available_bytes == 7
    assert m.worker_mem_bytes == 200
    # Workers' CPU: 0.5 cores for 2 s over 100 batches.
    assert m.loader_cpu_s_per_batch == pytest.approx(0.01)


def test_pss_preferred_over_rss():
    ticks = _ticks(worker_count=[2, 2], workers_rss_bytes=[1000, 1000], workers_pss_bytes=[np.nan, 600])
    m = compute_metrics(_loop(), ticks, LoaderConfig(num_workers=2, batch_size=8))
    assert m.worker_mem_bytes == 300


def test_empty_window_has_zero_rates():
    m = compute_metrics(_loop(batches=0, samples=0, wait_s=0.0, compute_s=0.0), None, LoaderConfig())
    assert m.samples_per_s == 0.0 and m.wait_share == 0.0
    assert m.to_dict()["batches"] == 0


def test_epoch_start_wait_is_averaged_and_kept_out_of_the_steady_figures():
    m = compute_metrics(_loop(wait_s=3.5, epoch_start_wait_s=3.0, epoch_starts=2), None, LoaderConfig())
    assert m.epoch_start_wait_s == pytest.approx(1.5)
    assert m.wait_s_per_batch == pytest.approx(0.5 / 98)
    assert m.wait_share == pytest.approx(0.5 / 2.0)
