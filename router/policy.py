"""Routing policies: pure decision functions over a snapshot of pool state.

A policy is ``route(request, snapshot) -> RoutingDecision | Rejection``. It does no I/O, never
blocks, and holds no per-request state; reservations (``in_flight``) are tracked by the caller
and arrive inside the snapshot. The SLO-aware, prefix-aware pipeline replaces
``LeastLoadedPolicy`` behind the same signature.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from router.types import EndpointState, PoolSnapshot, Rejection, RequestDescriptor, Role, RoutingDecision


class RoutingPolicy(Protocol):
    def route(self, req: RequestDescriptor, snapshot: PoolSnapshot, admit: bool = True
              ) -> RoutingDecision | Rejection:
        """Place ``req``; ``admit=False``: a request already admitted (its decode moves to another
        replica after a failure) is placed without admission control."""


def least_loaded(cands: Sequence[EndpointState], rng: random.Random) -> EndpointState | None:
    """Healthy endpoint with the fewest outstanding requests; ties by KV usage, then at random."""
    healthy = [c for c in cands if c.healthy]
    if not healthy:
        return None
    best = min((c.load, round(c.kv_usage, 2)) for c in healthy)
    tied = [c for c in healthy if (c.load, round(c.kv_usage, 2)) == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


class LeastLoadedPolicy:
    """Least-loaded decode replica + least-loaded prefill replica.

    Degrades instead of failing: with no healthy prefill replica the decode replica prefills
    locally; with no healthy decode replica the request is rejected (503, retry shortly).
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def route(self, req: RequestDescriptor, snapshot: PoolSnapshot, admit: bool = True
              ) -> RoutingDecision | Rejection:
        decode = least_loaded(snapshot.by_role(Role.DECODE), self._rng)
        if decode is None:
            return Rejection(reason="no_decode_replica", status_code=503, retry_after_s=5.0,
                             message="no healthy decode replica is available; retry later")
        prefill = least_loaded(snapshot.by_role(Role.PREFILL), self._rng)
        if prefill is None:
            return RoutingDecision(decode=decode, prefill=None, reason="no_prefill_replica:local_prefill")
        return RoutingDecision(decode=decode, prefill=prefill, reason="least_loaded")


class RoundRobinPolicy:
    """Healthy replicas of each role in turn, blind to load and cache (the benchmark baseline for
    prefix-aware placement; Ray Serve's and most proxies' default). No admission control."""

    def __init__(self) -> None:
        self._turn = {Role.DECODE: 0, Role.PREFILL: 0}

    def _next(self, cands: Sequence[EndpointState], role: Role) -> EndpointState | None:
        healthy = sorted((c for c in cands if c.healthy), key=lambda c: c.endpoint_id)
        if not healthy:
            return None
        i = self._turn[role]
        self._turn[role] = i + 1
        return healthy[i % len(healthy)]

    def route(self, req: RequestDescriptor, snapshot: PoolSnapshot, admit: bool = True
              ) -> RoutingDecision | Rejection:
        decode = self._next(snapshot.by_role(Role.DECODE), Role.DECODE)
        if decode is None:
            return Rejection(reason="no_decode_replica", status_code=503, retry_after_s=5.0,
                             message="no healthy decode replica is available; retry later")
        prefill = self._next(snapshot.by_role(Role.PREFILL), Role.PREFILL)
        if prefill is None:
            return RoutingDecision(decode=decode, prefill=None, reason="no_prefill_replica:local_prefill",
                                   uncached_tokens=req.num_prompt_tokens)
        return RoutingDecision(decode=decode, prefill=prefill, reason="round_robin",
                               uncached_tokens=req.num_prompt_tokens)
