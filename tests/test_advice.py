"""StableAdvice: recommend mode's advice changes only when it really does."""

from __future__ import annotations

from loadertune.advice import StableAdvice
from loadertune.config import LoaderConfig
from loadertune.planning import Recommendation


def test_stable_advice_changes_only_when_two_windows_agree():
    c = LoaderConfig(num_workers=0, batch_size=32)

    def rec(w):
        new = c.replace(num_workers=w)
        return Recommendation(config=new, reason="", changes=c.diff(new))

    advice = StableAdvice()
    first = advice.update(c, rec(8))
    assert advice.update(c, rec(9)) is first  # within ~20%: the same advice, the same object
    assert advice.update(c, rec(16)) is first  # one window's different advice may be noise
    confirmed = advice.update(c, rec(16))
    assert confirmed is not first and confirmed.config.num_workers == 16
    # A new configuration starts over at once.
    moved = c.replace(num_workers=16)
    assert advice.update(moved, None) is None
