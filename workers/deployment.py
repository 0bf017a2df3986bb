"""The Ray Serve replica class of every engine pool (thin: all logic is in EngineWrapper).

``serve/app.py`` turns each PoolConfig into one deployment of ``EngineServer``. Methods take an
``endpoint_hint`` keyword that only the request router reads (it pins a call to one replica).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import serve

from workers.config import KvHandoffConfig, PoolConfig
from workers.engine import EngineSpec, EngineWrapper, kv_events_endpoints
from workers.handoff import make_handoff
from workers.messages import DecodeRequest, PrefillRequest, PrefillResult, TokenChunk

logger = logging.getLogger(__name__)

LEASE_POLL_S = 0.2


async def wait_kv_released(kv_usage: Callable[[], float], bound_s: float, poll_s: float = LEASE_POLL_S) -> float | None:
    """Wait until the engine holds no KV blocks, at most ``bound_s``; the seconds it took, or None if blocks
    were still held at the bound. Called once Serve has drained the replica's requests, so what is still held
    is KV that prefills hand off and no decode has read yet (its lease; vLLM frees it when the read is done or
    the lease expires, and its scheduler stats follow within the same step)."""
    t0 = time.monotonic()
    while kv_usage() > 0:
        if time.monotonic() - t0 >= bound_s:
            return None
        await asyncio.sleep(poll_s)
    return time.monotonic() - t0


def _side_channel_host(cfg: KvHandoffConfig) -> str:
    if cfg.side_channel_host != "auto":
        return cfg.side_channel_host
    import ray

    return ray.util.get_node_ip_address()


class EngineServer:
    """One vLLM engine replica of a prefill or decode pool."""

    def __init__(
        self, pool: dict[str, Any], handoff: dict[str, Any], model_path: str, served_model_name: str, max_model_len: int
    ) -> None:
        ctx = serve.get_replica_context()
        pool_cfg = PoolConfig.model_validate(pool)
        handoff_cfg = KvHandoffConfig.model_validate(handoff)
        local_rank = getattr(getattr(ctx, "rank", None), "local_rank", 0) or 0
        host = _side_channel_host(handoff_cfg)
        bind, address = ("", "")
        if pool_cfg.engine.kv_events and pool_cfg.engine.enable_prefix_caching:
            bind, address = kv_events_endpoints(host)
        spec = EngineSpec(
            pool=pool_cfg,
            model_path=model_path,
            served_model_name=served_model_name,
            max_model_len=max_model_len,
            local_rank=local_rank,
            kv_events_endpoint=bind,
            kv_events_address=address,
        )
        self._pool = pool_cfg
        self._lease_s = handoff_cfg.kv_lease_s
        self._wrapper = EngineWrapper(spec, make_handoff(handoff_cfg, host), endpoint_id=ctx.replica_id.unique_id)
        self._wrapper.start()
        self._replica_target: tuple[int, float] | None = None

    async def set_replica_target(self, target: int, decided_s: float, endpoint_hint: str | None = None) -> None:
        """The pool's replica target from the ingress's planner (serve/planner.py) and the wall-clock time
        it was decided."""
        self._replica_target = (int(target), float(decided_s))

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics, read by serve/autoscale_policy.py (none before a target)."""
        if self._replica_target is None:
            return {}
        target, decided_s = self._replica_target
        return {"pdserve_target_replicas": float(target), "pdserve_target_decided_s": decided_s}

    async def prefill(self, req: PrefillRequest, endpoint_hint: str | None = None) -> PrefillResult:
        return await self._wrapper.prefill(req)

    async def generate(self, req: DecodeRequest, endpoint_hint: str | None = None) -> AsyncIterator[TokenChunk]:
        async for chunk in self._wrapper.generate(req):
            yield chunk

    async def stats(self, drain: bool = False, endpoint_hint: str | None = None) -> dict[str, Any]:
        return self._wrapper.stats(drain=drain).to_dict()

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve every ``request_routing_stats_period_s``; read by PdRequestRouter."""
        return self._wrapper.stats().to_dict()

    async def check_health(self) -> None:
        await self._wrapper.check_health()

    async def __del__(self) -> None:
        """Serve awaits this when it stops the replica (scale-in, shutdown), after the replica's requests
        have drained and within ``server.graceful_shutdown_timeout_s``: KV that decodes have yet to read is
        read (or its lease expires) before the engine stops."""
        wrapper = getattr(self, "_wrapper", None)
        if wrapper is None:
            return
        try:
            waited = await wait_kv_released(lambda: wrapper.stats().kv_usage, float(self._lease_s))
            if waited is None:
                logger.warning("replica stop: KV leases still held after %ss", self._lease_s)
            elif waited > 0:
                logger.warning("replica stop: waited %.1fs for KV leases to be read", waited)
        finally:
            wrapper.shutdown()
