from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from loadertune.stream import EpochStream, StreamBatchSampler, StreamSampler, requeue_issued


def test_batches_and_drop_last():
    s = EpochStream(iter(range(10)))
    assert list(StreamBatchSampler(s, 4, drop_last=False)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    s = EpochStream(iter(range(10)))
    assert list(StreamBatchSampler(s, 4, drop_last=True)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_take_mixes_requeued_items_and_the_source():
    s = EpochStream(iter(range(5)))
    s.requeue([10, 11])
    assert s.take(3) == [10, 11, 0]
    assert s.take(10) == [1, 2, 3, 4] and s.exhausted
    assert s.take(2) == []


def test_issued_batches_are_recorded_until_consumed():
    s = EpochStream(iter(range(10)))
    sampler = StreamBatchSampler(s, 3, drop_last=False)
    it = iter(sampler)
    next(it)
    next(it)
    assert list(sampler.issued) == [[0, 1, 2], [3, 4, 5]]
    sampler.issued.popleft()  # the loop consumed the first
    assert requeue_issued(s, [sampler.issued], flatten=True) == 1
    # The unconsumed batch comes again first, then the rest, re-cut at a new size.
    assert list(StreamBatchSampler(s, 4, drop_last=False)) == [[3, 4, 5, 6], [7, 8, 9]]
    assert s.exhausted


def test_a_closed_sampler_hands_out_nothing_more():
    s = EpochStream(iter(range(10)))
    old = StreamBatchSampler(s, 2, drop_last=False)
    it = iter(old)
    assert next(it) == [0, 1]
    old.closed = True
    assert list(it) == []
    # A new loader's sampler carries on right after what the old one issued.
    assert list(StreamBatchSampler(s, 2, drop_last=False)) == [[2, 3], [4, 5], [6, 7], [8, 9]]


def test_requeue_keeps_the_order_of_several_loaders():
    s = EpochStream(iter(range(6, 10)))
    older, newer = StreamBatchSampler(s, 2, False), StreamBatchSampler(s, 2, False)
    older.issued.extend([[0, 1], [2, 3]])
    newer.issued.extend([[4, 5]])
    requeue_issued(s, [older.issued, newer.issued], flatten=True)
    assert s.take(10) == list(range(10))


def test_whole_batches_are_requeued_as_units():
    batches = [[5, 1], [4], [3, 3, 2]]
    s = EpochStream(iter(batches))
    sampler = StreamSampler(s)
    it = iter(sampler)
    assert next(it) == [5, 1]
    assert next(it) == [4]
    sampler.issued.popleft()
    requeue_issued(s, [sampler.issued], flatten=False)
    assert list(StreamSampler(s)) == [[4], [3, 3, 2]]


def test_keys_wrap_indices_but_issued_holds_plain_indices():
    s = EpochStream(iter(range(4)))
    sampler = StreamBatchSampler(s, 2, drop_last=False, key=lambda i: ("k", i))
    assert list(sampler) == [[("k", 0), ("k", 1)], [("k", 2), ("k", 3)]]
    assert list(sampler.issued) == [[0, 1], [2, 3]]


@given(
    n=st.integers(0, 200),
    cuts=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 5), st.integers(0, 4)), max_size=8),
    drop_last=st.booleans(),
)
def test_any_sequence_of_rebuilds_delivers_each_index_once_in_order(n, cuts, drop_last):
    """Model of a loader: prefetch some batches, consume some, rebuild at a new size."""
    s = EpochStream(iter(range(n)))
    consumed: list[int] = []
    for size, prefetch, consume in cuts:
        sampler = StreamBatchSampler(s, size, drop_last)
        it = iter(sampler)
        for _ in range(prefetch):
            if next(it, None) is None:
                break
        for _ in range(min(consume, len(sampler.issued))):
            consumed.extend(sampler.issued.popleft())
        requeue_issued(s, [sampler.issued], flatten=True)
    last_size = cuts[-1][0] if cuts else 3
    last = StreamBatchSampler(s, last_size, drop_last)
    for batch in last:
        consumed.extend(batch)
        last.issued.popleft()
    if drop_last:
        # Only an incomplete final batch may be missing, as with torch's BatchSampler.
        assert consumed == list(range(len(consumed)))
        assert n - len(consumed) < last_size
    else:
        assert consumed == list(range(n))
