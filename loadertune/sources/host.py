"""Host readings: CPU, memory, /dev/shm, cgroup limits, and the DataLoader worker processes.

psutil keeps a process's CPU baseline on its ``Process`` object, so the worker objects live
between readings; the host's CPU baseline is kept here too (not in psutil's module-global one,
which any other caller of ``psutil.cpu_percent`` would reset).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import psutil

from loadertune.sources import cgroup
from loadertune.sources.base import HostReading

__all__ = ["HostSource", "LoopCpuClock", "excluded_threads", "shm_bytes", "thread_cpu_s", "usable_cpus"]

_log = logging.getLogger("loadertune")
_T = TypeVar("_T")
# A worker that vanished between listing and reading; none of these is an error for us.
_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)


def _affinity_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return None


def usable_cpus(
    *,
    cgroup_root: str | os.PathLike[str] = cgroup.DEFAULT_ROOT,
    proc_cgroup: str | os.PathLike[str] = cgroup.DEFAULT_PROC_CGROUP,
) -> int:
    """CPUs this process can keep busy: min(CPU affinity, cgroup CPU quota rounded up), >= 1.

    Args:
        cgroup_root: Where the cgroup filesystem is mounted.
        proc_cgroup: The file listing this process's cgroups.

    Returns:
        The count; ``os.cpu_count()`` stands in for the affinity set where there is none.
    """
    affinity = _affinity_cpus()
    cpus = len(affinity) if affinity else (os.cpu_count() or 1)
    quota = cgroup.cpu_quota_cores(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def shm_bytes(path: str | os.PathLike[str] = "/dev/shm") -> tuple[int, int] | None:
    """Free and total bytes of the filesystem at ``path`` (where workers pass batches).

    Args:
        path: Mount point to measure.

    Returns:
        ``(free_bytes, total_bytes)`` as an unprivileged process sees them, or None when the
        path cannot be measured.
    """
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _tot_time(t: Any) -> float:
    # Linux counts guest time inside user/nice as well; psutil and htop subtract it too.
    return sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _busy_pct(before: Any, after: Any) -> float | None:
    """Busy share between two ``cpu_times`` snapshots of one CPU, 0-100; None if no time passed."""
    total = _tot_time(after) - _tot_time(before)
    if total <= 0:
        return None
    idle = (after.idle + getattr(after, "iowait", 0.0)) - (
        before.idle + getattr(before, "iowait", 0.0)
    )
    return min(100.0, max(0.0, 100.0 * (total - idle) / total))


def _child_pids(pid: int) -> set[int]:
    """Every descendant of ``pid``.

    Linux lists each thread's children in /proc, which costs a few reads; psutil's way scans
    every process on the host, too slow for a 10 Hz sampler on a busy machine. Descendants, not
    only children, because forkserver workers are grandchildren.
    """
    found: set[int] = set()
    todo = [pid]
    try:
        if not os.path.isdir(f"/proc/{pid}/task"):
            raise FileNotFoundError(f"/proc/{pid}/task")  # not Linux, or /proc not mounted
        while todo:
            parent = todo.pop()
            try:
                tids = os.listdir(f"/proc/{parent}/task")
            except FileNotFoundError:
                continue  # exited meanwhile
            for tid in tids:
                try:
                    with open(f"/proc/{parent}/task/{tid}/children") as f:
                        kids = {int(p) for p in f.read().split()}
                except FileNotFoundError:
                    if not os.path.exists(f"/proc/{parent}/task/{tid}"):
                        continue  # thread exited meanwhile
                    raise  # no children files: kernel without CONFIG_PROC_CHILDREN
                todo.extend(kids - found)
                found |= kids
        return found
    except (OSError, ValueError):
        try:
            return {p.pid for p in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            return set()


#: Threads whose names start with this are loadertune's own (the sampler, hand-over drains).
OWN_THREAD_PREFIX = "loadertune"
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def excluded_threads(threads: Iterable[threading.Thread] | None = None) -> dict[int, str]:
    """Native ids of the threads whose CPU is not the training loop's, with their names.

    loadertune's own threads (named ``loadertune…``) and DataLoader pin-memory threads (torch
    leaves them unnamed; they are recognised by their target, ``_pin_memory_loop``). The rest
    of the process (the training thread, torch's intra-op pool, the user's threads) is the loop.

    Args:
        threads: Threads to look at; every live Python thread by default.
    """
    out: dict[int, str] = {}
    for t in threading.enumerate() if threads is None else threads:
        tid = getattr(t, "native_id", None)
        if tid is None:
            continue
        target = getattr(t, "_target", None)  # deleted once a thread's run() returns
        if t.name.startswith(OWN_THREAD_PREFIX) or getattr(target, "__name__", "") == "_pin_memory_loop":
            out[tid] = t.name
    return out


def thread_cpu_s(tid: int, *, proc_root: str | os.PathLike[str] = "/proc/self") -> float | None:
    """CPU seconds (user + system) one thread of this process has used; None when unreadable.

    Args:
        tid: The thread's native id.
        proc_root: The process's /proc directory.
    """
    try:
        with open(f"{os.fspath(proc_root)}/task/{tid}/stat", encoding="ascii") as fh:
            text = fh.read()
        # The name (field 2) may hold spaces and parentheses: fields count from the last ')'.
        fields = text[text.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


class LoopCpuClock:
    """CPU seconds of the training process outside loadertune's and pin-memory threads.

    A drop-in for ``time.thread_time()`` when timing the training loop: the training thread's
    clock misses torch's intra-op threads, so a step that keeps two cores busy read as one.
    ``time.process_time()`` covers every thread; the excluded threads' /proc counters (10 ms
    ticks) are subtracted. Calls cost a few microseconds per excluded thread: time a sample of
    batches, as the front ends do.

    Args:
        process_time: The process CPU clock (injectable for tests).
        threads: Returns the threads to exclude as ``{native_id: name}``.
        thread_cpu: Returns one thread's CPU seconds, None when it is gone.
        refresh_s: Least process-CPU seconds between two listings of the threads.
    """

    def __init__(
        self,
        *,
        process_time: Callable[[], float] = time.process_time,
        threads: Callable[[], dict[int, str]] = excluded_threads,
        thread_cpu: Callable[[int], float | None] = thread_cpu_s,
        refresh_s: float = 0.5,
    ) -> None:
        self._process_time = process_time
        self._threads = threads
        self._thread_cpu = thread_cpu
        self._refresh_s = refresh_s
        self._tids: dict[int, str] = {}
        self._listed_at = -math.inf
        # CPU of excluded threads that have ended: still inside process_time(), never the loop's.
        self._gone_s = 0.0
        self._last: dict[int, float] = {}
        self._base: dict[int, float] = {}

    def __call__(self) -> float:
        """CPU seconds of the loop's threads since the process started (monotonic)."""
        now = self._process_time()
        if now - self._listed_at >= self._refresh_s:
            self._listed_at = now
            self._tids = self._threads()
        for tid in list(self._last):
            if tid not in self._tids:
                # Gone (or no longer excluded): keep what it used out of the loop's time.
                self._gone_s += self._last.pop(tid) - self._base.pop(tid)
        excluded = self._gone_s
        for tid in self._tids:
            cpu = self._thread_cpu(tid)
            if cpu is None:
                cpu = self._last.get(tid)
                if cpu is None:
                    continue
            # Only what a thread uses from first sight on is subtracted, so the clock never
            # steps back when a thread starts being excluded.
            self._base.setdefault(tid, cpu)
            self._last[tid] = cpu
            excluded += cpu - self._base[tid]
        return max(0.0, now - excluded)


class HostSource:
    """Reads the host and this process's DataLoader workers; cheap enough for ~10 reads/s.

    A process's CPU share needs a baseline from an earlier reading: a worker seen for the first
    time is counted in ``worker_count`` and RSS but not yet in ``workers_cpu_pct`` (None while no
    worker has a baseline); the host's and this process's baselines are taken at construction.
    Worker PSS walks each worker's address space, so it is measured at most every
    ``pss_interval_s`` and the last sum is reported in between.

    Args:
        pss_interval_s: Least time between two PSS measurements, in seconds (0 = every read).
        shm_path: Where shared memory is mounted.
        cgroup_root: Where the cgroup filesystem is mounted.
        proc_cgroup: The file listing this process's cgroups.
        clock: Monotonic clock in seconds, for the PSS interval.

    Raises:
        ValueError: ``pss_interval_s`` is negative or not a finite number.
    """

    def __init__(
        self,
        pss_interval_s: float = 5.0,
        *,
        shm_path: str | os.PathLike[str] = "/dev/shm",
        cgroup_root: str | os.PathLike[str] = cgroup.DEFAULT_ROOT,
        proc_cgroup: str | os.PathLike[str] = cgroup.DEFAULT_PROC_CGROUP,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (
            isinstance(pss_interval_s, bool)
            or not isinstance(pss_interval_s, (int, float))
            or not math.isfinite(pss_interval_s)
            or pss_interval_s < 0
        ):
            raise ValueError(
                f"pss_interval_s must be a finite number of seconds >= 0, got {pss_interval_s!r}"
            )
        self._pss_interval_s = float(pss_interval_s)
        self._shm_path = shm_path
        self._cgroup_root = cgroup_root
        self._proc_cgroup = proc_cgroup
        self._clock = clock
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._explicit: set[int] | None = None
        self._workers: dict[int, psutil.Process] = {}
        self._pss_at_s = -math.inf
        # Limits (quota, cgroup memory limit, /dev/shm size...) rarely change: read them every
        # few seconds, not every tick, to keep the sampler under 1% of a core.
        self._slow: dict[str, Any] = {}
        self._slow_at_s = -math.inf
        self._runqueue: dict[int, tuple[int, float]] = {}
        self._workers_pss_bytes: int | None = None
        # Each worker's PSS at the last walk, and how many walks there were (the memory
        # forecast fits each worker's growth through the epoch).
        self._pss_by_pid: dict[int, int] = {}
        self._rss_by_pid: dict[int, int] = {}
        self._pss_walks = 0
        self._me = psutil.Process()
        self._me.cpu_percent(None)  # baseline for the first read
        self._own_cpu: dict[int, tuple[float, float]] = {}
        self._cpu_times: Sequence[Any] | None = self._guard("cpu_times", _percpu_times)

    @property
    def worker_pids(self) -> tuple[int, ...]:
        """PIDs of the worker processes seen at the last reading, sorted."""
        with self._lock:
            return tuple(sorted(self._workers))

    def worker_pss(self) -> tuple[int, dict[int, int], dict[int, int]]:
        """The last PSS walk: its number (it grows with each walk), each worker's PSS and RSS
        in bytes."""
        with self._lock:
            return self._pss_walks, dict(self._pss_by_pid), dict(self._rss_by_pid)

    def set_worker_pids(self, pids: Iterable[int] | None) -> None:
        """Say which processes are the DataLoader workers.

        Args:
            pids: Worker PIDs, or None for every descendant of this process (DataLoader workers
                are children, or grandchildren under forkserver; other helpers such as
                multiprocessing's resource tracker are counted too).

        Raises:
            ValueError: A PID is not a positive int, or is this process.
        """
        if pids is None:
            explicit = None
        else:
            explicit = set()
            for pid in pids:
                if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
                    raise ValueError(f"worker pids must be positive ints, got {pid!r}")
                if pid == os.getpid():
                    raise ValueError(f"pid {pid} is this process, not one of its workers")
                explicit.add(pid)
        with self._lock:
            self._explicit = explicit

    def read(self) -> HostReading:
        """Take one reading. Never raises for a single metric: that field is None.

        Returns:
            The reading.
        """
        with self._lock:
            now = self._clock()
            if now - self._slow_at_s >= _SLOW_INTERVAL_S:
                self._slow_at_s = now
                self._slow = {
                    "usable": self._guard("usable_cpus", self._usable_core_ids),
                    "limit": self._guard("memory_limit", cgroup.memory_limit_bytes, *self._cg),
                    "swap": self._guard("swap_memory", psutil.swap_memory),
                    "shm": self._guard("shm", shm_bytes, self._shm_path),
                    "throttling": self._guard("cgroup_throttling", cgroup.throttling, *self._cg),
                }
            slow = self._slow
            usable, limit, swap, shm, throttling = (
                slow["usable"], slow["limit"], slow["swap"], slow["shm"], slow["throttling"]
            )
            per_core = self._guard("cpu_per_core_pct", self._per_core, usable)
            workers = self._guard("workers", self._read_workers)
            workers_cpu, workers_rss = (None, None) if workers is None else workers
            runqueue = self._guard("workers_runqueue_pct", self._read_runqueue)
            vm = self._guard("virtual_memory", psutil.virtual_memory)
            headroom = self._guard("memory_headroom", cgroup.memory_headroom_bytes, *self._cg)
            return HostReading(
                cpu_pct=None if not per_core else sum(per_core) / len(per_core),
                cpu_per_core_pct=per_core,
                process_cpu_pct=self._guard("process_cpu_pct", self._loop_process_pct),
                workers_cpu_pct=workers_cpu,
                workers_runqueue_pct=runqueue,
                worker_count=len(self._workers),
                process_rss_bytes=self._guard("process_rss_bytes", self._process_rss),
                workers_rss_bytes=workers_rss,
                workers_pss_bytes=self._workers_pss_bytes,
                # In a container the host's figures overstate what this cgroup may use.
                ram_available_bytes=_min_known(None if vm is None else vm.available, headroom),
                ram_total_bytes=_min_known(None if vm is None else vm.total, limit),
                swap_used_bytes=None if swap is None else swap.used,
                shm_free_bytes=None if shm is None else shm[0],
                shm_total_bytes=None if shm is None else shm[1],
                usable_cpus=None if usable is None else usable[1],
                cgroup_nr_throttled=None if throttling is None else throttling.nr_throttled,
            )

    def close(self) -> None:
        """Forget the worker processes and baselines."""
        with self._lock:
            self._workers.clear()
            self._explicit = None

    # -- pieces --------------------------------------------------------------------------------

    @property
    def _cg(self) -> tuple[str | os.PathLike[str], str | os.PathLike[str]]:
        return self._cgroup_root, self._proc_cgroup

    def _guard(self, metric: str, fn: Callable[..., _T], *args: Any) -> _T | None:
        try:
            return fn(*args)
        except Exception as exc:  # one metric's failure must not cost the reading
            if metric not in self._warned:
                self._warned.add(metric)
                _log.warning("host metric %s unavailable (%r); it is None", metric, exc)
            else:
                _log.debug("host metric %s failed again: %r", metric, exc)
            return None

    def _usable_core_ids(self) -> tuple[set[int] | None, int]:
        return _affinity_cpus(), usable_cpus(
            cgroup_root=self._cgroup_root, proc_cgroup=self._proc_cgroup
        )

    def _per_core(self, usable: tuple[set[int] | None, int] | None) -> tuple[float, ...] | None:
        before, after = self._cpu_times, _percpu_times()
        self._cpu_times = after
        if before is None or len(before) != len(after):
            return None  # first reading, or CPUs went on/offline
        ids = range(len(after))
        affinity = None if usable is None else usable[0]
        # psutil lists online CPUs only, so list positions are CPU ids only when all are online.
        if affinity and len(after) == os.cpu_count():
            ids = [i for i in ids if i in affinity] or ids
        shares = [_busy_pct(before[i], after[i]) for i in ids]
        if any(s is None for s in shares):
            return None  # too little time since the previous reading to measure
        return tuple(s for s in shares if s is not None)

    def _loop_process_pct(self) -> float:
        """This process's CPU, in percent of one core, less loadertune's and pin-memory threads.

        What the training loop keeps busy with all of its threads (torch's intra-op ones too);
        the sampler reading this and the pin-memory copies are not the loop's work.
        """
        total = self._me.cpu_percent(None)
        now = time.monotonic()
        own = 0.0
        seen: dict[int, tuple[float, float]] = {}
        for tid in excluded_threads():
            cpu = thread_cpu_s(tid)
            if cpu is None:
                continue
            seen[tid] = (cpu, now)
            before = self._own_cpu.get(tid)
            if before is not None and now > before[1]:
                own += (cpu - before[0]) / (now - before[1]) * 100.0
        self._own_cpu = seen
        return max(0.0, total - own)

    def _process_rss(self) -> int:
        return self._me.memory_info().rss

    def _read_workers(self) -> tuple[float | None, int | None]:
        """Update the worker set and return (summed CPU %, summed RSS); measure PSS when due."""
        pids = set(self._explicit) if self._explicit is not None else _child_pids(os.getpid())
        for pid in set(self._workers) - pids:
            del self._workers[pid]
        cpu_total, primed = 0.0, 0
        for pid in pids:
            proc = self._workers.get(pid)
            try:
                if proc is None:
                    proc = psutil.Process(pid)
                    proc.cpu_percent(None)  # baseline; its first value would be a meaningless 0.0
                    self._workers[pid] = proc
                else:
                    cpu_total += proc.cpu_percent(None)
                    primed += 1
            except _GONE:
                self._forget(pid)
        rss_total = 0
        for pid, proc in list(self._workers.items()):
            try:
                rss_total += proc.memory_info().rss
            except _GONE:
                self._forget(pid)
        now = self._clock()
        if not self._workers:
            self._workers_pss_bytes = 0
        elif now - self._pss_at_s >= self._pss_interval_s:
            # The clock starts only with a real walk, so the first workers are measured at once.
            self._pss_at_s = now
            self._workers_pss_bytes = self._sum_pss()
        if not self._workers:
            return 0.0, 0
        return (cpu_total if primed else None), rss_total

    def _read_runqueue(self) -> float | None:
        """Summed share of time the workers waited for a CPU since the last reading, or None."""
        now = time.monotonic()
        total, known = 0.0, 0
        seen: dict[int, tuple[int, float]] = {}
        for pid in self._workers:
            try:
                with open(f"/proc/{pid}/schedstat", encoding="ascii") as fh:
                    waited_ns = int(fh.read().split()[1])
            except (OSError, ValueError, IndexError):
                continue  # not Linux, or the worker is gone
            seen[pid] = (waited_ns, now)
            before = self._runqueue.get(pid)
            if before is not None and now > before[1]:
                total += (waited_ns - before[0]) / 1e9 / (now - before[1]) * 100.0
                known += 1
        self._runqueue = seen
        if not self._workers:
            return 0.0
        return total if known else None

    def _sum_pss(self) -> int:
        total = 0
        by_pid: dict[int, int] = {}
        rss_by_pid: dict[int, int] = {}
        for pid, proc in list(self._workers.items()):
            try:
                info = proc.memory_full_info()
                by_pid[pid] = info.pss
                rss_by_pid[pid] = info.rss
                total += info.pss
            except _GONE:
                self._forget(pid)
        self._pss_by_pid = by_pid
        self._rss_by_pid = rss_by_pid
        self._pss_walks += 1
        return total

    def _forget(self, pid: int) -> None:
        self._workers.pop(pid, None)
        if self._explicit is not None:
            # A dead pid may be reused by an unrelated process: never follow it again.
            self._explicit.discard(pid)


#: Seconds between two readings of the limits (CPU quota, memory limit, shm, swap, throttling).
_SLOW_INTERVAL_S = 5.0


def _percpu_times() -> Sequence[Any]:
    return psutil.cpu_times(percpu=True)


def _min_known(a: int | None, b: int | None) -> int | None:
    known = [v for v in (a, b) if v is not None]
    return min(known) if known else None
