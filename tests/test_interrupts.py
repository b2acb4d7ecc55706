"""Ctrl-C anywhere in a rebuild (issue 14, "Interrupts"): deterministic, no timed signals.

KeyboardInterrupt is raised at chosen points by patching; for each point the interrupt reaches
the caller, and after ``close()`` no worker process, no extra thread, no extra file descriptor
and no /dev/shm ``torch_*`` segment of this process is left. The interrupted epoch's iterator then
refuses clearly (RuntimeError naming the interrupt) or, for an interrupt in ``next()`` outside a
rebuild, goes on exactly-once; a new ``iter()`` is always a clean, complete epoch.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing.process
import os
import signal
import threading
import time

import psutil
import pytest
from torch.utils.data import DataLoader, Dataset

import loadertune
import loadertune.shutdown as shutdown_module
from loadertune.interrupts import sigint_held
from loadertune.pipeline import LoaderPipeline
from loadertune.stream import EpochStream
from tests._factories import flat as _flat
from tests._factories import rest as _rest

N = 64


class Indexed(Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> int:
        return i


@pytest.fixture(scope="module", autouse=True)
def _warm():
    # One loader run before any baseline: multiprocessing's and torch's one-time set-up (the
    # resource tracker, torch's shared-memory manager state) is not taken for a leak.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    with _tuned() as t:
        list(t)
        t.reconfigure(num_workers=1)
        list(t)


def _tuned():
    return loadertune.tune(
        DataLoader(Indexed(), batch_size=4, num_workers=2), mode="apply", host=None, gpu=None, window_s=3600.0
    )


def _shm() -> set[str]:
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return set()
    mine = f"_{os.getpid()}_"
    return {n for n in names if n.startswith("torch_") and mine in n}


def _fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone already
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


def _snapshot():
    gc.collect()
    me = psutil.Process()
    return (
        {p.pid for p in me.children(recursive=True)},
        {t.ident for t in threading.enumerate()},
        me.num_fds(),
        _shm(),
    )


def _assert_back_to(baseline) -> None:
    children, threads, fds, shm = baseline
    deadline = time.monotonic() + 5.0
    while True:
        gc.collect()
        me = psutil.Process()
        alive = [p for p in me.children(recursive=True) if p.pid not in children and p.status() != psutil.STATUS_ZOMBIE]
        extra = [t.name for t in threading.enumerate() if t.ident not in threads and t.is_alive()]
        now_fds = me.num_fds()
        left_shm = _shm() - shm
        if not (alive or extra or now_fds > fds or left_shm) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not alive, f"worker processes alive after close(): {[p.pid for p in alive]}"
    assert not extra, f"threads alive after close(): {extra}"
    assert now_fds <= fds, f"open fds {fds} -> {now_fds}: {_fds()}"
    assert not left_shm, f"/dev/shm segments left: {left_shm}"


class _Once:
    """Raises KeyboardInterrupt the ``at``-th time it is called (1-based), then never again."""

    def __init__(self, at: int = 1) -> None:
        self.at = at
        self.calls = 0
        self.fired = False

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.at and not self.fired:
            self.fired = True
            raise KeyboardInterrupt


def _patch_points(monkeypatch, point: str, once: _Once) -> None:
    if point.startswith("worker_start"):  # (the k-th start: _Once(at=k))
        real = multiprocessing.process.BaseProcess.start

        def start(self):
            once()  # the k-th worker's start: k-1 workers of the new loader are running
            return real(self)

        monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)
    elif point == "dataloader_iter":
        real_iter = DataLoader.__iter__

        def it(self):
            if getattr(self, "_loadertune_internal", False):
                once()
            return real_iter(self)

        monkeypatch.setattr(DataLoader, "__iter__", it)
    elif point == "torch_shutdown_start":
        from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter as M

        real_sd = M._shutdown_workers

        def sd(self):
            once()
            return real_sd(self)

        monkeypatch.setattr(M, "_shutdown_workers", sd)
    elif point == "torch_shutdown_join":
        # Inside torch's _shutdown_workers, in the join of the first worker (the done event is
        # set, the index queues not yet closed).
        from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter as M

        real_sd = M._shutdown_workers

        def sd(self):
            for w in self._workers:
                real_join = w.join

                def join(timeout=None, _real=real_join):
                    once()
                    return _real(timeout)

                w.join = join
            return real_sd(self)

        monkeypatch.setattr(M, "_shutdown_workers", sd)
    elif point == "reap":
        real_reap = shutdown_module._reap

        def reap(workers):
            once()
            return real_reap(workers)

        monkeypatch.setattr(shutdown_module, "_reap", reap)
    elif point == "between":
        real_inner = LoaderPipeline._shutdown_inner

        def inner(self):
            real_inner(self)
            once()  # the old loader is stopped, the new one not started

        monkeypatch.setattr(LoaderPipeline, "_shutdown_inner", inner)
    elif point == "requeue":
        real_requeue = EpochStream.requeue

        def requeue(self, items):
            once()
            return real_requeue(self, items)

        monkeypatch.setattr(EpochStream, "requeue", requeue)
    else:
        raise AssertionError(point)


# (point, the change that runs into it): a worker-count change hands over (the old loader
# drains), a batch-size change re-queues and stops the old loader inside rebuild.
POINTS = [
    ("worker_start_1", dict(num_workers=3)),  # the new loader's first worker
    ("worker_start_3", dict(num_workers=3)),  # after 2 of its 3 workers started
    ("dataloader_iter", dict(num_workers=3)),
    ("torch_shutdown_start", dict(batch_size=8)),
    ("torch_shutdown_join", dict(batch_size=8)),
    ("reap", dict(batch_size=8)),
    ("between", dict(batch_size=8)),
    ("requeue", dict(batch_size=8)),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("point", "change"), POINTS, ids=[p for p, _ in POINTS])
def test_an_interrupt_in_a_rebuild_reaches_the_caller_and_leaves_nothing(monkeypatch, point, change):
    baseline = _snapshot()
    t = _tuned()
    try:
        it = iter(t)
        got = _flat([next(it) for _ in range(3)])
        once = _Once(int(point.rsplit("_", 1)[1]) if point.startswith("worker_start") else 1)
        with monkeypatch.context() as m:
            _patch_points(m, point, once)
            with pytest.raises(KeyboardInterrupt):
                t.reconfigure(**change)
        assert once.fired
        # The interrupted epoch refuses clearly (its rebuild did not finish) ...
        with pytest.raises(RuntimeError, match="interrupted"):
            next(it)
        with pytest.raises(RuntimeError, match="interrupted"):
            next(it)
        assert got  # (what it had delivered stays delivered)
        # ... and the next iter() is a clean, complete epoch.
        assert sorted(_flat(t)) == list(range(N))
    finally:
        t.close()
    del t, it
    _assert_back_to(baseline)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["drain_next", "drain_shutdown"])
def test_an_interrupt_in_the_hand_over_drain(monkeypatch, where):
    baseline = _snapshot()
    t = _tuned()
    try:
        it = iter(t)
        got = _flat([next(it) for _ in range(3)])
        t.reconfigure(num_workers=3)
        pipeline = t._pipeline
        assert pipeline.draining
        if where == "drain_next":
            # Ctrl-C while the loop waits on the old loader's in-flight batch: a plain next()
            # interrupted, the epoch goes on exactly-once.
            drain_it = pipeline._drain.it
            real_next = drain_it._next_data
            once = _Once()

            def next_data():
                once()
                return real_next()

            drain_it._next_data = next_data
            with pytest.raises(KeyboardInterrupt):
                next(it)
            del drain_it._next_data
            del drain_it, real_next, next_data  # (they hold the old iterator)
            assert got + _rest(it) == list(range(N))
        else:
            # Ctrl-C while the drained old loader is being stopped (finish_drain).
            once = _Once()
            real_sd = LoaderPipeline._shutdown_drain

            def sd(self):
                if self._drain is not None:
                    once()
                return real_sd(self)

            with monkeypatch.context() as m:
                m.setattr(LoaderPipeline, "_shutdown_drain", sd)
                with pytest.raises(KeyboardInterrupt):
                    while True:
                        got += [int(i) for i in next(it)]
            rest = _rest(it)
            assert got + rest == list(range(N))
        assert sorted(_flat(t)) == list(range(N))
    finally:
        t.close()
    del t, it
    _assert_back_to(baseline)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("k", [1, 2])
def test_an_interrupt_while_iter_starts_the_workers(monkeypatch, k):
    # Ctrl-C inside iter(tuned) (the epoch's loader starting its k-th worker): no iterator was
    # handed out; the next iter() is a clean epoch.
    baseline = _snapshot()
    t = _tuned()
    try:
        list(t)
        once = _Once(k)
        with monkeypatch.context() as m:
            _patch_points(m, "worker_start", once)
            with pytest.raises(KeyboardInterrupt):
                iter(t)
        assert once.fired
        assert _flat(t) == list(range(N))
    finally:
        t.close()
    del t
    _assert_back_to(baseline)


_SMOKE = """
import faulthandler, os, signal, sys, time
# A hang (seen once in a full-suite run, never reproduced alone) leaves its threads' stacks.
faulthandler.dump_traceback_later(60, exit=False)
import torch
from torch.utils.data import DataLoader, Dataset
import loadertune

MARK, PIDFILE, FLAG = sys.argv[1], sys.argv[2], sys.argv[3]
MAIN = os.getpid()
open(PIDFILE, "w").write(str(MAIN))

class Data(Dataset):
    def __len__(self):
        return 4000
    def __getitem__(self, i):
        if i == 700 and not os.path.exists(FLAG):
            open(FLAG, "w").close()
            os.kill(MAIN, signal.SIGINT)  # Ctrl-C, from whichever process loads sample 700
        time.sleep(0.0005)
        return i

t = loadertune.tune(DataLoader(Data(), batch_size=8, num_workers=2), mode="apply", host=None, gpu=None)
steps = 0
for epoch in range(3):
    for batch in t:
        steps += 1
        if steps % 5 == 0:  # rebuild-heavy: a change every 5 batches
            n = (steps // 5) % 3 + 1
            t.reconfigure(num_workers=n, batch_size=8 if n != 2 else 16)
print("finished without the interrupt", flush=True)
"""


@pytest.mark.timeout(90)
def test_a_real_sigint_in_a_rebuild_heavy_job_exits_and_leaves_no_process(tmp_path):
    import subprocess
    import sys

    marker = f"lt-sigint-smoke-{os.getpid()}-{time.monotonic_ns()}"
    script = tmp_path / "job.py"
    script.write_text(_SMOKE)
    pidfile, flag = tmp_path / "pid", tmp_path / "flag"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(
            [sys.executable, str(script), marker, str(pidfile), str(flag)],
            capture_output=True,
            text=True,
            timeout=80,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr or ""
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        pytest.fail(f"the job did not exit 80 s after its SIGINT; its threads at 60 s:\n{err[-6000:]}")
    assert flag.exists(), proc.stderr[-2000:]
    assert "finished without the interrupt" not in proc.stdout
    assert "KeyboardInterrupt" in proc.stderr, proc.stderr[-2000:]
    # Python dies of the SIGINT it did not handle (exit status -2).
    assert proc.returncode == -2, (proc.returncode, proc.stderr[-2000:])
    deadline = time.monotonic() + 5.0
    while True:
        left = []
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"processes of the interrupted job left: {left} (main pid {pidfile.read_text()})"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("point", ["torch_shutdown_start", "torch_shutdown_join", "reap"])
def test_an_interrupt_in_close_is_finished_by_a_second_close(monkeypatch, point):
    # Ctrl-C while close() stops the workers (mid-epoch, so a loader is running): it reaches the
    # caller, and close() again (or the one at interpreter exit) leaves nothing behind.
    baseline = _snapshot()
    t = _tuned()
    it = iter(t)
    next(it)
    once = _Once()
    with monkeypatch.context() as m:
        _patch_points(m, point, once)
        with pytest.raises(KeyboardInterrupt):
            t.close()
    assert once.fired
    t.close()
    del t, it
    _assert_back_to(baseline)


# -- loadertune.interrupts: Ctrl-C held while workers start or stop -----------------------------
def _press() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # delivered to this (the main) thread before kill returns


def test_a_sigint_in_a_held_block_is_raised_when_the_block_ends():
    reached = []
    with pytest.raises(KeyboardInterrupt) as caught, sigint_held():
        _press()
        reached.append("after the press")
    assert reached == ["after the press"]
    assert caught.value.__context__ is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_sigint_in_a_held_block_raises_at_once_and_once():
    reached = []
    with pytest.raises(KeyboardInterrupt) as caught, sigint_held():
        _press()
        reached.append(1)
        _press()
        reached.append(2)
    assert reached == [1]
    assert caught.value.__context__ is None  # not a second KeyboardInterrupt at the block's end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_sigint_still_comes_when_the_block_raises():
    with pytest.raises(KeyboardInterrupt) as caught, sigint_held():
        _press()
        raise ValueError("the block's own error")
    assert isinstance(caught.value.__context__, ValueError)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with sigint_held():
            _press()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_held_sigint_goes_to_the_scripts_own_handler():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with sigint_held():
            _press()
            assert seen == []
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_nested_held_block_leaves_the_press_to_the_outer_one():
    order = []
    with pytest.raises(KeyboardInterrupt), sigint_held():
        with sigint_held():
            _press()
        order.append("inner ended")
    assert order == ["inner ended"]


def test_a_held_block_outside_the_main_thread_runs_as_it_is():
    errors = []

    def body():
        try:
            with sigint_held():
                pass
        except Exception as exc:  # signal.signal() raises ValueError outside the main thread
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert errors == []


def test_a_real_sigint_during_a_rebuild_comes_after_it_and_the_epoch_goes_on(monkeypatch):
    # Ctrl-C while the new loader's first worker starts: before, the rebuild was cut there and
    # the rest of the epoch refused; now the rebuild finishes, then the KeyboardInterrupt comes.
    baseline = _snapshot()
    t = _tuned()
    try:
        it = iter(t)
        got = [next(it) for _ in range(3)]
        pressed = []
        real_start = multiprocessing.process.BaseProcess.start

        def start(self):
            if not pressed:
                pressed.append(True)
                _press()
            return real_start(self)

        with monkeypatch.context() as m:
            m.setattr(multiprocessing.process.BaseProcess, "start", start)
            with pytest.raises(KeyboardInterrupt):
                t.reconfigure(num_workers=3, batch_size=8)
        assert pressed
        assert t.config.num_workers == 3 and t.config.batch_size == 8
        got += list(it)
        assert _flat(got) == list(range(N))  # exactly once, in order
    finally:
        t.close()
    del t, it, got  # the batches hold shared-memory descriptors
    _assert_back_to(baseline)
