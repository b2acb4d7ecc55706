"""Workers added beside the running ones: several DataLoaders on one epoch stream, read as one.

Replacing a loader to get more workers restarts every worker. Where workers start slowly (spawn,
forkserver: each imports torch and unpickles the dataset, seconds on a few CPUs), going from 2
to 4 then meant starting 4 new workers while the 2 old ones served, and 8 after that; the
start-ups slowed the old workers too. Instead the new workers come as a second DataLoader on the
same stream (see :mod:`loadertune.stream`), only as many as are added, and the running one
keeps its own. Each loader's sampler appends its tag to a shared log as it draws a batch, so
:class:`GroupIterator` reads the loaders in the order the batches were drawn: the loop sees the
sampler's order, exactly once, as from one loader.

Only persistent loaders form a group (the next epoch resets each one's workers instead of
starting them), with the same batch size, prefetch factor and pinning: what a group runs is one
configuration, its workers summed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["GroupIterator"]


class GroupIterator:
    """Reads the iterators of loaders that draw from one stream, in the order they drew.

    Args:
        parts: (loader, iterator) pairs: the loader that ran first, then each one added.
        log: Which part drew each batch in flight, oldest first; the parts' samplers append
            their place in ``parts`` to it as they draw.

    The epoch ends when nothing is in flight: a part draws only as its batches are read, so
    then every part's sampler has come to the end of the stream.
    """

    __slots__ = ("log", "parts")

    def __init__(self, parts: list[tuple[Any, Iterator[Any]]], log: deque[int]) -> None:
        self.parts = parts
        self.log = log

    def __iter__(self) -> GroupIterator:
        return self

    def __next__(self) -> Any:
        log = self.log
        if not log:
            raise StopIteration
        it = self.parts[log[0]][1]
        before = getattr(it, "_rcvd_idx", None)
        try:
            batch = next(it)
        except StopIteration:
            # Ended with batches logged (its sampler was cut short): the group ends, and what is
            # left of the epoch is served by a new loader (LoaderPipeline.resume_unfinished).
            raise
        except BaseException:
            # A batch whose loading raised is used up (torch moved past it, as it drops it):
            # the next read goes on to the batch after it. A worker's death leaves it in flight.
            if getattr(it, "_rcvd_idx", None) != before:
                log.popleft()
            raise
        log.popleft()
        return batch

    def split(self, issued: Iterable[Any]) -> list[tuple[Iterator[Any], list[Any]]]:
        """Each part's iterator with its share of ``issued`` (the batches in flight, oldest
        first, one per entry of the log), in the order that part drew them."""
        shares: list[list[Any]] = [[] for _ in self.parts]
        for tag, batch in zip(self.log, issued, strict=False):
            shares[tag].append(batch)
        return [(it, share) for (_, it), share in zip(self.parts, shares, strict=True)]

    @property
    def head(self) -> Iterator[Any] | None:
        """The iterator holding the next batch, None when none is in flight."""
        return self.parts[self.log[0]][1] if self.log else None

    @property
    def _workers(self) -> list[Any]:
        # torch's name: what reads an iterator's worker processes reads a group's all.
        return [w for _, it in self.parts for w in (getattr(it, "_workers", None) or [])]
