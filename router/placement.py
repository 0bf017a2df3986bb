"""SLO-aware, prefix-aware placement: filter -> score -> pick, conditional disaggregation, admission.

``SloAwarePolicy.route(request, snapshot)`` keeps the pure policy signature. It reads (never writes)
a ``PrefixIndex`` and per-pool ``CostModel``s owned by the caller, who records what it routed
(``PrefixIndex.add``) and feeds observed timings to the models.

1. Filter: healthy replicas of each role.
2. Score decode replicas: ``prefix_weight * cached share of the prompt - load_weight * load /
   max_batch_hint - kv_weight * kv_usage``; pick the best (ties at random).
3. Prefill placement: local (on the decode replica) when its uncached part is short or its cached
   share is high; otherwise the prefill replica with the longest cached prefix among those whose
   queue has room (then least queued). No prefill replica with room -> local. With
   ``local_prefill_when_sooner``, local too when that replica is backed up and the decode engine would
   finish the prompt sooner without stretching its batch's next step past the TPOT SLO: as load shifts
   to prefill, the decode engines take part of it (at the cost of their inter-token latency).
4. Admission (``router.admission.decide``) on the chosen replicas, per QoS tier; the queue a request
   waits behind is what its engine serves before it (``EndpointState.prefill_tokens_ahead``). Every
   request routed (admitted or not) records an arrival of its tier in a ``TierActivity``; a tier is
   active while it had an arrival within ``router.admission.tier_idle_s`` or has prefill tokens
   queued on any replica (``queued_prefill_by_priority``, by the tier's engine priority), and the
   reservations of inactive higher tiers are lent to the lower ones.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from router.admission import Admission, DecodeThrottle, TierPolicy, decide, engine_priority
from router.config import RouterConfig
from router.cost_model import CostModel, CostPrior
from router.prefix_index import PrefixIndex
from router.tier_activity import TierActivity
from router.types import EndpointState, PoolSnapshot, Rejection, RequestDescriptor, Role, RoutingDecision


def tier_policies(cfg: RouterConfig) -> dict[str, TierPolicy]:
    return {name: TierPolicy(t.reserved_fraction, t.priority, (t.slo or cfg.slo).ttft_ms / 1e3,
                             (t.slo or cfg.slo).tpot_ms / 1e3) for name, t in cfg.qos_tiers.items()}


def new_cost_model(cfg: RouterConfig) -> CostModel:
    a = cfg.admission
    return CostModel(CostPrior(prefill_tokens_per_s=a.prefill_tokens_per_s_prior, decode_step_s=a.decode_step_s_prior),
                     bias_alpha=a.bias_alpha)


def decode_throttle(cfg: RouterConfig) -> DecodeThrottle | None:
    a = cfg.admission
    if a.decode_throttle == "off":
        return None
    return DecodeThrottle(saturation=a.decode_saturation, action=a.decode_throttle,
                          cap_max_tokens=a.throttle_cap_max_tokens, below_priority=a.throttle_below_priority)


class SloAwarePolicy:
    def __init__(self, cfg: RouterConfig, index: PrefixIndex, models: Mapping[str, CostModel], block_size: int,
                 rng: random.Random | None = None, activity: TierActivity | None = None) -> None:
        self.cfg = cfg
        self.index = index
        self.models = models
        self.block_size = block_size
        self.tiers = tier_policies(cfg)
        self.throttle = decode_throttle(cfg)
        self._rng = rng or random.Random()
        idle_s = cfg.admission.tier_idle_s
        # None: reservations are never lent (every tier is always active)
        self.activity = activity if activity is not None else (None if idle_s is None else TierActivity(idle_s))
        self._tiers_by_engine_priority: dict[int, list[str]] = {}
        for name, t in self.tiers.items():
            self._tiers_by_engine_priority.setdefault(engine_priority(t.priority), []).append(name)

    def model(self, pool: str) -> CostModel:
        m = self.models.get(pool)
        if m is None:
            m = self.models[pool] = new_cost_model(self.cfg)  # type: ignore[index]
        return m

    def _best(self, cands: Sequence[EndpointState], hits: Mapping[str, int], prompt: int) -> EndpointState:
        # score = prefix_weight x cached share - load_weight x load / max_batch_hint - kv_weight x kv usage
        # (one expression per candidate: this runs on every request, see loadtests/micro/router_microbench.py)
        p = self.cfg.placement
        wp, wl, wk = p.prefix_weight * self.block_size / max(prompt, 1), p.load_weight / p.max_batch_hint, p.kv_weight
        scored = [(round(wp * hits[c.endpoint_id] - wl * c.load - wk * c.kv_usage, 9), c) for c in cands]
        top = max(s for s, _ in scored)
        tied = [c for s, c in scored if s == top]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)

    def active_tiers(self, snapshot: PoolSnapshot) -> frozenset[str] | None:
        """Tiers demanding capacity now: a recent arrival, or prefill work queued on some replica (the
        router's own accounting, by engine priority: tiers sharing a priority are busy together).
        None when lending is off."""
        if self.activity is None:
            return None
        busy = {tier for e in snapshot.endpoints for prio, tokens in e.queued_prefill_by_priority if tokens > 0
                for tier in self._tiers_by_engine_priority.get(prio, ())}
        return self.activity.active(busy)

    def _sooner_locally(self, tier: str, prefill: EndpointState, decode: EndpointState, remote_uncached: int,
                        local_uncached: int) -> bool:
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

    def route(self, req: RequestDescriptor, snapshot: PoolSnapshot, admit: bool = True
              ) -> RoutingDecision | Rejection:
        decodes = [e for e in snapshot.by_role(Role.DECODE) if e.healthy]
        if not decodes:
            return Rejection(reason="no_decode_replica", status_code=503, retry_after_s=5.0,
                             message="no healthy decode replica is available; retry later")
        prefills = [e for e in snapshot.by_role(Role.PREFILL) if e.healthy]
        prompt, bs = req.num_prompt_tokens, self.block_size
        # a prompt's last token is always computed, so at most (prompt - 1) tokens can be cache hits
        cap = max(0, (prompt - 1) // bs)
        hits = {k: min(v, cap) for k, v in
                self.index.match(req.block_hashes, [e.endpoint_id for e in decodes + prefills]).items()}
        decode = self._best(decodes, hits, prompt)
        p = self.cfg.placement
        d_hit = hits[decode.endpoint_id] * bs
        d_uncached = prompt - d_hit
        prefill, hit = None, d_hit
        reason = "local_prefill:short" if d_uncached <= p.local_prefill_max_tokens else "local_prefill:cached"
        if d_uncached > p.local_prefill_max_tokens and d_hit < p.local_prefill_min_hit_ratio * prompt:
            room = [e for e in prefills if e.queued_prefill_tokens < p.prefill_queue_limit_tokens]
            if room:
                prefill = max(room, key=lambda e: (hits[e.endpoint_id], -e.queued_prefill_tokens, -e.load,
                                                   self._rng.random()))
                hit = hits[prefill.endpoint_id] * bs
                reason = "remote_prefill"
            else:
                reason = "local_prefill:no_prefill_room" if prefills else "local_prefill:no_prefill_replica"
        tier = req.tier if req.tier in self.tiers else self.cfg.default_tier
        if prefill is not None and p.local_prefill_when_sooner and self._sooner_locally(
                tier, prefill, decode, prompt - hit, d_uncached):
            prefill, hit, reason = None, d_hit, "local_prefill:sooner"
        uncached = prompt - hit
        decision = RoutingDecision(decode=decode, prefill=prefill, reason=reason, prefix_hit_tokens=hit,
                                   uncached_tokens=uncached)
        if not (admit and self.cfg.admission.enabled):
            return decision
        if self.activity is not None:
            self.activity.arrive(tier)       # before deciding: the request's own tier is active
        target = prefill or decode
        verdict = decide(tier, self.tiers, self.model(target.pool),
                         queued_prefill_tokens=target.prefill_tokens_ahead(engine_priority(self.tiers[tier].priority)),
                         uncached_tokens=uncached,
                         decode_batch=decode.load, decode_model=self.model(decode.pool),
                         decode_idle=decode.in_flight == 0,
                         min_retry_after_s=self.cfg.admission.min_retry_after_s,
                         max_new_tokens=req.max_new_tokens, throttle=self.throttle,
                         prompt_tokens=prompt, decode_context_tokens=decode.context_tokens,
                         tier_budget=self.cfg.admission.tier_budget,
                         tpot_budget=self.cfg.admission.tpot_budget,
                         active=self.active_tiers(snapshot))
        if isinstance(verdict, Rejection):
            return verdict
        assert isinstance(verdict, Admission)
        return RoutingDecision(decode=decode, prefill=prefill, reason=reason, prefix_hit_tokens=hit,
                               uncached_tokens=uncached, predicted_ttft_s=verdict.predicted_ttft_s,
                               predicted_tpot_s=verdict.predicted_tpot_s, max_new_tokens=verdict.max_new_tokens)


def build_policy(cfg: RouterConfig, block_size: int, rng: random.Random | None = None):
    """The policy named in the config (``slo-aware``: placement + admission; ``least-loaded`` and
    ``round-robin``: baselines without admission)."""
    from router.policy import LeastLoadedPolicy, RoundRobinPolicy

    if cfg.policy == "least-loaded":
        return LeastLoadedPolicy(rng)
    if cfg.policy == "round-robin":
        return RoundRobinPolicy()
    return SloAwarePolicy(cfg, PrefixIndex(cfg.placement.prefix_index_capacity_blocks), {}, block_size, rng)
