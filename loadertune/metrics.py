"""One window's measurements, combined from the loop timer and the sampler's ticks.

``compute_metrics`` is pure: plain data in, a frozen :class:`WindowMetrics` out.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadertune.config import LoaderConfig
from loadertune.sampler import SampleWindow
from loadertune.timer import LoopWindow

__all__ = ["IDLE_UTIL_PCT", "WindowMetrics", "compute_metrics"]

#: Utilization at or below this counts as the GPU standing idle in a tick.
IDLE_UTIL_PCT = 10.0


@dataclass(frozen=True)
class WindowMetrics:
    """The measurements of one window. Every field that needs a source is None without it.

    Attributes:
        duration_s: Loop time covered: waiting plus computing (an epoch's first wait excluded;
            in a window that opened fresh, the gap before its first batch counted at the mean gap).
        batches: Batches consumed.
        samples: Samples consumed.
        samples_per_s: Consumption rate.
        batches_per_s: Consumption rate in batches.
        wait_share: Share of the loop's time blocked in ``next(loader)``, 0-1, in steady state:
            the wait for an epoch's first batch is reported as ``epoch_start_wait_s`` instead.
        wait_s_per_batch: Mean time blocked per batch.
        compute_s_per_batch: Mean time the loop spends per batch outside ``next()``.
        rate_rel_stderr: Relative standard error of the rate: the measurement's own noise.
        loader_cpu_s_per_batch: CPU seconds spent loading one batch (in the training thread at
            ``num_workers=0``, in the workers otherwise).
        loop_cpu_cores: CPUs the training loop itself keeps busy, all of its threads (torch's
            intra-op threads too): the training process less loadertune's own and pin-memory
            threads, and without workers less the loading done in ``next()``; from the training
            thread's clock alone where the host source is missing.
        loader_runqueue_s_per_batch: Seconds the workers waited for a CPU per batch (CPU
            contention, not I/O), where the host source reads it.
        epoch_start_wait_s: Mean wait for an epoch's first batch, when an epoch started.
        gpu_util_mean_pct: Mean GPU utilization.
        gpu_util_std_pct: Spread of GPU utilization between ticks.
        gpu_idle_share: Share of ticks with utilization at or below ``IDLE_UTIL_PCT``.
        gpu_mem_used_bytes: Peak device memory in use.
        gpu_mem_total_bytes: Device memory in all.
        cpu_pct: Mean busy share of the usable CPUs, 0-100.
        usable_cpus: min(affinity, cgroup quota).
        process_cpu_pct: The training process, in percent of one core.
        workers_cpu_pct: All workers together, in percent of one core.
        workers_runqueue_pct: Time the workers waited for a CPU, in percent of one core.
        worker_count: Worker processes seen.
        worker_mem_bytes: Memory per worker (PSS where sampled, else RSS).
        ram_available_bytes: Lowest available RAM seen.
        ram_total_bytes: Physical RAM.
        shm_free_bytes: Lowest free /dev/shm seen.
        shm_total_bytes: Size of /dev/shm.
        ticks: Sampler ticks in the window.
    """

    duration_s: float
    batches: int
    samples: int
    samples_per_s: float
    batches_per_s: float
    wait_share: float
    wait_s_per_batch: float
    compute_s_per_batch: float
    rate_rel_stderr: float
    loader_cpu_s_per_batch: float | None = None
    loader_runqueue_s_per_batch: float | None = None
    loop_cpu_cores: float | None = None
    epoch_start_wait_s: float | None = None
    gpu_util_mean_pct: float | None = None
    gpu_util_std_pct: float | None = None
    gpu_idle_share: float | None = None
    gpu_mem_used_bytes: int | None = None
    gpu_mem_total_bytes: int | None = None
    cpu_pct: float | None = None
    usable_cpus: int | None = None
    process_cpu_pct: float | None = None
    workers_cpu_pct: float | None = None
    workers_runqueue_pct: float | None = None
    worker_count: int | None = None
    worker_mem_bytes: int | None = None
    ram_available_bytes: int | None = None
    ram_total_bytes: int | None = None
    shm_free_bytes: int | None = None
    shm_total_bytes: int | None = None
    ticks: int = 0

    @property
    def gpu_mem_free_share(self) -> float | None:
        """Share of device memory not in use, 0-1."""
        if self.gpu_mem_used_bytes is None or not self.gpu_mem_total_bytes:
            return None
        return max(0.0, 1.0 - self.gpu_mem_used_bytes / self.gpu_mem_total_bytes)

    def to_dict(self) -> dict[str, Any]:
        """The metrics as a JSON-ready dict (floats rounded for reading)."""
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def compute_metrics(loop: LoopWindow, ticks: SampleWindow | None, config: LoaderConfig) -> WindowMetrics:
    """Combines a loop window and the sampler's ticks over the same time into metrics.

    Args:
        loop: What the loop timer counted.
        ticks: The sampler's ticks over the window, or None without a sampler.
        config: The loader configuration in use during the window.
    """
    # An epoch's first batch waits for workers to start: a separate finding (persistent_workers),
    # kept out of the steady-state wait share and rate.
    wait_s = max(0.0, loop.wait_s - loop.epoch_start_wait_s)
    batches = loop.batches
    steady = max(1, batches - loop.epoch_starts)
    compute_s = loop.compute_s
    if 0 < loop.gaps < steady:
        # A window that opens fresh (the first, or the first after a warm-up discard) sees every
        # steady batch's wait but not the gap before its first batch: one step would be missing
        # from the time, reading a 10-batch window ~8% fast. Count that gap at the mean gap.
        compute_s *= steady / loop.gaps
    busy_s = wait_s + compute_s
    rate = samples_rate = 0.0
    if busy_s > 0:
        # An epoch's first batch is timed apart (its wait is epoch_start_wait_s): its samples
        # are left out of the steady rate as well.
        rate = steady / busy_s if batches else 0.0
        samples_rate = loop.samples * (steady / batches) / busy_s if batches else 0.0
    fields: dict[str, Any] = {}
    if ticks is not None and len(ticks):
        fields = _tick_fields(ticks)
    loader_cpu = runqueue = loop_cores = None
    gaps = steady if 0 < loop.gaps < steady else loop.gaps
    process_cores = fields["process_cpu_pct"] / 100.0 if fields.get("process_cpu_pct") is not None else None
    if config.num_workers == 0 and loop.loop_cpu_n and busy_s > 0:
        loop_cores = loop.loop_cpu_s / loop.loop_cpu_n * gaps / busy_s
        if process_cores is not None and loop.loader_cpu_n and batches:
            # The training thread's clock misses torch's intra-op threads: the process's CPU
            # (loadertune's own threads excluded by the host source) less the loading's is the
            # loop's CPU at the process level. The larger of the two: both under-count.
            loading_cores = loop.loader_cpu_s / loop.loader_cpu_n * steady / busy_s
            loop_cores = max(loop_cores, process_cores - loading_cores)
    elif process_cores is not None:
        loop_cores = process_cores
    if batches and config.num_workers > 0 and fields.get("workers_runqueue_pct") is not None and busy_s > 0:
        runqueue = fields["workers_runqueue_pct"] / 100.0 * busy_s / batches
    if batches:
        if config.num_workers == 0:
            loader_cpu = loop.loader_cpu_s / loop.loader_cpu_n if loop.loader_cpu_n else None
        elif fields.get("workers_cpu_pct") is not None and busy_s > 0:
            loader_cpu = fields["workers_cpu_pct"] / 100.0 * busy_s / batches
    return WindowMetrics(
        duration_s=busy_s,
        batches=batches,
        samples=loop.samples,
        samples_per_s=samples_rate,
        batches_per_s=rate,
        wait_share=(wait_s / busy_s) if busy_s > 0 else 0.0,
        wait_s_per_batch=(wait_s / steady) if batches else 0.0,
        # The gap before a window's first batch falls in the previous window: count gaps.
        compute_s_per_batch=(loop.compute_s / loop.gaps) if loop.gaps else 0.0,
        loop_cpu_cores=loop_cores,
        rate_rel_stderr=loop.rate_rel_stderr,
        loader_cpu_s_per_batch=loader_cpu,
        loader_runqueue_s_per_batch=runqueue,
        epoch_start_wait_s=(loop.epoch_start_wait_s / loop.epoch_starts) if loop.epoch_starts else None,
        ticks=len(ticks) if ticks is not None else 0,
        **fields,
    )


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def _tick_fields(ticks: SampleWindow) -> dict[str, Any]:
    util = ticks.values("gpu_util_pct")
    out: dict[str, Any] = {}
    if len(util):
        out["gpu_util_mean_pct"] = float(util.mean())
        out["gpu_util_std_pct"] = float(util.std())
        out["gpu_idle_share"] = float((util <= IDLE_UTIL_PCT).mean())
    for name, reduce in (
        ("gpu_mem_used_bytes", np.max),
        ("gpu_mem_total_bytes", np.max),
        ("ram_available_bytes", np.min),
        ("ram_total_bytes", np.max),
        ("shm_free_bytes", np.min),
        ("shm_total_bytes", np.max),
        ("usable_cpus", np.min),
        ("worker_count", np.max),
    ):
        values = ticks.values(name)
        if len(values):
            out[name] = int(reduce(values))
    for name in ("cpu_pct", "process_cpu_pct", "workers_cpu_pct", "workers_runqueue_pct"):
        value = _mean(ticks.values(name))
        if value is not None:
            out[name] = value
    workers = out.get("worker_count") or 0
    if workers:
        mem = ticks.values("workers_pss_bytes")
        if not len(mem):
            mem = ticks.values("workers_rss_bytes")
        if len(mem):
            out["worker_mem_bytes"] = math.ceil(float(mem[-1]) / workers)
    return out
