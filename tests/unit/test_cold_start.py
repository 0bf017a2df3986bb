"""Scale from zero: serve/cold_start.py (a request waits, bounded, for an empty decode pool's first replica),
the planner's side of it (serve/planner.py: the cold_start decision, demand on empty prefill pools, waking a
pool the planner scaled up from zero), the config and /health's readiness."""

from __future__ import annotations

import asyncio

import pytest

from router.types import EndpointState, PoolSnapshot, RequestDescriptor, Role, RoutingDecision
from serve.cold_start import ColdStart
from serve.config import DEFAULT_CONFIG, ClusterConfig
from serve.ingress import roles_served
from serve.metrics import ClusterMetrics
from serve.planner import Planner
from serve.protocol import ApiError
from tests.integration.cluster_utils import metric_sum, parse_samples
from tests.unit.serve_fakes import FakeResponse


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _cfg(prefill_min: int = 1, **autoscaling) -> ClusterConfig:
    """The default config with an autoscaled decode pool of {min 0, max 2} (and prefill pool from ``prefill_min``)."""
    data = ClusterConfig.from_yaml(DEFAULT_CONFIG).model_dump(mode="json")
    auto = {"enabled": True, "adjustment_interval_s": 1.0, "downscale_delay_s": 3.0, "cooldown_s": 0.0}
    data["pools"][1]["replicas"] = {"min": 0, "max": 2}
    data["pools"][1]["autoscaling"] = {**auto, **autoscaling}
    if prefill_min == 0:
        data["pools"][0]["replicas"] = {"min": 0, "max": 1}
        data["pools"][0]["autoscaling"] = auto
    return ClusterConfig.from_dict(data)


def _ep(pool: str, role: Role, i: int = 0) -> EndpointState:
    return EndpointState(f"{pool}-{i}", pool, role, True)


class FakeWakeHandle:
    """A fake Serve handle of an empty pool: ``set_replica_target.remote`` answers after ``delay_s`` (a replica
    started), raises ``error``, or never answers (``delay_s`` None)."""

    def __init__(self, delay_s: float | None = 0.0, error: Exception | None = None) -> None:
        self.delay_s, self.error = delay_s, error
        self.calls: list[tuple[int, float]] = []
        self.responses: list[FakeResponse] = []

    @property
    def set_replica_target(self):
        return self

    def remote(self, target: int, decided_s: float) -> FakeResponse:
        self.calls.append((target, decided_s))

        async def answer() -> None:
            if self.error is not None:
                raise self.error
            await asyncio.sleep(3600 if self.delay_s is None else self.delay_s)

        self.responses.append(FakeResponse(answer()))
        return self.responses[-1]


class FakePlanner:
    def __init__(self) -> None:
        self.cold_starts: list[tuple[str, float]] = []

    def cold_start(self, pool: str, hold_s: float) -> tuple[int, float]:
        self.cold_starts.append((pool, hold_s))
        return 1, 42.0


def _samples(metrics: ClusterMetrics) -> dict:
    return parse_samples(metrics.render().decode())


def test_a_request_waits_for_the_empty_decode_pools_first_replica():
    cfg = _cfg(cold_start_timeout_s=5.0)
    handle, planner, metrics = FakeWakeHandle(delay_s=0.05), FakePlanner(), ClusterMetrics(lambda: [])
    cs = ColdStart(cfg.pools, {"decode": handle}, planner, metrics, poll_s=0.01)
    polls = {"n": 0}

    def snapshot() -> PoolSnapshot:  # the replica appears on the 5th look
        polls["n"] += 1
        eps = [_ep("prefill", Role.PREFILL)] + ([_ep("decode", Role.DECODE)] if polls["n"] >= 5 else [])
        return PoolSnapshot(eps)

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(cs.ready(snapshot), cs.ready(snapshot)), timeout=2.0)
        await asyncio.wait_for(cs.wakes["decode"], timeout=1.0)

    asyncio.run(main())
    assert handle.calls == [(1, 42.0)]  # two waiters, one wake, carrying the planner's target and its time
    assert planner.cold_starts == [("decode", 5.0)]  # held for the pool's cold_start_timeout_s
    assert metric_sum(_samples(metrics), "pdserve_cold_start_waits_total", pool="decode", outcome="served") == 2


def test_a_pool_with_a_replica_or_no_pool_that_scales_from_zero_is_not_waited_for():
    """Only an empty decode pool that scales from zero is waited for."""
    cfg = _cfg()
    handle, planner = FakeWakeHandle(), FakePlanner()
    cs = ColdStart(cfg.pools, {"decode": handle}, planner, ClusterMetrics(lambda: []), poll_s=0.01)
    asyncio.run(cs.ready(lambda: PoolSnapshot([_ep("decode", Role.DECODE)])))
    fixed = ClusterConfig.from_yaml(DEFAULT_CONFIG)  # decode pool of 1 fixed replica: the router answers 503
    cs_fixed = ColdStart(fixed.pools, {"decode": handle}, planner, ClusterMetrics(lambda: []), poll_s=0.01)
    asyncio.run(cs_fixed.ready(lambda: PoolSnapshot([])))
    # the pool has a replica, an unhealthy one: not a cold start (the router answers 503 at once)
    sick = EndpointState("decode-0", "decode", Role.DECODE, False)
    asyncio.run(asyncio.wait_for(cs.ready(lambda: PoolSnapshot([sick])), timeout=1.0))
    assert handle.calls == [] and planner.cold_starts == []


def test_a_wait_that_outlasts_the_bound_is_a_503_with_retry_after():
    cfg = _cfg(cold_start_timeout_s=0.2)
    handle, metrics = FakeWakeHandle(delay_s=None), ClusterMetrics(lambda: [])
    cs = ColdStart(cfg.pools, {"decode": handle}, FakePlanner(), metrics, poll_s=0.01)

    async def main() -> ApiError:
        with pytest.raises(ApiError) as e:
            await asyncio.wait_for(cs.ready(lambda: PoolSnapshot([])), timeout=2.0)
        with pytest.raises(asyncio.TimeoutError):  # the wake itself gives up at the same bound
            await asyncio.wait_for(cs.wakes["decode"], timeout=1.0)
        return e.value

    err = asyncio.run(main())
    assert (err.status_code, err.code, err.type) == (503, "cold_start_timeout", "overloaded_error")
    assert "Retry-After" in err.headers() and err.body()["error"]["code"] == "cold_start_timeout"
    assert handle.responses[0].cancelled
    assert metric_sum(_samples(metrics), "pdserve_cold_start_waits_total", outcome="timeout") == 1


def test_a_wake_that_fails_ends_the_wait_at_once():
    cfg = _cfg(cold_start_timeout_s=60.0)
    handle, metrics = FakeWakeHandle(error=RuntimeError("replica constructor failed")), ClusterMetrics(lambda: [])
    cs = ColdStart(cfg.pools, {"decode": handle}, FakePlanner(), metrics, poll_s=0.01)

    async def main() -> ApiError:
        with pytest.raises(ApiError) as e:
            await asyncio.wait_for(cs.ready(lambda: PoolSnapshot([])), timeout=2.0)  # far below the 60 s bound
        return e.value

    err = asyncio.run(main())
    assert (err.status_code, err.code) == (503, "cold_start_failed")
    assert metric_sum(_samples(metrics), "pdserve_cold_start_waits_total", outcome="failed") == 1


def test_planner_cold_start_holds_one_replica_until_the_pool_runs_one_then_scales_back_to_zero():
    cfg = _cfg()
    metrics, clock = ClusterMetrics(lambda: []), FakeClock()
    planner = Planner(cfg.pools, cfg.router, metrics, clock=clock, wall=lambda: 7.0)
    empty = PoolSnapshot([_ep("prefill", Role.PREFILL)])
    assert planner.step(empty) == {"decode": 0}  # starts at its min of 0: nothing wakes it
    assert planner.cold_start("decode", hold_s=30.0) == (1, 7.0)
    assert planner.report()["decode"]["last_decision"] == "cold_start"
    reasons = []
    for _ in range(5):  # the replica takes a while to start; no demand meanwhile
        clock.t += 1.0
        planner.step(empty)
        reasons.append(planner.last["decode"][1].reason)
    assert planner.targets["decode"] == 1 and set(reasons) == {"steady"}
    up = PoolSnapshot([_ep("prefill", Role.PREFILL), _ep("decode", Role.DECODE)])
    targets = []
    for _ in range(6):  # the replica runs; no request comes: back to 0 after the 3 s window
        clock.t += 1.0
        planner.step(up)
        targets.append(planner.targets["decode"])
    assert targets == [1, 1, 1, 0, 0, 0]
    s = parse_samples(metrics.render().decode())
    assert metric_sum(s, "pdserve_planner_decisions_total", pool="decode", reason="cold_start") == 1
    assert metric_sum(s, "pdserve_planner_decisions_total", pool="decode", reason="scale_down") == 1


def test_an_empty_prefill_pool_gets_the_demand_of_local_prefills_and_is_woken_by_its_target():
    cfg = _cfg(prefill_min=0)
    metrics, clock = ClusterMetrics(lambda: []), FakeClock()
    planner = Planner(cfg.pools, cfg.router, metrics, clock=clock)
    woken: list[tuple[str, int]] = []
    planner.wake = lambda pool, target, decided_s: woken.append((pool, target))
    decode = _ep("decode", Role.DECODE)
    snap = PoolSnapshot([decode])
    assert planner.step(snap) == {"prefill": 0, "decode": 1}
    asyncio.run(planner.publish(snap, {}))
    assert woken == []  # no demand, no wake
    for i in range(10):  # prefilled on the decode replica: the prefill pool is empty
        req = RequestDescriptor(f"r{i}", "m", 300, 20, "free", 0.0)
        planner.on_routed(req, RoutingDecision(decode=decode, prefill=None, uncached_tokens=300))
    clock.t += 1.0
    assert planner.step(snap)["prefill"] == 1
    assert planner.last["prefill"][0].prompt_tokens_mean == 300
    asyncio.run(planner.publish(snap, {}))
    assert woken == [("prefill", 1)]


def test_config_and_health_of_pools_that_scale_from_zero():
    cfg = _cfg(prefill_min=0)
    assert [p.scales_from_zero for p in cfg.pools] == [True, True]
    assert cfg.pools[1].autoscaling.cold_start_timeout_s > 0

    def pool(role: str, healthy: int, wakes: bool) -> dict:
        return {"role": role, "healthy": healthy, "scales_from_zero": wakes}

    # (ready, ok): both pools empty but wakeable: ok (the first request wakes them), not ready
    assert roles_served({"p": pool("prefill", 0, True), "d": pool("decode", 0, True)}) == (False, True)
    assert roles_served({"p": pool("prefill", 0, True), "d": pool("decode", 1, True)}) == (True, True)
    assert roles_served({"p": pool("prefill", 1, False), "d": pool("decode", 0, False)}) == (False, False)
