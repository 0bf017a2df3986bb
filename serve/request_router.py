"""PdRequestRouter: the Ray Serve RequestRouter of every engine pool (thin).

Serve calls ``choose_replicas`` for each call on a pool's handle. The orchestrator has already
made the decision with the pure policy in ``router/``; it passes the chosen replica as the
``endpoint_hint`` keyword, and this router only honours it (falling back to the least-loaded
replicas if that one is no longer a candidate). Without a hint, it ranks by the replicas' reported load.
It also publishes the pool's replicas + routing stats to the process's ``PoolDirectory``.
"""

from __future__ import annotations

import logging
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from router.types import EndpointState, Role
from serve.pool_directory import endpoint_from_stats

logger = logging.getLogger(__name__)


class PdRequestRouter(RequestRouter):
    def initialize_state(self, pool: str = "", role: str = "decode") -> None:
        self._pool = pool
        # a flex pool's replicas are listed as decode here; the directory's FlexRoles gives each its role
        self._role = Role.DECODE if role == "flex" else Role(role)
        self._rng = random.Random()
        # Imported here, not at module level: Serve may ship this class by value (cloudpickle),
        # which would give it a private copy of module globals; sys.modules has the real one.
        from serve import pool_directory

        pool_directory.DIRECTORY.register(pool, self)

    def endpoints(self) -> list[EndpointState]:
        return [
            endpoint_from_stats(r.replica_id.unique_id, self._pool, self._role, r.routing_stats)
            for r in list(self.curr_replicas.values())
        ]

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Serve re-asks immediately unless told to back off: without this, replicas that are
            # momentarily full or slow to answer a queue probe turn routing into a busy loop.
            pending_request.routing_context.should_backoff = True
        hint = pending_request.kwargs.get("endpoint_hint") if pending_request is not None else None
        if hint:
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == hint]
            if chosen:
                # Strict: the policy chose this replica (its prefix cache, its KV). Serve retries
                # with backoff while it is busy; if it dies it leaves the candidates and we fall
                # back below. Callers bound the wait with their own timeouts.
                return [chosen]
        return [self._by_load(candidate_replicas)]

    def _by_load(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        def load(r: RunningReplica) -> tuple[int, float]:
            s = r.routing_stats or {}
            return (int(s.get("num_running", 0)) + int(s.get("num_waiting", 0)), self._rng.random())

        return sorted(replicas, key=load)
