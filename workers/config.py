"""Pool configuration: one pool = one Ray Serve deployment of identical vLLM engines.

Only pydantic, the stdlib and the slab connector's settings (kvtransfer/config.py, pydantic too) are
imported here so the schema is usable (and testable) without Ray or vLLM installed.
"""

from __future__ import annotations

import enum
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvtransfer.config import SlabSettings

_CORE_BINDING = re.compile(r"^(auto|nobind|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolRole(str, enum.Enum):  # noqa: UP042 (StrEnum changes str() and format() to the bare value)
    PREFILL = "prefill"
    DECODE = "decode"
    FLEX = "flex"  # each replica serves prefill or decode as the flex controller assigns (serve/flex.py)


class ReplicaRange(_Strict):
    """Replica count of a pool. ``min == max`` is a fixed size; ``min < max`` enables autoscaling."""

    min: int = Field(1, ge=0)
    max: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscaling target per replica")

    @model_validator(mode="after")
    def _min_le_max(self) -> ReplicaRange:
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) > replicas.max ({self.max})")
        return self

    @property
    def fixed(self) -> bool:
        return self.min == self.max


class PoolAutoscaling(_Strict):
    """SLO-driven autoscaling of a pool (serve/planner.py, router/autoscale.py). Off: a ranged pool follows
    Ray Serve's default policy on ``replicas.target_ongoing_requests``."""

    enabled: bool = Field(False, description="the ingress's planner sets the pool's replica target")
    adjustment_interval_s: float = Field(10.0, gt=0, description="seconds between planning decisions")
    predictor: Literal["constant", "ewma", "trend"] = Field(
        "ewma",
        description="forecast of the next interval's load: the last interval's value, its exponential "
        "moving average, or a least-squares trend over the last intervals",
    )
    demand_window_s: float = Field(30.0, gt=0, description="sliding window of the arrival rate and request sizes")
    upscale_delay_s: float = Field(
        0.0, ge=0, description="scale-up stabilization: the lowest recommendation over this window wins"
    )
    downscale_delay_s: float = Field(
        300.0, ge=0, description="scale-down stabilization: the highest recommendation over this window wins"
    )
    max_step: int = Field(1, ge=1, description="most replicas added or removed by one decision")
    cooldown_s: float = Field(30.0, ge=0, description="no change for this long after a change")
    utilization: float = Field(
        0.8, gt=0, le=1, description="prefill: share of a replica's fitted prefill rate the plan may use"
    )
    cold_start_timeout_s: float = Field(
        180.0,
        gt=0,
        description="replicas.min 0: how long a request that needs the empty pool waits for its first replica "
        "(decode pools; an empty prefill pool never holds a request: it prefills on its decode replica) "
        "before a 503 with Retry-After",
    )


class FlexSettings(_Strict):
    """Role flips of a ``role: flex`` pool (router/flex.py decides, serve/flex.py applies): its engines serve
    prefill or decode as assigned, and a replica changes role without an engine restart."""

    initial_prefill: int = Field(1, ge=0, description="replicas that start as prefill (the rest start as decode)")
    min_prefill: int = Field(0, ge=0, description="never fewer prefill replicas (0: decode replicas prefill locally)")
    min_decode: int = Field(1, ge=1, description="never fewer decode replicas")
    interval_s: float = Field(10.0, gt=0, description="seconds between the controller's decisions")
    demand_window_s: float = Field(30.0, gt=0, description="sliding window of the measured prefill and decode demand")
    dwell_s: float = Field(60.0, ge=0, description="no flip for this long after a flip was applied")
    hysteresis: float = Field(
        0.25,
        ge=0,
        description="replicas beyond the half-replica rounding band the desired prefill count must move before a flip",
    )
    confirm_intervals: int = Field(
        2, ge=1, description="consecutive decisions that must want the same flip before it starts"
    )
    min_load: float = Field(
        0.05, ge=0, description="below this many replicas' worth of demand the split is held (idle: no signal)"
    )
    drain_timeout_s: float = Field(
        30.0,
        gt=0,
        description="longest wait for a flipping replica's in-flight work of its old role; then it switches "
        "anyway (the engine serves both roles, so late work still completes)",
    )


def binding_cores(binding: str) -> set[int] | None:
    """The cores a CPU binding names: ``"0"``, ``"0-3"``, ``"0,2-3"`` -> core ids; None for bindings that name
    no cores (``auto``, ``nobind``, ``all``)."""
    if binding in ("auto", "nobind", "all"):
        return None
    cores: set[int] = set()
    for part in binding.split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


class CpuDevice(_Strict):
    """A CPU engine. ``cpu_cores`` pins the engine's OpenMP threads (vLLM
    ``VLLM_CPU_OMP_THREADS_BIND``: ``"0"``, ``"0-3"``, ``"auto"``); two engines on the same cores
    fight each other, so give each pool its own cores."""

    kind: Literal["cpu"] = "cpu"
    cpu_cores: str | list[str] = Field(
        "auto",
        description="one binding for every replica, or one per "
        "replica (by its local rank on the node, wrapping around)",
    )
    num_cpus: float = Field(1.0, gt=0, description="Ray logical CPUs reserved per replica")
    kv_cache_space_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE (GiB) per engine")
    malloc_reuse: bool = Field(
        True,
        description="engine processes keep freed memory for reuse (glibc, "
        "workers/engine_env.py MALLOC_REUSE_ENV): the slab codecs' large temporaries then "
        "skip page faults (int8/int4 pack ~3x faster on a 2-core CPU VM, "
        "loadtests/kv/kv_codec_microbench.py); the engine itself measured the same either way",
    )

    @field_validator("cpu_cores")
    @classmethod
    def _valid_binding(cls, v: str | list[str]) -> str | list[str]:
        for b in [v] if isinstance(v, str) else v:
            if not _CORE_BINDING.match(b):
                raise ValueError(f"invalid core binding {b!r}: use 'auto', 'nobind', '0', '0-3' or '0,2'")
        if isinstance(v, list) and not v:
            raise ValueError("cpu_cores list is empty")
        return v

    def cores_for_rank(self, local_rank: int) -> str:
        return self.cpu_cores if isinstance(self.cpu_cores, str) else self.cpu_cores[local_rank % len(self.cpu_cores)]


class GpuDevice(_Strict):
    """A CUDA engine: ``count`` GPUs per replica (= tensor x pipeline parallel size), optionally of
    one Ray accelerator type (``A100``, ``H100``, ``L4`` ...)."""

    kind: Literal["gpu"] = "gpu"
    gpu_type: str | None = None
    count: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)


class EngineConfig(_Strict):
    """The vLLM engine arguments we manage; anything else goes through ``extra`` verbatim."""

    block_size: int = Field(128, ge=1)
    max_model_len: int | None = Field(None, ge=16)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    enable_prefix_caching: bool = True
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs",
        description="fcfs: arrival order (vLLM's "
        "default); priority: the engine serves requests of "
        "higher QoS tiers first (vLLM priority scheduling, fed "
        "the tier's priority; no gain measured on the CPU box, "
        "loadtests/results/README.md)",
    )
    dtype: str = Field(
        "auto",
        description="engine dtype; 'auto' = bfloat16 on GPUs and on CPUs with native "
        "bf16 matmuls (avx512_bf16 or AMX), float32 on other CPUs, which emulate bf16 "
        "(workers/engine.py:resolve_dtype); or any vLLM dtype",
    )
    enforce_eager: bool = Field(
        False,
        description="false: vLLM compiles the model (torch.compile; CPU prefill and "
        "decode ~1.2-1.4x faster than eager, first start compiles, later starts load the "
        "compile cache); true: eager (faster start, slower steps)",
    )
    mq_busy_loop_s: float = Field(
        0.0,
        ge=0,
        description="seconds vLLM's engine-core/worker shared-memory "
        "queue readers spin before sleeping (vLLM: 1.0; spinning steals a core "
        "from the other engine on small CPU boxes)",
    )
    mq_recheck_ms: int = Field(
        1,
        ge=1,
        description="longest sleep of those readers before re-checking the "
        "queue (vLLM: 5000): bounds the stall when a best-effort wake-up is dropped, "
        "which happens on most steps (1-core decode step at batch 1: 33 ms at 1 ms, 43 ms "
        "at 10 ms)",
    )
    cpu_niceness: int | None = Field(
        None,
        ge=-20,
        le=19,
        description="renice the engine's processes (vLLM's engine core and workers) to this after start; "
        "Ray workers, the serving stack among them, run at 15. null = leave as started. Off by default: at "
        "19 it made no measured difference on the 2-core box, neither for all engines nor for the prefill "
        "engine alone (loadtests/results/README.md: 20261122-071253, 20261130-173402-prefill-nice)",
    )
    kv_events: bool = Field(
        True,
        description="publish KV cache events (blocks stored/removed, vLLM "
        "kv_events_config over ZMQ on a free port) so routers index this engine's prefix "
        "cache exactly; off: routers rely on their own record of what they routed",
    )
    extra: dict[str, Any] = Field(default_factory=dict, description="passed to vLLM AsyncEngineArgs")

    @field_validator("extra")
    @classmethod
    def _no_managed_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        managed = {
            "model",
            "kv_transfer_config",
            "kv_events_config",
            "block_size",
            "max_model_len",
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "max_num_seqs",
            "scheduling_policy",
        }
        clash = sorted(managed & set(v))
        if clash:
            raise ValueError(f"engine.extra must not set managed keys {clash}; use the engine fields")
        return v


class PoolConfig(_Strict):
    name: str = Field(..., pattern=r"^[a-z][a-z0-9-]{0,30}$")
    role: PoolRole
    replicas: ReplicaRange = Field(default_factory=ReplicaRange)
    device: CpuDevice | GpuDevice = Field(default_factory=CpuDevice, discriminator="kind")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    max_ongoing_requests: int = Field(64, ge=1, description="Ray Serve per-replica concurrency cap")
    autoscaling: PoolAutoscaling = Field(default_factory=PoolAutoscaling)
    flex: FlexSettings | None = Field(None, description="role: flex pools only (their defaults when left out)")

    @field_validator("replicas", mode="before")
    @classmethod
    def _int_replicas(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return {"min": v, "max": v}
        return v

    @model_validator(mode="after")
    def _autoscaling_needs_a_range(self) -> PoolConfig:
        if self.autoscaling.enabled and self.replicas.fixed:
            raise ValueError(f"pool {self.name!r}: autoscaling.enabled needs replicas {{min < max}}")
        return self

    @property
    def scales_from_zero(self) -> bool:
        """An autoscaled pool that may have no replica: a request that needs it wakes it (serve/cold_start.py)."""
        return self.autoscaling.enabled and self.replicas.min == 0

    @model_validator(mode="before")
    @classmethod
    def _flex_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("role") in (PoolRole.FLEX, PoolRole.FLEX.value) and not data.get("flex"):
            return {**data, "flex": {}}
        return data

    @model_validator(mode="after")
    def _flex_split_fits(self) -> PoolConfig:
        if self.role is not PoolRole.FLEX:
            if self.flex is not None:
                raise ValueError(f"pool {self.name!r}: flex settings need role: flex")
            return self
        f, n = self.flex, self.replicas.min
        if self.autoscaling.enabled:
            raise ValueError(f"pool {self.name!r}: a flex pool's size is fixed (autoscaling.enabled is not supported)")
        if f.min_prefill > f.initial_prefill:
            raise ValueError(f"pool {self.name!r}: flex.min_prefill ({f.min_prefill}) > initial_prefill")
        if f.initial_prefill + f.min_decode > n:
            raise ValueError(
                f"pool {self.name!r}: flex.initial_prefill + flex.min_decode ({f.initial_prefill + f.min_decode}) "
                f"exceeds replicas.min ({n})"
            )
        return self

    @model_validator(mode="after")
    def _gpu_count_matches_parallelism(self) -> PoolConfig:
        if isinstance(self.device, GpuDevice):
            need = self.engine.tensor_parallel_size * self.engine.pipeline_parallel_size
            if self.device.count != need:
                raise ValueError(
                    f"pool {self.name!r}: device.count ({self.device.count}) must equal "
                    f"tensor_parallel_size x pipeline_parallel_size ({need})"
                )
        return self


class KvHandoffConfig(_Strict):
    """How KV moves from prefill to decode engines (see workers/handoff.py)."""

    backend: Literal["nixl", "slab"] = Field(
        "nixl",
        description="'nixl': vLLM's NixlConnector (UCX); 'slab': "
        "our SlabKVConnector (kvtransfer/, slabs over NIXL, int8/int4)",
    )
    ucx_tls: str = Field("tcp,self,sm", description="UCX transports; e.g. 'rc,cuda_ipc,cuda_copy,tcp' on GPU")
    side_channel_host: str = Field(
        "auto", description="address peers use to reach an engine; 'auto' = this Ray node's IP"
    )
    kv_buffer_device: Literal["cpu", "cuda"] = "cpu"
    kv_lease_s: int = Field(30, ge=6, description="prefill frees KV no decode has read after this long (both backends)")
    nixl_progress_thread: bool = Field(
        True,
        description="NIXL's UCX progress thread; off, transfers over TCP "
        "progress only when an engine steps (slow handoffs)",
    )
    nixl_progress_delay_us: int = Field(
        1000,
        ge=0,
        description="progress thread poll timeout (both backends); 0 = NIXL's stock busy spin (a core per engine)",
    )
    kv_cache_huge_pages: bool = Field(
        True,
        description="nixl backend, CPU engines: move the paged KV caches "
        "onto transparent huge pages before NIXL registers them (same-host READs "
        "copy ~2.7x faster from them)",
    )
    ucx_mt_mutex: bool = Field(
        True,
        description="UCX_USE_MT_MUTEX: UCX locks its workers with a mutex, not a "
        "spinlock, so NIXL's progress thread sleeps instead of spinning on the engine's "
        "core while the engine READs (same-host READs measured 2x faster on a 2-core VM, loadtests/results/"
        "README.md); false = UCX default",
    )
    slab_mode: Literal["pull", "push"] = Field(
        "pull",
        description="slab backend: 'pull' = the decode engine "
        "READs after the prefill answered; 'push' = the decode request "
        "goes out with the prefill, reserves a buffer, and the prefill "
        "WRITEs into it (no round trip through the router between them)",
    )
    slab: SlabSettings = Field(
        default_factory=SlabSettings,
        description="slab backend: the connector's own "
        "options (compression, slab_tokens, timeouts, pool), passed to it unchanged",
    )
