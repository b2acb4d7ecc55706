"""Stalls (issue 15): a sample whose read hangs is named, with the process and stack that hold it."""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import threading
import time
from collections import deque
from types import SimpleNamespace

import pytest
from torch.utils.data import DataLoader, Dataset

import loadertune
from loadertune.events import EventLog
from loadertune.options import TuneOptions
from loadertune.stall import STALL_FLOOR_S, StallWatch, derived_timeout_s

_CTX = mp.get_context("fork")
STUCK = 21


class Hangs(Dataset):
    """Sample ``STUCK`` blocks on a semaphore until the test releases it (no sleep-and-hope).

    ``once``: only the first load of it blocks (a transient hang); later loads return at once.
    A semaphore, not an Event: a worker killed while waiting leaves an Event's condition broken.
    """

    def __init__(self, n: int, *, once: bool = False) -> None:
        self.n = n
        self.gate = _CTX.Semaphore(0)
        self.blocked_at = _CTX.Value("d", 0.0)
        self.loads = _CTX.Value("i", 0)
        self.once = once

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return self._read_slowly(i)

    def _read_slowly(self, i: int) -> int:
        if i == STUCK:
            with self.loads.get_lock():
                self.loads.value += 1
                first = self.loads.value == 1
            if first or not self.once:
                self.blocked_at.value = time.time()
                if self.gate.acquire(timeout=60):
                    self.gate.release()  # open for good
        return i

    def release(self) -> None:
        self.gate.release()


def _run_epoch(tuned) -> list[int]:
    seen: list[int] = []
    for batch in tuned:
        seen.extend(int(x) for x in batch)
    return seen


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_stalled_sample_is_named_with_pid_and_stack(workers, caplog):
    ds = Hangs(64)
    stalls = []

    def sink(event):
        if event.kind == "stall":
            stalls.append(event)
            ds.release()  # the hang ends only once it has been reported

    loader = DataLoader(ds, batch_size=4, num_workers=workers, multiprocessing_context=_CTX if workers else None)
    caplog.set_level(logging.WARNING, logger="loadertune")
    with loadertune.tune(loader, stall_timeout_s=1.0, sinks=(sink,), host=None, gpu=None) as tuned:
        seen = _run_epoch(tuned)
    assert sorted(seen) == list(range(64)), "the epoch completes exactly once"
    assert len(stalls) == 1
    data = stalls[0].data
    assert STUCK in data["indices"] and len(data["indices"]) == 4
    assert stalls[0].time - ds.blocked_at.value <= 1.0 + 2.0
    assert "_read_slowly" in data["stack"], "the stack reaches the dataset's function"
    if workers:
        assert data["in_worker"] and data["pid"] != os.getpid()
    else:
        assert not data["in_worker"] and data["pid"] == os.getpid()
    assert data["action"] == "warn"
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "waited" in text and str(STUCK) in text and str(data["pid"]) in text and "_read_slowly" in text


@pytest.mark.timeout(60)
def test_worker_pid_is_the_worker_holding_the_batch():
    ds = Hangs(64)
    seen_pids: dict[str, int] = {}

    def sink(event):
        if event.kind == "stall":
            seen_pids["stall"] = event.data["pid"]
            seen_pids["live"] = set(tuned._pipeline.worker_pids())
            ds.release()

    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=_CTX)
    with loadertune.tune(loader, stall_timeout_s=1.0, sinks=(sink,), host=None, gpu=None) as tuned:
        assert sorted(_run_epoch(tuned)) == list(range(64))
    assert seen_pids["stall"] in seen_pids["live"]


@pytest.mark.timeout(90)
def test_restart_serves_the_stuck_batch_again_exactly_once():
    ds = Hangs(64, once=True)
    events = []
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=_CTX)
    try:
        with loadertune.tune(
            loader, stall_timeout_s=1.0, on_stall="restart", sinks=(events.append,), host=None, gpu=None
        ) as tuned:
            seen = _run_epoch(tuned)
            config = tuned.config
    finally:
        ds.release()
    assert sorted(seen) == list(range(64))
    stall = [e for e in events if e.kind == "stall"]
    faults = [e for e in events if e.kind == "fault"]
    assert [e.data["action"] for e in stall] == ["restart"]
    assert [e.data["cause"] for e in faults] == ["stall"]
    assert config.num_workers == 2, "a restart keeps the settings"
    assert ds.loads.value == 2


@pytest.mark.timeout(60)
def test_restart_is_not_repeated_for_a_hang_that_is_not_transient(caplog):
    ds = Hangs(32)
    events = []

    def sink(event):
        events.append(event)
        if event.kind == "stall" and event.data["action"].startswith("warn"):
            ds.release()

    loader = DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context=_CTX)
    with loadertune.tune(loader, stall_timeout_s=1.0, on_stall="restart", sinks=(sink,), host=None, gpu=None) as tuned:
        seen = _run_epoch(tuned)
    assert sorted(seen) == list(range(32))
    actions = [e.data["action"] for e in events if e.kind == "stall"]
    assert actions == ["restart", "warn (restarted once already)"]


@pytest.mark.timeout(30)
def test_no_stall_reported_when_batches_flow_and_stack_dir_removed():
    loader = DataLoader(list(range(40)), batch_size=4, num_workers=2, multiprocessing_context=_CTX)
    tuned = loadertune.tune(loader, stall_timeout_s=5.0, host=None, gpu=None)
    directory = tuned._stall.directory
    assert sorted(_run_epoch(tuned)) == list(range(40))
    assert os.listdir(directory), "each worker has its dump file"
    tuned.close()
    assert not os.path.exists(directory)
    assert not any(e.kind == "stall" for e in tuned.events)
    assert not [t for t in threading.enumerate() if t.name == "loadertune-stall" and t.is_alive()]


def test_user_worker_init_fn_still_runs():
    flag = _CTX.Value("i", 0)

    def init(worker_id):
        with flag.get_lock():
            flag.value += 1

    loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, worker_init_fn=init, multiprocessing_context=_CTX)
    with loadertune.tune(loader, host=None, gpu=None) as tuned:
        assert sorted(_run_epoch(tuned)) == list(range(8))
    assert flag.value == 2


def test_options():
    assert TuneOptions().stall_timeout_s is None and TuneOptions().on_stall == "warn"
    assert TuneOptions(stall_timeout_s=3).stall_timeout_s == 3.0
    for bad in (0, -1, True, "5", math.nan):
        with pytest.raises(ValueError, match="stall_timeout_s"):
            TuneOptions(stall_timeout_s=bad)
    with pytest.raises(ValueError, match="on_stall"):
        TuneOptions(on_stall="kill")
    loader = DataLoader(list(range(8)), batch_size=2)
    with loadertune.tune(loader, stall_timeout_s=math.inf, host=None, gpu=None) as tuned:
        assert tuned._stall is None
        assert sorted(_run_epoch(tuned)) == list(range(8))


def test_derived_timeout():
    assert derived_timeout_s(None) == STALL_FLOOR_S == 60.0
    assert derived_timeout_s(0.5) == 60.0
    assert derived_timeout_s(10.0) == 200.0


class _Front(SimpleNamespace):
    """A stand-in front end (weak-referenceable, unlike SimpleNamespace itself)."""


def _fake_front(since: float):
    front = _Front(
        _closed=False,
        _wait_since=since,
        _session=SimpleNamespace(metrics=None, events_log=EventLog()),
        _pipeline=SimpleNamespace(kind="sampler", src_it=None, src_issued=deque([[3, 4]])),
        _actuator=None,
        step=7,
        epoch=0,
    )
    return front


def test_reported_at_most_once_per_timeout():
    front = _fake_front(100.0)
    watch = StallWatch(front, timeout_s=10.0, poll_s=3600.0)
    try:
        for now in (105.0, 110.5, 112.0, 119.9, 120.1, 125.0):
            watch.check(now)
        assert [round(r.waited_s, 1) for r in watch.reports] == [10.5, 20.1]
        assert watch.reports[0].indices == [3, 4] and watch.reports[0].pid == os.getpid()
        front._wait_since = 0.0  # the batch came
        watch.check(200.0)
        front._wait_since = 300.0  # waiting for the next one: the count starts again
        watch.check(305.0)
        watch.check(310.0)
        assert len(watch.reports) == 3
        events = front._session.events_log.events
        assert [e.kind for e in events] == ["stall"] * 3 and events[0].data["indices"] == [3, 4]
    finally:
        watch.close()


def test_derived_timeout_follows_the_slowest_window():
    front = _fake_front(0.0)
    watch = StallWatch(front, timeout_s=None, poll_s=3600.0)
    try:
        front._session.metrics = SimpleNamespace(batches_per_s=0.1)  # 10 s per batch
        watch.check(1.0)
        assert watch.timeout_s == 200.0
        front._session.metrics = SimpleNamespace(batches_per_s=100.0)
        watch.check(2.0)
        assert watch.timeout_s == 200.0, "the slowest window so far counts"
    finally:
        watch.close()
