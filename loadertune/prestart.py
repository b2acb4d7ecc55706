"""Starting a rebuilt loader's workers while the running ones keep serving (spawn, forkserver).

A worker started with ``spawn`` or ``forkserver`` imports torch and unpickles the dataset before
it loads anything: seconds each, and on a few CPUs the start-ups queue behind one another (9
workers took 10-17 s on 2 CPUs). A rebuild that waited for them froze the training loop that
long. Instead the new loader's iterator is built on a ``loadertune-prestart`` thread while the
old loader goes on serving the epoch; the new loader's sampler is held shut at its first draw
(:class:`Gate`), so it takes no sample until the switch, and the epoch's order is the same as
with a rebuild at the switch. Each new worker reports once its start-up is done (:class:`Started`,
wrapped around the ``worker_init_fn``); when all have, the front end switches: the old loader
stops drawing, hands over its in-flight batches, and the gate opens.

The new workers are taken off torch's SIGCHLD check while they start: one that dies then is
reported here, by :meth:`Prestart.poll`, and the job goes on with the old loader, instead of
torch raising in the training loop over a loader that was never used.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from loadertune.deathreport import HOLD
from loadertune.shutdown import abort_iterator, abort_started, unregister

__all__ = ["PRESTART_TIMEOUT_S", "Gate", "Prestart", "Started", "slow_start_method"]

#: Start methods whose workers take long enough to start to be started in the background.
_SLOW_METHODS = frozenset({"spawn", "forkserver"})
#: Seconds to wait for the prestart thread once the gate is open (it only queues indices then).
_JOIN_S = 60.0
#: Longest new workers may take to start before the start is given up (16 spawn workers that
#: import torch took ~20 s on 2 CPUs).
PRESTART_TIMEOUT_S = 300.0


def slow_start_method(loader: Any) -> str | None:
    """The loader's worker start method when it is a slow one (spawn, forkserver), else None."""
    ctx = getattr(loader, "multiprocessing_context", None)
    try:
        method = ctx.get_start_method() if ctx is not None else multiprocessing.get_start_method(allow_none=True)
    except (AttributeError, ValueError):
        return None
    if method is None:
        method = multiprocessing.get_start_method()
    return method if method in _SLOW_METHODS else None


class Gate:
    """Holds a new loader's sampler at its first draw until the switch.

    The sampler calls :meth:`wait` on the prestart thread, inside torch's iterator
    ``__init__``: by then every worker is started, so the iterator is found on the stack and its
    workers can be watched before torch returns it.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._go = True
        self.iterator: Any = None

    def wait(self) -> bool:
        """Blocks until :meth:`open` or :meth:`abort`; returns whether the sampler may draw."""
        frame = sys._getframe(1)
        while frame is not None and self.iterator is None:
            owner = frame.f_locals.get("self")
            if "DataLoaderIter" in type(owner).__name__:
                self.iterator = owner
                # While they start, a worker's death is ours to report (see the module's doc).
                unregister(owner)
            frame = frame.f_back
        self._event.wait()
        return self._go

    def open(self) -> None:
        """Lets the sampler draw: the switch."""
        self._event.set()

    def abort(self) -> None:
        """Lets the sampler return without drawing anything: the prestart is abandoned."""
        self._go = False
        self._event.set()


class Started:
    """A ``worker_init_fn`` that runs the user's, then reports the worker started.

    Picklable (spawn and forkserver send it to the worker). The report comes even when the
    user's function raises: torch then raises that error with the worker's first batch, as it
    would without loadertune.

    Args:
        init_fn: The workers' own ``worker_init_fn`` (or None).
        semaphore: Released once per started worker (from the loader's multiprocessing context).
    """

    def __init__(self, init_fn: Callable[[int], Any] | None, semaphore: Any) -> None:
        self.init_fn = init_fn
        self.semaphore = semaphore

    def __call__(self, worker_id: int) -> None:
        try:
            if self.init_fn is not None:
                self.init_fn(worker_id)
        finally:
            self.semaphore.release()


class Prestart:
    """The new loader of a rebuild, its workers starting on a background thread.

    Args:
        loader: The new DataLoader, built with a :class:`Started` ``worker_init_fn`` around the
            ``semaphore`` and a sampler that waits at ``gate``.
        config: The configuration it is built at.
        gate: The gate its sampler waits at.
        semaphore: Released by each of its workers once started.
        start: Builds the iterator (torch's multi-process iterator); runs on the thread.
        timeout_s: Longest the workers may take to start before the start is given up
            (default ``PRESTART_TIMEOUT_S``).
        base: The configuration running now when the new loader holds only the workers added to
            it, to serve beside the running ones (see :mod:`loadertune.group`); None when it
            replaces them. ``config`` is the whole configuration either way.

    Attributes:
        started_s: ``time.perf_counter()`` when the workers began to start.
        ready_workers: Workers that reported their start-up done.
    """

    def __init__(
        self,
        loader: Any,
        config: Any,
        gate: Gate,
        semaphore: Any,
        start: Callable[[Any], Any],
        *,
        timeout_s: float | None = None,
        base: Any = None,
    ) -> None:
        self.loader = loader
        self.config = config
        self.base = base
        self._gate = gate
        self._semaphore = semaphore
        self._start = start
        self._timeout_s = PRESTART_TIMEOUT_S if timeout_s is None else timeout_s
        self._iterator: Any = None
        self._error: BaseException | None = None
        self._aborted = False
        self._lock = threading.Lock()
        # torch's iterator pins batches on the current device: the training thread's, not the
        # new thread's default.
        self._device = _current_device() if getattr(loader, "pin_memory", False) else None
        self.ready_workers = 0
        self.started_s = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="loadertune-prestart", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._device is not None:
                import torch

                torch.accelerator.set_device_index(self._device)
            it = self._start(self.loader)
        except BaseException as exc:  # a thread never raises across its boundary
            abort_started(exc)  # the workers a half-built iterator had started
            self._error = exc
            return
        with self._lock:
            if not self._aborted:
                self._iterator = it
                return
        abort_iterator(it)  # given up while it was being built: nobody else will stop it

    def poll(self) -> str | None:
        """``"ready"`` once every new worker has started, a sentence saying why when the start
        failed (a worker died, torch refused, too slow), else None (still starting)."""
        if self._error is not None:
            return f"starting them failed: {self._error!r}"
        it = self._gate.iterator
        if it is not None:
            workers = self.loader.num_workers
            while self.ready_workers < workers and self._semaphore.acquire(False):
                self.ready_workers += 1
            for w in it._workers:
                code = w.exitcode
                if code is not None:
                    return f"a new worker (pid {w.pid}) exited with code {code} while starting"
            if self.ready_workers >= workers:
                return "ready"
        elif not self._thread.is_alive():
            return "starting them failed: the iterator was never built"
        if time.perf_counter() - self.started_s > self._timeout_s:
            return f"they had not all started after {self._timeout_s:.0f} s"
        return None

    def finish(self) -> Any:
        """Opens the gate and returns the started iterator (its workers back on torch's
        SIGCHLD check). The old loader must have stopped drawing from the stream first.

        Raises:
            RuntimeError: The iterator could not be started (the error is chained).
        """
        self._gate.open()
        # The thread only queues the first indices now: quick, unless the start itself hangs.
        self._thread.join(_JOIN_S)
        with self._lock:
            it = self._iterator
            if it is None:
                self._aborted = True
        if it is None:
            self._gate.abort()
            raise RuntimeError(f"the new DataLoader's workers could not be started: {self._error!r}") from self._error
        register_workers(it)
        return it

    def abort(self, *, wait: bool = False) -> None:
        """Abandons the start: the sampler draws nothing and the workers are stopped, here if
        they are built, else by the thread once they are (it is not waited for, unless
        ``wait``: the training loop goes on meanwhile)."""
        with self._lock:
            self._aborted = True
            it, self._iterator = self._iterator, None
        self._gate.abort()
        if it is not None:
            abort_iterator(it)
        if wait:
            self.join()

    @property
    def alive(self) -> bool:
        """Whether its thread still runs."""
        return self._thread.is_alive()

    def join(self) -> None:
        """Waits for the thread (and the stop of workers it was left to stop)."""
        self._thread.join(_JOIN_S)


def _current_device() -> int | None:
    import torch

    try:
        return torch.accelerator.current_device_index() if torch.accelerator.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def register_workers(it: Any) -> None:
    """Puts an iterator's workers (back) on torch's SIGCHLD check."""
    from torch.utils.data import _utils

    if getattr(it, "_worker_pids_set", False):
        return
    _utils.signal_handling._set_worker_pids(id(it), tuple(w.pid for w in it._workers))
    it._worker_pids_set = True
    # torch sets its handler only from the main thread: this iterator was built on another.
    _utils.signal_handling._set_SIGCHLD_handler()
    HOLD.install()
