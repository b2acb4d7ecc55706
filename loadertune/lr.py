"""The learning rate that goes with a batch-size change: rules, exact rescaling, warmup, lengths.

When the tuner changes the batch size, three things may have to follow it:

* the learning rate, by a factor from a rule (:func:`lr_factor`, :func:`resolve_lr_rule`),
  applied everywhere torch keeps it (:func:`scale_lr`), optionally ramped in (:class:`LrWarmup`);
* schedule lengths counted in optimizer steps, which change meaning when the steps per epoch
  change (:func:`rescale_schedule_length`);
* nothing at all, when the user accumulates gradients and the effective batch can be kept
  fixed instead (:func:`accumulation_plan`).

Only torch's built-in schedulers are handled, each by its exact class: a subclass or a user
scheduler may keep learning rates or step counts anywhere, so it is refused with
:class:`~loadertune.errors.SchedulerNotScalableError` rather than approximated.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator
from fractions import Fraction
from numbers import Real
from typing import Any, Literal

from torch import Tensor
from torch.optim import Optimizer
from torch.optim import lr_scheduler as _ls

from loadertune.errors import SchedulerNotScalableError

__all__ = [
    "LR_RULES",
    "LrRule",
    "LrWarmup",
    "accumulation_plan",
    "lr_factor",
    "rescale_schedule_length",
    "resolve_lr_rule",
    "scale_lr",
]

#: How the learning rate follows the batch size: ``"auto"`` picks by optimizer class.
LrRule = Literal["auto", "linear", "sqrt", "none"]

#: The accepted values of :data:`LrRule`, in order.
LR_RULES: tuple[LrRule, ...] = ("auto", "linear", "sqrt", "none")

# Optimizer families, by lower-cased class name anywhere in the MRO, so subclasses and
# same-named optimizers from other libraries (apex, bitsandbytes, timm, transformers) match.
_LINEAR_FAMILY = frozenset({"sgd", "asgd", "sgdw", "lars"})
_SQRT_FAMILY = frozenset(
    {
        "adam",
        "adamw",
        "adamax",
        "nadam",
        "radam",
        "adagrad",
        "adadelta",
        "rmsprop",
        "adafactor",
        "sparseadam",
        "lamb",
        "fusedadam",
        "fusedlamb",
        "adam8bit",
        "adamw8bit",
        "pagedadam",
        "pagedadamw",
        "pagedadamw8bit",
    }
)
_NO_RULE_REASONS = {
    "lbfgs": "LBFGS takes curvature-informed steps meant for full batches",
    "rprop": "Rprop sets its step sizes from gradient signs, meant for full batches",
    "muon": "Muon orthogonalizes its updates, so their size does not follow the gradient noise",
}

# Where each built-in scheduler keeps learning-rate values of its own (besides ``base_lrs`` and
# ``_last_lr``, scaled wherever present). ReduceLROnPlateau's ``eps`` is an absolute LR
# difference below which a reduction is skipped, so it scales too or a scaled run would stop
# reducing at a different point.
_LR_ATTRS: dict[type, tuple[str, ...]] = {
    _ls.LambdaLR: (),
    _ls.MultiplicativeLR: (),
    _ls.StepLR: (),
    _ls.MultiStepLR: (),
    _ls.ConstantLR: (),
    _ls.LinearLR: (),
    _ls.ExponentialLR: (),
    _ls.PolynomialLR: (),
    _ls.CosineAnnealingLR: ("eta_min",),
    _ls.CosineAnnealingWarmRestarts: ("eta_min",),
    _ls.OneCycleLR: (),
    _ls.CyclicLR: ("max_lrs",),
    _ls.SequentialLR: (),
    _ls.ChainedScheduler: (),
    _ls.ReduceLROnPlateau: ("min_lrs", "default_min_lr", "eps"),
}
_CONTAINERS = (_ls.SequentialLR, _ls.ChainedScheduler)

_LENGTH_REFUSALS: dict[type, str] = {
    _ls.LambdaLR: "its lr_lambda is your function of the step count; rebuild it with a lambda "
    "of samples seen (e.g. lambda step: f(step * batch_size))",
    _ls.MultiplicativeLR: "its lr_lambda is your function of the step count; rebuild it with a "
    "lambda of samples seen",
    _ls.ReduceLROnPlateau: "it counts patience and cooldown in calls to step(metrics), not "
    "optimizer steps; stepped once per epoch or evaluation it needs no rescaling, otherwise "
    "adjust its patience and cooldown yourself",
}


def scale_lr(optimizer: Optimizer, factor: float, scheduler: Any = None) -> None:
    """Multiplies the learning rate by ``factor`` everywhere it lives.

    Afterwards every learning rate the schedule produces equals ``factor`` times what the same
    schedule, built with the original learning rates, would have produced at the same step. Scaled
    are every param group's ``lr`` and ``initial_lr``; OneCycleLR's ``max_lr`` and ``min_lr`` in the
    groups; and in the scheduler (children of SequentialLR and ChainedScheduler included)
    ``base_lrs``, ``_last_lr``, ``eta_min``, CyclicLR's ``max_lrs`` and ReduceLROnPlateau's
    ``min_lrs``, ``default_min_lr`` and ``eps``. All of these are in the optimizer's and the
    scheduler's ``state_dict``, so the scaled schedule survives a checkpoint.

    Args:
        optimizer: The optimizer whose learning rates change.
        factor: The multiplier, finite and > 0.
        scheduler: The scheduler driving ``optimizer``, or None when there is none (or you
            rescale it yourself).

    Raises:
        ValueError: ``factor`` is not a finite number > 0, or ``scheduler`` drives another
            optimizer.
        SchedulerNotScalableError: ``scheduler`` is, or contains, a scheduler that is not one of
            torch's built-in classes. Nothing has been changed.
    """
    factor = _check_positive(factor, "factor")
    nodes = _check_tree(scheduler, optimizer, _check_lr_scalable)
    keys = ("lr", "initial_lr")
    if any(type(node) is _ls.OneCycleLR for node in nodes):
        keys += ("max_lr", "min_lr")
    for group in optimizer.param_groups:
        for key in keys:
            if key in group:
                _scale_group_value(group, key, factor)
    for node in nodes:
        for attr in ("base_lrs", "_last_lr", *_LR_ATTRS[type(node)]):
            value = getattr(node, attr, None)
            if isinstance(value, list):
                # A new list: an earlier state_dict() shares the old one and must not change.
                setattr(node, attr, [v * factor for v in value])
            elif value is not None:
                setattr(node, attr, value * factor)


def lr_factor(old_batch_size: int, new_batch_size: int, rule: str) -> float:
    """Returns the learning-rate multiplier for a batch-size change under a rule.

    Args:
        old_batch_size: The batch size the current learning rate was tuned for, >= 1.
        new_batch_size: The batch size about to be used, >= 1.
        rule: ``"linear"`` (new/old, SGD family; Goyal et al. 2017), ``"sqrt"`` (sqrt(new/old),
            Adam family; Malladi et al. 2022) or ``"none"`` (1.0). Resolve ``"auto"`` first with
            :func:`resolve_lr_rule`.

    Returns:
        The factor to pass to :func:`scale_lr` or :class:`LrWarmup`.

    Raises:
        ValueError: A batch size is not an int >= 1, or the rule is unknown or ``"auto"``.
    """
    for name, value in (("old_batch_size", old_batch_size), ("new_batch_size", new_batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if rule == "auto":
        raise ValueError(
            "lr_factor needs a concrete rule, got 'auto'; "
            "resolve it first with resolve_lr_rule('auto', optimizer)"
        )
    _check_rule(rule)
    ratio = new_batch_size / old_batch_size
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    return 1.0


def resolve_lr_rule(rule: str, optimizer: Any) -> tuple[str, str]:
    """Turns a rule, possibly ``"auto"``, into a concrete rule and the reason for it.

    ``"auto"`` chooses by the optimizer's class (or any base class, by name): SGD, ASGD, SGDW and
    LARS take ``"linear"``; Adam, AdamW, Adamax, NAdam, RAdam, Adagrad, Adadelta, RMSprop,
    Adafactor, SparseAdam, LAMB and their fused or 8-bit variants take ``"sqrt"``; LBFGS, Rprop,
    Muon and any optimizer not listed take ``"none"``. An unknown optimizer keeps its learning
    rate because the two mistakes are not alike: a learning rate raised too far can diverge a run
    for good, one left too low only gives back part of the speed-up of the larger batch.

    Args:
        rule: One of :data:`LR_RULES`.
        optimizer: The optimizer (only its class is read); may be None unless ``rule`` is
            ``"auto"``.

    Returns:
        ``(rule, reason)``: a rule other than ``"auto"`` and one sentence saying why it applies.

    Raises:
        ValueError: The rule is unknown, or ``"auto"`` without an optimizer.
    """
    _check_rule(rule)
    if rule != "auto":
        return rule, f"the {rule!r} rule was requested explicitly."
    if optimizer is None:
        raise ValueError("rule 'auto' chooses by optimizer class, but optimizer is None")
    name = type(optimizer).__name__
    for cls in type(optimizer).__mro__:
        key = cls.__name__.lower()
        via = "" if cls is type(optimizer) else f" (a subclass of {cls.__name__})"
        if key in _LINEAR_FAMILY:
            return "linear", (
                f"{name}{via} is in the SGD family: linear rule, learning rate proportional to "
                "batch size (Goyal et al. 2017)."
            )
        if key in _SQRT_FAMILY:
            return "sqrt", (
                f"{name}{via} is an adaptive (Adam-family) optimizer: square-root rule, learning "
                "rate proportional to the square root of batch size (Malladi et al. 2022)."
            )
        if key in _NO_RULE_REASONS:
            return "none", (
                f"{name}{via}: learning rate left unchanged, {_NO_RULE_REASONS[key]}; pass rule "
                "'linear' or 'sqrt' to scale it anyway."
            )
    return "none", (
        f"{name} is not an optimizer loadertune knows: learning rate left unchanged, since too "
        "high a rate can diverge the run; pass rule 'linear' (SGD-like) or 'sqrt' (adaptive) to "
        "scale it."
    )


def accumulation_plan(
    micro_batch: int, accumulation_steps: int, factor: float
) -> tuple[int, int] | None:
    """Grows the micro-batch by ``factor`` and shrinks gradient accumulation to match.

    The effective batch ``micro_batch * accumulation_steps`` stays the same, so the learning rate
    need not change.

    Args:
        micro_batch: Samples per forward/backward pass, >= 1.
        accumulation_steps: Micro-batches per optimizer step, >= 1.
        factor: Multiplier of the micro-batch, finite and > 0 (e.g. 2, or 0.5 to shrink it).

    Returns:
        ``(new_micro_batch, new_accumulation_steps)``, or None when either would not be a whole
        number >= 1 (e.g. 3 accumulation steps cannot be halved).

    Raises:
        ValueError: An argument is out of range.
    """
    for name, value in (("micro_batch", micro_batch), ("accumulation_steps", accumulation_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    # Exact arithmetic: 0.1 * 30 must not pass for 3 by a rounding accident, nor fail by one.
    checked = _check_positive(factor, "factor")
    exact = factor if isinstance(factor, Fraction) else Fraction(checked)
    new_micro = micro_batch * exact
    new_steps = accumulation_steps / exact
    if new_micro.denominator != 1 or new_steps.denominator != 1 or new_steps < 1:
        return None
    return int(new_micro), int(new_steps)


class LrWarmup:
    """Scales the learning rate by ``factor`` and ramps into it over the next optimizer steps.

    Goyal et al. (2017) raise the learning rate gradually after a batch-size increase. On
    construction this calls :func:`scale_lr` (so the schedule and every checkpoint hold the new
    learning rates), then, through optimizer step hooks, each of the next ``steps`` calls of
    ``optimizer.step()`` runs at ``lr * m`` with ``m`` going linearly from ``1 / factor`` (the old
    learning rate) towards 1; from step ``steps`` on the rates are exactly ``factor`` times the
    original schedule. Between optimizer steps the param groups hold the unramped rates, so the
    scheduler steps as if the warmup did not exist: call ``scheduler.step()`` as before, in any
    order relative to this class, which needs no calls at all and detaches itself when done.

    Steps skipped by ``GradScaler`` never reach ``optimizer.step()`` and do not count. Logging
    ``group["lr"]`` between steps shows the target rate; the rate applied is that times
    :attr:`multiplier`. If ``optimizer.step()`` raises mid-ramp, the ramped rate stays in the
    groups until the next step (which puts it right), so step the scheduler only after a
    successful optimizer step. torch forbids a hook to unregister itself while hooks run, so a
    ramp that ends by itself leaves one inert post-hook behind; :meth:`remove` drops it.

    Attributes:
        factor: The learning-rate multiplier being ramped in.
        steps: Optimizer steps the ramp lasts.
    """

    def __init__(
        self, optimizer: Optimizer, factor: float, steps: int, scheduler: Any = None
    ) -> None:
        """Scales the learning rates and starts the ramp.

        Args:
            optimizer: The optimizer to warm up.
            factor: The learning-rate multiplier, finite and > 0.
            steps: Optimizer steps the ramp lasts, >= 0 (0 applies ``factor`` at once).
            scheduler: The scheduler driving ``optimizer``, as for :func:`scale_lr`.

        Raises:
            ValueError: ``factor`` or ``steps`` is out of range.
            SchedulerNotScalableError: As for :func:`scale_lr`; nothing has been changed.
        """
        factor = _check_positive(factor, "factor")
        _check_steps(steps, "steps")
        scale_lr(optimizer, factor, scheduler)
        self._attach(optimizer, factor, steps, 0)

    @classmethod
    def from_state_dict(cls, optimizer: Optimizer, state: dict[str, Any]) -> LrWarmup:
        """Resumes a warmup from :meth:`state_dict` without scaling the learning rates again.

        Load the optimizer's and scheduler's own state first: they already hold the scaled rates.

        Args:
            optimizer: The optimizer, with its checkpointed state loaded.
            state: What :meth:`state_dict` returned.

        Returns:
            The warmup, continuing where the saved one was.

        Raises:
            ValueError: ``state`` is malformed.
        """
        try:
            factor, steps, done = state["factor"], state["steps"], state["steps_done"]
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"not an LrWarmup state (want keys factor, steps, steps_done): {state!r}"
            ) from exc
        factor = _check_positive(factor, "factor")
        _check_steps(steps, "steps")
        _check_steps(done, "steps_done")
        warmup = cls.__new__(cls)
        warmup._attach(optimizer, factor, steps, min(done, steps))
        return warmup

    def _attach(self, optimizer: Optimizer, factor: float, steps: int, done: int) -> None:
        self._optimizer = optimizer
        self.factor = factor
        self.steps = steps
        self._done = done
        self._finished = done >= steps
        self._saved: list[tuple[dict[str, Any], Any]] | None = None
        self._pre_handle: Any = None
        self._post_handle: Any = None
        if not self._finished:
            self._pre_handle = optimizer.register_step_pre_hook(self._before_step)
            self._post_handle = optimizer.register_step_post_hook(self._after_step)

    @property
    def steps_done(self) -> int:
        """Optimizer steps taken since the warmup began (at most ``steps``)."""
        return self._done

    @property
    def done(self) -> bool:
        """Whether the ramp is over (or was stopped with :meth:`remove`)."""
        return self._finished

    @property
    def multiplier(self) -> float:
        """What the next optimizer step multiplies the param groups' ``lr`` by (1.0 when done)."""
        if self._finished:
            return 1.0
        return (1.0 + (self.factor - 1.0) * self._done / self.steps) / self.factor

    def state_dict(self) -> dict[str, Any]:
        """Returns the warmup's progress, to save beside the optimizer's and scheduler's state."""
        return {"factor": self.factor, "steps": self.steps, "steps_done": self._done}

    def remove(self) -> None:
        """Ends the ramp now and detaches from the optimizer; later steps use the full rate.

        Call it between optimizer steps, not from inside an optimizer hook.
        """
        self._restore()
        self._finished = True
        for handle in (self._pre_handle, self._post_handle):
            if handle is not None:
                handle.remove()
        self._pre_handle = self._post_handle = None

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._finished:
            return
        # A step that raised never ran the post-hook; undo its ramp before stacking another.
        self._restore()
        multiplier = self.multiplier
        self._saved = []
        for group in optimizer.param_groups:
            lr = group["lr"]
            self._saved.append((group, lr.clone() if isinstance(lr, Tensor) else lr))
            _set_group_value(group, "lr", lr * multiplier)

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._finished:
            return
        self._restore()
        self._done += 1
        if self._done >= self.steps:
            self._finished = True
            # torch is iterating over the post-hooks right now, so removing this one would raise
            # "dictionary changed size during iteration": it stays behind as a no-op.
            self._pre_handle.remove()
            self._pre_handle = None

    def _restore(self) -> None:
        # Put back the exact values saved, not lr / multiplier, so the schedule stays bit-exact.
        if self._saved is not None:
            for group, lr in self._saved:
                _set_group_value(group, "lr", lr)
            self._saved = None


def rescale_schedule_length(scheduler: Any, ratio: float) -> None:
    """Keeps a per-step schedule's length in samples when the steps per epoch change.

    ``ratio`` is new steps per epoch / old steps per epoch, i.e. old batch size / new batch size
    (doubling the batch gives 0.5). Every length counted in steps is multiplied by ``ratio`` and
    rounded to a whole step (never below 1), and so is the position ``last_epoch``: StepLR
    ``step_size``; MultiStepLR ``milestones``; ConstantLR, LinearLR and PolynomialLR
    ``total_iters``; CosineAnnealingLR ``T_max``; CosineAnnealingWarmRestarts ``T_0``, ``T_i``,
    ``T_cur``; OneCycleLR ``total_steps`` and its phase ends (as if built with the new
    total_steps); CyclicLR's step sizes; SequentialLR ``milestones``, with its children. Decays per
    step become ``gamma ** (1 / ratio)`` (ExponentialLR, CyclicLR ``exp_range``), which is exact.

    Rounding never moves an event across the current position: milestones, decays and ends
    already passed stay passed and pending ones stay pending. The chainable (recursive) schedulers
    that compute the next LR from the current one get their current LR moved onto the rescaled
    curve, or the rounding error would persist forever (LinearLR would stop short of its end
    factor). The rest is exact when lengths and position are multiples of ``1 / ratio`` (except
    OneCycleLR: torch ends its phases at ``pct_start * total_steps - 1``, so they do not scale in
    proportion), and otherwise off by the rounding; periodic lengths (StepLR, CyclicLR, CosineAnnealingWarmRestarts)
    repeat their rounding error every period. A scheduler stepped once per epoch needs none of
    this: do not call it.

    Args:
        scheduler: A built-in scheduler stepped once per optimizer step.
        ratio: New steps per epoch / old steps per epoch, finite and > 0.

    Raises:
        ValueError: ``ratio`` is not a finite number > 0.
        SchedulerNotScalableError: ``scheduler`` is, or contains, LambdaLR, MultiplicativeLR,
            ReduceLROnPlateau, CyclicLR with a custom ``scale_fn`` in ``"iterations"`` mode, or a
            scheduler that is not one of torch's built-in classes. Nothing has been changed.
    """
    ratio = _check_positive(ratio, "ratio")
    if scheduler is None:
        raise ValueError("scheduler is None; there is no schedule length to rescale")
    nodes = _check_tree(scheduler, getattr(scheduler, "optimizer", None), _check_length_scalable)
    if ratio == 1.0:
        return
    # ChainedScheduler has no position of its own; its children get theirs from their own.
    _rescale_length(scheduler, ratio, _position(getattr(scheduler, "last_epoch", 0), ratio))
    for node in nodes:
        if hasattr(node, "_last_lr"):
            node._last_lr = [
                lr.clone() if isinstance(lr, Tensor) else lr
                for lr in (group["lr"] for group in node.optimizer.param_groups)
            ]


def _rescale_length(sched: Any, ratio: float, pos: int | None) -> None:
    # pos is the new position of a scheduler whose position matters, None for a SequentialLR
    # child that is not running (its lengths change, its position is reset when it starts).
    kind = type(sched)
    old = sched.last_epoch if hasattr(sched, "last_epoch") else None
    if kind is _ls.StepLR:
        old_size, new_size = sched.step_size, _length(sched.step_size, ratio)
        sched.step_size = new_size
        if pos is not None:
            decays = old // old_size
            sched.last_epoch = min(max(pos, decays * new_size), (decays + 1) * new_size - 1)
    elif kind is _ls.MultiStepLR:
        milestones: Counter[int] = Counter()
        for milestone, count in sched.milestones.items():
            new = _length(milestone, ratio)
            if pos is not None:
                new = min(new, pos) if milestone <= old else max(new, pos + 1)
            milestones[new] += count
        sched.milestones = milestones
        if pos is not None:
            sched.last_epoch = pos
    elif kind is _ls.ConstantLR:
        old_total, new_total = sched.total_iters, _length(sched.total_iters, ratio)
        sched.total_iters = new_total
        if pos is not None:
            finished = old >= old_total
            sched.last_epoch = max(pos, new_total) if finished else min(pos, new_total - 1)
    elif kind is _ls.LinearLR:
        old_total, new_total = sched.total_iters, _length(sched.total_iters, ratio)
        sched.total_iters = new_total
        if pos is not None:
            pos = max(pos, new_total) if old >= old_total else pos
            start, end = sched.start_factor, sched.end_factor

            def linear(t: int, total: int) -> float:
                return start + (end - start) * min(t, total) / total if total > 0 else start

            _move_onto_curve(sched, linear(old, old_total), linear(pos, new_total), 0.0)
            sched.last_epoch = pos
    elif kind is _ls.PolynomialLR:
        old_total, new_total = sched.total_iters, _length(sched.total_iters, ratio)
        sched.total_iters = new_total
        if pos is not None:
            pos = max(pos, new_total) if old >= old_total else min(pos, new_total - 1)
            power = sched.power

            def poly(t: int, total: int) -> float:
                return (1.0 - min(t, total) / total) ** power

            _move_onto_curve(sched, poly(old, old_total), poly(pos, new_total), 0.0)
            sched.last_epoch = pos
    elif kind is _ls.CosineAnnealingLR:
        old_t, new_t = sched.T_max, _length(sched.T_max, ratio)
        sched.T_max = new_t
        if pos is not None:
            if old % (2 * old_t) == old_t:
                # At the bottom (lr == eta_min) the shape is 0 and no ratio can carry the LR
                # over: go to the same bottom of the new curve, where the LR is eta_min too.
                pos = old // (2 * old_t) * 2 * new_t + new_t
            else:

                def cosine(t: int, period: int) -> float:
                    return (1.0 + math.cos(math.pi * t / period)) / 2.0

                _move_onto_curve(sched, cosine(old, old_t), cosine(pos, new_t), sched.eta_min)
            sched.last_epoch = pos
    elif kind is _ls.CosineAnnealingWarmRestarts:
        sched.T_0 = _length(sched.T_0, ratio)
        sched.T_i = _length(sched.T_i, ratio)
        if pos is not None:
            sched.T_cur = min(_position(sched.T_cur, ratio), sched.T_i - 1)
            sched.last_epoch = pos
    elif kind is _ls.ExponentialLR:
        # No curve to land on: the LR keeps gamma ** samples exactly, only the counter rounds.
        sched.gamma = sched.gamma ** (1.0 / ratio)
        if pos is not None:
            sched.last_epoch = pos
    elif kind is _ls.OneCycleLR:
        old_total, new_total = sched.total_steps, _length(sched.total_steps, ratio)
        sched.total_steps = new_total
        phases = [dict(phase) for phase in sched._schedule_phases]
        # torch ends phase i (all but the last) at (i + 1) * pct_start * total_steps - (i + 1).
        for i, phase in enumerate(phases[:-1]):
            phase["end_step"] = (phase["end_step"] + i + 1) * new_total / old_total - (i + 1)
        phases[-1]["end_step"] = new_total - 1
        sched._schedule_phases = phases
        if pos is not None:
            sched.last_epoch = min(pos, new_total)
    elif kind is _ls.CyclicLR:
        up = sched.total_size * sched.step_ratio
        new_up = float(_length(up, ratio))
        new_down = float(_length(sched.total_size - up, ratio))
        sched.total_size = new_up + new_down
        sched.step_ratio = new_up / sched.total_size
        if sched._scale_fn_custom is None and sched.mode == "exp_range":
            sched.gamma = sched.gamma ** (1.0 / ratio)
            sched._init_scale_fn()
        if pos is not None:
            sched.last_epoch = pos
    elif kind is _ls.SequentialLR:
        old_milestones = list(sched._milestones)
        milestones = []
        for milestone in old_milestones:
            new = _length(milestone, ratio)
            if pos is not None:
                new = min(new, pos) if milestone <= old else max(new, pos + 1)
            milestones.append(new)
        running = bisect_right(old_milestones, old) if pos is not None else -1
        for i, child in enumerate(sched._schedulers):
            child_pos = None
            if i == running:
                child_pos = pos - (milestones[i - 1] if i > 0 else 0)
            _rescale_length(child, ratio, child_pos)
        sched._milestones = milestones
        if pos is not None:
            sched.last_epoch = pos
    elif kind is _ls.ChainedScheduler:
        for child in sched._schedulers:
            _rescale_length(
                child, ratio, None if pos is None else _position(child.last_epoch, ratio)
            )


def _move_onto_curve(sched: Any, shape_old: float, shape_new: float, floor: float) -> None:
    # lr = floor + (lr - floor) * new/old keeps chained multiplicative factors intact, where
    # resetting to the closed form would drop the other schedulers' share of the LR.
    if shape_old == 0.0 or shape_old == shape_new:
        return
    scale = shape_new / shape_old
    for group in sched.optimizer.param_groups:
        _set_group_value(group, "lr", floor + (group["lr"] - floor) * scale)


def _check_tree(scheduler: Any, optimizer: Any, check: Callable[[Any], None]) -> list[Any]:
    # Every check runs before any change, so a refusal leaves optimizer and scheduler as they were.
    if scheduler is None:
        return []
    nodes = list(_walk(scheduler))
    for node in nodes:
        check(node)
        if getattr(node, "optimizer", None) is not optimizer:
            raise ValueError(
                f"{type(node).__name__} drives a different optimizer than the one given; "
                "pass the scheduler that belongs to this optimizer"
            )
    return nodes


def _walk(scheduler: Any) -> Iterator[Any]:
    seen: set[int] = set()
    stack = [scheduler]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if type(node) in _CONTAINERS:
            stack.extend(reversed(node._schedulers))


def _check_lr_scalable(node: Any) -> None:
    if type(node) not in _LR_ATTRS:
        raise SchedulerNotScalableError(
            f"cannot rescale the learning rate of {_describe(node)} exactly: loadertune knows "
            "where torch's built-in schedulers keep learning rates, not where this one does. "
            "Pass scheduler=None and rescale that scheduler's learning rates yourself, or use a "
            "built-in scheduler (e.g. LambdaLR for a custom shape)."
        )


def _check_length_scalable(node: Any) -> None:
    kind = type(node)
    if kind in _LENGTH_REFUSALS:
        raise SchedulerNotScalableError(
            f"cannot rescale the length of {kind.__name__}: {_LENGTH_REFUSALS[kind]}."
        )
    if kind not in _LR_ATTRS:
        raise SchedulerNotScalableError(
            f"cannot rescale the length of {_describe(node)}: loadertune only knows the step "
            "counts of torch's built-in schedulers. Rebuild it for the new steps per epoch "
            "yourself, or use a built-in scheduler."
        )
    if kind is _ls.CyclicLR and node._scale_fn_custom is not None and node.scale_mode != "cycle":
        raise SchedulerNotScalableError(
            "cannot rescale the length of CyclicLR with a custom scale_fn in 'iterations' mode: "
            "the function takes the step count; use scale_mode='cycle' or rebuild it yourself."
        )


def _describe(node: Any) -> str:
    kind = type(node)
    builtin = next((base for base in kind.__mro__[1:] if base in _LR_ATTRS), None)
    if builtin is not None:
        return f"{kind.__qualname__} (a subclass of {builtin.__name__}, which may override it)"
    return kind.__qualname__


def _scale_group_value(group: dict[str, Any], key: str, factor: float) -> None:
    value = group[key]
    if isinstance(value, Tensor):
        # In place: fused and capturable optimizers may hold this very tensor.
        value.mul_(factor)
    else:
        group[key] = value * factor


def _set_group_value(group: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(group[key], Tensor):
        group[key].fill_(float(value))
    else:
        group[key] = value


def _length(steps: float, ratio: float) -> int:
    # Half-up rounding, not Python's half-even, so 2.5 and 3.5 steps both round the same way.
    if steps <= 0:
        return 0
    return max(1, math.floor(steps * ratio + 0.5))


def _position(steps: int, ratio: float) -> int:
    if steps < 0:
        return steps
    return math.floor(steps * ratio + 0.5)


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_steps(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _check_rule(rule: Any) -> None:
    if rule not in LR_RULES:
        raise ValueError(f"unknown lr rule {rule!r}; choose one of {', '.join(LR_RULES)}")
