"""Events: what the tuner saw and did, for the log, a JSONL file and any sink.

Every event is one JSON object per line in the event log: ``{"time", "step", "epoch", "kind",
...}``. Kinds: ``start``, ``window`` (metrics and diagnosis), ``recommendation``, ``change``,
``keep``, ``revert``, ``retune``, ``fault``, ``stall`` (the loop waited ``stall_timeout_s`` for one
batch: its indices, the process holding it, its stack), ``memory`` (the workers' memory is
predicted to cross the RAM budget by the epoch's end), ``summary``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EVENT_KINDS", "Event", "EventLog", "read_events"]

logger = logging.getLogger("loadertune")

#: Every kind of event, in the order a run usually produces them.
EVENT_KINDS = (
    "start",
    "window",
    "recommendation",
    "change",
    "switch",
    "abandon",
    "keep",
    "revert",
    "retune",
    "fault",
    "stall",
    "memory",
    "summary",
)


@dataclass(frozen=True)
class Event:
    """One thing that happened.

    Attributes:
        kind: One of ``EVENT_KINDS``.
        time: Wall-clock time, seconds since the epoch.
        step: Batches consumed so far.
        epoch: Epoch number.
        data: The rest: metrics, diagnosis, recommendation, config, before/after rates.
    """

    kind: str
    time: float
    step: int
    epoch: int
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The event as a flat JSON-ready dict."""
        return {"time": round(self.time, 3), "step": self.step, "epoch": self.epoch, "kind": self.kind, **self.data}


class EventLog:
    """Keeps the recent events, appends each to a JSONL file, and passes it to sinks.

    Args:
        path: JSONL file to append to, or None.
        sinks: Callables taking an :class:`Event` (TensorBoard writers, the Lightning logger...).
        maxlen: Events kept in memory.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, sinks: tuple[Callable[[Event], Any], ...] = (), maxlen: int = 10_000) -> None:
        self.events: deque[Event] = deque(maxlen=maxlen)
        self.path = os.fspath(path) if path is not None else None
        self._file = None
        if self.path is not None:
            directory = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(directory):
                raise ValueError(f"log_file {self.path!r}: directory {directory!r} does not exist; create it first")
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        for sink in sinks:
            if not callable(sink):
                raise ValueError(f"event sinks must be callables taking an Event, got {type(sink).__name__}")
        self._sinks = tuple(sinks)
        self._lock = threading.Lock()

    def emit(self, kind: str, step: int, epoch: int, **data: Any) -> Event:
        """Records an event and returns it."""
        event = Event(kind=kind, time=time.time(), step=step, epoch=epoch, data=data)
        with self._lock:
            self.events.append(event)
            if self._file is not None:
                self._file.write(json.dumps(event.to_dict(), default=_json_default) + "\n")
                self._file.flush()
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:  # a broken sink must not break training
                logger.warning("event sink %r failed", sink, exc_info=True)
        return event

    def close(self) -> None:
        """Closes the JSONL file."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads a JSONL event log written by ``tune(..., log_file=...)``.

    Raises:
        ValueError: A line is not a JSON object, naming the file and line.
        FileNotFoundError: No such file.
    """
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{os.fspath(path)}:{n}: not a JSON line ({exc.msg})") from None
            if not isinstance(obj, dict) or "kind" not in obj:
                raise ValueError(f"{os.fspath(path)}:{n}: not a loadertune event (no 'kind')")
            out.append(obj)
    return out

