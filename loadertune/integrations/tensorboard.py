"""An event sink that writes loadertune's measurements and decisions as TensorBoard scalars.

Pass it to ``tune(..., sinks=(TensorBoardSink(writer),))`` (or to ``LoadertuneCallback``). It
needs only an object with ``add_scalar(tag, value, global_step)``: a
``torch.utils.tensorboard.SummaryWriter``, a ``tensorboardX`` writer, or a test double; nothing
is imported here.
"""

from __future__ import annotations

import math
from typing import Any

from loadertune.events import Event

__all__ = ["TensorBoardSink"]

# (tag, key in a window event's metrics) for the measurements worth a curve.
_WINDOW_METRICS = (
    ("samples_per_s", "samples_per_s"),
    ("wait_share", "wait_share"),
    ("gpu_util_pct", "gpu_util_mean_pct"),
    ("gpu_util_std_pct", "gpu_util_std_pct"),
    ("cpu_pct", "cpu_pct"),
)
# Configuration settings plotted as step curves: a change shows as a step in the line.
_CONFIG_FIELDS = ("num_workers", "batch_size", "prefetch_factor")


class TensorBoardSink:
    """Writes each :class:`~loadertune.events.Event` as scalars on a TensorBoard writer.

    Tags (under ``prefix``): from ``window`` events ``samples_per_s``, ``wait_share``,
    ``gpu_util_pct``, ``gpu_util_std_pct`` and ``cpu_pct`` (those measured), and the configuration
    in use as ``num_workers``, ``batch_size`` and ``prefetch_factor``; from ``change``,
    ``revert`` and ``fault`` events the new configuration and ``lr_factor``; from
    ``recommendation`` events ``recommended/num_workers`` and ``recommended/batch_size``. The
    step is the event's training step.

    Args:
        writer: Anything with ``add_scalar(tag, scalar_value, global_step)``.
        prefix: Prepended to every tag (default ``"loadertune/"``).

    Raises:
        ValueError: ``writer`` has no ``add_scalar``.

    Example:
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> loader = loadertune.tune(loader, sinks=(TensorBoardSink(SummaryWriter()),))
    """

    def __init__(self, writer: Any, prefix: str = "loadertune/") -> None:
        if not callable(getattr(writer, "add_scalar", None)):
            raise ValueError(
                "TensorBoardSink needs a writer with add_scalar(tag, value, step), such as "
                f"torch.utils.tensorboard.SummaryWriter; got {type(writer).__name__}"
            )
        self.writer = writer
        self.prefix = prefix

    def __call__(self, event: Event) -> None:
        """Writes the scalars of one event (events without numbers write nothing)."""
        data = event.data
        if event.kind == "window":
            metrics = data.get("metrics") or {}
            for tag, key in _WINDOW_METRICS:
                self._scalar(tag, metrics.get(key), event.step)
            self._config(data.get("config"), event.step)
        elif event.kind in ("change", "revert", "fault"):
            self._config(data.get("after"), event.step)
            self._scalar("lr_factor", data.get("lr_factor"), event.step)
        elif event.kind == "recommendation":
            config = (data.get("recommendation") or {}).get("config") or {}
            for name in ("num_workers", "batch_size"):
                self._scalar(f"recommended/{name}", config.get(name), event.step)

    def _config(self, config: dict[str, Any] | None, step: int) -> None:
        for name in _CONFIG_FIELDS:
            self._scalar(name, (config or {}).get(name), step)

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        # None means "not measured"; TensorBoard has no gap marker, so skip rather than plot 0.
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if not math.isfinite(value):
            return
        self.writer.add_scalar(self.prefix + tag, float(value), step)
