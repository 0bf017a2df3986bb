"""Microbenchmark: cross-process NIXL READ of one handoff's bytes through kvtransfer's NixlTransport.

    python -m loadtests.kv.kv_xfer_microbench [--mib 48] [--reps 6] [--ucx-tls tcp,self,sm] [--out DIR]

Two processes pinned like the cluster's engines (the source on core 0, the reader on core 1), each
with the connector's transport (UCX backend, the connector's progress-thread delay). The reader
READs ``--mib`` MiB (47.2 MB = 1,024 tokens of float32 SmolLM2 KV) split into 1 / 8 / 510
descriptors (one slab / our 8 slabs of 128 tokens / vLLM's NixlConnector at block 32) into

* a pre-faulted destination (pages touched once at start; ``prefault_pool: true``), and
* fresh pages (the first write to each page faults),

under several set-ups (``--configs``, side by side in one run): both processes' memory on 4 KiB
pages or on transparent huge pages (``kvtransfer/hostmem.py``; ``huge_pages: true``), and UCX's
worker lock a spinlock (UCX's default) or a mutex (``ucx_mt_mutex: true``), next to single-thread
memcpy into the same kinds of memory. Median of ``--reps`` after one warm-up. Writes ``summary.json``
and ``xfer.png`` to ``--out`` (default loadtests/results/<UTC timestamp>-xfer/).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DESCRIPTORS = (1, 8, 510)
MiB = 1 << 20


def pin(core: int) -> None:
    """Pin this process to ``core`` (as the cluster pins an engine) and torch to one thread."""
    if hasattr(os, "sched_setaffinity") and core < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)


def _source(ucx_tls: str, nbytes: int, huge: bool, mutex: bool, ready, stop) -> None:
    from kvtransfer.hostmem import alloc_host
    from kvtransfer.nixl_transport import NixlTransport

    pin(0)
    t = NixlTransport("xfer-source", "127.0.0.1", ucx_tls=ucx_tls, mt_mutex=mutex)
    src = alloc_host(nbytes, huge_pages=huge)  # resident, like a packed slab
    src.copy_(torch.arange(nbytes, dtype=torch.int64).to(torch.uint8))
    t.register_pool(src)
    ready.put((t.listen_address(), src.data_ptr()))
    stop.get()
    t.close()


def _read_s(t, peer: str, dst_addr: int, src_addr: int, nbytes: int, ndesc: int) -> float:
    from kvtransfer.transport import TransferState

    n = nbytes // ndesc
    local = [(dst_addr + i * n, n) for i in range(ndesc)]
    remote = [(src_addr + i * n, n) for i in range(ndesc)]
    t0 = time.perf_counter()
    h = t.read(peer, local, remote, b"")
    while (state := t.poll(h)) is TransferState.PENDING:
        pass
    dt = time.perf_counter() - t0
    t.release(h)
    if state is not TransferState.DONE:
        raise RuntimeError("READ failed")
    return dt


def _memcpy_s(nbytes: int, fresh: bool, huge: bool, reps: int) -> list[float]:
    from kvtransfer.hostmem import alloc_host

    src = alloc_host(nbytes, huge_pages=huge)
    src.fill_(1)
    dst = alloc_host(nbytes, huge_pages=huge)
    out = []
    for _ in range(reps + 1):
        if fresh:
            dst = alloc_host(nbytes, huge_pages=huge, prefault=False)
        t0 = time.perf_counter()
        dst.copy_(src)
        out.append(time.perf_counter() - t0)
    return out[1:]


def run(nbytes: int, reps: int, ucx_tls: str, huge: bool, mutex: bool) -> dict:
    """One source process and this process as the reader, all memory on huge pages or on 4 KiB ones,
    UCX's worker lock a mutex or a spinlock."""
    from kvtransfer.hostmem import alloc_host
    from kvtransfer.nixl_transport import NixlTransport

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_source, args=(ucx_tls, nbytes, huge, mutex, ready, stop), daemon=True)
    proc.start()
    try:
        (host, port), src_addr = ready.get(timeout=120)
        pin(1)
        t = NixlTransport("xfer-reader", "127.0.0.1", ucx_tls=ucx_tls, mt_mutex=mutex)
        # one registration: a pre-faulted region, then (reps + 1) x nbytes of never-touched pages per
        # descriptor count, so every fresh-page READ lands on pages no one wrote yet
        fresh_per_variant = (reps + 1) * nbytes
        pool = alloc_host(nbytes + len(DESCRIPTORS) * fresh_per_variant, huge_pages=huge, prefault=False)
        pool[:nbytes].zero_()
        t.register_pool(pool)
        t.connect("xfer-source", host, port)
        deadline = time.monotonic() + 30
        while not t.is_connected("xfer-source"):
            if time.monotonic() > deadline:
                raise RuntimeError("could not fetch the source agent's metadata")
            time.sleep(0.01)
        base = pool.data_ptr()
        rows: dict = {}
        for vi, ndesc in enumerate(DESCRIPTORS):
            pre = [_read_s(t, "xfer-source", base, src_addr, nbytes, ndesc) for _ in range(reps + 1)][1:]
            first_fresh = base + nbytes + vi * fresh_per_variant
            fresh = [
                _read_s(t, "xfer-source", first_fresh + r * nbytes, src_addr, nbytes, ndesc) for r in range(reps + 1)
            ][1:]
            rows[str(ndesc)] = {"prefaulted_s": pre, "fresh_s": fresh}
        ok = bool(torch.equal(pool[:nbytes], torch.arange(nbytes, dtype=torch.int64).to(torch.uint8)))
        t.close()
    finally:
        stop.put(1)
        proc.join(timeout=30)
    memcpy = {"prefaulted_s": _memcpy_s(nbytes, False, huge, reps), "fresh_s": _memcpy_s(nbytes, True, huge, reps)}
    return {"bytes_equal": ok, "read": rows, "memcpy": memcpy}


def summarize(raw: dict) -> dict:
    gbps = lambda xs: raw["nbytes"] / statistics.median(xs) / 1e9  # noqa: E731
    s: dict = {"thp_mode": raw.get("thp_mode")}
    for config, r in raw["configs"].items():
        p: dict = {"memcpy_gbps": {k: gbps(v) for k, v in r["memcpy"].items()}, "read_gbps": {}, "read_p50_ms": {}}
        for ndesc, rr in r["read"].items():
            p["read_gbps"][ndesc] = {k: gbps(v) for k, v in rr.items()}
            p["read_p50_ms"][ndesc] = {k: statistics.median(v) * 1e3 for k, v in rr.items()}
            p["read_p50_ms"][ndesc]["fresh_over_prefaulted"] = statistics.median(rr["fresh_s"]) / statistics.median(
                rr["prefaulted_s"]
            )
        p["read_8_prefaulted_of_memcpy"] = p["read_gbps"]["8"]["prefaulted_s"] / p["memcpy_gbps"]["prefaulted_s"]
        s[config] = p
    base = next(iter(raw["configs"]))
    # what each set-up buys over the first one: pre-faulted READ speed (8 descriptors) ratio
    s["read_8_speedup_over_" + base] = {
        c: s[c]["read_gbps"]["8"]["prefaulted_s"] / s[base]["read_gbps"]["8"]["prefaulted_s"] for c in raw["configs"]
    }
    s["read_8_of_4k_memcpy"] = {
        c: s[c]["read_gbps"]["8"]["prefaulted_s"] / s[base]["memcpy_gbps"]["prefaulted_s"] for c in raw["configs"]
    }
    return s


def plot(raw: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["memcpy"] + [f"READ {d} desc" for d in DESCRIPTORS]
    configs = list(raw["configs"])
    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4.2), sharey=True, squeeze=False)
    for ax, config in zip(axes[0], configs):
        s = summary[config]
        pre = [s["memcpy_gbps"]["prefaulted_s"]] + [s["read_gbps"][str(d)]["prefaulted_s"] for d in DESCRIPTORS]
        fresh = [s["memcpy_gbps"]["fresh_s"]] + [s["read_gbps"][str(d)]["fresh_s"] for d in DESCRIPTORS]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], pre, 0.4, label="pre-faulted destination")
        ax.bar([x + 0.2 for x in xs], fresh, 0.4, label="fresh pages")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_title(config.replace("+", " pages, UCX lock: "))
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("GB/s (median)")
    fig.suptitle(f"NIXL READ {raw['nbytes'] / 1e6:.1f} MB across processes, UCX_TLS={raw['ucx_tls']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=float, default=45.0, help="bytes per READ (45 MiB = 47.2 MB: 1k tokens)")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--ucx-tls", default="tcp,self,sm")
    ap.add_argument(
        "--configs",
        default="4k+spin,4k+mutex,huge+spin,huge+mutex",
        help="set-ups to run, each <4k|huge>+<spin|mutex> (pages + UCX worker lock); the first is "
        "the baseline of the ratios",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    nbytes = int(args.mib * MiB) // 4096 * 4096
    nbytes -= nbytes % (510 * 8)  # every descriptor count divides it evenly
    out = (
        Path(args.out)
        if args.out
        else REPO / "loadtests" / "results" / (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-xfer")
    )
    out.mkdir(parents=True, exist_ok=True)
    from kvtransfer.hostmem import thp_mode

    raw = {
        "nbytes": nbytes,
        "reps": args.reps,
        "ucx_tls": args.ucx_tls,
        "thp_mode": thp_mode(),
        "configs": {
            c: run(nbytes, args.reps, args.ucx_tls, c.startswith("huge"), c.endswith("+mutex"))
            for c in args.configs.split(",")
        },
    }
    summary = summarize(raw)
    (out / "summary.json").write_text(json.dumps({"summary": summary, "raw": raw}, indent=1))
    plot(raw, summary, out / "xfer.png")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
