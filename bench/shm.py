"""A latency-bound job with 19 MB batches in Docker's default 64 MiB /dev/shm (issue 14).

Each run is a separate process in a private mount namespace with a fresh 64 MiB tmpfs on
/dev/shm (needs root and ``unshare``). Static configurations show where the plain DataLoader
dies; apply mode must not crash and must reach >= 80% of the best static that does not.

The job runs twice: a loop that never pauses, and the same loop pausing once mid-epoch (an
evaluation, a checkpoint save) while it holds a batch. A pause lets every worker finish its
prefetched batches into /dev/shm: what survives a loop that never pauses may not survive that.

    python -m bench.shm [--samples 1920] [--pause-s 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_JOB = r'''
import json, sys, time
import torch
from torch.utils.data import DataLoader, Dataset

N, MODE, WORKERS, PREFETCH, PAUSE = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])

class Images(Dataset):  # 3x224x224 float32, 2 ms of I/O latency each: 32 per batch = 19 MB
    def __len__(self):
        return N
    def __getitem__(self, i):
        time.sleep(0.002)
        x = torch.zeros(3, 224, 224)
        x[0, 0, 0] = i
        return x

kw = {"num_workers": WORKERS}
if WORKERS:
    kw["prefetch_factor"] = PREFETCH
loader = DataLoader(Images(), batch_size=32, **kw)
if MODE != "static":
    import loadertune
    loader = loadertune.tune(loader, mode=MODE, gpu=None, window_s=1.0)
seen = []
start = time.perf_counter()
try:
    for k, x in enumerate(loader):
        seen.extend(int(v) for v in x[:, 0, 0, 0])
        time.sleep(0.02)  # the training step
        if PAUSE and k == N // 64:
            time.sleep(PAUSE)  # an evaluation or a checkpoint save, mid-epoch
    status = "ok" if sorted(seen) == list(range(N)) else "WRONG SAMPLES"
except Exception as exc:
    status = "CRASH: " + str(exc).strip().splitlines()[-1][:90]
elapsed = time.perf_counter() - start
final = getattr(loader, "config", None)
if hasattr(loader, "close"):
    loader.close()
print(json.dumps({"status": status, "samples_per_s": len(seen) / elapsed,
                  "final": final.describe() if final is not None else None}))
'''


def run(samples: int, mode: str, workers: int, prefetch: int, pause_s: float, script: str) -> dict:
    cmd = (
        f"mount -t tmpfs -o size=64m tmpfs /dev/shm && "
        f"exec {sys.executable} {script} {samples} {mode} {workers} {prefetch} {pause_s}"
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, env=env, timeout=600)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:90]
        return {"status": f"CRASH (exit {proc.returncode}): {tail}", "samples_per_s": 0.0, "final": None}
    return json.loads(lines[-1])


def table(samples: int, pause_s: float, script: str) -> tuple[list[tuple[str, dict]], bool]:
    """Runs every configuration on one job; prints its table; returns the rows and the verdict."""
    rows = []
    for workers, prefetch in [(0, 0), (1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (6, 2)]:
        rows.append((f"static {workers} x {prefetch or '-'}", run(samples, "static", workers, prefetch, pause_s, script)))
    rows.append(("loadertune recommend (0 workers)", run(samples, "recommend", 0, 0, pause_s, script)))
    rows.append(("loadertune apply (from 0 workers)", run(samples, "apply", 0, 0, pause_s, script)))
    best = max((r["samples_per_s"] for name, r in rows if name.startswith("static") and r["status"] == "ok"), default=0.0)
    print(f"{'run':36} {'samples/s':>10} {'of best':>8}  status / final config")
    for name, r in rows:
        # A crashed run's rate is up to its crash: no share of a job it did not finish.
        share = f"{r['samples_per_s'] / best:8.0%}" if best and r["status"] == "ok" else f"{'-':>8}"
        print(f"{name:36} {r['samples_per_s']:10.0f} {share}  {r['status']}" + (f" / {r['final']}" if r["final"] else ""))
    apply = rows[-1][1]
    ok = bool(apply["status"] == "ok" and best and apply["samples_per_s"] >= 0.8 * best)
    print(f"apply mode: {'PASS' if ok else 'MISS'} (no crash, >= 80% of the best static that does not crash)")
    return rows, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1920)
    parser.add_argument("--pause-s", type=float, default=1.0, help="the pausing job's one pause, seconds")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.shm needs root for a private /dev/shm (unshare -m)")
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "job.py")
        with open(script, "w") as f:
            f.write(_JOB)
        print("## A loop that never pauses\n")
        table(args.samples, 0.0, script)
        print(f"\n## The same loop pausing {args.pause_s:g} s once mid-epoch (an evaluation, a checkpoint)\n")
        table(args.samples, args.pause_s, script)


if __name__ == "__main__":
    main()
