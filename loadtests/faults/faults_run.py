"""Fault injection under load, recorded: open-loop traffic while one of two decode replicas is killed
and the prefill replica is paused, then what the clients saw.

    python -m loadtests.faults.faults_run
    python -m loadtests.faults.faults_run --rate 2 --duration 180 --kill-decode-at 60 --pause-prefill-at 120 \
        --pause-s 10

Starts ``pdserve serve CONFIG`` (default: one prefill and two decode replicas), warms it up, sends
``random`` requests (256 tokens in, 128 out, ignore_eos) at ``--rate`` req/s for ``--duration`` s
and, on the same clock (seconds since the open loop's start, as every ``start_s``): SIGKILLs the vLLM
engine processes of ONE decode replica at ``--kill-decode-at``; SIGSTOPs the prefill replica's engines
at ``--pause-prefill-at`` for ``--pause-s``, then SIGCONT (``loadtests/faults/faults.py``).

Writes ``loadtests/results/<run-id>-faults/``: ``raw/requests.json`` (every request), ``timeline.json``
(``/metrics`` every second), ``summary.json``, ``report.md`` (outcomes overall and per phase, recovery
times, goals with PASS/FAIL) and ``timeline.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import time
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt

from kvtransfer.ports import free_port
from loadtests import workloads
from loadtests.bench import DEFAULT_MODEL, portable, scrape_metrics, warm_up
from loadtests.client import RequestRecord
from loadtests.faults import faults
from loadtests.openloop import run_open_loop
from loadtests.report import bins, save_figure
from loadtests.systems import REPO, SERVER_AUTOGROUP_NICE, resolved_config, start_ours, wait_ready

DEFAULT_CONFIG = REPO / "configs" / "bench" / "two-decode.yaml"
INPUT_TOKENS, OUTPUT_TOKENS = 256, 128
PHASES = ("before_kill", "kill_to_pause", "pause", "after_pause")
WARMUP_S = 20.0  # the pre-kill throughput is measured from here on (skips the ramp-up)
WINDOW_S = 10.0  # throughput recovery: completed tokens per window of this length ...
RECOVERED_SHARE = 0.9  # ... at least this share of the pre-kill rate
BIN_S = 5.0  # plot bins


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="pdserve config with two decode replicas (default: configs/bench/two-decode.yaml)",
    )
    p.add_argument("--rate", type=float, default=1.0, help="req/s (Poisson arrivals)")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of arrivals; requests = rate x duration")
    p.add_argument("--kill-decode-at", type=float, default=60.0, help="seconds since the run start")
    p.add_argument("--pause-prefill-at", type=float, default=120.0, help="seconds since the run start")
    p.add_argument("--pause-s", type=float, default=10.0)
    p.add_argument("--drain", type=float, default=120.0, help="seconds in-flight requests get after the arrivals")
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=DEFAULT_MODEL)
    args = p.parse_args(argv)
    if not 0 < args.kill_decode_at < args.pause_prefill_at or args.pause_s <= 0:
        p.error("want 0 < --kill-decode-at < --pause-prefill-at and --pause-s > 0")
    return args


def fault_targets(config: str) -> dict:
    """From a pdserve config (resolved: an overlay's base counts): the Serve app name and the names of its
    prefill and decode pools."""
    data = resolved_config(config)
    pools = {p["role"]: p["name"] for p in data["pools"]}
    return {"app_name": data.get("app_name", "pdserve"), "prefill": pools["prefill"], "decode": pools["decode"]}


# -- the fault schedule (blocking psutil work, run in threads) ------------------------------------------


def kill_one_replica(app_name: str, pool: str, t0: float) -> dict:
    """SIGKILL the engine processes of one of ``pool``'s replicas (the pool must have at least two)."""
    replicas = faults.replica_processes(app_name, pool)
    if len(replicas) < 2:
        raise RuntimeError(f"pool {pool!r} has {len(replicas)} replica process(es); the run kills one of two")
    for replica in replicas:
        if engines := faults.engine_processes_of(replica):
            at = time.perf_counter() - t0
            faults.kill(engines)
            return {
                "kill_s": at,
                "decode_replicas_before": len(replicas),
                "killed_replica_pid": replica.pid,
                "killed_engine_pids": [e.pid for e in engines],
            }
    raise RuntimeError(f"no engine process under any {pool!r} replica")


def pause_pool(app_name: str, pool: str, seconds: float, t0: float) -> dict:
    """SIGSTOP every engine process of ``pool`` for ``seconds``, then SIGCONT."""
    engines = faults.engine_processes(app_name, pool)
    with faults.paused(engines, seconds) as pause:
        start = time.perf_counter() - t0
        pause.resumed.wait()
    return {
        "pause_start_s": start,
        "pause_end_s": time.perf_counter() - t0,
        "paused_engine_pids": [e.pid for e in engines],
    }


async def inject_faults(targets: dict, t0: float, args) -> dict:
    """The schedule, on the open loop's clock ``t0``: kill one decode replica's engines, later pause
    the prefill engines. Returns when each happened (seconds since ``t0``) and to which processes."""

    async def until(offset_s: float) -> None:
        await asyncio.sleep(max(0.0, t0 + offset_s - time.perf_counter()))

    await until(args.kill_decode_at)
    killed = await asyncio.to_thread(kill_one_replica, targets["app_name"], targets["decode"], t0)
    print(f"[faults] t={killed['kill_s']:.1f}s killed decode engines {killed['killed_engine_pids']}", flush=True)
    await until(args.pause_prefill_at)
    paused = await asyncio.to_thread(pause_pool, targets["app_name"], targets["prefill"], args.pause_s, t0)
    print(f"[faults] t={paused['pause_start_s']:.1f}-{paused['pause_end_s']:.1f}s paused prefill engines", flush=True)
    return {**killed, **paused}


async def run_with_faults(base_url: str, args, targets: dict, specs):
    t0 = time.perf_counter()
    return await asyncio.gather(
        run_open_loop(base_url, args.model, specs, args.duration, args.drain, t0=t0), inject_faults(targets, t0, args)
    )


# -- analysis (pure) ------------------------------------------------------------------------------------


def classify(rec: RequestRecord, max_tokens: int) -> str:
    """``completed`` (every requested token: the workload sets ignore_eos), ``truncated`` (answered
    with fewer), ``hung`` (still open when the drain ran out), or a clear error: ``rejected`` (503/429)
    or ``error``."""
    if rec.outcome == "ok":
        return "completed" if rec.completion_tokens == max_tokens else "truncated"
    if rec.reason == "client_timeout":
        return "hung"
    return "rejected" if rec.outcome == "rejected" else "error"


def phase_of(start_s: float, fault_times: dict) -> str:
    bounds = [fault_times["kill_s"], fault_times["pause_start_s"], fault_times["pause_end_s"]]
    return PHASES[bisect.bisect_right(bounds, start_s)]


def outcome_counts(records: list[RequestRecord], max_tokens: int) -> dict:
    c = Counter(classify(r, max_tokens) for r in records)
    return {
        "sent": len(records),
        "completed": c["completed"],
        "failed": c["rejected"] + c["error"],
        "rejected_503_429": c["rejected"],
        "error": c["error"],
        "hung": c["hung"],
        "truncated": c["truncated"],
    }


def finish_s(rec: RequestRecord) -> float:
    """When the client had its answer or error (a rejection or a transport error has no e2e: its start)."""
    return rec.start_s + (rec.e2e_s or 0.0)


def stopped_using_dead_s(timeline: list[dict], kill_s: float) -> float:
    """Seconds from the kill to the last sample at which ``decode_retries`` rose (0 if it never did)."""
    last, prev = None, None
    for s in timeline:
        if "decode_retries" not in s:
            continue
        if prev is not None and s["decode_retries"] > prev and s["t"] >= kill_s:
            last = s["t"]
        prev = s["decode_retries"]
    return 0.0 if last is None else last - kill_s


def replica_restored_s(timeline: list[dict], kill_s: float, full: int) -> float | None:
    """Seconds from the kill to the first sample with ``full`` decode replicas again after fewer
    (None: never dropped, or never restored)."""
    dropped = False
    for s in timeline:
        if s["t"] < kill_s or "decode_replicas" not in s:
            continue
        if s["decode_replicas"] < full:
            dropped = True
        elif dropped:
            return s["t"] - kill_s
    return None


def throughput_recovered_s(
    records: list[RequestRecord], kill_s: float, max_tokens: int, step_s: float = 1.0
) -> float | None:
    """Seconds from the kill to the start of the first ``WINDOW_S`` window (starts every ``step_s``)
    whose completed-token rate, by finish time, is at least ``RECOVERED_SHARE`` of the mean rate over
    [``WARMUP_S``, kill); None if none is."""
    done = [(finish_s(r), r.completion_tokens) for r in records if classify(r, max_tokens) == "completed"]

    def rate(lo: float, hi: float) -> float:
        return sum(tok for t, tok in done if lo <= t < hi) / (hi - lo)

    before = rate(WARMUP_S, kill_s) if kill_s > WARMUP_S else 0.0
    if not before:
        return None
    last = max(t for t, _ in done)
    for k in itertools.count():
        if kill_s + k * step_s > last:
            return None
        if rate(kill_s + k * step_s, kill_s + k * step_s + WINDOW_S) >= RECOVERED_SHARE * before:
            return k * step_s


def analyse(records: list[RequestRecord], timeline: list[dict], fault_times: dict, max_tokens: int) -> dict:
    """Outcomes overall and per phase, recovery times and goals of a recorded run."""
    kill_s, pause_s = fault_times["kill_s"], fault_times["pause_start_s"]
    after_kill = [r for r in records if kill_s <= r.start_s < pause_s]
    failed_after_kill = [finish_s(r) for r in after_kill if classify(r, max_tokens) in ("rejected", "error")]
    counts = outcome_counts(records, max_tokens)
    new_503s = sum(r.outcome == "rejected" for r in after_kill)
    return {
        "counts": counts,
        "by_phase": {
            ph: outcome_counts([r for r in records if phase_of(r.start_s, fault_times) == ph], max_tokens)
            for ph in PHASES
        },
        "new_request_503s_after_kill": new_503s,
        "stopped_using_dead_s": stopped_using_dead_s(timeline, kill_s),
        "last_error_after_kill_s": max(failed_after_kill) - kill_s if failed_after_kill else None,
        "replica_restored_s": replica_restored_s(timeline, kill_s, fault_times["decode_replicas_before"]),
        "throughput_recovered_s": throughput_recovered_s(records, kill_s, max_tokens),
        "goals": [
            {"goal": "0 hung requests", "value": counts["hung"], "pass": counts["hung"] == 0},
            {"goal": "0 truncated answers", "value": counts["truncated"], "pass": counts["truncated"] == 0},
            {
                "goal": "0 new-request 503s after losing one of two decode replicas",
                "value": new_503s,
                "pass": new_503s == 0,
            },
        ],
    }


# -- report ---------------------------------------------------------------------------------------------


def _s(v: float | None, none: str = "never") -> str:
    return none if v is None else f"{v:.1f} s"


def write_report(out: Path, summary: dict) -> None:
    a, f, m = summary["analysis"], summary["faults"], summary["meta"]
    spans = {
        "before_kill": f"0-{f['kill_s']:.0f} s",
        "kill_to_pause": f"{f['kill_s']:.0f}-{f['pause_start_s']:.0f} s",
        "pause": f"{f['pause_start_s']:.0f}-{f['pause_end_s']:.0f} s",
        "after_pause": f"from {f['pause_end_s']:.0f} s",
    }
    lines = [
        f"# Fault injection run {m['run_id']}",
        "",
        f"`{m['args']['config']}`: {m['args']['rate']} req/s Poisson for {m['args']['duration']:.0f} s "
        f"(random, {INPUT_TOKENS} tokens in, {OUTPUT_TOKENS} out, ignore_eos), "
        f"drain {m['args']['drain']:.0f} s; {m['skipped']} scheduled requests fell after the arrival window.",
        f"Faults, in seconds since the run start: the engines of one of {f['decode_replicas_before']} decode "
        f"replicas SIGKILLed at {f['kill_s']:.1f}; the prefill engines SIGSTOPped from {f['pause_start_s']:.1f} "
        f"to {f['pause_end_s']:.1f}.",
        "",
        "Requests by arrival: completed = every requested token; failed = a clear error (503/429 "
        "rejection or an error status/event); hung = no answer when the drain ran out; truncated = "
        "answered with fewer tokens.",
        "",
        "| requests arriving | sent | completed correctly | failed with clear error (503/429) | hung | truncated |",
        "|---|---|---|---|---|---|",
    ]
    rows = [("all", a["counts"])] + [
        (f"{ph.replace('_', ' ')} ({span})", a["by_phase"][ph]) for ph, span in spans.items()
    ]
    for label, c in rows:
        lines.append(
            f"| {label} | {c['sent']} | {c['completed']} | {c['failed']} ({c['rejected_503_429']}) | "
            f"{c['hung']} | {c['truncated']} |"
        )
    lines += [
        "",
        "| after the decode kill | |",
        "|---|---|",
        f"| rejections of requests arriving between the kill and the pause | {a['new_request_503s_after_kill']} |",
        f"| last decode retry (the router still picking the dead replica) | {_s(a['stopped_using_dead_s'])} |",
        f"| last client-visible error of a request arriving between the kill and the pause | "
        f"{_s(a['last_error_after_kill_s'], 'none failed')} |",
        f"| decode replicas back to {f['decode_replicas_before']} | "
        f"{_s(a['replica_restored_s'], 'never (or never fewer)')} |",
        f"| throughput recovered (first {WINDOW_S:.0f} s window with completed tokens/s >= "
        f"{RECOVERED_SHARE:.0%} of the mean over {WARMUP_S:.0f} s..kill) | {_s(a['throughput_recovered_s'])} |",
        "",
        "## Goals",
        "",
        "| goal | measured | result |",
        "|---|---|---|",
    ]
    lines += [f"| {g['goal']} | {g['value']} | {'PASS' if g['pass'] else 'FAIL'} |" for g in a["goals"]]
    lines += ["", f"Plot: `{summary['plot']}`"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def plot_timeline(
    out: Path, records: list[RequestRecord], timeline: list[dict], fault_times: dict, max_tokens: int
) -> Path:
    """Offered / completed / failed per ``BIN_S`` bin, decode replicas and decode retries over time,
    with the faults marked."""
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    end = max([finish_s(r) for r in records] + [s["t"] for s in timeline] + [1.0])
    kinds = [classify(r, max_tokens) for r in records]

    def finished(*of_kinds: str) -> list[float]:
        return bins([finish_s(r) for r, k in zip(records, kinds) if k in of_kinds], BIN_S, end)[1]

    xs, offered = bins([r.start_s for r in records], BIN_S, end)
    axes[0].plot(xs, offered, ls="--", label="offered")
    axes[0].plot(xs, finished("completed"), label="completed")
    axes[0].bar(xs, finished("rejected", "error"), width=BIN_S * 0.8, alpha=0.4, color="red", label="failed")
    ts = [s["t"] for s in timeline]
    axes[1].step(ts, [s.get("decode_replicas", 0) for s in timeline], where="post", label="decode replicas")
    axes[2].step(ts, [s.get("decode_retries", 0) for s in timeline], where="post", label="decode retries (total)")
    marks = (
        (fault_times["kill_s"], "red", "decode engines killed"),
        (fault_times["pause_start_s"], "orange", "prefill engines paused"),
        (fault_times["pause_end_s"], "green", "prefill engines resumed"),
    )
    for i, ax in enumerate(axes):
        for t, color, label in marks:
            ax.axvline(t, color=color, ls=":", label=label if i == 0 else None)
    axes[0].set_ylabel(f"req/s ({BIN_S:.0f} s bins)")
    axes[1].set_ylabel("healthy decode replicas")
    axes[2].set_ylabel("decode retries")
    axes[2].set_xlabel("seconds since run start")
    axes[0].set_title("fault injection under load: arrivals, completions, failures")
    for ax in axes:
        ax.legend(fontsize=8, ncol=3)
    return save_figure(fig, out / "timeline.png")


def main(argv=None) -> int:
    args = parse_args(argv)
    targets = fault_targets(args.config)
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-faults"
    out = Path(args.out) if args.out else REPO / "loadtests" / "results" / run_id
    (out / "raw").mkdir(parents=True, exist_ok=True)
    specs = workloads.build(
        "random",
        seed=args.seed,
        n=max(1, round(args.rate * args.duration)),
        rate=args.rate,
        input_tokens=INPUT_TOKENS,
        output_tokens=OUTPUT_TOKENS,
    )
    port = free_port()
    print(f"[faults] starting ours ({portable(args.config)}) on :{port}", flush=True)
    sp = start_ours(config=args.config, port=port, log_dir=out / "logs")
    try:
        wait_ready(sp, args.model)
        print(f"[faults] ready in {sp.ready_s:.0f}s; warming up", flush=True)
        warm_up(sp.base_url, args.model)
        print(f"[faults] {len(specs)} requests at {args.rate} req/s", flush=True)
        res, fault_times = asyncio.run(run_with_faults(sp.base_url, args, targets, specs))
        (out / "raw" / "metrics.txt").write_text(scrape_metrics(sp.base_url))
    finally:
        sp.stop()
        print("[faults] ours stopped", flush=True)
    (out / "raw" / "requests.json").write_text(json.dumps([r.to_dict() for r in res.records]))
    (out / "timeline.json").write_text(json.dumps(res.timeline))
    plot = plot_timeline(out, res.records, res.timeline, fault_times, OUTPUT_TOKENS)
    summary = {
        "meta": {
            "run_id": run_id,
            "args": {k: portable(v) for k, v in vars(args).items()},
            "targets": targets,
            "ready_s": sp.ready_s,
            "duration_s": res.duration_s,
            "skipped": res.skipped,
            "max_tokens": OUTPUT_TOKENS,
            "server_autogroup_nice": SERVER_AUTOGROUP_NICE,
        },
        "faults": fault_times,
        "plot": plot.name,
        "analysis": analyse(res.records, res.timeline, fault_times, OUTPUT_TOKENS),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(out, summary)
    print(f"[faults] results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
