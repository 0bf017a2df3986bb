"""SLO-driven autoscaling on a real local cluster: 1 prefill replica and a decode pool of {min 0, max 2} (eager
engines), one cluster for both tests (they run in file order).

- Scale from zero: the cluster starts with no decode replica and is healthy (``ok``: the first request wakes the
  pool). The first request waits for the pool's first replica (the cold start: ~60-90 s on this machine) and is
  answered 200 with tokens; the planner counts a ``cold_start`` decision and the wait counts as ``served``.
- Scale up and down: the decode engines take at most ``MAX_NUM_SEQS`` requests per step, so ``CLIENTS``
  concurrent clients need more decode replicas than one by the planner's count (requests running and waiting
  over the batch one replica runs within the TPOT SLO). The pool must reach 2 replicas under load and, once the
  load stops, return to its minimum (0) no sooner than the scale-down window, with every request answered (200,
  or 429/503 with Retry-After; never another status or a hang) and the planner's decisions counted by reason.

Small windows: a decision every second over a 5 s demand window, a 10 s scale-down window, a 2 s cool-down.
(That scale-down stops at a pool's ``min`` is unit-tested with a fake clock: tests/unit/test_autoscale.py.)
Every request, loop and wait here has a time bound.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.integration.chat_client import CLIENT_TIMEOUT_S, PROMPTS, request_body
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

MAX_NUM_SEQS = 2
CLIENTS = 6
LOAD_TOKENS = 48
DEMAND_WINDOW_S = 5.0
DOWNSCALE_WINDOW_S = 10.0
COLD_START_TIMEOUT_S = 240.0  # the pool's bound on the first request's wait
FIRST_REQUEST_TIMEOUT_S = COLD_START_TIMEOUT_S + 60.0
SCALE_UP_TIMEOUT_S = 240.0  # a new replica starts in ~60-90 s on this machine, slower under load
SCALE_DOWN_TIMEOUT_S = 150.0  # windows + cool-downs + Serve's graceful stop of each replica (10 s)
LOAD_LIMIT_S = SCALE_UP_TIMEOUT_S + 30.0  # the load threads stop by themselves after this


def _config():
    cfg = cluster_config(free_port())
    data = cfg.model_dump(mode="json")
    for pool in data["pools"]:
        if pool["role"] == "decode":
            pool["replicas"] = {"min": 0, "max": 2}
            pool["device"]["cpu_cores"] = ["1", "0"]
            pool["engine"]["max_num_seqs"] = MAX_NUM_SEQS
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


def _load(base_url: str, stop: threading.Event, replies: list, i: int) -> None:
    """One client: requests back to back until ``stop`` (or LOAD_LIMIT_S); after a refusal it waits as told."""
    deadline = time.monotonic() + LOAD_LIMIT_S
    n = 0
    while not stop.is_set() and time.monotonic() < deadline:
        body = request_body(f"{PROMPTS[(i + n) % len(PROMPTS)]} (client {i}, request {n})", max_tokens=LOAD_TOKENS)
        n += 1
        try:
            r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=CLIENT_TIMEOUT_S)
        except httpx.TimeoutException:
            replies.append((-1, {}))
            continue
        replies.append((r.status_code, dict(r.headers)))
        if r.status_code in (429, 503):
            stop.wait(min(float(r.headers.get("retry-after", 1)), 2.0))


def test_empty_decode_pool_serves_its_first_request(cluster, capsys):
    base = cluster.base_url
    d = _decode(cluster)
    assert (d["replicas"], d["scales_from_zero"]) == (0, True)
    wait_for(lambda: (_decode(cluster)["planner"] or {}).get("target_replicas") == 0, timeout_s=30)
    time.sleep(5.0)  # no replica starts by itself (no stats poll or planner call reaches the empty pool)
    assert _decode(cluster)["replicas"] == 0
    line = _status_line(base, capsys, "decode")
    assert "replicas=0" in line and "target=0" in line and "range=0..2" in line, line

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
    print(f"first request answered after {waited_s:.1f}s (cold start)")


def test_decode_pool_scales_up_under_load_and_down_to_min_after_the_window(cluster, capsys):
    base = cluster.base_url
    # a replica serves: the previous test's, or a new cold start if the pool went back to 0 in between
    r = httpx.post(f"{base}/v1/chat/completions", json=request_body(PROMPTS[0]), timeout=FIRST_REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert _decode(cluster)["replicas"] >= 1

    stop, replies = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(base, stop, replies, i), daemon=True) for i in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        wait_for(
            lambda: metric_sum(scrape(base), "pdserve_planner_decisions_total", pool="decode", reason="scale_up") >= 1,
            timeout_s=60,
            interval_s=1.0,
        )
        up = wait_for(
            lambda: (d := _decode(cluster))["replicas"] == 2 and d["healthy"] == 2 and d,
            timeout_s=SCALE_UP_TIMEOUT_S,
            interval_s=2.0,
        )
        scaled_up_s = time.monotonic() - t0
        assert up["planner"]["target_replicas"] == 2
        # both replicas serve: the second one takes requests
        wait_for(lambda: _generated_per_decode(base).count(0) == 0, timeout_s=60, interval_s=1.0)
        assert len(_generated_per_decode(base)) == 2
    finally:
        stop.set()
        t1 = time.monotonic()  # the last recommendation of 2 replicas comes no earlier than this
        for t in threads:
            t.join(timeout=CLIENT_TIMEOUT_S + 5)
    assert not any(t.is_alive() for t in threads)

    wait_for(lambda: _decode(cluster)["replicas"] == 0, timeout_s=SCALE_DOWN_TIMEOUT_S, interval_s=1.0)
    scaled_down_s = time.monotonic() - t1
    assert scaled_down_s >= DOWNSCALE_WINDOW_S - 1.0  # not before the scale-down window

    s = scrape(base)
    assert metric_sum(s, "pdserve_planner_decisions_total", pool="decode", reason="scale_up") >= 1
    assert metric_sum(s, "pdserve_planner_decisions_total", pool="decode", reason="scale_down") >= 1
    assert metric_sum(s, "pdserve_planner_decisions_total", pool="decode", reason="hold_downscale_window") >= 1
    assert metric_sum(s, "pdserve_planner_target_replicas", pool="decode") == 0
    for signal in ("arrival_rate", "refused_rate", "decode_batch", "kv_usage", "desired_replicas"):
        assert (f"pdserve_planner_{signal}", frozenset({("pool", "decode")})) in s, signal

    statuses = [st for st, _ in replies]
    assert statuses.count(200) > 0
    assert set(statuses) <= {200, 429, 503}, f"unexpected statuses {sorted(set(statuses))}"
    refused = [h for st, h in replies if st in (429, 503)]
    assert all("retry-after" in h for h in refused)
    assert health(base)["status"] == "ok"  # empty again, and wakeable
    line = _status_line(base, capsys, "decode")
    assert "replicas=0" in line and "target=0" in line, line
    print(f"scaled up after {scaled_up_s:.1f}s, down to 0 after {scaled_down_s:.1f}s; {len(replies)} requests")


def _generated_per_decode(base: str) -> list[float]:
    """Tokens each decode replica generated so far (its engine's counter)."""
    s = scrape(base)
    return [v for (n, ls), v in s.items() if n == "pdserve_engine_generation_tokens_total" and ("pool", "decode") in ls]
