"""Shared fixtures: every test leaves no worker process or sampler thread behind."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import psutil
import pytest


def pytest_sessionstart(session: pytest.Session) -> None:
    # Many tests start Python processes that import loadertune (jobs, ranks, the CLI). Where
    # PYTHONDONTWRITEBYTECODE is set (CI machines often set it) no import writes bytecode, and
    # each of those processes would compile the package again (~0.8 s on 2 CPUs): compiled once
    # here instead. compileall writes only what is missing or stale.
    import compileall

    import loadertune

    compileall.compile_dir(Path(loadertune.__file__).parent, quiet=1)


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background of a shell without job control (`cmd &` in a script,
    # nohup) inherits SIGINT ignored, and every process it starts would too: the tests that
    # interrupt a job would then see it finish untouched. Restore Python's default handler, so
    # that the processes the tests start get SIGINT's default action.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


#: loadertune's threads that must end with the run that started them.
_THREADS = ("loadertune-sampler", "loadertune-prestart")


@pytest.fixture(autouse=True)
def _no_leaks():
    before_children = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    # Workers that a test started must be gone when it ends (give the OS a moment to reap).
    leftover = []
    for p in psutil.Process().children(recursive=True):
        if p.pid in before_children:
            continue
        try:
            p.wait(timeout=5)
        except psutil.TimeoutExpired:
            leftover.append(p)
        except psutil.NoSuchProcess:
            pass
    for p in leftover:
        p.kill()
    assert not leftover, f"child processes outlived the test: {[p.pid for p in leftover]}"
    threads = [t for t in threading.enumerate() if t.name in _THREADS and t.is_alive()]
    for t in threads:
        t.join(timeout=2)
    alive = sorted({t.name for t in threads if t.is_alive()})
    assert not alive, f"loadertune threads outlived the test: {alive}"
