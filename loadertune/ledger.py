"""The run's ledger: what the loop achieved and what changes cost it.

:class:`RunRates` keeps the rates of the whole run from the loop's own timings (the summary's
"before" and "after"); :class:`CostMeter` measures what the job pays beyond its steady pace, a
rebuild's stall and the workers' start-up at every epoch, and tells the controller.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from loadertune.config import LoaderConfig
from loadertune.metrics import WindowMetrics
from loadertune.timer import LoopWindow

__all__ = ["CostMeter", "RunRates", "Warmup"]

#: Worker start-up (seconds) slow enough to be judged before the first epoch has ended.
_LONG_STARTUP_S = 1.0


class RunRates:
    """Rates of the whole run: the first configuration's, and the one in use since the last
    change (every window counts, and the partial one at the end)."""

    def __init__(self) -> None:
        self.changes = 0
        self._first = _Tally()
        self._since_change = _Tally()

    def add(self, loop: LoopWindow) -> None:
        """Counts what the loop did over ``loop``."""
        # A window that opened fresh has no gap before its first batch: count it at the mean gap.
        compute = loop.compute_s * loop.batches / loop.gaps if loop.gaps else loop.compute_s
        busy = loop.wait_s + compute
        for tally in ((self._first,) if not self.changes else ()) + (self._since_change,):
            tally.add(loop.samples, busy)

    def changed(self) -> None:
        """The configuration changed: a new "after" starts."""
        self.changes += 1
        self._since_change = _Tally()

    def first_rate(self) -> float | None:
        """Samples/s of the first configuration, None before any batch."""
        return self._first.rate()

    def last_rate(self) -> float | None:
        """Samples/s since the last change (the first configuration's when none)."""
        return self._since_change.rate() if self.changes else self._first.rate()


class CostMeter:
    """Measures what changes and epochs cost the job and tells the controller.

    Args:
        controller: The controller told of stalls and start-up (``costs.note_stall``,
            ``costs.note_startup``, ``costs.startup_share``).

    Attributes:
        last_stall_s: The stall measured after the last rebuild, None before one.
    """

    def __init__(self, controller: Any) -> None:
        self._controller = controller
        self._epoch_step: int | None = None
        self._epoch_s: float | None = None
        self._epoch_batches: int | None = None
        self._startup: dict[tuple[int, bool], float] = {}
        self.last_stall_s: float | None = None

    def epoch_started(self, now_s: float, step: int) -> None:
        """An epoch starts at ``step``: the last one's length in batches is known now."""
        if self._epoch_step is not None and step > self._epoch_step:
            self._epoch_batches = step - self._epoch_step
        self._epoch_step, self._epoch_s = step, now_s

    def measure(
        self, warm: Warmup | None, loop: LoopWindow, metrics: WindowMetrics, config: LoaderConfig, now_s: float
    ) -> dict[str, Any]:
        """What the job paid beyond the steady pace, told to the controller: the stall of the
        last rebuild (measured on the first window after its warm-up) and the workers' start-up
        each epoch pays while they are not persistent."""
        out: dict[str, Any] = {}
        key = (config.num_workers, config.persistent_workers)
        if warm is not None and metrics.batches_per_s > 0 and loop.start_s >= warm.t0:
            # From the decision (or the run's start) to this window's first batch, less what
            # the warm-up batches (and the deciding batch's step) take at the pace measured now.
            stall = max(0.0, loop.start_s - warm.t0 - (warm.batches + 1) / metrics.batches_per_s)
            if warm.priced:
                self.last_stall_s = stall
                out["stall_s"] = round(stall, 4)
                if warm.new_workers:
                    self._controller.costs.note_stall(stall)
            if warm.new_workers and config.num_workers > 0 and not config.persistent_workers:
                # Every epoch starts these workers again (the run's start measures it too).
                self._startup[key] = stall
        if metrics.epoch_start_wait_s is not None and config.num_workers > 0:
            self._startup[key] = max(0.0, metrics.epoch_start_wait_s - metrics.wait_s_per_batch)
        startup = self._startup.get(key) if config.num_workers > 0 and not config.persistent_workers else None
        epoch_s = None
        if metrics.batches_per_s > 0:
            if self._epoch_batches:
                epoch_s = self._epoch_batches / metrics.batches_per_s
            elif startup is not None and startup >= _LONG_STARTUP_S and self._epoch_s is not None:
                # The first epoch is at least as long as it has run; a slow start-up (spawn,
                # forkserver) is worth judging on that bound rather than waiting an epoch.
                epoch_s = max(now_s - self._epoch_s, 1e-3)
        if startup is not None:
            out["startup_s"] = round(startup, 4)
        if epoch_s is not None:
            out["epoch_s"] = round(epoch_s, 3)
        self._controller.costs.note_startup(startup, epoch_s)
        return out

    def job_metrics(self, metrics: WindowMetrics, config: LoaderConfig) -> WindowMetrics:
        """The window's rates as the job pays them: workers that start again at every epoch
        cost their start-up once per epoch (the steady rate leaves it out)."""
        if config.num_workers == 0 or config.persistent_workers:
            return metrics
        share = self._controller.costs.startup_share()
        if share is None or share <= 0.0:
            return metrics
        f = 1.0 - share
        return dataclasses.replace(metrics, samples_per_s=metrics.samples_per_s * f, batches_per_s=metrics.batches_per_s * f)


class Warmup:
    """The warm-up after a rebuild (or the run's start): from when (the decision), how many
    batches, at which step; ``priced`` when its stall is a change's cost to measure."""

    __slots__ = ("batches", "extended", "new_workers", "priced", "reopened", "step", "t0")

    def __init__(self, t0: float, batches: int, step: int, *, priced: bool = True) -> None:
        self.t0 = t0
        self.batches = batches
        self.step = step
        self.priced = priced
        self.reopened = False
        self.extended = False
        self.new_workers = True


class _Tally:
    """Samples and loop seconds summed over windows, for a run's rates."""

    __slots__ = ("samples", "seconds")

    def __init__(self) -> None:
        self.samples = 0
        self.seconds = 0.0

    def add(self, samples: int, seconds: float) -> None:
        self.samples += samples
        self.seconds += seconds

    def rate(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 and self.samples else None
