"""A CPU engine profile of the bundled SmolLM2-135M for when no measured one is at hand (``pdserve
profile`` writes measured ones; the planner prefers them).

Not a roofline: the figures are this project's own engine measurements on one core of a CPU without AMX
(float32), as serve/default.yaml's SLO comment and shared notes record them: a 512-token prefill 2.0 s,
a decode step 111-127 ms at batch 1, and decode throughput 77 -> 854 tokens/s from batch 1 to 32 (step
time x2.9 over 31 more sequences)."""

from __future__ import annotations

from capacity.profile import EngineProfile, ProfileKey

CPU_ESTIMATE = "cpu-estimate"
PREFILL_S_PER_TOKEN = 2.0 / 512
PREFILL_FIXED_S = 0.02
DECODE_STEP_S = 0.111
DECODE_STEP_GROWTH_PER_SEQ = (2.88 - 1) / 31  # step(32) / step(1) = 2.88
LONG_CONTEXT_SLOWDOWN = 0.1  # step time +10 % at 2048 tokens of context (attention over more KV)
KV_BYTES_PER_TOKEN_FP32 = 2 * 30 * 3 * 64 * 4  # layers x KV heads x head dim, float32
KV_CACHE_GIB = 1  # pools' device.kv_cache_space_gib default


def smollm2_cpu_estimate(model_name: str = "smollm2-135m", device_type: str = "cpu-core") -> EngineProfile:
    def step(batch: int, ctx: int) -> float:
        return DECODE_STEP_S * (1 + DECODE_STEP_GROWTH_PER_SEQ * (batch - 1)) * (1 + LONG_CONTEXT_SLOWDOWN * ctx / 2048)

    return EngineProfile(
        key=ProfileKey(model=model_name, device_type=device_type, tp=1, pp=1, dtype="float32"),
        device_kind="cpu",
        source=CPU_ESTIMATE,
        prefill=tuple((t, PREFILL_FIXED_S + PREFILL_S_PER_TOKEN * t) for t in (1, 128, 512, 2048)),
        decode=tuple((b, c, step(b, c)) for b in (1, 8, 32, 64) for c in (128, 2048)),
        handoff=((1 << 20, 0.002), (64 << 20, 0.05)),
        kv_bytes_per_token=KV_BYTES_PER_TOKEN_FP32,
        kv_capacity_tokens=KV_CACHE_GIB * (1 << 30) // KV_BYTES_PER_TOKEN_FP32,
        max_num_seqs=64,
        notes="estimate from recorded one-core measurements (capacity/cpu_estimate.py), not a profile run",
    )
