"""Engine profiles: how long one engine replica takes to prefill, to take a decode step and to receive a
KV handoff, as measured points (``pdserve profile``) or as roofline estimates (capacity/roofline.py).

A profile file is JSON: ``{"version": 1, "profiles": [EngineProfile.to_dict(), ...]}``. A profile is keyed
by (model, device_type, tp, pp, dtype). Lookups interpolate linearly between measured points and
extrapolate linearly beyond the last two (never below the smallest measured time).

A profile's optional ``serving`` section (``ServingOverhead``) is what the serving path around the
engine adds to what a client sees; a profile without it has none (zero).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROFILE_VERSION = 1
MEASURED = "measured"
ROOFLINE = "roofline-estimate"


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear ``y(x)`` through ``points`` (sorted by x, distinct x): linear between points,
    the line through the outer two beyond either end, never below the smallest y."""
    if not points:
        raise ValueError("no points to interpolate")
    if len(points) == 1:
        return points[0][1]
    xs = [p[0] for p in points]
    i = min(max(bisect.bisect_left(xs, x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return max(y, min(p[1] for p in points))


@dataclass(frozen=True)
class ProfileKey:
    model: str
    device_type: str  # "cpu-1core-avx512-amx", "H100-SXM", ...
    tp: int = 1
    pp: int = 1
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class ServingOverhead:
    """What the serving path (ingress, the Ray Serve handle calls, the KV handoff's control messages, SSE
    streaming back) adds to the engines' own times, as a client sees it: measured against a running
    cluster by ``pdserve profile --serving`` (serve/serving_profile.py)."""

    ttft_s: float = 0.0  # added to every request's time to first token
    tpot_s: float = 0.0  # added to every later token's gap (time per output token)
    # CPU seconds the serving processes spend per streamed token: on cores they share with an engine
    # they take that engine's time (capacity/simulator.py: the engine's steps stretch)
    cpu_per_token_s: float = 0.0
    notes: str = ""  # how and where it was measured

    @classmethod
    def from_dict(cls, d: dict | None) -> ServingOverhead:
        return cls(**(d or {}))


@dataclass(frozen=True)
class EngineProfile:
    """One engine replica's timings. ``decode`` is a grid: every batch size measured at every context
    length (context = KV tokens per running sequence)."""

    key: ProfileKey
    device_kind: str  # "cpu" | "cuda"
    source: str  # MEASURED | ROOFLINE
    prefill: tuple[tuple[int, float], ...]  # (uncached prompt tokens, seconds), ascending tokens
    decode: tuple[tuple[int, int, float], ...]  # (batch, context tokens per sequence, seconds per step)
    handoff: tuple[tuple[int, float], ...]  # (KV bytes, seconds) of one handoff into this engine
    kv_bytes_per_token: int  # KV bytes one token occupies (all layers, K and V)
    kv_capacity_tokens: int  # the engine's KV cache, in tokens
    max_num_seqs: int  # the engine's decode batch limit
    notes: str = ""  # how it was measured / which table row it was derived from
    serving: ServingOverhead = ServingOverhead()  # the serving path's own latency around this engine
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def estimated(self) -> bool:
        return self.source != MEASURED

    def prefill_s(self, tokens: int) -> float:
        return interpolate(self.prefill, tokens)

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        """One decode step of ``batch`` sequences holding ``context_tokens`` KV tokens each."""
        rows: dict[int, list[tuple[int, float]]] = {}
        for b, ctx, s in self.decode:
            rows.setdefault(ctx, []).append((b, s))
        per_ctx = sorted((ctx, interpolate(sorted(pts), batch)) for ctx, pts in rows.items())
        return interpolate(per_ctx, context_tokens)

    def handoff_s(self, nbytes: int) -> float:
        return interpolate(self.handoff, nbytes) if self.handoff else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EngineProfile:
        d = dict(d)
        key = ProfileKey(**d.pop("key"))
        for name in ("prefill", "handoff"):
            d[name] = tuple(tuple(p) for p in sorted(d[name]))
        d["decode"] = tuple(tuple(p) for p in sorted(d["decode"]))
        d["serving"] = ServingOverhead.from_dict(d.get("serving"))
        prof = cls(key=key, **d)
        prof.check()
        return prof

    def check(self) -> None:
        if not self.prefill or not self.decode:
            raise ValueError(f"profile {self.key}: needs prefill and decode points")
        batches = {b for b, _, _ in self.decode}
        for ctx in {c for _, c, _ in self.decode}:
            if {b for b, c, _ in self.decode if c == ctx} != batches:
                raise ValueError(f"profile {self.key}: decode points must form a batch x context grid")


def save_profiles(path: str | Path, profiles: Iterable[EngineProfile]) -> None:
    data = {"version": PROFILE_VERSION, "profiles": [p.to_dict() for p in profiles]}
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def load_profiles(path: str | Path) -> list[EngineProfile]:
    data = json.loads(Path(path).read_text())
    if data.get("version") != PROFILE_VERSION:
        raise ValueError(f"{path}: profile file version {data.get('version')!r}, expected {PROFILE_VERSION}")
    return [EngineProfile.from_dict(p) for p in data["profiles"]]


def find_profile(profiles: Iterable[EngineProfile], key: ProfileKey) -> EngineProfile:
    for p in profiles:
        if p.key == key:
            return p
    raise KeyError(f"no profile for {key}")
