"""The keep-or-revert test: windows before a change against windows after it.

A window's throughput becomes a :class:`WindowSample` (log rate and its own noise);
:class:`WindowNoise` pools the spread between windows of one configuration over the run;
:func:`compare_windows` is the test, and :class:`Trial` one change under it. Pure logic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from loadertune.config import LoaderConfig
from loadertune.metrics import WindowMetrics

__all__ = [
    "Comparison",
    "Trial",
    "WindowNoise",
    "WindowSample",
    "compare_windows",
    "final_bar",
    "is_cheaper",
    "mean_rate",
    "spread",
    "window_sample",
]

# Windows' worth of evidence behind the prior between-window spread.
_PRIOR_DOF = 4
# Windows after a change before a verdict may go the way a tie goes (revert a costlier change,
# keep a cheaper one).
_MIN_TIE_SIDE_WINDOWS = 3
# Standard errors by which a gain of the least effect clears the final bar (see final_bar).
_Z_POWER = 2.0


@dataclass(frozen=True)
class WindowSample:
    """One window's throughput as the keep/revert test uses it."""

    log_rate: float  # log(samples/s): ratios become differences, gains and losses symmetric
    rate: float  # samples/s, for the log
    rel_var: float  # the window's own relative variance of the rate (rate_rel_stderr squared)
    batches: int




@dataclass(frozen=True)
class Comparison:
    """The keep/revert test on before and after windows.

    Attributes:
        gain: Estimated relative throughput change, after/before - 1.
        stderr: Standard error of ``log(after/before)`` (about that of ``gain``).
        bar: The gain the change must beat: ``+tie_band`` for a costlier change, ``-tie_band``
            for a cheaper one (within the band the cheaper configuration wins).
        verdict: "keep", "revert", or "undecided" (the difference is within the noise of the
            bar: measure more).
        before_windows: Windows behind the "before" figure.
        after_windows: Windows behind the "after" figure.
    """

    gain: float
    stderr: float
    bar: float
    verdict: Literal["keep", "revert", "undecided"]
    before_windows: int
    after_windows: int

    def describe(self) -> str:
        """The figures for a log line: "+4.1% ± 1.2% over 3+2 windows, bar +3%"."""
        return (
            f"{self.gain:+.1%} ± {self.stderr:.1%} over {self.before_windows}+{self.after_windows} "
            f"windows, bar {self.bar:+.0%}"
        )


def compare_windows(
    before: list[WindowSample],
    after: list[WindowSample],
    *,
    cheaper: bool,
    tie_band: float,
    between_var: float,
    z: float,
    revert_cost: float = 0.0,
) -> Comparison:
    """Compares the mean log rate of two sets of windows against the bar ``±tie_band``.

    Each side's variance is that of a mean of windows: every window contributes its own
    measured noise plus ``between_var`` (what moves whole windows: other processes, page
    cache, thermal), so repeating windows is what shrinks it. A side of one short window is
    therefore never mistaken for a precise one.

    ``revert_cost`` is what going back would cost the job, as a share of its throughput over
    the horizon it is judged on (a rebuild stalls the loop: workers start again). The change
    itself is paid for; keeping it loses only what it is slower by, so the bar drops by that
    share (bounded at -50%).
    """
    def side(samples: list[WindowSample]) -> tuple[float, float]:
        k = len(samples)
        mean = sum(x.log_rate for x in samples) / k
        var = sum(x.rel_var + between_var for x in samples) / (k * k)
        return mean, var

    mb, vb = side(before)
    ma, va = side(after)
    d = ma - mb
    se = math.sqrt(vb + va)
    cost = min(0.5, max(0.0, revert_cost))
    bar = math.log1p(max(-0.5, (-tie_band if cheaper else tie_band) - cost))
    verdict: Literal["keep", "revert", "undecided"] = "undecided"
    if d - bar >= z * se:
        verdict = "keep"
    elif d - bar <= -z * se:
        verdict = "revert"
    return Comparison(
        gain=math.expm1(d),
        stderr=se,
        bar=math.expm1(bar),
        verdict=verdict,
        before_windows=len(before),
        after_windows=len(after),
    )


def window_sample(metrics: WindowMetrics) -> WindowSample | None:
    if metrics.samples_per_s <= 0 or metrics.batches <= 0:
        return None
    return WindowSample(
        math.log(metrics.samples_per_s), metrics.samples_per_s, metrics.rate_rel_stderr**2, metrics.batches
    )


def spread(samples: list[WindowSample]) -> tuple[float, int]:
    """Squared deviations between the windows of one configuration beyond their own noise."""
    k = len(samples)
    if k < 2:
        return 0.0, 0
    mean = sum(x.log_rate for x in samples) / k
    ss = sum((x.log_rate - mean) ** 2 for x in samples)
    own = sum(x.rel_var for x in samples) / k
    # What the windows' own noise explains is not spread between windows.
    return max(0.0, ss - (k - 1) * own), k - 1


def mean_rate(samples: list[WindowSample]) -> float:
    """Geometric mean of the windows' rates (each window weighs alike, as in the test)."""
    if not samples:
        return 0.0
    if len(samples) == 1:
        return samples[0].rate
    return math.exp(sum(x.log_rate for x in samples) / len(samples))


def is_cheaper(old: LoaderConfig, new: LoaderConfig) -> bool:
    """Whether ``new`` costs no more than ``old``: no more workers, no larger batch or prefetch."""
    return (
        new.num_workers <= old.num_workers
        and (new.batch_size or 0) <= (old.batch_size or 0)
        and (new.prefetch_factor or 0) * new.num_workers <= (old.prefetch_factor or 0) * old.num_workers
    )


class WindowNoise:
    """How much windows at one configuration differ, pooled over the run.

    A window's own standard error misses what moves between windows (other jobs, caches,
    data order); the relative spread between windows of one configuration, pooled over every
    configuration measured, adds it. It starts from a prior (a few degrees of freedom at
    ``prior``) so the first trials are not judged on no spread at all.

    Args:
        prior: The relative spread assumed before any is measured (e.g. 0.02).
    """

    def __init__(self, prior: float) -> None:
        self.ss = _PRIOR_DOF * prior**2
        self.dof = float(_PRIOR_DOF)

    def variance(self, *open_groups: list[WindowSample]) -> float:
        """Pooled relative variance between windows, counting groups still being measured."""
        ss, dof = self.ss, self.dof
        for group in open_groups:
            g_ss, g_dof = spread(group)
            ss, dof = ss + g_ss, dof + g_dof
        return max(0.0, ss / dof)

    def learn(self, samples: list[WindowSample]) -> None:
        """Adds one configuration's windows to the pool."""
        ss, dof = spread(samples)
        self.ss += ss
        self.dof += dof

    def stderr(self, samples: list[WindowSample]) -> float:
        """Relative standard error of the mean rate of ``samples`` (inf without any)."""
        k = len(samples)
        if not k:
            return math.inf
        between = self.variance(samples)
        return math.sqrt(sum(x.rel_var + between for x in samples)) / k


@dataclass
class Trial:
    """One change under the keep-or-revert test.

    Attributes:
        previous: The configuration before the change (what a revert goes back to).
        before: Its windows, measured before the change.
        lr_factor: The learning-rate factor the change applied (a revert undoes it).
        cheaper: Whether the change costs no more than ``previous`` (the tie goes its way).
        after: Windows measured since the change.
    """

    previous: LoaderConfig
    before: list[WindowSample]
    lr_factor: float | None
    cheaper: bool
    after: list[WindowSample] = field(default_factory=list)

    def judge(
        self,
        sample: WindowSample | None,
        *,
        noise: WindowNoise,
        tie_band: float,
        z: float,
        max_windows: int,
        revert_cost: float = 0.0,
        min_effect: float = 0.05,
    ) -> tuple[Literal["keep", "revert", "measure"], Comparison | None]:
        """Adds one window after the change and tests it.

        Returns:
            The verdict ("measure": not yet clear, measure another window) and the comparison
            it stands on (None while either side has no window: with nothing to compare
            against the change is kept, a window without batches is measured again). A revert,
            and a cheaper change's keep, need three windows after the change; after
            ``max_windows`` the estimate decides alone against :func:`final_bar`: a gain of
            ``min_effect`` is still kept (a loss of it, for a cheaper change, reverted) ~95% of
            the time, and a tie the estimate cannot split goes to the cheaper configuration.
        """
        if sample is not None:
            self.after.append(sample)
        if not self.before or not self.after:
            if sample is None and len(self.after) < max_windows:
                return "measure", None
            return "keep", None
        cmp = compare_windows(
            self.before,
            self.after,
            cheaper=self.cheaper,
            tie_band=tie_band,
            between_var=noise.variance(self.before, self.after),
            z=z,
            revert_cost=revert_cost,
        )
        tie_side = "keep" if self.cheaper else "revert"
        if cmp.verdict in ("revert", tie_side) and len(self.after) < min(_MIN_TIE_SIDE_WINDOWS, max_windows):
            # A window or two never revert: the first after a rebuild can be an outlier (a
            # burst from another process, workers still warming), and a revert caps that
            # setting for the rest of the run. Nor do they keep a cheaper change: with a
            # precise "before" the first looks are where a sequential test errs most (half
            # the wrong verdicts at ±5% on a noisy slow loop in a 300-trial check of
            # bench/accuracy.py's model came from them).
            return "measure", cmp
        if cmp.verdict != "undecided":
            return cmp.verdict, cmp
        if len(self.after) < max_windows:
            return "measure", cmp
        bar = final_bar(cmp, cheaper=self.cheaper, min_effect=min_effect)
        return ("keep" if math.log1p(cmp.gain) > bar else "revert"), cmp


def final_bar(cmp: Comparison, *, cheaper: bool, min_effect: float) -> float:
    """The log gain the estimate alone must beat once a trial has measured all its windows.

    The tie band's edge alone keeps a true gain of ``min_effect`` (a costlier change) only as
    often as the noise allows: 85% at +5% on a noisy loop (bench/ACCURACY.md), with a 1.6%
    standard error and the edge at +3%. So the bar moves toward no change until a gain of
    ``min_effect`` clears it by two standard errors; never past no change, so a tie the
    estimate cannot split still goes to the cheaper configuration. Two, not the one-sided
    95% quantile 1.645: the trials still open at the last window are the ones whose early
    looks read low, so their estimates lean toward the bar. A cheaper change mirrors it: a
    loss of ``min_effect`` is reverted.
    """
    bar = math.log1p(cmp.bar)
    reach = _Z_POWER * cmp.stderr
    if not cheaper:
        return min(bar, max(0.0, math.log1p(min_effect) - reach))
    return max(bar, min(0.0, math.log1p(-min_effect) + reach))
