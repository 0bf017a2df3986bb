"""Routing decision latency: the SLO-aware, prefix-aware policy vs the least-loaded baseline, side by side.

    python -m loadtests.micro.router_microbench [--decisions 20000] [--index-blocks 1000000]

Measures ``policy.route(request, snapshot)`` (placement + admission, what the router runs per
request; histogram ``pdserve_router_decision_duration_seconds`` in production) on a warm prefix
index of ``--index-blocks`` blocks, 16 decode + 8 prefill endpoints, prompts of 512-4096 tokens
at block sizes 16 and 128; and, separately, the per-request block hashing the ingress does
(``router.hashing.block_hashes``). Goal (issue 4): decision p50 <= 0.2 ms. Writes
``loadtests/results/<run-id>-router/router.json`` + ``router.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

from kvtransfer.stats import percentile
from router.config import RouterConfig
from router.hashing import block_keys
from router.pipeline import build_policy
from router.policy import LeastLoadedPolicy
from router.types import EndpointState, PoolSnapshot, RequestDescriptor, Role

RESULTS = Path(__file__).resolve().parents[1] / "results"


def endpoints(rng: random.Random, n_decode: int, n_prefill: int) -> list[EndpointState]:
    eps = []
    for role, n in ((Role.DECODE, n_decode), (Role.PREFILL, n_prefill)):
        for i in range(n):
            eps.append(
                EndpointState(
                    endpoint_id=f"{role.value}-{i}",
                    pool=role.value,
                    role=role,
                    healthy=True,
                    num_running=rng.randrange(0, 12),
                    num_waiting=rng.randrange(0, 3),
                    kv_usage=rng.random() * 0.8,
                    in_flight=rng.randrange(0, 8),
                    queued_prefill_tokens=rng.randrange(0, 2048) if role is Role.PREFILL else 0,
                )
            )
    return eps


def bench_case(block_size: int, prompt_tokens: int, decisions: int, index_blocks: int, seed: int) -> dict:
    rng = random.Random(seed)
    policy = build_policy(RouterConfig(), block_size, rng=random.Random(seed))
    baseline = LeastLoadedPolicy(random.Random(seed))
    snap = PoolSnapshot(endpoints(rng, 16, 8))
    ids = [e.endpoint_id for e in snap.endpoints]
    # fill the index to capacity with unrelated blocks (LRU at its bound), then shared prompts
    bulk = [rng.getrandbits(64) for _ in range(index_blocks)]
    for i in range(0, index_blocks, 1024):
        policy.prefix_index.add(ids[(i // 1024) % len(ids)], bulk[i : i + 1024])
    prompts = []
    hash_s = []
    for p in range(64):
        toks = [rng.randrange(32000) for _ in range(prompt_tokens)]
        t0 = time.perf_counter()
        hashes = block_keys(toks, block_size, cache_salt="tenant")  # as the ingress does, once
        hash_s.append(time.perf_counter() - t0)
        holder = ids[p % len(ids)]
        policy.prefix_index.add(holder, hashes[: len(hashes) * (p % 4) // 4])  # 0-75 % cached somewhere
        prompts.append(hashes)
    out = {}
    for name, pol in (("slo-aware", policy), ("least-loaded", baseline)):
        lat = []
        for i in range(decisions):
            req = RequestDescriptor(
                request_id=str(i),
                model="m",
                num_prompt_tokens=prompt_tokens,
                max_new_tokens=128,
                tier=("free", "standard", "premium")[i % 3],
                arrival_s=0.0,
                block_hashes=prompts[i % len(prompts)],
            )
            t0 = time.perf_counter()
            pol.route(req, snap)
            lat.append(time.perf_counter() - t0)
        out[name] = {
            "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3,
        }
    return {
        "block_size": block_size,
        "prompt_tokens": prompt_tokens,
        "blocks_per_prompt": len(prompts[0]),
        "index_blocks": len(policy.prefix_index),
        "decisions": decisions,
        **out,
        "ratio_p50": out["slo-aware"]["p50_ms"] / out["least-loaded"]["p50_ms"],
        "hash_p50_ms": percentile(hash_s, 50) * 1e3,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decisions", type=int, default=20000)
    ap.add_argument("--index-blocks", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cases = [bench_case(bs, n, a.decisions, a.index_blocks, a.seed) for bs in (16, 128) for n in (512, 4096)]
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-router"
    out = Path(a.out) if a.out else RESULTS / run_id
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "run_id": run_id,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "goal": "slo-aware decision p50 <= 0.2 ms",
    }
    (out / "router.json").write_text(json.dumps({"meta": meta, "cases": cases}, indent=2))
    _plot(out / "router.png", cases)
    for c in cases:
        print(
            f"bs={c['block_size']:>3} prompt={c['prompt_tokens']:>4} ({c['blocks_per_prompt']:>3} blocks): "
            f"slo-aware p50 {c['slo-aware']['p50_ms']:.3f} ms p99 {c['slo-aware']['p99_ms']:.3f} ms | "
            f"least-loaded p50 {c['least-loaded']['p50_ms']:.3f} ms | ratio {c['ratio_p50']:.1f}x | "
            f"hashing p50 {c['hash_p50_ms']:.3f} ms"
        )
    print(f"results in {out.relative_to(RESULTS.parent.parent) if out.is_relative_to(RESULTS.parent.parent) else out}")
    return 0


def _plot(path: Path, cases: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"bs{c['block_size']}/{c['prompt_tokens']}" for c in cases]
    x = range(len(cases))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    w = 0.27
    ax.bar([i - w for i in x], [c["slo-aware"]["p50_ms"] for c in cases], w, label="slo-aware p50")
    ax.bar(list(x), [c["slo-aware"]["p99_ms"] for c in cases], w, label="slo-aware p99")
    ax.bar([i + w for i in x], [c["least-loaded"]["p50_ms"] for c in cases], w, label="least-loaded p50")
    ax.axhline(0.2, color="red", linestyle="--", linewidth=1, label="goal p50 0.2 ms")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("ms per decision")
    ax.set_title("Routing decision latency (1M-block index, 24 endpoints)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
