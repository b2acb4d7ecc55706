"""The tuning session: one core that every front end drives.

A session owns what a tuning run keeps beside the loader: the sampler thread, the loop timer, the
window schedule, the event log, the collective (under ``torch.distributed``), the bounds and the
controller. A front end feeds it the loop's timings and closes windows when they are due; the
session turns each window into metrics, a diagnosis and a recommendation (recommend mode) or a
:class:`~loadertune.controller.Decision` for the front end to carry out (apply mode), writes the
events and makes the summary.

``tune()``'s :class:`~loadertune.tuned.TunedLoader`, the Lightning callback and ``loadertune
run`` are front ends; none of them diagnoses, plans or decides on its own.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import re
import time
import weakref
from typing import Any

import torch

from loadertune.config import LoaderConfig
from loadertune.controller import Controller, Decision
from loadertune.diagnosis import Diagnosis, Environment, diagnose
from loadertune.events import Event, EventLog
from loadertune.ledger import CostMeter, RunRates, Warmup
from loadertune.metrics import WindowMetrics, compute_metrics
from loadertune.options import TuneOptions, resolve_lr
from loadertune.planning import Recommendation
from loadertune.resources import node_bounds, resolve_gpu
from loadertune.sampler import Sampler
from loadertune.schedule import WindowSchedule
from loadertune.timer import LoopTimer

__all__ = ["TuningSession", "batch_nbytes", "close_at_exit", "model_environment"]

logger = logging.getLogger("loadertune")

# Decisions the front end carries out; the rest are only logged.
_LOGGED_ACTIONS = ("keep", "retune")
#: How often workers starting in the background are checked on (seconds; at batch boundaries).
PRESTART_POLL_S = 0.05
#: Batches left out of windows while they start: all of them (a switch resets it).
_HELD = 1 << 62


class TuningSession:
    """Measures, diagnoses and decides for one loader (or one training loop).

    Args:
        options: The run's options.
        config: The loader configuration at the start.
        batch_resizable: Whether the front end can change the batch size (recommendations may
            then propose one; apply mode changes it only with ``allow_batch_size``).
        environment: What the model runs on; derived from ``options.model`` when None.
        integration: The front end's name for the start event ("lightning", "run"), or None.
        name: What the loader is called in log lines (a creation site), or None.
        optimizer: The optimizer for ``lr_rule="auto"`` when not in ``options``.
        step: Batches already consumed when the session starts.
        epoch: The epoch number when it starts.
        distributed: Under ``torch.distributed``, decide together with the other ranks (every
            rank must then build its session at the same point). False decides for this process
            alone: observers whose ranks may read different loaders.

    Attributes:
        metrics: The latest window's metrics, None before the first.
        diagnosis: The latest diagnosis.
        recommendation: The latest recommendation (what to move to), or None.
        timer: The loop timer the front end records batches into.
        schedule: The window in progress.
    """

    def __init__(
        self,
        options: TuneOptions,
        config: LoaderConfig,
        *,
        batch_resizable: bool,
        environment: Environment | None = None,
        integration: str | None = None,
        name: str | None = None,
        optimizer: Any = None,
        step: int = 0,
        epoch: int = 0,
        distributed: bool = True,
    ) -> None:
        self.options = options
        self.mode = options.mode
        self.name = name
        self.batch_resizable = batch_resizable
        self.lr_rule, self.lr_exponent = resolve_lr(options, optimizer)
        self.collective = _make_collective(options.dist_timeout_s) if distributed else None
        self.events_log = EventLog(options.log_file, sinks=options.sinks)
        self.sampler = Sampler(options.interval_s, gpu=resolve_gpu(options.gpu), host=options.host)
        local = self.collective.local_world_size if self.collective is not None else 1
        self.bounds = node_bounds(options.max_workers, options.ram_budget_share, local)
        self.environment = environment if environment is not None else model_environment(options.model, self.sampler.gpu)
        self.controller = Controller(
            config,
            self.bounds,
            allow_batch_size=options.allow_batch_size and batch_resizable,
            lr_exponent=self.lr_exponent,
            cooldown_s=options.window_s,
            # Lightning builds its loaders and torch forbids setting persistent_workers on one.
            allow_persistent=integration != "lightning",
        )
        self.timer = LoopTimer()
        self.schedule = WindowSchedule(options.window_s, options.min_window_batches, distributed=self.collective is not None)
        self.metrics: WindowMetrics | None = None
        self.diagnosis: Diagnosis | None = None
        self.recommendation: Recommendation | None = None
        self.batch_bytes: int | None = None
        self.closed = False
        self._initial = config
        self._logged_rec: Recommendation | None = None
        self._advice_logged: set[str] = set()
        self._told: set[str] = set()
        # Rates of the whole run, from the loop's own timings: the first configuration's and the
        # one in use since the last change (every window and the partial one at the end count).
        self.rates = RunRates()
        self._start_s = time.perf_counter()
        # End-to-end costs (issue 13): when the last decision was taken (a rebuild's stall runs
        # from there), the warm-up after a rebuild, epochs' lengths, workers' start-up per epoch.
        self._decided: tuple[float, int] | None = None
        #: No window closes while a rebuild's workers start in the background (see
        #: :meth:`hold_windows`).
        self.windows_held = False
        self._warm: Warmup | None = None
        self.costs = CostMeter(self.controller)
        self.sampler.start()
        extra = {"integration": integration} if integration else {}
        if name:
            extra["loader"] = name
        if self.collective is not None:
            extra["rank"] = self.collective.rank
        self.events_log.emit(
            "start",
            step,
            epoch,
            mode=self.mode,
            config=config.to_dict(),
            gpu=getattr(self.sampler.gpu, "name", None),
            usable_cpus=self.bounds.usable_cpus,
            lr_rule=self.lr_rule,
            **extra,
        )

    # -- what the front ends read ------------------------------------------------------------------
    @property
    def events(self) -> list[Event]:
        """The events so far (the most recent 10,000)."""
        return list(self.events_log.events)

    @property
    def distributed(self) -> bool:
        """Whether decisions are collective (``torch.distributed`` with two or more ranks)."""
        return self.collective is not None

    # -- feeding -------------------------------------------------------------------------------------
    def record(
        self,
        requested_s: float,
        returned_s: float,
        samples: int,
        batch: Any,
        *,
        step: int,
        epoch: int,
        config: LoaderConfig,
    ) -> Decision | None:
        """Records one batch and closes the window when it is due (observing front ends).

        Args:
            requested_s: ``time.perf_counter()`` when the loop asked for the batch.
            returned_s: When it got it.
            samples: Samples in the batch.
            batch: The batch (its size in bytes bounds /dev/shm use).
            step: Batches consumed so far, this one included.
            epoch: The epoch number.
            config: The loader configuration in use.

        Returns:
            The decision to carry out in apply mode when a window closed, else None.
        """
        self.timer.record(requested_s, returned_s, samples)
        if self.batch_bytes is None:
            self.note_batch(batch)
        schedule = self.schedule
        if returned_s >= schedule.deadline_s and step >= schedule.step:
            return self.close_window(now_s=returned_s, step=step, epoch=epoch, config=config, batch=batch)
        return None

    def epoch_started(self, now_s: float | None = None, step: int = 0, config: LoaderConfig | None = None) -> None:
        """Marks the next batch as an epoch's first; opens the first window if none is open.

        Args:
            now_s: ``time.perf_counter()`` now (read when None).
            step: Batches consumed so far.
            config: The configuration the epoch starts with. With workers, the run's first
                batches measure their start-up and the backlog they prefetch, not the pace:
                the first window leaves them out, as it does after a rebuild.
        """
        self.timer.epoch_started()
        now = now_s if now_s is not None else time.perf_counter()
        self.costs.epoch_started(now, step)
        if self.schedule.started:
            return
        self.schedule.open(now, step)
        workers = config.num_workers if config is not None else 0
        if workers > 0:
            batches = max(2, workers * (config.prefetch_factor or 2))
            # Under torch.distributed the window still closes at the same step on every rank
            # (ranks may start different workers): only this rank's timer leaves them out.
            self._warm = Warmup(now, batches, step, priced=False)
            self.timer.discard(batches)

    def note_batch(self, batch: Any) -> None:
        """Measures a batch's bytes: what one batch in flight holds in /dev/shm."""
        nbytes = batch_nbytes(batch)
        if nbytes and nbytes != self.batch_bytes:
            self.batch_bytes = nbytes
            self.controller.note_batch_bytes(nbytes)
            # The diagnosis compares the batches in flight with what /dev/shm has free.
            self.environment = dataclasses.replace(self.environment, batch_bytes=nbytes)

    def rebuilt(self, warmup_batches: int, *, step: int, collective: bool = True) -> None:
        """After the loader changed: its first batches measure start-up, not pace.

        Args:
            warmup_batches: Batches to leave out of the next window.
            step: Batches consumed so far.
            collective: The change was decided by every rank together (a fault is one rank's
                alone and must not move the window every rank closes together).
        """
        self.rates.add(self.timer.take())
        self.windows_held = False
        now = time.perf_counter()
        decided, self._decided = self._decided, None
        # The stall runs from the decision when the rebuild follows it at once (tune()): the
        # old loader's shutdown and the new one's start happen in between.
        t0 = decided[0] if decided is not None and decided[1] == step else now
        self._warm = Warmup(t0, warmup_batches, step)
        self.timer.discard(warmup_batches)
        if self.collective is None:
            self.schedule.open(now, step, warmup_batches)
        elif collective:
            self.schedule.extend(warmup_batches)

    def hold_windows(self, now_s: float, step: int) -> None:
        """New workers are starting in the background while the old loader serves: its batches
        are no window of the new configuration's, so none closes; the front end is called back
        within ``PRESTART_POLL_S`` to check on them (:meth:`rebuilt` at the switch opens the
        next window)."""
        if not self.windows_held:
            self.rates.add(self.timer.take())
            self.timer.discard(_HELD)
            self.windows_held = True
        self.schedule.call_back(now_s, step, PRESTART_POLL_S)

    def release_windows(self, now_s: float, step: int) -> None:
        """Windows go on with the running loader (its background start was given up)."""
        self.windows_held = False
        self.timer.discard(0)
        self.schedule.open(now_s, step)

    # -- windows -------------------------------------------------------------------------------------
    def close_window(
        self,
        *,
        now_s: float,
        step: int,
        epoch: int,
        config: LoaderConfig,
        batch: Any = None,
        decide: bool = True,
    ) -> Decision | None:
        """Closes the window if it is really over; returns an apply-mode decision to carry out.

        A due first window may close early (a starved loop without workers) or be extended to
        the full length; a window of fewer than two batches (over all ranks) decides nothing.

        Args:
            now_s: ``time.perf_counter()`` now.
            step: Batches consumed so far.
            epoch: The epoch number.
            config: The configuration the window ran with.
            batch: The latest batch (its bytes bound /dev/shm use), if at hand.
            decide: False while a change waits to take effect: the window is measured and
                logged, and nothing is decided on it.
        """
        warm = self._warm
        if warm is not None and not warm.reopened and self.collective is None and self.timer.batches:
            # A window opened at the rebuild: its deadline may have passed during the stall, and
            # it would close on a few backlog batches. It lasts window_s from its first batch.
            first = getattr(self.timer, "_start", None)
            warm.reopened = True
            if first is not None and now_s - first < self.schedule.window_s:
                self.schedule.open(first, step - self.timer.batches)
                return None
        if not self.schedule.ready(now_s, step, wait_share=self.timer.wait_share, num_workers=config.num_workers):
            return None
        loop = self.timer.take()
        ticks = self.sampler.window(loop.start_s, loop.end_s)
        metrics = compute_metrics(loop, ticks, config)
        collective = self.collective
        if collective is not None:
            metrics = collective.reduce_metrics(metrics, step=step)
            # Identical metrics on every rank give every rank the same next window.
            self.schedule.set_rate(metrics.batches_per_s)
        self.schedule.open(now_s, step)
        self.rates.add(loop)
        if batch is not None:
            self.note_batch(batch)
        if metrics.batches < 2:  # the reduced count: every rank takes the same branch
            return None
        diagnosis = diagnose(metrics, config, self.environment)
        self.metrics, self.diagnosis = metrics, diagnosis
        warm, self._warm = self._warm, None
        costs = self.costs.measure(warm, loop, metrics, config, now_s)
        self.events_log.emit(
            "window",
            step,
            epoch,
            config=config.to_dict(),
            metrics=metrics.to_dict(),
            diagnosis=diagnosis.to_dict(),
            **costs,
        )
        if self.mode == "recommend" or not decide:
            self._log_advice(diagnosis)
        if self.mode == "recommend":
            self._recommend(metrics, diagnosis, config, step, epoch)
            return None
        if not decide:
            return None
        decision = self.controller.decide(self.costs.job_metrics(metrics, config), diagnosis, now_s)
        if collective is not None:
            # Rank 0's decision is everyone's: cooldowns and bounds may differ per rank.
            decision = collective.broadcast(decision, step=step)
            self.controller.adopt(decision)
        self.recommendation = decision.recommendation
        # After the decision: advice this window's change carries out is not given.
        self._log_advice(diagnosis, decision.config if decision.action in ("change", "revert") else None)
        if decision.action in ("change", "revert"):
            self._decided = (now_s, step)
            return decision
        if decision.action in _LOGGED_ACTIONS:
            logger.info("%s%s", self.log_prefix(), decision.reason)
            self.events_log.emit(decision.action, step, epoch, **decision.to_dict())
        elif decision.telling and _first_time(self._told, decision.reason):
            # Why apply mode does not (yet) make the change its diagnosis points to.
            logger.info("%s%s", self.log_prefix(), decision.reason)
            self.events_log.emit(decision.action, step, epoch, **decision.to_dict())
        return None

    def _recommend(
        self, metrics: WindowMetrics, diagnosis: Diagnosis, config: LoaderConfig, step: int, epoch: int
    ) -> None:
        rec = self.controller.recommend(metrics, diagnosis, allow_batch_size=self.batch_resizable)
        if self.collective is not None:
            rec = self.collective.broadcast(rec, step=step)
        self.recommendation = rec
        logged = self._logged_rec
        if rec is logged or (rec is not None and logged is not None and rec.config == logged.config):
            # The same advice: said once, not again every window.
            return
        self._logged_rec = rec
        if rec is None:
            if logged is not None:
                logger.info("%s%s Keep %s.", self.log_prefix(), diagnosis.summary, config.describe())
            return
        logger.info("%s%s Recommend %s.", self.log_prefix(), diagnosis.summary, rec.describe(self.lr_rule))
        self.events_log.emit(
            "recommendation",
            step,
            epoch,
            recommendation=rec.to_dict(),
            diagnosis=diagnosis.to_dict(),
            metrics=metrics.to_dict(),
        )

    def _log_advice(self, diagnosis: Diagnosis, applying: LoaderConfig | None = None) -> None:
        for advice in diagnosis.advice:
            if applying is not None and _carried_out(advice, applying):
                continue  # "set persistent_workers=True" beside the change that sets it
            if _first_time(self._advice_logged, advice):
                logger.warning("%s%s", self.log_prefix(), advice)

    # -- changes -------------------------------------------------------------------------------------
    def changed(
        self,
        kind: str,
        before: LoaderConfig,
        after: LoaderConfig,
        reason: str,
        *,
        step: int,
        epoch: int,
        when: str,
        lr_factor: float | None = None,
        forced: bool = False,
        started: bool = True,
        **measured: Any,
    ) -> None:
        """Logs and records a configuration change the front end made (or will make ``when``;
        ``started`` False: its workers start in the background, and the run's rates count it
        from the switch, see :mod:`loadertune.switchover`)."""
        if started:
            self.rates.changed()
        warm = self._warm
        # (A change whose workers start in the background holds the windows instead: its
        # warm-up comes at the switch.)
        if started and warm is not None and warm.step == step and not warm.extended:
            warm.extended = True
            warm.new_workers = after.num_workers > 0 and (
                (before.num_workers, before.batch_size) != (after.num_workers, after.batch_size)
                or not before.persistent_workers
            ) and not (after.persistent_workers and not before.persistent_workers and before.num_workers == after.num_workers)
            # New workers prefetch while they start: the loop then drains that backlog faster
            # than they make batches. It is warm-up too, not the new configuration's pace.
            extra = after.num_workers * (after.prefetch_factor or 0) - max(2, after.num_workers) if warm.new_workers else 0
            if extra > 0:
                warm.batches += extra
                self.timer.discard(warm.batches)
                if self.collective is None:
                    self.schedule.open(time.perf_counter(), step, warm.batches)
                else:
                    self.schedule.extend(extra)
        logger.info("%s%s %s -> %s %s: %s", self.log_prefix(), kind, before.describe(), after.describe(), when, reason)
        self.events_log.emit(
            "change" if kind == "reconfigure" else kind,
            step,
            epoch,
            before=before.to_dict(),
            after=after.to_dict(),
            reason=reason,
            lr_factor=lr_factor,
            forced=forced,
            **measured,
        )

    def fault(
        self,
        error: BaseException | str,
        before: LoaderConfig,
        after: LoaderConfig,
        *,
        step: int,
        epoch: int,
        changed: bool = True,
        **extra: Any,
    ) -> None:
        """Records a fault recovered from (a dead worker, /dev/shm exhausted...); ``changed``
        False when the configuration that runs did not change (a background start failed)."""
        if changed:
            self.rates.changed()
        self.events_log.emit(
            "fault", step, epoch, error=str(error), before=before.to_dict(), after=after.to_dict(), **extra
        )

    # -- the end -------------------------------------------------------------------------------------
    def summary(self, *, step: int, epochs: int, config: LoaderConfig) -> dict[str, Any]:
        """The run in one line and its figures: what changed and the rates before and after."""
        self.rates.add(self.timer.take())
        rates = self.rates
        first, last = rates.first_rate(), rates.last_rate()
        if rates.changes:
            what = f"{self._initial.describe()} -> {config.describe()} in {rates.changes} change(s)"
            if first and last:
                # Steady rates: the loop's pace at the first and the final configuration, the
                # warm-up (and stall) after each change left out. The job's wall-clock rate is
                # lower by those; the change events carry each stall_s.
                what += f"; {first:.0f} -> {last:.0f} samples/s steady ({last / first:.2f}x; warm-up after changes not counted)"
        else:
            what = f"unchanged {config.describe()}"
            if last:
                what += f"; {last:.0f} samples/s steady"
        rec = self.recommendation
        if self.mode == "recommend" and rec is not None:
            what += f"; recommended {', '.join(f'{k}={b}' for k, (_a, b) in rec.changes.items())}"
        text = f"summary: {step} batches in {epochs} epoch(s); {what}"
        return {
            "text": text,
            "initial_config": self._initial.to_dict(),
            "final_config": config.to_dict(),
            "first_samples_per_s": first,
            "last_samples_per_s": last,
            "changes": self.rates.changes,
        }

    def close(self, *, step: int, epoch: int, epochs: int, config: LoaderConfig, **extra: Any) -> dict[str, Any]:
        """Stops the sampler, logs and records the summary, closes the event log; idempotent.

        Returns:
            The summary (empty when already closed).
        """
        if self.closed:
            return {}
        self.closed = True
        self.sampler.close()
        if self.collective is not None:
            self.collective.close()
        summary = {**self.summary(step=step, epochs=epochs, config=config), **extra}
        logger.info("%s%s", self.log_prefix(), summary["text"])
        self.events_log.emit("summary", step, epoch, **summary)
        self.events_log.close()
        return summary

    # -- helpers -------------------------------------------------------------------------------------
    def log_prefix(self) -> str:
        """The run's name and a colon before its log lines ("" without a name)."""
        return f"{self.name}: " if self.name else ""


def model_environment(model: Any, gpu: Any = None) -> Environment:
    """What the model runs on: CUDA or not, convolutions or not, cuDNN's settings."""
    on_cuda = False
    has_conv = False
    if model is not None:
        try:
            on_cuda = next(model.parameters()).is_cuda
        except (StopIteration, AttributeError):
            on_cuda = False
        if hasattr(model, "modules"):
            has_conv = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    elif gpu is not None and torch.cuda.is_available():
        on_cuda = True
    return Environment(
        on_cuda=on_cuda,
        has_conv=has_conv,
        cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
    )


def batch_nbytes(batch: Any) -> int:
    """Bytes of the tensors in a collated batch (nested tuples, lists and dicts)."""
    if isinstance(batch, torch.Tensor):
        return batch.element_size() * batch.nelement()
    if isinstance(batch, dict):
        return sum(batch_nbytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(batch_nbytes(v) for v in batch)
    return 0


def _first_time(said: set[str], text: str) -> bool:
    """Whether ``text`` is a finding not said yet (noted as said): once per finding, not every
    window, though the numbers in it move from window to window."""
    key = re.sub(r"\d+(\.\d+)?", "#", text)
    if key in said:
        return False
    said.add(key)
    return True


_SETTING = re.compile(r"set (\w+)=(True|False)\b")


def _carried_out(advice: str, config: LoaderConfig) -> bool:
    """Whether ``advice`` asks for a setting ("set pin_memory=True") that ``config`` has."""
    settings = _SETTING.findall(advice)
    return bool(settings) and all(
        str(getattr(config, name, None)) == value for name, value in settings
    )


def _make_collective(timeout_s: float) -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from loadertune.distributed import Collective

    return Collective(timeout_s=timeout_s)


# Objects with close() still open at interpreter exit: most training scripts never call it, and
# their summary and event log must not be lost for that.
_OPEN: weakref.WeakSet[Any] = weakref.WeakSet()
_registered = False


def close_at_exit(obj: Any) -> None:
    """Has ``obj.close()`` called at normal interpreter exit if it is still open then."""
    global _registered
    _OPEN.add(obj)
    if not _registered:
        _registered = True
        atexit.register(_close_open)


def _close_open() -> None:
    for obj in list(_OPEN):
        try:
            obj.close()
        except KeyboardInterrupt:
            # Ctrl-C while the interpreter exits: it exits anyway, and the others still close.
            logger.debug("Ctrl-C while closing %r at exit", obj)
        except Exception:  # exit must go on; say what was lost
            logger.warning("closing %r at exit failed", obj, exc_info=True)
