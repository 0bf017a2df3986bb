"""Per-key rate limits: token buckets for requests and tokens, and a cap on in-flight requests (pure).

A bucket holds up to ``capacity`` units and refills at ``rate`` units per second. A request takes one
unit from the request bucket and ``prompt + max completion tokens`` from the token bucket, both or
neither: the whole budget a request may use is charged when it is admitted (as OpenAI's limits count
``max_tokens``), so a request never fails mid-stream for a limit. A refusal says when the request
would fit (``Retry-After``), and every answer carries the OpenAI ``x-ratelimit-*`` headers.

Written here rather than taken from a library: the limits libraries on the registry (``limits``,
``pyrate-limiter``) count windows of hits; a weighted take of both buckets at once, its exact wait and
the remaining level for the headers take a few lines over a plain bucket.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from serve.config import KeyLimits


@dataclass(slots=True)
class TokenBucket:
    rate: float  # units per second
    capacity: float
    level: float
    stamp: float

    @classmethod
    def full(cls, rate: float, capacity: float, now: float) -> TokenBucket:
        return cls(rate, capacity, capacity, now)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + max(0.0, now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def wait_s(self, n: float) -> float:
        """Seconds until ``n`` units are there (after :meth:`refill`); inf if ``n`` exceeds the capacity."""
        if n > self.capacity:
            return math.inf
        return max(0.0, (n - self.level) / self.rate)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level) / self.rate


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    headers: dict[str, str]
    retry_after_s: float | None = None  # refused: when the request would fit (inf: never, it is too large)
    reason: str = ""


def _reset(s: float) -> str:
    return f"{s:.3f}s"


@dataclass
class _KeyState:
    requests: TokenBucket | None
    tokens: TokenBucket | None
    in_flight: int = 0


@dataclass
class RateLimiter:
    """The limits of every key, by key id. ``clock`` is monotonic seconds."""

    clock: Callable[[], float]
    _keys: dict[str, _KeyState] = field(default_factory=dict)

    def _state(self, key_id: str, limits: KeyLimits, now: float) -> _KeyState:
        st = self._keys.get(key_id)
        if st is None:
            req = tok = None
            if limits.requests_per_s is not None:
                burst = limits.request_burst or max(1, math.ceil(limits.requests_per_s))
                req = TokenBucket.full(limits.requests_per_s, burst, now)
            if limits.tokens_per_min is not None:
                tok = TokenBucket.full(limits.tokens_per_min / 60.0, limits.tokens_per_min, now)
            st = self._keys[key_id] = _KeyState(req, tok)
        return st

    def admit(self, key_id: str, limits: KeyLimits, tokens: int) -> RateDecision:
        """Take one request and ``tokens`` tokens from the key's buckets and one in-flight slot, or
        nothing. An allowed request must be given back with :meth:`release` when it ends."""
        now = self.clock()
        st = self._state(key_id, limits, now)
        for b in (st.requests, st.tokens):
            if b is not None:
                b.refill(now)
        waits = []
        if st.requests is not None:
            waits.append((st.requests.wait_s(1), "requests"))
        if st.tokens is not None:
            waits.append((st.tokens.wait_s(tokens), "tokens"))
        wait, which = max(waits, default=(0.0, ""))
        if wait > 0:
            return RateDecision(False, self._headers(st), wait, which)
        cap = limits.max_concurrent_requests
        if cap is not None and st.in_flight >= cap:
            return RateDecision(False, self._headers(st), 1.0, "concurrency")
        if st.requests is not None:
            st.requests.level -= 1
        if st.tokens is not None:
            st.tokens.level -= tokens
        st.in_flight += 1
        return RateDecision(True, self._headers(st))

    def release(self, key_id: str, unused_tokens: int = 0) -> None:
        """An admitted request ended: its in-flight slot comes back, and so do the ``unused_tokens`` it was
        charged for and did not use (``max_tokens`` it did not generate), up to the bucket's capacity."""
        st = self._keys.get(key_id)
        if st is None:
            return
        if st.in_flight > 0:
            st.in_flight -= 1
        if st.tokens is not None and unused_tokens > 0:
            st.tokens.refill(self.clock())
            st.tokens.level = min(st.tokens.capacity, st.tokens.level + unused_tokens)

    def in_flight(self, key_id: str) -> int:
        st = self._keys.get(key_id)
        return st.in_flight if st else 0

    @staticmethod
    def _headers(st: _KeyState) -> dict[str, str]:
        h: dict[str, str] = {}
        for name, b in (("requests", st.requests), ("tokens", st.tokens)):
            if b is not None:
                h[f"x-ratelimit-limit-{name}"] = str(int(b.capacity))
                h[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(b.level)))
                h[f"x-ratelimit-reset-{name}"] = _reset(b.reset_s())
        return h
