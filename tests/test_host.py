"""HostSource with real psutil on this machine, real child processes, and cgroup fixtures."""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from loadertune.sources import host
from loadertune.sources.base import HostReading
from loadertune.sources.host import HostSource, shm_bytes, usable_cpus

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"
_MP = multiprocessing.get_context(
    "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
)


def _burn_then_sleep() -> None:
    end = time.monotonic() + 0.2
    while time.monotonic() < end:
        pass
    time.sleep(60)


@pytest.fixture
def workers() -> Iterator[list[multiprocessing.process.BaseProcess]]:
    procs = [_MP.Process(target=_burn_then_sleep, daemon=True) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        yield procs
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)


def _read_until(src: HostSource, ok: object) -> HostReading:
    """Read until ``ok(reading)``; CPU shares need a few clock ticks between readings."""
    deadline = time.monotonic() + 5.0
    while True:
        spin_until = time.monotonic() + 0.03
        while time.monotonic() < spin_until:
            pass
        reading = src.read()
        if ok(reading) or time.monotonic() > deadline:  # type: ignore[operator]
            return reading


#: Whether this kernel has per-task scheduler statistics (the workers' run-queue wait).
SCHEDSTAT = os.path.exists("/proc/self/schedstat")

CpuTimes = collections.namedtuple("CpuTimes", "user nice system idle iowait")


def _scripted_cpus(monkeypatch: pytest.MonkeyPatch, busy: list[float]) -> Callable[[], None]:
    """Per-CPU times that stand still until ``advance()``, then move by ``busy[i]`` % on CPU i.

    Returns:
        ``advance``: lets 100 s of CPU time pass on every CPU.
    """
    idle = CpuTimes(0.0, 0.0, 0.0, 0.0, 0.0)
    now = [[idle] * len(busy)]

    def advance() -> None:
        now[0] = [
            t._replace(user=t.user + b, idle=t.idle + 100.0 - b)
            for t, b in zip(now[0], busy, strict=True)
        ]

    monkeypatch.setattr(host, "_percpu_times", lambda: now[0])
    return advance


def test_reading_on_this_machine_is_sane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CPU shares scripted (no waiting for clock ticks); the rest is this machine's psutil, and
    # "/dev/shm" is a directory that exists everywhere.
    n = os.cpu_count() or 1
    advance = _scripted_cpus(monkeypatch, [10.0 * (i % 10) for i in range(n)])
    monkeypatch.setattr(host, "_affinity_cpus", lambda: None)
    src = HostSource(shm_path=tmp_path)
    src.set_worker_pids([])
    first = src.read()
    assert first.cpu_pct is None and first.cpu_per_core_pct is None  # no time passed: not 0.0
    advance()
    r = src.read()
    assert r.cpu_per_core_pct == pytest.approx([10.0 * (i % 10) for i in range(n)])
    assert r.cpu_pct == pytest.approx(sum(r.cpu_per_core_pct) / n)
    assert r.process_cpu_pct is not None and r.process_cpu_pct >= 0.0
    assert r.process_rss_bytes == pytest.approx(psutil.Process().memory_info().rss, rel=0.5)
    assert r.ram_available_bytes is not None and r.ram_available_bytes > 0
    assert r.ram_total_bytes is not None and r.ram_total_bytes >= r.ram_available_bytes
    assert r.swap_used_bytes is not None and r.swap_used_bytes >= 0
    assert r.usable_cpus is not None and 1 <= r.usable_cpus <= n
    assert r.worker_count == 0 and r.workers_cpu_pct == 0.0 and r.workers_rss_bytes == 0
    st = os.statvfs(tmp_path)
    assert r.shm_total_bytes == st.f_blocks * st.f_frsize
    assert r.shm_free_bytes is not None and 0 <= r.shm_free_bytes <= r.shm_total_bytes
    src.close()


def test_per_core_shares_cover_the_affinity_cpus_only(monkeypatch: pytest.MonkeyPatch) -> None:
    advance = _scripted_cpus(monkeypatch, [90.0, 10.0, 30.0, 50.0])
    monkeypatch.setattr(host.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(host, "_affinity_cpus", lambda: {1, 3})
    src = HostSource()
    src.set_worker_pids([])
    advance()
    r = src.read()
    assert r.cpu_per_core_pct == pytest.approx([10.0, 50.0])
    assert r.cpu_pct == pytest.approx(30.0)


def test_per_core_shares_with_offline_cpus_cover_every_listed_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # psutil lists 2 online CPUs of 4: positions are not CPU ids, so no affinity filter applies.
    advance = _scripted_cpus(monkeypatch, [20.0, 60.0])
    monkeypatch.setattr(host.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(host, "_affinity_cpus", lambda: {3})
    src = HostSource()
    src.set_worker_pids([])
    advance()
    assert src.read().cpu_per_core_pct == pytest.approx([20.0, 60.0])


def test_usable_cpus_and_shm_on_this_machine(tmp_path: Path) -> None:
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
    free, total = shm_bytes(tmp_path)  # type: ignore[misc]
    st = os.statvfs(tmp_path)
    assert total == st.f_blocks * st.f_frsize and 0 <= free <= total
    assert shm_bytes("/no/such/mount") is None


def test_workers_are_measured_and_a_dead_one_is_dropped(workers: list) -> None:
    src = HostSource()
    src.set_worker_pids(p.pid for p in workers)
    first = src.read()
    assert first.worker_count == 2
    assert first.workers_rss_bytes is not None and first.workers_rss_bytes > 0
    assert first.workers_cpu_pct is None  # no baseline yet: not a fake 0.0
    assert first.workers_pss_bytes is not None and first.workers_pss_bytes > 0

    assert first.workers_runqueue_pct is None  # no baseline yet either

    second = _read_until(src, lambda r: True)
    assert second.worker_count == 2
    assert second.workers_cpu_pct is not None and second.workers_cpu_pct >= 0.0
    # Known exactly where the kernel keeps scheduler statistics; never a made-up 0.0 elsewhere.
    assert (second.workers_runqueue_pct is not None) is SCHEDSTAT
    if SCHEDSTAT:
        assert second.workers_runqueue_pct >= 0.0
    assert src.worker_pids == tuple(sorted(p.pid for p in workers))

    workers[0].kill()
    workers[0].join(5)
    third = src.read()
    assert third.worker_count == 1
    assert src.worker_pids == (workers[1].pid,)
    assert third.workers_rss_bytes is not None and third.workers_rss_bytes > 0
    src.close()


@pytest.mark.parametrize("proc_children", [True, False])
def test_default_workers_are_all_descendants(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proc_children: bool
) -> None:
    if not proc_children:  # a kernel without /proc/<pid>/task/<tid>/children: psutil's way
        real_isdir = os.path.isdir
        monkeypatch.setattr(
            host.os.path, "isdir", lambda p: False if str(p).startswith("/proc/") else real_isdir(p)
        )
    # A child that starts a grandchild, as forkserver does with DataLoader workers.
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    grandchild_pid = None
    try:
        assert child.stdout is not None
        grandchild_pid = int(child.stdout.readline())
        src = HostSource(cgroup_root=tmp_path)
        src.read()
        assert {child.pid, grandchild_pid} <= set(src.worker_pids)
        src.close()
    finally:
        if grandchild_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild_pid, signal.SIGKILL)
        child.kill()
        child.wait(5)
        if child.stdout is not None:
            child.stdout.close()


def test_pss_is_sampled_at_most_every_interval(
    workers: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = psutil.Process.memory_full_info

    def counting(self: psutil.Process):  # type: ignore[no-untyped-def]
        calls.append(self.pid)
        return real(self)

    monkeypatch.setattr(psutil.Process, "memory_full_info", counting)
    now = [100.0]
    src = HostSource(pss_interval_s=5.0, clock=lambda: now[0])
    src.set_worker_pids([])
    assert src.read().workers_pss_bytes == 0  # no workers: nothing walked, no clock started
    assert calls == []
    now[0] = 99.0
    src.set_worker_pids([workers[0].pid])

    pss = src.read().workers_pss_bytes
    assert len(calls) == 1 and pss is not None and pss > 0
    for t in (100.0, 102.0, 103.9):
        now[0] = t
        assert src.read().workers_pss_bytes == pss  # carried between measurements
    assert len(calls) == 1
    now[0] = 104.0
    src.read()
    assert len(calls) == 2
    now[0] = 105.0
    src.read()
    assert len(calls) == 2
    src.close()


def test_cgroup_fixture_feeds_the_reading() -> None:
    root = FIXTURES / "v1"
    src = HostSource(cgroup_root=root, proc_cgroup=root / "proc_self_cgroup")
    src.set_worker_pids([])
    r = src.read()
    assert r.usable_cpus == min(len(os.sched_getaffinity(0)), 2)  # ceil(1.5 cores)
    assert r.cgroup_nr_throttled == 12
    assert r.ram_total_bytes is not None and r.ram_total_bytes <= 2 << 30
    assert r.ram_available_bytes is not None and r.ram_available_bytes <= 768 << 20


def test_usable_cpus_rounds_quota_up_and_is_at_least_one() -> None:
    root = FIXTURES / "v1_namespaced"  # 0.5 cores
    assert usable_cpus(cgroup_root=root, proc_cgroup=root / "proc_self_cgroup") == 1
    root = FIXTURES / "v2_max"
    expected = len(os.sched_getaffinity(0))
    assert usable_cpus(cgroup_root=root, proc_cgroup=root / "proc_self_cgroup") == expected


def test_a_failing_metric_is_none_and_warned_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    def broken() -> None:
        raise RuntimeError("meminfo unreadable")

    monkeypatch.setattr(psutil, "virtual_memory", broken)
    src = HostSource(cgroup_root=tmp_path)
    src.set_worker_pids([])
    with caplog.at_level(logging.WARNING, logger="loadertune"):
        readings = [src.read() for _ in range(3)]
    assert all(r.ram_available_bytes is None and r.ram_total_bytes is None for r in readings)
    assert all(r.process_rss_bytes is not None and r.usable_cpus for r in readings)
    warnings = [rec for rec in caplog.records if "virtual_memory" in rec.getMessage()]
    assert len(warnings) == 1


def test_busy_pct() -> None:
    zero = CpuTimes(0.0, 0.0, 0.0, 0.0, 0.0)
    later = zero._replace(user=3.0, idle=1.0)
    assert host._busy_pct(zero, later) == pytest.approx(75.0)
    assert host._busy_pct(zero, zero) is None
    # Waiting on I/O is not busy.
    assert host._busy_pct(zero, zero._replace(iowait=2.0, user=2.0)) == pytest.approx(50.0)
    # Platforms without iowait (psutil's tuple differs per OS) count idle alone.
    Plain = collections.namedtuple("Plain", "user system idle")
    assert host._busy_pct(Plain(0.0, 0.0, 0.0), Plain(1.0, 1.0, 2.0)) == pytest.approx(50.0)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "5", True])
def test_bad_pss_interval(bad: object) -> None:
    with pytest.raises(ValueError, match="pss_interval_s"):
        HostSource(pss_interval_s=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [[0], [-3], [True], ["123"], [os.getpid()]])
def test_bad_worker_pids(bad: list) -> None:
    with pytest.raises(ValueError, match="pid"):
        HostSource().set_worker_pids(bad)


def test_loop_cpu_clock_leaves_out_loadertune_and_pin_memory_threads():
    """Issue 13: the loop's CPU is the process's, less loadertune's own threads (scripted clocks)."""
    clock = {"process": 10.0, 7: 1.0, 8: 0.5}
    loop = host.LoopCpuClock(
        process_time=lambda: clock["process"],
        threads=lambda: {tid: "loadertune-sampler" for tid in (7, 8) if tid in clock},
        thread_cpu=lambda tid: clock.get(tid),
        refresh_s=0.0,
    )
    start = loop()
    # 3 s of process CPU, 0.5 s of it the sampler's and 0.25 s a pin-memory thread's.
    clock.update(process=13.0)
    clock[7] += 0.5
    clock[8] += 0.25
    assert loop() - start == pytest.approx(2.25)
    # A thread that ends keeps its CPU out of the loop's time; the clock never steps back.
    del clock[8]
    clock["process"] += 1.0
    assert loop() - start == pytest.approx(3.25)


def test_excluded_threads_by_name_and_pin_memory_target():
    import threading
    import types

    def _pin_memory_loop():
        pass

    own = types.SimpleNamespace(name="loadertune-sampler", native_id=11, _target=None)
    pin = types.SimpleNamespace(name="Thread-3", native_id=12, _target=_pin_memory_loop)
    user = types.SimpleNamespace(name="MainThread", native_id=13, _target=None)
    assert host.excluded_threads([own, pin, user]) == {11: "loadertune-sampler", 12: "Thread-3"}
    assert threading.get_native_id() not in host.excluded_threads()


def test_thread_cpu_reads_proc_stat_with_a_tricky_name(tmp_path):
    task = tmp_path / "task" / "42"
    task.mkdir(parents=True)
    # utime 150 and stime 50 ticks (fields 14 and 15); the name holds ') ' to mislead a split.
    fields = ["S"] + ["0"] * 10 + ["150", "50"] + ["0"] * 30
    (task / "stat").write_text("42 (we) ird) " + " ".join(fields) + "\n")
    assert host.thread_cpu_s(42, proc_root=tmp_path) == pytest.approx(200 / host._CLK_TCK)
    assert host.thread_cpu_s(43, proc_root=tmp_path) is None
