"""Start and stop a whole cluster (Ray + Serve app) from a ClusterConfig; used by the CLI and tests."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import httpx

from kvtransfer.ports import free_port
from serve.affinity import inherited_affinity, serving_cores
from serve.config import BUNDLED_SMOLLM2, ClusterConfig, ServerConfig
from serve.model_prep import resolve_model_path

logger = logging.getLogger(__name__)


@dataclass
class RunningCluster:
    cfg: ClusterConfig
    base_url: str
    model_path: str
    started_ray: bool
    cold_start_s: float

    def drain(self, grace_s: float, stop_early=None, poll_s: float = 0.2) -> tuple[int, int, float]:
        """Stop admitting (the ingress answers 503 ``draining``) and wait up to ``grace_s`` for the requests
        in flight to finish, or until ``stop_early()`` is true. (in flight at the start, left, seconds)."""
        from ray import serve

        t0 = time.monotonic()
        ingress = serve.get_deployment_handle("ingress", self.cfg.app_name)
        first = left = ingress.drain.remote().result(timeout_s=30)["in_flight"]
        while left > 0 and time.monotonic() - t0 < grace_s and not (stop_early and stop_early()):
            time.sleep(poll_s)
            left = ingress.drain_status.remote().result(timeout_s=30)["in_flight"]
        return first, left, time.monotonic() - t0

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            if self.started_ray:
                ray.shutdown()


def direct_ingress_env(server: ServerConfig) -> dict[str, str]:
    """Ray Serve settings that make the ingress replica itself listen on ``server.port`` (pure).

    Serve allocates a direct-ingress replica's port from [MIN, MAX); a one-port range is ``server.port``
    (the app has one ingress replica per cluster). No load balancer sits in front to deregister a stopping
    replica, so Serve's minimum draining period is off (in-flight requests are still waited for), and a
    released port is reusable at once (a restarted ingress replica binds the same port)."""
    if not server.direct_ingress:
        return {}
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(server.port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(server.port + 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


def _runtime_env(server: ServerConfig) -> dict:
    """Environment of every Ray worker of the job (replicas); the Serve controller gets the direct
    ingress part through ``serve.start``'s controller options."""
    return {
        "env_vars": {
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
            "RAY_SERVE_ENABLE_TASK_EVENTS": "0",
            **direct_ingress_env(server),
        }
    }


def wait_healthy(base_url: str, timeout_s: float, progress=None) -> dict:
    deadline = time.monotonic() + timeout_s
    last: dict | str = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/health", timeout=5.0)
            last = r.json()
            if r.status_code == 200:
                return last
        except (httpx.HTTPError, ValueError) as e:
            last = repr(e)
        if progress:
            progress(last)
        time.sleep(1.0)
    raise TimeoutError(f"cluster not healthy after {timeout_s:.0f}s: {last}")


def app_status_text(app_name: str) -> str:
    """One line per deployment (status, replica states, message): what a failed start-up shows."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return f"application {app_name!r} not deployed"
    parts = [f"app {app.status}: {app.message}".rstrip(": ")]
    for name, d in app.deployments.items():
        parts.append(f"{name} {d.status} replicas={dict(d.replica_states)} {d.message}".rstrip())
    return "; ".join(parts)


def wait_app_running(app_name: str, deadline: float, poll_s: float = 1.0) -> None:
    """Until the Serve application is RUNNING; raises with every deployment's state when it fails
    to deploy or the monotonic ``deadline`` passes (a stuck replica never hangs the caller)."""
    from ray import serve

    while True:
        app = serve.status().applications.get(app_name)
        status = app.status if app is not None else "NOT_STARTED"
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploying {app_name} failed: {app_status_text(app_name)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{app_name} not running in time: {app_status_text(app_name)}")
        time.sleep(poll_s)


def _start_serve(server: ServerConfig) -> None:
    """Serve's controller and HTTP proxy. With direct ingress the ingress replica owns ``server.port``
    and Serve still runs its proxy on the head node: it gets another free port, and nothing calls it."""
    from ray import serve

    env = direct_ingress_env(server)
    proxy_port = free_port(server.host) if env else server.port
    serve.start(
        http_options={"host": server.host, "port": proxy_port},
        controller_options={"runtime_env": {"env_vars": env}} if env else None,
    )


def start_cluster(cfg: ClusterConfig, timeout_s: float = 600.0, progress=print) -> RunningCluster:
    import ray
    from ray import serve

    from serve.app import build_app

    t0 = time.monotonic()
    progress(f"[pdserve] model: {cfg.model.path}")
    model_path = str(resolve_model_path(cfg.model.path, BUNDLED_SMOLLM2))
    started_ray = False
    if not ray.is_initialized():
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, runtime_env=_runtime_env(cfg.server), logging_level=logging.WARNING)
        else:
            cores = serving_cores(cfg.ray.serving_cores, cfg.pools, os.sched_getaffinity(0))
            with inherited_affinity(cores):
                ray.init(
                    num_cpus=cfg.ray.num_cpus,
                    include_dashboard=False,
                    runtime_env=_runtime_env(cfg.server),
                    logging_level=logging.WARNING,
                )
            started_ray = True
    progress(
        f"[pdserve] Ray up; starting {len(cfg.pools)} pools: "
        + ", ".join(f"{p.name}({p.role.value} x{p.replicas.max})" for p in cfg.pools)
    )
    _start_serve(cfg.server)
    base_url = f"http://{cfg.server.host}:{cfg.server.port}"
    cluster = RunningCluster(
        cfg=cfg, base_url=base_url, model_path=model_path, started_ray=started_ray, cold_start_s=0.0
    )
    try:
        # serve.run would wait for RUNNING without a bound; deploy, then wait with our deadline
        serve.run_many(
            [serve.RunTarget(build_app(cfg, model_path), name=cfg.app_name, route_prefix="/")],
            wait_for_applications_running=False,
        )
        wait_app_running(cfg.app_name, t0 + timeout_s)
        progress("[pdserve] engines loaded; waiting for health")
        # the rest of the budget, at least a minute for the warm-up requests once replicas run
        wait_healthy(base_url, max(60.0, t0 + timeout_s - time.monotonic()), progress=None)
    except BaseException:
        cluster.stop()
        raise
    cluster.cold_start_s = time.monotonic() - t0
    return cluster
