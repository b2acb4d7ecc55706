"""When a measurement window closes: one rule for early, regular and distributed windows.

A window closes once it has lasted ``window_s`` and counted ``min_window_batches``. The very
first window of a run may close after 0.5 s and a few batches when the loop mostly waits without
workers: that needs no long measurement, and every second spent starved is lost throughput.
Under ``torch.distributed`` windows are counted in steps instead of seconds, so every rank closes
its window, and takes the collective decision, at the same step.

The hot path reads two fields, ``deadline_s`` and ``step``; everything else runs once a window.
"""

from __future__ import annotations

import math

__all__ = ["WindowSchedule"]

#: The first look: how soon it may close, on how few batches, and how much waiting it needs.
EARLY_WINDOW_S = 0.5
EARLY_WINDOW_BATCHES = 4
EARLY_WAIT_SHARE = 0.5


class WindowSchedule:
    """The window in progress: when it may close, and whether it may close early.

    Args:
        window_s: Least seconds per window.
        min_batches: Least batches per window.
        distributed: Count windows in steps (identical on every rank) instead of seconds.

    Attributes:
        deadline_s: ``time.perf_counter()`` from which the window may close (``-inf`` when
            distributed, ``inf`` before the first epoch).
        step: The step from which it may close.
    """

    __slots__ = ("_early", "_opened_s", "_opened_step", "deadline_s", "distributed", "min_batches", "step", "steps_per_window", "window_s")

    def __init__(self, window_s: float, min_batches: int, *, distributed: bool = False) -> None:
        self.window_s = window_s
        self.min_batches = min_batches
        self.distributed = distributed
        self.steps_per_window = max(4 * min_batches, 40)
        self.deadline_s = math.inf
        self.step = 0
        self._opened_s = 0.0
        self._opened_step = 0
        self._early = not distributed

    @property
    def started(self) -> bool:
        """Whether a window has been opened yet."""
        return self.deadline_s != math.inf

    def due(self, now_s: float, step: int) -> bool:
        """Whether the window may close now (the per-batch check, inlined by the hot path)."""
        return now_s >= self.deadline_s and step >= self.step

    def open(self, now_s: float, step: int, discard: int = 0) -> None:
        """Opens the next window at ``step``, after ``discard`` warm-up batches."""
        start = step + discard
        if self.distributed:
            self.deadline_s = -math.inf
            self.step = start + self.steps_per_window
            return
        self._opened_s, self._opened_step = now_s, start
        if self._early:
            self.deadline_s = now_s + min(self.window_s, EARLY_WINDOW_S)
            self.step = start + min(self.min_batches, EARLY_WINDOW_BATCHES)
        else:
            self.deadline_s = now_s + self.window_s
            self.step = start + self.min_batches

    def call_back(self, now_s: float, step: int, after_s: float) -> None:
        """No window closes for now: the front end is called at the next batch after
        ``after_s`` instead (to check on workers starting in the background)."""
        self.deadline_s = now_s + after_s
        self.step = step + 1

    def ready(self, now_s: float, step: int, *, wait_share: float, num_workers: int) -> bool:
        """Whether a due window closes now, or is extended to the full length.

        The early close is for the first look only, and only without workers: then the training
        thread's own CPU time already tells CPU work from waiting (with workers, the host source
        needs a few readings), and a loop waiting at least half its time is clearly starved.
        """
        if self.distributed:
            return True
        early = self._early
        self._early = False
        if early and wait_share >= EARLY_WAIT_SHARE and num_workers == 0:
            return True
        if now_s < self._opened_s + self.window_s or step < self._opened_step + self.min_batches:
            self.deadline_s = self._opened_s + self.window_s
            self.step = self._opened_step + self.min_batches
            return False
        return True

    def extend(self, batches: int) -> None:
        """Pushes a distributed window's end back by ``batches`` (a warm-up every rank shares)."""
        self.step += batches

    def set_rate(self, batches_per_s: float) -> None:
        """Sizes distributed windows to last about ``window_s`` at this (all-rank) rate."""
        if batches_per_s > 0 and math.isfinite(batches_per_s):
            self.steps_per_window = max(self.min_batches, math.ceil(self.window_s * batches_per_s))
