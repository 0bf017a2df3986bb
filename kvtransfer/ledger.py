"""PrefillLedger: the prefill side's published handoffs, each waiting for the decode's read-done
notification or its handoff timeout (pure; clock injected).

A handoff is PACKED (slabs in the pool, the request not finished yet) then PUBLISHED (its params went
out with a deadline). A notification can arrive while it is still PACKED (the decode read it before
vLLM reported the request finished): it is remembered and completes the handoff once published.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class HandoffState(enum.Enum):
    PACKED = "packed"
    PUBLISHED = "published"


@dataclass
class PublishedHandoff:
    state: HandoffState = HandoffState.PACKED
    deadline: float = 0.0  # PUBLISHED: freed by timeout at this time
    notified: bool = False  # a read-done notification arrived while PACKED


class PrefillLedger:
    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._handoffs: dict[str, PublishedHandoff] = {}

    @property
    def packed(self) -> set[str]:
        return {r for r, h in self._handoffs.items() if h.state is HandoffState.PACKED}

    def on_packed(self, req_id: str) -> None:
        self._handoffs.setdefault(req_id, PublishedHandoff())

    def on_discarded(self, req_id: str) -> None:
        """Packed but never published (aborted): forget it, and any early notification."""
        h = self._handoffs.get(req_id)
        if h is None:
            return
        if h.state is HandoffState.PACKED:
            del self._handoffs[req_id]
        else:
            h.notified = False

    def on_published(self, req_id: str, timeout_s: float) -> None:
        h = self._handoffs.setdefault(req_id, PublishedHandoff())
        h.state, h.deadline = HandoffState.PUBLISHED, self._clock() + timeout_s

    def on_notified(self, req_id: str) -> bool:
        """True if this completes a published handoff now."""
        h = self._handoffs.get(req_id)
        if h is None:
            return False
        if h.state is HandoffState.PUBLISHED:
            return True
        h.notified = True
        return False

    def take_done(self, notified: set[str]) -> tuple[set[str], set[str]]:
        """(released by notification, released by timeout); both leave the ledger."""
        published = {r: h for r, h in self._handoffs.items() if h.state is HandoffState.PUBLISHED}
        by_notif = {r for r, h in published.items() if r in notified or h.notified}
        now = self._clock()
        by_timeout = {r for r, h in published.items() if h.deadline <= now} - by_notif
        for r in by_notif | by_timeout:
            del self._handoffs[r]
        return by_notif, by_timeout

    def pending(self) -> bool:
        return any(h.state is HandoffState.PUBLISHED for h in self._handoffs.values())
