"""Scale from zero: wake an empty autoscaled pool and hold the request that needs it until a replica runs.

A pool with ``replicas.min: 0`` and ``autoscaling.enabled`` may have no replica; the planner then has no
replica to hand its target to (serve/planner.py), and the router has nowhere to send a request. Waking a pool
queues one call (``set_replica_target`` with the pool's target) at the pool's Serve handle: Serve's router
pushes the handle's queued requests to its controller at once when a deployment has no replica, the pool's
autoscaling policy (serve/autoscale_policy.py) answers at least one replica for them, and the new replica
receives that call first. One wake per pool is outstanding at a time; it is cancelled after the pool's
``autoscaling.cold_start_timeout_s``.

- No healthy decode replica and an empty decode pool that scales from zero: the request waits (:meth:`ColdStart.ready`)
  until the pool has a replica, at most ``cold_start_timeout_s``; a wake that fails ends the wait at once.
  Either way the client gets 503 ``cold_start_timeout`` / ``cold_start_failed`` with Retry-After, in the
  OpenAI error shape. Outcomes count in ``pdserve_cold_start_waits_total{pool,outcome}``.
- Empty prefill pools never hold a request: it prefills on its decode replica, and the planner counts its
  prompt as demand on them; when the planner's target for one rises above zero it calls :meth:`ColdStart.wake`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from router.types import PoolSnapshot, Role
from serve.metrics import ClusterMetrics
from serve.protocol import ApiError
from workers.config import PoolConfig

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting request looks for the pool's first replica
RETRY_AFTER_S = 10.0  # what a request that waited in vain is told: the replica may be close


class ColdStartPlanner(Protocol):
    def cold_start(self, pool: str, hold_s: float) -> tuple[int, float]: ...


class ColdStart:
    def __init__(
        self,
        pools: list[PoolConfig],
        handles: Mapping[str, Any],
        planner: ColdStartPlanner,
        metrics: ClusterMetrics,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = POLL_S,
    ) -> None:
        self._cfg = {p.name: p for p in pools}
        self._decode = [p.name for p in pools if p.role.value == "decode" and p.scales_from_zero]
        self._handles = handles
        self._planner = planner
        self._metrics = metrics
        self._clock = clock
        self._poll_s = poll_s
        self.wakes: dict[str, asyncio.Task] = {}

    def timeout_s(self, pool: str) -> float:
        return self._cfg[pool].autoscaling.cold_start_timeout_s

    # -- waking a pool --------------------------------------------------------------------------------
    def waking(self, pool: str) -> bool:
        task = self.wakes.get(pool)
        return task is not None and not task.done()

    def wake(self, pool: str, target: int, decided_s: float) -> None:
        """Queue the pool's target at its handle (no-op while a wake of the pool is outstanding)."""
        if self.waking(pool) or pool not in self._handles:
            return
        logger.info("waking pool %s (target %d replicas)", pool, target)
        # a fresh context: a task started from a request must not carry that request's Serve context
        self.wakes[pool] = asyncio.get_running_loop().create_task(
            self._wake(pool, target, decided_s), context=contextvars.Context()
        )

    async def _wake(self, pool: str, target: int, decided_s: float) -> None:
        t0 = self._clock()
        resp = self._handles[pool].set_replica_target.remote(target, decided_s)
        try:
            await asyncio.wait_for(resp, timeout=self.timeout_s(pool))
        except BaseException as e:
            resp.cancel()
            logger.warning("waking pool %s failed after %.1fs: %r", pool, self._clock() - t0, e)
            raise
        logger.info("pool %s woke: its first replica answered after %.1fs", pool, self._clock() - t0)

    def _wake_failed(self, pool: str) -> bool:
        task = self.wakes.get(pool)
        return task is not None and task.done() and (task.cancelled() or task.exception() is not None)

    # -- a request that needs a decode replica --------------------------------------------------------
    async def ready(self, snapshot: Callable[[], PoolSnapshot]) -> None:
        """Return once a healthy decode replica exists; with none, wake the first empty decode pool that scales
        from zero and wait for it (bounded). Without such a pool (e.g. its replicas exist but are unhealthy),
        return at once: the router answers 503."""
        if not self._decode:  # no decode pool scales from zero: nothing to wait for (no snapshot per request)
            return
        snap = snapshot()
        if _has_decode(snap):
            return
        present = {e.pool for e in snap.endpoints}
        pool = next((p for p in self._decode if p not in present), None)
        if pool is None:
            return
        if not self.waking(pool):
            target, decided_s = self._planner.cold_start(pool, self.timeout_s(pool))
            self.wake(pool, target, decided_s)
        t0 = self._clock()
        deadline = t0 + self.timeout_s(pool)
        while True:
            if _has_decode(snapshot()):
                self._metrics.cold_start_waits.labels(pool, "served").inc()
                logger.info("a request waited %.1fs for pool %s's first replica", self._clock() - t0, pool)
                return
            failed = self._wake_failed(pool)
            left = deadline - self._clock()
            if failed or left <= 0:
                outcome = "failed" if failed else "timeout"
                self._metrics.cold_start_waits.labels(pool, outcome).inc()
                raise cold_start_error(pool, outcome, self._clock() - t0)
            await asyncio.sleep(min(self._poll_s, left))


def _has_decode(snap: PoolSnapshot) -> bool:
    return any(e.healthy and e.role is Role.DECODE for e in snap.endpoints)


def cold_start_error(pool: str, outcome: str, waited_s: float) -> ApiError:
    """503 for a request whose decode pool did not start in time (``timeout``) or failed to (``failed``)."""
    what = "did not start a replica in time" if outcome == "timeout" else "failed to start a replica"
    return ApiError(
        503,
        f"decode pool {pool!r} was scaled to zero and {what} ({waited_s:.0f}s); retry later",
        type_="overloaded_error",
        code=f"cold_start_{outcome}",
        retry_after_s=RETRY_AFTER_S,
    )
