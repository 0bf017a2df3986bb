"""``pdserve profile``: the config's pools -> a profile file (the measuring is workers/profiler.py)."""

from __future__ import annotations

from pathlib import Path

from capacity.profile import EngineProfile, save_profiles
from serve.config import BUNDLED_SMOLLM2, ClusterConfig
from serve.model_prep import resolve_model_path


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
