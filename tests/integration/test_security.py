"""API keys, tenant and tier binding, per-key rate limits, the body limit, the OpenAPI document (fuzzed)
and the SIGTERM drain on a real cluster: one ``pdserve serve`` process for the module (auth on, keys
from a file), stopped by the drain test, which runs last."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import psutil
import pytest
import yaml

from loadtests.client import SSE_DONE, sse_data
from loadtests.fuzz import fuzz
from tests.conftest import REPO
from tests.integration.cluster_utils import (
    ALWAYS_REMOTE_PREFILL,
    cluster_config,
    free_port,
    health,
    metric_sum,
    settled_scrape,
)

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
FREE_ACME = "sk-test-free-acme-0001"  # tenant acme, at most free
PREMIUM_ACME = "sk-test-premium-acme-0002"  # tenant acme, at most premium
PREMIUM_GLOBEX = "sk-test-premium-globex-0003"  # tenant globex
LIMITED = "sk-test-limited-0004"  # 2 requests of burst, then one per 10 s
FUZZ = "sk-test-fuzz-0005"
ADMIN = "sk-test-admin-0006"
ONE_AT_A_TIME = "sk-test-one-stream-0007"  # one request in flight, 600 tokens a minute
DRAIN_GRACE_S = 60.0
KEYS = [
    {"key": FREE_ACME, "tenant": "acme", "max_tier": "free"},
    {"key": PREMIUM_ACME, "tenant": "acme", "max_tier": "premium"},
    {"key": PREMIUM_GLOBEX, "tenant": "globex", "max_tier": "premium"},
    {"key": LIMITED, "tenant": "slow", "max_tier": "free", "limits": {"requests_per_s": 0.1, "request_burst": 2}},
    {"key": FUZZ, "tenant": "fuzz", "max_tier": "premium"},
    {"key": ADMIN, "tenant": "ops", "max_tier": "free", "admin": True},
    {
        "key": ONE_AT_A_TIME,
        "tenant": "solo",
        "max_tier": "free",
        "limits": {"max_concurrent_requests": 1, "tokens_per_min": 600},
    },
]
# > 4 blocks of 128 tokens, the same for every tenant
SYSTEM = "You are a careful assistant for a library. " + " ".join(
    f"Rule {i}: aisle {i % 7} holds only books about {['birds', 'ships', 'stars'][i % 3]}." for i in range(48)
)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _chat(url: str, key: str | None, content: str = "Say hi.", headers: dict | None = None, **kw) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": content}]}
    body.update(kw)
    h = {**(_auth(key) if key else {}), **(headers or {})}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=h, timeout=120)


def _assert_openai_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``pdserve serve`` with auth on (keys from a file), as a user runs it; always stopped on the way out."""
    tmp = tmp_path_factory.mktemp("security")
    (tmp / "keys.json").write_text(json.dumps(KEYS))
    port = free_port()
    cfg = cluster_config(
        port,
        placement=ALWAYS_REMOTE_PREFILL,
    )
    data = cfg.model_dump(mode="json")
    data["server"].update(auth={"keys_file": str(tmp / "keys.json")}, drain_grace_s=DRAIN_GRACE_S)
    # admission off: the drain streams and the rate-limit trips must not meet capacity rejections or caps
    data["router"]["admission"].update(enabled=False, warmup_prompt_tokens=[])
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(data))
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "serve", str(tmp / "cluster.yaml")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()  # keep draining: a full pipe would block the server
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if any(line.startswith("[pdserve] ready in") for line in list(lines)):
                break
            time.sleep(0.5)
        assert any(line.startswith("[pdserve] ready in") for line in lines), "".join(lines[-40:])
        yield SimpleNamespace(base_url=f"http://127.0.0.1:{port}", proc=proc, lines=lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):  # gone meanwhile
        return ""


def _ingress_rss() -> int:
    """RSS (bytes) of this module's ingress replica: a descendant of the ``pdserve serve`` it started."""
    procs = [p for p in psutil.Process().children(recursive=True) if "ServeReplica" in _cmdline(p)]
    procs = [p for p in procs if "ingress" in _cmdline(p)]
    assert len(procs) == 1, [_cmdline(p) for p in procs]
    return procs[0].memory_info().rss


class TestKeys:
    def test_missing_or_wrong_key_is_401_and_health_stays_open(self, cluster):
        url = cluster.base_url
        for headers in ({}, _auth("sk-not-a-key-at-all"), {"Authorization": FREE_ACME}):
            r = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                headers=headers,
                timeout=30,
            )
            err = _assert_openai_error(r, 401, "invalid_api_key")
            assert "sk-test" not in err["message"]
        _assert_openai_error(httpx.get(f"{url}/v1/models", timeout=10), 401, "invalid_api_key")
        assert httpx.get(f"{url}/v1/models", headers=_auth(FREE_ACME), timeout=10).status_code == 200
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200

    def test_free_key_asking_for_premium_runs_as_free(self, cluster):
        url = cluster.base_url
        before = settled_scrape(url)
        r = _chat(url, FREE_ACME, headers={"x-customer-tier": "premium"})
        assert r.status_code == 200, r.text
        after = settled_scrape(url)

        def admitted(tier):
            return metric_sum(after, "pdserve_admitted_requests_total", tier=tier) - metric_sum(
                before, "pdserve_admitted_requests_total", tier=tier
            )

        assert (admitted("free"), admitted("premium")) == (1, 0)
        # a premium key may lower its tier
        before = after
        assert _chat(url, PREMIUM_ACME, headers={"x-customer-tier": "standard"}).status_code == 200
        after = settled_scrape(url)
        assert (admitted("standard"), admitted("premium")) == (1, 0)

    def test_another_tenant_header_is_403(self, cluster):
        r = _chat(cluster.base_url, FREE_ACME, headers={"x-tenant-id": "globex"})
        _assert_openai_error(r, 403, "tenant_mismatch")
        assert _chat(cluster.base_url, FREE_ACME, headers={"x-tenant-id": "acme"}).status_code == 200

    def test_prefix_cache_is_shared_within_a_tenant_only(self, cluster):
        url = cluster.base_url

        def cached_after(key: str, question: str) -> float:
            before = settled_scrape(url)
            body = {"model": MODEL, "max_tokens": 2, "temperature": 0, "user": "someone-else"}
            body["messages"] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=_auth(key), timeout=120)
            assert r.status_code == 200, r.text
            after = settled_scrape(url)
            src = {"pool": "prefill", "source": "local_cache_hit"}
            return metric_sum(after, "pdserve_engine_prompt_tokens_total", **src) - metric_sum(
                before, "pdserve_engine_prompt_tokens_total", **src
            )

        assert cached_after(FREE_ACME, "Where are bird books?") == 0  # first of tenant acme
        # another tenant, same prompt, and the body's 'user' is no tenant with a key: no hit
        assert cached_after(PREMIUM_GLOBEX, "Where are bird books?") == 0
        # acme's other key hits acme's blocks
        assert cached_after(PREMIUM_ACME, "Where are ship books?") >= 4 * 128


class TestLimits:
    def test_rate_limit_trips_with_retry_after_and_openai_headers(self, cluster):
        url = cluster.base_url
        first = _chat(url, LIMITED)
        assert first.status_code == 200, first.text
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert _chat(url, LIMITED).status_code == 200
        r = _chat(url, LIMITED)
        err = _assert_openai_error(r, 429, "rate_limit_exceeded")
        assert "requests" in err["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= 10
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        # other keys are not limited by it
        assert _chat(url, FREE_ACME).status_code == 200

    def test_concurrent_stream_cap_and_unused_tokens_given_back(self, cluster):
        """One stream in flight at a time; a request charges prompt + max_tokens of the key's 600 tokens a
        minute, and what it did not generate comes back when it ends."""
        url = cluster.base_url
        body = {
            "model": MODEL,
            "max_tokens": 64,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "messages": [{"role": "user", "content": "Tell me about lighthouses."}],
        }
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=_auth(ONE_AT_A_TIME), timeout=120
        ) as r:
            assert r.status_code == 200
            second = _chat(url, ONE_AT_A_TIME)
            err = _assert_openai_error(second, 429, "rate_limit_exceeded")
            assert "concurrent" in err["message"] and int(second.headers["Retry-After"]) >= 1
            for _ in r.iter_lines():
                pass
        # each of the next two is charged ~325 tokens (prompt + max_tokens=300): without the refund the second
        # would not fit in the 600-token minute after the stream and the first; stopping at the first word
        # gives back ~300
        for _ in range(2):
            r = _chat(url, ONE_AT_A_TIME, max_tokens=300, content="Say hi.", stop=[" ", "."])
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] < 20

    def test_2mib_body_is_413_before_parsing_without_ingress_growth(self, cluster):
        url = cluster.base_url
        big = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "' + b"a" * (2 << 20)
        big += b'"}]}'
        rss0 = _ingress_rss()
        for _ in range(5):
            t0 = time.monotonic()
            r = httpx.post(
                f"{url}/v1/chat/completions",
                content=big,
                headers={**_auth(FREE_ACME), "content-type": "application/json"},
                timeout=60,
            )
            _assert_openai_error(r, 413, "request_too_large")
            assert time.monotonic() - t0 < 10
        # chunked (no Content-Length): cut off while reading
        chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
        r = httpx.post(f"{url}/v1/chat/completions", content=chunks, headers=_auth(FREE_ACME), timeout=60)
        _assert_openai_error(r, 413, "request_too_large")
        grown = _ingress_rss() - rss0
        assert grown < 8 << 20, f"ingress grew {grown / 2**20:.1f} MiB"


class TestOpenAIClient:
    def test_openai_client_with_a_key_streaming_and_not(self, cluster):
        client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=PREMIUM_GLOBEX, max_retries=0, timeout=120)
        out = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to three."}], max_tokens=8, temperature=0
        )
        assert out.choices[0].message.content and out.usage.completion_tokens > 0
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Count to three."}],
                max_tokens=8,
                temperature=0,
                stream=True,
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
        assert [m.id for m in client.models.list().data] == [MODEL]
        bad = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.code == "invalid_api_key"


class TestFuzz:
    def test_schema_fuzz_has_no_5xx_and_every_4xx_is_openai_shaped(self, cluster, tmp_path):
        """A few hundred generated requests (40 per operation, mode and header set; fixed seed). A longer
        run: PDSERVE_FUZZ_EXAMPLES=400 PDSERVE_FUZZ_OUT=loadtests/results/<run>-fuzz (fuzz.json there)."""
        doc = httpx.get(f"{cluster.base_url}/openapi.json", timeout=10).json()
        assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(doc["paths"])
        examples = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "40"))
        report = fuzz(cluster.base_url, {"none": {}, "key": _auth(FUZZ)}, examples=examples, seed=20)
        out = Path(os.environ.get("PDSERVE_FUZZ_OUT", tmp_path))
        out.mkdir(parents=True, exist_ok=True)
        (out / "fuzz.json").write_text(json.dumps({**asdict(report), "server_errors": report.server_errors}, indent=1))
        print(json.dumps({"requests": report.requests, "by_status": report.by_status, "s": report.duration_s}))
        assert report.requests >= 4 * examples and report.findings == [], report.findings[:3]
        assert report.by_status.get("401", 0) > 0 and report.by_status.get("400", 0) > 0
        assert report.server_errors == 0


def _stream(url: str, max_tokens: int, out: dict) -> None:
    """One streamed chat (usage included) into ``out``: status, first-token flag, finish, usage, [DONE]."""
    body = {
        "model": MODEL,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=_auth(FUZZ), timeout=180) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            data = sse_data(line)
            if data is None:
                continue
            if data == SSE_DONE:
                out["done"] = True
                continue
            chunk = json.loads(data)
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    out["first_token"] = True
                out["finish"] = c.get("finish_reason") or out.get("finish")
            if chunk.get("usage"):
                out["completion_tokens"] = chunk["usage"]["completion_tokens"]


class TestZDrain:
    """Runs last: it stops the module's cluster."""

    def test_admin_drain_needs_an_admin_key(self, cluster):
        url = cluster.base_url
        _assert_openai_error(httpx.post(f"{url}/admin/drain", timeout=10), 401, "invalid_api_key")
        _assert_openai_error(httpx.post(f"{url}/admin/drain", headers=_auth(FUZZ), timeout=10), 403, "not_admin")

    def test_sigterm_lets_8_streams_finish_refuses_new_ones_and_exits(self, cluster):
        url, n, max_tokens = cluster.base_url, 8, 96
        outs = [{} for _ in range(n)]
        threads = [threading.Thread(target=_stream, args=(url, max_tokens, o), daemon=True) for o in outs]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(o.get("first_token") for o in outs):
            time.sleep(0.1)
        assert all(o.get("first_token") for o in outs), outs
        t_sig = time.monotonic()
        cluster.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and health(url).get("status") != "draining":
            time.sleep(0.1)
        assert health(url)["status"] == "draining"
        refused = _chat(url, FUZZ)
        _assert_openai_error(refused, 503, "draining")
        assert int(refused.headers["Retry-After"]) >= 1
        still_streaming = sum(t.is_alive() for t in threads)
        for t in threads:
            t.join(timeout=DRAIN_GRACE_S)
        drained_s = time.monotonic() - t_sig
        assert [(o.get("status"), o.get("finish"), o.get("completion_tokens"), o.get("done")) for o in outs] == [
            (200, "length", max_tokens, True)
        ] * n
        cluster.proc.wait(timeout=DRAIN_GRACE_S + 120)
        exit_s = time.monotonic() - t_sig
        print(
            json.dumps(
                {
                    "streams": n,
                    "streaming_at_refusal": still_streaming,
                    "drained_s": round(drained_s, 1),
                    "exit_s": round(exit_s, 1),
                    "log": [x.strip() for x in cluster.lines if x.startswith("[pdserve] drain")],
                }
            )
        )
        assert cluster.proc.returncode == 0, "".join(cluster.lines[-40:])
        assert still_streaming >= 1  # the refusal came while streams were still running
        assert drained_s < DRAIN_GRACE_S
        assert exit_s < DRAIN_GRACE_S, exit_s  # drained and stopped within the grace period
        drained = [x for x in cluster.lines if x.startswith("[pdserve] drained in")]
        assert drained and f"{n} of {n} in-flight requests finished" in drained[0], cluster.lines[-20:]
