"""A role flip on a real local cluster: one flex pool of two float32 eager engines (core 0 and core 1), one
starting as prefill and one as decode, every request prefilled remotely while a prefill replica exists.

Decode-heavy load (short prompts, long answers) makes the controller (a decision every second over a 5 s demand
window, two agreeing decisions) flip the prefill replica to decode; the requests then prefill on the decode
replicas. Asserted: the flip happens once, prefill -> decode for ``decode_heavy``; no request fails (every load
request answers 200); greedy outputs equal the colocated reference engine's before, during and after the flip;
the engines are the same processes (pid and start time) after it, so nothing restarted or reloaded weights.
Every request, loop and wait here has a time bound.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from loadtests.faults.faults import engine_processes
from tests.integration.chat_client import CLIENT_TIMEOUT_S
from tests.integration.cluster_utils import (
    ALWAYS_REMOTE_PREFILL,
    cluster_config,
    free_port,
    health,
    metric_sum,
    running_cluster,
    scrape,
    wait_for,
)
from tests.integration.reference_greedy import chat_token_ids, reference_outputs

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
DTYPE = "float32"  # the P/D path matches the colocated engine token for token in float32 (see test_cluster.py)
GREEDY_TOKENS = 48
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    # > 1 KV block (128 tokens): the handoff moves several blocks
    "Summarise this text: " + " ".join(f"Item {i} is a small red box placed on shelf {i % 7}." for i in range(20)),
]
POOL = "flex"
LOAD_CLIENTS = 4
LOAD_TOKENS = 200  # long answers to short prompts: decode-heavy
CHECK_PAUSE_S = 2.0  # between greedy checks during the load
CHECKED_DURING = (0, 1)  # the short prompts: the checks must not make the load prefill-heavy
FLIP_TIMEOUT_S = 90.0
LOAD_LIMIT_S = FLIP_TIMEOUT_S + 60.0  # the load threads stop by themselves after this


def _config():
    cfg = cluster_config(
        free_port(),
        dtype=DTYPE,
        # remote prefill whenever a prefill replica exists: the flip changes the path every request takes
        placement=ALWAYS_REMOTE_PREFILL,
        admission={"enabled": False},  # the load must not be shed: zero failed requests is the claim
    )
    data = cfg.model_dump(mode="json")
    engine = next(p for p in data["pools"] if p["role"] == "decode")["engine"]
    data["pools"] = [
        {
            "name": POOL,
            "role": "flex",
            "replicas": 2,
            "device": {"kind": "cpu", "cpu_cores": ["0", "1"], "kv_cache_space_gib": 1},
            "engine": engine,
            "flex": {
                "initial_prefill": 1,
                "min_prefill": 0,
                "min_decode": 1,
                "interval_s": 1.0,
                "demand_window_s": 5.0,
                "confirm_intervals": 2,
                "hysteresis": 0.1,
                "dwell_s": 600.0,  # one flip in this test: no flip back once the load stops
                "drain_timeout_s": 30.0,
            },
        }
    ]
    return type(cfg).from_dict(data)


@pytest.fixture(scope="module")
def chat_ids(tokenizer) -> list[list[int]]:
    return chat_token_ids(tokenizer, PROMPTS)


@pytest.fixture(scope="module")
def reference(model_dir, chat_ids, tmp_path_factory) -> list[dict]:
    """Greedy outputs of one colocated engine, computed before the cluster starts."""
    return reference_outputs(model_dir, chat_ids, GREEDY_TOKENS, DTYPE, tmp_path_factory.mktemp("ref") / "greedy.json")


@pytest.fixture(scope="module")
def cluster(reference):
    with running_cluster(_config()) as c:
        wait_for(lambda: health(c.base_url)["status"] == "ok", timeout_s=300, interval_s=1.0)
        yield c


def _roles(c) -> dict[str, str]:
    return health(c.base_url).get("flex", {}).get(POOL, {})


def _engines(c) -> set[tuple[int, float]]:
    """(pid, start time) of every vLLM engine process of the flex pool's replicas."""
    return {(p.pid, p.create_time()) for p in engine_processes(c.cfg.app_name, POOL)}


def _decisions(base_url: str) -> dict:
    """The flex controller's decisions by reason and its latest desired prefill count (for failure messages)."""
    s = scrape(base_url)
    out = {dict(ls)["reason"]: v for (n, ls), v in s.items() if n == "pdserve_flex_decisions_total"}
    return {**out, "desired_prefill": metric_sum(s, "pdserve_flex_desired_prefill", pool=POOL)}


def _greedy(base_url: str, ids: list[int]) -> str:
    r = httpx.post(
        f"{base_url}/v1/completions",
        timeout=CLIENT_TIMEOUT_S,
        json={"model": MODEL, "prompt": ids, "max_tokens": GREEDY_TOKENS, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _load(base_url: str, stop: threading.Event, statuses: list, i: int) -> None:
    """One client: short prompts with long answers, back to back until ``stop`` (or LOAD_LIMIT_S); records
    (sent at, answered at, status)."""
    deadline = time.monotonic() + LOAD_LIMIT_S
    n = 0
    while not stop.is_set() and time.monotonic() < deadline:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Tell a long story, number {i}.{n}."}],
            "max_tokens": LOAD_TOKENS,
            "temperature": 0,
        }
        n += 1
        sent = time.monotonic()
        try:
            r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=CLIENT_TIMEOUT_S)
            statuses.append((sent, time.monotonic(), r.status_code))
        except httpx.TimeoutException:
            statuses.append((sent, time.monotonic(), -1))


def _check_greedy(base_url: str, stop: threading.Event, chat_ids, reference, out: list) -> None:
    """Greedy requests of the short reference prompts in a loop until ``stop``: (sent at, answered at, matched)."""
    deadline = time.monotonic() + LOAD_LIMIT_S
    n = 0
    while not stop.is_set() and time.monotonic() < deadline:
        k = CHECKED_DURING[n % len(CHECKED_DURING)]
        n += 1
        sent = time.monotonic()
        try:
            out.append((sent, time.monotonic(), _greedy(base_url, chat_ids[k]) == reference[k]["text"]))
        except (AssertionError, httpx.HTTPError):
            out.append((sent, time.monotonic(), False))
        stop.wait(CHECK_PAUSE_S)


def test_prefill_replica_flips_to_decode_under_decode_heavy_load(cluster, chat_ids, reference):
    base = cluster.base_url
    start = wait_for(lambda: (r := _roles(cluster)) and len(r) == 2 and r, timeout_s=30)
    assert sorted(start.values()) == ["decode", "prefill"], start
    (flipping,) = [e for e, role in start.items() if role == "prefill"]
    engines = _engines(cluster)
    assert len(engines) >= 2

    # before: the disaggregated path (remote prefill on the prefill replica) answers like the reference
    before = scrape(base)
    for ids, ref in zip(chat_ids, reference):
        assert _greedy(base, ids) == ref["text"]
    assert metric_sum(scrape(base), "pdserve_routing_decisions_total", prefill="remote") - metric_sum(
        before, "pdserve_routing_decisions_total", prefill="remote"
    ) == len(chat_ids)

    stop, statuses, checks = threading.Event(), [], []
    threads = [threading.Thread(target=_load, args=(base, stop, statuses, i), daemon=True) for i in range(LOAD_CLIENTS)]
    threads.append(threading.Thread(target=_check_greedy, args=(base, stop, chat_ids, reference, checks), daemon=True))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    unflipped_at = t0  # the last look that saw the replica not yet switched
    try:
        deadline = t0 + FLIP_TIMEOUT_S
        while True:
            looked_at = time.monotonic()
            if _roles(cluster).get(flipping) == "decode":
                break
            assert looked_at < deadline, f"no flip within {FLIP_TIMEOUT_S}s; decisions: {_decisions(base)}"
            unflipped_at = looked_at
            time.sleep(0.25)
        flipped_at = time.monotonic()  # the switch happened in (unflipped_at, flipped_at]
        time.sleep(5.0)  # the load and the greedy checks go on across and after the switch
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=CLIENT_TIMEOUT_S + 5)
    assert not any(t.is_alive() for t in threads)

    assert set(_roles(cluster).values()) == {"decode"}
    s = scrape(base)
    assert metric_sum(s, "pdserve_flex_flips_total", pool=POOL) == 1
    flips = {"pool": POOL, "reason": "decode_heavy", "from": "prefill", "to": "decode"}
    assert metric_sum(s, "pdserve_flex_flips_total", **flips) == 1
    assert metric_sum(s, "pdserve_flex_flip_seconds_count", pool=POOL) == 1
    assert metric_sum(s, "pdserve_flex_role", pool=POOL, replica=flipping, role="decode") == 1
    assert metric_sum(s, "pdserve_flex_role", pool=POOL, role="prefill") == 0

    # zero failed requests, some of them in flight across the switch; greedy outputs equal the reference
    # throughout, some of those answered after the switch
    assert statuses and {st for _, _, st in statuses} == {200}, f"statuses {sorted({st for _, _, st in statuses})}"
    assert any(sent < unflipped_at and done > flipped_at for sent, done, _ in statuses)
    assert checks and all(ok for _, _, ok in checks), checks
    assert any(done > flipped_at for _, done, _ in checks)

    # after: every request prefills on a decode replica (no prefill replica is left), same answers
    before = scrape(base)
    for ids, ref in zip(chat_ids, reference):
        assert _greedy(base, ids) == ref["text"]
    after = scrape(base)
    assert metric_sum(after, "pdserve_routing_decisions_total", prefill="local") - metric_sum(
        before, "pdserve_routing_decisions_total", prefill="local"
    ) == len(chat_ids)

    # no engine restart, no reload: the same engine processes, started at the same times
    assert _engines(cluster) == engines
    spanning = sum(sent < unflipped_at and done > flipped_at for sent, done, _ in checks)
    print(
        f"flip applied {unflipped_at - t0:.1f}-{flipped_at - t0:.1f}s after the load started; {len(statuses)} load "
        f"requests; {len(checks)} greedy checks during the load, {spanning} of them in flight across the switch"
    )
