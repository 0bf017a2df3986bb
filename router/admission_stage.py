"""The admission stage of the router pipeline: ``router.admission.decide`` on the replicas placement
chose, per QoS tier. Pure: stdlib only.

The queue a request waits behind is what its engine serves before it
(``EndpointState.prefill_tokens_ahead``). Every request routed (admitted or not) records an arrival of
its tier in a ``TierActivity`` (``arrive``, from the policy's ``on_routed`` hook); a tier is active
while it had an arrival within ``router.admission.tier_idle_s`` or has prefill tokens queued on any
replica (``queued_prefill_by_priority``, by the tier's engine priority), and the reservations of
inactive higher tiers are lent to the lower ones. The request being admitted always counts its own
tier as active (``router.admission.usable_fraction``), so deciding before its arrival is recorded
decides as after.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from router.admission import Admission, AdmissionRules, DecodeThrottle, TierPolicy, decide, engine_priority
from router.config import RouterConfig
from router.cost_model import CostModel
from router.tier_activity import TierActivity
from router.types import PoolSnapshot, Rejection, RequestDescriptor, RoutingDecision


def tier_policies(cfg: RouterConfig) -> dict[str, TierPolicy]:
    return {
        name: TierPolicy(
            t.reserved_fraction, t.priority, (t.slo or cfg.slo).ttft_ms / 1e3, (t.slo or cfg.slo).tpot_ms / 1e3
        )
        for name, t in cfg.qos_tiers.items()
    }


def decode_throttle(cfg: RouterConfig) -> DecodeThrottle | None:
    a = cfg.admission
    if a.decode_throttle == "off":
        return None
    return DecodeThrottle(
        saturation=a.decode_saturation,
        action=a.decode_throttle,
        cap_max_tokens=a.throttle_cap_max_tokens,
        below_priority=a.throttle_below_priority,
    )


class SloAdmission:
    def __init__(
        self, cfg: RouterConfig, model: Callable[[str], CostModel], activity: TierActivity | None = None
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.tiers = tier_policies(cfg)
        a = cfg.admission
        self.rules = AdmissionRules(self.tiers, decode_throttle(cfg), a.min_retry_after_s, a.tier_budget, a.tpot_budget)
        idle_s = cfg.admission.tier_idle_s
        # None: reservations are never lent (every tier is always active)
        self.activity = activity if activity is not None else (None if idle_s is None else TierActivity(idle_s))
        self._tiers_by_engine_priority: dict[int, list[str]] = {}
        for name, t in self.tiers.items():
            self._tiers_by_engine_priority.setdefault(engine_priority(t.priority), []).append(name)

    def tier_of(self, req: RequestDescriptor) -> str:
        """The request's tier; unknown tiers are the default tier."""
        return req.tier if req.tier in self.tiers else self.cfg.default_tier

    def arrive(self, tier: str) -> None:
        if self.activity is not None:
            self.activity.arrive(tier)

    def active_tiers(self, snapshot: PoolSnapshot) -> frozenset[str] | None:
        """Tiers demanding capacity now: a recent arrival, or prefill work queued on some replica (the
        router's own accounting, by engine priority: tiers sharing a priority are busy together).
        None when lending is off."""
        if self.activity is None:
            return None
        busy = {
            tier
            for e in snapshot.endpoints
            for prio, tokens in e.queued_prefill_by_priority
            if tokens > 0
            for tier in self._tiers_by_engine_priority.get(prio, ())
        }
        return self.activity.active(busy)

    def admit(
        self, req: RequestDescriptor, tier: str, decision: RoutingDecision, snapshot: PoolSnapshot
    ) -> RoutingDecision | Rejection:
        """``decision`` with admission's predictions (and a capped ``max_new_tokens`` when decode is
        throttled), or the rejection."""
        decode = decision.decode
        target = decision.prefill or decode
        verdict = decide(
            tier,
            self.rules,
            self.model(target.pool),
            queued_prefill_tokens=target.prefill_tokens_ahead(engine_priority(self.tiers[tier].priority)),
            uncached_tokens=decision.uncached_tokens,
            decode_batch=decode.load,
            decode_model=self.model(decode.pool),
            decode_idle=decode.in_flight == 0,
            max_new_tokens=req.max_new_tokens,
            prompt_tokens=req.num_prompt_tokens,
            decode_context_tokens=decode.context_tokens,
            active=self.active_tiers(snapshot),
        )
        if isinstance(verdict, Rejection):
            return verdict
        assert isinstance(verdict, Admission)
        return dataclasses.replace(
            decision,
            predicted_ttft_s=verdict.predicted_ttft_s,
            predicted_tpot_s=verdict.predicted_tpot_s,
            max_new_tokens=verdict.max_new_tokens,
        )
