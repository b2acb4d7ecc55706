"""What follows a batch-size change: the learning rate, its warm-up, the schedule's length, or
the gradient-accumulation steps.

A change takes effect with the first batch of the new size, not when it is decided: the batch the
loop is about to get may still be of the old size. So a change is planned as a :class:`FollowUp`
(plain data) and carried out when that batch is handed out.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from loadertune.config import LoaderConfig

__all__ = ["BatchFollower", "FollowUp"]


@dataclass(frozen=True)
class FollowUp:
    """One planned follow-up of a batch-size change.

    Attributes:
        before_batch_size: The batch size the learning rate was set for.
        after_batch_size: The new batch size.
        lr_factor: Multiplier of the learning rate, or None when accumulation absorbs the change.
        accumulation_steps: The new accumulation steps, or None when the learning rate follows.
    """

    before_batch_size: int
    after_batch_size: int
    lr_factor: float | None
    accumulation_steps: int | None


class BatchFollower:
    """Plans and carries out what follows batch-size changes.

    Args:
        optimizer: The optimizer whose learning rate follows, or None.
        scheduler: Its scheduler, or None.
        lr_exponent: The rule as an exponent of the batch ratio (1 linear, 0.5 sqrt, 0 none).
        warmup_steps: Ramp into a raised learning rate over this many optimizer steps.
        keep_schedule_length: Rescale the scheduler's step-counted lengths.
        accumulation_steps: Micro-batches per optimizer step, or None when not accumulating.

    Attributes:
        due_after_step: Follow-ups run with the first batch after this step.
        pending: Follow-ups waiting for the first batch of the new size.
    """

    def __init__(
        self,
        *,
        optimizer: Any = None,
        scheduler: Any = None,
        lr_exponent: float = 1.0,
        warmup_steps: int = 0,
        keep_schedule_length: bool = False,
        accumulation_steps: int | None = None,
    ) -> None:
        self._optimizer = optimizer
        self._scheduler = scheduler
        self._lr_exponent = lr_exponent
        self._warmup_steps = warmup_steps
        self._keep_schedule_length = keep_schedule_length
        self._warmup: Any = None
        self.accumulation_steps = accumulation_steps
        self._planned_accumulation = accumulation_steps
        self.pending: list[FollowUp] = []
        self._next_epoch: list[FollowUp] = []
        self.due_after_step = 0
        #: The last increase, for an out-of-memory undo: (config before, lr factor).
        self.last_increase: tuple[LoaderConfig, float | None] | None = None

    def plan(
        self, before: LoaderConfig, after: LoaderConfig, lr_factor: float | None, *, step: int, at_next_epoch: bool
    ) -> float | None:
        """Plans the follow-up of ``before`` -> ``after``; returns the learning-rate factor (None
        when accumulation absorbs the change).

        Args:
            before: The configuration in use.
            after: The new one (another batch size).
            lr_factor: A factor decided elsewhere (a revert undoing a change), else None for the rule's.
            step: Batches handed out so far; the follow-up runs with the next one.
            at_next_epoch: The change waits for the next epoch (an IterableDataset).
        """
        old, new = before.batch_size, after.batch_size
        follow = None
        if self._planned_accumulation is not None:
            from loadertune.lr import accumulation_plan

            planned = accumulation_plan(old, self._planned_accumulation, Fraction(new, old))
            if planned is not None:
                self._planned_accumulation = planned[1]
                follow = FollowUp(old, new, None, planned[1])
                lr_factor = None
        if follow is None:
            if lr_factor is None:
                lr_factor = (new / old) ** self._lr_exponent
            follow = FollowUp(old, new, lr_factor, None)
        self.last_increase = (before, lr_factor) if new > old else None
        if at_next_epoch:
            self._next_epoch.append(follow)
        else:
            self.pending.append(follow)
            self.due_after_step = step
        return lr_factor

    def state_dict(self, batch_size: int | None) -> dict[str, Any]:
        """What a checkpoint needs to keep the learning rate in step on resume.

        Args:
            batch_size: The batch size of the configuration in use.
        """
        waiting = self.pending or self._next_epoch
        warmup = self._warmup
        increase = self.last_increase
        return {
            # What the optimizer's learning rate (or the accumulation) is set for now: a change
            # whose first batch has not come yet has not moved it.
            "lr_batch_size": waiting[0].before_batch_size if waiting else batch_size,
            "accumulation_steps": self.accumulation_steps,
            "warmup": warmup.state_dict() if warmup is not None and not warmup.done else None,
            "last_increase": None if increase is None else [increase[0].to_dict(), increase[1]],
        }

    def load_state_dict(self, state: dict[str, Any], *, batch_size: int | None, step: int) -> None:
        """Takes back :meth:`state_dict`'s state; load the optimizer's and scheduler's first.

        When the resumed loader serves another batch size than the learning rate was set for,
        the follow-up (rule or accumulation) is planned for its first batch, as for a change.
        """
        self.accumulation_steps = self._planned_accumulation = state["accumulation_steps"]
        self.pending, self._next_epoch = [], []
        increase = state["last_increase"]
        self.last_increase = None if increase is None else (LoaderConfig(**increase[0]), increase[1])
        if state["warmup"] is not None and self._optimizer is not None:
            from loadertune.lr import LrWarmup

            self._warmup = LrWarmup.from_state_dict(self._optimizer, state["warmup"])
        lr_bs = state["lr_batch_size"]
        if lr_bs is not None and batch_size is not None and lr_bs != batch_size:
            self.plan(
                LoaderConfig(batch_size=lr_bs), LoaderConfig(batch_size=batch_size), None, step=step, at_next_epoch=False
            )
            self.last_increase = None

    def epoch_started(self, step: int) -> None:
        """Changes that waited for the epoch take effect with its first batch."""
        if self._next_epoch:
            self.pending.extend(self._next_epoch)
            self._next_epoch = []
            self.due_after_step = step

    def run_due(self) -> None:
        """Carries out the pending follow-ups (called with the first batch of the new size)."""
        pending, self.pending = self.pending, []
        for follow in pending:
            if follow.accumulation_steps is not None:
                self.accumulation_steps = follow.accumulation_steps
            else:
                self._scale(follow)

    def _scale(self, follow: FollowUp) -> None:
        factor = follow.lr_factor
        if self._optimizer is not None and factor is not None and factor != 1.0:
            from loadertune.lr import LrWarmup, scale_lr

            if self._warmup is not None:
                self._warmup.remove()
                self._warmup = None
            if self._warmup_steps and factor > 1.0:
                self._warmup = LrWarmup(self._optimizer, factor, self._warmup_steps, self._scheduler)
            else:
                scale_lr(self._optimizer, factor, self._scheduler)
        if self._keep_schedule_length:
            from loadertune.lr import rescale_schedule_length

            # Steps per epoch shrink as the batch grows: old batch / new batch.
            rescale_schedule_length(self._scheduler, follow.before_batch_size / follow.after_batch_size)
