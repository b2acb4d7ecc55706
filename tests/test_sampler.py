from __future__ import annotations

import logging
import threading

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


class SignallingHost(ScriptedHost):
    """Counts its reads and lets a test wait for the n-th (an event, not a sleep and a guess)."""

    def __init__(self):
        self.reads = 0
        self._cond = threading.Condition()

    def read(self):
        with self._cond:
            self.reads += 1
            self._cond.notify_all()
        return super().read()

    def wait_reads(self, n, timeout=30.0):
        """Blocks until ``n`` reads happened; the timeout only bounds a broken sampler."""
        with self._cond:
            assert self._cond.wait_for(lambda: self.reads >= n, timeout), f"only {self.reads} reads"


def test_ticks_and_latest_snapshot():
    gpu = ScriptedGpu()
    host = SignallingHost()
    sampler = Sampler(interval_s=0.01, gpu=gpu, host=host, host_interval_s=0.0)
    assert sampler.latest() is None and sampler.ticks == 0 and not sampler.running
    with sampler:
        host.wait_reads(5)
        snap = sampler.latest()
        assert sampler.ticks >= 4  # the 5th tick may still be between its reads and its row
        assert snap.gpu_mem_used_bytes == 1000 and snap.gpu_mem_total_bytes == 4000
        assert snap.cpu_pct == 50.0 and snap.ram_available_bytes == 10 and snap.usable_cpus == 2
        assert snap.gpu_process_util_pct is None  # unknown stays None
        thread = sampler._thread
        assert thread.name == "loadertune-sampler" and thread.daemon
    assert not sampler.running and not thread.is_alive()
    assert gpu.closed


@pytest.mark.timeout(120)
def test_stop_wakes_the_thread_instead_of_waiting_out_the_interval():
    host = SignallingHost()
    # An hour between ticks: stop() returns only because it wakes the thread (waiting out the
    # interval would take 2 h, far past any bound below), so nothing here depends on speed.
    sampler = Sampler(interval_s=3600.0, host=host, host_interval_s=0.0).start()
    host.wait_reads(1)
    thread = sampler._thread
    stopped = threading.Event()
    stopper = threading.Thread(target=lambda: (sampler.stop(), stopped.set()))
    stopper.start()
    assert stopped.wait(60), "stop() waited for the next tick instead of waking the thread"
    stopper.join()
    assert not sampler.running and not thread.is_alive()
    assert sampler.ticks == 1 and host.reads == 1


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
    host = SignallingHost()
    gpu = ScriptedGpu(fail_after=1)
    with Sampler(interval_s=0.01, gpu=gpu, host=host, host_interval_s=0.0) as sampler:
        host.wait_reads(10)
        thread = sampler._thread
        # Ticks 2..10 ran after the GPU failed on its second read: the thread survived it.
        assert sampler.gpu is None and gpu.reads == 2
        assert sampler.running and thread.is_alive()
        assert sampler.latest().cpu_pct == 50.0 and sampler.latest().gpu_util_pct is None
    assert not thread.is_alive()


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
