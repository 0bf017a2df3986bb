"""The role-flip controller of a ``role: flex`` pool: how many of its replicas should prefill, and which one flips.

Pure (stdlib + router/): the ingress (serve/flex.py) measures the pool's demand, reads each role's per-replica
capacity from the router's cost model, and asks :meth:`FlexController.decide` every interval; it applies a flip
(drain the old role, switch) and reports it back with :meth:`FlexController.applied`.

- Work in replicas' worth (:func:`replicas_of_work`): prompt tokens per second over one replica's prefill rate,
  output tokens per second over one replica's decode rate at the TPOT SLO (:func:`capacity_from_model`): engine
  throughput, not end-to-end latency.
- Desired prefill replicas = the pool's size x the prefill share of that work.
- Hysteresis: one replica moves only when the desired count passes the current one by half a replica (the
  rounding point) plus ``hysteresis``; the same move must be wanted ``confirm_intervals`` decisions in a row;
  no flip within ``dwell_s`` of the last one applied, and none while one is in progress. One replica per flip.
- Bounds: never below ``min_prefill`` prefill or ``min_decode`` decode replicas; a split outside them (a replica
  lost) is restored at once, without hysteresis, dwell or confirmation.

Every decision carries a reason (metric-label safe): ``prefill_heavy`` / ``decode_heavy`` (a flip for demand),
``below_min_prefill`` / ``below_min_decode`` (a flip for the bounds), or a hold: ``in_progress``, ``idle``,
``balanced``, ``at_min_prefill``, ``at_min_decode``, ``dwell``, ``confirming``, ``no_candidate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.autoscale import batch_at_tpot_slo
from router.cost_model import CostModel
from router.types import Role

FLIP_REASONS = ("prefill_heavy", "decode_heavy", "below_min_prefill", "below_min_decode")


@dataclass(frozen=True, slots=True)
class FlexControllerSettings:
    min_prefill: int = 0
    min_decode: int = 1
    dwell_s: float = 60.0
    hysteresis: float = 0.25
    confirm_intervals: int = 2
    min_load: float = 0.05


@dataclass(frozen=True, slots=True)
class FlexDemand:
    """The pool's measured demand (arrivals over the demand window)."""

    prefill_tokens_per_s: float  # uncached prompt tokens arriving per second
    decode_tokens_per_s: float  # output tokens requested per second


@dataclass(frozen=True, slots=True)
class FlexCapacity:
    """What one replica of the pool serves per second in each role."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # at the largest batch whose step time meets the TPOT SLO


@dataclass(frozen=True, slots=True)
class FlexReplica:
    endpoint_id: str
    role: Role
    load: int = 0  # its outstanding work (the least loaded replica of a role flips: it drains soonest)
    healthy: bool = True


@dataclass(frozen=True, slots=True)
class FlexDecision:
    reason: str
    current_prefill: int
    desired_prefill: float  # before hysteresis and bounds (fractional)
    endpoint_id: str | None = None  # the replica to flip (None: hold)
    from_role: Role | None = None
    to_role: Role | None = None

    @property
    def flips(self) -> bool:
        return self.endpoint_id is not None


def capacity_from_model(model: CostModel, tpot_slo_s: float, max_batch: int) -> FlexCapacity:
    """One replica's capacities from the router's cost model of the pool: its fitted prefill rate (the engine's
    own prefill steps), and the decode tokens per second of the largest batch that meets the TPOT SLO (step time
    times the TPOT correction). The TTFT correction is not applied: it carries latency that does not occupy the
    engine (the serving path's calls, the KV handoff, streaming back, ~0.15 s per request on a 2-core box), so for
    short prompts it is many times the prefill itself and would make a decode-heavy load look prefill-heavy."""
    prefill = model.prefill_tokens_per_s()
    b = batch_at_tpot_slo(model.decode_step_s, tpot_slo_s, max_batch, model.tpot_bias)
    decode = b / max(model.decode_step_s(b) * model.tpot_bias, 1e-6)
    return FlexCapacity(prefill, decode)


def replicas_of_work(demand: FlexDemand, capacity: FlexCapacity) -> tuple[float, float]:
    """(prefill, decode) demand in replicas' worth of each role's capacity."""
    return (
        demand.prefill_tokens_per_s / max(capacity.prefill_tokens_per_s, 1e-9),
        demand.decode_tokens_per_s / max(capacity.decode_tokens_per_s, 1e-9),
    )


class FlexController:
    """One flex pool's split (see the module docstring). Times are seconds on the caller's clock."""

    def __init__(self, settings: FlexControllerSettings) -> None:
        self.s = settings
        self.applied_s: float | None = None  # when the last flip was applied
        self._pending: tuple[Role, int] | None = None  # (role to flip to, consecutive decisions wanting it)

    def applied(self, now_s: float) -> None:
        """A flip finished (its replica serves its new role): the dwell time starts."""
        self.applied_s = now_s

    def decide(
        self,
        now_s: float,
        replicas: Sequence[FlexReplica],
        demand: FlexDemand,
        capacity: FlexCapacity,
        flipping: bool = False,
    ) -> FlexDecision:
        """The split for the next interval. ``replicas``: the pool's replicas in their current roles (a
        replica being flipped counts in its old role); ``flipping``: a flip is in progress."""
        n = len(replicas)
        p = sum(r.role is Role.PREFILL for r in replicas)
        p_need, d_need = replicas_of_work(demand, capacity)
        total = p_need + d_need
        desired = n * p_need / total if total > 0 else float(p)

        def hold(reason: str, keep_pending: bool = False) -> FlexDecision:
            if not keep_pending:
                self._pending = None
            return FlexDecision(reason, p, desired)

        if flipping:
            return hold("in_progress")
        lo, hi = self.s.min_prefill, n - self.s.min_decode
        if p < lo and n - p > self.s.min_decode:
            return self._flip(replicas, Role.DECODE, Role.PREFILL, "below_min_prefill", p, desired)
        if p > hi and p > lo:
            return self._flip(replicas, Role.PREFILL, Role.DECODE, "below_min_decode", p, desired)
        if total < self.s.min_load:
            return hold("idle")
        band = 0.5 + self.s.hysteresis
        if desired >= p + band:
            to, reason = Role.PREFILL, "prefill_heavy"
            if p + 1 > hi:
                return hold("at_min_decode")
        elif desired <= p - band:
            to, reason = Role.DECODE, "decode_heavy"
            if p - 1 < lo:
                return hold("at_min_prefill")
        else:
            return hold("balanced")
        count = self._pending[1] + 1 if self._pending and self._pending[0] is to else 1
        self._pending = (to, count)
        if self.applied_s is not None and now_s - self.applied_s < self.s.dwell_s:
            return hold("dwell", keep_pending=True)
        if count < self.s.confirm_intervals:
            return hold("confirming", keep_pending=True)
        frm = Role.DECODE if to is Role.PREFILL else Role.PREFILL
        return self._flip(replicas, frm, to, reason, p, desired)

    def _flip(
        self, replicas: Sequence[FlexReplica], frm: Role, to: Role, reason: str, p: int, desired: float
    ) -> FlexDecision:
        self._pending = None
        candidates = sorted((r for r in replicas if r.role is frm and r.healthy), key=lambda r: (r.load, r.endpoint_id))
        if not candidates:
            return FlexDecision("no_candidate", p, desired)
        return FlexDecision(reason, p, desired, candidates[0].endpoint_id, frm, to)
