"""Typed messages of the routing policy. Pure: stdlib only.

Units are in the names (``_s`` seconds, ``_tokens``); snapshots are frozen, and policy code never
mutates them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Role(str, enum.Enum):  # noqa: UP042 (StrEnum changes str() and format() to the bare value)
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class RequestDescriptor:
    """What the router knows about one request; built once at ingress (prompt already tokenised)."""

    request_id: str
    model: str
    num_prompt_tokens: int
    max_new_tokens: int
    tier: str
    arrival_s: float
    block_hashes: tuple[int, ...] = ()  # router.hashing.block_keys of the prompt's full blocks

    def __repr__(self) -> str:  # never print prompt content
        return (
            f"RequestDescriptor(id={self.request_id}, prompt_tokens={self.num_prompt_tokens}, "
            f"max_new_tokens={self.max_new_tokens}, tier={self.tier})"
        )


@dataclass(frozen=True, slots=True)
class EndpointState:
    """A snapshot of one engine replica as the router sees it."""

    endpoint_id: str
    pool: str
    role: Role
    healthy: bool
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # 0..1 of the engine's KV blocks in use
    kv_capacity_tokens: int = 0  # the engine's KV cache size in tokens (0 = not reported yet)
    in_flight: int = 0  # requests this router dispatched and has not seen finish
    queued_prefill_tokens: int = 0  # uncached prompt tokens dispatched here for prefill, not yet done
    # the same split by engine priority (vLLM semantics, lower first): ((priority, tokens), ...)
    queued_prefill_by_priority: tuple[tuple[int, int], ...] = ()
    priority_step_tokens: int = 0  # 0: the engine schedules in arrival order (see prefill_tokens_ahead)
    updated_s: float = 0.0
    draining: bool = False  # a flex replica leaving ``role``: listed, but no role's candidate (by_role)

    @property
    def context_tokens(self) -> int:
        """KV tokens its running requests hold (what a decode step attends over)."""
        return int(self.kv_usage * self.kv_capacity_tokens)

    def prefill_tokens_ahead(self, priority: int) -> int:
        """Queued prefill tokens a new request of engine ``priority`` waits for. Arrival order: all of
        them. Priority scheduling: those of equal or higher priority (ties go in arrival order), plus
        lower-priority work the engine has already taken into its running batch, which it does not
        preempt for a new arrival: at most one step's token budget."""
        if not self.priority_step_tokens or not self.queued_prefill_by_priority:
            return self.queued_prefill_tokens
        ahead = sum(t for p, t in self.queued_prefill_by_priority if p <= priority)
        return ahead + min(self.queued_prefill_tokens - ahead, self.priority_step_tokens)

    @property
    def load(self) -> int:
        """Outstanding requests: the engine's own count, or the router's if stats lag behind."""
        return max(self.num_running + self.num_waiting, self.in_flight)


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    decode: EndpointState
    prefill: EndpointState | None  # None => the decode engine prefills locally
    reason: str = ""
    prefix_hit_tokens: int = 0  # cached-prefix tokens on the replica that prefills
    uncached_tokens: int = 0  # prompt tokens that replica must compute
    predicted_ttft_s: float | None = None
    predicted_tpot_s: float | None = None
    max_new_tokens: int | None = None  # admission capped the request's max_tokens (decode throttling)


@dataclass(frozen=True, slots=True)
class Rejection:
    """The request is refused before it takes any queue slot or KV block."""

    reason: str  # bounded, metric-label safe: "no_decode_capacity", ...
    message: str
    status_code: int = 503  # 503 overload/unavailable, 429 quota
    retry_after_s: float | None = 1.0


@dataclass(slots=True)
class PoolSnapshot:
    """All endpoints the router may pick from at one instant."""

    endpoints: list[EndpointState] = field(default_factory=list)
    taken_s: float = 0.0

    def by_role(self, role: Role) -> list[EndpointState]:
        """The candidates of ``role``: its replicas, less those draining out of it."""
        return [e for e in self.endpoints if e.role is role and not e.draining]
