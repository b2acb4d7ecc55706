"""loadertune.shutdown: old workers stop, and their deaths never reach the caller.

Workers die on cue through a multiprocessing finalizer registered by ``worker_init_fn``: it runs
when the worker leaves its loop, that is, while ``shutdown_loader`` (or torch's
``_shutdown_workers``) is joining it, which is exactly the window of issue 19.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from multiprocessing import util as mp_util
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data import _utils as data_utils

from loadertune.shutdown import _names_other_workers, shutdown_loader

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods()
    or threading.current_thread() is not threading.main_thread(),
    reason="needs fork and the main thread (torch's SIGCHLD handler)",
)


class _Range(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i])


def _abort() -> None:
    faulthandler.disable()  # pytest's faulthandler, inherited by the fork, would dump stacks
    os.abort()  # what "terminate called without an active exception" ends in: SIGABRT


def _abort_at_exit(_worker_id: int) -> None:
    mp_util.Finalize(None, _abort, exitpriority=100)


def _sigkill_at_exit(_worker_id: int) -> None:
    mp_util.Finalize(None, os.kill, args=(os.getpid(), signal.SIGKILL), exitpriority=100)


def _hang_at_exit(_worker_id: int) -> None:
    def hang() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
        while True:
            time.sleep(1)

    mp_util.Finalize(None, hang, exitpriority=100)


def _loader(worker_init_fn: Any = None, **kwargs: Any) -> DataLoader:
    return DataLoader(
        _Range(),
        batch_size=4,
        num_workers=2,
        worker_init_fn=worker_init_fn,
        multiprocessing_context="fork",
        **kwargs,
    )


def _started(loader: DataLoader) -> tuple[Any, list[Any]]:
    it = iter(loader)
    next(it)  # the workers are up and running their loop
    return it, list(it._workers)


def _assert_reaped(workers: list[Any]) -> None:
    for w in workers:
        assert w.exitcode is not None, f"worker {w.pid} still running"
        with pytest.raises(ProcessLookupError):
            os.kill(w.pid, 0)  # reaped: not even a zombie left


def test_the_hazard_workers_abort_at_exit_under_torchs_own_shutdown() -> None:
    # The failure being fixed, as torch shows it: the workers die of SIGABRT while torch's own
    # shutdown joins them, and its SIGCHLD handler raises in the main thread when the signal
    # lands inside the join (whether it does is a race: the raise is not asserted, the deaths are).
    it, workers = _started(_loader(_abort_at_exit))
    try:
        it._shutdown_workers()
    except RuntimeError as exc:
        assert re.search(r"DataLoader worker \(pid \d+\) is killed by signal", str(exc)), exc
    for w in workers:
        w.join(10)
    assert [w.exitcode for w in workers] == [-signal.SIGABRT] * len(workers)


@pytest.mark.parametrize(
    ("init", "signum"), [(_abort_at_exit, signal.SIGABRT), (_sigkill_at_exit, signal.SIGKILL)]
)
def test_worker_dying_during_shutdown_does_not_raise(
    init: Any, signum: int, caplog: pytest.LogCaptureFixture
) -> None:
    loader = _loader(init)
    it, workers = _started(loader)
    with caplog.at_level(logging.WARNING, logger="loadertune"):
        shutdown_loader(loader, it)  # must not raise
    assert [w.exitcode for w in workers] == [-signum] * len(workers)
    _assert_reaped(workers)
    assert signal.Signals(signum).name in caplog.text and "ignored" in caplog.text
    # The handler stays armed for other loaders: a healthy one still works end to end.
    assert sum(len(b) for b in _loader()) == 64


def test_worker_that_ignores_sigterm_is_killed_not_leaked(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's join waits MP_STATUS_CHECK_INTERVAL (5 s) before SIGTERM; shorten it for the test.
    monkeypatch.setattr(data_utils, "MP_STATUS_CHECK_INTERVAL", 0.3)
    loader = _loader(_hang_at_exit)
    it, workers = _started(loader)
    shutdown_loader(loader, it)
    assert [w.exitcode for w in workers] == [-signal.SIGKILL] * len(workers)
    _assert_reaped(workers)


def test_workers_that_ignore_sigterm_share_one_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    from loadertune import shutdown as shutdown_module

    now = [0.0]

    class _Clock:
        @staticmethod
        def monotonic() -> float:
            return now[0]

    class _Stubborn:
        """A worker that ignores SIGTERM: every join runs out its timeout; SIGKILL ends it."""

        pid = 1

        def __init__(self) -> None:
            self.exitcode: int | None = None

        def is_alive(self) -> bool:
            return self.exitcode is None

        def terminate(self) -> None:
            pass

        def kill(self) -> None:
            self.exitcode = -signal.SIGKILL

        def join(self, timeout: float) -> None:
            if self.exitcode is None:
                now[0] += timeout

    monkeypatch.setattr(shutdown_module, "time", _Clock)
    workers = [_Stubborn() for _ in range(8)]
    shutdown_module._reap(workers)
    assert [w.exitcode for w in workers] == [-signal.SIGKILL] * 8
    # One grace period for all eight, not eight in a row (16 s of a job's exit).
    assert now[0] == pytest.approx(shutdown_module._TERM_WAIT_S)


def test_persistent_iterator_on_the_loader_is_stopped_and_cleared() -> None:
    loader = _loader(persistent_workers=True)
    it, workers = _started(loader)
    assert loader._iterator is it
    shutdown_loader(loader, None)
    assert loader._iterator is None
    assert [w.exitcode for w in workers] == [0, 0]
    _assert_reaped(workers)
    shutdown_loader(loader, it)  # again: a no-op


def test_nothing_to_stop() -> None:
    shutdown_loader(None, None)
    loader = DataLoader(_Range(), batch_size=4)
    it = iter(loader)
    next(it)
    shutdown_loader(loader, it)  # no workers: nothing happens
    assert len(list(it)) == 15  # and the single-process iterator still works


def test_healthy_workers_exit_cleanly_and_quietly(caplog: pytest.LogCaptureFixture) -> None:
    loader = _loader()
    it, workers = _started(loader)
    with caplog.at_level(logging.WARNING, logger="loadertune"):
        shutdown_loader(loader, it)
    assert [w.exitcode for w in workers] == [0, 0]
    assert "loadertune" not in caplog.text


def test_only_other_iterators_deaths_are_passed_on() -> None:
    class _W:
        def __init__(self, pid: int) -> None:
            self.pid = pid

    ours = [_W(11), _W(12)]
    assert not _names_other_workers(
        RuntimeError("DataLoader worker (pid 11) is killed by signal: Aborted. "), ours
    )
    assert _names_other_workers(
        RuntimeError("DataLoader worker (pid 99) is killed by signal: Killed. "), ours
    )
    assert _names_other_workers(
        RuntimeError("DataLoader worker (pid(s) 12, 99) exited unexpectedly"), ours
    )
    assert not _names_other_workers(RuntimeError("something else"), ours)



_HELD_LOCK_JOB = """
import logging, sys
from torch.utils.data import DataLoader
from loadertune.shutdown import shutdown_loader

logging.basicConfig(level=logging.INFO, format="%(message)s")
loader = DataLoader(list(range(64)), batch_size=4, num_workers=2, multiprocessing_context="fork")
it = iter(loader)
next(it)
workers = list(it._workers)
if sys.argv[1] == "done":
    # A worker terminated inside done_event.is_set() (torch's finally after an interrupted
    # join) keeps the event's lock for good; torch's shutdown sets the event first.
    it._workers_done_event._cond.acquire()
else:
    # A put() cut by Ctrl-C right after it took the queue's lock: torch's shutdown (put(None))
    # and multiprocessing's close of the queue at interpreter exit both take it.
    it._index_queues[0]._notempty.acquire()
shutdown_loader(loader, it)
print("stopped", [w.exitcode is not None for w in workers], flush=True)
"""


@pytest.mark.parametrize("lock", ["done", "queue"])
def test_a_lock_left_held_lets_the_shutdown_and_the_exit_finish(tmp_path: Any, lock: str) -> None:
    # Held by the job itself, which cannot take it twice either: before, it never exited.
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(_HELD_LOCK_JOB)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    job = subprocess.Popen(
        [sys.executable, str(script), lock], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,  # a hung job's workers (blocked on the lock too) go with it
    )
    try:
        out, err = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, err = job.communicate()
        pytest.fail(f"the job did not exit within 60 s: stdout {out!r}")
    proc = subprocess.CompletedProcess(job.args, job.returncode, out, err)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped [True, True]" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    held = "workers' done event" if lock == "done" else "index queue"
    assert f"the lock of its {held} was left held" in proc.stderr
