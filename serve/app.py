"""build_app(ClusterConfig) -> a Ray Serve application: one deployment per pool + the ingress."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig
from ray.serve.schema import LoggingConfig

from serve.auth import hashed_keys, load_key_entries
from serve.config import ClusterConfig
from serve.ingress import Ingress
from workers.config import GpuDevice, PoolConfig
from workers.deployment import EngineServer

ROUTER_CLASS = "serve.request_router:PdRequestRouter"
PLANNER_POLICY = "serve.autoscale_policy:pool_target_policy"
INGRESS_CONTROL_REQUESTS = 64  # Serve concurrency of the ingress beyond server.max_ongoing_requests


def pool_deployment_options(pool: PoolConfig, cfg: ClusterConfig) -> dict[str, Any]:
    """Serve options of one pool's deployment (pure; unit-tested)."""
    actor: dict[str, Any] = {"num_cpus": pool.device.num_cpus}
    if isinstance(pool.device, GpuDevice):
        actor["num_gpus"] = pool.device.count
        if pool.device.gpu_type:
            actor["accelerator_type"] = pool.device.gpu_type
    opts: dict[str, Any] = {
        "name": f"pool-{pool.name}",
        "ray_actor_options": actor,
        "max_ongoing_requests": pool.max_ongoing_requests,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        "max_queued_requests": cfg.server.max_queued_requests,
        "graceful_shutdown_timeout_s": cfg.server.graceful_shutdown_timeout_s,
        "logging_config": LoggingConfig(enable_access_log=False, log_level="WARNING"),
        "request_router_config": RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_router_kwargs={"pool": pool.name, "role": pool.role.value},
            request_routing_stats_period_s=cfg.router.stats_period_s,
            request_routing_stats_timeout_s=max(1.0, cfg.router.stats_period_s * 4),
        ),
    }
    if pool.replicas.fixed:
        opts["num_replicas"] = pool.replicas.max
    elif pool.autoscaling.enabled:
        # the planner's stabilizer owns the windows: Serve applies its target and the bounds at once
        interval = pool.autoscaling.adjustment_interval_s
        opts["autoscaling_config"] = AutoscalingConfig(
            min_replicas=pool.replicas.min,
            max_replicas=pool.replicas.max,
            initial_replicas=pool.replicas.min,
            upscale_delay_s=0.0,
            downscale_delay_s=0.0,
            metrics_interval_s=interval,
            look_back_period_s=2 * interval,
            policy=AutoscalingPolicy(policy_function=PLANNER_POLICY),
        )
    else:
        opts["autoscaling_config"] = AutoscalingConfig(
            min_replicas=pool.replicas.min,
            max_replicas=pool.replicas.max,
            initial_replicas=max(1, pool.replicas.min),
            target_ongoing_requests=pool.replicas.target_ongoing_requests,
        )
    return opts


def ingress_keys(cfg: ClusterConfig) -> list[dict]:
    """The API keys the ingress gets, hashed here in the driver (file and environment variable are read
    where ``pdserve serve`` runs); empty with auth off."""
    if not cfg.server.auth.on:
        return []
    tiers = {n: t.priority for n, t in cfg.router.qos_tiers.items()}
    return hashed_keys(load_key_entries(cfg.server.auth), tiers)


def build_app(cfg: ClusterConfig, model_path: str) -> serve.Application:
    keys = ingress_keys(cfg)
    pools = {}
    for pool in cfg.pools:
        dep = serve.deployment(EngineServer).options(**pool_deployment_options(pool, cfg))
        pools[pool.name] = dep.bind(
            pool.model_dump(mode="json"),
            cfg.kv_handoff.model_dump(mode="json"),
            model_path,
            cfg.model.name,
            cfg.model.max_model_len,
        )
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=1,
        # above the ingress's own limit (serve.gate.refuse_when_busy answers 503 in OpenAI shape), with room
        # for /health and /metrics while it refuses
        max_ongoing_requests=cfg.server.max_ongoing_requests + INGRESS_CONTROL_REQUESTS,
        max_queued_requests=cfg.server.max_queued_requests,
        graceful_shutdown_timeout_s=cfg.server.graceful_shutdown_timeout_s,
        ray_actor_options={"num_cpus": 1},
        logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"),
    )
    return ingress.bind(cfg.model_dump(mode="json"), model_path, pools, keys)
