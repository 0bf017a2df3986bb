"""Locust users that speak the OpenAI API and time every token.

    locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -r 2 -t 60s \
        --csv loadtests/results/locust --only-summary
Environment: PDSERVE_MODEL (default SmolLM2-135M-Instruct), PDSERVE_WORKLOAD (random | chat |
shared-prefix | long-prompt | qos; default chat), PDSERVE_STREAM (1), PDSERVE_API (chat | completions),
PDSERVE_RATE (per-user req/s for open-loop pacing; 0 = closed loop), PDSERVE_SEED,
PDSERVE_WORKLOAD_ARGS (JSON keyword arguments of the workload, e.g. '{"input_tokens": 64}').

Besides the request itself, each request fires custom events so locust's stats and CSVs carry
TTFT, mean TPOT and every inter-token gap (request_type TTFT / TPOT / ITL); 503/429 rejections
are reported as request_type REJECTED, apart from failures.
"""

from __future__ import annotations

import itertools
import json
import os
import time

from locust import HttpUser, constant, constant_pacing, events, task

from loadtests import workloads
from loadtests.client import SSE_DONE, sse_data

MODEL = os.environ.get("PDSERVE_MODEL", "SmolLM2-135M-Instruct")
WORKLOAD = os.environ.get("PDSERVE_WORKLOAD", "chat")
STREAM = os.environ.get("PDSERVE_STREAM", "1") == "1"
API = os.environ.get("PDSERVE_API", "chat")
RATE = float(os.environ.get("PDSERVE_RATE", "0"))
SEED = int(os.environ.get("PDSERVE_SEED", "0"))
WORKLOAD_ARGS = json.loads(os.environ.get("PDSERVE_WORKLOAD_ARGS", "{}"))
if workloads.is_closed_loop(WORKLOAD):
    raise SystemExit(
        f"PDSERVE_WORKLOAD={WORKLOAD} is a closed-loop conversation workload: run it with "
        "python -m loadtests.bench (loadtests/closedloop.py)"
    )
_SPECS = itertools.cycle(workloads.build(WORKLOAD, seed=SEED, n=500, rate=1.0, **WORKLOAD_ARGS))


def _fire(request_type: str, name: str, seconds: float, length: int = 0, exc=None) -> None:
    events.request.fire(
        request_type=request_type,
        name=name,
        response_time=seconds * 1000.0,
        response_length=length,
        exception=exc,
        context={},
    )


class OpenAIUser(HttpUser):
    wait_time = constant_pacing(1.0 / RATE) if RATE > 0 else constant(0)

    @task
    def generate(self) -> None:
        spec = next(_SPECS)
        if API == "chat":
            path, body = "/v1/chat/completions", {"messages": list(spec.messages)}
        else:
            path, body = "/v1/completions", {"prompt": spec.messages[-1]["content"]}
        body.update(model=MODEL, max_tokens=spec.max_tokens, stream=STREAM, temperature=0.0, ignore_eos=True)
        if STREAM:
            body["stream_options"] = {"include_usage": True}
        t0 = time.perf_counter()
        with self.client.post(
            path, json=body, headers=spec.headers, stream=STREAM, catch_response=True, name=f"{API}:{WORKLOAD}"
        ) as resp:
            if resp.status_code in (429, 503):
                resp.success()  # a clean early rejection is not a failure; count it separately
                _fire("REJECTED", str(resp.status_code), time.perf_counter() - t0)
                return
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            if not STREAM:
                usage = resp.json().get("usage", {})
                _fire("TTFT", WORKLOAD, time.perf_counter() - t0, usage.get("completion_tokens", 0))
                return
            first = last = None
            tokens = 0
            for line in resp.iter_lines():
                data = sse_data(line)
                if data is None or data == SSE_DONE:
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    resp.failure(chunk["error"].get("message", "stream error"))
                    return
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if any((c.get("delta") or {}).get("content") or c.get("text") for c in chunk.get("choices") or []):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        _fire("TTFT", WORKLOAD, now - t0)
                    else:
                        _fire("ITL", WORKLOAD, now - last)
                    last = now
            if first is not None and tokens > 1:
                _fire("TPOT", WORKLOAD, (last - first) / (tokens - 1), tokens)
