"""Server-side timeline during a run: poll ``/metrics`` and keep queue depth, running and replicas.

Understands pdserve's gauges (``pdserve_pool_*``) and vLLM's OpenAI server (``vllm:num_requests_*``);
a server without ``/metrics`` (e.g. Ray Serve LLM's HTTP proxy) simply yields no samples.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

# metric family -> timeline field; values of all label sets are summed
_FIELDS = {
    "pdserve_pool_queue_depth": "queue",
    "pdserve_pool_running_requests": "running",
    "pdserve_pool_replicas": "replicas",
    "vllm:num_requests_waiting": "queue",
    "vllm:num_requests_running": "running",
}


def parse_sample(text: str) -> dict[str, float]:
    """Queue depth / running / replicas from a Prometheus text exposition (pure)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        key = _FIELDS.get(fam.name)
        if key is None:
            continue
        out[key] = out.get(key, 0.0) + sum(s.value for s in fam.samples if s.name == fam.name)
    return out


async def sample_metrics(base_url: str, t0: float, period_s: float, samples: list[dict],
                         stop: asyncio.Event) -> None:
    """Append ``{"t": seconds since t0, **parse_sample(...)}`` every ``period_s`` until ``stop``."""
    async with httpx.AsyncClient(timeout=max(period_s, 2.0)) as client:
        while not stop.is_set():
            try:
                r = await client.get(f"{base_url}/metrics")
                if r.status_code == 200:
                    fields = parse_sample(r.text)
                    if fields:
                        samples.append({"t": time.perf_counter() - t0, **fields})
            except (httpx.HTTPError, ValueError):
                pass
            try:
                await asyncio.wait_for(stop.wait(), timeout=period_s)
            except asyncio.TimeoutError:
                pass
