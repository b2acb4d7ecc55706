"""The front end's side of a change whose workers start in the background (spawn, forkserver).

The pipeline starts the new loader's workers while the old loader serves (see
:mod:`loadertune.prestart`); :class:`Switchover` checks on them at the batch boundaries the
window schedule calls back at, switches once they have all started, carries the start across an
epoch's end, and reports a start given up, so that windows go on with the loader that runs and
the controller believes what runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from loadertune.config import LoaderConfig

__all__ = ["Switchover"]

logger = logging.getLogger("loadertune")


class Switchover:
    """Carries a change whose workers start in the background to its switch, or gives it up.

    Args:
        front: The front end whose ``config``, ``step`` and ``epoch`` it reads (and whose
            ``config`` it sets at the switch).
        pipeline: The loader pipeline starting the workers.
        session: The tuning session (windows, controller, events).
        note_workers: Tells the host source which processes are the loader's workers now.
    """

    def __init__(self, front: Any, pipeline: Any, session: Any, note_workers: Callable[[], None]) -> None:
        self._front = front
        self._pipeline = pipeline
        self._session = session
        self._note_workers = note_workers

    def room_for_both(self, config: LoaderConfig) -> bool:
        """Whether the running workers and ``config``'s fit the RAM budget together (they run
        side by side while the new ones start; workers that join the running ones are only
        those added); unknown sizes do not stop it."""
        session = self._session
        budget = session.controller.bounds.ram_budget_bytes
        per = session.metrics.worker_mem_bytes if session.metrics is not None else None
        if budget is None or not per:
            return True
        running = self._front.config.num_workers
        both = max(running, config.num_workers) if self._pipeline.joins(config) else running + config.num_workers
        return both * per <= budget

    def check(self, now_s: float) -> None:
        """Switches to the loader whose workers started in the background once they all have;
        gives the start up, keeping the running loader, when a new worker died, torch refused
        or they took too long. Reports a start given up elsewhere (the epoch left, a rebuild)."""
        pipeline, front, session = self._pipeline, self._front, self._session
        starting = pipeline.starting
        if starting is None:
            self.report_abandoned()
            return
        state = starting.poll()
        step = front.step
        if state is None:
            session.hold_windows(now_s, step)
            return
        if state != "ready":
            pipeline.abort_prestart(state)
            self.report_abandoned(failed=True)
            return
        took_s = now_s - starting.started_s
        in_flight = pipeline.finish_prestart()
        session.rates.changed()  # the run's "after" starts at the switch
        c = front.config = pipeline.config
        self._note_workers()
        session.rebuilt(in_flight + max(2, c.num_workers * (c.prefetch_factor or 2)), step=step)
        logger.info(
            "%sswitched to %s at step %d: its workers started in %.1f s while the old ones served",
            session.log_prefix(),
            c.describe(),
            step,
            took_s,
        )
        session.events_log.emit("switch", step, front.epoch, config=c.to_dict(), started_s=round(took_s, 3))

    def at_epoch_end(self) -> None:
        """The old loader served its epoch out while new workers are still starting. Persistent,
        it serves the next epoch too and the start goes on. Otherwise its workers would start
        again for the next epoch anyway: the half-started ones are stopped and the next epoch
        starts the new configuration's, as any change between epochs does."""
        pipeline, front, session = self._pipeline, self._front, self._session
        starting = pipeline.starting
        c = pipeline.config
        if starting is None or (c.persistent_workers and c.num_workers > 0):
            return
        pipeline.abort_prestart("the epoch ended first")
        pipeline.abandoned = None  # not given up: it takes effect at the next epoch
        pipeline.switch(starting.config)
        front.config = starting.config
        session.release_windows(time.perf_counter(), front.step)
        logger.info(
            "%sthe epoch ended before the new workers had started: they are stopped, and the next "
            "epoch starts with %s",
            session.log_prefix(),
            starting.config.describe(),
        )

    def give_up(self, why: str) -> None:
        """Gives up a start under way (a later change supersedes it) and reports it."""
        self._pipeline.abort_prestart(why)
        self.report_abandoned()

    def report_abandoned(self, *, failed: bool = False) -> None:
        """A background start was given up: windows go on with the running loader, and the
        controller is told what runs. ``failed`` (a worker died, too slow): a fault, logged as a
        WARNING, and no more workers than that are tried again."""
        pipeline, front, session = self._pipeline, self._front, self._session
        abandoned, pipeline.abandoned = pipeline.abandoned, None
        if session.windows_held:
            session.release_windows(time.perf_counter(), front.step)
        if abandoned is None:
            return
        wanted, why = abandoned
        running = front.config
        text = f"gave up starting the workers of {wanted.describe()} ({why}); keeping {running.describe()}"
        if failed:
            session.controller.note_fault(wanted, running)
            session.fault(text, wanted, running, step=front.step, epoch=front.epoch, changed=False, cause="start")
            logger.warning("%s%s", session.log_prefix(), text)
        else:
            session.controller.note_external_change(running)
            session.events_log.emit(
                "abandon", front.step, front.epoch, wanted=wanted.to_dict(), config=running.to_dict(), why=why
            )
            logger.info("%s%s", session.log_prefix(), text)
