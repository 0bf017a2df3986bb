"""SLO-driven replica planning: demand signals, load forecasters, replica counts and an HPA-style stabilizer.

Pure (stdlib only): the ingress feeds it what the router sees (every arrival, refused ones included, and the
observed latencies of admitted requests) and the pools' polled load; every ``adjustment_interval_s`` it asks,
per pool, how many replicas meet the SLOs next interval, and the :class:`Stabilizer` turns that into the
pool's target. Times are seconds on the caller's clock.

- Demand (:class:`DemandWindow`): arrivals per second over a sliding window, with mean prompt (uncached)
  tokens and mean requested output tokens. A request admission refused is demand too: it was refused for
  want of capacity, exactly when the autoscaler must see it.
- Forecast (:func:`make_forecaster`): ``constant`` (the last interval's value), ``ewma`` (exponentially
  smoothed), ``trend`` (least-squares line over the last intervals, extrapolated one interval ahead).
- Replicas (:func:`prefill_replicas`, :func:`decode_replicas`): from the router's online cost fits (prefill
  tokens/s; decode step time vs batch) times the observed/predicted correction the router keeps.
- Stabilizer: HPA behaviour. A scale-up waits ``upscale_delay_s`` (the lowest recommendation over that
  window wins), a scale-down ``downscale_delay_s`` (the highest wins), each change moves at most
  ``max_step`` replicas, and after a change nothing moves for ``cooldown_s``. A pool at zero replicas that a
  request waits for is woken at once (:meth:`Stabilizer.wake`).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# -- demand ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    at_s: float
    prompt_tokens: int  # uncached prompt tokens (the whole prompt for a refused request)
    output_tokens: int  # requested max output tokens
    refused: bool


@dataclass(frozen=True, slots=True)
class Demand:
    rate_per_s: float  # arrivals per second, refused included
    refused_per_s: float
    mean_prompt_tokens: float
    mean_output_tokens: float


class DemandWindow:
    """Arrivals of one pool over the last ``window_s`` seconds."""

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._arrivals: deque[Arrival] = deque()

    def add(self, a: Arrival) -> None:
        self._arrivals.append(a)

    def demand(self, now_s: float) -> Demand:
        while self._arrivals and self._arrivals[0].at_s < now_s - self.window_s:
            self._arrivals.popleft()
        n = len(self._arrivals)
        if n == 0:
            return Demand(0.0, 0.0, 0.0, 0.0)
        refused = sum(a.refused for a in self._arrivals)
        return Demand(
            rate_per_s=n / self.window_s,
            refused_per_s=refused / self.window_s,
            mean_prompt_tokens=statistics.fmean(a.prompt_tokens for a in self._arrivals),
            mean_output_tokens=statistics.fmean(a.output_tokens for a in self._arrivals),
        )


# -- forecasters ----------------------------------------------------------------------------------


class Forecaster(Protocol):
    def observe(self, value: float) -> None: ...

    def forecast(self) -> float:
        """The next interval's value (0 before any observation)."""


class ConstantForecaster:
    """Next interval = this interval."""

    def __init__(self) -> None:
        self._last = 0.0

    def observe(self, value: float) -> None:
        self._last = value

    def forecast(self) -> float:
        return self._last


class EwmaForecaster:
    """Exponentially weighted moving average; ``alpha`` is the weight of the newest value."""

    def __init__(self, alpha: float = 0.5) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self._value: float | None = None

    def observe(self, value: float) -> None:
        self._value = value if self._value is None else self.alpha * value + (1 - self.alpha) * self._value

    def forecast(self) -> float:
        return self._value or 0.0


class TrendForecaster:
    """Least-squares line over the last ``window`` intervals, one interval ahead (never below 0)."""

    def __init__(self, window: int = 6) -> None:
        if window < 2:
            raise ValueError("window must be >= 2")
        self._values: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        self._values.append(value)

    def forecast(self) -> float:
        n = len(self._values)
        if n == 0:
            return 0.0
        if n == 1 or len(set(self._values)) == 1:
            return self._values[-1]
        fit = statistics.linear_regression(range(n), self._values)
        return max(0.0, fit.intercept + fit.slope * n)


PREDICTORS: dict[str, Callable[[], Forecaster]] = {
    "constant": ConstantForecaster,
    "ewma": EwmaForecaster,
    "trend": TrendForecaster,
}


def make_forecaster(name: str) -> Forecaster:
    try:
        return PREDICTORS[name]()
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; one of {sorted(PREDICTORS)}") from None


# -- replicas a pool needs -------------------------------------------------------------------------


def prefill_replicas(
    rate_per_s: float,
    mean_uncached_tokens: float,
    queued_tokens: float,
    tokens_per_s: float,
    ttft_slo_s: float,
    correction: float = 1.0,
    utilization: float = 0.8,
) -> float:
    """Prefill replicas for the next interval: the arriving prompt tokens per second against what one replica
    prefills per second at ``utilization`` (a queue at 100% never drains), and enough replicas to drain the
    tokens already queued within the TTFT SLO; the fitted rate is slowed by the observed/predicted TTFT
    ``correction``. Fractional: the caller rounds up."""
    eff = tokens_per_s / max(correction, 1e-6)
    if eff <= 0:
        return 0.0
    arriving = rate_per_s * mean_uncached_tokens / (eff * utilization)
    backlog = queued_tokens / (eff * ttft_slo_s)
    return max(arriving, backlog)


def batch_at_tpot_slo(
    step_s: Callable[[int], float], tpot_slo_s: float, max_batch: int, correction: float = 1.0
) -> int:
    """Largest decode batch (1..max_batch) whose predicted step time, times the TPOT ``correction``, meets the
    SLO; 1 when even a lone request misses it (one replica still serves one request at a time)."""
    lo, hi = 1, max(1, max_batch)
    if step_s(hi) * correction <= tpot_slo_s:
        return hi
    while lo < hi:  # the step time grows with the batch: bisect for the last batch within the SLO
        mid = (lo + hi + 1) // 2
        if step_s(mid) * correction <= tpot_slo_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def decode_replicas(
    rate_per_s: float, mean_output_tokens: float, running: float, tpot_s: float, batch_at_slo: int
) -> float:
    """Decode replicas for the next interval: concurrent decodes (the larger of those running now and
    Little's law on the forecast arrivals: rate x output tokens x seconds per token) over the batch at which
    one replica still meets the TPOT SLO. Fractional: the caller rounds up."""
    concurrent = max(running, rate_per_s * mean_output_tokens * tpot_s)
    return concurrent / max(batch_at_slo, 1)


# -- stabilizer -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StabilizerSettings:
    upscale_delay_s: float = 0.0
    downscale_delay_s: float = 300.0
    max_step: int = 1
    cooldown_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Decision:
    target: int
    reason: str  # bounded, metric-label safe: scale_up, scale_down, hold_*, at_min, at_max, steady, cold_start


class Stabilizer:
    """Turns raw recommendations into a pool's replica target, HPA style (see the module docstring)."""

    def __init__(self, settings: StabilizerSettings, lo: int, hi: int, initial: int) -> None:
        if lo > hi:
            raise ValueError("lo > hi")
        self.s = settings
        self.lo, self.hi = lo, hi
        self.target = min(max(initial, lo), hi)
        self._history: deque[tuple[float, int]] = deque()
        self._changed_s: float | None = None
        self._started_s: float | None = None

    def decide(self, now_s: float, desired: float) -> Decision:
        raw = min(max(math.ceil(desired - 1e-9), self.lo), self.hi)
        if self._started_s is None:
            self._started_s = now_s
        self._history.append((now_s, raw))
        horizon = max(self.s.upscale_delay_s, self.s.downscale_delay_s)
        while self._history and self._history[0][0] < now_s - horizon:
            self._history.popleft()
        if raw == self.target:
            return Decision(self.target, self._steady_reason(desired))
        if self._changed_s is not None and now_s - self._changed_s < self.s.cooldown_s:
            return Decision(self.target, "hold_cooldown")
        up = raw > self.target
        window = self.s.upscale_delay_s if up else self.s.downscale_delay_s
        recent = [r for t, r in self._history if t >= now_s - window]
        if now_s - self._started_s < window:  # not yet a full window of recommendations
            return Decision(self.target, "hold_upscale_window" if up else "hold_downscale_window")
        # HPA: scale up to the lowest recommendation of the window, down to the highest
        stable = min(recent) if up else max(recent)
        if (stable <= self.target) if up else (stable >= self.target):
            return Decision(self.target, "hold_upscale_window" if up else "hold_downscale_window")
        step = max(1, self.s.max_step)
        new = min(stable, self.target + step) if up else max(stable, self.target - step)
        self.target = new
        self._changed_s = now_s
        return Decision(new, "scale_up" if up else "scale_down")

    def wake(self, now_s: float) -> Decision:
        """Scale from zero: a request waits for this pool. The target becomes at least one replica at once
        (no window: the request is the evidence), recorded as a recommendation, and starts a cool-down."""
        if self.target >= 1:
            return Decision(self.target, "cold_start")
        self.target = min(max(1, self.lo), self.hi)
        self._history.append((now_s, self.target))
        self._changed_s = now_s
        return Decision(self.target, "cold_start")

    def _steady_reason(self, desired: float) -> str:
        if desired > self.hi:
            return "at_max"
        if math.ceil(desired - 1e-9) < self.lo:
            return "at_min"
        return "steady"
