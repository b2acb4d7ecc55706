"""cgroup parsing against fixture trees: v1, v2, nested v2, namespaced v1, missing, garbage."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadertune.sources import cgroup
from loadertune.sources.cgroup import CpuThrottling

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"
GiB = 1 << 30
MiB = 1 << 20


def _args(name: str) -> tuple[Path, Path]:
    root = FIXTURES / name
    return root, root / "proc_self_cgroup"


@pytest.mark.parametrize(
    ("name", "cores"),
    [
        ("v2", 2.0),
        ("v2_max", None),
        ("v2_nested", 1.5),  # the container's 1.5 binds before the pod-level 4
        ("v1", 1.5),  # the process's own cgroup, not the unlimited root
        ("v1_namespaced", 0.5),  # /proc/self/cgroup names a path the mount does not have
        ("missing", None),
        ("garbage", None),
    ],
)
def test_cpu_quota_cores(name: str, cores: float | None) -> None:
    assert cgroup.cpu_quota_cores(*_args(name)) == cores


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("v2", CpuThrottling(nr_periods=40, nr_throttled=7, throttled_us=250_000)),
        ("v2_max", CpuThrottling(nr_periods=0, nr_throttled=0, throttled_us=0)),
        ("v2_nested", CpuThrottling(nr_periods=9, nr_throttled=3, throttled_us=42)),
        # v1 gives throttled_time in nanoseconds
        ("v1", CpuThrottling(nr_periods=100, nr_throttled=12, throttled_us=3_000_000)),
        ("v1_namespaced", CpuThrottling(nr_periods=5, nr_throttled=5, throttled_us=1)),
        ("missing", None),
        ("garbage", None),
    ],
)
def test_throttling(name: str, expected: CpuThrottling | None) -> None:
    assert cgroup.throttling(*_args(name)) == expected


@pytest.mark.parametrize(
    ("name", "limit"),
    [
        ("v2", GiB),
        ("v2_max", None),
        ("v2_nested", 2 * GiB),  # set on the pod, binding its container
        ("v1", 2 * GiB),
        ("v1_namespaced", None),  # v1's "unlimited" is a huge number, not a limit
        ("missing", None),
        ("garbage", None),
    ],
)
def test_memory_limit_bytes(name: str, limit: int | None) -> None:
    assert cgroup.memory_limit_bytes(*_args(name)) == limit


@pytest.mark.parametrize(
    ("name", "headroom"),
    [
        ("v2", GiB - (512 * MiB - 96 * MiB)),  # inactive file cache can be dropped, not counted
        ("v2_max", None),
        ("v2_nested", GiB),
        ("v1", 2 * GiB - (1536 * MiB - 256 * MiB)),  # v1 hierarchical total_inactive_file
        ("v1_namespaced", None),
        ("missing", None),
        ("garbage", None),
    ],
)
def test_memory_headroom_bytes(name: str, headroom: int | None) -> None:
    assert cgroup.memory_headroom_bytes(*_args(name)) == headroom


def test_nonexistent_root_and_proc_file(tmp_path: Path) -> None:
    root, proc = tmp_path / "no-such-root", tmp_path / "no-such-file"
    assert cgroup.cpu_quota_cores(root, proc) is None
    assert cgroup.throttling(root, proc) is None
    assert cgroup.memory_limit_bytes(root, proc) is None
    assert cgroup.memory_headroom_bytes(root, proc) is None


@pytest.mark.parametrize(
    ("content", "cores"),
    [
        ("max 100000", None),
        ("200000 100000", 2.0),
        ("50000 100000\n", 0.5),
        ("200000", None),
        ("200000 0", None),
        ("-5 100000", None),
        ("", None),
        ("1 2 3", None),
    ],
)
def test_cpu_max_contents(tmp_path: Path, content: str, cores: float | None) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu\n")
    (tmp_path / "cpu.max").write_text(content)
    assert cgroup.cpu_quota_cores(tmp_path, tmp_path / "absent") == cores


def test_unreadable_file_is_unknown(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu\n")
    (tmp_path / "cpu.max").mkdir()  # opening a directory fails like an unreadable file
    assert cgroup.cpu_quota_cores(tmp_path, tmp_path / "absent") is None


def test_this_machine_does_not_raise() -> None:
    quota = cgroup.cpu_quota_cores()
    assert quota is None or quota > 0
    stat = cgroup.throttling()
    assert stat is None or stat.nr_throttled >= 0
    limit = cgroup.memory_limit_bytes()
    assert limit is None or limit > 0
