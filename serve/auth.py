"""API keys (pure): loading, hashing, lookup, and the tenant and tier a key allows.

A key file (or the environment variable ``server.auth.keys_env``) holds a YAML or JSON list of entries
``{key | key_sha256, tenant, max_tier, limits}``. Keys are hashed (sha256) when loaded and only the hashes
travel to the ingress; a presented key is hashed and compared with every stored hash by
``hmac.compare_digest``. Keys are never logged, and a refusal never says which keys exist.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from serve.config import AuthConfig, ConfigError, KeyLimits
from serve.protocol import ApiError

BEARER = "bearer "


class ApiKeyEntry(BaseModel):
    """One key as written in the key file: the key itself or its sha256 (hex), never both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = Field(None, min_length=8, description="the key in clear (hashed at load)")
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="sha256 hex of the key")
    tenant: str = Field(..., min_length=1, description="prefix-cache tenant of every request with this key")
    max_tier: str = Field(..., min_length=1, description="highest QoS tier; the tier header may only lower it")
    limits: KeyLimits | None = Field(None, description="this key's limits (over its tier's)")
    admin: bool = Field(False, description="may use the admin routes (POST /admin/drain)")

    @model_validator(mode="after")
    def _one_key(self) -> ApiKeyEntry:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key and key_sha256")
        return self

    def digest(self) -> str:
        return self.key_sha256.lower() if self.key_sha256 else hash_key(self.key)


_ENTRIES = TypeAdapter(list[ApiKeyEntry])


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: ``key_id`` is a short, log-safe id of the key (a prefix of its hash)."""

    key_id: str
    tenant: str
    max_tier: str
    limits: KeyLimits
    admin: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_entries(text: str, source: str) -> list[ApiKeyEntry]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML/JSON: {e}") from None
    if isinstance(data, dict) and "keys" in data:
        data = data["keys"]
    try:
        return _ENTRIES.validate_python(data)
    except ValidationError as e:
        # the messages name fields only: input values (keys) are left out
        msgs = "; ".join(f"{'.'.join(str(p) for p in x['loc'])}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"{source}: invalid key entries: {msgs}") from None


def load_key_entries(auth: AuthConfig, environ: Mapping[str, str] = os.environ) -> list[ApiKeyEntry]:
    """Every key ``auth`` names (file, then environment variable); ConfigError when a source is missing."""
    entries: list[ApiKeyEntry] = []
    if auth.keys_file:
        path = Path(auth.keys_file)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"server.auth.keys_file: cannot read {path}: {e.strerror}") from None
        entries += parse_entries(text, str(path))
    if auth.keys_env:
        if auth.keys_env not in environ:
            raise ConfigError(f"server.auth.keys_env: environment variable {auth.keys_env} is not set")
        entries += parse_entries(environ[auth.keys_env], f"${auth.keys_env}")
    if auth.on and not entries:
        raise ConfigError("server.auth: authentication is on but no keys were loaded")
    return entries


def hashed_keys(entries: list[ApiKeyEntry], tiers: Mapping[str, int]) -> list[dict]:
    """The entries as the ingress receives them: sha256, tenant, tier, limits (no key in clear)."""
    out = []
    for e in entries:
        if e.max_tier not in tiers:
            raise ConfigError(f"server.auth keys: max_tier {e.max_tier!r} is not one of {sorted(tiers)}")
        limits = e.limits.model_dump() if e.limits else None
        out.append(
            {"sha256": e.digest(), "tenant": e.tenant, "max_tier": e.max_tier, "limits": limits, "admin": e.admin}
        )
    if len({k["sha256"] for k in out}) != len(out):
        raise ConfigError("server.auth keys: the same key is listed twice")
    return out


def invalid_key() -> ApiError:
    return ApiError(
        401,
        "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
        type_="invalid_request_error",
        code="invalid_api_key",
    )


class KeyStore:
    """The hashed keys: who a request's ``Authorization`` header names."""

    def __init__(self, keys: list[dict], tier_limits: Mapping[str, KeyLimits]) -> None:
        self._keys: list[tuple[bytes, Principal]] = []
        for k in keys:
            own = KeyLimits(**k["limits"]) if k.get("limits") else KeyLimits()
            limits = own.over(tier_limits.get(k["max_tier"]))
            p = Principal(k["sha256"][:12], k["tenant"], k["max_tier"], limits, bool(k.get("admin")))
            self._keys.append((bytes.fromhex(k["sha256"]), p))

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, authorization: str | None) -> Principal:
        """The key's principal; 401 ``invalid_api_key`` for a missing, malformed or unknown key."""
        if not authorization or authorization[: len(BEARER)].lower() != BEARER:
            raise invalid_key()
        presented = hashlib.sha256(authorization[len(BEARER) :].strip().encode()).digest()
        found = None
        for digest, p in self._keys:  # every entry compared: the time does not depend on which matched
            if hmac.compare_digest(digest, presented):
                found = p
        if found is None:
            raise invalid_key()
        return found


def effective_tier(requested: str | None, max_tier: str, priorities: Mapping[str, int]) -> str:
    """The tier a request runs at: the requested one when it is not above the key's ``max_tier``
    (QoS priority), else ``max_tier``; no request asks for more than its key allows. ``requested`` is a
    known tier or None (the key's own tier)."""
    if requested is None or priorities[requested] > priorities[max_tier]:
        return max_tier
    return requested


def check_tenant(requested: str | None, p: Principal) -> str:
    """The key's tenant; 403 when the request names another one."""
    if requested is not None and requested.strip() != p.tenant:
        raise ApiError(
            403,
            "This API key may not act for another tenant.",
            type_="permission_error",
            param="x-tenant-id",
            code="tenant_mismatch",
        )
    return p.tenant
