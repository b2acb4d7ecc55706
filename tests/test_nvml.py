"""NvmlGpu against the real pynvml module whose functions are replaced by a scripted NVML.

The scripted functions raise the module's own ``pynvml.NVMLError(code)`` with the real constants,
and return the module's own ctypes structures, so error classes, codes and field names are the
ones the real binding produces.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pynvml
import pytest

from loadertune.errors import LoadertuneError
from loadertune.sources import nvml
from loadertune.sources.base import GpuReading, GpuSource
from loadertune.sources.nvml import (
    GpuNotFoundError,
    NvmlGpu,
    NvmlUnavailableError,
    parse_visible_devices,
    probe_gpus,
    resolve_visible_device,
    visible_uuids,
)

U0 = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
U1 = "GPU-8932f938-0000-4106-c12f-20bd9faed9f6"
U2 = "GPU-1c2d3e4f-aaaa-bbbb-cccc-0123456789ab"
M0 = "MIG-5d8a1b2c-1111-5a5a-9b9b-0123456789ab"
M1 = "MIG-5d8a1b2c-2222-5a5a-9b9b-0123456789ab"
GiB = 1 << 30


# ---------------------------------------------------------------------------------------------
# The scripted NVML


@dataclass(eq=False)
class FakeDevice:
    uuid: str
    name: str = "NVIDIA A100-SXM4-40GB"
    mem_used: int = 3 * GiB
    mem_total: int = 40 * GiB
    util_rate: int = 55
    mig_uuids: list[str] = field(default_factory=list)
    # Each GetSamples call pops one entry: a list of (timestamp_us, value) or an error code.
    samples: deque = field(default_factory=deque)
    # Each GetProcessUtilization call pops one entry: a list of (pid, timestamp_us, sm) or a code.
    process: deque = field(default_factory=deque)
    # Function name -> error code raised on every call.
    errors: dict[str, int] = field(default_factory=dict)
    is_mig: bool = False


class FakeNvml:
    """Installs scripted NVML functions on the real pynvml module and records the calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, devices: list[FakeDevice]) -> None:
        self.devices = devices
        self.by_uuid: dict[str, FakeDevice] = {}
        for d in devices:
            self.by_uuid[d.uuid] = d
            for m in d.mig_uuids:
                self.by_uuid[m] = FakeDevice(m, name=d.name + " MIG 1g.5gb", is_mig=True)
        self.init_calls = 0
        self.shutdown_calls = 0
        self.init_error: int | None = None
        self.init_delay_s = 0.0
        self.lost = False
        self.mig_uuid_lookup = True  # False: a driver before R470
        self.unreadable_indices: set[int] = set()
        self.calls: list[tuple[str, tuple]] = []
        for name in dir(self):
            if name.startswith("nvml"):
                monkeypatch.setattr(pynvml, name, getattr(self, name))

    def mig(self, uuid: str) -> FakeDevice:
        return self.by_uuid[uuid]

    def _device_call(self, fn: str, handle: FakeDevice, *args: Any) -> FakeDevice:
        self.calls.append((fn, (handle.uuid, *args)))
        if self.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if fn in handle.errors:
            raise pynvml.NVMLError(handle.errors[fn])
        return handle

    def count(self, fn: str) -> int:
        return sum(1 for name, _ in self.calls if name == fn)

    # -- library --
    def nvmlInit(self) -> None:
        time.sleep(self.init_delay_s)
        self.init_calls += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    # -- enumeration --
    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        if index in self.unreadable_indices:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        if not 0 <= index < len(self.devices):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeDevice:
        self.calls.append(("nvmlDeviceGetHandleByUUID", (uuid,)))
        if uuid.startswith("MIG-") and not self.mig_uuid_lookup:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if uuid not in self.by_uuid:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return self.by_uuid[uuid]

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeDevice) -> str:
        return handle.name

    def nvmlDeviceGetMigMode(self, handle: FakeDevice) -> list[int]:
        if handle.is_mig:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if handle.mig_uuids else 0
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeDevice) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeDevice, index: int) -> FakeDevice:
        if index >= len(handle.mig_uuids):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return self.by_uuid[handle.mig_uuids[index]]

    # -- metrics --
    def nvmlDeviceGetSamples(self, handle: FakeDevice, sampling_type: int, ts: int) -> tuple:
        d = self._device_call("nvmlDeviceGetSamples", handle, sampling_type, ts)
        assert sampling_type == pynvml.NVML_GPU_UTILIZATION_SAMPLES
        step = d.samples.popleft() if d.samples else pynvml.NVML_ERROR_NOT_FOUND
        if isinstance(step, int):
            raise pynvml.NVMLError(step)
        out = []
        for stamp, value in step:
            s = pynvml.c_nvmlSample_t()
            s.timeStamp = stamp
            s.sampleValue.uiVal = value
            out.append(s)
        return pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, out

    def nvmlDeviceGetUtilizationRates(self, handle: FakeDevice) -> Any:
        d = self._device_call("nvmlDeviceGetUtilizationRates", handle)
        return pynvml.c_nvmlUtilization_t(gpu=d.util_rate, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice, version: int | None = None) -> Any:
        fn = "nvmlDeviceGetMemoryInfo_v2" if version else "nvmlDeviceGetMemoryInfo"
        d = self._device_call(fn, handle, version)
        if version:
            assert version == pynvml.nvmlMemory_v2
            return pynvml.c_nvmlMemory_v2_t(
                version=version,
                total=d.mem_total,
                reserved=GiB // 2,
                free=d.mem_total - d.mem_used - GiB // 2,
                used=d.mem_used,
            )
        return pynvml.c_nvmlMemory_t(
            total=d.mem_total, free=d.mem_total - d.mem_used, used=d.mem_used
        )

    def nvmlDeviceGetProcessUtilization(self, handle: FakeDevice, ts: int) -> list:
        d = self._device_call("nvmlDeviceGetProcessUtilization", handle, ts)
        step = d.process.popleft() if d.process else pynvml.NVML_ERROR_NOT_FOUND
        if isinstance(step, int):
            raise pynvml.NVMLError(step)
        return [
            pynvml.c_nvmlProcessUtilizationSample_t(pid=pid, timeStamp=stamp, smUtil=sm)
            for pid, stamp, sm in step
        ]


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    # torch here has no CUDA anyway; this keeps the tests independent of the machine.
    monkeypatch.setattr(nvml, "_torch_device_uuid", lambda ordinal: None)
    assert nvml._init_refcount == 0
    yield
    # Every test must close what it opened: NVML is held per process.
    assert nvml._init_refcount == 0


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    return FakeNvml(
        monkeypatch,
        [FakeDevice(U0), FakeDevice(U1, mem_used=GiB), FakeDevice(U2)],
    )


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "loadertune" and r.levelno >= logging.WARNING
    ]


# ---------------------------------------------------------------------------------------------
# Readings


def test_normal_reading(fake: FakeNvml) -> None:
    d = fake.devices[0]
    d.samples.append([(2_000_000, 30), (2_166_666, 50)])
    d.process.append([(os.getpid(), 2_100_000, 40), (os.getpid() + 1, 2_100_000, 99)])
    with NvmlGpu(0) as gpu:
        assert isinstance(gpu, GpuSource)
        assert gpu.uuid == U0 and gpu.product_name == d.name
        r = gpu.read()
    assert r == GpuReading(
        util_pct=40.0, mem_used_bytes=3 * GiB, mem_total_bytes=40 * GiB, process_util_pct=40.0
    )
    assert fake.count("nvmlDeviceGetMemoryInfo_v2") == 1
    assert fake.count("nvmlDeviceGetMemoryInfo") == 0
    assert fake.init_calls == 1 and fake.shutdown_calls == 1


def test_samples_feed_back_the_newest_returned_timestamp(fake: FakeNvml) -> None:
    d = fake.devices[0]
    d.samples.append(
        [
            (1_000_000, 99),  # the driver's buffer reaches back further than "now"
            (5_000_000, 10),
            (5_333_333, 30),
            (5_166_666, 20),  # the driver does not promise order
        ]
    )
    d.samples.append([(5_500_000, 60), (5_666_666, 80)])
    gpu = NvmlGpu(0)
    first = gpu.read()
    second = gpu.read()
    gpu.close()
    stamps = [args[2] for fn, args in fake.calls if fn == "nvmlDeviceGetSamples"]
    assert stamps == [0, 5_333_333]  # the max returned by the first call, not our own clock
    assert first.util_pct == pytest.approx(20.0)  # only the newest second of the first buffer
    assert second.util_pct == pytest.approx(70.0)


def test_not_found_means_no_new_samples_and_holds_the_last_value(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    monkeypatch.setattr(nvml, "_clock", lambda: now[0])
    d = fake.devices[0]
    d.samples.extend([[(7_000_000, 25)], pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_NOT_FOUND])
    with caplog.at_level(logging.INFO, logger="loadertune"), NvmlGpu(0) as gpu:
        assert gpu.read().util_pct == 25.0
        now[0] += 1.0
        assert gpu.read().util_pct == 25.0  # NOT_FOUND: nothing newer, the last value stands
        now[0] += 10.0
        assert gpu.read().util_pct is None  # too old to stand for the GPU now
        stamps = [args[2] for fn, args in fake.calls if fn == "nvmlDeviceGetSamples"]
        assert stamps == [0, 7_000_000, 7_000_000]
        d.samples.append([(9_000_000, 75)])
        assert gpu.read().util_pct == 75.0
    assert caplog.records == []  # NOT_FOUND is normal, not worth a word


def test_mig_instance_without_utilization_still_reads_memory(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeNvml(monkeypatch, [FakeDevice(U0, mig_uuids=[M0, M1])])
    mig = fake.mig(M1)
    mig.mem_used, mig.mem_total = GiB, 5 * GiB
    for fn in (
        "nvmlDeviceGetSamples",
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetProcessUtilization",
    ):
        mig.errors[fn] = pynvml.NVML_ERROR_NOT_SUPPORTED
    with caplog.at_level(logging.WARNING, logger="loadertune"), NvmlGpu(M1) as gpu:
        readings = [gpu.read() for _ in range(5)]
    expected = GpuReading(mem_used_bytes=GiB, mem_total_bytes=5 * GiB)
    assert readings == [expected] * 5
    # Probed once, then left alone.
    assert fake.count("nvmlDeviceGetSamples") == 1
    assert fake.count("nvmlDeviceGetUtilizationRates") == 1
    assert fake.count("nvmlDeviceGetProcessUtilization") == 1
    messages = _warnings(caplog)
    assert len(messages) == 2  # one per lost metric: utilization, process utilization
    util_msg = next(m for m in messages if ": utilization is unavailable" in m)
    assert "NOT_SUPPORTED" in util_msg and "MIG" in util_msg


def test_rates_stand_in_when_samples_are_unsupported(
    fake: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    fake.devices[0].errors["nvmlDeviceGetSamples"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    with caplog.at_level(logging.WARNING, logger="loadertune"), NvmlGpu(0) as gpu:
        assert [gpu.read().util_pct for _ in range(3)] == [55.0] * 3
    assert fake.count("nvmlDeviceGetSamples") == 1
    assert _warnings(caplog) == []  # utilization is not lost, only its finer source


def test_memory_falls_back_to_v1_without_the_v2_function(fake: FakeNvml) -> None:
    fake.devices[0].errors["nvmlDeviceGetMemoryInfo_v2"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    with NvmlGpu(0) as gpu:
        readings = [gpu.read() for _ in range(3)]
    assert all(r.mem_used_bytes == 3 * GiB and r.mem_total_bytes == 40 * GiB for r in readings)
    assert fake.count("nvmlDeviceGetMemoryInfo_v2") == 1
    assert fake.count("nvmlDeviceGetMemoryInfo") == 3


def test_gpu_lost_mid_run(fake: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    d = fake.devices[0]
    d.samples.extend([[(1_000_000 + i * 166_666, 50)] for i in range(1, 30)])
    gpu = NvmlGpu(0)
    readings = []
    with caplog.at_level(logging.WARNING, logger="loadertune"):
        for tick in range(20):  # what the sampler thread does, ten times a second
            if tick == 5:
                fake.lost = True
            readings.append(gpu.read())
    gpu.close()
    assert all(r.util_pct == 50.0 and r.mem_used_bytes == 3 * GiB for r in readings[:5])
    assert readings[5:] == [GpuReading()] * 15
    messages = _warnings(caplog)
    assert len(messages) == 1 and "lost" in messages[0] and "GPU_IS_LOST" in messages[0]
    calls_after_loss = fake.count("nvmlDeviceGetSamples")
    assert calls_after_loss == 6  # nothing more is asked of a lost GPU


def test_transient_error_is_none_once_then_recovers(
    fake: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    d = fake.devices[0]
    with caplog.at_level(logging.WARNING, logger="loadertune"), NvmlGpu(0) as gpu:
        d.errors["nvmlDeviceGetMemoryInfo_v2"] = pynvml.NVML_ERROR_UNKNOWN
        assert gpu.read().mem_used_bytes is None
        assert gpu.read().mem_used_bytes is None
        del d.errors["nvmlDeviceGetMemoryInfo_v2"]
        assert gpu.read().mem_used_bytes == 3 * GiB
    messages = _warnings(caplog)
    assert len(messages) == 1 and "memory" in messages[0] and "UNKNOWN" in messages[0]


def test_unexpected_exception_drops_the_metric_without_raising(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(handle: Any, version: Any = None) -> Any:
        raise OSError("binding surprise")

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", broken)
    with caplog.at_level(logging.WARNING, logger="loadertune"), NvmlGpu(0) as gpu:
        r = gpu.read()
        gpu.read()
    assert r.mem_used_bytes is None and r.util_pct is None  # util: no sample scripted
    assert len([m for m in _warnings(caplog) if "memory" in m]) == 1


def test_process_utilization(fake: FakeNvml) -> None:
    me, other = os.getpid(), os.getpid() + 1
    fake.devices[0].process.extend(
        [
            [(other, 1_000, 80)],  # our pid never seen yet: unknown, not 0
            [(me, 2_000, 30), (other, 2_500, 50)],
            pynvml.NVML_ERROR_NOT_FOUND,  # nothing new: held
            [(other, 3_000, 10)],  # only busy processes are listed: we were idle
            pynvml.NVML_SUCCESS,  # the binding raises NVMLError(SUCCESS) for "no process"
        ]
    )
    with NvmlGpu(0) as gpu:
        values = [gpu.read().process_util_pct for _ in range(5)]
    assert values == [None, 30.0, 30.0, 0.0, 0.0]
    stamps = [args[1] for fn, args in fake.calls if fn == "nvmlDeviceGetProcessUtilization"]
    assert stamps == [0, 1_000, 2_500, 2_500, 3_000]


def test_read_after_close_and_double_close(fake: FakeNvml) -> None:
    gpu = NvmlGpu(0)
    gpu.close()
    gpu.close()
    assert gpu.read() == GpuReading()
    assert fake.shutdown_calls == 1


# ---------------------------------------------------------------------------------------------
# Initialisation


@pytest.mark.parametrize(
    "error",
    [
        pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND),
        pynvml.NVMLError_LibraryNotFound(),
    ],
)
def test_missing_driver_library(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def init() -> None:
        raise error

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    with pytest.raises(NvmlUnavailableError, match=r"libnvidia-ml\.so\.1") as info:
        NvmlGpu(0)
    assert isinstance(info.value, LoadertuneError) and isinstance(info.value, RuntimeError)
    assert isinstance(info.value.__cause__, pynvml.NVMLError_LibraryNotFound)
    gpus, reason = probe_gpus()
    assert gpus == [] and reason is not None and "libnvidia-ml" in reason


def test_driver_not_loaded(fake: FakeNvml) -> None:
    fake.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    with pytest.raises(NvmlUnavailableError, match="driver is not loaded"):
        NvmlGpu(0)
    assert fake.shutdown_calls == 0


@pytest.mark.skipif(
    ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has an NVIDIA driver"
)
def test_real_binding_without_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NvmlUnavailableError, match="not found"):
        NvmlGpu(0)


def test_nvml_is_initialised_once_across_instances_and_threads(fake: FakeNvml) -> None:
    fake.init_delay_s = 0.05  # a slow init widens any race between first users
    fake.devices[0].samples.extend([[(i * 100_000 + 1, 50)] for i in range(1, 200)])
    start = threading.Barrier(8)

    def open_and_read(i: int) -> NvmlGpu:
        start.wait()
        gpu = NvmlGpu(i % 2)
        gpu.read()
        return gpu

    with ThreadPoolExecutor(8) as pool:
        gpus = list(pool.map(open_and_read, range(8)))
    assert fake.init_calls == 1
    for gpu in gpus[:7]:
        gpu.close()
    assert fake.shutdown_calls == 0  # one NvmlGpu still lives
    assert gpus[7].read().mem_total_bytes == 40 * GiB
    gpus[7].close()
    assert fake.shutdown_calls == 1
    assert fake.init_calls == 1


def test_missing_device_releases_nvml(fake: FakeNvml) -> None:
    with pytest.raises(GpuNotFoundError, match="CUDA device 5 does not exist"):
        NvmlGpu(5)
    with pytest.raises(GpuNotFoundError, match="matches none"):
        NvmlGpu("GPU-ffff")
    with pytest.raises(GpuNotFoundError, match="ambiguous"):
        NvmlGpu("GPU-8932f93")  # U0 and U1 share it
    assert fake.init_calls == fake.shutdown_calls == 3


@pytest.mark.parametrize("bad", [-1, True, 1.0, "0", "cuda:0", "GPU-", None, b"GPU-1"])
def test_bad_device_is_a_value_error(fake: FakeNvml, bad: object) -> None:
    with pytest.raises(ValueError, match="device"):
        NvmlGpu(bad)  # type: ignore[arg-type]
    assert fake.init_calls == 0


# ---------------------------------------------------------------------------------------------
# CUDA ordinal -> NVML device


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (None, None),
        ("", []),
        ("0,2", [0, 2]),
        (" 1 , 0 ", [1, 0]),
        ("0,2,-1,1", [0, 2]),  # an invalid entry ends the list
        ("1gpu,2", [1, 2]),  # read like strtoul
        ("0,0", []),  # a repeated entry hides everything
        (f"{U0},{U2}", [U0, U2]),
        (f"{M0}", [M0]),
        (f"{U0},1", [U0]),  # the first entry decides the kind
    ],
)
def test_parse_visible_devices(value: str | None, parsed: list | None) -> None:
    assert parse_visible_devices(value) == parsed


NVML_UUIDS = [U0, M0, M1, U1, U2]  # GPU 0 in MIG mode, listed with its MIG devices


@pytest.mark.parametrize(
    ("cvd", "ordinal", "uuid"),
    [
        (None, 0, U0),
        (None, 2, U2),  # MIG devices are not counted as GPU indices
        ("0,2", 1, U2),
        ("2,1", 0, U2),
        ("2,1", 1, U1),
        ("0,2,-1,1", 1, U2),
        (U2, 0, U2),
        ("GPU-1c2d", 0, U2),  # abbreviated, as CUDA accepts
        (f"GPU-1c2d,{U1}", 1, U1),
        (M1, 0, M1),
        (f"{M1},{M0}", 1, M0),
        ("MIG-5d8a1b2c-2", 0, M1),
    ],
)
def test_resolve_visible_device(cvd: str | None, ordinal: int, uuid: str) -> None:
    assert resolve_visible_device(ordinal, cvd, NVML_UUIDS) == uuid


@pytest.mark.parametrize(
    ("cvd", "ordinal"),
    [
        ("", 0),
        ("0,2", 2),
        ("0,2,-1,1", 2),
        ("0,0", 0),
        ("0,7,1", 1),  # index past the last GPU ends the list
        ("GPU-8932f93", 0),  # ambiguous abbreviation
        ("GPU-ffff", 0),
        (f"{U0},GPU-8932f937", 0),  # the same device twice
        (None, 3),
    ],
)
def test_resolve_visible_device_not_visible(cvd: str | None, ordinal: int) -> None:
    with pytest.raises(GpuNotFoundError):
        resolve_visible_device(ordinal, cvd, NVML_UUIDS)


def test_unreadable_device_keeps_indices_aligned() -> None:
    uuids = [U0, "", U2]
    assert visible_uuids("2", uuids) == [U2]
    with pytest.raises(GpuNotFoundError, match="could not read"):
        resolve_visible_device(1, None, uuids)


@pytest.mark.parametrize("bad", [-1, True, 0.0, "0"])
def test_resolve_rejects_bad_ordinals(bad: object) -> None:
    with pytest.raises(ValueError, match="ordinal"):
        resolve_visible_device(bad, None, NVML_UUIDS)  # type: ignore[arg-type]


def test_end_to_end_indices(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    with NvmlGpu(0) as gpu:
        assert gpu.uuid == U1
        assert gpu.read().mem_used_bytes == GiB  # U1's memory, not NVML device 0's


def test_end_to_end_abbreviated_uuid(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1c2d3e4f")
    with NvmlGpu(0) as gpu:
        assert gpu.uuid == U2


@pytest.mark.parametrize("mig_uuid_lookup", [True, False])
def test_end_to_end_mig(monkeypatch: pytest.MonkeyPatch, mig_uuid_lookup: bool) -> None:
    fake = FakeNvml(monkeypatch, [FakeDevice(U0, mig_uuids=[M0, M1]), FakeDevice(U1)])
    fake.mig_uuid_lookup = mig_uuid_lookup
    fake.mig(M1).mem_total = 5 * GiB
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", M1)
    with NvmlGpu(0) as by_ordinal, NvmlGpu(M1) as by_uuid:
        assert by_ordinal.uuid == by_uuid.uuid == M1
        assert by_ordinal.read().mem_total_bytes == 5 * GiB


def test_torch_uuid_is_preferred(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # torch knows better than the index
    monkeypatch.setattr(nvml, "_torch_device_uuid", lambda ordinal: U2.removeprefix("GPU-"))
    with NvmlGpu(0) as gpu:
        assert gpu.uuid == U2


def test_torch_mig_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(monkeypatch, [FakeDevice(U0, mig_uuids=[M0, M1])])
    fake.mig_uuid_lookup = False
    monkeypatch.setattr(nvml, "_torch_device_uuid", lambda ordinal: M0.removeprefix("MIG-"))
    with NvmlGpu(0) as gpu:
        assert gpu.uuid == M0


def test_mixed_models_warn_about_device_order(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="loadertune"):
        NvmlGpu(0).close()  # all one model: CUDA's and NVML's orders agree
        fake.devices[2].name = "NVIDIA A100-PCIE-40GB"
        NvmlGpu(0).close()
        monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        NvmlGpu(0).close()
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", U0)
        monkeypatch.delenv("CUDA_DEVICE_ORDER")
        NvmlGpu(0).close()  # UUIDs are exact: nothing to warn about
    messages = _warnings(caplog)
    assert len(messages) == 1 and "CUDA_DEVICE_ORDER" in messages[0]


def test_mean_of_new_samples() -> None:
    assert nvml._mean_of_new_samples([], 10) == (None, 10)
    assert nvml._mean_of_new_samples([(5, 50.0), (10, 70.0)], 10) == (None, 10)
    assert nvml._mean_of_new_samples([(11, 50.0), (12, 150.0)], 10) == (100.0, 12)


# ---------------------------------------------------------------------------------------------
# Probe


def test_probe_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(monkeypatch, [FakeDevice(U0, mig_uuids=[M0]), FakeDevice(U1)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    gpus, reason = probe_gpus()
    assert reason is None
    assert [(g.index, g.mig_index, g.uuid, g.cuda_ordinal) for g in gpus] == [
        (0, None, U0, None),
        (0, 0, M0, None),
        (1, None, U1, 0),
    ]
    assert gpus[0].mig_enabled is True and gpus[2].mig_enabled is False
    assert gpus[2].mem_total_bytes == 40 * GiB and gpus[2].util_pct == 55.0
    assert gpus[2].driver_version == "550.54.15" and gpus[2].cuda_driver_version == "12.4"
    assert fake.init_calls == fake.shutdown_calls == 1


def test_probe_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(monkeypatch, [])
    gpus, reason = probe_gpus()
    assert gpus == [] and reason is not None and "no GPU" in reason


def test_nvml_failure_while_opening_is_a_loadertune_error(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", broken)
    with pytest.raises(NvmlUnavailableError, match="could not open device 0"):
        NvmlGpu(0)
    assert fake.init_calls == fake.shutdown_calls == 1
