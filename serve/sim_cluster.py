"""A pdserve config as the simulator's ``SimCluster`` (``pdserve simulate``): each pool's replicas with
the profile of its engine, found by the engine's key in a profile file and adjusted to the pool's own
engine settings (decode batch limit, step token budget, KV cache size)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

from capacity.cluster import Link, SimCluster, SimPool
from capacity.profile import EngineProfile, load_profiles
from serve.affinity import serving_cores
from serve.config import ClusterConfig
from workers.config import CpuDevice, PoolConfig, binding_cores

DEFAULT_PROFILES = Path(__file__).resolve().parent.parent / "capacity" / "profiles" / "smollm2-135m-cpu.json"
# one node: the profile's measured handoff time already covers the transfer, the link adds nothing
SAME_NODE = Link(bandwidth_gbps=math.inf, latency_s=0.0)


def pool_profile(profiles: Sequence[EngineProfile], model: str, pool: PoolConfig) -> EngineProfile:
    """The profile of ``pool``'s engine: same model, device kind, TP/PP, dtype (any, for "auto"), and
    device type (a GPU's ``gpu_type``; a CPU binding's core count, ``cpu-<n>core-...``). Raises
    KeyError naming what was looked for."""
    e, dev = pool.engine, pool.device
    kind = "cpu" if isinstance(dev, CpuDevice) else "cuda"
    cands = [
        p
        for p in profiles
        if p.key.model == model
        and p.device_kind == kind
        and (p.key.tp, p.key.pp) == (e.tensor_parallel_size, e.pipeline_parallel_size)
        and (e.dtype == "auto" or p.key.dtype == e.dtype)
    ]
    if isinstance(dev, CpuDevice):
        cores = binding_cores(dev.cores_for_rank(0))
        cores = len(cores) if cores is not None else None
        if cores is not None:
            cands = [p for p in cands if p.key.device_type.startswith(f"cpu-{cores}core")] or cands
    elif dev.gpu_type:
        cands = [p for p in cands if p.key.device_type == dev.gpu_type]
    if not cands:
        raise KeyError(
            f"pool {pool.name!r}: no profile for model {model!r} on {kind} "
            f"(tp={e.tensor_parallel_size}, pp={e.pipeline_parallel_size}, dtype={e.dtype})"
        )
    return cands[0]


def for_pool(profile: EngineProfile, pool: PoolConfig) -> EngineProfile:
    """``profile`` with ``pool``'s own decode batch limit, step token budget and KV cache size."""
    e, dev = pool.engine, pool.device
    kv_tokens = profile.kv_capacity_tokens
    if "num_gpu_blocks_override" in e.extra:
        kv_tokens = int(e.extra["num_gpu_blocks_override"]) * e.block_size
    elif isinstance(dev, CpuDevice):
        kv_tokens = dev.kv_cache_space_gib * 2**30 // profile.kv_bytes_per_token
    meta = dict(profile.meta)
    if e.max_num_batched_tokens:
        meta["max_num_batched_tokens"] = e.max_num_batched_tokens
    return dataclasses.replace(profile, kv_capacity_tokens=kv_tokens, max_num_seqs=e.max_num_seqs, meta=meta)


def serving_core_shares(cfg: ClusterConfig) -> dict[str, float]:
    """Per CPU pool pinned to cores: the share of the serving processes' CPU work that runs on a replica's
    cores (``SimPool.serving_core_share``). The serving processes run on ``ray.serving_cores``
    (serve/affinity.py) of the cores the config's CPU pools are pinned to, taken as the machine's cores,
    spread evenly over them. Empty when that is unknown: Ray joined at ``ray.address``, or an unpinned
    CPU engine."""
    if cfg.ray.address:
        return {}
    cores: dict[str, set[int]] = {}  # a pool's first replica's cores
    machine: set[int] = set()
    for pool in cfg.pools:
        if isinstance(pool.device, CpuDevice):
            bindings = pool.device.cpu_cores
            for b in [bindings] if isinstance(bindings, str) else bindings:
                pinned = binding_cores(b)
                if pinned is None:
                    return {}
                machine |= pinned
            cores[pool.name] = binding_cores(pool.device.cores_for_rank(0))
    serving = serving_cores(cfg.ray.serving_cores, cfg.pools, machine) or machine
    return {name: len(c & serving) / len(serving) for name, c in cores.items() if serving}


def sim_cluster(cfg: ClusterConfig, profiles: Sequence[EngineProfile]) -> SimCluster:
    shares = serving_core_shares(cfg)
    pools = []
    for pool in cfg.pools:
        prof = for_pool(pool_profile(profiles, cfg.model.name, pool), pool)
        devices = 1 if isinstance(pool.device, CpuDevice) else pool.device.count
        pools.append(
            SimPool(
                name=pool.name,
                role=pool.role.value,
                replicas=pool.replicas.min or pool.replicas.max,
                profile=prof,
                price_per_hour=float(prof.meta.get("price_per_hour", 0.0)),
                devices_per_replica=devices,
                serving_core_share=shares.get(pool.name, 0.0),
            )
        )
    kv = cfg.kv_handoff
    compression = kv.slab.compression if kv.backend == "slab" else None
    return SimCluster(
        pools=tuple(pools),
        router=cfg.router,
        block_size=cfg.pools[0].engine.block_size,
        default_link=SAME_NODE,
        kv_compression=None if compression == "none" else compression,
    )


def load_sim_cluster(config: ClusterConfig, profiles_path: str | Path | None = None) -> SimCluster:
    return sim_cluster(config, load_profiles(profiles_path or DEFAULT_PROFILES))
