"""The sampler: a daemon thread that reads the GPU and the host on a fixed schedule.

Readings go into a fixed-size numpy ring buffer, one row per tick; ``window(start_s, end_s)``
hands a copy of a time range to the metrics. The thread never lets an exception out: a source
that fails is disabled with one warning naming the metrics that are gone, and ticking goes on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadertune.sources.base import GpuReading, GpuSource, HostReading

__all__ = ["SAMPLE_FIELDS", "SampleWindow", "Sampler", "Snapshot"]

logger = logging.getLogger("loadertune")

#: The columns of the ring buffer, after the time column. NaN stands for unknown.
SAMPLE_FIELDS = (
    "gpu_util_pct",
    "gpu_mem_used_bytes",
    "gpu_mem_total_bytes",
    "gpu_process_util_pct",
    "cpu_pct",
    "process_cpu_pct",
    "workers_cpu_pct",
    "workers_runqueue_pct",
    "worker_count",
    "process_rss_bytes",
    "workers_rss_bytes",
    "workers_pss_bytes",
    "ram_available_bytes",
    "ram_total_bytes",
    "swap_used_bytes",
    "shm_free_bytes",
    "shm_total_bytes",
    "usable_cpus",
    "cgroup_nr_throttled",
)
_GPU_MAP = {
    "gpu_util_pct": "util_pct",
    "gpu_mem_used_bytes": "mem_used_bytes",
    "gpu_mem_total_bytes": "mem_total_bytes",
    "gpu_process_util_pct": "process_util_pct",
}
_HOST_FIELDS = tuple(f for f in SAMPLE_FIELDS if f not in _GPU_MAP)
_COLUMN = {name: i + 1 for i, name in enumerate(SAMPLE_FIELDS)}
_HOST_COLUMNS = [_COLUMN[name] for name in _HOST_FIELDS]
_INT_FIELDS = frozenset(f for f in SAMPLE_FIELDS if f.endswith("_bytes") or f in ("worker_count", "usable_cpus", "cgroup_nr_throttled"))


@dataclass(frozen=True)
class Snapshot:
    """The newest tick's readings; every metric is None where unknown.

    Attributes:
        time_s: ``time.perf_counter()`` of the tick.
    """

    time_s: float
    gpu_util_pct: float | None = None
    gpu_mem_used_bytes: int | None = None
    gpu_mem_total_bytes: int | None = None
    gpu_process_util_pct: float | None = None
    cpu_pct: float | None = None
    process_cpu_pct: float | None = None
    workers_cpu_pct: float | None = None
    workers_runqueue_pct: float | None = None
    worker_count: int | None = None
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


@dataclass(frozen=True)
class SampleWindow:
    """The ticks of a time range: ``times_s`` and one array per field (NaN where unknown)."""

    times_s: np.ndarray
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.times_s)

    def values(self, field: str) -> np.ndarray:
        """The known (non-NaN) values of ``field`` in tick order."""
        col = self.columns[field]
        return col[~np.isnan(col)]


class Sampler:
    """Samples the GPU and the host on a drift-free schedule in a named daemon thread.

    Args:
        interval_s: Seconds between ticks (default 0.1, i.e. 10 Hz).
        gpu: A GPU source (``NvmlGpu``, ``SimulatedGpu`` or anything with ``read()``), or None.
        host: True for a psutil ``HostSource``, a host source object, or None for no host metrics.
        capacity: Rows of the ring buffer; older ticks are overwritten.
        host_interval_s: Seconds between host readings (psutil is dearer than NVML, and CPU
            and memory move slowly); ticks in between repeat the last host reading.

    Example:
        >>> with Sampler(interval_s=0.1) as sampler:
        ...     ...  # train
        ...     print(sampler.latest())
    """

    def __init__(
        self,
        interval_s: float = 0.1,
        gpu: GpuSource | None = None,
        host: Any = True,
        capacity: int = 4096,
        host_interval_s: float = 0.5,
    ) -> None:
        if not isinstance(interval_s, (int, float)) or not math.isfinite(interval_s) or interval_s <= 0:
            raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
        if not isinstance(host_interval_s, (int, float)) or not math.isfinite(host_interval_s) or host_interval_s < 0:
            raise ValueError(f"host_interval_s must be a number of seconds >= 0, got {host_interval_s!r}")
        self.host_interval_s = float(host_interval_s)
        self._host_at = -math.inf
        self._host_values = np.full(len(_HOST_FIELDS), np.nan)
        if not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"capacity must be an int >= 2, got {capacity!r}")
        if gpu is not None and not callable(getattr(gpu, "read", None)):
            raise ValueError(f"gpu must have a read() method returning a GpuReading, got {type(gpu).__name__}")
        self.interval_s = float(interval_s)
        self._gpu = gpu
        # The psutil source is built on start(), so constructing a Sampler stays cheap.
        self._want_host = host is True
        self._host: Any = None if host is True else self._check_host(host)
        self._buf = np.full((capacity, len(SAMPLE_FIELDS) + 1), np.nan)
        self._capacity = capacity
        self._ticks = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Sampler:
        """Starts the thread (a no-op if it runs already). Returns self."""
        if self._thread is not None and self._thread.is_alive():
            return self
        if self._want_host and self._host is None:
            from loadertune.sources.host import HostSource

            self._host = HostSource()
            self._want_host = False
            # Its CPU shares need a baseline some time back: the first reading waits an interval.
            self._host_at = time.perf_counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="loadertune-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the thread, waiting at most two intervals for the current tick to finish."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2 * self.interval_s + 0.05)
            if thread.is_alive():
                logger.warning("the sampler thread is still inside a read; leaving it as a daemon")

    def close(self) -> None:
        """Stops the thread and closes the sources."""
        self.stop()
        for source in (self._gpu, self._host):
            close = getattr(source, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # closing must not fail the caller's shutdown
                    logger.debug("closing %r failed", source, exc_info=True)

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def ticks(self) -> int:
        """Ticks completed since construction."""
        return self._ticks

    @property
    def gpu(self) -> GpuSource | None:
        """The GPU source, or None (also after it failed and was disabled)."""
        return self._gpu

    @property
    def host(self) -> Any:
        """The host source, or None."""
        return self._host

    # -- reading ---------------------------------------------------------------------------
    def latest(self) -> Snapshot | None:
        """The newest tick, or None before the first."""
        with self._lock:
            if self._ticks == 0:
                return None
            row = self._buf[(self._ticks - 1) % self._capacity].copy()
        values = {name: _scalar(name, row[_COLUMN[name]]) for name in SAMPLE_FIELDS}
        return Snapshot(time_s=float(row[0]), **values)

    def window(self, start_s: float, end_s: float = math.inf) -> SampleWindow:
        """A copy of the ticks with ``start_s <= time_s <= end_s`` (``time.perf_counter()`` seconds)."""
        with self._lock:
            n = min(self._ticks, self._capacity)
            if n == self._capacity:
                first = self._ticks % self._capacity
                rows = np.concatenate((self._buf[first:], self._buf[:first]))
            else:
                rows = self._buf[:n].copy()
        times = rows[:, 0]
        mask = (times >= start_s) & (times <= end_s)
        rows = rows[mask]
        return SampleWindow(
            times_s=rows[:, 0],
            columns={name: rows[:, _COLUMN[name]] for name in SAMPLE_FIELDS},
        )

    def tick(self) -> None:
        """Takes one reading now (the thread calls this; tests may call it directly)."""
        row = np.full(len(SAMPLE_FIELDS) + 1, np.nan)
        if self._gpu is not None:
            reading = self._read("gpu", self._gpu)
            if isinstance(reading, GpuReading):
                for column, attr in _GPU_MAP.items():
                    row[_COLUMN[column]] = _nan(getattr(reading, attr))
        if self._host is not None and time.perf_counter() - self._host_at >= self.host_interval_s:
            self._host_at = time.perf_counter()
            reading = self._read("host", self._host)
            if isinstance(reading, HostReading):
                self._host_values = np.array([_nan(getattr(reading, c)) for c in _HOST_FIELDS])
        if self._host is not None:
            row[_HOST_COLUMNS] = self._host_values
        row[0] = time.perf_counter()
        with self._lock:
            self._buf[self._ticks % self._capacity] = row
            self._ticks += 1

    # -- internals -------------------------------------------------------------------------
    def _run(self) -> None:
        next_tick = time.perf_counter()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the thread must never die or raise into the training loop
                logger.debug("sampler tick failed", exc_info=True)
            next_tick += self.interval_s
            delay = next_tick - time.perf_counter()
            if delay < 0:
                # A slow tick: skip the missed ones instead of bursting to catch up.
                next_tick = time.perf_counter()
                delay = 0.0
            if self._stop.wait(delay):
                break

    def _read(self, kind: str, source: Any) -> Any:
        try:
            return source.read()
        except Exception as exc:
            fields = ", ".join(_GPU_MAP) if kind == "gpu" else ", ".join(_HOST_FIELDS)
            logger.warning(
                "the %s source %s failed (%s: %s); %s are no longer sampled",
                kind,
                getattr(source, "name", type(source).__name__),
                type(exc).__name__,
                exc,
                fields,
            )
            if kind == "gpu":
                self._gpu = None
            else:
                self._host = None
            return None

    @staticmethod
    def _check_host(host: Any) -> Any:
        if host is None or host is False:
            return None
        if not callable(getattr(host, "read", None)):
            raise ValueError(f"host must be True, None or an object with read(), got {type(host).__name__}")
        return host


def _nan(value: Any) -> float:
    return np.nan if value is None else float(value)


def _scalar(name: str, value: float) -> Any:
    if np.isnan(value):
        return None
    return int(value) if name in _INT_FIELDS else float(value)

