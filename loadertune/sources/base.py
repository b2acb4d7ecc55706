"""The readings every source produces and the small interface GPU sources share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class GpuReading:
    """One reading of a GPU. Every field is optional: None means the metric is unknown.

    Attributes:
        util_pct: Share of the last sample period in which a kernel ran, 0-100.
        mem_used_bytes: Device memory in use.
        mem_total_bytes: Device memory in all.
        process_util_pct: This process's share of the GPU, 0-100, where the driver reports it.
    """

    util_pct: float | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    process_util_pct: float | None = None


@runtime_checkable
class GpuSource(Protocol):
    """What the sampler needs of a GPU: a name, a cheap ``read()`` and ``close()``.

    ``read()`` never raises for a metric that is merely unavailable (that field is None); an
    exception from it means the whole source is broken, and the sampler disables it.
    """

    name: str

    def read(self) -> GpuReading: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class HostReading:
    """One reading of the host and of this process's DataLoader workers. None means unknown.

    Attributes:
        cpu_pct: Busy share of the usable CPUs, 0-100 (100 = every usable core busy).
        cpu_per_core_pct: Busy share of each usable core, 0-100.
        process_cpu_pct: This process, in percent of one core (200 = two cores).
        workers_cpu_pct: All DataLoader worker processes together, in percent of one core.
        workers_runqueue_pct: Time the workers spent runnable but waiting for a CPU, summed, in
            percent of one core (Linux schedstat): high when CPUs are oversubscribed.
        worker_count: Worker processes seen.
        process_rss_bytes: Resident memory of this process.
        workers_rss_bytes: Resident memory of the workers, summed (over-counts shared pages).
        workers_pss_bytes: Proportional set size of the workers, summed; sampled every few
            seconds at most because reading it walks the address space.
        ram_available_bytes: Memory available to start new work without swapping.
        ram_total_bytes: Physical memory.
        swap_used_bytes: Swap in use.
        shm_free_bytes: Free bytes in /dev/shm, through which workers pass batches.
        shm_total_bytes: Size of /dev/shm.
        usable_cpus: min(CPU affinity, cgroup CPU quota).
        cgroup_nr_throttled: Periods in which the cgroup's CPU quota throttled it, cumulative.
    """

    cpu_pct: float | None = None
    cpu_per_core_pct: tuple[float, ...] | None = None
    process_cpu_pct: float | None = None
    workers_cpu_pct: float | None = None
    workers_runqueue_pct: float | None = None
    worker_count: int = 0
    process_rss_bytes: int | None = None
    workers_rss_bytes: int | None = None
    workers_pss_bytes: int | None = None
    ram_available_bytes: int | None = None
    ram_total_bytes: int | None = None
    swap_used_bytes: int | None = None
    shm_free_bytes: int | None = None
    shm_total_bytes: int | None = None
    usable_cpus: int | None = None
    cgroup_nr_throttled: int | None = None
