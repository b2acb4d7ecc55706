"""``loadertune probe``: what this machine offers a DataLoader, and how many workers to use.

Without a TARGET it reports the machine: Python and torch, GPUs (NVML), usable CPUs, RAM,
/dev/shm, and the torch settings that cost speed. With one it also measures the loader's
throughput at several worker counts, adaptively (the rules are in :mod:`loadertune.cli.sweep`),
and recommends the smallest count within 5% of the best.

The machine's facts come from :mod:`loadertune.cli.system`, the measurements from
:mod:`loadertune.cli.measure`; this module runs them and presents the results.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from loadertune.cli import EXIT_INTERRUPTED, EXIT_OK, UsageError, sweep
from loadertune.cli import _output as out
from loadertune.cli.measure import SweepOutcome, loader_factory, run_sweep
from loadertune.cli.system import render_system, system_facts
from loadertune.cli.target import Target, load_target

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """Runs ``loadertune probe`` with parsed arguments; returns the exit status."""
    if args.target is None:
        given = [
            o
            for o, v in (
                ("--workers", args.workers),
                ("--batch-size", args.batch_size),
                ("--plot", args.plot),
            )
            if v
        ]
        if given:
            raise UsageError(
                f"{', '.join(given)} need(s) a TARGET to measure; "
                f"e.g. loadertune probe mydata.py:dataset {given[0]} ..."
            )
    plt = None
    if args.plot:
        out.check_plot_path(args.plot)
        plt = out.require_pyplot()
    target = load_target(args.target) if args.target else None
    facts = system_facts()
    if target is None:
        if args.json:
            out.print_json({"system": facts})
        else:
            render_system(facts)
        return EXIT_OK

    factory, batch_size, prefetch = loader_factory(target, args.batch_size)
    if not args.json:
        render_system(facts)
        print()
    adaptive = args.workers is None
    workers = sweep.default_workers(_worker_cap(facts)) if adaptive else args.workers
    with out.Progress(args.budget, enabled=not args.json) as progress:
        outcome = run_sweep(factory, workers, args.budget, adaptive=adaptive, progress=progress)
    rec = sweep.recommend(outcome.points, batch_bytes=outcome.batch_bytes, prefetch_factor=prefetch)
    current = target.loader.num_workers if target.loader is not None else None
    result = _result(facts, target, batch_size, prefetch, outcome, rec, current)
    if plt is not None and outcome.points:
        _plot(plt, args.plot, outcome.points, rec, batch_size)
    if args.json:
        out.print_json(result)
    else:
        _render_sweep(outcome, rec, result, batch_size, current, adaptive)
        if args.plot and outcome.points:
            print(f"Plot written to {args.plot}")
    if outcome.interrupted:
        print("loadertune probe: interrupted; the partial results are above", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def _worker_cap(facts: dict[str, Any]) -> int:
    from loadertune.planning import default_max_workers

    return default_max_workers(facts["cpu"].get("usable") or 1)


def _result(
    facts: dict[str, Any],
    target: Target,
    batch_size: int | None,
    prefetch: int,
    outcome: SweepOutcome,
    rec: sweep.Recommendation | None,
    current: int | None,
) -> dict[str, Any]:
    recommended = None
    if rec is not None:
        p = rec.point
        recommended = {
            "num_workers": p.num_workers,
            "batch_size": batch_size,
            "prefetch_factor": prefetch if p.num_workers else None,
            "samples_per_s": round(p.samples_per_s, 2),
            "share_of_best": round(p.samples_per_s / rec.best.samples_per_s, 4),
            "best_num_workers": rec.best.num_workers,
            "best_samples_per_s": round(rec.best.samples_per_s, 2),
            "worker_mem_bytes": p.worker_mem_bytes,
            "ram_bytes": rec.ram_bytes,
            "batch_bytes": outcome.batch_bytes,
            "shm_bytes": rec.shm_bytes,
            "warnings": _requirement_warnings(facts, rec),
        }
        if current is not None:
            now = next((q for q in outcome.points if q.num_workers == current), None)
            recommended["current_num_workers"] = current
            recommended["speedup_vs_current"] = (
                round(p.samples_per_s / now.samples_per_s, 3)
                if now and now.samples_per_s > 0
                else None
            )
    return {
        "system": facts,
        "target": target.spec,
        "batch_size": batch_size,
        "sweep": [p.to_dict() for p in outcome.points],
        "stopped": outcome.stopped,
        "interrupted": outcome.interrupted,
        "recommended": recommended,
    }


def _requirement_warnings(facts: dict[str, Any], rec: sweep.Recommendation) -> list[str]:
    """Where the recommendation would not fit the machine as it is now."""
    notes = []
    shm_free = facts["shm"].get("free_bytes")
    if rec.shm_bytes and shm_free is not None and rec.shm_bytes > 0.5 * shm_free:
        notes.append(
            f"the batches in flight need {out.fmt_bytes(rec.shm_bytes)} of /dev/shm, "
            "more than half "
            f"of the {out.fmt_bytes(shm_free)} free: raise it (docker run --shm-size=...) or lower "
            "prefetch_factor"
        )
    available = facts["memory"].get("available_bytes")
    if rec.ram_bytes and available is not None and rec.ram_bytes > 0.5 * available:
        notes.append(
            f"the workers need {out.fmt_bytes(rec.ram_bytes)} of RAM, more than half of the "
            f"{out.fmt_bytes(available)} available"
        )
    return notes


def _render_sweep(
    outcome: SweepOutcome,
    rec: sweep.Recommendation | None,
    result: dict[str, Any],
    batch_size: int | None,
    current: int | None,
    adaptive: bool,
) -> None:
    chosen = rec.point.num_workers if rec else None
    best = rec.best.num_workers if rec else None
    rows = []
    for p in outcome.points:
        notes = []
        if p.num_workers == chosen:
            notes.append("recommended")
        if p.num_workers == best and best != chosen:
            notes.append("best")
        if p.num_workers == current:
            notes.append("yours")
        if p.stopped != "precise":
            notes.append(p.stopped)
        rows.append(
            [
                str(p.num_workers),
                out.fmt_rate(p.samples_per_s),
                "n/a" if p.rel_stderr is None else f"±{100 * p.rel_stderr:.1f}%",
                str(p.batches),
                f"{p.seconds:.1f}",
                "n/a" if p.cpu_pct is None else f"{p.cpu_pct:.0f}%",
                out.fmt_bytes(p.worker_mem_bytes) if p.num_workers else "-",
                ", ".join(notes),
            ]
        )
    bs = "set by the loader" if batch_size is None else str(batch_size)
    out.print_table(
        ["workers", "samples/s", "stderr", "batches", "seconds", "CPU", "mem/worker", ""],
        rows,
        title=f"Throughput by num_workers (batch_size={bs})",
        right=[True, True, True, True, True, True, True, False],
    )
    why = {
        "knee": "stopped past the knee (two counts in a row gained under 5%)",
        "budget": "stopped: the --budget was spent",
        "done": "measured every count",
        "interrupted": "interrupted: partial results",
    }[outcome.stopped]
    print(why)
    if rec is None:
        print("No recommendation: nothing was measured.")
        return
    r = result["recommended"]
    p = rec.point
    line = "Recommended so far (partial sweep)" if outcome.interrupted else "Recommended"
    line += f": num_workers={p.num_workers}"
    if batch_size is not None:
        line += f", batch_size={batch_size}"
    line += f": {out.fmt_rate(p.samples_per_s)} samples/s"
    if rec.best is not p:
        line += (
            f", {r['share_of_best']:.0%} of the best ({out.fmt_rate(rec.best.samples_per_s)} at "
            f"{rec.best.num_workers} workers) with fewer processes"
        )
    if r.get("speedup_vs_current") and current != p.num_workers:
        line += f"; {r['speedup_vs_current']:.1f}x your num_workers={current}"
    print(line)
    if p.num_workers:
        needs = []
        if rec.ram_bytes is not None:
            needs.append(
                f"{out.fmt_bytes(rec.ram_bytes)} of RAM ({p.num_workers} x "
                f"{out.fmt_bytes(p.worker_mem_bytes)} per worker)"
            )
        if rec.shm_bytes is not None:
            needs.append(
                f"{out.fmt_bytes(rec.shm_bytes)} of /dev/shm ({p.num_workers} x prefetch "
                f"{r['prefetch_factor']} x {out.fmt_bytes(outcome.batch_bytes)} per batch)"
            )
        if needs:
            print(f"Needs about {' and '.join(needs)}.")
        if rec.ram_bytes is None:
            print("Memory per worker was not measured at this count.")
    if outcome.stopped == "done" and rec.point is outcome.points[-1] and adaptive:
        print(
            "The rate still rose at the largest count tried: more workers may help "
            f"(try --workers {p.num_workers}:{2 * p.num_workers}:{max(1, p.num_workers // 4)})."
        )
    for note in r["warnings"]:
        print(f"Warning: {note}")


def _plot(
    plt: Any,
    path: str,
    points: list[sweep.Point],
    rec: sweep.Recommendation | None,
    batch_size: int | None,
) -> None:
    ordered = sorted(points, key=lambda p: p.num_workers)
    xs = [p.num_workers for p in ordered]
    ys = [p.samples_per_s for p in ordered]
    errs = [2 * p.samples_per_s * (p.rel_stderr or 0.0) for p in ordered]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label="measured (±2 stderr)")
    if rec is not None:
        floor = rec.best.samples_per_s * (1 - sweep.NEAR_BEST)
        ax.axhline(
            floor,
            color="gray",
            linestyle="--",
            linewidth=1,
            label=f"{1 - sweep.NEAR_BEST:.0%} of the best",
        )
        p = rec.point
        ax.scatter(
            [p.num_workers],
            [p.samples_per_s],
            s=180,
            marker="*",
            color="tab:red",
            zorder=5,
            label=f"recommended: {p.num_workers} workers",
        )
        ax.axvline(p.num_workers, color="tab:red", linewidth=0.8, alpha=0.5)
    knee = sweep.knee_index([q.samples_per_s for q in points])
    if knee is not None:
        k = points[knee]
        ax.annotate(
            "knee",
            xy=(k.num_workers, k.samples_per_s),
            xytext=(0, 18),
            textcoords="offset points",
            ha="center",
            arrowprops={"arrowstyle": "->", "color": "gray"},
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("num_workers")
    ax.set_ylabel("samples/s")
    bs = "set by the loader" if batch_size is None else batch_size
    ax.set_title(f"DataLoader throughput by worker count (batch_size={bs})")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
