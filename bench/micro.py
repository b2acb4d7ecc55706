"""Micro-benchmarks: what loadertune costs (sampler, wrapper, rebuilds, reseeding) and how often
its diagnosis is right.

Each benchmark returns a dict with a one-line ``result``, a ``detail`` and its raw ``data``;
those with a target (sampler <= 1% of a core, wrapper <= 10 us per batch) also return a target
row. Differences are medians over interleaved repeats, so a burst of load from another process
hits both sides of a comparison alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import loadertune
from bench.workloads import CheapDataset
from loadertune.config import LoaderConfig
from loadertune.diagnosis import Environment
from loadertune.metrics import WindowMetrics
from loadertune.sampler import Sampler
from loadertune.sim import SimulatedGpu

__all__ = [
    "NAMES",
    "diagnosis_accuracy",
    "diagnosis_scenarios",
    "rebuild_latency",
    "run",
    "sampler_overhead",
    "seeding_cost",
    "wrapper_overhead",
]

#: The micro-benchmarks, in run order (names accepted by ``--only``).
NAMES = ("sampler", "wrapper", "rebuild", "seeding", "diagnosis")

SAMPLER_TARGET_PCT = 1.0
WRAPPER_TARGET_US = 10.0


def run(
    names: Sequence[str],
    *,
    quick: bool,
    real_diagnoses: Sequence[tuple[str, str, str]] = (),
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs the named micro-benchmarks.

    Args:
        names: Which ones (see ``NAMES``).
        quick: Fewer repeats.
        real_diagnoses: ``(workload, diagnosed, expected)`` from the workload runs' first
            windows, added to the diagnosis accuracy as labelled real cases.
        echo: Where progress lines go.

    Returns:
        ``{"items": [...], "targets": [...]}``.
    """
    items: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    for name in names:
        echo(f"[micro] {name} ...")
        if name == "sampler":
            item = sampler_overhead(quick=quick)
        elif name == "wrapper":
            item = wrapper_overhead(quick=quick)
        elif name == "rebuild":
            item = rebuild_latency(quick=quick)
        elif name == "seeding":
            item = seeding_cost(quick=quick)
        elif name == "diagnosis":
            item = diagnosis_accuracy(real_diagnoses)
        else:
            raise ValueError(f"unknown micro-benchmark {name!r}; choose from {', '.join(NAMES)}")
        echo(f"[micro]   {item['name']}: {item['result']}")
        items.append(item)
        if "target" in item:
            targets.append(item.pop("target"))
    return {"items": items, "targets": targets}


# -- sampler -----------------------------------------------------------------------------------
def _thread_cpu_s(native_id: int | None) -> float | None:
    if native_id is None:
        return None
    try:
        # Nanoseconds on the CPU: psutil's per-thread times come in 10 ms clock ticks, as coarse
        # as the whole figure over a short segment.
        with open(f"/proc/self/task/{native_id}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    for t in psutil.Process().threads():
        if t.id == native_id:
            return t.user_time + t.system_time
    return None


def sampler_overhead(*, quick: bool = False) -> dict[str, Any]:
    """CPU the sampler thread costs at 10 Hz with host metrics, in percent of one core.

    A training-like loop (2 workers feeding cheap batches, a 10 ms simulated step) runs the same
    number of batches with and without a ``Sampler`` (SimulatedGpu + psutil host source watching
    the workers), alternating, in one process. The figure is the difference in the process's CPU
    time over the wall time; the sampler thread's own CPU time (from /proc) is shown beside it.
    """
    pairs = 2 if quick else 3
    segment_s = 2.0 if quick else 3.0
    gpu = SimulatedGpu(step_time_s=0.010)
    loader = DataLoader(CheapDataset(), batch_size=32, num_workers=2, shuffle=False)
    it = iter(loader)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    try:
        for _ in range(20):  # workers up and warm
            next(it)
        t = time.perf_counter()
        for _ in range(20):
            gpu.step(int(next(it).shape[0]))
        n = max(50, int(segment_s / ((time.perf_counter() - t) / 20)))

        def segment() -> tuple[float, float]:
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                gpu.step(int(next(it).shape[0]))
            return time.perf_counter() - w0, time.process_time() - c0

        diffs, direct = [], []
        for _ in range(pairs):
            _, cpu_off = segment()
            sampler = Sampler(interval_s=0.1, gpu=gpu, host=True)
            sampler.start()
            sampler.host.set_worker_pids(pids)  # as TunedLoader does
            # The thread's id, to read its own CPU time from /proc (a private attribute; bench
            # only).
            tid = getattr(getattr(sampler, "_thread", None), "native_id", None)
            before = _thread_cpu_s(tid)
            wall_on, cpu_on = segment()
            after = _thread_cpu_s(tid)
            sampler.close()
            diffs.append(100.0 * (cpu_on - cpu_off) / wall_on)
            if before is not None and after is not None:
                direct.append(100.0 * (after - before) / wall_on)
    finally:
        it._shutdown_workers()
    pct = statistics.median(diffs)
    thread = statistics.median(direct) if direct else None
    detail = (
        f"{n} batches per segment, {pairs} on/off pairs; per pair: "
        + ", ".join(f"{d:+.2f}%" for d in diffs)
        + (f"; sampler thread's own CPU {thread:.2f}% of a core" if thread is not None else "")
    )
    return {
        "name": "sampler overhead (10 Hz, host + GPU metrics)",
        "result": f"{pct:+.2f}% of one core",
        "detail": detail,
        "data": {"pct_of_core": pct, "pairs": diffs, "thread_pct_of_core": thread, "batches": n},
        "target": {
            "id": "sampler_1pct",
            "target": f"sampler costs <= {SAMPLER_TARGET_PCT:g}% of one core (the larger of the "
            "process difference and the thread's own CPU)",
            "measured": f"{pct:+.2f}%" + (f" (thread {thread:.2f}%)" if thread is not None else ""),
            "passed": max(pct, thread if thread is not None else pct) <= SAMPLER_TARGET_PCT,
        },
    }


# -- wrapper -----------------------------------------------------------------------------------
def _wrapper_pairs(batch_size: int, pairs: int, chunk: int) -> dict[str, Any]:
    total = (pairs + 2) * chunk * batch_size
    data = TensorDataset(torch.arange(total, dtype=torch.float32))
    loader = DataLoader(data, batch_size=batch_size, num_workers=0, shuffle=False)

    def run_chunk(it: Any) -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(chunk):
            next(it)
        return (
            (time.thread_time() - c0) / chunk * 1e6,
            (time.perf_counter() - w0) / chunk * 1e6,
        )

    cpu_diffs, wall_diffs, bare_cpu = [], [], []
    with loadertune.tune(loader, mode="recommend", gpu=None) as tuned:
        bare_it, tuned_it = iter(loader), iter(tuned)
        run_chunk(bare_it)  # warm both paths
        run_chunk(tuned_it)
        for i in range(pairs):
            # Alternate which goes first, so a drift in machine load favours neither.
            if i % 2:
                w_cpu, w_wall = run_chunk(tuned_it)
                b_cpu, b_wall = run_chunk(bare_it)
            else:
                b_cpu, b_wall = run_chunk(bare_it)
                w_cpu, w_wall = run_chunk(tuned_it)
            cpu_diffs.append(w_cpu - b_cpu)
            wall_diffs.append(w_wall - b_wall)
            bare_cpu.append(b_cpu)
    q1, _, q3 = statistics.quantiles(cpu_diffs, n=4)
    return {
        "batch_size": batch_size,
        "diff_us": statistics.median(cpu_diffs),
        "iqr_us": [q1, q3],
        "wall_diff_us": statistics.median(wall_diffs),
        "bare_us": statistics.median(bare_cpu),
        "cpu_diffs_us": cpu_diffs,
    }


def wrapper_overhead(*, quick: bool = False) -> dict[str, Any]:
    """Extra time per batch of ``tune(loader, mode="recommend", gpu=None)`` over the bare loader.

    A trivial in-memory dataset at ``num_workers=0``; the bare and the wrapped loader are
    iterated in alternating chunks of 250 batches (one long epoch each) and the median of the
    per-pair differences is taken, at batch size 32 (the target) and 8. The figure is the
    training thread's CPU time per batch, which preemption by other processes does not inflate;
    the wall-clock difference is shown beside it. The sampler thread's own cost is the sampler
    benchmark's, not counted here.
    """
    pairs = 16 if quick else 40
    chunk = 250
    main, small = (_wrapper_pairs(bs, pairs, chunk) for bs in (32, 8))
    diff = main["diff_us"]

    def describe(r: dict[str, Any]) -> str:
        return (
            f"batch size {r['batch_size']}: {r['diff_us']:+.1f} µs (IQR {r['iqr_us'][0]:+.1f} to "
            f"{r['iqr_us'][1]:+.1f}; wall {r['wall_diff_us']:+.1f}) over a bare "
            f"{r['bare_us']:.0f} µs"
        )

    return {
        "name": "wrapper overhead per batch (recommend mode, num_workers=0)",
        "result": f"{diff:+.1f} µs/batch at batch size 32",
        "detail": f"training-thread CPU per batch, median of {pairs} pairs of {chunk}-batch "
        "chunks; "
        f"{describe(main)}; {describe(small)}",
        "data": {"bs32": main, "bs8": small},
        "target": {
            "id": "wrapper_10us",
            "target": f"wrapper adds <= {WRAPPER_TARGET_US:g} µs per batch (batch size 32)",
            "measured": f"{diff:+.1f} µs (wall {main['wall_diff_us']:+.1f} µs; at batch size 8 "
            f"{small['diff_us']:+.1f} µs)",
            "passed": diff <= WRAPPER_TARGET_US,
        },
    }


# -- rebuild -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _timed_torch_workers(acc: dict[str, float]) -> Iterator[None]:
    """Adds the time torch spends starting and stopping worker pools to ``acc`` (bench only)."""
    from torch.utils.data import dataloader

    cls = dataloader._MultiProcessingDataLoaderIter
    init, shutdown = cls.__init__, cls._shutdown_workers

    def timed_init(self: Any, loader: Any) -> None:
        t = time.perf_counter()
        init(self, loader)
        acc["start_s"] += time.perf_counter() - t

    def timed_shutdown(self: Any) -> None:
        t = time.perf_counter()
        shutdown(self)
        acc["stop_s"] += time.perf_counter() - t

    cls.__init__, cls._shutdown_workers = timed_init, timed_shutdown
    try:
        yield
    finally:
        cls.__init__, cls._shutdown_workers = init, shutdown


def _rebuilds(
    dataset: Dataset, sequence: Sequence[int], rounds: int
) -> dict[str, dict[str, float]]:
    loader = DataLoader(dataset, batch_size=32, num_workers=0, shuffle=True)
    results: dict[str, list[tuple[float, float, float, float]]] = {}
    acc = {"start_s": 0.0, "stop_s": 0.0}
    with (
        loadertune.tune(loader, mode="recommend", gpu=None, host=None) as tuned,
        _timed_torch_workers(acc),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        it = iter(tuned)
        for _ in range(3):
            next(it)
        current = 0
        for _ in range(rounds):
            for k in sequence:
                acc.update(start_s=0.0, stop_s=0.0)
                t = time.perf_counter()
                tuned.reconfigure(num_workers=k)
                reconf = time.perf_counter() - t
                stop, start = acc["stop_s"], acc["start_s"]
                t = time.perf_counter()
                next(it)
                first = time.perf_counter() - t
                results.setdefault(f"{current}→{k}", []).append((reconf, stop, start, first))
                current = k
                for _ in range(6):
                    next(it)
    return {
        key: {
            name: statistics.median(v[i] for v in values) * 1e3
            for i, name in enumerate(("reconfigure_ms", "stop_ms", "start_ms", "next_batch_ms"))
        }
        for key, values in results.items()
    }


def rebuild_latency(*, quick: bool = False) -> dict[str, Any]:
    """Wall time of ``tuned.reconfigure(num_workers=k)`` mid-epoch, and of the next batch after it.

    Twice: on cheap samples (the fixed cost of a rebuild) and on slow batches (4 ms per sample,
    128 ms per batch), where stopping the old workers waits for the batch each one is loading
    and the new workers' first batch takes a whole load time. The part of ``reconfigure()``
    spent stopping and starting torch's worker pools is shown separately.
    """
    from bench.workloads import LatencyDataset

    data = {
        "cheap": _rebuilds(CheapDataset(), (2, 4, 0, 4, 2, 0), 1 if quick else 2),
        "slow": _rebuilds(LatencyDataset(0.004), (4, 8, 4), 1),
    }
    table = [
        "| Samples | Rebuild | reconfigure() | of which stopping old workers | starting new ones "
        "| next batch after it |",
        "|---|---|---|---|---|---|",
    ]
    for kind, rows in data.items():
        label = "cheap" if kind == "cheap" else "slow (128 ms/batch)"
        for key, v in rows.items():
            table.append(
                f"| {label} | num_workers {key} | {v['reconfigure_ms']:.0f} ms "
                f"| {v['stop_ms']:.0f} ms "
                f"| {v['start_ms']:.0f} ms | {v['next_batch_ms']:.0f} ms |"
            )
    worst = {
        k: max(v["reconfigure_ms"] + v["next_batch_ms"] for v in rows.values())
        for k, rows in data.items()
    }
    return {
        "name": "rebuild latency (reconfigure mid-epoch)",
        "result": f"worst {worst['cheap']:.0f} ms on cheap samples, {worst['slow']:.0f} ms on "
        "128 ms batches (including the first batch after it)",
        "detail": "; ".join(
            f"{k}: {v['reconfigure_ms']:.0f}+{v['next_batch_ms']:.0f} ms"
            for k, v in data["cheap"].items()
        ),
        "data": data,
        "table": table,
    }


# -- seeding -----------------------------------------------------------------------------------
class _InWorkerTiming(Dataset):
    """Item 0 times the seeded and bare datasets inside a DataLoader worker (no RNG saving)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> torch.Tensor:
        bare_us, seeded_us = _time_seeding(self.n, batch=False)
        return torch.tensor([bare_us, seeded_us])


def _time_seeding(n: int, batch: bool) -> tuple[float, float]:
    from loadertune.seeding import SampleKey, SeededDataset

    base = CheapDataset(distinct=64)
    seeded = SeededDataset(base, seed=1234)
    keys = [SampleKey(0, i) for i in range(n)]
    t = time.perf_counter()
    for i in range(n):
        base[i]
    bare = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    if batch:
        for j in range(0, n, 32):
            seeded.__getitems__(keys[j : j + 32])
    else:
        for key in keys:
            seeded[key]
    return bare, (time.perf_counter() - t) / n * 1e6


def seeding_cost(*, quick: bool = False) -> dict[str, Any]:
    """Per-sample cost of ``SeededDataset`` reseeding, in a worker and in the training loop."""
    try:
        import loadertune.seeding as seeding

        seeding.SeededDataset  # noqa: B018 - fails here if the module is still incomplete
        seeding.SampleKey  # noqa: B018
    except (ImportError, AttributeError) as exc:
        return {
            "name": "per-sample reseeding (SeededDataset)",
            "result": "skipped",
            "detail": f"loadertune.seeding is not available yet ({exc})",
            "data": None,
        }
    n = 3000 if quick else 10000
    repeats = 3
    main_single, main_batch, worker = [], [], []
    for _ in range(repeats):
        b, s = _time_seeding(n, batch=False)
        main_single.append(s - b)
        b, s = _time_seeding(n, batch=True)
        main_batch.append(s - b)
    loader = DataLoader(_InWorkerTiming(n), batch_size=None, num_workers=1)
    for _ in range(repeats):
        bare_us, seeded_us = next(iter(loader)).tolist()
        worker.append(seeded_us - bare_us)
    w, ms, mb = (statistics.median(x) for x in (worker, main_single, main_batch))
    return {
        "name": "per-sample reseeding (SeededDataset)",
        "result": f"{w:.1f} µs/sample in a worker",
        "detail": f"in the training process (num_workers=0, RNG states saved and restored): "
        f"{ms:.1f} µs/sample one by one, {mb:.1f} µs/sample through __getitems__ (batches of 32)",
        "data": {"worker_us": w, "main_single_us": ms, "main_batch_us": mb},
    }


# -- diagnosis ---------------------------------------------------------------------------------
#: A labelled window: (label, group, description, metrics, config, environment).
Scenario = tuple[str, str, str, WindowMetrics, LoaderConfig, Environment | None]


def _window(
    *,
    wait_share: float,
    workers: int = 0,
    compute_s: float = 0.020,
    batch_size: int = 32,
    util: tuple[float, float, float] | None = None,
    cpu_pct: float | None = None,
    usable_cpus: int = 2,
    loader_cpu_share: float | None = None,
    loader_runqueue_share: float | None = None,
    gpu_mem_used_share: float | None = None,
    ram_available_share: float = 0.6,
    shm_free_share: float = 0.9,
) -> WindowMetrics:
    """A window consistent with its inputs: rates from wait and compute, loader CPU from a share."""
    wait_share = min(0.95, max(0.0, wait_share))
    per_batch = compute_s / (1.0 - wait_share)
    duration = 2.0
    batches = max(2, int(duration / per_batch))
    batches_per_s = batches / duration
    wait_per_batch = per_batch * wait_share
    # What a loading worker spends per batch, as estimate_workers and diagnose reconstruct it.
    load = wait_per_batch if workers == 0 else workers / batches_per_s
    gib = 2**30
    fields: dict[str, Any] = {}
    if util is not None:
        mean, std, idle = util
        fields.update(
            gpu_util_mean_pct=min(100.0, max(0.0, mean)),
            gpu_util_std_pct=max(0.0, std),
            gpu_idle_share=min(1.0, max(0.0, idle)),
        )
    if gpu_mem_used_share is not None:
        fields.update(
            gpu_mem_used_bytes=int(min(1.0, max(0.0, gpu_mem_used_share)) * 16 * gib),
            gpu_mem_total_bytes=16 * gib,
        )
    if loader_cpu_share is not None:
        fields["loader_cpu_s_per_batch"] = max(0.0, loader_cpu_share) * load
        if workers:
            fields["workers_cpu_pct"] = 100.0 * fields["loader_cpu_s_per_batch"] * batches_per_s
    if loader_runqueue_share is not None and workers:
        fields["loader_runqueue_s_per_batch"] = max(0.0, loader_runqueue_share) * load
        fields["workers_runqueue_pct"] = (
            100.0 * fields["loader_runqueue_s_per_batch"] * batches_per_s
        )
    fields = {k: v for k, v in fields.items() if k in _METRIC_FIELDS}
    return WindowMetrics(
        duration_s=duration,
        batches=batches,
        samples=batches * batch_size,
        samples_per_s=batches * batch_size / duration,
        batches_per_s=batches_per_s,
        wait_share=wait_share,
        wait_s_per_batch=wait_per_batch,
        compute_s_per_batch=compute_s,
        rate_rel_stderr=0.02,
        cpu_pct=None if cpu_pct is None else min(100.0, max(0.0, cpu_pct)),
        usable_cpus=usable_cpus,
        worker_count=workers,
        worker_mem_bytes=200 * 2**20 if workers else None,
        ram_available_bytes=int(ram_available_share * 32 * gib),
        ram_total_bytes=32 * gib,
        shm_free_bytes=int(shm_free_share * 8 * gib),
        shm_total_bytes=8 * gib,
        ticks=20,
        **fields,
    )


# Fields another version of WindowMetrics may lack are dropped rather than failing the bench.
_METRIC_FIELDS = frozenset(f.name for f in dataclasses.fields(WindowMetrics))


def diagnosis_scenarios(per_kind: int = 8, hard_per_kind: int = 4, seed: int = 0) -> list[Scenario]:
    """Labelled windows: ``per_kind`` plain and ``hard_per_kind`` hard cases of each kind.

    Each case is generated from its cause (how long the loop really waits, how much of a worker's
    time is CPU work, how busy the machine is...), then measurement noise is added, so some land
    near or across a threshold as real windows do. The label is the cause, not what the thresholds
    say. Hard cases are the confounders met on shared machines: cores kept busy by other
    processes while loading waits on I/O, worker CPU shares diluted by oversubscription, moderate
    waits that are a fixed per-batch cost, GPU jitter with little measured waiting.
    """
    rng = np.random.default_rng(seed)
    cases: list[Scenario] = []

    def noisy(value: float, sd: float) -> float:
        return float(value + rng.normal(0.0, sd))

    def jittery_util(wait: float) -> tuple[float, float, float]:
        busy = (1.0 - wait) * rng.uniform(0.75, 1.0) * 100
        idle = max(wait, 0.15) * rng.uniform(0.8, 1.2)
        std = rng.uniform(28, 45) if wait > 0.12 else rng.uniform(25, 35)
        return noisy(busy, 4), noisy(std, 2), noisy(idle, 0.02)

    def steady_util(mean: float) -> tuple[float, float, float]:
        return noisy(mean, 3), abs(noisy(rng.uniform(3, 10), 2)), 0.0

    def add(
        label: str,
        group: str,
        text: str,
        config: LoaderConfig,
        env: Environment | None = None,
        **kwargs: Any,
    ) -> None:
        cases.append((label, group, text, _window(**kwargs), config, env))

    for i in range(per_kind):
        wait = rng.uniform(0.08, 0.8)
        w = int(rng.choice([0, 1, 2, 4]))
        gpu = i % 4 != 3
        add(
            "data_starved",
            "plain",
            f"I/O-bound, waits {wait:.0%}, {w} workers" + ("" if gpu else ", no GPU metrics"),
            LoaderConfig(num_workers=w, batch_size=32),
            wait_share=noisy(wait, 0.01),
            workers=w,
            util=jittery_util(wait) if gpu else None,
            cpu_pct=noisy(rng.uniform(15, 75), 3),
            loader_cpu_share=rng.uniform(0.02, 0.2),
            loader_runqueue_share=0.0,
            gpu_mem_used_share=rng.uniform(0.2, 0.6),
        )
        wait = rng.uniform(0.2, 0.7)
        w = int(rng.choice([1, 2]))
        add(
            "cpu_bound",
            "plain",
            f"decode-heavy, waits {wait:.0%}, {w} workers, CPUs saturated",
            LoaderConfig(num_workers=w, batch_size=32),
            wait_share=noisy(wait, 0.01),
            workers=w,
            util=jittery_util(wait),
            cpu_pct=min(100.0, noisy(rng.uniform(95, 100), 1.5)),
            loader_cpu_share=noisy(0.92, 0.04),
            loader_runqueue_share=noisy(0.05, 0.02),
            gpu_mem_used_share=rng.uniform(0.2, 0.6),
        )
        mean = rng.uniform(12, 42)
        add(
            "batch_headroom",
            "plain",
            f"GPU steady at {mean:.0f}%, memory mostly free",
            LoaderConfig(num_workers=2, batch_size=16),
            wait_share=abs(noisy(0.01, 0.008)),
            workers=2,
            util=steady_util(mean),
            cpu_pct=noisy(rng.uniform(10, 60), 3),
            gpu_mem_used_share=rng.uniform(0.1, 0.45),
        )
        mean = rng.uniform(70, 99)
        add(
            "balanced",
            "plain",
            f"GPU busy {mean:.0f}%, loop hardly waits",
            LoaderConfig(num_workers=4, batch_size=64),
            wait_share=abs(noisy(0.01, 0.008)),
            workers=4,
            util=steady_util(mean),
            cpu_pct=noisy(rng.uniform(10, 80), 3),
            gpu_mem_used_share=rng.uniform(0.2, 0.9),
        )
        wait = rng.uniform(0.0, 0.5)
        which = ("host RAM", "/dev/shm", "GPU memory")[i % 3]
        kwargs: dict[str, Any] = {
            "wait_share": noisy(wait, 0.01),
            "workers": 8,
            "util": jittery_util(wait),
            "cpu_pct": noisy(rng.uniform(20, 80), 3),
            "gpu_mem_used_share": rng.uniform(0.2, 0.6),
        }
        if which == "host RAM":
            kwargs["ram_available_share"] = rng.uniform(0.01, 0.08)
        elif which == "/dev/shm":
            kwargs["shm_free_share"] = rng.uniform(0.01, 0.08)
        else:
            kwargs["gpu_mem_used_share"] = rng.uniform(0.96, 1.0)
        add(
            "memory_bound",
            "plain",
            f"{which} nearly exhausted",
            LoaderConfig(num_workers=8, batch_size=32),
            **kwargs,
        )

    for _ in range(hard_per_kind):
        # Other processes keep the cores busy, but loading itself waits on I/O: more workers help.
        wait = rng.uniform(0.2, 0.8)
        w = int(rng.choice([0, 2, 4]))
        add(
            "data_starved",
            "hard",
            f"I/O-bound on a busy host, waits {wait:.0%}, {w} workers",
            LoaderConfig(num_workers=w, batch_size=32),
            wait_share=noisy(wait, 0.01),
            workers=w,
            util=jittery_util(wait),
            cpu_pct=min(100.0, noisy(98, 2)),
            loader_cpu_share=rng.uniform(0.02, 0.15),
            loader_runqueue_share=rng.uniform(0.0, 0.1),
            gpu_mem_used_share=rng.uniform(0.2, 0.6),
        )
        # Oversubscribed: 4-8 workers on 2 cores, each on a core only 2/w of the time.
        w = int(rng.choice([4, 6, 8]))
        wait = rng.uniform(0.2, 0.6)
        add(
            "cpu_bound",
            "hard",
            f"decode-heavy, {w} workers on 2 cores (diluted CPU share)",
            LoaderConfig(num_workers=w, batch_size=32),
            wait_share=noisy(wait, 0.01),
            workers=w,
            util=jittery_util(wait),
            cpu_pct=min(100.0, noisy(99, 1)),
            loader_cpu_share=noisy(2 / w, 0.03),
            loader_runqueue_share=noisy(1 - 2 / w, 0.05),
            gpu_mem_used_share=rng.uniform(0.2, 0.6),
        )
        # A fixed hand-over cost per batch: moderate waits beside a steady, low GPU.
        mean = rng.uniform(15, 40)
        add(
            "batch_headroom",
            "hard",
            f"moderate waits, GPU steady at {mean:.0f}%",
            LoaderConfig(num_workers=2, batch_size=16),
            wait_share=rng.uniform(0.06, 0.14),
            workers=2,
            util=steady_util(mean),
            cpu_pct=noisy(rng.uniform(20, 50), 3),
            loader_cpu_share=rng.uniform(0.05, 0.2),
            loader_runqueue_share=0.0,
            gpu_mem_used_share=rng.uniform(0.1, 0.4),
        )
        # Busy host, loop hardly waits: nothing to change.
        mean = rng.uniform(75, 97)
        add(
            "balanced",
            "hard",
            f"GPU busy {mean:.0f}% on a busy host",
            LoaderConfig(num_workers=4, batch_size=64),
            wait_share=abs(noisy(0.015, 0.01)),
            workers=4,
            util=steady_util(mean),
            cpu_pct=min(100.0, noisy(98, 2)),
            loader_cpu_share=rng.uniform(0.3, 0.9),
            loader_runqueue_share=rng.uniform(0.0, 0.3),
            gpu_mem_used_share=rng.uniform(0.2, 0.9),
        )
        # /dev/shm too small for the batches in flight (plenty free in share, not in bytes).
        add(
            "memory_bound",
            "hard",
            "batches in flight exceed free /dev/shm",
            LoaderConfig(num_workers=8, batch_size=256),
            Environment(batch_bytes=64 * 2**20),
            wait_share=noisy(0.1, 0.02),
            workers=8,
            util=steady_util(70),
            cpu_pct=noisy(60, 5),
            shm_free_share=rng.uniform(0.11, 0.12),
            gpu_mem_used_share=rng.uniform(0.2, 0.6),
        )
    return cases


def diagnosis_accuracy(real: Sequence[tuple[str, str, str]] = ()) -> dict[str, Any]:
    """Share of labelled windows that ``loadertune.diagnosis`` gets right.

    Args:
        real: ``(workload, diagnosed, expected)`` from real short runs (the workloads' first
            windows), reported separately.
    """
    from loadertune.diagnosis import diagnose

    cases = diagnosis_scenarios()
    per_kind: dict[str, list[bool]] = {}
    per_group: dict[str, list[bool]] = {}
    wrong = []
    for label, group, description, metrics, config, env in cases:
        got = diagnose(metrics, config, env).kind
        per_kind.setdefault(label, []).append(got == label)
        per_group.setdefault(group, []).append(got == label)
        if got != label:
            wrong.append(f"{label}, {group} ({description}) → {got}")
    right = sum(sum(v) for v in per_kind.values())
    share = right / len(cases)
    table = ["| Kind | Right |", "|---|---|"]
    table += [f"| {k} | {sum(v)}/{len(v)} |" for k, v in sorted(per_kind.items())]
    if real:
        table += ["", "| Real run (first window) | Diagnosed | Expected |", "|---|---|---|"]
        table += [f"| {w} | {got} | {exp} |" for w, got, exp in real]
    if wrong:
        table += ["", "Misdiagnosed synthetic windows: " + "; ".join(wrong) + "."]
    real_right = sum(got == exp for _, got, exp in real)
    groups = ", ".join(f"{g} {sum(v)}/{len(v)}" for g, v in per_group.items())
    detail = f"{right}/{len(cases)} synthetic windows ({groups}; 5 kinds, noise added)"
    if real:
        detail += f"; real runs' first windows {real_right}/{len(real)}"
    return {
        "name": "diagnosis accuracy",
        "result": f"{share:.0%} of {len(cases)} labelled windows",
        "detail": detail,
        "data": {
            "synthetic_right": right,
            "synthetic_total": len(cases),
            "per_kind": {k: [sum(v), len(v)] for k, v in per_kind.items()},
            "per_group": {g: [sum(v), len(v)] for g, v in per_group.items()},
            "wrong": wrong,
            "real": [list(r) for r in real],
        },
        "table": table,
    }
