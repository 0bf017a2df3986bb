"""Role flips of ``role: flex`` pools in the ingress: the role registry and the flip procedure.

Every engine is ``kv_both``: a replica's role is only which work the router sends it. :class:`FlexRoles` holds
the role of each flex replica; the pool directory (serve/pool_directory.py) lists the replica in that role, or
as ``draining`` out of it while it flips (the policy then sees it in no role). :class:`FlexManager` measures each
flex pool's demand from the routed requests, runs the pure controller (router/flex.py) from the planner's loop
every ``flex.interval_s``, and flips a replica: mark it draining, wait (at most ``flex.drain_timeout_s``) until the
orchestrator has no call of the old role in flight on it, switch its role. No engine restart, no weight reload.
Work routed to the replica before the mark that reaches it after the switch (a decode whose remote prefill was
still running) is served all the same: the engine does both.

Metrics: ``pdserve_flex_role{pool,replica,role}`` (1 for the replica's role: prefill, decode or draining),
``pdserve_flex_flips_total{pool,from,to,reason}``, ``pdserve_flex_flip_seconds{pool}`` (mark to switch),
``pdserve_flex_decisions_total{pool,reason}`` and ``pdserve_flex_desired_prefill{pool}``.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from router.autoscale import Arrival, DemandWindow
from router.config import RouterConfig
from router.cost_model import CostModel
from router.flex import (
    FlexController,
    FlexControllerSettings,
    FlexDecision,
    FlexDemand,
    FlexReplica,
    capacity_from_model,
)
from router.pipeline import new_cost_model
from router.types import EndpointState, PoolSnapshot, Rejection, RequestDescriptor, Role, RoutingDecision
from serve.metrics import ClusterMetrics
from workers.config import FlexSettings, PoolConfig, PoolRole

logger = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05  # seconds between looks at a flipping replica's in-flight calls
FLEX_ROLES = ("prefill", "decode", "draining")


@dataclass(slots=True)
class _Assignment:
    role: Role
    to: Role | None = None  # set while draining out of ``role``


class FlexRoles:
    """Role of every replica of the flex pools (thread-safe: read by the directory, changed by flips)."""

    def __init__(self, pools: Mapping[str, FlexSettings]) -> None:
        self._settings = dict(pools)
        self._lock = threading.Lock()
        self._roles: dict[str, dict[str, _Assignment]] = {p: {} for p in pools}

    def pools(self) -> list[str]:
        return sorted(self._settings)

    def assign(self, endpoints: list[EndpointState]) -> list[EndpointState]:
        """``endpoints`` with every flex replica in its role (``draining`` while it flips). A replica seen for
        the first time gets one: prefill while its pool has fewer than ``initial_prefill`` prefill replicas and
        ``min_decode`` decode ones, else decode (decode first: a pool starting up can serve at once)."""
        with self._lock:
            for e in sorted(endpoints, key=lambda e: e.endpoint_id):
                roles = self._roles.get(e.pool)
                if roles is None or e.endpoint_id in roles:
                    continue
                f = self._settings[e.pool]
                n_prefill = sum(a.role is Role.PREFILL for a in roles.values())
                n_decode = len(roles) - n_prefill
                role = Role.PREFILL if n_prefill < f.initial_prefill and n_decode >= f.min_decode else Role.DECODE
                roles[e.endpoint_id] = _Assignment(role)
                logger.info("flex pool %s: replica %s starts as %s", e.pool, e.endpoint_id, role.value)
            return [self._overlay(e) for e in endpoints]

    def _overlay(self, e: EndpointState) -> EndpointState:
        a = self._roles.get(e.pool, {}).get(e.endpoint_id)
        if a is None:
            return e
        return dataclasses.replace(e, role=a.role, draining=a.to is not None)

    def forget(self, live: set[str]) -> None:
        """Drop the replicas Serve no longer lists."""
        with self._lock:
            for roles in self._roles.values():
                for gone in set(roles) - live:
                    del roles[gone]

    def begin(self, pool: str, endpoint_id: str, to: Role) -> None:
        """The replica stops getting work of its current role."""
        with self._lock:
            self._roles[pool][endpoint_id].to = to

    def switch(self, pool: str, endpoint_id: str) -> None:
        """The replica gets work of the role it drained towards."""
        with self._lock:
            a = self._roles[pool].get(endpoint_id)
            if a is not None and a.to is not None:
                a.role, a.to = a.to, None

    def flipping(self, pool: str) -> bool:
        with self._lock:
            return any(a.to is not None for a in self._roles[pool].values())

    def report(self) -> dict[str, dict[str, str]]:
        """pool -> replica -> ``prefill``, ``decode``, or ``<old>-><new>`` while it flips (for /health)."""
        with self._lock:
            return {pool: {e: _label(a) for e, a in sorted(roles.items())} for pool, roles in self._roles.items()}


def _label(a: _Assignment) -> str:
    return a.role.value if a.to is None else f"{a.role.value}->{a.to.value}"


def flex_roles(pools: list[PoolConfig]) -> FlexRoles | None:
    """The registry of the config's flex pools; None without one."""
    flex = {p.name: p.flex for p in pools if p.role is PoolRole.FLEX}
    return FlexRoles(flex) if flex else None


def controller_settings(f: FlexSettings) -> FlexControllerSettings:
    return FlexControllerSettings(
        min_prefill=f.min_prefill,
        min_decode=f.min_decode,
        dwell_s=f.dwell_s,
        hysteresis=f.hysteresis,
        confirm_intervals=f.confirm_intervals,
        min_load=f.min_load,
    )


class FlexManager:
    """Demand, decisions and flips of the flex pools (see the module docstring)."""

    def __init__(
        self,
        pools: list[PoolConfig],
        router: RouterConfig,
        roles: FlexRoles,
        metrics: ClusterMetrics,
        in_flight: Callable[[], Mapping[str, int]],
        cost_model: Callable[[str], CostModel] | None,
        tpot_slo_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.roles = roles
        self._cfg = {p.name: p for p in pools if p.role is PoolRole.FLEX}
        self._metrics = metrics
        self._in_flight = in_flight
        self._models: dict[str, CostModel] = {}
        self._cost_model = cost_model or (lambda pool: self._models.setdefault(pool, new_cost_model(router)))
        self._tpot_slo_s = tpot_slo_s
        self._clock = clock
        self.controllers = {n: FlexController(controller_settings(p.flex)) for n, p in self._cfg.items()}
        self.demand = {n: DemandWindow(p.flex.demand_window_s) for n, p in self._cfg.items()}
        self.last: dict[str, FlexDecision] = {}
        self._due: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._gauged: set[tuple[str, str]] = set()

    def interval_s(self) -> float:
        return min(p.flex.interval_s for p in self._cfg.values())

    # -- demand (the orchestrator's on_routed, through the planner) -------------------------------------
    def on_routed(self, req: RequestDescriptor, outcome: RoutingDecision | Rejection, moved: bool = False) -> None:
        if moved:
            return
        now = self._clock()
        if isinstance(outcome, Rejection):  # refused for want of capacity: demand on every flex pool
            for w in self.demand.values():
                w.add(Arrival(now, req.num_prompt_tokens, req.max_new_tokens, refused=True))
            return
        prefill_pool = (outcome.prefill or outcome.decode).pool
        out = outcome.max_new_tokens or req.max_new_tokens
        for pool, w in self.demand.items():
            prompt = outcome.uncached_tokens if pool == prefill_pool else 0
            output = out if pool == outcome.decode.pool else 0
            if prompt or output:
                w.add(Arrival(now, prompt, output, refused=False))

    def measured(self, pool: str, now_s: float) -> FlexDemand:
        d = self.demand[pool].demand(now_s)
        return FlexDemand(d.rate_per_s * d.mean_prompt_tokens, d.rate_per_s * d.mean_output_tokens)

    # -- decisions ---------------------------------------------------------------------------------------
    def step(self, snapshot: PoolSnapshot) -> dict[str, FlexDecision]:
        """Decide for every flex pool whose interval is due; start the flips decided. Returns the decisions."""
        now = self._clock()
        out = {}
        for pool, ctl in self.controllers.items():
            if now < self._due.get(pool, 0.0):
                continue
            self._due[pool] = now + self._cfg[pool].flex.interval_s
            mine = [e for e in snapshot.endpoints if e.pool == pool]
            self._export_roles(pool, mine)
            replicas = [FlexReplica(e.endpoint_id, e.role, e.load, e.healthy) for e in mine]
            demand = self.measured(pool, now)
            capacity = capacity_from_model(
                self._cost_model(pool), self._tpot_slo_s, self._cfg[pool].engine.max_num_seqs
            )
            d = ctl.decide(now, replicas, demand, capacity, flipping=self.roles.flipping(pool))
            self.last[pool] = out[pool] = d
            self._metrics.flex_decisions.labels(pool, d.reason).inc()
            self._metrics.flex_desired_prefill.labels(pool).set(d.desired_prefill)
            log = logger.info if d.flips else logger.debug
            log(
                "flex %s: %s (prefill %d of %d, desired %.2f; demand prefill %.0f tok/s, decode %.0f tok/s; "
                "capacity per replica prefill %.0f tok/s, decode %.0f tok/s)%s",
                pool,
                d.reason,
                d.current_prefill,
                len(replicas),
                d.desired_prefill,
                demand.prefill_tokens_per_s,
                demand.decode_tokens_per_s,
                capacity.prefill_tokens_per_s,
                capacity.decode_tokens_per_s,
                f": flip {d.endpoint_id} {d.from_role.value} -> {d.to_role.value}" if d.flips else "",
            )
            if d.flips:
                task = asyncio.get_running_loop().create_task(
                    self.flip(pool, d.endpoint_id, d.to_role, d.reason), context=contextvars.Context()
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return out

    # -- the flip ----------------------------------------------------------------------------------------
    async def flip(self, pool: str, endpoint_id: str, to: Role, reason: str) -> float:
        """Drain ``endpoint_id`` of its role's in-flight calls (bounded), switch it to ``to``; the seconds taken."""
        frm = Role.DECODE if to is Role.PREFILL else Role.PREFILL
        t0 = self._clock()
        self.roles.begin(pool, endpoint_id, to)
        self._set_role_gauge(pool, endpoint_id, "draining")
        deadline = t0 + self._cfg[pool].flex.drain_timeout_s
        while self._in_flight().get(endpoint_id, 0) > 0 and self._clock() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        left = self._in_flight().get(endpoint_id, 0)
        self.roles.switch(pool, endpoint_id)
        done = self._clock()
        self.controllers[pool].applied(done)
        self._set_role_gauge(pool, endpoint_id, to.value)
        self._metrics.flex_flips.labels(pool, frm.value, to.value, reason).inc()
        self._metrics.flex_flip_s.labels(pool).observe(done - t0)
        logger.info(
            "flex %s: replica %s flipped %s -> %s (%s) in %.2fs%s",
            pool,
            endpoint_id,
            frm.value,
            to.value,
            reason,
            done - t0,
            f"; drain timed out with {left} calls of the old role in flight" if left else "",
        )
        return done - t0

    # -- metrics and /health -----------------------------------------------------------------------------
    def _export_roles(self, pool: str, endpoints: list[EndpointState]) -> None:
        live = {e.endpoint_id for e in endpoints}
        for p, eid in list(self._gauged):
            if p == pool and eid not in live:
                for role in FLEX_ROLES:
                    self._metrics.flex_role.remove(pool, eid, role)
                self._gauged.discard((p, eid))
        for e in endpoints:
            self._set_role_gauge(pool, e.endpoint_id, "draining" if e.draining else e.role.value)

    def _set_role_gauge(self, pool: str, endpoint_id: str, role: str) -> None:
        self._gauged.add((pool, endpoint_id))
        for r in FLEX_ROLES:
            self._metrics.flex_role.labels(pool, endpoint_id, r).set(1.0 if r == role else 0.0)

    def report(self) -> dict[str, dict[str, str]]:
        return self.roles.report()
