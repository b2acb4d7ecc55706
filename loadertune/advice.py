"""Recommend mode's advice, held steady until it really changes."""

from __future__ import annotations

from loadertune.config import LoaderConfig
from loadertune.planning import Recommendation, same_recommendation

__all__ = ["StableAdvice"]


#: A pending "nothing to change" in recommend mode's hysteresis (None means no pending advice).
_NO_ADVICE = Recommendation(config=LoaderConfig(), reason="")


def _same_advice(a: Recommendation | None, b: Recommendation | None) -> bool:
    """Whether two advices say the same thing (see ``same_recommendation``; "≥ N" covers more)."""
    if a is _NO_ADVICE:
        a = None
    if b is _NO_ADVICE:
        b = None
    if a is None or b is None:
        return a is b
    if a.at_least and b.config.num_workers >= a.config.num_workers:
        return a.config.replace(num_workers=b.config.num_workers, prefetch_factor=b.config.prefetch_factor) == b.config
    if b.at_least and a.config.num_workers >= b.config.num_workers:
        return b.config.replace(num_workers=a.config.num_workers, prefetch_factor=a.config.prefetch_factor) == a.config
    return same_recommendation(a.config, b.config)


class StableAdvice:
    """Recommend mode's advice, held until it really changes.

    Rates wobble between windows; advice that flips with them is noise to the reader. A
    different advice replaces the held one only when two windows in a row agree on it (worker
    counts within ~20%, or both "≥ N" at the cap); a new configuration starts over.
    """

    def __init__(self) -> None:
        self._held: Recommendation | None = None
        self._config: LoaderConfig | None = None
        self._pending: Recommendation | None = None

    def update(self, config: LoaderConfig, rec: Recommendation | None) -> Recommendation | None:
        """Takes one window's advice for ``config``; returns the advice to show (the very same
        object as before while it has not really changed)."""
        if self._config != config:
            # A new configuration (the user's reconfigure, a fault): advice starts over.
            self._config = config
            self._held = rec
            self._pending = None
            return rec
        if _same_advice(self._held, rec):
            self._pending = None
            return self._held
        if self._pending is not None and _same_advice(self._pending, rec):
            self._held = rec
            self._pending = None
            return rec
        # One window's different advice may be noise: wait for the next to confirm it.
        self._pending = rec if rec is not None else _NO_ADVICE
        return self._held
