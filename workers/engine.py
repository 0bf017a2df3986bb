"""EngineWrapper: one vLLM ``AsyncLLM`` built from a PoolConfig, with prefill/decode helpers.

This is the only module (with workers/stats.py) that imports vLLM's engine API. It runs inside a
Ray Serve replica but knows nothing about Ray.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from workers.config import CpuDevice, GpuDevice, PoolConfig
from workers.engine_env import MALLOC_REUSE_ENV, MQ_BUSY_LOOP_ENV, MQ_RECHECK_ENV
from workers.handoff import HandoffBackend, free_port
from workers.messages import (
    COMPLETE_FINISH_REASONS,
    DecodeRequest,
    PrefillRequest,
    PrefillResult,
    SamplingSpec,
    TokenChunk,
    WorkerStats,
)
from workers.stats import EngineStatsCollector

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineSpec:
    pool: PoolConfig
    model_path: str
    served_model_name: str
    max_model_len: int
    local_rank: int = 0
    kv_events_endpoint: str = ""  # where the engine's KV-event PUB socket binds ("" = off)
    kv_events_address: str = ""  # where subscribers connect to it


KV_EVENTS_TOPIC = "kv"


def kv_events_endpoints(host: str) -> tuple[str, str]:
    """(bind, connect) addresses of an engine's KV-event publisher. vLLM binds only wildcard and
    ipc endpoints (others it connects to), so: on a loopback host a private ipc socket (nothing on
    the network), else ``tcp://*:PORT`` on a free port, reached at ``tcp://HOST:PORT``."""
    if host in ("127.0.0.1", "localhost", "::1"):
        path = os.path.join(tempfile.gettempdir(), f"pdserve-kv-events-{uuid.uuid4().hex[:12]}.sock")
        return f"ipc://{path}", f"ipc://{path}"
    port = free_port("")
    return f"tcp://*:{port}", f"tcp://{host}:{port}"


def kv_events_config(endpoint: str) -> dict[str, Any]:
    """vLLM ``kv_events_config``: publish block stored/removed events over ZMQ PUB at ``endpoint``."""
    return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "topic": KV_EVENTS_TOPIC}


# CPU flags with which a CPU runs bf16 matmuls natively; without them torch emulates bf16 and float32
# is faster (prefill 2.8x on an AVX2-only host; with AMX bf16 prefill is 3.7x float32's speed).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

# vLLM 0.32 with torch 2.13 saves its CPU compile cache as a "mega" AOT artifact that it then cannot
# load ("'function' object has no attribute 'finalize_loading'"), so every start recompiles (~60 s a
# engine). Its non-AOT path (Inductor's cache) loads: a warm start's engine init takes ~14 s.
CPU_COMPILE_CACHE_ENV = {"VLLM_USE_AOT_COMPILE": "0"}


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of this host (empty where /proc/cpuinfo is unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_dtype(dtype: str, device: CpuDevice | GpuDevice, flags: frozenset[str]) -> str:
    """The dtype an engine runs: ``auto`` on a CPU is bfloat16 when ``flags`` show native bf16
    matmuls, else float32; on a GPU vLLM's own ``auto`` (the checkpoint's dtype). Others as given."""
    if dtype != "auto" or isinstance(device, GpuDevice):
        return dtype
    return "bfloat16" if flags & NATIVE_BF16_CPU_FLAGS else "float32"


def device_env(pool: PoolConfig, local_rank: int = 0) -> dict[str, str]:
    """Process environment of the engine (CPU pinning / KV space / compile cache, queue spinning)."""
    env = {MQ_BUSY_LOOP_ENV: str(pool.engine.mq_busy_loop_s), MQ_RECHECK_ENV: str(pool.engine.mq_recheck_ms)}
    if isinstance(pool.device, CpuDevice):
        env.update(
            {
                "VLLM_CPU_OMP_THREADS_BIND": pool.device.cores_for_rank(local_rank),
                "VLLM_CPU_KVCACHE_SPACE": str(pool.device.kv_cache_space_gib),
            }
        )
        if not pool.engine.enforce_eager:
            env.update(CPU_COMPILE_CACHE_ENV)
        if pool.device.malloc_reuse:
            env.update(MALLOC_REUSE_ENV)
    return env


def engine_kwargs(
    spec: EngineSpec, kv_transfer_config: dict[str, Any] | None, flags: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Keyword arguments of ``AsyncEngineArgs`` (pure; unit-tested); ``flags``: the host's CPU flags."""
    e = spec.pool.engine
    kwargs: dict[str, Any] = dict(
        model=spec.model_path,
        served_model_name=spec.served_model_name,
        tokenizer=spec.model_path,
        max_model_len=e.max_model_len or spec.max_model_len,
        block_size=e.block_size,
        max_num_seqs=e.max_num_seqs,
        tensor_parallel_size=e.tensor_parallel_size,
        pipeline_parallel_size=e.pipeline_parallel_size,
        enable_prefix_caching=e.enable_prefix_caching,
        scheduling_policy=e.scheduling_policy,
        dtype=resolve_dtype(e.dtype, spec.pool.device, flags),
        enforce_eager=e.enforce_eager,
        disable_log_stats=False,
    )
    if e.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = e.max_num_batched_tokens
    if isinstance(spec.pool.device, GpuDevice):
        kwargs["gpu_memory_utilization"] = spec.pool.device.gpu_memory_utilization
    if kv_transfer_config:
        kwargs["kv_transfer_config"] = kv_transfer_config
    if spec.kv_events_endpoint and e.enable_prefix_caching:
        kwargs["kv_events_config"] = kv_events_config(spec.kv_events_endpoint)
    kwargs.update(e.extra)
    return kwargs


def renice_children(niceness: int) -> int:
    """Set the niceness of every process this one spawned (vLLM's engine core and workers); returns how
    many. Raising niceness needs no privilege; a failure is logged, never fatal."""
    import psutil

    n = 0
    for child in psutil.Process().children(recursive=True):
        try:
            child.nice(niceness)
            n += 1
        except (psutil.Error, OSError) as e:
            logger.warning("cannot renice engine process %s: %r", child.pid, e)
    return n


def to_sampling_params(s: SamplingSpec, extra_args: dict[str, Any] | None = None):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed,
        stop=list(s.stop) or None,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        ignore_eos=s.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra_args,
    )


class EngineWrapper:
    """Owns one AsyncLLM. Requests are aborted in the engine when their caller goes away."""

    def __init__(self, spec: EngineSpec, handoff: HandoffBackend | None, endpoint_id: str) -> None:
        self.spec = spec
        self.handoff = handoff
        self.endpoint_id = endpoint_id
        self.collector = EngineStatsCollector()
        self.engine = None
        self.load_s = 0.0

    def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        env = device_env(self.spec.pool, self.spec.local_rank)
        if self.handoff is not None:
            env.update(self.handoff.engine_env())
        os.environ.update(env)  # inherited by the engine-core process vLLM spawns
        kv_cfg = self.handoff.kv_transfer_config() if self.handoff else None
        args = AsyncEngineArgs(**engine_kwargs(self.spec, kv_cfg, cpu_flags()))
        t0 = time.monotonic()
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=[self.collector.factory])
        self.load_s = time.monotonic() - t0
        if self.spec.pool.engine.cpu_niceness is not None:
            renice_children(self.spec.pool.engine.cpu_niceness)
        logger.info("engine for pool %s up in %.1fs (%s)", self.spec.pool.name, self.load_s, self.endpoint_id)

    @property
    def healthy(self) -> bool:
        return self.engine is not None and not self.engine.errored

    async def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("engine not started")
        await self.engine.check_health()

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        """Prefill only: compute the prompt's KV, keep it for the decode side, return the handoff."""
        params = self.handoff.prefill_params(req.push_rendezvous) if self.handoff else None
        sampling = to_sampling_params(
            SamplingSpec(max_tokens=1, temperature=0.0), extra_args={"kv_transfer_params": params} if params else None
        )
        t0 = time.monotonic()
        final = None
        cached = 0
        async for out in self._generate(req.request_id, req.prompt_token_ids, sampling, req.cache_salt, req.priority):
            cached = out.num_cached_tokens or cached
            final = out
        if final is None:
            raise RuntimeError(f"prefill of {req.request_id} produced no output")
        if final.outputs[0].finish_reason not in COMPLETE_FINISH_REASONS:  # its KV is not there to hand off
            raise RuntimeError(f"prefill of {req.request_id} finished {final.outputs[0].finish_reason!r}")
        handoff = self.handoff.handoff_from_output(final.kv_transfer_params) if self.handoff else None
        return PrefillResult(
            request_id=req.request_id,
            endpoint_id=self.endpoint_id,
            handoff=handoff,
            num_prompt_tokens=len(req.prompt_token_ids),
            num_cached_tokens=cached,
            prefill_s=time.monotonic() - t0,
        )

    async def generate(self, req: DecodeRequest) -> AsyncIterator[TokenChunk]:
        """Decode (after a remote prefill when ``req.handoff`` is set), streaming deltas."""
        extra = {"kv_transfer_params": req.handoff.to_kv_transfer_params()} if req.handoff else None
        sampling = to_sampling_params(req.sampling, extra_args=extra)
        first = True
        async for out in self._generate(req.request_id, req.prompt_token_ids, sampling, req.cache_salt, req.priority):
            c = out.outputs[0]
            yield TokenChunk(
                text=c.text,
                token_ids=tuple(c.token_ids),
                finish_reason=c.finish_reason,
                num_cached_tokens=out.num_cached_tokens if first else None,
                endpoint_id=self.endpoint_id,
            )
            first = False

    async def _generate(self, request_id: str, prompt_token_ids, sampling, cache_salt, priority: int = 0):
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=list(prompt_token_ids))
        if cache_salt:
            prompt["cache_salt"] = cache_salt
        finished = False
        try:
            # vLLM refuses a priority on an arrival-order engine
            prio = priority if self.spec.pool.engine.scheduling_policy == "priority" else 0
            async for out in self.engine.generate(prompt, sampling, request_id, priority=prio):
                finished = out.finished
                yield out
        finally:
            if not finished:  # caller went away or errored: free the engine's blocks now
                await self.engine.abort(request_id)

    def stats(self, drain: bool = False) -> WorkerStats:
        s = self.collector.snapshot(
            self.endpoint_id, self.spec.pool.name, self.spec.pool.role.value, healthy=self.healthy, drain=drain
        )
        if self.spec.pool.engine.enable_prefix_caching:
            s.kv_events_endpoint = self.spec.kv_events_address
        if self.handoff is not None:
            s.kv_agent = self.handoff.kv_agent()
        return s

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
