"""The apply-mode state machine: change, measure, keep or revert, hold, re-tune on drift.

``Controller`` takes one :class:`Decision` per window on top of ``plan`` (what to try) and the
keep-or-revert test of :mod:`loadertune.trial`: change, let it warm up, measure, keep the change
only if throughput rose by more than the noise, else revert and remember the ceiling; hold once
converged and re-tune on drift. No threads, no clocks: time comes in as an argument.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from loadertune.advice import StableAdvice
from loadertune.config import LoaderConfig
from loadertune.costs import JobCosts
from loadertune.diagnosis import Diagnosis
from loadertune.drift import DriftWatch
from loadertune.metrics import WindowMetrics
from loadertune.planning import (
    Bounds,
    Recommendation,
    describe_changes,
    estimate_workers,
    plan,
    remember_load,
)
from loadertune.trial import Trial, WindowNoise, WindowSample, is_cheaper, mean_rate, window_sample

__all__ = ["Controller", "Decision"]

# A change that could gain this much (from the time the loop waits) shows through any noise.
_OBVIOUS_GAIN = 0.5
# Worker start-up at every epoch worth switching to persistent workers: this share of an epoch
# (start-up included), and more than a wait's noise. The share is what the job loses; the
# switch itself costs nothing (the running loader turns persistent in place), so a 0.1 s fork
# start-up on 0.25 s epochs (short epochs, issue 13) is worth it although it is short.
_STARTUP_SHARE = 0.03
_STARTUP_MIN_S = 0.02


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
        telling: A "hold" or "measure" worth a line in the log (once): why a change the
            diagnosis points to is not made, or not yet.
    """

    action: Action
    config: LoaderConfig
    reason: str
    before_samples_per_s: float | None = None
    after_samples_per_s: float | None = None
    lr_factor: float | None = None
    recommendation: Recommendation | None = None
    telling: bool = False

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


class Controller:
    """Apply-mode control: aimed steps, measured keep-or-revert, hold, and re-tune on drift.

    Keep or revert is a sequential test on equal footing: the windows measured at the old
    configuration (up to ``max_windows`` since its warm-up) against those at the new one, each
    window weighted alike and carrying its own noise plus the spread measured between windows.
    A change is kept when its gain clears ``+tie_band`` (``-tie_band`` for a cheaper one:
    within the band the cheaper configuration wins) by ``z`` standard errors, reverted when it
    misses by as much, and otherwise measured for another window, up to ``max_windows``;
    then the estimate decides alone, against a bar that still keeps a gain of ``min_gain``
    ~95% of the time (``trial.final_bar``). A revert, and a cheaper change's keep, take at
    least three windows after the change. Before a change whose gain could be small, the old
    configuration is measured until its mean is about as precise as the test needs (at most
    ``max_windows``).

    Args:
        config: The configuration in use at the start.
        bounds: Limits no change crosses.
        allow_batch_size: Whether batch-size changes are allowed.
        lr_exponent: Learning-rate rule as an exponent of the batch ratio.
        min_gain: Least relative gain a change must promise (from the time the loop waits)
            to be tried: twice this (default 5%, so 10%). A trial that ends on its estimate
            alone still keeps a gain this large (reverts a cheaper change's loss this large)
            ~95% of the time (``trial.final_bar``).
        drift_share: Relative drop of throughput, or rise of wait share into the input-bound
            range, that re-opens tuning once converged (default 25%).
        cooldown_s: Least time between two changes.
        tie_band: Differences within this share count as a tie, which the cheaper
            configuration wins (default 3%).
        z: Standard errors a difference must clear to decide early (default 2: above the
            one-sided 1.645 because the test looks after every window).
        max_windows: Most windows a trial measures after a change before deciding on the
            estimate alone (default 40: ~80 s at the session's 2 s windows, only when the
            difference stays close to the bar: a ±5% change on a noisy loop needs about
            that many to be decided right 95% of the time). The running configuration is
            measured for as many at most before a change whose gain could be small: the
            precision of that side counts as much.
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
        max_windows: int = 40,
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
        self.cooldown_s = cooldown_s
        self.tie_band = tie_band
        self.z = z
        self.max_windows = max_windows
        self.ceiling_workers: int | None = None
        self.batch_ceiling: int | None = None
        self.converged = False
        self._trial: Trial | None = None
        self._history: list[WindowSample] = []
        # Pooled spread between windows at one configuration, beyond their own noise: a prior
        # worth _PRIOR_DOF windows, then what the run shows.
        self.noise = WindowNoise(window_noise)
        # Recommend mode's advice, held until it really changes.
        self._advice = StableAdvice()
        self.drift = DriftWatch(drift_share)
        self._last_change_s = -math.inf
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
        #: Workers start slowly (spawn, forkserver; set by the front end in apply mode): a change
        #: at most doubles them, so a smaller step is ready sooner and measured before the next.
        self.slow_start = False

    @property
    def window_noise(self) -> float:
        """The relative spread between windows at one configuration, as measured so far."""
        return math.sqrt(self.noise.variance())

    def _remember(self, metrics: WindowMetrics) -> None:
        sample = window_sample(metrics)
        if sample is not None:
            self._history.append(sample)
            del self._history[: -self.max_windows]

    def _close_history(self) -> None:
        self.noise.learn(self._history)
        self._history = []

    def decide(self, metrics: WindowMetrics, diagnosis: Diagnosis, now_s: float) -> Decision:
        """Takes one decision on a window measured after any warm-up."""
        self.costs.started(now_s - metrics.duration_s)
        self.known_load_s = remember_load(metrics, self.config, self.bounds, self.known_load_s)
        persist = self._persist()
        if persist is not None and (self._trial is not None or self.converged):
            return persist
        if self._trial is not None:
            return self._judge(metrics, now_s)
        step = self._step(metrics, diagnosis, now_s)
        if persist is None or step.action != "change":
            return persist or step
        # Turning persistent costs nothing and the step is judged as any other: both go in one
        # change, so slowly starting workers do not wait a window longer for the step.
        return dataclasses.replace(step, reason=f"{persist.reason}; {step.reason}")

    def _step(self, metrics: WindowMetrics, diagnosis: Diagnosis, now_s: float) -> Decision:
        """The decision on a window when no trial is under way: hold, re-tune, measure the
        current configuration again, or change."""
        rate = metrics.samples_per_s
        self._remember(metrics)
        if self.converged and (diagnosis.kind == "memory_bound" or self._over_budget(metrics)):
            # Memory keeps growing after convergence (caches fill): limits are never on hold.
            self.converged = False
        if self.converged:
            if self.drift.drifted(metrics):
                self.converged = False
                self.ceiling_workers = None
                self.batch_ceiling = None
                self.drift.forget()
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
            max_step_workers=max(2, 2 * self.config.num_workers) if self.slow_start else None,
        )
        if rec is None:
            if diagnosis.kind == "data_starved":
                # The loop waits, just not enough for a change worth a rebuild in this window:
                # one borderline window (the first is the noisiest) must not settle the run.
                return Decision(
                    "hold",
                    self.config,
                    f"the loop waits {metrics.wait_share:.0%} of the time: no change is worth a "
                    "rebuild yet; watching the next windows",
                    before_samples_per_s=rate,
                    telling=True,
                )
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
                    f"not trying {describe_changes(rec.changes)}: a rebuild stalls the loop ~{stall:.1f} s, "
                    f"more than ~{max(gain, 0):.0%} over the next ~{horizon:.0f} s would pay back",
                    before_samples_per_s=rate,
                    telling=True,
                )
        se = self.noise.stderr(self._history)
        needed_se = self.tie_band / (2.0 * self.z)
        if potential < _OBVIOUS_GAIN and se > needed_se and len(self._history) < self.max_windows:
            return Decision(
                "measure",
                self.config,
                f"measuring {self.config.describe()} again before trying {describe_changes(rec.changes)} "
                f"(its rate is known to ±{se:.1%}, the test needs ±{needed_se:.1%}; "
                f"up to {self.max_windows} windows)",
                before_samples_per_s=rate,
                telling=True,
            )
        self._trial = Trial(
            self.config, list(self._history), rec.lr_factor, cheaper=is_cheaper(self.config, rec.config)
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
            "reference_rate": self.drift.rate,
            "reference_wait": self.drift.wait,
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
        self.drift.forget()
        if reference[0] is not None:
            self.drift.anchor(*reference)
        self.noise.ss, self.noise.dof = spread

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
        self.drift.forget()

    def _judge(self, metrics: WindowMetrics, now_s: float) -> Decision:
        trial = self._trial
        assert trial is not None
        verdict, cmp = trial.judge(
            window_sample(metrics),
            noise=self.noise,
            tie_band=self.tie_band,
            z=self.z,
            max_windows=self.max_windows,
            revert_cost=self.costs.revert_cost(self.config, trial.previous, now_s),
            min_effect=self.min_gain,
        )
        before, after = mean_rate(trial.before), mean_rate(trial.after)
        if verdict == "measure":
            if cmp is None:
                return Decision("measure", self.config, "no batches in this window; measuring again")
            return Decision(
                "measure",
                self.config,
                f"measuring {self.config.describe()} again: {before:.0f} -> {after:.0f} samples/s "
                f"({cmp.gain:+.1%} ± {cmp.stderr:.1%}) is not yet clear of the {cmp.bar:+.0%} bar",
                before_samples_per_s=before,
                after_samples_per_s=after,
            )
        self._trial = None
        changes = trial.previous.diff(self.config)
        detail = f" ({cmp.describe()})" if cmp is not None else ""
        if verdict == "keep":
            self.noise.learn(trial.before)
            self._history = list(trial.after)
            return Decision(
                "keep",
                self.config,
                f"kept {describe_changes(changes)}: {before:.0f} -> {after:.0f} samples/s{detail}",
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
            f"reverted {describe_changes(changes)}: {before:.0f} -> {after:.0f} samples/s {why}{detail}",
            before_samples_per_s=before,
            after_samples_per_s=after,
            lr_factor=(1.0 / trial.lr_factor) if trial.lr_factor else None,
        )

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
            f"workers take ~{_duration(costs.startup_s or 0.0)} to start, {share:.0%} of every epoch; "
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
        self.drift.anchor(rate if rate is not None else metrics.samples_per_s, metrics.wait_share)


def _duration(seconds: float) -> str:
    """``seconds`` as a person reads it: "1.4 s", "40 ms" (never "0.0 s")."""
    return f"{seconds:.1f} s" if seconds >= 0.95 else f"{seconds * 1e3:.0f} ms"
