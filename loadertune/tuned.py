"""``tune()`` and ``TunedLoader``: a drop-in DataLoader that measures, diagnoses and tunes itself.

The wrapper owns the epoch's sample stream (see :mod:`loadertune.stream`) and builds the actual
DataLoaders on it, so it can rebuild mid-epoch at a batch boundary without losing or repeating a
sample. Per batch it only reads the clock twice and pops a deque; everything else happens once
per window.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from loadertune.config import LoaderConfig, check_seconds
from loadertune.controller import (
    Bounds,
    Controller,
    Decision,
    Recommendation,
    plan,
    remember_load,
    same_recommendation,
)
from loadertune.diagnose import Diagnosis, Environment, diagnose
from loadertune.errors import ReconfigureError
from loadertune.events import Event, EventLog
from loadertune.metrics import WindowMetrics, compute_metrics
from loadertune.resources import node_bounds, resolve_gpu
from loadertune.sampler import Sampler
from loadertune.stream import EpochStream, StreamBatchSampler, StreamSampler, requeue_issued
from loadertune.timer import LoopTimer

__all__ = ["MODES", "Mode", "TunedLoader", "tune"]

logger = logging.getLogger("loadertune")

Mode = Literal["recommend", "apply"]
#: The modes ``tune`` accepts.
MODES: tuple[Mode, ...] = ("recommend", "apply")

_LR_EXPONENTS = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}
_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")
_DEATH_WAIT_S = 2.0
_CPU_EVERY = 8
# A window may close this early when the loop waits at least this share of its time.
_EARLY_WINDOW_S = 0.5
_EARLY_WINDOW_BATCHES = 4
_EARLY_WAIT_SHARE = 0.5
_TORCH_WORKER_WARNING = "This DataLoader will create"


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

    Returns:
        A :class:`TunedLoader`; iterate it exactly as the DataLoader.

    Raises:
        ValueError: A bad argument; the message names it and says what to pass.
    """
    return TunedLoader(
        loader,
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
    )


class TunedLoader:
    """A DataLoader stand-in that measures, diagnoses and (in apply mode) retunes itself.

    Build it with :func:`tune`. Iterate it like the DataLoader it wraps. Attributes worth
    reading: ``config`` (in use), ``diagnosis`` (latest), ``recommendation`` (what to move to,
    or None), ``metrics`` (latest window), ``events``, ``accumulation_steps``.
    """

    def __init__(self, loader: DataLoader, **options: Any) -> None:
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
        mode = options["mode"]
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        check_seconds("window_s", options["window_s"])
        check_seconds("interval_s", options["interval_s"])
        mwb = options["min_window_batches"]
        if not isinstance(mwb, int) or mwb < 2:
            raise ValueError(f"min_window_batches must be an int >= 2, got {mwb!r}")
        share = options["ram_budget_share"]
        if not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(f"ram_budget_share must be in (0, 1], got {share!r}")
        self.loader = loader
        self.mode: Mode = mode
        self.window_s = float(options["window_s"])
        self.min_window_batches = mwb
        self._iterable = isinstance(loader.dataset, IterableDataset)
        self._kind = _stream_kind(loader)
        self.config = LoaderConfig.from_loader(loader)
        # A BatchSampler passed in (batch_size=None on the loader) holds the batch settings.
        self._drop_last = loader.batch_sampler.drop_last if self._kind == "batch" else loader.drop_last
        if self._kind == "batch" and self.config.batch_size is None:
            self.config = self.config.replace(batch_size=loader.batch_sampler.batch_size)
        self._initial_config = self.config
        self.allow_batch_size = bool(options["allow_batch_size"])
        self._optimizer = options["optimizer"]
        self._scheduler = options["scheduler"]
        self._lr_rule, self._lr_exponent = self._resolve_lr(options["lr_rule"])
        self._accumulation = _check_accumulation(options["accumulation_steps"])
        self._accumulation_planned = self._accumulation
        warmup = options["lr_warmup_steps"]
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"lr_warmup_steps must be an int >= 0, got {warmup!r}")
        self._lr_warmup_steps = warmup
        self._warmup: Any = None
        self._keep_schedule_length = bool(options["keep_schedule_length"])
        if self._keep_schedule_length and self._scheduler is None:
            raise ValueError("keep_schedule_length=True needs the scheduler=: pass the scheduler to rescale")
        self._seed = options["seed"]
        self._dataset = self._seeded_dataset(loader.dataset, self._seed)
        self._model = options["model"]
        if options["max_workers"] is not None and (not isinstance(options["max_workers"], int) or options["max_workers"] < 1):
            raise ValueError(f"max_workers must be an int >= 1, got {options['max_workers']!r}")
        if self.allow_batch_size and self._kind != "batch":
            raise ValueError(
                "allow_batch_size=True needs a DataLoader built with batch_size= on a map-style "
                "dataset; this one has "
                + ("an IterableDataset" if self._iterable else "a custom batch_sampler or batch_size=None")
                + ", whose batches loadertune cannot re-cut"
            )

        self._collective = _make_collective(options["dist_timeout_s"])
        self.events_log = EventLog(options["log_file"], sinks=tuple(options["sinks"]))
        self._sampler = Sampler(options["interval_s"], gpu=resolve_gpu(options["gpu"]), host=options["host"])
        local = self._collective.local_world_size if self._collective is not None else 1
        self._bounds = node_bounds(options["max_workers"], share, local)
        self._environment = self._make_environment()
        self._controller = Controller(
            self.config,
            self._bounds,
            allow_batch_size=self.allow_batch_size,
            lr_exponent=self._lr_exponent,
            cooldown_s=self.window_s,
        )
        self._timer = LoopTimer()
        self.diagnosis: Diagnosis | None = None
        self.recommendation: Recommendation | None = None
        self.metrics: WindowMetrics | None = None
        self.step = 0
        self.epoch = 0
        self._epochs_started = 0
        self._inner_loader: DataLoader | None = None
        self._inner_it: Iterator[Any] | None = None
        self._stream: EpochStream | None = None
        # The old loader handing over its in-flight batches after a worker change, if any.
        self._drain: _Drain | None = None
        # What __next__ reads: the draining loader's iterator and issued batches, else the
        # current loader's (kept in two attributes so the per-batch path does no lookups).
        self._src_it: Iterator[Any] | None = None
        self._src_issued: deque[Any] | None = None
        self._pending: LoaderConfig | None = None
        self._last_consumed: Any = None
        self._base_seed_drawn = False
        # The rebuilt loaders' own generator: they never draw from the user's or the global RNG.
        self._generator = torch.Generator()
        self._window_deadline = math.inf
        self._window_step = 0
        self._window_opened = (0.0, 0)
        self._dist_window_steps = max(4 * mwb, 40)
        self._logged_rec: LoaderConfig | None = None
        self._batch_bytes: int | None = None
        self._batch_increase: tuple[LoaderConfig, float | None] | None = None
        self._rebuilds = 0
        self._closed = False
        self._first_rate: float | None = None
        self._known_load_s: float | None = None
        self._cpu_mark = 0.0
        self._cpu_phase = 0
        # What follows a batch-size change (learning rate, accumulation steps), held until the
        # first batch of the new size reaches the loop.
        self._batch_actions: list[Callable[[], None]] = []
        self._epoch_actions: list[Callable[[], None]] = []
        self._actions_step = 0
        self._sampler.start()
        self.events_log.emit(
            "start",
            0,
            0,
            mode=mode,
            config=self.config.to_dict(),
            gpu=getattr(self._sampler.gpu, "name", None),
            usable_cpus=self._bounds.usable_cpus,
            lr_rule=self._lr_rule,
        )

    @property
    def config(self) -> LoaderConfig:
        """The configuration in use (recommend mode never changes it)."""
        return self._config

    @config.setter
    def config(self, value: LoaderConfig) -> None:
        self._config = value
        self._inline = value.num_workers == 0 and not self._iterable

    # -- the DataLoader interface ------------------------------------------------------------
    def __iter__(self) -> TunedLoader:
        if self._closed:
            raise RuntimeError("this TunedLoader is closed; call tune() again on the DataLoader")
        if self._src_it is not None and self._stream is not None:
            # The previous epoch was left early: its in-flight batches are simply dropped, as a
            # fresh DataLoader iterator would drop them.
            self._discard_epoch()
        if self._pending is not None:
            self._set_config(self._pending)
            self._pending = None
            self._batch_actions.extend(self._epoch_actions)
            self._epoch_actions = []
            self._actions_step = self.step
        self._start_epoch()
        return self

    def __next__(self) -> Any:
        it = self._src_it
        if it is None:
            raise StopIteration
        # Without workers loading runs in this thread: its CPU time tells CPU work from
        # waiting, and the thread's CPU between batches is the loop's own (other threads of the
        # process, such as progress bars, must not count); with workers the host source reads.
        # Reading the thread clock costs ~2 us here, so one batch in _CPU_EVERY is timed (its
        # time in next(), and the loop's gap after it); the metrics average what was timed.
        phase = self._cpu_phase if self._inline else -1
        cpu = loop_cpu = -1.0
        if phase == 0:
            cpu = time.thread_time()
        elif phase == 1:
            loop_cpu = time.thread_time() - self._cpu_mark
        requested = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            if self._drain is not None:
                # The old loader has handed over all it had in flight: on to the new one.
                self._finish_drain()
                return self.__next__()
            self._end_epoch()
            raise
        except Exception as exc:
            return self._after_failure(it, exc)
        returned = time.perf_counter()
        if phase >= 0:
            if phase == 0:
                self._cpu_mark = time.thread_time()
                cpu = self._cpu_mark - cpu
            self._cpu_phase = (phase + 1) % _CPU_EVERY
        issued = self._src_issued
        if issued:
            consumed = issued.popleft()
            self._last_consumed = consumed
            n = len(consumed) if self._kind != "single" else 1
        else:
            n = self.config.batch_size or 1
        self.step += 1
        self._timer.record(requested, returned, n, cpu, loop_cpu)
        if returned >= self._window_deadline and self.step >= self._window_step:
            self._on_window(batch)
        elif self._batch_bytes is None:
            self._batch_bytes = _nbytes(batch)
        if self._batch_actions and self.step > self._actions_step:
            # The first batch of a new size: the learning rate follows it now.
            self._run_batch_actions()
        return batch

    def __len__(self) -> int:
        if self._kind != "batch" or self.config.batch_size == self.loader.batch_size:
            return len(self.loader)
        n = len(self.loader.batch_sampler.sampler)
        bs = self.config.batch_size
        return n // bs if self._drop_last else math.ceil(n / bs)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch number and passes it to the sampler (``DistributedSampler.set_epoch``)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch
        for s in (self.loader.sampler, getattr(self.loader.batch_sampler, "sampler", None), self.loader.batch_sampler):
            set_epoch = getattr(s, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
                break

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
        return self._pending

    @property
    def accumulation_steps(self) -> int | None:
        """Micro-batches per optimizer step the loop should accumulate now (None if not used)."""
        return self._accumulation

    @property
    def events(self) -> list[Event]:
        """The events so far (the most recent 10,000)."""
        return list(self.events_log.events)

    @property
    def sampler_thread(self) -> Sampler:
        """The :class:`~loadertune.sampler.Sampler` watching this run."""
        return self._sampler

    @property
    def rebuilds(self) -> int:
        """Loaders built after the first (changes and fault recoveries)."""
        return self._rebuilds

    def __getattr__(self, name: str) -> Any:
        # Anything else (sampler, collate_fn, drop_last, generator...) is the wrapped loader's.
        if name.startswith("_") or name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __enter__(self) -> TunedLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shuts down workers and the sampler, logs a summary and closes the event log."""
        if self._closed:
            return
        self._closed = True
        self._shutdown_inner()
        self._sampler.close()
        if self._collective is not None:
            self._collective.close()
        summary = self._summary()
        logger.info("%s", summary["text"])
        self.events_log.emit("summary", self.step, self.epoch, **summary)
        self.events_log.close()

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
        new = self.config.replace(**changes)
        if "batch_size" in changes and new.batch_size != self.config.batch_size:
            if self._kind == "batches":
                raise ReconfigureError(
                    "this loader uses its own batch_sampler, which decides the batches; "
                    "loadertune cannot change its batch size (change num_workers etc. only)"
                )
            if self._kind == "single":
                raise ReconfigureError("this loader has automatic batching off (batch_size=None)")
        factor = None
        if new.batch_size != self.config.batch_size and new.batch_size and self.config.batch_size:
            factor = (new.batch_size / self.config.batch_size) ** self._lr_exponent
        self._change(new, "reconfigure", f"reconfigure({', '.join(f'{k}={v!r}' for k, v in changes.items())})", lr_factor=factor)
        self._controller.note_external_change(self.config)
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
            if self._batch_increase is None or self._last_consumed is None:
                raise
            previous, factor = self._batch_increase
            self._batch_increase = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            failed = self._last_consumed
            self._last_consumed = None
            self._stream_requeue_front(failed)
            bs = previous.batch_size
            self._controller.batch_ceiling = self.config.batch_size
            self._change(
                self.config.replace(batch_size=bs),
                "fault",
                f"out of memory at batch size {self.config.batch_size}: back to {bs}, the failed "
                f"batch's {len(failed)} samples will come again",
                lr_factor=(1.0 / factor) if factor else None,
            )
            self._controller.note_external_change(self.config)

    # -- epochs --------------------------------------------------------------------------------
    def _start_epoch(self) -> None:
        loader = self.loader
        self._epochs_started += 1
        if self._iterable:
            self._stream = None
            if self._inner_loader is None:
                self._inner_loader = self._build_loader(None)
            self._inner_it = _iterate(self._inner_loader)
            self._point()
        else:
            source = loader.batch_sampler if self._kind == "batches" else (
                loader.batch_sampler.sampler if self._kind == "batch" else loader.sampler
            )
            # Create the sampler's iterator first, then draw the base seed: the order in which a
            # plain DataLoader consumes its RNG, so this epoch's and later epochs' orders match it.
            source_iter = iter(source)
            persistent = self._initial_config.persistent_workers and self._initial_config.num_workers > 0
            if not (persistent and self._base_seed_drawn):
                base = int(torch.empty((), dtype=torch.int64).random_(generator=loader.generator).item())
                self._base_seed_drawn = True
                self._generator.manual_seed(base)
            self._stream = EpochStream(source_iter)
            if self._inner_loader is None or not self.config.persistent_workers or self.config.num_workers == 0:
                self._shutdown_inner()
                self._inner_loader = self._build_loader(self._stream)
            else:
                sampler = self._inner_sampler()
                sampler.stream = self._stream
                sampler.issued.clear()
            self._inner_it = _iterate(self._inner_loader)
            self._point()
        self._note_workers()
        self._timer.epoch_started()
        if self._window_deadline == math.inf:
            self._open_window()

    def _end_epoch(self) -> None:
        if not self.config.persistent_workers:
            self._inner_it = None
        self._stream = None
        self._src_it = self._src_issued = None
        self.epoch += 1

    def _discard_epoch(self) -> None:
        self._shutdown_drain()
        if self.config.persistent_workers and self.config.num_workers > 0 and self._inner_loader is not None:
            # torch's _reset drains a persistent iterator's in-flight batches itself.
            self._inner_sampler().issued.clear()
        else:
            self._shutdown_inner()
        self._stream = None
        self._src_it = self._src_issued = None
        self.epoch += 1

    # -- rebuilding ----------------------------------------------------------------------------
    def _build_loader(self, stream: EpochStream | None) -> DataLoader:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TORCH_WORKER_WARNING)
            return self._new_loader(stream)

    def _new_loader(self, stream: EpochStream | None) -> DataLoader:
        c = self.config
        loader = self.loader
        kwargs: dict[str, Any] = {
            "num_workers": c.num_workers,
            "pin_memory": c.pin_memory,
            "collate_fn": loader.collate_fn,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context,
            "generator": self._generator,
        }
        if loader.pin_memory_device:
            kwargs["pin_memory_device"] = loader.pin_memory_device
        if c.num_workers > 0:
            kwargs["prefetch_factor"] = c.prefetch_factor
            kwargs["persistent_workers"] = c.persistent_workers
        key = self._key_fn()
        if stream is None:  # IterableDataset: its own order; changes take effect per epoch
            return DataLoader(self._dataset, batch_size=c.batch_size, drop_last=self._drop_last, **kwargs)
        if self._kind == "batch":
            return DataLoader(
                self._dataset,
                batch_sampler=StreamBatchSampler(stream, c.batch_size, self._drop_last, key),
                **kwargs,
            )
        if self._kind == "batches":
            return DataLoader(self._dataset, batch_sampler=StreamSampler(stream, key), **kwargs)
        return DataLoader(self._dataset, batch_size=None, sampler=StreamSampler(stream, key), **kwargs)

    def _shutdown_inner(self) -> None:
        self._shutdown_drain()
        _shutdown(self._inner_loader, self._inner_it)
        self._inner_it = None
        self._inner_loader = None
        self._src_it = self._src_issued = None

    def _shutdown_drain(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None:
            _shutdown(drain.loader, drain.it)

    def _finish_drain(self) -> None:
        self._shutdown_drain()
        self._point()
        self._note_workers()

    def _point(self) -> None:
        """Points the per-batch path at the draining loader, else at the current one."""
        if self._drain is not None:
            self._src_it, self._src_issued = self._drain.it, self._drain.issued
        else:
            self._src_it = self._inner_it
            self._src_issued = None if self._stream is None or self._inner_loader is None else self._inner_sampler().issued

    def _inner_sampler(self) -> Any:
        inner = self._inner_loader
        return inner.sampler if self._kind == "single" else inner.batch_sampler

    def _issued_lists(self) -> list[deque[Any]]:
        """Issued-but-unconsumed batches of every live loader, oldest loader first."""
        out = []
        if self._drain is not None:
            out.append(self._drain.issued)
        if self._inner_loader is not None and self._stream is not None:
            out.append(self._inner_sampler().issued)
        return out

    def _set_config(self, config: LoaderConfig) -> None:
        """Switches configuration between epochs (no stream to carry over)."""
        self._shutdown_inner()
        self.config = config
        self._rebuilds += 1

    def _rebuild(self, config: LoaderConfig, handoff_ok: bool = True, extend_window: bool = True) -> None:
        """Switches configuration mid-epoch at the current batch boundary.

        A change of workers with batches in flight hands over: the old loader stops taking
        indices and drains what it has in flight while the new workers start and load the next
        ones, so the loop keeps training through the switch. Anything else (a batch-size change,
        a second change during a hand-over, a fault) re-queues the in-flight batches instead.
        """
        stream = self._stream
        in_flight = 0
        handoff = (
            handoff_ok
            and stream is not None
            and self._drain is None
            and self._inner_it is not None
            and self.config.num_workers > 0
            and config.batch_size == self.config.batch_size
            and bool(self._src_issued)
        )
        if handoff:
            sampler = self._inner_sampler()
            sampler.closed = True
            in_flight = len(sampler.issued)
            self._drain = _Drain(self._inner_loader, self._inner_it, sampler.issued)
            self._inner_loader = self._inner_it = None
        else:
            if stream is not None:
                requeue_issued(stream, self._issued_lists(), flatten=self._kind == "batch")
            self._shutdown_inner()
        self.config = config
        self._rebuilds += 1
        if stream is not None:
            # Even an exhausted stream gets a loader: it ends the epoch as the old one would have.
            self._inner_loader = self._build_loader(stream)
            self._inner_it = _iterate(self._inner_loader)
        self._point()
        self._note_workers()
        warmup = in_flight + max(2, config.num_workers)
        self._timer.discard(warmup)
        if self._collective is None:
            self._open_window(warmup)
        elif extend_window:
            # Every rank takes this decision at the same step with the same warm-up.
            self._window_step += warmup

    def _stream_requeue_front(self, items: Any) -> None:
        stream = self._stream
        if stream is None:
            raise ReconfigureError("no epoch in progress to hand the failed batch back to")
        # In-flight batches come after the failed one, so they go back first, then it in front.
        requeue_issued(stream, self._issued_lists(), flatten=True)
        stream.requeue(items)

    def _change(
        self, config: LoaderConfig, kind: str, reason: str, lr_factor: float | None = None, **measured: Any
    ) -> None:
        if config == self.config:
            return
        before = self.config
        if config.batch_size != before.batch_size:
            lr_factor = self._follow_batch(before, config, lr_factor)
        if self._iterable:
            self._pending = config
            when = "at the next epoch (IterableDataset)"
        elif self._stream is None:
            self._set_config(config)
            when = "now"
        else:
            self._rebuild(config)
            when = f"at step {self.step}"
        logger.info("%s %s -> %s %s: %s", kind, before.describe(), config.describe(), when, reason)
        self.events_log.emit(
            kind if kind != "reconfigure" else "change",
            self.step,
            self.epoch,
            before=before.to_dict(),
            after=config.to_dict(),
            reason=reason,
            lr_factor=lr_factor,
            forced=kind == "reconfigure",
            **measured,
        )

    def _follow_batch(self, before: LoaderConfig, after: LoaderConfig, lr_factor: float | None) -> float | None:
        """Plans what follows a batch-size change: the learning rate, or the accumulation steps.

        It takes effect with the first batch of the new size (``_batch_actions``), not now: the
        batch the loop is about to get may still be of the old size.
        """
        ratio = after.batch_size / before.batch_size
        if self._accumulation is not None:
            k = self._accumulation_planned * before.batch_size / after.batch_size
            if k >= 1 and float(k).is_integer():
                self._accumulation_planned = int(k)
                self._defer(lambda: setattr(self, "_accumulation", int(k)))
                self._note_batch_increase(before, after, None)
                return None
        if lr_factor is None:
            lr_factor = ratio**self._lr_exponent
        factor = lr_factor
        self._defer(lambda: self._scale_lr(before, after, factor))
        self._note_batch_increase(before, after, lr_factor)
        return lr_factor

    def _defer(self, action: Callable[[], None]) -> None:
        """Runs ``action`` when the first batch of the new configuration is handed out."""
        if self._iterable:
            self._epoch_actions.append(action)  # an IterableDataset changes at the next epoch
        else:
            self._batch_actions.append(action)
            # Batches up to this step are of the old configuration (this one too, when a window
            # decided inside next()); the next one is the first of the new.
            self._actions_step = self.step

    def _scale_lr(self, before: LoaderConfig, after: LoaderConfig, factor: float) -> None:
        if self._optimizer is not None and factor != 1.0:
            from loadertune.lr import LrWarmup, scale_lr

            if self._warmup is not None:
                self._warmup.remove()
                self._warmup = None
            if self._lr_warmup_steps and factor > 1.0:
                self._warmup = LrWarmup(self._optimizer, factor, self._lr_warmup_steps, self._scheduler)
            else:
                scale_lr(self._optimizer, factor, self._scheduler)
        if self._keep_schedule_length:
            from loadertune.lr import rescale_schedule_length

            # Steps per epoch shrink as the batch grows: old batch / new batch.
            rescale_schedule_length(self._scheduler, before.batch_size / after.batch_size)

    def _run_batch_actions(self) -> None:
        actions, self._batch_actions = self._batch_actions, []
        for action in actions:
            action()

    def _note_batch_increase(self, before: LoaderConfig, after: LoaderConfig, factor: float | None) -> None:
        self._batch_increase = (before, factor) if after.batch_size > before.batch_size else None

    # -- faults --------------------------------------------------------------------------------
    def _pop_failed(self) -> None:
        if self._src_issued:
            self._src_issued.popleft()

    def _after_failure(self, it: Any, exc: Exception) -> Any:
        """Handles an exception from ``next()``: a dead worker is recovered from, anything else
        (the dataset's own error) is re-raised unchanged after dropping its batch, as torch does."""
        while True:
            try:
                death = _worker_death(it, exc)
                if death == "none":
                    self._pop_failed()
                    raise exc
                if death == "died":
                    self._recover(exc)
                break
            except RuntimeError as late:
                # torch's SIGCHLD handler raises asynchronously, so the report of a death can
                # land inside this very handling: take it as the death it reports, once more.
                if late is exc or not _WORKER_DIED.search(str(late)):
                    raise
                exc = late
                it = self._src_it
        return self.__next__()

    def _recover(self, exc: Exception) -> None:
        if self._stream is None:
            raise exc
        before = self.config
        fewer = max(0, before.num_workers - max(1, before.num_workers // 2))
        logger.warning(
            "%s; rebuilding with num_workers=%d and resuming at step %d, no sample lost",
            exc,
            fewer,
            self.step,
        )
        # A broken loader cannot hand anything over: its in-flight batches are re-queued.
        # A fault is this rank's alone: it must not move the window every rank closes together.
        self._rebuild(before.replace(num_workers=fewer), handoff_ok=False, extend_window=False)
        self._controller.note_external_change(self.config)
        if self._controller.ceiling_workers is None or before.num_workers < self._controller.ceiling_workers:
            self._controller.ceiling_workers = before.num_workers
        self.events_log.emit(
            "fault",
            self.step,
            self.epoch,
            error=str(exc),
            before=before.to_dict(),
            after=self.config.to_dict(),
        )

    # -- windows -------------------------------------------------------------------------------
    def _open_window(self, discard: int = 0) -> None:
        if self._collective is None:
            # A first look early on: a loop that mostly waits needs no long measurement to know
            # it needs workers, and every second spent at the old setting is lost throughput.
            now = time.perf_counter()
            self._window_opened = (now, self.step + discard)
            self._window_deadline = now + min(self.window_s, _EARLY_WINDOW_S)
            self._window_step = self.step + discard + min(self.min_window_batches, _EARLY_WINDOW_BATCHES)
        else:
            # Every rank closes its window at the same step, so every rank decides at that step.
            self._window_deadline = -math.inf
            self._window_step = self.step + discard + self._dist_window_steps

    def _on_window(self, batch: Any) -> None:
        now = time.perf_counter()
        # Early only without workers: then this thread's CPU time already tells CPU work from
        # waiting; with workers that takes the host source a few readings.
        early_ok = self._timer.wait_share >= _EARLY_WAIT_SHARE and self.config.num_workers == 0
        if self._collective is None and not early_ok:
            opened_s, opened_step = self._window_opened
            if now < opened_s + self.window_s or self.step < opened_step + self.min_window_batches:
                # Not clearly starved: measure the full window.
                self._window_deadline = opened_s + self.window_s
                self._window_step = opened_step + self.min_window_batches
                return
        loop = self._timer.take()
        ticks = self._sampler.window(loop.start_s, loop.end_s)
        metrics = compute_metrics(loop, ticks, self.config)
        collective = self._collective
        if collective is not None:
            metrics = collective.reduce_metrics(metrics, step=self.step)
            # Identical metrics on every rank give every rank the same next window.
            self._dist_window_steps = max(self.min_window_batches, math.ceil(self.window_s * metrics.batches_per_s))
        self._open_window()
        self._batch_bytes = _nbytes(batch)
        env = self._environment
        if env.batch_bytes != self._batch_bytes:
            env = self._environment = dataclasses.replace(env, batch_bytes=self._batch_bytes)
        diagnosis = diagnose(metrics, self.config, env)
        self.metrics, self.diagnosis = metrics, diagnosis
        if self._first_rate is None:
            self._first_rate = metrics.samples_per_s
        self.events_log.emit(
            "window",
            self.step,
            self.epoch,
            config=self.config.to_dict(),
            metrics=metrics.to_dict(),
            diagnosis=diagnosis.to_dict(),
        )
        if self.mode == "recommend":
            self._recommend(metrics, diagnosis)
            return
        decision = self._controller.decide(metrics, diagnosis, now)
        if collective is not None:
            # Rank 0's decision is everyone's: cooldowns and bounds may differ per rank.
            decision = collective.broadcast(decision, step=self.step)
            self._controller.adopt(decision)
        self._act(decision)

    def _recommend(self, metrics: WindowMetrics, diagnosis: Diagnosis) -> None:
        bounds = self._bounds_now()
        self._known_load_s = remember_load(metrics, self.config, bounds, self._known_load_s)
        rec = plan(
            metrics,
            diagnosis,
            self.config,
            bounds,
            allow_batch_size=self._kind == "batch",
            lr_exponent=self._lr_exponent,
            known_load_s=self._known_load_s,
        )
        if self._collective is not None:
            rec = self._collective.broadcast(rec, step=self.step)
        self.recommendation = rec
        if same_recommendation(rec.config if rec else None, self._logged_rec):
            # Rates wobble between windows; repeat a recommendation only when it really changes.
            return
        target = rec.config if rec is not None else None
        self._logged_rec = target
        if rec is None:
            logger.info("%s Keep %s.", diagnosis.summary, self.config.describe())
            return
        logger.info("%s Recommend %s.", diagnosis.summary, rec.describe(self._lr_rule))
        self.events_log.emit(
            "recommendation",
            self.step,
            self.epoch,
            recommendation=rec.to_dict(),
            diagnosis=diagnosis.to_dict(),
            metrics=metrics.to_dict(),
        )

    def _act(self, decision: Decision) -> None:
        self.recommendation = decision.recommendation
        if decision.action in ("change", "revert"):
            rec = decision.recommendation
            self._change(
                decision.config,
                decision.action,
                decision.reason,
                lr_factor=decision.lr_factor,
                before_samples_per_s=decision.before_samples_per_s,
                after_samples_per_s=decision.after_samples_per_s,
                expected_speedup=rec.expected_speedup if rec is not None else None,
                diagnosis=self.diagnosis.kind if self.diagnosis is not None else None,
            )
            return
        if decision.action in ("keep", "retune"):
            logger.info("%s", decision.reason)
            self.events_log.emit(decision.action, self.step, self.epoch, **decision.to_dict())

    def _bounds_now(self) -> Bounds:
        b = self._bounds
        if self._batch_bytes is not None and b.batch_bytes != self._batch_bytes:
            b = self._bounds = dataclasses.replace(b, batch_bytes=self._batch_bytes)
            self._controller.bounds = b
        return b

    # -- set-up helpers ------------------------------------------------------------------------
    def _resolve_lr(self, rule: str) -> tuple[str, float]:
        choices = ("auto", *_LR_EXPONENTS)
        if rule not in choices:
            raise ValueError(f"lr_rule must be one of {', '.join(map(repr, choices))}, got {rule!r}")
        if self._optimizer is None:
            if self.allow_batch_size and rule not in ("none",):
                raise ValueError(
                    "allow_batch_size=True changes the batch size, so the learning rate must follow: "
                    "pass optimizer= (and scheduler=), or lr_rule='none' to keep the learning rate"
                )
            return (rule if rule != "auto" else "linear"), _LR_EXPONENTS.get(rule, 1.0)
        if rule == "auto":
            from loadertune.lr import resolve_lr_rule

            rule, why = resolve_lr_rule("auto", self._optimizer)
            logger.info("lr_rule='auto' chose %r: %s", rule, why)
        return rule, _LR_EXPONENTS[rule]

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

    def _key_fn(self) -> Callable[[int], Any] | None:
        if self._seed is None:
            return None
        from loadertune.seeding import SampleKey

        # Read the epoch when the key is made: a persistent loader lives across epochs.
        return lambda i: SampleKey(self.epoch, i)

    def _make_environment(self) -> Environment:
        model = self._model
        on_cuda = False
        has_conv = False
        if model is not None:
            try:
                on_cuda = next(model.parameters()).is_cuda
            except StopIteration:
                on_cuda = False
            conv = (torch.nn.modules.conv._ConvNd,)
            has_conv = any(isinstance(m, conv) for m in model.modules())
        elif self._sampler.gpu is not None and torch.cuda.is_available():
            on_cuda = True
        return Environment(
            on_cuda=on_cuda,
            has_conv=has_conv,
            cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
            cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
        )

    def _note_workers(self) -> None:
        host = self._sampler.host
        set_pids = getattr(host, "set_worker_pids", None)
        if set_pids is None:
            return
        its = [self._inner_it] + ([self._drain.it] if self._drain is not None else [])
        workers = [w for it in its for w in (getattr(it, "_workers", None) or [])]
        set_pids([w.pid for w in workers if w.pid is not None])

    def _summary(self) -> dict[str, Any]:
        last = self.metrics.samples_per_s if self.metrics else None
        first = self._first_rate
        changes = [e for e in self.events_log.events if e.kind in ("change", "revert", "fault")]
        if changes:
            what = f"{self._initial_config.describe()} -> {self.config.describe()} in {len(changes)} change(s)"
            if first and last:
                what += f"; {first:.0f} -> {last:.0f} samples/s ({last / first:.2f}x)"
        else:
            what = f"unchanged {self.config.describe()}"
            if last:
                what += f"; {last:.0f} samples/s in the last window"
        rec = self.recommendation
        if self.mode == "recommend" and rec is not None:
            what += f"; recommended {', '.join(f'{k}={b}' for k, (_a, b) in rec.changes.items())}"
        text = f"summary: {self.step} batches in {self._epochs_started} epoch(s); {what}"
        return {
            "text": text,
            "initial_config": self._initial_config.to_dict(),
            "final_config": self.config.to_dict(),
            "first_samples_per_s": first,
            "last_samples_per_s": last,
            "changes": len(changes),
            "rebuilds": self._rebuilds,
        }


@dataclass(frozen=True)
class _Drain:
    """An old loader handing over the batches it has in flight."""

    loader: DataLoader
    it: Iterator[Any]
    issued: deque[Any]


def _shutdown(loader: DataLoader | None, it: Any) -> None:
    """Stops a loader's workers now (a persistent loader keeps its iterator on the loader)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    if loader is not None and getattr(loader, "_iterator", None) is not None:
        loader._iterator._shutdown_workers()
        loader._iterator = None


def _worker_death(it: Any, exc: Exception) -> str:
    """What ``exc`` from ``next(it)`` says of the workers: "died", "stale" or "none".

    torch reports a dead worker as "DataLoader worker (pid ...) exited unexpectedly" or "is
    killed by signal", but a worker killed while handing over a batch can also surface as a
    connection reset on the batch's shared-memory handle; a dead process settles both. A report
    naming none of the current workers is "stale": a death already recovered from.
    """
    workers = getattr(it, "_workers", None) or []
    match = _WORKER_DIED.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if match:
        pids = {int(p) for p in re.findall(r"\d+", match.group(1))}
        if pids and not pids & {w.pid for w in workers}:
            return "stale"
        return "died"
    if any(not w.is_alive() for w in workers):
        return "died"
    if workers and isinstance(exc, (ConnectionError, EOFError)):
        # The dying worker's sockets close before the process is reaped: wait (bounded) for
        # its exit to become visible rather than mistake the death for a dataset error.
        from multiprocessing.connection import wait

        if wait([w.sentinel for w in workers], timeout=_DEATH_WAIT_S):
            return "died"
    return "none"


def _iterate(loader: DataLoader) -> Iterator[Any]:
    with warnings.catch_warnings():
        # torch warns past its suggested worker count (the usable CPUs); loadertune goes past it
        # on purpose for I/O-bound loads and bounds CPU-bound ones itself.
        warnings.filterwarnings("ignore", message=_TORCH_WORKER_WARNING)
        return iter(loader)


def _make_collective(timeout_s: float) -> Any:
    check_seconds("dist_timeout_s", timeout_s)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from loadertune.distributed import Collective

    return Collective(timeout_s=timeout_s)


def _stream_kind(loader: DataLoader) -> str:
    if isinstance(loader.dataset, IterableDataset):
        return "iterable"
    if loader.batch_sampler is None:
        return "single"
    if type(loader.batch_sampler) is BatchSampler:
        return "batch"  # torch's own, whether the DataLoader built it or the user passed it
    return "batches"


def _check_accumulation(k: Any) -> int | None:
    if k is None:
        return None
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"accumulation_steps must be an int >= 1, got {k!r}")
    return k


def _nbytes(batch: Any) -> int:
    """Bytes of the tensors in a collated batch (nested tuples, lists and dicts)."""
    if isinstance(batch, torch.Tensor):
        return batch.element_size() * batch.nelement()
    if isinstance(batch, dict):
        return sum(_nbytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(_nbytes(v) for v in batch)
    return 0

