"""What an exception from ``next()`` on a DataLoader iterator says of its workers.

torch reports a dead worker as "DataLoader worker (pid ...) exited unexpectedly" or "is killed by
signal", but a worker killed while handing over a batch can also surface as a connection reset on
the batch's shared-memory handle; a dead process settles both. A worker that cannot allocate a
batch in /dev/shm raises torch's "unable to allocate shared memory" (or dies of SIGBUS): a resource
fault, not the dataset's. Anything else is the dataset's own error and must reach the user
unchanged.

A death is random (an out-of-memory kill) or deterministic (a sample that crashes a C decoder).
:class:`CrashTracker` tells them apart: it remembers the samples the dead worker was loading, and
the same sample under a second death makes the crash deterministic. :func:`narrow_crash` then loads
the suspects one by one, each in a throwaway worker, to name the sample; it is never loaded in the
training process.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

__all__ = [
    "SHM_EXHAUSTED",
    "WORKER_DIED",
    "CrashTracker",
    "Death",
    "SampleCrashError",
    "WorkerStartError",
    "crash_error",
    "dead_worker_batches",
    "dead_workers",
    "death_report",
    "narrow_crash",
    "worker_death",
]

logger = logging.getLogger("loadertune")

#: torch's message for a worker that died; group 1 holds the pid(s).
WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")
#: A worker that found /dev/shm full: torch's allocation error (raised in the worker and re-raised
#: here) or a worker killed by SIGBUS (a write to a shared-memory page that has no backing).
SHM_EXHAUSTED = re.compile(
    r"unable to allocate shared memory|unable to write to file </?torch_[^>]*>: No space left on device"
    r"|</?torch_[^>]*>: No space left on device|killed by signal: Bus error"
)

Death = Literal["died", "stale", "shm", "none"]

# How long a connection error waits for a dying worker's exit to become visible.
_DEATH_WAIT_S = 2.0
# Narrowing a crash to one sample: at most this many suspects, this long in all.
_NARROW_MAX_SAMPLES = 64
_NARROW_BUDGET_S = 30.0


class SampleCrashError(RuntimeError):
    """A sample kills every DataLoader worker that loads it (a crash in native code, say).

    A ``RuntimeError`` like torch's "DataLoader worker ... exited unexpectedly", so code that
    handles that still handles this.

    Attributes:
        indices: The sample indices under suspicion (the dead workers' batch).
        sample: The sample that crashed a throwaway worker on its own, or None if none did.
    """

    def __init__(self, message: str, indices: list[Any], sample: Any = None) -> None:
        super().__init__(message)
        self.indices = indices
        self.sample = sample

    def __reduce__(self) -> Any:
        return (type(self), (str(self), self.indices, self.sample))


class WorkerStartError(SampleCrashError):
    """DataLoader workers die while starting, before they load any sample: no sample is to
    blame (``sample`` is None). Under spawn or forkserver the usual cause is a script whose
    training code runs again in every worker (no ``if __name__ == "__main__":`` guard)."""


def _start_failure(died: str, control: str, context: Any) -> str:
    method = getattr(context, "get_start_method", lambda: None)()
    if method in ("spawn", "forkserver"):
        why = (
            f"with multiprocessing_context={method!r} every worker imports the script's main module "
            'again: put the training code under `if __name__ == "__main__":`, and make sure the '
            "dataset and worker_init_fn can be imported and unpickled in a fresh process"
        )
    else:
        why = "check the worker_init_fn and what the dataset does when a worker unpickles it"
    return (
        f"DataLoader workers die while starting, before they load any sample ({died}); a "
        f"throwaway worker given the dataset but no sample to load died too ({control}). No sample "
        f"is to blame: {why}"
    )


def worker_death(it: Any, exc: BaseException) -> Death:
    """Classifies ``exc`` raised by ``next(it)``.

    Returns:
        ``"died"``: a worker of ``it`` died; ``"stale"``: the report names none of the current
        workers (a death already recovered from); ``"shm"``: a worker found /dev/shm full (its
        batch can be loaded again with less in flight); ``"none"``: the dataset's own error.
    """
    if isinstance(exc, SampleCrashError) or not hasattr(it, "_workers"):
        return "none"  # already decided, or no workers to have died (loading in this process)
    workers = getattr(it, "_workers", None) or []
    text = str(exc) if isinstance(exc, RuntimeError) else ""
    match = WORKER_DIED.search(text)
    if match:
        pids = {int(p) for p in re.findall(r"\d+", match.group(1))}
        if pids and not pids & {w.pid for w in workers}:
            return "stale"
        return "shm" if SHM_EXHAUSTED.search(text) else "died"
    if text and SHM_EXHAUSTED.search(text):
        return "shm"
    if any(not w.is_alive() for w in workers):
        return "died"
    if workers and isinstance(exc, (ConnectionError, EOFError)):
        # The dying worker's sockets close before the process is reaped: wait (bounded) for
        # its exit to become visible rather than mistake the death for a dataset error.
        from multiprocessing.connection import wait

        if wait([w.sentinel for w in workers], timeout=_DEATH_WAIT_S):
            return "died"
    return "none"


def dead_worker_batches(it: Any, exc: BaseException, issued: Iterable[Any]) -> list[list[Any]]:
    """The batches the dead worker(s) of ``it`` were loading, as lists of sample indices.

    ``issued`` holds the batches handed to ``it`` and not delivered, oldest first: with in-order
    loading the k-th is torch's task ``_rcvd_idx + k``. A dead worker's tasks without data are
    what it was loading (the lowest) and had queued. When torch's bookkeeping cannot be read,
    every batch in flight is a suspect.
    """
    batches = [b if isinstance(b, list) else [b] for b in issued]
    dead = dead_workers(it, exc)
    task_info = getattr(it, "_task_info", None)
    rcvd = getattr(it, "_rcvd_idx", None)
    if not dead or not isinstance(task_info, dict) or rcvd is None or not getattr(it, "_in_order", True):
        return batches
    out = []
    for idx in sorted(task_info):
        info = task_info[idx]
        if info[0] in dead and len(info) == 1 and 0 <= idx - rcvd < len(batches):
            out.append(batches[idx - rcvd])
    return out or batches


def dead_workers(it: Any, exc: BaseException) -> set[int]:
    """Which of ``it``'s workers (their places in ``it._workers``) ``exc`` reports dead; when it
    names none, those no longer alive."""
    workers = getattr(it, "_workers", None) or []
    match = WORKER_DIED.search(str(exc))
    if match:
        pids = {int(p) for p in re.findall(r"\d+", match.group(1))}
        return {i for i, w in enumerate(workers) if w.pid in pids}
    return {i for i, w in enumerate(workers) if not w.is_alive()}


def death_report(it: Any, exc: BaseException) -> str:
    """How the dead workers of ``it`` ended ("pid 12 killed by SIGSEGV"), else torch's message."""
    import signal

    out = []
    for w in getattr(it, "_workers", None) or []:
        try:
            if w.is_alive():
                continue
            w.join(0.5)
            code = w.exitcode
        except (OSError, ValueError, AssertionError):
            continue
        if code is None or code == 0:
            continue
        if code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        out.append(f"pid {w.pid} {how}")
    return "; ".join(out) or str(exc).strip()


class CrashTracker:
    """Remembers the samples dead workers were loading, until each is delivered.

    Attributes:
        suspects: Sample indices a dead worker was loading and nobody has delivered since.
            While any is left, loading must stay in workers (never the training process).
        deaths: The reports of the deaths seen this epoch.
    """

    def __init__(self) -> None:
        self.suspects: set[Any] = set()
        self.deaths: list[str] = []

    def death(self, batches: list[list[Any]], report: str) -> list[Any]:
        """Records a death; returns the samples it shares with an earlier one (deterministic)."""
        samples = [i for b in batches for i in b]
        repeated = [i for i in samples if i in self.suspects]
        self.suspects.update(samples)
        self.deaths.append(report)
        return repeated

    def delivered(self, batch: Any) -> None:
        """Clears the samples of a batch that arrived: they did not kill their worker."""
        if isinstance(batch, list):
            self.suspects.difference_update(batch)
        else:
            self.suspects.discard(batch)

    def reset(self) -> None:
        """A new epoch: nothing is under suspicion."""
        self.suspects.clear()
        self.deaths.clear()


def narrow_crash(
    dataset: Any,
    samples: list[Any],
    *,
    key: Callable[[Any], Any] | None = None,
    worker_init_fn: Callable[[int], Any] | None = None,
    multiprocessing_context: Any = None,
    budget_s: float = _NARROW_BUDGET_S,
) -> tuple[Any, str] | None:
    """Loads each of ``samples`` alone in a throwaway worker; returns the first that kills it.

    Returns:
        ``(sample, report)`` for the sample whose worker died, or None when none did on its own
        (too many suspects, the time budget spent, or the crash needs other samples first).
    """


    if len(samples) > _NARROW_MAX_SAMPLES:
        return None
    deadline = time.monotonic() + budget_s
    for sample in samples:
        left = deadline - time.monotonic()
        if left <= 1.0:
            return None
        report = _throwaway_load(
            dataset,
            sample if key is None else key(sample),
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            timeout_s=left,
        )
        if report is not None:
            return sample, report
    return None


def _throwaway_load(
    dataset: Any, item: Any, *, worker_init_fn: Any, multiprocessing_context: Any, timeout_s: float
) -> str | None:
    """Loads ``item`` in a throwaway worker; the report of its death, None if it lived."""
    from torch.utils.data import DataLoader

    from loadertune.building import start_iterator
    from loadertune.deathreport import HOLD
    from loadertune.shutdown import shutdown_loader

    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=[item],
        num_workers=1,
        collate_fn=_discard,
        worker_init_fn=worker_init_fn,
        multiprocessing_context=multiprocessing_context,
        timeout=timeout_s,
    )
    it = None
    try:
        # A death while torch starts the worker comes back as an iterator that raises it (the
        # half-built one already stopped), like one at the sample.
        with HOLD.released():  # its death is reported here, as torch reports it
            it = start_iterator(loader)
            for _ in it:
                pass
    except RuntimeError as exc:
        if WORKER_DIED.search(str(exc)):
            return death_report(it, exc)
        logger.debug("narrowing a worker crash: %r raised %r", item, exc)
    except Exception as exc:  # the dataset's own error: not a crash
        logger.debug("narrowing a worker crash: %r raised %r", item, exc)
    finally:
        shutdown_loader(loader, it)
    return None


class _Untouched:
    """The dataset, sent to a worker like the real one but never read: a worker that dies
    loading this dies while starting, whatever the samples."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, item: Any) -> None:
        return None


def _discard(item: Any) -> None:
    """Collates nothing: narrowing only needs to know whether loading a sample kills its worker."""
    return None


def crash_error(
    dataset: Any,
    samples: list[Any],
    deaths: list[str],
    *,
    key: Any = None,
    worker_init_fn: Any = None,
    multiprocessing_context: Any = None,
) -> SampleCrashError:
    """The error for samples that killed two workers: narrowed to one sample where loading each
    alone in a throwaway worker crashes it (none is ever loaded in the training process)."""
    found = narrow_crash(
        dataset,
        samples,
        key=key,
        worker_init_fn=worker_init_fn,
        multiprocessing_context=multiprocessing_context,
    )
    died = "; ".join(deaths)
    shown = samples if len(samples) <= 16 else [*samples[:16], "..."]
    if found is not None:
        # The control: a worker sent the dataset but asked for no sample.
        control = _throwaway_load(
            _Untouched(dataset),
            0,
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            timeout_s=_NARROW_BUDGET_S,
        )
        if control is not None:
            return WorkerStartError(_start_failure(died, control, multiprocessing_context), list(samples))
    if found is not None:
        sample, report = found
        message = (
            f"sample {sample!r} kills the DataLoader worker that loads it: workers died twice on "
            f"its batch {shown} ({died}), and loading it alone in a throwaway worker crashed "
            f"that one too ({report}). loadertune does not load it in the training process, "
            "where it would take the job down; fix or skip that sample"
        )
    else:
        sample = None
        message = (
            f"the batch of samples {shown} kills the DataLoader worker that loads it: workers "
            f"died twice on it ({died}); no sample crashed a throwaway worker on its own. "
            "loadertune does not load them in the training process, where they would take the "
            "job down; fix or skip those samples"
        )
    return SampleCrashError(message, list(samples), sample)
