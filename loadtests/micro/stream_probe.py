"""Batch-1 stream probe: TTFT and inter-token gaps of one request at a time, per system, side by side.

    python -m loadtests.micro.stream_probe [--requests 8] [--prompt-words 190] [--max-tokens 128]

Systems, one after the other on the same cores:

- ``vllm-1core``: plain vLLM's OpenAI server with its engine computing on one core (core 1), as the
  decode engine of pdserve's default config does;
- ``vllm``: plain vLLM on both cores, as its CPU docs start it (the bench's ``colocated``);
- ``ours``: the default config (an idle decode replica prefills locally, ``local_prefill_when_idle``);
- ``ours-remote``: the default config with every prompt prefilled on the prefill replica and handed off.

With one request at a time nothing queues: the figures are each path's own latency (engine step, serving
hops, handoff). Requests are greedy, ``ignore_eos``, with distinct prompts (no prefix-cache hits); the first
one of each system is a warm-up and not counted. Writes ``loadtests/results/<run-id>-stream-probe/``
(``probe.json``, ``probe.png``) with ratios to ``vllm``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import httpx

from loadtests.bench import bundled_model_dir
from loadtests.client import SSE_DONE, sse_data
from loadtests.systems import REPO, start_colocated, start_ours, wait_ready

MODEL = "SmolLM2-135M-Instruct"
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()
SYSTEMS = ("vllm-1core", "vllm", "ours", "ours-remote")
REMOTE_OVERLAY = "base: default\nrouter: {placement: {local_prefill_when_idle: false}}\n"


def one_stream(url: str, prompt: str, max_tokens: int, timeout_s: float = 120.0) -> dict:
    """One streamed chat: TTFT and the gaps between content chunks (seconds)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout_s) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            data = sse_data(line)
            if data is None or data == SSE_DONE:
                continue
            if any(c.get("delta", {}).get("content") for c in json.loads(data).get("choices", [])):
                stamps.append(time.perf_counter())
    return {"ttft_s": stamps[0] - t0, "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])], "chunks": len(stamps)}


def summarize(streams: list[dict]) -> dict:
    gaps = [g for s in streams for g in s["gaps_s"]]
    q = statistics.quantiles(gaps, n=100, method="inclusive")
    return {
        "requests": len(streams),
        "ttft_p50_s": statistics.median(s["ttft_s"] for s in streams),
        "ttft_max_s": max(s["ttft_s"] for s in streams),
        "itl_p50_s": statistics.median(gaps),
        "itl_p90_s": q[89],
        "itl_p99_s": q[98],
        "itl_mean_s": statistics.mean(gaps),
    }


def run_system(name: str, run_dir: Path, prompts: list[str], max_tokens: int, port: int) -> dict:
    logs = run_dir / "logs"
    if name.startswith("vllm"):
        sp = start_colocated(bundled_model_dir(), MODEL, port, logs, cores="1" if name == "vllm-1core" else "0-1")
    else:
        config = "serve/default.yaml"
        if name == "ours-remote":
            overlay = run_dir / "ours-remote.yaml"
            overlay.write_text(REMOTE_OVERLAY)
            config = str(overlay)
        sp = start_ours(config, port, logs, name=name)
    try:
        wait_ready(sp, MODEL)
        one_stream(sp.base_url, prompts[0], 8)  # warm-up
        streams = []
        for p in prompts:
            streams.append(one_stream(sp.base_url, p, max_tokens))
            time.sleep(0.5)
        return {"ready_s": sp.ready_s, **summarize(streams)}
    finally:
        sp.stop()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys, title in (
        (axes[0], ("ttft_p50_s",), "TTFT p50 (ms)"),
        (axes[1], ("itl_p50_s", "itl_p99_s"), "inter-token gap p50 / p99 (ms)"),
    ):
        width = 0.8 / len(keys)
        for i, k in enumerate(keys):
            xs = [j + i * width for j in range(len(names))]
            ax.bar(xs, [results[n][k] * 1e3 for n in names], width, label=k.replace("_s", ""))
        ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(names))], names)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("one request at a time (batch 1), 2-core box")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=190, help="~250 prompt tokens with the chat template")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=8391)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(args.prompt_words)) for _ in range(args.requests)]
    run_dir = Path(args.out or REPO / "loadtests" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-stream-probe")
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.systems.split(","):
        if name not in SYSTEMS:
            raise SystemExit(f"unknown system {name!r}; choose from {SYSTEMS}")
        print(f"[probe] {name} ...", flush=True)
        results[name] = run_system(name, run_dir, prompts, args.max_tokens, args.port)
        print(f"[probe] {name}: {json.dumps(results[name])}", flush=True)
    base = results.get("vllm")
    ratios = (
        {n: {k: r[k] / base[k] for k in r if k.endswith("_s") and base.get(k)} for n, r in results.items()}
        if base
        else {}
    )
    (run_dir / "probe.json").write_text(
        json.dumps({"args": vars(args), "results": results, "ratios_to_vllm": ratios}, indent=1) + "\n"
    )
    plot(results, run_dir / "probe.png")
    print(f"[probe] results in {run_dir}", flush=True)


if __name__ == "__main__":
    main()
