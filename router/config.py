"""Router configuration (pure pydantic). Policies are chosen by name; weights live here, not in code."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SloConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_ms: float = Field(2000.0, gt=0)
    tpot_ms: float = Field(200.0, gt=0)

    @property
    def ttft_s(self) -> float:
        return self.ttft_ms / 1e3

    @property
    def tpot_s(self) -> float:
        return self.tpot_ms / 1e3


class QosTierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reserved_fraction: float = Field(..., ge=0, le=1)
    priority: int
    slo: SloConfig | None = None


def _default_tiers() -> dict[str, QosTierConfig]:
    return {
        "premium": QosTierConfig(reserved_fraction=0.10, priority=100),
        "standard": QosTierConfig(reserved_fraction=0.30, priority=50),
        "free": QosTierConfig(reserved_fraction=0.60, priority=10),
    }


class PlacementConfig(BaseModel):
    """Scorer weights of the prefix-aware placement (score = prefix - load - kv) and the
    conditional-disaggregation thresholds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix_weight: float = Field(1.0, ge=0, description="x fraction of the prompt already cached")
    load_weight: float = Field(0.5, ge=0, description="x outstanding requests / max_batch_hint")
    kv_weight: float = Field(0.2, ge=0, description="x KV usage 0..1")
    max_batch_hint: int = Field(16, ge=1, description="normaliser for request load")
    local_prefill_max_tokens: int = Field(
        64, ge=0, description="uncached prompts this short prefill on the decode replica"
    )
    local_prefill_min_hit_ratio: float = Field(
        0.9, ge=0, le=1, description="...or when the decode replica already caches this share of the prompt"
    )
    prefill_queue_limit_tokens: int = Field(
        8192, ge=1, description="a prefill replica with more queued uncached tokens has no room"
    )
    local_prefill_when_sooner: bool = Field(
        False,
        description="prefill on the decode replica when the prefill "
        "replica is backed up and the decode engine would finish the prompt "
        "sooner, as long as the stall keeps the decode batch's next step "
        "within the TPOT SLO (decode engines absorb prefill bursts). Off: on "
        "the 2-core box it cut TTFT p50 at 2-4 req/s but raised ITL p99 "
        "(loadtests/results/20261129-232708)",
    )
    local_prefill_when_idle: bool = Field(
        True,
        description="prefill on the decode replica when it has nothing to do (no request running, waiting or "
        "dispatched) and would compute no more of the prompt than the prefill replica: no decode step waits "
        "for it, and the request skips the KV handoff and a hop (TTFT ~0.2 s instead of ~0.35 s for 256 tokens "
        "on the 2-core box)",
    )
    prefix_index_capacity_blocks: int = Field(1_000_000, ge=1)
    share_prefix_across_tenants: bool = Field(False, description="false: a tenant's hashes are salted")


ScorerName = Literal["prefix", "load", "kv"]


class PipelineConfig(BaseModel):
    """The slo-aware policy's stages by name (router/pipeline.py): filters -> weighted scorers (pick the
    decode replica) -> prefill decider (local or remote prefill, and where) -> admission (``router.admission``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filters: list[Literal["healthy"]] = Field(
        default_factory=lambda: ["healthy"], description="candidate filters applied to both roles (router/filters.py)"
    )
    scorers: dict[ScorerName, Annotated[float, Field(ge=0)]] | None = Field(
        None,
        description="scorer name -> weight (router/scorers.py), summed in this order; null: prefix, "
        "load and kv with the weights in router.placement",
    )
    decider: Literal["conditional"] = Field(
        "conditional", description="local or remote prefill (router/deciders.py; thresholds in router.placement)"
    )


class AdmissionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    prefill_tokens_per_s_prior: float = Field(300.0, gt=0)
    decode_step_s_prior: float = Field(0.10, gt=0)
    min_retry_after_s: float = Field(1.0, ge=0)
    warmup_prompt_tokens: list[int] = Field(
        default_factory=lambda: [128, 512],
        description="at start, once "
        "every pool is healthy, the router sends one request per size "
        "through the normal path so the cost models start from measured "
        "timings, not only the prior ([] = off)",
    )
    bias_alpha: float = Field(
        0.1,
        gt=0,
        le=1,
        description="weight of each observed/predicted TTFT and TPOT ratio in the model's running correction",
    )
    decode_throttle: Literal["off", "cap", "reject"] = Field(
        "cap", description="lower tiers when decode is saturated: cap max_tokens, or reject (429)"
    )
    decode_saturation: float = Field(0.8, gt=0, description="decode is saturated at this share of a tier's TPOT SLO")
    throttle_cap_max_tokens: int = Field(128, ge=1)
    throttle_below_priority: int = Field(50, description="tiers with a lower priority are throttled")
    tier_budget: Literal["waiting-room", "slo"] = Field(
        "waiting-room",
        description="what the tiers' reserved "
        "fractions divide: the waiting room the TTFT SLO leaves "
        "after one request's own service (SLO - predicted "
        "service), or the whole SLO ('slo')",
    )
    tpot_budget: Literal["headroom", "slo"] = Field(
        "headroom",
        description="decode side: a tier joins a "
        "decode batch only while the predicted TPOT stays within "
        "its reserved fractions' share of the headroom between the "
        "request's step time alone and the TPOT SLO (lower tiers "
        "stop first), or every tier up to its SLO ('slo')",
    )
    tier_idle_s: float | None = Field(
        30.0,
        ge=0,
        description="work-conserving reservations: a tier with "
        "no arrival for this long and no prefill work queued is idle, and its "
        "reserved fraction (queue budget and TPOT headroom) is lent to the "
        "lower tiers until its next arrival takes it back (so untiered traffic "
        "alone may use the whole budget); null: never lent, every tier keeps "
        "its reservation",
    )


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["slo-aware", "least-loaded", "round-robin"] = "slo-aware"
    stats_period_s: float = Field(0.5, gt=0, description="how often replicas publish load stats")
    stats_stale_s: float = Field(10.0, gt=0, description="a replica silent for longer is unhealthy")
    slo: SloConfig = Field(default_factory=SloConfig)
    qos_tiers: dict[str, QosTierConfig] = Field(default_factory=_default_tiers)
    default_tier: str = "free"
    tier_header: str = "x-customer-tier"
    tenant_header: str = Field("x-tenant-id", description="tenant for prefix-cache isolation (else the body's 'user')")
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    prefill_timeout_s: float = Field(
        60.0,
        gt=0,
        description="a remote prefill not answered within this "
        "long is given up on and the decode engine prefills the prompt itself "
        "(slab push mode: the longest a decode reservation waits for its "
        "prefill's write)",
    )
    idle_timeout_s: float = Field(
        600.0,
        gt=0,
        description="a decode stream with no output for this long "
        "ends in 504 engine_timeout (an error event once streaming) and both "
        "engines abort the request",
    )
    decode_migrations: int = Field(
        1,
        ge=0,
        description="a decode whose replica fails after its first token "
        "continues on another decode replica this many times (the prompt plus the "
        "tokens already sent, prefilled there); 0 = the failure is the request's error",
    )

    @model_validator(mode="after")
    def _weights_in_one_place(self) -> RouterConfig:
        set_here = self.placement.model_fields_set & set(_PLACEMENT_WEIGHTS.values())
        if self.pipeline.scorers is not None and set_here:
            raise ValueError(
                f"router.pipeline.scorers replaces router.placement.{sorted(set_here)[0]}: "
                "set the scorer weights in one place"
            )
        return self

    def scorer_weights(self) -> dict[str, float]:
        """Scorer name -> weight, in scoring order."""
        if self.pipeline.scorers is not None:
            return dict(self.pipeline.scorers)
        return {name: getattr(self.placement, field) for name, field in _PLACEMENT_WEIGHTS.items()}


_PLACEMENT_WEIGHTS = {"prefix": "prefix_weight", "load": "load_weight", "kv": "kv_weight"}
