"""``loadertune run --mode apply`` against ``--mode recommend`` on an unmodified script.

Runs tests/fixtures/run/latency_train.py (4 ms of waiting per sample, a 20 ms step, batch 32,
``num_workers=0`` in its code) without loadertune and under ``loadertune run`` in both modes,
interleaved, and reads the samples/s the script itself prints over its whole run (tuning time
included). The issue's target: apply at least 2x recommend; recommend should cost nothing.

Usage: python -m bench.run_speedup [--seconds 15] [--repeats 2]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "run" / "latency_train.py"
_RATE = re.compile(r"^samples/s: ([0-9.]+)$", re.MULTILINE)


def measure(mode: str, seconds: float) -> float:
    """samples/s the script reports under ``loadertune run --mode mode`` ("plain": without)."""
    script = [sys.executable, str(SCRIPT), "--seconds", str(seconds), "--no-val"]
    launcher = [sys.executable, "-m", "loadertune", "run", "--mode", mode, "--quiet", "--"]
    result = subprocess.run(
        script if mode == "plain" else launcher + script,
        capture_output=True,
        text=True,
        check=True,
    )
    match = _RATE.search(result.stdout)
    if match is None:
        raise RuntimeError(f"no 'samples/s:' line in the script's output:\n{result.stdout}\n{result.stderr}")
    return float(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="training time per run (15)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, interleaved (2)")
    args = parser.parse_args(argv)
    rates: dict[str, list[float]] = {"plain": [], "recommend": [], "apply": []}
    for _ in range(args.repeats):
        for mode in rates:
            rates[mode].append(measure(mode, args.seconds))
            print(f"{mode:>9}: {rates[mode][-1]:7.1f} samples/s", flush=True)
    plain = statistics.median(rates["plain"])
    recommend = statistics.median(rates["recommend"])
    apply = statistics.median(rates["apply"])
    print(f"recommend / plain = {recommend / plain:.3f} (what watching costs; 1 = nothing)")
    print(
        f"apply / recommend = {apply / recommend:.2f}x ({apply:.0f} vs {recommend:.0f} samples/s, "
        f"medians of {args.repeats} interleaved {args.seconds:g} s runs; target >= 2x)"
    )
    return 0 if apply >= 2 * recommend else 1


if __name__ == "__main__":
    raise SystemExit(main())
