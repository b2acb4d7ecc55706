"""What this machine offers a DataLoader: the report of ``loadertune probe`` without a TARGET.

Every fact is optional: an unreadable file or a missing library makes that value None (shown as
"n/a"), never an error. The sources are :mod:`loadertune.sources` (NVML, host, cgroup) and
:func:`loadertune.seeding.torch_speed_flags`.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from typing import Any

from loadertune.cli import _output as out

__all__ = ["SHM_SMALL_BYTES", "render_system", "system_facts", "system_warnings"]

#: /dev/shm below this is too small for workers passing batches (Docker's default is 64 MiB).
SHM_SMALL_BYTES = 1 << 30


def _attempt(fn: Callable[[], Any], default: Any = None) -> Any:
    # Every fact is optional: a probe that dies on one unreadable file helps nobody.
    try:
        return fn()
    except Exception:
        return default


def system_facts() -> dict[str, Any]:
    """What the machine offers a DataLoader, as a JSON-ready dict (unknown values are None).

    Keys: ``python``, ``torch`` (versions and the speed flags with their costs), ``gpus`` (one
    dict per NVML device), ``no_gpu_reason``, ``cpu``, ``memory``, ``shm``, ``warnings``.
    """
    import psutil
    import torch

    facts: dict[str, Any] = {
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
            "platform": platform.platform(),
        },
        "torch": _torch_facts(torch),
    }
    gpus, reason = _gpu_facts()
    facts["gpus"], facts["no_gpu_reason"] = gpus, reason
    facts["cpu"] = _cpu_facts()
    vm = _attempt(psutil.virtual_memory)
    facts["memory"] = {
        "total_bytes": None if vm is None else int(vm.total),
        "available_bytes": None if vm is None else int(vm.available),
        "cgroup_limit_bytes": _attempt(_cgroup("memory_limit_bytes")),
    }
    shm = _attempt(lambda: _host("shm_bytes")("/dev/shm"))
    facts["shm"] = {
        "path": "/dev/shm",
        "free_bytes": None if shm is None else int(shm[0]),
        "total_bytes": None if shm is None else int(shm[1]),
    }
    facts["warnings"] = system_warnings(facts)
    return facts


def _torch_facts(torch: Any) -> dict[str, Any]:
    flags = _attempt(lambda: _seeding_flags().to_dict())
    if flags is None:
        # seeding.torch_speed_flags is missing or failed: read the flags, without the costs.
        flags = {
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
            "costs": [],
        }
    else:
        flags["costs"] = list(flags.get("costs", ()))
    cuda_available = bool(_attempt(torch.cuda.is_available, False))
    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": _attempt(torch.backends.cudnn.version),
        "cuda_available": cuda_available,
        "cuda_device_count": _attempt(torch.cuda.device_count, 0) if cuda_available else 0,
        "flags": flags,
    }


def _seeding_flags() -> Any:
    from loadertune.seeding import torch_speed_flags

    return torch_speed_flags()


def _gpu_facts() -> tuple[list[dict[str, Any]], str | None]:
    try:
        from loadertune.sources.nvml import probe_gpus

        gpus, reason = probe_gpus()
    except Exception as exc:
        return [], f"NVML could not be queried ({type(exc).__name__}: {exc})"
    return [_gpu_dict(g) for g in gpus], reason


def _gpu_dict(info: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(vars(info))


def _cgroup(name: str) -> Callable[[], Any]:
    def call() -> Any:
        from loadertune.sources import cgroup

        return getattr(cgroup, name)()

    return call


def _host(name: str) -> Any:
    from loadertune.sources import host

    return getattr(host, name)


def _cpu_facts() -> dict[str, Any]:
    affinity = _attempt(lambda: len(os.sched_getaffinity(0)))
    throttling = _attempt(_cgroup("throttling"))
    usable = _attempt(_host("usable_cpus"))
    return {
        "logical": os.cpu_count(),
        "affinity": affinity,
        "cgroup_quota_cores": _attempt(_cgroup("cpu_quota_cores")),
        "usable": usable or affinity or os.cpu_count() or 1,
        "cgroup_throttled_periods": None if throttling is None else throttling.nr_throttled,
    }


def system_warnings(facts: dict[str, Any]) -> list[str]:
    """What in the machine's facts will hurt a DataLoader, each with what to do (pure)."""
    notes = []
    shm_total = facts["shm"].get("total_bytes")
    if shm_total is not None and shm_total < SHM_SMALL_BYTES:
        notes.append(
            f"/dev/shm is only {out.fmt_bytes(shm_total)}: workers pass batches through it and die "
            "with 'bus error' or 'No space left on device' when it fills; give the container more "
            "(docker run --shm-size=2g, or a larger emptyDir medium: Memory in Kubernetes)"
        )
    cpu = facts["cpu"]
    quota = cpu.get("cgroup_quota_cores")
    if quota is not None and cpu.get("affinity") and quota < cpu["affinity"]:
        notes.append(
            f"a cgroup CPU quota of {quota:g} cores binds although {cpu['affinity']} CPUs are "
            f"visible: plan workers for {cpu['usable']} CPUs (torch's own warning counts "
            f"{cpu['affinity']})"
        )
    if cpu.get("cgroup_throttled_periods"):
        notes.append(
            "the cgroup's CPU quota has throttled this container "
            f"{cpu['cgroup_throttled_periods']} times: CPU-bound loading beyond the quota "
            "only queues"
        )
    memory = facts["memory"]
    if (
        memory.get("cgroup_limit_bytes")
        and memory.get("total_bytes")
        and memory["cgroup_limit_bytes"] < memory["total_bytes"]
    ):
        notes.append(
            f"a cgroup memory limit of {out.fmt_bytes(memory['cgroup_limit_bytes'])} applies "
            "(less than the machine's RAM); every worker's memory counts against it"
        )
    return notes


def render_system(facts: dict[str, Any]) -> None:
    """Prints the machine's facts as aligned text lines."""
    py, tc = facts["python"], facts["torch"]
    lines = [("Python", f"{py['version']} ({py['executable']})")]
    if tc["cuda"] is None:
        gpu_stack = "CPU build (no CUDA)"
    else:
        avail = "available" if tc["cuda_available"] else "not available"
        cudnn = tc["cudnn"] if tc["cudnn"] is not None else "none"
        gpu_stack = f"CUDA {tc['cuda']} ({avail}), cuDNN {cudnn}"
    lines.append(("torch", f"{tc['version']}, {gpu_stack}"))
    if facts["gpus"]:
        for g in facts["gpus"]:
            lines.append((_gpu_label(g), _gpu_text(g)))
    else:
        lines.append(("GPU", f"no GPU: {facts['no_gpu_reason'] or 'none found'}"))
    cpu = facts["cpu"]
    quota = cpu.get("cgroup_quota_cores")
    lines.append(
        (
            "CPUs",
            f"{cpu['usable']} usable (affinity {cpu.get('affinity') or 'n/a'}, "
            + (f"cgroup quota {quota:g} cores" if quota is not None else "no cgroup CPU quota")
            + f"; {cpu.get('logical') or 'n/a'} logical)",
        )
    )
    mem = facts["memory"]
    ram = (
        f"{out.fmt_bytes(mem['total_bytes'])} total, "
        f"{out.fmt_bytes(mem['available_bytes'])} available"
    )
    if mem.get("cgroup_limit_bytes"):
        ram += f", cgroup limit {out.fmt_bytes(mem['cgroup_limit_bytes'])}"
    lines.append(("RAM", ram))
    shm = facts["shm"]
    lines.append(
        (
            "/dev/shm",
            f"{out.fmt_bytes(shm['total_bytes'])} ({out.fmt_bytes(shm['free_bytes'])} free)",
        )
    )
    flags = tc["flags"]
    lines.append(
        (
            "Speed flags",
            f"cudnn.benchmark={flags['cudnn_benchmark']}, cudnn.deterministic="
            f"{flags['cudnn_deterministic']}, deterministic algorithms="
            f"{flags['deterministic_algorithms']}",
        )
    )
    width = max(len(k) for k, _ in lines)
    print("System")
    for key, value in lines:
        print(f"  {key.ljust(width)}  {value}")
    # cuDNN's flags cost nothing without a GPU, but the same script will run on one.
    prefix = "cost" if tc["cuda_available"] else "cost on a GPU"
    for cost in flags.get("costs", ()):
        print(f"  {''.ljust(width)}  {prefix}: {cost}")
    for note in facts["warnings"]:
        print(f"Warning: {note}")


def _gpu_label(g: dict[str, Any]) -> str:
    label = f"GPU {g.get('index')}"
    if g.get("mig_index") is not None:
        label += f" MIG {g['mig_index']}"
    return label


def _gpu_text(g: dict[str, Any]) -> str:
    parts = [g.get("name") or "unknown GPU"]
    if g.get("mem_total_bytes") is not None:
        used = g.get("mem_used_bytes")
        parts.append(
            f"{out.fmt_bytes(g['mem_total_bytes'])}"
            + (f" ({out.fmt_bytes(used)} used)" if used is not None else "")
        )
    util = g.get("util_pct")
    parts.append(f"util {util:.0f}%" if util is not None else "util n/a (e.g. MIG)")
    if g.get("mig_enabled") is not None:
        parts.append(f"MIG {'on' if g['mig_enabled'] else 'off'}")
    if g.get("driver_version"):
        driver = f"driver {g['driver_version']}"
        if g.get("cuda_driver_version"):
            driver += f" (CUDA {g['cuda_driver_version']})"
        parts.append(driver)
    parts.append(
        f"cuda:{g['cuda_ordinal']}" if g.get("cuda_ordinal") is not None else "not visible to CUDA"
    )
    return ", ".join(parts)
