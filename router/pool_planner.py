"""One pool's planner: its demand and latency signals, its load forecast and its replica target.

Pure (stdlib + router/): the ingress feeds it every arrival routed to (or refused for) the pool and the
observed latencies of its admitted requests; :meth:`PoolPlanner.plan` reads the pool's replicas from a routing
snapshot and the router's cost model of the pool, and returns the signals and the stabilized decision.

- prefill pool: replicas = forecast prompt tokens per second over one replica's fitted prefill rate (slowed by
  the observed/predicted TTFT correction), or enough to drain the queued prefill tokens within the TTFT SLO;
- decode pool: replicas = concurrent decodes (requests running and waiting in its engines, or Little's law on
  the forecast arrivals) over the batch at which one replica's predicted step time, times the observed/predicted
  TPOT correction, meets the TPOT SLO.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from router.autoscale import (
    Arrival,
    Decision,
    DemandWindow,
    Stabilizer,
    StabilizerSettings,
    batch_at_tpot_slo,
    decode_replicas,
    make_forecaster,
    prefill_replicas,
)
from router.cost_model import CostModel
from router.types import EndpointState, Role


@dataclass(frozen=True, slots=True)
class PlannerSettings:
    predictor: str = "ewma"
    demand_window_s: float = 30.0
    utilization: float = 0.8
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.2
    max_batch: int = 64  # the engine's max_num_seqs
    stabilizer: StabilizerSettings = StabilizerSettings()


@dataclass(frozen=True, slots=True)
class Signals:
    """What the planner saw in one interval (exported as ``pdserve_planner_*``)."""

    arrival_rate: float
    refused_rate: float
    prompt_tokens_mean: float
    output_tokens_mean: float
    forecast_rate: float
    ttft_predicted_s: float
    ttft_observed_s: float
    tpot_predicted_s: float
    tpot_observed_s: float
    queued_prefill_tokens: int
    decode_batch: int  # requests running in the pool's engines
    waiting: int  # requests waiting in the pool's engines
    kv_usage: float  # mean over the pool's replicas
    current_replicas: int
    desired_replicas: float  # before stabilization (fractional)

    @property
    def ttft_ratio(self) -> float:
        return self.ttft_observed_s / self.ttft_predicted_s if self.ttft_predicted_s > 0 else 0.0

    @property
    def tpot_ratio(self) -> float:
        return self.tpot_observed_s / self.tpot_predicted_s if self.tpot_predicted_s > 0 else 0.0


class _Latencies:
    """The last ``n`` (observed, predicted) pairs of one latency."""

    def __init__(self, n: int = 64) -> None:
        self._pairs: deque[tuple[float, float]] = deque(maxlen=n)

    def add(self, observed: float, predicted: float | None) -> None:
        if observed > 0 and predicted and predicted > 0:
            self._pairs.append((observed, predicted))

    def means(self) -> tuple[float, float]:
        if not self._pairs:
            return 0.0, 0.0
        return statistics.fmean(o for o, _ in self._pairs), statistics.fmean(p for _, p in self._pairs)


class PoolPlanner:
    def __init__(self, pool: str, role: Role, settings: PlannerSettings, lo: int, hi: int, initial: int) -> None:
        self.pool = pool
        self.role = role
        self.s = settings
        self.demand = DemandWindow(settings.demand_window_s)
        self.forecaster = make_forecaster(settings.predictor)
        self.stabilizer = Stabilizer(settings.stabilizer, lo, hi, initial)
        self.ttft = _Latencies()
        self.tpot = _Latencies()
        self._planned = False

    # -- inputs ---------------------------------------------------------------------------------------
    def on_arrival(self, at_s: float, prompt_tokens: int, output_tokens: int, refused: bool) -> None:
        self.demand.add(Arrival(at_s, prompt_tokens, output_tokens, refused))

    def on_ttft(self, observed_s: float, predicted_s: float | None) -> None:
        self.ttft.add(observed_s, predicted_s)

    def on_tpot(self, observed_s: float, predicted_s: float | None) -> None:
        self.tpot.add(observed_s, predicted_s)

    # -- one interval -------------------------------------------------------------------------------------
    def signals(self, now_s: float, endpoints: list[EndpointState], model: CostModel) -> Signals:
        """The interval's signals; feeds the forecaster once (call once per interval)."""
        d = self.demand.demand(now_s)
        self.forecaster.observe(d.rate_per_s)
        rate = self.forecaster.forecast()
        mine = [e for e in endpoints if e.pool == self.pool]
        queued = sum(e.queued_prefill_tokens for e in mine)
        running = sum(e.num_running for e in mine)
        waiting = sum(e.num_waiting for e in mine)
        if self.role is Role.PREFILL:
            desired = prefill_replicas(
                rate,
                d.mean_prompt_tokens,
                queued,
                model.prefill_tokens_per_s(),
                self.s.ttft_slo_s,
                correction=model.ttft_bias,
                utilization=self.s.utilization,
            )
        else:
            b = batch_at_tpot_slo(model.decode_step_s, self.s.tpot_slo_s, self.s.max_batch, model.tpot_bias)
            tpot_s = model.decode_step_s(b) * model.tpot_bias
            desired = decode_replicas(rate, d.mean_output_tokens, running + waiting, tpot_s, b)
        ttft_obs, ttft_pred = self.ttft.means()
        tpot_obs, tpot_pred = self.tpot.means()
        return Signals(
            arrival_rate=d.rate_per_s,
            refused_rate=d.refused_per_s,
            prompt_tokens_mean=d.mean_prompt_tokens,
            output_tokens_mean=d.mean_output_tokens,
            forecast_rate=rate,
            ttft_predicted_s=ttft_pred,
            ttft_observed_s=ttft_obs,
            tpot_predicted_s=tpot_pred,
            tpot_observed_s=tpot_obs,
            queued_prefill_tokens=queued,
            decode_batch=running,
            waiting=waiting,
            kv_usage=statistics.fmean(e.kv_usage for e in mine) if mine else 0.0,
            current_replicas=len(mine),
            desired_replicas=desired,
        )

    def plan(
        self, now_s: float, endpoints: list[EndpointState], model: CostModel, floor: float = 0.0
    ) -> tuple[Signals, Decision]:
        """One interval: the signals and the stabilized decision on at least ``floor`` replicas (a pool woken
        from zero keeps one while its first replica starts). The first plan starts from the replicas running
        (an ingress that restarts beside a scaled-up pool does not shrink it at once)."""
        sig = self.signals(now_s, endpoints, model)
        if not self._planned and sig.current_replicas > 0:
            self.stabilizer.target = min(max(sig.current_replicas, self.stabilizer.lo), self.stabilizer.hi)
        self._planned = True
        return sig, self.stabilizer.decide(now_s, max(sig.desired_replicas, floor))

    def wake(self, now_s: float) -> Decision:
        """Scale from zero (:meth:`router.autoscale.Stabilizer.wake`)."""
        self._planned = True
        return self.stabilizer.wake(now_s)
