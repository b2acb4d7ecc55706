"""Stopping an old DataLoader's workers without letting their deaths reach the training loop.

When loadertune replaces a loader (a rebuild, the end of a hand-over, a recovery, ``close()``),
the old iterator's workers are no longer anyone's business: the batches they still hold have
been re-queued or drained. torch's own ``_shutdown_workers()`` stops them, but it keeps the
workers registered with torch's SIGCHLD handler (``torch.utils.data._utils.signal_handling``)
until its ``finally`` block, that is, through every ``w.join``. A worker that dies abnormally in
that window (SIGABRT from a C++ ``std::terminate`` at exit, an out-of-memory SIGKILL) makes the
handler raise ``RuntimeError: DataLoader worker (pid ...) is killed by signal`` in the main thread,
inside the join, and the training run ends over a process it was discarding anyway.

:func:`shutdown_loader` unregisters the workers from the handler first, then shuts them down;
any worker that has not exited after torch's bounded joins is terminated, then killed, and
reaped, so no process is left behind. Abnormal exits are logged, never raised. Workers of other
iterators (the new loader's) stay registered, so their deaths are still reported as usual.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import time
from collections.abc import Container
from typing import Any

from loadertune.interrupts import sigint_held

__all__ = ["abort_iterator", "abort_started", "shutdown_loader", "unregister"]

logger = logging.getLogger("loadertune")

# Seconds to wait for a worker after SIGTERM, then after SIGKILL. torch has already waited its
# MP_STATUS_CHECK_INTERVAL (5 s) for a clean exit before it sends SIGTERM.
_TERM_WAIT_S = 2.0
_KILL_WAIT_S = 5.0
# How torch's SIGCHLD handler and iterator name dead workers.
# Seconds to wait for a lock of an iterator being stopped before taking it as left held for good.
_LOCK_WAIT_S = 1.0
_WORKER_PIDS = re.compile(r"DataLoader worker \(pid\(?s?\)? ([\d, ]+)\)")


def shutdown_loader(loader: Any, iterator: Any) -> None:
    """Stops the workers of a DataLoader iterator now; a worker's death never raises here.

    Shuts down ``iterator`` and, for ``persistent_workers=True``, the iterator the DataLoader
    caches on ``loader._iterator`` (then clears that attribute so the loader cannot hand it out
    again). Iterators without workers are left alone. Safe to call more than once.

    Args:
        loader: The ``DataLoader`` the iterator came from, or None.
        iterator: The iterator to stop (``iter(loader)``), or None.
    """
    iterators = [iterator]
    cached = getattr(loader, "_iterator", None) if loader is not None else None
    if cached is not None:
        iterators.append(cached)
        # Cleared first: whatever happens below, the loader must not reuse a stopped iterator.
        loader._iterator = None
    seen: set[int] = set()
    for it in iterators:
        if it is None or id(it) in seen:
            continue
        seen.add(id(it))
        _shutdown_iterator(it)


def abort_started(exc: BaseException) -> Any:
    """Stops the workers and queues of a multi-process iterator whose ``__init__`` did not
    finish (interrupted, or failed half-way): torch never returned it, so nothing else would.

    Args:
        exc: The exception raised out of ``iter(loader)``; the half-built iterator is found in
            its traceback.

    Returns:
        The half-built iterator (stopped), or None when there was none.
    """
    tb = exc.__traceback__
    it = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "DataLoaderIter" in type(frame.f_locals.get("self")).__name__:
            it = frame.f_locals["self"]
        tb = tb.tb_next
    if it is not None:
        abort_iterator(it)
    return it


def abort_iterator(it: Any) -> None:
    """Stops a multi-process iterator's workers and queues at once, without torch's orderly
    shutdown (nothing it holds is needed: a half-built iterator, or one never read from).

    Args:
        it: The iterator (its workers may still be starting).
    """
    it._shutdown = True  # torch's __del__ must not run its shutdown on a half-built iterator
    unregister(it)
    _set_done(it)
    try:
        _reap(list(getattr(it, "_workers", None) or []))
    finally:
        _close_queues(it)


def _shutdown_iterator(it: Any) -> None:
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is None:
        return  # a single-process iterator: no workers
    from torch.utils.data import _utils

    if _utils.python_exit_status is not False:
        shutdown()  # interpreter exit: torch's own no-op, and multiprocessing reaps daemons
        return
    unregister(it)
    workers = list(getattr(it, "_workers", None) or [])
    held = _held_locks(it)
    if held:
        # torch's shutdown would wait on that lock forever: stop the workers without it.
        logger.info(
            "stopping DataLoader workers without torch's shutdown: the lock of its %s was left "
            "held (by a process killed, or an interrupt, while it held it)",
            " and ".join(held.values()),
        )
        it._shutdown = True
        shutdown = _no_shutdown
    try:
        shutdown()
    except RuntimeError as exc:
        if _names_other_workers(exc, workers):
            # A worker of a loader still in use (the new one) died: that is the caller's news.
            raise
        logger.warning("shutting down old DataLoader workers: %s (ignored)", exc)
    except Exception as exc:
        # Its pids unregistered, torch's handler cannot raise for these workers; what is left (a
        # queue broken by a worker that died mid-write) concerns only workers being discarded.
        logger.warning("shutting down old DataLoader workers: %r (ignored)", exc)
    finally:
        try:
            _reap(workers)
        finally:
            # An interrupt inside torch's shutdown leaves its queues open (pipes, feeder
            # threads) and a second call does nothing (its _shutdown flag is set): closed here.
            _close_queues(it, held)
    for w in workers:
        code = w.exitcode
        if code not in (0, None):
            logger.warning(
                "old DataLoader worker (pid %s) %s during shutdown (ignored: its "
                "batches were no longer needed)",
                w.pid,
                _describe_exit(code),
            )


def _no_shutdown() -> None:
    pass


def _lock_free(lock: Any) -> bool:
    """Whether ``lock`` can be taken within ``_LOCK_WAIT_S`` (it is released at once)."""
    with sigint_held():  # a Ctrl-C between the two would leave it held by this process
        if not lock.acquire(True, _LOCK_WAIT_S):
            return False
        lock.release()
        return True


def _held_locks(it: Any) -> dict[int, str]:
    """What torch's shutdown of ``it`` would wait on forever, by the lock's ``id``: the done
    event's lock (a worker terminated inside ``is_set()`` keeps it), a queue's ``notempty``
    lock (a ``put`` cut by an interrupt right after taking it)."""
    held = {}
    done = getattr(it, "_workers_done_event", None)
    cond = getattr(done, "_cond", None)
    if cond is not None and not _lock_free(cond):
        held[id(cond)] = "workers' done event"
    index_queues = getattr(it, "_index_queues", None) or []
    for q in _queues(it):
        notempty = getattr(q, "_notempty", None)
        if notempty is not None and not _lock_free(notempty):
            held[id(notempty)] = "index queue" if any(q is i for i in index_queues) else "result queue"
    return held


def _usable(lock: Any, stuck: Container[int]) -> bool:
    """Whether ``lock`` can be taken: not one already found stuck, and free now."""
    return id(lock) not in stuck and _lock_free(lock)


def _set_done(it: Any, stuck: Container[int] = ()) -> None:
    """Sets the iterator's workers-done event, unless its lock was left held (see above)."""
    done = getattr(it, "_workers_done_event", None)
    if done is None:
        return
    cond = getattr(done, "_cond", None)
    if cond is None or _usable(cond, stuck):
        done.set()


def _queues(it: Any) -> list[Any]:
    queues = list(getattr(it, "_index_queues", None) or [])
    for name in ("_worker_result_queue", "_data_queue"):
        q = getattr(it, name, None)
        if q is not None and all(q is not other for other in queues):
            queues.append(q)
    return queues


def _close_queues(it: Any, stuck: Container[int] = ()) -> None:
    """Closes an iterator's queues once its workers are gone: both pipe ends now, rather than
    whenever the queue objects are collected, and their feeder threads told to exit. ``stuck``:
    the ids of locks already found left held."""
    _set_done(it, stuck)
    pin_done = getattr(it, "_pin_memory_thread_done_event", None)
    pin = getattr(it, "_pin_memory_thread", None)
    if pin_done is not None and pin is not None:
        pin_done.set()
        pin.join(1.0)
    for q in _queues(it):
        notempty = getattr(q, "_notempty", None)
        if notempty is not None and not _usable(notempty, stuck):
            _drop_stuck(q)
            continue
        try:
            q.cancel_join_thread()
            q.close()
        except Exception:  # not a multiprocessing queue after all
            continue
        feeder = getattr(q, "_thread", None)
        if feeder is not None:
            # Its feeder thread closes both pipe ends itself once told to (close() above).
            feeder.join(1.0)
            continue
        for end in ("_reader", "_writer"):  # no feeder thread: nothing else closes them
            with contextlib.suppress(Exception):  # already closed, or not a pipe end
                getattr(q, end).close()
    # Everything torch's _shutdown_workers does is done: a later call must not put into the
    # closed queues.
    it._shutdown = True


def _drop_stuck(q: Any) -> None:
    """Closes a queue whose ``notempty`` lock was left held: its close (now, or multiprocessing's
    at interpreter exit) would wait on that lock forever, so that finalizer is cancelled and the
    pipe ends are closed directly; its feeder thread (a daemon) is stuck on the lock for good."""
    q._closed = True
    for name in ("_close", "_jointhread"):
        finalizer = getattr(q, name, None)
        if finalizer is not None:
            with contextlib.suppress(Exception):
                finalizer.cancel()
            setattr(q, name, None)
    for end in ("_reader", "_writer"):
        with contextlib.suppress(Exception):
            getattr(q, end).close()


def _names_other_workers(exc: BaseException, workers: list[Any]) -> bool:
    """Whether ``exc`` reports the death of a worker that is not one of ``workers``."""
    match = _WORKER_PIDS.search(str(exc))
    if match is None:
        return False
    pids = {int(p) for p in re.findall(r"\d+", match.group(1))}
    return bool(pids - {w.pid for w in workers})


def unregister(it: Any) -> None:
    """Removes the iterator's workers from torch's SIGCHLD check, as torch would at the end."""
    if not getattr(it, "_worker_pids_set", False):
        return
    from torch.utils.data import _utils

    try:
        _utils.signal_handling._remove_worker_pids(id(it))
    except Exception:  # not registered after all (torch raises ValueError): nothing to remove
        logger.debug("removing DataLoader worker pids failed", exc_info=True)
    # torch's own shutdown then skips its removal (which would raise for an unknown id).
    it._worker_pids_set = False


def _reap(workers: list[Any]) -> None:
    """Joins every worker; those still running are terminated, then killed, so none is leaked.

    The waits are shared: workers that ignore SIGTERM cost ``_TERM_WAIT_S`` together, not each.
    """
    running = [w for w in workers if _call(w, "is_alive")]
    for action, wait_s in (("terminate", _TERM_WAIT_S), ("kill", _KILL_WAIT_S)):
        if not running:
            return
        for w in running:
            _call(w, action)
        deadline = time.monotonic() + wait_s
        for w in running:
            _call(w, "join", max(0.0, deadline - time.monotonic()))
        running = [w for w in running if _call(w, "is_alive")]
    for w in running:
        logger.warning("DataLoader worker (pid %s) survived SIGKILL", w.pid)


def _call(w: Any, action: str, *args: Any) -> Any:
    """``w.<action>(*args)``; False where the process cannot be reached from here."""
    try:
        return getattr(w, action)(*args)
    except (OSError, ValueError, AssertionError) as exc:
        # A closed Process object (ValueError) or one this process did not start
        # (AssertionError, after a fork): nothing more can be done from here.
        logger.debug("%s DataLoader worker %s: %r", action, getattr(w, "pid", "?"), exc)
        return False


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
