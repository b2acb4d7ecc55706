"""LoadertuneCallback under a real Lightning Trainer on CPU: tiny model, a few short epochs."""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

pl = pytest.importorskip("pytorch_lightning")

from loadertune.integrations.lightning import LoadertuneCallback  # noqa: E402


class _Slow(Dataset):
    """Each sample sleeps (an I/O-bound load) and says which worker loaded it (-1: none)."""

    def __init__(self, n: int = 320, sleep_s: float = 0.002) -> None:
        self.n = n
        self.sleep_s = sleep_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        time.sleep(self.sleep_s)
        info = get_worker_info()
        x = torch.full((4,), float(i % 5))
        return x, x.sum(0, keepdim=True), -1 if info is None else info.id


class _Model(pl.LightningModule):
    def __init__(self, reload_workers: int | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.workers_seen: dict[int, set[int]] = {}
        self.loader_workers: dict[int, int] = {}
        self.reload_workers = reload_workers

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, worker = batch
        epoch = self.current_epoch
        self.workers_seen.setdefault(epoch, set()).update(worker.tolist())
        self.loader_workers[epoch] = self.trainer.train_dataloader.num_workers
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Slow(), batch_size=8, num_workers=self.reload_workers or 0)


class _Recorder(pl.loggers.logger.Logger):
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def _fit(model: _Model, callback: LoadertuneCallback, logger: Any, **trainer_kwargs: Any) -> Any:
    trainer_kwargs.setdefault("max_epochs", 3)
    trainer_kwargs.setdefault("devices", 1)
    trainer = pl.Trainer(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=logger,
        callbacks=[callback],
        log_every_n_steps=1,
        **trainer_kwargs,
    )
    with warnings.catch_warnings():
        # Lightning's "does not have many workers" advice: the point of this test.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model)
    return trainer


_FAST = {
    "window_s": 0.2,
    "min_window_batches": 4,
    "interval_s": 0.05,
    "gpu": None,
    "max_workers": 2,
}


def test_recommend_logs_through_the_trainer_logger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    callback = LoadertuneCallback(mode="recommend", **_FAST)
    csv_logger = pl.loggers.CSVLogger(tmp_path, name="run")
    model = _Model()
    with caplog.at_level(logging.INFO, logger="loadertune"):
        _fit(model, callback, csv_logger)
    # Numbers reach the trainer's logger ...
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert any(r.get("loadertune/wait_share") for r in rows)
    assert any(r.get("loadertune/recommended_num_workers") for r in rows)
    # ... the recommendation reaches the "loadertune" Python logger ...
    lines = [r.getMessage() for r in caplog.records if r.name == "loadertune"]
    assert any("Recommend num_workers=0->" in line for line in lines), lines
    # ... and nothing changed: recommend mode only advises.
    assert callback.recommendation is not None and callback.recommendation.config.num_workers > 0
    assert all(w == 0 for w in model.loader_workers.values())
    assert callback.applied == []
    assert not callback._sampler.running  # stopped at the end of training


def test_apply_changes_workers_at_an_epoch_boundary() -> None:
    callback = LoadertuneCallback(mode="apply", **_FAST)
    recorder = _Recorder()
    model = _Model()
    _fit(model, callback, recorder)
    assert callback.applied, [e.kind for e in callback.events]
    epoch, config = callback.applied[0]
    assert epoch >= 1 and config.num_workers > 0
    # Before the boundary every batch came from the main process; from it on, every batch of
    # that epoch came from the new workers: the change took effect exactly at the boundary.
    for e in range(epoch):
        assert model.workers_seen[e] == {-1}
    assert -1 not in model.workers_seen[epoch] and model.loader_workers[epoch] == config.num_workers
    kinds = [e.kind for e in callback.events]
    assert "change" in kinds and kinds[0] == "start" and kinds[-1] == "summary"
    logged = {k for _, row in recorder.rows for k in row}
    assert {"loadertune/samples_per_s", "loadertune/num_workers"} <= logged


def test_apply_survives_lightning_reloading_the_dataloader() -> None:
    # train_dataloader() builds a fresh loader with 0 workers every epoch; the tuned value has
    # to be re-applied to each new loader, or the change would be lost without a word.
    callback = LoadertuneCallback(
        mode="apply", **{**_FAST, "window_s": 0.3, "min_window_batches": 12}
    )
    model = _Model()
    _fit(model, callback, _Recorder(), reload_dataloaders_every_n_epochs=1, max_epochs=4)
    assert callback.applied and callback.applied[0][1].num_workers > 0
    # In every epoch the loader Lightning iterated had the workers the callback says it set.
    for e in range(4):
        expected = [c.num_workers for epoch, c in callback.applied if epoch <= e]
        workers = expected[-1] if expected else 0
        assert model.loader_workers[e] == workers, (e, callback.applied, model.loader_workers)
        assert (-1 in model.workers_seen[e]) == (workers == 0), (e, model.workers_seen)
    decided = {e.epoch for e in callback.events if e.kind in ("change", "revert")}
    reapplied = [epoch for epoch, _ in callback.applied if epoch not in decided]
    assert reapplied, (callback.applied, decided)


class _RankSink:
    """An event sink that appends each event to a file of its rank (picklable for ddp_spawn)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __call__(self, event: Any) -> None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else -1
        row = [event.kind, event.step, event.epoch, event.data.get("after")]
        with open(Path(self.directory) / f"rank{rank}.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


def _starved_window(loop: Any, ticks: Any, config: Any) -> Any:
    """A window measured as a function of the configuration: starved without workers."""
    from tests.test_session import starved

    return starved(config, batch=8)


class _ForkingModel(_Model):
    def setup(self, stage: str) -> None:
        # ddp_spawn's ranks would otherwise spawn their DataLoader workers too (seconds each).
        multiprocessing.set_start_method("fork", force=True)
        # Each rank is told the same measurements, whatever the load on the machine: the test
        # is about the ranks agreeing, not about measuring.
        import loadertune.session

        loadertune.session.compute_metrics = _starved_window

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Slow(n=640), batch_size=8)


@pytest.fixture(scope="module")
def _resource_tracker() -> None:
    # Spawning starts multiprocessing's resource tracker, a helper that lives as long as this
    # process; start it before the test (module scope: before the leak check's snapshot), so
    # that the test is not taken to have leaked it.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


def test_ddp_ranks_take_the_same_decisions(tmp_path: Path, _resource_tracker: None) -> None:
    callback = LoadertuneCallback(mode="apply", sinks=(_RankSink(str(tmp_path)),), **_FAST)
    _fit(_ForkingModel(), callback, False, strategy="ddp_spawn", devices=2)
    ranks = []
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.jsonl") as fh:
            ranks.append([json.loads(line) for line in fh])
    # Windows close at the same steps and rank 0's decisions are applied on both ranks alike.
    assert ranks[0] == ranks[1]
    changes = [e for e in ranks[0] if e[0] == "change"]
    assert changes and changes[0][2] >= 1 and changes[0][3]["num_workers"] > 0


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        LoadertuneCallback(mode="auto")
    with pytest.raises(ValueError, match="does not take optimizer="):
        LoadertuneCallback(optimizer=object())
    with pytest.raises(ValueError, match="unknown option 'windows'"):
        LoadertuneCallback(windows=1)
    with pytest.raises(ValueError, match="never changes the batch size"):
        LoadertuneCallback(mode="apply", allow_batch_size=True)
    with pytest.raises(ValueError, match="window_s must be a positive"):
        LoadertuneCallback(window_s=0)
    assert isinstance(LoadertuneCallback(), pl.Callback)


class _WithValidation(_Model):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _worker = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Slow(n=160), batch_size=8, num_workers=0)


def test_validation_loader_is_observed_and_recommended_not_changed(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    callback = LoadertuneCallback(mode="apply", log_file=str(log), **_FAST)
    model = _WithValidation()
    trainer = _fit(model, callback, False, max_epochs=2, num_sanity_val_steps=2)
    windows = [e for e in callback.validation_events if e.kind == "window"]
    assert windows, [e.kind for e in callback.validation_events]
    # The validation loader waits on its samples too: it gets its own advice ...
    assert callback.validation_recommendation is not None
    assert callback.validation_recommendation.config.num_workers > 0
    # ... and is never changed (Lightning builds it; validation is observed only).
    assert trainer.val_dataloaders.num_workers == 0
    # Its own event log, beside the training loader's.
    val_log = tmp_path / "run.validation.jsonl"
    kinds = [json.loads(line)["kind"] for line in val_log.read_text().splitlines()]
    assert kinds[0] == "start" and kinds[-1] == "summary" and "window" in kinds
    assert json.loads(val_log.read_text().splitlines()[0])["loader"] == "validation"
