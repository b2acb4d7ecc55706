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
from loadertune.diagnosis import Diagnosis, over_provisioned
from loadertune.metrics import WindowMetrics

__all__ = [
    "Bounds",
    "Comparison",
    "Controller",
    "Decision",
    "JobCosts",
    "Recommendation",
    "StableAdvice",
    "WindowNoise",
    "WorkerEstimate",
    "compare_windows",
    "default_max_workers",
    "estimate_workers",
    "plan",
    "remember_load",
    "same_recommendation",
]

# Aim a little above the estimate: the estimate ignores the IPC cost of each batch.
_AIM_MARGIN = 1.2
# Windows' worth of evidence behind the prior between-window spread.
_PRIOR_DOF = 4
# A change that could gain this much (from the time the loop waits) shows through any noise.
_OBVIOUS_GAIN = 0.5
# Worker start-up at every epoch worth switching to persistent workers: this share of an epoch
# (start-up included), and more than a wait's noise. The share is what the job loses; the
# switch itself costs nothing (the running loader turns persistent in place), so a 0.1 s fork
# start-up on 0.25 s epochs (short epochs, issue 13) is worth it although it is short.
_STARTUP_SHARE = 0.03
_STARTUP_MIN_S = 0.02


def _same_advice(a: Recommendation | None, b: Recommendation | None) -> bool:
    """Whether two advices say the same thing (see ``same_recommendation``; "≥ N" covers more)."""
    if a is _NO_ADVICE:
        a = None
    if b is _NO_ADVICE:
        b = None
    if a is None or b is None:
        return a is b
    if a.at_least and b.config.num_workers >= a.config.num_workers:
        return a.config.replace(num_workers=b.config.num_workers, prefetch_factor=b.config.prefetch_factor) == b.config
    if b.at_least and a.config.num_workers >= b.config.num_workers:
        return b.config.replace(num_workers=a.config.num_workers, prefetch_factor=a.config.prefetch_factor) == a.config
    return same_recommendation(a.config, b.config)


def _changes(changes: dict[str, tuple[Any, Any]]) -> str:
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


#: A pending "nothing to change" in recommend mode's hysteresis (None means no pending advice).
_NO_ADVICE = Recommendation(config=LoaderConfig(), reason="")


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
        if target > w:
            new = new.replace(num_workers=target)
            speedup = _speedup(metrics, config, target, estimate)
            bound = "" if target == estimate.needed else f", capped by {estimate.limited_by}"
            # The loop could take more than the cap allows: advise "≥ N", not a count that
            # jumps about with each window's estimate above it.
            at_least = estimate.needed > target and target == bounds.max_workers
            reason = (
                f"one worker makes a batch in {estimate.load_s_per_batch * 1e3:.0f} ms and the loop "
                f"takes {_per_s(estimate.demand_batches_per_s)} batches/s: about {estimate.needed} "
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


Action = Literal["hold", "change", "keep", "revert", "retune", "measure"]


@dataclass(frozen=True)
class Decision:
    """One apply-mode decision, with the measurements it stands on.

    Attributes:
        action: "change" (try a new configuration), "keep" (the change paid), "revert" (it did
            not; back to ``config``), "hold" (nothing to do), "retune" (drift: explore again),
            "measure" (nothing changes: one more window is needed before deciding; a front end
            treats it like "hold").
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


@dataclass(frozen=True)
class _Sample:
    """One window's throughput as the keep/revert test uses it."""

    log_rate: float  # log(samples/s): ratios become differences, gains and losses symmetric
    rate: float  # samples/s, for the log
    rel_var: float  # the window's own relative variance of the rate (rate_rel_stderr squared)
    batches: int


@dataclass
class _Trial:
    previous: LoaderConfig
    before: list[_Sample]
    lr_factor: float | None
    cheaper: bool
    after: list[_Sample] = field(default_factory=list)


@dataclass(frozen=True)
class Comparison:
    """The keep/revert test on before and after windows.

    Attributes:
        gain: Estimated relative throughput change, after/before - 1.
        stderr: Standard error of ``log(after/before)`` (about that of ``gain``).
        bar: The gain the change must beat: ``+tie_band`` for a costlier change, ``-tie_band``
            for a cheaper one (within the band the cheaper configuration wins).
        verdict: "keep", "revert", or "undecided" (the difference is within the noise of the
            bar: measure more).
        before_windows: Windows behind the "before" figure.
        after_windows: Windows behind the "after" figure.
    """

    gain: float
    stderr: float
    bar: float
    verdict: Literal["keep", "revert", "undecided"]
    before_windows: int
    after_windows: int


def compare_windows(
    before: list[_Sample],
    after: list[_Sample],
    *,
    cheaper: bool,
    tie_band: float,
    between_var: float,
    z: float,
    revert_cost: float = 0.0,
) -> Comparison:
    """Compares the mean log rate of two sets of windows against the bar ``±tie_band``.

    Each side's variance is that of a mean of windows: every window contributes its own
    measured noise plus ``between_var`` (what moves whole windows: other processes, page
    cache, thermal), so repeating windows is what shrinks it. A side of one short window is
    therefore never mistaken for a precise one.

    ``revert_cost`` is what going back would cost the job, as a share of its throughput over
    the horizon it is judged on (a rebuild stalls the loop: workers start again). The change
    itself is paid for; keeping it loses only what it is slower by, so the bar drops by that
    share (bounded at -50%).
    """
    def side(samples: list[_Sample]) -> tuple[float, float]:
        k = len(samples)
        mean = sum(x.log_rate for x in samples) / k
        var = sum(x.rel_var + between_var for x in samples) / (k * k)
        return mean, var

    mb, vb = side(before)
    ma, va = side(after)
    d = ma - mb
    se = math.sqrt(vb + va)
    cost = min(0.5, max(0.0, revert_cost))
    bar = math.log1p(max(-0.5, (-tie_band if cheaper else tie_band) - cost))
    verdict: Literal["keep", "revert", "undecided"] = "undecided"
    if d - bar >= z * se:
        verdict = "keep"
    elif d - bar <= -z * se:
        verdict = "revert"
    return Comparison(
        gain=math.expm1(d),
        stderr=se,
        bar=math.expm1(bar),
        verdict=verdict,
        before_windows=len(before),
        after_windows=len(after),
    )


def _potential(m: WindowMetrics, config: LoaderConfig, new: LoaderConfig) -> float:
    """The most a change from ``config`` to ``new`` could gain, as a share of the rate.

    A worker change can at best remove the time the loop waits. A larger batch amortizes the
    per-step overhead instead: with a step of fixed overhead plus device time proportional to the
    batch, utilization u at the current batch gives ``f / ((1 - u) + f u)`` times the samples/s
    at f times the batch (the model ``plan`` aims the batch with).
    """
    wait = m.wait_share / max(1e-9, 1.0 - m.wait_share)
    if new.batch_size and config.batch_size and new.batch_size > config.batch_size and m.gpu_util_mean_pct:
        u = min(1.0, max(0.0, m.gpu_util_mean_pct / 100.0))
        f = new.batch_size / config.batch_size
        return max(wait, f / ((1.0 - u) + f * u) - 1.0)
    return wait


def _sample(metrics: WindowMetrics) -> _Sample | None:
    if metrics.samples_per_s <= 0 or metrics.batches <= 0:
        return None
    return _Sample(
        math.log(metrics.samples_per_s), metrics.samples_per_s, metrics.rate_rel_stderr**2, metrics.batches
    )


def _spread(samples: list[_Sample]) -> tuple[float, int]:
    """Squared deviations between the windows of one configuration beyond their own noise."""
    k = len(samples)
    if k < 2:
        return 0.0, 0
    mean = sum(x.log_rate for x in samples) / k
    ss = sum((x.log_rate - mean) ** 2 for x in samples)
    own = sum(x.rel_var for x in samples) / k
    # What the windows' own noise explains is not spread between windows.
    return max(0.0, ss - (k - 1) * own), k - 1


def _mean_rate(samples: list[_Sample]) -> float:
    """Geometric mean of the windows' rates (each window weighs alike, as in the test)."""
    if not samples:
        return 0.0
    if len(samples) == 1:
        return samples[0].rate
    return math.exp(sum(x.log_rate for x in samples) / len(samples))


def _is_cheaper(old: LoaderConfig, new: LoaderConfig) -> bool:
    """Whether ``new`` costs no more than ``old``: no more workers, no larger batch or prefetch."""
    return (
        new.num_workers <= old.num_workers
        and (new.batch_size or 0) <= (old.batch_size or 0)
        and (new.prefetch_factor or 0) * new.num_workers <= (old.prefetch_factor or 0) * old.num_workers
    )


class Controller:
    """Apply-mode control: aimed steps, measured keep-or-revert, hold, and re-tune on drift.

    Keep or revert is a sequential test on equal footing: the windows measured at the old
    configuration (up to ``max_windows`` since its warm-up) against those at the new one, each
    window weighted alike and carrying its own noise plus the spread measured between windows.
    A change is kept when its gain clears ``+tie_band`` (``-tie_band`` for a cheaper one:
    within the band the cheaper configuration wins) by ``z`` standard errors, reverted when it
    misses by as much, and otherwise measured for another window, up to ``max_windows``.
    Before a change whose gain could be small, the old configuration is measured until its
    mean is about as precise as the test needs.

    Args:
        config: The configuration in use at the start.
        bounds: Limits no change crosses.
        allow_batch_size: Whether batch-size changes are allowed.
        lr_exponent: Learning-rate rule as an exponent of the batch ratio.
        min_gain: Least relative gain a change must promise (from the time the loop waits)
            to be tried: twice this (default 5%, so 10%).
        drift_share: Relative drop of throughput, or rise of wait share into the input-bound
            range, that re-opens tuning once converged (default 25%).
        cooldown_s: Least time between two changes.
        tie_band: Differences within this share count as a tie, which the cheaper
            configuration wins (default 3%).
        z: Standard errors a difference must clear to decide early (default 2: above the
            one-sided 1.645 because the test looks after every window).
        max_windows: Most windows a trial measures on each side before deciding on the
            estimate alone (default 24: ~48 s at the session's 2 s windows, only when the
            difference stays close to the bar).
        window_noise: Prior relative spread between windows at one configuration (default 2%);
            the spread measured during the run replaces it as evidence accumulates.
        min_horizon_s: Least time a change is expected to run for, to pay back its rebuild
            stall; the run's own age is used once longer (a job that has run for an hour
            likely runs on). Default 30 s.
        allow_persistent: Whether the configuration may be switched to persistent workers when
            worker start-up at every epoch costs the job a real share of it (apply mode builds
            the loader itself; elsewhere it is advice).
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
        tie_band: float = 0.03,
        z: float = 2.0,
        max_windows: int = 24,
        window_noise: float = 0.02,
        min_horizon_s: float = 30.0,
        allow_persistent: bool = True,
    ) -> None:
        if not 0.0 <= tie_band < 1.0:
            raise ValueError(f"tie_band must be in [0, 1), got {tie_band!r}")
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows!r}")
        self.config = config
        self.bounds = bounds
        self.allow_batch_size = allow_batch_size
        self.lr_exponent = lr_exponent
        self.min_gain = min_gain
        self.drift_share = drift_share
        self.cooldown_s = cooldown_s
        self.tie_band = tie_band
        self.z = z
        self.max_windows = max_windows
        self.ceiling_workers: int | None = None
        self.batch_ceiling: int | None = None
        self.converged = False
        self._trial: _Trial | None = None
        self._history: list[_Sample] = []
        # Pooled spread between windows at one configuration, beyond their own noise: a prior
        # worth _PRIOR_DOF windows, then what the run shows.
        self.noise = WindowNoise(window_noise)
        # Recommend mode's advice, held until it really changes.
        self._advice = StableAdvice()
        self._reference_rate: float | None = None
        self._reference_wait: float | None = None
        self._last_change_s = -math.inf
        self._drift_windows = 0
        self.known_load_s: float | None = None
        #: What one worker could grow to while the workers' memory has not settled (set by the
        #: actuator's memory check; None once settled or without a RAM budget).
        self.unmeasured_worker_bytes: int | None = None
        # What the job pays beyond the steady rates (issue 13): the loop's stall at a rebuild
        # (workers start, the old ones stop; the backlog the new ones prefetched drains), and
        # the start-up every epoch pays while workers are not persistent.
        self.min_horizon_s = min_horizon_s
        self.allow_persistent = allow_persistent
        #: What changes cost the job beyond the steady pace (rebuild stalls, worker start-up).
        self.costs = JobCosts(min_horizon_s)

    @property
    def window_noise(self) -> float:
        """The relative spread between windows at one configuration, as measured so far."""
        return math.sqrt(self.noise.variance())

    def _remember(self, metrics: WindowMetrics) -> None:
        sample = _sample(metrics)
        if sample is not None:
            self._history.append(sample)
            del self._history[: -self.max_windows]

    def _close_history(self) -> None:
        self.noise.learn(self._history)
        self._history = []

    def decide(self, metrics: WindowMetrics, diagnosis: Diagnosis, now_s: float) -> Decision:
        """Takes one decision on a window measured after any warm-up."""
        rate = metrics.samples_per_s
        self.costs.started(now_s - metrics.duration_s)
        self.known_load_s = remember_load(metrics, self.config, self.bounds, self.known_load_s)
        persist = self._persist()
        if persist is not None:
            return persist
        if self._trial is not None:
            return self._judge(metrics, now_s)
        self._remember(metrics)
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
                # The windows before the drift say nothing about the rate after it.
                self._history = self._history[-1:]
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
            unmeasured_worker_bytes=self.unmeasured_worker_bytes,
        )
        if rec is None:
            self._converge(metrics)
            return Decision("hold", self.config, f"{diagnosis.kind}: nothing to change", before_samples_per_s=rate)
        # A change whose gain could be small is judged against a precise "before": measure the
        # current configuration for more windows first. One that removes most of a long wait
        # shows through any noise, so it goes at once (the early first look stays early).
        if rec.forced:
            self._close_history()
            self.config = rec.config
            self._last_change_s = now_s
            return Decision(
                "change", rec.config, rec.reason, before_samples_per_s=rate, lr_factor=rec.lr_factor, recommendation=rec
            )
        potential = _potential(metrics, self.config, rec.config)
        stall = self.costs.expected_stall(self.config, rec.config)
        if stall > 0.0:
            # End to end: the gain over the horizon must pay for the stall twice (there and,
            # should it fail, back).
            gain = (rec.expected_speedup - 1.0) if rec.expected_speedup is not None else potential
            gain = min(gain, potential)
            horizon = self.costs.horizon(now_s)
            if gain * horizon < 2.0 * stall:
                self._converge(metrics)
                return Decision(
                    "hold",
                    self.config,
                    f"not trying {_changes(rec.changes)}: a rebuild stalls the loop ~{stall:.1f} s, "
                    f"more than ~{max(gain, 0):.0%} over the next ~{horizon:.0f} s would pay back",
                    before_samples_per_s=rate,
                )
        se = self.noise.stderr(self._history)
        needed_se = self.tie_band / (2.0 * self.z)
        if potential < _OBVIOUS_GAIN and se > needed_se and len(self._history) < self.max_windows:
            return Decision(
                "measure",
                self.config,
                f"measuring {self.config.describe()} again before trying {_changes(rec.changes)} "
                f"(its rate is known to ±{se:.1%}, the test needs ±{needed_se:.1%})",
                before_samples_per_s=rate,
            )
        self._trial = _Trial(
            self.config, list(self._history), rec.lr_factor, cheaper=_is_cheaper(self.config, rec.config)
        )
        self._history = []
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
        remembered, so later windows aim from it. The advice is stable: this returns the very
        same object (or None again) until the advice really changes, which takes a different
        advice in two windows in a row that agree with each other (worker counts within ~20%,
        or both "≥ N" at the cap). A front end logs a line only when the object changes.
        """
        self.known_load_s = remember_load(metrics, self.config, self.bounds, self.known_load_s)
        rec = plan(
            metrics,
            diagnosis,
            self.config,
            self.bounds,
            allow_batch_size=allow_batch_size,
            lr_exponent=self.lr_exponent,
            known_load_s=self.known_load_s,
        )
        return self._advice.update(self.config, rec)

    def state_dict(self) -> dict[str, Any]:
        """What this controller has learned, as plain data (for a checkpoint).

        A trial under way is not saved: the configuration saved is the last one kept (the
        trial's starting point), so a resumed run never starts from an unproven change.
        """
        settled = self._trial.previous if self._trial is not None else self.config
        return {
            "config": settled.to_dict(),
            "ceiling_workers": self.ceiling_workers,
            "batch_ceiling": self.batch_ceiling,
            "known_load_s": self.known_load_s,
            "converged": self.converged and self._trial is None,
            "reference_rate": self._reference_rate,
            "reference_wait": self._reference_wait,
            "spread_ss": self.noise.ss,
            "spread_dof": self.noise.dof,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes back what :meth:`state_dict` saved (a warm start: nothing is learned again).

        Raises:
            ValueError: ``state`` is not a controller state.
        """
        try:
            config = LoaderConfig(**state["config"])
            values = {k: state[k] for k in ("ceiling_workers", "batch_ceiling", "known_load_s", "converged")}
            reference = (state["reference_rate"], state["reference_wait"])
            spread = (float(state["spread_ss"]), float(state["spread_dof"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a Controller state ({exc!r}); pass what Controller.state_dict() returned") from None
        self.config = config
        self._trial = None
        self._history = []
        self.ceiling_workers = values["ceiling_workers"]
        self.batch_ceiling = values["batch_ceiling"]
        self.known_load_s = values["known_load_s"]
        self.converged = bool(values["converged"])
        self._reference_rate, self._reference_wait = reference
        self.noise.ss, self.noise.dof = spread
        self._drift_windows = 0

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
        if decision.config != self.config and self._trial is None:
            self._close_history()
        self.config = decision.config

    def note_external_change(self, config: LoaderConfig) -> None:
        """Tells the controller the configuration changed outside it (reconfigure, a fault)."""
        self.config = config
        self._trial = None
        self._close_history()
        self.converged = False
        self._reference_rate = None

    def _judge(self, metrics: WindowMetrics, now_s: float) -> Decision:
        trial = self._trial
        assert trial is not None
        sample = _sample(metrics)
        if sample is not None:
            trial.after.append(sample)
        if not trial.before or not trial.after:
            if sample is None and len(trial.after) < self.max_windows:
                return Decision("measure", self.config, "no batches in this window; measuring again")
            cmp = None
        else:
            cmp = compare_windows(
                trial.before,
                trial.after,
                cheaper=trial.cheaper,
                tie_band=self.tie_band,
                between_var=self.noise.variance(trial.before, trial.after),
                z=self.z,
                revert_cost=self.costs.revert_cost(self.config, trial.previous, now_s),
            )
        verdict = "keep" if cmp is None else cmp.verdict
        before, after = _mean_rate(trial.before), _mean_rate(trial.after)
        if verdict == "undecided":
            if len(trial.after) < max(self.max_windows, 1):
                return Decision(
                    "measure",
                    self.config,
                    f"measuring {self.config.describe()} again: {before:.0f} -> {after:.0f} samples/s "
                    f"({cmp.gain:+.1%} ± {cmp.stderr:.1%}) is not yet clear of the {cmp.bar:+.0%} bar",
                    before_samples_per_s=before,
                    after_samples_per_s=after,
                )
            # As measured as it will be: the estimate decides (within the band, the cheaper wins).
            verdict = "keep" if math.log1p(cmp.gain) > math.log1p(cmp.bar) else "revert"
        self._trial = None
        changes = trial.previous.diff(self.config)
        detail = ""
        if cmp is not None:
            detail = (
                f" ({cmp.gain:+.1%} ± {cmp.stderr:.1%} over {cmp.before_windows}+{cmp.after_windows} "
                f"windows, bar {cmp.bar:+.0%})"
            )
        if verdict == "keep":
            self.noise.learn(trial.before)
            self._history = list(trial.after)
            return Decision(
                "keep",
                self.config,
                f"kept {_changes(changes)}: {before:.0f} -> {after:.0f} samples/s{detail}",
                before_samples_per_s=before,
                after_samples_per_s=after,
            )
        self.noise.learn(trial.after)
        if "num_workers" in changes and not trial.cheaper:
            self.ceiling_workers = changes["num_workers"][1]
        if "batch_size" in changes:
            self.batch_ceiling = changes["batch_size"][0]
        self.config = trial.previous
        # The old configuration's windows still describe it (until drift says otherwise).
        self._history = list(trial.before)
        self._last_change_s = now_s
        self._converge(metrics, rate=before)
        why = "costs throughput" if trial.cheaper else "does not gain enough"
        return Decision(
            "revert",
            trial.previous,
            f"reverted {_changes(changes)}: {before:.0f} -> {after:.0f} samples/s {why}{detail}",
            before_samples_per_s=before,
            after_samples_per_s=after,
            lr_factor=(1.0 / trial.lr_factor) if trial.lr_factor else None,
        )

    def note_stall(self, stall_s: float) -> None:
        """The loop's measured stall at the last rebuild (see :meth:`JobCosts.note_stall`)."""
        self.costs.note_stall(stall_s)

    def note_startup(self, startup_s: float | None, epoch_s: float | None) -> None:
        """Worker start-up each epoch pays and an epoch's length (see :class:`JobCosts`)."""
        self.costs.note_startup(startup_s, epoch_s)

    def startup_share(self) -> float | None:
        """Worker start-up as a share of an epoch with it (None while either is unknown)."""
        return self.costs.startup_share()

    def _persist(self) -> Decision | None:
        """Persistent workers when worker start-up at every epoch costs the job real time."""
        c = self.config
        if not self.allow_persistent or c.num_workers == 0 or c.persistent_workers:
            return None
        costs = self.costs
        share = costs.startup_share()
        if share is None or (costs.startup_s or 0.0) < _STARTUP_MIN_S or share < _STARTUP_SHARE:
            return None
        new = c.replace(persistent_workers=True)
        reason = (
            f"workers take ~{costs.startup_s:.1f} s to start, {share:.0%} of every epoch; "
            "persistent_workers=True starts them once"
        )
        rec = Recommendation(config=new, reason=reason, changes=c.diff(new), forced=True)
        self.config = new
        if self._trial is not None and self._trial.previous.num_workers > 0:
            # A revert goes back to the old worker count, kept alive as well.
            self._trial.previous = self._trial.previous.replace(persistent_workers=True)
        return Decision("change", new, reason, recommendation=rec)

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

class JobCosts:
    """What configuration changes cost the job beyond its steady pace.

    A rebuild stalls the loop while new workers start (and old ones stop); workers that are not
    persistent start again at every epoch. The controller weighs a change's expected gain
    against these, measured on this job.

    Args:
        min_horizon_s: Least time a change is expected to run for, to pay back its stall.
    """

    def __init__(self, min_horizon_s: float) -> None:
        self.min_horizon_s = min_horizon_s
        self.stall_s: float | None = None
        self.startup_s: float | None = None
        self.epoch_s: float | None = None
        self.first_s: float | None = None

    def started(self, start_s: float) -> None:
        """The run's first measured moment (the horizon grows with the run's age)."""
        if self.first_s is None:
            self.first_s = start_s

    def note_stall(self, stall_s: float) -> None:
        """The loop's measured stall at the last rebuild beyond its steady pace: the time the
        job lost to it (new workers starting, old ones stopping, less what the new workers'
        prefetched backlog gave back). Later changes are judged against it."""
        if not math.isfinite(stall_s):
            return
        stall_s = max(0.0, stall_s)
        # Start-up grows with the workers started: the largest seen is the cautious estimate,
        # slowly forgotten so one slow rebuild does not freeze tuning for good.
        prev = self.stall_s
        self.stall_s = stall_s if prev is None else max(stall_s, 0.8 * prev + 0.2 * stall_s)

    def note_startup(self, startup_s: float | None, epoch_s: float | None) -> None:
        """Worker start-up each epoch pays (an epoch's first wait, or a rebuild's stall) and an
        epoch's length in seconds at the current pace (None while unknown)."""
        if startup_s is not None and math.isfinite(startup_s):
            self.startup_s = max(0.0, startup_s)
        if epoch_s is not None and math.isfinite(epoch_s) and epoch_s > 0:
            self.epoch_s = epoch_s

    def startup_share(self) -> float | None:
        """Worker start-up as a share of an epoch with it (None while either is unknown)."""
        if self.startup_s is None or self.epoch_s is None:
            return None
        return self.startup_s / (self.startup_s + self.epoch_s)

    def horizon(self, now_s: float) -> float:
        """How long a change is expected to run: the run's age, at least the minimum horizon."""
        age = now_s - self.first_s if self.first_s is not None else 0.0
        return max(self.min_horizon_s, age)

    def expected_stall(self, c: LoaderConfig, new: LoaderConfig) -> float:
        """The stall a rebuild from ``c`` to ``new`` is expected to cost (0 when none was measured)."""
        if self.stall_s is None:
            return 0.0
        if (new.num_workers, new.batch_size) == (c.num_workers, c.batch_size) and (
            new.persistent_workers or not c.persistent_workers
        ):
            return 0.0  # prefetch, pinning or persistence: no new workers to start
        return self.stall_s

    def revert_cost(self, current: LoaderConfig, previous: LoaderConfig, now_s: float) -> float:
        """Going back to ``previous``, as a share of throughput over the horizon."""
        stall = self.expected_stall(current, previous)
        return stall / self.horizon(now_s) if stall else 0.0


class WindowNoise:
    """How much windows at one configuration differ, pooled over the run.

    A window's own standard error misses what moves between windows (other jobs, caches,
    data order); the relative spread between windows of one configuration, pooled over every
    configuration measured, adds it. It starts from a prior (a few degrees of freedom at
    ``prior``) so the first trials are not judged on no spread at all.

    Args:
        prior: The relative spread assumed before any is measured (e.g. 0.02).
    """

    def __init__(self, prior: float) -> None:
        self.ss = _PRIOR_DOF * prior**2
        self.dof = float(_PRIOR_DOF)

    def variance(self, *open_groups: list[_Sample]) -> float:
        """Pooled relative variance between windows, counting groups still being measured."""
        ss, dof = self.ss, self.dof
        for group in open_groups:
            g_ss, g_dof = _spread(group)
            ss, dof = ss + g_ss, dof + g_dof
        return max(0.0, ss / dof)

    def learn(self, samples: list[_Sample]) -> None:
        """Adds one configuration's windows to the pool."""
        ss, dof = _spread(samples)
        self.ss += ss
        self.dof += dof

    def stderr(self, samples: list[_Sample]) -> float:
        """Relative standard error of the mean rate of ``samples`` (inf without any)."""
        k = len(samples)
        if not k:
            return math.inf
        between = self.variance(samples)
        return math.sqrt(sum(x.rel_var + between for x in samples)) / k


class StableAdvice:
    """Recommend mode's advice, held until it really changes.

    Rates wobble between windows; advice that flips with them is noise to the reader. A
    different advice replaces the held one only when two windows in a row agree on it (worker
    counts within ~20%, or both "≥ N" at the cap); a new configuration starts over.
    """

    def __init__(self) -> None:
        self._held: Recommendation | None = None
        self._config: LoaderConfig | None = None
        self._pending: Recommendation | None = None

    def update(self, config: LoaderConfig, rec: Recommendation | None) -> Recommendation | None:
        """Takes one window's advice for ``config``; returns the advice to show (the very same
        object as before while it has not really changed)."""
        if self._config != config:
            # A new configuration (the user's reconfigure, a fault): advice starts over.
            self._config = config
            self._held = rec
            self._pending = None
            return rec
        if _same_advice(self._held, rec):
            self._pending = None
            return self._held
        if self._pending is not None and _same_advice(self._pending, rec):
            self._held = rec
            self._pending = None
            return rec
        # One window's different advice may be noise: wait for the next to confirm it.
        self._pending = rec if rec is not None else _NO_ADVICE
        return self._held
