"""The Ray Serve autoscaling policy of a pool with ``autoscaling.enabled`` (runs in the Serve controller).

The planning happens in the ingress (serve/planner.py), which sees every request and the router's cost
models; the controller does not. The ingress hands each replica of the pool the pool's replica target and
the wall-clock time of that decision (``EngineServer.set_replica_target``), every replica reports both to
Serve as custom autoscaling metrics (``record_autoscaling_stats``, Serve's supported channel for custom
metrics), and this policy returns the target of the newest decision any running replica reported. The
decision's time, not the report's, orders them: a replica that reports just before it receives the newer
target must not win over one that already has it. Serve then applies the deployment's bounds
(``replicas.min`` / ``replicas.max``); its own up/down delays are 0 because the planner's stabilizer already
applied the pool's windows, step limit and cool-down.

Scale from zero: a pool with no replica has no report; a request queued at one of its handles (the ingress's
wake call, serve/cold_start.py; Serve's routers push such a queue to the controller at once) makes the
target at least one replica.

Self-contained (Serve pickles this module by value into the controller): it imports nothing of ours.
"""

from __future__ import annotations

from typing import Any

TARGET_METRIC = "pdserve_target_replicas"
DECIDED_METRIC = "pdserve_target_decided_s"


def _last(series: Any) -> float | None:
    points = list(series or ())
    return max(points, key=lambda p: p.timestamp).value if points else None


def pool_target_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """``ctx``: Serve's ``AutoscalingContext``. Without a report yet, the current target stands, or becomes
    one replica if the pool has none and requests wait at its handles."""
    raw = ctx.raw_metrics or {}
    targets, decided = raw.get(TARGET_METRIC) or {}, raw.get(DECIDED_METRIC) or {}
    newest: tuple[float, float] | None = None
    for replica, series in targets.items():
        target, at = _last(series), _last(decided.get(replica))
        if target is not None and at is not None and (newest is None or at > newest[0]):
            newest = (at, target)
    if newest is None:
        if ctx.current_num_replicas == 0 and (ctx.total_num_requests or 0) > 0:
            return max(ctx.target_num_replicas, 1), {}
        return ctx.target_num_replicas, {}
    return newest[1], {}
