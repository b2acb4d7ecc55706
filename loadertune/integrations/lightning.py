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

Why not mid-epoch, as ``tune()`` does: Lightning's fit loop creates the epoch's iterator itself
(a ``_DataFetcher`` over a ``CombinedLoader``) before any per-batch hook runs, and keeps it to the
epoch's end; no public hook hands the callback that iterator or lets it substitute one. A change
therefore waits for the next epoch. For mid-epoch changes, wrap the loader yourself:
``return loadertune.tune(DataLoader(...), mode="apply")`` from ``train_dataloader()``.

The validation loaders are observed from the validation hooks (after the sanity check) by a
session of their own, in recommend mode: ``validation_recommendation`` and ``validation_events``,
and a ``.validation`` event log beside the training one. Under DDP each rank writes its own event
logs (``run.rank1.jsonl``).

All of this drives the same :class:`~loadertune.session.TuningSession` as ``tune()``: the
callback only feeds it the hook timings and carries out its decisions.

Install with ``pip install loadertune[lightning]`` (``pytorch-lightning``; the ``lightning``
package works too).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

from loadertune.config import LoaderConfig
from loadertune.controller import Decision
from loadertune.diagnosis import Diagnosis
from loadertune.events import Event
from loadertune.metrics import WindowMetrics
from loadertune.options import MODES, TuneOptions
from loadertune.planning import Recommendation
from loadertune.session import TuningSession, model_environment

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


# tune() options that concern loaders and optimizers Lightning owns: refused, with the reason.
_REFUSED = {
    "optimizer": "the callback reads the optimizer from the trainer",
    "scheduler": "the callback never changes the learning rate (it never changes the batch size)",
    "accumulation_steps": "Lightning's accumulate_grad_batches owns gradient accumulation",
    "model": "the callback reads the model from the trainer",
    "seed": "reseeding needs loadertune to own the sampler; wrap the loader with tune() instead",
}
# Settings the callback can change on a live DataLoader; persistent_workers torch forbids.
_SETTABLE = ("num_workers", "prefetch_factor", "pin_memory")
_STATE_FORMAT = "loadertune.LoadertuneCallback"
_STATE_VERSION = 1


class LoadertuneCallback(*_callback_bases()):  # type: ignore[misc]
    """Measures the training loop under a Lightning ``Trainer`` and recommends or applies
    DataLoader settings.

    Args:
        mode: ``"recommend"`` logs what to change; ``"apply"`` also changes ``num_workers``,
            ``prefetch_factor`` and ``pin_memory`` of the train DataLoader at the next epoch
            boundary, keeping a change only if throughput rose by more than the noise.
        warm_start: When Lightning resumes from a checkpoint, take back the tuned settings
            (applied at the next epoch boundary) and what the controller learned; False tunes
            from scratch.
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

    def __init__(self, mode: str = "recommend", *, warm_start: bool = True, **tune_options: Any) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        for name in tune_options:
            if name in _REFUSED:
                raise ValueError(f"LoadertuneCallback does not take {name}=: {_REFUSED[name]}")
            if name not in TuneOptions.names() or name == "mode":
                allowed = sorted(set(TuneOptions.names()) - set(_REFUSED) - {"mode"})
                raise ValueError(
                    f"unknown option {name!r} for LoadertuneCallback; choose from {', '.join(allowed)}"
                )
        if mode == "apply" and tune_options.get("allow_batch_size"):
            raise ValueError(
                "LoadertuneCallback(mode='apply') never changes the batch size: Lightning's "
                "optimizers, schedulers and BatchSizeFinder own it. Use mode='recommend' with "
                "allow_batch_size=True to be told when a larger batch would pay"
            )
        self.options = TuneOptions(mode=mode, **tune_options)
        self.mode = mode
        self.window_s = self.options.window_s
        self.min_window_batches = self.options.min_window_batches
        self.config: LoaderConfig | None = None
        self._session: TuningSession | None = None
        self._last_end: float | None = None
        self._batches = 0
        self._pending: Decision | None = None
        self._applied_epochs: list[tuple[int, LoaderConfig]] = []
        self._warned: set[str] = set()
        self._can_apply = False
        self._running = False
        self.warm_start = warm_start
        self._resumed: dict[str, Any] | None = None
        # The validation loaders, observed (never changed) from their own hooks.
        self._val: TuningSession | None = None
        self._val_config: LoaderConfig | None = None
        self._val_last_end: float | None = None
        self._val_batches = 0

    # -- public read-outs (kept after training ends) ---------------------------------------------
    @property
    def events(self) -> list[Event]:
        """The events so far (the most recent 10,000)."""
        return self._session.events if self._session is not None else []

    @property
    def metrics(self) -> WindowMetrics | None:
        """The latest window's metrics."""
        return self._session.metrics if self._session is not None else None

    @property
    def diagnosis(self) -> Diagnosis | None:
        """The latest diagnosis."""
        return self._session.diagnosis if self._session is not None else None

    @property
    def recommendation(self) -> Recommendation | None:
        """The latest recommendation, or None."""
        return self._session.recommendation if self._session is not None else None

    @property
    def applied(self) -> list[tuple[int, LoaderConfig]]:
        """``(epoch, config)`` for every change applied, in order."""
        return list(self._applied_epochs)

    @property
    def validation_recommendation(self) -> Recommendation | None:
        """What the validation DataLoader should move to, or None (observed, never changed)."""
        return self._val.recommendation if self._val is not None else None

    @property
    def validation_events(self) -> list[Event]:
        """The validation loader's events."""
        return self._val.events if self._val is not None else []

    @property
    def _sampler(self) -> Any:
        return self._session.sampler if self._session is not None else None

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
        optimizers = getattr(trainer, "optimizers", None) or []
        options = self.options
        if options.log_file is not None and getattr(trainer, "world_size", 1) > 1:
            # One event log per rank: ranks appending to one file interleave their lines.
            options = dataclasses.replace(options, log_file=_rank_path(options.log_file, trainer.global_rank))
        self._session = TuningSession(
            options,
            self.config,
            batch_resizable=self.config.batch_size is not None,
            environment=model_environment(pl_module),
            integration="lightning",
            optimizer=optimizers[0] if optimizers else None,
            step=self._batches,
            epoch=trainer.current_epoch,
        )
        self._running = True
        resumed, self._resumed = self._resumed, None
        if resumed is not None and self.warm_start:
            # A warm start: what was learned comes back, and in apply mode the tuned settings
            # are set at the next epoch boundary (the first iterator may exist already).
            self._session.controller.load_state_dict(resumed["controller"])
            if self._can_apply and resumed["config"] is not None:
                saved = LoaderConfig(**resumed["config"])
                self.config = self.config.replace(**{k: getattr(saved, k) for k in _SETTABLE})
            self._session.controller.config = self.config

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a Lightning checkpoint keeps of this callback: the tuned settings, what the
        controller learned, the changes applied. (Lightning resumes the loader's position
        itself; the callback never wraps the loader.)"""
        if self._session is not None:
            controller = self._session.controller.state_dict()
        elif self._resumed is not None:
            controller = self._resumed["controller"]
        else:
            controller = None
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "config": self.config.to_dict() if self.config is not None else None,
            "controller": controller,
            "applied": [[epoch, config.to_dict()] for epoch, config in self._applied_epochs],
            "batches": self._batches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Takes back :meth:`state_dict` (Lightning calls it when resuming from a checkpoint).

        Raises:
            ValueError: Not this callback's state, or another format version.
        """
        state = state_dict
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a LoadertuneCallback state (want format={_STATE_FORMAT!r})")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"cannot resume: format version was {state.get('version')!r} when the state was saved, "
                f"now {_STATE_VERSION}; resume with the loadertune that saved it, or drop the "
                "callback's entry from the checkpoint to tune from scratch"
            )
        self._batches = int(state["batches"])
        self._applied_epochs = [(int(e), LoaderConfig(**c)) for e, c in state["applied"]]
        self._resumed = state if state.get("controller") is not None else None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Applies a pending change to the DataLoader before this epoch's iterator exists."""
        if not self._running:
            return
        if self._can_apply and trainer.current_epoch > 0:
            self._apply_at_boundary(trainer)
        now = time.perf_counter()
        self._session.epoch_started(now, self._batches, self.config)
        self._last_end = now

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Counts the time since the previous step ended as waiting for this batch."""
        if not self._running:
            return
        now = time.perf_counter()
        requested = self._last_end if self._last_end is not None else now
        self._session.timer.record(requested, now, _batch_len(batch, self.config))
        if self._session.batch_bytes is None:
            self._session.note_batch(batch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Ends the step; closes the window when it is due."""
        if not self._running:
            return
        now = time.perf_counter()
        self._last_end = now
        self._batches += 1
        session = self._session
        if session.schedule.due(now, self._batches):
            before = session.metrics
            decision = session.close_window(
                now_s=now,
                step=self._batches,
                epoch=trainer.current_epoch,
                config=self.config,
                # A change waits for the epoch boundary; judging it before it runs would
                # compare the old configuration with itself.
                decide=self._can_apply and self._pending is None,
            )
            if decision is not None:
                self._pending = decision
                logger.info(
                    "%s %s -> %s at the start of the next epoch: %s",
                    decision.action,
                    self.config.describe(),
                    decision.config.describe(),
                    decision.reason,
                )
            if session.metrics is not before:
                self._log_scalars(trainer)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Starts observing the validation loader (after the sanity check, once training runs)."""
        if not self._running or getattr(trainer, "sanity_checking", False):
            return
        if self._val is None:
            loaders = list(_dataloaders(getattr(trainer, "val_dataloaders", None)))
            if not loaders:
                return
            self._val_config = LoaderConfig.from_loader(loaders[0])
            self._val = TuningSession(
                dataclasses.replace(
                    self._session.options,
                    mode="recommend",
                    log_file=_suffixed(self._session.options.log_file, "validation"),
                ),
                self._val_config,
                batch_resizable=False,
                environment=self._session.environment,
                integration="lightning",
                name="validation",
                step=self._val_batches,
                epoch=trainer.current_epoch,
            )
        now = time.perf_counter()
        self._val.epoch_started(now, self._val_batches, self._val_config)
        self._val_last_end = now

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Counts the time since the previous validation step as waiting for this batch."""
        val = self._val
        if val is None or val.closed or getattr(trainer, "sanity_checking", False):
            return
        now = time.perf_counter()
        requested = self._val_last_end if self._val_last_end is not None else now
        val.timer.record(requested, now, _batch_len(batch, self._val_config))

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Ends the validation step; closes the validation window when it is due."""
        val = self._val
        if val is None or val.closed or getattr(trainer, "sanity_checking", False):
            return
        now = time.perf_counter()
        self._val_last_end = now
        self._val_batches += 1
        if val.schedule.due(now, self._val_batches):
            val.close_window(now_s=now, step=self._val_batches, epoch=trainer.current_epoch, config=self._val_config, batch=batch)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Stops measuring and logs a summary."""
        self._stop(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Stops the sampler thread when training fails."""
        self._stop(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Stops the sampler thread if training ended without ``on_train_end``."""
        self._stop(trainer)

    # -- what the hooks do -------------------------------------------------------------------------
    def _log_scalars(self, trainer: Any) -> None:
        session = self._session
        metrics = session.metrics
        scalars = {
            "loadertune/samples_per_s": metrics.samples_per_s,
            "loadertune/wait_share": metrics.wait_share,
            "loadertune/num_workers": float(self.config.num_workers),
        }
        if metrics.gpu_util_mean_pct is not None:
            scalars["loadertune/gpu_util_pct"] = metrics.gpu_util_mean_pct
        rec = session.recommendation
        if rec is not None:
            scalars["loadertune/recommended_num_workers"] = float(rec.config.num_workers)
            if rec.config.batch_size is not None:
                scalars["loadertune/recommended_batch_size"] = float(rec.config.batch_size)
        for lg in getattr(trainer, "loggers", None) or []:
            try:
                lg.log_metrics(scalars, step=trainer.global_step)
            except Exception:  # a logger's failure must not fail training
                logger.warning("logging to %r failed", lg, exc_info=True)

    def _apply_at_boundary(self, trainer: Any) -> None:
        loaders = list(_dataloaders(trainer.train_dataloader))
        if len(loaders) != 1 or self.config is None:
            return
        loader = loaders[0]
        decision, self._pending = self._pending, None
        target = decision.config if decision is not None else self.config
        before = LoaderConfig.from_loader(loader)
        unsettable = [k for k in before.diff(target) if k not in _SETTABLE and k not in self._warned]
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
        if decision is None:
            # Lightning rebuilt the loader from the user's code; the tuned values are restored.
            self._session.rebuilt(max(2, applied.num_workers), step=self._batches)
            logger.info("re-applied %s to the reloaded train DataLoader", applied.describe())
            return
        # The first batches of new workers measure their start-up, not their pace.
        self._session.rebuilt(max(2, applied.num_workers), step=self._batches)
        self._session.changed(
            decision.action,
            before,
            applied,
            decision.reason,
            step=self._batches,
            epoch=epoch,
            when=f"at epoch {epoch}",
        )

    def _stop(self, trainer: Any) -> None:
        if not self._running:
            return
        self._running = False
        if self._val is not None:
            self._val.close(
                step=self._val_batches,
                epoch=trainer.current_epoch,
                epochs=trainer.current_epoch + 1,
                config=self._val_config,
            )
        self._session.close(
            step=self._batches,
            epoch=trainer.current_epoch,
            epochs=trainer.current_epoch + 1,
            config=self.config,
        )


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


def _rank_path(path: Any, rank: int) -> str:
    """``run.jsonl`` -> ``run.rank1.jsonl``: each rank's own event log."""
    return _suffixed(path, f"rank{rank}")


def _suffixed(path: Any, suffix: str) -> str | None:
    """``run.jsonl`` -> ``run.validation.jsonl``; None stays None."""
    if path is None:
        return None
    import os

    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.{suffix}{ext or '.jsonl'}"
