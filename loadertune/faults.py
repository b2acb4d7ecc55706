"""What an exception from ``next()`` on a DataLoader iterator says of its workers.

torch reports a dead worker as "DataLoader worker (pid ...) exited unexpectedly" or "is killed by
signal", but a worker killed while handing over a batch can also surface as a connection reset on
the batch's shared-memory handle; a dead process settles both. Anything else is the dataset's own
error and must reach the user unchanged.
"""

from __future__ import annotations

import re
from typing import Any, Literal

__all__ = ["WORKER_DIED", "Death", "worker_death"]

#: torch's message for a worker that died; group 1 holds the pid(s).
WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")

Death = Literal["died", "stale", "none"]

# How long a connection error waits for a dying worker's exit to become visible.
_DEATH_WAIT_S = 2.0


def worker_death(it: Any, exc: BaseException) -> Death:
    """Classifies ``exc`` raised by ``next(it)``.

    Returns:
        ``"died"``: a worker of ``it`` died; ``"stale"``: the report names none of the current
        workers (a death already recovered from); ``"none"``: the dataset's own error.
    """
    workers = getattr(it, "_workers", None) or []
    match = WORKER_DIED.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if match:
        pids = {int(p) for p in re.findall(r"\d+", match.group(1))}
        if pids and not pids & {w.pid for w in workers}:
            return "stale"
        return "died"
    if any(not w.is_alive() for w in workers):
        return "died"
    if workers and isinstance(exc, (ConnectionError, EOFError)):
        # The dying worker's sockets close before the process is reaped: wait (bounded) for
        # its exit to become visible rather than mistake the death for a dataset error.
        from multiprocessing.connection import wait

        if wait([w.sentinel for w in workers], timeout=_DEATH_WAIT_S):
            return "died"
    return "none"
