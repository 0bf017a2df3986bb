"""The phase-shift workload, the flex fields of the bench timeline, and the flex vs static report's pieces."""

from __future__ import annotations

from loadtests import workloads
from loadtests.client import RequestRecord
from loadtests.flex_report import first_rise, phase_table, shift_times
from loadtests.timeline import parse_sample
from serve.metrics import ClusterMetrics


def test_phase_shift_changes_the_shape_twice():
    specs = workloads.build("phase-shift", seed=1, n=10_000, rate=2.0, phase_s=60.0, decode_rate=3.0)
    by_phase = {p: [s for s in specs if s.tag == p] for p in workloads.PHASES}
    assert all(s.tag == workloads.PHASES[min(int(s.arrival_s // 60.0), 2)] for s in specs)
    assert {s.max_tokens for s in by_phase["1-prefill-heavy"] + by_phase["3-prefill-heavy"]} == {16}
    assert {s.max_tokens for s in by_phase["2-decode-heavy"]} == {256}
    long_words = len(by_phase["1-prefill-heavy"][0].messages[0]["content"].split())
    short_words = len(by_phase["2-decode-heavy"][0].messages[0]["content"].split())
    assert long_words == int(1024 / workloads.TOKENS_PER_WORD) and short_words == int(64 / workloads.TOKENS_PER_WORD)
    assert 2.4 < len(by_phase["2-decode-heavy"]) / 60.0 < 3.6 and 1.5 < len(by_phase["1-prefill-heavy"]) / 60.0 < 2.5
    assert len(workloads.build("phase-shift", seed=1, n=10, rate=2.0)) == 10  # n bounds the whole run


def test_timeline_reads_the_flex_metrics():
    m = ClusterMetrics(lambda: [])
    for replica, role in (("a", "decode"), ("b", "draining")):
        for r in ("prefill", "decode", "draining"):
            m.flex_role.labels("flex", replica, r).set(1.0 if r == role else 0.0)
    m.flex_decisions.labels("flex", "decode_heavy").inc(2)
    m.flex_decisions.labels("flex", "balanced").inc(7)
    m.flex_flips.labels("flex", "prefill", "decode", "decode_heavy").inc()
    m.flex_desired_prefill.labels("flex").set(0.2)
    s = parse_sample(m.render().decode())
    assert (s["flex_prefill"], s["flex_decode"], s["flex_draining"]) == (0.0, 1.0, 1.0)
    assert (s["flex_decode_heavy_decisions"], s["flex_prefill_heavy_decisions"], s["flex_flips"]) == (2.0, 0.0, 1.0)
    assert s["flex_desired_prefill"] == 0.2


def test_shift_to_decision_and_flip_times():
    timeline = [{"t": float(t), "flex_decode_heavy_decisions": 0.0, "flex_flips": 0.0} for t in range(0, 70)]
    for s in timeline:
        s["flex_decode_heavy_decisions"] = 1.0 if s["t"] >= 42 else 0.0
        s["flex_flips"] = 1.0 if s["t"] >= 44 else 0.0
    assert first_rise(timeline, "flex_flips", 30.0) == 14.0
    assert first_rise(timeline, "flex_flips", 50.0) is None  # nothing moves after 50 s
    (to_decode, to_prefill) = shift_times(timeline, 30.0)
    assert (to_decode["decision_after_s"], to_decode["flip_applied_after_s"]) == (12.0, 14.0)
    assert to_prefill["decision_after_s"] is None


def test_phase_table_counts_goodput_per_phase():
    ok = RequestRecord(start_s=1.0, ttft_s=0.5, e2e_s=1.5, completion_tokens=11, tag="2-decode-heavy")
    slow = RequestRecord(start_s=2.0, ttft_s=0.5, e2e_s=10.5, completion_tokens=11, tag="2-decode-heavy")
    refused = RequestRecord(start_s=3.0, outcome="rejected", reason="overload", tag="2-decode-heavy")
    t = phase_table([ok, slow, refused], phase_s=10.0, ttft_slo_s=1.0, tpot_slo_s=0.25)["2-decode-heavy"]
    assert (t["requests"], t["ok"], t["good"], t["goodput_rps"]) == (3, 2, 1, 0.1)
    assert abs(t["tpot_p99_s"] - 0.99) < 0.01
