"""TuneOptions: every option's default and check, shared by every front end."""

from __future__ import annotations

import pytest
import torch

from loadertune.options import TuneOptions, resolve_lr


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_workers": True}, "max_workers"),
        ({"max_workers": 0}, "max_workers"),
        ({"ram_budget_share": True}, "ram_budget_share"),
        ({"ram_budget_share": 1.5}, "ram_budget_share"),
        ({"min_window_batches": 1}, "min_window_batches"),
        ({"min_window_batches": True}, "min_window_batches"),
        ({"lr_warmup_steps": -1}, "lr_warmup_steps"),
        ({"accumulation_steps": 0}, "accumulation_steps"),
        ({"seed": "1"}, "seed"),
        ({"window_s": 0}, "window_s"),
        ({"interval_s": float("nan")}, "interval_s"),
        ({"dist_timeout_s": -1}, "dist_timeout_s"),
        ({"lr_rule": "cosine"}, "lr_rule"),
        ({"mode": "auto"}, "mode"),
        ({"allow_batch_size": "yes"}, "allow_batch_size"),
        ({"sinks": print}, "sinks=(it,)"),
        ({"sinks": (1,)}, "sinks"),
        ({"keep_schedule_length": True}, "scheduler"),
        ({"mode": "apply", "allow_batch_size": True}, "optimizer="),
    ],
)
def test_bad_options_name_what_to_pass(options: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        TuneOptions(**options)


def test_defaults_and_normalised_values() -> None:
    o = TuneOptions(window_s=3, sinks=[print])
    assert o.window_s == 3.0 and isinstance(o.window_s, float)
    assert o.sinks == (print,)
    assert "ram_budget_share" in TuneOptions.names()


def test_lr_rule_auto_means_the_same_everywhere() -> None:
    assert resolve_lr(TuneOptions()) == ("linear", 1.0)
    adam = torch.optim.Adam(torch.nn.Linear(1, 1).parameters())
    assert resolve_lr(TuneOptions(), adam) == ("sqrt", 0.5)
    assert resolve_lr(TuneOptions(lr_rule="none"), adam) == ("none", 0.0)
