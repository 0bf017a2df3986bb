"""Which QoS tiers are demanding capacity now. Pure: stdlib only.

A tier is active while it had an arrival within ``idle_s`` seconds (on an injected clock), or while
the caller reports work of it still in flight (``active(busy=...)``). Admission lends the reserved
fraction of every higher tier that is not active to the lower tiers (``router.admission.usable_fraction``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


class TierActivity:
    def __init__(self, idle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if idle_s < 0:
            raise ValueError(f"idle_s must be >= 0, got {idle_s}")
        self.idle_s = idle_s
        self._clock = clock
        self._last: dict[str, float] = {}  # tier -> clock of its latest arrival

    def arrive(self, tier: str) -> None:
        """Record one arrival of ``tier`` (admitted or not: either way it is asking for capacity)."""
        self._last[tier] = self._clock()

    def active(self, busy: Iterable[str] = ()) -> frozenset[str]:
        """Tiers with an arrival at most ``idle_s`` ago, plus ``busy`` (tiers with work in flight)."""
        now = self._clock()
        return frozenset([t for t, s in tuple(self._last.items()) if now - s <= self.idle_s]).union(busy)
