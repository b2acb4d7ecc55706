"""Drift: once tuning has converged, whether the job's pace moved away from where it was left."""

from __future__ import annotations

from loadertune.metrics import WindowMetrics

__all__ = ["DriftWatch"]

# Wait share from which waiting more counts as drift (below it the loop is not input-bound).
_WAITING_SHARE = 0.2
# Windows in a row that must agree: one slow window (a checkpoint, a GC pause) is not drift.
_DRIFT_WINDOWS = 2


class DriftWatch:
    """Compares each window against the reference taken when tuning converged.

    Drift is throughput ``share`` below the reference, or the wait share ``share`` above it
    into the input-bound range, in two windows in a row.

    Args:
        share: The relative change that counts as drift (e.g. 0.25).

    Attributes:
        rate: The reference samples/s (None: the next window sets it).
        wait: The reference wait share.
    """

    def __init__(self, share: float) -> None:
        self.share = share
        self.rate: float | None = None
        self.wait: float | None = None
        self._windows = 0

    def anchor(self, rate: float, wait: float) -> None:
        """Takes a new reference (tuning just converged at this pace)."""
        self.rate, self.wait = rate, wait
        self._windows = 0

    def forget(self) -> None:
        """Drops the reference: the next window measured sets it."""
        self.rate = None
        self._windows = 0

    def drifted(self, metrics: WindowMetrics) -> bool:
        """Adds one window; True when it and the one before both drifted."""
        if self.rate is None:
            self.anchor(metrics.samples_per_s, metrics.wait_share)
            return False
        slower = metrics.samples_per_s < (1.0 - self.share) * self.rate
        waiting = metrics.wait_share >= _WAITING_SHARE and metrics.wait_share > (self.wait or 0.0) + self.share
        self._windows = self._windows + 1 if (slower or waiting) else 0
        return self._windows >= _DRIFT_WINDOWS
