"""One DataLoader watched by ``loadertune run``: where it was made, how it was used, and its
tuning session.

An :class:`Observation` never touches the loader's data path: the DataLoader builds its own
iterator and draws its own seeds; the observation is handed the two clock readings around each
``next()`` and the batch, and feeds them to a :class:`~loadertune.session.TuningSession` (the same
measuring and deciding core that ``tune()`` and the Lightning callback use). In apply mode the
observation holds the :class:`~loadertune.tuned.TunedLoader` instead, which measures itself.

Nothing here may raise into the training loop: a failure disables the observation and is
reported at exit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from loadertune.timer import CPU_EVERY, CPU_PHASE_AT_EPOCH_START

__all__ = ["Observation", "Site", "batch_length"]

logger = logging.getLogger("loadertune")


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a DataLoader was created: the first frame outside torch and the frameworks.

    Attributes:
        path: Absolute path of the file.
        line: Line number.
        function: The function that created it.
        code: The source line, stripped ("" when unavailable).
        via: The framework module that code called to get the loader ("" when it built the
            loader itself), e.g. ``transformers.trainer``.
    """

    path: str
    line: int
    function: str
    code: str = ""
    via: str = ""

    @property
    def name(self) -> str:
        """``file.py:42``, the name the report uses."""
        return f"{os.path.basename(self.path)}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with ``name``."""
        return {**dataclasses.asdict(self), "name": self.name}


def batch_length(batch: Any, default: int) -> int:
    """Samples in a collated batch: the leading dimension of its first tensor-like leaf.

    Cheap on purpose (it runs once per batch): it looks at the first leaf only, and falls back
    to ``default`` (the loader's batch size) when the batch holds nothing with a length.
    """
    for _ in range(4):  # nested containers, a few levels deep at most
        if isinstance(batch, dict):
            if not batch:
                return default
            batch = next(iter(batch.values()))
        elif isinstance(batch, (list, tuple)):
            if not batch:
                return default
            batch = batch[0]
        else:
            break
    shape = getattr(batch, "shape", None)
    if shape:
        return int(shape[0])
    return default


class Observation:
    """The state kept for one user DataLoader in one process.

    Args:
        site: Where the loader was created.
        index: Its order of creation among the observed loaders of this process.
        loader: The DataLoader (only read here; not kept, so the loader can be freed).
        options: The run's :class:`~loadertune.options.TuneOptions`.
        log_file: This loader's event log, or None.
    """

    def __init__(self, site: Site, index: int, loader: Any, options: Any, log_file: str | None) -> None:
        from torch.utils.data import BatchSampler, IterableDataset

        from loadertune.config import LoaderConfig

        self.site = site
        self.index = index
        self.class_name = type(loader).__name__
        self.options = options
        self.log_file = log_file
        config = LoaderConfig.from_loader(loader)
        self.batch_size = loader.batch_size
        sampler = loader.batch_sampler
        if config.batch_size is None and type(sampler) is BatchSampler:
            # A BatchSampler passed in holds the batch size (as TunedLoader reads it); the code
            # to change is then that sampler's, so batch-size advice stays off (batch_size None).
            config = config.replace(batch_size=sampler.batch_size)
        self.config = config
        self.iterated_by = ""  # the module that first called iter() on the loader
        self.iterable = isinstance(loader.dataset, IterableDataset)
        self.shuffled = _shuffled(loader)
        self.session: Any = None
        self.tuned: Any = None
        self.not_tuned: str | None = None
        self.error: str | None = None
        self.summary: dict[str, Any] | None = None
        self.step = 0
        self.samples = 0
        self.epochs = 0
        self.wait_s = 0.0
        self.busy_s = 0.0  # wall time from each epoch's first request to its last batch
        self.grad_off = 0  # batches taken with autograd off (evaluation)
        self._epoch_open = False
        self._epoch_start_s: float | None = None
        self._last_s: float | None = None
        self._closed = False
        self._is_grad_enabled: Any = None
        self._timer_record: Any = None
        self._worker_pids: tuple[int, ...] = ()
        self._schedule: Any = None
        # Thread-CPU timing only where loading runs in the training thread (-1: never).
        self._cpu_phase = 0 if self.config.num_workers == 0 and not self.iterable else -1
        self._cpu_mark = 0.0
        self.window_closed = False

    # -- the data path -------------------------------------------------------------------------
    def epoch_started(self) -> None:
        """Called by the patched ``DataLoader.__iter__`` on every new iteration."""
        if self.error is not None or self._closed:
            return
        try:
            self._flush_epoch()
            self.epochs += 1
            self._epoch_open = True
            if self._cpu_phase >= 0:
                self._cpu_phase = CPU_PHASE_AT_EPOCH_START
            if self.tuned is not None:
                return
            if self.session is None:
                self._start_session()
            self.session.epoch_started(step=self.step, config=self.config)
        except Exception as exc:
            self.fail(exc)

    def next(self, original: Any, it: Any) -> Any:
        """``original(it)`` (torch's ``__next__``), timed; the batch is returned untouched.

        Without workers, loading runs in this thread, and its CPU time tells loading work from
        waiting (on I/O, on a busy machine). Reading the thread clock costs ~2 us, so, as
        ``TunedLoader`` does, one batch in ``CPU_EVERY`` is timed: its time in ``next()`` and the
        loop's gap after it.
        """
        phase = self._cpu_phase
        cpu = loop_cpu = -1.0
        if phase == 0:
            cpu = time.thread_time()
        elif phase == 1:
            loop_cpu = time.thread_time() - self._cpu_mark
        requested = time.perf_counter()
        try:
            batch = original(it)
        except StopIteration:
            self.epoch_ended()
            raise
        returned = time.perf_counter()
        if phase >= 0:
            if phase == 0:
                self._cpu_mark = time.thread_time()
                cpu = self._cpu_mark - cpu
            self._cpu_phase = (phase + 1) % CPU_EVERY
        self.window_closed = self._record(requested, returned, batch, cpu, loop_cpu)
        return batch

    def _record(self, requested_s: float, returned_s: float, batch: Any, cpu_s: float, loop_cpu_s: float) -> bool:
        """Feeds one batch to the session; True when a measurement window closed with it."""
        session = self.session
        if self.error is not None or self._closed or session is None:
            return False
        try:
            n = batch_length(batch, self.batch_size or 1)
            self.step = step = self.step + 1
            self.samples += n
            self.wait_s += returned_s - requested_s
            if self._epoch_start_s is None:
                self._epoch_start_s = requested_s
            self._last_s = returned_s
            if not self._is_grad_enabled():
                self.grad_off += 1
            self._timer_record(requested_s, returned_s, n, cpu_s, loop_cpu_s)
            schedule = self._schedule
            if returned_s >= schedule.deadline_s and step >= schedule.step:
                before = session.metrics
                session.close_window(
                    now_s=returned_s, step=step, epoch=self.epochs - 1, config=self.config, batch=batch
                )
                return session.metrics is not before
            if step == 1:
                # The batch's bytes bound /dev/shm use; each window measures them again.
                session.note_batch(batch)
            return False
        except Exception as exc:
            self.fail(exc)
            return False

    def note_workers(self, it: Any) -> None:
        """Tells the host source which processes are the iterator's workers (their CPU and
        memory tell CPU-bound loading from waiting), as TunedLoader does after each build."""
        if self.session is None or self.error is not None:
            return
        try:
            pids = tuple(w.pid for w in getattr(it, "_workers", ()) if w.pid is not None)
            if pids and pids != self._worker_pids:
                self._worker_pids = pids
                set_pids = getattr(self.session.sampler.host, "set_worker_pids", None)
                if set_pids is not None:
                    set_pids(pids)
        except Exception as exc:
            self.fail(exc)

    def epoch_ended(self) -> None:
        """The iterator raised StopIteration."""
        self._flush_epoch()

    def fail(self, exc: BaseException) -> None:
        """Stops observing after an internal error; the job carries on, the report says why."""
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"
            logger.warning("stopped watching the DataLoader made at %s: %s", self.site.name, self.error)

    # -- the end -------------------------------------------------------------------------------
    def close(self) -> None:
        """Closes the session (or the tuned loader); idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        self._flush_epoch()
        try:
            if self.tuned is not None:
                self.tuned.close()
            elif self.session is not None:
                self.summary = self.session.close(
                    step=self.step, epoch=max(0, self.epochs - 1), epochs=self.epochs, config=self.config
                )
        except Exception as exc:
            self.fail(exc)

    def to_dict(self) -> dict[str, Any]:
        """The loader's report entry (plain data, JSON-ready); safe to call at any time."""
        source = self.tuned if self.tuned is not None else self.session
        metrics = getattr(source, "metrics", None)
        diagnosis = getattr(source, "diagnosis", None)
        recommendation = getattr(source, "recommendation", None)
        final = self.tuned.config if self.tuned is not None else self.config
        summary = self.summary
        if self.tuned is not None:
            summary = _tuned_summary(self.tuned)
        return {
            "site": self.site.to_dict(),
            "index": self.index,
            "class": self.class_name,
            "iterated_by": self.iterated_by,
            "mode": "apply" if self.tuned is not None else "recommend",
            "not_tuned": self.not_tuned,
            "error": self.error,
            "batches": self.step if self.tuned is None else int(getattr(self.tuned, "step", 0)),
            "samples": self.samples,
            "epochs": self.epochs,
            "wait_s": self.wait_s,
            "busy_s": self.busy_s,
            "grad_off_batches": self.grad_off,
            "shuffled": self.shuffled,
            "iterable": self.iterable,
            "config": self.config.to_dict(),
            "final_config": final.to_dict(),
            "metrics": metrics.to_dict() if metrics is not None else None,
            "diagnosis": diagnosis.to_dict() if diagnosis is not None else None,
            "recommendation": recommendation.to_dict() if recommendation is not None else None,
            "summary": summary,
            "event_log": self.log_file,
            "closed": self._closed,
        }

    # -- helpers -------------------------------------------------------------------------------
    def _start_session(self) -> None:
        import torch

        self._is_grad_enabled = torch.is_grad_enabled
        options = dataclasses.replace(self.options, mode="recommend", log_file=self.log_file)
        self.session = session = _independent_session(
            options,
            self.config,
            batch_resizable=self.batch_size is not None and not self.iterable,
            integration="run",
            name=self.site.name,
        )
        # The per-batch path reads these two directly (both live as long as the session).
        self._timer_record = session.timer.record
        self._schedule = session.schedule

    def _flush_epoch(self) -> None:
        if self._epoch_open and self._epoch_start_s is not None and self._last_s is not None:
            self.busy_s += self._last_s - self._epoch_start_s
        self._epoch_open = False
        self._epoch_start_s = self._last_s = None


def _independent_session(options: Any, config: Any, **kwargs: Any) -> Any:
    """A TuningSession that decides for this process alone, even under torch.distributed.

    Observing is per rank: ranks may iterate different loaders (validation on rank 0 only) or a
    different number of batches, and a collective window would then wait for a peer that never
    comes. Recommend mode changes nothing, so no decision needs to agree across ranks.
    """
    from loadertune.session import TuningSession

    return TuningSession(options, config, distributed=False, **kwargs)


def _shuffled(loader: Any) -> bool | None:
    """Whether the loader draws a random order (None when it cannot be told)."""
    from torch.utils.data import RandomSampler, SequentialSampler

    # A batch_sampler passed in holds the real order (the loader's own .sampler is then a
    # default SequentialSampler): accelerate's and the Hugging Face Trainer's loaders.
    for sampler in (getattr(loader.batch_sampler, "sampler", None), loader.sampler):
        if isinstance(sampler, RandomSampler):
            return True
        if isinstance(sampler, SequentialSampler):
            return False
        shuffle = getattr(sampler, "shuffle", None)  # DistributedSampler and its kind
        if isinstance(shuffle, bool):
            return shuffle
    return None


def _tuned_summary(tuned: Any) -> dict[str, Any] | None:
    # TunedLoader logs its summary as an event at close(); the last one is the summary.
    for event in reversed(getattr(tuned, "events", [])):
        if event.kind == "summary":
            return dict(event.data) if hasattr(event, "data") else None
    return None
