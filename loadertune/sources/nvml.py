"""GPU readings through NVIDIA's NVML (the ``nvidia-ml-py`` bindings, imported as ``pynvml``).

Every NVML call loadertune makes goes through this module. NVML is initialised once, lazily, and
shut down when its last user closes. Every metric is optional: the first time NVML says a metric
is unsupported it is dropped for the rest of the run with one warning, and a lost GPU turns every
field into None without ever raising from ``read()``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pynvml

from loadertune.errors import LoadertuneError
from loadertune.sources.base import GpuReading

__all__ = [
    "GpuInfo",
    "GpuNotFoundError",
    "NvmlGpu",
    "NvmlUnavailableError",
    "parse_visible_devices",
    "probe_gpus",
    "resolve_visible_device",
    "visible_uuids",
]

_log = logging.getLogger("loadertune")
_T = TypeVar("_T")

# A held value (NOT_FOUND: the driver has no newer sample) is the best estimate for a while, but
# drivers sample every 1/6 s to 1 s, so a value this old means sampling stalled, not a quiet GPU.
_HOLD_S = 5.0
# With no timestamp to feed back yet, the driver returns its whole buffer (tens of seconds);
# only the newest second of it describes the GPU now.
_FIRST_WINDOW_US = 1_000_000
# Only for how long a held value stays trusted; sample timestamps always come from the driver.
_clock = time.monotonic
_UUID_PREFIXES = ("GPU-", "MIG-")


def _codes(*names: str) -> frozenset[int]:
    # Older bindings lack some constants; a missing one simply cannot occur there.
    return frozenset(getattr(pynvml, n) for n in names if hasattr(pynvml, n))


# The device (or the driver under it) is gone: no later call will succeed.
_LOST_CODES = _codes(
    "NVML_ERROR_GPU_IS_LOST",
    "NVML_ERROR_RESET_REQUIRED",
    "NVML_ERROR_DRIVER_NOT_LOADED",
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH",
    "NVML_ERROR_UNINITIALIZED",
)
# This metric will never work on this device/driver/permission set: stop asking.
_UNSUPPORTED_CODES = _codes(
    "NVML_ERROR_NOT_SUPPORTED",
    "NVML_ERROR_NO_PERMISSION",
    "NVML_ERROR_FUNCTION_NOT_FOUND",
    "NVML_ERROR_INVALID_ARGUMENT",
    "NVML_ERROR_ARGUMENT_VERSION_MISMATCH",
    "NVML_ERROR_DEPRECATED",
)
# Memory info v2 missing in the driver: fall back to v1 rather than lose memory altogether.
_MEMORY_V2_FALLBACK_CODES = _codes(
    "NVML_ERROR_FUNCTION_NOT_FOUND",
    "NVML_ERROR_NOT_SUPPORTED",
    "NVML_ERROR_INVALID_ARGUMENT",
    "NVML_ERROR_ARGUMENT_VERSION_MISMATCH",
)
_ERROR_NAMES = {
    getattr(pynvml, n): n.removeprefix("NVML_ERROR_")
    for n in dir(pynvml)
    if n.startswith("NVML_ERROR_")
}
# Union member of c_nvmlValue_t that holds a sample, by the value type NVML reports.
_SAMPLE_FIELDS = {
    pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
    getattr(pynvml, "NVML_VALUE_TYPE_UNSIGNED_SHORT", 6): "usVal",
}


class NvmlUnavailableError(LoadertuneError, RuntimeError):
    """NVML cannot be used here: no driver library, driver not loaded, or no permission.

    ``gpu="auto"`` catches this (and its subclass :class:`GpuNotFoundError`) and runs without GPU
    readings.
    """


class GpuNotFoundError(NvmlUnavailableError):
    """NVML works, but the requested device is not one it can see (or not visible to CUDA)."""


# ---------------------------------------------------------------------------------------------
# Process-wide NVML initialisation


_init_lock = threading.Lock()
_init_refcount = 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, pynvml.NVMLError):
        return f"NVML {_ERROR_NAMES.get(exc.value, exc.value)}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _init_failure_reason(exc: pynvml.NVMLError) -> str:
    reasons = {
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: (
            "the NVML library libnvidia-ml.so.1 was not found: no NVIDIA driver is installed, "
            "or it is not mounted into this container"
        ),
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA kernel driver is not loaded",
        pynvml.NVML_ERROR_NO_PERMISSION: "no permission to open the NVIDIA devices (/dev/nvidia*)",
        pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
            "the NVML library and the kernel driver differ in version (driver upgraded without "
            "a reboot?)"
        ),
    }
    reason = reasons.get(exc.value, "nvmlInit failed")
    return f"NVML is unavailable: {reason} ({_describe(exc)})"


def _acquire_nvml() -> None:
    """Initialise NVML if nobody in this process holds it yet, and count one more holder."""
    global _init_refcount
    # Held across nvmlInit on purpose: it can take seconds without persistence mode, and
    # concurrent callers must wait for that one init instead of starting their own.
    with _init_lock:
        if _init_refcount == 0:
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                raise NvmlUnavailableError(_init_failure_reason(exc)) from exc
        _init_refcount += 1


def _release_nvml() -> None:
    """Count one holder less; shut NVML down when it was the last."""
    global _init_refcount
    with _init_lock:
        if _init_refcount == 0:
            return
        _init_refcount -= 1
        if _init_refcount == 0:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as exc:
                _log.debug("nvmlShutdown failed: %s", _describe(exc))


# ---------------------------------------------------------------------------------------------
# CUDA ordinal -> NVML UUID (pure)


def parse_visible_devices(value: str | None) -> list[int] | list[str] | None:
    """Parse ``CUDA_VISIBLE_DEVICES`` the way the CUDA runtime (and torch) read it.

    Args:
        value: The variable's value, or None when it is unset.

    Returns:
        None when unset (every device visible); otherwise the entries CUDA honours, in order:
        ints for indices, strings for (possibly abbreviated) ``GPU-``/``MIG-`` UUIDs. The kind
        is decided by the first entry; parsing stops at the first invalid entry (e.g. ``-1``)
        and a repeated entry hides every device, as in CUDA.
    """
    if value is None:
        return None
    entries = [e.strip() for e in value.split(",")]
    if entries[0].startswith(_UUID_PREFIXES):
        uuids: list[str] = []
        for entry in entries:
            if not entry.startswith(_UUID_PREFIXES):
                break
            if entry in uuids:
                return []
            uuids.append(entry)
        return uuids
    indices: list[int] = []
    for entry in entries:
        # CUDA reads each entry with strtoul, so "1gpu" means 1 and "-1" or "" ends the list.
        match = re.match(r"\d+", entry)
        if match is None:
            break
        index = int(match.group())
        if index in indices:
            return []
        indices.append(index)
    return indices


def visible_uuids(cuda_visible_devices: str | None, nvml_uuids: Sequence[str]) -> list[str]:
    """The UUIDs of the devices CUDA enumerates, in CUDA ordinal order.

    Index entries are taken as NVML indices, which equal CUDA's only when
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or all GPUs are the same model; UUID entries are exact.

    Args:
        cuda_visible_devices: Value of ``CUDA_VISIBLE_DEVICES``, or None when unset.
        nvml_uuids: Physical GPU UUIDs in NVML index order (``""`` for a device whose UUID could
            not be read, so later indices stay aligned), plus any MIG device UUIDs anywhere in
            the list; they are told apart by their ``MIG-`` prefix.

    Returns:
        The UUIDs; may contain ``""`` for an unreadable device.
    """
    gpus = [u for u in nvml_uuids if not u.startswith("MIG-")]
    entries = parse_visible_devices(cuda_visible_devices)
    if entries is None:
        return gpus
    visible: list[str] = []
    for entry in entries:
        if isinstance(entry, int):
            if entry >= len(gpus):
                break
            visible.append(gpus[entry])
            continue
        matches = [u for u in nvml_uuids if u and u.startswith(entry)]
        if len(matches) != 1:
            break  # unknown or ambiguous abbreviation: CUDA stops enumerating here
        if matches[0] in visible:
            return []  # two abbreviations of one device count as a repeated entry
        visible.append(matches[0])
    return visible


def resolve_visible_device(
    ordinal: int, cuda_visible_devices: str | None, nvml_uuids: Sequence[str]
) -> str:
    """The NVML UUID of CUDA device ``ordinal`` under ``CUDA_VISIBLE_DEVICES``.

    Args:
        ordinal: CUDA device ordinal (``cuda:ordinal``), 0 or more.
        cuda_visible_devices: Value of ``CUDA_VISIBLE_DEVICES``, or None when unset.
        nvml_uuids: As for :func:`visible_uuids`.

    Returns:
        A ``GPU-…`` or ``MIG-…`` UUID.

    Raises:
        ValueError: ``ordinal`` is not a non-negative int.
        GpuNotFoundError: No such visible device, or NVML could not read its UUID.
    """
    _check_ordinal(ordinal)
    visible = visible_uuids(cuda_visible_devices, nvml_uuids)
    if ordinal >= len(visible):
        raise GpuNotFoundError(
            f"CUDA device {ordinal} does not exist: CUDA_VISIBLE_DEVICES="
            f"{cuda_visible_devices!r} leaves {len(visible)} visible device(s) of the "
            f"{sum(not u.startswith('MIG-') for u in nvml_uuids)} GPU(s) NVML reports"
        )
    if not visible[ordinal]:
        raise GpuNotFoundError(f"NVML could not read the UUID of CUDA device {ordinal}")
    return visible[ordinal]


def _check_ordinal(ordinal: object) -> None:
    if isinstance(ordinal, bool) or not isinstance(ordinal, int):
        raise ValueError(f"a CUDA device ordinal must be an int, got {ordinal!r}")
    if ordinal < 0:
        raise ValueError(f"a CUDA device ordinal must be 0 or more, got {ordinal}")


def _check_device(device: object) -> None:
    if isinstance(device, str):
        if not device.startswith(_UUID_PREFIXES) or len(device) <= len("GPU-"):
            raise ValueError(
                f"device must be a CUDA ordinal (int) or an NVML UUID starting with 'GPU-' or "
                f"'MIG-' (as printed by `nvidia-smi -L`), got {device!r}"
            )
        return
    _check_ordinal(device)


def _mean_of_new_samples(
    samples: Sequence[tuple[int, float]], last_ts: int, first_window_us: int = _FIRST_WINDOW_US
) -> tuple[float | None, int]:
    """Average the samples newer than ``last_ts``; return it and the timestamp to feed back."""
    new = [(ts, v) for ts, v in samples if ts > last_ts and math.isfinite(v)]
    if not new:
        return None, last_ts
    newest = max(ts for ts, _ in new)
    if last_ts == 0:
        new = [(ts, v) for ts, v in new if ts >= newest - first_window_us]
    mean = sum(v for _, v in new) / len(new)
    return min(100.0, max(0.0, mean)), newest


# ---------------------------------------------------------------------------------------------
# NVML enumeration (side effects; every call may fail per device)


@dataclass(frozen=True)
class _Device:
    index: int
    mig_index: int | None
    uuid: str
    handle: Any
    name: str | None
    mig_enabled: bool | None


def _optional(fn: Callable[..., _T], *args: Any) -> _T | None:
    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def _enumerate_devices() -> list[_Device]:
    """Every GPU NVML sees, in NVML index order, each followed by its MIG devices."""
    devices: list[_Device] = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = _optional(pynvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            # Keep a placeholder so NVML indices in CUDA_VISIBLE_DEVICES stay aligned.
            devices.append(_Device(index, None, "", None, None, None))
            continue
        mode = _optional(pynvml.nvmlDeviceGetMigMode, handle)
        mig_enabled = None if mode is None else mode[0] == pynvml.NVML_DEVICE_MIG_ENABLE
        devices.append(
            _Device(
                index,
                None,
                _optional(pynvml.nvmlDeviceGetUUID, handle) or "",
                handle,
                _optional(pynvml.nvmlDeviceGetName, handle),
                mig_enabled,
            )
        )
        if not mig_enabled:
            continue
        for mig_index in range(_optional(pynvml.nvmlDeviceGetMaxMigDeviceCount, handle) or 0):
            # Unpopulated slots answer NOT_FOUND; they are not devices.
            mig = _optional(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, mig_index)
            uuid = None if mig is None else _optional(pynvml.nvmlDeviceGetUUID, mig)
            if uuid:
                name = _optional(pynvml.nvmlDeviceGetName, mig)
                devices.append(_Device(index, mig_index, uuid, mig, name, None))
    return devices


def _torch_device_uuid(ordinal: int) -> str | None:
    """The UUID CUDA gives ``ordinal`` (no 'GPU-'/'MIG-' prefix), or None without CUDA torch."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if getattr(torch.version, "hip", None) or not torch.cuda.is_available():
            return None
        return str(torch.cuda.get_device_properties(ordinal).uuid)
    except Exception as exc:  # any torch/CUDA failure: CUDA_VISIBLE_DEVICES still gives the answer
        _log.debug("torch could not give the UUID of cuda:%s: %s", ordinal, exc)
        return None


def _handle_by_uuid(uuid: str) -> Any | None:
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except pynvml.NVMLError:
        return None


def _warn_if_order_ambiguous(devices: list[_Device]) -> None:
    names = {d.name for d in devices if d.mig_index is None and d.name}
    if len(names) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        _log.warning(
            "GPUs of different models (%s) and CUDA_DEVICE_ORDER is not PCI_BUS_ID: "
            "CUDA may number them differently from NVML, so the GPU watched may not be the one "
            "used. Set CUDA_DEVICE_ORDER=PCI_BUS_ID, or pass the device's UUID.",
            ", ".join(sorted(str(n) for n in names)),
        )


def _open_device(device: int | str) -> tuple[Any, str]:
    """Find the NVML handle and UUID of ``device`` (CUDA ordinal or NVML UUID)."""
    if isinstance(device, str):
        handle = _handle_by_uuid(device)
        if handle is not None:
            return handle, device
        # An abbreviation, or a MIG UUID on a driver before R470 that cannot look those up.
        devices = _enumerate_devices()
        matches = [d for d in devices if d.uuid and d.uuid.startswith(device)]
        if len(matches) != 1:
            known = ", ".join(d.uuid for d in devices if d.uuid) or "none"
            what = "matches none" if not matches else "is ambiguous among"
            raise GpuNotFoundError(f"device {device!r} {what} of the NVML device UUIDs ({known})")
        return matches[0].handle, matches[0].uuid

    bare = _torch_device_uuid(device)
    if bare is not None:
        # torch prints the CUDA UUID without NVML's prefix, which says GPU or MIG instance.
        for uuid in (prefix + bare for prefix in _UUID_PREFIXES):
            if (handle := _handle_by_uuid(uuid)) is not None:
                return handle, uuid
    devices = _enumerate_devices()
    if bare is not None:
        for d in devices:
            if d.uuid[len("GPU-") :] == bare:
                return d.handle, d.uuid
        _log.debug("NVML does not know torch's UUID %s of cuda:%s", bare, device)
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = parse_visible_devices(cvd)
    if entries is None or (entries and isinstance(entries[0], int)):
        _warn_if_order_ambiguous(devices)
    uuid = resolve_visible_device(device, cvd, [d.uuid for d in devices])
    return next(d.handle for d in devices if d.uuid == uuid), uuid


# ---------------------------------------------------------------------------------------------
# The GPU source


class _Held:
    """The last value of a metric, trusted for ``_HOLD_S`` after it was measured."""

    def __init__(self) -> None:
        self.value: float | None = None
        self.at_s = -math.inf

    def set(self, value: float) -> float:
        self.value, self.at_s = value, _clock()
        return value

    def get(self) -> float | None:
        return self.value if _clock() - self.at_s <= _HOLD_S else None


class NvmlGpu:
    """One GPU (or MIG instance) read through NVML; implements ``GpuSource``.

    Utilization comes from the driver's sample buffer (``nvmlDeviceGetSamples``), feeding back
    the newest timestamp the driver returned, so each reading averages exactly the samples taken
    since the previous one. When the driver has no new sample (NOT_FOUND, normal at 10 reads/s)
    the previous value is reported again, for up to 5 s; after that it is None. When the buffer
    is unsupported, ``nvmlDeviceGetUtilizationRates`` is used instead.

    Args:
        device: CUDA ordinal (``cuda:N``) or an NVML UUID (``GPU-…``/``MIG-…``, abbreviations
            accepted as CUDA does). Ordinals honour ``CUDA_VISIBLE_DEVICES``; when torch has
            CUDA, the UUID torch reports for the ordinal is used.

    Raises:
        ValueError: ``device`` is neither a non-negative int nor a UUID string.
        NvmlUnavailableError: NVML cannot initialise (no driver library, driver not loaded).
        GpuNotFoundError: NVML works but the device does not exist or is not visible.
    """

    name: str

    def __init__(self, device: int | str = 0) -> None:
        _check_device(device)
        _acquire_nvml()
        try:
            self._handle, self.uuid = _open_device(device)
        except pynvml.NVMLError as exc:
            _release_nvml()
            raise NvmlUnavailableError(
                f"NVML could not open device {device!r} ({_describe(exc)})"
            ) from exc
        except BaseException:
            _release_nvml()
            raise
        self.device = device
        self.product_name: str | None = _optional(pynvml.nvmlDeviceGetName, self._handle)
        self.name = f"nvml:{device}"
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._closed = False
        self._lost = False
        self._unsupported: set[str] = set()
        self._transient_warned: set[str] = set()
        self._memory_v2 = hasattr(pynvml, "nvmlMemory_v2")
        self._util_ts = 0
        self._util = _Held()
        self._process_ts = 0
        self._process_util = _Held()
        self._process_seen = False

    def __repr__(self) -> str:
        return f"NvmlGpu({self.device!r}, uuid={self.uuid!r}, product={self.product_name!r})"

    def __enter__(self) -> NvmlGpu:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read(self) -> GpuReading:
        """Read utilization, memory and this process's utilization; never raises.

        Returns:
            A reading whose unavailable fields are None (all of them once the GPU is lost or
            the source is closed).
        """
        with self._lock:
            if self._closed or self._lost:
                return GpuReading()
            util = self._read_utilization()
            memory = self._guard("memory", self._read_memory)
            process = self._guard("process utilization", self._read_process_util)
            if self._lost:
                return GpuReading()
            return GpuReading(
                util_pct=util,
                mem_used_bytes=None if memory is None else memory[0],
                mem_total_bytes=None if memory is None else memory[1],
                process_util_pct=process,
            )

    def close(self) -> None:
        """Release this source's hold on NVML (shut down when no other source holds it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _release_nvml()

    # -- metric plumbing -----------------------------------------------------------------------

    def _guard(self, metric: str, fn: Callable[[], _T], *, warn: bool = True) -> _T | None:
        """Run one metric's NVML calls, turning every failure into None plus at most one log."""
        if self._lost or metric in self._unsupported:
            return None
        try:
            return fn()
        except pynvml.NVMLError as exc:
            if exc.value in _LOST_CODES:
                self._lost = True
                _log.warning(
                    "%s (%s) is lost (%s); every GPU metric is None from now on",
                    self.name,
                    self.uuid,
                    _describe(exc),
                )
            elif exc.value in _UNSUPPORTED_CODES:
                self._drop(metric, exc, warn=warn)
            elif metric not in self._transient_warned:
                self._transient_warned.add(metric)
                _log.warning(
                    "%s: reading %s failed (%s); it is None while this lasts",
                    self.name,
                    metric,
                    _describe(exc),
                )
            else:
                _log.debug("%s: reading %s failed again: %s", self.name, metric, _describe(exc))
            return None
        except Exception as exc:  # a binding surprise must not stop the sampler thread
            self._drop(metric, exc, warn=True)
            return None

    def _drop(self, metric: str, exc: BaseException, *, warn: bool) -> None:
        self._unsupported.add(metric)
        hint = ""
        if metric == "utilization" and self.uuid.startswith("MIG-"):
            hint = "; NVML reports no utilization for MIG instances"
        _log.log(
            logging.WARNING if warn else logging.INFO,
            "%s: %s is unavailable (%s%s); it is None from now on",
            self.name,
            metric,
            _describe(exc),
            hint,
        )

    def _read_utilization(self) -> float | None:
        if "utilization samples" not in self._unsupported:
            # Not a lost metric yet if it fails: the utilization rates below may still work.
            value = self._guard("utilization samples", self._read_util_samples, warn=False)
            if "utilization samples" not in self._unsupported:
                return value
        return self._guard("utilization", self._read_util_rates)

    def _read_util_samples(self) -> float | None:
        try:
            value_type, samples = pynvml.nvmlDeviceGetSamples(
                self._handle, pynvml.NVML_GPU_UTILIZATION_SAMPLES, self._util_ts
            )
        except pynvml.NVMLError as exc:
            if exc.value != pynvml.NVML_ERROR_NOT_FOUND:
                raise
            return self._util.get()  # no sample newer than the timestamp fed back
        field = _SAMPLE_FIELDS.get(value_type, "uiVal")
        pairs = [(int(s.timeStamp), float(getattr(s.sampleValue, field))) for s in samples]
        mean, self._util_ts = _mean_of_new_samples(pairs, self._util_ts)
        return self._util.get() if mean is None else self._util.set(mean)

    def _read_util_rates(self) -> float:
        return float(pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def _read_memory(self) -> tuple[int, int]:
        if self._memory_v2:
            try:
                info = pynvml.nvmlDeviceGetMemoryInfo(self._handle, version=pynvml.nvmlMemory_v2)
            except (pynvml.NVMLError, TypeError) as exc:
                # TypeError: a binding whose nvmlDeviceGetMemoryInfo takes no version.
                if isinstance(exc, pynvml.NVMLError) and exc.value not in _MEMORY_V2_FALLBACK_CODES:
                    raise
                self._memory_v2 = False
                _log.debug("%s: memory info v2 unavailable (%s); using v1", self.name, exc)
            else:
                return int(info.used), int(info.total)
        info = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
        return int(info.used), int(info.total)

    def _read_process_util(self) -> float | None:
        try:
            samples = pynvml.nvmlDeviceGetProcessUtilization(self._handle, self._process_ts)
        except pynvml.NVMLError as exc:
            if exc.value == pynvml.NVML_ERROR_NOT_FOUND:
                return self._process_util.get()
            if exc.value != pynvml.NVML_SUCCESS:
                raise
            # The binding raises NVMLError(NVML_SUCCESS) when the driver has no process at all.
            samples = []
        new = [s for s in samples if int(s.timeStamp) > self._process_ts]
        if not new:
            return self._process_util.get()
        self._process_ts = max(int(s.timeStamp) for s in new)
        mine = [float(s.smUtil) for s in new if s.pid == self._pid]
        if mine:
            self._process_seen = True
            return self._process_util.set(min(100.0, sum(mine) / len(mine)))
        # The driver lists only processes with non-zero utilization, so absence means 0 — but
        # only once we know NVML sees our pid at all (in a PID namespace it sees host pids).
        return self._process_util.set(0.0) if self._process_seen else None


# ---------------------------------------------------------------------------------------------
# Probe (for `loadertune probe`)


@dataclass(frozen=True)
class GpuInfo:
    """What NVML says about one GPU or MIG device, for display.

    Attributes:
        index: NVML index of the physical GPU (of the parent GPU for a MIG device).
        mig_index: Index of the MIG device under its parent; None for a physical GPU.
        cuda_ordinal: CUDA ordinal under ``CUDA_VISIBLE_DEVICES`` (index lists assume
            ``CUDA_DEVICE_ORDER=PCI_BUS_ID``); None when CUDA cannot see it.
        name: Product name.
        uuid: NVML UUID (``GPU-…`` or ``MIG-…``); ``""`` when unreadable.
        mem_total_bytes: Device memory in all.
        mem_used_bytes: Device memory in use.
        util_pct: Utilization over the driver's last sample period, 0-100.
        mig_enabled: Whether MIG mode is on (physical GPUs only).
        driver_version: NVIDIA driver version.
        cuda_driver_version: Highest CUDA version the driver supports, e.g. ``"12.4"``.
    """

    index: int
    mig_index: int | None
    cuda_ordinal: int | None
    name: str | None
    uuid: str
    mem_total_bytes: int | None
    mem_used_bytes: int | None
    util_pct: float | None
    mig_enabled: bool | None
    driver_version: str | None
    cuda_driver_version: str | None


def _format_cuda_version(version: int | None) -> str | None:
    # NVML encodes CUDA 12.4 as 12040.
    return None if version is None else f"{version // 1000}.{version % 1000 // 10}"


def probe_gpus() -> tuple[list[GpuInfo], str | None]:
    """List the GPUs NVML sees, for ``loadertune probe``. Never raises for a missing GPU.

    Returns:
        ``(gpus, reason)``: ``reason`` is None when at least one GPU was found, else a sentence
        saying why there is none (no driver library, driver not loaded, no device, …).
    """
    try:
        _acquire_nvml()
    except NvmlUnavailableError as exc:
        return [], str(exc)
    try:
        driver = _optional(pynvml.nvmlSystemGetDriverVersion)
        cuda = _format_cuda_version(_optional(pynvml.nvmlSystemGetCudaDriverVersion))
        try:
            devices = _enumerate_devices()
        except pynvml.NVMLError as exc:
            return [], f"NVML could not list GPUs ({_describe(exc)})"
        visible = visible_uuids(os.environ.get("CUDA_VISIBLE_DEVICES"), [d.uuid for d in devices])
        ordinal_of = {u: i for i, u in enumerate(visible) if u}
        gpus = []
        for d in devices:
            memory = util = None
            if d.handle is not None:
                memory = _optional(pynvml.nvmlDeviceGetMemoryInfo, d.handle)
                util = _optional(pynvml.nvmlDeviceGetUtilizationRates, d.handle)
            gpus.append(
                GpuInfo(
                    index=d.index,
                    mig_index=d.mig_index,
                    cuda_ordinal=ordinal_of.get(d.uuid),
                    name=d.name,
                    uuid=d.uuid,
                    mem_total_bytes=None if memory is None else int(memory.total),
                    mem_used_bytes=None if memory is None else int(memory.used),
                    util_pct=None if util is None else float(util.gpu),
                    mig_enabled=d.mig_enabled,
                    driver_version=driver,
                    cuda_driver_version=cuda,
                )
            )
        if not gpus:
            return [], "NVML works but reports no GPU (none installed, or none in this container)"
        return gpus, None
    finally:
        _release_nvml()
