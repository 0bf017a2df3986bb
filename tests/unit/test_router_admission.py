"""router/cost_model.py and router/admission.py: fits and decision tables (pure)."""

import random

import pytest

from router.admission import Admission, AdmissionRules, TierPolicy, decide, usable_fraction
from router.cost_model import CostModel, CostPrior, OnlineLine
from router.types import Rejection

TIERS = {
    "premium": TierPolicy(0.10, 100, 4.0, 0.25),
    "standard": TierPolicy(0.30, 50, 4.0, 0.25),
    "free": TierPolicy(0.60, 10, 4.0, 0.25),
}
RULES = AdmissionRules(TIERS)


class TestCostModel:
    def test_line_fits_synthetic_timings_with_noise(self):
        rng = random.Random(0)
        line = OnlineLine(a=0.5, b=0.01, prior_weight=5, x_scale=1e3)  # a wrong prior
        for _ in range(200):
            x = rng.uniform(50, 2000)
            line.update(x, 0.05 + x / 250 + rng.gauss(0, 0.02))  # truth: 250 tok/s + 50 ms
        assert abs(line.slope - 1 / 250) < 2e-4 and abs(line.intercept - 0.05) < 0.05

    def test_tracks_a_change(self):
        m = CostModel(CostPrior(prefill_tokens_per_s=1000))
        for _ in range(150):
            for x in (100, 400, 900):
                m.observe_prefill(x, x / 200)  # slower than the prior
        assert 180 < m.prefill_tokens_per_s() < 220
        assert m.prefill_s(0) == 0.0 and m.prefill_s(512) == pytest.approx(512 / 200, rel=0.05)

    def test_decode(self):
        m = CostModel()
        for b in (1, 4, 8, 16) * 50:
            m.observe_decode(b, 0.1 + 0.005 * b)
        assert m.decode_step_s(8) == pytest.approx(0.14, rel=0.02)
        m.observe_decode(0, 1.0)  # ignored
        assert m.decode_step_s(0) == pytest.approx(m.decode_step_s(1))

    def test_one_odd_sample_after_a_steady_stretch_does_not_swing_the_fit(self):
        m = CostModel()
        for _ in range(3000):  # a steady batch: only one direction is excited
            m.observe_decode(4, 0.12, 2000)
        m.observe_decode(5, 0.30, 2600)  # one step that carried a prefill
        assert m.decode_step_s(4, 2000) == pytest.approx(0.12, rel=0.05)
        assert m.decode_step_s(8, 4000) < 0.16  # (unbounded covariance: 0.45 s)
        for _ in range(150):  # a real change is still tracked
            m.observe_decode(4, 0.2, 2000)
        assert m.decode_step_s(4, 2000) == pytest.approx(0.2, rel=0.05)

    def test_decode_plane_over_batch_and_context(self):
        rng = random.Random(1)
        m = CostModel()  # prior: 1 ms per 1k tokens
        for _ in range(400):
            b, ctx = rng.randint(1, 32), rng.randint(0, 40_000)
            m.observe_decode(b, 0.08 + 0.004 * b + 0.003 * ctx / 1e3 + rng.gauss(0, 0.003), ctx)
        assert m.decode.coef(2) * 1e3 == pytest.approx(0.003, rel=0.1)  # seconds per 1k context tokens
        assert m.decode_step_s(8, 20_000) == pytest.approx(0.08 + 0.032 + 0.06, rel=0.05)
        assert m.decode_step_s(8, 20_000) > m.decode_step_s(8, 0)


def _model(rate=250.0, step=0.1):
    m = CostModel(
        CostPrior(prefill_tokens_per_s=rate, prefill_overhead_s=0.0, decode_step_s=step, decode_step_per_seq_s=0.0)
    )
    return m


class TestAdmission:
    def test_tpot_grows_with_context_and_max_tokens(self):
        m = CostModel(CostPrior(decode_step_s=0.1, decode_step_per_seq_s=0.0, decode_step_per_kilotoken_s=0.01))
        kw = dict(queued_prefill_tokens=0, uncached_tokens=100, decode_batch=3, prompt_tokens=1000)
        short = decide("premium", RULES, m, max_new_tokens=64, **kw)
        long = decide("premium", RULES, m, max_new_tokens=4000, **kw)
        busy = decide("premium", RULES, m, max_new_tokens=64, decode_context_tokens=8000, **kw)
        # life context = current + prompt + max_tokens / 2
        assert short.predicted_tpot_s == pytest.approx(0.1 + 0.01 * 1.032)
        assert long.predicted_tpot_s == pytest.approx(0.1 + 0.01 * 3.0)
        assert busy.predicted_tpot_s == pytest.approx(0.1 + 0.01 * 9.032)
        # past the SLO on context alone: rejected while the decode replica is busy
        full = decide("premium", RULES, m, max_new_tokens=64, decode_context_tokens=20_000, **kw)
        assert isinstance(full, Rejection) and full.reason == "overload_tpot"

    def test_tier_fractions(self):
        assert usable_fraction("free", TIERS) == pytest.approx(0.6)
        assert usable_fraction("standard", TIERS) == pytest.approx(0.9)
        assert usable_fraction("premium", TIERS) == pytest.approx(1.0)

    # strict reservations (None) and what idle higher tiers lend: own + lower + inactive higher tiers'
    @pytest.mark.parametrize(
        "tier,active,want",
        [
            ("free", None, 0.6),
            ("free", {"free"}, 1.0),  # only untiered/free traffic: the whole budget
            ("free", set(), 1.0),  # its own tier counts as active regardless
            ("free", {"free", "premium"}, 0.9),  # standard idle lends its 0.3
            ("free", {"free", "standard"}, 0.7),  # premium idle lends its 0.1
            ("free", {"free", "standard", "premium"}, 0.6),
            ("standard", {"standard"}, 1.0),
            ("standard", {"standard", "premium"}, 0.9),
            ("standard", {"premium"}, 0.9),
            ("standard", {"free", "standard"}, 1.0),  # a lower tier's activity takes nothing from it
            ("premium", {"premium"}, 1.0),
        ],
    )
    def test_idle_higher_tiers_lend_their_reservation(self, tier, active, want):
        assert usable_fraction(tier, TIERS, active) == pytest.approx(want)

    def test_empty_queue_admits_with_predictions(self):
        a = decide("free", RULES, _model(), queued_prefill_tokens=0, uncached_tokens=500, decode_batch=3)
        assert isinstance(a, Admission) and a.predicted_ttft_s == pytest.approx(2.0 + 0.1, rel=0.01)
        assert a.predicted_tpot_s == pytest.approx(0.1, rel=0.01) and a.queue_wait_s == 0

    # 250 tok/s; the request's own service is 25 tokens + 1 step = 0.2 s, so the waiting room the 4 s
    # SLO leaves is 3.8 s: free may fill 0.6 x 3.8 = 2.28 s of it, standard 3.42 s, premium all
    @pytest.mark.parametrize(
        "queued,tier,expected",
        [
            (500, "free", "admit"),  # queue with it 2.0 + 0.1 s <= 2.28 s
            (540, "free", "admit"),  # 2.16 + 0.1 s <= 2.28 s
            (550, "free", "tier_quota"),  # 2.2 + 0.1 s > 2.28 s: its own prefill would spill into
            # the higher tiers' share; free is shed first
            (650, "standard", "admit"),  # 2.6 + 0.1 s <= 3.42 s
            (820, "standard", "admit"),  # 3.28 + 0.1 s <= 3.42 s, TTFT 3.48 s
            (840, "standard", "tier_quota"),  # 3.36 + 0.1 s > 3.42 s, though TTFT 3.56 s would meet the SLO
            (920, "premium", "admit"),  # premium may use the whole budget
            (940, "premium", "admit"),  # TTFT 3.96 s
            (960, "premium", "overload_ttft"),  # TTFT 4.04 s > 4 s for every tier
        ],
    )
    def test_ttft_boundary_table(self, queued, tier, expected):
        d = decide(tier, RULES, _model(), queued_prefill_tokens=queued, uncached_tokens=25, decode_batch=0)
        got = "admit" if isinstance(d, Admission) else d.reason
        assert got == expected
        if isinstance(d, Rejection):
            assert d.status_code == (429 if expected == "tier_quota" else 503) and d.retry_after_s >= 1

    def test_a_long_own_service_leaves_the_reserve_to_higher_tiers(self):
        # own service 2.1 s (500 tokens + a step) under a 4 s SLO: the waiting room is 1.9 s. Free
        # fills 0.6 of it only on an empty queue; behind one free request (1 s queued) premium still
        # fits (1 + 2.1 s). Dividing the whole SLO ("slo") admits free up to 2.4 s of queue with
        # it, after which premium (queue 2.4 s + 2.1 s) is an overload
        m, kw = _model(), dict(uncached_tokens=500, decode_batch=0)
        assert isinstance(decide("free", RULES, m, queued_prefill_tokens=100, **kw), Rejection)
        whole_slo = AdmissionRules(TIERS, tier_budget="slo")
        assert isinstance(decide("free", whole_slo, m, queued_prefill_tokens=100, **kw), Admission)
        assert isinstance(decide("premium", RULES, m, queued_prefill_tokens=250, **kw), Admission)
        late = decide("premium", RULES, m, queued_prefill_tokens=600, **kw)
        assert isinstance(late, Rejection) and late.reason == "overload_ttft"

    # the same queues with only some tiers active: free alone fills the budget like the top tier
    # (its limit is then the SLO: 503 overload, never 429); premium active, standard idle: free may
    # fill 0.9 x 3.8 = 3.42 s; standard active, premium idle: 0.7 x 3.8 = 2.66 s
    @pytest.mark.parametrize(
        "queued,active,expected",
        [
            (550, {"free"}, "admit"),  # 2.3 s: a tier_quota under strict reservations
            (650, {"free"}, "admit"),
            (940, {"free"}, "admit"),  # TTFT 3.96 s
            (960, {"free"}, "overload_ttft"),  # TTFT 4.04 s: no tier would be admitted
            (820, {"free", "premium"}, "admit"),  # 3.28 + 0.1 s <= 3.42 s
            (840, {"free", "premium"}, "tier_quota"),  # 3.36 + 0.1 s > 3.42 s
            (625, {"free", "standard"}, "admit"),  # 2.5 + 0.1 s <= 2.66 s
            (650, {"free", "standard"}, "tier_quota"),  # 2.6 + 0.1 s > 2.66 s
            (550, {"free", "standard", "premium"}, "tier_quota"),
        ],
    )
    def test_ttft_table_with_lending(self, queued, active, expected):
        d = decide(
            "free", RULES, _model(), queued_prefill_tokens=queued, uncached_tokens=25, decode_batch=0, active=active
        )
        got = "admit" if isinstance(d, Admission) else d.reason
        assert got == expected
        if isinstance(d, Rejection):
            assert d.status_code == (429 if expected == "tier_quota" else 503) and d.retry_after_s >= 1

    def test_standard_borrows_only_from_idle_premium(self):
        # standard's own limit is 3.42 s of queue; premium idle lends it the rest (up to the SLO)
        kw = dict(queued_prefill_tokens=880, uncached_tokens=25, decode_batch=0)  # 3.52 + 0.1 s
        assert decide("standard", RULES, _model(), active={"standard", "premium"}, **kw).reason == "tier_quota"
        assert decide("standard", RULES, _model(), active={"free", "standard", "premium"}, **kw).reason == "tier_quota"
        assert isinstance(decide("standard", RULES, _model(), active={"free", "standard"}, **kw), Admission)
        # and free, with standard active, gets none of standard's reservation
        assert decide("free", RULES, _model(), active={"free", "standard"}, **kw).reason == "tier_quota"

    # decode step 0.1 s at batch 1 + 10 ms per further sequence: the request alone steps in 0.1 s,
    # leaving 0.15 s of headroom under the 0.25 s TPOT SLO; free may use 0.6 of it (<= 0.19 s),
    # standard 0.9 (<= 0.235 s), premium all of it
    @pytest.mark.parametrize(
        "batch,tier,expected",
        [
            (8, "free", "admit"),  # a batch of 9 with it: 0.18 s
            (10, "free", "tier_quota"),  # 0.20 s: within the SLO, but the higher tiers' share
            (13, "standard", "admit"),  # 0.23 s
            (14, "standard", "tier_quota"),  # 0.24 s
            (14, "premium", "admit"),  # 0.24 s
            (16, "premium", "overload_tpot"),  # 0.26 s > the SLO for every tier
        ],
    )
    def test_tpot_headroom_table(self, batch, tier, expected):
        m = CostModel(CostPrior(decode_step_s=0.1, decode_step_per_seq_s=0.01, decode_step_per_kilotoken_s=0.0))
        d = decide(tier, RULES, m, queued_prefill_tokens=0, uncached_tokens=10, decode_batch=batch)
        got = "admit" if isinstance(d, Admission) else d.reason
        assert got == expected
        if isinstance(d, Rejection):
            assert d.status_code == (429 if expected == "tier_quota" else 503) and d.retry_after_s >= 1
        if tier == "free":  # tpot_budget "slo" lets free fill the batch up to the SLO
            assert isinstance(
                decide(
                    tier,
                    AdmissionRules(TIERS, tpot_budget="slo"),
                    m,
                    queued_prefill_tokens=0,
                    uncached_tokens=10,
                    decode_batch=batch,
                ),
                Admission,
            )

    # the decode headroom is shared the same way: free alone gets all of it (0.25 s), with premium
    # active and standard idle 0.9 of it (0.235 s), with standard active and premium idle 0.7 (0.205 s)
    @pytest.mark.parametrize(
        "batch,active,expected",
        [
            (10, {"free"}, "admit"),  # 0.20 s: a tier_quota under strict reservations
            (14, {"free"}, "admit"),  # 0.24 s
            (16, {"free"}, "overload_tpot"),  # 0.26 s
            (13, {"free", "premium"}, "admit"),  # 0.23 s
            (14, {"free", "premium"}, "tier_quota"),  # 0.24 s
            (10, {"free", "standard"}, "admit"),  # 0.20 s
            (11, {"free", "standard"}, "tier_quota"),  # 0.21 s
        ],
    )
    def test_tpot_table_with_lending(self, batch, active, expected):
        m = CostModel(CostPrior(decode_step_s=0.1, decode_step_per_seq_s=0.01, decode_step_per_kilotoken_s=0.0))
        d = decide("free", RULES, m, queued_prefill_tokens=0, uncached_tokens=10, decode_batch=batch, active=active)
        got = "admit" if isinstance(d, Admission) else d.reason
        assert got == expected

    def test_decode_saturation_rejects_503(self):
        d = decide("premium", RULES, _model(step=0.3), queued_prefill_tokens=0, uncached_tokens=10, decode_batch=4)
        assert isinstance(d, Rejection) and d.reason == "overload_tpot" and d.status_code == 503

    def test_idle_replicas_always_admit(self):
        slow = _model(rate=10.0, step=0.5)  # a badly wrong (cold) model
        d = decide("free", RULES, slow, queued_prefill_tokens=0, uncached_tokens=500, decode_batch=0)
        assert isinstance(d, Admission) and d.predicted_ttft_s > 40
        d = decide("free", RULES, slow, queued_prefill_tokens=1, uncached_tokens=500, decode_batch=0)
        assert isinstance(d, Rejection)

    def test_retry_after_grows_with_overload(self):
        a = decide("premium", RULES, _model(), queued_prefill_tokens=1200, uncached_tokens=10, decode_batch=0)
        b = decide("premium", RULES, _model(), queued_prefill_tokens=3000, uncached_tokens=10, decode_batch=0)
        assert a.retry_after_s < b.retry_after_s


def test_decode_liveness_uses_the_callers_exact_count():
    slow = _model(step=0.5)
    stale = decide("free", RULES, slow, queued_prefill_tokens=0, uncached_tokens=10, decode_batch=3, decode_idle=True)
    assert isinstance(stale, Admission)
    busy = decide("free", RULES, slow, queued_prefill_tokens=0, uncached_tokens=10, decode_batch=3, decode_idle=False)
    assert isinstance(busy, Rejection) and busy.reason == "overload_tpot"


class TestCalibrationBias:
    def test_bias_tracks_observed_over_predicted_and_is_clamped(self):
        m = _model()
        for _ in range(60):
            m.observe_ttft_ratio(1.5 / m.ttft_bias)  # truth: 1.5x what the lines predict
            m.observe_tpot_ratio(0.8 / m.tpot_bias)
        assert m.ttft_bias == pytest.approx(1.5, rel=0.02) and m.tpot_bias == pytest.approx(0.8, rel=0.02)
        for _ in range(200):
            m.observe_ttft_ratio(100.0)
        m.observe_ttft_ratio(float("nan"))
        assert m.ttft_bias == 4.0

    def test_one_outlier_moves_the_bias_a_little(self):
        m = _model()
        m.observe_ttft_ratio(300.0)  # e.g. a near-zero prediction: clipped to 4x, then ^alpha
        assert m.ttft_bias == pytest.approx(4.0**0.1)

    def test_bias_and_first_step_enter_the_prediction(self):
        m = _model(rate=250.0, step=0.1)
        base = decide("free", RULES, m, queued_prefill_tokens=0, uncached_tokens=500, decode_batch=0)
        assert base.predicted_ttft_s == pytest.approx(500 / 250 + 0.1)  # prefill + the first decode step
        m.ttft_bias = 1.5
        biased = decide("free", RULES, m, queued_prefill_tokens=0, uncached_tokens=500, decode_batch=0)
        assert biased.predicted_ttft_s == pytest.approx(1.5 * base.predicted_ttft_s)
        # 1 s queue + 2.1 s = 3.1 s fits the 4 s SLO; x1.5 = 4.65 s does not: the same queue is refused
        d = decide("premium", RULES, m, queued_prefill_tokens=250, uncached_tokens=500, decode_batch=0)
        assert isinstance(d, Rejection) and d.reason == "overload_ttft"
        m.ttft_bias = 1.0
        assert isinstance(
            decide("premium", RULES, m, queued_prefill_tokens=250, uncached_tokens=500, decode_batch=0), Admission
        )
        # free may fill 0.6 x (4 - 2.1 s): 1 s queued + its own 2 s prefill would take the higher tiers' share
        d = decide("free", RULES, m, queued_prefill_tokens=250, uncached_tokens=500, decode_batch=0)
        assert isinstance(d, Rejection) and d.reason == "tier_quota" and d.status_code == 429


class TestDecodeThrottle:
    @pytest.mark.parametrize(
        "tier,step,action,max_new,want",
        [
            ("free", 0.21, "cap", 512, 128),  # 0.21 >= 0.8 x 0.25: saturated -> capped
            ("free", 0.21, "cap", 64, None),  # already short
            ("free", 0.15, "cap", 512, None),  # not saturated
            ("standard", 0.21, "cap", 512, None),  # priority 50 is not below 50
            ("free", 0.21, "reject", 512, "decode_throttled"),
        ],
    )
    def test_table(self, tier, step, action, max_new, want):
        from router.admission import DecodeThrottle

        t = DecodeThrottle(saturation=0.8, action=action, cap_max_tokens=128, below_priority=50)
        d = decide(
            tier,
            AdmissionRules(TIERS, throttle=t),
            _model(step=step),
            queued_prefill_tokens=0,
            uncached_tokens=10,
            decode_batch=3,
            decode_idle=False,
            max_new_tokens=max_new,
        )
        got = d.reason if isinstance(d, Rejection) else d.max_new_tokens
        assert got == want
        if isinstance(d, Rejection):
            assert d.status_code == 429 and d.retry_after_s >= 1

    def test_idle_decode_is_never_throttled(self):
        from router.admission import DecodeThrottle

        d = decide(
            "free",
            AdmissionRules(TIERS, throttle=DecodeThrottle()),
            _model(step=0.24),
            queued_prefill_tokens=0,
            uncached_tokens=10,
            decode_batch=0,
            max_new_tokens=512,
        )
        assert isinstance(d, Admission) and d.max_new_tokens is None
