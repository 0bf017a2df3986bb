"""The OpenAI-compatible HTTP ingress (FastAPI inside a Ray Serve deployment).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics. Every error leaves in OpenAI shape ``{"error": {message, type, param, code}}``.
Before any tokenisation a request passes the gate (``serve.gate``): body size (413), API key (401),
the key's tenant and tier, and the key's rate limits (429).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.pipeline import build_policy
from serve.adapters import ParsedRequest, RequestAdapter, parse_body
from serve.cold_start import ColdStart
from serve.config import ClusterConfig
from serve.flex import FlexManager, flex_roles
from serve.gate import Gate, read_limited, refuse_when_busy
from serve.kv_events import KvEventFeed
from serve.metrics import ClusterMetrics
from serve.openapi import build_openapi
from serve.orchestrator import Orchestrator
from serve.planner import Planner, strictest_slo_s
from serve.pool_monitor import PoolMonitor
from serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from serve.responses import ChunkWriter, full_response

logger = logging.getLogger(__name__)

WARMUP_TIMEOUT_S = 120.0

app = FastAPI(title="pdserve", description="Disaggregated prefill/decode OpenAI-compatible endpoint")
app.openapi = functools.partial(build_openapi, app)


def _internal_error(e: Exception) -> ApiError:
    """An unexpected exception on the request path: still an error for the client, never a truncated 200."""
    logger.error("request failed: %r", e, exc_info=e)
    return ApiError(500, "internal server error", type_="server_error", code="internal_error")


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status_code, headers=e.headers())


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return _error_response(e)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _error_response(ApiError(e.status_code, str(e.detail), type_=type_))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    return _error_response(ApiError(400, str(e.errors()[:1]), code="invalid_value"))


async def _next_or_none(gen: AsyncIterator[Any]) -> Any:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _prepend(first: bytes, rest: AsyncIterator[bytes], on_end=None) -> AsyncIterator[bytes]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        if on_end is not None:
            on_end()


@dataclasses.dataclass(slots=True)
class _Charge:
    """One admitted generation request as the key's limits counted it: ``max_new_tokens`` completion
    tokens were charged at admission; what it did not generate is given back when it ends."""

    who: Any  # serve.auth.Principal, or None with auth off
    max_new_tokens: int
    generated: int = 0

    @property
    def unused_tokens(self) -> int:
        return max(0, self.max_new_tokens - self.generated)


def roles_served(pools: dict[str, dict[str, Any]]) -> tuple[bool, bool]:
    """(ready, ok) of /health's pools. ok: every configured role has a healthy replica (a config without prefill
    pools prefills locally) or a pool that scales from zero (a request wakes it); ready: ok, and a decode
    replica is healthy (a request is served without a cold start)."""
    roles = {p["role"] for p in pools.values()}
    served = {r for r in roles if any(p["healthy"] for p in pools.values() if p["role"] == r)}
    wakeable = {p["role"] for p in pools.values() if p["scales_from_zero"]}
    ok = roles <= served | wakeable
    return ok and "decode" in served, ok


# NOTE: everything Ingress uses must be defined above it: @serve.ingress pickles the class by value
# when it is decorated.
@serve.ingress(app)
class Ingress:
    def __init__(
        self, config: dict[str, Any], model_path: str, pools: dict[str, Any], api_keys: list[dict] | None = None
    ) -> None:
        from transformers import AutoTokenizer

        # Imported at run time: Serve ships this class by value (cloudpickle), which would copy
        # module-level objects; the routers register with the module in sys.modules.
        from serve import pool_directory

        self._directory = pool_directory.DIRECTORY

        self._cfg = ClusterConfig.model_validate(config)
        # /openapi.json names this deployment's tier and tenant headers
        app.openapi_schema = None
        app.openapi = functools.partial(
            build_openapi, app, tier_header=self._cfg.router.tier_header, tenant_header=self._cfg.router.tenant_header
        )
        self._directory.stale_s = self._cfg.router.stats_stale_s
        self._roles = {p.name: p.role.value for p in self._cfg.pools}
        self._pool_cfg = {p.name: p for p in self._cfg.pools}
        self._handles = pools
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        r = self._cfg.router
        block_size = self._cfg.pools[0].engine.block_size
        self._adapter = RequestAdapter(
            tokenizer,
            self._cfg.model.name,
            self._cfg.model.max_model_len,
            r.default_tier,
            {n: t.priority for n, t in r.qos_tiers.items()},
            block_size=block_size,
            share_prefix_across_tenants=r.placement.share_prefix_across_tenants,
        )
        self._gate = Gate(self._cfg.server.auth, api_keys or [], {n: t.priority for n, t in r.qos_tiers.items()})
        self._draining = False
        self._active = 0  # generation requests admitted and not finished
        self._monitor: PoolMonitor | None = None
        self.metrics = ClusterMetrics(lambda: self._monitor.stats() if self._monitor else [])
        policy = build_policy(r, block_size)
        self._flex: FlexManager | None = None
        self._directory.flex = roles = flex_roles(self._cfg.pools)
        if roles is not None:
            self._flex = FlexManager(
                self._cfg.pools,
                r,
                roles,
                self.metrics,
                lambda: self._orch.in_flight(),
                getattr(policy, "model", None),
                strictest_slo_s(r)[1],
            )
        self._planner = Planner(self._cfg.pools, r, self.metrics, getattr(policy, "model", None), flex=self._flex)
        cold_start = ColdStart(self._cfg.pools, pools, self._planner, self.metrics)
        self._planner.wake = cold_start.wake
        kvh = self._cfg.kv_handoff
        push = kvh.slab.compression if kvh.backend == "slab" and kvh.slab_mode == "push" else None
        self._orch = Orchestrator(
            pools,
            policy,
            self._directory,
            self.metrics,
            prefill_timeout_s=r.prefill_timeout_s,
            idle_timeout_s=r.idle_timeout_s,
            decode_migrations=r.decode_migrations,
            push_compression=push,
            observer=self._planner,
            cold_start=cold_start,
        )
        # prefix-aware policies: engines' KV events feed their index
        self._kv_events = KvEventFeed(policy.prefix_index) if policy.prefix_index is not None else None
        self.metrics.watch_prefix_index(
            self._orch.prefix_index_blocks, lambda: self._kv_events.events_applied if self._kv_events else 0
        )
        self._monitor = PoolMonitor(
            pools,
            self._directory,
            self.metrics,
            period_s=r.stats_period_s,
            on_stats=policy.on_stats,
            on_poll=self._on_poll,
            lazy=frozenset(p.name for p in self._cfg.pools if p.replicas.min == 0),
        )
        self._warmup: asyncio.Task | None = None

    # -- OpenAI routes ----------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, "chat", ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "completion", CompletionRequest)

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._gate.authenticate(request.headers.get("authorization"))
        return {
            "object": "list",
            "data": [
                {
                    "id": self._cfg.model.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "pdserve",
                    "root": self._cfg.model.name,
                    "max_model_len": self._cfg.model.max_model_len,
                }
            ],
        }

    @app.get("/health")
    async def health(self) -> JSONResponse:
        self._ensure_started()
        body = self.health_report()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics_route(self, request: Request) -> Response:
        if self._gate.metrics_need_key:
            self._gate.authenticate(request.headers.get("authorization"))
        self._ensure_started()
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- helpers ----------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        self._monitor.ensure_started()
        self._planner.ensure_started(self._orch.snapshot, self._handles)

    def _on_poll(self, stats: list) -> None:
        self._orch.set_kv_agents({s.endpoint_id: s.kv_agent for s in stats if s.healthy and s.kv_agent})
        live = {e.endpoint_id for e in self._directory.snapshot().endpoints if e.healthy}
        for endpoint in self._orch.forget_replicas(live):
            logger.info("replica %s is gone or unhealthy: dropped from the prefix index", endpoint)
        if self._kv_events is not None:
            self._kv_events.sync(
                {s.endpoint_id: s.kv_events_endpoint for s in stats if s.healthy and s.kv_events_endpoint}
            )
        if self._warmup is None and self._cfg.router.admission.warmup_prompt_tokens and self.health_report()["ready"]:
            self._warmup = asyncio.get_running_loop().create_task(self._warm_up(), context=contextvars.Context())

    async def _warm_up(self) -> None:
        """Start-up calibration: one request per configured prompt size through the normal path (placement,
        admission, prefill, handoff, decode), so the cost models learn this cluster's timings from engine
        samples before real traffic arrives. Labelled tier ``warmup`` in metrics; failures are logged only."""

        async def one(job) -> None:
            async for _ in self._orch.generate(job):
                pass

        for i, n in enumerate(self._cfg.router.admission.warmup_prompt_tokens):
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(one(self._adapter.warmup_job(n, seed=i)), timeout=WARMUP_TIMEOUT_S)
                logger.info("warm-up request of %d prompt tokens took %.2fs", n, time.monotonic() - t0)
            except Exception as e:  # never fatal: the prior stays in place
                logger.warning("warm-up request of %d prompt tokens failed: %r", n, e)

    def health_report(self) -> dict[str, Any]:
        snap = self._directory.snapshot(self._orch.in_flight())
        pools: dict[str, dict[str, Any]] = {}
        ages = self._directory.poll_ages()
        planned = self._planner.report()
        for name, role in self._roles.items():
            eps = [e for e in snap.endpoints if e.pool == name]
            # healthy: confirmed by a stats poll (a replica Serve just listed is routable, not yet vouched for)
            pools[name] = {
                "role": role,
                "replicas": len(eps),
                "healthy": sum(e.healthy and e.endpoint_id in ages for e in eps),
                "running": sum(e.num_running for e in eps),
                "waiting": sum(e.num_waiting for e in eps),
                "kv_usage": [round(e.kv_usage, 4) for e in eps],
                "endpoints": [e.endpoint_id for e in eps],
                "unhealthy": [e.endpoint_id for e in eps if not e.healthy],
                "last_poll_age_s": {e.endpoint_id: ages.get(e.endpoint_id) for e in eps},
                "routers": self._directory.registrations.get(name, 0),
                "planner": planned.get(name),
                "min_replicas": self._pool_cfg[name].replicas.min,
                "max_replicas": self._pool_cfg[name].replicas.max,
                "scales_from_zero": self._pool_cfg[name].scales_from_zero,
            }
        ready, ok = roles_served(pools)
        # the warm-up runs once a decode replica is up (not while a request would have to wake the pool)
        warming = (
            bool(self._cfg.router.admission.warmup_prompt_tokens)
            and ready
            and not (self._warmup and self._warmup.done())
        )
        status = "draining" if self._draining else "unavailable" if not ok else "warming_up" if warming else "ok"
        body = {"status": status, "ready": ready, "model": self._cfg.model.name, "pools": pools}
        if self._flex is not None:
            body["flex"] = self._flex.report()
        return body

    # -- drain ----------------------------------------------------------------------------------
    @app.post("/admin/drain")
    async def drain_route(self, request: Request) -> JSONResponse:
        self._gate.authenticate_admin(request.headers.get("authorization"))
        return JSONResponse(self.drain())

    def drain(self) -> dict[str, Any]:
        """Stop admitting generation requests (503 ``draining``, /health ``draining``); the ones in flight
        go on. Also called by ``pdserve serve`` on SIGTERM, through a Serve handle."""
        if not self._draining:
            logger.warning("draining: no new requests; %d in flight", self._active)
        self._draining = True
        return self.drain_status()

    def drain_status(self) -> dict[str, Any]:
        return {"status": "draining" if self._draining else "serving", "in_flight": self._active}

    def _release(self, charge: _Charge) -> None:
        self._active -= 1
        self._gate.release(charge.who, charge.unused_tokens)

    async def _handle(self, request: Request, kind: str, model_cls: type) -> Response:
        self._ensure_started()
        t0 = time.monotonic()
        headers = request.headers
        try:
            server = self._cfg.server
            refuse_when_busy(self._draining, self._active, server.max_ongoing_requests, server.drain_grace_s)
            who = self._gate.authenticate(headers.get("authorization"))
            raw = await read_limited(headers.get("content-length"), request.stream(), self._cfg.server.max_body_bytes)
            body = parse_body(raw, model_cls)
            tier_asked = headers.get(self._cfg.router.tier_header)
            tier, tenant = self._gate.identity(
                who,
                self._adapter.tier(tier_asked) if tier_asked is not None else None,
                headers.get(self._cfg.router.tenant_header),
            )
            parsed = self._adapter.build(kind, body, tier, tenant)
            desc = parsed.job.desc
            limit_headers = self._gate.admit(who, desc.num_prompt_tokens + desc.max_new_tokens)
        except ApiError as e:
            self.metrics.requests.labels(kind, str(e.status_code)).inc()
            raise
        self._active += 1
        charge = _Charge(who, desc.max_new_tokens)
        try:
            self.metrics.prompt_tokens.inc(parsed.job.desc.num_prompt_tokens)
            if body.stream:
                stream = self._stream(parsed, t0, charge)
                # surface routing errors (503/429) as an HTTP status, not inside a 200 stream
                first = await stream.__anext__()
                return StreamingResponse(
                    _prepend(first, stream, on_end=lambda: self._release(charge)),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Request-Id": parsed.response_id, **limit_headers},
                )
        except BaseException:
            self._release(charge)
            raise
        try:
            return await self._complete(parsed, t0, charge, limit_headers)
        finally:
            self._release(charge)

    async def _complete(
        self, p: ParsedRequest, t0: float, charge: _Charge, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        parts: list[str] = []
        n_tokens, reason, first_s = 0, None, None
        gen = self._orch.generate(p.job)
        try:
            async for chunk in gen:
                if first_s is None and chunk.token_ids:
                    first_s = time.monotonic()
                    self.metrics.ttft.labels(p.kind).observe(first_s - t0)
                parts.append(chunk.text)
                n_tokens += len(chunk.token_ids)
                charge.generated = n_tokens
                reason = chunk.finish_reason or reason
        except ApiError as e:
            self.metrics.requests.labels(p.kind, str(e.status_code)).inc()
            raise
        except asyncio.CancelledError:  # the client went away (Serve cancels the call): engines abort
            self.metrics.aborts.labels("client_disconnect").inc()
            self.metrics.requests.labels(p.kind, "499").inc()
            raise
        except Exception as e:
            self.metrics.requests.labels(p.kind, "500").inc()
            raise _internal_error(e) from e
        finally:
            await gen.aclose()
        self._finish_metrics(p, t0, n_tokens, "200")
        return JSONResponse(
            full_response(p, "".join(parts), reason, p.job.desc.num_prompt_tokens, n_tokens),
            headers={"X-Request-Id": p.response_id, **(headers or {})},
        )

    async def _stream(self, p: ParsedRequest, t0: float, charge: _Charge) -> AsyncIterator[bytes]:
        """SSE stream. Errors before the first byte propagate (-> HTTP status); later ones become an
        ``error`` event followed by ``[DONE]``, with no finish chunk and no usage chunk."""
        w = ChunkWriter(p)
        gen = self._orch.generate(p.job)
        n_tokens, last_s, status, yielded = 0, None, "200", False
        try:
            chunk = await _next_or_none(gen)
            if role := w.role():
                yielded = True
                yield role
            while chunk is not None:
                if chunk.token_ids:
                    now = time.monotonic()
                    hist = self.metrics.ttft if last_s is None else self.metrics.itl
                    hist.labels(p.kind).observe(now - (t0 if last_s is None else last_s))
                    last_s = now
                n_tokens += len(chunk.token_ids)
                charge.generated = n_tokens
                if chunk.text or chunk.finish_reason:
                    yielded = True
                    yield w.delta(chunk.text, chunk.finish_reason)
                chunk = await _next_or_none(gen)
            if u := w.usage(p.job.desc.num_prompt_tokens, n_tokens):
                yield u
        except ApiError as e:
            status = str(e.status_code)
            if not yielded:
                raise
            yield w.error(e.body())
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"
            self.metrics.aborts.labels("client_disconnect").inc()
            raise
        except Exception as e:
            err = _internal_error(e)
            status = str(err.status_code)
            if not yielded:
                raise err from e
            yield w.error(err.body())
        finally:
            await gen.aclose()
            self._finish_metrics(p, t0, n_tokens, status)
        yield w.done()

    def _finish_metrics(self, p: ParsedRequest, t0: float, n_tokens: int, status: str) -> None:
        self.metrics.requests.labels(p.kind, status).inc()
        self.metrics.e2e.labels(p.kind).observe(time.monotonic() - t0)
        self.metrics.completion_tokens.inc(n_tokens)
