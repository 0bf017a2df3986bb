"""ClusterConfig: the one pydantic root of a pdserve deployment, loaded from YAML.

Each package owns its own section (``workers.config.PoolConfig``, ``router.config.RouterConfig``);
this module composes them and holds the cross-field invariants, one validator each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router.config import RouterConfig
from workers.config import CpuDevice, KvHandoffConfig, PoolConfig, PoolRole

BUNDLED_SMOLLM2 = "bundled:smollm2"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    name: str = Field(..., min_length=1, description="the model id clients send and /v1/models lists")
    path: str = Field(BUNDLED_SMOLLM2, description=f"'{BUNDLED_SMOLLM2}' or a local HF-format model dir")
    max_model_len: int = Field(2048, ge=16)


class RayConfig(_Strict):
    address: str | None = Field(None, description="None starts a local Ray; 'auto' or ray://... joins one")
    num_cpus: int | None = Field(16, ge=1, description="logical CPUs of a local Ray (oversubscribed on purpose)")
    serving_cores: str = Field("auto", pattern=r"^(auto|all|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)$",
                               description="cores a local Ray's own processes run on (GCS, raylet, Serve "
                               "controller and proxy, the ingress and the replicas' serving threads; engines' "
                               "compute threads keep their device.cpu_cores pins): 'auto' = every core no "
                               "decode engine is pinned to, so the serving stack never preempts a decode step "
                               "(serve/affinity.py); 'all' = no restriction; or a list like '0' or '0-3'")


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_ongoing_requests: int = Field(512, ge=1, description="ingress replica concurrency")


class ClusterConfig(_Strict):
    model: ModelConfig
    pools: list[PoolConfig] = Field(..., min_length=1)
    router: RouterConfig = Field(default_factory=RouterConfig)
    kv_handoff: KvHandoffConfig = Field(default_factory=KvHandoffConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    app_name: str = Field("pdserve", pattern=r"^[a-zA-Z][a-zA-Z0-9_-]*$")

    @model_validator(mode="after")
    def _unique_pool_names(self) -> ClusterConfig:
        names = [p.name for p in self.pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pools: duplicate pool names {dupes}")
        return self

    @model_validator(mode="after")
    def _decode_role_present(self) -> ClusterConfig:
        # prefill pools are optional: without one every request prefills on its decode replica
        # (colocated serving with prefix-aware placement and admission)
        if not any(p.role is PoolRole.DECODE for p in self.pools):
            raise ValueError("pools: need at least one pool with role ['decode']")
        return self

    @model_validator(mode="after")
    def _same_block_size(self) -> ClusterConfig:
        sizes = {p.engine.block_size for p in self.pools}
        if len(sizes) > 1:
            raise ValueError(f"pools: engine.block_size must match across pools for the KV handoff, "
                             f"got {sorted(sizes)}")
        return self

    @model_validator(mode="after")
    def _cpu_block_size(self) -> ClusterConfig:
        for p in self.pools:
            if isinstance(p.device, CpuDevice) and p.engine.block_size % 32:
                raise ValueError(f"pools.{p.name}.engine.block_size: the vLLM CPU attention backend needs "
                                 f"a multiple of 32, got {p.engine.block_size}")
        return self

    @model_validator(mode="after")
    def _max_model_len_fits(self) -> ClusterConfig:
        for p in self.pools:
            if p.engine.max_model_len is not None and p.engine.max_model_len < self.model.max_model_len:
                raise ValueError(f"pools.{p.name}.engine.max_model_len ({p.engine.max_model_len}) is below "
                                 f"model.max_model_len ({self.model.max_model_len})")
        return self

    @model_validator(mode="after")
    def _default_tier_declared(self) -> ClusterConfig:
        if self.router.default_tier not in self.router.qos_tiers:
            raise ValueError(f"router.default_tier {self.router.default_tier!r} is not one of "
                             f"router.qos_tiers {sorted(self.router.qos_tiers)}")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        return cls.model_validate(data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(path, e)) from None


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending field."""


def format_validation_error(source: str | Path, err: ValidationError) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} error(s))"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)
