"""Scale from zero on a real local cluster: a decode pool of {min 0, max 1} (eager engines, 1 prefill replica).

The cluster starts with no decode replica and is healthy (``ok``: the first request wakes the pool). The first
request waits for the pool's first replica (the cold start: ~60-90 s on this machine) and is answered 200 with
tokens; the planner counts a ``cold_start`` decision and the wait counts as ``served``. With no more requests,
the pool returns to 0 replicas once the demand window (5 s) and the scale-down window (10 s) have passed.
Every request, loop and wait here has a time bound.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration.chat_client import PROMPTS, request_body
from tests.integration.cluster_utils import (
    cluster_config,
    free_port,
    health,
    metric_sum,
    running_cluster,
    scrape,
    wait_for,
)

pytestmark = pytest.mark.integration

DOWNSCALE_WINDOW_S = 10.0
DEMAND_WINDOW_S = 5.0
COLD_START_TIMEOUT_S = 240.0  # the pool's bound on the first request's wait
FIRST_REQUEST_TIMEOUT_S = COLD_START_TIMEOUT_S + 60.0
SCALE_DOWN_TIMEOUT_S = 120.0  # windows + cool-down + Serve's graceful stop of the replica


def _config():
    cfg = cluster_config(free_port())
    data = cfg.model_dump(mode="json")
    for pool in data["pools"]:
        if pool["role"] == "decode":
            pool["replicas"] = {"min": 0, "max": 1}
            pool["autoscaling"] = {
                "enabled": True,
                "adjustment_interval_s": 1.0,
                "predictor": "constant",
                "demand_window_s": DEMAND_WINDOW_S,
                "downscale_delay_s": DOWNSCALE_WINDOW_S,
                "cooldown_s": 2.0,
                "cold_start_timeout_s": COLD_START_TIMEOUT_S,
            }
    return type(cfg).from_dict(data)


@pytest.fixture(scope="module")
def cluster():
    with running_cluster(_config()) as c:
        wait_for(lambda: health(c.base_url)["status"] == "ok", timeout_s=300, interval_s=1.0)
        yield c


def _decode(c) -> dict:
    return next(p for p in health(c.base_url)["pools"].values() if p["role"] == "decode")


def _status_line(base: str, capsys, pool: str) -> str:
    """``pdserve status --url`` against the cluster: its line for ``pool``."""
    from serve import cli

    cli.main(["status", "--url", base])
    return next(line for line in capsys.readouterr().out.splitlines() if f"pool {pool} " in line)


def test_empty_decode_pool_serves_its_first_request_and_returns_to_zero(cluster, capsys):
    base = cluster.base_url
    d = _decode(cluster)
    assert (d["replicas"], d["scales_from_zero"]) == (0, True)
    wait_for(lambda: (_decode(cluster)["planner"] or {}).get("target_replicas") == 0, timeout_s=30)
    time.sleep(5.0)  # no replica starts by itself (no stats poll or planner call reaches the empty pool)
    assert _decode(cluster)["replicas"] == 0
    line = _status_line(base, capsys, "decode")
    assert "replicas=0" in line and "target=0" in line and "range=0..1" in line, line

    t0 = time.monotonic()
    r = httpx.post(f"{base}/v1/chat/completions", json=request_body(PROMPTS[0]), timeout=FIRST_REQUEST_TIMEOUT_S)
    waited_s = time.monotonic() - t0
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] > 0 and body["choices"][0]["message"]["content"]
    assert _decode(cluster)["replicas"] == 1
    s = scrape(base)
    assert metric_sum(s, "pdserve_planner_decisions_total", pool="decode", reason="cold_start") == 1
    assert metric_sum(s, "pdserve_cold_start_waits_total", pool="decode", outcome="served") == 1
    line = _status_line(base, capsys, "decode")
    assert "replicas=1" in line and "target=1" in line, line

    # the next request finds the replica: no wait
    t1 = time.monotonic()
    assert httpx.post(f"{base}/v1/chat/completions", json=request_body(PROMPTS[1]), timeout=60).status_code == 200
    assert time.monotonic() - t1 < 30.0
    idle_from = time.monotonic()

    wait_for(lambda: _decode(cluster)["replicas"] == 0, timeout_s=SCALE_DOWN_TIMEOUT_S, interval_s=1.0)
    scaled_down_s = time.monotonic() - idle_from
    assert scaled_down_s >= DOWNSCALE_WINDOW_S - 1.0  # not before the scale-down window
    s = scrape(base)
    assert metric_sum(s, "pdserve_planner_decisions_total", pool="decode", reason="scale_down") >= 1
    assert metric_sum(s, "pdserve_planner_target_replicas", pool="decode") == 0
    assert health(base)["status"] == "ok"  # empty again, and wakeable
    print(f"first request answered after {waited_s:.1f}s (cold start); back to 0 after {scaled_down_s:.1f}s idle")
