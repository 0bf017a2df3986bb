"""Two decode replicas on a real local cluster (1 prefill + 2 decode, float32 eager engines, a 6 s KV
lease: the config's minimum): a decode that reads its KV after the prefill's lease expired, the loss
of the prefill replica, and the loss of one decode replica under load. Faults are signals sent from here
to the engines' processes (loadtests/faults/faults.py); requests go through the public HTTP API.

Tests run in file order and share one cluster; the last one kills a decode replica's engine. Answers
are compared with the ones the same cluster gave before any fault (float32: a prompt prefilled on
either side answers token for token alike). Every request, loop and wait here has a time bound.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from loadtests.faults.faults import engine_processes, engine_processes_of, kill, paused, replica_processes
from tests.integration.chat_client import CLIENT_TIMEOUT_S, PROMPTS, chat, stream
from tests.integration.cluster_utils import (
    ALWAYS_REMOTE_PREFILL,
    cluster_config,
    free_port,
    health,
    metric_sum,
    per_endpoint,
    running_cluster,
    scrape,
    settled_scrape,
    wait_for,
)

pytestmark = pytest.mark.integration

DTYPE = "float32"
KV_LEASE_S = 6  # workers/config.py: kv_lease_s >= 6
STREAM_TOKENS = 200  # streams still generating when a replica dies
# bound of one such stream: the survivor decodes all of them plus the new requests (on 2 shared cores;
# CI machines are up to 8x slower than a fast one)
STREAM_TIMEOUT_S = 240.0
# stream prompts span full KV blocks (128 tokens), so both decode replicas hold blocks in the prefix index
STORY = (
    "Write a very long story about a lighthouse keeper, the storms she saw, the ships she guided home "
    "and the letters she wrote to her brother across the sea. "
) * 8
STOP_ROUTING_S = 5.0  # the router stops using a dead replica within this (stats period 0.5 s)
DECODE_ERROR_CODES = {"decode_failed", "engine_error", "engine_aborted"}  # serve/failures.py decode_error


@pytest.fixture(scope="module")
def cluster():
    # always remote prefill, so every request takes the KV handoff; admission off: these tests check
    # failover, and three engines on two cores would otherwise shed load by the admission model's SLOs
    cfg = cluster_config(
        free_port(),
        decode_replicas=2,
        dtype=DTYPE,
        kv_handoff={"kv_lease_s": KV_LEASE_S},
        placement=ALWAYS_REMOTE_PREFILL,
        admission={"enabled": False},
    )
    with running_cluster(cfg) as c:
        yield c


def _idle(url: str) -> None:
    wait_for(lambda: metric_sum(scrape(url), "pdserve_pool_running_requests") == 0, timeout_s=30)


def test_decode_reads_kv_after_the_prefill_lease_expired(cluster, answers):
    """Both decode engines stopped for longer than the KV lease while requests are prefilled: the
    prefill engine releases the leased KV (its expiry counter moves), the decodes run once resumed,
    every answer is exactly the pre-fault one, and every engine's KV is freed afterwards."""
    url = cluster.base_url
    _idle(url)
    before = scrape(url)
    pause_s = KV_LEASE_S + 4
    with (
        concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as ex,
        paused(engine_processes(cluster.cfg.app_name, "decode"), pause_s) as pause,
    ):
        futures = [ex.submit(chat, url, p) for p in PROMPTS]
        # the prefills finish on the running prefill engine; their decodes wait for the stopped engines
        wait_for(
            lambda: (
                metric_sum(scrape(url), "pdserve_prefill_seconds_count")
                - metric_sum(before, "pdserve_prefill_seconds_count")
                == len(PROMPTS)
            ),
            timeout_s=pause_s - 2,
        )
        prefilled_at = time.monotonic()
        assert pause.resumed.wait(pause_s + 5)
        assert time.monotonic() - prefilled_at > KV_LEASE_S - 2  # (pause_s - 2 s of prefill, at most)
        replies = [f.result(timeout=CLIENT_TIMEOUT_S) for f in futures]
    for p, reply in zip(PROMPTS, replies):
        assert (reply.status, reply.text, reply.finish_reasons) == (200, answers[p][0], [answers[p][1]]), (p, reply)

    def leases_expired():
        s = scrape(url)
        return metric_sum(s, "pdserve_kv_handoff_failures_total", pool="prefill") - metric_sum(
            before, "pdserve_kv_handoff_failures_total", pool="prefill"
        )

    assert wait_for(leases_expired, timeout_s=KV_LEASE_S + 10) >= len(PROMPTS)
    after = settled_scrape(url)
    assert metric_sum(after, "pdserve_engine_kv_usage_ratio") == 0


def test_losing_the_prefill_replica(cluster, answers):
    """SIGKILL of the only prefill replica's engine between prefill and decode (the decode engines are
    stopped meanwhile, so they read the KV after the kill): the reads fail and the decode engines
    recompute the prompts, answering exactly as before. Later requests are prefilled on their decode
    replicas (none refused) until Serve has replaced the replica (bounded wait); then prompts are
    prefilled remotely again."""
    url = cluster.base_url
    _idle(url)
    before = scrape(url)
    with (
        concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as ex,
        paused(engine_processes(cluster.cfg.app_name, "decode"), 30.0) as pause,
    ):
        futures = [ex.submit(chat, url, p) for p in PROMPTS]
        wait_for(
            lambda: (
                metric_sum(scrape(url), "pdserve_prefill_seconds_count")
                - metric_sum(before, "pdserve_prefill_seconds_count")
                == len(PROMPTS)
            ),
            timeout_s=20,
        )
        kill(engine_processes(cluster.cfg.app_name, "prefill"))
        pause.resume()
        replies = [f.result(timeout=CLIENT_TIMEOUT_S) for f in futures]
    for p, reply in zip(PROMPTS, replies):
        assert (reply.status, reply.text, reply.finish_reasons) == (200, answers[p][0], [answers[p][1]]), (p, reply)
    wait_for(
        lambda: (
            metric_sum(scrape(url), "pdserve_kv_handoff_failures_total", pool="decode")
            > metric_sum(before, "pdserve_kv_handoff_failures_total", pool="decode")
        ),
        timeout_s=10,
    )

    before = scrape(url)
    for p in PROMPTS + PROMPTS:
        reply = chat(url, p)
        assert (reply.status, reply.text, reply.finish_reasons) == (200, answers[p][0], [answers[p][1]]), (p, reply)
    s = scrape(url)
    assert metric_sum(s, "pdserve_routing_decisions_total", prefill="local") - metric_sum(
        before, "pdserve_routing_decisions_total", prefill="local"
    ) >= len(PROMPTS)

    wait_for(lambda: health(url)["pools"]["prefill"]["healthy"] == 0, timeout_s=30, interval_s=0.5)
    wait_for(lambda: health(url)["status"] == "ok", timeout_s=150, interval_s=2.0)
    before = scrape(url)
    reply = chat(url, PROMPTS[0])
    assert (reply.status, reply.text) == (200, answers[PROMPTS[0]][0]), reply
    after = scrape(url)
    assert metric_sum(after, "pdserve_prefill_seconds_count") - metric_sum(before, "pdserve_prefill_seconds_count") == 1


def test_losing_one_of_two_decode_replicas(cluster, answers):
    """Runs last. SIGKILL of one decode replica's engine while streams run on both replicas and new
    requests keep arriving: its streams continue on the survivor (migrated: the prompt plus the tokens
    already sent, prefilled there) and finish, no request is refused or fails (a decode that fails
    before its first token is retried on the survivor), the router stops using the dead replica within
    STOP_ROUTING_S, the prefix index drops it, and Serve's replacement takes requests again."""
    url = cluster.base_url
    _idle(url)
    replicas = replica_processes(cluster.cfg.app_name, "decode")
    assert len(replicas) == 2, replicas
    victim = engine_processes_of(replicas[0])
    assert victim
    endpoints_before = set(health(url)["pools"]["decode"]["endpoints"])
    assert len(endpoints_before) == 2

    started = [threading.Event() for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(len(started) + 1) as ex:
        streams = [
            ex.submit(
                stream,
                url,
                f"Story {i}. {STORY}",
                on_first_content=e.set,
                timeout_s=STREAM_TIMEOUT_S,
                max_tokens=STREAM_TOKENS,
                ignore_eos=True,
            )
            for i, e in enumerate(started)
        ]
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        assert all(e.wait(max(0.0, deadline - time.monotonic())) for e in started), "streams did not start"
        # both replicas are generating (least-loaded placement spreads the streams)
        wait_for(
            lambda: (
                sum(v > 0 for v in per_endpoint(scrape(url), "pdserve_engine_kv_usage_ratio", pool="decode").values())
                == 2
            ),
            timeout_s=10,
            interval_s=0.2,
        )
        before = scrape(url)
        indexed = {e for e, n in per_endpoint(before, "pdserve_prefix_index_blocks").items() if n > 0}
        assert endpoints_before <= indexed, (indexed, endpoints_before)

        # requests keep coming while the replica dies: (sent at, prompt, reply)
        stop = threading.Event()

        def send_new() -> list:
            out = []
            while not stop.is_set() and len(out) < 40:
                p = PROMPTS[len(out) % len(PROMPTS)]
                out.append((time.monotonic(), p, chat(url, p)))
            return out

        new = ex.submit(send_new)
        time.sleep(1.0)
        killed_at = time.monotonic()
        kill(victim)

        # the router stops using it: /health shows it unhealthy within STOP_ROUTING_S
        dead = wait_for(lambda: health(url)["pools"]["decode"]["unhealthy"], timeout_s=STOP_ROUTING_S, interval_s=0.1)
        assert len(dead) == 1 and dead[0] in endpoints_before, dead
        (dead,) = dead
        stopped_routing_s = time.monotonic() - killed_at
        replies = [f.result(timeout=STREAM_TIMEOUT_S + 30) for f in streams]
        streamed_s = time.monotonic() - killed_at
        stop.set()
        new_replies = new.result(timeout=CLIENT_TIMEOUT_S + 30)
    assert stopped_routing_s < STOP_ROUTING_S

    # streams: every one finishes; the dead replica's were migrated to the survivor mid-stream
    for r in replies:
        assert (r.status, r.timed_out, r.done, r.finish_reasons, r.errors) == (200, False, True, ["length"], []), (
            r,
            streamed_s,
        )
    # requests sent around the kill: every one answered, exactly as before the fault
    assert len([t for t, _, _ in new_replies if t > killed_at]) >= 3, new_replies
    for _, p, reply in new_replies:
        assert (reply.status, reply.text, reply.finish_reasons) == (200, answers[p][0], [answers[p][1]]), (p, reply)

    # once marked unhealthy, nothing more is sent to it: no further decode retries
    s0 = scrape(url)
    for p in PROMPTS:
        reply = chat(url, p)
        assert (reply.status, reply.text) == (200, answers[p][0]), reply
    s1 = scrape(url)
    assert metric_sum(s1, "pdserve_prefill_fallbacks_total", reason="decode_retry") == metric_sum(
        s0, "pdserve_prefill_fallbacks_total", reason="decode_retry"
    )
    migrated = metric_sum(s1, "pdserve_prefill_fallbacks_total", reason="decode_migration") - metric_sum(
        before, "pdserve_prefill_fallbacks_total", reason="decode_migration"
    )
    assert migrated >= 1  # the dead replica held streams (both replicas were generating)
    assert (
        sum(
            metric_sum(s1, "pdserve_request_aborts_total", reason=c)
            - metric_sum(before, "pdserve_request_aborts_total", reason=c)
            for c in DECODE_ERROR_CODES
        )
        == 0
    )
    # the prefix index forgot the dead replica and kept the survivor's blocks
    blocks = per_endpoint(s1, "pdserve_prefix_index_blocks")
    assert dead not in blocks and blocks.get((endpoints_before - {dead}).pop(), 0) > 0, blocks

    # Serve replaces the replica (its health check fails): a bounded wait, then the new one serves
    wait_for(lambda: health(url)["pools"]["decode"]["healthy"] == 2, timeout_s=150, interval_s=2.0)
    (fresh,) = set(health(url)["pools"]["decode"]["endpoints"]) - endpoints_before
    before = scrape(url)
    with concurrent.futures.ThreadPoolExecutor(6) as ex:  # new prompts, concurrent: placement spreads them
        replies = list(
            ex.map(lambda i: chat(url, f"Name an animal that starts with the letter {'ABCDEF'[i]}."), range(6))
        )
    for reply in replies:
        assert reply.status == 200 and reply.text and reply.finish_reasons[0] in ("stop", "length"), reply
    after = settled_scrape(url)

    def generated(samples: dict) -> float:
        return per_endpoint(samples, "pdserve_engine_generation_tokens_total", pool="decode").get(fresh, 0)

    assert generated(after) - generated(before) > 0
    assert metric_sum(after, "pdserve_engine_kv_usage_ratio") == 0
