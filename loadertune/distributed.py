"""Decisions under ``torch.distributed``: every rank measures, rank 0 decides, all follow.

Under DDP the ranks step in lockstep, so they must also change their loaders in lockstep: the
same configuration, at the same step, with the same learning-rate factor. :class:`Collective`
is the small set of collectives :class:`~loadertune.tuned.TunedLoader` needs for that (one
reduction of the window metrics, a max, a broadcast of rank 0's decision), each with a bounded
wait so that a crashed or stalled rank ends the others with a clear error instead of a hang.

How the wait is bounded: the collectives run on a dedicated gloo group created with
``timeout=dist_timeout_s``. Gloo enforces that timeout inside the operation itself (the background
thread gives up and the work fails with "Timed out waiting ... ms"), a dead peer fails it at
once ("Connection closed by peer"), and ``Work.wait(timeout=...)`` is a backstop should the
backend not honour its own timeout. The group is gloo whatever the default backend (NCCL
included): the payloads are a few hundred bytes of CPU tensors, which gloo moves without
touching a CUDA stream, and a separate group keeps these collectives out of the training job's
own ordering.

Forking DataLoader workers: a worker is a ``fork()`` of the training process, and it inherits
every object of that process but none of its threads (gloo's loop and worker threads among
them). :func:`fork_guard` makes the moment of the fork safe: no loadertune collective in flight,
no reference cycle left holding a gloo ``Work`` or a failed collective's frames, no cyclic garbage
for the worker's collector to destroy, and the parent's objects frozen out of the worker's
collector altogether. The code that builds iterators wraps ``iter(loader)`` in it.

``torch.distributed`` is imported only when a :class:`Collective` is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import logging
import math
import os
import pickle
import re
import socket
import time
import traceback
import typing
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch

from loadertune.errors import DistributedTimeoutError
from loadertune.metrics import WindowMetrics

__all__ = ["Collective", "combine_metrics", "fork_guard", "pack_metrics", "unpack_metrics"]

logger = logging.getLogger("loadertune")

# Rank that decides; its pickled Decision/Recommendation is what every rank follows.
_SOURCE_RANK = 0
# Seconds the Work.wait backstop allows beyond the group's own timeout: gloo's failure is the
# better message, so give it the chance to arrive first.
_BACKSTOP_MARGIN_S = 2.0

# Capacity fields come in (used, total) or (available, total) pairs; the decision applies to
# every rank, so it has to fit on the tightest one: the pair of the rank with the least room.
_ROOM_PAIRS = (
    ("gpu_mem_used_bytes", "gpu_mem_total_bytes", True),
    ("ram_available_bytes", "ram_total_bytes", False),
    ("shm_free_bytes", "shm_total_bytes", False),
)


class Collective:
    """Bounded-wait collectives over all ranks of the default process group.

    Every rank must build its ``Collective`` at the same point (``tune()`` does it when the
    wrapped loader is built), since creating the group is itself a collective.

    Args:
        timeout_s: Longest wait, seconds, for the other ranks at any one collective.

    Attributes:
        rank: This process's rank in the default group.
        world_size: Ranks in the default group.
        local_world_size: Ranks on this node: ``LOCAL_WORLD_SIZE`` (set by torchrun) when
            present, else the ranks whose host name is this rank's.
        timeout_s: The bound on every wait.

    Raises:
        RuntimeError: ``torch.distributed`` is not available or not initialized.
        DistributedTimeoutError: The other ranks did not join the group set-up in time.
    """

    def __init__(self, timeout_s: float) -> None:
        if (
            not isinstance(timeout_s, (int, float))
            or isinstance(timeout_s, bool)
            or not math.isfinite(timeout_s)
            or timeout_s <= 0
        ):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "loadertune.distributed.Collective needs an initialized default process group; "
                "call torch.distributed.init_process_group() (torchrun does it) before tune()"
            )
        self._dist = dist
        self.timeout_s = float(timeout_s)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._calls = 0
        self._broken: DistributedTimeoutError | None = None
        self._broken_summary = ""
        self._closed = False
        # The Work of the collective being waited on; None between collectives (see quiesce).
        self._pending: Any = None
        self._group, self._device = self._make_group()
        hosts = self._gather_hosts()
        self.local_world_size = _local_world_size(hosts, self.rank)

    # -- the interface TunedLoader calls ---------------------------------------------------------
    def max_int(self, value: int, *, step: int | None = None) -> int:
        """The largest ``value`` over all ranks; the same on every rank.

        Args:
            value: This rank's value.
            step: The training step, for the error message if a rank is missing.
        """
        t = torch.tensor([int(value)], dtype=torch.int64, device=self._device)
        self._run(
            "max_int",
            step,
            lambda: self._dist.all_reduce(
                t, op=self._dist.ReduceOp.MAX, group=self._group, async_op=True
            ),
        )
        return int(t.item())

    def reduce_metrics(self, metrics: WindowMetrics, *, step: int | None = None) -> WindowMetrics:
        """One window's metrics over all ranks, as :func:`combine_metrics` reads them.

        One ``all_gather`` of a float64 vector (one round trip); every rank then combines the
        same rows the same way, so the result is identical everywhere.

        Args:
            metrics: This rank's window.
            step: The training step, for the error message if a rank is missing.
        """
        mine = torch.tensor(pack_metrics(metrics), dtype=torch.float64, device=self._device)
        rows = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._run(
            "reduce_metrics",
            step,
            lambda: self._dist.all_gather(rows, mine, group=self._group, async_op=True),
        )
        return combine_metrics([unpack_metrics(r.cpu().tolist()) for r in rows])

    def broadcast(self, obj: Any, *, step: int | None = None) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable: a Decision, a Recommendation, None).

        Args:
            obj: The object; only rank 0's is used.
            step: The training step, for the error message if a rank is missing.
        """
        payload = (
            pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            if self.rank == _SOURCE_RANK
            else b""
        )
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self._device)
        self._run(
            "broadcast (size)",
            step,
            lambda: self._dist.broadcast(size, _SOURCE_RANK, group=self._group, async_op=True),
        )
        n = int(size.item())
        if self.rank == _SOURCE_RANK:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self._device)
        else:
            data = torch.empty(n, dtype=torch.uint8, device=self._device)
        self._run(
            "broadcast",
            step,
            lambda: self._dist.broadcast(data, _SOURCE_RANK, group=self._group, async_op=True),
        )
        if self.rank == _SOURCE_RANK:
            return obj
        return pickle.loads(data.cpu().numpy().tobytes())

    def quiesce(self) -> bool:
        """Prepares this process for a ``fork()``: nothing of loadertune's group in flight.

        Every collective is waited on before its method returns, so between calls no ``Work``
        is outstanding and gloo's threads have nothing of loadertune's to do. This checks that
        (a call from another thread, mid-collective, is the one way to break it) and releases
        what a failed collective would otherwise keep: the frames of its traceback, which hold
        the ``Work``, the tensors and this object in a reference cycle that a forked worker's
        collector could be the one to destroy. No collective; cheap; idempotent.

        Returns:
            True when no collective is in flight, False when one is (a fork now is unsafe).
        """
        error: BaseException | None = self._broken
        seen: set[int] = set()
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            # A failure is final and already reported; its frames are of no further use.
            if error.__traceback__ is not None:
                traceback.clear_frames(error.__traceback__)
                error.__traceback__ = None
            error = error.__cause__ or error.__context__
        return self._pending is None

    def close(self) -> None:
        """Releases the group's connections (idempotent; no collective)."""
        self._closed = True
        group, self._group = self._group, None
        if group is not None and self._owns_group:
            try:
                self._dist.destroy_process_group(group)
            except Exception:  # a group that is already gone needs no more releasing
                logger.debug("destroying the loadertune process group failed", exc_info=True)

    # -- internals -------------------------------------------------------------------------------
    def _make_group(self) -> tuple[Any, torch.device]:
        dist = self._dist
        self._owns_group = False
        if not dist.is_gloo_available():
            # A build without gloo: the default group it is, bounded by Work.wait alone.
            backend = str(dist.get_backend())
            logger.warning(
                "this torch build has no gloo; collective decisions use the default "
                "%s group, where only Work.wait bounds a stalled collective",
                backend,
            )
            device = torch.device("cpu")
            if "nccl" in backend and torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
            return None, device
        self._calls += 1
        began = time.monotonic()
        try:
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        except Exception as exc:
            operation = "set-up (creating loadertune's process group)"
            error = self._error(operation, None, time.monotonic() - began, exc)
            self._broken, self._broken_summary = error, operation
            raise error from exc
        self._owns_group = True
        return group, torch.device("cpu")

    def _gather_hosts(self) -> list[int]:
        # Every rank gathers, whatever its environment says, so that no rank can be left alone
        # in a collective the others skipped.
        mine = torch.tensor(
            [_host_key(socket.gethostname())], dtype=torch.int64, device=self._device
        )
        rows = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._run(
            "set-up (host names)",
            None,
            lambda: self._dist.all_gather(rows, mine, group=self._group, async_op=True),
        )
        return [int(r.item()) for r in rows]

    def _run(self, operation: str, step: int | None, start: Any) -> None:
        """Starts one async collective and waits for it within the bound, or raises."""
        if self._closed and self._broken is None:
            raise RuntimeError(f"rank {self.rank}: {operation} on a closed Collective")
        if self._broken is not None:
            raise DistributedTimeoutError(
                f"rank {self.rank}: {operation} refused: an earlier collective "
                f"failed ({self._broken_summary}); the ranks are out of step, so the run cannot "
                "go on"
            ) from self._broken
        self._calls += 1
        began = time.monotonic()
        work = None
        try:
            work = self._pending = start()
            done = work.wait(timeout=timedelta(seconds=self.timeout_s + _BACKSTOP_MARGIN_S))
            if done is False:
                raise RuntimeError("Work.wait returned without completing")
        except Exception as exc:
            error = self._error(operation, step, time.monotonic() - began, exc)
            self._broken = error
            self._broken_summary = f"{operation}{'' if step is None else f' at step {step}'}"
            if work is None or work.is_completed():
                # The backend finished failing: its connections are dead weight now, and leaving
                # a failed gloo group to interpreter shutdown can abort the process.
                self._pending = None
                self.close()
            # Else the Work stays in _pending (gloo's threads may still be on it) and quiesce()
            # reports it. This frame drops its references before the traceback captures it.
            work = start = None
            raise error from exc
        else:
            self._pending = None
        finally:
            # Drop the Work now rather than with this frame: a reference that lingers (a
            # traceback, a debugger) must not carry gloo state into a forked worker.
            work = None

    def _error(
        self, operation: str, step: int | None, waited_s: float, exc: BaseException
    ) -> DistributedTimeoutError:
        at = f" at step {step}" if step is not None else ""
        text = str(exc).strip()
        # gloo prefixes its source location ("[.../pair.cc:553] "): noise to a user.
        cause = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0]) if text else type(exc).__name__
        lost = waited_s < 0.9 * self.timeout_s
        what = (
            f"lost the connection to another rank after {waited_s:.1f} s"
            if lost
            else f"waited {waited_s:.1f} s (dist_timeout_s={self.timeout_s:g})"
        )
        return DistributedTimeoutError(
            f"rank {self.rank} of {self.world_size} {what} in the collective "
            f"'{operation}' (call #{self._calls}{at}); cause: {cause}. "
            "Another rank never reached the same point. Check: (1) the other ranks' logs for a "
            "crash or an out-of-memory kill (a dead rank shows here as 'Connection closed by "
            "peer'); (2) that every rank iterates its tuned loader for the same number of "
            "batches (DistributedSampler gives equal shards) and calls tune() in the same order; "
            "(3) whether one rank legitimately works alone for longer than dist_timeout_s between "
            "batches (evaluation or checkpointing on rank 0 only): then raise "
            "tune(..., dist_timeout_s=...)."
        )


@contextlib.contextmanager
def fork_guard(collective: Collective | None = None) -> Iterator[bool]:
    """Wrap the call that forks DataLoader workers (``iter(loader)``) in this.

    A forked worker has the parent's objects but only the forking thread. Anything the worker
    destroys or touches that belongs to another thread (gloo's loop and worker threads hold
    ``Work`` objects and the group's pairs) may abort or hang it. So, before the fork:

    1. ``collective.quiesce()``: no loadertune collective in flight, no failed collective's
       frames kept (a no-op without a collective).
    2. ``gc.collect()``: no cyclic garbage left for the worker's collector to destroy there.
    3. ``gc.freeze()``: every object alive at the fork moves to the permanent generation, so the
       worker's collector never examines or frees the parent's objects (which also keeps their
       pages shared, the copy-on-write pattern of pytorch issue 13246). After the fork the
       parent unfreezes, so its own collection is unchanged; if the program had frozen objects
       itself (``gc.get_freeze_count() > 0`` before), the parent is left frozen rather than
       undo that.

    Cost: one full collection per fork point (about 70 ms in a process with torch imported and
    170 000 objects, measured on the 2-core test machine); fork points are epoch starts and
    rebuilds, not batches.

    Args:
        collective: The run's :class:`Collective`, or None outside ``torch.distributed``.

    Yields:
        True when the process was quiet (safe to fork), False when a collective was in flight:
        a caller on another thread than the training loop's, which should not happen.
    """
    quiet = collective.quiesce() if collective is not None else True
    if not quiet:
        logger.warning(
            "forking DataLoader workers while one of loadertune's collectives is in "
            "flight; the workers may abort at exit"
        )
    gc.collect()
    user_frozen = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        yield quiet
    finally:
        if not user_frozen:
            gc.unfreeze()


# -- metrics over ranks (pure) -------------------------------------------------------------------
@functools.cache
def _metric_fields() -> tuple[tuple[str, bool], ...]:
    """(name, is_int) of every WindowMetrics field, in declaration order."""
    hints = typing.get_type_hints(WindowMetrics)
    out = []
    for f in dataclasses.fields(WindowMetrics):
        hint = hints.get(f.name, float)
        args = typing.get_args(hint) or (hint,)
        out.append((f.name, int in args and float not in args))
    return tuple(out)


def pack_metrics(metrics: WindowMetrics) -> list[float]:
    """The numeric fields of ``metrics`` as floats in field order, NaN for None.

    Raises:
        TypeError: A field holds something other than a number or None.
    """
    out = []
    for name, _ in _metric_fields():
        value = getattr(metrics, name)
        if value is None:
            out.append(math.nan)
        elif isinstance(value, (int, float)):
            out.append(float(value))
        else:
            raise TypeError(
                f"WindowMetrics.{name} is {type(value).__name__}; only numbers cross ranks"
            )
    return out


def unpack_metrics(values: Sequence[float]) -> WindowMetrics:
    """The inverse of :func:`pack_metrics`: NaN back to None, int fields back to int."""
    fields = _metric_fields()
    if len(values) != len(fields):
        raise ValueError(f"a packed WindowMetrics row has {len(fields)} values, got {len(values)}")
    kwargs: dict[str, Any] = {}
    for (name, is_int), v in zip(fields, values, strict=True):
        if v is None or math.isnan(v):
            kwargs[name] = None
        else:
            kwargs[name] = round(v) if is_int else float(v)
    return WindowMetrics(**kwargs)


def combine_metrics(rows: Sequence[WindowMetrics]) -> WindowMetrics:
    """One rank's view of the whole job: the row of the rank that sets everyone's pace.

    Under DDP the slowest loader holds every rank back, and it is the one that waits most for
    data. So the result is the row of the rank with the highest ``wait_share`` (the lowest rank
    on a tie), whose own timings (wait and compute per batch, CPU per batch, GPU utilization)
    stay consistent with each other for the worker estimate, with these changes:

    - ``samples_per_s`` and ``batches_per_s``: the minimum over ranks. Per-rank rates, not the
      sum: the controller compares before and after a change on this one basis, and per-rank is
      what a single-process run reports too.
    - ``rate_rel_stderr``: the maximum (the noisiest rank decides what counts as a real gain).
    - Room (GPU memory, RAM, /dev/shm): the (used or free, total) pair of the rank with the least
      room, and ``worker_mem_bytes`` the maximum, since every change applies to every rank.

    Args:
        rows: One row per rank, in rank order (at least one).

    Returns:
        The combined metrics; a pure function of ``rows``, so identical on every rank.
    """
    if not rows:
        raise ValueError("combine_metrics needs at least one row")
    pace = max(range(len(rows)), key=lambda i: (rows[i].wait_share, -i))
    changes: dict[str, Any] = {
        "samples_per_s": min(r.samples_per_s for r in rows),
        "batches_per_s": min(r.batches_per_s for r in rows),
        "rate_rel_stderr": max(r.rate_rel_stderr for r in rows),
    }
    for part, total, used in _ROOM_PAIRS:
        known = [r for r in rows if getattr(r, part) is not None and getattr(r, total)]
        if known:

            def room(
                r: WindowMetrics, part: str = part, total: str = total, used: bool = used
            ) -> float:
                share = getattr(r, part) / getattr(r, total)
                return 1.0 - share if used else share

            tight = min(known, key=room)
            changes[part] = getattr(tight, part)
            changes[total] = getattr(tight, total)
    mems = [r.worker_mem_bytes for r in rows if r.worker_mem_bytes is not None]
    if mems:
        changes["worker_mem_bytes"] = max(mems)
    return dataclasses.replace(rows[pace], **changes)


# -- helpers -------------------------------------------------------------------------------------
def _host_key(hostname: str) -> int:
    """A stable signed 64-bit key for a host name (tensors carry numbers, not strings)."""
    return int.from_bytes(
        hashlib.blake2b(hostname.encode(), digest_size=8).digest(), "little", signed=True
    )


def _local_world_size(hosts: Sequence[int], rank: int) -> int:
    env = os.environ.get("LOCAL_WORLD_SIZE", "")
    if env.strip().isdigit() and int(env) >= 1:
        return int(env)
    return max(1, sum(1 for h in hosts if h == hosts[rank]))
