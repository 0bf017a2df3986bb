"""The slo-aware policy as a pipeline of named stages (``router.pipeline`` config):
filters -> weighted scorers -> prefill decider -> admission.

``SloAwarePolicy.route(request, snapshot)`` reads (never writes) a ``PrefixIndex`` and per-pool
``CostModel``s; what it learns arrives through its hooks (router/policy.py): ``on_routed`` records the
prompt's blocks on the replicas that will hold them and the tier's arrival, ``on_first_token`` /
``on_finish`` feed the models' TTFT / TPOT corrections, ``on_stats`` their fits.

1. Filters (router/filters.py): the candidate replicas of each role.
2. Scorers (router/scorers.py): the decode replica, by a weighted sum of the prefix-cache share, load
   and KV usage. A prompt's last token is always computed, so at most (prompt - 1) tokens count as
   cache hits.
3. Decider (router/deciders.py): local or remote prefill, and on which prefill replica.
4. Admission (router/admission_stage.py): per QoS tier, on the chosen replicas; skipped when
   ``router.admission.enabled`` is off and for a request already admitted (``admit=False``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from router.admission_stage import SloAdmission
from router.config import RouterConfig
from router.cost_model import CostModel, CostPrior
from router.deciders import DECIDERS
from router.filters import apply_filters, build_filters
from router.policy import NO_DECODE_REPLICA, EngineSamples, LeastLoadedPolicy, RoundRobinPolicy, RoutingPolicy
from router.prefix_index import PrefixIndex
from router.scorers import ScoreContext, build_scorers, pick_best
from router.tier_activity import TierActivity
from router.types import PoolSnapshot, Rejection, RequestDescriptor, Role, RoutingDecision


def new_cost_model(cfg: RouterConfig) -> CostModel:
    a = cfg.admission
    return CostModel(
        CostPrior(prefill_tokens_per_s=a.prefill_tokens_per_s_prior, decode_step_s=a.decode_step_s_prior),
        bias_alpha=a.bias_alpha,
    )


class SloAwarePolicy:
    def __init__(
        self,
        cfg: RouterConfig,
        index: PrefixIndex,
        models: Mapping[str, CostModel],
        block_size: int,
        rng: random.Random | None = None,
        activity: TierActivity | None = None,
    ) -> None:
        self.cfg = cfg
        self.prefix_index = index
        self.models = models
        self.block_size = block_size
        self._rng = rng or random.Random()
        self.filters = build_filters(cfg.pipeline.filters)
        self.scorers = build_scorers(cfg.scorer_weights(), cfg.placement)
        self.admission = SloAdmission(cfg, self.model, activity)
        self.decider = DECIDERS[cfg.pipeline.decider](cfg.placement, self.admission.tiers, self.model, self._rng)

    def model(self, pool: str) -> CostModel:
        m = self.models.get(pool)
        if m is None:
            m = self.models[pool] = new_cost_model(self.cfg)  # type: ignore[index]
        return m

    def route(self, req: RequestDescriptor, snapshot: PoolSnapshot, admit: bool = True) -> RoutingDecision | Rejection:
        decodes = apply_filters(self.filters, snapshot.by_role(Role.DECODE))
        if not decodes:
            return NO_DECODE_REPLICA
        prefills = apply_filters(self.filters, snapshot.by_role(Role.PREFILL))
        prompt, bs = req.num_prompt_tokens, self.block_size
        cap = max(0, (prompt - 1) // bs)
        hits = {
            k: min(v, cap)
            for k, v in self.prefix_index.match(req.block_hashes, [e.endpoint_id for e in decodes + prefills]).items()
        }
        decode = pick_best(decodes, self.scorers, ScoreContext(hits, prompt, bs), self._rng)
        tier = self.admission.tier_of(req)
        decision = self.decider.place(prompt, tier, decode, prefills, hits, bs)
        if not (admit and self.cfg.admission.enabled):
            return decision
        return self.admission.admit(req, tier, decision, snapshot)

    # hooks (router/policy.py) ------------------------------------------------------------------
    def on_routed(self, req: RequestDescriptor, outcome: RoutingDecision | Rejection, moved: bool = False) -> None:
        """The prompt's blocks on the replicas that will hold them (the router's own record of the cache,
        beside KV cache events): both replicas, or the one a moved decode prefills itself; and the
        arrival of the tier of a request that went through admission (admitted or refused)."""
        if isinstance(outcome, RoutingDecision) and req.block_hashes:
            for e in (outcome.decode,) if moved else filter(None, (outcome.prefill, outcome.decode)):
                self.prefix_index.add(e.endpoint_id, req.block_hashes)
        if not moved and self.cfg.admission.enabled and outcome != NO_DECODE_REPLICA:
            self.admission.arrive(self.admission.tier_of(req))

    def on_first_token(self, decision: RoutingDecision, ttft_s: float) -> None:
        if decision.predicted_ttft_s:
            self.model((decision.prefill or decision.decode).pool).observe_ttft_ratio(
                ttft_s / decision.predicted_ttft_s
            )

    def on_finish(self, decision: RoutingDecision, tpot_s: float | None) -> None:
        if tpot_s is not None and decision.predicted_tpot_s:
            self.model(decision.decode.pool).observe_tpot_ratio(tpot_s / decision.predicted_tpot_s)

    def on_stats(self, samples: EngineSamples) -> None:
        m = self.model(samples.pool)
        for tokens, seconds in samples.prefill_samples:
            m.observe_prefill(tokens, seconds)
        for batch, context_tokens, seconds in samples.decode_samples:
            m.observe_decode(batch, seconds, context_tokens)


def build_policy(
    cfg: RouterConfig,
    block_size: int,
    rng: random.Random | None = None,
    clock: Callable[[], float] | None = None,
) -> RoutingPolicy:
    """The policy named in the config (``slo-aware``: the pipeline; ``least-loaded`` and ``round-robin``:
    baselines without admission). ``clock``: what tier activity is timed on (default: monotonic time;
    the simulator passes its simulated time)."""
    if cfg.policy == "least-loaded":
        return LeastLoadedPolicy(rng)
    if cfg.policy == "round-robin":
        return RoundRobinPolicy()
    idle_s = cfg.admission.tier_idle_s
    activity = TierActivity(idle_s, clock) if clock is not None and idle_s is not None else None
    return SloAwarePolicy(
        cfg, PrefixIndex(cfg.placement.prefix_index_capacity_blocks), {}, block_size, rng, activity=activity
    )
