"""The planner's analytic estimate of a plan's goodput under SLOs (fast enough to score thousands of
candidate plans; the simulator confirms the best few).

Per request class the estimate averages over the prompt-length quantile points of the workload:

- prefill replica: an M/G/1 queue (Pollaczek-Khinchine mean wait; the wait is 0 with probability
  1 - rho and otherwise exponential with the matching mean); traffic splits over prefill pools in
  proportion to their service rates, so every replica runs at the same utilisation;
- decode replica: continuous batching; the mean batch N solves Little's law N = rate x output tokens x
  TPOT(N); a sequence sees itself plus a Poisson(N) number of others, so TPOT meets the SLO with the
  probability that that batch stays within the largest batch whose step meets it;
- colocated replica (no prefill pools): the same decode model with the share of time prefill takes
  (rho) removed from the decode steps, and the prefill queue in front of the first token;
- TTFT = prefill wait + prefill + KV handoff over the routed link + the decode replica's first step.

The router admits requests up to the rate that maximises goodput (admitted rate x probability both SLOs
hold): the estimate scans admitted rates up to the offered rate and keeps the best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from capacity.cluster import Link
from capacity.profile import EngineProfile
from capacity.workload import Workload
from router.config import SloConfig

ADMIT_STEPS = 16  # admitted rates scanned: offered rate x k / ADMIT_STEPS ...
REFINE_STEPS = 8  # ... then steps of 1/REFINE_STEPS of that around the best


@dataclass(frozen=True)
class PoolTimes:
    """A profile's timings for one workload, as arrays."""

    prefill_q_s: np.ndarray  # prefill time of each prompt quantile point (uncached tokens)
    prefill_mean_s: float
    prefill_m2: float  # second moment (s^2)
    step_s: np.ndarray  # decode step at batch 1..len, mean context
    n_max: int  # decode batch limit: max_num_seqs and KV capacity

    def n_within(self, tpot_s: float, slowdown: float = 1.0) -> int:
        """Largest batch whose step (x ``slowdown``) meets ``tpot_s``; 0 if even batch 1 misses."""
        return int(np.searchsorted(self.step_s * slowdown, tpot_s, side="right"))

    def decode_capacity_rps(self, out_tokens: float, tpot_s: float) -> float:
        """Requests per second one replica finishes at the largest batch within the TPOT SLO."""
        n = self.n_within(tpot_s)
        return 0.0 if n == 0 else n / (out_tokens * self.step_s[n - 1])

    def mean_batch(self, rate_rps: float, out_tokens: float, slowdown: float = 1.0) -> float | None:
        """N with N = rate x out x step(N) x slowdown (Little's law); None when no batch up to n_max keeps up."""
        demand = rate_rps * out_tokens * self.step_s * slowdown  # sequences that rate keeps in flight at step(n)
        if demand[0] <= 1.0:
            return float(demand[0])
        ok = np.nonzero(demand <= np.arange(1, len(demand) + 1))[0]
        return float(ok[0] + 1) if ok.size else None


def pool_times(profile: EngineProfile, wl: Workload, max_num_seqs: int) -> PoolTimes:
    prompts = wl.prompt_quantiles()
    outs = wl.output_quantiles()
    uncached = np.maximum(np.round(prompts * (1 - wl.cached_share)), 1)
    pre = np.array([profile.prefill_s(int(t)) for t in uncached])
    per_seq = float(prompts.mean() + outs.mean())
    n_max = max(1, min(max_num_seqs, int(profile.kv_capacity_tokens // per_seq)))
    ctx = int(prompts.mean() + outs.mean() / 2)
    grid = sorted({b for b, _, _ in profile.decode} | {1, n_max})
    grid_s = [profile.decode_step_s(b, ctx) for b in grid]
    step = np.interp(np.arange(1, n_max + 1), grid, grid_s)
    return PoolTimes(pre, float(pre.mean()), float((pre**2).mean()), step, n_max)


def poisson_cdf(k: int, mean: float) -> float:
    """P(X <= k), X ~ Poisson(mean)."""
    if k < 0:
        return 0.0
    if mean <= 0:
        return 1.0
    if mean > 60:
        return NormalDist(mean, math.sqrt(mean)).cdf(k + 0.5)
    if k > mean + 12 * math.sqrt(mean) + 20:
        return 1.0
    term = total = math.exp(-mean)
    for i in range(1, k + 1):
        term *= mean / i
        total += term
    return min(total, 1.0)


def ttft_attainment(
    service_q_s: np.ndarray, extra_s: np.ndarray | float, rho: float, mean_wait_s: float, slo_s: float
) -> float:
    """Share of requests with wait + service + extra <= SLO; wait is 0 w.p. 1 - rho, else exponential."""
    slack = slo_s - service_q_s - extra_s
    if mean_wait_s <= 0 or rho <= 0:
        return float((slack >= 0).mean())
    p_wait_le = 1.0 - rho * np.exp(-rho * np.maximum(slack, 0) / mean_wait_s)
    return float(np.where(slack >= 0, p_wait_le, 0.0).mean())


@dataclass(frozen=True)
class PoolLoad:
    """What the estimate needs of one pool."""

    name: str
    phase: str  # "prefill" | "decode" (a decode pool with no prefill pool anywhere: colocated)
    replicas: int
    times: PoolTimes
    price_per_hour: float  # all replicas


@dataclass(frozen=True)
class Flow:
    prefill: int  # index into the prefill pools
    decode: int  # index into the decode pools
    share: float  # of all requests
    link: Link


@dataclass(frozen=True)
class Estimate:
    offered_rps: float
    admitted_rps: float
    goodput_rps: float  # admitted requests meeting both SLOs, per second
    ttft_attainment: float  # at the admitted rate
    tpot_attainment: float
    cost_per_hour: float

    @property
    def goodput_per_dollar(self) -> float:
        """SLO-meeting requests per USD."""
        return self.goodput_rps * 3600 / self.cost_per_hour if self.cost_per_hour > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "offered_rps": self.offered_rps,
            "admitted_rps": round(self.admitted_rps, 4),
            "goodput_rps": round(self.goodput_rps, 4),
            "ttft_attainment": round(self.ttft_attainment, 4),
            "tpot_attainment": round(self.tpot_attainment, 4),
            "cost_per_hour": round(self.cost_per_hour, 4),
            "goodput_per_dollar": round(self.goodput_per_dollar, 2),
        }


def decode_shares(decode: list[PoolLoad], wl: Workload, slo: SloConfig) -> np.ndarray:
    out = float(wl.output_quantiles().mean())
    cap = np.array([p.replicas * p.times.decode_capacity_rps(out, slo.tpot_s) for p in decode])
    return cap / cap.sum() if cap.sum() > 0 else np.zeros(len(decode))


@dataclass(frozen=True)
class _FlowArrays:
    """The flows' invariants over admitted rates, one row per flow."""

    prefill: np.ndarray  # prefill pool index
    decode: np.ndarray  # decode pool index
    share: np.ndarray
    service_q_s: np.ndarray  # flows x prompt quantiles: prefill time
    transfer_q_s: np.ndarray  # flows x prompt quantiles: KV handoff time


def _flow_arrays(flows: list[Flow], prefill: list[PoolLoad], kv_bytes_q: np.ndarray) -> _FlowArrays:
    return _FlowArrays(
        prefill=np.array([f.prefill for f in flows], dtype=int),
        decode=np.array([f.decode for f in flows], dtype=int),
        share=np.array([f.share for f in flows]),
        service_q_s=np.stack([prefill[f.prefill].times.prefill_q_s for f in flows]),
        transfer_q_s=np.stack([f.link.latency_s + kv_bytes_q * 8 / (f.link.bandwidth_gbps * 1e9) for f in flows]),
    )


def _attainment(
    rate: float,
    prefill: list[PoolLoad],
    decode: list[PoolLoad],
    flows: _FlowArrays | None,
    dshare: np.ndarray,
    out: float,
    slo: SloConfig,
) -> tuple[float, float, float]:
    """(probability both SLOs hold, TTFT attainment, TPOT attainment) at admitted ``rate``; ``out``: mean
    output tokens."""
    colocated = not prefill
    tpot_att, first_step, ttft_local = [], [], []
    for p, share in zip(decode, dshare):
        per_replica = rate * share / p.replicas if share > 0 else 0.0
        rho_p = per_replica * p.times.prefill_mean_s if colocated else 0.0
        if rho_p >= 1.0:
            return 0.0, 0.0, 0.0
        slow = 1.0 / (1.0 - rho_p)
        n = p.times.mean_batch(per_replica, out, slow) if share > 0 else 0.0
        if n is None:  # the pool cannot keep up: no request on it meets the TPOT SLO
            tpot_att.append(0.0)
            first_step.append(0.0)
            ttft_local.append(0.0)
            continue
        k = p.times.n_within(slo.tpot_s, slow)
        tpot_att.append(poisson_cdf(k - 1, n))
        step = float(p.times.step_s[min(max(int(round(n)), 1), len(p.times.step_s)) - 1]) * slow
        first_step.append(step)
        if colocated:
            wait = per_replica * p.times.prefill_m2 / (2 * (1 - rho_p))
            ttft_local.append(ttft_attainment(p.times.prefill_q_s, step, rho_p, wait, slo.ttft_s))
    if colocated:
        ttft = float(np.dot(dshare, ttft_local))
        both = float(np.dot(dshare, np.array(ttft_local) * np.array(tpot_att)))
        return both, ttft, float(np.dot(dshare, tpot_att))
    mu = np.array([p.replicas / p.times.prefill_mean_s for p in prefill])
    rho = rate / mu.sum()
    if rho >= 1.0:
        return 0.0, 0.0, 0.0
    m2 = np.array([p.times.prefill_m2 for p in prefill])
    replicas = np.array([p.replicas for p in prefill])
    # every prefill replica runs at utilisation rho; the M/G/1 mean wait of each flow's prefill pool
    wait = rate * mu / mu.sum() / replicas * m2 / (2 * (1 - rho))
    slack = slo.ttft_s - flows.service_q_s - flows.transfer_q_s - np.array(first_step)[flows.decode][:, None]
    p_le = 1.0 - rho * np.exp(-rho * np.maximum(slack, 0) / wait[flows.prefill][:, None])
    per_flow = np.where(slack >= 0, p_le, 0.0).mean(axis=1)
    tpot = np.array(tpot_att)
    return (
        float(np.dot(flows.share, per_flow * tpot[flows.decode])),
        float(np.dot(flows.share, per_flow)),
        float(np.dot(dshare, tpot)),
    )


def estimate(
    prefill: list[PoolLoad],
    decode: list[PoolLoad],
    flows: list[Flow],
    kv_bytes_q: np.ndarray,
    wl: Workload,
    slo: SloConfig,
) -> Estimate:
    """Goodput at the best admitted rate up to ``wl.rate``. Every pool has replicas; ``flows`` index
    ``prefill`` and ``decode``. ``kv_bytes_q``: wire bytes of each prompt quantile's KV handoff
    (compression applied)."""
    cost = sum(p.price_per_hour for p in prefill + decode)
    dshare = decode_shares(decode, wl, slo) if decode else np.zeros(0)
    zero = Estimate(wl.rate, 0.0, 0.0, 0.0, 0.0, cost)
    if not decode or dshare.sum() == 0 or (prefill and not flows):
        return zero
    best = zero
    out = float(wl.output_quantiles().mean())
    arrays = _flow_arrays(flows, prefill, kv_bytes_q) if prefill else None

    def consider(rate: float) -> None:
        nonlocal best
        both, ttft, tpot = _attainment(rate, prefill, decode, arrays, dshare, out, slo)
        if rate * both > best.goodput_rps:
            best = Estimate(wl.rate, rate, rate * both, ttft, tpot, cost)

    step = wl.rate / ADMIT_STEPS
    for k in range(1, ADMIT_STEPS + 1):  # coarse scan, then a finer one around the best
        consider(step * k)
    if best.admitted_rps > 0:
        for k in range(-REFINE_STEPS + 1, REFINE_STEPS):
            rate = best.admitted_rps + step * k / REFINE_STEPS
            if 0 < rate <= wl.rate and k:
                consider(rate)
    return best
