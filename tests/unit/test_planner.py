"""serve/planner.py, router/pool_planner.py, serve/autoscale_policy.py and the autoscaling config: the
planner's inputs (refused requests are demand), its decisions and metrics, and what reaches Serve."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from router.types import EndpointState, PoolSnapshot, Rejection, RequestDescriptor, Role, RoutingDecision
from serve.app import PLANNER_POLICY, pool_deployment_options
from serve.autoscale_policy import DECIDED_METRIC, TARGET_METRIC, pool_target_policy
from serve.config import DEFAULT_CONFIG, ClusterConfig
from serve.metrics import ClusterMetrics
from serve.planner import Planner
from tests.integration.cluster_utils import metric_sum, parse_samples


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _cfg(**autoscaling) -> ClusterConfig:
    data = ClusterConfig.from_yaml(DEFAULT_CONFIG).model_dump(mode="json")
    data["pools"][1]["replicas"] = {"min": 1, "max": 3}
    data["pools"][1]["engine"]["max_num_seqs"] = 4
    data["pools"][1]["autoscaling"] = {"enabled": True, "adjustment_interval_s": 1.0, **autoscaling}
    return ClusterConfig.from_dict(data)


def _req(i: int, prompt: int = 200, out: int = 50) -> RequestDescriptor:
    return RequestDescriptor(f"r{i}", "m", prompt, out, "free", 0.0)


def _ep(pool: str, role: Role, i: int, running: int = 0, waiting: int = 0, kv: float = 0.0) -> EndpointState:
    return EndpointState(f"{pool}-{i}", pool, role, True, num_running=running, num_waiting=waiting, kv_usage=kv)


REFUSED = Rejection(reason="overload_decode", message="full", status_code=503, retry_after_s=1.0)


def test_refused_requests_are_demand_and_drive_a_scale_up():
    cfg = _cfg(downscale_delay_s=5.0, cooldown_s=0.0, max_step=2, predictor="constant", demand_window_s=10.0)
    metrics, clock = ClusterMetrics(lambda: []), FakeClock()
    planner = Planner(cfg.pools, cfg.router, metrics, clock=clock)
    decode = _ep("decode", Role.DECODE, 0, running=4, waiting=0)
    snap = PoolSnapshot([_ep("prefill", Role.PREFILL, 0), decode])
    assert planner.step(snap) == {"decode": 1}  # 4 running fit one replica's batch of 4
    # 10 s of 2 admitted + 8 refused requests per second; every one asks 50 tokens
    for i in range(100):
        outcome = REFUSED if i % 5 else RoutingDecision(decode=decode, prefill=None, uncached_tokens=200)
        planner.on_routed(_req(i), outcome)
        planner.on_routed(_req(i), outcome, moved=True)  # a moved decode is not a new arrival
    clock.t += 1.0
    targets = planner.step(snap)
    sig, decision = planner.last["decode"]
    assert sig.arrival_rate == pytest.approx(10.0) and sig.refused_rate == pytest.approx(8.0)
    assert sig.output_tokens_mean == 50
    # Little's law: 10 req/s x 50 tokens x the step time at batch 4 is far above 4 concurrent decodes
    assert sig.desired_replicas > 3
    assert (targets["decode"], decision.reason) == (3, "scale_up")
    s = parse_samples(metrics.render().decode())
    assert metric_sum(s, "pdserve_planner_decisions_total", pool="decode", reason="scale_up") == 1
    assert metric_sum(s, "pdserve_planner_refused_rate", pool="decode") == pytest.approx(8.0)
    assert metric_sum(s, "pdserve_planner_target_replicas", pool="decode") == 3
    # the next step comes one interval later
    assert planner.step(snap) == {}
    # the prefill pool is not autoscaled: signals every 10 s, no decisions; it saw only the refused
    # requests (the admitted ones prefilled on their decode replica), over its 30 s window
    clock.t += 10.0
    assert "prefill" not in planner.step(snap)
    s = parse_samples(metrics.render().decode())
    assert metric_sum(s, "pdserve_planner_arrival_rate", pool="prefill") == pytest.approx(80 / 30)
    assert metric_sum(s, "pdserve_planner_refused_rate", pool="prefill") == pytest.approx(80 / 30)
    assert metric_sum(s, "pdserve_planner_decisions_total", pool="prefill") == 0
    assert planner.report()["prefill"]["target_replicas"] is None


def test_latency_signals_and_scale_down_after_the_window():
    cfg = _cfg(downscale_delay_s=3.0, cooldown_s=0.0, predictor="ewma", demand_window_s=2.0)
    metrics, clock = ClusterMetrics(lambda: []), FakeClock()
    planner = Planner(cfg.pools, cfg.router, metrics, clock=clock)
    busy = PoolSnapshot([_ep("decode", Role.DECODE, i, running=4, waiting=4, kv=0.5) for i in range(2)])
    # 16 concurrent over a batch of 4 wants 4: from the 2 running, one step up to the pool's max of 3
    assert planner.step(busy)["decode"] == 3
    sig, _ = planner.last["decode"]
    assert (sig.decode_batch, sig.waiting, sig.kv_usage, sig.current_replicas) == (8, 8, 0.5, 2)
    d = RoutingDecision(
        decode=busy.endpoints[0], prefill=None, predicted_ttft_s=0.5, predicted_tpot_s=0.05, uncached_tokens=10
    )
    planner.on_first_token(d, 1.0)
    planner.on_finish(d, 0.1)
    planner.on_finish(d, None)  # a one-token answer has no TPOT
    idle = PoolSnapshot([_ep("decode", Role.DECODE, i) for i in range(2)])
    reasons = []
    for _ in range(5):
        clock.t += 1.0
        planner.step(idle)
        reasons.append(planner.last["decode"][1].reason)
    assert reasons == ["hold_downscale_window"] * 3 + ["scale_down", "scale_down"]
    assert planner.targets["decode"] == 1
    sig, _ = planner.last["decode"]
    assert sig.ttft_ratio == pytest.approx(2.0) and sig.tpot_ratio == pytest.approx(2.0)


@dataclass
class FakePoint:
    timestamp: float
    value: float


@dataclass
class FakeContext:
    raw_metrics: dict | None
    target_num_replicas: int = 1
    current_num_replicas: int = 1
    total_num_requests: float = 0.0


def test_serve_policy_returns_the_target_of_the_newest_decision():
    assert pool_target_policy(FakeContext(None, 2)) == (2, {})  # no report yet: the target stands
    # replica b reported last, but the target it holds was decided before a's: a's wins
    ctx = FakeContext(
        {
            TARGET_METRIC: {"a": [FakePoint(1.0, 2.0), FakePoint(5.0, 1.0)], "b": [FakePoint(6.0, 2.0)]},
            DECIDED_METRIC: {"a": [FakePoint(1.0, 10.0), FakePoint(5.0, 20.0)], "b": [FakePoint(6.0, 10.0)]},
        }
    )
    assert pool_target_policy(ctx) == (1.0, {})


def test_serve_policy_wakes_an_empty_pool_for_requests_queued_at_its_handles():
    assert pool_target_policy(FakeContext(None, 0, current_num_replicas=0)) == (0, {})  # idle: stays at 0
    assert pool_target_policy(FakeContext(None, 0, current_num_replicas=0, total_num_requests=1.0)) == (1, {})
    # a replica starting (target 1, none running yet) keeps its target
    assert pool_target_policy(FakeContext(None, 1, current_num_replicas=0, total_num_requests=1.0)) == (1, {})
    # a running replica that reports target 0 wins over a queue (the planner decided, knowing the demand)
    reported = {TARGET_METRIC: {"a": [FakePoint(1.0, 0.0)]}, DECIDED_METRIC: {"a": [FakePoint(1.0, 5.0)]}}
    assert pool_target_policy(FakeContext(reported, 1, total_num_requests=3.0)) == (0.0, {})


def test_replicas_report_the_metrics_the_policy_reads():
    import inspect

    from workers import deployment

    source = inspect.getsource(deployment.EngineServer.record_autoscaling_stats)
    assert f'"{TARGET_METRIC}"' in source and f'"{DECIDED_METRIC}"' in source


def test_deployment_options_of_an_autoscaled_pool():
    cfg = _cfg(adjustment_interval_s=2.0)
    opts = pool_deployment_options(cfg.pools[1], cfg)
    a = opts["autoscaling_config"]
    assert a.policy.policy_function == PLANNER_POLICY
    assert (a.min_replicas, a.max_replicas, a.upscale_delay_s, a.downscale_delay_s) == (1, 3, 0.0, 0.0)
    assert (a.metrics_interval_s, a.look_back_period_s) == (2.0, 4.0)
    # off by default: a ranged pool keeps Serve's default policy
    data = cfg.model_dump(mode="json")
    data["pools"][1]["autoscaling"] = {}
    plain = pool_deployment_options(ClusterConfig.from_dict(data).pools[1], cfg)["autoscaling_config"]
    assert plain.policy.is_default_policy_function()


@pytest.mark.parametrize(
    "replicas, autoscaling, match",
    [
        (2, {"enabled": True}, "needs replicas {min < max}"),
        ({"min": 0, "max": 2}, {"enabled": True, "cold_start_timeout_s": 0}, "cold_start_timeout_s"),
        ({"min": 1, "max": 2}, {"enabled": True, "predictor": "oracle"}, "predictor"),
        ({"min": 1, "max": 2}, {"enabled": True, "unknown": 1}, "unknown"),
    ],
)
def test_invalid_autoscaling_config(replicas, autoscaling, match):
    data = ClusterConfig.from_yaml(DEFAULT_CONFIG).model_dump(mode="json")
    data["pools"][1].update(replicas=replicas, autoscaling=autoscaling)
    with pytest.raises(ValidationError, match=match):
        ClusterConfig.from_dict(data)
