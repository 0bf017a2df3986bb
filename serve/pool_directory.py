"""PoolDirectory: this process's live view of every engine pool, as EndpointState snapshots.

Ray Serve constructs request routers itself (from a class path) inside each process that holds a
deployment handle, so the routers cannot be handed an object. Each ``PdRequestRouter`` registers
with the process's ``DIRECTORY`` by pool name; the orchestrator reads snapshots from it. This is
the single process-level object in the code base, and it only mirrors state Serve already keeps.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from router.types import EndpointState, PoolSnapshot, Role

if TYPE_CHECKING:
    from serve.flex import FlexRoles

# the load an engine reports (WorkerStats fields) that EndpointState mirrors
LOAD_FIELDS = ("num_running", "num_waiting", "kv_usage", "kv_capacity_tokens", "priority_step_tokens")


def load_fields(stats: Mapping) -> dict:
    """EndpointState's load fields (and ``updated_s``) from a stats mapping: ``WorkerStats.to_dict()``
    or a poll record; missing values count as zero."""
    return {
        "num_running": int(stats.get("num_running") or 0),
        "num_waiting": int(stats.get("num_waiting") or 0),
        "kv_usage": float(stats.get("kv_usage") or 0.0),
        "kv_capacity_tokens": int(stats.get("kv_capacity_tokens") or 0),
        "priority_step_tokens": int(stats.get("priority_step_tokens") or 0),
        "updated_s": float(stats.get("updated_s") or 0.0),
    }


class EndpointSource(Protocol):
    def endpoints(self) -> list[EndpointState]: ...


class PoolDirectory:
    """Which replicas exist comes from Serve (the routers); how loaded and alive they are comes
    from the ingress's own stats polls (``update_stats``), which are fresher than Serve's
    routing-stats broadcast. A replica whose polls have failed for ``stale_s`` is unhealthy, and so is
    one a call just failed on (:meth:`suspect`) until a stats snapshot taken after that failure vouches
    for it."""

    def __init__(self, clock: Callable[[], float] = time.time, stale_s: float = 10.0) -> None:
        self._lock = threading.Lock()
        self._sources: dict[str, EndpointSource] = {}
        self._polled: dict[str, dict] = {}
        self._suspect: dict[str, float] = {}  # endpoint -> when a call to it failed (clock time)
        self.registrations: dict[str, int] = {}
        self._clock = clock
        self.stale_s = stale_s
        self.flex: FlexRoles | None = None  # roles of the flex pools' replicas (serve/flex.py)

    def register(self, pool: str, source: EndpointSource) -> None:
        """Serve builds one router per handle *variant* (e.g. ``.options(stream=True)``); they all
        see the same replicas, so the latest registration simply replaces the previous one."""
        with self._lock:
            self._sources[pool] = source
            self.registrations[pool] = self.registrations.get(pool, 0) + 1

    def poll_ages(self) -> dict[str, float]:
        """Seconds since each replica's last successful stats poll (for /health)."""
        now = self._clock()
        with self._lock:
            return {k: round(now - float(v.get("updated_s", 0.0)), 2) for k, v in self._polled.items()}

    def pools(self) -> list[str]:
        with self._lock:
            return sorted(self._sources)

    def update_stats(self, endpoint_id: str, fields: dict) -> None:
        """Record a successful stats poll of one replica (``fields`` include ``updated_s``, when it was
        received, and ``reported_s``, when the replica took the snapshot)."""
        with self._lock:
            self._polled[endpoint_id] = fields
            if float(fields.get("reported_s") or 0.0) > self._suspect.get(endpoint_id, float("inf")):
                del self._suspect[endpoint_id]

    def suspect(self, endpoint_id: str) -> None:
        """A call to this replica failed the way a dead engine or replica fails: route around it at once,
        without waiting for its stats to say so (a poll in flight may still carry its last healthy word)."""
        with self._lock:
            self._suspect[endpoint_id] = self._clock()

    def snapshot(
        self,
        in_flight: Mapping[str, int] | None = None,
        queued_by_priority: Mapping[str, tuple[tuple[int, int], ...]] | None = None,
    ) -> PoolSnapshot:
        """``queued_by_priority``: endpoint -> ((engine priority, queued prefill tokens), ...)."""
        in_flight = in_flight or {}
        queued_by_priority = queued_by_priority or {}
        now = self._clock()
        with self._lock:
            sources = list(self._sources.values())
            polled = dict(self._polled)
            suspects = set(self._suspect)
        endpoints = [
            self._merge(
                e,
                polled.get(e.endpoint_id),
                in_flight.get(e.endpoint_id, 0),
                now,
                queued_by_priority.get(e.endpoint_id, ()),
                e.endpoint_id in suspects,
            )
            for e in self._listed(sources)
        ]
        live = {e.endpoint_id for e in endpoints}
        if self.flex is not None:
            self.flex.forget(live)
        with self._lock:  # forget replicas Serve no longer lists
            for gone in set(self._polled) - live:
                self._polled.pop(gone, None)
            for gone in set(self._suspect) - live:
                self._suspect.pop(gone, None)
        return PoolSnapshot(endpoints=endpoints, taken_s=now)

    def _listed(self, sources: list[EndpointSource]) -> list[EndpointState]:
        """The replicas Serve lists, flex pools' ones in the role they serve now."""
        listed = [e for src in sources for e in src.endpoints()]
        return self.flex.assign(listed) if self.flex is not None else listed

    def _merge(
        self,
        e: EndpointState,
        polled: Mapping | None,
        in_flight: int,
        now: float,
        by_priority: tuple[tuple[int, int], ...] = (),
        suspect: bool = False,
    ) -> EndpointState:
        queued_tokens = sum(t for _, t in by_priority)
        if polled is None:  # not polled yet: Serve lists it as running, so it is routable
            return dataclasses.replace(
                e,
                healthy=not suspect,
                in_flight=in_flight,
                queued_prefill_tokens=queued_tokens,
                queued_prefill_by_priority=by_priority,
            )
        load = load_fields(polled)
        fresh = now - load["updated_s"] <= self.stale_s
        healthy = bool(polled.get("healthy", True)) and fresh and not suspect
        return dataclasses.replace(
            e,
            healthy=healthy,
            in_flight=in_flight,
            queued_prefill_tokens=queued_tokens,
            queued_prefill_by_priority=by_priority,
            **load,
        )


def endpoint_from_stats(endpoint_id: str, pool: str, role: Role, stats: Mapping | None) -> EndpointState:
    """A replica as Serve lists it, with the load its last routing stats reported (if any)."""
    return EndpointState(endpoint_id=endpoint_id, pool=pool, role=role, healthy=True, **load_fields(stats or {}))


DIRECTORY = PoolDirectory()
