"""Worker memory forecast: each worker's PSS against the samples consumed, and where it ends.

Python objects in a dataset (a list of file names, of dicts, of tuples) get their pages copied in
every forked worker as their reference counts change (pytorch issue 13246, "copy-on-read"): the
workers' PSS climbs through the epoch and the OOM killer may strike long after the worker count
was chosen. numpy arrays and tensors hold their data in one buffer and do not grow so.

:class:`MemoryTrend` takes the host source's PSS walks (every few seconds) as points ``(samples
consumed so far, PSS)`` per worker, fits each worker's recent growth with a least-squares line,
and predicts each worker's PSS at the end of the epoch. Only sustained growth counts (the last
increments all rising): a worker that fills a bounded cache and stops is not extrapolated. A
prediction is capped at the worker's RSS when that is known: un-sharing pages it already maps
(copy-on-read, or the parent writing its own pages) brings PSS up to RSS and no further; growth
beyond needs RSS to grow, which the next walks show. Pure logic: plain numbers in, plain numbers
out; no clock, no processes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

__all__ = [
    "FIX",
    "PROBE_WORKERS",
    "MemoryForecast",
    "MemoryTrend",
    "fit_slope",
    "probe_limit",
    "workers_within",
]

#: The fix a copy-on-read warning gives.
FIX = (
    "keep the dataset's index in numpy arrays or tensors (np.array of file names, offsets, labels), "
    "not lists or dicts of Python objects, whose pages every worker copies as it reads them "
    "(pytorch issue 13246)"
)
#: Workers to start from 0 when the budget might not hold the aimed count: measure these first.
PROBE_WORKERS = 2
# Points of one worker's series the slope is fitted on (the recent ones), and the least to fit.
_FIT_POINTS = 6
_MIN_POINTS = 3
# Growth counts as sustained when each of the last increments exceeds this (bytes, and share).
_MIN_STEP_BYTES = 256 * 1024
_MIN_STEP_SHARE = 0.002
# A worker has settled when its last two walks differ by less than this share.
_SETTLED_SHARE = 0.05


def fit_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs`` (0.0 when the xs do not spread)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=False)) / sxx


def workers_within(budget_bytes: int, per_worker_bytes: int, workers: int) -> int:
    """The most workers (fewer than ``workers``, at least 0) whose memory fits the budget, each
    taken at ``per_worker_bytes``."""
    if per_worker_bytes <= 0:
        return max(0, workers - 1)
    return max(0, min(workers - 1, budget_bytes // per_worker_bytes))


def probe_limit(workers: int, aimed: int, budget_bytes: int | None, unmeasured_worker_bytes: int | None) -> int | None:
    """The most workers to step to while a worker's memory is not known to have settled.

    ``unmeasured_worker_bytes`` bounds what one worker could grow to (the training process's
    size: a forked worker shares its pages and copies at most all of them). When ``aimed``
    workers of that size could exceed the budget, the step goes to at most ``max(workers,
    PROBE_WORKERS)``: those are measured before committing to more. None: no limit.
    """
    if budget_bytes is None or unmeasured_worker_bytes is None or aimed <= workers:
        return None
    if aimed * unmeasured_worker_bytes <= budget_bytes:
        return None
    return max(workers, PROBE_WORKERS)


@dataclass(frozen=True)
class MemoryForecast:
    """Where the workers' memory is heading.

    Attributes:
        position: Samples consumed (since the trend began) at the latest walk.
        end_position: Samples consumed at the end of the epoch.
        workers: Workers in the latest walk.
        now_bytes: Their summed PSS now.
        end_bytes: Their summed PSS predicted at the end of the epoch.
        per_worker_end_bytes: The largest worker's predicted PSS at the end of the epoch.
        slope_bytes_per_sample: Summed growth per sample consumed (0 when none is sustained).
        growing: Workers whose growth is sustained.
    """

    position: float
    end_position: float
    workers: int
    now_bytes: int
    end_bytes: int
    per_worker_end_bytes: int
    slope_bytes_per_sample: float
    growing: int

    def crosses(self, budget_bytes: int | None) -> bool:
        """Whether the prediction crosses ``budget_bytes`` (sustained growth only)."""
        return budget_bytes is not None and self.growing > 0 and self.end_bytes > budget_bytes

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready."""
        return {
            "position": self.position,
            "end_position": self.end_position,
            "workers": self.workers,
            "now_bytes": self.now_bytes,
            "end_bytes": self.end_bytes,
            "per_worker_end_bytes": self.per_worker_end_bytes,
            "slope_bytes_per_sample": round(self.slope_bytes_per_sample, 3),
            "growing": self.growing,
        }


class MemoryTrend:
    """Each worker's PSS against samples consumed, across epochs (see the module docstring)."""

    def __init__(self) -> None:
        self._series: dict[int, list[tuple[float, int]]] = {}
        self._latest: dict[int, int] = {}
        self._rss: dict[int, int] = {}
        self._walk: int | None = None
        self._epoch: int | None = None
        self._offset = 0.0
        self._epoch_len: float | None = None
        self._x = 0.0

    def observe(
        self,
        walk: int,
        epoch: int,
        position: float,
        epoch_len: float | None,
        pss_by_pid: dict[int, int],
        rss_by_pid: dict[int, int] | None = None,
    ) -> bool:
        """Adds a PSS walk; returns whether it was new.

        Args:
            walk: The walk's number (the same walk seen twice is taken once).
            epoch: The epoch number.
            position: Samples of this epoch consumed so far.
            epoch_len: Samples in the epoch, None when unknown.
            pss_by_pid: Each current worker's PSS, bytes.
            rss_by_pid: Each worker's RSS at the same walk (caps its prediction), if known.
        """
        if epoch != self._epoch:
            if self._epoch is not None and self._epoch_len is not None:
                self._offset += self._epoch_len
            self._epoch = epoch
        self._epoch_len = epoch_len
        self._x = self._offset + position
        if walk == self._walk:
            return False
        self._walk = walk
        self._latest = dict(pss_by_pid)
        self._rss = dict(rss_by_pid or {})
        for pid in list(self._series):
            if pid not in pss_by_pid:
                del self._series[pid]  # gone: its memory went with it
        for pid, pss in pss_by_pid.items():
            series = self._series.setdefault(pid, [])
            if series and series[-1][0] == self._x:
                series[-1] = (self._x, pss)  # no sample consumed since: the newer reading
            else:
                series.append((self._x, pss))
            del series[:-_FIT_POINTS]
        return True

    def settled_bytes(self) -> int | None:
        """The largest worker's PSS when every worker has stopped growing (its last two walks
        within 5%), else None."""
        if not self._latest:
            return None
        for pid in self._latest:
            series = self._series.get(pid, [])
            if len(series) < 2:
                return None
            a, b = series[-2][1], series[-1][1]
            if abs(b - a) > _SETTLED_SHARE * max(a, 1):
                return None
        return max(self._latest.values())

    def forecast(self) -> MemoryForecast | None:
        """The workers' PSS at the end of the epoch, None without workers or an epoch length."""
        if not self._latest or self._epoch_len is None:
            return None
        end = self._offset + self._epoch_len
        now_total = end_total = 0
        slope_total = 0.0
        largest = 0
        growing = 0
        for pid, pss in self._latest.items():
            series = self._series.get(pid, [])
            slope = _sustained_slope(series)
            last_x = series[-1][0] if series else self._x
            predicted = pss + max(0.0, slope) * max(0.0, end - last_x)
            rss = self._rss.get(pid)
            if rss is not None:
                predicted = min(predicted, max(pss, rss))
            if slope > 0:
                growing += 1
            now_total += pss
            end_total += int(predicted)
            slope_total += max(0.0, slope)
            largest = max(largest, int(predicted))
        return MemoryForecast(
            position=self._x,
            end_position=end,
            workers=len(self._latest),
            now_bytes=now_total,
            end_bytes=end_total,
            per_worker_end_bytes=largest,
            slope_bytes_per_sample=slope_total,
            growing=growing,
        )


def _sustained_slope(series: list[tuple[float, int]]) -> float:
    """The fitted growth per sample of one worker, 0.0 unless its last increments all rise."""
    if len(series) < _MIN_POINTS:
        return 0.0
    recent = series[-_MIN_POINTS:]
    for (x0, y0), (x1, y1) in itertools.pairwise(recent):
        if x1 <= x0 or y1 - y0 < max(_MIN_STEP_BYTES, _MIN_STEP_SHARE * y0):
            return 0.0
    # The recent rate: a worker's first walk may predate its start-up allocations.
    fit = series[-(_MIN_POINTS + 1) :]
    slope = fit_slope([float(x) for x, _ in fit], [float(y) for _, y in fit])
    return slope if math.isfinite(slope) else 0.0
