"""The benchmark workloads: map-style datasets made in-process, each with a simulated GPU.

Every dataset is built from nothing (no downloads): sleeps stand in for remote reads, JPEGs are
encoded in memory at start-up, caches are byte strings. Each :class:`Workload` says how to build
its dataset and its :class:`~loadertune.sim.SimulatedGpu`, which static configurations to sweep,
what ``tune()`` gets, and which diagnosis a person would give its starting configuration.

Datasets report a virtual length far beyond what a run consumes, so no epoch ends inside a run: an
epoch boundary would add a worker restart to every static configuration and blur the comparison.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from loadertune.sim import SimulatedGpu

__all__ = [
    "QUICK_DEFAULT",
    "WORKLOADS",
    "CheapDataset",
    "JpegDataset",
    "LatencyDataset",
    "MemoryGrowthDataset",
    "Workload",
    "get",
    "names",
]

#: Samples per epoch every dataset reports; no run gets near the end of an epoch.
VIRTUAL_LENGTH = 200_000

_MiB = 2**20


def _shared_factor() -> Any:
    # Shared memory that forked (or spawned) workers inherit: the training loop raises it
    # mid-run and the workers already running see the new cost at their next sample.
    return multiprocessing.RawValue("d", 1.0)


class LatencyDataset(Dataset):
    """Samples that cost wall time, not CPU: each waits like a read from remote storage.

    Latencies are drawn once per distinct index at construction, so every configuration in a run
    sees the same sequence of costs (the order is fixed by the loader's seeded generator).

    Args:
        mean_s: Mean wait per sample, seconds.
        tail_sigma: None for a fixed wait; else the sigma of a lognormal with mean ``mean_s``
            (1.0 makes the slowest 1% of samples ~5x the mean).
        distinct: Distinct indices with their own latency; index ``i`` uses ``i % distinct``.
        length: Reported length.
        seed: Seed of the latency draws.
    """

    def __init__(
        self,
        mean_s: float,
        *,
        tail_sigma: float | None = None,
        distinct: int = 4096,
        length: int = VIRTUAL_LENGTH,
        seed: int = 0,
    ) -> None:
        if tail_sigma is None:
            self._latency_s = np.full(distinct, mean_s)
        else:
            # E[lognormal(mu, s)] = exp(mu + s^2 / 2): pick mu so the mean stays mean_s.
            mu = math.log(mean_s) - tail_sigma**2 / 2
            self._latency_s = np.random.default_rng(seed).lognormal(mu, tail_sigma, distinct)
        self._length = length
        self._factor = _shared_factor()
        self._payload = torch.arange(3 * 16 * 16, dtype=torch.float32).reshape(3, 16, 16)

    def __len__(self) -> int:
        return self._length

    def set_cost_factor(self, factor: float) -> None:
        """Multiplies every later sample's wait by ``factor`` (workers see it at once)."""
        self._factor.value = float(factor)

    def reset(self) -> None:
        """Back to the construction-time costs (between runs)."""
        self.set_cost_factor(1.0)

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(float(self._latency_s[index % len(self._latency_s)]) * self._factor.value)
        return self._payload + float(index)


class JpegDataset(Dataset):
    """CPU-bound decoding: JPEG decode, random crop, random flip, to a uint8 tensor (Pillow).

    A few hundred random-ish images (colour gradients plus noise, which JPEG cannot compress
    away) are encoded in memory at construction; each sample decodes one of them.

    Args:
        images: Distinct JPEGs to encode.
        size: Side of each image, pixels.
        crop: Side of the random crop, pixels.
        quality: JPEG quality.
        length: Reported length.
        seed: Seed of the images.
    """

    def __init__(
        self,
        images: int = 256,
        size: int = 256,
        crop: int = 192,
        quality: int = 90,
        length: int = VIRTUAL_LENGTH,
        seed: int = 0,
    ) -> None:
        from PIL import Image

        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        self._jpegs: list[bytes] = []
        for _ in range(images):
            a, b, c = rng.uniform(0.2, 1.0, 3)
            base = np.stack([x * a, y * b, (x + y) * c / 2], axis=-1) * (255.0 / size)
            pixels = (base + rng.normal(0.0, 24.0, base.shape)).clip(0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
            self._jpegs.append(buffer.getvalue())
        self._size = size
        self._crop = crop
        self._length = length

    def __len__(self) -> int:
        return self._length

    @property
    def jpeg_bytes(self) -> int:
        """Total size of the encoded images."""
        return sum(len(j) for j in self._jpegs)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        image = Image.open(io.BytesIO(self._jpegs[index % len(self._jpegs)])).convert("RGB")
        # The global `random` module: torch reseeds it in every worker, so crops differ per worker.
        x0 = random.randint(0, self._size - self._crop)
        y0 = random.randint(0, self._size - self._crop)
        image = image.crop((x0, y0, x0 + self._crop, y0 + self._crop))
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


class CheapDataset(Dataset):
    """Samples that cost almost nothing: slices of a tensor held in memory.

    Args:
        shape: Shape of one sample.
        distinct: Distinct samples held.
        length: Reported length.
    """

    def __init__(
        self,
        shape: tuple[int, ...] = (3, 32, 32),
        distinct: int = 1024,
        length: int = VIRTUAL_LENGTH,
    ) -> None:
        self._data = torch.randn(distinct, *shape, generator=torch.Generator().manual_seed(0))
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._data[index % len(self._data)]


class MemoryGrowthDataset(Dataset):
    """I/O-bound samples whose loader processes grow: a fixed private buffer plus a sample cache.

    Each process that loads samples (every worker, or the training process at ``num_workers=0``)
    allocates ``ballast_bytes`` on its first sample (a decoder's buffers, a shard index) and keeps
    ``cache_bytes_per_sample`` for every sample it loads, up to ``cache_limit_bytes``. Memory thus
    grows with the number of workers, which is what a RAM budget has to bound.

    Args:
        latency_s: Wait per sample, seconds.
        ballast_bytes: Private memory each loading process allocates once.
        cache_bytes_per_sample: Bytes kept per sample loaded.
        cache_limit_bytes: Most a process's cache holds.
        length: Reported length.
    """

    def __init__(
        self,
        latency_s: float = 0.005,
        ballast_bytes: int = 24 * _MiB,
        cache_bytes_per_sample: int = 32 * 1024,
        cache_limit_bytes: int = 24 * _MiB,
        length: int = VIRTUAL_LENGTH,
    ) -> None:
        self._latency_s = latency_s
        self._ballast_bytes = ballast_bytes
        self._per_sample = cache_bytes_per_sample
        self._limit = cache_limit_bytes // cache_bytes_per_sample
        self._length = length
        self._ballast: bytearray | None = None
        self._cache: dict[int, bytes] = {}
        self._payload = torch.zeros(3, 16, 16)

    def __len__(self) -> int:
        return self._length

    def reset(self) -> None:
        """Drops this process's buffer and cache (so a forked worker starts empty)."""
        self._ballast = None
        self._cache = {}

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._ballast is None:
            # Filled with a non-zero byte so every page is really touched (and counted).
            self._ballast = bytearray(b"\x01") * self._ballast_bytes
        time.sleep(self._latency_s)
        if len(self._cache) < self._limit and index not in self._cache:
            self._cache[index] = bytes([index % 251 + 1]) * self._per_sample
        return self._payload + float(index)


@dataclass(frozen=True)
class Workload:
    """One benchmark workload.

    Attributes:
        name: Short name used by ``--only``.
        title: Human-readable name.
        summary: One sentence: what limits it and what a good configuration looks like.
        params: The parameters, for the report.
        batch_size: Batch size every configuration starts from.
        make_dataset: Builds the dataset (called once per bench run, reused across configs).
        make_gpu: Builds a fresh simulated GPU for one run.
        sweep_full: Static (num_workers, batch_size or None) points swept in full mode.
        sweep_quick: The same in quick mode.
        duration_full_s: Seconds each configuration runs in full mode.
        duration_quick_s: Seconds each configuration runs in quick mode.
        tune_options: Builds the extra ``tune()`` keyword arguments (at run time, since some
            depend on the machine, e.g. a RAM budget expressed as a share of available RAM).
        phase_at_share: Share of the run at which the per-sample cost changes, or None.
        phase_factor: The factor the cost changes by.
        memory_budget_bytes: RAM all workers together may use, or None; the static oracle is
            the best configuration that stays inside it.
        expected_first_diagnosis: What a person would diagnose at the starting configuration.
        repeat_oracle_full: Whether full mode runs the oracle again to record the noise.
        targets: Which of the target checks apply (see ``bench.run``).
    """

    name: str
    title: str
    summary: str
    params: dict[str, Any]
    batch_size: int
    make_dataset: Callable[[], Dataset]
    make_gpu: Callable[[], SimulatedGpu]
    sweep_full: tuple[tuple[int, int | None], ...]
    sweep_quick: tuple[tuple[int, int | None], ...]
    duration_full_s: float = 20.0
    duration_quick_s: float = 8.0
    tune_options: Callable[[], dict[str, Any]] = dict
    phase_at_share: float | None = None
    phase_factor: float = 3.0
    memory_budget_bytes: int | None = None
    expected_first_diagnosis: str = "data_starved"
    repeat_oracle_full: bool = True
    targets: tuple[str, ...] = field(default_factory=tuple)


def _workers(*counts: int) -> tuple[tuple[int, int | None], ...]:
    return tuple((w, None) for w in counts)


# -- latency-bound -----------------------------------------------------------------------------
_LAT_MEAN_S = 0.004
_LAT_STEP_S = 0.020
_LAT_BATCH = 32

# -- CPU-bound ---------------------------------------------------------------------------------
_CPU_STEP_S = 0.010
_CPU_BATCH = 16

# -- compute-bound -----------------------------------------------------------------------------
_COMPUTE_STEP_S = 0.100
_COMPUTE_BATCH = 32

# -- batch-size headroom: step = a*b + h, memory = m*b of T ------------------------------------
_HEAD_A_S = 0.00025
_HEAD_H_S = 0.025
_HEAD_T_BYTES = 16 * 2**30
_HEAD_MAX_BATCH = 300
_HEAD_M_BYTES = _HEAD_T_BYTES // _HEAD_MAX_BATCH
_HEAD_BATCH = 16

# -- phase change ------------------------------------------------------------------------------
_PHASE_MEAN_S = 0.002
_PHASE_STEP_S = 0.020
_PHASE_BATCH = 32

# -- memory-limited ----------------------------------------------------------------------------
_MEM_LATENCY_S = 0.005
_MEM_STEP_S = 0.015
_MEM_BATCH = 16
_MEM_BALLAST = 24 * _MiB
_MEM_CACHE = 24 * _MiB
_MEM_BUDGET = 300 * _MiB


def _memory_tune_options() -> dict[str, Any]:
    import psutil

    # tune() takes the budget as a share of the RAM available when it starts.
    available = psutil.virtual_memory().available
    return {"ram_budget_share": min(1.0, _MEM_BUDGET / available)}


WORKLOADS: tuple[Workload, ...] = (
    Workload(
        name="latency",
        title="Latency-bound (fixed 4 ms per sample)",
        summary="Each sample waits 4 ms like a remote read and uses no CPU: it needs workers "
        "beyond the core count.",
        params={
            "latency_ms": _LAT_MEAN_S * 1e3,
            "distribution": "fixed",
            "step_ms": _LAT_STEP_S * 1e3,
            "batch_size": _LAT_BATCH,
        },
        batch_size=_LAT_BATCH,
        make_dataset=lambda: LatencyDataset(_LAT_MEAN_S),
        make_gpu=lambda: SimulatedGpu(step_time_s=_LAT_STEP_S),
        sweep_full=_workers(0, 1, 2, 4, 8, 12, 16),
        sweep_quick=_workers(0, 1, 2, 12),
        targets=("steady_90", "whole_job_90", "reach_90_10s"),
    ),
    Workload(
        name="latency-tail",
        title="Latency-bound, heavy-tailed (lognormal, mean 4 ms)",
        summary="The same mean wait as 'latency' but lognormal (sigma 1): a few slow samples hold "
        "a whole batch back, so batches arrive unevenly.",
        params={
            "latency_mean_ms": _LAT_MEAN_S * 1e3,
            "distribution": "lognormal sigma=1.0",
            "step_ms": _LAT_STEP_S * 1e3,
            "batch_size": _LAT_BATCH,
        },
        batch_size=_LAT_BATCH,
        make_dataset=lambda: LatencyDataset(_LAT_MEAN_S, tail_sigma=1.0),
        make_gpu=lambda: SimulatedGpu(step_time_s=_LAT_STEP_S),
        sweep_full=_workers(0, 1, 2, 4, 8, 16),
        sweep_quick=_workers(0, 1, 2, 8, 16),
        targets=("steady_90", "whole_job_90", "reach_90_10s"),
    ),
    Workload(
        name="cpu",
        title="CPU-bound decode (JPEG + crop + flip, Pillow)",
        summary="256 JPEGs of 256x256 encoded in memory; each sample decodes one, crops 192x192 "
        "at random, flips half of them and makes a uint8 tensor. The CPUs are the limit.",
        params={
            "images": 256,
            "image_px": 256,
            "crop_px": 192,
            "step_ms": _CPU_STEP_S * 1e3,
            "batch_size": _CPU_BATCH,
        },
        batch_size=_CPU_BATCH,
        make_dataset=JpegDataset,
        make_gpu=lambda: SimulatedGpu(step_time_s=_CPU_STEP_S),
        sweep_full=_workers(0, 1, 2, 4, 8),
        sweep_quick=_workers(0, 1, 2, 4),
        targets=("steady_95", "no_oversubscription"),
    ),
    Workload(
        name="compute",
        title="Compute-bound (long step, cheap samples)",
        summary="A 100 ms step on samples that cost microseconds: loading is never the limit, "
        "so the right move is to change nothing.",
        params={"step_ms": _COMPUTE_STEP_S * 1e3, "batch_size": _COMPUTE_BATCH},
        batch_size=_COMPUTE_BATCH,
        make_dataset=CheapDataset,
        make_gpu=lambda: SimulatedGpu(step_time_s=_COMPUTE_STEP_S),
        sweep_full=_workers(0, 1, 2),
        sweep_quick=_workers(0, 1, 2),
        expected_first_diagnosis="balanced",
        repeat_oracle_full=False,
    ),
    Workload(
        name="headroom",
        title="Batch-size headroom (large fixed per-step host overhead)",
        summary="Step = 0.25 ms x batch + 25 ms host overhead; memory allows up to 300 samples. "
        "At batch 16 the GPU idles 86% of each step: a larger batch amortises the overhead. "
        "Tuned with allow_batch_size=True, lr_rule='none'.",
        params={
            "step_ms_per_sample": _HEAD_A_S * 1e3,
            "host_overhead_ms": _HEAD_H_S * 1e3,
            "gpu_memory_gib": _HEAD_T_BYTES / 2**30,
            "max_batch_that_fits": _HEAD_MAX_BATCH,
            "batch_size": _HEAD_BATCH,
        },
        batch_size=_HEAD_BATCH,
        make_dataset=CheapDataset,
        make_gpu=lambda: SimulatedGpu(
            step_time_s=lambda b: _HEAD_A_S * b,
            host_overhead_s=_HEAD_H_S,
            memory_bytes=lambda b: _HEAD_M_BYTES * b,
            total_memory_bytes=_HEAD_T_BYTES,
        ),
        sweep_full=(*_workers(0, 1, 2), (0, 64), (0, 128), (0, 256)),
        sweep_quick=(*_workers(0, 1, 2), (0, 64), (0, 256)),
        tune_options=lambda: {"allow_batch_size": True, "lr_rule": "none"},
        expected_first_diagnosis="batch_headroom",
        repeat_oracle_full=False,
    ),
    Workload(
        name="phase",
        title="Phase change (per-sample wait triples at 40% of the run)",
        summary="Latency-bound at 2 ms per sample, then 6 ms from 40% of the run on (a slower "
        "storage tier): the worker count that was right becomes too small.",
        params={
            "latency_ms_before": _PHASE_MEAN_S * 1e3,
            "latency_ms_after": 3 * _PHASE_MEAN_S * 1e3,
            "change_at_share": 0.4,
            "step_ms": _PHASE_STEP_S * 1e3,
            "batch_size": _PHASE_BATCH,
        },
        batch_size=_PHASE_BATCH,
        make_dataset=lambda: LatencyDataset(_PHASE_MEAN_S),
        make_gpu=lambda: SimulatedGpu(step_time_s=_PHASE_STEP_S),
        sweep_full=_workers(0, 1, 2, 4, 8, 16),
        sweep_quick=_workers(0, 1, 2, 16),
        duration_full_s=25.0,
        duration_quick_s=10.0,
        phase_at_share=0.4,
        phase_factor=3.0,
        targets=("phase_recover_80_15s",),
    ),
    Workload(
        name="memory",
        title="Memory-limited (workers grow, 300 MiB budget)",
        summary="5 ms waits per sample, and every loading process keeps a 24 MiB buffer plus a "
        "cache of what it loaded (up to 24 MiB): more workers help, but only a few fit the "
        "300 MiB budget for all workers together.",
        params={
            "latency_ms": _MEM_LATENCY_S * 1e3,
            "ballast_mib": _MEM_BALLAST / _MiB,
            "cache_limit_mib": _MEM_CACHE / _MiB,
            "cache_kib_per_sample": 32,
            "budget_mib": _MEM_BUDGET / _MiB,
            "step_ms": _MEM_STEP_S * 1e3,
            "batch_size": _MEM_BATCH,
        },
        batch_size=_MEM_BATCH,
        make_dataset=lambda: MemoryGrowthDataset(
            _MEM_LATENCY_S, ballast_bytes=_MEM_BALLAST, cache_limit_bytes=_MEM_CACHE
        ),
        make_gpu=lambda: SimulatedGpu(step_time_s=_MEM_STEP_S),
        sweep_full=_workers(0, 1, 2, 3, 6),
        sweep_quick=_workers(0, 1, 2, 3, 6),
        tune_options=_memory_tune_options,
        memory_budget_bytes=_MEM_BUDGET,
        repeat_oracle_full=False,
        targets=("within_budget",),
    ),
)

#: The workloads ``--quick`` runs when ``--only`` is not given (the ones with targets).
QUICK_DEFAULT = ("latency", "cpu", "phase")


def names() -> tuple[str, ...]:
    """The names of every workload, in run order."""
    return tuple(w.name for w in WORKLOADS)


def get(name: str) -> Workload:
    """The workload called ``name``.

    Raises:
        ValueError: No workload has that name (the message lists the names).
    """
    for workload in WORKLOADS:
        if workload.name == name:
            return workload
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(names())}")
