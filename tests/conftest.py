"""Shared fixtures: every test leaves no worker process or sampler thread behind."""

from __future__ import annotations

import threading

import psutil
import pytest


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
    threads = [t for t in threading.enumerate() if t.name == "loadertune-sampler" and t.is_alive()]
    for t in threads:
        t.join(timeout=2)
    assert not [t for t in threads if t.is_alive()], "a loadertune sampler thread outlived the test"
