"""The options of a tuning run: every default and every check, in one place.

``tune()``, the Lightning callback and ``loadertune run`` all build a :class:`TuneOptions`, so an
option means the same thing, and is refused for the same reason, whichever front end takes it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

from loadertune.config import check_seconds

__all__ = ["LR_EXPONENTS", "MODES", "ON_STALL", "Mode", "OnStall", "TuneOptions", "resolve_lr"]

logger = logging.getLogger("loadertune")

Mode = Literal["recommend", "apply"]
#: The modes ``tune`` accepts.
MODES: tuple[Mode, ...] = ("recommend", "apply")

OnStall = Literal["warn", "restart"]
#: What ``tune(on_stall=...)`` accepts.
ON_STALL: tuple[OnStall, ...] = ("warn", "restart")

#: Learning-rate rules as exponents of the batch-size ratio.
LR_EXPONENTS = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}


@dataclass(frozen=True)
class TuneOptions:
    """What a tuning run may do and how it measures; see :func:`loadertune.tune` for each field.

    Raises:
        ValueError: A value of the wrong type or out of range; the message names the option and
            says what to pass.
    """

    mode: Mode = "recommend"
    gpu: Any = "auto"
    log_file: str | os.PathLike[str] | None = None
    window_s: float = 2.0
    min_window_batches: int = 10
    interval_s: float = 0.1
    allow_batch_size: bool = False
    optimizer: Any = None
    scheduler: Any = None
    lr_rule: str = "auto"
    lr_warmup_steps: int = 0
    keep_schedule_length: bool = False
    accumulation_steps: int | None = None
    model: Any = None
    seed: int | None = None
    max_workers: int | None = None
    ram_budget_share: float = 0.5
    host: Any = True
    sinks: tuple[Callable[[Any], Any], ...] = ()
    dist_timeout_s: float = 300.0
    iterable_shards: bool = False
    stall_timeout_s: float | None = None
    on_stall: OnStall = "warn"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {self.mode!r}")
        for name in ("window_s", "interval_s", "dist_timeout_s"):
            object.__setattr__(self, name, check_seconds(name, getattr(self, name)))
        _check_int("min_window_batches", self.min_window_batches, 2)
        _check_int("lr_warmup_steps", self.lr_warmup_steps, 0)
        if self.max_workers is not None:
            _check_int("max_workers", self.max_workers, 1)
        if self.accumulation_steps is not None:
            _check_int("accumulation_steps", self.accumulation_steps, 1)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        share = self.ram_budget_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(f"ram_budget_share must be a number in (0, 1], got {share!r}")
        for name in ("allow_batch_size", "keep_schedule_length", "iterable_shards"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        stall = self.stall_timeout_s
        if stall is not None:
            if isinstance(stall, bool) or not isinstance(stall, (int, float)) or math.isnan(stall) or stall <= 0:
                raise ValueError(
                    f"stall_timeout_s must be a number of seconds > 0, None (derived from the batch "
                    f"times, at least a minute) or math.inf (off), got {stall!r}"
                )
            object.__setattr__(self, "stall_timeout_s", float(stall))
        if self.on_stall not in ON_STALL:
            raise ValueError(f"on_stall must be one of {', '.join(map(repr, ON_STALL))}, got {self.on_stall!r}")
        choices = ("auto", *LR_EXPONENTS)
        if self.lr_rule not in choices:
            raise ValueError(f"lr_rule must be one of {', '.join(map(repr, choices))}, got {self.lr_rule!r}")
        object.__setattr__(self, "sinks", _check_sinks(self.sinks))
        if self.keep_schedule_length and self.scheduler is None:
            raise ValueError("keep_schedule_length=True needs the scheduler=: pass the scheduler to rescale")
        if self.mode == "apply" and self.allow_batch_size and self.optimizer is None and self.lr_rule != "none":
            raise ValueError(
                "allow_batch_size=True changes the batch size, so the learning rate must follow: "
                "pass optimizer= (and scheduler=), or lr_rule='none' to keep the learning rate"
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option's name."""
        return tuple(f.name for f in fields(cls))


def resolve_lr(options: TuneOptions, optimizer: Any = None) -> tuple[str, float]:
    """The concrete learning-rate rule and its exponent for a run.

    ``"auto"`` chooses by the optimizer's class (``optimizer`` or ``options.optimizer``); with
    no optimizer known it is the linear rule, the one a batch-size recommendation then quotes.
    """
    rule = options.lr_rule
    optimizer = optimizer if optimizer is not None else options.optimizer
    if rule == "auto":
        if optimizer is None:
            return "linear", LR_EXPONENTS["linear"]
        from loadertune.lr import resolve_lr_rule

        rule, why = resolve_lr_rule("auto", optimizer)
        logger.info("lr_rule='auto' chose %r: %s", rule, why)
    return rule, LR_EXPONENTS[rule]


def _check_int(name: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def _check_sinks(sinks: Any) -> tuple[Callable[[Any], Any], ...]:
    if callable(sinks):
        raise ValueError(
            f"sinks must be a sequence of callables, got the callable {sinks!r} itself; "
            "pass sinks=(it,)"
        )
    try:
        items = tuple(sinks)
    except TypeError:
        raise ValueError(f"sinks must be a sequence of callables taking an Event, got {sinks!r}") from None
    for sink in items:
        if not callable(sink):
            raise ValueError(f"sinks must be callables taking an Event, got {type(sink).__name__}")
    return items
