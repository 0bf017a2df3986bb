"""Benchmark: SlabKVConnector vs vLLM's NixlConnector on the same engines and prompts.

    python -m loadtests.kv.kv_bench [--sizes 512,1024,4096] [--reps 5] [--out DIR]
    python -m loadtests.kv.kv_bench --resummarize DIR     # recompute DIR/summary.json from its rows

For each connector a prefill engine (core 0) and a decode engine (core 1) run via
loadtests/kv/kv_harness.py, block_size 32 (the CPU minimum; vLLM's connector describes each block of
each layer separately), float32 SmolLM2-135M. Per handoff: prefill (max_tokens=1) -> decode
(max_tokens=1) with the prefill's kv_transfer_params. Measured:

* descriptors per handoff (ours: slabs; NIXL: its telemetry's descCount);
* handoff latency: the connector's own view (ours: pack on prefill + read/decode/scatter on decode;
  NIXL: its READs' ``xferDuration``, which runs from the post to completion, the post included; adding
  ``postDuration`` as runs before 2026-11-29T12:40Z did counts the post twice, and with UCX cma the
  copy happens inside the post) and, black box, the decode request's latency (one token:
  the handoff plus one forward of the last prompt token), p50/p99;
* bytes on the wire per compression (none/int8/int4, ours per request on the same engines);
* slab pack+transfer throughput = KV bytes / (pack_s + transfer_s), as a fraction of a single
  thread torch memcpy measured in this run;
* end to end as a caller sees it (prefill submitted -> the decode's token back) for pull (decode
  request after the prefill's response) and for push mode (both at once; the prefill WRITEs into the
  decode's reservation).

Writes ``summary.json`` and ``kvtransfer.png`` into ``--out`` (default
loadtests/results/<UTC timestamp>-kvtransfer/). vLLM's NIXL engines load
``workers.nixl_connector.QuietNixlConnector`` (the stock connector with a sleeping progress
thread and its CPU-affinity fix) by module path, as the cluster does, in two set-ups: ``nixl``, the
cluster's (UCX worker lock a mutex, KV caches moved onto huge pages), and ``nixl-stock``, vLLM's own
(UCX's spinlock, KV caches as allocated), so the run also measures what the cluster's set-up buys.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvtransfer.config import UCX_MT_MUTEX_ENV, UCX_TLS_ENV
from kvtransfer.ports import free_port
from kvtransfer.stats import percentile
from loadtests.kv.kv_harness import EngineProcess
from workers.engine_env import (
    KV_CACHE_HUGE_PAGES_ENV,
    MALLOC_REUSE_ENV,
    MQ_BUSY_LOOP_ENV,
    NIXL_PROGRESS_DELAY_ENV,
)

REPO = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 32
VOCAB = 49152


def memcpy_gbps(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Best single-thread torch copy bandwidth (GB/s) of a large buffer."""
    torch.set_num_threads(1)
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def _kv_config(kind: str, name: str = "", port: int = 0) -> dict[str, Any]:
    if kind == "slab":
        # a known agent name and port: push-mode decode requests name their prefill's agent up front
        return {
            "kv_connector": "SlabKVConnector",
            "kv_connector_module_path": "kvtransfer.connector",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "engine_id": name,
            "kv_connector_extra_config": {"ucx_tls": "tcp,self,sm", "pool_mib": 1024, "side_channel_port": port},
        }
    return {
        "kv_connector": "QuietNixlConnector",
        "kv_connector_module_path": "workers.nixl_connector",
        "kv_role": "kv_both",
        "kv_buffer_device": "cpu",
        "kv_load_failure_policy": "recompute",
    }


def _start_pair(kind: str, model: str, max_model_len: int, logdir: Path) -> tuple[EngineProcess, EngineProcess]:
    pair = []
    for role, core in (("prefill", "0"), ("decode", "1")):
        env = {
            "VLLM_CPU_OMP_THREADS_BIND": core,
            "VLLM_CPU_KVCACHE_SPACE": "2",
            UCX_TLS_ENV: "tcp,self,sm",
            "PYTHONPATH": str(REPO),
            "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
            NIXL_PROGRESS_DELAY_ENV: "1000",
            UCX_MT_MUTEX_ENV: "y",
            KV_CACHE_HUGE_PAGES_ENV: "1",
            MQ_BUSY_LOOP_ENV: "0",
            **MALLOC_REUSE_ENV,
        }  # as the cluster's CPU engines
        if kind == "nixl-stock":  # vLLM's UCX spinlock and KV caches on 4 KiB pages
            env.update({UCX_MT_MUTEX_ENV: "n", KV_CACHE_HUGE_PAGES_ENV: "0"})
        opts = {
            "name": f"{kind}-{role}",
            "model": model,
            "block_size": BLOCK_SIZE,
            "max_model_len": max_model_len,
            "dtype": "float32",
            "max_num_batched_tokens": max_model_len,
            "kv_transfer_config": _kv_config(kind, f"kvbench-{kind}-{role}", free_port()),
        }
        pair.append(EngineProcess(opts, env, str(logdir / f"{kind}-{role}.log"), str(REPO), wait=False))
    return pair[0].wait_ready(), pair[1].wait_ready()


def _new_stats(engine: EngineProcess, kind: str, seen: int, timeout_s: float = 10.0) -> tuple[Any, int]:
    """Wait until the engine reported connector stats for one more handoff; returns (stats, count)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = engine.stats()
        if kind == "slab":
            n = s["connector"].get("num_handoffs_received", 0) + s["connector"].get("num_handoffs_sent", 0)
            if n > seen:
                return s["connector"], n
        else:
            recs = [r for r in s["connector_raw"] if r.get("transfer_duration")]
            if len(recs) > seen:
                return recs[seen:], len(recs)
        time.sleep(0.05)
    raise RuntimeError(f"{engine.options['name']}: no connector stats for a new handoff")


def _push_round(prefill: EngineProcess, decode: EngineProcess, ids: list[int], rendezvous: str):
    """One push-mode handoff: the decode request first (it reserves and tells the prefill's agent),
    then the prefill request; returns both outputs."""
    from kvtransfer.wire import SlabPush, decode_push_params, prefill_push_params

    agent = prefill.options["kv_transfer_config"]
    # the reservation waits as long as a long prompt's prefill takes here (4k tokens: ~16 s on one core)
    push = SlabPush(
        rendezvous,
        agent["engine_id"],
        "127.0.0.1",
        agent["kv_connector_extra_config"]["side_channel_port"],
        timeout_s=120.0,
    )
    decode.submit(
        op="generate",
        requests=[{"prompt_token_ids": ids, "max_tokens": 1, "kv_transfer_params": decode_push_params(push)}],
    )
    (p_out,) = prefill.generate(
        [{"prompt_token_ids": ids, "max_tokens": 1, "kv_transfer_params": prefill_push_params(rendezvous)}]
    )
    (d_out,) = decode.result(timeout_s=300)["outputs"]
    return p_out, d_out


def run_connector(kind: str, model: str, sizes: list[int], reps: int, logdir: Path, seed: int) -> list[dict]:
    max_model_len = max(sizes) + 256
    prefill, decode = _start_pair(kind, model, max_model_len, logdir)
    rng = random.Random(seed)
    rows: list[dict] = []
    seen_p = seen_d = 0
    # (compression, mode): pull = the caller sends the decode request after the prefill's response;
    # push = both at once, the prefill WRITEs into the decode's reservation (slab connector only)
    variants = (
        [("none", "pull"), ("int8", "pull"), ("int4", "pull"), ("none", "push")]
        if kind == "slab"
        else [("none", "pull")]
    )
    try:
        for size in [min(sizes)] + sizes:  # the first round warms up connections
            warm = len(rows) == 0 and size == min(sizes)
            for compression, mode in variants:
                for rep in range(1 if warm else reps):
                    ids = [rng.randrange(100, VOCAB) for _ in range(size)]
                    t0 = time.perf_counter()
                    if mode == "push":
                        p_out, d_out = _push_round(prefill, decode, ids, f"{size}-{rep}-{warm}")
                    else:
                        pre = {"do_remote_decode": True, **({"compression": compression} if kind == "slab" else {})}
                        (p_out,) = prefill.generate(
                            [{"prompt_token_ids": ids, "max_tokens": 1, "kv_transfer_params": pre}]
                        )
                        (d_out,) = decode.generate(
                            [
                                {
                                    "prompt_token_ids": ids,
                                    "max_tokens": 1,
                                    "kv_transfer_params": p_out["kv_transfer_params"],
                                }
                            ]
                        )
                    row = {
                        "connector": kind,
                        "compression": compression,
                        "mode": mode,
                        "prompt_tokens": size,
                        "rep": rep,
                        "warmup": warm,
                        "prefill_s": p_out["latency_s"],
                        "decode_request_s": d_out["latency_s"],
                        # prefill submitted -> decode's token back, as the caller sees it
                        "end_to_end_s": time.perf_counter() - t0,
                    }
                    if kind == "slab":
                        d_stats, seen_d = _new_stats(decode, kind, seen_d)
                        p_stats, seen_p = _new_stats(prefill, kind, seen_p)
                        # the decode's counter is cumulative over pull AND push handoffs
                        row.update(
                            pack_s=p_stats["pack_s"][-1],
                            failures=d_stats["failures"],
                            wire_bytes=d_stats["wire_bytes"]
                            - sum(r.get("wire_bytes", 0) for r in rows if r["connector"] == "slab"),
                            raw_bytes=-(-size // BLOCK_SIZE) * BLOCK_SIZE * 30 * 3 * 128 * 4,
                        )
                        if mode == "push":
                            row["descriptors"] = -(-size // 128)
                        else:
                            row.update(
                                descriptors=len(p_out["kv_transfer_params"]["slab_handoff"]["slabs"]),
                                transfer_s=d_stats["transfer_s"][-1],
                                read_scatter_s=d_stats["handoff_s"][-1],
                                connector_handoff_s=p_stats["pack_s"][-1] + d_stats["handoff_s"][-1],
                            )
                    else:
                        recs, seen_d = _new_stats(decode, kind, seen_d)
                        row.update(
                            descriptors=sum(sum(r["num_descriptors"]) for r in recs),
                            transfer_s=sum(sum(r["transfer_duration"]) for r in recs),
                            post_s=sum(sum(r["post_duration"]) for r in recs),
                            connector_handoff_s=sum(sum(r["transfer_duration"]) for r in recs),
                            wire_bytes=sum(sum(r["bytes_transferred"]) for r in recs),
                            failures={},
                        )
                        row["raw_bytes"] = row["wire_bytes"]
                    rows.append(row)
                    print(
                        json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                        flush=True,
                    )
    finally:
        prefill.stop()
        decode.stop()
    return rows


def _handoff_s(r: dict) -> float:
    """The connector's handoff time; NIXL's is its transfers' xferDuration alone (see the docstring)."""
    return r["transfer_s"] if r["connector"].startswith("nixl") else r["connector_handoff_s"]


def summarize(rows: list[dict], memcpy: float, sizes: list[int]) -> dict:
    out: dict[str, Any] = {"memcpy_gbps_single_thread": memcpy, "block_size": BLOCK_SIZE, "by_size": {}}
    for size in sizes:
        entry: dict[str, Any] = {}
        for kind, comp, mode in (
            ("nixl-stock", "none", "pull"),
            ("nixl", "none", "pull"),
            ("slab", "none", "pull"),
            ("slab", "int8", "pull"),
            ("slab", "int4", "pull"),
            ("slab", "none", "push"),
        ):
            rs = [
                r
                for r in rows
                if r["connector"] == kind
                and r["compression"] == comp
                and r.get("mode", "pull") == mode
                and r["prompt_tokens"] == size
                and not r["warmup"]
            ]
            if not rs:
                continue
            e = {
                "n": len(rs),
                "end_to_end_p50_s": percentile([r["end_to_end_s"] for r in rs], 50),
                "end_to_end_p99_s": percentile([r["end_to_end_s"] for r in rs], 99),
            }
            if mode == "push":
                entry["slab-push-none"] = {**e, "wire_bytes": statistics.median(r["wire_bytes"] for r in rs)}
                continue
            e.update(
                {
                    "descriptors_per_handoff": statistics.median(r["descriptors"] for r in rs),
                    "wire_bytes": statistics.median(r["wire_bytes"] for r in rs),
                    "raw_bytes": statistics.median(r["raw_bytes"] for r in rs),
                    "connector_handoff_p50_s": percentile([_handoff_s(r) for r in rs], 50),
                    "connector_handoff_p99_s": percentile([_handoff_s(r) for r in rs], 99),
                    "decode_request_p50_s": percentile([r["decode_request_s"] for r in rs], 50),
                    "decode_request_p99_s": percentile([r["decode_request_s"] for r in rs], 99),
                }
            )
            if kind == "slab":
                gbps = [r["raw_bytes"] / (r["pack_s"] + r["transfer_s"]) / 1e9 for r in rs]
                e["pack_transfer_gbps_p50"] = statistics.median(gbps)
                e["pack_transfer_fraction_of_memcpy"] = statistics.median(gbps) / memcpy
                e["pack_p50_s"] = percentile([r["pack_s"] for r in rs], 50)
                e["transfer_p50_s"] = percentile([r["transfer_s"] for r in rs], 50)
            entry[f"{kind}-{comp}"] = e
        if "nixl-none" in entry and "slab-none" in entry:
            n, s = entry["nixl-none"], entry["slab-none"]
            entry["ratios"] = {
                "descriptors_nixl_over_slab": n["descriptors_per_handoff"] / s["descriptors_per_handoff"],
                "connector_handoff_p50_slab_over_nixl": s["connector_handoff_p50_s"] / n["connector_handoff_p50_s"],
                "connector_handoff_p99_slab_over_nixl": s["connector_handoff_p99_s"] / n["connector_handoff_p99_s"],
                "decode_request_p50_slab_over_nixl": s["decode_request_p50_s"] / n["decode_request_p50_s"],
                "decode_request_p99_slab_over_nixl": s["decode_request_p99_s"] / n["decode_request_p99_s"],
            }
            if "slab-push-none" in entry:
                entry["ratios"]["end_to_end_p50_push_over_pull"] = (
                    entry["slab-push-none"]["end_to_end_p50_s"] / s["end_to_end_p50_s"]
                )
                entry["ratios"]["end_to_end_p50_push_over_nixl"] = (
                    entry["slab-push-none"]["end_to_end_p50_s"] / n["end_to_end_p50_s"]
                )
            if "slab-int4" in entry:
                entry["ratios"]["int4_wire_over_bf16"] = entry["slab-int4"]["wire_bytes"] / (s["raw_bytes"] / 2)
        if "nixl-none" in entry and "nixl-stock-none" in entry:
            # what the cluster's NixlConnector set-up buys over vLLM's (UCX mutex, KV caches on huge pages)
            n, st = entry["nixl-none"], entry["nixl-stock-none"]
            entry.setdefault("ratios", {}).update(
                {
                    "connector_handoff_p50_nixl_over_stock": n["connector_handoff_p50_s"]
                    / st["connector_handoff_p50_s"],
                    "connector_handoff_p99_nixl_over_stock": n["connector_handoff_p99_s"]
                    / st["connector_handoff_p99_s"],
                    "decode_request_p50_nixl_over_stock": n["decode_request_p50_s"] / st["decode_request_p50_s"],
                }
            )
        out["by_size"][str(size)] = entry
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(summary["by_size"])
    kinds = ["nixl-stock-none", "nixl-none", "slab-none", "slab-int8", "slab-int4"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title, log in (
        (axes[0], "descriptors_per_handoff", "descriptors per handoff", True),
        (axes[1], "connector_handoff_p50_s", "handoff latency p50 (s, connector view)", False),
        (axes[2], "wire_bytes", "bytes on the wire per handoff", True),
    ):
        width = 0.16
        for i, kind in enumerate(kinds):
            vals = [summary["by_size"][s].get(kind, {}).get(key, 0) for s in sizes]
            ax.bar([j + i * width for j in range(len(sizes))], vals, width, label=kind)
        ax.set_xticks([j + 2 * width for j in range(len(sizes))], [f"{s} tok" for s in sizes])
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"SlabKVConnector vs vLLM NixlConnector, CPU, block_size {BLOCK_SIZE}, float32 SmolLM2-135M")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def resummarize(out: Path) -> None:
    """Derived numbers of a recorded run again, from its raw rows, with this module's definitions."""
    data = json.loads((out / "summary.json").read_text())
    old, rows = data["summary"], data["rows"]
    summary = summarize(rows, old["memcpy_gbps_single_thread"], old["sizes"])
    for key in ("memcpy_gbps_before_after", "sizes", "reps"):
        if key in old:
            summary[key] = old[key]
    summary["resummarized_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (out / "summary.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    plot(summary, out / "kvtransfer.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512,1024,4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--model", default=None, help="HF model dir (default: the bundled SmolLM2)")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--connectors",
        default="slab,nixl,nixl-stock",
        help="slab; nixl (the cluster's NixlConnector: UCX mutex, KV caches on huge pages); "
        "nixl-stock (the same with vLLM's UCX spinlock and 4 KiB KV pages)",
    )
    ap.add_argument(
        "--resummarize",
        default=None,
        metavar="DIR",
        help="recompute DIR/summary.json and the plot from the rows it holds, then exit",
    )
    args = ap.parse_args()
    if args.resummarize:
        resummarize(Path(args.resummarize))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.model is None:  # the bundled model, via the CLI (no serve import from kvtransfer)
        args.model = (
            subprocess.run(
                [sys.executable, "-m", "serve.cli", "prepare-model"],
                cwd=REPO,
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
    out = (
        Path(args.out)
        if args.out
        else REPO / "loadtests" / "results" / (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-kvtransfer")
    )
    out.mkdir(parents=True, exist_ok=True)
    logdir = out / "logs"
    logdir.mkdir(exist_ok=True)
    memcpy = memcpy_gbps()
    print(f"memcpy (1 thread): {memcpy:.2f} GB/s", flush=True)
    rows = []
    for i, kind in enumerate(args.connectors.split(",")):
        rows += run_connector(kind, args.model, sizes, args.reps, logdir, args.seed + i)
    memcpy_after = memcpy_gbps()
    summary = summarize(rows, max(memcpy, memcpy_after), sizes)
    summary["memcpy_gbps_before_after"] = [memcpy, memcpy_after]
    summary["sizes"], summary["reps"] = sizes, args.reps
    (out / "summary.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    plot(summary, out / "kvtransfer.png")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
