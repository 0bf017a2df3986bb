"""``pdserve profile``: measure each pool's engine where it runs and write capacity/profile.py profiles.

Pools whose engines share a profile key (model, device type, TP/PP, dtype) are one engine type and get
one profile. Per key, the engines of its pools start with their own settings (core pinning, dtype,
block size, KV cache space, compile/eager, the cluster's KV handoff backend) through ``EngineWrapper``,
as a replica would start them, but in this process and without Ray:

- prefill: the prefill-role pool's engine (else the key's first pool) prefills distinct random prompts
  (no prefix-cache hit) of each grid length, ``repeats`` times; the point is the median wall time of
  the prefill call, as the orchestrator sees it;
- handoff: each of those prefills is handed to the decode-role pool's engine (when the key has pools of
  both roles) over the real transport; the point is the median of the connector's per-transfer
  durations (the figure ``pdserve_kv_handoff_duration_seconds`` reports) vs the prompt's KV bytes;
- decode: the decode-role pool's engine (else the key's first pool) runs ``batch`` requests of
  ``context`` prompt tokens at once; the step time is read from the streamed tokens' arrival times
  while every request of the batch is decoding (after the last first token, before the first finish).

The pure helpers (grids, medians, naming, KV arithmetic) are importable without vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from capacity.profile import MEASURED, EngineProfile, ProfileKey
from workers.config import CpuDevice, GpuDevice, KvHandoffConfig, PoolConfig, PoolRole, binding_cores

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "fp8": 1, "float8": 1}


@dataclass(frozen=True)
class ProfileGrid:
    """What to measure: prompt lengths (prefill and handoff), the decode batch x context grid."""

    prefill_tokens: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
    repeats: int = 3
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    decode_contexts: tuple[int, ...] = (128, 512, 1024)
    decode_steps: int = 16  # decode steps measured per grid cell

    def fitted(self, max_model_len: int, max_num_seqs: int, kv_capacity_tokens: int = 0) -> ProfileGrid:
        """This grid within one engine's limits: prompts shorter than ``max_model_len`` (room for the
        decode steps), batches up to ``max_num_seqs``, and a batch's KV within ``kv_capacity_tokens``
        (0 = unknown, not limited). Values that fall out are replaced by the limit, deduplicated."""
        prefill = _clamp(self.prefill_tokens, max_model_len - 1)
        slack = self.decode_steps + 64  # the decode requests' extra tokens (see decode_max_tokens)
        contexts = _clamp(self.decode_contexts, max_model_len - slack)
        batches = _clamp(self.decode_batches, max_num_seqs)
        if kv_capacity_tokens:
            most = max(1, kv_capacity_tokens // (max(contexts) + slack))
            batches = _clamp(batches, most)
        return replace(self, prefill_tokens=prefill, decode_batches=batches, decode_contexts=contexts)


FULL_GRID = ProfileGrid()
QUICK_GRID = ProfileGrid(
    prefill_tokens=(32, 256, 1024), repeats=2, decode_batches=(1, 4, 16), decode_contexts=(128, 512), decode_steps=8
)


def _clamp(values: Iterable[int], most: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, min(v, most)) for v in values}))


def median_points(samples: Iterable[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """(x, y) samples -> one (x, median y) per distinct x, ascending x."""
    by_x: dict[int, list[float]] = {}
    for x, y in samples:
        by_x.setdefault(int(x), []).append(float(y))
    return tuple((x, statistics.median(ys)) for x, ys in sorted(by_x.items()))


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: bytes per element not known") from None


def kv_bytes_per_token(hf_config: Mapping, dtype: str) -> int:
    """KV bytes one token occupies: layers x 2 (K and V) x KV heads x head dim x dtype bytes, from a
    Hugging Face ``config.json`` (head dim = hidden size / attention heads when not given)."""
    layers = int(hf_config["num_hidden_layers"])
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(hf_config.get("num_key_value_heads") or heads)
    head_dim = int(hf_config.get("head_dim") or hf_config["hidden_size"] // heads)
    return layers * 2 * kv_heads * head_dim * dtype_bytes(dtype)


def cpu_isa(flags: Iterable[str]) -> str:
    """The widest matrix/vector ISA of a CPU's flags: ``avx512-amx``, ``avx512``, ``avx2`` or ``generic``."""
    f = set(flags)
    if "avx512f" in f:
        return "avx512-amx" if {"amx_bf16", "amx_tile"} & f else "avx512"
    return "avx2" if "avx2" in f else "generic"


def device_type(pool: PoolConfig, flags: Iterable[str], available_cores: int) -> str:
    """A pool's device type: ``cpu-<cores>core-<isa>`` for a CPU engine (its rank-0 binding), else the
    GPU type (``gpu`` when the pool names none)."""
    if isinstance(pool.device, CpuDevice):
        named = binding_cores(pool.device.cores_for_rank(0))
        cores = len(named) if named is not None else available_cores
        return f"cpu-{cores}core-{cpu_isa(flags)}"
    return pool.device.gpu_type or "gpu"


def profile_key(model: str, pool: PoolConfig, dtype: str, flags: Iterable[str], available_cores: int) -> ProfileKey:
    """The profile key of a pool's engine (``dtype``: the resolved one, workers/engine.py:resolve_dtype)."""
    e = pool.engine
    return ProfileKey(
        model=model,
        device_type=device_type(pool, flags, available_cores),
        tp=e.tensor_parallel_size,
        pp=e.pipeline_parallel_size,
        dtype=dtype,
    )


@dataclass(frozen=True)
class EngineGroup:
    """The pools of one profile key, and which pool's engine measures what."""

    key: ProfileKey
    pools: tuple[PoolConfig, ...]

    @property
    def prefill_pool(self) -> PoolConfig:
        return next((p for p in self.pools if p.role is PoolRole.PREFILL), self.pools[0])

    @property
    def decode_pool(self) -> PoolConfig:
        return next((p for p in self.pools if p.role is PoolRole.DECODE), self.pools[0])

    @property
    def measures_handoff(self) -> bool:
        return self.prefill_pool.name != self.decode_pool.name

    @property
    def measuring_pools(self) -> tuple[PoolConfig, ...]:
        """The pools whose engines start (one engine each): the prefill and the decode measuring pool."""
        return (self.prefill_pool, self.decode_pool) if self.measures_handoff else (self.prefill_pool,)


def group_pools(pools: Sequence[PoolConfig], key_of: Callable[[PoolConfig], ProfileKey]) -> list[EngineGroup]:
    """Pools grouped by profile key, in config order."""
    groups: dict[ProfileKey, list[PoolConfig]] = {}
    for p in pools:
        groups.setdefault(key_of(p), []).append(p)
    return [EngineGroup(k, tuple(ps)) for k, ps in groups.items()]


def distinct_prompts(count: int, tokens: int, vocab_size: int, seed: int) -> list[tuple[int, ...]]:
    """``count`` random prompts of ``tokens`` token ids, distinct from their first token block on (so
    no prompt hits another's prefix cache)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(100, vocab_size - 1, size=(count, tokens))
    return [tuple(int(t) for t in row) for row in ids]


def steady_step_s(token_times: Sequence[Sequence[float]]) -> float:
    """Decode step seconds of a batch from each request's token arrival times: inside the window where
    every request is decoding (after the last request's first token, up to the first request's last
    token), each request's mean gap between its tokens; the median over requests."""
    start = max(ts[0] for ts in token_times)
    end = min(ts[-1] for ts in token_times)
    steps = []
    for ts in token_times:
        w = [t for t in ts if start <= t <= end]
        if len(w) >= 2:
            steps.append((w[-1] - w[0]) / (len(w) - 1))
    if not steps:
        raise ValueError("no decode steps with the whole batch running (raise decode_steps)")
    return statistics.median(steps)


def decode_max_tokens(batch: int, context: int, steps: int, max_batched_tokens: int) -> int:
    """Tokens each decode request generates: ``steps`` whole-batch steps after the batch's prefill,
    which spans ``batch x context / max_batched_tokens`` engine steps during which the requests
    prefilled first already decode."""
    prefill_steps = math.ceil(batch * context / max(1, max_batched_tokens))
    return steps + prefill_steps + 2


def profile_notes(group: EngineGroup, handoff_backend: str, grid: ProfileGrid) -> str:
    how = (
        f"measured by pdserve profile: prefill = median wall time of {grid.repeats} prefill calls per length on "
        f"pool {group.prefill_pool.name!r}'s engine (distinct random prompts, no prefix-cache hit); decode = "
        f"median token gap while the whole batch decodes on pool {group.decode_pool.name!r}'s engine "
        "(context = prompt tokens per sequence)"
    )
    if group.measures_handoff:
        return how + (
            f"; handoff = median {handoff_backend} connector transfer duration of those prefills into pool "
            f"{group.decode_pool.name!r}'s engine over the configured transport, vs prompt tokens x "
            "kv_bytes_per_token"
        )
    return how + "; handoff not measured (no pools of both roles for this engine type)"


# ---- measurement (needs vLLM) ----


class _Engines:
    """The engines of one group, started as replicas start them (EngineWrapper), stopped on exit."""

    def __init__(self, group: EngineGroup, handoff_cfg: KvHandoffConfig, model_path: str, model_name: str, mml: int):
        self.group, self.handoff_cfg = group, handoff_cfg
        self.model_path, self.model_name, self.max_model_len = model_path, model_name, mml
        self.wrappers: dict[str, object] = {}

    def __enter__(self) -> dict:
        from workers.engine import EngineSpec, EngineWrapper
        from workers.handoff import make_handoff

        saved = dict(os.environ)
        cfg = self.handoff_cfg
        host = cfg.side_channel_host if cfg.side_channel_host != "auto" else "127.0.0.1"  # engines on this host
        try:
            for pool in self.group.measuring_pools:
                spec = EngineSpec(
                    pool=pool,
                    model_path=self.model_path,
                    served_model_name=self.model_name,
                    max_model_len=self.max_model_len,
                )
                handoff = make_handoff(cfg, host) if self.group.measures_handoff else None
                w = EngineWrapper(spec, handoff, endpoint_id=f"profile-{pool.name}")
                self.wrappers[pool.name] = w
                w.start()
                os.environ.clear()
                os.environ.update(saved)  # the next engine starts with its own settings only
        except BaseException:
            self.__exit__()
            raise
        return self.wrappers

    def __exit__(self, *exc) -> None:
        for w in self.wrappers.values():
            try:
                w.shutdown()
            except Exception as e:  # the others still stop
                logger.warning("engine shutdown failed: %r", e)
        self.wrappers.clear()


async def _wait_transfer_durations(decode_engine, timeout_s: float = 5.0) -> list[float]:
    """The decode engine's connector durations since the last drain (they arrive with engine stats)."""
    deadline = time.monotonic() + timeout_s
    while True:
        durations = decode_engine.stats(drain=True).kv_transfer_durations_s
        if durations or time.monotonic() > deadline:
            return list(durations)
        await asyncio.sleep(0.05)


async def measure_prefill_and_handoff(
    prefill_engine, decode_engine, grid: ProfileGrid, vocab_size: int, kv_bytes: int, progress=print
) -> tuple[tuple[tuple[int, float], ...], tuple[tuple[int, float], ...]]:
    """(prefill points, handoff points): every prompt length ``repeats`` times; each prefill's KV handed
    to ``decode_engine`` (None: no handoff) right after it, before the next prefill starts."""
    from workers.messages import DecodeRequest, PrefillRequest, SamplingSpec

    prefill, handoff = [], []
    n = 0
    for tokens in grid.prefill_tokens:
        for prompt in distinct_prompts(grid.repeats, tokens, vocab_size, seed=1000 + tokens):
            n += 1
            res = await prefill_engine.prefill(PrefillRequest(request_id=f"profile-p{n}", prompt_token_ids=prompt))
            if res.num_cached_tokens:
                raise RuntimeError(f"profile prompt hit the prefix cache ({res.num_cached_tokens} tokens)")
            prefill.append((tokens, res.prefill_s))
            if decode_engine is None or res.handoff is None:
                continue
            req = DecodeRequest(
                request_id=f"profile-h{n}",
                prompt_token_ids=prompt,
                sampling=SamplingSpec(max_tokens=1, temperature=0.0, ignore_eos=True),
                handoff=res.handoff,
            )
            async for _ in decode_engine.generate(req):
                pass
            durations = await _wait_transfer_durations(decode_engine)
            if durations:
                handoff.append((tokens * kv_bytes, sum(durations)))
            else:
                logger.warning("no transfer duration reported for the %d-token handoff", tokens)
        progress(f"[profile] prefill {tokens} tokens: {median_points(p for p in prefill if p[0] == tokens)[0][1]:.3f}s")
    return median_points(prefill), median_points(handoff)


async def _decode_batch(engine, batch: int, context: int, max_tokens: int, vocab_size: int, seed: int) -> float:
    from workers.messages import DecodeRequest, SamplingSpec

    async def one(i: int, prompt: tuple[int, ...]) -> list[float]:
        req = DecodeRequest(
            request_id=f"profile-d{seed}-{i}",
            prompt_token_ids=prompt,
            sampling=SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        )
        times = []
        async for chunk in engine.generate(req):
            now = time.monotonic()
            times.extend([now] * len(chunk.token_ids))
        return times

    prompts = distinct_prompts(batch, context, vocab_size, seed=seed)
    times = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return steady_step_s(times)


async def measure_decode(engine, grid: ProfileGrid, vocab_size: int, progress=print) -> tuple:
    """(batch, context, step seconds) for every cell of the grid."""
    sched = engine.engine.vllm_config.scheduler_config
    points = []
    for context in grid.decode_contexts:
        for batch in grid.decode_batches:
            mt = decode_max_tokens(batch, context, grid.decode_steps, sched.max_num_batched_tokens)
            step = await _decode_batch(engine, batch, context, mt, vocab_size, seed=batch * 100_003 + context)
            points.append((batch, context, step))
        progress(
            f"[profile] decode context {context}: "
            + ", ".join(f"b{b} {s * 1e3:.1f}ms" for b, c, s in points if c == context)
        )
    return tuple(points)


def kv_capacity_tokens(engine) -> int:
    cache = engine.engine.vllm_config.cache_config
    return int(cache.num_gpu_blocks or 0) * int(cache.block_size)


async def _warm_up(engine, vocab_size: int) -> None:
    """One short request, so the first measured one pays no first-call cost."""
    from workers.messages import DecodeRequest, SamplingSpec

    req = DecodeRequest(
        request_id="profile-warm",
        prompt_token_ids=distinct_prompts(1, 64, vocab_size, seed=7)[0],
        sampling=SamplingSpec(max_tokens=4, temperature=0.0, ignore_eos=True),
    )
    async for _ in engine.generate(req):
        pass


async def measure_group(
    engines: Mapping, group: EngineGroup, grid: ProfileGrid, hf_config: Mapping, handoff_backend: str, progress=print
) -> EngineProfile:
    """One engine type's profile from its started engines (``engines``: pool name -> EngineWrapper)."""
    pre = engines[group.prefill_pool.name]
    dec = engines[group.decode_pool.name]
    vocab = int(hf_config["vocab_size"])
    kv_bytes = kv_bytes_per_token(hf_config, group.key.dtype)
    capacity = kv_capacity_tokens(dec)
    grid = grid.fitted(
        dec.engine.vllm_config.model_config.max_model_len, group.decode_pool.engine.max_num_seqs, capacity
    )
    t0 = time.monotonic()
    for w in {id(pre): pre, id(dec): dec}.values():
        await _warm_up(w, vocab)
    prefill, handoff = await measure_prefill_and_handoff(
        pre, dec if group.measures_handoff else None, grid, vocab, kv_bytes, progress
    )
    decode = await measure_decode(dec, grid, vocab, progress)
    return EngineProfile(
        key=group.key,
        device_kind="cpu" if isinstance(group.decode_pool.device, CpuDevice) else "cuda",
        source=MEASURED,
        prefill=prefill,
        decode=decode,
        handoff=handoff,
        kv_bytes_per_token=kv_bytes,
        kv_capacity_tokens=capacity,
        max_num_seqs=group.decode_pool.engine.max_num_seqs,
        notes=profile_notes(group, handoff_backend, grid),
        meta={
            "pools": [p.name for p in group.pools],
            "prefill_pool": group.prefill_pool.name,
            "decode_pool": group.decode_pool.name,
            "block_size": group.decode_pool.engine.block_size,
            "enforce_eager": group.decode_pool.engine.enforce_eager,
            "decode_steps": grid.decode_steps,
            "repeats": grid.repeats,
            "measure_s": round(time.monotonic() - t0, 1),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpu_model": cpu_model(),
        },
    )


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def engine_dtype(pool: PoolConfig, flags: frozenset[str], hf_config: Mapping) -> str:
    """The dtype a pool's engine runs (a GPU's ``auto``: the checkpoint's dtype)."""
    from workers.engine import resolve_dtype

    dtype = resolve_dtype(pool.engine.dtype, pool.device, flags)
    if dtype == "auto":
        dtype = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16")
    return dtype.removeprefix("torch.")


def profile_pools(
    pools: Sequence[PoolConfig],
    handoff_cfg: KvHandoffConfig,
    model_path: str,
    model_name: str,
    max_model_len: int,
    grid: ProfileGrid = FULL_GRID,
    progress: Callable[[str], None] = print,
) -> list[EngineProfile]:
    """One measured profile per engine type of ``pools`` (module docstring), engines started one group
    at a time and stopped before the next."""
    from workers.engine import cpu_flags

    flags = cpu_flags()
    available = len(os.sched_getaffinity(0))
    hf = json.loads((Path(model_path) / "config.json").read_text())
    groups = group_pools(pools, lambda p: profile_key(model_name, p, engine_dtype(p, flags, hf), flags, available))
    profiles = []
    for group in groups:
        if any(isinstance(p.device, GpuDevice) for p in group.pools) and not _has_cuda():
            raise RuntimeError(f"pools {[p.name for p in group.pools]} run on GPUs; none is visible here")
        progress(f"[profile] {group.key}: starting pools {', '.join(p.name for p in group.pools)}")
        with _Engines(group, handoff_cfg, model_path, model_name, max_model_len) as engines:
            profiles.append(asyncio.run(measure_group(engines, group, grid, hf, handoff_cfg.backend, progress)))
    return profiles


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
