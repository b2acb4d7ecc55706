from __future__ import annotations

import pytest
import torch

from loadertune.sim import SimulatedGpu


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def sleep(self, s):
        self.now += s

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


def test_real_clock_utilization_within_a_few_points():
    gpu = SimulatedGpu(step_time_s=0.006, host_overhead_s=0.004)
    gpu.read()
    for _ in range(20):
        gpu.step(4)
    # Sleep overshoot only lengthens steps evenly, so the share stays near 60%.
    assert gpu.read().util_pct == pytest.approx(60.0, abs=5.0)


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
