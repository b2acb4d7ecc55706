"""Exceptions raised by loadertune."""

from __future__ import annotations


class LoadertuneError(Exception):
    """Base class of every error loadertune raises on its own account."""


class ReconfigureError(LoadertuneError, ValueError):
    """A requested loader change cannot be made (the message says why and what to do)."""


class SchedulerNotScalableError(LoadertuneError, ValueError):
    """A learning-rate scheduler cannot be rescaled exactly, so it is refused rather than approximated."""


class DistributedTimeoutError(LoadertuneError, RuntimeError):
    """Another rank did not reach a collective decision within the bound."""
