"""torch's report of a dead DataLoader worker, held until the next batch request.

torch's SIGCHLD handler (``torch.utils.data._utils.signal_handling``) raises its RuntimeError in
the main thread wherever that thread is when a worker dies. Raised inside ``next()`` on the
iterator, the report reaches loadertune's recovery; raised anywhere else (the training step,
loadertune's bookkeeping after a batch) it ends the job with torch's error, and a worker that
dies while the others keep delivering is mostly reported there (seen: a sample that segfaults
its worker, in apply mode). So while a TunedLoader serves an epoch, a SIGCHLD that comes outside
its ``next()`` on the iterator is held, and its handler runs at the start of the next
``next()``, inside the same ``try`` as the batch: the death is handled there, one training step
later at most. Outside an epoch (and in other threads' loops) torch's behaviour is unchanged.
A plain DataLoader read while an epoch is held learns of its own worker's death from torch's
own check instead (its ``get`` times out every 5 s and looks at its workers).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["HOLD", "DeathReportHold"]


class DeathReportHold:
    """Wraps torch's SIGCHLD handler; ``holding`` is set by the loop outside its ``next()``.

    ``pending`` says a SIGCHLD came while holding and :meth:`deliver` has yet to run its handler.
    """

    __slots__ = ("_delivering", "_previous", "holding", "pending")

    def __init__(self) -> None:
        self.holding = False
        self.pending = False
        self._previous: Any = None
        # Set while deliver() runs the handler: a SIGCHLD that comes meanwhile goes straight on.
        self._delivering = False

    def install(self) -> None:
        """Wraps torch's SIGCHLD handler, once per process: call it after torch started workers.

        Only from the main thread (where Python runs signal handlers) and once torch has set its
        handler (it does so once per process, so it never wraps this one); elsewhere torch's
        behaviour stays as it is. Never twice: a handler set since that calls on to this one
        would otherwise be called back from it, without end.
        """
        if self._previous is not None or threading.current_thread() is not threading.main_thread():
            return
        from torch.utils.data import _utils

        current = signal.getsignal(signal.SIGCHLD)
        if not _utils.signal_handling._SIGCHLD_handler_set or not callable(current):
            return
        self._previous = current
        signal.signal(signal.SIGCHLD, self._handle)

    def deliver(self) -> None:
        """Runs the handler of the SIGCHLD held: torch raises its report here if a worker died."""
        self.pending = False
        previous = self._previous
        if previous is None:
            return
        self._delivering = True
        try:
            previous(signal.SIGCHLD, None)
        finally:
            self._delivering = False

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Reports go straight through in this block: for code that itself waits on a torch
        iterator and handles its workers' deaths (a throwaway load)."""
        holding, self.holding = self.holding, False
        try:
            yield
        finally:
            self.holding = holding

    def _handle(self, signum: int, frame: Any) -> None:
        if self.holding and not self._delivering:
            self.pending = True
            return
        if self._previous is not None:
            self._previous(signum, frame)


#: The process's one hold (there is one SIGCHLD handler per process).
HOLD = DeathReportHold()
