import asyncio
import socket

import pytest

from kvtransfer.ports import candidate_ranges, ephemeral_range
from workers.config import KvHandoffConfig, PoolConfig
from workers.engine import EngineSpec, cpu_flags, device_env, engine_kwargs
from workers.handoff import NixlHandoff
from workers.kv_params import KvHandoff
from workers.messages import WorkerStats

PARAMS = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[4, 5, 6]],
    "remote_engine_id": "eng",
    "remote_request_id": "r-1",
    "remote_host": "127.0.0.1",
    "remote_port": 5600,
    "tp_size": 1,
    "remote_num_tokens": 300,
    "transfer_mode": "pull",
}


class TestKvHandoff:
    def test_round_trip_keeps_every_key(self):
        h = KvHandoff.from_kv_transfer_params(PARAMS, connector="nixl")
        assert (h.remote_engine_id, h.remote_port, h.num_blocks, h.num_tokens) == ("eng", 5600, 3, 300)
        assert h.to_kv_transfer_params() == PARAMS

    def test_flat_block_list(self):
        assert KvHandoff.from_kv_transfer_params({**PARAMS, "remote_block_ids": [1, 2]}, "nixl").num_blocks == 2

    @pytest.mark.parametrize("bad", [{**PARAMS, "do_remote_prefill": False}, {**PARAMS, "remote_host": None}])
    def test_rejects_incomplete_params(self, bad):
        with pytest.raises(ValueError):
            KvHandoff.from_kv_transfer_params(bad, "nixl")


class TestNixlHandoff:
    def test_engine_side(self):
        h = NixlHandoff(KvHandoffConfig(side_channel_host="127.0.0.1", kv_lease_s=12), "127.0.0.1", 5601)
        env = h.engine_env()
        assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5601" and env["UCX_TLS"] == "tcp,self,sm"
        cfg = h.kv_transfer_config()
        assert cfg["kv_role"] == "kv_both" and cfg["kv_connector_extra_config"] == {"kv_lease_duration": 12}
        assert cfg["kv_connector"] == "QuietNixlConnector"
        assert env["PDSERVE_NIXL_PROGRESS_THREAD"] == "1" and env["PDSERVE_NIXL_PROGRESS_DELAY_US"] == "1000"
        assert env["UCX_USE_MT_MUTEX"] == "y" and env["PDSERVE_KV_CACHE_HUGE_PAGES"] == "1"
        spin = NixlHandoff(KvHandoffConfig(ucx_mt_mutex=False), "127.0.0.1", 5601)
        assert spin.engine_env()["UCX_USE_MT_MUTEX"] == "n"
        assert h.prefill_params()["do_remote_decode"] is True

    def test_progress_thread_option_uses_stock_connector(self):
        h = NixlHandoff(KvHandoffConfig(nixl_progress_delay_us=0), "127.0.0.1", 5602)
        cfg = h.kv_transfer_config()
        assert cfg["kv_connector"] == "NixlConnector" and "kv_connector_module_path" not in cfg

    @pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
    def test_side_channel_port_is_free_and_outside_the_ephemeral_range(self, host):
        """The port vLLM's side-channel listener will bind: free now, and no outgoing connection can
        take it before the engine binds it (kvtransfer/ports.py)."""
        lo, hi = ephemeral_range()
        assert candidate_ranges((lo, hi)), "no room outside the ephemeral range on this host"
        name, port = NixlHandoff(KvHandoffConfig(), host).side_channel
        assert name == host and not lo <= port <= hi
        with socket.socket() as s:
            s.bind((host, port))

    @pytest.mark.parametrize("backend", ["nixl", "slab"])
    def test_kv_load_failures_recompute_on_decode(self, backend):
        """vLLM's default policy ("fail") would finish the request with finish_reason "error"."""
        from vllm.config import KVTransferConfig

        from workers.handoff import make_handoff

        cfg = make_handoff(KvHandoffConfig(backend=backend), "127.0.0.1").kv_transfer_config()
        assert KVTransferConfig(**cfg).kv_load_failure_policy == "recompute"  # the key vLLM reads

    def test_handoff_from_output(self):
        h = NixlHandoff(KvHandoffConfig(), "127.0.0.1", 5603)
        assert h.handoff_from_output(None) is None
        assert h.handoff_from_output(PARAMS).remote_request_id == "r-1"


class TestEngineArgs:
    def test_pool_to_engine_kwargs(self):
        pool = PoolConfig(
            name="decode",
            role="decode",
            device={"kind": "cpu", "cpu_cores": ["1", "0"], "kv_cache_space_gib": 2},
            engine={"block_size": 32, "max_num_seqs": 8, "extra": {"seed": 3}},
        )
        spec = EngineSpec(pool=pool, model_path="/m", served_model_name="m", max_model_len=1024, local_rank=1)
        kw = engine_kwargs(spec, {"kv_connector": "X"})
        assert kw["block_size"] == 32 and kw["max_model_len"] == 1024 and kw["seed"] == 3
        assert kw["kv_transfer_config"] == {"kv_connector": "X"} and "gpu_memory_utilization" not in kw
        assert kw["scheduling_policy"] == "fcfs"  # vLLM's default unless the pool opts in
        prio = pool.model_copy(update={"engine": pool.engine.model_copy(update={"scheduling_policy": "priority"})})
        assert (
            engine_kwargs(EngineSpec(pool=prio, model_path="/m", served_model_name="m", max_model_len=64), None)[
                "scheduling_policy"
            ]
            == "priority"
        )
        assert device_env(pool, local_rank=1) == {
            "VLLM_CPU_OMP_THREADS_BIND": "0",
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "PDSERVE_MQ_BUSY_LOOP_S": "0.0",
            "PDSERVE_MQ_RECHECK_MS": "1",
            "MALLOC_MMAP_MAX_": "0",
            "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
            "VLLM_USE_AOT_COMPILE": "0",
        }
        off = pool.model_copy(update={"device": pool.device.model_copy(update={"malloc_reuse": False})})
        assert "MALLOC_MMAP_MAX_" not in device_env(off)
        eager = pool.model_copy(update={"engine": pool.engine.model_copy(update={"enforce_eager": True})})
        assert "VLLM_USE_AOT_COMPILE" not in device_env(eager)  # nothing compiled, no cache to load
        assert kw["enforce_eager"] is False  # compiled unless a pool opts out

    @pytest.mark.parametrize(
        "dtype, kind, flags, want",
        [
            ("auto", "cpu", {"avx2", "avx512f", "amx_bf16"}, "bfloat16"),
            ("auto", "cpu", {"avx2", "avx512_bf16"}, "bfloat16"),
            ("auto", "cpu", {"avx2", "fma"}, "float32"),  # bf16 would be emulated
            ("auto", "cpu", set(), "float32"),  # flags unknown: the safe choice
            ("auto", "gpu", set(), "auto"),  # vLLM's own auto: the checkpoint's dtype
            ("float16", "cpu", {"amx_bf16"}, "float16"),  # an explicit dtype is kept
        ],
    )
    def test_dtype_auto_follows_the_host(self, dtype, kind, flags, want):
        device = {"kind": kind, "count": 1} if kind == "gpu" else {"kind": "cpu"}
        pool = PoolConfig(name="p", role="prefill", device=device, engine={"dtype": dtype})
        spec = EngineSpec(pool=pool, model_path="/m", served_model_name="m", max_model_len=64)
        assert engine_kwargs(spec, None, frozenset(flags))["dtype"] == want

    def test_cpu_flags_parses_cpuinfo(self, tmp_path):
        info = tmp_path / "cpuinfo"
        info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\n")
        assert cpu_flags(str(info)) == frozenset({"fpu", "avx2", "amx_bf16"})
        assert cpu_flags(str(tmp_path / "missing")) == frozenset()

    def test_gpu_pool(self):
        pool = PoolConfig(name="p", role="prefill", device={"kind": "gpu", "count": 1, "gpu_memory_utilization": 0.5})
        kw = engine_kwargs(EngineSpec(pool=pool, model_path="/m", served_model_name="m", max_model_len=64), None)
        assert kw["gpu_memory_utilization"] == 0.5 and "kv_transfer_config" not in kw
        assert device_env(pool) == {"PDSERVE_MQ_BUSY_LOOP_S": "0.0", "PDSERVE_MQ_RECHECK_MS": "1"}


class FakeAsyncLLM:
    """A fake vLLM AsyncLLM: answers every request with one final output finishing ``reason``."""

    def __init__(self, reason):
        self.reason, self.aborted = reason, []

    async def generate(self, prompt, sampling, request_id, priority=0):
        from types import SimpleNamespace

        out = SimpleNamespace(finish_reason=self.reason, text="", token_ids=[] if self.reason == "error" else [5])
        yield SimpleNamespace(finished=True, num_cached_tokens=0, kv_transfer_params=None, outputs=[out])

    async def abort(self, request_id):
        self.aborted.append(request_id)


@pytest.mark.parametrize("reason, fails", [("length", False), ("error", True), ("abort", True)])
def test_prefill_that_the_engine_did_not_complete_raises(reason, fails):
    """The router then counts a prefill fallback ("error") and the decode engine prefills the prompt."""
    import asyncio

    from workers.engine import EngineWrapper
    from workers.messages import PrefillRequest

    pool = PoolConfig(name="prefill", role="prefill", device={"kind": "cpu", "cpu_cores": "0"})
    w = EngineWrapper(EngineSpec(pool=pool, model_path="/m", served_model_name="m", max_model_len=64), None, "p0")
    w.engine = FakeAsyncLLM(reason)
    run = w.prefill(PrefillRequest("r1", (1, 2, 3)))
    if fails:
        with pytest.raises(RuntimeError, match=f"finished '{reason}'"):
            asyncio.run(run)
    else:
        assert asyncio.run(run).num_prompt_tokens == 3


def test_worker_stats_round_trip():
    s = WorkerStats(endpoint_id="e", pool="p", role="decode", kv_usage=0.25, kv_transfer_durations_s=[0.1])
    assert WorkerStats.from_dict({**s.to_dict(), "unknown": 1}) == s


class TestStatsCollector:
    def test_decode_samples_are_mean_step_times_per_batch_and_context(self):
        from types import SimpleNamespace

        from vllm.v1.metrics.stats import IterationStats, SchedulerStats

        from workers.stats import EngineStatsCollector

        c = EngineStatsCollector()
        # what AsyncLLM hands the factory: the config, whose block count the engine core filled in
        c.factory(SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=100, block_size=128)))
        for usage, itls, ttfts in (
            (0.1, [0.10, 0.10], [0.5]),
            (0.1, [0.14, 0.12], [0.4]),
            (0.5, [0.2, 0.2], [0.3]),
            (0.1, [0.2], []),
            (0.1, [], [0.3]),
        ):
            it = IterationStats()
            it.inter_token_latencies_iter, it.time_to_first_tokens_iter = itls, ttfts
            c.record(SchedulerStats(kv_cache_usage=usage), it)
        s = c.snapshot("e", "decode", "decode", healthy=True, drain=True)
        assert s.kv_capacity_tokens == 12800
        # (batch, context tokens = usage x 12800, mean step seconds); batch 3 at two contexts stays apart
        assert s.decode_samples == [
            (1, 1280, pytest.approx(0.2)),
            (3, 1280, pytest.approx((0.10 + 0.13) / 2)),
            (3, 6400, pytest.approx(0.2)),
        ]
        assert c.snapshot("e", "decode", "decode", healthy=True, drain=True).decode_samples == []

    def test_prefills_that_shared_a_step_make_one_sample(self):
        from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats

        from workers.stats import EngineStatsCollector

        def done(prompt, cached, prefill_s, generated=1):
            return FinishedRequestStats(
                finish_reason=None,
                num_prompt_tokens=prompt,
                num_cached_tokens=cached,
                prefill_time=prefill_s,
                num_generation_tokens=generated,
            )

        c = EngineStatsCollector()
        steps = [
            [done(512, 0, 0.6), done(512, 0, 0.6), done(640, 128, 0.59)],  # three prefilled together
            [done(300, 0, 0.2)],
            [done(256, 0, 0.15, generated=64), done(128, 0, 0.1, generated=9)],  # decoded further
            [done(256, 256, 0.01), done(100, 0, 0.0)],
        ]  # nothing computed
        for finished in steps:
            it = IterationStats()
            it.finished_requests = finished
            c.record(None, it)
        s = c.snapshot("e", "prefill", "prefill", healthy=True, drain=True)
        assert s.prefill_samples == [(1536, 0.6), (300, 0.2), (256, 0.15), (128, 0.1)]

    @pytest.mark.parametrize("policy, budget, want", [("priority", 2048, 2048), ("fcfs", 2048, 0)])
    def test_priority_step_tokens_come_from_the_engines_scheduler(self, policy, budget, want):
        from types import SimpleNamespace

        from workers.stats import EngineStatsCollector

        c = EngineStatsCollector()
        c.factory(SimpleNamespace(scheduler_config=SimpleNamespace(policy=policy, max_num_batched_tokens=budget)))
        assert c.snapshot("e", "prefill", "prefill", healthy=True).priority_step_tokens == want
        assert EngineStatsCollector().snapshot("e", "p", "prefill", healthy=True).priority_step_tokens == 0

    def test_connector_stats_of_both_backends(self):
        from kvtransfer.stats import KVTransferStats
        from workers.stats import EngineStatsCollector

        c = EngineStatsCollector()
        c._record_connector(
            {
                "transfer_duration": [0.01, 0.02],
                "bytes_transferred": [100, 200],
                "num_descriptors": [30, 30],
                "num_failed_transfers": [1],
            }
        )
        slab = KVTransferStats(
            num_handoffs_received=1,
            num_descriptors=4,
            raw_bytes=1000,
            wire_bytes=289,
            handoff_s=[0.05],
            failures={"read_timeout": 2},
        )
        c._record_connector(slab.to_dict())
        s = c.snapshot("e", "decode", "decode", healthy=True, drain=True)
        assert (s.kv_transfers_total, s.kv_transfer_bytes_total, s.kv_transfer_raw_bytes_total) == (3, 589, 1300)
        assert (s.kv_transfer_descriptors_total, s.kv_transfer_failures_total) == (64, 3)
        assert s.kv_transfer_durations_s == pytest.approx([0.01, 0.02, 0.05])


def test_renice_children_raises_niceness_of_spawned_processes():
    import os
    import subprocess
    import sys

    from workers.engine import renice_children

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        target = min(19, os.nice(0) + 2)
        assert renice_children(target) >= 1
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == target
    finally:
        child.kill()
        child.wait()


class TestKvLeasesAtStop:
    """workers/deployment.py: a stopping replica waits for the KV its prefills handed off to be read."""

    def test_waits_until_the_engine_holds_no_kv(self):
        from workers.deployment import wait_kv_released

        usage = iter([0.4, 0.4, 0.1, 0.0])  # a fake engine's kv_usage, one value per poll
        waited = asyncio.run(wait_kv_released(lambda: next(usage), bound_s=5, poll_s=0.01))
        assert waited is not None and 0.02 <= waited < 1

    def test_gives_up_at_the_bound(self):
        from workers.deployment import wait_kv_released

        assert asyncio.run(wait_kv_released(lambda: 0.2, bound_s=0.05, poll_s=0.01)) is None

    def test_nothing_held_returns_at_once(self):
        from workers.deployment import wait_kv_released

        assert asyncio.run(wait_kv_released(lambda: 0.0, bound_s=5)) == pytest.approx(0, abs=0.01)
