"""Builders for plain data used across tests."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset, IterableDataset

import loadertune
from loadertune.metrics import WindowMetrics

GIB = 2**30


def metrics(**overrides: Any) -> WindowMetrics:
    """A window of a healthy, balanced job (override what a test is about)."""
    base: dict[str, Any] = {
        "duration_s": 2.0,
        "batches": 100,
        "samples": 3200,
        "samples_per_s": 1600.0,
        "batches_per_s": 50.0,
        "wait_share": 0.01,
        "wait_s_per_batch": 0.0002,
        "compute_s_per_batch": 0.0198,
        "rate_rel_stderr": 0.01,
        "loader_cpu_s_per_batch": None,
        "gpu_util_mean_pct": 95.0,
        "gpu_util_std_pct": 3.0,
        "gpu_idle_share": 0.0,
        "gpu_mem_used_bytes": 60 * GIB,
        "gpu_mem_total_bytes": 80 * GIB,
        "cpu_pct": 30.0,
        "usable_cpus": 8,
        "process_cpu_pct": 100.0,
        "ram_available_bytes": 40 * GIB,
        "ram_total_bytes": 64 * GIB,
        "shm_free_bytes": 16 * GIB,
        "shm_total_bytes": 16 * GIB,
        "ticks": 20,
    }
    base.update(overrides)
    return WindowMetrics(**base)


class Indexed(Dataset):
    """Returns its index: what the loop sees tells exactly which samples arrived."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class NoShard(IterableDataset):
    """Ignores get_worker_info(): correct at num_workers=0, every item once per worker beyond."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


def quiet(loader, **kw):
    """tune() without host sampling and with windows that never close on their own."""
    kw.setdefault("host", None)
    kw.setdefault("gpu", None)
    kw.setdefault("window_s", 3600.0)
    return loadertune.tune(loader, **kw)


def flat(batches) -> list[int]:
    """The sample indices of ``batches``, in order."""
    return [int(i) for b in batches for i in b]


def rest(it) -> list[int]:
    """The rest of the epoch through ``next`` (``iter()`` on a TunedLoader starts a new one)."""
    out: list[int] = []
    while True:
        try:
            out.extend(int(i) for i in next(it))
        except StopIteration:
            return out


def latency_bound_at_zero(**kw: Any) -> WindowMetrics:
    """A window at 0 workers of a latency-bound load: I/O waits, little CPU."""
    # 32 samples x 4 ms of I/O per batch = 128 ms in next(); 20 ms step; little CPU.
    base = dict(
        wait_share=0.86, wait_s_per_batch=0.128, compute_s_per_batch=0.02, batches_per_s=6.7,
        samples_per_s=216.0, loader_cpu_s_per_batch=0.004, cpu_pct=25.0, usable_cpus=2,
        process_cpu_pct=5.0, gpu_util_mean_pct=13.0, gpu_util_std_pct=30.0, gpu_idle_share=0.8,
    )
    base.update(kw)
    return metrics(**base)


def conv_net_with_jpeg_decode_at_zero(**kw: Any) -> WindowMetrics:
    """A window at 0 workers of a JPEG-decoding conv net whose loop keeps the CPUs busy."""
    # The issue-13 JPEG conv net: decode 0.2 s/batch in the loop, a 0.27 s step whose torch
    # threads keep ~1.6 of the 2 CPUs busy. From the rates alone one worker keeps up.
    base = dict(
        wait_share=0.43, wait_s_per_batch=0.2, compute_s_per_batch=0.27, batches_per_s=2.1,
        samples_per_s=67.0, loader_cpu_s_per_batch=0.19, cpu_pct=80.0, usable_cpus=2,
        process_cpu_pct=160.0, loop_cpu_cores=1.6,
    )
    base.update(kw)
    return metrics(**base)


def hold_while_exists(path: str, worker_id: int) -> None:
    """A ``worker_init_fn`` (bind ``path`` with functools.partial): a starting worker waits
    while ``path`` exists, so a test decides when it has started. Picklable for spawn."""
    import os
    import time

    while os.path.exists(path):
        time.sleep(0.01)


def exit_if_exists(path: str, worker_id: int) -> None:
    """A ``worker_init_fn``: a starting worker exits with code 3 when ``path`` exists."""
    import os

    if os.path.exists(path):
        os._exit(3)
