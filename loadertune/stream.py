"""An epoch's sample stream that survives rebuilding the DataLoader.

The DataLoader's sampler runs ahead of training: up to ``prefetch_factor x num_workers`` batches
are in flight. To rebuild without losing or repeating a sample, the index stream lives here, in
the training process, outside any one loader: each loader built on it pulls batches through a
:class:`StreamBatchSampler`, every batch handed out is recorded as *issued*, and consuming a batch
pops it. At a rebuild the issued-but-unconsumed batches go back to the front of the stream and
the next loader carries on. Memory is what is in flight, never the whole epoch's index list.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["EpochStream", "StreamBatchSampler", "StreamSampler"]


class EpochStream:
    """One epoch's items (indices, or whole batches), continuing across rebuilds.

    Args:
        source: The iterator over the epoch's items, already created (the sampler's).
    """

    def __init__(self, source: Iterator[Any]) -> None:
        self._source = source
        self._requeued: deque[Any] = deque()
        self.issued: deque[Any] = deque()
        self.exhausted = False

    def next_item(self) -> Any:
        """The next item; raises StopIteration at the end of the epoch."""
        if self._requeued:
            return self._requeued.popleft()
        try:
            return next(self._source)
        except StopIteration:
            self.exhausted = True
            raise

    def requeue(self, items: Iterable[Any]) -> None:
        """Puts ``items`` back in front of the stream, in their order."""
        self._requeued.extendleft(reversed(list(items)))

    def requeue_issued(self, flatten: bool) -> int:
        """Returns every issued-but-unconsumed batch to the stream; returns how many batches.

        Args:
            flatten: Re-queue the batches' indices one by one (so they can be re-batched at any
                size) rather than as whole batches.
        """
        n = len(self.issued)
        pending = list(self.issued)
        self.issued.clear()
        if flatten:
            self.requeue(i for batch in pending for i in batch)
        else:
            self.requeue(pending)
        return n

    @property
    def requeued(self) -> int:
        """Items waiting in front of the stream."""
        return len(self._requeued)


class StreamBatchSampler:
    """Batches the stream's indices at a batch size; what a rebuilt DataLoader samples from.

    Args:
        stream: The epoch stream (settable, so persistent workers can move to the next epoch).
        batch_size: Samples per batch.
        drop_last: Drop the epoch's final incomplete batch, as ``BatchSampler`` does.
        key: Optional function from (epoch position) index to the key the dataset is indexed
            with (used for per-sample seeding).
    """

    def __init__(self, stream: EpochStream, batch_size: int, drop_last: bool, key: Any = None) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.key = key

    def __iter__(self) -> Iterator[list[Any]]:
        stream = self.stream
        size = self.batch_size
        issued = stream.issued
        key = self.key
        while True:
            batch = []
            try:
                while len(batch) < size:
                    batch.append(stream.next_item())
            except StopIteration:
                if batch and not self.drop_last:
                    issued.append(batch)
                    yield batch if key is None else [key(i) for i in batch]
                elif batch:
                    # Dropped for now, not lost: a rebuild at a smaller batch size may still
                    # make a full batch of them, as the untuned loader at that size would.
                    stream.requeue(batch)
                return
            issued.append(batch)
            yield batch if key is None else [key(i) for i in batch]


class StreamSampler:
    """Hands out the stream's items one by one: whole batches of a user's batch_sampler, or
    single indices when automatic batching is off (``batch_size=None``)."""

    def __init__(self, stream: EpochStream, key: Any = None) -> None:
        self.stream = stream
        self.key = key

    def __iter__(self) -> Iterator[Any]:
        stream = self.stream
        issued = stream.issued
        key = self.key
        while True:
            try:
                item = stream.next_item()
            except StopIteration:
                return
            issued.append(item)
            if key is None:
                yield item
            elif isinstance(item, list):
                yield [key(i) for i in item]
            else:
                yield key(item)
