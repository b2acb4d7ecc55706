"""Faults that must never turn a working job into a crashed, hung or shortened one (issue 14)."""

from __future__ import annotations

import functools
import logging
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from loadertune.faults import (
    CrashTracker,
    SampleCrashError,
    WorkerStartError,
    _start_failure,
    dead_worker_batches,
    worker_death,
)
from tests._factories import Indexed, exit_if_exists, flat, quiet


class Segfaults(Dataset):
    """Sample ``at`` crashes the process that loads it with a real SIGSEGV, as a corrupt file in a
    C decoder does. Loaded in the training process it raises instead, so a regression fails the
    test rather than the test run."""

    def __init__(self, n: int, at: int) -> None:
        self.n, self.at = n, at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.at:
            if torch.utils.data.get_worker_info() is None:
                raise AssertionError(f"sample {i} was loaded in the training process")
            os.kill(os.getpid(), signal.SIGSEGV)
        return i


class KillOnce(Dataset):
    """The worker that loads sample ``at`` SIGKILLs itself, once (a flag file remembers)."""

    def __init__(self, n: int, at: int, flag: str) -> None:
        self.n, self.at, self.flag = n, at, flag

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.at:
            if torch.utils.data.get_worker_info() is None:
                raise AssertionError(f"sample {i} was loaded in the training process")
            if not os.path.exists(self.flag):
                open(self.flag, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        return i


class ShmFullOnce(Dataset):
    """Sample ``at`` fails once in its worker with torch's /dev/shm error (its exact text)."""

    def __init__(self, n: int, at: int, flag: str) -> None:
        self.n, self.at, self.flag = n, at, flag

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.at and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            raise RuntimeError(
                "unable to allocate shared memory(shm) for file </torch_123_456_0>: No space left on device (28)"
            )
        return i


# -- a sample that kills its worker ----------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["recommend", "apply"])
def test_segfaulting_sample_raises_naming_it_and_never_loads_in_process(mode, caplog):
    got = []
    with quiet(DataLoader(Segfaults(64, at=21), batch_size=4, num_workers=4), mode=mode) as t:
        with pytest.raises(SampleCrashError) as info, caplog.at_level(logging.WARNING, "loadertune"):
            for b in t:
                got.extend(int(i) for i in b)
        err = info.value
        assert isinstance(err, RuntimeError)  # what a plain DataLoader raises, so handlers still work
        assert err.sample == 21 and 21 in err.indices
        assert "sample 21 kills the DataLoader worker" in str(err)
        assert "killed by SIGSEGV" in str(err)
        # One retry in a worker (1 death could be bad luck), never in the training process.
        assert t.config.num_workers >= 1
        crash = [e for e in t.events if e.kind == "fault" and e.data.get("cause") == "crash"]
        assert len(crash) == 1 and 21 in crash[0].data["samples"]
        # The epoch stays failed: no quiet end, no silent short epoch.
        with pytest.raises(RuntimeError, match="kills the DataLoader worker"):
            next(t)
    assert 21 not in got and len(got) == len(set(got))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["recommend", "apply"])
def test_workers_that_die_while_starting_blame_no_sample(mode, tmp_path):
    # Every worker exits in its worker_init_fn: the batch it was given is not to blame, and a
    # throwaway worker sent the dataset but no sample dies the same way.
    die = tmp_path / "die"
    die.touch()
    loader = DataLoader(Indexed(64), batch_size=4, num_workers=2, worker_init_fn=functools.partial(exit_if_exists, str(die)))
    with quiet(loader, mode=mode) as t:
        with pytest.raises(WorkerStartError) as info:
            flat(t)
        err = info.value
        assert isinstance(err, SampleCrashError) and err.sample is None
        assert "die while starting, before they load any sample" in str(err)
        assert "exited with code 3" in str(err) and "worker_init_fn" in str(err)
        assert "kills the DataLoader worker" not in str(err)


@pytest.mark.timeout(60)
def test_a_death_while_torch_starts_the_iterator_is_recovered_like_one_at_a_batch(tmp_path, monkeypatch):
    # torch's SIGCHLD handler can raise inside the iterator's __init__ (while it queues the first
    # indices) when a worker dies that early: that death is handled as any other, not raised
    # from iter(). Made deterministic here: __init__'s _reset hands out the first indices, waits
    # for the death, then raises torch's own report of it.
    from torch.utils.data import dataloader

    real_reset = dataloader._MultiProcessingDataLoaderIter._reset

    def reset_after_a_death(self, loader, first_iter=False):
        real_reset(self, loader, first_iter)  # the first indices are handed out, then the death
        self._workers[0].join(10)
        raise RuntimeError(
            f"DataLoader worker (pid {self._workers[0].pid}) exited unexpectedly with exit code 3. "
            "Details are lost due to multiprocessing."
        )

    die = tmp_path / "die"
    die.touch()
    loader = DataLoader(Indexed(64), batch_size=4, num_workers=2, worker_init_fn=functools.partial(exit_if_exists, str(die)))
    with quiet(loader, mode="apply") as t:
        monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_reset", reset_after_a_death)
        with pytest.raises(WorkerStartError, match="die while starting"):
            flat(t)
        monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_reset", real_reset)
        # One retry with fewer workers first (one death may be bad luck), as at a batch.
        assert [e.data["cause"] for e in t.events if e.kind == "fault"] == ["died", "crash"]


@pytest.mark.timeout(60)
def test_a_death_reported_just_after_torch_built_the_iterator_is_recovered_too(tmp_path, monkeypatch):
    # The same death reported a moment later, once torch's __init__ has returned but before the
    # iterator reaches loadertune (seen: SIGCHLD landing in the warnings filter's exit).
    import contextlib

    import psutil

    import loadertune.building as building

    @contextlib.contextmanager
    def report_after(real=building.torch_warnings_once):
        before = {p.pid for p in psutil.Process().children()}
        with real():
            yield
        started = [p for p in psutil.Process().children() if p.pid not in before]
        if not started:
            return  # building a loader, not starting one
        started[0].wait(10)  # it exits in its worker_init_fn
        raise RuntimeError(f"DataLoader worker (pid {started[0].pid}) exited unexpectedly with exit code 3.")

    die = tmp_path / "die"
    die.touch()
    loader = DataLoader(Indexed(64), batch_size=4, num_workers=2, worker_init_fn=functools.partial(exit_if_exists, str(die)))
    with quiet(loader, mode="apply") as t:
        monkeypatch.setattr(building, "torch_warnings_once", report_after)
        with pytest.raises(WorkerStartError, match="die while starting"):
            flat(t)


def _die_on_cue(path: str, worker_id: int) -> None:
    """A ``worker_init_fn``: the starting worker waits for ``path`` to exist, then exits with 3."""
    import time

    for _ in range(6000):
        if os.path.exists(path):
            os._exit(3)
        time.sleep(0.005)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["recommend", "apply"])
def test_a_death_reported_while_the_epoch_is_set_up_is_handled_like_one_at_a_batch(tmp_path, monkeypatch, mode):
    # Later still: the iterator has reached loadertune, which is noting the epoch's start (seen:
    # SIGCHLD landing as the SIGINT hold ends). torch's own report, raw, reached the caller.
    from loadertune.session import TuningSession

    real_epoch_started = TuningSession.epoch_started
    cue = tmp_path / "die"
    reported = []

    def die_then_start(self, **kw):
        if not reported:
            worker = t._pipeline.src_it._workers[0]
            reported.append(worker.pid)
            cue.touch()  # the workers die now, while the epoch is being set up
            worker.join(10)  # torch's SIGCHLD handler may raise here already: the same report
            raise RuntimeError(f"DataLoader worker (pid {worker.pid}) exited unexpectedly with exit code 3.")
        return real_epoch_started(self, **kw)

    loader = DataLoader(Indexed(64), batch_size=4, num_workers=2, worker_init_fn=functools.partial(_die_on_cue, str(cue)))
    with quiet(loader, mode=mode) as t:
        monkeypatch.setattr(TuningSession, "epoch_started", die_then_start)
        with pytest.raises(WorkerStartError, match="die while starting"):
            flat(t)
        assert reported


def test_a_start_failure_under_spawn_points_at_the_main_module_guard():
    ctx = torch.multiprocessing.get_context("spawn")
    text = _start_failure("pid 7 exited with code 1", "pid 8 exited with code 1", ctx)
    assert 'if __name__ == "__main__":' in text and "multiprocessing_context='spawn'" in text


@pytest.mark.timeout(60)
def test_one_worker_segfault_is_retried_in_a_worker_then_raised():
    with quiet(DataLoader(Segfaults(24, at=5), batch_size=4, num_workers=1), mode="apply") as t:
        with pytest.raises(SampleCrashError, match="sample 5 "):
            flat(t)
        assert t.config.num_workers == 1


@pytest.mark.timeout(60)
def test_random_death_at_one_worker_retries_in_a_worker_without_losing_a_sample(tmp_path):
    ds = KillOnce(40, at=9, flag=str(tmp_path / "killed"))
    with quiet(DataLoader(ds, batch_size=4, num_workers=1), mode="apply") as t:
        assert flat(t) == list(range(40))
        # The dead worker's samples were suspects: loaded again in a worker, not in-process.
        assert t.config.num_workers == 1
        assert [e.data["cause"] for e in t.events if e.kind == "fault"] == ["died"]
        assert not t._pipeline.crashes.suspects


@pytest.mark.timeout(60)
def test_a_death_reported_as_its_handling_begins_is_recovered_from(tmp_path, monkeypatch):
    # torch's SIGCHLD handler raised its report of the death while loadertune was entering the
    # SIGINT hold to handle the same death, and the raw RuntimeError reached the loop (seen in a
    # full suite run). Made deterministic: the first hold entered after the death raises it.
    import contextlib

    import loadertune.actuator as actuator
    import loadertune.interrupts as interrupts
    import loadertune.tuned as tuned

    reported = []
    flag = tmp_path / "killed"

    @contextlib.contextmanager
    def hold_reporting_the_death():
        if flag.exists() and not reported:  # the worker has killed itself, or is about to
            (worker,) = t._pipeline.src_it._workers
            worker.join(10)
            reported.append(worker.pid)
            raise RuntimeError(f"DataLoader worker (pid {worker.pid}) is killed by signal: Killed.")
        with interrupts.sigint_held():
            yield

    for module in (actuator, tuned):
        monkeypatch.setattr(module, "sigint_held", hold_reporting_the_death, raising=False)
    ds = KillOnce(40, at=9, flag=str(flag))
    with quiet(DataLoader(ds, batch_size=4, num_workers=1), mode="apply") as t:
        assert flat(t) == list(range(40))
        assert reported
        assert [e.data["cause"] for e in t.events if e.kind == "fault"] == ["died"]


def test_dead_worker_batches_reads_torchs_task_bookkeeping():
    workers = [SimpleNamespace(pid=100, is_alive=lambda: True), SimpleNamespace(pid=101, is_alive=lambda: False)]
    it = SimpleNamespace(
        _workers=workers,
        _rcvd_idx=10,
        # Task 10 is worker 0's, 11 and 13 worker 1's (13 queued behind 11), 12 has its data.
        _task_info={10: (0,), 11: (1,), 12: (0, "data"), 13: (1,)},
        _in_order=True,
    )
    issued = [[0, 1], [2, 3], [4, 5], [6, 7]]
    exc = RuntimeError("DataLoader worker (pid 101) is killed by signal: Segmentation fault. ")
    assert dead_worker_batches(it, exc, issued) == [[2, 3], [6, 7]]
    # Unreadable bookkeeping (out-of-order loading): every batch in flight is a suspect.
    it._in_order = False
    assert dead_worker_batches(it, exc, issued) == issued


def test_crash_tracker_tells_a_repeat_from_bad_luck():
    tracker = CrashTracker()
    assert tracker.death([[1, 2], [3, 4]], "first") == []
    tracker.delivered([1, 2])
    assert tracker.suspects == {3, 4}
    assert tracker.death([[4, 5]], "second") == [4]
    tracker.reset()
    assert not tracker.suspects and not tracker.deaths


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (
            "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            "RuntimeError: unable to allocate shared memory(shm) for file </torch_9_1_0>: No space left on device (28)",
            "shm",
        ),
        ("DataLoader worker (pid 100) is killed by signal: Bus error. It is possible that ...", "shm"),
        ("DataLoader worker (pid 100) is killed by signal: Segmentation fault. ", "died"),
        ("DataLoader worker (pid 999) exited unexpectedly", "stale"),
        ("[Errno 28] No space left on device: '/data/cache.bin'", "none"),
    ],
)
def test_worker_death_classifies_shm_exhaustion_as_a_resource_fault(message, kind):
    it = SimpleNamespace(_workers=[SimpleNamespace(pid=100, is_alive=lambda: True)])
    assert worker_death(it, RuntimeError(message)) == kind


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["recommend", "apply"])
def test_shm_error_in_a_worker_steps_down_and_serves_the_batch_again(tmp_path, mode, caplog):
    ds = ShmFullOnce(48, at=13, flag=str(tmp_path / "full"))
    loader = DataLoader(ds, batch_size=4, num_workers=2, prefetch_factor=2)
    with quiet(loader, mode=mode) as t, caplog.at_level(logging.WARNING, "loadertune"):
        assert flat(t) == list(range(48))
        # 2 x 2 in flight halved.
        assert t.config.num_workers * t.config.prefetch_factor == 2
        faults = [e for e in t.events if e.kind == "fault"]
        assert [e.data["cause"] for e in faults] == ["shm"]
    assert "/dev/shm is full" in caplog.text
