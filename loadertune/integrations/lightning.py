"""A Lightning callback: loadertune's measuring, diagnosis and worker tuning inside ``Trainer.fit``.

Lightning owns the training loop and the DataLoader iterator, so the callback does not wrap the
loader. It times the loop from the batch hooks (the gap between one batch's
``on_train_batch_end`` and the next one's ``on_train_batch_start`` is the wait for data), samples
the host and GPU on loadertune's sampler thread, and closes a window every ``window_s``.

Applying a change (``mode="apply"``) happens at an epoch boundary, through the DataLoader the
trainer holds: ``num_workers``, ``prefetch_factor`` and ``pin_memory`` may be assigned on a
DataLoader between iterations (torch forbids it only for the batch size, sampler, dataset,
``drop_last`` and ``persistent_workers``), and Lightning creates a new iterator at the start of
every epoch after the first (``_TrainingEpochLoop.on_run_start`` runs after the
``on_train_epoch_start`` hooks). The callback therefore sets the new values in
``on_train_epoch_start``; that epoch's workers are started with them. The same hook re-applies
the tuned values when Lightning has just reloaded the DataLoader
(``reload_dataloaders_every_n_epochs``), whose ``train_dataloader()`` builds it afresh with the
values in the user's code. The batch size is never changed: Lightning's optimizers, schedulers
and ``BatchSizeFinder`` own it, so a larger batch is only recommended.

Install with ``pip install loadertune[lightning]`` (``pytorch-lightning``; the ``lightning``
package works too).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from loadertune.config import LoaderConfig, check_seconds
from loadertune.controller import (
    Bounds,
    Controller,
    Decision,
    Recommendation,
    plan,
    same_recommendation,
)
from loadertune.diagnose import Diagnosis, Environment, diagnose
from loadertune.events import Event, EventLog
from loadertune.metrics import WindowMetrics, compute_metrics
from loadertune.resources import node_bounds, resolve_gpu
from loadertune.sampler import Sampler
from loadertune.timer import LoopTimer

__all__ = ["LoadertuneCallback"]

logger = logging.getLogger("loadertune")

_INSTALL_HINT = (
    "loadertune's Lightning callback needs Lightning: pip install loadertune[lightning] "
    "(or pip install pytorch-lightning)"
)


def _callback_bases() -> tuple[type, ...]:
    # A Trainer accepts only its own package's Callback class, and a process may have both
    # packages; inheriting from every one installed makes the callback fit either Trainer.
    bases: list[type] = []
    try:
        from lightning.pytorch import Callback as UnifiedCallback

        bases.append(UnifiedCallback)
    except ImportError:
        pass
    try:
        from pytorch_lightning import Callback as ClassicCallback

        bases.append(ClassicCallback)
    except ImportError:
        pass
    if not bases:
        raise ImportError(_INSTALL_HINT)
    return tuple(bases)


_MODES = ("recommend", "apply")
# tune() options the callback understands; the rest concern loaders and optimizers that
# Lightning owns, and are refused with the reason.
_OPTIONS = {
    "gpu": "auto",
    "log_file": None,
    "window_s": 2.0,
    "min_window_batches": 10,
    "interval_s": 0.1,
    "allow_batch_size": False,
    "lr_rule": "auto",
    "max_workers": None,
    "ram_budget_share": 0.5,
    "host": True,
    "sinks": (),
    "dist_timeout_s": 300.0,
}
_REFUSED = {
    "optimizer": "the callback reads the optimizer from the trainer",
    "scheduler": "the callback never changes the learning rate (it never changes the batch size)",
    "accumulation_steps": "Lightning's accumulate_grad_batches owns gradient accumulation",
    "model": "the callback reads the model from the trainer",
    "seed": "reseeding needs loadertune to own the sampler; wrap the loader with tune() instead",
}
# Settings the callback can change on a live DataLoader; persistent_workers torch forbids.
_SETTABLE = ("num_workers", "prefetch_factor", "pin_memory")


class LoadertuneCallback(*_callback_bases()):  # type: ignore[misc]
    """Measures the training loop under a Lightning ``Trainer`` and recommends or applies
    DataLoader settings.

    Args:
        mode: ``"recommend"`` logs what to change; ``"apply"`` also changes ``num_workers``,
            ``prefetch_factor`` and ``pin_memory`` of the train DataLoader at the next epoch
            boundary, keeping a change only if throughput rose by more than the noise.
        **tune_options: The options of :func:`loadertune.tune` that make sense here: ``gpu``,
            ``log_file``, ``window_s``, ``min_window_batches``, ``interval_s``, ``max_workers``,
            ``ram_budget_share``, ``host``, ``sinks``, ``dist_timeout_s`` and ``lr_rule`` (for the
            learning-rate factor a batch-size recommendation quotes). As with ``tune()``,
            recommend mode may recommend a larger batch; ``allow_batch_size=True`` is refused in
            apply mode, which never changes the batch size.

    Attributes:
        config: The DataLoader settings in use (None before training starts).
        metrics: The latest window's metrics.
        diagnosis: The latest diagnosis.
        recommendation: The latest recommendation, or None.
        events: The events so far.

    Raises:
        ValueError: An unknown or inapplicable option, or a bad value.

    Example:
        >>> trainer = Trainer(callbacks=[LoadertuneCallback(mode="apply")])
    """

    def __init__(self, mode: str = "recommend", **tune_options: Any) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}")
        for name in tune_options:
            if name in _REFUSED:
                raise ValueError(f"LoadertuneCallback does not take {name}=: {_REFUSED[name]}")
            if name not in _OPTIONS:
                raise ValueError(
                    f"unknown option {name!r} for LoadertuneCallback; choose from "
                    f"{', '.join(sorted(_OPTIONS))}"
                )
        options = {**_OPTIONS, **tune_options}
        if mode == "apply" and options["allow_batch_size"]:
            raise ValueError(
                "LoadertuneCallback(mode='apply') never changes the batch size: Lightning's "
                "optimizers, schedulers and BatchSizeFinder own it. Use mode='recommend' with "
                "allow_batch_size=True to be told when a larger batch would pay"
            )
        for name in ("window_s", "interval_s", "dist_timeout_s"):
            check_seconds(name, options[name])
        mwb = options["min_window_batches"]
        if not isinstance(mwb, int) or isinstance(mwb, bool) or mwb < 2:
            raise ValueError(f"min_window_batches must be an int >= 2, got {mwb!r}")
        mw = options["max_workers"]
        if mw is not None and (not isinstance(mw, int) or isinstance(mw, bool) or mw < 1):
            raise ValueError(f"max_workers must be an int >= 1, got {mw!r}")
        share = options["ram_budget_share"]
        if not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(f"ram_budget_share must be in (0, 1], got {share!r}")
        for sink in options["sinks"]:
            if not callable(sink):
                raise ValueError(
                    f"sinks must be callables taking an Event, got {type(sink).__name__}"
                )
        self.mode = mode
        self._options = options
        self.window_s = float(options["window_s"])
        self.min_window_batches = mwb
        self.config: LoaderConfig | None = None
        self.metrics: WindowMetrics | None = None
        self.diagnosis: Diagnosis | None = None
        self.recommendation: Recommendation | None = None
        self._events: EventLog | None = None
        self._sampler: Sampler | None = None
        self._collective: Any = None
        self._controller: Controller | None = None
        self._bounds: Bounds | None = None
        self._environment = Environment()
        self._lr_exponent = 0.0
        self._lr_rule = "none"
        self._timer = LoopTimer()
        self._last_end: float | None = None
        self._batches = 0
        self._window_step = 0
        self._window_deadline = math.inf
        self._dist_window_steps = max(4 * mwb, 40)
        self._pending: Decision | None = None
        self._applied_epochs: list[tuple[int, LoaderConfig]] = []
        self._logged_rec: LoaderConfig | None = None
        self._warned: set[str] = set()
        self._can_apply = False
        self._running = False

    # -- public read-outs --------------------------------------------------------------------------
    @property
    def events(self) -> list[Event]:
        """The events so far (the most recent 10,000)."""
        return list(self._events.events) if self._events is not None else []

    @property
    def applied(self) -> list[tuple[int, LoaderConfig]]:
        """``(epoch, config)`` for every change applied, in order."""
        return list(self._applied_epochs)

    # -- Lightning hooks ---------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Finds the train DataLoader and starts measuring."""
        loaders = list(_dataloaders(trainer.train_dataloader))
        if not loaders:
            logger.warning(
                "the train dataloader is not a torch DataLoader (%s); nothing to tune",
                type(trainer.train_dataloader).__name__,
            )
            return
        if len(loaders) > 1 and self.mode == "apply":
            logger.warning(
                "%d train DataLoaders; timing is per step, so which one limits "
                "cannot be told apart: recommending for the first, changing none",
                len(loaders),
            )
        self._can_apply = self.mode == "apply" and len(loaders) == 1
        self.config = LoaderConfig.from_loader(loaders[0])
        options = self._options
        self._collective = _make_collective(options["dist_timeout_s"])
        self._environment = _environment(pl_module)
        self._lr_rule, self._lr_exponent = _lr_rule(options["lr_rule"], trainer)
        local = self._collective.local_world_size if self._collective is not None else 1
        self._bounds = node_bounds(options["max_workers"], options["ram_budget_share"], local)
        self._controller = Controller(
            self.config,
            self._bounds,
            allow_batch_size=False,
            lr_exponent=self._lr_exponent,
            cooldown_s=self.window_s,
        )
        self._events = EventLog(options["log_file"], sinks=tuple(options["sinks"]))
        self._sampler = Sampler(
            options["interval_s"], gpu=resolve_gpu(options["gpu"]), host=options["host"]
        )
        self._sampler.start()
        self._running = True
        self._open_window()
        self._events.emit(
            "start",
            trainer.global_step,
            trainer.current_epoch,
            mode=self.mode,
            config=self.config.to_dict(),
            gpu=getattr(self._sampler.gpu, "name", None),
            usable_cpus=self._bounds.usable_cpus,
            lr_rule=self._lr_rule,
            integration="lightning",
        )

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Applies a pending change to the DataLoader before this epoch's iterator exists."""
        if not self._running:
            return
        if self._can_apply and trainer.current_epoch > 0:
            self._apply_at_boundary(trainer)
        self._timer.epoch_started()
        self._last_end = time.perf_counter()

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """Counts the time since the previous step ended as waiting for this batch."""
        if not self._running:
            return
        now = time.perf_counter()
        requested = self._last_end if self._last_end is not None else now
        self._timer.record(requested, now, _batch_len(batch, self.config))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Ends the step; closes the window when it is due."""
        if not self._running:
            return
        now = time.perf_counter()
        self._last_end = now
        self._batches += 1
        due = (
            self._batches >= self._window_step
            if self._collective is not None
            else now >= self._window_deadline and self._timer.batches >= self.min_window_batches
        )
        if due:
            self._on_window(trainer, now)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Stops measuring and logs a summary."""
        self._stop(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Stops the sampler thread when training fails."""
        self._stop(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Stops the sampler thread if training ended without ``on_train_end``."""
        self._stop(trainer)

    # -- windows -----------------------------------------------------------------------------------
    def _open_window(self) -> None:
        if self._collective is None:
            self._window_deadline = time.perf_counter() + self.window_s
        else:
            # Every rank closes its window after the same number of steps, so all of them reach
            # the collective decision together.
            self._window_step = self._batches + self._dist_window_steps

    def _on_window(self, trainer: Any, now: float) -> None:
        assert (
            self._sampler is not None and self._controller is not None and self.config is not None
        )
        loop = self._timer.take()
        ticks = self._sampler.window(loop.start_s, loop.end_s)
        metrics = compute_metrics(loop, ticks, self.config)
        collective = self._collective
        if collective is not None:
            metrics = collective.reduce_metrics(metrics)
            wanted = max(self.min_window_batches, math.ceil(self.window_s * metrics.batches_per_s))
            self._dist_window_steps = collective.max_int(wanted)
        self._open_window()
        if metrics.batches < 2:  # the reduced count: every rank takes the same branch
            return
        diagnosis = diagnose(metrics, self.config, self._environment)
        self.metrics, self.diagnosis = metrics, diagnosis
        step, epoch = trainer.global_step, trainer.current_epoch
        assert self._events is not None
        self._events.emit(
            "window",
            step,
            epoch,
            config=self.config.to_dict(),
            metrics=metrics.to_dict(),
            diagnosis=diagnosis.to_dict(),
        )
        scalars = {
            "loadertune/samples_per_s": metrics.samples_per_s,
            "loadertune/wait_share": metrics.wait_share,
            "loadertune/num_workers": float(self.config.num_workers),
        }
        if metrics.gpu_util_mean_pct is not None:
            scalars["loadertune/gpu_util_pct"] = metrics.gpu_util_mean_pct
        if self.mode == "apply" and self._can_apply:
            if self._pending is None:
                self._decide(metrics, diagnosis, now, step, epoch)
            # else: a change waits for the epoch boundary; judging it before it runs would
            # compare the old configuration with itself.
        else:
            self._recommend(metrics, diagnosis, step, epoch)
        rec = self.recommendation
        if rec is not None:
            scalars["loadertune/recommended_num_workers"] = float(rec.config.num_workers)
            if rec.config.batch_size is not None:
                scalars["loadertune/recommended_batch_size"] = float(rec.config.batch_size)
        _log_scalars(trainer, scalars, step)

    def _recommend(
        self, metrics: WindowMetrics, diagnosis: Diagnosis, step: int, epoch: int
    ) -> None:
        assert self._bounds is not None and self.config is not None and self._events is not None
        rec = plan(
            metrics,
            diagnosis,
            self.config,
            self._bounds,
            allow_batch_size=self.config.batch_size is not None,
            lr_exponent=self._lr_exponent,
        )
        if self._collective is not None:
            rec = self._collective.broadcast(rec)
        self.recommendation = rec
        target = rec.config if rec is not None else None
        if same_recommendation(target, self._logged_rec):
            # Rates wobble between windows; repeat a recommendation only when it really changes.
            return
        self._logged_rec = target
        if rec is None:
            logger.info("%s Keep %s.", diagnosis.summary, self.config.describe())
            return
        logger.info("%s Recommend %s.", diagnosis.summary, rec.describe(self._lr_rule))
        self._events.emit(
            "recommendation",
            step,
            epoch,
            recommendation=rec.to_dict(),
            diagnosis=diagnosis.to_dict(),
            metrics=metrics.to_dict(),
        )

    def _decide(
        self, metrics: WindowMetrics, diagnosis: Diagnosis, now: float, step: int, epoch: int
    ) -> None:
        assert self._controller is not None and self._events is not None
        decision = self._controller.decide(metrics, diagnosis, now)
        if self._collective is not None:
            # Rank 0's decision is everyone's: cooldowns differ per rank.
            decision = self._collective.broadcast(decision)
            self._controller.adopt(decision)
        self.recommendation = decision.recommendation
        if decision.action in ("change", "revert"):
            self._pending = decision
            logger.info(
                "%s %s -> %s at the start of the next epoch: %s",
                decision.action,
                self.config.describe() if self.config else "?",
                decision.config.describe(),
                decision.reason,
            )
        elif decision.action in ("keep", "retune"):
            logger.info("%s", decision.reason)
            self._events.emit(decision.action, step, epoch, **decision.to_dict())

    def _apply_at_boundary(self, trainer: Any) -> None:
        loaders = list(_dataloaders(trainer.train_dataloader))
        if len(loaders) != 1 or self.config is None or self._events is None:
            return
        loader = loaders[0]
        decision, self._pending = self._pending, None
        target = decision.config if decision is not None else self.config
        before = LoaderConfig.from_loader(loader)
        unsettable = [
            k for k in before.diff(target) if k not in _SETTABLE and k not in self._warned
        ]
        for name in unsettable:
            self._warned.add(name)
            logger.info(
                "recommend %s=%r in train_dataloader(); the callback cannot change it "
                "on a live DataLoader",
                name,
                getattr(target, name),
            )
        applied = _set_loader(loader, target)
        self.config = applied
        if decision is None and applied == before:
            return
        epoch = trainer.current_epoch
        self._applied_epochs.append((epoch, applied))
        # The first batches of new workers measure their start-up, not their pace.
        self._timer.discard(max(2, applied.num_workers))
        if decision is None:
            # Lightning rebuilt the loader from the user's code; the tuned values are restored.
            logger.info("re-applied %s to the reloaded train DataLoader", applied.describe())
            return
        logger.info(
            "%s %s -> %s at epoch %d: %s",
            decision.action,
            before.describe(),
            applied.describe(),
            epoch,
            decision.reason,
        )
        self._events.emit(
            decision.action,
            trainer.global_step,
            epoch,
            before=before.to_dict(),
            after=applied.to_dict(),
            reason=decision.reason,
            lr_factor=None,
            forced=False,
        )

    def _stop(self, trainer: Any) -> None:
        if not self._running:
            return
        self._running = False
        if self._sampler is not None:
            self._sampler.close()
        if self._events is not None:
            changes = [e for e in self._events.events if e.kind in ("change", "revert")]
            now = self.config.describe() if self.config else "?"
            text = f"summary: {len(changes)} change(s); now {now}"
            logger.info("%s", text)
            self._events.emit(
                "summary",
                trainer.global_step,
                trainer.current_epoch,
                text=text,
                final_config=self.config.to_dict() if self.config else None,
                changes=len(changes),
            )
            self._events.close()
        if self._collective is not None:
            self._collective.close()


# -- helpers --------------------------------------------------------------------------------------
def _dataloaders(obj: Any) -> Iterator[Any]:
    """The torch DataLoaders in what ``trainer.train_dataloader`` returns (one, or a collection)."""
    from torch.utils.data import DataLoader

    if isinstance(obj, DataLoader):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _dataloaders(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _dataloaders(v)


def _set_loader(loader: Any, target: LoaderConfig) -> LoaderConfig:
    """Sets the settable fields of ``target`` on a DataLoader between epochs; returns the result."""
    current = LoaderConfig.from_loader(loader)
    wanted = current.replace(**{k: getattr(target, k) for k in _SETTABLE})
    if wanted == current:
        return current
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        # A persistent-workers loader caches its iterator and would reuse the old workers.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        loader._iterator = None
    loader.num_workers = wanted.num_workers
    # torch refuses a prefetch_factor without workers and needs one with them.
    loader.prefetch_factor = wanted.prefetch_factor if wanted.num_workers > 0 else None
    loader.pin_memory = wanted.pin_memory
    return LoaderConfig.from_loader(loader)


def _batch_len(batch: Any, config: LoaderConfig | None) -> int:
    """Samples in a collated batch: the first dimension of its first tensor."""
    import torch

    stack: list[Any] = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            return int(item.shape[0]) if item.dim() > 0 else 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return (config.batch_size if config is not None else None) or 1


def _log_scalars(trainer: Any, scalars: dict[str, float], step: int) -> None:
    for lg in getattr(trainer, "loggers", None) or []:
        try:
            lg.log_metrics(scalars, step=step)
        except Exception:  # a logger's failure must not fail training
            logger.warning("logging to %r failed", lg, exc_info=True)


def _make_collective(timeout_s: float) -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from loadertune.distributed import Collective

    return Collective(timeout_s=timeout_s)


def _environment(pl_module: Any) -> Environment:
    import torch

    on_cuda = False
    has_conv = False
    try:
        on_cuda = next(pl_module.parameters()).is_cuda
    except (StopIteration, AttributeError):
        on_cuda = False
    if hasattr(pl_module, "modules"):
        has_conv = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in pl_module.modules())
    return Environment(
        on_cuda=on_cuda,
        has_conv=has_conv,
        cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
    )


def _lr_rule(rule: str, trainer: Any) -> tuple[str, float]:
    exponents = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}
    if rule not in (*exponents, "auto"):
        raise ValueError(f"lr_rule must be one of 'auto', 'linear', 'sqrt', 'none', got {rule!r}")
    if rule == "auto":
        optimizers = getattr(trainer, "optimizers", None) or []
        if not optimizers:
            return "none", 0.0
        from loadertune.lr import resolve_lr_rule

        rule, _ = resolve_lr_rule("auto", optimizers[0])
    return rule, exponents[rule]


