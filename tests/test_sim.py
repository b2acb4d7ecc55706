from __future__ import annotations

import pytest
import torch

from loadertune.sim import SimulatedGpu


class FakeClock:
    """A monotonic clock that only moves when slept on.

    Args:
        overshoot_s: Extra seconds every sleep lasts, as a loaded machine wakes a thread late.
        during: Called halfway through each sleep (a sampler thread reading mid-step).
    """

    def __init__(self, overshoot_s=0.0, during=None):
        self.now = 0.0
        self.overshoot_s = overshoot_s
        self.during = during

    def sleep(self, s):
        self.now += s / 2
        if self.during is not None:
            self.during()
        self.now += s / 2 + self.overshoot_s

    def __call__(self):
        return self.now


@pytest.mark.parametrize("busy, idle", [(0.02, 0.0), (0.02, 0.02), (0.01, 0.03), (0.001, 0.009)])
def test_utilization_matches_busy_share(busy, idle):
    clock = FakeClock()
    gpu = SimulatedGpu(busy, idle, sleep=clock.sleep, clock=clock)
    gpu.read()
    for _ in range(50):
        gpu.step(8)
    reading = gpu.read()
    assert reading.util_pct == pytest.approx(100 * busy / (busy + idle), abs=1.0)


def test_idle_gap_lowers_utilization():
    clock = FakeClock()
    gpu = SimulatedGpu(0.01, sleep=clock.sleep, clock=clock)
    gpu.read()
    gpu.step(1)  # busy 10 ms
    clock.sleep(0.03)  # the loop waits for data: the GPU idles
    assert gpu.read().util_pct == pytest.approx(25.0, abs=0.5)


@pytest.mark.parametrize("overshoot_s", [0.0, 0.0005, 0.001, 0.005, 0.05])
def test_late_wake_ups_do_not_move_utilization(overshoot_s):
    # The flake this replaces: the planned end was recorded, so each 1 ms of wake-up delay on a
    # 10 ms step read as ~5 points of idle GPU. The delay belongs to the step it happened in.
    clock = FakeClock(overshoot_s=overshoot_s)
    gpu = SimulatedGpu(step_time_s=0.006, host_overhead_s=0.004, sleep=clock.sleep, clock=clock)
    gpu.read()
    for _ in range(20):
        gpu.step(4)
    assert clock.now == pytest.approx(20 * (0.01 + overshoot_s))
    assert gpu.read().util_pct == pytest.approx(60.0, abs=1e-6)


def test_late_wake_ups_still_leave_the_waits_between_steps_idle():
    clock = FakeClock(overshoot_s=0.002)
    gpu = SimulatedGpu(step_time_s=0.01, sleep=clock.sleep, clock=clock)
    gpu.read()
    gpu.step(1)  # 12 ms in all, busy throughout
    clock.now += 0.012  # the loop waits for data as long
    assert gpu.read().util_pct == pytest.approx(50.0, abs=1e-6)


def test_a_read_during_a_step_counts_the_part_already_run():
    readings = []
    gpu = None

    def read_mid_step():
        readings.append(gpu.read().util_pct)

    clock = FakeClock(overshoot_s=0.003, during=read_mid_step)
    gpu = SimulatedGpu(step_time_s=0.003, host_overhead_s=0.001, sleep=clock.sleep, clock=clock)
    gpu.read()
    clock.now += 0.002  # idle before the step
    gpu.step(1)  # a read at its middle: 2 ms idle + 2 ms of step at 75 % busy
    assert readings == [pytest.approx(37.5, abs=1e-6)]
    # The rest of the step, overshoot included, at the step's share.
    assert gpu.read().util_pct == pytest.approx(75.0, abs=1e-6)


def test_an_interrupted_sleep_closes_its_step():
    clock = FakeClock()

    def interrupted(s):
        clock.now += s / 4
        raise KeyboardInterrupt

    gpu = SimulatedGpu(step_time_s=0.01, sleep=interrupted, clock=clock)
    gpu.read()
    with pytest.raises(KeyboardInterrupt):
        gpu.step(1)
    clock.now += 0.0025  # after the interrupted step: idle, not an endless open step
    assert gpu.read().util_pct == pytest.approx(50.0, abs=1e-6)
    assert gpu.steps == 0


def test_default_clock_and_sleep_let_the_step_time_pass():
    import time

    gpu = SimulatedGpu(step_time_s=0.004, host_overhead_s=0.002)
    t0 = time.monotonic()
    gpu.step(1)
    # A lower bound only: time.sleep never returns early, however loaded the machine.
    assert time.monotonic() - t0 >= 0.006
    assert gpu.steps == 1


def test_functions_of_batch_size_and_memory():
    clock = FakeClock()
    gpu = SimulatedGpu(
        step_time_s=lambda b: 0.001 * b,
        host_overhead_s=lambda b: 0.01,
        memory_bytes=lambda b: b * 1000,
        total_memory_bytes=100_000,
        sleep=clock.sleep,
        clock=clock,
    )
    assert gpu.read().mem_used_bytes is None
    gpu.step(10)
    assert clock.now == pytest.approx(0.02)
    reading = gpu.read()
    assert reading.mem_used_bytes == 10_000 and reading.mem_total_bytes == 100_000
    with pytest.raises(torch.OutOfMemoryError, match="batch size 200"):
        gpu.step(200)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"step_time_s": -1.0}, "step_time_s"),
        ({"step_time_s": "fast"}, "step_time_s"),
        ({"step_time_s": 0.1, "total_memory_bytes": 0}, "total_memory_bytes"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimulatedGpu(**kwargs)


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        SimulatedGpu(0.01).step(0)
