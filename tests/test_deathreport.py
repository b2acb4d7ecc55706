"""loadertune.deathreport: torch's report of a dead worker never lands in loadertune's own code."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from torch.utils.data import DataLoader

from loadertune.deathreport import DeathReportHold
from loadertune.timer import LoopTimer
from tests._factories import Indexed, quiet

pytestmark = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="needs the main thread (signal handlers)",
)


def test_a_signal_while_holding_waits_for_delivery_and_goes_straight_on_otherwise():
    calls = []
    hold = DeathReportHold()
    hold._previous = lambda signum, frame: calls.append(signum)
    hold._handle(signal.SIGCHLD, None)
    assert calls == [signal.SIGCHLD] and not hold.pending
    hold.holding = True
    hold._handle(signal.SIGCHLD, None)
    assert calls == [signal.SIGCHLD] and hold.pending
    with hold.released():
        hold._handle(signal.SIGCHLD, None)
        assert len(calls) == 2
    assert hold.holding
    hold.deliver()
    assert len(calls) == 3 and not hold.pending


def test_install_wraps_torchs_handler_once_and_only_once_torch_set_it(monkeypatch):
    from torch.utils.data import _utils

    def torchs(signum, frame):
        pass

    def later(signum, frame):
        pass

    before = signal.signal(signal.SIGCHLD, torchs)
    try:
        hold = DeathReportHold()
        monkeypatch.setattr(_utils.signal_handling, "_SIGCHLD_handler_set", False)
        hold.install()
        assert signal.getsignal(signal.SIGCHLD) is torchs  # torch has not set its own yet
        monkeypatch.setattr(_utils.signal_handling, "_SIGCHLD_handler_set", True)
        hold.install()
        assert signal.getsignal(signal.SIGCHLD) == hold._handle and hold._previous is torchs
        # A handler set since may call on to the hold: wrapping it too would loop for ever.
        signal.signal(signal.SIGCHLD, later)
        hold.install()
        assert signal.getsignal(signal.SIGCHLD) is later
    finally:
        signal.signal(signal.SIGCHLD, before)


class _StopsAt(Indexed):
    """The first worker to load sample 8 says so in ``flag`` and stops there (in __getitem__,
    holding no lock of torch's), until it is killed; loaded again, sample 8 comes at once."""

    def __init__(self, n: int, flag: str) -> None:
        super().__init__(n)
        self.flag = flag

    def __getitem__(self, i):
        if i == 8 and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            time.sleep(60)
        return super().__getitem__(i)


@pytest.mark.timeout(60)
def test_a_death_reported_while_loadertune_counts_a_batch_is_recovered_from(monkeypatch, tmp_path):
    # The report landed in the hot path's bookkeeping after a batch (a segfaulting sample in apply
    # mode, seen in a full suite run) and torch's raw RuntimeError reached the loop. Made
    # deterministic: the worker is killed, stopped at sample 8, while a batch is being counted.
    flag = tmp_path / "at8"
    real_record = LoopTimer.record
    killed = []

    def record_killing_the_worker(self, *args, **kw):
        if not killed and flag.exists():
            (worker,) = t._pipeline.src_it._workers
            killed.append(worker.pid)
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(10)  # its SIGCHLD arrives here, in loadertune's code
        return real_record(self, *args, **kw)

    monkeypatch.setattr(LoopTimer, "record", record_killing_the_worker)
    with quiet(DataLoader(_StopsAt(40, str(flag)), batch_size=4, num_workers=1), mode="apply") as t:
        got = []
        for b in t:
            got.extend(int(i) for i in b)
            if not flag.exists() and len(got) == 4:
                while not flag.exists():  # the worker is at sample 8 (it prefetches 2 batches)
                    time.sleep(0.01)
        assert killed
        assert got == list(range(40))
        assert [e.data["cause"] for e in t.events if e.kind == "fault"] == ["died"]
