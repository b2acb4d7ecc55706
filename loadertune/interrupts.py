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

# True while a sigint_held() block runs in the main thread: an inner block is part of it.
_holding = False


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Holds the first Ctrl-C (SIGINT) until the block ends, then delivers it.

    Delivery calls the handler that was installed before (Python's default raises
    KeyboardInterrupt), so a training script's own SIGINT handler sees the press too. A second
    press inside the block is delivered at once. Outside the main thread, under a nested block,
    or when SIGINT is ignored or not handled from Python, the block runs as it is.
    """
    global _holding
    if _holding or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN, SIG_DFL, or set outside Python: not ours to wrap
        yield
        return
    pressed: list[Any] = []

    def hold(signum: int, frame: Any) -> None:
        if pressed:
            pressed.clear()  # delivered now, not again when the block ends
            previous(signum, frame)  # the second press: the user will not wait
        else:
            pressed.append(frame)

    signal.signal(signal.SIGINT, hold)
    _holding = True
    try:
        yield
    finally:
        _holding = False
        signal.signal(signal.SIGINT, previous)
        if pressed:
            # Delivered even when the block raised: the press is the user's last word.
            previous(signal.SIGINT, pressed[0])
