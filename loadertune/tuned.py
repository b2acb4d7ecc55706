"""``tune()`` and ``TunedLoader``: a drop-in DataLoader that measures, diagnoses and tunes itself.

The wrapper owns the epoch's sample stream (see :mod:`loadertune.stream`) and builds the actual
DataLoaders on it, so it can rebuild mid-epoch at a batch boundary without losing or repeating a
sample. Per batch it only reads the clock twice and pops a deque; everything else happens once
per window.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from loadertune.actuator import Actuator
from loadertune.config import LoaderConfig
from loadertune.deathreport import HOLD
from loadertune.diagnosis import Diagnosis
from loadertune.errors import ReconfigureError
from loadertune.events import Event
from loadertune.faults import WORKER_DIED, SampleCrashError
from loadertune.follower import BatchFollower
from loadertune.interrupts import sigint_held
from loadertune.metrics import WindowMetrics
from loadertune.options import MODES, Mode, OnStall, TuneOptions
from loadertune.pipeline import LoaderPipeline, stream_kind
from loadertune.planning import Recommendation
from loadertune.prestart import slow_start_method
from loadertune.sampler import Sampler
from loadertune.session import TuningSession, close_at_exit
from loadertune.timer import CPU_EVERY, CPU_PHASE_AT_EPOCH_START

__all__ = ["MODES", "Mode", "TunedLoader", "tune"]

logger = logging.getLogger("loadertune")



def _restored(loader: DataLoader, options: TuneOptions, config: LoaderConfig) -> TunedLoader:
    """Unpickles a :class:`TunedLoader`: a fresh one over ``loader``, at ``config``."""
    tuned = TunedLoader(loader, options)
    if config != tuned.config:
        tuned._pipeline.switch(config)
        tuned.config = config
        tuned._session.controller.note_external_change(config)
    return tuned


def tune(
    loader: DataLoader,
    *,
    mode: Mode = "recommend",
    gpu: Any = "auto",
    log_file: str | None = None,
    window_s: float = 2.0,
    min_window_batches: int = 10,
    interval_s: float = 0.1,
    allow_batch_size: bool = False,
    optimizer: Any = None,
    scheduler: Any = None,
    lr_rule: str = "auto",
    lr_warmup_steps: int = 0,
    keep_schedule_length: bool = False,
    accumulation_steps: int | None = None,
    model: torch.nn.Module | None = None,
    seed: int | None = None,
    max_workers: int | None = None,
    ram_budget_share: float = 0.5,
    host: Any = True,
    sinks: tuple[Callable[[Event], Any], ...] = (),
    dist_timeout_s: float = 300.0,
    iterable_shards: bool = False,
    stall_timeout_s: float | None = None,
    on_stall: OnStall = "warn",
) -> TunedLoader:
    """Wraps a DataLoader so that it watches the training run and tunes the loading.

    Args:
        loader: The ``torch.utils.data.DataLoader`` to wrap; map-style or iterable dataset, any
            ``num_workers``.
        mode: ``"recommend"`` logs what to change and never changes anything; ``"apply"``
            rebuilds the loader live (workers, prefetch, pinning, persistence; the batch size
            too with ``allow_batch_size=True``).
        gpu: ``"auto"`` (NVML for the training device when it works, else none), None, or a GPU
            source such as ``loadertune.NvmlGpu(0)`` or ``loadertune.sim.SimulatedGpu(...)``.
        log_file: Path of a JSONL event log to append to.
        window_s: Least seconds per measurement window.
        min_window_batches: Least batches per measurement window.
        interval_s: Sampler period (GPU and host readings).
        allow_batch_size: In apply mode, allow batch-size changes (the learning rate of
            ``optimizer``/``scheduler`` is scaled by ``lr_rule``).
        optimizer: The optimizer whose learning rate follows batch-size changes.
        scheduler: Its learning-rate scheduler, if any.
        lr_rule: ``"auto"``, ``"linear"``, ``"sqrt"`` or ``"none"``.
        lr_warmup_steps: Ramp into a raised learning rate over this many optimizer steps
            (Goyal et al.'s gradual warmup) instead of jumping to it.
        keep_schedule_length: When the batch size changes, rescale ``scheduler``'s step-counted
            lengths (step_size, milestones, T_max, total_steps...) so the schedule keeps its
            length in samples; for schedulers stepped once per batch.
        accumulation_steps: When the loop accumulates gradients over k micro-batches, pass k:
            a batch-size change then grows the micro-batch and shrinks k so the effective batch
            and the learning rate stay; read ``TunedLoader.accumulation_steps`` each step.
        model: The model, if given: tells whether it trains on CUDA and has convolutions.
        seed: Makes every sample's random draws depend only on (seed, epoch, index), whatever
            ``num_workers`` and through rebuilds (map-style datasets).
        max_workers: Cap on workers (default: 8 per usable CPU, at least 8, at most 64).
        ram_budget_share: Share of the RAM available at the start that all workers together may
            use (default one half).
        host: True for psutil host metrics, None to go without.
        sinks: Callables that receive every :class:`~loadertune.events.Event`.
        dist_timeout_s: Under ``torch.distributed``, how long a rank waits for the others at a
            collective decision before raising ``DistributedTimeoutError``.
        iterable_shards: The loader's IterableDataset splits its items between workers (by
            ``torch.utils.data.get_worker_info()``), so apply mode may give it more workers.
            Without it, apply mode adds workers only to one that already runs with two or more;
            one that does not shard would repeat every item once per worker.
        stall_timeout_s: When the loop has waited this long for one batch, a WARNING and a
            ``stall`` event name its sample indices, the process loading it and that process's
            Python stack (again once per further timeout). None (default): 20 times the slowest
            window's time per batch, at least 60 s. ``math.inf`` turns the watch off.
        on_stall: ``"warn"`` (default) only reports; ``"restart"`` also restarts the workers once
            per stuck batch and serves that batch again (for transient hangs such as a network
            file system that recovers; the in-flight batches are loaded again and a hang inside
            a worker's C call is cut short). Without workers there is nothing to restart.

    Returns:
        A :class:`TunedLoader`; iterate it exactly as the DataLoader.

    Raises:
        ValueError: A bad argument; the message names it and says what to pass.
    """
    return TunedLoader(
        loader,
        TuneOptions(
        mode=mode,
        gpu=gpu,
        log_file=log_file,
        window_s=window_s,
        min_window_batches=min_window_batches,
        interval_s=interval_s,
        allow_batch_size=allow_batch_size,
        optimizer=optimizer,
        scheduler=scheduler,
        lr_rule=lr_rule,
        lr_warmup_steps=lr_warmup_steps,
        keep_schedule_length=keep_schedule_length,
        accumulation_steps=accumulation_steps,
        model=model,
        seed=seed,
        max_workers=max_workers,
        ram_budget_share=ram_budget_share,
        host=host,
        sinks=sinks,
        dist_timeout_s=dist_timeout_s,
        iterable_shards=iterable_shards,
        stall_timeout_s=stall_timeout_s,
        on_stall=on_stall,
        ),
    )


class TunedLoader:
    """A DataLoader stand-in that measures, diagnoses and (in apply mode) retunes itself.

    Build it with :func:`tune`. Iterate it like the DataLoader it wraps. Attributes worth
    reading: ``config`` (in use), ``diagnosis`` (latest), ``recommendation`` (what to move to,
    or None), ``metrics`` (latest window), ``events``, ``accumulation_steps``.

    It is a thin front end: the loader pipeline (:mod:`loadertune.pipeline`) serves the batches,
    the tuning session (:mod:`loadertune.session`) measures and decides, the batch follower
    (:mod:`loadertune.follower`) keeps the learning rate in step with the batch size.
    """

    def __init__(self, loader: DataLoader, options: TuneOptions | None = None, **kwargs: Any) -> None:
        if options is None:
            options = TuneOptions(**kwargs)
        elif kwargs:
            raise ValueError("pass either a TuneOptions or keyword options, not both")
        if not isinstance(loader, DataLoader):
            raise ValueError(
                f"tune() takes a torch.utils.data.DataLoader, got {type(loader).__name__}; "
                "wrap your dataset in a DataLoader first"
            )
        if type(loader).__module__.split(".")[0] == "accelerate":
            raise ValueError(
                f"tune() got an accelerate {type(loader).__name__}: accelerate shards and "
                "synchronizes its shuffling inside that loader's own iteration, which loadertune "
                "replaces. Call tune() on the plain DataLoader (with a DistributedSampler) before "
                "accelerator.prepare(); see docs/distributed.md"
            )
        kind = stream_kind(loader)
        config = LoaderConfig.from_loader(loader)
        if kind == "sampler" and config.batch_size is None:
            config = config.replace(batch_size=loader.batch_sampler.batch_size)
        if options.allow_batch_size and kind != "sampler":
            raise ValueError(
                "allow_batch_size=True needs a DataLoader built with batch_size= on a map-style "
                "dataset; this one has "
                + ("an IterableDataset" if kind == "iterable" else "a custom batch_sampler or batch_size=None")
                + ", whose batches loadertune cannot re-cut"
            )
        self._iterable = kind == "iterable"
        # An IterableDataset that already runs with several workers shards (or the job would
        # already see its items repeated); otherwise only the user can say it does.
        workers_cap = 1 if self._iterable and not options.iterable_shards and config.num_workers < 2 else None
        dataset = self._seeded_dataset(loader.dataset, options.seed)
        self.loader = loader
        self.options = options
        self.mode: Mode = options.mode
        self.window_s = options.window_s
        self.min_window_batches = options.min_window_batches
        self.allow_batch_size = options.allow_batch_size
        self.step = 0
        self.epoch = 0
        self._epochs_started = 0
        self._closed = False
        self._cpu_mark = 0.0
        self._cpu_phase = 0
        # perf_counter() at which the loop started waiting for a batch, 0.0 when it is not
        # waiting: the stall watch reads it from its own thread.
        self._wait_since = 0.0
        self._stall: Any = None
        self._generation = 0
        # Read per batch: whether a delivered item is a batch of samples (not one sample), and
        # whether a batch's bytes are still to be measured.
        self._batched = kind != "samples"
        self._bytes_unknown = True
        self._current: _Epoch | None = None
        self.config = config
        self._initial_config = config
        self._pipeline = LoaderPipeline(loader, dataset=dataset, config=config, key=self._key_fn(options.seed))
        self._session = session = TuningSession(
            options, config, batch_resizable=kind == "sampler", optimizer=options.optimizer
        )
        self._pipeline.collective = session.collective
        # The per-batch path reads these directly.
        self._timer = session.timer
        self._schedule = session.schedule
        self._follower = BatchFollower(
            optimizer=options.optimizer,
            scheduler=options.scheduler,
            lr_exponent=session.lr_exponent,
            warmup_steps=options.lr_warmup_steps,
            keep_schedule_length=options.keep_schedule_length,
            accumulation_steps=options.accumulation_steps,
        )
        self._actuator = Actuator(
            self, self._pipeline, session, self._follower, mode=options.mode, workers_cap=workers_cap
        )
        # Each spawn/forkserver worker costs seconds to start: apply mode grows them in steps.
        session.controller.slow_start = options.mode == "apply" and slow_start_method(loader) is not None
        if options.stall_timeout_s is None or math.isfinite(options.stall_timeout_s):
            from loadertune.stall import StallWatch

            self._stall = StallWatch(self, timeout_s=options.stall_timeout_s, on_stall=options.on_stall)
            # Every worker loadertune starts can then be asked for its stack.
            self._pipeline.worker_init_fn = self._stall.worker_init_fn(loader.worker_init_fn)
        close_at_exit(self)

    @property
    def config(self) -> LoaderConfig:
        """The configuration in use (recommend mode never changes it)."""
        return self._config

    @config.setter
    def config(self, value: LoaderConfig) -> None:
        self._config = value
        # Without workers loading runs in the training thread, whose CPU clock then tells
        # loading CPU work from waiting.
        self._inline = value.num_workers == 0 and not self._iterable

    # -- the DataLoader interface ------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        if self._closed:
            raise RuntimeError("this TunedLoader is closed; call tune() again on the DataLoader")
        pipeline = self._pipeline
        if pipeline.src_it is not None and pipeline.in_epoch:
            self.epoch += 1  # the previous epoch was left early
        # A death reported while the epoch is set up waits for the first next() (deathreport.py).
        HOLD.holding = True
        try:
            with sigint_held():  # the epoch's workers start here (see loadertune.interrupts)
                if pipeline.start_epoch():
                    self.config = pipeline.config
                    self._follower.epoch_started(self.step)
                self._epochs_started += 1
                self._cpu_phase = CPU_PHASE_AT_EPOCH_START
                self._actuator.note_workers()
            self._session.epoch_started(step=self.step, config=self.config)
        except RuntimeError as exc:
            # A report of a worker that died as it started, raised here all the same: torch sets
            # its SIGCHLD handler as the first workers start, a moment before the hold wraps it.
            # The death the first next() would have reported, handled as that one is (recovered
            # from, or a WorkerStartError).
            if pipeline.src_it is None or isinstance(exc, SampleCrashError) or not WORKER_DIED.search(str(exc)):
                raise
            self._actuator.after_failure(pipeline.src_it, exc)
            self.config = pipeline.config
        # Each iter() supersedes the iterators before it: loadertune owns the epoch's sample
        # stream, so two live iterators would split one epoch between them without a word.
        self._generation += 1
        self._current = _Epoch(self, self._generation)
        return self._current

    def __next__(self) -> Any:
        # iter(tuned) returns an epoch iterator; next() on the loader itself reads the current one.
        current = self._current
        if current is None:
            raise StopIteration
        return next(current)

    def __len__(self) -> int:
        pipeline = self._pipeline
        if pipeline.kind != "sampler" or self.config.batch_size == self.loader.batch_size:
            return len(self.loader)
        n = len(self.loader.batch_sampler.sampler)
        bs = self.config.batch_size
        return n // bs if pipeline.drop_last else math.ceil(n / bs)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch number and passes it to the sampler (``DistributedSampler.set_epoch``).

        After :meth:`load_state_dict`, the epoch the state was saved in keeps its position;
        another epoch number starts that epoch afresh.
        """
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if self._pipeline.order.resume_at is not None and epoch != self.epoch:
            logger.warning("set_epoch(%d) after resuming in epoch %d: epoch %d starts afresh", epoch, self.epoch, epoch)
            self._pipeline.order.resume_at = None
        self.epoch = epoch
        for s in (self.loader.sampler, getattr(self.loader.batch_sampler, "sampler", None), self.loader.batch_sampler):
            set_epoch = getattr(s, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
                break

    def state_dict(self) -> dict[str, Any]:
        """A small, picklable state to resume from exactly here (see ``docs/checkpoint.md``).

        Take it between batches: the samples the loop has received count as consumed, those
        in flight do not. Its size does not depend on the dataset (~11 KB shuffled).
        """
        from loadertune.checkpoint import loader_state

        return loader_state(self)

    def load_state_dict(self, state: dict[str, Any], *, warm_start: bool = True) -> None:
        """Resumes from :meth:`state_dict`: the next ``iter()`` continues the saved epoch.

        Call it on a fresh ``tune()`` over a DataLoader built the same way (dataset length,
        sampler, generator, seed); ``num_workers``, ``prefetch_factor``, ``pin_memory``,
        ``persistent_workers`` and, for batches loadertune re-cuts, ``batch_size`` may differ.
        Load the optimizer's and scheduler's state first.

        Args:
            state: What :meth:`state_dict` returned.
            warm_start: In apply mode, resume at the tuned configuration with what the
                controller learned (ceilings, measured load). False keeps this loader's own
                settings and tunes from scratch (the learning rate still follows any batch-size
                difference).

        Raises:
            ValueError: ``state`` does not fit this loader; the message names the field. Nothing
                is changed then.
        """
        from loadertune.checkpoint import load_loader_state

        load_loader_state(self, state, warm_start=warm_start)

    @property
    def dataset(self) -> Any:
        """The dataset of the wrapped loader."""
        return self.loader.dataset

    @property
    def batch_size(self) -> int | None:
        """The batch size in use."""
        return self.config.batch_size

    @property
    def num_workers(self) -> int:
        """The worker count in use."""
        return self.config.num_workers

    @property
    def pending_config(self) -> LoaderConfig | None:
        """A change waiting for the next epoch (IterableDataset loaders), else None."""
        return self._pipeline.pending

    @property
    def accumulation_steps(self) -> int | None:
        """Micro-batches per optimizer step the loop should accumulate now (None if not used)."""
        return self._follower.accumulation_steps

    @property
    def metrics(self) -> WindowMetrics | None:
        """The latest window's metrics, None before the first window closes."""
        return self._session.metrics

    @property
    def diagnosis(self) -> Diagnosis | None:
        """The latest diagnosis."""
        return self._session.diagnosis

    @property
    def recommendation(self) -> Recommendation | None:
        """What to move to, or None (the latest window's)."""
        return self._session.recommendation

    @property
    def events(self) -> list[Event]:
        """The events so far (the most recent 10,000)."""
        return self._session.events

    @property
    def events_log(self) -> Any:
        """The :class:`~loadertune.events.EventLog` of this run."""
        return self._session.events_log

    @property
    def sampler_thread(self) -> Sampler:
        """The :class:`~loadertune.sampler.Sampler` watching this run."""
        return self._session.sampler

    @property
    def rebuilds(self) -> int:
        """Loaders built after the first (changes and fault recoveries)."""
        return self._pipeline.rebuilds

    def __getattr__(self, name: str) -> Any:
        # Anything else (sampler, collate_fn, drop_last, generator...) is the wrapped loader's.
        if name.startswith("_") or name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __reduce__(self) -> Any:
        # Like a DataLoader, a TunedLoader pickles (and deep-copies) as its settings: the wrapped
        # loader, the options and the configuration in use. The copy measures afresh; workers,
        # threads and the epoch in progress are not carried.
        return (_restored, (self.loader, self.options, self.config))

    def __enter__(self) -> TunedLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shuts down workers and the sampler, logs a summary and closes the event log.

        Called at interpreter exit for a loader still open then, so a script that never calls
        it still gets its summary and a complete event log.
        """
        if self._closed:
            return
        self._closed = True
        HOLD.holding = False
        # A Ctrl-C while the workers stop comes once the summary is written (a second one at once).
        with sigint_held():
            try:
                if self._stall is not None:
                    self._stall.close()
                if self._pipeline.starting is not None:
                    self._actuator.switchover.give_up("the loader was closed first")
                self._pipeline.shutdown()
            except BaseException:
                # Interrupted while stopping the workers: a second close(), or the one at
                # interpreter exit, finishes the job.
                self._closed = False
                raise
            self._session.close(
                step=self.step,
                epoch=self.epoch,
                epochs=self._epochs_started,
                config=self.config,
                rebuilds=self._pipeline.rebuilds,
            )

    # -- changes -------------------------------------------------------------------------------
    def reconfigure(self, **changes: Any) -> LoaderConfig:
        """Forces a configuration change now (any mode), with the same exactly-once guarantees.

        Args:
            **changes: Any of ``num_workers``, ``batch_size``, ``prefetch_factor``,
                ``pin_memory``, ``persistent_workers``.

        Returns:
            The configuration now in use (for an IterableDataset the change waits for the next
            epoch: see ``pending_config``).

        Raises:
            ReconfigureError: The change cannot be made on this loader (the message says why).
        """
        if self._closed:
            raise ReconfigureError("this TunedLoader is closed")
        for name in ("pin_memory", "persistent_workers"):
            if name in changes and not isinstance(changes[name], bool):
                raise ReconfigureError(f"{name} must be True or False, got {changes[name]!r}")
        try:
            new = self.config.replace(**changes)
        except ValueError as exc:
            raise ReconfigureError(str(exc)) from None
        kind = self._pipeline.kind
        if "batch_size" in changes and new.batch_size != self.config.batch_size:
            if kind == "batch_sampler":
                raise ReconfigureError(
                    "this loader uses its own batch_sampler, which decides the batches; "
                    "loadertune cannot change its batch size (change num_workers etc. only)"
                )
            if kind == "samples":
                raise ReconfigureError("this loader has automatic batching off (batch_size=None)")
        factor = None
        if new.batch_size != self.config.batch_size and new.batch_size and self.config.batch_size:
            factor = (new.batch_size / self.config.batch_size) ** self._session.lr_exponent
        described = ", ".join(f"{k}={v!r}" for k, v in changes.items())
        with sigint_held():
            self._actuator.change(new, "reconfigure", f"reconfigure({described})", lr_factor=factor)
            self._session.controller.note_external_change(self.config)
        return self.config

    @contextlib.contextmanager
    def oom_guard(self) -> Iterator[None]:
        """Wraps a training step; an out-of-memory error after a batch-size increase is undone.

        The CUDA cache is freed, batch size and learning rate go back, and the failed batch's
        samples are handed out again, so none is lost. Any other out-of-memory error (with no
        increase to undo) is re-raised unchanged.
        """
        try:
            yield
        except torch.OutOfMemoryError:
            with sigint_held():
                undone = self._actuator.undo_batch_increase()
            if not undone:
                raise

    # -- epochs and windows --------------------------------------------------------------------
    def _end_epoch(self) -> None:
        self._pipeline.end_epoch()
        self.epoch += 1

    def _on_window(self, now: float, batch: Any) -> None:
        # A window's decision can start and stop workers (see loadertune.interrupts).
        with sigint_held():
            self._window(now, batch)

    def _window(self, now: float, batch: Any) -> None:
        if self._session.windows_held:
            # New workers are starting in the background: no window until they serve.
            self._actuator.switchover.check(now)
            return
        # A change waiting for the next epoch has not run yet: judging it now would compare the
        # old configuration with itself.
        decision = self._session.close_window(
            now_s=now,
            step=self.step,
            epoch=self.epoch,
            config=self.config,
            batch=batch,
            decide=self._pipeline.pending is None,
        )
        self._pipeline.batch_bytes = self._session.batch_bytes
        self._bytes_unknown = self._session.batch_bytes is None
        actuator = self._actuator
        actuator.check_limits()
        if decision is not None:
            actuator.act(decision)
        # After the window's decision: a step down for memory is the last word.
        actuator.check_memory()

    # -- set-up helpers ------------------------------------------------------------------------
    def _seeded_dataset(self, dataset: Any, seed: int | None) -> Any:
        if seed is None:
            return dataset
        if self._iterable:
            raise ValueError(
                "tune(seed=...) reseeds per sample index, which an IterableDataset does not have; "
                "seed inside your dataset's __iter__ with torch.utils.data.get_worker_info() instead"
            )
        from loadertune.seeding import SeededDataset

        return SeededDataset(dataset, seed)

    def _key_fn(self, seed: int | None) -> Callable[[int], Any] | None:
        if seed is None:
            return None
        from loadertune.seeding import SampleKey

        # Read the epoch when the key is made: a persistent loader lives across epochs.
        return lambda i: SampleKey(self.epoch, i)


class _Epoch:
    """One ``iter()`` of a :class:`TunedLoader`: the iterator the training loop reads.

    Only the latest one is live: ``next()`` on one that a later ``iter()`` superseded raises,
    where two live iterators would silently split one epoch's samples between them (a
    DataLoader gives each its own epoch; loadertune serves one epoch at a time).
    """

    __slots__ = ("_generation", "_loader")

    def __init__(self, loader: TunedLoader, generation: int) -> None:
        self._loader = loader
        self._generation = generation

    def __iter__(self) -> _Epoch:
        return self

    def __len__(self) -> int:
        return len(self._loader)

    def __next__(self) -> Any:
        tl = self._loader
        if tl._generation != self._generation:
            raise RuntimeError(
                "this TunedLoader iterator was superseded: iter() was called on the loader again "
                "(zip(loader, loader), nested loops over one loader) while this epoch was still "
                "being read. loadertune serves one epoch at a time; finish or leave one loop before "
                "starting the next, or wrap a second DataLoader with tune() for a second stream"
            )
        # The hot path: it reads the loader's state directly, one attribute load per field.
        try:
            pipeline = tl._pipeline
            hold = HOLD
            while True:
                it = pipeline.src_it
                if it is None:
                    raise StopIteration
                # Without workers the training thread's CPU time tells loading work from waiting;
                # one batch in CPU_EVERY is timed (its time in next(), and the loop's gap after it).
                phase = tl._cpu_phase if tl._inline else -1
                cpu = loop_cpu = -1.0
                if phase == 0:
                    cpu = time.thread_time()
                elif phase == 1:
                    loop_cpu = time.thread_time() - tl._cpu_mark
                requested = time.perf_counter()
                tl._wait_since = requested
                try:
                    if hold.pending:
                        hold.deliver()  # a death reported while loadertune's code ran: raised here
                    hold.holding = False
                    batch = next(it)
                    hold.holding = True
                    break
                except StopIteration:
                    hold.holding = True
                    tl._wait_since = 0.0
                    with sigint_held():  # workers stop (and start) here
                        if pipeline.starting is not None:
                            tl._actuator.switchover.at_epoch_end()
                        go_on = pipeline.finish_drain() or pipeline.resume_unfinished()
                        if go_on:
                            tl._actuator.note_workers()
                        else:
                            tl._end_epoch()
                    if go_on:
                        # The old loader has handed over all it had in flight (or was cut short with
                        # samples left): on to the new one.
                        continue
                    raise
                except Exception as exc:
                    hold.holding = True
                    tl._wait_since = 0.0
                    tl._actuator.after_failure(it, exc)
                except BaseException:
                    tl._wait_since = 0.0
                    raise
            returned = time.perf_counter()
            tl._wait_since = 0.0
            if phase >= 0:
                if phase == 0:
                    tl._cpu_mark = time.thread_time()
                    cpu = tl._cpu_mark - cpu
                tl._cpu_phase = (phase + 1) % CPU_EVERY
            issued = pipeline.src_issued
            if issued:
                # The batch just delivered leaves the issued list (inlined LoaderPipeline.delivered).
                consumed = issued.popleft()
                pipeline.last_delivered = consumed
                if pipeline.crashes.suspects:
                    pipeline.crashes.delivered(consumed)
                n = len(consumed) if tl._batched else 1
            else:
                n = tl._config.batch_size or 1
            tl.step = step = tl.step + 1
            tl._timer.record(requested, returned, n, cpu, loop_cpu)
            schedule = tl._schedule
            if returned >= schedule.deadline_s and step >= schedule.step:
                tl._on_window(returned, batch)
            elif tl._bytes_unknown:
                tl._session.note_batch(batch)
                pipeline.batch_bytes = tl._session.batch_bytes
                tl._bytes_unknown = pipeline.batch_bytes is None
            follower = tl._follower
            if follower.pending and step > follower.due_after_step:
                # The first batch of a new size: the learning rate follows it now.
                follower.run_due()
            return batch
        finally:
            # Held through the training step too while the epoch goes on: torch would raise the
            # report there, where nothing can recover from it; the next next() takes it.
            HOLD.holding = pipeline.in_epoch
