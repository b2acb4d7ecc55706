"""A simulated GPU for machines without one: tests, benchmarks, the demo, and trying the tool.

``SimulatedGpu.step(batch_size)`` stands in for a training step: it takes
``step_time_s(b) + host_overhead_s(b)`` seconds, during which the GPU is busy for
``step_time_s(b)`` spread evenly through the step, and it reports the utilization NVML would report:
the busy share of each sample period.

A step lasts from the clock reading before its sleep to the clock reading after it. The OS wakes a
sleeping thread late, by more on a loaded machine; that delay belongs to the step (the loop was
inside it), so it lengthens the step as a whole and the step's busy share stays
``step_time_s / (step_time_s + host_overhead_s)``. Only time outside ``step()`` (the loop waiting
for data, say) counts as idle. Utilization therefore does not drift with the machine's load.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from loadertune.sources.base import GpuReading

__all__ = ["SimulatedGpu"]

#: A cost given either as a constant or as a function of batch size.
Cost = float | int | Callable[[int], float]

_MAX_INTERVALS = 4096


def _as_function(value: Cost | None, name: str, default: float) -> Callable[[int], float]:
    if value is None:
        return lambda _b: default
    if callable(value):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        constant = float(value)
        return lambda _b: constant
    raise ValueError(f"{name} must be a number or a function of batch size, got {type(value).__name__}")


class SimulatedGpu:
    """A GPU that exists only as time: busy for ``step_time_s(b)`` seconds of each step.

    Args:
        step_time_s: GPU time of one step, seconds; a number or a function of batch size.
        host_overhead_s: Time per step in which the GPU idles while the host works (kernel
            launches, optimizer bookkeeping); a number or a function of batch size. Default 0.
        memory_bytes: Device memory a step at batch size ``b`` uses; a number or a function of
            batch size. Default: nothing reported until a step ran, then 0.
        total_memory_bytes: Device memory in all. A step whose ``memory_bytes(b)`` exceeds it
            raises ``torch.OutOfMemoryError`` as CUDA would.
        sleep: The function that lets time pass (tests may pass a fake clock's sleep).
        clock: The monotonic clock read for utilization; must match ``sleep``. Read before and
            after each step's sleep, so a late wake-up lengthens the step it happened in.

    Example:
        >>> gpu = SimulatedGpu(step_time_s=lambda b: 0.0002 * b, host_overhead_s=0.005)
        >>> gpu.step(64)  # sleeps ~18 ms, GPU busy ~13 ms of it
    """

    name = "simulated"

    def __init__(
        self,
        step_time_s: Cost,
        host_overhead_s: Cost | None = None,
        memory_bytes: Cost | None = None,
        total_memory_bytes: int = 80 * 2**30,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._step_time_s = _as_function(step_time_s, "step_time_s", 0.0)
        self._host_overhead_s = _as_function(host_overhead_s, "host_overhead_s", 0.0)
        self._memory_bytes = None if memory_bytes is None else _as_function(memory_bytes, "memory_bytes", 0.0)
        if not isinstance(total_memory_bytes, int) or total_memory_bytes <= 0:
            raise ValueError(f"total_memory_bytes must be a positive int, got {total_memory_bytes!r}")
        self.total_memory_bytes = total_memory_bytes
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        # (start, end, busy share) of each step; utilization integrates them over a read period.
        # A step still sleeping has end = inf: a read meanwhile counts it up to the read's end.
        self._intervals: deque[tuple[float, float, float]] = deque(maxlen=_MAX_INTERVALS)
        self._last_read = clock()
        self._mem_used: int | None = None
        self.steps = 0

    def step(self, batch_size: int) -> None:
        """Runs one simulated training step on a batch of ``batch_size`` samples.

        Raises:
            torch.OutOfMemoryError: When ``memory_bytes(batch_size)`` exceeds the total memory.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if self._memory_bytes is not None:
            needed = int(self._memory_bytes(batch_size))
            if needed > self.total_memory_bytes:
                import torch

                raise torch.OutOfMemoryError(
                    f"SimulatedGpu: a step at batch size {batch_size} needs {needed} bytes, "
                    f"only {self.total_memory_bytes} in all"
                )
            with self._lock:
                self._mem_used = needed
        busy = max(0.0, float(self._step_time_s(batch_size)))
        idle = max(0.0, float(self._host_overhead_s(batch_size)))
        total = busy + idle
        if total > 0:
            share = busy / total
            with self._lock:
                start = self._clock()
                self._intervals.append((start, math.inf, share))
            try:
                self._sleep(total)
            finally:
                # The real end, not start + total: a late wake-up is part of this step, so it
                # must not read as an idle gap before the next one.
                with self._lock:
                    end = self._clock()
                    self._close_step(start, end, share)
        self.steps += 1

    def _close_step(self, start: float, end: float, share: float) -> None:
        # Called with the lock held. The open step is the newest unless steps overlap (several
        # threads stepping one GPU); search from the newest end.
        for i in range(len(self._intervals) - 1, -1, -1):
            s, e, sh = self._intervals[i]
            if s == start and e == math.inf and sh == share:
                self._intervals[i] = (start, end, share)
                return

    def utilization(self, start: float, end: float) -> float:
        """Busy share of ``[start, end]`` in percent, as NVML would report for that period."""
        if end <= start:
            return 0.0
        busy = 0.0
        with self._lock:
            for s, e, share in reversed(self._intervals):
                if e <= start:
                    break
                overlap = min(e, end) - max(s, start)
                if overlap > 0:
                    busy += overlap * share
        return 100.0 * min(1.0, busy / (end - start))

    def read(self) -> GpuReading:
        """The utilization since the previous read and the memory of the latest step."""
        now = self._clock()
        start, self._last_read = self._last_read, now
        with self._lock:
            used = self._mem_used
        return GpuReading(
            util_pct=self.utilization(start, now),
            mem_used_bytes=used,
            mem_total_bytes=self.total_memory_bytes,
        )

    def close(self) -> None:
        """Nothing to release; present for the GpuSource interface."""
