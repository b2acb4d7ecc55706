"""The window schedule: early first look, full windows, distributed step counts."""

from __future__ import annotations

import math

from loadertune.schedule import EARLY_WINDOW_S, WindowSchedule


def test_first_window_may_close_early_when_the_loop_starves_without_workers() -> None:
    s = WindowSchedule(2.0, 10)
    s.open(100.0, 0)
    assert s.deadline_s == 100.0 + EARLY_WINDOW_S and s.step == 4
    assert not s.due(100.1, 10) and s.due(100.6, 4)
    assert s.ready(100.6, 4, wait_share=0.8, num_workers=0)


def test_early_look_is_for_the_first_window_only() -> None:
    s = WindowSchedule(2.0, 10)
    s.open(0.0, 0)
    assert s.ready(0.6, 5, wait_share=0.9, num_workers=0)
    s.open(0.6, 5)
    # Every later window lasts the full length, however starved the loop is.
    assert s.deadline_s == 2.6 and s.step == 15
    assert s.ready(2.6, 15, wait_share=0.9, num_workers=0)


def test_a_due_window_that_is_not_starved_is_extended_to_full_length() -> None:
    s = WindowSchedule(2.0, 10)
    s.open(0.0, 0)
    assert not s.ready(0.6, 5, wait_share=0.1, num_workers=0)
    assert (s.deadline_s, s.step) == (2.0, 10)
    assert not s.ready(2.1, 9, wait_share=0.1, num_workers=0)
    assert s.ready(2.1, 10, wait_share=0.1, num_workers=0)


def test_with_workers_the_first_window_is_not_cut_short() -> None:
    s = WindowSchedule(2.0, 10)
    s.open(0.0, 0)
    assert not s.ready(0.6, 5, wait_share=0.9, num_workers=4)


def test_distributed_windows_count_steps_and_extend_by_warmup() -> None:
    s = WindowSchedule(2.0, 10, distributed=True)
    assert not s.started
    s.open(0.0, 0)
    assert s.deadline_s == -math.inf and s.step == 40
    s.set_rate(50.0)
    s.open(0.0, 40)
    assert s.step == 140  # ceil(2 s x 50 batches/s) after step 40
    s.extend(6)
    assert s.step == 146
    assert s.ready(0.0, 146, wait_share=0.0, num_workers=0)


def test_discarded_warmup_moves_the_window_start() -> None:
    s = WindowSchedule(1.0, 10)
    s.open(0.0, 0)
    s.ready(0.6, 4, wait_share=0.0, num_workers=0)
    s.open(5.0, 20, discard=6)
    assert s.step == 36 and s.deadline_s == 6.0
