"""Fault injection on a real local cluster (1 prefill replica, 1 decode replica), driven through the
public HTTP API; the faults are signals sent from here to the engines' processes (loadtests/faults/faults.py),
nothing simulated inside the product.

Tests run in file order and share one cluster: the last one kills the only decode replica's engine.
Engines run in float32 (see test_cluster.py): a prompt prefilled on the decode engine then answers
token for token like one prefilled remotely, so a fallback's answer is compared with the answer the
same cluster gave before the fault. Every request, loop and wait here has a time bound.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest

from loadtests.faults.faults import engine_processes, kill, paused
from tests.integration.chat_client import CLIENT_TIMEOUT_S, PROMPTS, chat, request_body, stream
from tests.integration.cluster_utils import (
    ALWAYS_REMOTE_PREFILL,
    cluster_config,
    free_port,
    freed_after_disconnect,
    health,
    metric_sum,
    running_cluster,
    scrape,
    settled_scrape,
    wait_for,
)

pytestmark = pytest.mark.integration

DTYPE = "float32"
PREFILL_TIMEOUT_S = 6.0
LONG_TOKENS = 1000  # streams still generating when the test acts on them
DECODE_ERROR_CODES = {"decode_failed", "engine_error", "engine_aborted"}  # serve/failures.py decode_error


@pytest.fixture(scope="module")
def cluster():
    # always remote prefill (short prompts would otherwise prefill on the decode replica, and prompts
    # arriving behind a stalled prefill queue would be shed to it: local_prefill_when_sooner), so every
    # request depends on the prefill engine and meets its timeout; admission off: these tests check the
    # failure paths, and the TTFTs a stalled prefill causes would otherwise raise the admission model's
    # correction
    cfg = cluster_config(
        free_port(),
        dtype=DTYPE,
        prefill_timeout_s=PREFILL_TIMEOUT_S,
        placement={**ALWAYS_REMOTE_PREFILL, "local_prefill_when_sooner": False},  # (the default, stated)
        admission={"enabled": False},
    )
    with running_cluster(cfg) as c:
        yield c


def _fallbacks(samples: dict, **labels) -> float:
    return metric_sum(samples, "pdserve_prefill_fallbacks_total", **labels)


def _decode(samples: dict, name: str) -> float:
    return metric_sum(samples, name, pool="decode")


def test_prefill_stall_falls_back_to_local_prefill(cluster, answers):
    """The prefill engine stopped (SIGSTOP) for longer than prefill_timeout_s: every request, streamed
    or not, waits out the timeout, is prefilled on the decode engine and answers exactly as before."""
    url = cluster.base_url
    before = scrape(url)
    jobs = [(p, s) for p in PROMPTS for s in (stream, chat)]
    engines = engine_processes(cluster.cfg.app_name, "prefill")
    # the timer resumes the engine after 5 timeouts at the latest; leaving the block resumes it at once
    with paused(engines, 5 * PREFILL_TIMEOUT_S) as pause, concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
        futures = [ex.submit(send, url, p) for p, send in jobs]
        replies = [f.result(timeout=CLIENT_TIMEOUT_S + 30) for f in futures]
        answered_while_stopped = not pause.resumed.is_set()
    for (p, send), reply in zip(jobs, replies):
        assert (reply.status, reply.errors, reply.done) == (200, [], True), (send.__name__, p, reply)
        assert (reply.text, reply.finish_reasons) == (answers[p][0], [answers[p][1]]), (send.__name__, p, reply)
    assert answered_while_stopped, "answers waited for the prefill engine to resume"
    after = scrape(url)
    # every request was routed to the prefill replica and gave up on it after prefill_timeout_s
    assert _fallbacks(after, reason="timeout") - _fallbacks(before, reason="timeout") == len(jobs)
    assert _fallbacks(after) - _fallbacks(before) == len(jobs)

    # resumed: the next request is prefilled remotely again, with the same answer
    before = scrape(url)
    reply = chat(url, PROMPTS[0])
    assert (reply.status, reply.text, reply.finish_reasons) == (200, answers[PROMPTS[0]][0], [answers[PROMPTS[0]][1]])
    after = scrape(url)
    assert metric_sum(after, "pdserve_prefill_seconds_count") - metric_sum(before, "pdserve_prefill_seconds_count") == 1
    assert _fallbacks(after) == _fallbacks(before)


def test_client_disconnect_frees_the_decode_engine(cluster):
    """A client that leaves mid-stream: its request is aborted in the decode engine (running requests
    and KV usage back to 0 long before its max_tokens could have been generated)."""
    url = cluster.base_url
    wait_for(lambda: _decode(scrape(url), "pdserve_pool_running_requests") == 0, timeout_s=30)
    before = scrape(url)
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        timeout=CLIENT_TIMEOUT_S,
        json=request_body(
            "Write a very long essay about rivers.", max_tokens=LONG_TOKENS, ignore_eos=True, stream=True
        ),
    ) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():  # a few content chunks: the decode engine is generating
            chunks += '"content":"' in line and '"content":""' not in line
            if chunks >= 5:
                break
        assert chunks >= 5  # still connected, and the decode engine is generating
    # the block closed the connection mid-stream
    wait_for(lambda: freed_after_disconnect(url, before), timeout_s=20)
    after = settled_scrape(url)
    generated = _decode(after, "pdserve_engine_generation_tokens_total") - _decode(
        before, "pdserve_engine_generation_tokens_total"
    )
    assert 0 < generated < LONG_TOKENS, generated


def test_client_disconnect_during_prefill_aborts_it(cluster):
    """A streaming client that leaves before its first token, while its prompt waits in the (stopped)
    prefill engine: the prefill is aborted in that engine, no decode ever starts, nothing stays queued."""
    url = cluster.base_url
    wait_for(lambda: metric_sum(scrape(url), "pdserve_pool_running_requests") == 0, timeout_s=30)
    before = scrape(url)
    with paused(engine_processes(cluster.cfg.app_name, "prefill"), PREFILL_TIMEOUT_S / 2) as pause:
        with pytest.raises(httpx.ReadTimeout):  # no first byte: the client gives up and disconnects
            with httpx.stream(
                "POST",
                f"{url}/v1/chat/completions",
                timeout=PREFILL_TIMEOUT_S / 4,
                json=request_body(
                    "Write a very long essay about rivers.", max_tokens=LONG_TOKENS, ignore_eos=True, stream=True
                ),
            ) as r:
                r.read()
        assert not pause.resumed.is_set()  # the client left while the prefill engine was stopped
    wait_for(lambda: freed_after_disconnect(url, before), timeout_s=20)
    after = settled_scrape(url)
    assert _decode(after, "pdserve_engine_generation_tokens_total") == _decode(
        before, "pdserve_engine_generation_tokens_total"
    )
    assert metric_sum(after, "pdserve_prefill_fallbacks_total") == metric_sum(before, "pdserve_prefill_fallbacks_total")


def test_non_streaming_client_disconnect_frees_the_engines(cluster):
    """A non-streaming client that gives up while its answer is being generated: the request is aborted
    in the decode engine long before its max_tokens, and counted as a client disconnect."""
    url = cluster.base_url
    wait_for(lambda: metric_sum(scrape(url), "pdserve_pool_running_requests") == 0, timeout_s=30)
    before = scrape(url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{url}/v1/chat/completions",
            timeout=3.0,
            json=request_body("Write a very long essay about rivers.", max_tokens=LONG_TOKENS, ignore_eos=True),
        )
    wait_for(lambda: freed_after_disconnect(url, before), timeout_s=20)
    after = settled_scrape(url)
    generated = _decode(after, "pdserve_engine_generation_tokens_total") - _decode(
        before, "pdserve_engine_generation_tokens_total"
    )
    assert 0 < generated < LONG_TOKENS, generated


def test_decode_engine_killed_mid_stream(cluster, answers):
    """Runs last: SIGKILL of the only decode replica's engine while 3 streams are generating. Every
    stream ends with an SSE error event and [DONE] (no finish chunk), the next request gets a 502/503
    at once, and once Serve has replaced the replica (bounded wait) requests are answered again."""
    url = cluster.base_url
    engines = engine_processes(cluster.cfg.app_name, "decode")
    before = scrape(url)
    started = [threading.Event() for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(len(started)) as ex:
        futures = [
            ex.submit(
                stream,
                url,
                f"Story {i}: write a very long story about a lighthouse.",
                on_first_content=e.set,
                max_tokens=LONG_TOKENS,
                ignore_eos=True,
            )
            for i, e in enumerate(started)
        ]
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        assert all(e.wait(max(0.0, deadline - time.monotonic())) for e in started), "streams did not start"
        killed_at = time.monotonic()
        kill(engines)
        replies = [f.result(timeout=CLIENT_TIMEOUT_S + 30) for f in futures]
        ended_s = time.monotonic() - killed_at
    assert ended_s < CLIENT_TIMEOUT_S, ended_s
    for reply in replies:
        assert reply.status == 200 and reply.text and reply.done, reply
        assert reply.finish_reasons == [], reply  # never a "stop"/"length" on a truncated text
        assert len(reply.errors) == 1 and reply.errors[0]["code"] in DECODE_ERROR_CODES, reply
    after = scrape(url)
    aborted = sum(
        metric_sum(after, "pdserve_request_aborts_total", reason=c)
        - metric_sum(before, "pdserve_request_aborts_total", reason=c)
        for c in DECODE_ERROR_CODES
    )
    assert aborted == len(replies)

    # no live decode engine: an error status, not a hang
    t0 = time.monotonic()
    reply = chat(url, PROMPTS[0])
    assert time.monotonic() - t0 < 30
    assert reply.status in (502, 503) and reply.errors[0]["code"], reply
    if reply.status == 503:
        assert float(reply.headers["retry-after"]) >= 1

    # the stats polls see the dead engine (a poll answered just before the kill can vouch for it for up
    # to the directory's stale_s), then Serve's health check replaces the replica: bounded waits, then
    # requests are answered again
    def decode_healthy() -> int:
        return health(url)["pools"]["decode"]["healthy"]

    wait_for(lambda: decode_healthy() == 0, timeout_s=30, interval_s=0.5)

    def healed():
        body = health(url)
        return body["status"] == "ok" and body["pools"]["decode"]["healthy"] == 1

    wait_for(healed, timeout_s=150, interval_s=2.0)
    reply = chat(url, PROMPTS[0])
    want = (200, answers[PROMPTS[0]][0], [answers[PROMPTS[0]][1]])
    assert (reply.status, reply.text, reply.finish_reasons) == want, (reply, health(url))
