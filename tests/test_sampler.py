from __future__ import annotations

import logging
import threading
import time

import pytest

from loadertune.sampler import Sampler
from loadertune.sources.base import GpuReading, HostReading


class ScriptedGpu:
    name = "scripted"

    def __init__(self, fail_after=None):
        self.reads = 0
        self.fail_after = fail_after
        self.closed = False

    def read(self):
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise RuntimeError("GPU fell off the bus")
        return GpuReading(util_pct=float(self.reads % 100), mem_used_bytes=1000, mem_total_bytes=4000)

    def close(self):
        self.closed = True


class ScriptedHost:
    name = "scripted-host"

    def read(self):
        return HostReading(cpu_pct=50.0, ram_available_bytes=10, ram_total_bytes=20, usable_cpus=2)


def _wait_ticks(sampler, n, timeout=10.0):
    deadline = time.monotonic() + timeout
    while sampler.ticks < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {sampler.ticks} ticks")
        time.sleep(0.005)


def test_ticks_and_latest_snapshot():
    gpu = ScriptedGpu()
    with Sampler(interval_s=0.01, gpu=gpu, host=ScriptedHost()) as sampler:
        assert sampler.latest() is None or sampler.ticks >= 1
        _wait_ticks(sampler, 5)
        snap = sampler.latest()
        assert snap.gpu_mem_used_bytes == 1000 and snap.gpu_mem_total_bytes == 4000
        assert snap.cpu_pct == 50.0 and snap.ram_available_bytes == 10 and snap.usable_cpus == 2
        assert snap.gpu_process_util_pct is None  # unknown stays None
        thread = sampler._thread
        assert thread.name == "loadertune-sampler" and thread.daemon
    assert not sampler.running
    assert gpu.closed


def test_stop_joins_within_two_intervals():
    sampler = Sampler(interval_s=0.2, host=None).start()
    _wait_ticks(sampler, 1)
    t0 = time.perf_counter()
    sampler.stop()
    assert not sampler.running
    # Event.wait wakes at once on stop; generous bound for a loaded machine.
    assert time.perf_counter() - t0 < 2 * 0.2 + 0.5


def test_window_returns_the_time_range():
    sampler = Sampler(interval_s=1.0, gpu=ScriptedGpu(), host=None)
    for _ in range(5):
        sampler.tick()
    times = sampler.window(0.0).times_s
    assert len(times) == 5
    mid = sampler.window(times[1], times[3])
    assert len(mid) == 3
    assert list(mid.values("gpu_util_pct")) == [2.0, 3.0, 4.0]


def test_ring_buffer_overwrites_oldest():
    sampler = Sampler(interval_s=1.0, gpu=ScriptedGpu(), host=None, capacity=4)
    for _ in range(10):
        sampler.tick()
    w = sampler.window(0.0)
    assert list(w.values("gpu_util_pct")) == [7.0, 8.0, 9.0, 10.0]
    assert sampler.latest().gpu_util_pct == 10.0


def test_failing_source_is_disabled_with_one_warning(caplog):
    gpu = ScriptedGpu(fail_after=2)
    sampler = Sampler(interval_s=1.0, gpu=gpu, host=ScriptedHost())
    with caplog.at_level(logging.WARNING, logger="loadertune"):
        for _ in range(6):
            sampler.tick()
    warnings = [r for r in caplog.records if "no longer sampled" in r.getMessage()]
    assert len(warnings) == 1
    assert "gpu_util_pct" in warnings[0].getMessage() and "fell off the bus" in warnings[0].getMessage()
    assert sampler.ticks == 6 and sampler.gpu is None
    snap = sampler.latest()
    assert snap.gpu_util_pct is None and snap.cpu_pct == 50.0


def test_thread_keeps_ticking_after_a_source_dies():
    with Sampler(interval_s=0.01, gpu=ScriptedGpu(fail_after=1), host=None) as sampler:
        _wait_ticks(sampler, 10)
        assert sampler.running
    assert threading.active_count() >= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"interval_s": 0}, "interval_s"),
        ({"interval_s": float("nan")}, "interval_s"),
        ({"capacity": 1}, "capacity"),
        ({"gpu": object()}, "gpu must have a read"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampler(**kwargs)


class CountingHost(ScriptedHost):
    def __init__(self):
        self.reads = 0

    def read(self):
        self.reads += 1
        return HostReading(cpu_pct=float(self.reads))


def test_host_is_read_at_most_every_host_interval_and_held_between():
    host = CountingHost()
    sampler = Sampler(interval_s=1.0, host=host, host_interval_s=3600.0)
    for _ in range(5):
        sampler.tick()
    assert host.reads == 1
    # Ticks between host readings hold the last one (sample and hold).
    assert list(sampler.window(0.0).values("cpu_pct")) == [1.0] * 5
    with pytest.raises(ValueError, match="host_interval_s"):
        Sampler(host_interval_s=-1)
