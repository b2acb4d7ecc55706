"""Loaders serving together (loadertune.group): read in the order their samplers drew."""

from __future__ import annotations

from collections import deque

import pytest

from loadertune.group import GroupIterator
from loadertune.stream import EpochStream, StreamBatchSampler


class _Part:
    """A loader's in-order iterator over what its sampler drew, as torch's behaves: reading a
    batch draws the next one; a batch whose loading raised is used up."""

    def __init__(self, sampler: StreamBatchSampler, prefetch: int, fail: set[int] = frozenset(), dead: bool = False) -> None:
        self._draws = iter(sampler)
        self._queue: deque = deque()
        self._fail = fail
        self.dead = dead
        self._rcvd_idx = 0
        self._workers = [object()]
        for _ in range(prefetch):
            self._draw()

    def _draw(self) -> None:
        batch = next(self._draws, None)
        if batch is not None:
            self._queue.append(batch)

    def __next__(self):
        if self.dead:
            raise RuntimeError("DataLoader worker (pid(s) 1) exited unexpectedly")
        if not self._queue:
            raise StopIteration
        batch = self._queue.popleft()
        self._rcvd_idx += 1
        self._draw()
        if batch[0] in self._fail:
            raise ValueError(f"bad sample {batch[0]}")
        return batch


def _group(n: int, prefetch: tuple[int, ...], **part_kw):
    stream = EpochStream(iter(range(n)))
    issued: deque = deque()
    log: deque = deque()
    parts = []
    for tag, p in enumerate(prefetch):
        sampler = StreamBatchSampler(stream, 2, drop_last=False)
        sampler.issued, sampler.log, sampler.tag = issued, log, tag
        parts.append((None, _Part(sampler, p, **(part_kw if tag == 1 else {}))))
    return GroupIterator(parts, log), issued


def test_a_group_reads_the_batches_in_the_order_they_were_drawn() -> None:
    group, issued = _group(40, (2, 6))
    seen = []
    for batch in group:
        assert issued.popleft() == batch  # what the loop takes off the issued list
        seen.extend(batch)
    assert seen == list(range(40))
    assert not issued and not group.log


def test_a_batch_whose_loading_raised_is_passed_and_the_rest_comes_in_order() -> None:
    group, _ = _group(20, (1, 2), fail={4})
    seen, errors = [], []
    while True:
        try:
            seen.extend(next(group))
        except StopIteration:
            break
        except ValueError as exc:
            errors.append(str(exc))
    assert errors == ["bad sample 4"]
    assert seen == [i for i in range(20) if i not in (4, 5)]


def test_a_dead_worker_leaves_its_batch_in_flight_for_the_recovery() -> None:
    group, issued = _group(20, (1, 1), dead=True)
    assert next(group) == [0, 1]
    issued.popleft()
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        next(group)
    # Nothing was passed: the recovery re-queues every issued batch, the dead part's first.
    assert list(group.log) == [1, 0] and issued[0] == [2, 3]


def test_a_group_shows_every_part_s_workers_and_the_one_holding_the_next_batch() -> None:
    group, _ = _group(20, (1, 3))
    assert len(group._workers) == 2
    assert group.head is group.parts[0][1]
    next(group)
    assert group.head is group.parts[1][1]


def test_split_gives_each_part_its_own_batches_in_flight_in_its_draw_order() -> None:
    group, issued = _group(40, (2, 3))
    next(group), issued.popleft()
    shares = group.split(issued)
    assert [it for it, _ in shares] == [it for _, it in group.parts]
    assert sorted(b for _, share in shares for b in share) == sorted(issued)
    assert shares[0][1] == [b for b, tag in zip(issued, group.log, strict=True) if tag == 0]
    assert (
        shares[1][1] == [b for b, tag in zip(issued, group.log, strict=True) if tag == 1]
        and len(shares[1][1]) == 3
    )
