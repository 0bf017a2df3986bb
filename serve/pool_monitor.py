"""PoolMonitor: a background task that polls every engine replica's stats.

The cache feeds /metrics, /health and (fresher than Serve's routing-stats broadcast) the routing
snapshot. Polls never block the request path: routing reads the last cached value.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from serve.metrics import ClusterMetrics
from serve.pool_directory import LOAD_FIELDS, PoolDirectory
from workers.messages import WorkerStats

logger = logging.getLogger(__name__)


class PoolMonitor:
    def __init__(
        self,
        handles: Mapping[str, Any],
        directory: PoolDirectory,
        metrics: ClusterMetrics | None,
        period_s: float,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        on_stats: Callable[[WorkerStats], None] | None = None,
        on_poll: Callable[[list[WorkerStats]], None] | None = None,
        lazy: frozenset[str] = frozenset(),
    ) -> None:
        """``lazy``: pools that may have no replica (``replicas.min: 0``); they get no first call from here,
        which would queue at an empty pool's handle and start a replica (serve/cold_start.py wakes them)."""
        self._lazy = lazy
        self._on_stats = on_stats
        self._on_poll = on_poll
        self._handles = handles
        self._directory = directory
        self._metrics = metrics
        self._period_s = period_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._cache: dict[str, WorkerStats] = {}
        self._task: asyncio.Task | None = None

    def ensure_started(self) -> None:
        if self._task is None or self._task.done():
            # A fresh context: started from inside an HTTP request, the task would otherwise
            # inherit that request's Serve context, and every poll would carry the same
            # internal request id, which Serve's router uses to match a chosen replica back to
            # its request; concurrent polls would then receive each other's replicas.
            self._task = asyncio.get_running_loop().create_task(self._run(), context=contextvars.Context())

    def stats(self) -> list[WorkerStats]:
        return list(self._cache.values())

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a poll failure must never kill the monitor
                logger.exception("pool stats poll failed")
            await asyncio.sleep(self._period_s)

    async def poll_once(self) -> None:
        known = set(self._directory.pools())
        calls = []
        for pool, handle in self._handles.items():
            if pool not in known and pool not in self._lazy:  # first call creates the handle's request router
                calls.append(self._poll(handle, None))
        for e in self._directory.snapshot().endpoints:
            calls.append(self._poll(self._handles[e.pool], e.endpoint_id))
        results = await asyncio.gather(*calls, return_exceptions=True)
        live = {e.endpoint_id for e in self._directory.snapshot().endpoints}
        for r in results:
            if isinstance(r, WorkerStats):
                self._cache[r.endpoint_id] = r
                self._directory.update_stats(
                    r.endpoint_id,
                    {
                        "healthy": r.healthy,
                        **{k: getattr(r, k) for k in LOAD_FIELDS},
                        "updated_s": self._clock(),
                        "reported_s": r.updated_s,
                    },
                )
                if self._metrics is not None:
                    self._metrics.observe_handoff_durations(r.kv_transfer_durations_s)
                if self._on_stats is not None:
                    try:
                        self._on_stats(r)
                    except Exception:  # calibration must never break polling
                        logger.exception("stats hook failed")
        for gone in set(self._cache) - live:
            if live:
                del self._cache[gone]
        if self._on_poll is not None:
            try:
                self._on_poll(self.stats())
            except Exception:
                logger.exception("poll hook failed")

    async def _poll(self, handle: Any, endpoint_id: str | None) -> WorkerStats | None:
        resp = handle.stats.remote(drain=True, endpoint_hint=endpoint_id)
        try:
            d = await asyncio.wait_for(resp, timeout=self._timeout_s)
        except Exception as e:  # includes asyncio.TimeoutError
            resp.cancel()  # a slow answer is not a verdict: staleness + Serve's health checks decide
            logger.debug("stats poll of %s failed: %r", endpoint_id, e)
            return None
        # if the hinted replica is gone Serve answers from another one; stats carry their own id
        return WorkerStats.from_dict(d)
