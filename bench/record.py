"""Records labelled diagnosis windows from short real jobs: ``python -m bench.record``.

Every job is a real ``DataLoader`` (real worker processes, the real psutil host source) wrapped by
``loadertune.tune(..., mode="recommend")``, so the configuration never changes under it, driven
by a training loop whose step is a ``loadertune.sim.SimulatedGpu`` (the only simulated part: GPU
utilization and device memory). Each job runs in its own Python process; jobs that need a small
``/dev/shm`` run in a private mount namespace with a fresh tmpfs on it (``unshare -m``, as
``bench/shm.py`` does; root only). Every window the tuner measures is written with its job's
label to ``bench/recorded/windows.jsonl``; ``bench/micro.py`` replays ``diagnose`` on them.

The jobs were written for this recorder and none of their windows were used to choose
``loadertune.diagnosis.Thresholds``. Labels are fixed by how each job is built, before anything
is measured — never by what ``diagnose`` says:

- ``data_starved``: every sample sleeps (a remote read: no CPU), and one worker's batch takes
  longer than the step, so the loop waits and more workers would feed it faster (the loader uses
  fewer workers than the sleep needs; for variants with CPU burners, the loading still waits on
  I/O, so more workers still help). Includes a moderate case: at ``num_workers=0`` loading is
  serial with the step, so even a short load is time the loop waits and one worker would hide.
- ``cpu_bound``: samples are pure CPU work (a Pillow JPEG decode + resize + numpy normalisation,
  or numpy FFTs), their CPU time per batch divided by the workers is several times the step, and
  there are at least as many workers as usable CPUs: the job fills the cores by itself and more
  workers cannot add CPU.
- ``memory_bound``: (a) ``/dev/shm`` (a private 64 MiB tmpfs) is more than 90% taken — by a
  leftover file from "another process", or by the loader's own batches in flight — so one more
  worker or a larger ``prefetch_factor`` dies of a bus error; or (b) the simulated GPU's step
  uses 96-98% of device memory at the job's batch size, so a larger batch runs out of memory.
  Host RAM is not recorded: it would need a cgroup memory limit on this job's process (the
  session's cgroup belongs to the machinery that runs it) or exhausting a shared machine's RAM.
- ``batch_headroom``: the loader keeps up (cheap in-memory samples), device memory is mostly
  free, and the simulated step has a fixed per-step host overhead so that the GPU is busy less
  than half of each step by construction (14-44%): a larger batch amortises the overhead.
- ``balanced``: the loader keeps up by construction (cheap samples, or enough workers for the
  per-sample cost, or CPU work that the workers finish well inside the step) and the GPU is busy
  most of each step; nothing limits the loop but the step itself.

Each window line holds the job's label and why, the configuration, the metrics
(``WindowMetrics.to_dict()``), the ``Environment`` the session passed to ``diagnose``, the batch
bytes the session measured, what ``diagnose`` said when it was recorded, and the host's state
(load average, CPU burners, /dev/shm size and fill). The first line is a header.

    python -m bench.record                  # every job (~4 min on 2 cores)
    python -m bench.record --only cpu-jpeg-w2,mem-gpu-97 --out /tmp/w.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "recorded" / "windows.jsonl"
_MiB = 2**20
_GiB = 2**30
_LENGTH = 1_000_000

#: Why a job's label is right, by construction (also written to the file's header line).
LABEL_RULES: dict[str, str] = {
    "data_starved": "samples sleep (I/O, no CPU); one worker's batch takes longer than the step "
    "(or, at num_workers=0, loading is serial with the step), so the loop waits and more workers "
    "would feed it faster, CPU burners or not",
    "cpu_bound": "samples are pure CPU work; CPU time per batch / workers is several times the "
    "step and workers >= usable CPUs: the job fills the cores itself, more workers add no CPU",
    "memory_bound": "a private 64 MiB /dev/shm more than 90% taken (leftover file or the loader's "
    "own batches in flight): one more worker or prefetch slot is a bus error; or the simulated "
    "step uses 96-98% of device memory, so a larger batch runs out of memory",
    "batch_headroom": "cheap samples (the loader keeps up), device memory mostly free, and a fixed "
    "per-step overhead keeps the simulated GPU busy < 50% of each step by construction",
    "balanced": "the loader keeps up by construction and the simulated GPU is busy most of each "
    "step: only the step itself limits the loop",
}


# -- datasets (module level: workers are forked) --------------------------------------------------
class SleepSamples:
    """Each sample sleeps like a remote read (lognormal when ``sigma``), then returns a tensor."""

    def __init__(self, ms: float, sigma: float | None = None, shape: tuple[int, ...] = (3, 32, 32)) -> None:
        import numpy as np

        self.shape = shape
        if sigma is None:
            self.waits = np.full(4096, ms / 1e3)
        else:
            mu = math.log(ms / 1e3) - sigma**2 / 2
            self.waits = np.random.default_rng(1).lognormal(mu, sigma, 4096)

    def __len__(self) -> int:
        return _LENGTH

    def __getitem__(self, i: int) -> Any:
        import torch

        time.sleep(float(self.waits[i % len(self.waits)]))
        x = torch.zeros(self.shape)
        x.view(-1)[0] = float(i)
        return x


class CheapSamples:
    """Slices of an in-memory tensor: microseconds each."""

    def __init__(self, shape: tuple[int, ...] = (3, 32, 32), distinct: int = 512) -> None:
        import torch

        self.data = torch.randn(distinct, *shape, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return _LENGTH

    def __getitem__(self, i: int) -> Any:
        return self.data[i % len(self.data)]


class JpegSamples:
    """Decodes a JPEG (``px`` square), resizes it to ``out`` px, normalises it with numpy."""

    def __init__(self, px: int = 320, out: int = 224, images: int = 64) -> None:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        self.out = out
        self.blobs = []
        for _ in range(images):
            arr = rng.integers(0, 256, (px // 8, px // 8, 3), dtype=np.uint8)
            img = Image.fromarray(arr).resize((px, px), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=92)
            self.blobs.append(buf.getvalue())

    def __len__(self) -> int:
        return _LENGTH

    def __getitem__(self, i: int) -> Any:
        import numpy as np
        import torch
        from PIL import Image

        img = Image.open(io.BytesIO(self.blobs[i % len(self.blobs)])).convert("RGB")
        img = img.resize((self.out, self.out), Image.BICUBIC)
        a = np.asarray(img, dtype=np.float32) / 255.0
        a = (a - a.mean(axis=(0, 1))) / (a.std(axis=(0, 1)) + 1e-6)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


class FftSamples:
    """Numpy FFT feature extraction: ``rounds`` 2-D FFTs of a 128x128 array per sample."""

    def __init__(self, rounds: int = 12) -> None:
        self.rounds = rounds

    def __len__(self) -> int:
        return _LENGTH

    def __getitem__(self, i: int) -> Any:
        import numpy as np
        import torch

        a = np.random.default_rng(i % 997).standard_normal((128, 128)).astype(np.float32)
        for _ in range(self.rounds):
            a = np.abs(np.fft.ifft2(np.fft.fft2(a) * 0.5)).astype(np.float32)
        return torch.from_numpy(a[:32, :32].copy())


# -- jobs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One short real run with a label known by construction.

    Attributes:
        name: Unique name.
        label: The diagnosis kind it is built to be.
        why: How the label follows from the construction (figures of this job).
        dataset: ``(class name, kwargs)`` from this module.
        num_workers: Workers.
        batch_size: Batch size.
        step_ms: Simulated GPU busy time per sample (ms) times the batch, plus ``overhead_ms``.
        step_per_sample: True when ``step_ms`` is per sample, else per step.
        overhead_ms: Host overhead per step (GPU idle), ms.
        gpu_mem_share: Device memory the step uses at ``batch_size``, share of 16 GiB.
        prefetch_factor: Prefetch factor with workers (torch's default 2).
        burners: CPU-burning processes running alongside (another user's job).
        shm_mib: Size of a private /dev/shm (tmpfs in a new mount namespace), or None.
        shm_fill_mib: MiB of a leftover file written to that /dev/shm first.
        seconds: How long the loop runs.
    """

    name: str
    label: str
    why: str
    dataset: tuple[str, dict[str, Any]]
    num_workers: int
    batch_size: int
    step_ms: float
    step_per_sample: bool = False
    overhead_ms: float = 0.0
    gpu_mem_share: float = 0.3
    prefetch_factor: int | None = None
    burners: int = 0
    shm_mib: int | None = None
    shm_fill_mib: int = 0
    seconds: float = 7.0
    params: dict[str, Any] = field(default_factory=dict)


def _sleep(ms: float, sigma: float | None = None, shape: tuple[int, ...] = (3, 32, 32)) -> tuple[str, dict[str, Any]]:
    return ("SleepSamples", {"ms": ms, "sigma": sigma, "shape": shape})


_CHEAP = ("CheapSamples", {})
_JPEG = ("JpegSamples", {"px": 320, "out": 224})
_FFT = ("FftSamples", {"rounds": 12})

JOBS: tuple[Job, ...] = (
    # -- data_starved
    Job("ds-sleep-w0", "data_starved", "3 ms sleep x 32 = 96 ms per batch in the loop vs a 20 ms step",
        _sleep(3.0), 0, 32, 20.0),
    Job("ds-sleep-w1", "data_starved", "2 ms sleep x 32 = 64 ms per batch on 1 worker vs a 15 ms step",
        _sleep(2.0), 1, 32, 15.0),
    Job("ds-tail-w2", "data_starved", "lognormal sleep (mean 3 ms, sigma 1) x 16 = 48 ms per batch "
        "on 2 workers (24 ms each) vs a 10 ms step", _sleep(3.0, 1.0), 2, 16, 10.0),
    Job("ds-sleep-w1-burn", "data_starved", "as ds-sleep-w1 with 2 CPU burners: the host is busy but "
        "loading waits on I/O, so more workers still help", _sleep(2.0), 1, 32, 15.0, burners=2),
    Job("ds-sleep-w0-burn", "data_starved", "5 ms sleep x 8 = 40 ms per batch in the loop vs a 30 ms "
        "step, with 2 CPU burners", _sleep(5.0), 0, 8, 30.0, burners=2),
    Job("ds-moderate-w0", "data_starved", "0.7 ms sleep x 8 = 5.6 ms per batch serial with a 40 ms "
        "step (~12% waiting, the GPU otherwise fully busy): one worker would hide it",
        _sleep(0.7), 0, 8, 40.0),
    Job("ds-sleep-w3", "data_starved", "4 ms sleep x 32 = 128 ms per batch on 3 workers (43 ms each) "
        "vs a 20 ms step", _sleep(4.0), 3, 32, 20.0),
    # -- cpu_bound
    Job("cpu-jpeg-w2", "cpu_bound", "JPEG 320px decode+resize+normalise (~5-8 ms CPU) x 16 on 2 "
        "workers = 2 CPUs for ~40+ ms per batch vs a 5 ms step", _JPEG, 2, 16, 5.0),
    Job("cpu-jpeg-w3", "cpu_bound", "as cpu-jpeg-w2 at 3 workers on 2 CPUs, batch 32",
        _JPEG, 3, 32, 5.0),
    Job("cpu-fft-w2", "cpu_bound", "12 numpy 128x128 FFT round trips per sample (~5 ms CPU) x 8 on 2 "
        "workers vs a 5 ms step", _FFT, 2, 8, 5.0),
    Job("cpu-fft-w4", "cpu_bound", "as cpu-fft-w2 at 4 workers on 2 CPUs, batch 16, 2 ms step",
        _FFT, 4, 16, 2.0),
    Job("cpu-jpeg-w2-pf4", "cpu_bound", "as cpu-jpeg-w2 with prefetch_factor 4, batch 8",
        _JPEG, 2, 8, 3.0, prefetch_factor=4),
    # -- memory_bound
    Job("mem-shm-leftover-w2", "memory_bound", "private 64 MiB /dev/shm with a 59 MiB leftover "
        "file: < 8% free for the workers' batches", _sleep(1.0), 2, 16, 10.0,
        shm_mib=64, shm_fill_mib=59),
    Job("mem-shm-leftover-w1", "memory_bound", "private 64 MiB /dev/shm with a 60 MiB leftover "
        "file, 1 worker, cheap samples", _CHEAP, 1, 32, 15.0, shm_mib=64, shm_fill_mib=60),
    Job("mem-shm-inflight-w2", "memory_bound", "private 64 MiB /dev/shm, 4.8 MB batches "
        "(8 x 3x224x224 float32) made far faster than a 30 ms step, so 2 workers x prefetch 5 "
        "= 48 MB wait in /dev/shm beside the loop's batch (> 80% of it): a third worker is a bus "
        "error", ("CheapSamples", {"shape": (3, 224, 224), "distinct": 16}), 2, 8, 30.0,
        prefetch_factor=5, shm_mib=64),
    Job("mem-shm-inflight-w3", "memory_bound", "private 64 MiB /dev/shm, 4.8 MB batches, 3 "
        "workers x prefetch 3 = 43 MB queued beside the loop's batch and the one being made: a "
        "fourth worker is a bus error", ("CheapSamples", {"shape": (3, 224, 224), "distinct": 16}),
        3, 8, 30.0, prefetch_factor=3, shm_mib=64),
    Job("mem-gpu-97", "memory_bound", "the step uses 97% of the simulated 16 GiB at batch 64",
        _CHEAP, 0, 64, 30.0, gpu_mem_share=0.97),
    Job("mem-gpu-96-w2", "memory_bound", "the step uses 96% of device memory at batch 128, 2 "
        "workers", _CHEAP, 2, 128, 40.0, gpu_mem_share=0.96),
    Job("mem-gpu-98-hr", "memory_bound", "device memory 98% used although the GPU is busy only ~30% "
        "of each step: a larger batch would still run out of memory", _CHEAP, 0, 32, 0.3,
        step_per_sample=True, overhead_ms=22.0, gpu_mem_share=0.98),
    # -- batch_headroom
    Job("hr-14-w0", "batch_headroom", "0.2 ms/sample x 16 busy + 20 ms overhead: GPU busy 14% of "
        "each step; memory 20% used", _CHEAP, 0, 16, 0.2, step_per_sample=True, overhead_ms=20.0,
        gpu_mem_share=0.2),
    Job("hr-35-w2", "batch_headroom", "0.5 ms/sample x 16 + 15 ms overhead: busy 35%; 2 workers",
        _CHEAP, 2, 16, 0.5, step_per_sample=True, overhead_ms=15.0, gpu_mem_share=0.25),
    Job("hr-44-w0", "batch_headroom", "1 ms/sample x 16 + 20 ms overhead: busy 44% (near the 50% "
        "line)", _CHEAP, 0, 16, 1.0, step_per_sample=True, overhead_ms=20.0, gpu_mem_share=0.3),
    Job("hr-25-w1-burn", "batch_headroom", "0.25 ms/sample x 32 + 24 ms overhead: busy 25%, with 2 "
        "CPU burners", _CHEAP, 1, 32, 0.25, step_per_sample=True, overhead_ms=24.0,
        gpu_mem_share=0.15, burners=2),
    Job("hr-30-bs8", "batch_headroom", "0.8 ms/sample x 8 + 15 ms overhead: busy 30%, batch 8",
        _CHEAP, 0, 8, 0.8, step_per_sample=True, overhead_ms=15.0, gpu_mem_share=0.1),
    # -- balanced
    Job("bal-w0", "balanced", "cheap samples, 30 ms step all GPU-busy, memory 50% used",
        _CHEAP, 0, 32, 30.0, gpu_mem_share=0.5),
    Job("bal-sleep-w4", "balanced", "1 ms sleep x 16 = 16 ms per batch on 4 workers (4 ms each) vs "
        "a 25 ms step", _sleep(1.0), 4, 16, 25.0, gpu_mem_share=0.6),
    Job("bal-w0-burn", "balanced", "as bal-w0 with 2 CPU burners", _CHEAP, 0, 32, 30.0,
        gpu_mem_share=0.5, burners=2),
    Job("bal-overhead-w2", "balanced", "24 ms busy + 4 ms overhead per step (86% busy), memory 70%, "
        "2 workers", _CHEAP, 2, 64, 24.0, overhead_ms=4.0, gpu_mem_share=0.7),
    Job("bal-jpeg-w2", "balanced", "JPEG decode (~5-8 ms CPU) x 8 on 2 workers (~25-30 ms each) vs "
        "a 60 ms step: the CPU work finishes inside the step", _JPEG, 2, 8, 60.0, gpu_mem_share=0.4),
)


def get(name: str) -> Job:
    """The job called ``name``."""
    for job in JOBS:
        if job.name == name:
            return job
    raise ValueError(f"unknown job {name!r}; choose from {', '.join(j.name for j in JOBS)}")


def make_gpu(job: Job) -> Any:
    """The simulated GPU of ``job``: its step, overhead and device memory at the job's batch."""
    from loadertune.sim import SimulatedGpu

    total = 16 * _GiB
    per_sample_mem = job.gpu_mem_share * total / job.batch_size
    busy = (lambda b: job.step_ms / 1e3 * b) if job.step_per_sample else job.step_ms / 1e3
    return SimulatedGpu(
        step_time_s=busy,
        host_overhead_s=job.overhead_ms / 1e3,
        memory_bytes=lambda b: min(total, int(per_sample_mem * b)),
        total_memory_bytes=total,
    )


# -- one job, in its own process ------------------------------------------------------------------
def _run_job(job: Job) -> None:
    """Runs ``job`` here and prints one JSON line per window as it closes (a crash keeps them)."""
    import warnings

    import torch
    from torch.utils.data import DataLoader

    import loadertune

    if job.shm_fill_mib:
        # "Another process's" segment: written through, so tmpfs really holds its pages.
        with open("/dev/shm/leftover-segment", "wb") as f:
            block = b"\1" * _MiB
            for _ in range(job.shm_fill_mib):
                f.write(block)
    cls, kwargs = job.dataset
    dataset = globals()[cls](**kwargs)
    gpu = make_gpu(job)
    extra: dict[str, Any] = {}
    if job.num_workers and job.prefetch_factor:
        extra["prefetch_factor"] = job.prefetch_factor
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader = DataLoader(
            dataset,
            batch_size=job.batch_size,
            shuffle=True,
            num_workers=job.num_workers,
            generator=torch.Generator().manual_seed(0),
            **extra,
        )
    t0 = time.time()

    def sink(event: Any) -> None:
        if event.kind != "window":
            return
        d = event.data
        print(
            json.dumps(
                {
                    "window": {
                        "t_s": round(event.time - t0, 2),
                        "step": event.step,
                        "config": d["config"],
                        "metrics": d["metrics"],
                        "diagnosed_at_record": d["diagnosis"]["kind"],
                    }
                }
            ),
            flush=True,
        )

    tuned = loadertune.tune(loader, mode="recommend", gpu=gpu, window_s=1.5, sinks=(sink,))
    status = "ok"
    try:
        deadline = time.perf_counter() + job.seconds
        while time.perf_counter() < deadline:
            for batch in tuned:
                gpu.step(int(batch.shape[0]))
                del batch
                if time.perf_counter() >= deadline:
                    break
    except Exception as exc:  # a bus error kills the process instead; this is anything else
        status = f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else ''}"
    env = getattr(getattr(tuned, "_session", None), "environment", None)
    batch_bytes = getattr(getattr(tuned, "_session", None), "batch_bytes", None)
    tuned.close()
    print(
        json.dumps(
            {
                "done": {
                    "status": status,
                    "environment": dataclasses.asdict(env) if env is not None else None,
                    "batch_bytes": batch_bytes,
                }
            }
        ),
        flush=True,
    )


def _burners(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def record_job(job: Job) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs ``job`` in a child process; returns its window lines and a note on how it went."""
    cmd = [sys.executable, "-m", "bench.record", "--job", job.name]
    if job.shm_mib is not None:
        if os.geteuid() != 0 or not _which("unshare"):
            return [], {"job": job.name, "status": "skipped: a private /dev/shm needs root and unshare"}
        inner = " ".join(cmd)
        cmd = ["unshare", "-m", "sh", "-c",
               f"mount -t tmpfs -o size={job.shm_mib}m tmpfs /dev/shm && exec {inner}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load_start = [round(x, 2) for x in os.getloadavg()]
    burners = _burners(job.burners)
    try:
        time.sleep(0.5 if burners else 0.0)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=job.seconds + 120)
    finally:
        _stop(burners)
    load_end = [round(x, 2) for x in os.getloadavg()]
    windows, done = [], None
    for line in proc.stdout.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if "window" in obj:
            windows.append(obj["window"])
        elif "done" in obj:
            done = obj["done"]
    status = (done or {}).get("status") or (
        f"died (exit {proc.returncode}): "
        + ((proc.stderr.strip().splitlines() or ["?"])[-1][:120])
    )
    host = {
        "load_average_start": load_start,
        "load_average_end": load_end,
        "burners": job.burners,
        "shm_mib": job.shm_mib,
        "shm_fill_mib": job.shm_fill_mib,
    }
    lines = []
    for i, w in enumerate(windows):
        lines.append(
            {
                "job": job.name,
                "label": job.label,
                "why": job.why,
                "index": i,
                **w,
                "environment": (done or {}).get("environment"),
                "batch_bytes": (done or {}).get("batch_bytes"),
                "job_params": {
                    "dataset": [job.dataset[0], job.dataset[1]],
                    "num_workers": job.num_workers,
                    "batch_size": job.batch_size,
                    "prefetch_factor": job.prefetch_factor,
                    "step_ms": job.step_ms,
                    "step_per_sample": job.step_per_sample,
                    "overhead_ms": job.overhead_ms,
                    "gpu_mem_share": job.gpu_mem_share,
                    "seconds": job.seconds,
                },
                "host": host,
                "job_status": status,
            }
        )
    return lines, {"job": job.name, "status": status, "windows": len(windows)}


def _which(name: str) -> bool:
    return any(os.access(os.path.join(d, name), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def header(jobs: Sequence[Job], notes: Sequence[dict[str, Any]], elapsed_s: float) -> dict[str, Any]:
    """The file's first line: what was recorded, where, and why each label holds."""
    import psutil
    import torch

    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "header": {
            "what": "Windows measured by loadertune (recommend mode, real DataLoader workers, real "
            "psutil host source, SimulatedGpu for GPU signals) on short jobs whose limiting factor "
            "is known by construction; replayed by bench/micro.py's diagnosis accuracy. Not used "
            "to choose loadertune.diagnosis.Thresholds.",
            "command": "python -m bench.record " + " ".join(sys.argv[1:]),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "elapsed_s": round(elapsed_s, 1),
            "git_commit": _git_commit(),
            "machine": {
                "usable_cpus": len(os.sched_getaffinity(0)),
                "cpu_model": model,
                "ram_gib": round(psutil.virtual_memory().total / _GiB, 1),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
            "label_rules": LABEL_RULES,
            "not_recorded": "host RAM (memory_bound by ram_available_share): needs a cgroup memory "
            "limit on the job or exhausting the shared machine's RAM",
            "jobs": list(notes),
        }
    }


def _run_summary(h: dict[str, Any]) -> dict[str, Any]:
    return {k: h.get(k) for k in ("command", "date", "elapsed_s", "git_commit", "jobs")}


def main(argv: Sequence[str] | None = None) -> int:
    """Records every job (or ``--only`` some) to ``--out``; ``--job`` runs one job in-process."""
    p = argparse.ArgumentParser(prog="python -m bench.record", description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated job names")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    p.add_argument("--list", action="store_true", help="list the jobs and their labels")
    p.add_argument(
        "--append",
        action="store_true",
        help="add the new windows to the file's (every earlier window is kept; the header lists "
        "each recording run)",
    )
    args = p.parse_args(argv)
    if args.job:
        _run_job(get(args.job))
        return 0
    try:
        jobs = [get(n.strip()) for n in args.only.split(",")] if args.only else list(JOBS)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for j in jobs:
            print(f"{j.name:<22} {j.label:<15} {j.why}")
        return 0
    started = time.perf_counter()
    lines: list[dict[str, Any]] = []
    notes = []
    for job in jobs:
        got, note = record_job(job)
        kinds = [w["diagnosed_at_record"] for w in got]
        print(f"[record] {job.name:<22} {job.label:<15} {note['status']}: {len(got)} windows "
              f"{kinds}", flush=True)
        lines += got
        notes.append(note)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = header(jobs, notes, time.perf_counter() - started)
    run_id = head["header"]["date"]
    for line in lines:
        line["recorded"] = run_id
    if args.append and out.exists():
        old_lines = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
        old_head = next((x["header"] for x in old_lines if "header" in x), None)
        earlier = [x for x in old_lines if "header" not in x]
        runs = (old_head or {}).get("runs") or ([_run_summary(old_head)] if old_head else [])
        head["header"]["runs"] = [*runs, _run_summary(head["header"])]
        lines = earlier + lines
    else:
        head["header"]["runs"] = [_run_summary(head["header"])]
    with out.open("w") as f:
        f.write(json.dumps(head) + "\n")
        for line in lines:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
    print(f"[record] {len(lines)} windows from {len(jobs)} jobs -> {out} "
          f"({out.stat().st_size / 1024:.0f} KiB) in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
