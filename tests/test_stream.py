from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from loadertune.stream import EpochStream, StreamBatchSampler, StreamSampler


def test_batches_and_drop_last():
    s = EpochStream(iter(range(10)))
    assert list(StreamBatchSampler(s, 4, drop_last=False)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    s = EpochStream(iter(range(10)))
    assert list(StreamBatchSampler(s, 4, drop_last=True)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_issued_batches_are_recorded_until_consumed():
    s = EpochStream(iter(range(10)))
    it = iter(StreamBatchSampler(s, 3, drop_last=False))
    next(it)
    next(it)
    assert list(s.issued) == [[0, 1, 2], [3, 4, 5]]
    s.issued.popleft()  # the loop consumed the first
    assert s.requeue_issued(flatten=True) == 1
    # The unconsumed batch comes again first, then the rest, re-cut at a new size.
    assert list(StreamBatchSampler(s, 4, drop_last=False)) == [[3, 4, 5, 6], [7, 8, 9]]
    assert s.exhausted


def test_whole_batches_are_requeued_as_units():
    batches = [[5, 1], [4], [3, 3, 2]]
    s = EpochStream(iter(batches))
    it = iter(StreamSampler(s))
    assert next(it) == [5, 1]
    assert next(it) == [4]
    s.issued.popleft()
    s.requeue_issued(flatten=False)
    assert list(StreamSampler(s)) == [[4], [3, 3, 2]]


def test_keys_wrap_indices_but_issued_holds_plain_indices():
    s = EpochStream(iter(range(4)))
    out = list(StreamBatchSampler(s, 2, drop_last=False, key=lambda i: ("k", i)))
    assert out == [[("k", 0), ("k", 1)], [("k", 2), ("k", 3)]]
    assert list(s.issued) == [[0, 1], [2, 3]]


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
        it = iter(StreamBatchSampler(s, size, drop_last))
        for _ in range(prefetch):
            if next(it, None) is None:
                break
        for _ in range(min(consume, len(s.issued))):
            consumed.extend(s.issued.popleft())
        s.requeue_issued(flatten=True)
    last_size = cuts[-1][0] if cuts else 3
    for batch in StreamBatchSampler(s, last_size, drop_last):
        consumed.extend(batch)
        s.issued.popleft()
    if drop_last:
        # Only an incomplete final batch may be missing, as with torch's BatchSampler.
        assert consumed == list(range(len(consumed)))
        assert n - len(consumed) < last_size
    else:
        assert consumed == list(range(n))
