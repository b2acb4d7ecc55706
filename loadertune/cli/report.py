"""``loadertune report RUN.jsonl``: what a tuned run saw and did, from its event log.

:func:`summarize_runs` is pure (event dicts in, plain dicts out); the rest prints or plots them.
A log file is appended to, so it may hold several runs; each starts with a ``start`` event.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from collections import Counter
from typing import Any

from loadertune.cli import EXIT_OK, UsageError
from loadertune.cli import _output as out

__all__ = ["run", "split_runs", "summarize_run", "summarize_runs"]

_CHANGE_KINDS = ("change", "revert", "fault")


def run(args: argparse.Namespace) -> int:
    """Runs ``loadertune report`` with parsed arguments; returns the exit status."""
    plt = None
    if args.plot:
        out.check_plot_path(args.plot)
        plt = out.require_pyplot()
    events = _read(args.log)
    runs = summarize_runs(events)
    if plt is not None:
        _plot(plt, args.plot, runs)
    if args.json:
        out.print_json({"file": args.log, "runs": runs})
        return EXIT_OK
    for i, r in enumerate(runs, 1):
        if i > 1:
            print()
        _render(r, i, len(runs))
    if args.plot:
        print(f"\nPlot written to {args.plot}")
    return EXIT_OK


def _read(path: str) -> list[dict[str, Any]]:
    from loadertune.events import read_events

    try:
        events = read_events(path)
    except FileNotFoundError:
        raise UsageError(
            f"no such file {path!r}; give the path passed to tune(log_file=...)"
        ) from None
    except IsADirectoryError:
        raise UsageError(f"{path!r} is a directory; give the JSONL event log file") from None
    except PermissionError:
        raise UsageError(f"{path!r} cannot be read (permission denied)") from None
    except UnicodeDecodeError:
        raise UsageError(
            f"{path!r} is not text; give the JSONL event log written by tune(log_file=...)"
        ) from None
    except ValueError as exc:
        raise UsageError(f"{exc}; is this an event log written by tune(log_file=...)?") from None
    if not events:
        raise UsageError(
            f"{path!r} holds no events; is this an event log written by tune(log_file=...)?"
        )
    return events


def split_runs(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Splits a log's events into runs, each from one ``start`` event to the next."""
    runs: list[list[dict[str, Any]]] = []
    for event in events:
        if event.get("kind") == "start" or not runs:
            runs.append([])
        runs[-1].append(event)
    return runs


def summarize_runs(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summarizes every run in a log (see :func:`summarize_run`)."""
    return [summarize_run(r) for r in split_runs(events)]


def summarize_run(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Summarizes one run's events.

    Returns:
        A JSON-ready dict: ``mode``, ``started`` (ISO time), ``duration_s``, ``initial_config``,
        ``final_config``, ``windows``, ``periods`` (consecutive windows with one configuration:
        ``from_s``, ``to_s``, ``config``, ``windows``, ``samples_per_s``, ``wait_share``,
        ``diagnosis``), ``changes`` (each with ``at_s``, ``kind``, ``changes``, ``reason``,
        ``before_samples_per_s``, ``after_samples_per_s``, ``outcome``), ``recommendations``,
        ``retunes``, ``first_samples_per_s``, ``last_samples_per_s``, ``speedup`` (from the run's
        summary when it closed, else from its first and last windows: ``throughput_from`` says
        which), and the raw
        ``series`` of windows (``t_s``, ``samples_per_s``, ``wait_share``, ``num_workers``).
    """
    start = next((e for e in events if e.get("kind") == "start"), None)
    t0 = float((start or events[0]).get("time", 0.0))
    windows = [
        e for e in events if e.get("kind") == "window" and isinstance(e.get("metrics"), dict)
    ]
    summary = next((e for e in reversed(events) if e.get("kind") == "summary"), None)

    def at(e: dict[str, Any]) -> float:
        return round(float(e.get("time", t0)) - t0, 3)

    series = [
        {
            "t_s": at(w),
            "step": w.get("step"),
            "samples_per_s": _num(w["metrics"].get("samples_per_s")),
            "wait_share": _num(w["metrics"].get("wait_share")),
            "num_workers": (w.get("config") or {}).get("num_workers"),
            "batch_size": (w.get("config") or {}).get("batch_size"),
            "diagnosis": (w.get("diagnosis") or {}).get("kind"),
        }
        for w in windows
    ]
    rates = [s["samples_per_s"] for s in series if s["samples_per_s"] is not None]
    # The run's own figures when it closed (the steady pace before the first change and after
    # the last, the same numbers its summary line logged), else the first and last windows.
    ran = summary or {}
    if _num(ran.get("first_samples_per_s")) and _num(ran.get("last_samples_per_s")):
        first, last = _num(ran["first_samples_per_s"]), _num(ran["last_samples_per_s"])
        basis = "summary"
    else:
        first = rates[0] if rates else None
        last = rates[-1] if rates else None
        basis = "windows"
    initial = (start or {}).get("config") or (windows[0].get("config") if windows else None)
    final = (summary or {}).get("final_config") or (
        windows[-1].get("config") if windows else initial
    )
    return {
        "mode": (start or {}).get("mode"),
        "started": datetime.datetime.fromtimestamp(t0).isoformat(timespec="seconds")
        if start
        else None,
        "gpu": (start or {}).get("gpu"),
        "usable_cpus": (start or {}).get("usable_cpus"),
        "duration_s": round(float(events[-1].get("time", t0)) - t0, 3),
        "initial_config": initial,
        "final_config": final,
        "windows": len(windows),
        # A change whose workers started in the background begins to run at its switch.
        "periods": _periods(windows, [at(e) for e in events if e.get("kind") in (*_CHANGE_KINDS, "switch")], at),
        "changes": _changes(events, windows, at),
        "recommendations": _recommendations(events, at),
        "retunes": sum(1 for e in events if e.get("kind") == "retune"),
        "first_samples_per_s": first,
        "last_samples_per_s": last,
        "speedup": round(last / first, 3) if first and last else None,
        "throughput_from": basis,
        "finished": summary is not None,
        "series": series,
    }


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.fmean(known), 3) if known else None


def _periods(windows: list[dict[str, Any]], change_s: list[float], at: Any) -> list[dict[str, Any]]:
    periods: list[dict[str, Any]] = []
    group: list[dict[str, Any]] = []

    def close() -> None:
        if not group:
            return
        kinds = Counter((w.get("diagnosis") or {}).get("kind") for w in group)
        # A period starts where the previous one ended, or at the change that began it.
        begin = periods[-1]["to_s"] if periods else 0.0
        begin = max([begin, *(t for t in change_s if t <= at(group[0]))])
        periods.append(
            {
                "from_s": begin,
                "to_s": at(group[-1]),
                "config": group[0].get("config"),
                "windows": len(group),
                "samples_per_s": _mean([_num(w["metrics"].get("samples_per_s")) for w in group]),
                "wait_share": _mean([_num(w["metrics"].get("wait_share")) for w in group]),
                "diagnosis": kinds.most_common(1)[0][0],
            }
        )

    for w in windows:
        if group and w.get("config") != group[-1].get("config"):
            close()
            group = []
        group.append(w)
    close()
    return periods


def _changes(
    events: list[dict[str, Any]], windows: list[dict[str, Any]], at: Any
) -> list[dict[str, Any]]:
    """Each change with the throughput of the windows before it and of those after it."""
    changes = []
    for i, e in enumerate(events):
        if e.get("kind") not in _CHANGE_KINDS:
            continue
        t = float(e.get("time", 0.0))
        before_cfg, after_cfg = e.get("before") or {}, e.get("after") or {}
        prior = [w for w in windows if float(w.get("time", 0.0)) <= t]
        # "After" is the new configuration's windows, up to the next change.
        nxt = next(
            (float(x.get("time", 0.0)) for x in events[i + 1 :] if x.get("kind") in _CHANGE_KINDS),
            float("inf"),
        )
        later = [
            w
            for w in windows
            if t < float(w.get("time", 0.0)) <= nxt and w.get("config") == after_cfg
        ]
        outcome = None
        if e.get("kind") == "change":
            verdict = next(
                (
                    x.get("kind")
                    for x in events[i + 1 :]
                    if x.get("kind") in ("keep", "revert", "change", "fault", "abandon")
                ),
                None,
            )
            outcome = {"keep": "kept", "revert": "reverted", "abandon": "given up before its workers started"}.get(
                verdict or ""
            )
        changes.append(
            {
                "at_s": at(e),
                "step": e.get("step"),
                "kind": e.get("kind"),
                "changes": {
                    k: [before_cfg.get(k), v]
                    for k, v in after_cfg.items()
                    if before_cfg.get(k) != v
                },
                "reason": e.get("reason") or e.get("error"),
                "forced": bool(e.get("forced")),
                "before_samples_per_s": _num(prior[-1]["metrics"].get("samples_per_s"))
                if prior
                else None,
                "after_samples_per_s": _mean(
                    [_num(w["metrics"].get("samples_per_s")) for w in later]
                ),
                "outcome": outcome,
                "switched_at_s": next(
                    (at(x) for x in events[i + 1 :] if x.get("kind") == "switch" and float(x.get("time", 0.0)) <= nxt),
                    None,
                ),
                "cause": e.get("cause"),
            }
        )
    return changes


def _recommendations(events: list[dict[str, Any]], at: Any) -> list[dict[str, Any]]:
    recs = []
    for e in events:
        if e.get("kind") != "recommendation":
            continue
        rec = e.get("recommendation") or {}
        recs.append(
            {
                "at_s": at(e),
                "step": e.get("step"),
                "changes": rec.get("changes") or {},
                "reason": rec.get("reason"),
                "expected_speedup": _num(rec.get("expected_speedup")),
                "lr_factor": _num(rec.get("lr_factor")),
                "diagnosis": (e.get("diagnosis") or {}).get("summary"),
                "samples_per_s": _num((e.get("metrics") or {}).get("samples_per_s")),
            }
        )
    return recs


# ---------------------------------------------------------------------------------------------
# Output


def _cfg(config: dict[str, Any] | None) -> list[str]:
    c = config or {}
    extra = [name for name in ("pin_memory", "persistent_workers") if c.get(name)]
    return [
        str(c.get("num_workers", "?")),
        str(c.get("batch_size", "?")),
        "-" if c.get("prefetch_factor") is None else str(c["prefetch_factor"]),
        ", ".join(extra),
    ]


def _diff(changes: dict[str, list[Any]]) -> str:
    return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()) or "no setting"


def _render(r: dict[str, Any], index: int, count: int) -> None:
    head = f"Run {index} of {count}" if count > 1 else "Run"
    bits = [f"{r['mode'] or 'unknown'} mode"]
    if r["started"]:
        bits.append(f"started {r['started']}")
    bits.append(f"{r['duration_s']:.1f} s, {r['windows']} windows")
    if r["gpu"]:
        bits.append(f"GPU {r['gpu']}")
    if r["usable_cpus"]:
        bits.append(f"{r['usable_cpus']} usable CPUs")
    print(
        f"{head}: {', '.join(bits)}"
        + ("" if r["finished"] else " (no summary: the run did not close)")
    )
    print()
    rows = [
        [
            f"{p['from_s']:.1f}",
            f"{p['to_s']:.1f}",
            *_cfg(p["config"]),
            str(p["windows"]),
            out.fmt_rate(p["samples_per_s"]),
            out.fmt_pct(p["wait_share"]),
            str(p["diagnosis"]),
        ]
        for p in r["periods"]
    ]
    if rows:
        out.print_table(
            [
                "from s",
                "to s",
                "workers",
                "batch",
                "prefetch",
                "other",
                "windows",
                "samples/s",
                "waiting",
                "diagnosis",
            ],
            rows,
            title="Configurations over time (windows with one configuration)",
            right=[True, True, True, True, True, False, True, True, True, False],
        )
    else:
        print("No measurement window closed in this run.")
    if r["changes"]:
        print("\nChanges")
        for c in r["changes"]:
            before = out.fmt_rate(c["before_samples_per_s"])
            rates = f"{before} -> {out.fmt_rate(c['after_samples_per_s'])} samples/s"
            tag = f" ({c['outcome']})" if c["outcome"] else ""
            label = {
                "change": "reconfigure" if c["forced"] else "change",
                "revert": "revert",
                "fault": "start failed" if c.get("cause") == "start" else "fault",
            }[c["kind"]]
            if c.get("switched_at_s") is not None:
                tag += f" (its workers started in the background; running from {c['switched_at_s']:.1f} s)"
            print(f"  {c['at_s']:6.1f} s  {label}: {_diff(c['changes'])}: {rates}{tag}")
            if c["reason"]:
                print(f"            {c['reason']}")
    if r["recommendations"]:
        print("\nRecommendations")
        for rec in r["recommendations"]:
            gain = f" (expected ~{rec['expected_speedup']:.1f}x)" if rec["expected_speedup"] else ""
            lr = f"; scale the learning rate by {rec['lr_factor']:.3g}" if rec["lr_factor"] else ""
            print(f"  {rec['at_s']:6.1f} s  {_diff(rec['changes'])}{gain}{lr}")
            if rec["reason"]:
                print(f"            {rec['reason']}")
    if r["retunes"]:
        print(f"\nRe-tuned {r['retunes']} time(s) after throughput or waiting drifted.")
    if r["first_samples_per_s"] and r["last_samples_per_s"]:
        first, last = out.fmt_rate(r["first_samples_per_s"]), out.fmt_rate(r["last_samples_per_s"])
        if r.get("throughput_from") != "summary":
            pace = f"{first} samples/s in the first window, {last} in the last ({r['speedup']:.2f}x)"
        elif r["changes"]:
            pace = (
                f"{first} samples/s steady before the first change, {last} after the last "
                f"({r['speedup']:.2f}x, as the run's summary)"
            )
        else:
            pace = f"{last} samples/s steady (as the run's summary)"
        print(f"\nThroughput: {pace}; final config: {_describe(r['final_config'])}.")


def _describe(config: dict[str, Any] | None) -> str:
    return " ".join(f"{k}={v}" for k, v in (config or {}).items()) or "unknown"


def _plot(plt: Any, path: str, runs: list[dict[str, Any]]) -> None:
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 3.2 * len(runs)), dpi=110, squeeze=False)
    for i, (ax, r) in enumerate(zip(axes[:, 0], runs, strict=True)):
        pts = [
            (s["t_s"], s["samples_per_s"]) for s in r["series"] if s["samples_per_s"] is not None
        ]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                markersize=3,
                label="samples/s per window",
            )
        colors = {"change": "tab:green", "revert": "tab:orange", "fault": "tab:red"}
        for c in r["changes"]:
            ax.axvline(c["at_s"], color=colors[c["kind"]], linestyle="--", linewidth=1)
            ax.annotate(
                f"{c['kind']}: "
                + ", ".join(
                    f"{k}={b}" for k, (_a, b) in c["changes"].items() if k != "prefetch_factor"
                ),
                xy=(c["at_s"], 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                color=colors[c["kind"]],
            )
        for rec in r["recommendations"]:
            if rec["samples_per_s"] is not None:
                ax.scatter(
                    [rec["at_s"]], [rec["samples_per_s"]], marker="^", color="tab:purple", zorder=5
                )
        title = f"Run {i + 1}" if len(runs) > 1 else "Run"
        ax.set_title(f"{title}: {r['mode'] or 'unknown'} mode")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("samples/s")
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        if pts:
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
