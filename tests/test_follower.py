"""What follows a batch-size change: the learning rate, or the accumulation steps."""

from __future__ import annotations

import pytest
import torch

from loadertune.config import LoaderConfig
from loadertune.follower import BatchFollower


def _sgd(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=lr)


def test_lr_follows_with_the_first_batch_of_the_new_size() -> None:
    opt = _sgd()
    f = BatchFollower(optimizer=opt, lr_exponent=1.0)
    factor = f.plan(LoaderConfig(batch_size=32), LoaderConfig(batch_size=64), None, step=10, at_next_epoch=False)
    assert factor == 2.0 and f.due_after_step == 10
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # not before the batch arrives
    f.run_due()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    assert f.last_increase == (LoaderConfig(batch_size=32), 2.0)


def test_accumulation_absorbs_the_change_when_it_divides() -> None:
    opt = _sgd()
    f = BatchFollower(optimizer=opt, accumulation_steps=4)
    assert f.plan(LoaderConfig(batch_size=32), LoaderConfig(batch_size=64), None, step=0, at_next_epoch=False) is None
    f.run_due()
    assert f.accumulation_steps == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    # 2 x 64 / 192 is not a whole number of steps: the learning rate follows instead.
    assert f.plan(LoaderConfig(batch_size=64), LoaderConfig(batch_size=192), None, step=1, at_next_epoch=False) is not None
    f.run_due()
    assert f.accumulation_steps == 2
    # Back to a third of the batch: exact arithmetic gives 2 x 3 = 6 steps (the effective batch
    # 192 x 2 = 64 x 6), where a float 1/3 would not come out whole.
    assert f.plan(LoaderConfig(batch_size=192), LoaderConfig(batch_size=64), None, step=2, at_next_epoch=False) is None
    f.run_due()
    assert f.accumulation_steps == 6


def test_iterable_changes_wait_for_the_epoch() -> None:
    opt = _sgd()
    f = BatchFollower(optimizer=opt, lr_exponent=0.5)
    f.plan(LoaderConfig(batch_size=16), LoaderConfig(batch_size=64), None, step=5, at_next_epoch=True)
    assert not f.pending
    f.epoch_started(step=9)
    assert f.pending and f.due_after_step == 9
    f.run_due()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


def test_a_decrease_is_not_an_increase_to_undo() -> None:
    f = BatchFollower(lr_exponent=1.0)
    f.plan(LoaderConfig(batch_size=64), LoaderConfig(batch_size=32), None, step=0, at_next_epoch=False)
    assert f.last_increase is None
