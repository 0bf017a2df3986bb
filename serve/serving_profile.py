"""The serving path's own latency (``pdserve profile --serving``): what a running cluster's ingress, Ray
Serve handle calls, KV handoff control messages and SSE streaming add to what its engines take.

Sequential streamed chat requests with short distinct prompts (HTTP only, nothing queues): each
request's TTFT and TPOT as the client sees them, minus the same request shape's TTFT and TPOT on the
engines alone (``capacity.simulator.unloaded_request_s`` of the config's cluster on the engine profiles:
prefill, handoff and decode steps, on the path the router takes for a lone request). The medians of
the differences are the profile's ``ServingOverhead`` (at least 0: the path cannot make the engines
faster; a negative median is the engine profile's own noise). Given a clock of the serving processes' CPU
seconds, the CPU they spend per streamed token too: their CPU over the streams, less their idle rate
(measured first, over ``idle_s`` without requests) times the streams' wall time, over the tokens
streamed.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from capacity.profile import EngineProfile, ServingOverhead
from capacity.simulator import unloaded_request_s

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()

# (prompt tokens, output tokens) -> (TTFT s, TPOT s or None) on the engines alone
EngineTimes = Callable[[int, int], tuple[float, float | None]]


@dataclass(frozen=True)
class StreamSample:
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    tpot_s: float | None
    engine_ttft_s: float
    engine_tpot_s: float | None


@dataclass(frozen=True)
class ServingMeasurement:
    overhead: ServingOverhead
    samples: tuple[StreamSample, ...]


def stream_once(base_url: str, model: str, prompt: str, max_tokens: int, timeout_s: float = 120.0):
    """One streamed greedy chat of exactly ``max_tokens`` tokens: (prompt tokens, output tokens, TTFT s,
    TPOT s or None) as the client sees them (TTFT to the first content chunk, TPOT from it to the last)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage: dict = {}
    with httpx.stream("POST", f"{base_url.rstrip('/')}/v1/chat/completions", json=body, timeout=timeout_s) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    if not stamps or not usage:
        raise RuntimeError(f"stream without content or usage ({len(stamps)} chunks, usage {usage})")
    n = usage["completion_tokens"]
    tpot = (stamps[-1] - stamps[0]) / (n - 1) if n > 1 and len(stamps) > 1 else None
    return usage["prompt_tokens"], n, stamps[0] - t0, tpot


def measure_serving(
    base_url: str,
    model: str,
    engine_times: EngineTimes,
    requests: int = 8,
    prompt_words: Sequence[int] = (16, 48, 96),
    max_tokens: int = 32,
    seed: int = 0,
    notes: str = "",
    cpu_s: Callable[[], float] | None = None,
    idle_s: float = 5.0,
) -> ServingMeasurement:
    """``requests`` sequential streams (prompt lengths cycling through ``prompt_words``, after one
    warm-up request not counted) against the cluster at ``base_url``; the overhead is the median of
    (client TTFT - engine TTFT) and of (client TPOT - engine TPOT). ``cpu_s``: the serving processes'
    CPU seconds so far (None: no ``cpu_per_token_s``, 0)."""
    rng = random.Random(seed)

    def prompt(n_words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n_words))  # random words: no prefix-cache hit

    stream_once(base_url, model, prompt(prompt_words[0]), max_tokens)
    idle_rate = 0.0
    if cpu_s is not None:
        c0, t0 = cpu_s(), time.perf_counter()
        time.sleep(idle_s)
        idle_rate = (cpu_s() - c0) / (time.perf_counter() - t0)
        c0, t0 = cpu_s(), time.perf_counter()
    samples = []
    for i in range(requests):
        n_prompt, n_out, ttft, tpot = stream_once(
            base_url, model, prompt(prompt_words[i % len(prompt_words)]), max_tokens
        )
        e_ttft, e_tpot = engine_times(n_prompt, n_out)
        samples.append(StreamSample(n_prompt, n_out, ttft, tpot, e_ttft, e_tpot))
    ttft_s = max(0.0, statistics.median(s.ttft_s - s.engine_ttft_s for s in samples))
    gaps = [s.tpot_s - s.engine_tpot_s for s in samples if s.tpot_s is not None and s.engine_tpot_s is not None]
    tpot_s = max(0.0, statistics.median(gaps)) if gaps else 0.0
    cpu_per_token_s = 0.0
    if cpu_s is not None:
        busy = cpu_s() - c0 - idle_rate * (time.perf_counter() - t0)
        cpu_per_token_s = max(0.0, busy) / sum(s.output_tokens for s in samples)
    overhead = ServingOverhead(ttft_s=ttft_s, tpot_s=tpot_s, cpu_per_token_s=cpu_per_token_s, notes=notes)
    return ServingMeasurement(overhead, tuple(samples))


def engine_times_of(cluster) -> EngineTimes:
    """``EngineTimes`` of a ``capacity.cluster.SimCluster``: one request alone in the simulator."""
    return lambda prompt_tokens, output_tokens: unloaded_request_s(cluster, prompt_tokens, output_tokens)


def with_serving(profiles: Sequence[EngineProfile], keys, overhead: ServingOverhead) -> list[EngineProfile]:
    """``profiles`` with ``overhead`` as the serving term of those whose key is in ``keys``."""
    return [dataclasses.replace(p, serving=overhead) if p.key in keys else p for p in profiles]
