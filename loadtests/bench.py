"""Side-by-side benchmark: for each system, start it, wait, warm up, run workloads at rates, stop.

    python -m loadtests.bench --systems ours,colocated --workload random --rates 0.5,1,2,4 \
        --workload shared-prefix --rates 1 --requests 60 --duration 90
    python -m loadtests.bench --systems ours --workload multi-turn --rates 0.5 --requests 120 --duration 300
    python -m loadtests.bench --smoke          # CI: one system, two small workloads, a few minutes
    python -m loadtests.bench --url http://127.0.0.1:8000 --workload random --rates 1   # a running server
    python -m loadtests.bench --vs-vllm        # pdserve's default config vs plain vLLM vs Ray Serve LLM P/D
    python -m loadtests.bench --systems rr=ours@configs/bench/round-robin-3x-small-kv.yaml,\
        prefix=ours@configs/bench/prefix-3x-small-kv.yaml --baseline rr --workload shared-prefix-wide \
        --set pools.0.engine.extra.num_gpu_blocks_override=24     # a sweep point: every ours config, edited

Writes ``loadtests/results/<run-id>/``: ``raw/*.json`` (every request), ``summary.json``,
``report.md`` (ratios vs ``colocated`` and ``raypd``) and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kvtransfer.ports import free_port
from loadtests import report, workloads
from loadtests.closedloop import run_closed_loop
from loadtests.openloop import run_open_loop
from loadtests.stats import summarize, summarize_by_tag
from loadtests.systems import REPO, SERVER_AUTOGROUP_NICE, STARTERS, AttachedSystem, resolved_config, wait_ready
from loadtests.timeline import prefix_cache_hit_rate, replica_seconds

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
SMOKE_MULTI_TURN = "multi-turn:n=4,turns=2,system_tokens=64,turn_tokens=16,output_tokens=8,think_s=0"

# --vs-vllm: what a user compares before choosing. The default config against plain vLLM and Ray Serve
# LLM's P/D app, each as its own docs start it, one after the other with the same client. Rates from a
# quarter of a slow 2-core host's capacity up to well past a fast one's.
VS_VLLM_SYSTEMS = "ours,colocated,raypd"
VS_VLLM_WORKLOADS = (
    ("random:input_tokens=256,output_tokens=128", "0.25,0.5,1,2,4"),
    ("random:input_tokens=512,output_tokens=64", "0.25,0.5,1,2,4"),
    ("shared-prefix", "1"),
    ("bursty:input_tokens=256,output_tokens=128", "0.5"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--systems",
        default=None,
        help="comma-separated: ours, colocated, raypd, or LABEL=ours@CONFIG for an A/B variant (default: "
        "ours,colocated; with --url: ours)",
    )
    p.add_argument(
        "--workload",
        action="append",
        dest="workloads",
        help="workload NAME or NAME:key=value,... (repeatable; e.g. bursty:n=80,output_tokens=32)",
    )
    p.add_argument("--rates", action="append", help="comma-separated req/s for the preceding --workload")
    p.add_argument("--requests", type=int, default=60, help="requests per (workload, rate)")
    p.add_argument("--duration", type=float, default=120.0, help="max seconds of arrivals per run")
    p.add_argument("--drain", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=str(REPO / "serve" / "default.yaml"))
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--model-dir", default=None, help="HF dir for colocated/raypd (default: the bundled model)")
    p.add_argument(
        "--dtype",
        default=None,
        help="engine dtype for colocated/raypd (default: their own default, as their users run them)",
    )
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds (default: the config's router.slo)")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds (default: the config's router.slo)")
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        help="extra system label to report ratios against (e.g. the A side of an A/B)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="edit every ours config: dotted key (list items by index), YAML value, e.g. "
        "pools.0.engine.extra.num_gpu_blocks_override=24; the edited configs are written "
        "to the run's configs/ (repeatable)",
    )
    p.add_argument("--out", default=None)
    p.add_argument(
        "--url",
        default=None,
        help="benchmark the server already running at this base URL (one system, labelled by --systems, "
        "default ours): not started or stopped here, its start-up time and memory not measured",
    )
    p.add_argument("--smoke", action="store_true")
    p.add_argument(
        "--vs-vllm",
        action="store_true",
        help="the default config vs plain vLLM vs Ray Serve LLM's "
        "P/D app on the standard workloads (VS_VLLM_WORKLOADS), 40 requests per rate, written to "
        "loadtests/results/<run>-vs-vllm/",
    )
    args = p.parse_args(argv)
    if args.vs_vllm:
        if args.workloads or args.smoke:
            p.error("--vs-vllm sets its own workloads")
        args.systems = VS_VLLM_SYSTEMS
        args.workloads = [w for w, _ in VS_VLLM_WORKLOADS]
        args.rates = [r for _, r in VS_VLLM_WORKLOADS]
        args.requests, args.duration = 40, 170.0
    if args.smoke:
        # an open-loop workload and a small closed-loop one (two 2-turn conversations)
        args.workloads, args.rates = ["random", SMOKE_MULTI_TURN], ["1", "1"]
        args.systems = "ours" if not args.url else args.systems
        args.requests, args.duration, args.drain = 8, 30.0, 120.0
    args.systems = args.systems or ("ours" if args.url else "ours,colocated")
    if args.url and ("," in args.systems or args.vs_vllm):
        p.error("--url benchmarks one running server: give at most one --systems label")
    args.workloads = args.workloads or ["random"]
    args.rates = args.rates or ["1"] * len(args.workloads)
    if len(args.rates) != len(args.workloads):
        p.error("give one --rates per --workload")
    return args


def config_defaults(config: str) -> dict:
    """From a pdserve config (resolved: an overlay's base counts): the SLOs every system is judged by."""
    slo = resolved_config(config)["router"]["slo"]
    return {"ttft_slo": slo["ttft_ms"] / 1e3, "tpot_slo": slo["tpot_ms"] / 1e3}


def parse_workload(entry: str, smoke: bool = False) -> tuple[str, dict]:
    """``NAME`` or ``NAME:key=value,...`` (workload keyword arguments; ``n`` overrides --requests)."""
    name, _, rest = entry.partition(":")
    kwargs: dict = {"input_tokens": 256, "output_tokens": 16} if smoke and name == "random" else {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bad workload option {item!r} in {entry!r}; use key=value")
        for cast in (int, float, str):
            try:
                kwargs[key] = cast(value)
                break
            except ValueError:
                continue
    return name, kwargs


def workload_labels(entries: list[str], smoke: bool = False) -> list[str]:
    """How a run's rows, files and plots name its workloads: by name, and where two entries share a
    name (random 256/128 and 512/64), by name and option values (``random-256-128``)."""
    parsed = [parse_workload(e, smoke) for e in entries]
    names = [name for name, _ in parsed]
    return [
        name if names.count(name) == 1 else "-".join([name, *(str(v) for k, v in kw.items() if k != "n")])
        for name, kw in parsed
    ]


def run_seed(base: int, wl_index: int, rate_index: int) -> int:
    """A distinct seed per (workload, rate) run: repeating prompts across runs would hit the prefix
    cache and make later runs artificially cheap. The same across systems, so runs stay comparable."""
    return base * 10_000 + wl_index * 100 + rate_index


def scrape_metrics(base_url: str) -> str:
    try:
        r = httpx.get(f"{base_url}/metrics", timeout=10)
        return r.text if r.status_code == 200 else ""
    except httpx.HTTPError:
        return ""


def bundled_model_dir() -> str:
    """The bundled model's directory, via the CLI (loadtests stay a black box: no serve imports)."""
    out = subprocess.run(
        [sys.executable, "-m", "serve.cli", "prepare-model"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    return out.strip().splitlines()[-1]


def parse_system(entry: str, default_config: str) -> tuple[str, str, str]:
    """``ours`` | ``colocated`` | ``raypd`` | ``LABEL=ours@CONFIG`` (an A/B variant of ours) ->
    (label, kind, config)."""
    label, _, rest = entry.strip().partition("=")
    kind, _, config = (rest or label).partition("@")
    if kind not in STARTERS:
        raise SystemExit(f"unknown system {kind!r} in {entry!r}; known: {sorted(STARTERS)}")
    if config and kind != "ours":
        raise SystemExit(f"only ours takes a config ({entry!r})")
    return label, kind, config or default_config


def edited_config(config: str, overrides: list[str], label: str, out: Path) -> str:
    """``config`` resolved with ``overrides`` applied (``pdserve validate --set``), written to
    ``out/configs/<label>.yaml`` (no overrides: as is)."""
    import yaml

    if not overrides:
        return config
    data = resolved_config(config, overrides)
    path = out / "configs" / f"{label}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# {portable(config)} with --set {' --set '.join(overrides)}\n" + yaml.safe_dump(data, sort_keys=False)
    )
    return str(path)


def warm_up(base_url: str, model: str) -> None:
    """A few small requests before the measured runs (not recorded)."""
    warm = workloads.build("random", seed=999, n=4, rate=4.0, input_tokens=64, output_tokens=8)
    asyncio.run(run_open_loop(base_url, model, warm, max_duration_s=30, drain_s=60))


# records tagged (QoS tier, phase): summaries also per tag, under "by_tier"
TIERED_WORKLOADS = ("qos", "phase-shift")


def run_system(entry: str, args, out: Path) -> list[dict]:
    name, kind, config = parse_system(entry, args.config)
    if kind == "ours":
        config = edited_config(config, args.overrides, name, out)
    model_dir = args.model_dir or (bundled_model_dir() if kind != "ours" else "")
    if args.url:
        print(f"[bench] using {name} at {args.url}", flush=True)
        sp = AttachedSystem(name, args.url.rstrip("/"))
    else:
        port = free_port()
        print(f"[bench] starting {name} ({kind}) on :{port}", flush=True)
        sp = STARTERS[kind](
            config=config,
            model_dir=model_dir,
            model=args.model,
            port=port,
            log_dir=out / "logs",
            dtype=args.dtype,
            name=name,
        )
    rows = []
    try:
        wait_ready(sp, args.model)
        took = f" in {sp.ready_s:.0f}s" if sp.ready_s is not None else ""
        print(f"[bench] {name} ready{took}; warming up", flush=True)
        warm_up(sp.base_url, args.model)
        labels = workload_labels(args.workloads, args.smoke)
        for wi, (entry, rates, label) in enumerate(zip(args.workloads, args.rates, labels)):
            wl, kwargs = parse_workload(entry, args.smoke)
            n = kwargs.pop("n", args.requests)
            for ri, rate in enumerate(float(r) for r in rates.split(",")):
                specs = workloads.build(wl, seed=run_seed(args.seed, wi, ri), n=n, rate=rate, **kwargs)
                print(
                    f"[bench] {name} {wl} @ {rate} req/s: {len(specs)} "
                    f"{'conversations' if workloads.is_closed_loop(wl) else 'requests'}",
                    flush=True,
                )
                before = scrape_metrics(sp.base_url)
                runner = run_closed_loop if workloads.is_closed_loop(wl) else run_open_loop
                res = asyncio.run(runner(sp.base_url, args.model, specs, args.duration, args.drain))
                after = scrape_metrics(sp.base_url)
                summary = summarize(res.records, res.duration_s, args.ttft_slo, args.tpot_slo, res.skipped)
                if wl in TIERED_WORKLOADS:
                    summary["by_tier"] = summarize_by_tag(res.records, res.duration_s, args.ttft_slo, args.tpot_slo)
                summary.update(
                    system=name,
                    workload=label,
                    rate=rate,
                    server_rss_bytes=sp.rss_bytes(),
                    ready_s=sp.ready_s,
                    prefix_cache_hit_rate=prefix_cache_hit_rate(before, after),
                    replica_seconds=replica_seconds(res.timeline),  # the run's cost, per pool (from /health)
                )
                rows.append(summary)
                raw = out / "raw" / f"{name}-{label}-{rate}.json"
                raw.parent.mkdir(parents=True, exist_ok=True)
                raw.write_text(
                    json.dumps(
                        {
                            "summary": summary,
                            "records": [r.to_dict() for r in res.records],
                            "metrics": after,
                            "timeline": res.timeline,
                        }
                    )
                )
                print(
                    f"[bench]   ok={summary['ok']}/{summary['requests']} goodput={summary['goodput_rps']:.2f} "
                    f"ttft_p50={summary['ttft_s']['p50']} itl_p99={summary['itl_s']['p99']}",
                    flush=True,
                )
    finally:
        sp.stop()
        print(f"[bench] {name} {'stopped' if sp.proc is not None else 'left running'}", flush=True)
    return rows


def portable(value):
    """Paths in recorded metadata: repo-relative, or just the name (no machine-local paths)."""
    if isinstance(value, str) and value.startswith("/"):
        p = Path(value)
        return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    for key, value in config_defaults(args.config).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    run_id = time.strftime("%Y%m%d-%H%M%S") + ("-smoke" if args.smoke else "-vs-vllm" if args.vs_vllm else "")
    out = Path(args.out) if args.out else REPO / "loadtests" / "results" / run_id
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.systems.split(","):
        rows += run_system(name.strip(), args, out)
    meta = {
        "run_id": run_id,
        "args": {k: portable(v) for k, v in vars(args).items()},
        "baselines": args.baseline,
        "slo": {"ttft_s": args.ttft_slo, "tpot_s": args.tpot_slo},
        # every system under test ran with its session's autogroup at this nice (systems.py)
        "server_autogroup_nice": SERVER_AUTOGROUP_NICE,
    }
    (out / "summary.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    report.write_report(out, rows, meta)
    print(f"[bench] results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
