"""The measuring side of the ``loadertune probe`` sweep: loaders, worker processes, clocks.

The decisions (when a point is measured enough, when to stop climbing, what to recommend) are the
pure functions of :mod:`loadertune.cli.sweep`; this module only feeds them measurements. One
DataLoader per point; its workers are shut down before the next point starts, and on Ctrl-C
before the partial results go back to the caller.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from loadertune.cli import UsageError, sweep
from loadertune.cli import _output as out
from loadertune.cli.target import Target
from loadertune.interrupts import sigint_held

__all__ = ["DEFAULT_BATCH_SIZE", "SweepOutcome", "loader_factory", "measure_point", "run_sweep"]

#: The batch size when neither ``--batch-size`` nor the target's DataLoader sets one.
DEFAULT_BATCH_SIZE = 32
#: torch's ``prefetch_factor`` when a loader has workers and sets none.
TORCH_PREFETCH_FACTOR = 2

#: Seconds between two looks at a point's statistics (and progress redraws).
_CHECK_INTERVAL_S = 0.1


def loader_factory(
    target: Target, batch_size: int | None
) -> tuple[Callable[[int], Any], int | None, int]:
    """A function building the target's loader at a given worker count.

    The target DataLoader's sampler, collate_fn, drop_last, worker_init_fn, multiprocessing
    context and generator are kept; only ``num_workers`` (and ``batch_size`` when given) change.
    A bare map-style Dataset is shuffled, as training reads it. Workers are persistent within a
    point, so a short epoch restarts without paying the worker start-up again.

    Returns:
        ``(factory, batch size used, prefetch_factor)``; the batch size is None when the
        loader's own batch_sampler (or ``batch_size=None``) decides the batches.

    Raises:
        UsageError: ``--batch-size`` was given for a loader whose batches it cannot change.
    """
    import torch
    from torch.utils.data import BatchSampler, DataLoader, IterableDataset

    from loadertune.building import TORCH_WORKER_WARNING

    src = target.loader
    dataset = target.dataset
    iterable = isinstance(dataset, IterableDataset)
    pin = bool(src is not None and src.pin_memory and torch.cuda.is_available())
    prefetch = TORCH_PREFETCH_FACTOR
    common: dict[str, Any] = {"pin_memory": pin}
    if src is None:
        bs = batch_size or DEFAULT_BATCH_SIZE
        batching: dict[str, Any] = {"batch_size": bs, "shuffle": not iterable}
    else:
        if src.num_workers > 0 and src.prefetch_factor:
            prefetch = src.prefetch_factor
        common.update(
            collate_fn=src.collate_fn,
            timeout=src.timeout,
            worker_init_fn=src.worker_init_fn,
            multiprocessing_context=src.multiprocessing_context,
            generator=src.generator,
        )
        if hasattr(src, "in_order"):
            common["in_order"] = src.in_order
        if iterable:
            bs = batch_size or src.batch_size
            batching = {"batch_size": bs, "drop_last": src.drop_last}
        elif src.batch_sampler is None or type(src.batch_sampler) is not BatchSampler:
            if batch_size is not None:
                raise UsageError(
                    f"TARGET {target.spec!r}: its DataLoader "
                    + (
                        "has batch_size=None"
                        if src.batch_sampler is None
                        else "has its own batch_sampler"
                    )
                    + ", which decides the batches; drop --batch-size"
                )
            bs = None
            batching = (
                {"batch_size": None, "sampler": src.sampler}
                if src.batch_sampler is None
                else {"batch_sampler": src.batch_sampler}
            )
        else:
            bs = batch_size or src.batch_size
            batching = {
                "batch_size": bs,
                "sampler": src.batch_sampler.sampler,
                "drop_last": src.drop_last,
            }

    def make(num_workers: int) -> Any:
        extra = {"prefetch_factor": prefetch, "persistent_workers": True} if num_workers > 0 else {}
        with warnings.catch_warnings():
            # torch warns past its suggested worker count; the sweep goes there on purpose.
            warnings.filterwarnings("ignore", message=TORCH_WORKER_WARNING)
            return DataLoader(dataset, num_workers=num_workers, **batching, **common, **extra)

    return make, bs, prefetch


@dataclass
class SweepOutcome:
    """What a sweep measured.

    Attributes:
        points: The measured points, in the order measured.
        stopped: Why the sweep ended: ``"knee"``, ``"budget"``, ``"done"`` or ``"interrupted"``.
        batch_bytes: Bytes of one collated batch, None when no tensor was seen.
        interrupted: Whether Ctrl-C ended it.
    """

    points: list[sweep.Point] = field(default_factory=list)
    stopped: str = "done"
    batch_bytes: int | None = None
    interrupted: bool = False


class _Interrupted(Exception):
    def __init__(self, point: sweep.Point | None) -> None:
        super().__init__("interrupted")
        self.point = point


def run_sweep(
    factory: Callable[[int], Any],
    workers: tuple[int, ...],
    budget_s: float,
    *,
    adaptive: bool,
    progress: out.Progress,
    clock: Callable[[], float] = time.monotonic,
) -> SweepOutcome:
    """Measures each worker count in turn until the knee, the budget or the list ends.

    Args:
        factory: Builds the loader for a worker count (see :func:`loader_factory`).
        workers: Worker counts, ascending.
        budget_s: Time for the whole sweep; each point gets its share of what is left.
        adaptive: Stop past the knee (the default sequence); else measure every count given.
        progress: Where to show progress.
        clock: Monotonic clock.

    Returns:
        The outcome; on Ctrl-C the points measured so far with ``interrupted=True``.
    """
    outcome = SweepOutcome()
    start = clock()
    for i, w in enumerate(workers):
        remaining = budget_s - (clock() - start)
        if remaining <= 0 and outcome.points:
            outcome.stopped = "budget"
            break
        share = sweep.point_budget_s(remaining, len(workers) - i)

        def show(text: str) -> None:
            progress.update(clock() - start, text)

        try:
            point, batch_bytes = measure_point(factory(w), w, share, show, clock=clock)
        except _Interrupted as exc:
            if exc.point is not None:
                outcome.points.append(exc.point)
            outcome.stopped, outcome.interrupted = "interrupted", True
            return outcome
        except KeyboardInterrupt:
            # Ctrl-C between points (while building a loader or shutting one down).
            outcome.stopped, outcome.interrupted = "interrupted", True
            return outcome
        outcome.points.append(point)
        if outcome.batch_bytes is None:
            outcome.batch_bytes = batch_bytes
        if sweep.should_stop(outcome.points, adaptive):
            outcome.stopped = "knee"
            break
    return outcome


def measure_point(
    loader: Any,
    num_workers: int,
    budget_s: float,
    show: Callable[[str], None],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[sweep.Point, int | None]:
    """Iterates ``loader`` until its rate is known (or its budget spent), then shuts it down.

    Returns:
        The point and the bytes of one batch.

    Raises:
        _Interrupted: Ctrl-C; carries the partial point when it had a rate.
        UsageError: An epoch yields no batch at all.
    """
    import psutil

    from loadertune.building import TORCH_WORKER_WARNING

    # Without automatic batching (batch_size=None) each item the loader yields is one sample.
    per_item = loader.batch_sampler is None
    block = sweep.block_size(num_workers)
    warm = sweep.warmup_batches(num_workers, getattr(loader, "prefetch_factor", None) or 2)
    intervals: list[float] = []
    samples = 0
    measured_s = 0.0
    warmup_s = 0.0
    batch_bytes: int | None = None
    stopped = "budget"
    mem: int | None = None
    cpu_before = psutil.cpu_times()
    start = clock()
    it: Any = None
    try:
        with _sigint_between_batches() as pressed:
            with warnings.catch_warnings(), sigint_held():
                # torch warns past its suggested worker count; the sweep goes there on purpose.
                warnings.filterwarnings("ignore", message=TORCH_WORKER_WARNING)
                it = iter(loader)
            seen = epoch_batches = 0
            last: float | None = None
            next_check = start
            show(f"num_workers={num_workers}: starting")
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    if pressed:
                        raise KeyboardInterrupt from None
                    if epoch_batches == 0:
                        raise UsageError(
                            "the loader yields no batch at all (an empty dataset, or drop_last with "
                            "fewer samples than one batch); give it data or a smaller --batch-size"
                        ) from None
                    # A short epoch: start the next (persistent workers stay up). The wait across
                    # the boundary counts: a training loop over this dataset pays it every epoch.
                    # Left out, an epoch shorter than what the workers hold in flight measured
                    # the backlog draining (16 workers on 500 samples: 6895 samples/s, where
                    # iterating the loader made ~1100).
                    it = iter(loader)
                    epoch_batches = 0
                    continue
                if pressed:
                    # Ctrl-C, taken between batches: never inside torch's hand-over of a batch,
                    # where it would break a worker's connection mid-transfer.
                    raise KeyboardInterrupt
                now = clock()
                seen += 1
                epoch_batches += 1
                if batch_bytes is None:
                    batch_bytes = _nbytes(batch)
                if last is not None:
                    intervals.append(now - last)
                    measured_s += now - last
                    samples += 1 if per_item else _batch_len(batch)
                if seen >= warm:
                    if last is None and not intervals:
                        warmup_s = now - start
                    last = now
                if now < next_check:
                    continue
                # The statistics walk every interval: a few times a second is enough, and a fast
                # loader's rate is not dragged down by the bookkeeping.
                next_check = now + _CHECK_INTERVAL_S
                err = sweep.rel_stderr(intervals, block)
                rate = samples / measured_s if measured_s > 0 else None
                show(
                    f"num_workers={num_workers}: "
                    + (
                        "warming up"
                        if rate is None
                        else f"{out.fmt_rate(rate)} samples/s"
                        + (f" ±{100 * err:.1f}%" if err is not None else "")
                        + f" ({len(intervals)} batches)"
                    )
                )
                done = sweep.point_done(intervals, block, measured_s, now - start, budget_s)
                if done is not None:
                    stopped = done
                    break
        mem = _worker_mem_bytes(it, num_workers)
    except KeyboardInterrupt:
        partial = None
        if len(intervals) >= 2:
            mem = _worker_mem_bytes(it, num_workers)
            partial = _point(
                num_workers,
                samples,
                measured_s,
                intervals,
                block,
                mem,
                warmup_s,
                None,
                "interrupted",
            )
        raise _Interrupted(partial) from None
    finally:
        _shutdown(it, loader)
    cpu = _busy_pct(cpu_before, psutil.cpu_times())
    return _point(
        num_workers, samples, measured_s, intervals, block, mem, warmup_s, cpu, stopped
    ), batch_bytes


def _point(
    w: int,
    samples: int,
    measured_s: float,
    intervals: list[float],
    block: int,
    mem: int | None,
    warmup_s: float,
    cpu: float | None,
    stopped: str,
) -> sweep.Point:
    return sweep.Point(
        num_workers=w,
        samples_per_s=samples / measured_s if measured_s > 0 else 0.0,
        batches=len(intervals),
        seconds=measured_s,
        rel_stderr=sweep.rel_stderr(intervals, block),
        worker_mem_bytes=mem,
        warmup_s=warmup_s,
        cpu_pct=cpu,
        stopped=stopped,
    )


def _shutdown(it: Any, loader: Any) -> None:
    # Persistent workers live on the loader's own iterator too; both must go.
    with sigint_held():
        for holder in (it, getattr(loader, "_iterator", None)):
            shutdown = getattr(holder, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if getattr(loader, "_iterator", None) is not None:
            loader._iterator = None


@contextlib.contextmanager
def _sigint_between_batches() -> Iterator[list[int]]:
    """Takes Ctrl-C as a request the measuring loop honours at the next batch; a second Ctrl-C
    raises at once (a batch that never comes must not hold the user).

    A KeyboardInterrupt raised while torch receives a batch from a worker breaks the worker's
    side of the file-descriptor hand-over, and the worker prints multiprocessing's traceback.
    """
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    pressed: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _worker_mem_bytes(it: Any, num_workers: int) -> int | None:
    """Mean memory per worker: PSS (shared copy-on-write pages split fairly), else RSS."""
    import psutil

    workers = getattr(it, "_workers", None) or []
    if num_workers == 0 or not workers:
        return None
    total = counted = 0
    for w in workers:
        try:
            proc = psutil.Process(w.pid)
            try:
                total += proc.memory_full_info().pss
            except (psutil.AccessDenied, AttributeError):
                total += proc.memory_info().rss
            counted += 1
        except (psutil.Error, ValueError, TypeError):
            continue
    return math.ceil(total / counted) if counted else None


def _busy_pct(before: Any, after: Any) -> float | None:
    total = sum(after) - sum(before)
    if total <= 0:
        return None
    idle = (after.idle + getattr(after, "iowait", 0.0)) - (
        before.idle + getattr(before, "iowait", 0.0)
    )
    return max(0.0, min(100.0, 100.0 * (total - idle) / total))


def _batch_len(batch: Any) -> int:
    """Samples in a collated batch: the first dimension of its first tensor."""
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict) and batch:
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        if isinstance(first, (torch.Tensor, dict, list, tuple)):
            return _batch_len(first)
        return len(batch)
    return 1


def _nbytes(batch: Any) -> int | None:
    """Bytes of the tensors in a collated batch; None when it holds no tensor."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.element_size() * batch.nelement()
    parts: list[Any] = []
    if isinstance(batch, dict):
        parts = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        parts = list(batch)
    sizes = [s for s in (_nbytes(p) for p in parts) if s is not None]
    return sum(sizes) if sizes else None
