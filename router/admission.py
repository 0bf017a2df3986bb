"""SLO-aware admission with early rejection and QoS tiers. Pure: stdlib only.

At arrival, for the prefill and decode replicas the placement step picked:

    TTFT ~ queue wait on the prefill replica + (prefill of the uncached tokens
            + one decode step: the first token comes from a step of the decode replica's batch) x ttft_bias
    TPOT ~ decode step time at the batch the request would join, over the context that batch attends
           during the request's life, x tpot_bias

The context is the decode replica's current KV context + this prompt + half of ``max_new_tokens`` (the
request's own mean length while it decodes; the rest of the batch is taken as it is now: its growth and
its departures roughly cancel over a request's life), so a long ``max_tokens`` predicts a slower TPOT.

(the biases are the models' running observed/predicted ratios, see router/cost_model.py; the KV handoff
is inside the observed TTFT, so ``ttft_bias`` carries it).

``queue wait`` is the prefill work already dispatched to that replica and not finished (the
router's own accounting, in uncached tokens) at the fitted prefill rate.

Tiers: each tier has a reserved fraction of the pool's queueing budget. A tier may fill the queue
(counting the request's own prefill) only up to the sum of the fractions of itself and every
lower-priority tier, so lower tiers never take an active higher tier's reserved share and, as the
queue grows, the lowest tiers are shed first. The reservations are work-conserving: a higher tier
that is not active (``active``, from ``router.tier_activity.TierActivity``: no arrival within
``router.admission.tier_idle_s`` and no prefill work queued) lends its fraction to the tiers below
it, so traffic of one tier alone may use the whole budget. The tier takes its fraction back for
every admission decided after its next arrival; work the lower tiers have already queued is not
preempted by the router. The budget is the waiting room the TTFT SLO leaves after one request's own
service (SLO - predicted prefill and first step; the request's own service stands for the
next arrival's): a higher-tier request arriving at a queue a lower tier filled still fits its SLO
even when one request's service is a large part of it (a 2 s prefill under a 4 s SLO).
``tier_budget="slo"`` divides the whole SLO instead (then a premium request behind a full free share
plus its own 2 s prefill is over the SLO and refused as overload). Outcomes:

- admit, with the predictions recorded (so the model's error is visible in metrics);
- 429 ``tier_quota``: the request's tier is over its share, but higher tiers would be admitted;
- 503 ``overload_ttft`` / ``overload_tpot``: even the top tier would miss the SLO.

Both carry ``Retry-After`` = the time for the queue to drain back under the tier's limit.

Decode side, the same division (``tpot_budget="headroom"``, default): a tier may join a decode batch
only while the predicted TPOT stays within its share of the headroom between the request's own step
time alone (a batch of one at its context) and its TPOT SLO, so lower tiers stop joining before the
batch reaches the SLO and the top tier still fits; under decode overload the lowest tiers are refused
(429) first instead of everyone at once (503); idle higher tiers lend their share here too.
``tpot_budget="slo"`` lets every tier fill up to its SLO.

Phase-specific throttling. Prefill lagging: the queue-wait budget above stops new prompts of the
lowest tiers first (while every tier is active: free at 60 % of the budget by default, standard
at 90 %, premium never below the full SLO). Decode saturated (predicted TPOT >= ``saturation`` x the tier's TPOT budget)
for tiers below ``below_priority``: ``cap`` admits with ``max_tokens`` capped (the request holds
its decode slot for less time), ``reject`` answers 429 ``decode_throttled``.

Liveness: a request that finds its prefill replica's queue empty is never refused on TTFT, and one
that finds its decode replica idle never on TPOT. Waiting cannot make it faster, and refusing it
would also starve the cost model of the samples that correct a bad prediction (a cold first step
can inflate the fit; the model then recovers from the requests it admits).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from router.cost_model import CostModel
from router.types import Rejection


@dataclass(frozen=True, slots=True)
class TierPolicy:
    reserved_fraction: float
    priority: int
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True, slots=True)
class DecodeThrottle:
    saturation: float = 0.8  # decode counts as saturated at this share of the tier's TPOT SLO
    action: str = "cap"  # "cap" | "reject"
    cap_max_tokens: int = 128
    below_priority: int = 50  # tiers with a lower priority are throttled


@dataclass(frozen=True, slots=True)
class AdmissionRules:
    """What admission decides by (``router.admission`` and ``router.qos_tiers``, see
    router/admission_stage.py): the tiers, the decode throttle (None: off), the Retry-After floor and
    what the tiers' reserved fractions divide on the TTFT side (``tier_budget``) and the TPOT side
    (``tpot_budget``)."""

    tiers: Mapping[str, TierPolicy]
    throttle: DecodeThrottle | None = None
    min_retry_after_s: float = 1.0
    tier_budget: str = "waiting-room"  # "waiting-room" | "slo"
    tpot_budget: str = "headroom"  # "headroom" | "slo"


@dataclass(frozen=True, slots=True)
class Admission:
    predicted_ttft_s: float
    predicted_tpot_s: float
    queue_wait_s: float
    max_new_tokens: int | None = None  # set when decode throttling capped the request


def engine_priority(tier_priority: int) -> int:
    """The vLLM request priority of a tier of QoS ``tier_priority`` (higher is more important; vLLM
    serves lower values first)."""
    return -tier_priority


def usable_fraction(tier: str, tiers: Mapping[str, TierPolicy], active: Collection[str] | None = None) -> float:
    """Share of the queueing budget a tier may fill: its own reservation plus all lower (and equal)
    tiers', plus the reservations of the higher tiers not in ``active`` (lent while they are idle).
    ``active=None``: every tier is active (strict reservations). ``tier`` itself always counts as active."""
    me = tiers[tier]
    return min(
        1.0,
        sum(
            t.reserved_fraction
            for name, t in tiers.items()
            if t.priority <= me.priority or (active is not None and name not in active)
        ),
    )


def decide(
    tier: str,
    rules: AdmissionRules,
    model: CostModel,
    *,
    queued_prefill_tokens: int,
    uncached_tokens: int,
    decode_batch: int,
    decode_model: CostModel | None = None,
    decode_idle: bool | None = None,
    max_new_tokens: int = 0,
    prompt_tokens: int = 0,
    decode_context_tokens: int = 0,
    active: Collection[str] | None = None,
) -> Admission | Rejection:
    """Admit or reject one request of ``tier`` by ``rules`` (see module docstring). ``model`` is the prefilling pool's,
    ``decode_model`` the decode pool's (default: the same); ``decode_batch`` excludes the request.
    ``decode_idle`` (default ``decode_batch == 0``) is the liveness test for TPOT; callers pass their
    own exact in-flight count, since polled engine counts lag. ``decode_context_tokens``: KV tokens the
    decode replica's running requests hold now. ``active``: the tiers demanding capacity now (see
    ``usable_fraction``; None = all of them)."""
    if decode_idle is None:
        decode_idle = decode_batch <= 0
    tiers, throttle, min_retry_after_s = rules.tiers, rules.throttle, rules.min_retry_after_s
    pol = tiers[tier]
    dm = decode_model or model
    wait = model.prefill_s(queued_prefill_tokens) * model.ttft_bias
    first_step = dm.decode_step_s(decode_batch + 1, decode_context_tokens + prompt_tokens)
    ttft = wait + (model.prefill_s(uncached_tokens) + first_step) * model.ttft_bias
    life_context = decode_context_tokens + prompt_tokens + max(max_new_tokens, 0) // 2
    tpot = dm.decode_step_s(decode_batch + 1, life_context) * dm.tpot_bias
    top_ttft = max(t.ttft_s for t in tiers.values())
    top_tpot = max(t.tpot_s for t in tiers.values())
    if tpot > top_tpot and not decode_idle:
        return Rejection(
            reason="overload_tpot",
            status_code=503,
            retry_after_s=max(min_retry_after_s, 2 * tpot),
            message=f"decode is saturated (predicted {tpot * 1e3:.0f} ms per token); retry later",
        )
    idle = queued_prefill_tokens <= 0
    if ttft > top_ttft and not idle:
        return Rejection(
            reason="overload_ttft",
            status_code=503,
            retry_after_s=_retry(ttft - top_ttft, min_retry_after_s),
            message=f"prefill queue is full (predicted time to first token {ttft:.1f} s); retry later",
        )
    # the tier's share of the queueing budget (the queue as it would be with this request in it, so a
    # lower tier's last admission cannot spill into a higher tier's share), and its own SLO
    share = usable_fraction(tier, tiers, active)
    own_service = ttft - wait
    if rules.tier_budget == "slo":
        budget = share * pol.ttft_s
    else:  # a top tier only needs its SLO; lower ones leave room for one more request's service
        budget = math.inf if share >= 1.0 else share * max(pol.ttft_s - own_service, 0.0)
    queue_after = wait + model.prefill_s(uncached_tokens) * model.ttft_bias
    tpot_limit = pol.tpot_s
    if rules.tpot_budget != "slo" and share < 1.0:  # headroom above the request's step time alone
        alone = dm.decode_step_s(1, prompt_tokens + max(max_new_tokens, 0) // 2) * dm.tpot_bias
        tpot_limit = alone + share * max(pol.tpot_s - alone, 0.0)
    if not idle and (queue_after > budget or ttft > pol.ttft_s) or (tpot > tpot_limit and not decode_idle):
        over = max(queue_after - budget, ttft - pol.ttft_s, 0.0)
        return Rejection(
            reason="tier_quota",
            status_code=429,
            retry_after_s=_retry(over, min_retry_after_s),
            message=f"capacity for tier '{tier}' is exhausted; retry later or use a higher tier",
        )
    cap = None
    if (
        throttle is not None
        and pol.priority < throttle.below_priority
        and not decode_idle
        and tpot >= throttle.saturation * tpot_limit
    ):
        if throttle.action == "reject":
            return Rejection(
                reason="decode_throttled",
                status_code=429,
                retry_after_s=max(min_retry_after_s, 2 * tpot),
                message=f"decode capacity for tier '{tier}' is throttled; retry later or use a higher tier",
            )
        if max_new_tokens > throttle.cap_max_tokens:
            cap = throttle.cap_max_tokens
    return Admission(predicted_ttft_s=ttft, predicted_tpot_s=tpot, queue_wait_s=wait, max_new_tokens=cap)


def _retry(seconds: float, floor: float) -> float:
    return float(max(floor, math.ceil(seconds)))
