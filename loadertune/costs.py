"""What a configuration change costs the job beyond its steady pace (issue 13)."""

from __future__ import annotations

import math

from loadertune.config import LoaderConfig

__all__ = ["JobCosts"]


class JobCosts:
    """What configuration changes cost the job beyond its steady pace.

    A rebuild stalls the loop while new workers start (and old ones stop); workers that are not
    persistent start again at every epoch. The controller weighs a change's expected gain
    against these, measured on this job.

    Args:
        min_horizon_s: Least time a change is expected to run for, to pay back its stall.
    """

    def __init__(self, min_horizon_s: float) -> None:
        self.min_horizon_s = min_horizon_s
        self.stall_s: float | None = None
        self.startup_s: float | None = None
        self.epoch_s: float | None = None
        self.first_s: float | None = None

    def started(self, start_s: float) -> None:
        """The run's first measured moment (the horizon grows with the run's age)."""
        if self.first_s is None:
            self.first_s = start_s

    def note_stall(self, stall_s: float) -> None:
        """The loop's measured stall at the last rebuild beyond its steady pace: the time the
        job lost to it (new workers starting, old ones stopping, less what the new workers'
        prefetched backlog gave back). Later changes are judged against it."""
        if not math.isfinite(stall_s):
            return
        stall_s = max(0.0, stall_s)
        # Start-up grows with the workers started: the largest seen is the cautious estimate,
        # slowly forgotten so one slow rebuild does not freeze tuning for good.
        prev = self.stall_s
        self.stall_s = stall_s if prev is None else max(stall_s, 0.8 * prev + 0.2 * stall_s)

    def note_startup(self, startup_s: float | None, epoch_s: float | None) -> None:
        """Worker start-up each epoch pays (an epoch's first wait, or a rebuild's stall) and an
        epoch's length in seconds at the current pace (None while unknown)."""
        if startup_s is not None and math.isfinite(startup_s):
            self.startup_s = max(0.0, startup_s)
        if epoch_s is not None and math.isfinite(epoch_s) and epoch_s > 0:
            self.epoch_s = epoch_s

    def startup_share(self) -> float | None:
        """Worker start-up as a share of an epoch with it (None while either is unknown)."""
        if self.startup_s is None or self.epoch_s is None:
            return None
        return self.startup_s / (self.startup_s + self.epoch_s)

    def horizon(self, now_s: float) -> float:
        """How long a change is expected to run: the run's age, at least the minimum horizon."""
        age = now_s - self.first_s if self.first_s is not None else 0.0
        return max(self.min_horizon_s, age)

    def expected_stall(self, c: LoaderConfig, new: LoaderConfig) -> float:
        """The stall a rebuild from ``c`` to ``new`` is expected to cost (0 when none was measured)."""
        if self.stall_s is None:
            return 0.0
        if (new.num_workers, new.batch_size) == (c.num_workers, c.batch_size) and (
            new.persistent_workers or not c.persistent_workers
        ):
            return 0.0  # prefetch, pinning or persistence: no new workers to start
        return self.stall_s

    def revert_cost(self, current: LoaderConfig, previous: LoaderConfig, now_s: float) -> float:
        """Going back to ``previous``, as a share of throughput over the horizon."""
        stall = self.expected_stall(current, previous)
        return stall / self.horizon(now_s) if stall else 0.0
