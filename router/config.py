"""Router configuration (pure pydantic). Policies are chosen by name; weights live here, not in code."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SloConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_ms: float = Field(2000.0, gt=0)
    tpot_ms: float = Field(200.0, gt=0)


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


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["least-loaded"] = "least-loaded"
    stats_period_s: float = Field(0.5, gt=0, description="how often replicas publish load stats")
    stats_stale_s: float = Field(10.0, gt=0, description="a replica silent for longer is unhealthy")
    slo: SloConfig = Field(default_factory=SloConfig)
    qos_tiers: dict[str, QosTierConfig] = Field(default_factory=_default_tiers)
    default_tier: str = "free"
    tier_header: str = "x-customer-tier"
