"""The loader pipeline: the epoch's sample stream and the DataLoaders built on it.

loadertune owns the epoch's sample stream (see :mod:`loadertune.stream`) and builds the actual
DataLoaders on it, so it can replace the loader at any batch boundary without losing or repeating
a sample. A change of workers hands over: the old loader stops taking indices and drains the
batches it has in flight while the new workers start. Anything else re-queues the in-flight
batches in front of the stream.

The per-batch path reads ``src_it`` (the iterator to call ``next`` on) and ``src_issued`` (the
batches it was handed, oldest first), and nothing else.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from loadertune.config import LoaderConfig
from loadertune.errors import ReconfigureError
from loadertune.stream import EpochStream, StreamBatchSampler, StreamSampler, requeue_issued

__all__ = ["LoaderPipeline", "StreamKind", "stream_kind"]

#: How a loader makes its batches: "iterable" (an IterableDataset: its own order), "sampler"
#: (torch's BatchSampler: loadertune re-cuts the batches), "batch_sampler" (the user's own: its
#: batches are kept whole), "samples" (automatic batching off: one sample per item).
StreamKind = Literal["iterable", "sampler", "batch_sampler", "samples"]

_TORCH_WORKER_WARNING = "This DataLoader will create"


def stream_kind(loader: DataLoader) -> StreamKind:
    """How ``loader`` makes its batches (see :data:`StreamKind`)."""
    if isinstance(loader.dataset, IterableDataset):
        return "iterable"
    if loader.batch_sampler is None:
        return "samples"
    if type(loader.batch_sampler) is BatchSampler:
        return "sampler"  # torch's own, whether the DataLoader built it or the user passed it
    return "batch_sampler"


@dataclass(frozen=True)
class _Drain:
    """An old loader handing over the batches it has in flight."""

    loader: DataLoader
    it: Iterator[Any]
    issued: deque[Any]


class LoaderPipeline:
    """Builds, switches and shuts down the DataLoaders that serve one wrapped loader.

    Args:
        loader: The user's DataLoader (never iterated itself; its options are carried over).
        dataset: The dataset the built loaders read (the user's, or a reseeding wrapper).
        config: The configuration to start with.
        key: Maps a sample index to what the dataset is indexed with (None: the index itself).

    Attributes:
        kind: How the loader makes its batches.
        config: The configuration the loaders are built with.
        pending: A change waiting for the next epoch (IterableDataset loaders only).
        src_it: The iterator the loop reads from now, None outside an epoch.
        src_issued: The batches ``src_it`` was handed and has not delivered yet.
        rebuilds: Loaders built after the first.
        last_delivered: The indices of the batch delivered last.
    """

    def __init__(
        self,
        loader: DataLoader,
        *,
        dataset: Any,
        config: LoaderConfig,
        key: Callable[[int], Any] | None = None,
    ) -> None:
        self.loader = loader
        self.kind: StreamKind = stream_kind(loader)
        self._dataset = dataset
        self._key = key
        self._initial = config
        self.config = config
        # A BatchSampler passed in (batch_size=None on the loader) holds the batch settings.
        self.drop_last = loader.batch_sampler.drop_last if self.kind == "sampler" else loader.drop_last
        self.pending: LoaderConfig | None = None
        self.src_it: Iterator[Any] | None = None
        self.src_issued: deque[Any] | None = None
        self.rebuilds = 0
        self.last_delivered: Any = None
        self._inner: DataLoader | None = None
        self._it: Iterator[Any] | None = None
        self._stream: EpochStream | None = None
        self._drain: _Drain | None = None
        self._base_seed_drawn = False
        # Whether the base seed is drawn once for the run (a plain persistent-workers loader
        # keeps its first iterator) rather than once per epoch; a resumed run keeps the saved one.
        self.base_seed_once = config.persistent_workers and config.num_workers > 0
        #: The RNG states at the start of the epoch being served (``checkpoint.EpochStart``).
        self.epoch_start: Any = None
        #: Set by ``load_state_dict``: the interrupted epoch the next ``start_epoch`` continues.
        self.resume_at: Any = None
        # The rebuilt loaders' own generator: they never draw from the user's or the global RNG.
        self._generator = torch.Generator()

    @property
    def in_epoch(self) -> bool:
        """Whether an epoch is being served (map-style loaders)."""
        return self._stream is not None

    @property
    def stream(self) -> EpochStream | None:
        """The epoch's sample stream, None outside an epoch or for an IterableDataset."""
        return self._stream

    @property
    def draining(self) -> bool:
        """Whether an old loader is still handing over its in-flight batches."""
        return self._drain is not None

    # -- epochs ------------------------------------------------------------------------------------
    def start_epoch(self) -> bool:
        """Starts serving an epoch; returns whether a change waiting for it was made."""
        if self.src_it is not None:
            # The previous epoch was left early: its in-flight batches are simply dropped, as a
            # fresh DataLoader iterator would drop them.
            self._discard_epoch()
        switched = False
        if self.pending is not None:
            self.switch(self.pending)
            self.pending = None
            switched = True
        if self.kind == "iterable":
            if self._inner is None:
                self._inner = self._build(None)
            self._it = _iterate(self._inner)
        else:
            source = self._epoch_source()
            self._stream = EpochStream(source, drawn=self.epoch_start.position)
            if self._inner is None or not self.config.persistent_workers or self.config.num_workers == 0:
                self._shutdown_inner()
                self._inner = self._build(self._stream)
            else:
                sampler = self._inner_sampler()
                sampler.stream = self._stream
                sampler.issued.clear()
            self._it = _iterate(self._inner)
        self._point()
        return switched

    def end_epoch(self) -> None:
        """The epoch's last batch was delivered."""
        if not self.config.persistent_workers:
            self._it = None
        self._stream = None
        self.src_it = self.src_issued = None

    def _discard_epoch(self) -> None:
        self._shutdown_drain()
        if self.config.persistent_workers and self.config.num_workers > 0 and self._inner is not None:
            # torch's _reset drains a persistent iterator's in-flight batches itself.
            self._inner_sampler().issued.clear()
        else:
            self._shutdown_inner()
        self._stream = None
        self.src_it = self.src_issued = None

    def _epoch_source(self) -> Iterator[Any]:
        loader = self.loader
        source = (
            loader.batch_sampler
            if self.kind == "batch_sampler"
            else (loader.batch_sampler.sampler if self.kind == "sampler" else loader.sampler)
        )
        from loadertune.checkpoint import EpochStart

        # The RNG states this epoch's order comes from (a checkpoint saves them); a resumed
        # epoch puts the saved ones back first, and skips what was consumed before.
        resume, self.resume_at = self.resume_at, None
        if resume is not None:
            self._base_seed_drawn = resume.base_seed_drawn
            start = resume.begin(loader, source)
        else:
            start = EpochStart.capture(loader, source, base_seed_drawn=self._base_seed_drawn)
        # Create the sampler's iterator first, then draw the base seed: the order in which a
        # plain DataLoader consumes its RNG, so this epoch's and later epochs' orders match it.
        source_iter = iter(source)
        if not (self.base_seed_once and self._base_seed_drawn):
            base = int(torch.empty((), dtype=torch.int64).random_(generator=loader.generator).item())
            self._base_seed_drawn = True
            self._generator.manual_seed(base)
        self.epoch_start = start
        return start.skip(source_iter)

    def position(self) -> int:
        """Items of this epoch's sampler the loop has consumed (in-flight ones do not count):
        indices, or whole batches of a user's batch_sampler; 0 outside an epoch."""
        stream = self._stream
        if stream is None:
            return 0
        in_flight = 0
        for issued in self._issued_lists():
            in_flight += sum(map(len, issued)) if self.kind == "sampler" else len(issued)
        return stream.drawn - stream.requeued - in_flight

    # -- the per-batch bookkeeping -----------------------------------------------------------------
    def delivered(self) -> int | None:
        """Takes the batch just delivered off the issued list; returns its sample count (None
        when unknown: an IterableDataset)."""
        issued = self.src_issued
        if not issued:
            return None
        consumed = issued.popleft()
        self.last_delivered = consumed
        return len(consumed) if self.kind != "samples" else 1

    def drop_failed(self) -> None:
        """Forgets the batch whose loading raised (torch drops it too)."""
        if self.src_issued:
            self.src_issued.popleft()

    def finish_drain(self) -> bool:
        """Moves on from a drained old loader; False when no hand-over was under way."""
        if self._drain is None:
            return False
        self._shutdown_drain()
        self._point()
        return True

    # -- changes -----------------------------------------------------------------------------------
    def switch(self, config: LoaderConfig) -> None:
        """Switches configuration between epochs (no stream to carry over)."""
        self._shutdown_inner()
        self.config = config
        self.rebuilds += 1

    def rebuild(self, config: LoaderConfig, *, handoff_ok: bool = True) -> int:
        """Switches configuration mid-epoch at the current batch boundary.

        Returns:
            The batches still in flight in a loader handing over (they are delivered before the
            new loader's first).
        """
        stream = self._stream
        in_flight = 0
        handoff = (
            handoff_ok
            and stream is not None
            and self._drain is None
            and self._it is not None
            and self.config.num_workers > 0
            and config.batch_size == self.config.batch_size
            and bool(self.src_issued)
        )
        if handoff:
            sampler = self._inner_sampler()
            sampler.closed = True
            in_flight = len(sampler.issued)
            self._drain = _Drain(self._inner, self._it, sampler.issued)
            self._inner = self._it = None
        else:
            if stream is not None:
                requeue_issued(stream, self._issued_lists(), flatten=self.kind == "sampler")
            self._shutdown_inner()
        self.config = config
        self.rebuilds += 1
        if stream is not None:
            # Even an exhausted stream gets a loader: it ends the epoch as the old one would have.
            self._inner = self._build(stream)
            self._it = _iterate(self._inner)
        self._point()
        return in_flight

    def requeue_front(self, items: Any) -> None:
        """Hands ``items`` (a failed batch's indices) out again first, then what is in flight."""
        stream = self._stream
        if stream is None:
            raise ReconfigureError("no epoch in progress to hand the failed batch back to")
        requeue_issued(stream, self._issued_lists(), flatten=True)
        stream.requeue(items)

    def worker_pids(self) -> list[int]:
        """Pids of the live workers (the current loader's and a draining one's)."""
        its = [self._it] + ([self._drain.it] if self._drain is not None else [])
        return [w.pid for it in its for w in (getattr(it, "_workers", None) or []) if w.pid is not None]

    def shutdown(self) -> None:
        """Stops every worker now; idempotent."""
        self._shutdown_inner()
        self._stream = None

    # -- building ----------------------------------------------------------------------------------
    def _build(self, stream: EpochStream | None) -> DataLoader:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TORCH_WORKER_WARNING)
            loader = self._new_loader(stream)
        # `loadertune run` instruments user loaders; the ones loadertune builds pass through.
        loader._loadertune_internal = True
        return loader

    def _new_loader(self, stream: EpochStream | None) -> DataLoader:
        c = self.config
        loader = self.loader
        kwargs: dict[str, Any] = {
            "num_workers": c.num_workers,
            "pin_memory": c.pin_memory,
            "collate_fn": loader.collate_fn,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
            "generator": self._generator,
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
        if stream is None:  # IterableDataset: its own order; changes take effect per epoch
            return DataLoader(self._dataset, batch_size=c.batch_size, drop_last=self.drop_last, **kwargs)
        if self.kind == "sampler":
            return DataLoader(
                self._dataset,
                batch_sampler=StreamBatchSampler(stream, c.batch_size, self.drop_last, self._key),
                **kwargs,
            )
        if self.kind == "batch_sampler":
            return DataLoader(self._dataset, batch_sampler=StreamSampler(stream, self._key), **kwargs)
        return DataLoader(self._dataset, batch_size=None, sampler=StreamSampler(stream, self._key), **kwargs)

    def _point(self) -> None:
        """Points the per-batch path at the draining loader, else at the current one."""
        if self._drain is not None:
            self.src_it, self.src_issued = self._drain.it, self._drain.issued
        else:
            self.src_it = self._it
            self.src_issued = None if self._stream is None or self._inner is None else self._inner_sampler().issued

    def _inner_sampler(self) -> Any:
        inner = self._inner
        return inner.sampler if self.kind == "samples" else inner.batch_sampler

    def _issued_lists(self) -> list[deque[Any]]:
        """Issued-but-undelivered batches of every live loader, oldest loader first."""
        out = []
        if self._drain is not None:
            out.append(self._drain.issued)
        if self._inner is not None and self._stream is not None:
            out.append(self._inner_sampler().issued)
        return out

    def _shutdown_inner(self) -> None:
        self._shutdown_drain()
        _shutdown(self._inner, self._it)
        self._it = None
        self._inner = None
        self.src_it = self.src_issued = None

    def _shutdown_drain(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None:
            _shutdown(drain.loader, drain.it)


def _shutdown(loader: DataLoader | None, it: Any) -> None:
    """Stops a loader's workers now (a persistent loader keeps its iterator on the loader)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    if loader is not None and getattr(loader, "_iterator", None) is not None:
        loader._iterator._shutdown_workers()
        loader._iterator = None


def _iterate(loader: DataLoader) -> Iterator[Any]:
    with warnings.catch_warnings():
        # torch warns past its suggested worker count (the usable CPUs); loadertune goes past it
        # on purpose for I/O-bound loads and bounds CPU-bound ones itself.
        warnings.filterwarnings("ignore", message=_TORCH_WORKER_WARNING)
        return iter(loader)
