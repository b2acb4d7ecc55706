"""Micro-benchmarks: what loadertune costs (sampler, wrapper, rebuilds, reseeding) and how often
its diagnosis is right.

Each benchmark returns a dict with a one-line ``result``, a ``detail`` and its raw ``data``;
those with a target (sampler <= 1% of a core, wrapper <= 10 us per batch) also return a target
row. Differences are medians over interleaved repeats, so a burst of load from another process
hits both sides of a comparison alike; each median comes with a 95% confidence interval
(distribution-free, from the order statistics of the pairs), and a target's verdict is decided on
that interval: PASS when its upper bound is within the target, MISS when its lower bound is past
it, UNDECIDED when it straddles the target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import loadertune
from bench.workloads import CheapDataset
from loadertune.config import LoaderConfig
from loadertune.diagnosis import DIAGNOSIS_KINDS, Environment
from loadertune.metrics import WindowMetrics
from loadertune.sampler import Sampler
from loadertune.sim import SimulatedGpu

__all__ = [
    "NAMES",
    "RECORDED_WINDOWS",
    "decide",
    "diagnosis_accuracy",
    "diagnosis_scenarios",
    "load_recorded",
    "median_ci",
    "rebuild_latency",
    "recorded_accuracy",
    "run",
    "sampler_overhead",
    "seeding_cost",
    "wrapper_overhead",
]

#: The micro-benchmarks, in run order (names accepted by ``--only``).
NAMES = ("sampler", "wrapper", "rebuild", "seeding", "diagnosis")

SAMPLER_TARGET_PCT = 1.0
WRAPPER_TARGET_US = 10.0
#: Windows recorded from real short jobs by ``python -m bench.record`` (labelled by construction).
RECORDED_WINDOWS = Path(__file__).resolve().parent / "recorded" / "windows.jsonl"
UNDECIDED = "UNDECIDED (CI straddles target)"


# -- confidence intervals and verdicts ---------------------------------------------------------
def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median of ``values``.

    The interval between the k-th smallest and the k-th largest value covers the median with
    probability ``1 - 2 P(Binomial(n, 1/2) < k)``, whatever the distribution (the pairs of a
    micro-benchmark are heavy-tailed: a preempted chunk is far off). The largest ``k`` whose
    coverage is at least ``level`` is used; with too few values for that (n < 6 at 95%) the
    interval is the whole range and its coverage is lower than ``level``.

    Returns:
        ``(low, high, coverage)``.
    """
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci needs at least one value")
    if n == 1:
        return xs[0], xs[0], 0.0

    def coverage(k: int) -> float:
        below = sum(math.comb(n, i) for i in range(k)) / 2**n
        return 1.0 - 2.0 * below

    k = 1
    while k + 1 <= n // 2 and coverage(k + 1) >= level:
        k += 1
    return xs[k - 1], xs[n - k], coverage(k)


def decide(low: float, high: float, target: float) -> tuple[bool | None, str]:
    """The verdict on an upper-bound target from a confidence interval ``[low, high]``.

    Returns:
        ``(passed, verdict)``: ``(True, "PASS")`` when ``high <= target``, ``(False, "MISS")``
        when ``low > target``, else ``(None, UNDECIDED)``.
    """
    if high <= target:
        return True, "PASS"
    if low > target:
        return False, "MISS"
    return None, UNDECIDED


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
    # Enough pairs for the median's 95% interval to mean something (6 or more: see median_ci).
    pairs = 6 if quick else 8
    segment_s = 1.0 if quick else 2.0
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
    return sampler_item(diffs, direct, n)


def sampler_item(diffs: Sequence[float], direct: Sequence[float], batches: int = 0) -> dict[str, Any]:
    """The sampler benchmark's report from its pairs: medians, 95% intervals and the verdict.

    The target is judged on the larger of the process difference and the thread's own CPU: PASS
    when both intervals lie within it, MISS when either lies wholly past it, else UNDECIDED.
    """
    pct = statistics.median(diffs)
    lo, hi, cover = median_ci(diffs)
    thread = statistics.median(direct) if direct else None
    t_lo = t_hi = None
    if direct:
        t_lo, t_hi, _ = median_ci(direct)
    high = max(hi, t_hi if t_hi is not None else hi)
    low = max(lo, t_lo if t_lo is not None else lo)
    passed, verdict = decide(low, high, SAMPLER_TARGET_PCT)
    ci = f"95% CI {lo:+.2f} to {hi:+.2f}" + ("" if cover >= 0.95 else f" (coverage only {cover:.0%})")
    thread_text = (
        f"; sampler thread's own CPU {thread:.2f}% of a core (95% CI {t_lo:.2f} to {t_hi:.2f})"
        if thread is not None
        else ""
    )
    detail = (
        f"{batches} batches per segment, {len(diffs)} on/off pairs, median; process difference "
        f"{ci}; per pair: "
        + ", ".join(f"{d:+.2f}%" for d in diffs)
        + thread_text
    )
    return {
        "name": "sampler overhead (10 Hz, host + GPU metrics)",
        "result": f"{pct:+.2f}% of one core ({ci})",
        "detail": detail,
        "data": {
            "pct_of_core": pct,
            "ci95": [lo, hi],
            "ci_coverage": cover,
            "pairs": list(diffs),
            "thread_pct_of_core": thread,
            "thread_ci95": None if t_lo is None else [t_lo, t_hi],
            "thread_pairs": list(direct),
            "batches": batches,
        },
        "target": {
            "id": "sampler_1pct",
            "target": f"sampler costs <= {SAMPLER_TARGET_PCT:g}% of one core (the larger of the "
            "process difference and the thread's own CPU; decided on their 95% CIs)",
            "measured": f"{pct:+.2f}% (95% CI {lo:+.2f} to {hi:+.2f})"
            + (f"; thread {thread:.2f}% (95% CI {t_lo:.2f} to {t_hi:.2f})" if thread is not None else ""),
            "passed": passed,
            "verdict": verdict,
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
    lo, hi, cover = median_ci(cpu_diffs)
    return {
        "batch_size": batch_size,
        "diff_us": statistics.median(cpu_diffs),
        "iqr_us": [q1, q3],
        "ci95_us": [lo, hi],
        "ci_coverage": cover,
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
    return wrapper_item(main, small, pairs, chunk)


def wrapper_item(
    main: dict[str, Any], small: dict[str, Any], pairs: int, chunk: int = 250
) -> dict[str, Any]:
    """The wrapper benchmark's report: median per-batch difference, 95% CI, verdict on the CI."""
    diff = main["diff_us"]
    lo, hi = main["ci95_us"]
    passed, verdict = decide(lo, hi, WRAPPER_TARGET_US)

    def describe(r: dict[str, Any]) -> str:
        return (
            f"batch size {r['batch_size']}: {r['diff_us']:+.1f} µs (95% CI {r['ci95_us'][0]:+.1f} "
            f"to {r['ci95_us'][1]:+.1f}; IQR {r['iqr_us'][0]:+.1f} to {r['iqr_us'][1]:+.1f}; wall "
            f"{r['wall_diff_us']:+.1f}) over a bare {r['bare_us']:.0f} µs"
        )

    return {
        "name": "wrapper overhead per batch (recommend mode, num_workers=0)",
        "result": f"{diff:+.1f} µs/batch at batch size 32 (95% CI {lo:+.1f} to {hi:+.1f})",
        "detail": f"training-thread CPU per batch, median of {pairs} pairs of {chunk}-batch "
        "chunks with a distribution-free 95% CI; "
        f"{describe(main)}; {describe(small)}",
        "data": {"bs32": main, "bs8": small},
        "target": {
            "id": "wrapper_10us",
            "target": f"wrapper adds <= {WRAPPER_TARGET_US:g} µs per batch (batch size 32; decided "
            "on the 95% CI of the median)",
            "measured": f"{diff:+.1f} µs (95% CI {lo:+.1f} to {hi:+.1f}; wall "
            f"{main['wall_diff_us']:+.1f} µs; at batch size 8 {small['diff_us']:+.1f} µs)",
            "passed": passed,
            "verdict": verdict,
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
    # Starting a pool of k workers, per worker: what one worker start costs the training thread.
    per_worker = [
        v["start_ms"] / int(key.split("→")[1])
        for rows in data.values()
        for key, v in rows.items()
        if int(key.split("→")[1]) > 0
    ]
    start_text = (
        f"; starting workers {statistics.median(per_worker):.0f} ms each (median; range "
        f"{min(per_worker):.0f}-{max(per_worker):.0f} over {len(per_worker)} rebuilds)"
        if per_worker
        else ""
    )
    return {
        "name": "rebuild latency (reconfigure mid-epoch)",
        "result": f"worst {worst['cheap']:.0f} ms on cheap samples, {worst['slow']:.0f} ms on "
        f"128 ms batches (including the first batch after it){start_text}",
        "detail": "; ".join(
            f"{k}: {v['reconfigure_ms']:.0f}+{v['next_batch_ms']:.0f} ms"
            for k, v in data["cheap"].items()
        ),
        "data": {**data, "start_ms_per_worker": per_worker},
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

    def spread(x: list[float]) -> str:
        return f"range {min(x):.1f}-{max(x):.1f}"

    return {
        "name": "per-sample reseeding (SeededDataset)",
        "result": f"{w:.1f} µs/sample in a worker (median of {repeats}; {spread(worker)})",
        "detail": f"in the training process (num_workers=0, RNG states saved and restored): "
        f"{ms:.1f} µs/sample one by one ({spread(main_single)}), {mb:.1f} µs/sample through "
        f"__getitems__ (batches of 32; {spread(main_batch)}); medians of {repeats} repeats of "
        f"{n} samples",
        "data": {
            "worker_us": w,
            "main_single_us": ms,
            "main_batch_us": mb,
            "worker_runs_us": worker,
            "main_single_runs_us": main_single,
            "main_batch_runs_us": main_batch,
        },
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


def load_recorded(path: Path | str = RECORDED_WINDOWS) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The header and the window lines of a file written by ``python -m bench.record``.

    Returns:
        ``(header, windows)``; ``(None, [])`` when the file does not exist.
    """
    path = Path(path)
    if not path.exists():
        return None, []
    header, windows = None, []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        if "header" in obj:
            header = obj["header"]
        else:
            windows.append(obj)
    return header, windows


def _recorded_case(w: dict[str, Any]) -> tuple[WindowMetrics, LoaderConfig, Environment | None]:
    metrics = WindowMetrics(**{k: v for k, v in w["metrics"].items() if k in _METRIC_FIELDS})
    config = LoaderConfig(**w["config"])
    env_fields = {f.name for f in dataclasses.fields(Environment)}
    env = w.get("environment")
    environment = Environment(**{k: v for k, v in env.items() if k in env_fields}) if env else None
    return metrics, config, environment


def _others_cores(metrics: WindowMetrics, config: LoaderConfig) -> float | None:
    """Cores other processes held during a window: the busy cores less this job's."""
    from loadertune.diagnosis import job_cpu_cores

    job = job_cpu_cores(metrics, config)
    if job is None or metrics.cpu_pct is None or not metrics.usable_cpus:
        return None
    return max(0.0, metrics.cpu_pct / 100.0 * metrics.usable_cpus - job)


def recorded_accuracy(windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Replays ``diagnose`` on recorded windows, as the session calls it, against their labels.

    Also counts what it would say were the batch bytes the session measured passed in the
    ``Environment`` (the session does not pass them, so the /dev/shm "batches in flight exceed
    what is free" clause never fires in a real run).

    Returns:
        ``right``, ``total``, ``per_kind`` ({kind: [right, total]}), ``confusion`` ({label:
        {diagnosed: count}}, misses only), ``per_job`` ({job: {"label", "diagnosed": {kind:
        count}}}), and the same counts with the batch bytes passed (``with_batch_bytes``).
    """
    from loadertune.diagnosis import diagnose

    per_kind: dict[str, list[int]] = {k: [0, 0] for k in DIAGNOSIS_KINDS}
    confusion: dict[str, dict[str, int]] = {}
    per_job: dict[str, dict[str, Any]] = {}
    right_bb = 0
    per_kind_bb: dict[str, list[int]] = {k: [0, 0] for k in DIAGNOSIS_KINDS}
    for w in windows:
        metrics, config, env = _recorded_case(w)
        label = w["label"]
        got = diagnose(metrics, config, env).kind
        ok = got == label
        per_kind.setdefault(label, [0, 0])
        per_kind[label][0] += ok
        per_kind[label][1] += 1
        if not ok:
            confusion.setdefault(label, {})
            confusion[label][got] = confusion[label].get(got, 0) + 1
        job = per_job.setdefault(w["job"], {"label": label, "diagnosed": {}, "others_cores": []})
        job["diagnosed"][got] = job["diagnosed"].get(got, 0) + 1
        others = _others_cores(metrics, config)
        if others is not None:
            job["others_cores"].append(round(others, 2))
        if w.get("batch_bytes"):
            env = dataclasses.replace(env or Environment(), batch_bytes=int(w["batch_bytes"]))
        got_bb = diagnose(metrics, config, env).kind
        right_bb += got_bb == label
        per_kind_bb.setdefault(label, [0, 0])
        per_kind_bb[label][0] += got_bb == label
        per_kind_bb[label][1] += 1
    return {
        "right": sum(r for r, _ in per_kind.values()),
        "total": len(windows),
        "per_kind": per_kind,
        "confusion": confusion,
        "per_job": per_job,
        "with_batch_bytes": {"right": right_bb, "per_kind": per_kind_bb},
    }


def diagnosis_accuracy(
    real: Sequence[tuple[str, str, str]] = (),
    recorded: Path | str | None = RECORDED_WINDOWS,
) -> dict[str, Any]:
    """How often ``loadertune.diagnosis`` is right: on recorded real windows, and self-consistency.

    Args:
        real: ``(workload, diagnosed, expected)`` from the bench workloads' first windows,
            reported separately (the thresholds were checked against these: not independent).
        recorded: The file ``python -m bench.record`` wrote (windows of short real jobs labelled
            by construction, not used to choose the thresholds), or None to skip it.

    The synthetic windows are a **self-consistency check**, not an accuracy: they are generated
    the way ``diagnose`` reconstructs windows, each kind on the right side of the default
    thresholds, so they show that the code does what its thresholds say.
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
    header, windows = load_recorded(recorded) if recorded is not None else (None, [])
    rec = recorded_accuracy(windows) if windows else None

    def frac(r: int, n: int) -> str:
        return f"{r}/{n}" if n else "0/0 (none recorded)"

    table = []
    if rec is not None:
        when = f" ({header.get('date')}, commit {str(header.get('git_commit'))[:10]})" if header else ""
        table += [
            f"Recorded windows: {rec['total']} windows of short real jobs from bench/recorded/"
            f"windows.jsonl{when}, labelled by construction (`python -m bench.record`); "
            "**MISS** marks a kind right on fewer than 80% of its windows.",
            "",
            "| Kind | Recorded windows right | Misdiagnosed as | Self-consistency check (synthetic) |",
            "|---|---|---|---|",
        ]
        for kind in sorted(set(rec["per_kind"]) | set(per_kind)):
            r, n = rec["per_kind"].get(kind, [0, 0])
            conf = ", ".join(f"{k} {v}" for k, v in sorted(rec["confusion"].get(kind, {}).items()))
            mark = "" if n == 0 or r == n else (" **MISS**" if r / n < 0.8 else "")
            syn = per_kind.get(kind, [])
            table.append(f"| {kind} | {frac(r, n)}{mark} | {conf or '—'} | {sum(syn)}/{len(syn)} |")
        table += [
            "",
            "| Recorded job | Label | Diagnosed (windows) | Cores other processes held (median) |",
            "|---|---|---|---|",
        ]
        for job, v in rec["per_job"].items():
            got = ", ".join(f"{k} {c}" for k, c in sorted(v["diagnosed"].items()))
            others = v.get("others_cores") or []
            held = f"{statistics.median(others):.2f}" if others else "—"
            table.append(f"| {job} | {v['label']} | {got} | {held} |")
        bb = rec["with_batch_bytes"]
        if bb["right"] != rec["right"]:
            table += [
                "",
                f"With the batch bytes the session measured passed to diagnose (the session does "
                f"not pass them today, so its /dev/shm 'batches in flight' clause never fires): "
                f"{bb['right']}/{rec['total']} recorded windows right.",
            ]
        table.append("")
    else:
        table += ["No recorded windows (run `python -m bench.record`).", ""]
    table += ["| Kind | Self-consistency check (synthetic) |", "|---|---|"]
    table += [f"| {k} | {sum(v)}/{len(v)} |" for k, v in sorted(per_kind.items())]
    if real:
        table += [
            "",
            "| Bench workload (first window; not independent of the thresholds) | Diagnosed | Expected |",
            "|---|---|---|",
        ]
        table += [f"| {w} | {got} | {exp} |" for w, got, exp in real]
    if wrong:
        table += ["", "Misdiagnosed synthetic windows: " + "; ".join(wrong) + "."]
    real_right = sum(got == exp for _, got, exp in real)
    groups = ", ".join(f"{g} {sum(v)}/{len(v)}" for g, v in per_group.items())
    synthetic = f"self-consistency check {right}/{len(cases)} synthetic windows"
    if rec is not None:
        kinds = ", ".join(
            f"{k} {frac(*rec['per_kind'][k])}" for k in DIAGNOSIS_KINDS if k in rec["per_kind"]
        )
        result = f"{rec['right']}/{rec['total']} recorded real windows right ({kinds}); {synthetic}"
    else:
        result = f"no recorded windows; {synthetic}"
    detail = (
        f"{synthetic} ({groups}; generated as diagnose reconstructs windows, each kind on the right "
        "side of the default thresholds: shows the code does what its thresholds say, not how "
        "often it is right)"
    )
    if rec is not None:
        detail = (
            f"recorded windows of short real jobs labelled by construction: {rec['right']}/"
            f"{rec['total']}; " + detail
        )
    if real:
        detail += f"; bench workloads' first windows {real_right}/{len(real)}"
    return {
        "name": "diagnosis accuracy",
        "result": result,
        "detail": detail,
        "data": {
            "recorded": rec,
            "recorded_header_date": header.get("date") if header else None,
            "synthetic_right": right,
            "synthetic_total": len(cases),
            "per_kind": {k: [sum(v), len(v)] for k, v in per_kind.items()},
            "per_group": {g: [sum(v), len(v)] for g, v in per_group.items()},
            "wrong": wrong,
            "real": [list(r) for r in real],
        },
        "table": table,
    }
