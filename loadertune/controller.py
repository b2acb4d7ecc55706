"""Pure decisions: from a window's diagnosis to the next loader configuration.

``plan`` aims: from measured rates it estimates the worker count that meets what the loop
consumes, bounded by the CPUs (on CPU-bound loads), a RAM budget and /dev/shm. ``Controller`` is
the apply-mode state machine on top: change, let it warm up, measure, keep the change only if
throughput rose by more than the noise, else revert and remember the ceiling; hold once converged
and re-tune on drift. No threads, no clocks: time comes in as an argument.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from loadertune.config import LoaderConfig
from loadertune.diagnose import Diagnosis
from loadertune.metrics import WindowMetrics

__all__ = [
    "Bounds",
    "Controller",
    "Decision",
    "Recommendation",
    "WorkerEstimate",
    "default_max_workers",
    "estimate_workers",
    "plan",
    "remember_load",
    "same_recommendation",
]

# Aim a little above the estimate: the estimate ignores the IPC cost of each batch.
_AIM_MARGIN = 1.2


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
    """

    config: LoaderConfig
    reason: str
    lr_factor: float | None = None
    expected_speedup: float | None = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def describe(self, lr_rule: str | None = None) -> str:
        """One line: the changes, the expected gain, why, and the learning-rate factor."""
        changes = ", ".join(f"{k}={a}->{b}" for k, (a, b) in self.changes.items())
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
        per_worker = min(1.0, m.loader_cpu_s_per_batch / load)
        # Round, not floor: a loop using a tenth of a core should not cost a whole worker.
        cpu_cap = max(1, round(spare / per_worker))
        caps["cpu"] = cpu_cap
    if bounds.ram_budget_bytes is not None and m.worker_mem_bytes:
        ram_cap = max(1, bounds.ram_budget_bytes // m.worker_mem_bytes)
        caps["ram"] = ram_cap
    if bounds.batch_bytes and m.shm_free_bytes is not None:
        prefetch = config.prefetch_factor or 2
        shm_cap = max(1, int(0.5 * m.shm_free_bytes) // (prefetch * bounds.batch_bytes))
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
    # The most any worker change can gain is the time the loop waits.
    potential = metrics.wait_share / max(1e-9, 1.0 - metrics.wait_share)
    if estimate is not None and estimate.ram_cap is not None and w > estimate.ram_cap:
        new = new.replace(num_workers=estimate.ram_cap)
        reason = (
            f"{w} workers of ~{metrics.worker_mem_bytes / 2**20:.0f} MiB each exceed the RAM budget; "
            f"{estimate.ram_cap} fit"
        )
    elif kind == "data_starved" and estimate is not None and potential >= min_gain:
        target = min(estimate.needed, limit)
        if target <= w and w < limit:
            # The estimate says enough, yet the loop waits: step past it, gently.
            target = min(limit, w + max(1, w // 4))
        if target > w:
            new = new.replace(num_workers=target)
            speedup = _speedup(metrics, config, target, estimate)
            bound = "" if target == estimate.needed else f", capped by {estimate.limited_by}"
            reason = (
                f"one worker makes a batch in {estimate.load_s_per_batch * 1e3:.0f} ms and the loop "
                f"takes {_per_s(estimate.demand_batches_per_s)} batches/s: about {estimate.needed} "
                f"workers keep up{bound}"
            )
    elif kind == "cpu_bound" and estimate is not None:
        # Saturated CPUs: workers beyond the spare cores only queue for them (and the per-worker
        # share measured under contention understates what one worker needs).
        cap = max(1, round(estimate.spare_cpus))
        if w > cap:
            new = new.replace(num_workers=cap)
            reason = (
                f"the load is CPU-bound and {w} workers oversubscribe {bounds.usable_cpus} usable "
                f"CPUs; {cap} do the same work with less contention"
            )
        elif w < min(cap, limit) and potential >= min_gain:
            target = min(cap, limit)
            new = new.replace(num_workers=target)
            reason = (
                f"the load is CPU-bound with {cap} spare CPUs and {w} workers: {target} keep them busy"
            )
    elif kind == "memory_bound" and w > 0:
        caps = [c for c in (estimate.ram_cap, estimate.shm_cap) if c is not None] if estimate else []
        target = min([w - 1, *caps])
        new = new.replace(num_workers=max(0, target))
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


Action = Literal["hold", "change", "keep", "revert", "retune"]


@dataclass(frozen=True)
class Decision:
    """One apply-mode decision, with the measurements it stands on.

    Attributes:
        action: "change" (try a new configuration), "keep" (the change paid), "revert" (it did
            not; back to ``config``), "hold" (nothing to do), "retune" (drift: explore again).
        config: The configuration to run from now on.
        reason: One sentence for the log.
        before_samples_per_s: Rate measured before the change (keep/revert), else the current.
        after_samples_per_s: Rate measured after the change (keep/revert), else None.
        lr_factor: Learning-rate factor to apply with this decision (batch-size changes).
        recommendation: The recommendation a "change" follows.
    """

    action: Action
    config: LoaderConfig
    reason: str
    before_samples_per_s: float | None = None
    after_samples_per_s: float | None = None
    lr_factor: float | None = None
    recommendation: Recommendation | None = None

    def to_dict(self) -> dict[str, Any]:
        """The decision as a JSON-ready dict."""
        return {
            "action": self.action,
            "config": self.config.to_dict(),
            "reason": self.reason,
            "before_samples_per_s": self.before_samples_per_s,
            "after_samples_per_s": self.after_samples_per_s,
            "lr_factor": self.lr_factor,
        }


@dataclass
class _Trial:
    previous: LoaderConfig
    before_rate: float
    before_noise: float
    lr_factor: float | None


class Controller:
    """Apply-mode control: aimed steps, measured keep-or-revert, hold, and re-tune on drift.

    Args:
        config: The configuration in use at the start.
        bounds: Limits no change crosses.
        allow_batch_size: Whether batch-size changes are allowed.
        lr_exponent: Learning-rate rule as an exponent of the batch ratio.
        min_gain: Smallest relative throughput gain that keeps a change (default 5%).
        drift_share: Relative drop of throughput, or rise of wait share into the input-bound
            range, that re-opens tuning once converged (default 25%).
        cooldown_s: Least time between two changes.
    """

    def __init__(
        self,
        config: LoaderConfig,
        bounds: Bounds,
        *,
        allow_batch_size: bool = False,
        lr_exponent: float = 1.0,
        min_gain: float = 0.05,
        drift_share: float = 0.25,
        cooldown_s: float = 0.0,
    ) -> None:
        self.config = config
        self.bounds = bounds
        self.allow_batch_size = allow_batch_size
        self.lr_exponent = lr_exponent
        self.min_gain = min_gain
        self.drift_share = drift_share
        self.cooldown_s = cooldown_s
        self.ceiling_workers: int | None = None
        self.batch_ceiling: int | None = None
        self.converged = False
        self._trial: _Trial | None = None
        self._reference_rate: float | None = None
        self._reference_wait: float | None = None
        self._last_change_s = -math.inf
        self._drift_windows = 0
        self.known_load_s: float | None = None

    def decide(self, metrics: WindowMetrics, diagnosis: Diagnosis, now_s: float) -> Decision:
        """Takes one decision on a window measured after any warm-up."""
        rate = metrics.samples_per_s
        self.known_load_s = remember_load(metrics, self.config, self.bounds, self.known_load_s)
        if self._trial is not None:
            return self._judge(metrics, now_s)
        if self.converged and (diagnosis.kind == "memory_bound" or self._over_budget(metrics)):
            # Memory keeps growing after convergence (caches fill): limits are never on hold.
            self.converged = False
        if self.converged:
            if self._drifted(metrics):
                self.converged = False
                self.ceiling_workers = None
                self.batch_ceiling = None
                self._reference_rate = None
                self.known_load_s = None
                return Decision(
                    "retune",
                    self.config,
                    f"throughput or waiting drifted (now {rate:.0f} samples/s, "
                    f"{metrics.wait_share:.0%} waiting); tuning again",
                    before_samples_per_s=rate,
                )
            return Decision("hold", self.config, "converged", before_samples_per_s=rate)
        if now_s - self._last_change_s < self.cooldown_s:
            return Decision("hold", self.config, "cooling down after a change", before_samples_per_s=rate)
        bounds = self.bounds
        if self.batch_ceiling is not None:
            bounds = dataclasses.replace(bounds, max_batch_size=self.batch_ceiling)
        rec = plan(
            metrics,
            diagnosis,
            self.config,
            bounds,
            allow_batch_size=self.allow_batch_size,
            lr_exponent=self.lr_exponent,
            ceiling_workers=self.ceiling_workers,
            # A rebuild stalls the loop briefly: only try one that could gain twice the bar.
            min_gain=2 * self.min_gain,
            known_load_s=self.known_load_s,
        )
        if rec is None:
            self._converge(metrics)
            return Decision("hold", self.config, f"{diagnosis.kind}: nothing to change", before_samples_per_s=rate)
        self._trial = _Trial(self.config, rate, metrics.rate_rel_stderr, rec.lr_factor)
        self.config = rec.config
        self._last_change_s = now_s
        return Decision(
            "change",
            rec.config,
            rec.reason,
            before_samples_per_s=rate,
            lr_factor=rec.lr_factor,
            recommendation=rec,
        )

    def recommend(
        self, metrics: WindowMetrics, diagnosis: Diagnosis, *, allow_batch_size: bool
    ) -> Recommendation | None:
        """Recommend mode's advice for one window: ``plan`` with what this controller learned.

        Nothing changes the configuration; the load time measured without workers is
        remembered, so later windows (run with the recommended workers) aim from it.
        """
        self.known_load_s = remember_load(metrics, self.config, self.bounds, self.known_load_s)
        return plan(
            metrics,
            diagnosis,
            self.config,
            self.bounds,
            allow_batch_size=allow_batch_size,
            lr_exponent=self.lr_exponent,
            known_load_s=self.known_load_s,
        )

    def note_batch_bytes(self, batch_bytes: int) -> None:
        """Records the bytes of one collated batch: /dev/shm bounds the workers by it."""
        if self.bounds.batch_bytes != batch_bytes:
            self.bounds = dataclasses.replace(self.bounds, batch_bytes=batch_bytes)

    def note_fault(self, failed: LoaderConfig, config: LoaderConfig) -> None:
        """A worker died under ``failed``; ``config`` is what runs now. No more workers than
        ``failed`` had are tried again."""
        self.note_external_change(config)
        if self.ceiling_workers is None or failed.num_workers < self.ceiling_workers:
            self.ceiling_workers = failed.num_workers

    def note_out_of_memory(self, failed: LoaderConfig, config: LoaderConfig) -> None:
        """The batch size of ``failed`` ran out of memory; ``config`` is what runs now."""
        self.note_external_change(config)
        self.batch_ceiling = config.batch_size

    def adopt(self, decision: Decision) -> None:
        """Follows a decision taken elsewhere (rank 0's, under torch.distributed)."""
        self.config = decision.config

    def note_external_change(self, config: LoaderConfig) -> None:
        """Tells the controller the configuration changed outside it (reconfigure, a fault)."""
        self.config = config
        self._trial = None
        self.converged = False
        self._reference_rate = None

    def _judge(self, metrics: WindowMetrics, now_s: float) -> Decision:
        trial = self._trial
        self._trial = None
        before, after = trial.before_rate, metrics.samples_per_s
        noise = 2.0 * math.hypot(trial.before_noise, metrics.rate_rel_stderr)
        needed = max(self.min_gain, noise)
        gain = after / before - 1.0 if before > 0 else math.inf
        changes = trial.previous.diff(self.config)
        fewer = "num_workers" in changes and changes["num_workers"][1] < changes["num_workers"][0]
        # A step down (fewer workers) is kept unless it costs throughput beyond the noise.
        kept = gain >= -needed if fewer else gain > needed
        if kept:
            return Decision(
                "keep",
                self.config,
                f"kept: {before:.0f} -> {after:.0f} samples/s ({gain:+.0%}, needed {'>=' if fewer else '>'}"
                f"{-needed if fewer else needed:+.0%})",
                before_samples_per_s=before,
                after_samples_per_s=after,
            )
        if "num_workers" in changes and not fewer:
            self.ceiling_workers = changes["num_workers"][1]
        if "batch_size" in changes:
            self.batch_ceiling = changes["batch_size"][0]
        tried = self.config
        self.config = trial.previous
        self._last_change_s = now_s
        self._converge(metrics, rate=before)
        return Decision(
            "revert",
            trial.previous,
            f"reverted {tried.describe()}: {before:.0f} -> {after:.0f} samples/s ({gain:+.0%}) is "
            f"within the noise (needed {needed:+.0%})",
            before_samples_per_s=before,
            after_samples_per_s=after,
            lr_factor=(1.0 / trial.lr_factor) if trial.lr_factor else None,
        )

    def _over_budget(self, metrics: WindowMetrics) -> bool:
        est = estimate_workers(metrics, self.config, self.bounds)
        return est is not None and est.ram_cap is not None and self.config.num_workers > est.ram_cap

    def _converge(self, metrics: WindowMetrics, rate: float | None = None) -> None:
        self.converged = True
        self._reference_rate = rate if rate is not None else metrics.samples_per_s
        self._reference_wait = metrics.wait_share
        self._drift_windows = 0

    def _drifted(self, metrics: WindowMetrics) -> bool:
        ref = self._reference_rate
        if ref is None:
            self._reference_rate = metrics.samples_per_s
            self._reference_wait = metrics.wait_share
            return False
        slower = metrics.samples_per_s < (1.0 - self.drift_share) * ref
        waiting = metrics.wait_share >= 0.2 and metrics.wait_share > (self._reference_wait or 0.0) + self.drift_share
        self._drift_windows = self._drift_windows + 1 if (slower or waiting) else 0
        # Two windows in a row: one slow window (a checkpoint, a GC pause) is not drift.
        return self._drift_windows >= 2
