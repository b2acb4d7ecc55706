"""End-to-end: real loaders, real worker processes, a simulated GPU, the real host source.

Each scenario trains until the first diagnosis and checks what a person would conclude.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch.utils.data import DataLoader, Dataset

import loadertune
from loadertune.sim import SimulatedGpu
from loadertune.sources.host import HostSource, usable_cpus

MIB = 2**20


class Latency(Dataset):
    """Each sample waits on 'I/O' (a sleep): no CPU, just latency."""

    def __init__(self, n: int, latency_s: float) -> None:
        self.n, self.latency_s = n, latency_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(self.latency_s)
        return torch.full((4,), float(i))


class Instant(Latency):
    """No wait at all: not even ``sleep(0)``, which yields the CPU and, on a busy machine, can
    cost a scheduler slice per sample."""

    def __init__(self, n: int) -> None:
        super().__init__(n, 0.0)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((4,), float(i))


class Burn(Latency):
    """Each sample burns CPU for ``latency_s`` (a decode-like transform)."""

    def __getitem__(self, i: int) -> torch.Tensor:
        end = time.thread_time() + self.latency_s
        x = 0
        while time.thread_time() < end:
            x += 1
        return torch.full((4,), float(i))


def train_until_diagnosed(tuned, gpu, max_batches=5000):
    """Trains until the first diagnosis. Every step sleeps, so a window's seconds pass within a
    bounded number of batches however fast the machine: the bound is in batches, not seconds."""
    seen = 0
    while tuned.diagnosis is None:
        for batch in tuned:
            gpu.step(len(batch))
            seen += 1
            if tuned.diagnosis is not None:
                break
            assert seen < max_batches, "no diagnosis"
    return tuned.diagnosis, tuned.recommendation


def test_latency_bound_at_zero_workers_is_data_starved_and_wants_three_or_more():
    gpu = SimulatedGpu(step_time_s=0.02)
    loader = DataLoader(Latency(5000, 0.003), batch_size=16)
    with loadertune.tune(loader, gpu=gpu, window_s=1.0) as t:
        d, rec = train_until_diagnosed(t, gpu)
        assert d.kind == "data_starved", d.summary
        assert d.evidence["wait_share"] >= 0.2
        assert d.evidence["gpu_util_mean_pct"] < 50
        assert rec is not None and rec.config.num_workers >= 3
        assert t.config.num_workers == 0  # recommend mode changes nothing


def test_compute_bound_is_balanced_and_wants_no_workers():
    # Loading in the loop's own thread takes ~0.1 ms of CPU per batch against a 50 ms step: the
    # wait share stays far under the 5% cut even on a loaded machine. (With workers, their
    # start-up and scheduling under load could cost a window 5% of waiting: a flake.)
    gpu = SimulatedGpu(step_time_s=0.05)
    loader = DataLoader(Instant(5000), batch_size=16, num_workers=0)
    with loadertune.tune(loader, gpu=gpu, window_s=1.0) as t:
        d, rec = train_until_diagnosed(t, gpu)
        assert d.kind == "balanced", d.summary
        assert d.evidence["wait_share"] < 0.05
        assert rec is None or rec.config.num_workers == 0


def test_steady_forty_percent_with_free_memory_is_batch_headroom():
    # 16 x 0.5 ms on the GPU, 12 ms of host overhead per step: 40% busy, steadily.
    gpu = SimulatedGpu(
        step_time_s=lambda b: 0.0005 * b,
        host_overhead_s=0.012,
        memory_bytes=lambda b: b * 8 * MIB,
        total_memory_bytes=1024 * MIB,
    )
    loader = DataLoader(Instant(5000), batch_size=16, num_workers=0)
    with loadertune.tune(loader, gpu=gpu, window_s=1.0) as t:
        d, rec = train_until_diagnosed(t, gpu)
        assert d.kind == "batch_headroom", d.summary
        assert d.evidence["gpu_util_mean_pct"] < 50
        assert rec is not None and rec.config.batch_size > 16 and rec.lr_factor is not None


class OwnMachine(HostSource):
    """The real host source, except that this job has the CPUs to itself.

    On a shared machine other processes take CPU too, and the diagnosis rightly calls that
    contention rather than CPU-bound loading; which one a run sees would depend on who else is
    busy. The CPU figures are therefore those of a machine whose CPUs this job's burning workers
    fill; everything else (worker pids, memory, /dev/shm) is read for real.
    """

    def read(self):
        cpus = usable_cpus()
        return dataclasses.replace(
            super().read(), cpu_pct=100.0, usable_cpus=cpus, workers_cpu_pct=100.0 * cpus
        )


def test_cpu_bound_transforms_on_more_workers_than_cores_is_cpu_bound():
    cpus = usable_cpus()
    gpu = SimulatedGpu(step_time_s=0.002)
    workers = cpus + 2
    loader = DataLoader(Burn(100_000, 0.004), batch_size=8, num_workers=workers)
    with loadertune.tune(loader, gpu=gpu, window_s=1.5, host=OwnMachine()) as t:
        d, rec = train_until_diagnosed(t, gpu)
        assert d.kind == "cpu_bound", d.summary
        assert "more workers will not help" in d.summary
        assert rec is None or rec.config.num_workers <= cpus


def test_apply_mode_adds_workers_to_a_latency_bound_loader():
    gpu = SimulatedGpu(step_time_s=0.02)
    loader = DataLoader(Latency(100_000, 0.003), batch_size=16, num_workers=0)
    with loadertune.tune(loader, mode="apply", gpu=gpu, window_s=1.0) as t:
        # Until the first change, not for a fixed time: each step sleeps 20 ms, so the first
        # window's second is over within ~50 batches; 1000 only bounds a broken tuner.
        for n, batch in enumerate(t, start=1):
            gpu.step(len(batch))
            if t.rebuilds or n >= 1000:
                break
        change = next(e for e in t.events if e.kind == "change")
        assert change.data["before"]["num_workers"] == 0 and change.data["after"]["num_workers"] >= 3
        # The rebuilt loader is the one that runs: its batches keep coming.
        assert t.config.num_workers == change.data["after"]["num_workers"]
        assert len(next(iter(t))) == 16
