"""Reading the signals as a person would: metrics and configuration in, a Diagnosis out.

``diagnose`` is a pure function. Its cut points follow the TensorFlow profiler's input-pipeline
analysis (under 5% of the time waiting on input is not input-bound, 5-20% moderately, 20% or more
highly) and PyTorch's profiler plugin (more workers above 5% DataLoader time, a larger batch below
50% GPU utilization).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from loadertune.config import LoaderConfig
from loadertune.metrics import WindowMetrics

__all__ = [
    "DIAGNOSIS_KINDS",
    "Diagnosis",
    "DiagnosisKind",
    "Environment",
    "Thresholds",
    "diagnose",
    "job_cpu_cores",
    "loader_cpu_share",
    "over_provisioned",
    "shm_needed_bytes",
]

DiagnosisKind = Literal["data_starved", "batch_headroom", "balanced", "cpu_bound", "memory_bound"]
#: Every kind a diagnosis can have.
DIAGNOSIS_KINDS: tuple[DiagnosisKind, ...] = (
    "balanced",
    "batch_headroom",
    "cpu_bound",
    "data_starved",
    "memory_bound",
)


@dataclass(frozen=True)
class Thresholds:
    """The cut points ``diagnose`` uses; each is reported in the evidence that it decided.

    Attributes:
        wait_share_starved: Waiting this share of the time or more is input-bound (5%).
        wait_share_high: Waiting this share or more is highly input-bound (20%).
        jitter_std_pct: Utilization spread (std between ticks) that counts as jitter.
        idle_share_jitter: Share of ticks near zero utilization that, with the spread, is jitter.
        cpu_saturated_pct: Busy share of the usable CPUs at which they count as saturated.
        low_util_pct: Mean utilization below which a steady GPU has batch headroom (50%).
        steady_std_pct: Utilization spread below which utilization counts as steady.
        gpu_mem_free_share_headroom: Free device memory share needed to suggest a larger batch.
        gpu_mem_free_share_min: Free device memory share below which the GPU is memory-bound.
        ram_available_share_min: Available RAM share below which the host is memory-bound.
        shm_free_share_min: Free /dev/shm share below which workers risk a bus error.
        loader_cpu_share_heavy: Share of a worker's time on the CPU from which loading counts as
            CPU work (below it, loading mostly waits on I/O).
        epoch_stall_factor: An epoch's first batch waiting this many times the usual wait (and
            ``epoch_stall_min_s`` or more) counts as a start-of-epoch stall.
        epoch_stall_min_s: See ``epoch_stall_factor``.
    """

    wait_share_starved: float = 0.05
    wait_share_high: float = 0.20
    jitter_std_pct: float = 25.0
    idle_share_jitter: float = 0.15
    cpu_saturated_pct: float = 90.0
    low_util_pct: float = 50.0
    steady_std_pct: float = 15.0
    gpu_mem_free_share_headroom: float = 0.45
    gpu_mem_free_share_min: float = 0.05
    ram_available_share_min: float = 0.10
    shm_free_share_min: float = 0.10
    loader_cpu_share_heavy: float = 0.5
    epoch_stall_factor: float = 5.0
    epoch_stall_min_s: float = 0.5


@dataclass(frozen=True)
class Environment:
    """What the diagnosis knows about the training job besides the metrics.

    Attributes:
        on_cuda: Whether the model trains on a CUDA device.
        has_conv: Whether the model has convolutions (cuDNN flags matter then).
        cudnn_benchmark: ``torch.backends.cudnn.benchmark``, None when unknown.
        cudnn_deterministic: ``torch.backends.cudnn.deterministic``, None when unknown.
        batch_bytes: Bytes of one collated batch, None until measured.
    """

    on_cuda: bool = False
    has_conv: bool = False
    cudnn_benchmark: bool | None = None
    cudnn_deterministic: bool | None = None
    batch_bytes: int | None = None


@dataclass(frozen=True)
class Diagnosis:
    """What limits the job, why, and what else is worth fixing.

    Attributes:
        kind: One of ``DIAGNOSIS_KINDS``.
        summary: One sentence a person reads: the finding and the numbers behind it.
        evidence: The numbers and the thresholds that decided the kind.
        advice: Further findings, each a sentence saying what to change and why.
    """

    kind: DiagnosisKind
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    advice: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The diagnosis as a JSON-ready dict."""
        return dataclasses.asdict(self)


def diagnose(
    metrics: WindowMetrics,
    config: LoaderConfig,
    environment: Environment | None = None,
    thresholds: Thresholds | None = None,
) -> Diagnosis:
    """Decides what limits the training job over one window.

    Args:
        metrics: One window's measurements.
        config: The loader configuration in use during the window.
        environment: What is known about the job besides the metrics.
        thresholds: Cut points; the defaults follow the profilers' published ones.

    Returns:
        A :class:`Diagnosis` whose ``evidence`` holds the numbers and thresholds that decided it.
    """
    env = environment or Environment()
    t = thresholds or Thresholds()
    m = metrics
    ev: dict[str, Any] = {
        "wait_share": round(m.wait_share, 4),
        "wait_share_starved": t.wait_share_starved,
        "samples_per_s": round(m.samples_per_s, 2),
    }
    if m.gpu_util_mean_pct is not None:
        ev.update(
            gpu_util_mean_pct=round(m.gpu_util_mean_pct, 1),
            gpu_util_std_pct=round(m.gpu_util_std_pct or 0.0, 1),
            gpu_idle_share=round(m.gpu_idle_share or 0.0, 3),
        )
    if m.cpu_pct is not None:
        ev.update(cpu_pct=round(m.cpu_pct, 1), cpu_saturated_pct=t.cpu_saturated_pct, usable_cpus=m.usable_cpus)
    advice = _advice(m, config, env, t)

    memory = _memory_limit(m, config, env, t, ev)
    if memory is not None:
        return Diagnosis("memory_bound", memory, ev, advice)

    jitter = (
        m.gpu_util_std_pct is not None
        and m.gpu_util_std_pct >= t.jitter_std_pct
        and (m.gpu_idle_share or 0.0) >= t.idle_share_jitter
    )
    if jitter:
        ev.update(jitter_std_pct=t.jitter_std_pct, idle_share_jitter=t.idle_share_jitter)
    free = m.gpu_mem_free_share
    steady_low = (
        m.gpu_util_mean_pct is not None
        and m.gpu_util_mean_pct < t.low_util_pct
        and (m.gpu_util_std_pct or 0.0) < t.steady_std_pct
        and free is not None
        and free >= t.gpu_mem_free_share_headroom
        and config.batch_size is not None
    )
    # Moderate waiting beside a steadily under-used GPU is mostly the fixed cost of handing each
    # batch over; a larger batch amortizes it, more workers do not.
    moderate = t.wait_share_starved <= m.wait_share < t.wait_share_high
    starved = jitter or m.wait_share >= t.wait_share_high or (moderate and not steady_low)
    if starved:
        level = "highly" if m.wait_share >= t.wait_share_high else "moderately"
        why = f"the loop waited {m.wait_share:.0%} of the time for data"
        if m.wait_share < t.wait_share_starved:
            level, why = "moderately", "GPU utilization jumps between busy and idle"
        elif jitter:
            why += " and GPU utilization jumps between busy and idle"
        share = loader_cpu_share(m, config)
        cores = None
        if share is not None:
            cores = (m.loader_cpu_s_per_batch or 0.0) * m.batches_per_s
            ev.update(
                loader_cpu_share=round(share, 3),
                loader_cpu_share_heavy=t.loader_cpu_share_heavy,
                loader_cores=round(cores, 2),
            )
        # Busy cores only rule out more workers when the loading itself is CPU work: workers
        # waiting on I/O still help on a machine that others keep busy. Under oversubscription
        # a worker's own share is diluted by queueing for a core, so the cores loading takes in
        # all count too.
        heavy = share is None or share >= t.loader_cpu_share_heavy or (
            m.usable_cpus is not None and cores is not None and cores >= t.loader_cpu_share_heavy * m.usable_cpus
        )
        job = job_cpu_cores(m, config)
        if job is not None and m.usable_cpus:
            # Saturated by this job, not by the machine: other processes take CPU by fair share
            # per thread, so while they hold part of the cores more workers win more of them.
            saturated = job >= t.cpu_saturated_pct / 100.0 * m.usable_cpus
            contended = not saturated and m.cpu_pct is not None and m.cpu_pct >= t.cpu_saturated_pct
            ev.update(job_cpu_cores=round(job, 2))
        else:
            saturated = m.cpu_pct is not None and m.cpu_pct >= t.cpu_saturated_pct
            contended = False
        if saturated and heavy:
            busy = f"this job keeps {job:.1f} of them busy" if job is not None else f"they are {m.cpu_pct:.0f}% busy"
            return Diagnosis(
                "cpu_bound",
                f"CPU-bound input: {why}, but loading is CPU work and the {m.usable_cpus or '?'} usable "
                f"CPUs are saturated ({busy}), so more workers will not help; make samples cheaper "
                "instead: lighter or cached transforms, pre-decoded data, or decoding on the GPU.",
                ev,
                advice,
            )
        cpu = ""
        if contended and heavy:
            cpu = (
                f"; other processes keep the CPUs busy ({m.cpu_pct:.0f}% in all, this job "
                f"{job:.1f} of {m.usable_cpus}), and workers win a share of them"
            )
        elif contended or (saturated and not heavy):
            cpu = f"; the CPUs are busy ({m.cpu_pct:.0f}%) but loading mostly waits on I/O"
        elif m.cpu_pct is not None:
            cpu = f" with CPU to spare ({m.cpu_pct:.0f}% busy)"
        return Diagnosis(
            "data_starved",
            f"Data-starved ({level} input-bound): {why}{cpu}.",
            ev,
            advice,
        )

    if steady_low:
        ev.update(
            low_util_pct=t.low_util_pct,
            steady_std_pct=t.steady_std_pct,
            gpu_mem_free_share=round(free, 3),
            gpu_mem_free_share_headroom=t.gpu_mem_free_share_headroom,
        )
        return Diagnosis(
            "batch_headroom",
            f"Batch-size headroom: the loop waits little ({m.wait_share:.0%}) and GPU utilization "
            f"is steady but low ({m.gpu_util_mean_pct:.0f}% < {t.low_util_pct:.0f}%) with "
            f"{free:.0%} of its memory free; a larger batch (with the learning rate scaled) will "
            "use it better.",
            ev,
            advice,
        )
    util = f", GPU {m.gpu_util_mean_pct:.0f}% busy" if m.gpu_util_mean_pct is not None else ""
    return Diagnosis(
        "balanced",
        f"Balanced: the loop waits {m.wait_share:.0%} of the time for data{util}; the input "
        "pipeline keeps up.",
        ev,
        advice,
    )


def job_cpu_cores(metrics: WindowMetrics, config: LoaderConfig) -> float | None:
    """CPUs this job keeps busy: the training process (its loop and, without workers, its
    loading) plus its workers; None without the process's or the workers' figure."""
    m = metrics
    if m.process_cpu_pct is None:
        return None
    cores = m.process_cpu_pct / 100.0
    if config.num_workers > 0:
        if m.workers_cpu_pct is not None:
            cores += m.workers_cpu_pct / 100.0
        elif m.loader_cpu_s_per_batch is not None:
            cores += m.loader_cpu_s_per_batch * m.batches_per_s
        else:
            return None  # the workers' part is unknown
    return cores


def contending_cores(metrics: WindowMetrics, config: LoaderConfig, thresholds: Thresholds | None = None) -> float:
    """Cores other processes keep busy while the CPUs are saturated, but not by this job (the
    diagnosis's "other processes keep the CPUs busy"); 0 when they are not, or unknown."""
    t = thresholds or Thresholds()
    m = metrics
    job = job_cpu_cores(m, config)
    if job is None or not m.usable_cpus or m.cpu_pct is None or m.cpu_pct < t.cpu_saturated_pct:
        return 0.0
    if job >= t.cpu_saturated_pct / 100.0 * m.usable_cpus:
        return 0.0
    return max(0.0, m.cpu_pct / 100.0 * m.usable_cpus - job)


def over_provisioned(
    metrics: WindowMetrics, config: LoaderConfig, thresholds: Thresholds | None = None
) -> int | None:
    """Workers to step down to when CPU-heavy loading runs more workers than the CPUs.

    Over-provisioned: more workers than usable CPUs, this job itself filling them (its process
    and workers; the machine's busy share only where the job's is unknown: under another
    process's load more workers win the job a larger share), and loading being CPU work (a
    worker's own CPU and run-queue time, or the cores loading takes against those the training
    loop leaves). Workers beyond the cores the loop leaves then only fight the training step.

    Returns:
        The worker count to try, or None when not over-provisioned (or unknown).
    """
    t = thresholds or Thresholds()
    m = metrics
    w = config.num_workers
    if w == 0 or not m.usable_cpus or w <= m.usable_cpus:
        return None
    job = job_cpu_cores(m, config)
    full = t.cpu_saturated_pct / 100.0 * m.usable_cpus
    if job is not None:
        if job < full:
            return None
    elif m.cpu_pct is None or m.cpu_pct < t.cpu_saturated_pct:
        return None
    loop = m.loop_cpu_cores or 0.0
    share = loader_cpu_share(m, config)
    loading = None if m.loader_cpu_s_per_batch is None else m.loader_cpu_s_per_batch * m.batches_per_s
    heavy = (share is not None and share >= t.loader_cpu_share_heavy) or (
        loading is not None and loading >= t.loader_cpu_share_heavy * max(0.0, m.usable_cpus - loop)
    )
    if not heavy and not (share is None and loading is None):
        return None
    spare = max(1, round(m.usable_cpus - loop))
    return spare if spare < w else None


def loader_cpu_share(metrics: WindowMetrics, config: LoaderConfig) -> float | None:
    """Share of a loading worker's time spent on, or queueing for, the CPU.

    1 means pure CPU work, 0 pure waiting on I/O. Without workers the loading time is the loop's
    wait; with workers that wait, each worker takes ``workers / rate`` per batch. Time queued
    for a CPU counts as CPU demand: on oversubscribed cores it is what the work would take.
    """
    cpu = metrics.loader_cpu_s_per_batch
    if cpu is not None and metrics.loader_runqueue_s_per_batch is not None:
        cpu += metrics.loader_runqueue_s_per_batch
    if cpu is None or metrics.batches_per_s <= 0:
        return None
    w = config.num_workers
    load = metrics.wait_s_per_batch if w == 0 else w / metrics.batches_per_s
    if load <= 0:
        return None
    return min(1.0, cpu / load)


def shm_needed_bytes(config: LoaderConfig, batch_bytes: int | None) -> int | None:
    """Bytes of /dev/shm the batches in flight take: workers x prefetch_factor x batch bytes."""
    if batch_bytes is None or config.num_workers == 0:
        return None
    return config.num_workers * (config.prefetch_factor or 2) * batch_bytes


def _memory_limit(
    m: WindowMetrics, config: LoaderConfig, env: Environment, t: Thresholds, ev: dict[str, Any]
) -> str | None:
    if m.ram_available_bytes is not None and m.ram_total_bytes:
        share = m.ram_available_bytes / m.ram_total_bytes
        ev.update(ram_available_share=round(share, 4), ram_available_share_min=t.ram_available_share_min)
        if share < t.ram_available_share_min:
            per = f" ({_gib(m.worker_mem_bytes)} per worker)" if m.worker_mem_bytes else ""
            return (
                f"Memory-bound: only {share:.0%} of RAM is available (< {t.ram_available_share_min:.0%}); "
                f"{config.num_workers} workers{per} risk the OOM killer. Use fewer workers or "
                "smaller per-worker caches."
            )
    needed = shm_needed_bytes(config, env.batch_bytes)
    if m.shm_free_bytes is not None and m.shm_total_bytes:
        share = m.shm_free_bytes / m.shm_total_bytes
        ev.update(shm_free_share=round(share, 4), shm_free_share_min=t.shm_free_share_min)
        if share < t.shm_free_share_min or (needed is not None and needed > m.shm_free_bytes):
            ev["shm_needed_bytes"] = needed
            return (
                f"Memory-bound: /dev/shm has {_gib(m.shm_free_bytes)} free of {_gib(m.shm_total_bytes)}"
                + (f" but the batches in flight need {_gib(needed)}" if needed else "")
                + "; workers will die of a bus error. Enlarge it (docker run --shm-size=8g) or use "
                "fewer workers or a smaller prefetch_factor."
            )
    free = m.gpu_mem_free_share
    if free is not None:
        ev.update(gpu_mem_free_share=round(free, 4), gpu_mem_free_share_min=t.gpu_mem_free_share_min)
        if free < t.gpu_mem_free_share_min:
            return (
                f"Memory-bound: only {free:.0%} of GPU memory is free (< {t.gpu_mem_free_share_min:.0%}); "
                "a larger batch would run out of memory. Keep the batch size, or lower it."
            )
    return None


def _advice(m: WindowMetrics, config: LoaderConfig, env: Environment, t: Thresholds) -> tuple[str, ...]:
    out = []
    if (
        m.epoch_start_wait_s is not None
        and config.num_workers > 0
        and not config.persistent_workers
        and m.epoch_start_wait_s >= max(t.epoch_stall_min_s, t.epoch_stall_factor * m.wait_s_per_batch)
    ):
        out.append(
            f"Each epoch starts with a {m.epoch_start_wait_s:.2f} s stall while workers start; "
            "set persistent_workers=True to keep them between epochs."
        )
    if env.on_cuda and not config.pin_memory:
        out.append(
            "pin_memory=False while training on CUDA: host-to-device copies cannot overlap compute; "
            "set pin_memory=True (and .to(device, non_blocking=True))."
        )
    fewer = over_provisioned(m, config, t)
    if fewer is not None:
        out.append(
            f"{config.num_workers} workers on {m.usable_cpus} usable CPUs for CPU-heavy loading: "
            f"workers beyond the cores the training loop leaves only fight it for them; use at most "
            f"{fewer}."
        )
    if env.has_conv and (env.cudnn_deterministic or env.cudnn_benchmark is False):
        flags = []
        if env.cudnn_deterministic:
            flags.append("torch.backends.cudnn.deterministic=True")
        if env.cudnn_benchmark is False:
            flags.append("torch.backends.cudnn.benchmark=False")
        out.append(
            f"{' and '.join(flags)} on a convolutional model can make training ~3x slower; keep it "
            "only if bit-exact reproducibility is required (loadertune.seed_everything and "
            "tune(seed=...) give repeatable data without it)."
        )
    needed = shm_needed_bytes(config, env.batch_bytes)
    if needed is not None and m.shm_free_bytes is not None and needed > 0.5 * m.shm_free_bytes:
        out.append(
            f"The batches in flight ({config.num_workers} workers x prefetch_factor "
            f"{config.prefetch_factor} x {_gib(env.batch_bytes)}) need {_gib(needed)} of /dev/shm, "
            f"{_gib(m.shm_free_bytes)} free: close to a bus error."
        )
    return tuple(out)


def _gib(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"
