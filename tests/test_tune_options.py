"""The ``tune()`` options that change what it measures or decides, through the public API only.

Each test runs a real tuned loop until its first measurement window closes and reads the result
from ``TunedLoader``'s public properties (``metrics``, ``diagnosis``, ``recommendation``,
``sampler_thread``). GPU and host are scripted sources that signal each read, and the loop waits
for a fresh sampler tick after every batch, so every window holds ticks whatever the machine's
load (an event, not a sleep). Datasets that wait per sample make the loop data-starved by a wide
margin (a worker needs many times the loop's step for a batch), so the verdicts do not depend on
how fast this machine is.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import loadertune
from loadertune.sim import SimulatedGpu
from loadertune.sources import nvml

#: Scripted readings, chosen to be unlike anything this machine would report.
GPU_UTIL_PCT = 41.0
CPU_PCT = 37.0


class Indexed(Dataset):
    def __init__(self, n: int = 100_000) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class Slow(Indexed):
    """Each sample waits ``wait_s`` (I/O-like: a worker needs 4 x wait_s per batch of 4)."""

    def __init__(self, wait_s: float = 0.005) -> None:
        super().__init__()
        self.wait_s = wait_s

    def __getitem__(self, i: int) -> int:
        time.sleep(self.wait_s)
        return i


class _Signalling:
    def __init__(self) -> None:
        self.reads = 0
        self._cond = threading.Condition()

    def _count(self) -> None:
        with self._cond:
            self.reads += 1
            self._cond.notify_all()

    def wait_for_read(self, timeout: float = 30.0) -> None:
        """Blocks until one more read than now happened (the timeout only bounds a broken run)."""
        with self._cond:
            target = self.reads + 1
            assert self._cond.wait_for(lambda: self.reads >= target, timeout), "no sampler tick"


class ScriptedGpu(_Signalling):
    name = "scripted-gpu"

    def read(self) -> loadertune.GpuReading:
        self._count()
        return loadertune.GpuReading(util_pct=GPU_UTIL_PCT, mem_used_bytes=1, mem_total_bytes=4)


class ScriptedHost(_Signalling):
    """A host source of the user's: fixed readings, and the worker pids it was told."""

    name = "scripted-host"

    def __init__(self, **reading: Any) -> None:
        super().__init__()
        self.reading = {"cpu_pct": CPU_PCT, "usable_cpus": 2, **reading}
        self.worker_pids: list[int] = []

    def read(self) -> loadertune.HostReading:
        self._count()
        return loadertune.HostReading(**self.reading)

    def set_worker_pids(self, pids: Any) -> None:
        self.worker_pids = list(pids)


def first_window(tuned: Any, ticks: _Signalling | None, max_batches: int = 2000) -> int:
    """Trains until the first window closes; returns the batches it took.

    After each batch the loop waits for one more read of ``ticks`` (a sampler tick, every
    ``interval_s``), so the window holds readings however loaded the machine is. The wait counts
    as the loop's own time; at 5 ms it stays well below a batch's 20 ms of loading.
    """
    gpu = SimulatedGpu(step_time_s=0.001)
    for n, batch in enumerate(tuned, start=1):
        gpu.step(len(batch))
        if ticks is not None:
            ticks.wait_for_read()
        if tuned.diagnosis is not None:
            return n
        assert n < max_batches, "no window closed"
    raise AssertionError("the epoch ended before a window closed")


def fast_windows(**kw: Any) -> dict[str, Any]:
    kw.setdefault("window_s", 0.05)
    kw.setdefault("min_window_batches", 4)
    kw.setdefault("interval_s", 0.005)
    return kw


# -- gpu= and host= and interval_s -------------------------------------------------------------


def test_a_gpu_source_and_a_custom_host_feed_the_window():
    gpu, host = ScriptedGpu(), ScriptedHost(usable_cpus=3)
    loader = DataLoader(Slow(), batch_size=4)
    with loadertune.tune(loader, **fast_windows(gpu=gpu, host=host)) as t:
        first_window(t, gpu)
        m = t.metrics
        assert m.gpu_util_mean_pct == pytest.approx(GPU_UTIL_PCT)
        assert m.cpu_pct == pytest.approx(CPU_PCT)
        assert m.usable_cpus == 3
        assert t.sampler_thread.gpu is gpu and t.sampler_thread.host is host
    assert host.reads >= 1


def test_host_none_means_no_host_metrics():
    gpu = ScriptedGpu()
    with loadertune.tune(DataLoader(Slow(), batch_size=4), **fast_windows(gpu=gpu, host=None)) as t:
        first_window(t, gpu)
        assert t.metrics.cpu_pct is None and t.metrics.gpu_util_mean_pct is not None
        assert t.sampler_thread.host is None


def test_a_host_without_read_is_refused():
    with pytest.raises(ValueError, match="host"):
        loadertune.tune(DataLoader(Indexed(8), batch_size=2), gpu=None, host=object())


@pytest.mark.parametrize("interval_s", [0.005, 0.25])
def test_interval_s_is_the_sampler_period(interval_s):
    gpu = ScriptedGpu()
    with loadertune.tune(
        DataLoader(Indexed(8), batch_size=2), gpu=gpu, host=None, interval_s=interval_s
    ) as t:
        assert t.sampler_thread.interval_s == interval_s
        next(iter(t))
        gpu.wait_for_read()  # the sampler ticks (reads the GPU) once it runs


@pytest.mark.parametrize("bad", [0, -0.1, float("nan")])
def test_a_bad_interval_is_refused(bad):
    with pytest.raises(ValueError, match="interval_s"):
        loadertune.tune(DataLoader(Indexed(8), batch_size=2), gpu=None, host=None, interval_s=bad)


def test_gpu_auto_reads_nvml_when_cuda_and_nvml_work(monkeypatch):
    opened = []
    scripted = ScriptedGpu()

    def nvml_gpu(device: int) -> ScriptedGpu:
        opened.append(device)
        return scripted

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(nvml, "NvmlGpu", nvml_gpu)
    with loadertune.tune(
        DataLoader(Slow(), batch_size=4), **fast_windows(gpu="auto", host=None)
    ) as t:
        assert opened == [0]
        assert t.sampler_thread.gpu is scripted
        first_window(t, scripted)
        assert t.metrics.gpu_util_mean_pct == pytest.approx(GPU_UTIL_PCT)
        # A GPU source and CUDA, no model given: it trains on CUDA, so pinning is advised.
        assert any("pin_memory=False while training on CUDA" in a for a in t.diagnosis.advice)


def test_gpu_auto_without_cuda_goes_without_gpu_metrics(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    host = ScriptedHost()
    with loadertune.tune(
        DataLoader(Slow(), batch_size=4), **fast_windows(gpu="auto", host=host)
    ) as t:
        assert t.sampler_thread.gpu is None
        first_window(t, None)  # host reads come every 0.5 s: too slow a tick to wait for
        assert t.metrics.gpu_util_mean_pct is None
        assert t.diagnosis.kind == "data_starved"  # by the loop's waiting alone


# -- model= ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "advised"),
    [
        (torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()), True),
        (torch.nn.Linear(4, 4), False),
        (None, False),
    ],
)
def test_model_tells_whether_cudnn_flags_matter(monkeypatch, model, advised):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    gpu = ScriptedGpu()
    loader = DataLoader(Slow(), batch_size=4)
    with loadertune.tune(loader, **fast_windows(gpu=gpu, host=None, model=model)) as t:
        first_window(t, gpu)
        cudnn = [a for a in t.diagnosis.advice if "cudnn.benchmark=False" in a]
        assert bool(cudnn) is advised
        # The model is on the CPU: no CUDA-only advice, whatever the GPU source.
        assert not any("pin_memory" in a for a in t.diagnosis.advice)


# -- max_workers= and ram_budget_share= ----------------------------------------------------------


def _recommended_workers(**kw: Any) -> tuple[int, str]:
    gpu = ScriptedGpu()
    with loadertune.tune(DataLoader(Slow(), batch_size=4), **fast_windows(gpu=gpu, **kw)) as t:
        first_window(t, gpu)
        rec = t.recommendation
        assert t.diagnosis.kind == "data_starved" and rec is not None
        assert t.config.num_workers == kw.get("initial_workers", 0)  # recommend mode: untouched
        return rec.config.num_workers, rec.reason


def test_max_workers_caps_the_recommendation():
    # A worker needs 20 ms per batch, the loop 1 ms: many workers would keep up.
    uncapped, _ = _recommended_workers(host=None)
    capped, reason = _recommended_workers(host=None, max_workers=2)
    assert capped == 2 and "capped by max_workers" in reason
    assert uncapped > 2


def test_ram_budget_share_caps_the_workers_by_their_memory():
    # The host source says each worker uses a tenth of the available RAM: a budget of 15% of it
    # fits one worker, the default half fits five (the load alone would want many more).
    worker_mem = psutil.virtual_memory().available // 10
    host = {"worker_count": 1, "workers_pss_bytes": worker_mem, "workers_rss_bytes": worker_mem}

    def recommend(share: float) -> tuple[int, str]:
        gpu = ScriptedGpu()
        loader = DataLoader(Slow(), batch_size=4, num_workers=1)
        with loadertune.tune(
            loader, **fast_windows(gpu=gpu, host=ScriptedHost(**host), ram_budget_share=share)
        ) as t:
            first_window(t, gpu)
            assert t.metrics.worker_mem_bytes == worker_mem
            rec = t.recommendation
            if rec is None:
                return t.config.num_workers, ""
            return rec.config.num_workers, rec.reason

    assert recommend(0.15)[0] == 1
    workers, reason = recommend(0.5)
    assert 1 < workers <= 5, reason


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan")])
def test_a_bad_ram_budget_share_is_refused(bad):
    with pytest.raises(ValueError, match="ram_budget_share"):
        loadertune.tune(
            DataLoader(Indexed(8), batch_size=2), gpu=None, host=None, ram_budget_share=bad
        )


# -- lr_rule= through tune() --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_optimizer", "rule", "factor"),
    [
        (torch.optim.SGD, "auto", 4.0),  # SGD: the linear rule
        (torch.optim.AdamW, "auto", 2.0),  # Adam family: the square-root rule
        (torch.optim.SGD, "sqrt", 2.0),  # asked for explicitly, whatever the optimizer
        (torch.optim.AdamW, "linear", 4.0),
        (torch.optim.SGD, "none", 1.0),
    ],
)
def test_lr_rule_scales_the_learning_rate_with_the_batch(make_optimizer, rule, factor):
    model = torch.nn.Linear(1, 1)
    opt = make_optimizer(model.parameters(), lr=0.01)
    loader = DataLoader(Indexed(64), batch_size=4)
    with loadertune.tune(
        loader, gpu=None, host=None, window_s=3600.0, optimizer=opt, lr_rule=rule
    ) as t:
        it = iter(t)
        assert len(next(it)) == 4
        t.reconfigure(batch_size=16)  # 4x the batch
        assert len(next(it)) == 16
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * factor)


def test_lr_rule_types_are_checked_through_tune():
    with pytest.raises(ValueError, match="lr_rule"):
        loadertune.tune(DataLoader(Indexed(8), batch_size=2), gpu=None, host=None, lr_rule="cubic")
