"""The slab connector through the whole product, in push mode: Ray Serve + a prefill and a decode
vLLM CPU pool with ``kv_handoff: {backend: slab, slab_mode: push}``.

Every request prefills remotely; the orchestrator sends the decode request together with the
prefill, naming the prefill replica's slab agent (advertised in its stats), and the prefill engine
WRITEs the prompt's slabs into the decode engine's reservation. Greedy output must equal one
colocated engine's token for token (float32), which only holds if the KV really arrived: a failed
push would make the decode engine recompute, which is counted and asserted absent.
"""

from __future__ import annotations

import httpx
import pytest

from loadtests.faults.faults import engine_processes, paused
from tests.integration.cluster_utils import (
    ALWAYS_REMOTE_PREFILL,
    cluster_config,
    free_port,
    freed_after_disconnect,
    health,
    metric_sum,
    running_cluster,
    settled_scrape,
    wait_for,
)
from tests.integration.reference_greedy import chat_token_ids, reference_outputs

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
GREEDY_TOKENS = 32
DTYPE = "float32"
PROMPTS = [
    "Write a haiku about the sea.",
    # > 1 slab (128 tokens): the push moves several descriptors
    "Summarise this text: " + " ".join(f"Item {i} is a small red box placed on shelf {i % 7}." for i in range(20)),
]


@pytest.fixture(scope="module")
def chat_ids(tokenizer) -> list[list[int]]:
    return chat_token_ids(tokenizer, PROMPTS)


@pytest.fixture(scope="module")
def reference(model_dir, chat_ids, tmp_path_factory):
    out_path = tmp_path_factory.mktemp("reference") / "greedy.json"
    greedy = reference_outputs(model_dir, chat_ids, GREEDY_TOKENS, DTYPE, out_path)
    return greedy


@pytest.fixture(scope="module")
def cluster(reference):
    cfg = cluster_config(
        free_port(),
        decode_replicas=1,
        dtype=DTYPE,
        kv_handoff={"backend": "slab", "slab_mode": "push"},
        placement=ALWAYS_REMOTE_PREFILL,
    )
    with running_cluster(cfg) as c:
        yield c


def test_push_handoff_greedy_equals_colocated(cluster, chat_ids, reference):
    # the prefill replica's agent reaches the orchestrator with the stats polls /health is built from
    wait_for(lambda: health(cluster.base_url)["status"] == "ok", timeout_s=120)
    before = settled_scrape(cluster.base_url)  # after the start-up warm-up requests
    for ids, ref in zip(chat_ids, reference):
        r = httpx.post(
            f"{cluster.base_url}/v1/completions",
            timeout=120,
            json={"model": MODEL, "prompt": ids, "max_tokens": GREEDY_TOKENS, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref["text"]
    after = settled_scrape(cluster.base_url)

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert delta("pdserve_kv_handoff_requests_total", mode="push") == len(PROMPTS)
    assert delta("pdserve_kv_handoff_requests_total", mode="pull") == 0
    assert delta("pdserve_kv_handoff_transfers_total") == len(PROMPTS)
    assert delta("pdserve_kv_handoff_bytes_total") > 0
    assert delta("pdserve_kv_handoff_failures_total") == 0  # no push fell back to recompute
    assert delta("pdserve_prefill_fallbacks_total") == 0


def test_push_client_disconnect_before_first_token_frees_both_engines(cluster):
    """Push mode: the decode engine holds a reservation for the prompt's KV while the prefill runs. A
    client that leaves before its first token (the prefill engine stopped meanwhile) aborts both: the
    reservation and the prefill are freed, nothing stays running or queued."""
    url = cluster.base_url
    wait_for(lambda: health(url)["status"] == "ok", timeout_s=120)
    before = settled_scrape(url)
    with paused(engine_processes(cluster.cfg.app_name, "prefill"), 4.0) as pause:
        with pytest.raises(httpx.ReadTimeout):  # no first byte: the client gives up and disconnects
            with httpx.stream(
                "POST",
                f"{url}/v1/completions",
                timeout=1.5,
                json={"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 500, "ignore_eos": True, "stream": True},
            ) as r:
                r.read()
        assert not pause.resumed.is_set()
    wait_for(lambda: freed_after_disconnect(url, before), timeout_s=30)
    after = settled_scrape(url)
    assert metric_sum(after, "pdserve_engine_generation_tokens_total", pool="decode") == metric_sum(
        before, "pdserve_engine_generation_tokens_total", pool="decode"
    )
