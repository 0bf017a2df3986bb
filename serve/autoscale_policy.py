"""The Ray Serve autoscaling policy of a pool with ``autoscaling.enabled`` (runs in the Serve controller).

The planning happens in the ingress (serve/planner.py), which sees every request and the router's cost
models; the controller does not. The ingress hands each replica of the pool the pool's replica target
(``EngineServer.set_replica_target``), every replica reports it to Serve as a custom autoscaling metric
(``record_autoscaling_stats``, Serve's supported channel for custom metrics), and this policy returns the
newest value any running replica reported. Serve then applies the deployment's bounds (``replicas.min`` /
``replicas.max``); its own up/down delays are 0 because the planner's stabilizer already applied the
pool's windows, step limit and cool-down.

Self-contained (Serve pickles this module by value into the controller): it imports nothing of ours.
"""

from __future__ import annotations

from typing import Any

TARGET_METRIC = "pdserve_target_replicas"


def pool_target_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """``ctx``: Serve's ``AutoscalingContext``. Without a report yet, the current target stands."""
    newest: tuple[float, float] | None = None
    for series in ((ctx.raw_metrics or {}).get(TARGET_METRIC) or {}).values():
        for point in series or ():
            if newest is None or point.timestamp > newest[0]:
                newest = (point.timestamp, point.value)
    if newest is None:
        return ctx.target_num_replicas, {}
    return newest[1], {}
