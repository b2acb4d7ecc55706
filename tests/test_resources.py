"""What a tuned loader may use: the GPU source ``gpu=`` resolves to, and this rank's bounds.

CUDA and NVML are scripted (``torch.cuda.is_available`` and ``NvmlGpu`` replaced), so every
branch runs, and the same way, on a CPU-only machine and on a GPU host.
"""

from __future__ import annotations

import logging
import types
from typing import ClassVar

import psutil
import pytest
import torch

from loadertune import resources
from loadertune.resources import node_bounds, resolve_gpu
from loadertune.sim import SimulatedGpu
from loadertune.sources import host as host_module
from loadertune.sources import nvml


class RecordingNvmlGpu:
    """Stands in for NvmlGpu: records the device it was opened for."""

    opened: ClassVar[list[int]] = []

    def __init__(self, device: int) -> None:
        RecordingNvmlGpu.opened.append(device)
        self.device = device

    def read(self) -> None:
        return None


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A scripted CUDA: available or not, current device 3, NVML that works or fails."""
    state = types.SimpleNamespace(available=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state.available)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    RecordingNvmlGpu.opened = []
    monkeypatch.setattr(nvml, "NvmlGpu", RecordingNvmlGpu)
    return state


def test_auto_without_cuda_means_no_gpu_source(cuda: types.SimpleNamespace) -> None:
    cuda.available = False
    assert resolve_gpu("auto") is None
    assert RecordingNvmlGpu.opened == []  # NVML is not even tried


def test_auto_with_cuda_and_nvml_reads_the_current_device(cuda: types.SimpleNamespace) -> None:
    gpu = resolve_gpu("auto")
    assert isinstance(gpu, RecordingNvmlGpu) and gpu.device == 3
    assert RecordingNvmlGpu.opened == [3]


def test_auto_with_cuda_but_failing_nvml_goes_without_gpu_metrics(
    cuda: types.SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def unavailable(device: int) -> None:
        raise nvml.NvmlUnavailableError("NVML Shared Library Not Found")

    monkeypatch.setattr(nvml, "NvmlGpu", unavailable)
    with caplog.at_level(logging.INFO, logger="loadertune"):
        assert resolve_gpu("auto") is None
    assert "no GPU metrics (NVML Shared Library Not Found)" in caplog.text


@pytest.mark.parametrize("off", [None, False])
def test_none_means_no_gpu_source_even_with_cuda(cuda: types.SimpleNamespace, off: object) -> None:
    assert resolve_gpu(off) is None
    assert RecordingNvmlGpu.opened == []


def test_a_source_object_is_used_as_is():
    gpu = SimulatedGpu(0.01)
    assert resolve_gpu(gpu) is gpu


@pytest.mark.parametrize("bad", ["cuda:0", "AUTO", 3, object()])
def test_anything_else_is_refused(bad):
    with pytest.raises(ValueError, match="gpu must be 'auto', None or an object with read"):
        resolve_gpu(bad)


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node with 4 usable CPUs and 10 GiB available, whatever this machine has."""
    monkeypatch.setattr(host_module, "usable_cpus", lambda: 4)
    monkeypatch.setattr(
        psutil, "virtual_memory", lambda: types.SimpleNamespace(available=10 * 2**30)
    )


def test_bounds_of_a_single_rank(machine: None) -> None:
    one = node_bounds(None, 0.5)
    assert one.usable_cpus == 4
    assert one.max_workers == 32  # 8 per usable CPU
    assert one.ram_budget_bytes == 5 * 2**30


def test_bounds_share_the_node_between_local_ranks(machine: None) -> None:
    two = node_bounds(4, 0.5, local_world_size=2)
    assert two.usable_cpus == 2 and two.max_workers == 4
    assert two.ram_budget_bytes == int(10 * 2**30 * 0.5 / 2)
    # More ranks than CPUs: each still gets one.
    assert node_bounds(None, 0.5, local_world_size=8).usable_cpus == 1


def test_the_default_cap_stays_between_8_and_64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_module, "usable_cpus", lambda: 1)
    assert node_bounds(None, 0.5).max_workers == 8
    monkeypatch.setattr(host_module, "usable_cpus", lambda: 32)
    assert node_bounds(None, 0.5).max_workers == 64
    assert node_bounds(100, 0.5).max_workers == 100  # an explicit cap is the user's call


def test_no_ram_figure_means_no_ram_budget(machine: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise OSError("/proc/meminfo unreadable")

    monkeypatch.setattr(psutil, "virtual_memory", broken)
    assert node_bounds(None, 0.5).ram_budget_bytes is None
    assert resources.node_bounds(None, 0.5).usable_cpus == 4
