"""An epoch's sample stream that survives rebuilding the DataLoader.

The DataLoader's sampler runs ahead of training: up to ``prefetch_factor x num_workers`` batches
are in flight. To rebuild without losing or repeating a sample, the index stream lives here, in
the training process, outside any one loader: each loader built on it pulls batches through a
:class:`StreamBatchSampler` (or :class:`StreamSampler`), which records every batch it hands out
as *issued*; consuming a batch pops it. At a rebuild the issued-but-unconsumed batches go back
to the front of the stream (:func:`requeue_issued`) and the next loader carries on. Memory is
what is in flight, never the whole epoch's index list.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

__all__ = ["EpochStream", "StreamBatchSampler", "StreamSampler", "requeue_issued"]


class EpochStream:
    """One epoch's items (indices, or whole batches), continuing across rebuilds.

    Args:
        source: The iterator over the epoch's items, already created (the sampler's).
        drawn: Items of the epoch already taken from the sampler before ``source`` (a resumed
            epoch skips the ones consumed before its checkpoint).

    Attributes:
        drawn: Items taken from the sampler so far this epoch; minus those re-queued and those in
            flight, it is the epoch's position (see :mod:`loadertune.checkpoint`).
    """

    def __init__(self, source: Iterator[Any], drawn: int = 0) -> None:
        self._source = source
        self._requeued: deque[Any] = deque()
        self.exhausted = False
        self.drawn = drawn

    def next_item(self) -> Any:
        """The next item; raises StopIteration at the end of the epoch."""
        if self._requeued:
            return self._requeued.popleft()
        try:
            item = next(self._source)
        except StopIteration:
            self.exhausted = True
            raise
        self.drawn += 1
        return item

    def take(self, n: int) -> list[Any]:
        """Up to ``n`` next items (fewer only at the end of the epoch)."""
        out: list[Any] = []
        requeued = self._requeued
        while requeued and len(out) < n:
            out.append(requeued.popleft())
        missing = n - len(out)
        if missing and not self.exhausted:
            # One C-level slice instead of a Python call per index: this is the per-batch path.
            more = list(islice(self._source, missing))
            self.drawn += len(more)
            if len(more) < missing:
                self.exhausted = True
            out.extend(more)
        return out

    def requeue(self, items: Iterable[Any]) -> None:
        """Puts ``items`` back in front of the stream, in their order."""
        self._requeued.extendleft(reversed(list(items)))

    @property
    def requeued(self) -> int:
        """Items waiting in front of the stream."""
        return len(self._requeued)


def requeue_issued(stream: EpochStream, issued: Iterable[deque[Any]], flatten: bool) -> int:
    """Returns issued-but-unconsumed batches to the front of ``stream``; returns how many.

    Args:
        stream: The epoch stream.
        issued: The issued deques, oldest loader first (their batches keep that order).
        flatten: Re-queue the batches' indices one by one (so they can be re-cut at any size)
            rather than as whole batches.
    """
    pending: list[Any] = []
    for dq in issued:
        pending.extend(dq)
        dq.clear()
    if flatten:
        stream.requeue(i for batch in pending for i in batch)
    else:
        stream.requeue(pending)
    return len(pending)


class StreamBatchSampler:
    """Batches the stream's indices at a batch size; what a rebuilt DataLoader samples from.

    Args:
        stream: The epoch stream (settable, so persistent workers can move to the next epoch).
        batch_size: Samples per batch.
        drop_last: Drop the epoch's final incomplete batch, as ``BatchSampler`` does.
        key: Optional function from an index to the key the dataset is indexed with (used for
            per-sample seeding).

    Attributes:
        issued: Batches handed to the DataLoader and not yet consumed, oldest first.
        closed: Once set, hands out no more batches (the loader drains what it has in flight).
        gate: Set on a loader whose workers start in the background: its first draw waits
            there until the switch (see :mod:`loadertune.prestart`).
        log: Set on loaders that serve together (see :mod:`loadertune.group`): each draw
            appends ``tag`` to it, so the batches are read in the order they were drawn.
        tag: This loader's place in its group.
    """

    def __init__(
        self, stream: EpochStream, batch_size: int, drop_last: bool, key: Callable[[Any], Any] | None = None
    ) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.key = key
        self.issued: deque[list[Any]] = deque()
        self.closed = False
        self.gate: Any = None
        self.log: deque[int] | None = None
        self.tag = 0

    def __iter__(self) -> Iterator[list[Any]]:
        if not _through(self):
            return
        size = self.batch_size
        issued = self.issued
        key = self.key
        while not self.closed:
            stream = self.stream
            batch = stream.take(size)
            if len(batch) < size:
                if batch and not self.drop_last:
                    _issue(self, issued, batch)
                    yield batch if key is None else [key(i) for i in batch]
                elif batch:
                    # Dropped for now, not lost: a rebuild at a smaller batch size may still
                    # make a full batch of them, as the untuned loader at that size would.
                    stream.requeue(batch)
                return
            _issue(self, issued, batch)
            yield batch if key is None else [key(i) for i in batch]


class StreamSampler:
    """Hands out the stream's items one by one: whole batches of a user's batch_sampler, or
    single indices when automatic batching is off (``batch_size=None``).

    Attributes:
        issued: Items handed out and not yet consumed, oldest first.
        closed: Once set, hands out no more items.
        gate, log, tag: As :class:`StreamBatchSampler`'s.
    """

    def __init__(self, stream: EpochStream, key: Callable[[Any], Any] | None = None) -> None:
        self.stream = stream
        self.key = key
        self.issued: deque[Any] = deque()
        self.closed = False
        self.gate: Any = None
        self.log: deque[int] | None = None
        self.tag = 0

    def __iter__(self) -> Iterator[Any]:
        if not _through(self):
            return
        issued = self.issued
        key = self.key
        while not self.closed:
            try:
                item = self.stream.next_item()
            except StopIteration:
                return
            _issue(self, issued, item)
            if key is None:
                yield item
            elif isinstance(item, list):
                yield [key(i) for i in item]
            else:
                yield key(item)


def _issue(sampler: StreamBatchSampler | StreamSampler, issued: deque[Any], item: Any) -> None:
    """Records ``item`` as handed out (and, in a group, which loader drew it: read per draw, as
    a loader joins a group mid-epoch)."""
    issued.append(item)
    log = sampler.log
    if log is not None:
        log.append(sampler.tag)


def _through(sampler: StreamBatchSampler | StreamSampler) -> bool:
    """Waits at the sampler's gate, once; whether it may draw (False: abandoned)."""
    gate, sampler.gate = sampler.gate, None
    return gate is None or gate.wait()
