"""Engine microbenchmark: prefill tokens/s and decode ms/token per engine setting, side by side.

    python -m loadtests.micro.engine_microbench [--settings bfloat16,float32] [--cores 0]

A setting is ``DTYPE`` or ``DTYPE:EXECUTOR`` (vLLM's ``distributed_executor_backend``; note that the
CPU platform turns ``uni`` into ``mp`` unless ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), optionally with
``+heap``: the engine's processes run with glibc malloc keeping freed memory for reuse
(``workers.engine_env.MALLOC_REUSE_ENV``) instead of returning every large block to the kernel. Each
setting gets a fresh vLLM ``AsyncLLM`` (one after the other, same pinned core(s), no Ray, no NIXL), so
the numbers isolate the engine from the serving stack. Per setting: prefill of
``--prompt-tokens`` random tokens (``max_tokens=1``, prefix caching off, ``--repeats`` times, median)
and greedy decode of 64 tokens at batch 1 and at batch 8. Writes
``loadtests/results/<run-id>-engine/engine.json`` and ``engine.png`` with ratios to the first setting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


async def _measure(model_dir: str, setting: str, prompt_tokens: int, repeats: int) -> dict:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    dtype, _, executor = setting.split("+")[0].partition(":")
    executor = executor or "mp"
    t0 = time.monotonic()
    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=model_dir,
            max_model_len=2048,
            block_size=128,
            dtype=dtype,
            enforce_eager=True,
            enable_prefix_caching=False,
            disable_log_stats=True,
            distributed_executor_backend=executor,
        )
    )
    load_s = time.monotonic() - t0

    async def one(rid: str, n: int, max_tokens: int, seed: int) -> tuple[float, float]:
        prompt = TokensPrompt(prompt_token_ids=[(seed * 7919 + j * 31) % 40000 + 100 for j in range(n)])
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        start, first = time.monotonic(), None
        async for _ in engine.generate(prompt, params, request_id=rid):
            if first is None:
                first = time.monotonic() - start
        return first, time.monotonic() - start

    try:
        await one("warm", 64, 2, 0)
        prefill = [(await one(f"p{i}", prompt_tokens, 1, i + 1))[0] for i in range(repeats)]
        decode = {}
        for batch in (1, 8):
            res = await asyncio.gather(*[one(f"d{batch}-{i}", 16, 65, 100 + i) for i in range(batch)])
            decode[batch] = statistics.median((e - f) / 64 for f, e in res)
    finally:
        engine.shutdown()
    p = statistics.median(prefill)
    return {
        "setting": setting,
        "dtype": dtype,
        "executor": executor,
        "load_s": load_s,
        "prefill_s": p,
        "prefill_tok_s": prompt_tokens / p,
        "decode_ms_per_tok_b1": decode[1] * 1e3,
        "decode_ms_per_tok_b8": decode[8] * 1e3,
    }


def _child(args) -> None:
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.cores
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    row = asyncio.run(_measure(args.model_dir, args.child, args.prompt_tokens, args.repeats))
    print("RESULT " + json.dumps(row), flush=True)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["setting"] for r in rows]
    for ax, key, title in zip(
        axes,
        ("prefill_tok_s", "decode_ms_per_tok_b1", "decode_ms_per_tok_b8"),
        ("prefill tokens/s (higher is better)", "decode ms/token, batch 1", "decode ms/token, batch 8"),
    ):
        ax.bar(
            names,
            [r[key] for r in rows],
            color=["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"][: len(rows)],
        )
        ax.set_title(title, fontsize=10)
        for i, r in enumerate(rows):
            ax.annotate(f"{r[key]:.0f}", (i, r[key]), ha="center", va="bottom", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="bfloat16,float32")
    p.add_argument("--cores", default="0", help="VLLM_CPU_OMP_THREADS_BIND for every setting")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    from loadtests.bench import bundled_model_dir
    from workers.engine import cpu_flags
    from workers.engine_env import MALLOC_REUSE_ENV
    from workers.profiler import cpu_isa, cpu_model

    model_dir = args.model_dir or bundled_model_dir()
    rows = []
    for setting in args.settings.split(","):
        env = {**os.environ, **(MALLOC_REUSE_ENV if setting.endswith("+heap") else {})}
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "loadtests.micro.engine_microbench",
                "--child",
                setting,
                "--cores",
                args.cores,
                "--prompt-tokens",
                str(args.prompt_tokens),
                "--repeats",
                str(args.repeats),
                "--model-dir",
                model_dir,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
            raise RuntimeError(f"engine microbench for {setting} failed")
        rows.append(json.loads(line[len("RESULT ") :]))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows:
        r["ratio_vs_" + base["setting"]] = {
            "prefill_tok_s": r["prefill_tok_s"] / base["prefill_tok_s"],
            "decode_ms_per_tok_b1": r["decode_ms_per_tok_b1"] / base["decode_ms_per_tok_b1"],
            "decode_ms_per_tok_b8": r["decode_ms_per_tok_b8"] / base["decode_ms_per_tok_b8"],
        }
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-engine"
    out_dir = Path(args.out) if args.out else REPO / "loadtests" / "results" / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "cores": args.cores,
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
        "cpu": f"{cpu_model()} ({cpu_isa(cpu_flags())})",
    }
    (out_dir / "engine.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    _plot(rows, out_dir / "engine.png")
    print(f"[engine-microbench] results in {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
