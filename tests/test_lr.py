"""Tests for loadertune.lr: exact LR rescaling, rules, warmup, schedule lengths, accumulation."""

from __future__ import annotations

import copy
import functools
import itertools
import math
import typing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as ls

from loadertune import lr as lr_module
from loadertune.errors import SchedulerNotScalableError
from loadertune.lr import (
    LR_RULES,
    LrRule,
    LrWarmup,
    accumulation_plan,
    lr_factor,
    rescale_schedule_length,
    resolve_lr_rule,
    scale_lr,
)

LR0 = (0.1, 0.03)
STEPS = 20
FACTORS = (0.5, 2.0, 4.0, 1.7)
# Scaling points: at construction, right after, mid-warmup/mid-cycle, and after restarts,
# milestones and the end of CosineAnnealingLR's T_max.
SCALE_STEPS = (0, 1, 3, 6, 11, 17)
PLATEAU_METRICS = [1.0, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.5, 0.5, 0.6, 0.6] + [0.6] * 20


def _sgd(k: float = 1.0, lrs: tuple[float, ...] = LR0) -> torch.optim.SGD:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr * k} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0] * k, momentum=0.9)


def _with(make: typing.Callable[..., typing.Any], lrs: tuple[float, ...] = LR0):
    """A builder: k scales every LR-valued argument, as if the schedule were built with LR × k."""

    def build(k: float = 1.0):
        opt = _sgd(k, lrs)
        return opt, make(opt, k)

    return build


BUILDERS = {
    "StepLR": _with(lambda o, k: ls.StepLR(o, step_size=3, gamma=0.5)),
    "MultiStepLR": _with(lambda o, k: ls.MultiStepLR(o, [2, 5, 5, 9], gamma=0.3)),
    "ExponentialLR": _with(lambda o, k: ls.ExponentialLR(o, 0.85)),
    # 1/t decay alpha0 / (1 + k t), with alpha0 as the optimizer's LR ...
    "LambdaLR": _with(lambda o, k: ls.LambdaLR(o, lambda t: 1.0 / (1.0 + 0.5 * t))),
    # ... and with alpha0 inside the lambda and LR 1 (scaling the LR still scales it all).
    "LambdaLR_alpha": _with(
        lambda o, k: ls.LambdaLR(o, lambda t: 0.2 / (1.0 + 0.3 * t)), lrs=(1.0, 0.5)
    ),
    "MultiplicativeLR": _with(lambda o, k: ls.MultiplicativeLR(o, lambda t: 0.9)),
    # Runs past T_max into torch's rising branch, a recursive form relative to eta_min.
    "CosineAnnealingLR": _with(lambda o, k: ls.CosineAnnealingLR(o, T_max=7, eta_min=0.002 * k)),
    "CosineAnnealingWarmRestarts": _with(
        lambda o, k: ls.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2, eta_min=0.001 * k)
    ),
    "LinearLR": _with(lambda o, k: ls.LinearLR(o, start_factor=0.25, total_iters=5)),
    "LinearLR_to_zero": _with(
        lambda o, k: ls.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=6)
    ),
    "ConstantLR": _with(lambda o, k: ls.ConstantLR(o, factor=0.5, total_iters=4)),
    "PolynomialLR": _with(lambda o, k: ls.PolynomialLR(o, total_iters=8, power=2.0)),
    "OneCycleLR": _with(lambda o, k: ls.OneCycleLR(o, max_lr=[1.0 * k, 0.4 * k], total_steps=20)),
    "OneCycleLR_three_phase": _with(
        lambda o, k: ls.OneCycleLR(
            o, max_lr=[1.0 * k, 0.4 * k], total_steps=20, three_phase=True, anneal_strategy="linear"
        )
    ),
    "CyclicLR_triangular2": _with(
        lambda o, k: ls.CyclicLR(
            o,
            base_lr=[0.01 * k, 0.005 * k],
            max_lr=[0.1 * k, 0.05 * k],
            step_size_up=3,
            step_size_down=2,
            mode="triangular2",
        )
    ),
    "CyclicLR_exp_range": _with(
        lambda o, k: ls.CyclicLR(
            o, base_lr=0.01 * k, max_lr=0.1 * k, step_size_up=4, mode="exp_range", gamma=0.9
        )
    ),
    "SequentialLR": _with(
        lambda o, k: ls.SequentialLR(
            o,
            [
                ls.LinearLR(o, start_factor=0.1, total_iters=4),
                ls.CosineAnnealingLR(o, T_max=10, eta_min=0.001 * k),
            ],
            milestones=[4],
        )
    ),
    "SequentialLR_three": _with(
        lambda o, k: ls.SequentialLR(
            o,
            [ls.ConstantLR(o, 0.3, total_iters=3), ls.ExponentialLR(o, 0.9), ls.StepLR(o, 2, 0.5)],
            milestones=[3, 8],
        )
    ),
    "ChainedScheduler": _with(
        lambda o, k: ls.ChainedScheduler(
            [ls.ConstantLR(o, factor=0.5, total_iters=3), ls.ExponentialLR(o, 0.9)]
        )
    ),
    "ChainedScheduler_cosine": _with(
        lambda o, k: ls.ChainedScheduler(
            [ls.LinearLR(o, 0.5, total_iters=4), ls.CosineAnnealingLR(o, 12, eta_min=0.001 * k)]
        )
    ),
    "ReduceLROnPlateau": _with(
        lambda o, k: ls.ReduceLROnPlateau(
            o, factor=0.5, patience=1, cooldown=1, min_lr=[0.01 * k, 0.004 * k], eps=0.004 * k
        )
    ),
    "ReduceLROnPlateau_scalar_min": _with(
        lambda o, k: ls.ReduceLROnPlateau(o, factor=0.3, patience=0, min_lr=0.005 * k, eps=1e-3 * k)
    ),
}


def _lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for group in opt.param_groups]


def _step(opt: torch.optim.Optimizer, sched: typing.Any, t: int) -> None:
    opt.step()
    if isinstance(sched, ls.ReduceLROnPlateau):
        sched.step(PLATEAU_METRICS[t])
    else:
        sched.step()


def _trajectory(name: str, k: float = 1.0, scales: dict[int, float] | None = None) -> list:
    """LRs after 0..STEPS scheduler steps; scales[t] = factor applied right after step t."""
    opt, sched = BUILDERS[name](k)
    out = []
    for t in range(STEPS + 1):
        if t > 0:
            _step(opt, sched, t)
        if scales and t in scales:
            scale_lr(opt, scales[t], sched)
            assert [float(v) for v in sched.get_last_lr()] == _lrs(opt)
        out.append(_lrs(opt))
    return out


def _assert_close(actual: list[float], expected: list[float], rel: float = 1e-9) -> None:
    assert actual == pytest.approx(expected, rel=rel, abs=1e-15)


# --- scale_lr ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_scaled_schedule_is_factor_times_the_original(name: str) -> None:
    # Factors and scaling steps loop inside: one test per scheduler keeps the file fast.
    original = _trajectory(name)
    for factor in FACTORS:
        # The reference (built with LR × f) checks that f × original is the right target.
        reference = _trajectory(name, k=factor)
        for t in range(STEPS + 1):
            _assert_close(reference[t], [factor * v for v in original[t]])
        for at in SCALE_STEPS:
            scaled = _trajectory(name, scales={at: factor})
            assert scaled[:at] == original[:at]
            for t in range(at, STEPS + 1):
                _assert_close(scaled[t], [factor * v for v in original[t]])


def test_plateau_scenario_reduces_and_hits_eps() -> None:
    # Guards the ReduceLROnPlateau cases above: several reductions, and the later ones refused
    # by min_lr/eps, so scaling eps and min_lrs is really exercised.
    lrs = [row[1] for row in _trajectory("ReduceLROnPlateau")]
    assert len(set(lrs)) >= 3
    assert min(lrs) > 0.004


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(BUILDERS)),
    f1=st.floats(0.01, 100.0),
    f2=st.floats(0.05, 20.0),
    at1=st.integers(0, STEPS),
    gap=st.integers(0, STEPS),
)
def test_scaling_twice_composes(name: str, f1: float, f2: float, at1: int, gap: int) -> None:
    at2 = min(STEPS, at1 + gap)
    original = _trajectory(name)
    scales = {at1: f1} if at1 == at2 else {at1: f1, at2: f2}
    total = f1 if at1 == at2 else f1 * f2
    scaled = _trajectory(name, scales=scales)
    for t in range(at2, STEPS + 1):
        _assert_close(scaled[t], [total * v for v in original[t]], rel=1e-8)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_scaled_state_survives_state_dict_round_trip(name: str) -> None:
    factor, at = 2.5, 5
    original = _trajectory(name)
    opt, sched = BUILDERS[name]()
    for t in range(1, at + 1):
        _step(opt, sched, t)
    scale_lr(opt, factor, sched)
    opt_state = copy.deepcopy(opt.state_dict())
    sched_state = copy.deepcopy(sched.state_dict())

    fresh_opt, fresh_sched = BUILDERS[name]()
    fresh_opt.load_state_dict(opt_state)
    fresh_sched.load_state_dict(sched_state)
    for t in range(at + 1, STEPS + 1):
        _step(opt, sched, t)
        _step(fresh_opt, fresh_sched, t)
        assert _lrs(fresh_opt) == _lrs(opt)
        _assert_close(_lrs(fresh_opt), [factor * v for v in original[t]])


def test_scale_lr_scales_every_place_it_lives() -> None:
    opt, sched = BUILDERS["OneCycleLR"]()
    scale_lr(opt, 2.0, sched)
    group = opt.param_groups[0]
    assert (group["initial_lr"], group["max_lr"]) == pytest.approx((0.08, 2.0))
    assert group["min_lr"] == pytest.approx(0.08 / 1e4)
    opt, sched = BUILDERS["CyclicLR_triangular2"]()
    scale_lr(opt, 2.0, sched)
    assert sched.max_lrs == pytest.approx([0.2, 0.1])
    assert sched.base_lrs == pytest.approx([0.02, 0.01])
    opt, sched = BUILDERS["ReduceLROnPlateau_scalar_min"]()
    scale_lr(opt, 2.0, sched)
    assert (sched.default_min_lr, sched.eps) == pytest.approx((0.01, 2e-3))
    assert sched.min_lrs == pytest.approx([0.01, 0.01])


def test_scale_lr_keeps_tensor_learning_rates_in_place() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=torch.tensor(0.1))
    sched = ls.StepLR(opt, step_size=2, gamma=0.5)
    lr_tensor = opt.param_groups[0]["lr"]
    scale_lr(opt, 3.0, sched)
    assert opt.param_groups[0]["lr"] is lr_tensor
    for _ in range(4):
        opt.step()
        sched.step()
    assert float(lr_tensor) == pytest.approx(0.3 * 0.25)


def test_scale_lr_without_scheduler_touches_only_lr_and_initial_lr() -> None:
    opt, _ = BUILDERS["OneCycleLR"]()
    before = copy.deepcopy(opt.param_groups[0])
    scale_lr(opt, 2.0)
    after = opt.param_groups[0]
    assert after["lr"] == pytest.approx(2 * before["lr"])
    assert after["initial_lr"] == pytest.approx(2 * before["initial_lr"])
    assert (after["max_lr"], after["min_lr"]) == (before["max_lr"], before["min_lr"])


class _MyStepLR(ls.StepLR):
    pass


class _UserScheduler(ls.LRScheduler):
    def get_lr(self) -> list[float]:
        return [base * 0.9**self.last_epoch for base in self.base_lrs]


def _snapshot(opt: torch.optim.Optimizer, sched: typing.Any) -> tuple:
    return copy.deepcopy(opt.state_dict()), repr(sched.state_dict())


@pytest.mark.parametrize(
    "make",
    [
        lambda o: _MyStepLR(o, 2),
        lambda o: _UserScheduler(o),
        lambda o: ls.SequentialLR(o, [ls.StepLR(o, 2), _UserScheduler(o)], milestones=[3]),
        lambda o: ls.ChainedScheduler([ls.ExponentialLR(o, 0.9), _MyStepLR(o, 2)]),
    ],
    ids=["subclass", "user", "inside-SequentialLR", "inside-ChainedScheduler"],
)
def test_unknown_scheduler_is_refused_and_nothing_changes(make) -> None:
    opt = _sgd()
    sched = make(opt)
    before = _snapshot(opt, sched)
    with pytest.raises(SchedulerNotScalableError, match="scheduler=None") as info:
        scale_lr(opt, 2.0, sched)
    assert isinstance(info.value, ValueError)
    assert "_MyStepLR" in str(info.value) or "_UserScheduler" in str(info.value)
    assert _snapshot(opt, sched) == before
    with pytest.raises(SchedulerNotScalableError):
        LrWarmup(opt, 2.0, 5, sched)
    assert _snapshot(opt, sched) == before
    assert not opt._optimizer_step_pre_hooks


@pytest.mark.parametrize("factor", [0, -1.0, math.nan, math.inf, True, "2", None, [2.0]])
def test_scale_lr_rejects_bad_factor(factor) -> None:
    opt, sched = BUILDERS["StepLR"]()
    before = _snapshot(opt, sched)
    with pytest.raises(ValueError, match="factor must be a finite number > 0"):
        scale_lr(opt, factor, sched)
    assert _snapshot(opt, sched) == before


def test_scale_lr_rejects_scheduler_of_another_optimizer() -> None:
    opt, _ = BUILDERS["StepLR"]()
    _, other = BUILDERS["StepLR"]()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="different optimizer"):
        scale_lr(opt, 2.0, other)
    assert opt.state_dict() == before


# --- rules ---------------------------------------------------------------------------------


def test_lr_rules_tuple_matches_literal() -> None:
    assert typing.get_args(LrRule) == LR_RULES


def test_all_is_sorted_and_public() -> None:
    assert lr_module.__all__ == sorted(lr_module.__all__)
    assert all(hasattr(lr_module, name) for name in lr_module.__all__)


def test_lr_factor_rules() -> None:
    assert lr_factor(32, 128, "linear") == 4.0
    assert lr_factor(32, 128, "sqrt") == 2.0
    assert lr_factor(32, 128, "none") == 1.0
    assert lr_factor(128, 64, "linear") == 0.5
    assert lr_factor(64, 128, "sqrt") == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize(
    ("old", "new", "rule", "match"),
    [
        (32, 64, "auto", "resolve_lr_rule"),
        (32, 64, "cubic", "unknown lr rule"),
        (0, 64, "linear", "old_batch_size"),
        (32, 1.5, "linear", "new_batch_size"),
        (True, 64, "linear", "old_batch_size"),
    ],
)
def test_lr_factor_rejects_bad_input(old, new, rule, match) -> None:
    with pytest.raises(ValueError, match=match):
        lr_factor(old, new, rule)


class _MySGD(torch.optim.SGD):
    pass


class _HomeMadeOptimizer:
    pass


@pytest.mark.parametrize(
    ("cls", "rule"),
    [
        (torch.optim.SGD, "linear"),
        (torch.optim.ASGD, "linear"),
        (_MySGD, "linear"),
        (torch.optim.Adam, "sqrt"),
        (torch.optim.AdamW, "sqrt"),
        (torch.optim.Adamax, "sqrt"),
        (torch.optim.NAdam, "sqrt"),
        (torch.optim.RAdam, "sqrt"),
        (torch.optim.Adagrad, "sqrt"),
        (torch.optim.Adadelta, "sqrt"),
        (torch.optim.RMSprop, "sqrt"),
        (torch.optim.SparseAdam, "sqrt"),
        (torch.optim.LBFGS, "none"),
        (torch.optim.Rprop, "none"),
        (_HomeMadeOptimizer, "none"),
    ],
)
def test_auto_rule_by_optimizer_class(cls: type, rule: str) -> None:
    # Only the class is read, so an unconstructed instance will do.
    resolved, reason = resolve_lr_rule("auto", cls.__new__(cls))
    assert resolved == rule
    assert cls.__name__ in reason and reason.endswith(".")


@pytest.mark.parametrize(("name", "rule"), [("Adafactor", "sqrt"), ("Muon", "none")])
def test_auto_rule_for_newer_torch_optimizers(name: str, rule: str) -> None:
    cls = getattr(torch.optim, name, None)
    if cls is None:
        pytest.skip(f"torch {torch.__version__} has no torch.optim.{name}")
    assert resolve_lr_rule("auto", cls.__new__(cls))[0] == rule


def test_auto_rule_names_the_base_class_of_a_subclass() -> None:
    _, reason = resolve_lr_rule("auto", _MySGD.__new__(_MySGD))
    assert "subclass of SGD" in reason and "Goyal" in reason


def test_explicit_rule_needs_no_optimizer() -> None:
    assert resolve_lr_rule("sqrt", None)[0] == "sqrt"
    with pytest.raises(ValueError, match="optimizer is None"):
        resolve_lr_rule("auto", None)
    with pytest.raises(ValueError, match="unknown lr rule"):
        resolve_lr_rule("Linear", None)


# --- accumulation ---------------------------------------------------------------------------


def test_accumulation_plan() -> None:
    assert accumulation_plan(64, 4, 2) == (128, 2)
    assert accumulation_plan(64, 4, 4) == (256, 1)
    assert accumulation_plan(64, 3, 2) is None
    assert accumulation_plan(64, 4, 8) is None
    assert accumulation_plan(64, 2, 0.5) == (32, 4)
    assert accumulation_plan(10, 3, 1.5) == (15, 2)
    assert accumulation_plan(10, 4, 1.5) is None
    assert accumulation_plan(7, 2, 0.5) is None
    assert accumulation_plan(8, 3, 1) == (8, 3)


@pytest.mark.parametrize(
    "args", [(0, 4, 2), (64, 0, 2), (64, 4, 0), (64, 4, -2), (64, 4, math.nan), (2.0, 4, 2)]
)
def test_accumulation_plan_rejects_bad_input(args) -> None:
    with pytest.raises(ValueError):
        accumulation_plan(*args)


@settings(max_examples=50, deadline=None)
@given(
    micro=st.integers(1, 512),
    steps=st.integers(1, 64),
    factor=st.sampled_from([0.25, 0.5, 2, 3, 4]),
)
def test_accumulation_plan_keeps_effective_batch(micro: int, steps: int, factor: float) -> None:
    plan = accumulation_plan(micro, steps, factor)
    if plan is None:
        assert (micro * factor) % 1 or (steps / factor) % 1 or steps / factor < 1
    else:
        assert plan[0] * plan[1] == micro * steps
        assert plan[0] == micro * factor and plan[1] >= 1


# --- warmup --------------------------------------------------------------------------------

WARMUP_NAMES = (
    "CosineAnnealingLR",
    "OneCycleLR",
    "SequentialLR",
    "ExponentialLR",
    "ReduceLROnPlateau",
)


def _warmup_run(name: str, factor: float, steps: int, start: int) -> tuple[list, list]:
    """(LRs applied inside each optimizer step, LRs the scheduler sees between steps)."""
    opt, sched = BUILDERS[name]()
    applied: list[list[float]] = []
    between: list[list[float]] = []
    warmup = None
    for t in range(1, STEPS + 1):
        if t - 1 == start:
            warmup = LrWarmup(opt, factor, steps, sched)
            # Registered after the warmup's hook, so it sees the ramped LR.
            opt.register_step_pre_hook(lambda o, a, k: applied.append(_lrs(o)))
        if warmup is None:
            applied.append(_lrs(opt))
        _step(opt, sched, t)
        between.append(_lrs(opt))
    return applied, between


@pytest.mark.parametrize("name", WARMUP_NAMES)
@pytest.mark.parametrize(("factor", "steps", "start"), [(4.0, 5, 0), (2.0, 3, 6), (0.5, 4, 2)])
def test_warmup_ramps_from_old_to_new_then_matches_scaled(name, factor, steps, start) -> None:
    original = _trajectory(name)
    applied, between = _warmup_run(name, factor, steps, start)
    for t in range(STEPS):
        # Optimizer step t + 1 runs with the LR set after t scheduler steps.
        if t < start:
            expected = original[t]
        else:
            ramp = 1.0 + (factor - 1.0) * min(t - start, steps) / steps
            expected = [ramp * v for v in original[t]]
        _assert_close(applied[t], expected)
        if t + 1 > start:
            _assert_close(between[t], [factor * v for v in original[t + 1]])


def test_warmup_detaches_when_done_and_remove_stops_it_early() -> None:
    opt, sched = BUILDERS["CosineAnnealingLR"]()
    warmup = LrWarmup(opt, 2.0, 2, sched)
    assert warmup.multiplier == 0.5 and not warmup.done
    for _ in range(2):
        opt.step()
        sched.step()
    assert warmup.done and warmup.steps_done == 2 and warmup.multiplier == 1.0
    assert not opt._optimizer_step_pre_hooks
    warmup.remove()
    assert not opt._optimizer_step_post_hooks

    opt, sched = BUILDERS["StepLR"]()
    warmup = LrWarmup(opt, 4.0, 10, sched)
    opt.step()
    warmup.remove()
    assert warmup.done and not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert _lrs(opt) == pytest.approx([0.4, 0.12])


def test_warmup_of_zero_steps_scales_at_once() -> None:
    opt, sched = BUILDERS["StepLR"]()
    warmup = LrWarmup(opt, 3.0, 0, sched)
    assert warmup.done and not opt._optimizer_step_pre_hooks
    assert _lrs(opt) == pytest.approx([0.3, 0.09])


def test_warmup_recovers_after_a_step_that_raised() -> None:
    opt, sched = BUILDERS["ExponentialLR"]()
    warmup = LrWarmup(opt, 2.0, 4, sched)
    seen: list[list[float]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(_lrs(o)))

    def failing_closure() -> float:
        raise RuntimeError("loss exploded")

    with pytest.raises(RuntimeError, match="loss exploded"):
        opt.step(failing_closure)
    opt.step()
    assert seen[0] == seen[1] == pytest.approx([0.1, 0.03])
    assert warmup.steps_done == 1
    assert _lrs(opt) == pytest.approx([0.2, 0.06])


def test_warmup_resumes_from_a_checkpoint() -> None:
    name, factor, steps = "CosineAnnealingLR", 4.0, 6
    opt, sched = BUILDERS[name]()
    warmup = LrWarmup(opt, factor, steps, sched)
    for _ in range(3):
        opt.step()
        sched.step()
    states = copy.deepcopy((opt.state_dict(), sched.state_dict(), warmup.state_dict()))

    fresh_opt, fresh_sched = BUILDERS[name]()
    fresh_opt.load_state_dict(states[0])
    fresh_sched.load_state_dict(states[1])
    fresh = LrWarmup.from_state_dict(fresh_opt, states[2])
    assert fresh.steps_done == 3 and fresh.multiplier == warmup.multiplier
    runs = []
    for o, s in ((opt, sched), (fresh_opt, fresh_sched)):
        seen: list[list[float]] = []
        o.register_step_pre_hook(lambda o, a, k, seen=seen: seen.append(_lrs(o)))
        for _ in range(6):
            o.step()
            s.step()
        runs.append(seen)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("steps", [-1, True, 1.5, None])
def test_warmup_rejects_bad_steps(steps) -> None:
    opt, sched = BUILDERS["StepLR"]()
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        LrWarmup(opt, 2.0, steps, sched)
    assert _lrs(opt) == list(LR0)
    with pytest.raises(ValueError, match="not an LrWarmup state"):
        LrWarmup.from_state_dict(opt, {"factor": 2.0})


# --- schedule length -----------------------------------------------------------------------

OLD_STEPS = 32  # the switched run covers this many old-batch steps' worth of samples
REF_STEPS = 44
LENGTH_BUILDERS = {
    "StepLR": _with(lambda o, k: ls.StepLR(o, step_size=8, gamma=0.5)),
    "MultiStepLR": _with(lambda o, k: ls.MultiStepLR(o, [8, 16, 16, 28], gamma=0.5)),
    "ExponentialLR": _with(lambda o, k: ls.ExponentialLR(o, 0.95)),
    "ConstantLR": _with(lambda o, k: ls.ConstantLR(o, factor=0.5, total_iters=12)),
    "LinearLR": _with(lambda o, k: ls.LinearLR(o, start_factor=0.2, total_iters=16)),
    "PolynomialLR": _with(lambda o, k: ls.PolynomialLR(o, total_iters=24, power=2.0)),
    "CosineAnnealingLR": _with(lambda o, k: ls.CosineAnnealingLR(o, T_max=24, eta_min=0.001)),
    "CosineAnnealingWarmRestarts": _with(
        lambda o, k: ls.CosineAnnealingWarmRestarts(o, T_0=8, T_mult=2, eta_min=0.001)
    ),
    "CyclicLR": _with(
        lambda o, k: ls.CyclicLR(o, 0.01, 0.1, step_size_up=8, step_size_down=4, mode="triangular2")
    ),
    "CyclicLR_exp_range": _with(
        lambda o, k: ls.CyclicLR(o, 0.01, 0.1, step_size_up=4, mode="exp_range", gamma=0.97)
    ),
    "OneCycleLR": _with(lambda o, k: ls.OneCycleLR(o, max_lr=[1.0, 0.4], total_steps=REF_STEPS)),
    "SequentialLR": _with(
        lambda o, k: ls.SequentialLR(
            o,
            [ls.LinearLR(o, 0.1, total_iters=8), ls.CosineAnnealingLR(o, 24, eta_min=0.001)],
            milestones=[8],
        )
    ),
    "ChainedScheduler": _with(
        lambda o, k: ls.ChainedScheduler(
            [ls.ConstantLR(o, factor=0.5, total_iters=8), ls.ExponentialLR(o, 0.95)]
        )
    ),
}
# Repeating lengths carry their rounding error into every period: keep them divisible.
PERIODIC = {"StepLR", "CyclicLR", "CyclicLR_exp_range", "CosineAnnealingWarmRestarts"}


@functools.cache
def _reference(name: str) -> list[list[float]]:
    opt, sched = LENGTH_BUILDERS[name]()
    out = [_lrs(opt)]
    for _ in range(REF_STEPS):
        opt.step()
        sched.step()
        out.append(_lrs(opt))
    return out


def _switched(name: str, at: int, ratios: list[float]) -> list[tuple[float, list[float]]]:
    """(samples seen in old-batch steps, LRs) along a run whose batch changes at steps ``at``."""
    opt, sched = LENGTH_BUILDERS[name]()
    position, per_step, out = 0.0, 1.0, [(0.0, _lrs(opt))]
    switches = dict(zip(at, ratios, strict=True))
    step = 0
    while position + per_step <= OLD_STEPS + 1e-9:
        opt.step()
        sched.step()
        step += 1
        position += per_step
        if step in switches:
            rescale_schedule_length(sched, switches[step])
            per_step /= switches[step]
            assert [float(v) for v in sched.get_last_lr()] == _lrs(opt)
        out.append((position, _lrs(opt)))
    return out


@pytest.mark.parametrize("name", sorted(set(LENGTH_BUILDERS) - {"OneCycleLR"}))
def test_length_in_samples_is_kept_exactly_when_divisible(name: str) -> None:
    reference = _reference(name)
    for ratio in (0.5, 0.25, 2.0):
        for at in (4, 12, 20):
            for position, lrs in _switched(name, [at], [ratio]):
                if position == int(position):
                    _assert_close(lrs, reference[int(position)])


def test_length_rescaled_twice_in_a_row() -> None:
    reference = _reference("SequentialLR")
    for position, lrs in _switched("SequentialLR", [4, 8], [0.5, 0.5]):
        _assert_close(lrs, reference[int(position)])


def _assert_within_rounding(name: str, at: int, ratio: float, reference: list) -> None:
    # Rounding the position and each length to whole new steps moves things by about one new
    # step (1 / ratio old steps) each way.
    slack = math.ceil(2 / ratio) + 1
    for position, lrs in _switched(name, [at], [ratio]):
        if position != int(position):
            # Between two old steps the finer schedule may go beyond every sampled value (just
            # before a warm restart, say): only compare where the reference has a sample.
            continue
        lo = max(0, math.floor(position) - slack)
        hi = min(REF_STEPS, math.ceil(position) + slack)
        window = reference[lo : hi + 1]
        for group, lr in enumerate(lrs):
            values = [row[group] for row in window]
            # OneCycleLR peaks between two steps; a finer or shifted sampling may come closer to
            # the peak than any reference sample, by less than one step's change.
            tol = 1e-15
            if name == "OneCycleLR":
                tol += max(abs(b - a) for a, b in itertools.pairwise(values))
            assert min(values) * (1 - 1e-9) - tol <= lr <= max(values) * (1 + 1e-9) + tol, (
                position,
                lr,
                values,
            )


def _ratios(name: str) -> list[float]:
    return [0.5, 0.25, 2.0, 4.0] if name in PERIODIC else [0.5, 0.25, 2.0, 4.0, 1 / 3, 0.4]


@settings(max_examples=50, deadline=None)
@given(
    # A chain multiplies independently rounded schedules, and the product of two events each
    # moved by a step is not bracketed by nearby reference values; its exact case is above.
    name=st.sampled_from(sorted(set(LENGTH_BUILDERS) - {"ChainedScheduler"})),
    at=st.integers(1, 30),
    ratio_index=st.integers(0, 5),
)
def test_length_in_samples_is_kept_within_rounding(name: str, at: int, ratio_index: int) -> None:
    ratios = _ratios(name)
    _assert_within_rounding(name, at, ratios[ratio_index % len(ratios)], _reference(name))


@pytest.mark.parametrize("name", ["SequentialLR", "MultiStepLR", "ConstantLR"])
def test_events_are_neither_lost_nor_repeated_at_any_switch_point(name: str) -> None:
    # Every switch point, for the schedulers whose milestones must stay on their side
    # of the current position.
    reference = _reference(name)
    for at in range(1, OLD_STEPS):
        for ratio in (0.5, 0.25, 1 / 3, 2.0):
            _assert_within_rounding(name, at, ratio, reference)


# ExponentialLR is left out on purpose: it has no curve to land on, its LR keeps gamma ** samples
# exactly while its position is rounded.
CLOSED_FORM = (
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "PolynomialLR",
    "CosineAnnealingLR",
)


@settings(max_examples=50, deadline=None)
@given(
    name=st.sampled_from(CLOSED_FORM),
    at=st.integers(1, 30),
    ratio=st.sampled_from([0.5, 0.25, 2.0, 4.0, 1 / 3, 0.4, 3.0]),
)
def test_recursive_schedulers_land_on_the_rescaled_curve(name: str, at: int, ratio: float) -> None:
    # torch's closed form, read with the new lengths and position, must agree with the LR the
    # recursive form carries: events neither lost nor repeated, the current LR moved onto the
    # new curve.
    opt, sched = LENGTH_BUILDERS[name]()
    for _ in range(at):
        opt.step()
        sched.step()
    rescale_schedule_length(sched, ratio)
    for _ in range(12):
        _assert_close(_lrs(opt), [float(v) for v in sched._get_closed_form_lr()])
        opt.step()
        sched.step()


def test_one_cycle_length_matches_a_one_cycle_built_for_the_new_total() -> None:
    opt, sched = LENGTH_BUILDERS["OneCycleLR"]()
    rescale_schedule_length(sched, 0.5)
    ref_opt, ref_sched = _with(lambda o, k: ls.OneCycleLR(o, max_lr=[1.0, 0.4], total_steps=22))()
    assert sched.total_steps == 22
    for _ in range(22):
        for o, s in ((opt, sched), (ref_opt, ref_sched)):
            o.step()
            s.step()
        _assert_close(_lrs(opt), _lrs(ref_opt), rel=1e-12)


@pytest.mark.parametrize("name", ["OneCycleLR", "SequentialLR", "CosineAnnealingWarmRestarts"])
def test_rescaled_length_survives_state_dict_round_trip(name: str) -> None:
    opt, sched = LENGTH_BUILDERS[name]()
    for _ in range(6):
        opt.step()
        sched.step()
    rescale_schedule_length(sched, 0.5)
    states = copy.deepcopy((opt.state_dict(), sched.state_dict()))
    fresh_opt, fresh_sched = LENGTH_BUILDERS[name]()
    fresh_opt.load_state_dict(states[0])
    fresh_sched.load_state_dict(states[1])
    for _ in range(12):
        for o, s in ((opt, sched), (fresh_opt, fresh_sched)):
            o.step()
            s.step()
        assert _lrs(fresh_opt) == _lrs(opt)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda o: ls.LambdaLR(o, lambda t: 0.9**t), "LambdaLR: its lr_lambda"),
        (lambda o: ls.MultiplicativeLR(o, lambda t: 0.9), "MultiplicativeLR"),
        (lambda o: ls.ReduceLROnPlateau(o), "patience"),
        (lambda o: _MyStepLR(o, 2), "_MyStepLR"),
        (lambda o: _UserScheduler(o), "_UserScheduler"),
        (
            lambda o: ls.CyclicLR(
                o, 0.01, 0.1, scale_fn=lambda x: 0.99**x, scale_mode="iterations"
            ),
            "iterations",
        ),
        (
            lambda o: ls.SequentialLR(
                o, [ls.StepLR(o, 4), ls.LambdaLR(o, lambda t: 1.0)], milestones=[3]
            ),
            "LambdaLR",
        ),
    ],
)
def test_length_refusals_change_nothing(make, match) -> None:
    opt = _sgd()
    sched = make(opt)
    opt.step()
    sched.step(1.0) if isinstance(sched, ls.ReduceLROnPlateau) else sched.step()
    before = _snapshot(opt, sched)
    with pytest.raises(SchedulerNotScalableError, match=match):
        rescale_schedule_length(sched, 0.5)
    assert _snapshot(opt, sched) == before


@pytest.mark.parametrize("ratio", [0, -0.5, math.inf, math.nan, "half", False])
def test_rescale_schedule_length_rejects_bad_ratio(ratio) -> None:
    _, sched = LENGTH_BUILDERS["StepLR"]()
    with pytest.raises(ValueError, match="ratio must be a finite number > 0"):
        rescale_schedule_length(sched, ratio)
    assert sched.step_size == 8
    with pytest.raises(ValueError, match="scheduler is None"):
        rescale_schedule_length(None, 0.5)


def test_cyclic_custom_scale_fn_in_cycle_mode_is_rescaled() -> None:
    opt = _sgd()
    sched = ls.CyclicLR(opt, 0.01, 0.1, step_size_up=4, scale_fn=lambda x: 0.5**x)
    rescale_schedule_length(sched, 0.5)
    assert sched.total_size == 4.0 and sched.step_ratio == 0.5
