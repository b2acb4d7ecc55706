"""The tuning session: one decision path for every front end.

Windows are scripted (``compute_metrics`` replaced by a function of the configuration in use), so
the decisions depend on what was measured, never on how fast this machine ran the test.
"""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import loadertune
from loadertune.config import LoaderConfig
from loadertune.options import TuneOptions
from loadertune.session import TuningSession
from tests._factories import metrics

MIB = 2**20
ROOT = Path(__file__).resolve().parents[1]
FAST = {"gpu": None, "host": None, "window_s": 1e-6, "min_window_batches": 2}


def starved(config: LoaderConfig, *, batch: int = 4, shm_free: int | None = None) -> Any:
    """A latency-bound load: one worker needs 40 ms a batch, the step 10 ms, I/O not CPU."""
    w = config.num_workers
    load, compute = 0.04, 0.01
    bps = min(1 / compute, w / load) if w else 1 / (load + compute)
    wait = max(0.0, 1 / bps - compute)
    return metrics(
        batches=20,
        samples=20 * batch,
        batches_per_s=bps,
        samples_per_s=bps * batch,
        wait_share=wait * bps,
        wait_s_per_batch=wait,
        compute_s_per_batch=compute,
        rate_rel_stderr=0.01,
        loader_cpu_s_per_batch=0.001,
        gpu_util_mean_pct=None,
        gpu_util_std_pct=None,
        gpu_idle_share=None,
        gpu_mem_used_bytes=None,
        gpu_mem_total_bytes=None,
        cpu_pct=20.0,
        usable_cpus=2,
        shm_free_bytes=shm_free if shm_free is not None else 16 * 2**30,
        shm_total_bytes=shm_free if shm_free is not None else 16 * 2**30,
    )


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> list[LoaderConfig]:
    """Replaces the window's measurement by ``starved(config)``; records the configs measured."""
    seen: list[LoaderConfig] = []

    def compute(loop: Any, ticks: Any, config: LoaderConfig) -> Any:
        seen.append(config)
        return starved(config)

    monkeypatch.setattr("loadertune.session.compute_metrics", compute)
    return seen


class FakeTrainer:
    """What the callback reads of a Lightning Trainer."""

    def __init__(self, loader: DataLoader) -> None:
        self.train_dataloader = loader
        self.global_step = 0
        self.current_epoch = 0
        self.optimizers: list[Any] = []
        self.loggers: list[Any] = []
        self.world_size = 1
        self.global_rank = 0


def drive_callback(callback: Any, loader: DataLoader, epochs: int, batches: int) -> FakeTrainer:
    trainer = FakeTrainer(loader)
    module = torch.nn.Linear(1, 1)
    callback.on_train_start(trainer, module)
    batch = torch.zeros(4, 1)
    for epoch in range(epochs):
        trainer.current_epoch = epoch
        callback.on_train_epoch_start(trainer, module)
        for i in range(batches):
            callback.on_train_batch_start(trainer, module, batch, i)
            callback.on_train_batch_end(trainer, module, None, batch, i)
            trainer.global_step += 1
    callback.on_train_end(trainer, module)
    return trainer


def decisions(events: list[Any]) -> list[tuple[str, int]]:
    return [(e.kind, e.data["after"]["num_workers"]) for e in events if e.kind in ("change", "revert")]


def test_recommend_mode_gives_the_same_advice_through_both_front_ends(scripted: list[LoaderConfig]) -> None:
    pytest.importorskip("pytorch_lightning")
    from loadertune.integrations.lightning import LoadertuneCallback

    with loadertune.tune(DataLoader(TensorDataset(torch.zeros(80, 1)), batch_size=4), mode="recommend", **FAST) as t:
        for _ in t:
            pass
        tuned_recs = [e.data["recommendation"]["config"] for e in t.events if e.kind == "recommendation"]
    callback = LoadertuneCallback(mode="recommend", **FAST)
    drive_callback(callback, DataLoader(TensorDataset(torch.zeros(80, 1)), batch_size=4), 1, 20)
    callback_recs = [e.data["recommendation"]["config"] for e in callback.events if e.kind == "recommendation"]
    assert tuned_recs and tuned_recs[0]["num_workers"] > 0
    assert callback_recs == tuned_recs
    # One line per piece of advice: the same window repeated does not repeat it.
    assert len(tuned_recs) == 1


def test_apply_mode_takes_the_same_decisions_through_both_front_ends(scripted: list[LoaderConfig]) -> None:
    pytest.importorskip("pytorch_lightning")
    from loadertune.integrations.lightning import LoadertuneCallback

    with loadertune.tune(DataLoader(TensorDataset(torch.zeros(400, 1)), batch_size=4), mode="apply", **FAST) as t:
        for _ in t:
            pass
        tuned = decisions(t.events)
    callback = LoadertuneCallback(mode="apply", **FAST)
    # Lightning changes workers at epoch boundaries: an epoch per window, so every decision
    # the callback takes is carried out before the next window.
    drive_callback(callback, DataLoader(TensorDataset(torch.zeros(400, 1)), batch_size=4), 8, 12)
    through_callback = decisions(callback.events)
    assert tuned and tuned[0][0] == "change" and tuned[0][1] > 0
    n = min(len(tuned), len(through_callback))
    assert n >= 1
    assert through_callback[:n] == tuned[:n]


def test_apply_mode_bounds_workers_by_a_small_dev_shm(monkeypatch: pytest.MonkeyPatch) -> None:
    shm_free = 16 * MIB
    measured: list[LoaderConfig] = []

    def compute(loop: Any, ticks: Any, config: LoaderConfig) -> Any:
        measured.append(config)
        return starved(config, batch=2, shm_free=shm_free)

    monkeypatch.setattr("loadertune.session.compute_metrics", compute)
    # 2 samples of 2 MiB each: 4 MiB a batch in /dev/shm.
    data = TensorDataset(torch.zeros(64, 512, 1024))
    with loadertune.tune(DataLoader(data, batch_size=2), mode="apply", **FAST) as t:
        for _ in t:
            pass
        changes = [e for e in t.events if e.kind == "change"]
    assert changes, [e.kind for e in t.events]
    batch_bytes = 2 * 512 * 1024 * 4
    for e in changes:
        after = e.data["after"]
        # At least a batch per worker in flight, and the one the loop holds (the pipeline fits
        # prefetch_factor to the real /dev/shm: tests/test_pipeline.py, in a 64 MiB tmpfs).
        # Unbounded, the rates alone call for 5 workers (24 MiB in a 16 MiB /dev/shm).
        assert (after["num_workers"] + 1) * batch_bytes <= 0.9 * shm_free, after


def test_the_callback_builds_no_decision_path_of_its_own() -> None:
    source = (ROOT / "loadertune" / "integrations" / "lightning.py").read_text()
    names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)}
    for forbidden in ("Controller", "Sampler", "EventLog", "diagnose", "plan", "compute_metrics", "LoopTimer"):
        assert forbidden not in names, forbidden


def test_advice_is_logged_once_as_a_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def compute(loop: Any, ticks: Any, config: LoaderConfig) -> Any:
        # 4 workers without persistence, each epoch starting with a 1.5 s stall.
        return metrics(epoch_start_wait_s=1.5 + 0.1 * loop.batches, wait_s_per_batch=0.001)

    monkeypatch.setattr("loadertune.session.compute_metrics", compute)
    session = TuningSession(TuneOptions(**FAST), LoaderConfig(num_workers=4, batch_size=4), batch_resizable=True)
    caplog.set_level(logging.WARNING, logger="loadertune")
    try:
        session.epoch_started(0.0, 0)
        for step in range(1, 9):
            session.record(step - 1.0, step - 0.5, 4, None, step=step, epoch=0, config=LoaderConfig(num_workers=4, batch_size=4))
    finally:
        session.close(step=8, epoch=0, epochs=1, config=LoaderConfig(num_workers=4, batch_size=4))
    stalls = [r for r in caplog.records if "persistent_workers=True" in r.getMessage()]
    assert len(stalls) == 1 and stalls[0].levelno == logging.WARNING


def test_summary_rates_come_from_the_loops_own_timings() -> None:
    session = TuningSession(TuneOptions(gpu=None, host=None, window_s=100.0), LoaderConfig(batch_size=8), batch_resizable=True)
    config = LoaderConfig(batch_size=8)
    session.epoch_started(0.0, 0)
    # 10 batches of 8 samples, one every 0.1 s: 80 samples/s, and no window ever closed.
    for step in range(1, 11):
        session.record(0.1 * (step - 1) + 0.05, 0.1 * step, 8, None, step=step, epoch=0, config=config)
    summary = session.close(step=10, epoch=0, epochs=1, config=config)
    assert summary["first_samples_per_s"] == pytest.approx(80.0)
    assert summary["last_samples_per_s"] == pytest.approx(80.0)
    assert "; 80 samples/s" in summary["text"]


def _unclosed_job(tmp_path: Path, *, workers: int = 0, prelude: str = "", epochs: int = 1) -> tuple[Any, Path]:
    """Runs a script that tunes a 64-sample loader and never calls close(); returns the
    completed process and its event log."""
    log = tmp_path / "run.jsonl"
    script = tmp_path / "train.py"
    body = textwrap.dedent(
        f"""
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        import loadertune

        loader = loadertune.tune(
            DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=4, num_workers={workers}),
            gpu=None, host=None, log_file={str(log)!r},
        )
        for epoch in range({epochs}):
            for batch in loader:
                pass
        # no close(): most training scripts never call it
        """
    )
    script.write_text(textwrap.dedent(prelude) + body)
    r = subprocess.run([sys.executable, "-W", "error::ResourceWarning", str(script)], capture_output=True, text=True, timeout=100)
    return r, log


@pytest.mark.timeout(120)
def test_a_script_that_never_closes_still_writes_its_summary(tmp_path: Path) -> None:
    r, log = _unclosed_job(tmp_path, epochs=2)
    assert r.returncode == 0, r.stderr
    kinds = [json.loads(line)["kind"] for line in log.read_text().splitlines()]
    assert kinds[0] == "start" and kinds[-1] == "summary"
    summary = json.loads(log.read_text().splitlines()[-1])
    assert "32 batches in 2 epoch(s)" in summary["text"]


@pytest.mark.timeout(120)
def test_a_ctrl_c_while_the_exit_stops_the_workers_still_writes_the_summary(tmp_path: Path) -> None:
    # The press comes while close() at interpreter exit stops the workers (sent from there, so
    # it lands there); it is held until the summary is written, then the interpreter exits.
    prelude = """
        import os, signal
        from loadertune.pipeline import LoaderPipeline

        real = LoaderPipeline.shutdown
        def shutdown(self):
            os.kill(os.getpid(), signal.SIGINT)
            real(self)
        LoaderPipeline.shutdown = shutdown
        """
    r, log = _unclosed_job(tmp_path, workers=1, prelude=prelude)
    assert r.returncode == 0, r.stderr
    assert "Exception ignored" not in r.stderr, r.stderr
    kinds = [json.loads(line)["kind"] for line in log.read_text().splitlines()]
    assert kinds[-1] == "summary", kinds


_STALL_ADVICE = "Each epoch starts with a 1.35 s stall while workers start; set persistent_workers=True to keep them between epochs."


@pytest.mark.parametrize("persists", [True, False])
def test_apply_mode_leaves_out_advice_its_own_change_carries_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, persists: bool
) -> None:
    # Apply mode turning persistent workers on must not tell the user, in the same breath, to
    # set persistent_workers=True; a change that does something else leaves the advice standing.
    import dataclasses

    from loadertune import session as session_module
    from loadertune.controller import Decision

    real = session_module.diagnose
    monkeypatch.setattr(
        session_module, "diagnose", lambda *a, **k: dataclasses.replace(real(*a, **k), advice=(_STALL_ADVICE,))
    )
    config = LoaderConfig(num_workers=2, batch_size=4)
    after = config.replace(persistent_workers=True) if persists else config.replace(num_workers=3)
    session = TuningSession(TuneOptions(mode="apply", **FAST), config, batch_resizable=True)
    monkeypatch.setattr(session.controller, "decide", lambda *a, **k: Decision("change", after, "test"))
    try:
        with caplog.at_level(logging.WARNING, logger="loadertune"):
            session.epoch_started(0.0, 0)
            decision = None
            for step in range(1, 6):
                decided = session.record(step - 1.0, step - 0.5, 4, None, step=step, epoch=0, config=config)
                decision = decision or decided
    finally:
        session.close(step=5, epoch=0, epochs=1, config=config)
    assert decision is not None and decision.config == after
    said = [r.getMessage() for r in caplog.records if "persistent_workers=True" in r.getMessage()]
    assert said == ([] if persists else [_STALL_ADVICE])


def test_apply_mode_says_once_why_it_does_not_change_yet(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A user whose loop waits and whose loader stays put must read why (measuring first, or a
    # stall that would not pay back): once, not every window, and not the routine holds.
    from loadertune.controller import Decision

    config = LoaderConfig(num_workers=0, batch_size=4)
    events: list[Any] = []
    session = TuningSession(TuneOptions(mode="apply", sinks=(events.append,), **FAST), config, batch_resizable=True)
    decisions = [Decision("hold", config, "cooling down after a change")] + [
        Decision("measure", config, f"measuring num_workers=0 again (its rate is known to ±{e:.1%})", telling=True)
        for e in (0.05, 0.04, 0.03)
    ]
    monkeypatch.setattr(session.controller, "decide", lambda *a, **k: decisions.pop(0) if len(decisions) > 1 else decisions[0])
    try:
        with caplog.at_level(logging.INFO, logger="loadertune"):
            session.epoch_started(0.0, 0)
            for step in range(1, 10):
                session.record(step - 1.0, step - 0.5, 4, None, step=step, epoch=0, config=config)
    finally:
        session.close(step=9, epoch=0, epochs=1, config=config)
    said = [r.getMessage() for r in caplog.records if "measuring" in r.getMessage() or "cooling" in r.getMessage()]
    assert said == ["measuring num_workers=0 again (its rate is known to ±5.0%)"]
    assert [e.kind for e in events if e.kind in ("measure", "hold")] == ["measure"]


def test_the_diagnosis_sees_the_batch_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 workers x prefetch 2 of 4 MiB batches against 16 MiB free in /dev/shm: memory-bound, which
    # only a diagnosis told the batch size can see.
    def compute(loop: Any, ticks: Any, config: LoaderConfig) -> Any:
        return metrics(shm_free_bytes=16 * MIB, shm_total_bytes=64 * MIB, wait_share=0.3, wait_s_per_batch=0.01)

    monkeypatch.setattr("loadertune.session.compute_metrics", compute)
    config = LoaderConfig(num_workers=4, batch_size=2)
    session = TuningSession(TuneOptions(**FAST), config, batch_resizable=True)
    batch = torch.zeros(2, 512, 1024)
    try:
        session.epoch_started(0.0, 0)
        for step in range(1, 5):
            session.record(step - 1.0, step - 0.5, 2, batch, step=step, epoch=0, config=config)
    finally:
        session.close(step=4, epoch=0, epochs=1, config=config)
    assert session.environment.batch_bytes == 4 * MIB
    assert session.diagnosis is not None and session.diagnosis.kind == "memory_bound", session.diagnosis


def _first_window(config: LoaderConfig | None) -> dict[str, Any]:
    """The first window's metrics of a run whose first 4 batches come slowly (workers starting),
    then one every 10 ms; ``config`` is what the front end says the epoch starts with."""
    events: list[Any] = []
    opts = TuneOptions(gpu=None, host=None, window_s=0.2, min_window_batches=5, sinks=(events.append,))
    running = LoaderConfig(num_workers=2, batch_size=8, prefetch_factor=2)
    session = TuningSession(opts, running, batch_resizable=True)
    try:
        session.epoch_started(0.0, 0, config)
        t = 0.0
        for step in range(1, 40):
            wait = 0.3 if step <= 4 else 0.001
            session.record(t, t + wait, 8, None, step=step, epoch=0, config=running)
            t += wait + 0.009
    finally:
        session.close(step=39, epoch=0, epochs=1, config=running)
    return next(e for e in events if e.kind == "window").data["metrics"]


def test_the_runs_first_window_leaves_the_workers_start_up_out() -> None:
    # Told the epoch starts 2 workers x prefetch 2: the first window is the steady 10 ms pace.
    steady = _first_window(LoaderConfig(num_workers=2, batch_size=8, prefetch_factor=2))
    assert steady["wait_share"] < 0.2 and steady["batches_per_s"] > 80
    # Not told: the start-up reads as waiting (what a decision on it would take for the pace).
    polluted = _first_window(None)
    assert polluted["wait_share"] > 0.5
