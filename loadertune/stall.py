"""The stall watch: says which sample the training loop has been waiting for, and where it hangs.

A sample whose read hangs (a stuck network file system, a deadlock in a transform) would show as a
silent stop. The per-batch path only stores when the loop started waiting for a batch (and clears
it when the batch arrives); a small thread of its own, ``loadertune-stall``, looks at that a few
times a second. When the loop has waited ``timeout_s`` for one batch it logs a WARNING naming the
batch's sample indices (the epoch's stream knows them), the process that holds it and that
process's Python stack, and emits a ``stall`` event; again at most once per further timeout.

A worker's stack comes from :mod:`faulthandler`: every worker loadertune starts installs a
SIGUSR1 handler (through a wrapped ``worker_init_fn`` that then calls the user's) that writes all
its threads' stacks into a file of its own in a private temporary directory. The handler runs in C,
so it answers even when the worker is stuck in a system call or a lock. Without workers the batch
is loaded in the training thread, whose stack is read from this thread (``sys._current_frames``).
The directory is removed at ``close()`` (or when the loader is garbage collected).

``on_stall="restart"``: the stuck worker is killed once per batch; the training thread takes that as
a fault and rebuilds the loader with the same settings, the in-flight batches (the stuck one first)
served again, so no sample is lost or repeated. A batch that stalls again after its restart is only
reported (its hang is not transient). Without workers there is nothing to restart.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["STALL_FACTOR", "STALL_FLOOR_S", "StallReport", "StallWatch", "derived_timeout_s"]

logger = logging.getLogger("loadertune")

#: The least derived stall timeout, seconds.
STALL_FLOOR_S = 60.0
#: The derived timeout is this many times the slowest window's mean time per batch (if larger).
STALL_FACTOR = 20.0
# Longest wait for a worker's faulthandler to finish writing its stacks.
_DUMP_WAIT_S = 1.0

# A worker keeps its dump file open for faulthandler (which holds only the descriptor).
_worker_dump_file: Any = None


def derived_timeout_s(slowest_batch_s: float | None) -> float:
    """The default stall timeout: ``max(STALL_FLOOR_S, STALL_FACTOR x slowest batch time)``.

    Args:
        slowest_batch_s: The slowest window's mean seconds per batch so far, None before any.
    """
    if slowest_batch_s is None or not math.isfinite(slowest_batch_s):
        return STALL_FLOOR_S
    return max(STALL_FLOOR_S, STALL_FACTOR * slowest_batch_s)


class StackDumpInit:
    """A ``worker_init_fn`` that installs a SIGUSR1 stack dump into ``directory/<pid>.stack``, then
    calls the user's ``worker_init_fn`` (picklable for spawn and forkserver contexts)."""

    def __init__(self, directory: str, user_fn: Callable[[int], Any] | None) -> None:
        self.directory = directory
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        global _worker_dump_file
        try:
            fh = open(os.path.join(self.directory, f"{os.getpid()}.stack"), "w")  # noqa: SIM115 - kept for faulthandler
            faulthandler.register(signal.SIGUSR1, file=fh, all_threads=True, chain=False)
            _worker_dump_file = fh
        except (OSError, ValueError, AttributeError, RuntimeError):
            pass  # no dump for this worker: the parent then never signals it
        if self.user_fn is not None:
            self.user_fn(worker_id)


@dataclass(frozen=True)
class StallReport:
    """What a stall looks like.

    Attributes:
        waited_s: Seconds the loop has waited for the batch.
        indices: The batch's sample indices (None when unknown: an IterableDataset).
        pid: The process that holds the batch (a worker, or this process without workers).
        in_worker: Whether ``pid`` is a DataLoader worker.
        stack: That process's Python stack (the training thread's without workers), or why not.
    """

    waited_s: float
    indices: Any
    pid: int | None
    in_worker: bool
    stack: str


class StallWatch:
    """Watches one tuned loader's wait for a batch (see the module docstring).

    Args:
        front: The :class:`~loadertune.tuned.TunedLoader` (held weakly); its ``_wait_since`` is
            the ``time.perf_counter()`` at which the loop started waiting, 0.0 when it is not.
        timeout_s: A fixed timeout, or None for :func:`derived_timeout_s`.
        on_stall: ``"warn"`` or ``"restart"``.
        poll_s: Seconds between looks (default: a quarter of the timeout, at most 0.5 s).
    """

    def __init__(self, front: Any, *, timeout_s: float | None, on_stall: str = "warn", poll_s: float | None = None) -> None:
        self._front = weakref.ref(front)
        self._fixed = timeout_s
        self.on_stall = on_stall
        self._slowest_batch_s: float | None = None
        self._poll_s = poll_s
        self.directory = tempfile.mkdtemp(prefix="loadertune-stacks-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.directory, True)
        self._since = 0.0
        self._next_s = math.inf
        self._restarted: set[tuple[Any, ...]] = set()
        self.reports: list[StallReport] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadertune-stall", daemon=True)
        self._thread.start()

    # -- set-up ------------------------------------------------------------------------------------
    def worker_init_fn(self, user_fn: Callable[[int], Any] | None) -> StackDumpInit:
        """The ``worker_init_fn`` for loaders loadertune builds: the stack dump, then ``user_fn``."""
        return StackDumpInit(self.directory, user_fn)

    @property
    def timeout_s(self) -> float:
        """The timeout in force: the fixed one, or the one derived from the batch times so far."""
        return self._fixed if self._fixed is not None else derived_timeout_s(self._slowest_batch_s)

    def close(self) -> None:
        """Stops the thread and removes the stack directory; idempotent."""
        self._stop.set()
        thread = self._thread
        if thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=_DUMP_WAIT_S + 1.0)
        self._finalizer()

    # -- watching ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            timeout = self.timeout_s
            poll = self._poll_s if self._poll_s is not None else min(0.5, timeout / 4)
            if self._stop.wait(poll):
                return
            try:
                if not self.check(time.perf_counter()):
                    return
            except Exception:  # the watch must never raise into anything
                logger.debug("stall check failed", exc_info=True)

    def check(self, now_s: float) -> bool:
        """One look; returns False once the loader is gone (the thread then ends)."""
        front = self._front()
        if front is None or front._closed:
            return False
        metrics = front._session.metrics
        if self._fixed is None and metrics is not None and metrics.batches_per_s > 0:
            per_batch = 1.0 / metrics.batches_per_s
            if self._slowest_batch_s is None or per_batch > self._slowest_batch_s:
                self._slowest_batch_s = per_batch
        since = front._wait_since
        if not since:
            self._since = 0.0
            return True
        timeout = self.timeout_s
        if since != self._since:
            self._since = since
            self._next_s = timeout
        waited = now_s - since
        if waited < self._next_s:
            return True
        # Once per timeout: the next report, if the batch still has not come, one timeout later.
        self._next_s = (math.floor(waited / timeout) + 1) * timeout
        self._report(front, waited, timeout)
        return True

    def _report(self, front: Any, waited: float, timeout: float) -> None:
        pipeline = front._pipeline
        it = pipeline.src_it
        issued = pipeline.src_issued
        try:
            indices = list(issued[0]) if issued and pipeline.kind != "samples" else (issued[0] if issued else None)
        except IndexError:  # delivered meanwhile
            indices = None
        pid, in_worker = _holder(it)
        if in_worker and pid is not None:
            stack = self._worker_stack(pid)
        else:
            stack = _training_thread_stack()
        if self._since != front._wait_since:
            return  # the batch came while we looked
        report = StallReport(waited_s=waited, indices=indices, pid=pid, in_worker=in_worker, stack=stack)
        self.reports.append(report)
        action = "warn"
        key = tuple(indices) if isinstance(indices, list) else (indices,)
        if self.on_stall == "restart" and in_worker and pid is not None and pipeline.kind != "iterable" and key not in self._restarted:
            action = "restart"
        elif self.on_stall == "restart":
            if key in self._restarted:
                action = "warn (restarted once already)"
            elif pipeline.kind == "iterable":
                action = "warn (an IterableDataset's items cannot be served again)"
            else:
                action = "warn (no workers to restart)"
        shown = indices if not isinstance(indices, list) or len(indices) <= 32 else [*indices[:32], "..."]
        where = f"worker pid {pid}" if in_worker else f"the training process (pid {pid}), no workers"
        what = "samples" if pipeline.kind != "iterable" else "an IterableDataset's items (no indices)"
        fix = {
            "warn": f"it goes on as soon as the batch arrives. on_stall='restart' restarts the workers for a "
            f"transient hang; stall_timeout_s sets this timeout ({timeout:.0f} s)",
            "restart": "restarting the workers and serving this batch again (on_stall='restart')",
        }.get(action, "not restarting again: this hang is not transient; fix the sample or its reader")
        logger.warning(
            "the training loop has waited %.0f s for one batch: %s %s, loaded by %s, stuck here:\n%s\n%s",
            waited,
            what,
            shown if indices is not None else "",
            where,
            stack.rstrip(),
            fix,
        )
        front._session.events_log.emit(
            "stall",
            front.step,
            front.epoch,
            waited_s=round(waited, 3),
            timeout_s=timeout,
            indices=indices,
            pid=pid,
            in_worker=in_worker,
            stack=stack,
            action=action,
        )
        if action == "restart":
            self._restarted.add(key)
            front._actuator.restart_stalled(pid, indices)

    def _worker_stack(self, pid: int) -> str:
        path = os.path.join(self.directory, f"{pid}.stack")
        try:
            start = os.path.getsize(path)
        except OSError:
            return f"(no stack: worker {pid} has no dump handler; was it started by loadertune?)"
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError as exc:
            return f"(no stack: signalling worker {pid} failed: {exc})"
        deadline = time.perf_counter() + _DUMP_WAIT_S
        size = start
        while time.perf_counter() < deadline:
            time.sleep(0.02)
            try:
                now = os.path.getsize(path)
            except OSError:
                break
            if now > start and now == size:
                break  # written, and no longer growing
            size = now
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                fh.seek(start)
                text = fh.read()
        except OSError as exc:
            return f"(no stack: reading {path} failed: {exc})"
        return text or f"(no stack: worker {pid} did not answer within {_DUMP_WAIT_S:.0f} s)"


def _holder(it: Any) -> tuple[int | None, bool]:
    """The process loading the batch the loop waits for: (pid, whether it is a worker)."""
    head = getattr(it, "head", None)  # a group's loader holding the next batch
    if head is not None:
        it = head
    workers = getattr(it, "_workers", None)
    if not workers:
        return os.getpid(), False
    try:
        info = it._task_info.get(it._rcvd_idx)
        if info is not None:
            return workers[info[0]].pid, True
    except (AttributeError, IndexError, TypeError, KeyError):
        pass
    return None, True


def _training_thread_stack() -> str:
    """The stack of the thread inside ``_Epoch.__next__`` (the training loop's), read from here."""
    from loadertune import tuned

    code = tuned._Epoch.__next__.__code__
    frames = sys._current_frames()
    me = threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in frames.items():
        if ident == me:
            continue
        f = frame
        while f is not None and f.f_code is not code:
            f = f.f_back
        if f is not None:
            return f"Thread {names.get(ident, ident)} (most recent call last):\n" + "".join(traceback.format_stack(frame))
    return "(no stack: no thread is inside the loader's next())"
