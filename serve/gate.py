"""What a request passes before any engine work: the body size limit, the API key, the tenant and
tier the key allows, and the key's rate limits (``serve.auth``, ``serve.ratelimit``)."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterable, Mapping

from serve.auth import KeyStore, Principal, check_tenant, effective_tier
from serve.config import AuthConfig
from serve.protocol import ApiError
from serve.ratelimit import RateLimiter


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body too large: the limit is {limit} bytes.", param=None, code="request_too_large")


async def read_limited(content_length: str | None, chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed ``limit`` bytes: from ``Content-Length``
    before reading anything, else while reading (chunked bodies), never holding more than the limit."""
    if content_length is not None and content_length.strip().isdigit() and int(content_length) > limit:
        raise too_large(limit)
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            raise too_large(limit)
    return bytes(buf)


def refuse_when_busy(draining: bool, active: int, max_active: int, drain_grace_s: float) -> None:
    """503 + Retry-After for a new generation request while the server drains, or while it already serves
    ``max_active`` of them (``server.max_ongoing_requests``): refused in OpenAI shape by the ingress itself,
    before Serve's own replica limit (set above it, serve/app.py) would queue or drop it."""
    if draining:
        raise ApiError(
            503,
            "The server is draining and takes no new requests.",
            type_="server_error",
            code="draining",
            retry_after_s=drain_grace_s,
        )
    if active >= max_active:
        raise ApiError(
            503,
            f"The server is serving its maximum of {max_active} requests; retry shortly.",
            type_="server_error",
            code="server_overloaded",
            retry_after_s=1,
        )


class Gate:
    """Authentication and per-key limits of the ingress; with auth off every call lets requests by."""

    def __init__(self, auth: AuthConfig, keys: list[dict], priorities: Mapping[str, int], clock=time.monotonic) -> None:
        self.enabled = auth.on
        self.metrics_need_key = self.enabled and auth.metrics == "key"
        self._store = KeyStore(keys, auth.tier_limits)
        self._priorities = dict(priorities)
        self._limiter = RateLimiter(clock)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The key's principal (401 when it is missing or wrong); None when auth is off."""
        return self._store.authenticate(authorization) if self.enabled else None

    def authenticate_admin(self, authorization: str | None) -> None:
        """Admin routes: with auth on, a key marked ``admin`` (401 for a wrong key, 403 for another key)."""
        p = self.authenticate(authorization)
        if p is not None and not p.admin:
            raise ApiError(403, "This API key may not use admin routes.", type_="permission_error", code="not_admin")

    def identity(self, p: Principal | None, tier: str | None, tenant: str | None) -> tuple[str | None, str | None]:
        """(tier, tenant) a request runs as. ``tier`` is the (validated) tier it asks for or None. With a
        key: at most the key's tier, and the key's tenant (403 for another one); without auth: as asked."""
        if p is None:
            return tier, tenant
        return effective_tier(tier, p.max_tier, self._priorities), check_tenant(tenant, p)

    def admit(self, p: Principal | None, tokens: int) -> dict[str, str]:
        """Charge one request and ``tokens`` to the key; its ``x-ratelimit-*`` headers. 429
        ``rate_limit_exceeded`` with ``Retry-After`` over a limit; 400 for a request larger than the
        key's per-minute token limit (it can never fit). Each admitted request must be released."""
        if p is None:
            return {}
        d = self._limiter.admit(p.key_id, p.limits, tokens)
        if d.allowed:
            return d.headers
        if d.retry_after_s == math.inf:
            raise ApiError(
                400,
                f"This request needs {tokens} tokens (prompt + max_tokens), more than this key's limit "
                f"of {p.limits.tokens_per_min} tokens per minute; lower max_tokens or the prompt.",
                param="max_tokens",
                code="request_exceeds_rate_limit",
                extra_headers=d.headers,
            )
        what = {
            "requests": f"requests ({p.limits.requests_per_s}/s)",
            "tokens": f"tokens ({p.limits.tokens_per_min}/min)",
            "concurrency": f"concurrent requests ({p.limits.max_concurrent_requests})",
        }[d.reason]
        raise ApiError(
            429,
            f"Rate limit reached for {what} of this API key. Retry after the time in Retry-After.",
            type_="requests",
            code="rate_limit_exceeded",
            retry_after_s=math.ceil(d.retry_after_s),
            extra_headers=d.headers,
        )

    def release(self, p: Principal | None, unused_tokens: int = 0) -> None:
        """End an admitted request; the key gets back the ``unused_tokens`` of its charge."""
        if p is not None:
            self._limiter.release(p.key_id, unused_tokens)

    def in_flight(self, p: Principal) -> int:
        return self._limiter.in_flight(p.key_id)
