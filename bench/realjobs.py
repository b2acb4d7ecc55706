"""Workloads that look like real jobs, each against static configurations in the same run (issue 13).

Every workload is a *job*: a fixed amount of work (epochs over a dataset) whose wall time is
measured end to end, from ``iter()`` (worker start-up counts) to ``close()`` (shutdown counts).
Static configurations and the tuner run the same job in one process, interleaved round by round
(static A, static B, ..., tuner, then again), so a background load that comes and goes lands on
all of them; the spread between rounds is reported next to every figure.

    python -m bench.realjobs [--quick] [--only NAME[,NAME]] [--out DIR]

Names: ``jpeg`` (a CPU-trained conv net with JPEG decode in the dataset), ``contention`` (CPU-bound
load while another process burns a core), ``fastloop`` (ms steps, recommend mode), ``short``
(~1 s epochs: the summary's rates against the loop's), ``spawn`` (spawn-started workers without
persistent workers), ``neverworse`` (the starting configuration is already the best), ``anchors``
(tf.data AUTOTUNE peer rows when tensorflow is installed).

Writes ``bench/REALJOBS.md`` and ``bench/realjobs.json``. The exit code is 0 even on a MISS.

Default size: all workloads took 11.1 min on 2 CPUs (2026-12-01, anchors included:
tensorflow-cpu 2.21.0 installed with the ``[anchors]`` extra; without it they are skipped and
the rest takes ~10 min). A busy machine stretches the CPU-bound jobs (the JPEG job ran ~3x
slower at load average 6); ``--quick`` is one round of smaller jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import loadertune

__all__ = [
    "WORKLOADS",
    "JobResult",
    "LatencyCpuDataset",
    "SmallJpegDataset",
    "at_least",
    "main",
    "run_job",
    "spread",
    "verdict_jpeg",
    "verdict_ratio",
    "within",
]

HERE = Path(__file__).resolve().parent


# -- datasets (module level: spawn-started workers import them) ----------------------------------
class SmallJpegDataset(Dataset):
    """JPEG decode + random crop/flip + float normalisation (Pillow and numpy only)."""

    def __init__(self, length: int, images: int = 64, size: int = 320, crop: int = 256, out: int = 64, seed: int = 0) -> None:
        from PIL import Image

        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        self.jpegs: list[bytes] = []
        for _ in range(images):
            a, b, c = rng.uniform(0.2, 1.0, 3)
            base = np.stack([x * a, y * b, (x + y) * c / 2], axis=-1) * (255.0 / size)
            pixels = (base + rng.normal(0.0, 24.0, base.shape)).clip(0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG", quality=90)
            self.jpegs.append(buf.getvalue())
        self.length, self.size, self.crop, self.out = length, size, crop, out

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = Image.open(io.BytesIO(self.jpegs[index % len(self.jpegs)])).convert("RGB")
        x0 = random.randint(0, self.size - self.crop)
        y0 = random.randint(0, self.size - self.crop)
        image = image.crop((x0, y0, x0 + self.crop, y0 + self.crop))
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = image.resize((self.out, self.out), Image.Resampling.BILINEAR)
        arr = (np.asarray(image, dtype=np.float32) / 255.0 - 0.5) / 0.25
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()), index % 10


class LatencyCpuDataset(Dataset):
    """A sample costs ``wait_ms`` of waiting (a remote read) plus ``cpu_ms`` of CPU work."""

    def __init__(self, length: int, wait_ms: float = 0.0, cpu_ms: float = 0.0, shape: tuple[int, ...] = (3, 32, 32)) -> None:
        self.length, self.wait_s, self.cpu_s, self.shape = length, wait_ms / 1e3, cpu_ms / 1e3, shape

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.wait_s:
            time.sleep(self.wait_s)
        if self.cpu_s:
            end = time.thread_time() + self.cpu_s
            x = 1.0
            while time.thread_time() < end:
                for _ in range(200):
                    x = x * 1.000001 + 1e-9
        return torch.full(self.shape, float(index % 7))


def small_convnet() -> nn.Module:
    """A small conv net for 64x64 inputs, trained on the CPU with torch's threads."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _burn(stop: Any) -> None:  # another engineer's job: one core kept busy
    x = 0
    while not stop.is_set():
        for _ in range(10_000):
            x += 1


# -- one job ---------------------------------------------------------------------------------------
@dataclass
class JobResult:
    """One run of a job under one configuration (or the tuner).

    Attributes:
        label: The configuration ("w=2", "w=4 pw", "tuner").
        samples: Samples the loop consumed.
        wall_s: Wall time from ``iter()`` to the end of ``close()``/shutdown.
        epoch_s: Wall time per epoch (the first includes worker start-up).
        close_s: Time spent closing (the tuner's close, workers' shutdown).
        batch_done_s: When each batch's step finished (seconds from the start).
        batch_samples: Samples per batch.
        epoch_first_batch: Index (into the batch lists) of each epoch's first batch.
        final: The tuner's final configuration.
        summary: The tuner's summary dict.
        events: The tuner's events (kind, step, epoch, time and the data that matters).
        recommendations: Recommendation lines logged (recommend mode).
        iter0_s: When the first ``iter()`` was called (seconds from the start): ``tune()``'s own
            set-up lies before it, so the loop's rates are timed from here.
        epoch_samples: Samples the loop consumed in each epoch.
    """

    label: str
    samples: int = 0
    wall_s: float = 0.0
    epoch_s: list[float] = field(default_factory=list)
    close_s: float = 0.0
    batch_done_s: list[float] = field(default_factory=list)
    batch_samples: list[int] = field(default_factory=list)
    epoch_first_batch: list[int] = field(default_factory=list)
    final: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)
    iter0_s: float = 0.0
    epoch_samples: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """The whole job's samples per second."""
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def longest_gap_s(self) -> float:
        """The longest time between two batches' ends after the first batch: the loop's
        worst freeze (workers starting at an epoch's start, a rebuild's stall)."""
        done = self.batch_done_s
        return max((b - a for a, b in itertools.pairwise(done)), default=0.0)


class _LineCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_job(
    make_loader: Callable[[], DataLoader],
    step: Callable[[Any], None],
    *,
    epochs: int | None = None,
    duration_s: float | None = None,
    tune: dict[str, Any] | None = None,
    label: str = "",
) -> JobResult:
    """Runs a job: ``epochs`` epochs (or epochs until ``duration_s``) of ``step`` over the loader.

    With ``tune`` the loader is wrapped by ``loadertune.tune(loader, **tune)``; its close() is part
    of the job's wall time, as a script's exit would be.
    """
    if epochs is None and duration_s is None:
        raise ValueError("give epochs or duration_s")
    res = JobResult(label)
    loader = make_loader()
    counter = _LineCounter()
    lt_logger = logging.getLogger("loadertune")
    if tune is not None:
        lt_logger.addHandler(counter)
        lt_logger.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        src: Any = loadertune.tune(loader, **tune) if tune is not None else loader
        epoch = 0
        while True:
            if epochs is not None and epoch >= epochs:
                break
            if duration_s is not None and time.perf_counter() - t0 >= duration_s:
                break
            e0 = time.perf_counter()
            if epoch == 0:
                res.iter0_s = e0 - t0
            res.epoch_first_batch.append(len(res.batch_done_s))
            before = res.samples
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="This DataLoader will create")
                it = iter(src)
            for batch in it:
                step(batch)
                n = int(batch[0].shape[0]) if isinstance(batch, (list, tuple)) else int(batch.shape[0])
                res.samples += n
                res.batch_samples.append(n)
                res.batch_done_s.append(time.perf_counter() - t0)
                if duration_s is not None and epochs is None and time.perf_counter() - t0 >= duration_s:
                    break
            res.epoch_s.append(time.perf_counter() - e0)
            res.epoch_samples.append(res.samples - before)
            epoch += 1
            if tune is None:
                del it  # a non-persistent iterator's workers go with it
        c0 = time.perf_counter()
        if tune is not None:
            src.close()
            res.final = src.config.to_dict()
            done = [e for e in src.events if e.kind == "summary"]
            res.summary = dict(done[-1].data) if done else None
            res.events = [
                {"kind": e.kind, "step": e.step, "epoch": e.epoch, "t": e.time, **_brief(e.data)}
                for e in src.events
                if e.kind not in ("start",)
            ]
            res.recommendations = [line for line in counter.lines if " Recommend " in line]
        else:
            it = getattr(loader, "_iterator", None)
            if it is not None:
                it._shutdown_workers()
                loader._iterator = None
        res.close_s = time.perf_counter() - c0
    finally:
        lt_logger.removeHandler(counter)
    res.wall_s = time.perf_counter() - t0
    return res


def _brief(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("reason", "before_samples_per_s", "after_samples_per_s", "text", "first_samples_per_s", "last_samples_per_s", "stall_s"):
        if key in data:
            out[key] = data[key]
    for key in ("config", "after", "before"):
        if isinstance(data.get(key), dict):
            c = data[key]
            out[key] = f"w={c.get('num_workers')} pf={c.get('prefetch_factor')} pw={int(bool(c.get('persistent_workers')))}"
    m = data.get("metrics")
    if isinstance(m, dict):
        out["rate"] = round(m.get("samples_per_s", 0.0), 1)
        out["batches"] = m.get("batches")
        out["wait"] = round(m.get("wait_share", 0.0), 3)
        out["epoch_start_wait_s"] = m.get("epoch_start_wait_s")
    d = data.get("diagnosis")
    if isinstance(d, dict):
        out["diagnosis"] = d.get("kind")
    rec = data.get("recommendation")
    if isinstance(rec, dict):
        out["recommended"] = f"w={rec['config'].get('num_workers')} pw={int(bool(rec['config'].get('persistent_workers')))}"
    return out


# -- verdicts (pure: tested in tests/test_realjobs.py) ----------------------------------------------
def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated figures, and the half-range relative to the median."""
    vals = [float(v) for v in values]
    med = statistics.median(vals)
    return {
        "median": med,
        "min": min(vals),
        "max": max(vals),
        "pm": (max(vals) - min(vals)) / 2 / med if med else 0.0,
    }


def at_least(value: float, target: float) -> str:
    """PASS when ``value >= target`` (ratios), else MISS."""
    return "PASS" if value >= target else "MISS"


def within(measured: float, truth: float, tolerance: float) -> bool:
    """Whether ``measured`` is within ``tolerance`` (relative) of ``truth``."""
    return truth > 0 and abs(measured - truth) <= tolerance * truth


def verdict_ratio(tuner_rates: Sequence[float], best_rates: Sequence[float], target: float) -> tuple[float, str]:
    """The tuner's median rate over the best static's median rate, and PASS/MISS against target."""
    ratio = statistics.median(tuner_rates) / statistics.median(best_rates)
    return ratio, at_least(ratio, target)


def verdict_jpeg(static_medians: dict[int, float], tuner_final_workers: Sequence[int]) -> tuple[bool, str]:
    """"Never left at 0 workers when >= 1 is > 5% better": (ok, why)."""
    zero = static_medians.get(0)
    better = [w for w, r in static_medians.items() if w >= 1 and zero and r > 1.05 * zero]
    if not better:
        return True, "no static with workers is >5% better than w=0"
    left = sum(1 for w in tuner_final_workers if w == 0)
    if left:
        return False, f"left at w=0 in {left} of {len(tuner_final_workers)} runs while w={better} are >5% better"
    return True, f"ended at w={list(tuner_final_workers)} (w={better} are >5% better than w=0)"


def best_static(statics: dict[str, list[float]]) -> str:
    """The static label with the highest median rate."""
    return max(statics, key=lambda k: statistics.median(statics[k]))


# -- workloads -------------------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    title: str
    target: str
    run: Callable[[bool], dict[str, Any]]


def _loader_factory(dataset: Dataset, batch_size: int, workers: int, *, persistent: bool = False, context: str | None = None, seed: int = 0) -> Callable[[], DataLoader]:
    def make() -> DataLoader:
        kwargs: dict[str, Any] = {}
        if workers:
            kwargs.update(persistent_workers=persistent, multiprocessing_context=context)
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
            generator=torch.Generator().manual_seed(seed), **kwargs,
        )

    return make


def _conv_step(model: nn.Module) -> Callable[[Any], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step(batch: Any) -> None:
        x, y = batch
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _sleep_step(seconds: float) -> Callable[[Any], None]:
    def step(_batch: Any) -> None:
        time.sleep(seconds)

    return step


def _interleave(
    statics: dict[str, Callable[[], DataLoader]],
    tuner: dict[str, tuple[Callable[[], DataLoader], dict[str, Any]]],
    step_for: Callable[[], Callable[[Any], None]],
    rounds: int,
    **job: Any,
) -> dict[str, list[JobResult]]:
    """Runs every static and tuner job ``rounds`` times, one of each per round, order rotating."""
    runs: dict[str, list[JobResult]] = {k: [] for k in [*statics, *tuner]}
    names = list(runs)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if name in statics:
                res = run_job(statics[name], step_for(), label=name, **job)
            else:
                make, options = tuner[name]
                res = run_job(make, step_for(), label=name, tune=options, **job)
            runs[name].append(res)
            print(f"  [{r + 1}/{rounds}] {name:>14}: {res.rate:8.1f} samples/s, {res.wall_s:6.1f} s, {res.samples} samples"
                  + (f", ended {res.final}" if res.final else ""), flush=True)
    return runs


def _table(runs: dict[str, list[JobResult]], best: str) -> list[dict[str, Any]]:
    best_med = statistics.median(r.rate for r in runs[best])
    rows = []
    for name, results in runs.items():
        s = spread([r.rate for r in results])
        rows.append({
            "config": name,
            "rate_median": s["median"],
            "rate_min": s["min"],
            "rate_max": s["max"],
            "pm": s["pm"],
            "vs_best": s["median"] / best_med,
            "wall_s": statistics.median(r.wall_s for r in results),
            "longest_gap_s": statistics.median(r.longest_gap_s for r in results),
            "final": [r.final for r in results if r.final] or None,
            "summary": [r.summary.get("text") for r in results if r.summary] or None,
        })
    return rows


def count_target(runs: dict[str, list[JobResult]], expected: int) -> dict[str, Any]:
    """The bench's own accounting: every job consumed ``expected`` samples (epochs x dataset)."""
    off = {f"{k} run {i + 1}": r.samples for k, v in runs.items() for i, r in enumerate(v) if r.samples != expected}
    return {
        "target": f"every job consumed {expected} samples (bench accounting)",
        "measured": "all" if not off else "; ".join(f"{k}: {n}" for k, n in off.items()),
        "verdict": "PASS" if not off else "MISS",
    }


def _statics_only(runs: dict[str, list[JobResult]]) -> dict[str, list[float]]:
    return {k: [r.rate for r in v] for k, v in runs.items() if not k.startswith("tuner")}


def _result(name: str, runs: dict[str, list[JobResult]], targets: list[dict[str, Any]], notes: list[str], **extra: Any) -> dict[str, Any]:
    statics = _statics_only(runs)
    best = best_static(statics)
    return {
        "name": name,
        "best_static": best,
        "rows": _table(runs, best),
        "targets": targets,
        "notes": notes,
        "events": {k: [r.events for r in v] for k, v in runs.items() if k.startswith("tuner")},
        **extra,
    }


# 1. JPEG conv net -----------------------------------------------------------------------------
def wl_jpeg(quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    n = 768 if quick else 1536
    ds = SmallJpegDataset(n)
    bs = 32
    statics = {f"w={w}": _loader_factory(ds, bs, w) for w in (0, 1, 2, 3)}
    tuner = {"tuner": (_loader_factory(ds, bs, 0), {"mode": "apply"})}
    runs = _interleave(statics, tuner, lambda: _conv_step(small_convnet()), 1 if quick else 2, epochs=2)
    st = _statics_only(runs)
    best = best_static(st)
    ratio, v = verdict_ratio([r.rate for r in runs["tuner"]], st[best], 0.95)
    medians = {int(k.split("=")[1]): statistics.median(v_) for k, v_ in st.items()}
    ok, why = verdict_jpeg(medians, [r.final["num_workers"] for r in runs["tuner"]])
    targets = [
        {"target": "tuner's whole job >= 95% of the best static", "measured": f"{ratio:.0%} of {best}", "verdict": v},
        {"target": "never left at 0 workers when >= 1 is > 5% better", "measured": why, "verdict": "PASS" if ok else "MISS"},
        count_target(runs, n * 2),
    ]
    return _result("jpeg", runs, targets, [f"{n} JPEGs (320 px decoded, crop 256, resized to 64) per epoch, 2 epochs, batch {bs}, 3-conv net + SGD on the CPU (torch threads {torch.get_num_threads()}); tuner apply from w=0"])


# 2. contention ----------------------------------------------------------------------------------
def wl_contention(quick: bool) -> dict[str, Any]:
    n = 2048 if quick else 4096
    ds = LatencyCpuDataset(n, cpu_ms=1.5)
    bs = 16
    statics = {f"w={w}": _loader_factory(ds, bs, w) for w in (0, 1, 2, 3, 4)}
    tuner = {"tuner": (_loader_factory(ds, bs, 0), {"mode": "apply"})}
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    burner = ctx.Process(target=_burn, args=(stop,), daemon=True)
    burner.start()
    try:
        runs = _interleave(statics, tuner, lambda: _sleep_step(0.004), 1 if quick else 2, epochs=2)
    finally:
        stop.set()
        burner.join(5)
    st = _statics_only(runs)
    best = best_static(st)
    ratio, v = verdict_ratio([r.rate for r in runs["tuner"]], st[best], 0.90)
    targets = [{"target": "tuner's whole job >= 90% of the best static under the same load", "measured": f"{ratio:.0%} of {best}", "verdict": v}]
    return _result("contention", runs, targets, [f"1.5 ms CPU per sample, batch {bs}, 4 ms step (sleep), {n} samples x 2 epochs; a second process spins on one core throughout; tuner apply from w=0"])


# 3. fast loop, recommend mode -------------------------------------------------------------------
def wl_fastloop(quick: bool) -> dict[str, Any]:
    ds = LatencyCpuDataset(10**7, wait_ms=0.25, shape=(64,))
    bs = 16
    dur = 20.0
    stat_dur = 6.0 if quick else 8.0
    tuned = run_job(_loader_factory(ds, bs, 0), _sleep_step(0.002), duration_s=dur, tune={"mode": "recommend"}, label="tuner (recommend)")
    print(f"  tuner (recommend): {len(tuned.recommendations)} lines", flush=True)
    for line in tuned.recommendations:
        print("    " + line[:160], flush=True)
    last_cfg = None
    recs = [e for e in tuned.events if e["kind"] == "recommendation"]
    if recs:
        last_cfg = int(recs[-1]["recommended"].split()[0].split("=")[1])
    workers = sorted({0, 1, 2, 4, 8, 16} | ({last_cfg} if last_cfg is not None else set()))
    statics = {f"w={w}": _loader_factory(ds, bs, w, persistent=True) for w in workers}
    # Two interleaved rounds: one 8 s run of each static once read w=4 at 90% of w=2, the
    # next run at 100% (a shared machine's noise, not the loader's).
    runs = _interleave(statics, {}, lambda: _sleep_step(0.002), 1 if quick else 2, duration_s=stat_dur)
    runs["tuner (recommend)"] = [tuned]
    st = _statics_only(runs)
    st.pop("tuner (recommend)", None)
    best = best_static(st)
    lines = len(tuned.recommendations)
    targets = [{"target": "<= 3 recommendation lines in 20 s", "measured": str(lines), "verdict": "PASS" if lines <= 3 else "MISS"}]
    if last_cfg is None:
        targets.append({"target": "last recommendation within 10% of the best static", "measured": "no recommendation", "verdict": "MISS"})
    else:
        r = statistics.median(st[f"w={last_cfg}"]) / statistics.median(st[best])
        targets.append({"target": "last recommendation within 10% of the best static", "measured": f"w={last_cfg}: {r:.0%} of {best}", "verdict": at_least(r, 0.90)})
    return _result("fastloop", runs, targets, [f"0.25 ms wait per sample, batch {bs}, 2 ms step; the tuner recommends for {dur:.0f} s from w=0; statics (persistent workers, {stat_dur:.0f} s each) include the recommended count"], recommendation_lines=tuned.recommendations)


# 4. short epochs: the summary's rates against the loop's -------------------------------------------
def true_rates(res: JobResult) -> tuple[float | None, float | None]:
    """The loop's own rates over the batches the summary's steady rates cover.

    The summary reports steady rates: at the first configuration, and at the last one after its
    warm-up. Like with like, the loop's are timed on the bench's own clock over the same spans:
    "first" from the end of the job's first batch (its wait holds ``tune()``'s one-off set-up
    and the first workers' start) to the end of the batch before the deciding one (the deciding
    batch's step carries the decision and the rebuild's start, which the summary counts as the
    change's warm-up, not the first configuration's pace); "last" from the first batch the tuner
    counted after the last change (the start of the first window event after it: a rebuild's
    stall and its warm-up batches are left out, as the summary leaves them out) to the end.
    Time between epochs counts: worker start-up at every epoch is what the job pays.
    """
    marks = [e["step"] for e in res.events if e["kind"] in ("change", "revert", "fault")]
    changes = marks
    done = res.batch_done_s
    samples = res.batch_samples
    if not done:
        return None, None

    def rate(lo: int, hi: int) -> float | None:
        # Batches lo..hi-1: from the end of batch lo-1 (or the start) to the end of batch hi-1.
        if hi - lo < 2:
            return None
        t_lo = done[lo - 1] if lo > 0 else res.iter0_s
        return sum(samples[lo:hi]) / (done[hi - 1] - t_lo)

    first_end = changes[0] if changes else len(done)
    last_start = changes[-1] if changes else 1
    if changes:
        after = [e for e in res.events if e["kind"] == "window" and e["step"] > changes[-1] and e.get("batches")]
        if after:
            last_start = max(last_start, after[0]["step"] - int(after[0]["batches"]))
    return rate(1, first_end - 1 if changes else first_end), rate(last_start, len(done))


def wl_short(quick: bool) -> dict[str, Any]:
    ds = LatencyCpuDataset(480, wait_ms=2.0, shape=(64,))
    bs = 16
    epochs = 8 if quick else 12
    rounds = 2 if quick else 3
    runs: dict[str, list[JobResult]] = {"w=0": [], "w=8 pw": [], "tuner": []}
    rows = []
    for r in range(rounds):
        for name in runs:
            if name == "tuner":
                res = run_job(_loader_factory(ds, bs, 0), _sleep_step(0.005), epochs=epochs, tune={"mode": "apply"}, label=name)
                s = res.summary or {}
                t_first, t_last = true_rates(res)
                rows.append({
                    "round": r + 1,
                    "summary_text": s.get("text"),
                    "summary_first": s.get("first_samples_per_s"),
                    "summary_last": s.get("last_samples_per_s"),
                    "loop_first": t_first,
                    "loop_last": t_last,
                })
            else:
                res = run_job(_loader_factory(ds, bs, 8 if "8" in name else 0, persistent=True), _sleep_step(0.005), epochs=epochs, label=name)
            runs[name].append(res)
            print(f"  [{r + 1}/{rounds}] {name:>8}: {res.rate:8.1f} samples/s, epochs {[round(e, 2) for e in res.epoch_s[:4]]}..."
                  + (f" {res.summary['text']}" if res.summary else ""), flush=True)
    ok_all = True
    measured = []
    for row in rows:
        for a, b in (("summary_first", "loop_first"), ("summary_last", "loop_last")):
            ok = row[a] is not None and row[b] is not None and within(row[a], row[b], 0.20)
            ok_all &= ok
        measured.append(
            f"r{row['round']}: first {_n(row['summary_first'])} vs {_n(row['loop_first'])}, last {_n(row['summary_last'])} vs {_n(row['loop_last'])}"
        )
    targets = [{"target": "summary's first/last rates within 20% of the loop's true rates", "measured": "; ".join(measured), "verdict": "PASS" if ok_all else "MISS"}]
    return _result("short", runs, targets, [f"{len(ds)} samples per epoch (~1 s at the start), 2 ms wait per sample, 5 ms step, {epochs} epochs; the loop's true rates are samples over wall time (epoch starts included) before the first change and after the last"], summary_rows=rows)


def _n(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


# 5. spawn-started workers without persistent workers --------------------------------------------
def wl_spawn(quick: bool) -> dict[str, Any]:
    ds = LatencyCpuDataset(1200, wait_ms=4.0, cpu_ms=0.3, shape=(64,))
    bs = 16
    epochs = 4
    # Non-persistent spawn workers restart every epoch (seconds each on 2 CPUs): w=2 shows that
    # cost; w=4/w=8 without persistence took 50-85 s a job and are left out to keep the run short.
    statics = {
        "w=0": _loader_factory(ds, bs, 0, context="spawn"),
        "w=2": _loader_factory(ds, bs, 2, context="spawn"),
        "w=4 pw": _loader_factory(ds, bs, 4, persistent=True, context="spawn"),
        "w=8 pw": _loader_factory(ds, bs, 8, persistent=True, context="spawn"),
    }
    # The tuner starts from w=2 spawn: a DataLoader with num_workers=0 cannot hold a
    # multiprocessing_context (torch refuses it), so a tuner started from w=0 rebuilt its workers
    # with the default fork context and the workload measured fork, not spawn (its 9 workers
    # "started" in 0.2 s where the statics' 8 spawn workers took 10 s).
    make_tuner = _loader_factory(ds, bs, 2, context="spawn")
    ctx = make_tuner().multiprocessing_context
    assert ctx is not None and ctx.get_start_method() == "spawn", ctx
    tuner = {"tuner": (make_tuner, {"mode": "apply"})}
    runs = _interleave(statics, tuner, lambda: _sleep_step(0.010), 1 if quick else 2, epochs=epochs)
    st = _statics_only(runs)
    best = best_static(st)
    ratio, v = verdict_ratio([r.rate for r in runs["tuner"]], st[best], 0.95)
    start_ratio = min(r.rate for r in runs["tuner"]) / statistics.median(st["w=2"])
    targets = [
        {"target": "tuner's whole job >= 95% of the best static", "measured": f"{ratio:.0%} of {best}", "verdict": v},
        {"target": "never slower than its start (w=2 spawn)", "measured": f"slowest tuner run {start_ratio:.2f}x w=2", "verdict": at_least(start_ratio, 1.0)},
        count_target(runs, len(ds) * epochs),
    ]
    return _result("spawn", runs, targets, [f"multiprocessing_context='spawn', {len(ds)} samples x {epochs} epochs, 4 ms wait + 0.3 ms CPU per sample, batch {bs}, 10 ms step; statics with and without persistent workers; tuner apply from w=2 spawn (not persistent: from w=0 the loader could not carry the spawn context)"])


# 6. never worse --------------------------------------------------------------------------------
def wl_neverworse(quick: bool) -> dict[str, Any]:
    cases = [
        # (name, dataset, batch, start workers, persistent, step seconds)
        ("compute-bound, w=0", LatencyCpuDataset(1536, cpu_ms=0.05), 32, 0, False, 0.030),
        ("CPU-bound, w=2 pw", LatencyCpuDataset(2048, cpu_ms=1.5), 16, 2, True, 0.002),
        ("latency-bound, w=8 pw", LatencyCpuDataset(2048, wait_ms=3.0), 16, 8, True, 0.008),
    ]
    rounds = 2 if quick else 3
    rows = []
    all_runs: dict[str, list[JobResult]] = {}
    targets = []
    for name, ds, bs, w, pw, step_s in cases:
        make = _loader_factory(ds, bs, w, persistent=pw)
        runs = _interleave({f"{name}: static": make}, {f"{name}: tuner": (make, {"mode": "apply"})}, lambda s=step_s: _sleep_step(s), rounds, epochs=2)
        all_runs.update(runs)
        s_rates = [r.rate for r in runs[f"{name}: static"]]
        t_rates = [r.rate for r in runs[f"{name}: tuner"]]
        ratio, v = verdict_ratio(t_rates, s_rates, 0.97)
        rows.append({"case": name, "static": spread(s_rates), "tuner": spread(t_rates), "ratio": ratio, "verdict": v,
                     "final": [r.final for r in runs[f"{name}: tuner"]]})
        targets.append({"target": f"{name}: tuner's whole job >= 97% of the start", "measured": f"{ratio:.0%}", "verdict": v})
    res = _result("neverworse", all_runs, targets, ["each case starts at the configuration that is already the best; static and tuner interleaved"], cases=rows)
    return res


# 7. tf.data anchors -----------------------------------------------------------------------------
def wl_anchors(quick: bool) -> dict[str, Any]:
    try:
        import tensorflow as tf  # type: ignore[import-not-found]
    except ImportError:
        return {"name": "anchors", "rows": [], "targets": [{"target": "tf.data AUTOTUNE peer rows", "measured": "skipped: tensorflow-cpu not installed (pip install '.[anchors]')", "verdict": "SKIP"}], "notes": [], "best_static": None, "events": {}}
    out_rows = []
    dur = 8.0 if quick else 15.0
    for label, wait_s, cpu_s in (("latency-bound (4 ms wait/sample)", 0.004, 0.0), ("CPU-bound (1.5 ms CPU/sample)", 0.0, 0.0015)):
        ds_py = LatencyCpuDataset(10**7, wait_ms=wait_s * 1e3, cpu_ms=cpu_s * 1e3, shape=(64,))

        def load(i: Any, ds_py: Any = ds_py) -> Any:
            return ds_py[int(i)].numpy()

        tds = tf.data.Dataset.range(10**7).map(lambda i: tf.numpy_function(load, [i], tf.float32), num_parallel_calls=tf.data.AUTOTUNE).batch(32).prefetch(tf.data.AUTOTUNE)
        n = 0
        t0 = time.perf_counter()
        for b in tds:
            time.sleep(0.02)
            n += int(b.shape[0])
            if time.perf_counter() - t0 >= dur:
                break
        tf_rate = n / (time.perf_counter() - t0)
        tuned = run_job(_loader_factory(ds_py, 32, 0, persistent=True), _sleep_step(0.02), duration_s=dur, tune={"mode": "apply"}, label="tuner")
        out_rows.append({"workload": label, "tf_autotune": tf_rate, "loadertune": tuned.rate})
    return {"name": "anchors", "rows": [], "anchor_rows": out_rows, "targets": [{"target": "tf.data AUTOTUNE peer rows", "measured": "; ".join(f"{r['workload']}: tf.data {r['tf_autotune']:.0f}, loadertune {r['loadertune']:.0f} samples/s" for r in out_rows), "verdict": "INFO"}], "notes": [ANCHORS_NOTE.format(dur=dur)], "best_static": None, "events": {}}


#: What the anchor rows compare (rendered under them).
ANCHORS_NOTE = (
    "Both run the same Python loading function for {dur:.0f} s with a 20 ms step, batch 32 (at most 1600 "
    "samples/s). tf.data: `Dataset.range -> map(numpy_function(load), num_parallel_calls=AUTOTUNE) -> "
    "batch(32) -> prefetch(AUTOTUNE)`, whose parallel calls are threads of one process that take "
    "Python's GIL in turn; loadertune: `tune(DataLoader(..., num_workers=0, persistent_workers=True), "
    "mode=\"apply\")`, whose workers are processes. A peer row for a loader written in Python, not a "
    "comparison of the engines: tf.data with native TF ops does not take the GIL."
)


WORKLOADS = {
    "jpeg": Workload("jpeg", "CPU-trained conv net, JPEG decode in the dataset", ">= 95% of the best static; never left at 0 workers when >= 1 is > 5% better", wl_jpeg),
    "spawn": Workload("spawn", "spawn-started workers without persistent workers", ">= 95% of the best static; never slower than its start", wl_spawn),
    "fastloop": Workload("fastloop", "fast loop (ms steps), recommend mode", "<= 3 recommendation lines in 20 s; the last within 10% of the best", wl_fastloop),
    "short": Workload("short", "short epochs (~1 s)", "summary's rates within 20% of the loop's", wl_short),
    "contention": Workload("contention", "CPU-bound load while another process burns a core", ">= 90% of the best static under that load", wl_contention),
    "neverworse": Workload("neverworse", "never worse: the start is already the best", ">= 97% of the start", wl_neverworse),
    "anchors": Workload("anchors", "tf.data AUTOTUNE peer rows", "peer rows when tensorflow-cpu is installed", wl_anchors),
}


# -- report ----------------------------------------------------------------------------------------
def _machine() -> dict[str, Any]:
    import platform

    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "packages": _versions("numpy", "pillow", "tensorflow-cpu"),
    }


def _versions(*names: str) -> dict[str, str]:
    """Installed versions of ``names`` (the ones installed), without importing them."""
    from importlib import metadata

    out = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# loadertune on jobs that look like real ones (issue 13)",
        "",
        f"- Command: `{results['command']}`",
        f"- Date: {results['date']} (took {results['took_s'] / 60:.1f} min)",
        f"- Machine: {m['usable_cpus']} usable CPUs ({m['cpu_model']}), Python {m['python']}, torch {m['torch']} ({m['torch_threads']} intra-op threads){''.join(f', {k} {v}' for k, v in (m.get('packages') or {}).items())}; load average at start {m['load_average']}, at end {results['load_end']}",
        "- Every figure is a whole job (from `iter()` to the end of `close()`: worker start-up, rebuild stalls and shutdown count) run in the same process as its static comparisons, interleaved round by round. `±` is half the range between rounds, relative to the median. The machine is shared: read the spread.",
        "",
        "## Targets",
        "",
        "| Workload | Target | Measured | Verdict |",
        "|---|---|---|---|",
    ]
    for w in results["workloads"]:
        for t in w["targets"]:
            verdict = t["verdict"] if t["verdict"] != "MISS" else "**MISS**"
            lines.append(f"| {w['name']} | {t['target']} | {t['measured']} | {verdict} |")
    for w in results["workloads"]:
        lines += ["", f"## {w['name']}: {WORKLOADS[w['name']].title}", ""]
        lines += [f"{n}" for n in w.get("notes", [])]
        if w.get("rows"):
            lines += ["", "| Config | samples/s (median) | ± | min–max | vs best static | job wall s | longest gap between batches s | tuner ended at |", "|---|---|---|---|---|---|---|---|"]
            for r in w["rows"]:
                final = ", ".join(f"w={f['num_workers']}{' pw' if f.get('persistent_workers') else ''}" for f in (r["final"] or [])) or ""
                lines.append(f"| {r['config']}{' (best)' if r['config'] == w['best_static'] else ''} | {r['rate_median']:.0f} | {r['pm']:.0%} | {r['rate_min']:.0f}–{r['rate_max']:.0f} | {r['vs_best']:.0%} | {r['wall_s']:.1f} | {r.get('longest_gap_s', float('nan')):.2f} | {final} |")
            sums = [s for r in w["rows"] for s in (r["summary"] or [])]
            if sums:
                lines += ["", "Tuner summaries:", ""] + [f"- `{s}`" for s in sums]
        if w.get("summary_rows"):
            lines += ["", "| round | summary first | loop first | summary last | loop last |", "|---|---|---|---|---|"]
            for r in w["summary_rows"]:
                lines.append(f"| {r['round']} | {_n(r['summary_first'])} | {_n(r['loop_first'])} | {_n(r['summary_last'])} | {_n(r['loop_last'])} |")
        if w.get("cases"):
            lines += ["", "| Case | start (static) samples/s | tuner samples/s | tuner / start | tuner ended at | verdict |", "|---|---|---|---|---|---|"]
            for c in w["cases"]:
                final = ", ".join(f"w={f['num_workers']}" for f in c["final"])
                lines.append(f"| {c['case']} | {c['static']['median']:.0f} ±{c['static']['pm']:.0%} | {c['tuner']['median']:.0f} ±{c['tuner']['pm']:.0%} | {c['ratio']:.0%} | {final} | {c['verdict']} |")
        if w.get("recommendation_lines"):
            lines += ["", "Recommendation lines logged:", ""] + [f"- `{x[:200]}`" for x in w["recommendation_lines"]]
        if w.get("anchor_rows"):
            lines += ["", "| Workload | tf.data AUTOTUNE samples/s | loadertune samples/s |", "|---|---|---|"]
            lines += [f"| {r['workload']} | {r['tf_autotune']:.0f} | {r['loadertune']:.0f} |" for r in w["anchor_rows"]]
        decisions = []
        for label, runs in (w.get("events") or {}).items():
            for i, evs in enumerate(runs):
                ch = [e for e in evs if e["kind"] in ("change", "keep", "revert", "fault")]
                if ch:
                    decisions.append(f"- {label} run {i + 1}: " + "; ".join(f"{e['kind']}@{e['step']} {e.get('after', e.get('config', ''))}" for e in ch[:12]))
        if decisions:
            lines += ["", "Tuner decisions (step numbers):", "", *decisions]
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.realjobs", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round, shorter jobs")
    p.add_argument("--only", default=None, help="comma-separated workload names: " + ",".join(WORKLOADS))
    p.add_argument("--out", default=str(HERE), help="directory for REALJOBS.md and realjobs.json")
    args = p.parse_args(argv)
    names = list(WORKLOADS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    for n in names:
        if n not in WORKLOADS:
            p.error(f"unknown workload {n!r}; choose from {', '.join(WORKLOADS)}")
    logging.getLogger("loadertune").propagate = False
    t0 = time.perf_counter()
    machine = _machine()
    out = []
    for n in names:
        print(f"== {n}: {WORKLOADS[n].title}", flush=True)
        out.append(WORKLOADS[n].run(args.quick))
        for t in out[-1]["targets"]:
            print(f"   {t['verdict']}: {t['target']} -- {t['measured']}", flush=True)
    results = {
        "command": "python -m bench.realjobs" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "took_s": time.perf_counter() - t0,
        "machine": machine,
        "load_end": [round(x, 2) for x in os.getloadavg()],
        "workloads": out,
    }
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "REALJOBS.md").write_text(render(results))
    (outdir / "realjobs.json").write_text(json.dumps(results, indent=1, default=_json_default))
    print(f"wrote {outdir / 'REALJOBS.md'} and {outdir / 'realjobs.json'}")
    return 0


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


if __name__ == "__main__":
    raise SystemExit(main())
