"""PoolDirectory: this process's live view of every engine pool, as EndpointState snapshots.

Ray Serve constructs request routers itself (from a class path) inside each process that holds a
deployment handle, so the routers cannot be handed an object. Each ``PdRequestRouter`` registers
with the process's ``DIRECTORY`` by pool name; the orchestrator reads snapshots from it. This is
the single process-level object in the code base, and it only mirrors state Serve already keeps.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Mapping, Protocol

from router.types import EndpointState, PoolSnapshot, Role


class EndpointSource(Protocol):
    def endpoints(self) -> list[EndpointState]: ...


class PoolDirectory:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._sources: dict[str, EndpointSource] = {}
        self._overrides: dict[str, dict] = {}
        self._clock = clock

    def register(self, pool: str, source: EndpointSource) -> None:
        with self._lock:
            self._sources[pool] = source

    def pools(self) -> list[str]:
        with self._lock:
            return sorted(self._sources)

    def update_stats(self, endpoint_id: str, fields: dict) -> None:
        """Fresher stats than Serve's periodic routing stats (from the orchestrator's own polls)."""
        with self._lock:
            self._overrides[endpoint_id] = fields

    def snapshot(self, in_flight: Mapping[str, int] | None = None) -> PoolSnapshot:
        in_flight = in_flight or {}
        with self._lock:
            sources = list(self._sources.values())
            overrides = dict(self._overrides)
        endpoints: list[EndpointState] = []
        for src in sources:
            for e in src.endpoints():
                o = overrides.get(e.endpoint_id)
                if o is not None and o.get("updated_s", 0) >= e.updated_s:
                    e = _with_stats(e, o)
                endpoints.append(_replace_in_flight(e, in_flight.get(e.endpoint_id, 0)))
        return PoolSnapshot(endpoints=endpoints, taken_s=self._clock())


def endpoint_from_stats(endpoint_id: str, pool: str, role: Role, stats: Mapping | None,
                        now_s: float, stale_s: float) -> EndpointState:
    """Routing stats dict (WorkerStats.to_dict) -> EndpointState. No stats yet counts as healthy:
    a fresh replica is routable before its first stats poll."""
    if not stats:
        return EndpointState(endpoint_id=endpoint_id, pool=pool, role=role, healthy=True, updated_s=0.0)
    updated = float(stats.get("updated_s") or 0.0)
    fresh = updated == 0.0 or now_s - updated <= stale_s
    return EndpointState(
        endpoint_id=endpoint_id, pool=pool, role=role,
        healthy=bool(stats.get("healthy", True)) and fresh,
        num_running=int(stats.get("num_running", 0)), num_waiting=int(stats.get("num_waiting", 0)),
        kv_usage=float(stats.get("kv_usage", 0.0)), updated_s=updated,
    )


def _with_stats(e: EndpointState, o: Mapping) -> EndpointState:
    return EndpointState(endpoint_id=e.endpoint_id, pool=e.pool, role=e.role,
                         healthy=e.healthy and bool(o.get("healthy", True)),
                         num_running=int(o.get("num_running", 0)), num_waiting=int(o.get("num_waiting", 0)),
                         kv_usage=float(o.get("kv_usage", 0.0)), in_flight=e.in_flight,
                         updated_s=float(o.get("updated_s", 0.0)))


def _replace_in_flight(e: EndpointState, n: int) -> EndpointState:
    return EndpointState(endpoint_id=e.endpoint_id, pool=e.pool, role=e.role, healthy=e.healthy,
                         num_running=e.num_running, num_waiting=e.num_waiting, kv_usage=e.kv_usage,
                         in_flight=n, updated_s=e.updated_s)


DIRECTORY = PoolDirectory()
