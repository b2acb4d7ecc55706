"""Aiming: from one window's measurements and diagnosis to the configuration to move to.

``plan`` estimates the worker count that meets what the loop consumes, bounded by the CPUs (on
CPU-bound loads), a RAM budget and /dev/shm, and the batch size that fills the GPU within its
memory. Pure logic: no threads, no clocks, no state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from loadertune.config import LoaderConfig
from loadertune.diagnosis import Diagnosis, contending_cores, over_provisioned
from loadertune.metrics import WindowMetrics

__all__ = [
    "Bounds",
    "Recommendation",
    "WorkerEstimate",
    "default_max_workers",
    "describe_changes",
    "estimate_workers",
    "plan",
    "remember_load",
    "same_recommendation",
]

# Aim a little above the estimate: the estimate ignores the IPC cost of each batch.
_AIM_MARGIN = 1.2


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``{setting: (from, to)}`` as one phrase: "num_workers=2->4, batch_size=32->64"."""
    return ", ".join(f"{k}={a}->{b}" for k, (a, b) in changes.items()) or "nothing"


def default_max_workers(usable_cpus: int) -> int:
    """The hard cap on workers: beyond the cores, since workers waiting on I/O use no CPU."""
    return min(64, max(8, 8 * usable_cpus))


@dataclass(frozen=True)
class Bounds:
    """Limits no recommendation crosses.

    Attributes:
        usable_cpus: min(affinity, cgroup quota) of this process (its share of the node).
        max_workers: Hard cap on workers.
        ram_budget_bytes: Memory all workers together may use; None for no budget.
        batch_bytes: Bytes of one collated batch (for /dev/shm), None when unknown.
        max_batch_size: Largest batch size allowed, None for no limit.
    """

    usable_cpus: int = 1
    max_workers: int = 8
    ram_budget_bytes: int | None = None
    batch_bytes: int | None = None
    max_batch_size: int | None = None


@dataclass(frozen=True)
class WorkerEstimate:
    """How many workers the measured rates call for, and what bounds that number.

    Attributes:
        needed: Workers that would keep up with the loop, from rates alone.
        target: ``needed`` after the bounds.
        limited_by: The bound that decided ``target`` ("rates", "cpu", "ram", "shm", "max_workers").
        load_s_per_batch: Time one worker needs to produce a batch.
        demand_batches_per_s: Batches per second the loop could consume if it never waited.
        cpu_cap: Workers the CPUs can keep busy, None when the CPU cost is unknown.
        ram_cap: Workers the RAM budget allows, None when unknown.
        shm_cap: Workers /dev/shm allows, None when unknown.
        spare_cpus: CPUs left for workers after the training loop's own share.
    """

    needed: int
    target: int
    limited_by: str
    load_s_per_batch: float
    demand_batches_per_s: float
    cpu_cap: int | None = None
    ram_cap: int | None = None
    shm_cap: int | None = None
    spare_cpus: float | None = None


@dataclass(frozen=True)
class Recommendation:
    """The configuration to move to and why.

    Attributes:
        config: The recommended configuration.
        reason: One sentence: what changes and what the measurements say it will gain.
        lr_factor: Factor for the learning rate when the batch size changes, else None.
        expected_speedup: Estimated samples/s ratio, where the rates allow an estimate.
        changes: ``{setting: (from, to)}``.
        forced: A limit (RAM budget, memory) demands the change: it is made without a trial
            and never reverted for throughput.
        at_least: The loop could use more workers than the cap allows: the advice reads
            "≥ N" (it is the least that helps, not a count that would be enough).
    """

    config: LoaderConfig
    reason: str
    lr_factor: float | None = None
    expected_speedup: float | None = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    forced: bool = False
    at_least: bool = False

    def describe(self, lr_rule: str | None = None) -> str:
        """One line: the changes, the expected gain, why, and the learning-rate factor."""
        changes = ", ".join(
            f"{k}={a}->{'≥' if self.at_least and k == 'num_workers' else ''}{b}" for k, (a, b) in self.changes.items()
        )
        extra = f" (expected ~{self.expected_speedup:.1f}x samples/s)" if self.expected_speedup else ""
        lr = ""
        if self.lr_factor:
            rule = f" ({lr_rule} rule)" if lr_rule else ""
            lr = f"; scale the learning rate by {self.lr_factor:.3g}{rule}"
        return f"{changes}{extra}: {self.reason}{lr}"

    def to_dict(self) -> dict[str, Any]:
        """The recommendation as a JSON-ready dict."""
        out = dataclasses.asdict(self)
        out["config"] = self.config.to_dict()
        out["changes"] = {k: list(v) for k, v in self.changes.items()}
        return out


def estimate_workers(
    metrics: WindowMetrics, config: LoaderConfig, bounds: Bounds, known_load_s: float | None = None
) -> WorkerEstimate | None:
    """Estimates the worker count that meets the loop's consumption rate.

    With ``num_workers=0`` the time blocked in ``next()`` is the time one worker needs per
    batch. With workers and the loop waiting, the pool runs flat out, so the observed rate is
    ``workers / load time``. The loop's own time per batch sets the rate it could consume.
    When the loop waits only a little the workers are not all busy and ``workers / rate``
    overstates the load time: ``known_load_s`` (measured earlier without workers) then bounds it.
    """
    m = metrics
    if m.batches < 2 or m.batches_per_s <= 0:
        return None
    w = config.num_workers
    load = m.wait_s_per_batch if w == 0 else w / m.batches_per_s
    if w > 0 and known_load_s is not None and m.wait_share < 0.2:
        load = min(load, known_load_s)
    if load <= 0:
        return None
    compute = m.compute_s_per_batch
    demand = 1.0 / compute if compute > 0 else math.inf
    needed = bounds.max_workers if math.isinf(demand) else max(1, math.ceil(load * demand * _AIM_MARGIN))
    caps: dict[str, int] = {"max_workers": bounds.max_workers}
    cpu_cap = ram_cap = shm_cap = None
    loop_cpu = m.loop_cpu_cores or 0.0
    spare = max(1.0, bounds.usable_cpus - loop_cpu)
    if m.loader_cpu_s_per_batch is not None and m.loader_cpu_s_per_batch > 0:
        # Share of a core one busy worker uses: ~1 for CPU-bound loads, ~0 for I/O waits.
        per_worker = max(1e-6, min(1.0, m.loader_cpu_s_per_batch / load))  # 1e-6: no overflow
        # Round, not floor: a loop using a tenth of a core should not cost a whole worker.
        # Workers share the CPUs with the loop's own threads (torch's intra-op pool) by fair
        # share per thread, so one worker beside a loop that fills a core gets less than the
        # core left: the cap is never below the usable CPUs when the loop wants more (measured
        # on a CPU-trained conv net with JPEG decode: 0 workers 67, 1 worker 61, 2 workers 81
        # samples/s on 2 CPUs).
        cpu_cap = max(1, round(spare / per_worker))
        if per_worker > 0.5:
            cpu_cap = max(cpu_cap, bounds.usable_cpus)
            others = contending_cores(m, config)
            if others >= 0.5:
                # Other processes keep ~B cores busy: by fair share per runnable thread k
                # CPU-bound workers get ~k/(k+B) of the CPUs, so a worker per core they hold
                # wins part of it back (2 CPUs, one core burnt by another process, 1.5 ms of
                # CPU per sample: 2 workers 704, 3 873, 4 902 samples/s); the trial judges it.
                cpu_cap = max(cpu_cap, bounds.usable_cpus + round(others))
            if loop_cpu >= 0.5 and not math.isinf(demand):
                # The rate estimate assumes a worker runs at the speed loading ran in the loop's
                # own thread. Beside a loop whose threads keep ~L cores busy, the scheduler
                # shares the cores per thread, so a CPU-heavy worker gets ~1/(1+L) of that:
                # aim at the workers that make up for it, up to the usable CPUs (a worker per
                # CPU is what fair share can give the loading; the trial judges the rest).
                contended = math.ceil(needed * (1.0 + loop_cpu))
                needed = max(needed, min(contended, bounds.usable_cpus))
        caps["cpu"] = cpu_cap
    if bounds.ram_budget_bytes is not None and m.worker_mem_bytes:
        ram_cap = max(1, bounds.ram_budget_bytes // m.worker_mem_bytes)
        caps["ram"] = ram_cap
    if bounds.batch_bytes and m.shm_free_bytes is not None:
        # Room in /dev/shm: what is free plus what this loader's own batches take (at most what is
        # used), a 10% margin, less the batch the loop holds. The loader pipeline fits
        # prefetch_factor into it, so each worker needs one batch of room (issue 14).
        used = max(0, (m.shm_total_bytes or m.shm_free_bytes) - m.shm_free_bytes)
        ours = min(used, (w * (config.prefetch_factor or 0) + 1) * bounds.batch_bytes)
        shm_cap = max(1, int(0.9 * (m.shm_free_bytes + ours)) // bounds.batch_bytes - 1)
        caps["shm"] = shm_cap
    limited_by, cap = min(caps.items(), key=lambda kv: kv[1])
    target = min(needed, cap)
    return WorkerEstimate(
        needed=needed,
        target=target,
        limited_by="rates" if target == needed else limited_by,
        load_s_per_batch=load,
        demand_batches_per_s=demand,
        cpu_cap=cpu_cap,
        ram_cap=ram_cap,
        shm_cap=shm_cap,
        spare_cpus=spare,
    )


def plan(
    metrics: WindowMetrics,
    diagnosis: Diagnosis,
    config: LoaderConfig,
    bounds: Bounds,
    *,
    allow_batch_size: bool = True,
    lr_exponent: float = 1.0,
    ceiling_workers: int | None = None,
    min_gain: float = 0.1,
    known_load_s: float | None = None,
    unmeasured_worker_bytes: int | None = None,
    max_step_workers: int | None = None,
) -> Recommendation | None:
    """The configuration the measurements call for, or None when nothing should change.

    Args:
        metrics: One window's measurements.
        diagnosis: ``diagnose`` of the same window.
        config: The configuration in use.
        bounds: Limits no recommendation crosses.
        allow_batch_size: Whether a batch-size change may be recommended.
        lr_exponent: The learning-rate rule as an exponent of the batch ratio (1 linear,
            0.5 square root, 0 none).
        ceiling_workers: A worker count measured not to help; stay below it.
        min_gain: Least gain a worker change could bring (from the time the loop waits) for it
            to be worth a rebuild.
        known_load_s: Time one worker needs per batch, measured earlier without workers.
        unmeasured_worker_bytes: What one worker could grow to while its memory is not known
            to have settled (None once it has): when the aimed workers of that size could
            exceed the RAM budget, the step goes to a few workers first (issue 15).
        max_step_workers: Most workers one change may go up to when more are needed (workers
            that start slowly, spawn or forkserver: each costs seconds of CPU to start, so a
            smaller step is ready sooner and its measured gain decides the next); None: no
            such limit.
    """
    kind = diagnosis.kind
    w = config.num_workers
    new = config
    reason = ""
    speedup = None
    estimate = estimate_workers(metrics, config, bounds, known_load_s)
    # Every bound but the rates; the measured ceiling too.
    hard = bounds.max_workers
    if estimate is not None:
        hard = min(c for c in (hard, estimate.cpu_cap, estimate.ram_cap, estimate.shm_cap) if c is not None)
    limit = hard if ceiling_workers is None else min(hard, ceiling_workers - 1)
    if estimate is not None:
        from loadertune.memory import probe_limit

        probe = probe_limit(w, min(estimate.needed, limit), bounds.ram_budget_bytes, unmeasured_worker_bytes)
        if probe is not None:
            # Measure a few workers' memory before committing to many.
            limit = min(limit, probe)
    # The most any worker change can gain is the time the loop waits.
    potential = metrics.wait_share / max(1e-9, 1.0 - metrics.wait_share)
    forced = at_least = False
    if estimate is not None and estimate.ram_cap is not None and w > estimate.ram_cap:
        forced = True
        new = new.replace(num_workers=estimate.ram_cap)
        reason = (
            f"{w} workers of ~{metrics.worker_mem_bytes / 2**20:.0f} MiB each exceed the RAM budget; "
            f"{estimate.ram_cap} fit"
        )
    elif kind not in ("cpu_bound", "memory_bound") and (fewer := over_provisioned(metrics, config)) is not None:
        new = new.replace(num_workers=fewer)
        reason = (
            f"loading is CPU work and {w} workers on {bounds.usable_cpus} usable CPUs fight the "
            f"training step for them; {fewer} leave it its share (a cheaper setting, kept unless "
            "measured slower)"
        )
    elif kind == "data_starved" and estimate is not None and potential >= min_gain:
        target = min(estimate.needed, limit)
        if target <= w and w < limit:
            # The estimate says enough, yet the loop waits: step past it, gently.
            target = min(limit, w + max(1, w // 4))
        stepped = max_step_workers is not None and target > max_step_workers > w
        if stepped:
            target = max_step_workers
        if target > w:
            new = new.replace(num_workers=target)
            speedup = _speedup(metrics, config, target, estimate)
            if stepped:
                bound = f"; {target} first (workers start slowly here: each change at most doubles them)"
            else:
                bound = "" if target == estimate.needed else f", capped by {estimate.limited_by}"
            # The loop could take more than the cap allows: advise "≥ N", not a count that
            # jumps about with each window's estimate above it.
            at_least = estimate.needed > target and target == bounds.max_workers
            reason = (
                f"one worker makes a batch in {estimate.load_s_per_batch * 1e3:.0f} ms and the loop "
                f"could take {_per_s(estimate.demand_batches_per_s)} batches/s: about {estimate.needed} "
                f"workers keep up{bound}"
            )
    elif kind == "cpu_bound" and estimate is not None:
        # This job saturates the CPUs with CPU-heavy loading: never more workers (the diagnosis
        # says they will not help); workers beyond the spare cores only queue for them.
        cap = max(1, round(estimate.spare_cpus))
        if w > cap:
            new = new.replace(num_workers=cap)
            reason = (
                f"the load is CPU-bound and {w} workers oversubscribe {bounds.usable_cpus} usable "
                f"CPUs; {cap} do the same work with less contention"
            )
    elif kind == "memory_bound" and w > 0:
        caps = [c for c in (estimate.ram_cap, estimate.shm_cap) if c is not None] if estimate else []
        target = min([w - 1, *caps])
        new = new.replace(num_workers=max(0, target))
        forced = True
        reason = "memory is near its limit; fewer workers hold fewer batches in flight"
    elif kind == "batch_headroom" and allow_batch_size and config.batch_size is not None:
        target_bs = _aimed_batch(metrics, config.batch_size, bounds.max_batch_size)
        if target_bs > config.batch_size:
            new = new.replace(batch_size=target_bs)
            reason = (
                f"the GPU is steadily {metrics.gpu_util_mean_pct:.0f}% busy with memory free; "
                f"{target_bs / config.batch_size:.3g}x the batch amortizes the per-step overhead "
                "(aimed at ~85% utilization, within memory)"
            )
    if any("persistent_workers=True" in a for a in diagnosis.advice) and new.num_workers > 0:
        new = new.replace(persistent_workers=True)
        reason = reason or "every epoch starts with a stall while workers start"
    if new == config:
        return None
    lr_factor = None
    if new.batch_size != config.batch_size and config.batch_size and new.batch_size:
        lr_factor = (new.batch_size / config.batch_size) ** lr_exponent
    return Recommendation(
        config=new,
        reason=reason,
        lr_factor=lr_factor,
        expected_speedup=speedup,
        changes=config.diff(new),
        forced=forced,
        at_least=at_least and new.num_workers == bounds.max_workers,
    )


#: Utilization a batch-size step aims at, and the most it multiplies the batch by at once.
_AIM_UTIL = 0.85
_MAX_BATCH_STEP = 4.0
_MEMORY_FILL = 0.85


def same_recommendation(a: LoaderConfig | None, b: LoaderConfig | None) -> bool:
    """Whether two recommended configurations are the same advice (worker counts within ~20%).

    Rates wobble between windows; a recommendation is repeated only when it really changes.
    """
    if a is None or b is None:
        return a is b
    if a.replace(num_workers=b.num_workers, prefetch_factor=b.prefetch_factor) != b:
        return False
    return abs(a.num_workers - b.num_workers) <= max(1, 0.2 * b.num_workers)


def _aimed_batch(m: WindowMetrics, batch: int, max_batch: int | None) -> int:
    """The batch size that should bring utilization near ``_AIM_UTIL``, within memory.

    A step is GPU time proportional to the batch plus a fixed overhead, so utilization u at
    batch b puts the overhead at ``b (1-u)/u`` batch-equivalents; memory is taken as
    proportional to the batch (an over-estimate, so the guess stays on the safe side).
    """
    u = (m.gpu_util_mean_pct or 0.0) / 100.0
    factor = 2.0
    if 0.0 < u < _AIM_UTIL:
        factor = (_AIM_UTIL / (1.0 - _AIM_UTIL)) * ((1.0 - u) / u)
    if m.gpu_mem_used_bytes and m.gpu_mem_total_bytes:
        factor = min(factor, _MEMORY_FILL * m.gpu_mem_total_bytes / m.gpu_mem_used_bytes)
    factor = max(1.0, min(factor, _MAX_BATCH_STEP))
    target = int(batch * factor)
    if target >= 16:
        target -= target % 8  # multiples of 8 suit GPU kernels
    if max_batch is not None:
        target = min(target, max_batch)
    return max(batch, target)


def _speedup(m: WindowMetrics, config: LoaderConfig, target: int, est: WorkerEstimate) -> float | None:
    if m.batches_per_s <= 0:
        return None
    produce = target / est.load_s_per_batch
    return min(produce, est.demand_batches_per_s) / m.batches_per_s


def _per_s(rate: float) -> str:
    return "unlimited" if math.isinf(rate) else f"{rate:.1f}"


def remember_load(
    metrics: WindowMetrics, config: LoaderConfig, bounds: Bounds, known: float | None
) -> float | None:
    """The load time per batch to remember: measured directly only without workers."""
    if config.num_workers == 0 and metrics.wait_share >= 0.05:
        est = estimate_workers(metrics, config, bounds)
        if est is not None:
            return est.load_s_per_batch
    return known
