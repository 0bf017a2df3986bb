"""End to end on a real local cluster: Ray Serve + two vLLM CPU pools + NIXL handoff + SmolLM2.

One cluster for the module (1 prefill replica, 2 decode replicas), torn down after. Asserts
tokens, bytes and status codes. Engines run in float32 here: in bf16 the decode engine's
recomputation of the last prompt token as a one-token step (vLLM's P/D path) rounds differently
from a one-pass prefill and can flip a near-tie many tokens later (measured: 1 of 3 prompts diverged
after ~12 tokens; the same engine prefilling locally matches the colocated engine). In float32 the
disaggregated path matches token for token, which is what proves the KV really moved.
"""

from __future__ import annotations

import concurrent.futures
import json
import statistics
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from capacity.profile import load_profiles
from loadtests.client import SSE_DONE, sse_data
from serve.config import ClusterConfig
from serve.serving_profile import engine_times_of, measure_serving
from serve.sim_cluster import DEFAULT_PROFILES, sim_cluster
from tests.conftest import REPO
from tests.integration.cluster_utils import (
    ALWAYS_REMOTE_PREFILL,
    cluster_config,
    free_port,
    health,
    metric_sum,
    running_cluster,
    scrape,
    settled_scrape,
    wait_for,
)
from tests.integration.reference_greedy import chat_token_ids, reference_outputs

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
GREEDY_TOKENS = 48
DTYPE = "float32"
DTYPE_BYTES = 4
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    # > 1 KV block (128 tokens): the handoff moves several blocks
    "Summarise this text: " + " ".join(f"Item {i} is a small red box placed on shelf {i % 7}." for i in range(20)),
]


@pytest.fixture(scope="module")
def chat_ids(tokenizer) -> list[list[int]]:
    return chat_token_ids(tokenizer, PROMPTS)


@pytest.fixture(scope="module")
def reference(model_dir, chat_ids, tmp_path_factory):
    """Greedy outputs of a single colocated engine, computed before the cluster starts. One OpenMP
    thread, like each cluster engine: a different thread count changes bf16 reduction order."""
    out_path = tmp_path_factory.mktemp("reference") / "greedy.json"
    greedy = reference_outputs(model_dir, chat_ids, GREEDY_TOKENS, DTYPE, out_path)
    return greedy


@pytest.fixture(scope="module")
def cluster(reference):
    # always remote prefill (short prompts would otherwise prefill on the decode replica): these
    # tests check the disaggregated path byte for byte
    placement = ALWAYS_REMOTE_PREFILL
    with running_cluster(cluster_config(free_port(), decode_replicas=2, dtype=DTYPE, placement=placement)) as c:
        wait_for(lambda: _healthy_decode(c.base_url) == 2, timeout_s=120)
        yield c


def _healthy_decode(base_url: str) -> int:
    body = health(base_url)
    return sum(p["healthy"] for p in body["pools"].values() if p["role"] == "decode")


def _tcp_connections(proc: psutil.Process) -> list:
    try:
        return proc.net_connections(kind="tcp")
    except psutil.Error:  # another user's process, or gone
        return []


def chat(base_url: str, content: str, **kw) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)


class TestServing:
    def test_capital_of_france(self, cluster):
        r = chat(cluster.base_url, "What is the capital of France?", max_tokens=24, temperature=0)
        assert r.status_code == 200, r.text
        body = r.json()
        assert "Paris" in body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] > 0
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]

    def test_greedy_equals_colocated_engine(self, cluster, chat_ids, reference):
        for ids, ref in zip(chat_ids, reference):
            r = httpx.post(
                f"{cluster.base_url}/v1/completions",
                timeout=120,
                json={"model": MODEL, "prompt": ids, "max_tokens": GREEDY_TOKENS, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["text"] == ref["text"]
            assert body["usage"]["completion_tokens"] == len(ref["token_ids"])
            assert body["usage"]["prompt_tokens"] == len(ids)

    def test_stream_equals_non_stream(self, cluster):
        kw = dict(max_tokens=40, temperature=0)
        full = chat(cluster.base_url, "Name two planets.", **kw).json()
        with httpx.stream(
            "POST",
            f"{cluster.base_url}/v1/chat/completions",
            timeout=120,
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "Name two planets."}],
                "stream": True,
                "stream_options": {"include_usage": True},
                **kw,
            },
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [data for line in r.iter_lines() if (data := sse_data(line)) is not None]
        assert events[-1] == SSE_DONE
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == full["choices"][0]["message"]["content"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
        assert all(c["usage"] is None for c in chunks[:-1])
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"

    def test_sampling_params_are_honoured(self, cluster):
        stop = chat(
            cluster.base_url, "Count from 1 to 10, separated by commas.", max_tokens=60, temperature=0, stop=["5"]
        ).json()
        assert "5" not in stop["choices"][0]["message"]["content"]
        assert stop["choices"][0]["finish_reason"] == "stop"
        capped = chat(cluster.base_url, "Tell me a long story.", max_tokens=5, temperature=0).json()
        assert capped["usage"]["completion_tokens"] == 5 and capped["choices"][0]["finish_reason"] == "length"
        a = chat(cluster.base_url, "Invent a word.", max_tokens=12, temperature=1.0, seed=7).json()
        b = chat(cluster.base_url, "Invent a word.", max_tokens=12, temperature=1.0, seed=7).json()
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]

    def test_ingress_replica_owns_the_port(self, cluster):
        """Direct ingress (the default): the process listening on the configured port is the ingress
        replica itself, not Ray Serve's HTTP proxy."""
        port = cluster.cfg.server.port
        listeners = [
            " ".join(p.cmdline())
            for p in psutil.process_iter()
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in _tcp_connections(p))
        ]
        assert len(listeners) == 1, listeners
        assert "ServeReplica" in listeners[0] and listeners[0].split()[0].endswith(":ingress"), listeners

    def test_models_and_health(self, cluster):
        models = httpx.get(f"{cluster.base_url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == [MODEL]
        health = httpx.get(f"{cluster.base_url}/health")
        assert health.status_code == 200
        pools = health.json()["pools"]
        assert pools["prefill"]["healthy"] == 1 and pools["decode"]["healthy"] == 2
        # ready only after the start-up calibration: one request per warm-up size went through
        assert metric_sum(scrape(cluster.base_url), "pdserve_admitted_requests_total", tier="warmup") == 2


class TestDisaggregation:
    def test_prefill_engine_prefills_and_decode_engine_reads_kv(self, cluster):
        before = settled_scrape(cluster.base_url)
        prompt = "Explain why the sky is blue in " + "very " * 150 + "simple words."
        r = chat(cluster.base_url, prompt, max_tokens=8, temperature=0)
        assert r.status_code == 200
        n_prompt = r.json()["usage"]["prompt_tokens"]

        def delta(name, **labels):
            return metric_sum(scrape(cluster.base_url), name, **labels) - metric_sum(before, name, **labels)

        blocks = -(-n_prompt // 128)
        # bytes = blocks x layers x (K+V) x kv_heads x head_dim x block_size x dtype bytes
        expected = {
            # the prefill engine computed the whole prompt ...
            ("pdserve_engine_prompt_tokens_total", "prefill", "local_compute"): n_prompt,
            # ... and the decode engine computed none of it: every prompt token arrived over NIXL
            ("pdserve_engine_prompt_tokens_total", "decode", "external_kv_transfer"): n_prompt,
            ("pdserve_engine_prompt_tokens_total", "decode", "local_compute"): 0,
            ("pdserve_kv_handoff_transfers_total", "decode", None): 1,
            ("pdserve_kv_handoff_bytes_total", "decode", None): blocks * 30 * 2 * 3 * 64 * 128 * DTYPE_BYTES,
            ("pdserve_kv_handoff_failures_total", "decode", None): 0,
        }

        def observed():
            now = scrape(cluster.base_url)
            return {
                k: metric_sum(now, k[0], pool=k[1], **({"source": k[2]} if k[2] else {}))
                - metric_sum(before, k[0], pool=k[1], **({"source": k[2]} if k[2] else {}))
                for k in expected
            }

        try:  # engine stats reach the ingress with a poll's delay
            wait_for(lambda: observed() == expected, timeout_s=20)
        except AssertionError:
            assert observed() == expected
        # one remote prefill call, and the engine's share of it as the prefill replica measured it
        assert delta("pdserve_prefill_seconds_count") == 1 and delta("pdserve_prefill_engine_seconds_count") == 1
        assert 0 < delta("pdserve_prefill_engine_seconds_sum") < delta("pdserve_prefill_seconds_sum")

    def test_both_decode_replicas_receive_traffic(self, cluster):
        before = settled_scrape(cluster.base_url)
        for i in range(8):
            assert chat(cluster.base_url, f"Say the number {i}.", max_tokens=4, temperature=0).status_code == 200
        after = settled_scrape(cluster.base_url)
        endpoints = {
            dict(ls)["endpoint"]
            for (n, ls) in after
            if n == "pdserve_engine_generation_tokens_total" and dict(ls)["pool"] == "decode"
        }
        assert len(endpoints) == 2
        gained = {
            e: metric_sum(after, "pdserve_engine_generation_tokens_total", endpoint=e)
            - metric_sum(before, "pdserve_engine_generation_tokens_total", endpoint=e)
            for e in endpoints
        }
        assert all(v > 0 for v in gained.values()), gained


class TestBadInput:
    @pytest.mark.parametrize(
        "body, status, code",
        [
            (b"{not json", 400, "invalid_json"),
            ({"model": MODEL}, 400, "missing_required_parameter"),
            ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "invalid_value"),
            (
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
                400,
                "invalid_value",
            ),
            ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "invalid_value"),
            (
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": []},
                400,
                "unsupported_parameter",
            ),
            (
                {"model": MODEL, "messages": [{"role": "user", "content": "word " * 2100}]},
                400,
                "context_length_exceeded",
            ),
            (
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4000},
                400,
                "context_length_exceeded",
            ),
        ],
    )
    def test_openai_error_shape(self, cluster, body, status, code):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(
            f"{cluster.base_url}/v1/chat/completions",
            content=content,
            timeout=30,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]

    def test_unknown_tier_and_route(self, cluster):
        r = httpx.post(
            f"{cluster.base_url}/v1/chat/completions",
            headers={"x-customer-tier": "platinum"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
            timeout=30,
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-customer-tier"
        r = httpx.get(f"{cluster.base_url}/v1/nope")
        assert r.status_code == 404 and "error" in r.json()

    def test_cluster_still_serves_after_bad_input(self, cluster):
        assert chat(cluster.base_url, "Hi", max_tokens=4).status_code == 200


class TestDisconnect:
    def test_client_disconnect_aborts_and_frees_kv(self, cluster):
        before = scrape(cluster.base_url)
        with httpx.stream(
            "POST",
            f"{cluster.base_url}/v1/chat/completions",
            timeout=60,
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "Write a very long essay about rivers."}],
                "max_tokens": 1500,
                "ignore_eos": True,
                "stream": True,
            },
        ) as r:
            n = 0
            for line in r.iter_lines():
                n += sse_data(line) is not None
                if n >= 5:
                    break  # leave mid-stream: closing the response drops the connection

        def settled():
            s = scrape(cluster.base_url)
            running = metric_sum(s, "pdserve_pool_running_requests")
            kv = metric_sum(s, "pdserve_engine_kv_usage_ratio")
            return s if running == 0 and kv == 0 else None

        after = wait_for(settled, timeout_s=30)
        generated = metric_sum(after, "pdserve_engine_generation_tokens_total", pool="decode") - metric_sum(
            before, "pdserve_engine_generation_tokens_total", pool="decode"
        )
        assert generated < 1500, "the decode engine kept generating after the client left"
        assert metric_sum(after, "pdserve_request_aborts_total", reason="client_disconnect") >= 1


class TestClients:
    def test_openai_client_stream_and_completions(self, cluster):
        import openai

        client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused")
        stream = client.chat.completions.create(
            model=MODEL,
            stream=True,
            max_tokens=24,
            temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert "Paris" in text
        comp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
        assert comp.choices[0].text and comp.usage.completion_tokens == 5
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])

    def test_metrics_have_latency_histograms(self, cluster):
        s = scrape(cluster.base_url)
        assert metric_sum(s, "pdserve_request_ttft_seconds_count") > 0
        assert metric_sum(s, "pdserve_request_inter_token_latency_seconds_count") > 0
        assert metric_sum(s, "pdserve_kv_handoff_duration_seconds_count") > 0
        assert metric_sum(s, "pdserve_pool_replicas", pool="decode") == 2

    def test_status_command(self, cluster):
        out = subprocess.run(
            [sys.executable, "-m", "serve.cli", "status", "--url", cluster.base_url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert out.returncode == 0, out.stderr
        assert "pool decode" in out.stdout and "replicas=2" in out.stdout

    def test_serving_path_measurement(self, cluster):
        """serve/serving_profile.py against this cluster: sequential streams of the asked length whose TTFT
        and TPOT exceed the engines' own (the bundled profile's; every prompt here is handed off) by a
        positive serving-path term under a second."""
        data = cluster.cfg.model_dump(mode="json")
        for pool in data["pools"]:
            pool["engine"]["dtype"] = "auto"  # the bundled profile's engines (the key's dtype)
        sim = sim_cluster(ClusterConfig.from_dict(data), load_profiles(DEFAULT_PROFILES))
        m = measure_serving(cluster.base_url, MODEL, engine_times_of(sim), requests=4, prompt_words=(16, 96))
        assert len(m.samples) == 4 and all(s.output_tokens == 32 for s in m.samples)
        short, long_ = m.samples[0], m.samples[1]
        assert 16 < short.prompt_tokens < long_.prompt_tokens  # the prompts' words plus the chat template
        # the lone request's engine path: remote prefill, handoff, a KV-loading step, then its first token
        assert long_.engine_ttft_s > sim.pools[0].profile.prefill_s(long_.prompt_tokens)
        assert 0.0 < m.overhead.ttft_s < 1.0
        assert m.overhead.ttft_s == statistics.median(s.ttft_s - s.engine_ttft_s for s in m.samples)
        assert all(s.tpot_s is not None and s.tpot_s > 0 for s in m.samples)


SYSTEM = "You are a meticulous assistant for a warehouse. " + " ".join(
    f"Rule {i}: shelf {i % 9} holds only boxes of colour {['red', 'blue', 'green'][i % 3]}." for i in range(42)
)


def _decode_tokens(samples) -> dict[str, float]:
    return {
        dict(ls)["endpoint"]: v
        for (n, ls), v in samples.items()
        if n == "pdserve_engine_generation_tokens_total" and dict(ls)["pool"] == "decode"
    }


def _post(base_url: str, content: str, tier: str, max_tokens: int = 4) -> tuple[int, float, dict]:
    t0 = time.monotonic()
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        timeout=180,
        headers={"x-customer-tier": tier},
        json={
            "model": MODEL,
            "max_tokens": max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": content}],
        },
    )
    return r.status_code, time.monotonic() - t0, dict(r.headers)


def _stream_ttft(base_url: str, content: str, tier: str, max_tokens: int = 4) -> tuple[int, float, dict]:
    """(status, seconds to the first content token -- or to the refusal --, headers) of a streamed chat."""
    t0 = time.monotonic()
    body = {
        "model": MODEL,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": content}],
    }
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", timeout=180, json=body, headers={"x-customer-tier": tier}
    ) as r:
        ttft = None
        for line in r.iter_lines():
            if ttft is None and '"content"' in line:
                ttft = time.monotonic() - t0
        return r.status_code, ttft if ttft is not None else time.monotonic() - t0, dict(r.headers)


class TestRouter:
    """Prefix-aware placement and SLO/QoS admission on the real cluster (default SLO: TTFT 4 s)."""

    def test_shared_system_prompt_hits_and_sticks_to_the_holder(self, cluster):
        url = cluster.base_url
        before = settled_scrape(url)
        for q in ("Where are red boxes?", "Where are blue boxes?", "Which shelf has green?", "Count shelves."):
            body = {
                "model": MODEL,
                "max_tokens": 4,
                "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            }
            assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code == 200
        after = settled_scrape(url)
        hits = metric_sum(after, "pdserve_prefix_hit_tokens_total") - metric_sum(
            before, "pdserve_prefix_hit_tokens_total"
        )
        cached = metric_sum(
            after, "pdserve_engine_prompt_tokens_total", pool="prefill", source="local_cache_hit"
        ) - metric_sum(before, "pdserve_engine_prompt_tokens_total", pool="prefill", source="local_cache_hit")
        assert hits >= 3 * 128 * 4 and cached >= hits  # 3 repeat requests x >= 4 shared blocks
        b, a = _decode_tokens(before), _decode_tokens(after)
        gained = {e: a[e] - b.get(e, 0) for e in a if a[e] > b.get(e, 0)}
        assert len(gained) == 1, gained  # every request went to the holder
        # the index also learns from the engines' own KV cache events (ZMQ), and decisions are timed
        wait_for(lambda: metric_sum(scrape(url), "pdserve_prefix_index_kv_events") > 0, timeout_s=15)
        assert metric_sum(after, "pdserve_router_decision_duration_seconds_count") >= 4

    def test_burst_gets_fast_503_429_with_retry_after_and_admitted_meet_slo(self, cluster):
        url = cluster.base_url
        prompt = "Summarise: " + " ".join(f"Line {i} says the crate {i} is {i % 5} metres tall." for i in range(25))
        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            results = list(pool.map(lambda i: _stream_ttft(url, f"{i} {prompt}", "free"), range(10)))
        ok = [r for r in results if r[0] == 200]
        rejected = [r for r in results if r[0] in (429, 503)]
        assert len(ok) + len(rejected) == 10 and ok and len(rejected) >= 4, [r[0] for r in results]
        assert all(float(h["retry-after"]) >= 1 for _, _, h in rejected)
        assert max(t for _, t, _ in rejected) < 2.0  # early rejection, not a timeout
        assert len(ok) <= 4, [r[0] for r in results]  # the queue-wait budget, not the burst, sets it
        # Admitted requests keep TTFT near the SLO (4 s). Without admission the last of the 10 would
        # wait ~10 prefills (>10 s on 2 cores). The bound leaves room for a 2-core machine's noise:
        # three engines on two cores, the prefill engine sharing one with a decode engine (a CI run
        # measured 1.56x SLO when both admitted prompts met a busy shared core); the SLO claim itself is
        # the benchmark's (loadtests/results: admitted p99 TTFT under the SLO at ~2x capacity).
        assert max(t for _, t, _ in ok) < 4.0 * 2
        samples = scrape(url)
        assert metric_sum(samples, "pdserve_admission_rejections_total", tier="free") >= len(rejected)
        assert metric_sum(samples, "pdserve_ttft_actual_over_predicted_count") > 0

    def test_premium_admitted_while_free_is_shed(self, cluster):
        """Two rounds: a free-tier flood fills free's share of the queue (60 % of the TTFT budget), then
        one premium request arrives and finds its reserved share. (Two premium requests back to back on
        top of a full free share would ask for ~2 x 1 s of the 1.6 s premium headroom on 2 cores: an
        overload 503 for the second is then the policy working, not failing.)"""
        url = cluster.base_url
        long = "Summarise: " + " ".join(f"Row {i} lists {i * 3} apples and {i % 4} pears." for i in range(16))
        free, premium = [], []
        for rnd in range(2):
            wait_for(lambda: metric_sum(scrape(url), "pdserve_pool_running_requests") == 0, timeout_s=60)
            with concurrent.futures.ThreadPoolExecutor(max_workers=7) as pool:
                futs = []
                for i in range(6):
                    futs.append(pool.submit(_post, url, f"{rnd} {i} {long}", "free"))
                    time.sleep(0.1)  # free ones queue first
                futs.append(pool.submit(_post, url, f"{rnd} Name a fruit.", "premium"))
                results = [f.result() for f in futs]
            free.append([r[0] for r in results[:6]])
            premium.append(results[6][0])
        assert premium == [200, 200], (free, premium)
        assert all(sum(s in (429, 503) for s in f) >= 2 for f in free), (free, premium)
