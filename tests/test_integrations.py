"""The integrations package: lazy imports, the TensorBoard sink, the Lightning import hint."""

from __future__ import annotations

import builtins
import importlib
import sys
import time
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import loadertune
import loadertune.integrations as integrations
from loadertune.events import Event
from loadertune.integrations.tensorboard import TensorBoardSink


class _Writer:
    """Stands in for torch.utils.tensorboard.SummaryWriter: keeps what add_scalar receives."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
        self.scalars.append((tag, scalar_value, global_step))

    def tags(self) -> set[str]:
        return {t for t, _, _ in self.scalars}


class _Sleepy(Dataset):
    def __len__(self) -> int:
        return 400

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.0005)
        return torch.tensor([float(i)])


def test_public_names_are_all() -> None:
    assert integrations.__all__ == sorted(integrations.__all__)
    assert set(integrations.__all__) == {"LoadertuneCallback", "TensorBoardSink"}
    assert integrations.TensorBoardSink is TensorBoardSink
    with pytest.raises(AttributeError):
        _ = integrations.Nothing


def test_sink_writes_window_scalars_from_a_real_run() -> None:
    writer = _Writer()
    from loadertune.sim import SimulatedGpu

    gpu = SimulatedGpu(step_time_s=0.001, host_overhead_s=0.001)
    loader = DataLoader(_Sleepy(), batch_size=8)
    with loadertune.tune(
        loader,
        gpu=gpu,
        host=None,
        window_s=0.1,
        min_window_batches=4,
        interval_s=0.02,
        sinks=(TensorBoardSink(writer),),
    ) as tuned:
        for batch in tuned:
            gpu.step(len(batch))
    tags = writer.tags()
    for tag in ("samples_per_s", "wait_share", "gpu_util_pct", "num_workers", "batch_size"):
        assert f"loadertune/{tag}" in tags, tags
    steps = [s for t, _, s in writer.scalars if t == "loadertune/samples_per_s"]
    assert steps == sorted(steps) and steps[0] > 0
    assert all(isinstance(v, float) for _, v, _ in writer.scalars)


def test_sink_reads_changes_and_recommendations() -> None:
    writer = _Writer()
    sink = TensorBoardSink(writer, prefix="lt/")
    after = {"num_workers": 4, "batch_size": 32, "prefetch_factor": 2}
    sink(Event("change", 0.0, 7, 0, {"after": after, "lr_factor": 2.0}))
    sink(Event("recommendation", 0.0, 9, 0, {"recommendation": {"config": after}}))
    sink(Event("keep", 0.0, 11, 0, {"reason": "kept"}))
    sink(
        Event("window", 0.0, 12, 0, {"metrics": {"samples_per_s": 5.0, "gpu_util_mean_pct": None}})
    )
    assert writer.scalars == [
        ("lt/num_workers", 4.0, 7),
        ("lt/batch_size", 32.0, 7),
        ("lt/prefetch_factor", 2.0, 7),
        ("lt/lr_factor", 2.0, 7),
        ("lt/recommended/num_workers", 4.0, 9),
        ("lt/recommended/batch_size", 32.0, 9),
        ("lt/samples_per_s", 5.0, 12),
    ]


def test_sink_needs_a_writer() -> None:
    with pytest.raises(ValueError, match="add_scalar"):
        TensorBoardSink(object())


def test_lightning_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_lightning(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in ("lightning", "pytorch_lightning"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lightning)
    monkeypatch.delitem(sys.modules, "loadertune.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install loadertune\[lightning\]"):
        importlib.import_module("loadertune.integrations.lightning")
