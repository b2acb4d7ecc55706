"""The adaptive worker sweep of ``loadertune probe``, as pure decisions.

Nothing here starts a process or reads a clock: the measuring side (``loadertune.cli.probe``)
feeds in batch intervals and elapsed times and asks what to do next. The rules:

- A point's rate is known once its relative standard error is below :data:`TARGET_REL_STDERR`,
  estimated by batch means over blocks of about one round of the workers (batches arrive in
  bursts, one per worker, so single intervals are not independent).
- Each point may spend its share of what is left of the budget (the rest divided by the points
  still to measure), so time a fast point saves goes to the later ones.
- Climbing stops past the knee: after :data:`KNEE_PATIENCE` successive points that did not beat
  the best rate so far by more than :data:`KNEE_GAIN`.
- The recommendation is the smallest worker count within :data:`NEAR_BEST` of the best rate:
  fewer processes use less RAM and /dev/shm for the same throughput.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KNEE_GAIN",
    "KNEE_PATIENCE",
    "MAX_WORKERS",
    "NEAR_BEST",
    "TARGET_REL_STDERR",
    "Point",
    "Recommendation",
    "block_size",
    "default_workers",
    "knee_index",
    "parse_workers",
    "point_budget_s",
    "point_done",
    "recommend",
    "rel_stderr",
    "should_stop",
    "warmup_batches",
]

#: Relative standard error of a point's rate below which it counts as measured.
TARGET_REL_STDERR = 0.03
#: A point must beat the best rate so far by more than this share to count as a gain.
KNEE_GAIN = 0.05
#: Successive points without a gain after which the climb stops.
KNEE_PATIENCE = 2
#: The recommendation is the smallest worker count whose rate is within this share of the best.
NEAR_BEST = 0.05
#: Largest worker count ``--workers`` accepts.
MAX_WORKERS = 256
#: Blocks of batches needed before a standard error is trusted.
MIN_BLOCKS = 8
#: Least measuring time per point, so a lucky run of a few even batches does not end it.
MIN_POINT_S = 1.0

# Counts worth trying, denser where each step changes most; cut at the cap.
_LADDER = (0, 1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class Point:
    """One measured worker count.

    Attributes:
        num_workers: Worker processes.
        samples_per_s: Samples per second after the warm-up.
        batches: Batches measured (after the warm-up).
        seconds: Time measured (after the warm-up).
        rel_stderr: Relative standard error of the rate; None when too few batches to tell.
        worker_mem_bytes: Memory per worker (PSS, else RSS) at the end of the point; None
            without workers or when unreadable.
        warmup_s: Time to the end of the warm-up (worker start-up and first batches).
        cpu_pct: Busy share of all CPUs during the point, 0-100; None when unknown.
        stopped: Why the point ended: ``"precise"``, ``"budget"`` or ``"interrupted"``.
    """

    num_workers: int
    samples_per_s: float
    batches: int
    seconds: float
    rel_stderr: float | None
    worker_mem_bytes: int | None = None
    warmup_s: float = 0.0
    cpu_pct: float | None = None
    stopped: str = "precise"

    def to_dict(self) -> dict[str, Any]:
        """The point as a JSON-ready dict."""
        return {
            "num_workers": self.num_workers,
            "samples_per_s": round(self.samples_per_s, 2),
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
            "rel_stderr": None if self.rel_stderr is None else round(self.rel_stderr, 4),
            "worker_mem_bytes": self.worker_mem_bytes,
            "warmup_s": round(self.warmup_s, 3),
            "cpu_pct": None if self.cpu_pct is None else round(self.cpu_pct, 1),
            "stopped": self.stopped,
        }


@dataclass(frozen=True)
class Recommendation:
    """The worker count to use and what it needs.

    Attributes:
        point: The measured point recommended.
        best: The fastest measured point.
        ram_bytes: RAM the workers need (workers x per-worker memory); None when unknown.
        shm_bytes: /dev/shm the batches in flight need (workers x prefetch x batch bytes);
            None when the batch size in bytes is unknown.
    """

    point: Point
    best: Point
    ram_bytes: int | None
    shm_bytes: int | None


def parse_workers(text: str) -> tuple[int, ...]:
    """Parses a ``--workers`` value into sorted, distinct worker counts.

    Accepted items, separated by commas: a count (``4``), an inclusive range (``0-8``: 0 to 8),
    or an inclusive stepped range (``0:16:4``: 0, 4, 8, 12, 16; ``2:6`` steps by 1). E.g.
    ``0,1,2,4-8,12:32:4``.

    Raises:
        ValueError: The text is not of that form, a range runs backwards, a step is not
            positive, or a count is above :data:`MAX_WORKERS`; the message says which item.
    """
    counts: set[int] = set()
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ValueError(
            f"--workers {text!r}: expected counts like 0,1,2,4 or a range like 0-8 or 0:16:2"
        )
    for item in items:
        counts.update(_parse_item(item, text))
    return tuple(sorted(counts))


def _parse_item(item: str, text: str) -> range:
    def number(part: str) -> int:
        part = part.strip()
        if not part.isdigit():
            raise ValueError(
                f"--workers {text!r}: {item!r} is not a count, a range A-B or a range A:B:STEP "
                "of whole numbers >= 0"
            )
        value = int(part)
        if value > MAX_WORKERS:
            raise ValueError(
                f"--workers {text!r}: {value} is above the limit of {MAX_WORKERS} workers"
            )
        return value

    if ":" in item:
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(
                f"--workers {text!r}: {item!r} should be START:STOP or START:STOP:STEP"
            )
        start, stop = number(parts[0]), number(parts[1])
        step = number(parts[2]) if len(parts) == 3 else 1
        if step == 0:
            raise ValueError(f"--workers {text!r}: the step in {item!r} must be 1 or more")
    elif "-" in item:
        parts = item.split("-")
        if len(parts) != 2:
            raise ValueError(f"--workers {text!r}: {item!r} should be a range START-STOP, e.g. 0-8")
        start, stop, step = number(parts[0]), number(parts[1]), 1
    else:
        value = number(item)
        return range(value, value + 1)
    if stop < start:
        raise ValueError(
            f"--workers {text!r}: the range {item!r} runs backwards; write it low to high"
        )
    return range(start, stop + 1, step)


def default_workers(cap: int) -> tuple[int, ...]:
    """The worker counts tried without ``--workers``: 0, 1, 2, 4, 6, 8, 12, 16, ... up to ``cap``.

    Args:
        cap: The largest count to try (``loadertune.planning.default_max_workers`` of the
            usable CPUs: latency-bound loads keep scaling past the core count).
    """
    counts = [w for w in _LADDER if w <= cap]
    if counts[-1] != cap and cap <= MAX_WORKERS:
        counts.append(cap)
    return tuple(counts)


def warmup_batches(num_workers: int, prefetch_factor: int = 2) -> int:
    """Batches discarded before measuring.

    Workers start one after another, and the first ones finish batches while the last still
    start: up to ``num_workers x prefetch_factor`` batches can be waiting when the loop first
    asks. Counting them would overstate the rate, so they all go, plus one.
    """
    return max(2, num_workers * prefetch_factor + 1)


def block_size(num_workers: int) -> int:
    """Batches per block for the standard error: about one round of the workers."""
    return max(2, num_workers)


def rel_stderr(intervals: Sequence[float], block: int) -> float | None:
    """Relative standard error of the mean batch interval (so of the rate), by batch means.

    Args:
        intervals: Seconds between successive batches, warm-up excluded.
        block: Batches per block; blocks rather than single intervals are treated as
            independent.

    Returns:
        The relative standard error, or None with fewer than :data:`MIN_BLOCKS` blocks.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block!r}")
    blocks = len(intervals) // block
    if blocks < MIN_BLOCKS:
        return None
    sums = [math.fsum(intervals[i * block : (i + 1) * block]) for i in range(blocks)]
    mean = statistics.fmean(sums)
    if mean <= 0:
        return None
    return statistics.stdev(sums) / mean / math.sqrt(blocks)


def point_done(
    intervals: Sequence[float], block: int, measured_s: float, elapsed_s: float, budget_s: float
) -> str | None:
    """Whether a point has measured enough.

    Args:
        intervals: Batch intervals measured so far, warm-up excluded.
        block: See :func:`block_size`.
        measured_s: Time measured after the warm-up.
        elapsed_s: Time since the point started, warm-up included.
        budget_s: The point's share of the budget (see :func:`point_budget_s`).

    Returns:
        ``"precise"`` when the rate is known well enough, ``"budget"`` when the share is spent,
        else None. A point never ends before two blocks (two rounds of its workers): a rate
        over less than a round says more about the order the workers started in than about
        their speed, so a tiny budget may be overrun by that much.
    """
    if measured_s >= MIN_POINT_S:
        err = rel_stderr(intervals, block)
        if err is not None and err < TARGET_REL_STDERR:
            return "precise"
    if elapsed_s >= budget_s and len(intervals) >= 2 * block:
        return "budget"
    return None


def point_budget_s(remaining_s: float, points_left: int) -> float:
    """A point's share of the budget: what is left, split evenly over the points still to come."""
    return max(0.0, remaining_s) / max(1, points_left)


def knee_index(
    rates: Sequence[float], gain: float = KNEE_GAIN, patience: int = KNEE_PATIENCE
) -> int | None:
    """Index of the point after which ``patience`` successive points brought no gain.

    A point is a gain when its rate beats the best before it by more than ``gain``.

    Returns:
        The index of the last point that was a gain (the knee), or None while the climb goes
        on (fewer than ``patience`` points without a gain since the last one).
    """
    if not rates:
        return None
    best = rates[0]
    knee = 0
    stale = 0
    for i, rate in enumerate(rates[1:], start=1):
        if rate > best * (1.0 + gain):
            knee, stale = i, 0
        else:
            stale += 1
        best = max(best, rate)
        if stale >= patience:
            return knee
    return None


def should_stop(points: Sequence[Point], adaptive: bool) -> bool:
    """Whether to stop climbing: past the knee (only for the default, adaptive sequence)."""
    return adaptive and knee_index([p.samples_per_s for p in points]) is not None


def recommend(
    points: Sequence[Point],
    *,
    batch_bytes: int | None,
    prefetch_factor: int,
    near_best: float = NEAR_BEST,
) -> Recommendation | None:
    """The smallest measured worker count within ``near_best`` of the best rate.

    Args:
        points: The measured points.
        batch_bytes: Bytes of one collated batch, None when unknown.
        prefetch_factor: Batches each worker holds ahead.
        near_best: Share of the best rate a point may lose and still be recommended.

    Returns:
        The recommendation, or None when nothing was measured.
    """
    measured = [p for p in points if p.samples_per_s > 0]
    if not measured:
        return None
    best = max(measured, key=lambda p: p.samples_per_s)
    floor = best.samples_per_s * (1.0 - near_best)
    chosen = min((p for p in measured if p.samples_per_s >= floor), key=lambda p: p.num_workers)
    w = chosen.num_workers
    if w == 0:
        return Recommendation(chosen, best, ram_bytes=0, shm_bytes=0)
    ram = None if chosen.worker_mem_bytes is None else w * chosen.worker_mem_bytes
    shm = None if batch_bytes is None else w * prefetch_factor * batch_bytes
    return Recommendation(chosen, best, ram_bytes=ram, shm_bytes=shm)
