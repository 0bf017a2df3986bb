"""The ingress's autoscaling planner: signals of every pool, replica targets of the autoscaled ones.

It observes what the orchestrator routes (``on_routed``: every arrival, refused ones included;
``on_first_token`` / ``on_finish``: observed against predicted latencies), and a background task runs one
:class:`router.pool_planner.PoolPlanner` step per pool every ``autoscaling.adjustment_interval_s`` (pools
without autoscaling: every 10 s, signals only). A pool with ``autoscaling.enabled`` gets its stabilized target
handed to each of its replicas with the time it was decided (``set_replica_target``); Serve's controller
reads both back as custom autoscaling metrics (serve/autoscale_policy.py) and scales the deployment.
Every decision is logged with its reason and counted (``pdserve_planner_decisions_total{pool,reason}``);
the signals are the ``pdserve_planner_*`` gauges.

Scale from zero (pools with ``replicas.min: 0``): an empty pool has no replica to hand its target to, so a
target above zero for it goes to ``wake`` (serve/cold_start.py), which queues the call at the pool's handle
where Serve's controller sees it. A request admitted while the prefill pools are empty prefills on its decode
replica, and its uncached prompt counts as demand on those empty prefill pools (their planner then scales one
up). A request that finds no decode replica waits for one: :meth:`Planner.cold_start` (reason
``cold_start``) sets the pool's target to at least 1 and holds it there until a replica runs or the wait's
bound passes. The same loop runs the flex pools' role controller
(serve/flex.py, ``flex.interval_s``) and feeds it the routed requests; a flex pool's own planner is signals
only, counted as a decode pool.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from router.autoscale import Decision, StabilizerSettings
from router.config import RouterConfig
from router.cost_model import CostModel
from router.pipeline import new_cost_model
from router.pool_planner import PlannerSettings, PoolPlanner, Signals
from router.types import PoolSnapshot, Rejection, RequestDescriptor, Role, RoutingDecision
from serve.metrics import ClusterMetrics
from workers.config import PoolConfig, PoolRole

if TYPE_CHECKING:
    from serve.flex import FlexManager

logger = logging.getLogger(__name__)

SIGNALS_ONLY_INTERVAL_S = 10.0
TARGET_CALL_TIMEOUT_S = 2.0


def strictest_slo_s(cfg: RouterConfig) -> tuple[float, float]:
    """(TTFT, TPOT) SLO in seconds the plan must meet: the tightest over the router's default and its tiers."""
    slos = [cfg.slo] + [t.slo for t in cfg.qos_tiers.values() if t.slo is not None]
    return min(s.ttft_ms for s in slos) / 1e3, min(s.tpot_ms for s in slos) / 1e3


def planner_settings(pool: PoolConfig, router: RouterConfig) -> PlannerSettings:
    a = pool.autoscaling
    ttft_s, tpot_s = strictest_slo_s(router)
    return PlannerSettings(
        predictor=a.predictor,
        demand_window_s=a.demand_window_s,
        utilization=a.utilization,
        ttft_slo_s=ttft_s,
        tpot_slo_s=tpot_s,
        max_batch=pool.engine.max_num_seqs,
        stabilizer=StabilizerSettings(a.upscale_delay_s, a.downscale_delay_s, a.max_step, a.cooldown_s),
    )


class Planner:
    def __init__(
        self,
        pools: list[PoolConfig],
        router: RouterConfig,
        metrics: ClusterMetrics,
        cost_model: Callable[[str], CostModel] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        flex: FlexManager | None = None,
    ) -> None:
        """``clock`` times the planning; ``wall`` stamps each decision (Serve orders replicas' reports by it);
        ``flex``: the flex pools' role controller, run from the same loop."""
        self._cfg = {p.name: p for p in pools}
        self.flex = flex
        self._wall = wall
        self._metrics = metrics
        self._clock = clock
        self._models: dict[str, CostModel] = {}
        self._cost_model = cost_model or self._own_model
        self._router = router
        self.planners = {
            p.name: PoolPlanner(
                p.name,
                Role.DECODE if p.role is PoolRole.FLEX else Role(p.role.value),
                planner_settings(p, router),
                p.replicas.min,
                p.replicas.max,
                p.replicas.min if p.scales_from_zero else max(1, p.replicas.min),
            )
            for p in pools
        }
        self._empty = {p.name for p in pools if p.replicas.min == 0}  # pools with no replica at the last step
        self._floor_until: dict[str, float] = {}  # woken pools: keep one replica until a replica runs or this
        self.wake: Callable[[str, int, float], None] | None = None  # (pool, target, decided_s) of an empty pool
        self._due: dict[str, float] = {}
        self.targets: dict[str, int] = {}  # autoscaled pools' latest targets
        self.decided_s: dict[str, float] = {}  # wall-clock time of each target's decision
        self.last: dict[str, tuple[Signals, Decision]] = {}
        self._task: asyncio.Task | None = None

    def _own_model(self, pool: str) -> CostModel:
        """A policy without cost models (the baselines) plans on the router's priors."""
        m = self._models.get(pool)
        if m is None:
            m = self._models[pool] = new_cost_model(self._router)
        return m

    def autoscaled(self, pool: str) -> bool:
        return self._cfg[pool].autoscaling.enabled

    def interval_s(self, pool: str) -> float:
        a = self._cfg[pool].autoscaling
        return a.adjustment_interval_s if a.enabled else SIGNALS_ONLY_INTERVAL_S

    # -- the orchestrator's hooks ---------------------------------------------------------------------
    def on_routed(self, req: RequestDescriptor, outcome: RoutingDecision | Rejection, moved: bool = False) -> None:
        if self.flex is not None:
            self.flex.on_routed(req, outcome, moved)
        if moved:
            return
        now = self._clock()
        if isinstance(outcome, Rejection):  # refused for want of capacity: demand on every pool
            for p in self.planners.values():
                p.on_arrival(now, req.num_prompt_tokens, req.max_new_tokens, refused=True)
            return
        out = outcome.max_new_tokens or req.max_new_tokens
        prefill_pool = outcome.prefill.pool if outcome.prefill else outcome.decode.pool
        for pool in {outcome.decode.pool, prefill_pool}:
            uncached = outcome.uncached_tokens if pool == prefill_pool else 0
            if pool in self.planners:
                self.planners[pool].on_arrival(now, uncached, out, refused=False)
        if outcome.prefill is None:  # prefilled on its decode replica: demand on the empty prefill pools
            for pool in self._empty:
                if self.planners[pool].role is Role.PREFILL:
                    self.planners[pool].on_arrival(now, outcome.uncached_tokens, 0, refused=False)

    def on_first_token(self, decision: RoutingDecision, ttft_s: float) -> None:
        pool = decision.prefill.pool if decision.prefill else decision.decode.pool
        if pool in self.planners:
            self.planners[pool].on_ttft(ttft_s, decision.predicted_ttft_s)

    def on_finish(self, decision: RoutingDecision, tpot_s: float | None) -> None:
        if tpot_s is not None and decision.decode.pool in self.planners:
            self.planners[decision.decode.pool].on_tpot(tpot_s, decision.predicted_tpot_s)

    # -- planning ------------------------------------------------------------------------------------------
    def step(self, snapshot: PoolSnapshot) -> dict[str, int]:
        """Plan every pool whose interval is due; returns the new targets of autoscaled pools planned now."""
        now = self._clock()
        out: dict[str, int] = {}
        present = {e.pool for e in snapshot.endpoints}
        self._empty = set(self.planners) - present
        for name in present:
            self._floor_until.pop(name, None)  # woken: a replica runs
        for name, planner in self.planners.items():
            if now < self._due.get(name, 0.0):
                continue
            self._due[name] = now + self.interval_s(name)
            floor = 1.0 if now < self._floor_until.get(name, 0.0) else 0.0
            sig, decision = planner.plan(now, snapshot.endpoints, self._cost_model(name), floor)
            self.last[name] = (sig, decision)
            self._export(name, sig)
            if not self.autoscaled(name):
                continue
            self._metrics.planner["target_replicas"].labels(name).set(decision.target)
            self._metrics.planner_decisions.labels(name, decision.reason).inc()
            log = logger.info if decision.reason in ("scale_up", "scale_down") else logger.debug
            log(
                "planner %s: %s -> target %d (current %d, desired %.2f, forecast %.2f req/s, refused %.2f/s, "
                "running %d, waiting %d, queued prefill %d tokens)",
                name,
                decision.reason,
                decision.target,
                sig.current_replicas,
                sig.desired_replicas,
                sig.forecast_rate,
                sig.refused_rate,
                sig.decode_batch,
                sig.waiting,
                sig.queued_prefill_tokens,
            )
            self.targets[name] = out[name] = decision.target
            self.decided_s[name] = self._wall()
        return out

    def cold_start(self, pool: str, hold_s: float) -> tuple[int, float]:
        """A request waits for ``pool``, which has no replica: its target becomes at least 1 at once and stays
        so for ``hold_s`` or until a replica runs. Returns (target, wall-clock time of the decision)."""
        now = self._clock()
        decision = self.planners[pool].wake(now)
        self._floor_until[pool] = now + hold_s
        self._metrics.planner["target_replicas"].labels(pool).set(decision.target)
        self._metrics.planner_decisions.labels(pool, decision.reason).inc()
        logger.info("planner %s: cold_start -> target %d (a request waits for the empty pool)", pool, decision.target)
        self.targets[pool] = decision.target
        self.decided_s[pool] = self._wall()
        if pool in self.last:  # /health shows it as the pool's last decision
            self.last[pool] = (self.last[pool][0], decision)
        return decision.target, self.decided_s[pool]

    def _export(self, pool: str, sig: Signals) -> None:
        g = self._metrics.planner
        values = {
            "arrival_rate": sig.arrival_rate,
            "refused_rate": sig.refused_rate,
            "forecast_rate": sig.forecast_rate,
            "prompt_tokens_mean": sig.prompt_tokens_mean,
            "output_tokens_mean": sig.output_tokens_mean,
            "ttft_predicted_seconds": sig.ttft_predicted_s,
            "ttft_observed_seconds": sig.ttft_observed_s,
            "ttft_ratio": sig.ttft_ratio,
            "tpot_predicted_seconds": sig.tpot_predicted_s,
            "tpot_observed_seconds": sig.tpot_observed_s,
            "tpot_ratio": sig.tpot_ratio,
            "queued_prefill_tokens": sig.queued_prefill_tokens,
            "decode_batch": sig.decode_batch,
            "waiting_requests": sig.waiting,
            "kv_usage": sig.kv_usage,
            "current_replicas": sig.current_replicas,
            "desired_replicas": sig.desired_replicas,
        }
        for name, v in values.items():
            g[name].labels(pool).set(v)

    def report(self) -> dict[str, dict[str, Any]]:
        """Per pool, for /health: the latest plan."""
        out = {}
        for name, (sig, decision) in self.last.items():
            out[name] = {
                "autoscaling": self.autoscaled(name),
                "current_replicas": sig.current_replicas,
                "desired_replicas": round(sig.desired_replicas, 3),
                "target_replicas": decision.target if self.autoscaled(name) else None,
                "last_decision": decision.reason if self.autoscaled(name) else None,
            }
        return out

    # -- the background task ---------------------------------------------------------------------------------
    def ensure_started(self, snapshot: Callable[[], PoolSnapshot], handles: Mapping[str, Any]) -> None:
        if self._task is None or self._task.done():
            # a fresh context, as PoolMonitor's: never inherit a request's Serve context
            self._task = asyncio.get_running_loop().create_task(
                self._run(snapshot, handles), context=contextvars.Context()
            )

    async def _run(self, snapshot: Callable[[], PoolSnapshot], handles: Mapping[str, Any]) -> None:
        period = min([self.interval_s(p) for p in self.planners] + ([self.flex.interval_s()] if self.flex else []))
        while True:
            try:
                snap = snapshot()
                self.step(snap)
                if self.flex is not None:
                    self.flex.step(snap)
                await self.publish(snap, handles)
            except asyncio.CancelledError:
                raise
            except Exception:  # planning must never die
                logger.exception("planner step failed")
            await asyncio.sleep(period)

    async def publish(self, snap: PoolSnapshot, handles: Mapping[str, Any]) -> None:
        """Hand every autoscaled pool's target to each of its replicas (Serve reads it back from them)."""
        calls = []
        for e in snap.endpoints:
            target = self.targets.get(e.pool)
            if target is not None and e.pool in handles:
                calls.append(self._set(handles[e.pool], e.endpoint_id, target, self.decided_s[e.pool]))
        present = {e.pool for e in snap.endpoints}
        for pool, target in self.targets.items():
            if target > 0 and pool not in present and self.wake is not None:
                self.wake(pool, target, self.decided_s[pool])  # no replica to tell: queue it at the handle
        await asyncio.gather(*calls)

    async def _set(self, handle: Any, endpoint_id: str, target: int, decided_s: float) -> None:
        resp = handle.set_replica_target.remote(target, decided_s, endpoint_hint=endpoint_id)
        try:
            await asyncio.wait_for(resp, timeout=TARGET_CALL_TIMEOUT_S)
        except Exception as e:  # the next step tries again
            resp.cancel()
            logger.debug("replica target of %s not set: %r", endpoint_id, e)
