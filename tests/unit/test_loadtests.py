import pytest

from loadtests import workloads
from loadtests.client import RequestRecord
from loadtests.stats import percentile, summarize


class TestWorkloads:
    @pytest.mark.parametrize("name", sorted(workloads.WORKLOADS))
    def test_seeded_and_bounded(self, name):
        a = workloads.build(name, seed=3, n=40, rate=2.0, minute_s=20.0)
        b = workloads.build(name, seed=3, n=40, rate=2.0, minute_s=20.0)
        assert a == b and 0 < len(a) <= 40
        assert all(s.max_tokens > 0 and s.messages for s in a)
        assert [s.arrival_s for s in a] == sorted(s.arrival_s for s in a)

    def test_poisson_rate(self):
        import random
        t = workloads.poisson_arrivals(random.Random(0), rate=4.0, n=4000)
        assert 3.7 < len(t) / t[-1] < 4.3

    def test_bursty_triples(self):
        import random
        sched = workloads.bursty_schedule(1.0, minute_s=60)
        t = workloads.schedule_arrivals(random.Random(1), sched, n=10_000)
        base = sum(1 for x in t if x < 30) / 30
        peak = sum(1 for x in t if 45 <= x < 105) / 60
        assert 2.2 < peak / base < 4.0

    def test_shared_prefix_grows_history(self):
        specs = workloads.build("shared-prefix", seed=0, n=60, rate=5.0, num_users=3)
        assert {s.tag for s in specs} <= {"system-0", "system-1", "system-2"}
        assert max(len(s.messages) for s in specs) > 3 and all(s.messages[0]["role"] == "system" for s in specs)

    def test_qos_tiers(self):
        specs = workloads.build("qos", seed=0, n=300, rate=5.0)
        share = sum(s.headers["x-customer-tier"] == "free" for s in specs) / len(specs)
        assert 0.5 < share < 0.7

    def test_unknown(self):
        with pytest.raises(ValueError):
            workloads.build("nope", seed=0, n=1, rate=1)


class TestStats:
    def test_percentile(self):
        assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 50) is None

    def test_goodput_counts_only_slo_meeting_requests(self):
        recs = [RequestRecord(0, 200, ttft_s=0.1, e2e_s=1.0, completion_tokens=10),    # tpot 0.1: good
                RequestRecord(0, 200, ttft_s=3.0, e2e_s=4.0, completion_tokens=10),    # ttft miss
                RequestRecord(0, 200, ttft_s=0.1, e2e_s=9.1, completion_tokens=10),    # tpot 1.0 miss
                RequestRecord(0, 503, outcome="rejected", reason="overloaded")]
        s = summarize(recs, duration_s=2.0, ttft_slo_s=2.0, tpot_slo_s=0.2)
        assert s["ok"] == 3 and s["goodput_rps"] == 0.5 and s["rejected"] == {"overloaded": 1}
        assert s["slo_attainment"] == 0.25
