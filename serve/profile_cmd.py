"""``pdserve profile``: the config's pools -> a profile file (the measuring is workers/profiler.py); with
``--serving``, the serving path's term of a running cluster into an existing profile file."""

from __future__ import annotations

import time
from pathlib import Path

from capacity.profile import EngineProfile, ServingOverhead, load_profiles, save_profiles
from serve.config import BUNDLED_SMOLLM2, ClusterConfig
from serve.model_prep import resolve_model_path

ENGINE_PROCESS_PREFIX = "VLLM::"  # vLLM's engine processes' titles: VLLM::EngineCore, VLLM::Worker


def selected_pools(cfg: ClusterConfig, names: str | None) -> list:
    """The config's pools, or those named (comma-separated; an unknown name is an error)."""
    if not names:
        return list(cfg.pools)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {p.name for p in cfg.pools})
    if unknown:
        raise ValueError(f"no pools named {unknown} in the config (pools: {[p.name for p in cfg.pools]})")
    return [p for p in cfg.pools if p.name in wanted]


def run_profile(
    cfg: ClusterConfig, out: str | Path, pools: str | None, quick: bool, progress=print
) -> list[EngineProfile]:
    from workers.profiler import FULL_GRID, QUICK_GRID, profile_pools

    chosen = selected_pools(cfg, pools)
    model_path = str(resolve_model_path(cfg.model.path, BUNDLED_SMOLLM2))
    profiles = profile_pools(
        chosen,
        cfg.kv_handoff,
        model_path,
        cfg.model.name,
        cfg.model.max_model_len,
        grid=QUICK_GRID if quick else FULL_GRID,
        progress=progress,
    )
    save_profiles(out, profiles)
    progress(f"[profile] {len(profiles)} profile(s) written to {out}")
    return profiles


def run_serving_profile(cfg: ClusterConfig, out: str | Path, requests: int = 12, progress=print) -> ServingOverhead:
    """Start the config's cluster, measure its serving path's term (serve/serving_profile.py) against the
    engine profiles already in ``out`` and write it into the profiles of the config's pools there."""
    from serve.runner import start_cluster
    from serve.serving_profile import engine_times_of, measure_serving, with_serving
    from serve.sim_cluster import pool_profile, sim_cluster

    profiles = load_profiles(out)
    keys = {pool_profile(profiles, cfg.model.name, p).key for p in cfg.pools}
    engine_times = engine_times_of(sim_cluster(cfg, profiles))
    cluster = start_cluster(cfg, progress=progress)
    try:
        progress(f"[profile] serving path: {requests} sequential streams against {cluster.base_url}")
        m = measure_serving(
            cluster.base_url,
            cfg.model.name,
            engine_times,
            requests=requests,
            max_tokens=64,
            cpu_s=descendants_cpu_s,
            notes=f"median over {requests} sequential streamed chats (short distinct prompts, 64 greedy tokens) "
            f"against a running cluster of config app {cfg.app_name!r}: client TTFT / TPOT minus the same "
            f"request alone in capacity/simulator.py on the engine profiles; cpu_per_token_s: the CPU of the "
            f"serving processes (Ray, Serve, ingress, replicas; not the engine cores) over the streams less "
            f"their idle rate, per streamed token; measured "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        )
    finally:
        cluster.stop()
    for s in m.samples:
        progress(
            f"[profile]   prompt {s.prompt_tokens} tok: TTFT {s.ttft_s * 1e3:.0f} ms "
            f"(engines {s.engine_ttft_s * 1e3:.0f}), TPOT {_ms(s.tpot_s)} ms (engines {_ms(s.engine_tpot_s)})"
        )
    save_profiles(out, with_serving(profiles, keys, m.overhead))
    progress(
        f"[profile] serving path adds TTFT {m.overhead.ttft_s * 1e3:.0f} ms, TPOT {m.overhead.tpot_s * 1e3:.1f} ms; "
        f"its processes take {m.overhead.cpu_per_token_s * 1e3:.2f} ms CPU per token; written to {out}"
    )
    return m.overhead


def descendants_cpu_s() -> float:
    """CPU seconds (user + system) this process's live descendants have used: the local Ray's processes,
    Serve's, the replicas' (with their engine clients), but not the engines' own processes (vLLM's engine
    core and its model-running workers)."""
    import psutil

    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith(ENGINE_PROCESS_PREFIX):
                continue
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # gone meanwhile
            continue
    return total


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"
