"""``loadertune demo``: the tuner, live, on a simulated training run that starves for data.

The dataset stands in for files read over the network: each sample waits a few milliseconds and
costs almost no CPU, so the load scales with workers well past the core count. The GPU is
:class:`loadertune.sim.SimulatedGpu`. The loader starts at ``num_workers=0``, as most first
scripts do, and ``loadertune.tune(mode="apply")`` rebuilds it live.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch.utils.data import Dataset

from loadertune.cli import EXIT_OK, UsageError
from loadertune.cli import _output as out

__all__ = ["LatencyBoundDataset", "run", "summarize"]

#: Window length of the demo's tuner: shorter than the library's default so the change shows
#: within seconds.
WINDOW_S = 1.0
#: Windows averaged for the "after" rate.
AFTER_WINDOWS = 3
#: Status line refreshes per second.
STATUS_HZ = 2.0
#: Shortest run in which a window closes, a change is tried and judged.
MIN_SECONDS = 5.0


class LatencyBoundDataset(Dataset):
    """A map-style dataset whose samples each wait ``sample_s`` seconds, like a network read.

    Args:
        sample_s: Wait per sample, in seconds.
        length: Number of samples.
        features: Values per sample.
    """

    def __init__(self, sample_s: float, length: int = 1_000_000, features: int = 16) -> None:
        self.sample_s = sample_s
        self.length = length
        self.features = features

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.sample_s)
        return torch.full((self.features,), float(index % 1000))


def run(args: argparse.Namespace) -> int:
    """Runs ``loadertune demo`` with parsed arguments; returns the exit status."""
    if args.seconds < MIN_SECONDS:
        raise UsageError(
            f"--seconds {args.seconds:g} is too short to see the tuner work; "
            f"give {MIN_SECONDS:g} or more (default 30)"
        )
    from torch.utils.data import DataLoader

    import loadertune
    from loadertune.sim import SimulatedGpu

    gpu = SimulatedGpu(step_time_s=args.step_ms / 1000.0)
    dataset = LatencyBoundDataset(args.sample_ms / 1000.0)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0)
    status = out.StatusLine(enabled=not args.json)
    try:
        tuned = loadertune.tune(
            loader,
            mode="apply",
            gpu=gpu,
            log_file=args.log_file,
            window_s=WINDOW_S,
            sinks=(lambda event: _announce(event, status),),
        )
    except ValueError as exc:  # a log file in a directory that does not exist
        raise UsageError(str(exc)) from None
    if not args.json:
        print(
            f"Simulated training: {args.step_ms:g} ms GPU step, batch_size={args.batch_size}, a "
            f"dataset that waits {args.sample_ms:g} ms per sample (like reading files over the "
            "network). Starting at num_workers=0; loadertune tunes it live for "
            f"{args.seconds:g} s.\n",
            flush=True,
        )
    torch.manual_seed(0)
    start = time.monotonic()
    samples = 0
    try:
        with status:
            samples = _train(tuned, gpu, args.seconds, status, start)
    finally:
        tuned.close()
    elapsed = time.monotonic() - start
    windows = [e.data for e in tuned.events if e.kind == "window"]
    result = summarize(windows, tuned, samples, elapsed, args)
    if args.json:
        out.print_json(result)
    else:
        _render(result)
    return EXIT_OK


def _train(tuned: Any, gpu: Any, seconds: float, status: out.StatusLine, start: float) -> int:
    """The training loop: epochs until ``seconds`` pass. Returns the samples trained on."""
    samples = 0
    recent: list[tuple[float, int]] = [(start, 0)]
    next_draw = start
    while True:
        for batch in tuned:
            gpu.step(len(batch))
            samples += len(batch)
            now = time.monotonic()
            if now >= next_draw:
                next_draw = now + 1.0 / STATUS_HZ
                recent.append((now, samples))
                # The rate over about the last second: the live figure, not the run's average.
                while len(recent) > 2 and now - recent[1][0] >= 1.0:
                    recent.pop(0)
                t0, s0 = recent[0]
                rate = (samples - s0) / (now - t0) if now > t0 else 0.0
                status.update(_status_text(now - start, rate, tuned))
            if now - start >= seconds:
                return samples


def _status_text(elapsed: float, rate: float, tuned: Any) -> str:
    wait = tuned.metrics.wait_share if tuned.metrics is not None else None
    return (
        f"{elapsed:5.1f} s  {out.fmt_rate(rate):>6} samples/s  waiting {out.fmt_pct(wait):>4}  "
        f"num_workers={tuned.config.num_workers}  rebuilds={tuned.rebuilds}"
    )


def _announce(event: Any, status: out.StatusLine) -> None:
    """Prints the tuner's decisions above the status line as they happen."""
    d = event.data
    if event.kind == "change":
        before, after = d.get("before", {}), d.get("after", {})
        diff = ", ".join(
            f"{k} {before.get(k)} -> {v}" for k, v in after.items() if before.get(k) != v
        )
        status.message(f"change: {diff} ({d.get('reason', '')})")
    elif event.kind in ("keep", "revert", "retune"):
        status.message(f"{event.kind}: {d.get('reason', '')}")
    elif event.kind == "fault":
        status.message(f"fault: {d.get('error', '')}")


def summarize(
    windows: list[dict[str, Any]], tuned: Any, samples: int, elapsed: float, args: Any
) -> dict[str, Any]:
    """The before/after numbers of a demo run (pure apart from reading ``tuned``).

    Before is the first window (the loader as given); after is the mean of the last
    :data:`AFTER_WINDOWS` windows.
    """
    rates = [w["metrics"]["samples_per_s"] for w in windows]
    before = rates[0] if rates else None
    tail = rates[-AFTER_WINDOWS:] if len(rates) > 1 else []
    after = statistics.fmean(tail) if tail else None
    changes = [(e.kind, e.data) for e in tuned.events if e.kind in ("change", "revert", "fault")]
    return {
        "before_samples_per_s": None if before is None else round(before, 1),
        "after_samples_per_s": None if after is None else round(after, 1),
        "speedup": round(after / before, 2) if before and after else None,
        "initial_config": windows[0]["config"] if windows else None,
        "final_config": tuned.config.to_dict(),
        "rebuilds": tuned.rebuilds,
        "changes": [
            {
                "kind": kind,
                "before": c.get("before"),
                "after": c.get("after"),
                "reason": c.get("reason") or c.get("error"),
            }
            for kind, c in changes
        ],
        "windows": len(windows),
        "final_diagnosis": None if tuned.diagnosis is None else tuned.diagnosis.kind,
        "samples": samples,
        "seconds": round(elapsed, 2),
        "mean_samples_per_s": round(samples / elapsed, 1) if elapsed > 0 else None,
        "settings": {
            "step_ms": args.step_ms,
            "sample_ms": args.sample_ms,
            "batch_size": args.batch_size,
            "window_s": WINDOW_S,
        },
        "log_file": args.log_file,
    }


def _render(r: dict[str, Any]) -> None:
    print()
    if r["before_samples_per_s"] is None or r["after_samples_per_s"] is None:
        print("Too few windows closed to compare; run longer (--seconds 30).")
        return
    cfg = r["final_config"]
    out.print_table(
        ["", "samples/s", "num_workers"],
        [
            [
                "before (first window)",
                out.fmt_rate(r["before_samples_per_s"]),
                str((r["initial_config"] or {}).get("num_workers")),
            ],
            [
                f"after (last {AFTER_WINDOWS} windows)",
                out.fmt_rate(r["after_samples_per_s"]),
                str(cfg["num_workers"]),
            ],
        ],
        title="Before and after",
        right=[False, True, True],
    )
    print(
        f"{r['speedup']:.1f}x the samples/s after {r['rebuilds']} rebuild(s), "
        f"in {r['seconds']:.0f} s; final config: num_workers={cfg['num_workers']}, "
        f"prefetch_factor={cfg['prefetch_factor']}, "
        f"batch_size={cfg['batch_size']}."
    )
    if r["log_file"]:
        print(f"Event log: {r['log_file']} (try: loadertune report {r['log_file']})")
