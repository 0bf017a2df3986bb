"""Prefill/decode deciders of the router pipeline: given the decode replica the scorers picked, does
it prefill the prompt itself or does a prefill replica, and which one (``router.pipeline.decider``).
Pure: stdlib only.

``conditional`` (conditional disaggregation; thresholds in ``router.placement``): local (on the decode
replica) when its uncached part is short or its cached share is high; otherwise the prefill replica
with the longest cached prefix among those whose queue has room (then least queued, least loaded,
random). No prefill replica with room -> local. With ``local_prefill_when_idle``, local when the decode
replica has nothing to do and would compute no more of the prompt than the prefill replica (no decode
step waits for it; the request skips the handoff). With ``local_prefill_when_sooner``, local too when
that replica is backed up and the decode engine would finish the prompt sooner without stretching its
batch's next step past the tier's TPOT SLO: as load shifts to prefill, the decode engines take part of
it (at the cost of their inter-token latency).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from router.admission import TierPolicy, engine_priority
from router.config import PlacementConfig
from router.cost_model import CostModel
from router.types import EndpointState, RoutingDecision


class PrefillDecider(Protocol):
    def place(
        self,
        prompt_tokens: int,
        tier: str,
        decode: EndpointState,
        prefills: Sequence[EndpointState],
        hits: Mapping[str, int],
        block_size: int,
    ) -> RoutingDecision:
        """The decision without admission's predictions: prefill replica (None: local), reason, hit and
        uncached tokens on the replica that prefills. ``hits``: cached prefix blocks by endpoint."""


class ConditionalPrefill:
    def __init__(
        self,
        placement: PlacementConfig,
        tiers: Mapping[str, TierPolicy],
        model: Callable[[str], CostModel],
        rng: random.Random,
    ) -> None:
        self.p = placement
        self.tiers = tiers
        self.model = model
        self._rng = rng

    def place(
        self,
        prompt_tokens: int,
        tier: str,
        decode: EndpointState,
        prefills: Sequence[EndpointState],
        hits: Mapping[str, int],
        block_size: int,
    ) -> RoutingDecision:
        p, prompt = self.p, prompt_tokens
        d_hit = hits[decode.endpoint_id] * block_size
        d_uncached = prompt - d_hit
        prefill, hit = None, d_hit
        reason = "local_prefill:short" if d_uncached <= p.local_prefill_max_tokens else "local_prefill:cached"
        if d_uncached > p.local_prefill_max_tokens and d_hit < p.local_prefill_min_hit_ratio * prompt:
            room = [e for e in prefills if e.queued_prefill_tokens < p.prefill_queue_limit_tokens]
            if room:
                prefill = max(
                    room, key=lambda e: (hits[e.endpoint_id], -e.queued_prefill_tokens, -e.load, self._rng.random())
                )
                hit = hits[prefill.endpoint_id] * block_size
                reason = "remote_prefill"
            else:
                reason = "local_prefill:no_prefill_room" if prefills else "local_prefill:no_prefill_replica"
        if (
            prefill is not None
            and p.local_prefill_when_idle
            and decode.load == 0
            and decode.queued_prefill_tokens == 0
            and d_uncached <= prompt - hit + prefill.queued_prefill_tokens
        ):
            prefill, hit, reason = None, d_hit, "local_prefill:idle"
        if (
            prefill is not None
            and p.local_prefill_when_sooner
            and self._sooner_locally(tier, prefill, decode, prompt - hit, d_uncached)
        ):
            prefill, hit, reason = None, d_hit, "local_prefill:sooner"
        return RoutingDecision(
            decode=decode, prefill=prefill, reason=reason, prefix_hit_tokens=hit, uncached_tokens=prompt - hit
        )

    def _sooner_locally(
        self, tier: str, prefill: EndpointState, decode: EndpointState, remote_uncached: int, local_uncached: int
    ) -> bool:
        """Whether the decode replica should prefill this prompt itself because the prefill replica is
        backed up: its queue is not empty, the decode engine would finish the prompt sooner (its own
        queued prefills + this prompt, against the prefill replica's queue + this prompt), and the
        stall the prefill adds to the decode batch's next step keeps that step within the tier's
        TPOT SLO. The decode pool's prefill rate is its own fit once it has one, else the prefill
        pool's (the same engine type, as far as the router knows)."""
        if prefill.queued_prefill_tokens <= 0:
            return False
        mp, md = self.model(prefill.pool), self.model(decode.pool)
        local_model = md if md.prefill.n else mp
        prio = engine_priority(self.tiers[tier].priority)
        remote_s = mp.prefill_s(prefill.prefill_tokens_ahead(prio) + remote_uncached) * mp.ttft_bias
        stall_s = local_model.prefill_s(local_uncached)
        local_s = local_model.prefill_s(decode.prefill_tokens_ahead(prio) + local_uncached) * mp.ttft_bias
        step_s = md.decode_step_s(decode.load + 1, decode.context_tokens) * md.tpot_bias
        return local_s < remote_s and step_s + stall_s <= self.tiers[tier].tpot_s


DECIDERS: dict[
    str,
    Callable[[PlacementConfig, Mapping[str, TierPolicy], Callable[[str], CostModel], random.Random], PrefillDecider],
] = {"conditional": ConditionalPrefill}
