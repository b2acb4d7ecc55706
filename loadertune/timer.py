"""The loop timer: how long the training loop waits in ``next(loader)`` and computes between.

It is on the per-batch hot path, so ``record`` only adds to a handful of running sums (O(1), no
allocation); ``take()`` turns them into a :class:`LoopWindow` and starts the next window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CPU_EVERY", "CPU_PHASE_AT_EPOCH_START", "LoopTimer", "LoopWindow"]

# Without workers, loading runs in the training thread and its CPU time tells loading work from
# waiting. Reading the thread clock costs ~2 us, so one batch in CPU_EVERY is timed: its time in
# next() (phase 0) and the loop's gap after it (phase 1).
CPU_EVERY = 8
# The phase an epoch starts at. Its first batch is never timed (it pays the epoch's own set-up),
# so the second is: a first window of a few slow batches still knows whether loading is CPU work
# (without it, a 6-batch first window of JPEG decoding on 2 CPUs asked for 5 workers).
CPU_PHASE_AT_EPOCH_START = CPU_EVERY - 1


@dataclass(frozen=True)
class LoopWindow:
    """What the loop did over one window.

    Attributes:
        start_s: ``time.perf_counter()`` at the start of the first counted batch request.
        end_s: ``time.perf_counter()`` when the last counted batch arrived.
        batches: Batches counted.
        samples: Samples in those batches.
        wait_s: Time blocked in ``next(loader)``.
        compute_s: Time between batches, outside ``next(loader)`` (the training step).
        interval_sq_sum_s2: Sum of squared batch-to-batch intervals (for the rate's noise).
        interval_sum_s: Sum of the same intervals (``intervals`` of them). A window that opens
            fresh (the first, or the first after a warm-up discard) has one interval fewer than
            batches; a window that continues from the previous one has as many.
        intervals: Batch-to-batch intervals summed in ``interval_sum_s``.
        loader_cpu_s: CPU time the loading took in the training thread, over the batches timed
            (``num_workers=0`` only; ``loader_cpu_n`` of them; never an epoch's first batch).
        loop_cpu_s: CPU time of the training thread between batches, over the gaps timed
            (``loop_cpu_n`` of them).
        gaps: Batch-to-batch gaps measured (``compute_s`` is their sum).
        max_wait_s: The longest single wait.
        epoch_start_wait_s: Waits for the first batch of an epoch in this window, summed.
        epoch_starts: Epoch starts in this window.
    """

    start_s: float
    end_s: float
    batches: int
    samples: int
    wait_s: float
    compute_s: float
    interval_sq_sum_s2: float
    loader_cpu_s: float
    loop_cpu_s: float
    loader_cpu_n: int
    loop_cpu_n: int
    gaps: int
    max_wait_s: float
    epoch_start_wait_s: float
    epoch_starts: int
    interval_sum_s: float = 0.0
    intervals: int = 0

    @property
    def duration_s(self) -> float:
        """Wall time the window covers."""
        return max(0.0, self.end_s - self.start_s)

    @property
    def rate_rel_stderr(self) -> float:
        """Relative standard error of the measured batch rate (0 when unknown).

        From the intervals' own sample variance (n-1 in the denominator) around their own mean,
        so a perfectly regular loop reads ~0 whether the window opened fresh or not. Intervals
        are treated as independent: bursts (a long wait, then several batches ready at once)
        make this an over-estimate, slow drift an under-estimate, which is why the controller
        also looks at the spread between windows.
        """
        k = self.intervals
        if k < 2:
            return 0.0
        mean = self.interval_sum_s / k
        if mean <= 0:
            return 0.0
        var = max(0.0, (self.interval_sq_sum_s2 - k * mean * mean) / (k - 1))
        return math.sqrt(var / k) / mean


class LoopTimer:
    """Accumulates per-batch timings; ``record`` is called once per batch by the loader wrapper."""

    __slots__ = (
        "_batches",
        "_compute_s",
        "_cpu_n",
        "_cpu_s",
        "_discard",
        "_epoch_start",
        "_epoch_start_wait_s",
        "_epoch_starts",
        "_gaps",
        "_interval_sum",
        "_intervals",
        "_last_return",
        "_loop_cpu_n",
        "_loop_cpu_s",
        "_max_wait_s",
        "_samples",
        "_sq_sum",
        "_start",
        "_wait_s",
    )

    def __init__(self) -> None:
        self._last_return: float | None = None
        self._discard = 0
        self._epoch_start = False
        self._reset()

    def _reset(self) -> None:
        self._start: float | None = None
        self._batches = 0
        self._samples = 0
        self._wait_s = 0.0
        self._compute_s = 0.0
        self._sq_sum = 0.0
        self._interval_sum = 0.0
        self._intervals = 0
        self._cpu_s = 0.0
        self._cpu_n = 0
        self._loop_cpu_s = 0.0
        self._loop_cpu_n = 0
        self._gaps = 0
        self._max_wait_s = 0.0
        self._epoch_start_wait_s = 0.0
        self._epoch_starts = 0

    @property
    def batches(self) -> int:
        """Batches counted in the current window."""
        return self._batches

    @property
    def wait_share(self) -> float:
        """Share of the current window's loop time spent waiting so far."""
        busy = self._wait_s + self._compute_s
        return self._wait_s / busy if busy > 0 else 0.0

    def epoch_started(self) -> None:
        """Marks that the next batch is the first of an epoch (its wait is kept apart)."""
        self._epoch_start = True
        # Time between epochs (evaluation, checkpoints) is not the loop's compute time.
        self._last_return = None

    def discard(self, batches: int) -> None:
        """Leaves the next ``batches`` batches out of the window (warm-up after a rebuild)."""
        self._discard = max(0, int(batches))
        self._last_return = None
        self._reset()

    def record(
        self, requested_s: float, returned_s: float, samples: int, cpu_s: float = -1.0, loop_cpu_s: float = -1.0
    ) -> None:
        """Records one batch: requested at ``requested_s``, delivered at ``returned_s``.

        ``cpu_s`` is CPU time spent inside ``next()``, ``loop_cpu_s`` CPU time of the training
        thread since the previous batch arrived; negative when not timed (only some batches are,
        and only without workers).
        """
        last = self._last_return
        self._last_return = returned_s
        wait = returned_s - requested_s
        first = self._epoch_start
        if first:
            self._epoch_start = False
            if self._discard == 0:
                self._epoch_start_wait_s += wait
                self._epoch_starts += 1
        if self._discard:
            self._discard -= 1
            return
        if self._start is None:
            self._start = requested_s
        elif last is not None:
            self._compute_s += requested_s - last
            self._gaps += 1
            if loop_cpu_s >= 0.0:
                self._loop_cpu_s += loop_cpu_s
                self._loop_cpu_n += 1
            interval = returned_s - last
            self._sq_sum += interval * interval
            self._interval_sum += interval
            self._intervals += 1
        self._batches += 1
        self._samples += samples
        self._wait_s += wait
        if cpu_s >= 0.0 and not first:
            # An epoch's first batch also pays once-per-epoch work (the sampler's permutation:
            # ~50 ms of CPU for a million indices), which says nothing of a batch's loading.
            self._cpu_s += cpu_s
            self._cpu_n += 1
        if wait > self._max_wait_s:
            self._max_wait_s = wait

    def take(self) -> LoopWindow:
        """Returns the current window and starts a new one."""
        start = self._start if self._start is not None else (self._last_return or 0.0)
        window = LoopWindow(
            start_s=start,
            end_s=self._last_return if self._last_return is not None else start,
            batches=self._batches,
            samples=self._samples,
            wait_s=self._wait_s,
            compute_s=self._compute_s,
            interval_sq_sum_s2=self._sq_sum,
            loader_cpu_s=self._cpu_s,
            loop_cpu_s=self._loop_cpu_s,
            loader_cpu_n=self._cpu_n,
            loop_cpu_n=self._loop_cpu_n,
            gaps=self._gaps,
            max_wait_s=self._max_wait_s,
            epoch_start_wait_s=self._epoch_start_wait_s,
            epoch_starts=self._epoch_starts,
            interval_sum_s=self._interval_sum,
            intervals=self._intervals,
        )
        self._reset()
        # The next window starts where this one ended, so no time falls between windows.
        self._start = self._last_return
        return window
