"""role: flex pools: the controller (router/flex.py) with a fake clock, the config, the role registry the pool
directory reads, and the flip procedure and its metrics (serve/flex.py)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from router.cost_model import CostModel
from router.flex import (
    FlexCapacity,
    FlexController,
    FlexControllerSettings,
    FlexDemand,
    FlexReplica,
    capacity_from_model,
    replicas_of_work,
)
from router.types import PoolSnapshot, Rejection, RequestDescriptor, Role, RoutingDecision
from serve.config import DEFAULT_CONFIG, ClusterConfig
from serve.flex import FlexManager, flex_roles
from serve.metrics import ClusterMetrics
from serve.planner import Planner
from serve.pool_directory import PoolDirectory, endpoint_from_stats
from tests.integration.cluster_utils import metric_sum, parse_samples

CAP = FlexCapacity(prefill_tokens_per_s=1000.0, decode_tokens_per_s=100.0)
DECODE_HEAVY = FlexDemand(prefill_tokens_per_s=50.0, decode_tokens_per_s=100.0)  # 0.05 vs 1.0 replicas
PREFILL_HEAVY = FlexDemand(prefill_tokens_per_s=1500.0, decode_tokens_per_s=5.0)
BALANCED = FlexDemand(prefill_tokens_per_s=500.0, decode_tokens_per_s=50.0)  # 0.5 vs 0.5: one of each


def _split(n_prefill: int, n_decode: int, **load) -> list[FlexReplica]:
    return [FlexReplica(f"p{i}", Role.PREFILL, load.get(f"p{i}", 0)) for i in range(n_prefill)] + [
        FlexReplica(f"d{i}", Role.DECODE, load.get(f"d{i}", 0)) for i in range(n_decode)
    ]


def _ctl(**kw) -> FlexController:
    return FlexController(FlexControllerSettings(**{"dwell_s": 30.0, "confirm_intervals": 2, **kw}))


class TestController:
    def test_work_in_replicas(self):
        assert replicas_of_work(DECODE_HEAVY, CAP) == pytest.approx((0.05, 1.0))

    def test_decode_heavy_flips_the_prefill_replica_after_confirmation(self):
        ctl = _ctl()
        first = ctl.decide(0.0, _split(1, 1), DECODE_HEAVY, CAP)
        assert (first.reason, first.flips) == ("confirming", False)
        assert first.desired_prefill == pytest.approx(2 * 0.05 / 1.05)
        d = ctl.decide(10.0, _split(1, 1), DECODE_HEAVY, CAP)
        assert d.flips and d.reason == "decode_heavy"
        assert (d.endpoint_id, d.from_role, d.to_role) == ("p0", Role.PREFILL, Role.DECODE)

    def test_prefill_heavy_flips_the_least_loaded_decode_replica(self):
        ctl = _ctl(confirm_intervals=1, min_prefill=0)
        d = ctl.decide(0.0, _split(0, 3, d0=5, d1=2, d2=9), PREFILL_HEAVY, CAP)
        assert (d.reason, d.endpoint_id, d.to_role) == ("prefill_heavy", "d1", Role.PREFILL)

    def test_hysteresis_band_holds_a_near_even_split(self):
        ctl = _ctl(confirm_intervals=1, hysteresis=0.25)
        # desired 0.3 prefill of 2: below 1 - 0.5 but within the 0.25 band beyond it
        near = FlexDemand(prefill_tokens_per_s=150.0, decode_tokens_per_s=85.0)
        d = ctl.decide(0.0, _split(1, 1), near, CAP)
        assert d.desired_prefill == pytest.approx(2 * 0.15 / 1.0)
        assert (d.reason, d.flips) == ("balanced", False)
        assert ctl.decide(1.0, _split(1, 1), BALANCED, CAP).reason == "balanced"
        assert ctl.decide(2.0, _split(1, 1), DECODE_HEAVY, CAP).flips  # past the band: flips

    def test_a_break_in_the_signal_restarts_confirmation(self):
        ctl = _ctl(confirm_intervals=2)
        assert ctl.decide(0.0, _split(1, 1), DECODE_HEAVY, CAP).reason == "confirming"
        assert ctl.decide(1.0, _split(1, 1), BALANCED, CAP).reason == "balanced"
        assert ctl.decide(2.0, _split(1, 1), DECODE_HEAVY, CAP).reason == "confirming"
        assert ctl.decide(3.0, _split(1, 1), DECODE_HEAVY, CAP).flips

    def test_no_flip_while_one_is_in_progress(self):
        ctl = _ctl(confirm_intervals=1)
        for t in range(5):
            d = ctl.decide(float(t), _split(1, 1), DECODE_HEAVY, CAP, flipping=True)
            assert (d.reason, d.flips) == ("in_progress", False)
        assert ctl.decide(5.0, _split(1, 1), DECODE_HEAVY, CAP).flips

    def test_dwell_after_a_flip_then_the_reverse_flip(self):
        ctl = _ctl(confirm_intervals=1, dwell_s=30.0)
        assert ctl.decide(0.0, _split(1, 1), DECODE_HEAVY, CAP).flips
        ctl.applied(2.0)
        # the load turns prefill-heavy at once: held for the dwell time after the flip was applied
        for t in (3.0, 10.0, 31.9):
            assert ctl.decide(t, _split(0, 2), PREFILL_HEAVY, CAP).reason == "dwell"
        d = ctl.decide(32.0, _split(0, 2), PREFILL_HEAVY, CAP)
        assert (d.reason, d.to_role) == ("prefill_heavy", Role.PREFILL)

    def test_confirmations_count_during_the_dwell(self):
        ctl = _ctl(confirm_intervals=3, dwell_s=10.0)
        ctl.applied(0.0)
        assert [ctl.decide(t, _split(0, 2), PREFILL_HEAVY, CAP).reason for t in (2.0, 4.0, 6.0)] == ["dwell"] * 3
        assert ctl.decide(10.0, _split(0, 2), PREFILL_HEAVY, CAP).flips

    def test_never_below_min_prefill_or_min_decode(self):
        ctl = _ctl(confirm_intervals=1, min_prefill=1, min_decode=1)
        assert ctl.decide(0.0, _split(1, 1), DECODE_HEAVY, CAP).reason == "at_min_prefill"
        assert ctl.decide(1.0, _split(1, 1), PREFILL_HEAVY, CAP).reason == "at_min_decode"
        ctl = _ctl(confirm_intervals=1, min_prefill=0, min_decode=2)
        assert ctl.decide(0.0, _split(1, 2), PREFILL_HEAVY, CAP).reason == "at_min_decode"

    def test_a_split_outside_the_bounds_is_restored_at_once(self):
        ctl = _ctl(confirm_intervals=5, min_prefill=1, min_decode=1, dwell_s=100.0)
        ctl.applied(0.0)
        d = ctl.decide(1.0, _split(0, 2), DECODE_HEAVY, CAP)  # no dwell, no confirmation for the bounds
        assert (d.reason, d.to_role) == ("below_min_prefill", Role.PREFILL)
        d = ctl.decide(2.0, _split(2, 0), PREFILL_HEAVY, CAP)
        assert (d.reason, d.to_role) == ("below_min_decode", Role.DECODE)

    def test_idle_holds(self):
        ctl = _ctl(confirm_intervals=1)
        assert ctl.decide(0.0, _split(1, 1), FlexDemand(0.0, 0.0), CAP).reason == "idle"
        assert ctl.decide(1.0, _split(1, 1), FlexDemand(1.0, 1.0), CAP).reason == "idle"  # 0.011 < min_load

    def test_unhealthy_replicas_do_not_flip(self):
        ctl = _ctl(confirm_intervals=1, min_prefill=0)
        replicas = [FlexReplica("p0", Role.PREFILL, healthy=False), FlexReplica("d0", Role.DECODE)]
        assert ctl.decide(0.0, replicas, DECODE_HEAVY, CAP).reason == "no_candidate"

    def test_capacity_from_the_cost_model(self):
        m = CostModel()
        cap = capacity_from_model(m, tpot_slo_s=0.25, max_batch=64)
        assert cap.prefill_tokens_per_s == pytest.approx(m.prefill_tokens_per_s())
        # prior: 0.1 s + 0.004 s per extra sequence -> batch 38 at 0.248 s meets 0.25 s
        assert cap.decode_tokens_per_s == pytest.approx(38 / m.decode_step_s(38))
        m.tpot_bias = 2.0  # observed TPOT twice the prediction: a smaller batch, fewer tokens/s
        assert capacity_from_model(m, 0.25, 64).decode_tokens_per_s < cap.decode_tokens_per_s

    def test_serving_path_latency_does_not_make_short_prompts_look_prefill_heavy(self):
        # observed TTFT 10x the engine's prefill (64-token prompts: ~30 ms prefill, ~0.3 s end to end): the
        # engine's prefill rate is unchanged, so 0.8 req/s of 64/256 is decode work: the prefill replica flips
        m = CostModel()
        m.ttft_bias = 10.0
        cap = capacity_from_model(m, tpot_slo_s=0.25, max_batch=64)
        assert cap.prefill_tokens_per_s == pytest.approx(m.prefill_tokens_per_s())
        demand = FlexDemand(prefill_tokens_per_s=0.8 * 64, decode_tokens_per_s=0.8 * 256)
        d = _ctl(confirm_intervals=1, min_prefill=0).decide(0.0, _split(1, 1), demand, cap)
        assert (d.reason, d.to_role) == ("decode_heavy", Role.DECODE) and d.desired_prefill < 0.25


def _flex_cfg(**flex) -> ClusterConfig:
    data = ClusterConfig.from_yaml(DEFAULT_CONFIG).model_dump(mode="json")
    data["pools"] = [
        {
            "name": "flex",
            "role": "flex",
            "replicas": 2,
            "device": {"kind": "cpu", "cpu_cores": ["0", "1"]},
            "flex": {"interval_s": 1.0, "confirm_intervals": 1, "dwell_s": 5.0, "demand_window_s": 10.0, **flex},
        }
    ]
    return ClusterConfig.from_dict(data)


class TestConfig:
    def test_a_flex_pool_alone_is_a_valid_cluster(self):
        cfg = _flex_cfg()
        assert cfg.pools[0].flex.initial_prefill == 1 and cfg.pools[0].flex.min_decode == 1

    def test_flex_pool_beside_fixed_role_pools(self):
        data = ClusterConfig.from_yaml(DEFAULT_CONFIG).model_dump(mode="json")
        data["pools"].append({"name": "flex", "role": "flex", "replicas": 2})
        assert [p.role.value for p in ClusterConfig.from_dict(data).pools] == ["prefill", "decode", "flex"]

    def test_flex_settings_only_on_a_flex_pool(self):
        data = ClusterConfig.from_yaml(DEFAULT_CONFIG).model_dump(mode="json")
        assert data["pools"][1]["flex"] is None
        data["pools"][1]["flex"] = {"dwell_s": 1.0}
        with pytest.raises(ValidationError, match="flex settings need role: flex"):
            ClusterConfig.from_dict(data)

    @pytest.mark.parametrize(
        "flex, replicas, autoscaling, match",
        [
            ({"initial_prefill": 2}, 2, {}, "exceeds replicas.min"),
            ({"initial_prefill": 0, "min_prefill": 1}, 2, {}, "min_prefill"),
            ({}, {"min": 2, "max": 3}, {"enabled": True}, "size is fixed"),
        ],
    )
    def test_invalid_flex_settings(self, flex, replicas, autoscaling, match):
        data = _flex_cfg().model_dump(mode="json")
        data["pools"][0].update(replicas=replicas, autoscaling=autoscaling)
        data["pools"][0]["flex"].update(flex)
        with pytest.raises(ValidationError, match=match):
            ClusterConfig.from_dict(data)


class FakeSource:
    """A fake stand-in for a flex pool's Serve request router (lists every replica as decode)."""

    def __init__(self, *ids):
        self.ids = list(ids)

    def endpoints(self):
        return [endpoint_from_stats(i, "flex", Role.DECODE, None) for i in self.ids]


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _directory(cfg: ClusterConfig, *ids: str) -> tuple[PoolDirectory, FakeSource]:
    d = PoolDirectory(clock=lambda: 100.0)
    d.flex = flex_roles(cfg.pools)
    src = FakeSource(*ids)
    d.register("flex", src)
    return d, src


class TestRoles:
    def test_initial_split_and_draining_replicas_are_no_candidates(self):
        d, _ = _directory(_flex_cfg(), "b", "a")
        snap = d.snapshot()
        assert [(e.endpoint_id, e.role) for e in snap.by_role(Role.PREFILL)] == [("b", Role.PREFILL)]
        assert [e.endpoint_id for e in snap.by_role(Role.DECODE)] == ["a"]  # decode first, in id order
        d.flex.begin("flex", "b", Role.DECODE)
        snap = d.snapshot()
        assert snap.by_role(Role.PREFILL) == [] and [e.endpoint_id for e in snap.by_role(Role.DECODE)] == ["a"]
        assert len(snap.endpoints) == 2  # still listed (health, planner), as draining
        assert d.flex.report() == {"flex": {"a": "decode", "b": "prefill->decode"}}
        d.flex.switch("flex", "b")
        assert sorted(e.endpoint_id for e in d.snapshot().by_role(Role.DECODE)) == ["a", "b"]

    def test_a_replica_starting_alone_decodes_and_gone_ones_are_forgotten(self):
        d, src = _directory(_flex_cfg(), "a")
        assert d.snapshot().endpoints[0].role is Role.DECODE
        src.ids.append("b")
        assert {e.endpoint_id: e.role for e in d.snapshot().endpoints} == {"a": Role.DECODE, "b": Role.PREFILL}
        src.ids.remove("b")
        d.snapshot()
        assert d.flex.report() == {"flex": {"a": "decode"}}

    def test_no_registry_without_a_flex_pool(self):
        assert flex_roles(ClusterConfig.from_yaml(DEFAULT_CONFIG).pools) is None


def _decode_heavy_requests(planner_or_manager, decision: RoutingDecision, n: int) -> None:
    for i in range(n):
        req = RequestDescriptor(f"r{i}", "m", 32, 200, "free", 0.0)
        planner_or_manager.on_routed(req, decision)
        planner_or_manager.on_routed(req, decision, moved=True)  # a moved decode is no new demand


class TestManager:
    def _setup(self, **flex):
        cfg = _flex_cfg(**flex)
        d, _ = _directory(cfg, "a", "b")
        clock, metrics, in_flight = FakeClock(), ClusterMetrics(lambda: []), {}
        mgr = FlexManager(cfg.pools, cfg.router, d.flex, metrics, lambda: in_flight, None, 0.25, clock=clock)
        return cfg, d, clock, metrics, in_flight, mgr

    def test_demand_from_routed_requests(self):
        _, d, clock, _, _, mgr = self._setup()
        a, b = d.snapshot().endpoints
        _decode_heavy_requests(mgr, RoutingDecision(decode=a, prefill=None, uncached_tokens=32), 50)
        mgr.on_routed(RequestDescriptor("x", "m", 900, 10, "free", 0.0), Rejection("overload_decode", "full", 503, 1.0))
        dem = mgr.measured("flex", clock.t)
        assert dem.prefill_tokens_per_s == pytest.approx((50 * 32 + 900) / 10.0)
        assert dem.decode_tokens_per_s == pytest.approx((50 * 200 + 10) / 10.0)

    def test_decode_heavy_load_flips_the_prefill_replica_after_its_in_flight_work(self):
        _, d, clock, metrics, in_flight, mgr = self._setup()
        prefill = d.snapshot().by_role(Role.PREFILL)[0]
        decode = d.snapshot().by_role(Role.DECODE)[0]

        async def run() -> tuple[dict, list[bool], float]:
            mgr.step(d.snapshot())  # no demand yet: idle
            _decode_heavy_requests(mgr, RoutingDecision(decode=decode, prefill=prefill, uncached_tokens=32), 100)
            in_flight[prefill.endpoint_id] = 1  # one prefill still running on it
            clock.t += 1.0
            decisions = mgr.step(d.snapshot())
            (task,) = mgr._tasks
            seen = []
            for _ in range(5):  # bounded: the flip waits for the in-flight prefill
                await asyncio.sleep(0.06)
                seen.append(d.flex.flipping("flex"))
            assert d.snapshot().by_role(Role.PREFILL) == []  # no new prefill goes there meanwhile
            clock.t += 0.5
            in_flight.clear()
            took = await asyncio.wait_for(task, timeout=5.0)
            return decisions, seen, took

        decisions, seen, took = asyncio.run(run())
        assert decisions["flex"].reason == "decode_heavy" and decisions["flex"].endpoint_id == prefill.endpoint_id
        assert all(seen) and took == pytest.approx(0.5)
        assert d.flex.report() == {"flex": {decode.endpoint_id: "decode", prefill.endpoint_id: "decode"}}
        s = parse_samples(metrics.render().decode())
        assert metric_sum(s, "pdserve_flex_flips_total", pool="flex", reason="decode_heavy") == 1
        assert metric_sum(s, "pdserve_flex_flips_total", **{"from": "prefill", "to": "decode"}) == 1
        assert metric_sum(s, "pdserve_flex_flip_seconds_count", pool="flex") == 1
        assert metric_sum(s, "pdserve_flex_decisions_total", pool="flex", reason="idle") == 1
        assert metric_sum(s, "pdserve_flex_role", replica=prefill.endpoint_id, role="decode") == 1
        assert metric_sum(s, "pdserve_flex_role", replica=prefill.endpoint_id, role="prefill") == 0
        # the dwell time runs from the switch: the next decisions hold
        clock.t += 1.0
        assert mgr.step(d.snapshot())["flex"].reason in ("dwell", "at_min_prefill", "balanced")

    def test_drain_is_bounded(self):
        cfg = _flex_cfg(drain_timeout_s=1.0)
        d, _ = _directory(cfg, "a", "b")
        clock = FakeClock()
        prefill = d.snapshot().by_role(Role.PREFILL)[0]

        def in_flight() -> dict:  # never finishes; each look at it takes 0.1 s of the fake clock
            clock.t += 0.1
            return {prefill.endpoint_id: 3}

        mgr = FlexManager(cfg.pools, cfg.router, d.flex, ClusterMetrics(lambda: []), in_flight, None, 0.25, clock=clock)
        took = asyncio.run(asyncio.wait_for(mgr.flip("flex", prefill.endpoint_id, Role.DECODE, "decode_heavy"), 10.0))
        assert took == pytest.approx(1.1, abs=0.11)  # the deadline, then one last look
        assert d.flex.report()["flex"][prefill.endpoint_id] == "decode"

    def test_the_planner_runs_a_flex_pool_as_signals_only(self):
        cfg, d, clock, metrics, _, mgr = self._setup()
        planner = Planner(cfg.pools, cfg.router, metrics, clock=clock, flex=mgr)
        decode = d.snapshot().by_role(Role.DECODE)[0]
        _decode_heavy_requests(planner, RoutingDecision(decode=decode, prefill=None, uncached_tokens=32), 10)
        assert mgr.measured("flex", clock.t).decode_tokens_per_s == pytest.approx(10 * 200 / 10.0)
        assert planner.step(PoolSnapshot(d.snapshot().endpoints)) == {}
        assert planner.report()["flex"]["autoscaling"] is False
