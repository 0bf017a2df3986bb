"""ClusterConfig: the one pydantic root of a pdserve deployment, loaded from YAML.

Each package owns its own section (``workers.config.PoolConfig``, ``router.config.RouterConfig``);
this module composes them and holds the cross-field invariants, one validator each.

A config file is either complete or an overlay: a top-level ``base:`` key names the file it changes
(``default`` for the embedded default, ``serve/default.yaml``, or a path relative to the overlay's
directory), and the rest of the file is merged over it (``merge_overlay``). ``KEY=VALUE`` edits
(``pdserve serve --set``) apply to the resolved mapping last (``apply_overrides``). ``load_config_data``
is the one loader that does both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router.config import RouterConfig
from workers.config import CpuDevice, KvHandoffConfig, PoolConfig, PoolRole

BUNDLED_SMOLLM2 = "bundled:smollm2"
DEFAULT_CONFIG = Path(__file__).resolve().parent / "default.yaml"  # package data: ships with the wheel
BASE_KEY = "base"
DEFAULT_BASE = "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    name: str = Field(..., min_length=1, description="the model id clients send and /v1/models lists")
    path: str = Field(BUNDLED_SMOLLM2, description=f"'{BUNDLED_SMOLLM2}' or a local HF-format model dir")
    max_model_len: int = Field(2048, ge=16)


class RayConfig(_Strict):
    address: str | None = Field(None, description="None starts a local Ray; 'auto' or ray://... joins one")
    num_cpus: int | None = Field(16, ge=1, description="logical CPUs of a local Ray (oversubscribed on purpose)")
    serving_cores: str = Field(
        "auto",
        pattern=r"^(auto|all|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)$",
        description="cores a local Ray's own processes run on (GCS, raylet, Serve "
        "controller and proxy, the ingress and the replicas' serving threads; engines' "
        "compute threads keep their device.cpu_cores pins): 'auto' = every core no "
        "decode engine is pinned to, so the serving stack never preempts a decode step "
        "(serve/affinity.py); 'all' = no restriction; or a list like '0' or '0-3'",
    )


class KeyLimits(_Strict):
    """Per-key limits; null = no limit of that kind."""

    requests_per_s: float | None = Field(None, gt=0, description="token bucket refill rate of requests")
    request_burst: int | None = Field(
        None, ge=1, description="requests the bucket holds (default: requests_per_s rounded up, at least 1)"
    )
    tokens_per_min: int | None = Field(
        None, ge=1, description="prompt + max completion tokens per minute, charged when a request is admitted"
    )
    max_concurrent_requests: int | None = Field(None, ge=1, description="in-flight requests (streamed or not)")

    def over(self, base: KeyLimits | None) -> KeyLimits:
        """These limits with every field left null taken from ``base``."""
        if base is None:
            return self
        return KeyLimits(**{k: v if v is not None else getattr(base, k) for k, v in self})


class AuthConfig(_Strict):
    """API keys: each binds a tenant (prefix-cache isolation) and a maximum QoS tier. Keys are read from
    ``keys_file`` and/or the environment variable ``keys_env`` (never from this config), hashed at load."""

    enabled: bool | None = Field(None, description="null: on when keys_file or keys_env is set")
    keys_file: str | None = Field(None, description="YAML/JSON list of {key or key_sha256, tenant, max_tier, limits}")
    keys_env: str | None = Field(None, description="name of an environment variable holding that same list")
    metrics: Literal["open", "key"] = Field("open", description="/metrics open, or only with a valid key")
    tier_limits: dict[str, KeyLimits] = Field(
        default_factory=dict, description="limits of every key of a tier (a key's own limits override them)"
    )

    @property
    def on(self) -> bool:
        return self.enabled if self.enabled is not None else bool(self.keys_file or self.keys_env)

    @model_validator(mode="after")
    def _keys_when_on(self) -> AuthConfig:
        if self.enabled and not (self.keys_file or self.keys_env):
            raise ValueError("auth.enabled needs keys_file or keys_env")
        return self


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    direct_ingress: bool = Field(
        True,
        description="the ingress replica serves HTTP on `port` itself (Ray Serve direct ingress): no proxy hop, "
        "0.63x the serving CPU per streamed token (loadtests/results/20261130-141915-serving-cpu); while a "
        "restarted ingress replica comes up, connections are refused. false puts Ray Serve's HTTP proxy on `port` "
        "(it answers 503 meanwhile)",
    )
    max_ongoing_requests: int = Field(
        512, ge=1, description="generation requests the ingress serves at once; beyond it 503 server_overloaded"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413 before parsing")
    max_queued_requests: int = Field(
        1024, ge=1, description="Serve handle queue bound of every deployment (ingress and pools); beyond it 503"
    )
    graceful_shutdown_timeout_s: float = Field(
        30.0, gt=0, description="a replica Serve stops (scale-in, shutdown) finishes in-flight requests this long"
    )
    drain_grace_s: float = Field(
        30.0,
        gt=0,
        description="on SIGTERM, in-flight requests get this long to finish before the cluster stops "
        "(stopping takes ~10-30 s more; leave that to a supervisor's kill timeout)",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)


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
        # a flex pool always keeps flex.min_decode >= 1 replicas in the decode role
        if not any(p.role in (PoolRole.DECODE, PoolRole.FLEX) for p in self.pools):
            raise ValueError("pools: need at least one pool with role ['decode'] or ['flex']")
        return self

    @model_validator(mode="after")
    def _same_block_size(self) -> ClusterConfig:
        sizes = {p.engine.block_size for p in self.pools}
        if len(sizes) > 1:
            raise ValueError(
                f"pools: engine.block_size must match across pools for the KV handoff, got {sorted(sizes)}"
            )
        return self

    @model_validator(mode="after")
    def _cpu_block_size(self) -> ClusterConfig:
        for p in self.pools:
            if isinstance(p.device, CpuDevice) and p.engine.block_size % 32:
                raise ValueError(
                    f"pools.{p.name}.engine.block_size: the vLLM CPU attention backend needs "
                    f"a multiple of 32, got {p.engine.block_size}"
                )
        return self

    @model_validator(mode="after")
    def _max_model_len_fits(self) -> ClusterConfig:
        for p in self.pools:
            if p.engine.max_model_len is not None and p.engine.max_model_len < self.model.max_model_len:
                raise ValueError(
                    f"pools.{p.name}.engine.max_model_len ({p.engine.max_model_len}) is below "
                    f"model.max_model_len ({self.model.max_model_len})"
                )
        return self

    @model_validator(mode="after")
    def _auth_tiers_declared(self) -> ClusterConfig:
        unknown = sorted(set(self.server.auth.tier_limits) - set(self.router.qos_tiers))
        if unknown:
            raise ValueError(f"server.auth.tier_limits: tiers {unknown} are not in router.qos_tiers")
        return self

    @model_validator(mode="after")
    def _default_tier_declared(self) -> ClusterConfig:
        if self.router.default_tier not in self.router.qos_tiers:
            raise ValueError(
                f"router.default_tier {self.router.default_tier!r} is not one of "
                f"router.qos_tiers {sorted(self.router.qos_tiers)}"
            )
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        return cls.model_validate(data)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> ClusterConfig:
        """The config at ``path`` (an overlay resolved over its base), with ``overrides`` applied."""
        data = load_config_data(path, overrides)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(Path(path), e)) from None


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending field."""


def format_validation_error(source: str | Path, err: ValidationError) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} error(s))"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def load_config_data(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The mapping a config file stands for: its ``base:`` chain merged (``merge_overlay``), then the
    ``KEY=VALUE`` ``overrides`` applied (``apply_overrides``). Not validated."""
    data = _resolve(Path(path), ())
    return apply_overrides(data, overrides)


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _resolve(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    real = path.resolve()
    if real in seen:
        raise ConfigError(f"{path}: base chain loops: {' -> '.join(str(p) for p in (*seen, real))}")
    data = _read_mapping(path)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: {BASE_KEY} must be '{DEFAULT_BASE}' or a path, got {base!r}")
    base_path = DEFAULT_CONFIG if base == DEFAULT_BASE else path.parent / base
    try:
        return merge_overlay(_resolve(base_path, (*seen, real)), data)
    except _MergeError as e:
        raise ConfigError(f"{path}: {e}") from None


class _MergeError(ValueError):
    """An overlay that does not fit its base; ``_resolve`` names the file."""


def merge_overlay(base: Any, overlay: Any, where: str = "") -> Any:
    """``overlay`` over ``base``; ``base`` is not modified. Mappings merge key by key, recursively. A list
    of named mappings (``pools``) given a mapping in the overlay merges by name: ``{decode: {replicas: 2}}``
    changes the pool named ``decode``, ``{prefill: null}`` removes that pool, a new name appends a pool.
    Anything else replaces what the base has: scalars, null, and lists given as lists."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = merge_overlay(merged[key], value, f"{where}{key}.") if key in merged else value
        return merged
    if _is_named_list(base) and isinstance(overlay, dict):
        items = {item["name"]: item for item in base}
        for name, value in overlay.items():
            if value is not None and not isinstance(value, dict):
                raise _MergeError(f"{where}{name}: expected a mapping or null, got {value!r}")
            if value is None:
                if name not in items:
                    raise _MergeError(f"{where}{name}: no entry of that name to remove (have {sorted(items)})")
                del items[name]
            elif name in items:
                items[name] = merge_overlay(items[name], value, f"{where}{name}.")
            else:
                items[name] = {"name": name, **value}
        return list(items.values())
    return overlay


def _is_named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "name" in v for v in value)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` edits of a config mapping, in place: ``KEY`` is dotted (``pools.0.replicas``: list
    items by index; a missing mapping key is created), ``VALUE`` is YAML (``24``, ``true``, ``[0, 1]``,
    ``text``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set wants KEY=VALUE, got {item!r}")
        *path, last = key.split(".")
        node: Any = data
        try:
            for part in path:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if isinstance(node, list):
                node[int(last)] = yaml.safe_load(raw)
            else:
                node[last] = yaml.safe_load(raw)
        except (IndexError, ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"--set {item!r}: {key} does not name a place in the config ({e})") from None
    return data
