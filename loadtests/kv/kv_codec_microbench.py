"""Microbenchmark: slab codec cost per handoff, glibc malloc default vs keeping freed memory.

    python -m loadtests.kv.kv_codec_microbench [--tokens 1024] [--reps 5] [--out DIR]

One handoff of ``--tokens`` tokens of float32 SmolLM2-135M KV (30 layers, 3 KV heads, head_dim 64,
block 32) through ``SlabCodec``: pack (gather + rotate + quantize into the pool) and decode + scatter,
for ``none``, ``int8`` and ``int4``, one thread pinned to core 0, best of ``--reps``. Each malloc
setting runs in its own child process (glibc reads its tunables at start): ``default`` and
``reuse`` (``workers.engine_env.MALLOC_REUSE_ENV``, what CPU engine processes get by default). Writes
``summary.json`` and ``codec.png`` to ``--out`` (default loadtests/results/<UTC timestamp>-codec/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kvtransfer.wire import COMPRESSIONS

REPO = Path(__file__).resolve().parents[2]


def measure(tokens: int, reps: int) -> dict:
    import torch

    from kvtransfer.codec import SlabCodec
    from kvtransfer.slab import SlabSpec
    from loadtests.kv.kv_xfer_microbench import pin

    pin(0)
    spec = SlabSpec(num_layers=30, num_kv_heads=3, head_dim=64, block_size=32, dtype_bytes=4)
    nb = tokens // spec.block_size
    g = torch.Generator().manual_seed(0)
    # vLLM CPU cache layout per layer: [num_blocks, kv_heads, block_size, 2 x head_dim]
    layers = [torch.randn(2 * nb, 3, 32, 128, generator=g) for _ in range(spec.num_layers)]
    ids = list(range(0, 2 * nb, 2))
    out: dict = {}
    for comp in COMPRESSIONS:
        codec = SlabCodec(spec, torch.float32, comp, 32)
        pool = torch.zeros(codec.wire_nbytes(nb), dtype=torch.uint8)
        pack, unpack = [], []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            codec.pack(layers, ids, pool)
            pack.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            codec.scatter(codec.decode(pool, nb), layers, ids)
            unpack.append(time.perf_counter() - t0)
        out[comp] = {
            "pack_s": min(pack[1:]),
            "decode_scatter_s": min(unpack[1:]),
            "raw_bytes": codec.raw_nbytes(nb),
            "wire_bytes": codec.wire_nbytes(nb),
        }
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "pack_s", "pack (ms)"), (axes[1], "decode_scatter_s", "decode + scatter (ms)")):
        for i, setting in enumerate(("default", "reuse")):
            vals = [summary[setting][c][key] * 1e3 for c in COMPRESSIONS]
            ax.bar([j + 0.4 * i for j in range(len(COMPRESSIONS))], vals, 0.4, label=f"malloc {setting}")
        ax.set_xticks([j + 0.2 for j in range(len(COMPRESSIONS))], COMPRESSIONS)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle(f"SlabCodec per handoff of {summary['tokens']} tokens, float32 SmolLM2-135M, one core")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.tokens, args.reps)), flush=True)
        return
    from workers.engine_env import MALLOC_REUSE_ENV

    summary: dict = {"tokens": args.tokens, "reps": args.reps, "malloc_reuse_env": MALLOC_REUSE_ENV}
    for setting, extra in (("default", {}), ("reuse", MALLOC_REUSE_ENV)):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "loadtests.kv.kv_codec_microbench",
                "--child",
                "--tokens",
                str(args.tokens),
                "--reps",
                str(args.reps),
            ],
            cwd=REPO,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        summary[setting] = json.loads(line[len("RESULT ") :])
    summary["reuse_over_default"] = {
        c: {k: summary["reuse"][c][k] / summary["default"][c][k] for k in ("pack_s", "decode_scatter_s")}
        for c in COMPRESSIONS
    }
    out = (
        Path(args.out)
        if args.out
        else REPO / "loadtests" / "results" / (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-codec")
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "codec.png")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
