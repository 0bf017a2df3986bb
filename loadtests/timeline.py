"""Server-side timeline during a run: poll ``/metrics`` and ``/health`` and keep queue depth, running and replicas.

Understands pdserve's gauges (``pdserve_pool_*``) and vLLM's OpenAI server (``vllm:num_requests_*``);
a server without ``/metrics`` (e.g. Ray Serve LLM's HTTP proxy) simply yields no samples. For pdserve
also replicas per role, the cumulative fallback counters (``pdserve_prefill_fallbacks_total``), for a
``role: flex`` pool its replicas per role and its controller's flip decisions and flips, and from its
``/health``: replicas per pool (``replicas.<pool>``) and the planner's target of each autoscaled pool
(``target.<pool>``).
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


def parse_health(body: dict) -> dict[str, float]:
    """From a pdserve ``/health`` body (pure): ``replicas.<pool>`` (replicas Serve runs), ``target.<pool>``
    (the planner's target of autoscaled pools). Empty for a body without pools. (Flex replicas per role
    come from ``/metrics``: ``flex_prefill``, ``flex_decode``, ``flex_draining``.)"""
    out: dict[str, float] = {}
    for name, p in (body.get("pools") or {}).items():
        out[f"replicas.{name}"] = float(p.get("replicas") or 0)
        target = (p.get("planner") or {}).get("target_replicas")
        if target is not None:
            out[f"target.{name}"] = float(target)
    return out


def replica_seconds(samples: list[dict], prefix: str = "replicas.") -> dict[str, float]:
    """Replica-seconds per pool over a timeline (the cost of a run): each sample's replicas of a pool held
    until the next sample (pure). Keys without ``prefix``; ``total`` sums the pools."""
    out: dict[str, float] = {}
    for cur, nxt in zip(samples, samples[1:]):
        dt = nxt["t"] - cur["t"]
        for k, v in cur.items():
            if k.startswith(prefix):
                out[k[len(prefix) :]] = out.get(k[len(prefix) :], 0.0) + v * dt
    if out:
        out["total"] = sum(out.values())
    return out


async def _get(client: httpx.AsyncClient, url: str) -> httpx.Response | None:
    try:
        return await client.get(url)
    except httpx.HTTPError:
        return None


async def sample_metrics(base_url: str, t0: float, period_s: float, samples: list[dict], stop: asyncio.Event) -> None:
    """Append ``{"t": seconds since t0, **parse_sample(...), **parse_health(...)}`` every ``period_s`` until
    ``stop`` (``/health`` answers 503 with its body while a role has no replica: it counts too)."""
    async with httpx.AsyncClient(timeout=max(period_s, 2.0)) as client:
        while not stop.is_set():
            try:
                m, h = await asyncio.gather(_get(client, f"{base_url}/metrics"), _get(client, f"{base_url}/health"))
                fields = parse_sample(m.text) if m is not None and m.status_code == 200 else {}
                if h is not None and h.status_code in (200, 503):
                    fields.update(parse_health(h.json()))
                if fields:
                    samples.append({"t": time.perf_counter() - t0, **fields})
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
            try:
                await asyncio.wait_for(stop.wait(), timeout=period_s)
            except TimeoutError:
                pass
