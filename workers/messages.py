"""Typed messages between the orchestrator (serve/) and engine workers. Pure: stdlib only.

They cross process boundaries through Ray, so they hold plain data only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.kv_params import KvHandoff


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """The sampling parameters we accept from the OpenAI API (validated at ingress)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class PrefillRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    cache_salt: str | None = None
    push_rendezvous: str | None = None  # slab push mode: the decode request reserving for this prefill
    priority: int = 0  # vLLM semantics: lower is served first (= -QoS tier priority)

    def __repr__(self) -> str:
        return f"PrefillRequest(id={self.request_id}, prompt_tokens={len(self.prompt_token_ids)})"


@dataclass(frozen=True, slots=True)
class PrefillResult:
    request_id: str
    endpoint_id: str
    handoff: KvHandoff | None  # None: nothing to hand off (the decode side prefills)
    num_prompt_tokens: int
    num_cached_tokens: int  # prefix-cache hit on the prefill engine
    prefill_s: float


@dataclass(frozen=True, slots=True)
class DecodeRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    handoff: KvHandoff | None = None  # None => prefill locally on the decode engine
    cache_salt: str | None = None
    priority: int = 0  # vLLM semantics: lower is served first (= -QoS tier priority)

    def __repr__(self) -> str:
        return (
            f"DecodeRequest(id={self.request_id}, prompt_tokens={len(self.prompt_token_ids)}, "
            f"remote_kv={self.handoff is not None})"
        )


# vLLM finish reasons of a request that completed. The others end it in failure ("error": a request-level
# engine error; "abort": the engine dropped it) or come from options pdserve never sets ("repetition":
# sampling's repetition_detection); none is shown to a client as a finish_reason.
COMPLETE_FINISH_REASONS = frozenset({"stop", "length"})


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """A delta of generated output. The first chunk carries ``num_cached_tokens``; the last one a
    ``finish_reason`` (vLLM's: "stop" and "length" complete the request, see ``COMPLETE_FINISH_REASONS``)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    num_cached_tokens: int | None = None
    endpoint_id: str = ""


@dataclass(slots=True)
class WorkerStats:
    """Load and KV state of one engine replica, published to routers; cumulative counters since start."""

    endpoint_id: str
    pool: str
    role: str
    healthy: bool = True
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    kv_capacity_tokens: int = 0  # the engine's KV cache size in tokens (blocks x block size)
    # 0: the engine schedules in arrival order; else it serves lower vLLM priority values first, after
    # at most this many tokens of lower-priority work already in its running batch (its step budget)
    priority_step_tokens: int = 0
    prompt_tokens_total: int = 0
    prompt_tokens_computed: int = 0
    prompt_tokens_local_cache_hit: int = 0
    prompt_tokens_external_kv: int = 0
    generation_tokens_total: int = 0
    kv_transfers_total: int = 0
    kv_transfer_bytes_total: int = 0  # on the wire (after compression)
    kv_transfer_raw_bytes_total: int = 0  # the same KV before compression
    kv_transfer_seconds_total: float = 0.0
    kv_transfer_descriptors_total: int = 0
    kv_transfer_failures_total: int = 0
    kv_transfer_durations_s: list[float] = field(default_factory=list)  # since last drain
    # cost-model calibration samples since last drain (finished requests, engine-measured):
    prefill_samples: list[tuple[int, float]] = field(default_factory=list)  # (uncached tokens, prefill s)
    decode_samples: list[tuple[int, int, float]] = field(default_factory=list)  # (batch, context tok, step s)
    kv_events_endpoint: str = ""  # ZMQ address of the engine's KV cache event publisher ("" = none)
    kv_agent: list = field(default_factory=list)  # slab backend: [agent name, host, port] (push mode target)
    updated_s: float = 0.0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict) -> WorkerStats:
        return cls(**{k: v for k, v in d.items() if k in cls.__slots__})
