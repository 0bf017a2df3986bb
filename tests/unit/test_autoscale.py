"""router/autoscale.py: forecasters, replica counts from a cost model, the HPA-style stabilizer (fake clock)."""

from __future__ import annotations

import pytest

from router.autoscale import (
    Arrival,
    ConstantForecaster,
    DemandWindow,
    EwmaForecaster,
    Stabilizer,
    StabilizerSettings,
    TrendForecaster,
    batch_at_tpot_slo,
    decode_replicas,
    make_forecaster,
    prefill_replicas,
)
from router.cost_model import CostModel, CostPrior


def test_forecasters():
    c, e, t = ConstantForecaster(), EwmaForecaster(alpha=0.5), TrendForecaster(window=4)
    assert c.forecast() == e.forecast() == t.forecast() == 0.0
    for v in (1.0, 2.0, 3.0, 4.0):
        c.observe(v)
        e.observe(v)
        t.observe(v)
    assert c.forecast() == 4.0
    assert e.forecast() == pytest.approx(((1 * 0.5 + 2 * 0.5) * 0.5 + 3 * 0.5) * 0.5 + 4 * 0.5)
    assert t.forecast() == pytest.approx(5.0)  # the line through 1, 2, 3, 4 one step ahead
    for _ in range(4):
        t.observe(0.0)
    assert t.forecast() == 0.0
    falling = TrendForecaster(window=3)
    for v in (9.0, 5.0, 1.0):
        falling.observe(v)
    assert falling.forecast() == 0.0  # never negative
    assert isinstance(make_forecaster("ewma"), EwmaForecaster)
    with pytest.raises(ValueError, match="unknown predictor"):
        make_forecaster("oracle")


def test_refused_requests_count_as_demand():
    w = DemandWindow(window_s=10.0)
    for i in range(10):
        w.add(Arrival(at_s=float(i), prompt_tokens=100, output_tokens=20, refused=i % 2 == 0))
    d = w.demand(now_s=9.0)
    assert d.rate_per_s == pytest.approx(1.0)  # all ten, refused ones included
    assert d.refused_per_s == pytest.approx(0.5)
    assert d.mean_prompt_tokens == 100 and d.mean_output_tokens == 20
    assert w.demand(now_s=100.0).rate_per_s == 0.0  # the window slid past them


def test_prefill_replicas_from_profile():
    model = CostModel(CostPrior(prefill_tokens_per_s=1000.0, prefill_overhead_s=0.0))
    tps = model.prefill_tokens_per_s()
    assert tps == pytest.approx(1000.0)
    # 4 req/s x 500 tokens = 2000 tokens/s against 800 usable per replica
    assert prefill_replicas(4.0, 500, 0, tps, ttft_slo_s=2.0) == pytest.approx(2.5)
    # the observed/predicted correction slows the fitted rate
    assert prefill_replicas(4.0, 500, 0, tps, ttft_slo_s=2.0, correction=2.0) == pytest.approx(5.0)
    # a backlog must drain within the TTFT SLO
    assert prefill_replicas(0.0, 0, 6000, tps, ttft_slo_s=2.0) == pytest.approx(3.0)


def test_decode_replicas_from_profile():
    model = CostModel(CostPrior(decode_step_s=0.05, decode_step_per_seq_s=0.01, decode_step_per_kilotoken_s=0.0))
    step = model.decode_step_s
    assert step(1) == pytest.approx(0.05) and step(11) == pytest.approx(0.15)
    b = batch_at_tpot_slo(step, tpot_slo_s=0.1, max_batch=64)
    assert b == 6  # 0.05 + 5 x 0.01 = 0.10
    assert batch_at_tpot_slo(step, 0.1, 64, correction=2.0) == 1  # even batch 1 is at the corrected SLO
    assert batch_at_tpot_slo(step, 10.0, 8) == 8  # capped by the engine's max_num_seqs
    # 12 running needs 2 replicas of batch 6; Little's law on the arrivals when it says more
    assert decode_replicas(0.0, 0, running=12, tpot_s=0.1, batch_at_slo=b) == pytest.approx(2.0)
    assert decode_replicas(2.0, 100, running=0, tpot_s=0.09, batch_at_slo=b) == pytest.approx(3.0)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def tick(self, s: float) -> float:
        self.t += s
        return self.t


def test_stabilizer_scales_up_at_once_and_down_after_the_window():
    clock = FakeClock()
    st = Stabilizer(StabilizerSettings(upscale_delay_s=0, downscale_delay_s=10, max_step=1, cooldown_s=0), 1, 3, 1)
    assert st.decide(clock.t, 0.5).reason == "steady"
    d = st.decide(clock.tick(1), 2.4)
    assert (d.target, d.reason) == (2, "scale_up")  # ceil(2.4) = 3, one step at a time
    assert st.decide(clock.tick(1), 2.4) == type(d)(3, "scale_up")
    assert st.decide(clock.tick(1), 9).reason == "at_max"
    reasons = [st.decide(clock.tick(1), 1.0).reason for _ in range(10)]
    assert reasons == ["hold_downscale_window"] * 10  # the 3 recommended at t=3 is in every window up to t=13
    assert st.target == 3
    d = st.decide(clock.tick(1), 1.0)
    assert (d.target, d.reason) == (2, "scale_down")
    assert st.decide(clock.tick(1), 1.0).target == 1
    assert st.decide(clock.tick(1), 0.0).reason == "at_min"


def test_stabilizer_scale_down_takes_the_window_maximum():
    clock = FakeClock()
    st = Stabilizer(StabilizerSettings(downscale_delay_s=5, max_step=5, cooldown_s=0), 1, 5, 5)
    for v in (5, 3, 2, 4, 2, 2, 2):
        d = st.decide(clock.tick(1), v)
    assert (d.target, d.reason) == (4, "scale_down")  # the highest of the last 5 s: 4


def test_stabilizer_upscale_window_and_cooldown():
    clock = FakeClock()
    st = Stabilizer(StabilizerSettings(upscale_delay_s=3, downscale_delay_s=0, max_step=4, cooldown_s=5), 1, 8, 1)
    st.decide(clock.t, 1)
    assert st.decide(clock.tick(1), 6).reason == "hold_upscale_window"
    assert st.decide(clock.tick(1), 6).reason == "hold_upscale_window"
    d = st.decide(clock.tick(1), 6)
    assert d.reason == "hold_upscale_window"  # the window still holds the first recommendation, 1
    d = st.decide(clock.tick(1), 6)
    assert (d.target, d.reason) == (5, "scale_up")  # lowest of the window is 6; max_step 4 from 1
    assert st.decide(clock.tick(1), 1).reason == "hold_cooldown"
    assert st.decide(clock.tick(3), 8).reason == "hold_cooldown"
    d = st.decide(clock.tick(1), 8)
    assert (d.target, d.reason) == (8, "scale_up")  # the 1 at t=5 left the 3 s window


def test_stabilizer_wakes_an_empty_pool_at_once_and_returns_to_zero_after_the_window():
    clock = FakeClock()
    st = Stabilizer(StabilizerSettings(downscale_delay_s=5, max_step=1, cooldown_s=2), 0, 2, 0)
    assert st.decide(clock.t, 0.0).reason == "steady"
    d = st.wake(clock.tick(1))
    assert (d.target, d.reason) == (1, "cold_start")  # no window, no cool-down in the way
    assert st.wake(clock.tick(0.5)) == d  # already awake: unchanged
    assert st.decide(clock.tick(0.5), 0.0).reason == "hold_cooldown"  # a wake starts a cool-down
    reasons = [st.decide(clock.tick(1), 0.0).reason for _ in range(4)]
    assert reasons == ["hold_downscale_window"] * 4  # the wake's 1 is in every window up to t=6
    d = st.decide(clock.tick(1), 0.0)
    assert (d.target, d.reason) == (0, "scale_down")
