"""Ctrl-C held while loadertune starts or stops DataLoader workers.

A KeyboardInterrupt lands at whatever bytecode the main thread runs next. Inside the code that
starts or stops workers it can leave a lock held for good: a ``multiprocessing`` queue's
``put`` cut right after it took its ``notempty`` lock, a worker terminated by torch's
``finally`` while it held the done event's lock, a fork whose at-fork hook swallows the
interrupt. The next shutdown, or the interpreter's exit, then waits on that lock forever: a job
that does not exit after Ctrl-C. So the first Ctrl-C is held until the workers have started or
stopped, then raised; a second one raises at once, for a user who will not wait.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["sigint_held"]


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Holds the first Ctrl-C (SIGINT) until the block ends, then delivers it.

    Delivery calls the handler that was installed before (Python's default raises
    KeyboardInterrupt), so a training script's own SIGINT handler sees the press too. A second
    press inside the block is delivered at once. Outside the main thread, under a nested block,
    or when SIGINT is ignored or not handled from Python, the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    # SIG_IGN, SIG_DFL or set outside Python: not ours to wrap; an outer block's: part of it.
    if not callable(previous) or getattr(previous, "_loadertune_hold", False):
        yield
        return
    pressed: list[Any] = []

    def hold(signum: int, frame: Any) -> None:
        if pressed:
            # The second press: the user will not wait. The handler goes back first, so that
            # whatever the delivery raises, nothing of this block stays installed.
            pressed.clear()
            signal.signal(signal.SIGINT, previous)
            previous(signum, frame)
        else:
            pressed.append(frame)

    hold._loadertune_hold = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed:
            # Delivered even when the block raised: the press is the user's last word.
            previous(signal.SIGINT, pressed[0])
