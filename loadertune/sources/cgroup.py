"""Linux cgroup limits and counters (v1 and v2), read from a cgroup filesystem tree.

Every function takes the tree's root and the file listing the process's cgroups, so tests point
them at fixture directories. Nothing here raises: a missing, unreadable or malformed file means
"unknown" (None). Limits are looked up from the process's own cgroup up to the root, because a
limit on any ancestor binds too; the smallest wins.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

__all__ = [
    "CpuThrottling",
    "cpu_quota_cores",
    "memory_headroom_bytes",
    "memory_limit_bytes",
    "throttling",
]

# Defaults of every reader (importable, but not re-exported).
DEFAULT_ROOT = "/sys/fs/cgroup"
DEFAULT_PROC_CGROUP = "/proc/self/cgroup"

# cgroup v1 writes "no limit" as the largest page-aligned counter (9223372036854771712 with 4 KiB
# pages, a little less with larger pages); nothing real comes near 1 EiB.
_UNLIMITED_BYTES = 1 << 60

_T = TypeVar("_T")
_PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class CpuThrottling:
    """CPU-quota throttling counters of a cgroup, cumulative since the cgroup was created.

    Attributes:
        nr_periods: Enforcement periods in which the cgroup had runnable work.
        nr_throttled: Periods in which it ran out of quota and was stopped.
        throttled_us: Total time its tasks were held back, in microseconds; None if not given.
    """

    nr_periods: int
    nr_throttled: int
    throttled_us: int | None


# ---------------------------------------------------------------------------------------------
# Parsing file contents (pure)


def _parse_proc_cgroup(text: str) -> tuple[str | None, dict[str, str]]:
    """``/proc/self/cgroup`` -> (v2 path, {v1 controller: path})."""
    unified: str | None = None
    controllers: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, names, path = parts
        if hierarchy_id == "0" and names == "":
            unified = path
            continue
        for name in names.split(","):
            if name:
                controllers[name.removeprefix("name=")] = path
    return unified, controllers


def _parse_int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _parse_cpu_max(text: str) -> float | None:
    """v2 ``cpu.max``: "200000 100000" -> 2.0 cores; "max 100000" -> None."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    quota, period = _parse_int(parts[0]), _parse_int(parts[1])
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def _parse_cfs(quota_text: str, period_text: str) -> float | None:
    """v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; a quota of -1 means none."""
    quota, period = _parse_int(quota_text), _parse_int(period_text)
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def _parse_flat_keyed(text: str) -> dict[str, int]:
    """Lines of "key value" (``cpu.stat``, ``memory.stat``); malformed lines are skipped."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and (value := _parse_int(parts[1])) is not None:
            values[parts[0]] = value
    return values


def _parse_cpu_stat(text: str) -> CpuThrottling | None:
    """``cpu.stat``: v2 has ``throttled_usec``, v1 ``throttled_time`` in nanoseconds."""
    stat = _parse_flat_keyed(text)
    if "nr_periods" not in stat or "nr_throttled" not in stat:
        return None
    throttled_us = stat.get("throttled_usec")
    if throttled_us is None and "throttled_time" in stat:
        throttled_us = stat["throttled_time"] // 1000
    return CpuThrottling(stat["nr_periods"], stat["nr_throttled"], throttled_us)


def _parse_memory_limit(text: str) -> int | None:
    """v2 ``memory.max`` ("max" = none) or v1 ``memory.limit_in_bytes`` (huge = none)."""
    if text.strip() == "max":
        return None
    limit = _parse_int(text)
    if limit is None or limit <= 0 or limit >= _UNLIMITED_BYTES:
        return None
    return limit


# ---------------------------------------------------------------------------------------------
# Finding the process's cgroup directories


def _read(path: Path | _PathLike) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _chain(base: Path, relative: str) -> list[Path]:
    """The process's cgroup directory under ``base``, then its ancestors up to ``base``."""
    leaf = base / relative.strip("/")
    if relative.strip("/") == "" or not _is_dir(leaf):
        # Inside a cgroup namespace or a container, the mount's root is the process's own
        # cgroup and /proc/self/cgroup may name a path that does not exist under it.
        return [base]
    chain = [leaf]
    while chain[-1] != base and chain[-1].parent != chain[-1]:
        chain.append(chain[-1].parent)
    return chain


def _hierarchies(root: _PathLike, proc_cgroup: _PathLike, v1_controller: str) -> list[list[Path]]:
    """Directory chains to look in: the v2 hierarchy if mounted at root, then the v1 one."""
    root_path = Path(root)
    unified, controllers = _parse_proc_cgroup(_read(proc_cgroup) or "")
    chains = []
    if _is_file(root_path / "cgroup.controllers"):
        chains.append(_chain(root_path, unified or "/"))
    # Controllers co-mounted in v1 appear as "cpu,cpuacct", usually with a "cpu" symlink.
    for name in (v1_controller, f"{v1_controller},cpuacct", f"cpuacct,{v1_controller}"):
        base = root_path / name
        if _is_dir(base):
            chains.append(_chain(base, controllers.get(v1_controller, "/")))
            break
    return chains


def _smallest(chains: list[list[Path]], read_one: Callable[[Path], _T | None]) -> _T | None:
    """The smallest value ``read_one`` finds along the first hierarchy that has any."""
    for chain in chains:
        values = [v for v in map(read_one, chain) if v is not None]
        if values:
            return min(values)  # type: ignore[type-var]
    return None


# ---------------------------------------------------------------------------------------------
# Public readers


def cpu_quota_cores(
    root: _PathLike = DEFAULT_ROOT, proc_cgroup: _PathLike = DEFAULT_PROC_CGROUP
) -> float | None:
    """CPU quota of this process's cgroup, in cores (``quota / period``).

    Args:
        root: Where the cgroup filesystem is mounted.
        proc_cgroup: The file listing this process's cgroups.

    Returns:
        The smallest quota along the cgroup's ancestry, e.g. 2.0 for v2 ``cpu.max`` "200000
        100000"; None when there is no quota or it cannot be read.
    """

    def read_one(d: Path) -> float | None:
        if (text := _read(d / "cpu.max")) is not None:
            return _parse_cpu_max(text)
        quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        return None if quota is None or period is None else _parse_cfs(quota, period)

    quota = _smallest(_hierarchies(root, proc_cgroup, "cpu"), read_one)
    return quota if quota is not None and math.isfinite(quota) else None


def throttling(
    root: _PathLike = DEFAULT_ROOT, proc_cgroup: _PathLike = DEFAULT_PROC_CGROUP
) -> CpuThrottling | None:
    """CPU throttling counters from ``cpu.stat`` of this process's cgroup.

    The nearest cgroup (leaf first) whose ``cpu.stat`` carries throttling counters is used; a v2
    cgroup without the cpu controller enabled has none, so its parent's count.

    Args:
        root: Where the cgroup filesystem is mounted.
        proc_cgroup: The file listing this process's cgroups.

    Returns:
        The counters, or None when no cgroup along the way reports them.
    """
    for chain in _hierarchies(root, proc_cgroup, "cpu"):
        for d in chain:
            text = _read(d / "cpu.stat")
            if text is not None and (stat := _parse_cpu_stat(text)) is not None:
                return stat
    return None


def memory_limit_bytes(
    root: _PathLike = DEFAULT_ROOT, proc_cgroup: _PathLike = DEFAULT_PROC_CGROUP
) -> int | None:
    """Memory limit of this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``).

    Args:
        root: Where the cgroup filesystem is mounted.
        proc_cgroup: The file listing this process's cgroups.

    Returns:
        The smallest limit along the cgroup's ancestry, in bytes; None when unlimited or unknown.
    """

    def read_one(d: Path) -> int | None:
        text = _read(d / "memory.max")
        text = _read(d / "memory.limit_in_bytes") if text is None else text
        return None if text is None else _parse_memory_limit(text)

    return _smallest(_hierarchies(root, proc_cgroup, "memory"), read_one)


def memory_headroom_bytes(
    root: _PathLike = DEFAULT_ROOT, proc_cgroup: _PathLike = DEFAULT_PROC_CGROUP
) -> int | None:
    """Bytes the cgroup can still grow by before its memory limit, counting reclaimable cache.

    For each limited cgroup along the ancestry: limit minus working set, where the working set
    is usage minus inactive file cache (what the kernel can drop rather than OOM-kill for).

    Args:
        root: Where the cgroup filesystem is mounted.
        proc_cgroup: The file listing this process's cgroups.

    Returns:
        The smallest headroom, at least 0; None when no cgroup along the way has a limit.
    """

    def read_one(d: Path) -> int | None:
        limit_text = _read(d / "memory.max")
        usage_text = _read(d / "memory.current")
        inactive_keys = ("inactive_file",)
        if limit_text is None:
            limit_text = _read(d / "memory.limit_in_bytes")
            usage_text = _read(d / "memory.usage_in_bytes")
            inactive_keys = ("total_inactive_file", "inactive_file")
        limit = None if limit_text is None else _parse_memory_limit(limit_text)
        usage = None if usage_text is None else _parse_int(usage_text)
        if limit is None or usage is None:
            return None
        stat = _parse_flat_keyed(_read(d / "memory.stat") or "")
        inactive = next((stat[k] for k in inactive_keys if k in stat), 0)
        return max(0, limit - max(0, usage - inactive))

    return _smallest(_hierarchies(root, proc_cgroup, "memory"), read_one)
