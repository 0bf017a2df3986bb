"""Where the serving path's CPU per streamed token goes: CPU seconds per process (and per thread of the
ingress and the engine replicas) over a fixed streaming load, for one or more config variants, each
against a cluster this script starts, one after the other in one run.

    python -m loadtests.micro.serving_cpu [--config PATH] [--set KEY=VALUE]... [--variant LABEL[:KEY=VALUE,...]]...
        [--streams 16] [--requests-per-stream 3] [--max-tokens 256] [--idle-s 10]

A variant's ``KEY=VALUE`` items are config overrides, ``env.NAME=VALUE`` items environment variables of its
server (and so of the local Ray it starts, e.g. a ``RAY_SERVE_*`` switch). Default variants: ``proxy``
(``server.direct_ingress=false``: Ray Serve's HTTP proxy in front of the ingress) and ``direct`` (the config as
it is). Each cluster is ``pdserve serve CONFIG --port PORT --set ...`` (loopback only, a free port) started as a
subprocess, so every process of it is sampled with psutil: Ray's own (GCS, raylet, agents), Serve's
(controller, HTTP proxy), the ingress replica, each engine replica (its Ray/Serve side and vLLM's in-process
frontend) and vLLM's engine processes (``VLLM::*``). First ``idle_s`` without requests gives each process's
idle rate; then ``streams`` concurrent clients each send ``requests_per_stream`` greedy streamed chats of
``max_tokens`` tokens (``ignore_eos``, short distinct prompts) back to back. A process's CPU per token is its
CPU over the load less its idle rate times the load's wall time, over the tokens streamed. Client-side TTFT
and inter-event gaps (p50/p99) come along. Writes ``loadtests/results/<run>-serving-cpu/``: ``summary.json``
and ``serving-cpu.png`` (serving CPU per token by process kind, per variant).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

from kvtransfer.ports import free_port
from loadtests.bench import portable
from loadtests.client import stream_chat
from loadtests.report import save_figure
from loadtests.stats import dist
from loadtests.systems import REPO, resolved_config, start_ours, wait_ready

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()
ENGINE_PREFIX = "VLLM::"


def process_label(p: psutil.Process) -> str:
    """A stable, readable label of one cluster process (Ray sets its workers' titles in argv)."""
    try:
        cmd = " ".join(p.cmdline())
        name = p.name()
    except psutil.Error:
        return "gone"
    if name.startswith(ENGINE_PREFIX) or cmd.startswith(ENGINE_PREFIX):
        try:
            parent = process_label(p.parent()) if p.parent() else "?"
        except psutil.Error:
            parent = "?"
        return f"{cmd.split()[0] if cmd else name} (of {parent})"
    if cmd.startswith("ray::"):
        title = cmd.split()[0].split(".")[0]  # an actor's title names the method it runs after a dot
        if title.startswith("ray::ServeReplica:"):
            return "replica " + title.rsplit(":", 1)[-1]
        return title
    for key in ("gcs_server", "raylet", "dashboard_agent", "runtime_env/agent", "log_monitor", "monitor.py"):
        if key in cmd:
            return key
    return name


def thread_names(pid: int) -> dict[int, str]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out[int(tid)] = f.read().strip()
        except OSError:
            continue
    return out


@dataclass
class Snapshot:
    t_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # label -> CPU seconds (user + system)
    threads_s: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> thread name -> CPU s


def snapshot(root: psutil.Process, thread_detail: tuple[str, ...]) -> Snapshot:
    """CPU seconds of every live descendant of ``root``, by label (same-labelled processes summed)."""
    snap = Snapshot(time.perf_counter())
    for p in root.children(recursive=True):
        label = f"{process_label(p)} [{p.pid}]"  # per process: labels repeat (workers, engines)
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        snap.cpu_s[label] = t.user + t.system
        if label.startswith(thread_detail):
            try:
                names = thread_names(p.pid)
                per: dict[str, float] = collections.defaultdict(float)
                for th in p.threads():
                    per[names.get(th.id, "?")] += th.user_time + th.system_time
                snap.threads_s[label] = dict(per)
            except (psutil.Error, OSError):
                pass
    return snap


def rates(a: Snapshot, b: Snapshot) -> dict[str, float]:
    """CPU seconds per second of each label between two snapshots."""
    dt = b.t_s - a.t_s
    return {k: (v - a.cpu_s.get(k, 0.0)) / dt for k, v in b.cpu_s.items()}


def busy_per_token(
    idle: dict[str, float], a: Snapshot, b: Snapshot, tokens: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Per label (and per thread of the detailed labels): CPU over the load less the idle rate, per token."""
    dt = b.t_s - a.t_s
    per = {k: max(0.0, v - a.cpu_s.get(k, 0.0) - idle.get(k, 0.0) * dt) / tokens for k, v in b.cpu_s.items()}
    threads = {
        label: {n: (v - a.threads_s.get(label, {}).get(n, 0.0)) / tokens for n, v in th.items()}
        for label, th in b.threads_s.items()
    }
    return per, threads


async def run_load(base_url: str, model: str, streams: int, per_stream: int, max_tokens: int, seed: int) -> list:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:

        async def worker(i: int) -> list:
            out = []
            for j in range(per_stream):
                prompt = f"{i} {j} " + " ".join(rng.choice(WORDS) for _ in range(24))
                out.append(
                    await stream_chat(client, base_url, model, [{"role": "user", "content": prompt}], max_tokens)
                )
            return out

        results = await asyncio.gather(*(worker(i) for i in range(streams)))
    return [r for rs in results for r in rs]


def by_kind(per: dict[str, float]) -> dict[str, float]:
    """Per-process figures (ms per token) summed over processes of the same label (pids dropped)."""
    out: dict[str, float] = collections.defaultdict(float)
    for label, v in per.items():
        out[label.rsplit(" [", 1)[0]] += v * 1e3
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.001}


def client_stats(records: list) -> dict:
    ok = [r for r in records if r.outcome == "ok"]
    gaps = [g for r in ok for g in r.itl_s]
    dists = {
        "ttft": dist([r.ttft_s for r in ok if r.ttft_s is not None]),
        "event_gap": dist(gaps),
        "tpot": dist([r.tpot_s for r in ok if r.tpot_s is not None]),
    }
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": collections.Counter(r.reason for r in records if r.outcome != "ok"),
        "tokens": sum(r.completion_tokens for r in ok),
        "events_per_request": round(len(gaps) / len(ok) + 1, 1) if ok else None,
        **{
            f"{name}_ms_{q}": None if d[q] is None else round(d[q] * 1e3, 1)
            for name, d in dists.items()
            for q in ("p50", "p99")
        },
    }


KIND_GROUPS = (  # stacked in the plot, bottom up: (legend, label prefixes of process kinds)
    ("ingress replica", ("replica ingress",)),
    ("Serve HTTP proxy", ("ray::ProxyActor",)),
    ("engine replicas (Ray/Serve side)", ("replica pool-",)),
)


def serving_groups(kinds: dict[str, float]) -> dict[str, float]:
    """A variant's serving CPU per token (ms) by group; ``other`` is Ray's own processes and the rest."""
    out = {name: 0.0 for name, _ in KIND_GROUPS} | {"other": 0.0}
    for kind, ms in kinds.items():
        if kind.startswith(ENGINE_PREFIX):
            continue
        name = next((n for n, prefixes in KIND_GROUPS if kind.startswith(prefixes)), "other")
        out[name] += ms
    return {k: round(v, 3) for k, v in out.items()}


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str]]:
    """``LABEL`` or ``LABEL:KEY=VALUE,...`` -> (label, config overrides, environment). A key ``env.NAME`` sets
    the variable NAME in the environment that variant's Ray processes inherit (e.g. a ``RAY_SERVE_*`` switch)."""
    label, _, sets = text.partition(":")
    items = [s for s in sets.split(",") if s]
    env = dict(s.removeprefix("env.").split("=", 1) for s in items if s.startswith("env."))
    return label, [s for s in items if not s.startswith("env.")], env


def measure_variant(args, out: Path, label: str, overrides: list[str], env: dict[str, str]) -> dict:
    sets = [*args.set, *overrides]
    cfg = resolved_config(args.config, sets)
    sp = start_ours(args.config, free_port(), out / "logs", name=label, overrides=sets, env=env)
    root = psutil.Process(sp.proc.pid)
    detail = ("replica", "ray::ProxyActor")
    report: dict = {"label": label, "set": overrides, "env": env, "direct_ingress": cfg["server"]["direct_ingress"]}
    try:
        model = cfg["model"]["name"]
        wait_ready(sp, model)
        report["ready_s"] = round(sp.ready_s, 1)
        print(f"[serving-cpu] {label}: warm-up", flush=True)
        asyncio.run(run_load(sp.base_url, model, args.streams, 1, 16, seed=99))
        time.sleep(2.0)
        i0 = snapshot(root, detail)
        time.sleep(args.idle_s)
        i1 = snapshot(root, detail)
        idle = rates(i0, i1)
        n = f"{args.streams} streams x {args.requests_per_stream} x {args.max_tokens} tokens"
        print(f"[serving-cpu] {label}: load {n}", flush=True)
        a = snapshot(root, detail)
        records = asyncio.run(
            run_load(sp.base_url, model, args.streams, args.requests_per_stream, args.max_tokens, seed=1)
        )
        b = snapshot(root, detail)
    finally:
        sp.stop()
    stats = client_stats(records)
    tokens = max(1, stats["tokens"])
    per, threads = busy_per_token(idle, a, b, tokens)
    serving = {k: v for k, v in per.items() if not k.startswith(ENGINE_PREFIX)}
    kinds = by_kind(per)
    report.update(
        wall_s=round(b.t_s - a.t_s, 2),
        tokens_per_s=round(tokens / (b.t_s - a.t_s), 1),
        client=stats,
        serving_cpu_ms_per_token=round(sum(serving.values()) * 1e3, 3),
        serving_cpu_ms_per_token_by_group=serving_groups(kinds),
        cpu_ms_per_token_by_kind=kinds,
        idle_cpu_rate={k: round(v, 4) for k, v in sorted(idle.items(), key=lambda kv: -kv[1])},
        cpu_ms_per_token={k: round(v * 1e3, 3) for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
        thread_cpu_ms_per_token={
            label: {n: round(v * 1e3, 3) for n, v in sorted(th.items(), key=lambda kv: -kv[1]) if v > 0}
            for label, th in threads.items()
        },
    )
    return report


def plot(out: Path, reports: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [r["label"] for r in reports]
    bottom = np.zeros(len(reports))
    for name in [n for n, _ in KIND_GROUPS] + ["other"]:
        vals = np.array([r["serving_cpu_ms_per_token_by_group"][name] for r in reports])
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom += vals
    for i, r in enumerate(reports):
        ax.annotate(f"{r['serving_cpu_ms_per_token']:.2f}", (i, bottom[i]), ha="center", va="bottom")
    ax.set_ylabel("serving CPU ms per streamed token")
    ax.set_title("serving path CPU per token (engines excluded)")
    ax.legend(fontsize=8)
    return save_figure(fig, out / "serving-cpu.png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="serve/default.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (dotted), every variant")
    ap.add_argument(
        "--variant",
        action="append",
        default=None,
        help="LABEL[:KEY=VALUE,...] (repeatable): config overrides, env.NAME=VALUE for Ray's processes",
    )
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--requests-per-stream", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant or ["proxy:server.direct_ingress=false", "direct"]]

    out = Path(args.out or REPO / "loadtests" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-serving-cpu")
    out.mkdir(parents=True, exist_ok=True)
    reports = [measure_variant(args, out, *variant) for variant in variants]
    base = reports[0]["serving_cpu_ms_per_token"]
    summary = {
        "args": {k: portable(v) for k, v in vars(args).items()},
        "serving_cpu_ms_per_token": {r["label"]: r["serving_cpu_ms_per_token"] for r in reports},
        "baseline": reports[0]["label"],
        "ratio_to_baseline": {r["label"]: round(r["serving_cpu_ms_per_token"] / base, 3) for r in reports},
        "variants": reports,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=dict) + "\n")
    plot(out, reports)
    print(json.dumps({k: v for k, v in summary.items() if k != "variants"}, indent=1, default=dict))
    print(f"[serving-cpu] wrote {out}")


if __name__ == "__main__":
    main()
