"""The pure rules of the probe sweep: no processes, no clocks, microseconds per test."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadertune.cli import sweep
from loadertune.cli.sweep import Point


def pt(w: int, rate: float, mem: int | None = 100, err: float | None = 0.01) -> Point:
    return Point(
        num_workers=w,
        samples_per_s=rate,
        batches=50,
        seconds=1.0,
        rel_stderr=err,
        worker_mem_bytes=mem,
    )


# -- parse_workers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4", (4,)),
        ("0,1,2,4,8", (0, 1, 2, 4, 8)),
        ("8,2,2,0", (0, 2, 8)),  # sorted, distinct
        ("0-4", (0, 1, 2, 3, 4)),  # inclusive
        ("0:16:4", (0, 4, 8, 12, 16)),  # inclusive stop
        ("0:10:4", (0, 4, 8)),
        ("2:5", (2, 3, 4, 5)),
        (" 0, 2-3 ,12:16:2", (0, 2, 3, 12, 14, 16)),
    ],
)
def test_parse_workers_accepts_lists_ranges_and_steps(text, expected):
    assert sweep.parse_workers(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "expected counts"),
        ("0,,2", "expected counts"),
        ("a,b", "'a' is not a count"),
        ("-1", "is not a count"),
        ("8-2", "runs backwards"),
        ("0:4:0", "step"),
        ("1:2:3:4", "START:STOP"),
        ("1-2-3", "START-STOP"),
        ("1.5", "is not a count"),
        ("0-999", "above the limit"),
    ],
)
def test_parse_workers_rejects_bad_text_naming_the_item(text, says):
    with pytest.raises(ValueError, match="--workers") as info:
        sweep.parse_workers(text)
    assert says in str(info.value)


@given(st.sets(st.integers(0, sweep.MAX_WORKERS), min_size=1, max_size=20))
def test_parse_workers_round_trips_any_list(counts):
    assert sweep.parse_workers(",".join(map(str, counts))) == tuple(sorted(counts))


def test_default_workers_climb_past_the_cores_to_the_cap():
    assert sweep.default_workers(16) == (0, 1, 2, 4, 6, 8, 12, 16)
    assert sweep.default_workers(8) == (0, 1, 2, 4, 6, 8)
    # A cap off the ladder is tried itself.
    assert sweep.default_workers(40)[-2:] == (32, 40)


def test_warmup_and_blocks_cover_one_round_of_workers():
    assert sweep.warmup_batches(0) == 2
    # The batches the workers could have ready when the loop first asks: all discarded.
    assert sweep.warmup_batches(8, prefetch_factor=2) == 17
    assert sweep.warmup_batches(4, prefetch_factor=4) == 17
    assert sweep.block_size(0) == 2
    assert sweep.block_size(12) == 12


# -- the stopping rule of a point ------------------------------------------------------------


def test_rel_stderr_needs_enough_blocks():
    assert sweep.rel_stderr([0.01] * (sweep.MIN_BLOCKS * 2 - 1), block=2) is None
    assert sweep.rel_stderr([0.01] * (sweep.MIN_BLOCKS * 2), block=2) == pytest.approx(0.0)


def test_rel_stderr_absorbs_bursts_within_a_block():
    # Four workers deliver in bursts: three batches at once, then a long wait. Single intervals
    # vary wildly; whole rounds do not, so the rate is known.
    bursty = [0.0, 0.0, 0.0, 0.4] * 20
    assert sweep.rel_stderr(bursty, block=4) == pytest.approx(0.0)
    assert sweep.rel_stderr(bursty, block=1) > 0.1


def test_rel_stderr_matches_the_batch_means_formula():
    intervals = [0.1, 0.1, 0.3, 0.3] * 4  # blocks of 2: 0.2, 0.6, 0.2, 0.6, ...
    sums = [0.2, 0.6] * 4
    mean = sum(sums) / 8
    sd = math.sqrt(sum((s - mean) ** 2 for s in sums) / 7)
    assert sweep.rel_stderr(intervals, block=2) == pytest.approx(sd / mean / math.sqrt(8))


def test_rel_stderr_rejects_a_bad_block():
    with pytest.raises(ValueError, match="block"):
        sweep.rel_stderr([0.1] * 10, block=0)


def test_point_done_when_precise_only_after_the_least_time():
    steady = [0.05] * 40
    assert sweep.point_done(steady, 2, measured_s=2.0, elapsed_s=2.5, budget_s=10) == "precise"
    # Even, but measured too briefly to trust.
    assert sweep.point_done(steady, 2, measured_s=0.2, elapsed_s=0.3, budget_s=10) is None


def test_point_done_when_the_share_of_the_budget_is_spent():
    noisy = [0.01, 0.01, 0.5, 0.5] * 5
    assert sweep.point_done(noisy, 2, measured_s=5.0, elapsed_s=5.5, budget_s=10) is None
    assert sweep.point_done(noisy, 2, measured_s=9.9, elapsed_s=10.0, budget_s=10) == "budget"
    # Out of time but not yet two rounds of the workers: keep going.
    assert sweep.point_done([0.3] * 3, 2, measured_s=0.9, elapsed_s=20.0, budget_s=10) is None
    assert sweep.point_done([0.3] * 4, 2, measured_s=1.2, elapsed_s=20.0, budget_s=10) == "budget"


def test_point_budget_splits_what_is_left_over_the_points_to_come():
    assert sweep.point_budget_s(60, 8) == 7.5
    assert sweep.point_budget_s(10, 0) == 10
    assert sweep.point_budget_s(-1, 3) == 0


# -- the knee --------------------------------------------------------------------------------


def test_knee_waits_for_two_points_without_gain():
    assert sweep.knee_index([100, 200, 400]) is None
    assert sweep.knee_index([100, 200, 400, 410]) is None
    assert sweep.knee_index([100, 200, 400, 410, 405]) == 2


def test_knee_gain_must_beat_the_best_so_far_by_five_percent():
    # +4% then +4%: creeping, not climbing.
    assert sweep.knee_index([100, 104, 108.2]) == 0
    # A dip then a real gain resets the count.
    assert sweep.knee_index([100, 90, 130, 131]) is None
    assert sweep.knee_index([100, 90, 130, 131, 120]) == 2


def test_knee_of_nothing_is_none():
    assert sweep.knee_index([]) is None
    assert sweep.knee_index([100]) is None


def test_should_stop_only_for_the_default_sequence():
    points = [pt(0, 100), pt(1, 200), pt(2, 201), pt(4, 199)]
    assert sweep.should_stop(points, adaptive=True)
    assert not sweep.should_stop(points, adaptive=False)
    assert not sweep.should_stop(points[:3], adaptive=True)


# -- the recommendation ----------------------------------------------------------------------


def test_recommend_takes_the_smallest_count_within_five_percent_of_the_best():
    points = [pt(0, 200), pt(2, 700), pt(4, 960, mem=50), pt(8, 1000), pt(16, 990)]
    rec = sweep.recommend(points, batch_bytes=1000, prefetch_factor=2)
    assert rec.point.num_workers == 4
    assert rec.best.num_workers == 8
    assert rec.ram_bytes == 4 * 50
    assert rec.shm_bytes == 4 * 2 * 1000


def test_recommend_zero_workers_needs_nothing():
    rec = sweep.recommend([pt(0, 500, mem=None), pt(1, 480)], batch_bytes=1000, prefetch_factor=2)
    assert rec.point.num_workers == 0
    assert (rec.ram_bytes, rec.shm_bytes) == (0, 0)


def test_recommend_leaves_unknown_requirements_unknown():
    rec = sweep.recommend([pt(2, 500, mem=None)], batch_bytes=None, prefetch_factor=2)
    assert rec.ram_bytes is None
    assert rec.shm_bytes is None


def test_recommend_nothing_from_nothing():
    assert sweep.recommend([], batch_bytes=1, prefetch_factor=2) is None
    assert sweep.recommend([pt(0, 0.0)], batch_bytes=1, prefetch_factor=2) is None


@given(
    st.dictionaries(st.integers(0, 64), st.floats(1, 1e5, allow_nan=False), min_size=1, max_size=12)
)
def test_recommend_is_near_best_and_no_smaller_count_is(rates):
    points = [pt(w, r) for w, r in rates.items()]
    rec = sweep.recommend(points, batch_bytes=10, prefetch_factor=2)
    best = max(rates.values())
    assert rec.best.samples_per_s == best
    assert rec.point.samples_per_s >= best * (1 - sweep.NEAR_BEST)
    assert all(
        r < best * (1 - sweep.NEAR_BEST) for w, r in rates.items() if w < rec.point.num_workers
    )


def test_point_to_dict_is_json_ready():
    d = pt(4, 123.456789, err=None).to_dict()
    assert d["samples_per_s"] == 123.46
    assert d["rel_stderr"] is None
    assert set(d) >= {
        "num_workers",
        "samples_per_s",
        "batches",
        "seconds",
        "rel_stderr",
        "worker_mem_bytes",
    }
