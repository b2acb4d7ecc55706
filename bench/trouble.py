"""Seeing trouble coming (issue 15): stalled samples and growing workers, measured.

``python -m bench.trouble`` runs, each in this process:

- stalls: a dataset whose sample 21 blocks (on a semaphore the run releases once the stall is
  reported) at ``num_workers`` 0 and 2, and at 2 with ``on_stall="restart"`` (the hang then lasts
  until the worker is killed); ``stall_timeout_s=2``. Reported: time from the hang to the warning,
  whether it names the indices, the pid and a stack reaching the dataset's function, and whether
  the epoch completed exactly once.
- copy-on-read: a list of 16,000 Python objects (4 KB records) read by 2 shuffled workers (each
  copies the page of every record it touches); the RAM budget is the workers' PSS after 5 batches
  plus 30 MiB, so the epoch crosses it midway. The forecast's end-of-epoch PSS is compared with
  the PSS measured at the epoch's last batch, at 25/50/75% of the epoch, in recommend mode; apply
  mode's step-down and the peak are reported too.
- the bench's ``memory`` workload (bench/workloads.py: 24 MiB buffer + up to 24 MiB cache per
  loading process, 300 MiB budget), apply mode from ``num_workers=0`` for 20 s: the peak of the
  workers' summed PSS (sampled once a second) against the budget.

Prints a Markdown table and writes ``bench/TROUBLE.md``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from torch.utils.data import DataLoader, Dataset

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

import loadertune
from loadertune.sources.host import HostSource

HERE = Path(__file__).resolve().parent
MiB = 2**20
_CTX = mp.get_context("fork")
_STUCK = 21
_STALL_TIMEOUT_S = 2.0


class _Hangs(Dataset):
    def __init__(self, n: int, once: bool) -> None:
        self.n = n
        self.once = once
        self.gate = _CTX.Semaphore(0)
        self.blocked_at = _CTX.Value("d", 0.0)
        self.loads = _CTX.Value("i", 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return self.read_record(i)

    def read_record(self, i: int) -> int:
        if i == _STUCK:
            with self.loads.get_lock():
                self.loads.value += 1
                first = self.loads.value == 1
            if first or not self.once:
                self.blocked_at.value = time.time()
                if self.gate.acquire(timeout=120):
                    self.gate.release()
        return i


def stall_row(workers: int, on_stall: str) -> dict[str, Any]:
    ds = _Hangs(256, once=on_stall == "restart")
    stalls = []

    def sink(event: Any) -> None:
        if event.kind == "stall":
            stalls.append(event)
            if on_stall == "warn":
                ds.gate.release()

    loader = DataLoader(ds, batch_size=8, num_workers=workers, multiprocessing_context=_CTX if workers else None)
    t0 = time.perf_counter()
    seen: list[int] = []
    try:
        with loadertune.tune(
            loader, stall_timeout_s=_STALL_TIMEOUT_S, on_stall=on_stall, sinks=(sink,), host=None, gpu=None
        ) as tuned:
            for batch in tuned:
                seen.extend(int(x) for x in batch)
    finally:
        ds.gate.release()
    total = time.perf_counter() - t0
    first = stalls[0].data if stalls else {}
    return {
        "case": f"stall, num_workers={workers}, on_stall={on_stall!r}",
        "warned_after_s": (stalls[0].time - ds.blocked_at.value) if stalls else None,
        "bound_s": _STALL_TIMEOUT_S + 2.0,
        "indices_named": bool(first) and _STUCK in (first.get("indices") or []),
        "pid": first.get("pid"),
        "pid_is_worker": first.get("in_worker"),
        "stack_reaches_dataset": "read_record" in (first.get("stack") or ""),
        "exactly_once": sorted(seen) == list(range(256)),
        "action": first.get("action"),
        "epoch_s": total,
    }


class CopyOnRead(Dataset):
    """A list of Python objects (4 KB records): every worker copies the page of each it reads."""

    def __init__(self, n: int) -> None:
        self.items = [bytes([i % 251]) * 4000 for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> int:
        record = self.items[i]
        return i if record else -1


def _workers_pss(tuned: Any) -> int:
    total = 0
    for pid in tuned._pipeline.worker_pids():
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_full_info().pss
    return total


def memory_row(mode: str, n: int = 16000) -> dict[str, Any]:
    loader = DataLoader(CopyOnRead(n), batch_size=32, num_workers=2, shuffle=True)
    tuned = loadertune.tune(
        loader, mode=mode, gpu=None, host=HostSource(pss_interval_s=0.3), window_s=0.5, ram_budget_share=0.5
    )
    seen: list[int] = []
    budget = start = None
    peak = end = 0
    at: dict[int, Any] = {}
    with tuned:
        batches = len(tuned)
        marks = {int(batches * q / 100): q for q in (25, 50, 75)}
        for k, batch in enumerate(tuned):
            seen.extend(int(x) for x in batch)
            time.sleep(0.005)
            if k == 5:
                start = _workers_pss(tuned)
                budget = start + 30 * MiB
                session = tuned._session
                session.bounds = dataclasses.replace(session.bounds, ram_budget_bytes=budget)
                session.controller.bounds = dataclasses.replace(session.controller.bounds, ram_budget_bytes=budget)
            if k in marks:
                at[marks[k]] = tuned._actuator._memory.forecast()
            if k % 20 == 0 or k >= batches - 2:
                pss = _workers_pss(tuned)
                peak = max(peak, pss)
                if pss:
                    end = pss
        events = tuned.events
    memory = [e for e in events if e.kind == "memory"]
    warned = memory[0].data if memory else None
    out: dict[str, Any] = {
        "case": f"copy-on-read, {mode}",
        "budget_mib": budget / MiB if budget else None,
        "start_mib": start / MiB if start else None,
        "end_mib": end / MiB,
        "peak_mib": peak / MiB,
        "exactly_once": sorted(seen) == list(range(n)),
        "warned_at_share": (warned["forecast"]["position"] / n) if warned else None,
        "warned_now_mib": warned["forecast"]["now_bytes"] / MiB if warned else None,
        "warned_end_mib": warned["forecast"]["end_bytes"] / MiB if warned else None,
        "action": warned["action"] if warned else None,
        "final_workers": tuned.config.num_workers,
    }
    for q, f in sorted(at.items()):
        # Apply mode acts on the forecast, so its end is not the one forecast: no error there.
        if f is not None and end and mode == "recommend":
            out[f"pred_at_{q}_mib"] = f.end_bytes / MiB
            out[f"err_at_{q}"] = (f.end_bytes - end) / end
            grown = end - (start or 0)
            out[f"growth_err_at_{q}"] = ((f.end_bytes - (start or 0)) - grown) / grown if grown > 0 else None
    if warned and end and mode == "recommend":
        out["err_at_warning"] = (warned["forecast"]["end_bytes"] - end) / end
    return out


def bench_memory_row(duration_s: float = 20.0) -> dict[str, Any]:
    from bench import run as _run
    from bench import workloads as _workloads

    workload = _workloads.get("memory")
    dataset = workload.make_dataset()
    out = _run.run_tuned(workload, dataset, duration_s)
    story = [
        f"{d['t']:.1f} s: **{d['action']}** -> w={d['num_workers']}: {d.get('reason') or ''}"
        for d in out.get("decisions", [])
    ]
    return {
        "case": "bench memory workload, apply from num_workers=0",
        "budget_mib": workload.memory_budget_bytes / MiB,
        "peak_mib": (out["peak_worker_pss_bytes"] or 0) / MiB,
        "final_workers": out["num_workers"],
        "steady_sps": out["steady_sps"],
        "decisions": story,
    }


def _f(v: Any, fmt: str = "{:.1f}") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return fmt.format(v)
    return str(v)


def render(stalls: list[dict[str, Any]], mems: list[dict[str, Any]], bench: dict[str, Any] | None) -> str:
    lines = [
        "# Stalls and growing workers (issue 15)",
        "",
        f"`python -m bench.trouble` on {platform.node()} ({psutil.cpu_count()} CPUs, shared), "
        f"torch {__import__('torch').__version__}, {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"## Stalls (sample {_STUCK} hangs; stall_timeout_s={_STALL_TIMEOUT_S:g})",
        "",
        "| Case | warned after (s) | bound (s) | indices | pid | in worker | stack reaches dataset | exactly once | action |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in stalls:
        lines.append(
            f"| {r['case']} | {_f(r['warned_after_s'], '{:.2f}')} | {r['bound_s']:.0f} | {_f(r['indices_named'])} | "
            f"{r['pid']} | {'yes' if r['pid_is_worker'] else 'no (training process)'} | {_f(r['stack_reaches_dataset'])} | {_f(r['exactly_once'])} | {r['action']} |"
        )
    lines += [
        "",
        "## Copy-on-read: end-of-epoch PSS forecast (2 workers, 16,000 records of 4 KB, shuffled)",
        "",
        "Error = (forecast of the workers' summed PSS at the epoch's end − PSS measured at its last "
        "batch) / measured; growth error = the same on the growth from batch 5.",
        "",
        "| Case | budget MiB | PSS at batch 5 | end PSS | peak PSS | warned at | PSS then | forecast then | err then | err @25% | err @50% | err @75% | growth err @25/50/75% | action | workers at end | exactly once |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in mems:
        pct = lambda v: "—" if v is None else f"{100 * v:+.0f}%"  # noqa: E731
        growth = "/".join(pct(r.get(f"growth_err_at_{q}")) for q in (25, 50, 75))
        lines.append(
            f"| {r['case']} | {_f(r['budget_mib'], '{:.0f}')} | {_f(r['start_mib'], '{:.0f}')} | {_f(r['end_mib'], '{:.0f}')} | "
            f"{_f(r['peak_mib'], '{:.0f}')} | {pct(r['warned_at_share']).lstrip('+')} of epoch | {_f(r['warned_now_mib'], '{:.0f}')} | "
            f"{_f(r['warned_end_mib'], '{:.0f}')} | {pct(r.get('err_at_warning'))} | {pct(r.get('err_at_25'))} | "
            f"{pct(r.get('err_at_50'))} | {pct(r.get('err_at_75'))} | {growth} | {r['action']} | {r['final_workers']} | {_f(r['exactly_once'])} |"
        )
    if bench is not None:
        lines += [
            "",
            "## The bench's memory workload (300 MiB budget, apply from num_workers=0, 20 s)",
            "",
            "| Case | budget MiB | peak worker PSS MiB | within | workers at end | samples/s (last 50%) |",
            "|---|---|---|---|---|---|",
            f"| {bench['case']} | {bench['budget_mib']:.0f} | {bench['peak_mib']:.0f} | "
            f"{_f(bench['peak_mib'] <= bench['budget_mib'])} | {bench['final_workers']} | {bench['steady_sps']:.0f} |",
        ]
        if bench["decisions"]:
            lines += ["", "Decisions:", ""] + [f"- {d}" for d in bench["decisions"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)
    args = sys.argv[1:] if argv is None else argv
    if "--workload-only" not in args:
        stalls = [stall_row(0, "warn"), stall_row(2, "warn"), stall_row(2, "restart")]
        mems = [memory_row("recommend"), memory_row("apply")]
    if "--workload-only" in args:
        print(json.dumps(bench_memory_row()))
        return 0
    bench = None
    if "--no-workload" not in args:
        # In a fresh process: the copy-on-read runs below leave their lists in this one, which
        # every forked worker would then count.
        done = subprocess.run(
            [sys.executable, "-m", "bench.trouble", "--workload-only"],
            cwd=HERE.parent, capture_output=True, text=True, check=True,
        )
        bench = json.loads(done.stdout.strip().splitlines()[-1])
    text = render(stalls, mems, bench)
    print(text)
    (HERE / "TROUBLE.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
