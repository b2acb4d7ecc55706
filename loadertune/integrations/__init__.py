"""Integrations with other tools: a Lightning callback and a TensorBoard event sink.

Each lives in its own module and imports its tool only when used, so ``import
loadertune.integrations`` needs neither Lightning nor TensorBoard.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> module that defines it, resolved on first use (PEP 562).
_EXPORTS = {
    "LoadertuneCallback": "loadertune.integrations.lightning",
    "TensorBoardSink": "loadertune.integrations.tensorboard",
}

__all__ = ["LoadertuneCallback", "TensorBoardSink"]

if TYPE_CHECKING:
    from loadertune.integrations.lightning import LoadertuneCallback
    from loadertune.integrations.tensorboard import TensorBoardSink


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loadertune.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
