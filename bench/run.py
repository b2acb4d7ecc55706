"""The benchmark entry point: ``python -m bench`` or ``python bench/run.py``.

For each workload it runs, in one process and for the same duration each: ``num_workers=0`` (the
DataLoader default), torch's suggested maximum (the usable CPUs), the common ``max(1, cpus - 1)``,
a sweep of static configurations (the best of which is the oracle), and loadertune in apply mode
starting from ``num_workers=0``. The training loop is the same for all of them; it records
``(time, samples, wait)`` per batch, and every figure is computed from those traces afterwards.
Results go to ``RESULTS.md`` (for people) and ``results.json`` (everything, traces included).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import shlex
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script (python bench/run.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader

import loadertune
from bench import micro as _micro
from bench import workloads as _workloads
from bench.workloads import Workload

__all__ = [
    "Trace",
    "drive",
    "main",
    "run_static",
    "run_tuned",
    "run_workload",
    "steady_rate",
    "time_to_reach",
]

HERE = Path(__file__).resolve().parent
_WORKER_NAME = "pt_data_worker"
#: Trailing window of the rate trace used for "time to reach X".
REACH_WINDOW_S = 2.0
#: A configuration held this long counts as settled (for the over-subscription check).
SETTLE_S = 5.0


def usable_cpus() -> int:
    """CPUs this process may run on: what torch's worker warning compares against."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -- the training loop -------------------------------------------------------------------------
@dataclass
class Trace:
    """What the training loop saw, one entry per batch.

    Attributes:
        done_s: When the batch's step finished, seconds from the start of the run.
        samples: Samples in the batch.
        wait_s: Time blocked in ``next(loader)`` for the batch.
        duration_s: Length of the run.
        phase_at_s: When the per-sample cost changed, or None.
        wall_start_s: ``time.time()`` at the start (to place the tuner's events on the trace).
    """

    done_s: np.ndarray
    samples: np.ndarray
    wait_s: np.ndarray
    duration_s: float
    phase_at_s: float | None = None
    wall_start_s: float = 0.0

    @property
    def total_samples(self) -> int:
        """Samples whose step finished within the run."""
        return int(self.samples[self.done_s <= self.duration_s].sum())


def drive(
    loader: Any,
    gpu: loadertune.sim.SimulatedGpu,
    duration_s: float,
    *,
    on_elapsed: Callable[[float], None] | None = None,
) -> Trace:
    """Runs the training loop over ``loader`` for ``duration_s`` seconds.

    The loop takes a batch, runs ``gpu.step`` on its size (which the tuner may change) and
    records the time; the clock starts before ``iter()``, so worker start-up counts. Workers
    are shut down before returning (the caller closes a ``TunedLoader`` itself).

    Args:
        loader: A DataLoader or a TunedLoader.
        gpu: The simulated GPU the step runs on.
        duration_s: How long to run.
        on_elapsed: Called before each batch with the seconds elapsed (phase changes).

    Returns:
        The per-batch trace.
    """
    done: list[float] = []
    counts: list[int] = []
    waits: list[float] = []
    wall0, t0 = time.time(), time.perf_counter()
    deadline = t0 + duration_s
    it = _iterate(loader)
    try:
        while True:
            requested = time.perf_counter()
            if requested >= deadline:
                break
            if on_elapsed is not None:
                on_elapsed(requested - t0)
            try:
                batch = next(it)
            except StopIteration:
                it = _iterate(loader)
                continue
            got = time.perf_counter()
            n = int(batch.shape[0])
            gpu.step(n)
            done.append(time.perf_counter() - t0)
            counts.append(n)
            waits.append(got - requested)
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del it
    return Trace(
        done_s=np.asarray(done),
        samples=np.asarray(counts, dtype=np.int64),
        wait_s=np.asarray(waits),
        duration_s=duration_s,
        wall_start_s=wall0,
    )


def _iterate(loader: Any) -> Iterator[Any]:
    with warnings.catch_warnings():
        # torch warns past its suggested worker count; the sweep goes past it on purpose.
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        return iter(loader)


# -- figures from a trace ----------------------------------------------------------------------
def samples_between(trace: Trace, start_s: float, end_s: float) -> int:
    """Samples whose step finished in ``(start_s, end_s]``."""
    lo = np.searchsorted(trace.done_s, start_s, side="right")
    hi = np.searchsorted(trace.done_s, end_s, side="right")
    return int(trace.samples[lo:hi].sum())


def steady_rate(trace: Trace, start_share: float = 0.5) -> float:
    """Samples/s over the last ``1 - start_share`` of the run (the steady state)."""
    start = trace.duration_s * start_share
    span = trace.duration_s - start
    return samples_between(trace, start, trace.duration_s) / span if span > 0 else 0.0


def rate_between(trace: Trace, start_s: float, end_s: float) -> float:
    """Samples/s over ``(start_s, end_s]``."""
    return samples_between(trace, start_s, end_s) / (end_s - start_s) if end_s > start_s else 0.0


def per_second(trace: Trace) -> list[int]:
    """Samples finished in each whole second ``(k, k + 1]`` of the run."""
    return [samples_between(trace, k, k + 1.0) for k in range(int(trace.duration_s))]


def rate_cv(trace: Trace, start_share: float = 0.5) -> float | None:
    """Coefficient of variation of the per-second rate over the steady part (the noise)."""
    seconds = np.asarray(per_second(trace), dtype=float)
    steady = seconds[int(len(seconds) * start_share) :]
    if len(steady) < 3 or steady.mean() <= 0:
        return None
    return float(steady.std() / steady.mean())


def time_to_reach(
    trace: Trace,
    rate: float,
    *,
    start_s: float = 0.0,
    window_s: float = REACH_WINDOW_S,
    step_s: float = 0.25,
) -> float | None:
    """Seconds after ``start_s`` until the trailing ``window_s`` rate first reaches ``rate``.

    The window lies wholly after ``start_s`` (so a phase change's recovery is not credited with
    samples from before it); the earliest possible answer is therefore ``window_s``.

    Returns:
        The time, or None when the rate was never reached before the run ended.
    """
    if rate <= 0:
        return 0.0
    t = start_s + window_s
    while t <= trace.duration_s + 1e-9:
        if samples_between(trace, t - window_s, t) / window_s >= rate:
            return round(t - start_s, 2)
        t += step_s
    return None


# -- runs ----------------------------------------------------------------------------------------
class _MemoryMonitor:
    """Samples the summed PSS of this process's DataLoader workers once a second (peak kept)."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    def __enter__(self) -> _MemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.interval_s):
            total = 0
            for child in me.children(recursive=True):
                try:
                    if child.name() == _WORKER_NAME:
                        total += child.memory_full_info().pss
                except psutil.Error:
                    continue
            self.peak_bytes = max(self.peak_bytes, total)


def _reap_workers(timeout_s: float = 3.0) -> int:
    """Waits for this process's DataLoader workers to exit; terminates stragglers by pid."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [c for c in psutil.Process().children(recursive=True) if _is_worker(c)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for child in left:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    return len(left)


def _is_worker(proc: psutil.Process) -> bool:
    try:
        return proc.name() == _WORKER_NAME and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _base_loader(workload: Workload, dataset: Any, num_workers: int, batch_size: int) -> DataLoader:
    # The same seeded order for every configuration, so each one sees the same samples.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(0),
        )


def _phase_hook(workload: Workload, dataset: Any, duration_s: float) -> tuple[Any, float | None]:
    if workload.phase_at_share is None:
        return None, None
    at = workload.phase_at_share * duration_s
    state = {"done": False}

    def on_elapsed(elapsed: float) -> None:
        if not state["done"] and elapsed >= at:
            state["done"] = True
            dataset.set_cost_factor(workload.phase_factor)

    return on_elapsed, at


def _run(
    workload: Workload, dataset: Any, duration_s: float, loader: Any
) -> tuple[Trace, int | None]:
    reset = getattr(dataset, "reset", None)
    if reset is not None:
        reset()
    gpu = workload.make_gpu()
    hook, at = _phase_hook(workload, dataset, duration_s)
    monitor = _MemoryMonitor() if workload.memory_budget_bytes is not None else None
    with monitor or contextlib.nullcontext():
        trace = drive(loader, gpu, duration_s, on_elapsed=hook)
    trace.phase_at_s = at
    return trace, (monitor.peak_bytes if monitor is not None else None)


def run_static(
    workload: Workload, dataset: Any, num_workers: int, batch_size: int, duration_s: float
) -> dict[str, Any]:
    """Runs one static configuration; returns its figures (and trace under ``"_trace"``)."""
    loader = _base_loader(workload, dataset, num_workers, batch_size)
    trace, peak = _run(workload, dataset, duration_s, loader)
    stragglers = _reap_workers()
    out = _figures(trace)
    out.update(
        kind="static", num_workers=num_workers, batch_size=batch_size, peak_worker_pss_bytes=peak
    )
    if stragglers:
        out["stragglers_terminated"] = stragglers
    return out


def run_tuned(workload: Workload, dataset: Any, duration_s: float) -> dict[str, Any]:
    """Runs loadertune in apply mode from ``num_workers=0``; returns figures and its decisions."""
    loader = _base_loader(workload, dataset, 0, workload.batch_size)
    gpu_for_tuner = workload.make_gpu()
    options = workload.tune_options()
    with loadertune.tune(loader, mode="apply", gpu=gpu_for_tuner, **options) as tuned:
        reset = getattr(dataset, "reset", None)
        if reset is not None:
            reset()
        hook, at = _phase_hook(workload, dataset, duration_s)
        monitor = _MemoryMonitor() if workload.memory_budget_bytes is not None else None
        with monitor or contextlib.nullcontext():
            trace = drive(tuned, gpu_for_tuner, duration_s, on_elapsed=hook)
        trace.phase_at_s = at
        final = tuned.config
        rebuilds = tuned.rebuilds
    events = tuned.events
    stragglers = _reap_workers()
    out = _figures(trace)
    out.update(
        kind="tuned",
        num_workers=final.num_workers,
        batch_size=final.batch_size,
        peak_worker_pss_bytes=monitor.peak_bytes if monitor is not None else None,
        rebuilds=rebuilds,
        tune_options=options,
    )
    out.update(_story(events, trace.wall_start_s, trace, workload.batch_size))
    if stragglers:
        out["stragglers_terminated"] = stragglers
    return out


def _figures(trace: Trace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "steady_sps": steady_rate(trace),
        "whole_samples": trace.total_samples,
        "rate_cv": rate_cv(trace),
        "per_second": per_second(trace),
        "batches": len(trace.done_s),
        "mean_wait_ms": float(trace.wait_s.mean() * 1e3) if len(trace.wait_s) else None,
        "_trace": trace,
    }
    at = trace.phase_at_s
    if at is not None:
        post_start = at + (trace.duration_s - at) / 2
        out["pre_phase_sps"] = rate_between(trace, at / 2, at)
        out["post_phase_sps"] = rate_between(trace, post_start, trace.duration_s)
    return out


def _story(events: Sequence[Any], wall0: float, trace: Trace, batch_size: int) -> dict[str, Any]:
    """The tuner's decisions, windows and configuration timeline, in run-relative seconds."""
    windows = []
    decisions = []
    timeline: list[tuple[float, int, int | None]] = [(0.0, 0, batch_size)]
    stall = 0.0
    kept: set[tuple[int, int | None]] = set()
    for ev in events:
        t = round(ev.time - wall0, 2)
        d = ev.data
        if ev.kind == "window":
            m = d.get("metrics", {})
            windows.append(
                {
                    "t": t,
                    "num_workers": d["config"]["num_workers"],
                    "batch_size": d["config"]["batch_size"],
                    "samples_per_s": round(m.get("samples_per_s", 0.0), 1),
                    "wait_share": round(m.get("wait_share", 0.0), 3),
                    "cpu_pct": None if m.get("cpu_pct") is None else round(m["cpu_pct"], 1),
                    "gpu_util_mean_pct": None
                    if m.get("gpu_util_mean_pct") is None
                    else round(m["gpu_util_mean_pct"], 1),
                    "diagnosis": d["diagnosis"]["kind"],
                    # Everything the controller saw, for reading its decisions afterwards.
                    "metrics": m,
                    "evidence": d["diagnosis"].get("evidence", {}),
                }
            )
        elif ev.kind in ("change", "revert", "fault"):
            after = d["after"]
            timeline.append((t, after["num_workers"], after["batch_size"]))
            decisions.append(
                {
                    "t": t,
                    "step": ev.step,
                    "action": ev.kind,
                    "num_workers": after["num_workers"],
                    "batch_size": after["batch_size"],
                    "reason": d.get("reason") or d.get("error"),
                }
            )
            # The batch whose next() ran the rebuild, and the first batch from the new workers.
            i = ev.step - 1
            stall += float(trace.wait_s[i : i + 2].sum()) if 0 <= i < len(trace.wait_s) else 0.0
        elif ev.kind in ("keep", "retune"):
            cfg = d.get("config", {})
            if ev.kind == "keep":
                kept.add((cfg.get("num_workers"), cfg.get("batch_size")))
            decisions.append(
                {
                    "t": t,
                    "step": ev.step,
                    "action": ev.kind,
                    "num_workers": cfg.get("num_workers"),
                    "batch_size": cfg.get("batch_size"),
                    "reason": d.get("reason"),
                }
            )
    segments = []
    for i, (start, w, bs) in enumerate(timeline):
        end = timeline[i + 1][0] if i + 1 < len(timeline) else trace.duration_s
        segments.append(
            {
                "start_s": start,
                "end_s": min(end, trace.duration_s),
                "num_workers": w,
                "batch_size": bs,
            }
        )
    return {
        "windows": windows,
        "decisions": decisions,
        "segments": segments,
        "kept_configs": sorted([list(k) for k in kept], key=str),
        "first_diagnosis": windows[0]["diagnosis"] if windows else None,
        "max_workers_used": max(s["num_workers"] for s in segments),
        "rebuild_stall_s": round(stall, 3),
    }


# -- one workload --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Point:
    num_workers: int
    batch_size: int
    roles: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"w={self.num_workers} bs={self.batch_size}"


def static_points(
    workload: Workload, quick: bool, sweep: Sequence[int] | None = None
) -> list[_Point]:
    """The static configurations of a workload: the baselines, then the sweep, deduplicated."""
    cpus = usable_cpus()
    bs = workload.batch_size
    roles: dict[tuple[int, int], list[str]] = {}
    order: list[tuple[int, int]] = []

    def add(w: int, b: int, role: str) -> None:
        key = (w, b)
        if key not in roles:
            roles[key] = []
            order.append(key)
        if role not in roles[key]:
            roles[key].append(role)

    add(0, bs, "default (0)")
    add(cpus, bs, f"torch max ({cpus})")
    add(max(1, cpus - 1), bs, "cpus-1")
    points = (
        [(w, None) for w in sweep]
        if sweep is not None
        else (workload.sweep_quick if quick else workload.sweep_full)
    )
    for w, b in points:
        add(w, b or bs, "sweep")
    order.sort()
    return [_Point(w, b, tuple(roles[(w, b)])) for w, b in order]


def run_workload(
    workload: Workload,
    *,
    quick: bool,
    duration_s: float | None = None,
    sweep: Sequence[int] | None = None,
    repeat_oracle: bool | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs every static configuration of ``workload``, the tuner, and maybe the oracle again.

    Args:
        workload: The workload.
        quick: Quick mode (shorter runs, fewer sweep points, no repeat by default).
        duration_s: Seconds per configuration (default: the workload's for the mode).
        sweep: Worker counts to sweep instead of the workload's own.
        repeat_oracle: Run the best static configuration a second time to record the noise
            (default: in full mode, for workloads that ask for it).
        echo: Where progress lines go.

    Returns:
        A JSON-ready dict: every run's figures, the oracle, the tuner's figures and the targets.
    """
    duration = duration_s or (workload.duration_quick_s if quick else workload.duration_full_s)
    repeat = (
        repeat_oracle if repeat_oracle is not None else (not quick and workload.repeat_oracle_full)
    )
    t_setup = time.perf_counter()
    dataset = workload.make_dataset()
    setup_s = time.perf_counter() - t_setup
    echo(
        f"[{workload.name}] {workload.title}: {duration:g} s per configuration "
        f"(set-up {setup_s:.1f} s)"
    )
    runs: list[dict[str, Any]] = []
    for point in static_points(workload, quick, sweep):
        r = run_static(workload, dataset, point.num_workers, point.batch_size, duration)
        r.update(label=point.label, roles=list(point.roles))
        runs.append(r)
        echo(
            f"[{workload.name}]   {point.label:<14} {r['steady_sps']:8.1f} samples/s steady, "
            f"{r['whole_samples']} samples in {duration:g} s  ({', '.join(point.roles)})"
        )
    tuned = run_tuned(workload, dataset, duration)
    tuned.update(label="loadertune", roles=["tuner (apply, from w=0)"])
    runs.append(tuned)
    echo(
        f"[{workload.name}]   {'loadertune':<14} {tuned['steady_sps']:8.1f} samples/s steady, "
        f"{tuned['whole_samples']} samples; {tuned['rebuilds']} rebuild(s), ended at "
        f"w={tuned['num_workers']} bs={tuned['batch_size']}"
    )
    statics = [r for r in runs if r["kind"] == "static"]
    oracle = _pick_oracle(workload, statics)
    if repeat and oracle is not None:
        again = run_static(workload, dataset, oracle["num_workers"], oracle["batch_size"], duration)
        again.update(kind="repeat", label=oracle["label"], roles=["oracle repeat (noise)"])
        runs.append(again)
        echo(
            f"[{workload.name}]   {oracle['label']:<14} {again['steady_sps']:8.1f} samples/s "
            "steady (repeat)"
        )
    result = _summarise(workload, runs, oracle, duration, quick)
    for r in runs:
        r.pop("_trace", None)
    result["runs"] = runs
    result["setup_s"] = round(setup_s, 2)
    return result


def _pick_oracle(workload: Workload, statics: list[dict[str, Any]]) -> dict[str, Any] | None:
    candidates = statics
    budget = workload.memory_budget_bytes
    if budget is not None:
        inside = [r for r in statics if (r["peak_worker_pss_bytes"] or 0) <= budget]
        candidates = inside or statics
    if not candidates:
        return None
    return max(candidates, key=lambda r: r["steady_sps"])


def _summarise(
    workload: Workload,
    runs: list[dict[str, Any]],
    oracle: dict[str, Any] | None,
    duration: float,
    quick: bool,
) -> dict[str, Any]:
    cpus = usable_cpus()
    tuned = next(r for r in runs if r["kind"] == "tuned")
    repeat = next((r for r in runs if r["kind"] == "repeat"), None)
    out: dict[str, Any] = {
        "name": workload.name,
        "title": workload.title,
        "summary": workload.summary,
        "params": workload.params,
        "duration_s": duration,
        "usable_cpus": cpus,
        "expected_first_diagnosis": workload.expected_first_diagnosis,
        "memory_budget_bytes": workload.memory_budget_bytes,
    }
    if oracle is None:
        out["targets"] = []
        return out
    oracle_sps = oracle["steady_sps"]
    oracle_whole = oracle["whole_samples"]
    noise = None
    if repeat is not None:
        oracle_sps = (oracle["steady_sps"] + repeat["steady_sps"]) / 2
        oracle_whole = (oracle["whole_samples"] + repeat["whole_samples"]) / 2
        noise = (
            abs(oracle["steady_sps"] - repeat["steady_sps"]) / oracle_sps if oracle_sps else None
        )
    out["oracle"] = {
        "label": oracle["label"],
        "steady_sps": oracle_sps,
        "whole_samples": oracle_whole,
        "repeat_noise": noise,
        "rate_cv": oracle["rate_cv"],
    }
    for r in runs:
        trace: Trace = r["_trace"]
        r["steady_vs_oracle"] = r["steady_sps"] / oracle_sps if oracle_sps else None
        r["whole_vs_oracle"] = r["whole_samples"] / oracle_whole if oracle_whole else None
        r["reach_90_s"] = time_to_reach(trace, 0.9 * oracle_sps)
    if workload.phase_at_share is not None:
        achievable = max(r["post_phase_sps"] for r in runs if r["kind"] == "static")
        out["phase"] = {"at_s": tuned["_trace"].phase_at_s, "achievable_post_sps": achievable}
        for r in runs:
            trace = r["_trace"]
            r["recover_80_s"] = time_to_reach(trace, 0.8 * achievable, start_s=trace.phase_at_s)
    out["tuner"] = {
        "steady_sps": tuned["steady_sps"],
        "steady_vs_oracle": tuned["steady_vs_oracle"],
        "whole_vs_oracle": tuned["whole_vs_oracle"],
        "reach_90_s": tuned["reach_90_s"],
        "rebuilds": tuned["rebuilds"],
        "rebuild_stall_s": tuned["rebuild_stall_s"],
        "final": f"w={tuned['num_workers']} bs={tuned['batch_size']}",
        "max_workers_used": tuned["max_workers_used"],
        "first_diagnosis": tuned["first_diagnosis"],
        "peak_worker_pss_bytes": tuned["peak_worker_pss_bytes"],
        "over_budget": over_budget(workload, tuned),
    }
    out["targets"] = [
        _target(t, workload, tuned, out, cpus, duration, quick) for t in workload.targets
    ]
    return out


def over_budget(workload: Workload, tuned: dict[str, Any]) -> bool:
    """Whether the tuner's workers peaked over the workload's memory budget (False without one).

    The oracle of a budgeted workload is the best static configuration *within* the budget, so
    an over-budget tuner's ratio to it compares configurations the budget does not allow alike.
    """
    budget = workload.memory_budget_bytes
    return budget is not None and (tuned.get("peak_worker_pss_bytes") or 0) > budget


def _target(
    kind: str,
    workload: Workload,
    tuned: dict[str, Any],
    summary: dict[str, Any],
    cpus: int,
    duration: float,
    quick: bool,
) -> dict[str, Any]:
    def row(text: str, measured: str, passed: bool) -> dict[str, Any]:
        return {"id": kind, "target": text, "measured": measured, "passed": passed}

    if kind in ("steady_90", "steady_95"):
        need = 0.90 if kind == "steady_90" else 0.95
        v = tuned["steady_vs_oracle"]
        return row(f"tuner steady state >= {need:.0%} of the best static", f"{v:.0%}", v >= need)
    if kind == "whole_job_90":
        v = tuned["whole_vs_oracle"]
        return row(
            f"tuner delivers >= 90% of the best static's samples in the same {duration:g} s",
            f"{v:.0%}",
            v >= 0.90,
        )
    if kind == "reach_90_10s":
        v = tuned["reach_90_s"]
        measured = f"{v:.1f} s" if v is not None else f"not within {duration:g} s"
        return row(
            "tuner reaches 90% of the best static's rate within 10 s",
            measured,
            v is not None and v <= 10,
        )
    if kind == "no_oversubscription":
        last = tuned["segments"][-1]
        # Strict: the configuration in use when the run ends counts as settled, judged or not.
        settled = [
            s
            for s in tuned["segments"]
            if s["num_workers"] > cpus and (s["end_s"] - s["start_s"] >= SETTLE_S or s is last)
        ]
        worst = max((s["num_workers"] for s in settled), default=None)
        measured = (
            f"max {tuned['max_workers_used']} workers tried; ended at {tuned['num_workers']}"
            + (f"; held {worst} > {cpus} CPUs" if worst is not None else "")
        )
        return row(f"tuner never settles above the {cpus} usable CPUs", measured, not settled)
    if kind == "phase_recover_80_15s":
        v = tuned.get("recover_80_s")
        after = duration - summary["phase"]["at_s"]
        measured = f"{v:.1f} s" if v is not None else f"not within the {after:g} s after the change"
        return row(
            "tuner back to >= 80% of the achievable rate within 15 s of the change",
            measured,
            v is not None and v <= 15,
        )
    if kind == "within_budget":
        budget = workload.memory_budget_bytes or 0
        peak = tuned["peak_worker_pss_bytes"] or 0
        return row(
            f"tuner's workers stay within the {budget / 2**20:.0f} MiB RAM budget (bench-defined)",
            f"peak {peak / 2**20:.0f} MiB; ended at w={tuned.get('num_workers')}",
            peak <= budget,
        )
    raise ValueError(f"unknown target {kind!r}")


# -- the report ----------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What the results were measured on."""
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from loadertune.sources.host import usable_cpus as lt_usable

    return {
        "usable_cpus": usable_cpus(),
        "usable_cpus_with_cgroup_quota": lt_usable(),
        "os_cpu_count": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadertune": loadertune.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def verdict(t: dict[str, Any]) -> str:
    """A target row's verdict: its own (UNDECIDED when decided on a CI), else PASS or MISS."""
    if t.get("verdict"):
        return t["verdict"]
    return "PASS" if t["passed"] else "MISS"


def _verdict_cell(t: dict[str, Any]) -> str:
    v = verdict(t)
    return v if v == "PASS" else f"**{v}**"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.0%}"


def _secs(v: float | None, none: str = "never") -> str:
    return none if v is None else f"{v:.1f} s"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _mib(v: int | None) -> str:
    return "—" if v is None else f"{v / 2**20:.0f} MiB"


def render_markdown(results: dict[str, Any]) -> str:
    """RESULTS.md: the command, the date, the machine, the targets, then every figure."""
    meta = results["meta"]
    m = meta["machine"]
    lines = [
        "# loadertune benchmark results",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']} (took {meta['elapsed_s'] / 60:.1f} min)",
        f"- Mode: {meta['mode']}",
        f"- Machine: {m['usable_cpus']} usable CPUs (cgroup-aware: "
        f"{m['usable_cpus_with_cgroup_quota']}, os.cpu_count {m['os_cpu_count']}), "
        f"{m['cpu_model'] or 'unknown CPU'}, {m['ram_gib']} GiB RAM; "
        f"{m['platform']}",
        f"- Software: Python {m['python']}, torch {m['torch']}, loadertune {m['loadertune']}",
        f"- Load average at start: {' / '.join(map(str, m['load_average']))} "
        f"(at end: {' / '.join(map(str, meta['load_average_end']))})",
    ]
    if meta.get("note"):
        lines.append(f"- Note: {meta['note']}")
    lines += ["", "See bench/README.md for what each figure means.", ""]
    wls = results.get("workloads", [])
    micro = results.get("micro")
    targets = [(w["name"], t) for w in wls for t in w.get("targets", [])]
    targets += [("micro", t) for t in (micro or {}).get("targets", [])]
    if targets:
        lines += [
            "## Targets",
            "",
            "| Workload | Target | Measured | Result |",
            "|---|---|---|---|",
        ]
        for name, t in targets:
            lines.append(_row(name, t["target"], t["measured"], _verdict_cell(t)))
        lines.append("")
    if wls:
        lines += [
            "## Summary",
            "",
            "| Workload | Oracle (best static) | Oracle samples/s | Oracle noise | Tuner samples/s "
            "| Tuner vs oracle | Whole job vs oracle | 90% of oracle at | Rebuilds | Rebuild stall "
            "| Tuner ended at | First diagnosis (expected) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        flagged: list[dict[str, Any]] = []
        for w in wls:
            o, t = w.get("oracle"), w.get("tuner")
            if o is None or t is None:
                continue
            noise = f"repeat ±{o['repeat_noise']:.0%}" if o["repeat_noise"] is not None else "—"
            if o["rate_cv"] is not None:
                noise += f", CV {o['rate_cv']:.0%}/s"
            flag = " (over budget ‡)" if t.get("over_budget") else ""
            if flag:
                flagged.append(w)
            lines.append(
                _row(
                    w["name"],
                    o["label"],
                    f"{o['steady_sps']:.0f}",
                    noise,
                    f"{t['steady_sps']:.0f}",
                    _pct(t["steady_vs_oracle"]) + flag,
                    _pct(t["whole_vs_oracle"]) + flag,
                    _secs(t["reach_90_s"]),
                    str(t["rebuilds"]),
                    f"{t['rebuild_stall_s']:.2f} s",
                    f"{t['final']} (max w={t['max_workers_used']})",
                    f"{t['first_diagnosis']} ({w['expected_first_diagnosis']})",
                )
            )
        lines.append("")
        for w in flagged:
            t = w["tuner"]
            lines += [
                f"‡ {w['name']}: the tuner's workers peaked at {_mib(t['peak_worker_pss_bytes'])}, "
                f"over the {_mib(w['memory_budget_bytes'])} budget, while the oracle "
                f"({w['oracle']['label']}) is the best configuration within it: the ratio compares "
                "an over-budget tuner with an in-budget oracle and is not a speed-up.",
                "",
            ]
    for w in wls:
        lines += _workload_section(w)
    if micro:
        lines += _micro_section(micro)
    return "\n".join(lines) + "\n"


def _workload_section(w: dict[str, Any]) -> list[str]:
    params = ", ".join(f"{k}={v}" for k, v in w["params"].items())
    lines = [
        f"## {w['name']}: {w['title']}",
        "",
        w["summary"],
        "",
        f"Parameters: {params}; {w['duration_s']:g} s per configuration.",
        "",
    ]
    phase = "phase" in w
    budget = w.get("memory_budget_bytes") is not None
    head = (
        "| Config | Role | samples/s (last 50%) | vs oracle | samples in run | vs oracle "
        "| 90% of oracle at | rate CV"
    )
    sep = "|---|---|---|---|---|---|---|---"
    if phase:
        head += " | samples/s before change | after change | 80% of achievable after change"
        sep += "|---|---|---"
    if budget:
        head += " | peak worker PSS"
        sep += "|---"
    lines += [head + " |", sep + "|"]
    for r in w.get("runs", []):
        cells = [
            r["label"],
            ", ".join(r["roles"]),
            f"{r['steady_sps']:.0f}",
            _pct(r.get("steady_vs_oracle")),
            str(r["whole_samples"]),
            _pct(r.get("whole_vs_oracle")),
            _secs(r.get("reach_90_s")),
            _pct(r["rate_cv"]),
        ]
        if phase:
            cells += [
                f"{r['pre_phase_sps']:.0f}",
                f"{r['post_phase_sps']:.0f}",
                _secs(r.get("recover_80_s")),
            ]
        if budget:
            peak = r["peak_worker_pss_bytes"]
            over = peak is not None and peak > w["memory_budget_bytes"]
            cells.append(_mib(peak) + (" (over budget)" if over else ""))
        lines.append(_row(*cells))
    lines.append("")
    tuned = next((r for r in w.get("runs", []) if r["kind"] == "tuned"), None)
    if tuned is not None:
        lines.append("Tuner decisions (seconds from the start of its run):")
        lines.append("")
        if not tuned["decisions"]:
            lines.append("- none (it never changed the configuration)")
        for d in tuned["decisions"]:
            lines.append(
                f"- {d['t']:.1f} s, step {d['step']}: **{d['action']}** → w={d['num_workers']} "
                f"bs={d['batch_size']}: {d['reason']}"
            )
        diag = [f"{x['t']:.0f}s w={x['num_workers']}:{x['diagnosis']}" for x in tuned["windows"]]
        lines += ["", f"Windows' diagnoses: {', '.join(diag) or 'none'}", ""]
    return lines


def _micro_section(micro: dict[str, Any]) -> list[str]:
    lines = ["## Micro-benchmarks", "", "| Benchmark | Result | Detail |", "|---|---|---|"]
    for item in micro.get("items", []):
        lines.append(f"| {item['name']} | {item['result']} | {item.get('detail', '')} |")
    lines.append("")
    for item in micro.get("items", []):
        for extra in item.get("table", []):
            lines.append(extra)
        if item.get("table"):
            lines.append("")
    return lines


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else round(float(value), 4)
    if isinstance(value, np.integer):
        return int(value)
    return value


# -- command line --------------------------------------------------------------------------------
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks loadertune against static DataLoader configurations.",
    )
    p.add_argument("--quick", action="store_true", help="short runs, coarse sweeps (under 3 min)")
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated subset: workloads ("
        + ", ".join(_workloads.names())
        + "), 'micro' or micro-benchmarks ("
        + ", ".join(_micro.NAMES)
        + ")",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="seconds per configuration (override)"
    )
    p.add_argument("--sweep", default=None, help="worker counts to sweep instead, e.g. 0,2,8")
    p.add_argument("--out", default=str(HERE), help="directory for RESULTS.md and results.json")
    p.add_argument("--verbose", action="store_true", help="show loadertune's own log lines")
    return p.parse_args(argv)


def _select(only: str | None, quick: bool) -> tuple[list[Workload], list[str]]:
    if only is None:
        wanted = list(_workloads.QUICK_DEFAULT if quick else _workloads.names())
        return [_workloads.get(n) for n in wanted], list(_micro.NAMES)
    workloads: list[Workload] = []
    micros: list[str] = []
    for name in (n.strip() for n in only.split(",") if n.strip()):
        if name == "micro":
            micros += [m for m in _micro.NAMES if m not in micros]
        elif name in _micro.NAMES:
            micros.append(name)
        elif name == "all":
            workloads = [_workloads.get(n) for n in _workloads.names()]
        else:
            workloads.append(_workloads.get(name))
    return workloads, micros


def _estimate_s(
    workloads: list[Workload], quick: bool, duration: float | None, sweep: Any
) -> float:
    total = 0.0
    for w in workloads:
        d = duration or (w.duration_quick_s if quick else w.duration_full_s)
        runs = (
            len(static_points(w, quick, sweep))
            + 1
            + (0 if quick or not w.repeat_oracle_full else 1)
        )
        total += runs * (d + 0.7)
    return total


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the process exit code (0 even when a target is missed)."""
    args = _parse(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        workloads, micros = _select(args.only, args.quick)
        sweep = [int(x) for x in args.sweep.split(",")] if args.sweep else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if argv is None:
        prog = "python bench/run.py" if sys.argv[0].endswith("run.py") else "python -m bench"
        words = sys.argv[1:]
    else:
        prog, words = "python -m bench", list(argv)
    command = " ".join([prog, *(shlex.quote(a) for a in words)])
    meta: dict[str, Any] = {
        "command": command,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
    }
    overrides = [f"--{k} {v}" for k, v in (("duration", args.duration), ("sweep", args.sweep)) if v]
    if overrides:
        meta["note"] = (
            f"{' and '.join(overrides)} override the workloads' own settings: the oracle is the "
            "best of the configurations run here, not of the full sweep"
        )
    est = _estimate_s(workloads, args.quick, args.duration, sweep)
    print(
        f"bench: {len(workloads)} workload(s), {len(micros)} micro-benchmark(s), "
        f"about {est / 60:.1f} min of runs; {meta['machine']['usable_cpus']} usable CPUs, "
        f"load average {meta['machine']['load_average']}",
        flush=True,
    )
    results: dict[str, Any] = {"meta": meta, "workloads": []}
    for w in workloads:
        results["workloads"].append(
            run_workload(
                w,
                quick=args.quick,
                duration_s=args.duration,
                sweep=sweep,
                echo=lambda s: print(s, flush=True),
            )
        )
    if micros:
        real = [
            (w["name"], w["tuner"]["first_diagnosis"], w["expected_first_diagnosis"])
            for w in results["workloads"]
            if w.get("tuner") and w["tuner"]["first_diagnosis"] is not None
        ]
        results["micro"] = _micro.run(
            micros, quick=args.quick, real_diagnoses=real, echo=lambda s: print(s, flush=True)
        )
    meta["elapsed_s"] = time.perf_counter() - started
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    ready = _json_ready(results)
    (out_dir / "results.json").write_text(json.dumps(ready, indent=1) + "\n")
    (out_dir / "RESULTS.md").write_text(render_markdown(ready))
    rows = [t for w in ready["workloads"] for t in w.get("targets", [])]
    rows += (ready.get("micro") or {}).get("targets", [])
    missed = [t for t in rows if t["passed"] is False]
    undecided = [t for t in rows if t["passed"] is None]
    print(
        f"bench: done in {meta['elapsed_s'] / 60:.1f} min; {len(missed)} target(s) missed, "
        f"{len(undecided)} undecided; "
        f"wrote {out_dir / 'RESULTS.md'} and {out_dir / 'results.json'}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
