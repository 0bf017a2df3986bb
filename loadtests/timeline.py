"""Server-side timeline during a run: poll ``/metrics`` and keep queue depth, running and replicas.

Understands pdserve's gauges (``pdserve_pool_*``) and vLLM's OpenAI server (``vllm:num_requests_*``);
a server without ``/metrics`` (e.g. Ray Serve LLM's HTTP proxy) simply yields no samples. For pdserve
also replicas per role, the cumulative fallback counters (``pdserve_prefill_fallbacks_total``) and, for a
``role: flex`` pool, its replicas per role and its controller's flip decisions and flips.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

# metric family (the parser names a counter's family without "_total") -> [(timeline field, labels a
# sample must have)]; the values of the matching samples are summed
_FIELDS = {
    "pdserve_pool_queue_depth": [("queue", {})],
    "pdserve_pool_running_requests": [("running", {})],
    "pdserve_pool_replicas": [
        ("replicas", {}),
        ("decode_replicas", {"role": "decode"}),
        ("prefill_replicas", {"role": "prefill"}),
    ],
    "pdserve_prefill_fallbacks": [("prefill_fallbacks", {}), ("decode_retries", {"reason": "decode_retry"})],
    # role: flex pools (serve/flex.py): replicas per role, the controller's flip decisions, flips applied
    "pdserve_flex_role": [
        ("flex_prefill", {"role": "prefill"}),
        ("flex_decode", {"role": "decode"}),
        ("flex_draining", {"role": "draining"}),
    ],
    "pdserve_flex_decisions": [
        ("flex_prefill_heavy_decisions", {"reason": "prefill_heavy"}),
        ("flex_decode_heavy_decisions", {"reason": "decode_heavy"}),
    ],
    "pdserve_flex_flips": [("flex_flips", {})],
    "pdserve_flex_desired_prefill": [("flex_desired_prefill", {})],
    "vllm:num_requests_waiting": [("queue", {})],
    "vllm:num_requests_running": [("running", {})],
}


def parse_sample(text: str) -> dict[str, float]:
    """Queue depth / running / replicas (all, decode, prefill) / prefill fallbacks (all, decode retries)
    from a Prometheus text exposition (pure). A field is present when its metric family is."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        # a gauge's value sample is named like its family, a counter's with "_total" ("_created" is not a value)
        values = [s for s in fam.samples if s.name in (fam.name, fam.name + "_total")]
        for key, labels in _FIELDS.get(fam.name, []):
            out[key] = out.get(key, 0.0) + sum(s.value for s in values if labels.items() <= s.labels.items())
    return out


def prefix_cache_counters(text: str) -> tuple[float, float]:
    """(prompt tokens served from the engines' prefix caches, prompt tokens looked up) — cumulative
    counters summed over engines: pdserve's ``pdserve_engine_prompt_tokens{source}`` (computed +
    local_cache_hit; KV received by handoff is neither) or vLLM's ``vllm:prefix_cache_hits/queries``."""
    hit = queried = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "pdserve_engine_prompt_tokens_total":
                src = s.labels.get("source")
                if src == "local_cache_hit":
                    hit += s.value
                    queried += s.value
                elif src == "local_compute":
                    queried += s.value
            elif s.name == "vllm:prefix_cache_hits_total":
                hit += s.value
            elif s.name == "vllm:prefix_cache_queries_total":
                queried += s.value
    return hit, queried


def prefix_cache_hit_rate(before: str, after: str) -> float | None:
    """Share of prompt tokens the engines served from their prefix caches between two scrapes."""
    (h0, q0), (h1, q1) = prefix_cache_counters(before), prefix_cache_counters(after)
    return (h1 - h0) / (q1 - q0) if q1 > q0 else None


async def sample_metrics(base_url: str, t0: float, period_s: float, samples: list[dict], stop: asyncio.Event) -> None:
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
            except TimeoutError:
                pass
