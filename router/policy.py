"""Routing policies: decision functions over a snapshot of pool state, and the hooks that feed them.

A policy is ``route(request, snapshot) -> RoutingDecision | Rejection``. ``route`` does no I/O, never
blocks and changes no state: calling it twice for one request (a decode that moves after a failure)
decides twice and records nothing. What a policy learns arrives through its hooks, which the caller
calls once per event:

- ``on_routed(request, outcome, moved)``: the request was dispatched as decided (or refused); a
  ``moved`` request's decode left a failed replica for ``outcome.decode`` (it was recorded when first
  routed, so only the move is);
- ``on_first_token(decision, ttft_s)`` and ``on_finish(decision, tpot_s)``: observed latencies of an
  admitted request, against the decision's predictions;
- ``on_stats(samples)``: one replica's drained engine timing samples.

``prefix_index`` is the prefix index a policy reads (None for policies blind to the cache); KV cache
events and replica removals update it directly. Reservations (``in_flight``, queued prefill tokens)
are the caller's and arrive inside the snapshot. ``SloAwarePolicy`` (router/pipeline.py) is the
pipeline; the two baselines below have no state to feed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from router.prefix_index import PrefixIndex
from router.types import EndpointState, PoolSnapshot, Rejection, RequestDescriptor, Role, RoutingDecision

NO_DECODE_REPLICA = Rejection(
    reason="no_decode_replica",
    status_code=503,
    retry_after_s=5.0,
    message="no healthy decode replica is available; retry later",
)


class EngineSamples(Protocol):
    """One replica's engine timing samples since its previous stats poll (``workers.messages.WorkerStats``)."""

    pool: str
    prefill_samples: Sequence[tuple[int, float]]  # (uncached tokens, seconds)
    decode_samples: Sequence[tuple[int, int, float]]  # (batch, context tokens, seconds per token)


class RoutingObserver(Protocol):
    """Sees the events a policy's hooks see, learns from them, never routes (the autoscaling planner)."""

    def on_routed(self, req: RequestDescriptor, outcome: RoutingDecision | Rejection, moved: bool = False) -> None: ...

    def on_first_token(self, decision: RoutingDecision, ttft_s: float) -> None: ...

    def on_finish(self, decision: RoutingDecision, tpot_s: float | None) -> None: ...


class RoutingPolicy(RoutingObserver, Protocol):
    """Routes, and learns from the observer events of what it routed (and from engine stats)."""

    prefix_index: PrefixIndex | None

    def route(self, req: RequestDescriptor, snapshot: PoolSnapshot, admit: bool = True) -> RoutingDecision | Rejection:
        """Place ``req``; ``admit=False``: a request already admitted (its decode moves to another
        replica after a failure) is placed without admission control."""

    def on_stats(self, samples: EngineSamples) -> None: ...


class StatelessPolicy:
    """Hooks of a policy that learns nothing from what it routed."""

    prefix_index: PrefixIndex | None = None

    def on_routed(self, req: RequestDescriptor, outcome: RoutingDecision | Rejection, moved: bool = False) -> None:
        pass

    def on_first_token(self, decision: RoutingDecision, ttft_s: float) -> None:
        pass

    def on_finish(self, decision: RoutingDecision, tpot_s: float | None) -> None:
        pass

    def on_stats(self, samples: EngineSamples) -> None:
        pass


def least_loaded(cands: Sequence[EndpointState], rng: random.Random) -> EndpointState | None:
    """Healthy endpoint with the fewest outstanding requests; ties by KV usage, then at random."""
    healthy = [c for c in cands if c.healthy]
    if not healthy:
        return None
    best = min((c.load, round(c.kv_usage, 2)) for c in healthy)
    tied = [c for c in healthy if (c.load, round(c.kv_usage, 2)) == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


class LeastLoadedPolicy(StatelessPolicy):
    """Least-loaded decode replica + least-loaded prefill replica.

    Degrades instead of failing: with no healthy prefill replica the decode replica prefills
    locally; with no healthy decode replica the request is rejected (503, retry shortly).
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def route(self, req: RequestDescriptor, snapshot: PoolSnapshot, admit: bool = True) -> RoutingDecision | Rejection:
        decode = least_loaded(snapshot.by_role(Role.DECODE), self._rng)
        if decode is None:
            return NO_DECODE_REPLICA
        prefill = least_loaded(snapshot.by_role(Role.PREFILL), self._rng)
        if prefill is None:
            return RoutingDecision(decode=decode, prefill=None, reason="no_prefill_replica:local_prefill")
        return RoutingDecision(decode=decode, prefill=prefill, reason="least_loaded")


class RoundRobinPolicy(StatelessPolicy):
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

    def route(self, req: RequestDescriptor, snapshot: PoolSnapshot, admit: bool = True) -> RoutingDecision | Rejection:
        decode = self._next(snapshot.by_role(Role.DECODE), Role.DECODE)
        if decode is None:
            return NO_DECODE_REPLICA
        prefill = self._next(snapshot.by_role(Role.PREFILL), Role.PREFILL)
        if prefill is None:
            return RoutingDecision(
                decode=decode,
                prefill=None,
                reason="no_prefill_replica:local_prefill",
                uncached_tokens=req.num_prompt_tokens,
            )
        return RoutingDecision(
            decode=decode, prefill=prefill, reason="round_robin", uncached_tokens=req.num_prompt_tokens
        )
