"""The actuator: carries out configuration changes on the loader pipeline, safely.

Every change, whoever decides it (the controller, ``reconfigure``, a fault, an out-of-memory
undo), goes through :meth:`Actuator.change`: the bounds that cannot be traded for speed come first
(an IterableDataset not known to shard keeps one worker; the batches in flight fit /dev/shm),
then the batch follower plans the learning rate, the pipeline rebuilds at the batch boundary and
the session logs and records it. Worker deaths are classified and recovered from here too.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import torch

from loadertune import shm
from loadertune.config import LoaderConfig
from loadertune.controller import Decision
from loadertune.faults import WORKER_DIED, SampleCrashError, worker_death
from loadertune.follower import BatchFollower
from loadertune.interrupts import sigint_held
from loadertune.pipeline import LoaderPipeline
from loadertune.prestart import slow_start_method
from loadertune.session import TuningSession
from loadertune.switchover import Switchover

__all__ = ["Actuator"]

logger = logging.getLogger("loadertune")


class Actuator:
    """Applies configuration changes and recovers from worker faults for one tuned loader.

    Args:
        front: The front end whose ``config``, ``step`` and ``epoch`` it reads (and whose
            ``config`` it sets when a change runs).
        pipeline: The loader pipeline to rebuild.
        session: The tuning session to log to and keep informed.
        follower: The batch follower (learning rate, accumulation).
        mode: The run's mode.
        workers_cap: Most workers allowed whatever the load wants (None: no cap).
    """

    def __init__(
        self,
        front: Any,
        pipeline: LoaderPipeline,
        session: TuningSession,
        follower: BatchFollower,
        *,
        mode: str,
        workers_cap: int | None,
    ) -> None:
        self._front = front
        self._pipeline = pipeline
        self._session = session
        self._follower = follower
        self._mode = mode
        self._iterable = pipeline.kind == "iterable"
        self._workers_cap = workers_cap
        self._warned: set[str] = set()
        # The worker the stall watch killed to restart a stuck batch (on_stall="restart").
        self._stall_restart: int | None = None
        from loadertune.memory import MemoryTrend

        self._memory = MemoryTrend()
        #: Carries changes whose workers start in the background to their switch.
        self.switchover = Switchover(front, pipeline, session, self.note_workers)
        self._memory_warned: LoaderConfig | None = None
        if session.bounds.ram_budget_bytes is not None:
            # Until a worker is measured, one could grow to this process's size (issue 15).
            session.controller.unmeasured_worker_bytes = _own_rss()

    def undo_batch_increase(self) -> bool:
        """After an out-of-memory error: back to the batch size before the last increase, the
        failed batch's samples served again. False when there is no increase to undo."""
        follower, pipeline = self._follower, self._pipeline
        failed = pipeline.last_delivered
        if follower.last_increase is None or failed is None:
            return False
        previous, factor = follower.last_increase
        follower.last_increase = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        pipeline.last_delivered = None
        pipeline.requeue_front(failed)
        before = self._front.config
        bs = previous.batch_size
        self.change(
            before.replace(batch_size=bs),
            "fault",
            f"out of memory at batch size {before.batch_size}: back to {bs}, the failed "
            f"batch's {len(failed)} samples will come again",
            lr_factor=(1.0 / factor) if factor else None,
        )
        self._session.controller.note_out_of_memory(before, self._front.config)
        return True

    def note_workers(self) -> None:
        """Tells the host source which processes are this loader's workers."""
        set_pids = getattr(self._session.sampler.host, "set_worker_pids", None)
        if set_pids is not None:
            set_pids(self._pipeline.worker_pids())

    def change(
        self,
        config: LoaderConfig,
        kind: str,
        reason: str,
        lr_factor: float | None = None,
        *,
        collective: bool = True,
        background: bool = False,
        **measured: Any,
    ) -> None:
        """Carries out a change now, or (``background``: a tuner's decision that is no limit)
        once its workers have started in the background when they start slowly."""
        pipeline = self._pipeline
        # A later change (a fault, a limit, reconfigure, a revert) supersedes one whose workers
        # are still starting; the running configuration is the "before".
        self.switchover.give_up("a later change came first")
        before = pipeline.pending or self._front.config
        if config == before:
            return
        wanted = config
        config = self._bounded(config, kind)
        if config != wanted and kind in ("change", "revert", "retune"):
            # The controller wanted more than the bounds allow: it must believe what runs, and
            # not try more workers than run now.
            self._session.controller.note_fault(config.replace(num_workers=config.num_workers + 1), config)
        if config == before:
            return
        if config.batch_size != before.batch_size:
            lr_factor = self._follower.plan(before, config, lr_factor, step=self._front.step, at_next_epoch=self._iterable)
        if self._iterable:
            # Its own order cannot be cut mid-epoch: the change waits (a revert cancels it).
            pipeline.pending = None if config == self._front.config else config
            when = "at the next epoch (IterableDataset)"
        elif not pipeline.in_epoch:
            pipeline.switch(config)
            self._front.config = config
            when = "now"
        elif background and self.switchover.room_for_both(config) and self._prestart(before, config):
            self._session.hold_windows(time.perf_counter(), self._front.step)
            when = (
                f"from step {self._front.step}: the new workers start in the background "
                f"({slow_start_method(pipeline.loader)}), the current ones serving until they are ready"
            )
        else:
            try:
                in_flight = pipeline.rebuild(config, handoff_ok=kind != "fault")
            except BaseException:
                # Refused or interrupted: the front tells what the pipeline builds next.
                self._front.config = pipeline.config
                raise
            self._front.config = config
            self.note_workers()
            self._session.rebuilt(in_flight + max(2, config.num_workers), step=self._front.step, collective=collective)
            when = f"at step {self._front.step}"
        self._session.changed(
            kind,
            before,
            config,
            reason,
            step=self._front.step,
            epoch=self._front.epoch,
            when=when,
            lr_factor=lr_factor,
            forced=kind == "reconfigure",
            started=pipeline.starting is None,
            **measured,
        )

    def _prestart(self, before: LoaderConfig, config: LoaderConfig) -> bool:
        """Starts ``config``'s workers in the background; a change that also turns persistent
        workers on turns the running ones persistent first, so that should the epoch end
        before the new workers have started, the running ones serve the next epoch too (and
        the start goes on) instead of starting again."""
        kept = before.replace(persistent_workers=True)
        if config.persistent_workers and kept != before and self._pipeline.persist_in_place(kept):
            self._front.config = kept
        return self._pipeline.prestart(config)

    def _bounded(self, config: LoaderConfig, kind: str) -> LoaderConfig:
        """``config`` within what cannot be traded for speed: an IterableDataset not known to
        shard keeps to one worker (the user's reconfigure says it shards), and the batches in
        flight fit /dev/shm."""
        cap = self._workers_cap
        if cap is not None and config.num_workers > cap:
            if kind == "reconfigure":
                self._workers_cap = None  # the user says it shards
            else:
                self._warn_once(
                    "iterable",
                    "the loop waits on data and more workers would help, but this IterableDataset "
                    "is not known to shard: each worker would yield every item. Split the items "
                    "with torch.utils.data.get_worker_info() and pass tune(iterable_shards=True), or "
                    "set num_workers yourself",
                )
                config = config.replace(num_workers=cap)
        room = self._pipeline.shm_room()
        fitted = config if room is None else shm.fit(config, room[0])
        if fitted != config:
            self._warn_shm(config, fitted)
        return fitted

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _warn_shm(self, wanted: LoaderConfig, fitted: LoaderConfig) -> None:
        room = self._pipeline.shm_room()
        total = room[1] if room is not None else 0
        nbytes = self._pipeline.batch_bytes or 0
        self._warn_once(
            "shm",
            "%s (%.0f MiB) limits the DataLoader: %d workers x prefetch_factor %s of %.1f MiB batches "
            "would not fit, so loadertune runs %d workers x prefetch_factor %s. Enlarge it "
            "(docker run --shm-size=2g, or a bigger /dev/shm mount) or use a smaller "
            "prefetch_factor or batch size",
            self._pipeline.shm_path,
            total / 2**20,
            wanted.num_workers,
            wanted.prefetch_factor,
            nbytes / 2**20,
            fitted.num_workers,
            fitted.prefetch_factor,
        )

    def check_limits(self) -> None:
        """Once per window: /dev/shm and an IterableDataset's sharding bound the workers in every
        mode; what the load would want beyond them is said once, with the fix."""
        pipeline, session = self._pipeline, self._session
        config = self._front.config
        est = None
        if session.metrics is not None:
            from loadertune.planning import estimate_workers

            est = estimate_workers(session.metrics, config, session.controller.bounds)
        # Past what runs and what the load calls for, the exact room changes nothing here.
        need = max(config.num_workers * (config.prefetch_factor or 0), est.needed if est is not None else 0)
        room = pipeline.shm_room(enough=need)
        if room is not None:
            fitted = shm.fit(config, room[0])
            if fitted != config:
                self._warn_shm(config, fitted)
                if self._mode == "apply" and pipeline.in_epoch:
                    self.change(fitted, "fault", f"the batches in flight would not fit {pipeline.shm_path}")
                    session.controller.note_fault(fitted.replace(num_workers=fitted.num_workers + 1), fitted)
            elif est is not None and est.needed > max(room[0], config.num_workers):
                self._warn_shm(config.replace(num_workers=est.needed), shm.fit(config.replace(num_workers=est.needed), room[0]))
        rec = session.recommendation
        cap = self._workers_cap
        if cap is not None and rec is not None and rec.config.num_workers > cap and self._mode == "recommend":
            self._warn_once(
                "iterable",
                "the recommendation of %d workers assumes this IterableDataset splits its items "
                "between workers with torch.utils.data.get_worker_info(); one that does not would "
                "yield every item once per worker",
                rec.config.num_workers,
            )

    def check_memory(self) -> None:
        """Once per window: the workers' PSS forecast for the epoch's end against the RAM budget.

        Both modes warn (once per configuration) with the cause and the fix; apply mode steps
        down to the workers that fit, a limit rather than a speed experiment. The controller
        also learns whether the workers' memory has settled (it holds back steps up until then).
        """
        session, pipeline = self._session, self._pipeline
        budget = session.bounds.ram_budget_bytes
        read = getattr(session.sampler.host, "worker_pss", None)
        if budget is None or read is None:
            return
        walk, by_pid, rss = read()
        pids = set(pipeline.worker_pids())
        by_pid = {pid: pss for pid, pss in by_pid.items() if pid in pids}
        trend = self._memory
        trend.observe(walk, self._front.epoch, pipeline.position(), _epoch_length(pipeline), by_pid, rss)
        controller = session.controller
        settled = trend.settled_bytes()
        if settled is not None and controller.unmeasured_worker_bytes is not None:
            controller.unmeasured_worker_bytes = None
            controller.converged = False  # the steps held back for the measurement may go on
        elif settled is None and pids and controller.unmeasured_worker_bytes is None:
            controller.unmeasured_worker_bytes = _own_rss()
        forecast = trend.forecast()
        config = self._front.config
        if forecast is None or not forecast.crosses(budget) or config.num_workers == 0:
            return
        from loadertune.memory import FIX, workers_within

        target = workers_within(budget, forecast.per_worker_end_bytes, config.num_workers)
        apply = self._mode == "apply" and pipeline.in_epoch
        if self._memory_warned != config:
            self._memory_warned = config
            mib = 2**20
            length = _epoch_length(pipeline) or 0
            logger.warning(
                "the DataLoader workers' memory grows through the epoch: %d workers hold %.0f MiB "
                "after %.0f%% of it and are heading for %.0f MiB by its end (%.0f KiB more per "
                "sample), over the %.0f MiB RAM budget. Likely copy-on-read: %s. %s",
                forecast.workers,
                forecast.now_bytes / mib,
                100.0 * pipeline.position() / max(1, length),
                forecast.end_bytes / mib,
                forecast.slope_bytes_per_sample / 1024,
                budget / mib,
                FIX,
                f"Stepping down to num_workers={target} before it is crossed."
                if apply
                else f"Until then, num_workers={target} keeps it within the budget.",
            )
            session.events_log.emit(
                "memory",
                self._front.step,
                self._front.epoch,
                forecast=forecast.to_dict(),
                budget_bytes=budget,
                config=config.to_dict(),
                action="step_down" if apply else "warn",
                num_workers=target,
                fix=FIX,
            )
        if apply:
            after = config.replace(num_workers=target)
            self.change(
                after,
                "change",
                f"the workers' memory is predicted at {forecast.end_bytes / 2**20:.0f} MiB by the epoch's "
                f"end, over the {budget / 2**20:.0f} MiB budget; {target} workers keep within it",
            )
            # A limit, not a speed experiment: no more workers are tried again.
            controller.note_fault(config, self._front.config)

    def act(self, decision: Decision) -> None:
        rec = decision.recommendation
        diagnosis = self._session.diagnosis
        before = self._front.config
        self.change(
            decision.config,
            decision.action,
            decision.reason,
            lr_factor=decision.lr_factor,
            # A forced step (memory, over-provisioned) is a limit: it runs at once.
            background=rec is None or not rec.forced,
            before_samples_per_s=decision.before_samples_per_s,
            after_samples_per_s=decision.after_samples_per_s,
            expected_speedup=rec.expected_speedup if rec is not None else None,
            diagnosis=diagnosis.kind if diagnosis is not None else None,
        )
        after = self._front.config
        if rec is not None and rec.forced and after.num_workers < before.num_workers:
            # A step down for memory is a limit, not a speed experiment: no more workers than
            # were over it are tried again (until the load drifts).
            self._session.controller.note_fault(before, after)

    def after_failure(self, it: Any, exc: Exception) -> None:
        """Handles an exception from ``next()``: a dead worker is recovered from, anything else
        (the dataset's own error) is re-raised unchanged after dropping its batch, as torch does."""
        while True:
            try:
                # Workers stop and start here (a Ctrl-C waits for the end; see interrupts.py).
                with sigint_held():
                    death = worker_death(it, exc)
                    if death in ("died", "stale") and self._stall_restart is not None:
                        self._restart_after_stall(exc)
                        return
                    if death == "none":
                        self._pipeline.drop_failed()
                        raise exc
                    if death in ("died", "shm"):
                        self._recover(exc, it, death)
                    return
            except RuntimeError as late:
                # torch's SIGCHLD handler raises asynchronously, so the report of a death can
                # land inside this very handling, the SIGINT hold's set-up and end included:
                # take it as the death it reports, once more.
                if late is exc or isinstance(late, SampleCrashError) or not WORKER_DIED.search(str(late)):
                    raise
                exc = late
                it = self._pipeline.src_it

    def restart_stalled(self, pid: int, indices: Any) -> None:
        """Called from the stall watch's thread (``on_stall="restart"``): kills the worker stuck
        on a batch. The training thread takes the death as a restart: the same settings, the
        stuck batch and the rest in flight served again, no ceiling learned, no crash counted."""
        self._stall_restart = pid
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            self._stall_restart = None

    def _restart_after_stall(self, exc: Exception) -> None:
        pipeline = self._pipeline
        pid, self._stall_restart = self._stall_restart, None
        if not pipeline.in_epoch:
            raise exc
        config = self._front.config
        logger.warning(
            "restarted the DataLoader workers after worker pid %s stalled (on_stall='restart'): "
            "resuming at step %d with %s, its batch served again, no sample lost",
            pid,
            self._front.step,
            config.describe(),
        )
        pipeline.rebuild(config, handoff_ok=False)
        self.note_workers()
        self._session.rebuilt(max(2, config.num_workers), step=self._front.step, collective=False)
        self._session.fault(exc, config, config, step=self._front.step, epoch=self._front.epoch, cause="stall", pid=pid)

    def _recover(self, exc: Exception, it: Any = None, death: str = "died") -> None:
        pipeline = self._pipeline
        if not pipeline.in_epoch:
            raise exc
        before = self._front.config
        w = before.num_workers
        if death == "shm":
            # /dev/shm ran out under this loader (another process may have filled it): at least
            # halve what is in flight, within what is free now; the failed batch comes again.
            room = pipeline.shm_room()
            in_flight = w * (before.prefetch_factor or 0)
            target = in_flight // 2 if room is None else min(in_flight // 2, room[0])
            if pipeline.crashes.suspects:
                target = max(1, target)  # a sample under suspicion never loads in this process
            after = shm.fit(before, target)
            what = f"{pipeline.shm_path} is full"
            self._warn_shm(before, after)
        else:
            repeated = pipeline.note_death(it, exc)
            if repeated:
                # The same samples killed a second worker: not bad luck but the data. Stop, and
                # name the sample; running it here would crash the training process itself.
                error = pipeline.crash_error(exc, repeated)
                self._session.fault(
                    error, before, before, step=self._front.step, epoch=self._front.epoch, cause="crash", samples=repeated
                )
                raise error from exc
            fewer = max(0, w - max(1, w // 2))
            if pipeline.crashes.suspects:
                # The dead worker's samples load again in a worker: if one of them is what kills
                # workers, it must kill another worker, never the training process.
                fewer = max(1, fewer)
            after = before.replace(num_workers=fewer)
            what = "a worker died"
        logger.warning(
            "%s; %s: rebuilding with num_workers=%d prefetch_factor=%s and resuming at step %d, "
            "no sample lost",
            exc,
            what,
            after.num_workers,
            after.prefetch_factor,
            self._front.step,
        )
        # A broken loader cannot hand anything over: its in-flight batches are re-queued.
        # A fault is this rank's alone: it must not move the window every rank closes together.
        pipeline.rebuild(after, handoff_ok=False)
        self._front.config = after
        self.note_workers()
        self._session.rebuilt(max(2, after.num_workers), step=self._front.step, collective=False)
        self._session.controller.note_fault(before, after)
        self._session.fault(exc, before, after, step=self._front.step, epoch=self._front.epoch, cause=death)


def _own_rss() -> int | None:
    """This process's resident size: the most a forked worker could copy of it."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # no psutil reading: no probing step
        return None


def _epoch_length(pipeline: LoaderPipeline) -> int | None:
    """The epoch's length in the units of ``pipeline.position()``, None when unknown."""
    loader = pipeline.loader
    try:
        if pipeline.kind == "sampler":
            return len(loader.batch_sampler.sampler)
        if pipeline.kind == "batch_sampler":
            return len(loader.batch_sampler)
        if pipeline.kind == "samples":
            return len(loader.sampler)
    except TypeError:
        return None
    return None
