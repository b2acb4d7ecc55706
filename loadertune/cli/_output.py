"""Terminal output shared by the subcommands: tables, a progress bar, a status line, plots.

rich is an optional extra (``loadertune[rich]``): with it tables are boxed and the progress bar
and status line are drawn by rich on a terminal; without it (or when stderr is not a terminal)
the same information comes as aligned plain text and a one-line ``\\r`` counter on a terminal,
or a line every few seconds in a file or a pipe.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from loadertune.cli import UsageError

__all__ = [
    "Progress",
    "StatusLine",
    "check_plot_path",
    "fmt_bytes",
    "fmt_pct",
    "fmt_rate",
    "print_json",
    "print_table",
    "require_pyplot",
    "rich_available",
]

# Redraws of a plain `\r` line per second at most: more only costs the terminal.
_PLAIN_HZ = 4.0
# Not a terminal (a file, a pipe): a progress line of its own every this many seconds at most,
# where a `\r` redraw would pile every update onto one line.
_LOG_EVERY_S = 5.0


def rich_available() -> bool:
    """Whether rich can be imported (the ``[rich]`` extra)."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def fmt_bytes(n: float | None) -> str:
    """``1536`` -> ``1.5 KiB``; None -> ``n/a``."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # unreachable; keeps type checkers content


def fmt_rate(rate: float | None) -> str:
    """Samples per second, to a sensible precision; None -> ``n/a``."""
    if rate is None or not math.isfinite(rate):
        return "n/a"
    return f"{rate:.1f}" if rate < 100 else f"{rate:.0f}"


def fmt_pct(share: float | None, digits: int = 0) -> str:
    """A 0-1 share as a percentage; None -> ``n/a``."""
    if share is None or not math.isfinite(share):
        return "n/a"
    return f"{100 * share:.{digits}f}%"


def print_json(obj: Any, stream: TextIO | None = None) -> None:
    """Writes ``obj`` as indented JSON; non-finite floats become null (JSON has no infinity)."""
    print(json.dumps(_finite(obj), indent=2), file=stream or sys.stdout)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    right: Sequence[bool] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Prints a table: boxed by rich when it is installed, else aligned plain text.

    Args:
        columns: Header of each column.
        rows: Cells, already formatted as strings.
        title: A line above the table.
        right: Per column, whether to right-align it (numbers); default left.
        stream: Where to print (stdout).
    """
    out = stream or sys.stdout
    align = list(right) if right is not None else [False] * len(columns)
    if rich_available():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left", title_style="bold")
        for name, r in zip(columns, align, strict=True):
            table.add_column(name, justify="right" if r else "left")
        for row in rows:
            table.add_row(*row)
        # Off a terminal rich would wrap at 80 columns; tables here are narrow, leave them whole.
        width = None if _is_tty(out) else 120
        Console(file=out, width=width, highlight=False).print(table)
        return
    if title:
        print(title, file=out)
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if align[i] else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    print(line(columns), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print(line(row), file=out)


class Progress:
    """A progress bar on stderr over a known total (seconds of budget).

    rich's bar on a terminal when rich is installed; otherwise one line redrawn with ``\\r``.
    With ``enabled=False`` (``--json``) nothing is written.

    Args:
        total: The amount that fills the bar.
        enabled: Whether to draw at all.
        stream: Where to draw (stderr).
    """

    def __init__(self, total: float, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = max(total, 1e-9)
        self.enabled = enabled
        self._stream = stream or sys.stderr
        self._rich: Any = None
        self._task: Any = None
        self._last_draw = -math.inf
        self._drawn = False

    def __enter__(self) -> Progress:
        if self.enabled and _is_tty(self._stream) and rich_available():
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TimeElapsedColumn(),
                console=Console(file=self._stream),
                transient=True,
            )
            self._rich.start()
            self._task = self._rich.add_task("starting", total=self.total)
        return self

    def update(self, completed: float, text: str) -> None:
        """Moves the bar to ``completed`` with ``text`` beside it."""
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=min(completed, self.total), description=text)
            return
        now = time.monotonic()
        tty = _is_tty(self._stream)
        if now - self._last_draw < (1.0 / _PLAIN_HZ if tty else _LOG_EVERY_S):
            return
        self._last_draw = now
        filled = int(20 * min(1.0, completed / self.total))
        bar = "#" * filled + "." * (20 - filled)
        line = f"[{bar}] {completed:4.0f}/{self.total:.0f} s  {text}"
        self._stream.write(f"\r{line}\x1b[K" if tty else f"{line}\n")
        self._stream.flush()
        self._drawn = True

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        elif self._drawn and _is_tty(self._stream):
            self._stream.write("\r\x1b[K")
            self._stream.flush()


class StatusLine:
    """One live line on stderr (rich Live on a terminal, else ``\\r``), with messages above it.

    Args:
        enabled: Whether to write at all (``--json`` turns it off).
        stream: Where to write (stderr).
    """

    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self._stream = stream or sys.stderr
        self._live: Any = None
        self._text = ""
        self._tty = _is_tty(self._stream)
        self._last_line = -math.inf
        self._shown = ""  # the status last written as a line of its own (not a terminal)

    def __enter__(self) -> StatusLine:
        if self.enabled and _is_tty(self._stream) and rich_available():
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            self._live = Live(
                Text(""), console=Console(file=self._stream), auto_refresh=False, transient=True
            )
            self._live.start()
        return self

    def update(self, text: str) -> None:
        """Replaces the live line."""
        if not self.enabled:
            return
        self._text = text
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(text), refresh=True)
            return
        if not self._tty:
            now = time.monotonic()
            if now - self._last_line < _LOG_EVERY_S:
                return
            self._last_line, self._shown = now, text
            self._stream.write(f"{text}\n")
            self._stream.flush()
            return
        self._stream.write(f"\r{text}\x1b[K")
        self._stream.flush()

    def message(self, text: str) -> None:
        """Prints a line above the live one, which stays."""
        if not self.enabled:
            return
        if self._live is not None:
            self._live.console.print(text, highlight=False, markup=False)
            return
        if not self._tty:
            self._stream.write(f"{text}\n")
            self._stream.flush()
            return
        self._stream.write(f"\r{text}\x1b[K\n")
        if self._text:
            self._stream.write(f"{self._text}\x1b[K")
        self._stream.flush()

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        elif self.enabled and self._text:
            # Leave the last status on screen: it is the final state of the run.
            if not self._tty:
                if self._text != self._shown:
                    self._stream.write(f"{self._text}\n")
            else:
                self._stream.write("\n")
            self._stream.flush()


def require_pyplot(option: str = "--plot") -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display needed).

    Raises:
        UsageError: matplotlib is not installed; names the ``loadertune[plot]`` extra.
    """
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            f"{option} needs matplotlib, which is not installed; pip install 'loadertune[plot]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: str) -> None:
    """Fails early, before a long run, when a plot could not be written to ``path``.

    Raises:
        UsageError: The directory does not exist, or the extension is not an image format.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(
            f"--plot {path!r}: directory {directory!r} does not exist; create it first"
        )
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise UsageError(f"--plot {path!r}: give a file name ending in .png (or .svg, .pdf)")
