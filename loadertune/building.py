"""Building and starting the DataLoaders loadertune owns, on the epoch's sample stream.

Each keeps every option of the user's loader but the tuned ones (:func:`carried_options`);
torch's warnings pass once per run rather than at every rebuild; an iterator whose start is
interrupted leaves no worker behind.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from loadertune.config import LoaderConfig
from loadertune.deathreport import HOLD
from loadertune.faults import WORKER_DIED
from loadertune.shutdown import abort_iterator, abort_started
from loadertune.stream import EpochStream, StreamBatchSampler, StreamSampler

__all__ = [
    "TORCH_WORKER_WARNING",
    "DiedStarting",
    "build_loader",
    "carried_options",
    "construct_iterator",
    "make_persistent",
    "start_iterator",
    "torch_warnings_once",
]

#: The start of torch's warning past its suggested worker count.
TORCH_WORKER_WARNING = "This DataLoader will create"


def build_loader(
    loader: DataLoader,
    dataset: Any,
    stream: EpochStream | None,
    c: LoaderConfig,
    *,
    kind: str,
    drop_last: bool,
    key: Callable[[int], Any] | None,
    worker_init_fn: Callable[[int], Any] | None,
    generator: torch.Generator,
) -> DataLoader:
    """A DataLoader at ``c`` over ``dataset`` that reads its indices from ``stream``.

    Args:
        loader: The user's DataLoader, whose other options are carried over.
        dataset: The dataset to read (the user's, or a reseeding wrapper around it).
        stream: The epoch's sample stream; None for an IterableDataset (its own order).
        c: The configuration to build at.
        kind: How the user's loader makes its batches (``pipeline.StreamKind``): torch's
            BatchSampler is re-cut at ``c.batch_size``, a user's batch_sampler kept whole.
        drop_last: Whether a last short batch is dropped.
        key: Maps a sample index to what the dataset is indexed with (None: the index).
        worker_init_fn: The workers' init function.
        generator: The generator the workers' base seed is drawn from.
    """
    kwargs = carried_options(loader, c, worker_init_fn=worker_init_fn, generator=generator)
    with torch_warnings_once():
        if stream is None:  # IterableDataset: its own order; changes take effect per epoch
            built = DataLoader(dataset, batch_size=c.batch_size, drop_last=drop_last, **kwargs)
        elif kind == "sampler":
            batches = StreamBatchSampler(stream, c.batch_size, drop_last, key)
            built = DataLoader(dataset, batch_sampler=batches, **kwargs)
        elif kind == "batch_sampler":
            built = DataLoader(dataset, batch_sampler=StreamSampler(stream, key), **kwargs)
        else:
            built = DataLoader(dataset, batch_size=None, sampler=StreamSampler(stream, key), **kwargs)
    # `loadertune run` instruments user loaders; the ones loadertune builds pass through.
    built._loadertune_internal = True
    return built


def carried_options(loader: DataLoader, c: LoaderConfig, *, worker_init_fn: Any, generator: Any) -> dict[str, Any]:
    """The keyword arguments of a DataLoader at ``c`` that keeps every other option of
    ``loader`` (collate_fn, timeout, pinning device, multiprocessing context, in_order), valid
    for torch whatever ``c`` is: the options that need workers are passed only with workers."""
    kwargs: dict[str, Any] = {
        "num_workers": c.num_workers,
        "pin_memory": c.pin_memory,
        "collate_fn": loader.collate_fn,
        "timeout": loader.timeout,
        "worker_init_fn": worker_init_fn,
        "generator": generator,
    }
    if loader.pin_memory_device:
        kwargs["pin_memory_device"] = loader.pin_memory_device
    if c.num_workers > 0:
        kwargs["prefetch_factor"] = c.prefetch_factor
        kwargs["persistent_workers"] = c.persistent_workers
        # torch refuses a multiprocessing context without workers.
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
        if getattr(loader, "in_order", True) is False:
            kwargs["in_order"] = False
    return kwargs


#: torch's warnings already shown in this process (category, text): once per run, not per rebuild.
_WARNED: set[tuple[type, str]] = set()


@contextlib.contextmanager
def torch_warnings_once() -> Iterator[None]:
    """Building or starting a loader: torch's warnings pass once per process.

    torch warns past its suggested worker count (the usable CPUs); loadertune goes past it on
    purpose for I/O-bound loads and bounds CPU-bound ones itself, so that one is dropped. The
    rest (pin_memory without an accelerator...) would come again at every rebuild: a
    ``catch_warnings`` block resets Python's once-per-location memory, so they are recorded and
    re-issued only the first time (through the user's filters, which still apply).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("ignore", message=TORCH_WORKER_WARNING)
        yield
    for w in caught:
        key = (w.category, str(w.message))
        if key in _WARNED:
            continue
        _WARNED.add(key)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def start_iterator(loader: DataLoader, collective: Any = None) -> Iterator[Any]:
    """``iter(loader)``, forking its workers inside the collective's ``fork_guard`` under
    torch.distributed; an interrupted start stops the workers already started."""
    guard: Any = contextlib.nullcontext()
    if collective is not None and loader.num_workers > 0:
        from loadertune.distributed import fork_guard

        # Under torch.distributed, workers fork from a process with gloo's threads: fork them
        # from a quiet state (see fork_guard), so nothing of those threads is touched in a worker.
        guard = fork_guard(collective)
    it = None
    try:
        with guard, torch_warnings_once():
            it = iter(loader)
        if loader.num_workers > 0:
            HOLD.install()  # torch has set its SIGCHLD handler by now
        return it
    except BaseException as exc:
        # Interrupted (Ctrl-C) or failed half-way, or a worker's death reported by torch's
        # SIGCHLD handler just after: the iterator never reaches the caller, so its workers are
        # stopped here, or they outlive the run.
        if it is not None:
            abort_iterator(it)
            if getattr(loader, "_iterator", None) is it:
                loader._iterator = None  # a persistent loader must not reset a stopped iterator
            half = it
        else:
            half = abort_started(exc)
        if half is not None and isinstance(exc, RuntimeError) and WORKER_DIED.search(str(exc)):
            # A worker died while torch was still starting the others: the death is handled as
            # one at the first batch would be (the batches handed out are loaded again).
            return DiedStarting(exc, list(getattr(half, "_workers", None) or []))
        raise


def construct_iterator(loader: DataLoader) -> Iterator[Any]:
    """torch's multi-process iterator over ``loader`` as ``iter(loader)`` builds it, less the
    worker-count check (run ``check_worker_number_rationality`` under
    :func:`torch_warnings_once` first): this runs on a background thread, where catching
    warnings would catch the training thread's as well. Not kept on a persistent loader."""
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    return _MultiProcessingDataLoaderIter(loader)


class DiedStarting:
    """Stands in for an iterator whose worker died while torch started it: ``next`` raises
    that death, with the workers it names, for the front end to recover from.

    Attributes:
        _workers: The half-built iterator's workers (stopped), as torch's iterator names them.
    """

    def __init__(self, exc: RuntimeError, workers: list[Any]) -> None:
        self.exc = exc
        self._workers = workers
        self._raised = False

    def __iter__(self) -> DiedStarting:
        return self

    def __next__(self) -> Any:
        if not self._raised:
            self._raised = True
            raise self.exc
        # Asked again (the first report was not taken for this loader's): its workers are all
        # stopped, which is what a death at a batch looks like.
        raise RuntimeError(f"the DataLoader's workers stopped while starting ({self.exc})")


def make_persistent(loader: DataLoader, it: Any) -> bool:
    """Turns ``persistent_workers`` on for a running loader and its iterator, in place: torch
    then keeps the workers at the epoch's end and the next epoch resets the iterator instead of
    starting workers again. False (nothing changed) for an iterator without workers.
    """
    if not hasattr(it, "_persistent_workers"):
        return False
    # torch forbids setting it on a built loader; the loader object itself is loadertune's.
    object.__setattr__(loader, "persistent_workers", True)
    loader._iterator = it
    it._persistent_workers = True
    return True
