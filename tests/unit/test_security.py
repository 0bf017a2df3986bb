"""serve/auth.py, serve/ratelimit.py, serve/gate.py: keys, tenant and tier binding, token buckets, body limit."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from serve.auth import (
    KeyStore,
    effective_tier,
    hash_key,
    hashed_keys,
    load_key_entries,
    parse_entries,
)
from serve.config import DEFAULT_CONFIG, AuthConfig, ClusterConfig, ConfigError, KeyLimits
from serve.gate import Gate, read_limited, refuse_when_busy
from serve.protocol import ApiError
from serve.ratelimit import RateLimiter, TokenBucket

TIERS = {"premium": 100, "standard": 50, "free": 10}
KEY_A, KEY_B = "sk-alpha-0123456789", "sk-bravo-0123456789"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _keys(*entries) -> list[dict]:
    return hashed_keys(parse_entries(json.dumps(list(entries)), "test"), TIERS)


class TestKeys:
    def test_hashed_at_load_and_only_hashes_leave(self):
        keys = _keys(
            {"key": KEY_A, "tenant": "acme", "max_tier": "free"},
            {"key_sha256": hash_key(KEY_B).upper(), "tenant": "globex", "max_tier": "premium"},
        )
        assert KEY_A not in json.dumps(keys) and keys[0]["sha256"] == hash_key(KEY_A)
        store = KeyStore(keys, {})
        assert store.authenticate(f"Bearer {KEY_A}").tenant == "acme"
        assert store.authenticate(f"bearer  {KEY_B} ").max_tier == "premium"

    @pytest.mark.parametrize("header", [None, "", KEY_A, f"Basic {KEY_A}", "Bearer sk-unknown-000000", "Bearer "])
    def test_missing_malformed_or_unknown_is_401_without_detail(self, header):
        store = KeyStore(_keys({"key": KEY_A, "tenant": "acme", "max_tier": "free"}), {})
        with pytest.raises(ApiError) as e:
            store.authenticate(header)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        assert "acme" not in e.value.message and KEY_A not in e.value.message

    def test_entry_errors(self):
        with pytest.raises(ConfigError, match="exactly one"):
            parse_entries(json.dumps([{"tenant": "a", "max_tier": "free"}]), "f")
        with pytest.raises(ConfigError) as e:  # the message names fields, never the key
            parse_entries(json.dumps([{"key": KEY_A, "tenant": "a", "max_tier": "free", "x": 1}]), "f")
        assert KEY_A not in str(e.value)
        with pytest.raises(ConfigError, match="max_tier 'gold'"):
            _keys({"key": KEY_A, "tenant": "a", "max_tier": "gold"})
        with pytest.raises(ConfigError, match="twice"):
            _keys({"key": KEY_A, "tenant": "a", "max_tier": "free"}, {"key": KEY_A, "tenant": "b", "max_tier": "free"})

    def test_sources_file_and_env(self, tmp_path):
        f = tmp_path / "keys.yaml"
        f.write_text(f"keys:\n  - {{key: {KEY_A}, tenant: acme, max_tier: free}}\n")
        env = {"PD_KEYS": json.dumps([{"key": KEY_B, "tenant": "globex", "max_tier": "premium"}])}
        both = load_key_entries(AuthConfig(keys_file=str(f), keys_env="PD_KEYS"), env)
        assert [e.tenant for e in both] == ["acme", "globex"]
        with pytest.raises(ConfigError, match="PD_MISSING is not set"):
            load_key_entries(AuthConfig(keys_env="PD_MISSING"), env)
        with pytest.raises(ConfigError, match="cannot read"):
            load_key_entries(AuthConfig(keys_file=str(tmp_path / "none.yaml")), env)
        with pytest.raises(ConfigError, match="no keys"):
            load_key_entries(AuthConfig(keys_env="PD_EMPTY"), {"PD_EMPTY": "[]"})

    def test_auth_config(self):
        assert not AuthConfig().on and AuthConfig(keys_env="X").on and not AuthConfig(keys_env="X", enabled=False).on
        with pytest.raises(ValueError, match="needs keys_file or keys_env"):
            AuthConfig(enabled=True)
        with pytest.raises(ConfigError, match=r"tiers \['gold'\] are not in router.qos_tiers"):
            ClusterConfig.from_yaml(DEFAULT_CONFIG, ["server.auth.tier_limits={gold: {requests_per_s: 1}}"])
        assert ClusterConfig.from_yaml(DEFAULT_CONFIG).server.auth.on is False  # the local default: auth off


class TestTier:
    @pytest.mark.parametrize(
        "asked, max_tier, got",
        [
            (None, "standard", "standard"),
            ("premium", "free", "free"),
            ("premium", "standard", "standard"),
            ("free", "premium", "free"),
            ("standard", "standard", "standard"),
        ],
    )
    def test_header_lowers_never_raises(self, asked, max_tier, got):
        assert effective_tier(asked, max_tier, TIERS) == got


def _gate(limits=None, tier_limits=None, clock=None, **auth):
    keys = _keys({"key": KEY_A, "tenant": "acme", "max_tier": "standard", **({"limits": limits} if limits else {})})
    cfg = AuthConfig(keys_env="K", tier_limits=tier_limits or {}, **auth)
    return Gate(cfg, keys, TIERS, clock=clock or Clock())


class TestGate:
    def test_identity_binds_tenant_and_caps_tier(self):
        g = _gate()
        p = g.authenticate(f"Bearer {KEY_A}")
        assert g.identity(p, "premium", None) == ("standard", "acme")
        assert g.identity(p, "free", "acme") == ("free", "acme")
        with pytest.raises(ApiError) as e:
            g.identity(p, None, "globex")
        assert (e.value.status_code, e.value.code) == (403, "tenant_mismatch")

    def test_admin_routes_need_an_admin_key(self):
        keys = _keys(
            {"key": KEY_A, "tenant": "acme", "max_tier": "free"},
            {"key": KEY_B, "tenant": "ops", "max_tier": "free", "admin": True},
        )
        g = Gate(AuthConfig(keys_env="K"), keys, TIERS)
        g.authenticate_admin(f"Bearer {KEY_B}")
        with pytest.raises(ApiError) as e:
            g.authenticate_admin(f"Bearer {KEY_A}")
        assert (e.value.status_code, e.value.code) == (403, "not_admin")
        with pytest.raises(ApiError) as e:
            g.authenticate_admin(None)
        assert e.value.status_code == 401
        Gate(AuthConfig(), [], TIERS).authenticate_admin(None)  # auth off: open, like every route

    def test_auth_off_lets_everything_by(self):
        g = Gate(AuthConfig(), [], TIERS)
        assert g.authenticate(None) is None
        assert g.identity(None, "premium", "anyone") == ("premium", "anyone")
        assert g.admit(None, 10**9) == {} and not g.metrics_need_key

    def test_metrics_protection_is_configurable(self):
        assert _gate(metrics="key").metrics_need_key and not _gate().metrics_need_key

    def test_request_bucket_trips_with_retry_after_and_refills(self):
        clock = Clock()
        g = _gate(limits={"requests_per_s": 0.5, "request_burst": 2}, clock=clock)
        p = g.authenticate(f"Bearer {KEY_A}")
        h = g.admit(p, 10)
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("2", "1")
        g.admit(p, 10)
        with pytest.raises(ApiError) as e:
            g.admit(p, 10)
        assert (e.value.status_code, e.value.code) == (429, "rate_limit_exceeded")
        hdr = e.value.headers()
        assert hdr["Retry-After"] == "2" and hdr["x-ratelimit-remaining-requests"] == "0"
        assert hdr["x-ratelimit-reset-requests"] == "4.000s"
        clock.t += 2.0
        assert g.admit(p, 10)["x-ratelimit-remaining-requests"] == "0"

    def test_token_bucket_charges_prompt_plus_max_tokens(self):
        clock = Clock()
        g = _gate(tier_limits={"standard": KeyLimits(tokens_per_min=600)}, clock=clock)  # 10 tokens/s
        p = g.authenticate(f"Bearer {KEY_A}")
        assert g.admit(p, 500)["x-ratelimit-remaining-tokens"] == "100"
        with pytest.raises(ApiError) as e:
            g.admit(p, 200)
        assert e.value.status_code == 429 and e.value.headers()["Retry-After"] == "10"
        clock.t += 10
        assert g.admit(p, 200)["x-ratelimit-remaining-tokens"] == "0"
        with pytest.raises(ApiError) as e:  # can never fit: 400, retrying will not help
            g.admit(p, 601)
        assert (e.value.status_code, e.value.code) == (400, "request_exceeds_rate_limit")

    def test_concurrency_cap_and_release(self):
        g = _gate(limits={"max_concurrent_requests": 2})
        p = g.authenticate(f"Bearer {KEY_A}")
        g.admit(p, 1)
        g.admit(p, 1)
        with pytest.raises(ApiError) as e:
            g.admit(p, 1)
        assert e.value.status_code == 429 and "concurrent" in e.value.message
        g.release(p)
        g.admit(p, 1)
        assert g.in_flight(p) == 2

    def test_key_limits_override_tier_limits_field_by_field(self):
        merged = KeyLimits(requests_per_s=1).over(KeyLimits(requests_per_s=5, tokens_per_min=100))
        assert (merged.requests_per_s, merged.tokens_per_min) == (1, 100)

    def test_a_busy_or_draining_server_refuses_in_openai_shape(self):
        refuse_when_busy(False, 511, 512, 30)  # below the limit: admitted
        with pytest.raises(ApiError) as e:
            refuse_when_busy(False, 512, 512, 30)
        assert (e.value.status_code, e.value.code, e.value.headers()["Retry-After"]) == (503, "server_overloaded", "1")
        with pytest.raises(ApiError) as e:
            refuse_when_busy(True, 0, 512, 30)
        assert (e.value.status_code, e.value.code, e.value.headers()["Retry-After"]) == (503, "draining", "30")

    def test_unused_completion_tokens_are_given_back(self):
        clock = Clock()
        lim = RateLimiter(clock)
        limits = KeyLimits(tokens_per_min=600)
        assert lim.admit("k", limits, 500).allowed  # prompt 100 + max_tokens 400
        assert not lim.admit("k", limits, 500).allowed
        lim.release("k", unused_tokens=390)  # it generated 10 of its 400
        d = lim.admit("k", limits, 480)
        assert d.allowed and d.headers["x-ratelimit-remaining-tokens"] == "10"
        lim.release("k", unused_tokens=10_000)  # never above the bucket's capacity
        assert lim.admit("k", limits, 600).allowed and not lim.admit("k", limits, 1).allowed

    def test_refused_request_takes_nothing(self):
        clock = Clock()
        lim = RateLimiter(clock)
        limits = KeyLimits(requests_per_s=1, request_burst=1, tokens_per_min=60)
        assert not lim.admit("k", limits, 100).allowed  # too many tokens: the request unit stays
        assert lim.admit("k", limits, 10).allowed


class TestBucket:
    def test_wait_and_capacity(self):
        b = TokenBucket.full(rate=2.0, capacity=4, now=0.0)
        b.level = 0.0
        assert b.wait_s(1) == 0.5 and b.wait_s(5) == math.inf and b.reset_s() == 2.0
        b.refill(1.0)
        assert b.level == 2.0
        b.refill(0.5)  # a clock that steps back adds nothing
        assert b.level == 2.0


async def _chunks(parts):
    for p in parts:
        yield p


class TestBodyLimit:
    def test_content_length_over_the_limit_is_413_before_reading(self):
        async def never():
            raise AssertionError("read")
            yield b""

        with pytest.raises(ApiError) as e:
            asyncio.run(read_limited("2097152", never(), 1 << 20))
        assert (e.value.status_code, e.value.code) == (413, "request_too_large")

    def test_chunked_body_is_cut_off_while_reading(self):
        with pytest.raises(ApiError) as e:
            asyncio.run(read_limited(None, _chunks([b"x" * 600, b"x" * 600]), 1000))
        assert e.value.status_code == 413
        assert asyncio.run(read_limited("10", _chunks([b"x" * 10]), 1000)) == b"x" * 10


class TestAppWiring:
    def test_serve_queue_bound_and_graceful_shutdown_come_from_config(self):
        from serve.app import pool_deployment_options

        cfg = ClusterConfig.from_yaml(
            DEFAULT_CONFIG, ["server.max_queued_requests=7", "server.graceful_shutdown_timeout_s=42"]
        )
        opts = pool_deployment_options(cfg.pools[0], cfg)
        assert (opts["max_queued_requests"], opts["graceful_shutdown_timeout_s"]) == (7, 42)

    def test_ingress_gets_hashes_only_and_nothing_with_auth_off(self, monkeypatch):
        from serve.app import ingress_keys

        assert ingress_keys(ClusterConfig.from_yaml(DEFAULT_CONFIG)) == []
        monkeypatch.setenv("PD_TEST_KEYS", json.dumps([{"key": KEY_A, "tenant": "acme", "max_tier": "premium"}]))
        keys = ingress_keys(ClusterConfig.from_yaml(DEFAULT_CONFIG, ["server.auth.keys_env=PD_TEST_KEYS"]))
        assert keys == [
            {"sha256": hash_key(KEY_A), "tenant": "acme", "max_tier": "premium", "limits": None, "admin": False}
        ]


class TestOpenApi:
    def test_every_public_route_with_bodies_and_openai_errors(self):
        from serve.ingress import app

        doc = app.openapi()
        assert set(doc["paths"]) == {
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/models",
            "/health",
            "/metrics",
            "/admin/drain",
        }
        chat = doc["paths"]["/v1/chat/completions"]["post"]
        assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
        err = {"$ref": "#/components/schemas/ErrorResponse"}
        for code in ("400", "401", "403", "404", "413", "429", "503"):
            assert chat["responses"][code]["content"]["application/json"]["schema"] == err
        assert "422" not in chat["responses"]
        schemas = doc["components"]["schemas"]
        assert schemas["ErrorDetail"]["required"] == ["message", "type", "param", "code"]
        assert schemas["ChatCompletionRequest"]["additionalProperties"] is False
        assert doc["paths"]["/health"]["get"]["security"] == []
        assert [h["name"] for h in chat["parameters"]] == ["x-customer-tier", "x-tenant-id"]

    def test_header_parameters_carry_the_configured_names(self):
        from fastapi import FastAPI

        from serve.openapi import build_openapi

        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat() -> dict:
            return {}

        doc = build_openapi(app, tier_header="x-plan", tenant_header="x-org")
        names = [h["name"] for h in doc["paths"]["/v1/chat/completions"]["post"]["parameters"]]
        assert names == ["x-plan", "x-org"]
