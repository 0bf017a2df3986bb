import random

import pytest

from router.policy import LeastLoadedPolicy, least_loaded
from router.types import EndpointState, PoolSnapshot, Rejection, RequestDescriptor, Role


def ep(eid, role=Role.DECODE, healthy=True, running=0, waiting=0, in_flight=0, kv=0.0):
    return EndpointState(
        endpoint_id=eid,
        pool=role.value,
        role=role,
        healthy=healthy,
        num_running=running,
        num_waiting=waiting,
        in_flight=in_flight,
        kv_usage=kv,
    )


REQ = RequestDescriptor(request_id="r", model="m", num_prompt_tokens=10, max_new_tokens=5, tier="free", arrival_s=0.0)


class TestLeastLoaded:
    @pytest.mark.parametrize(
        "cands, expected",
        [
            ([ep("a", running=3), ep("b", running=1)], "b"),
            ([ep("a", waiting=2), ep("b", running=1)], "b"),
            ([ep("a", in_flight=4), ep("b", running=2)], "b"),  # router-side reservations count
            ([ep("a", kv=0.9), ep("b", kv=0.1)], "b"),  # tie on load -> lower KV usage
            ([ep("a", healthy=False), ep("b", running=9)], "b"),
        ],
    )
    def test_table(self, cands, expected):
        assert least_loaded(cands, random.Random(0)).endpoint_id == expected

    def test_no_healthy(self):
        assert least_loaded([ep("a", healthy=False)], random.Random(0)) is None

    def test_ties_spread_over_replicas(self):
        rng = random.Random(1)
        picks = {least_loaded([ep("a"), ep("b")], rng).endpoint_id for _ in range(50)}
        assert picks == {"a", "b"}


class TestLeastLoadedPolicy:
    def test_picks_one_of_each_role(self):
        snap = PoolSnapshot([ep("p", Role.PREFILL), ep("d", Role.DECODE)])
        d = LeastLoadedPolicy(random.Random(0)).route(REQ, snap)
        assert (d.prefill.endpoint_id, d.decode.endpoint_id) == ("p", "d")

    def test_no_prefill_means_local_prefill(self):
        d = LeastLoadedPolicy().route(REQ, PoolSnapshot([ep("p", Role.PREFILL, healthy=False), ep("d")]))
        assert d.prefill is None and d.decode.endpoint_id == "d"

    def test_no_decode_is_a_503_rejection_with_retry_after(self):
        r = LeastLoadedPolicy().route(REQ, PoolSnapshot([ep("p", Role.PREFILL)]))
        assert isinstance(r, Rejection) and r.status_code == 503 and r.retry_after_s > 0


class TestRoundRobinPolicy:
    def test_takes_turns_blind_to_load_and_skips_unhealthy(self):
        from router.policy import RoundRobinPolicy

        snap = PoolSnapshot([ep("a", running=9), ep("b"), ep("c", healthy=False), ep("p", Role.PREFILL)])
        rr = RoundRobinPolicy()
        picks = [rr.route(REQ, snap) for _ in range(4)]
        assert [d.decode.endpoint_id for d in picks] == ["a", "b", "a", "b"]
        assert all(d.prefill.endpoint_id == "p" and d.uncached_tokens == 10 for d in picks)
        assert RoundRobinPolicy().route(REQ, PoolSnapshot([ep("d")])).prefill is None
        assert isinstance(RoundRobinPolicy().route(REQ, PoolSnapshot([])), Rejection)


class TestPrefillTokensAhead:
    """What a new request waits behind on a prefilling replica (vLLM priorities: lower first)."""

    QUEUE = ((-100, 200), (-50, 300), (-10, 1000))  # premium, standard, free tokens queued

    @pytest.mark.parametrize(
        "step, priority, want",
        [
            (0, -100, 1500),  # arrival-order engine: everything queued
            (512, -100, 200 + 512),  # premium: its own tier, then at most one step of lower-priority work
            (512, -50, 500 + 512),
            (512, -10, 1500),  # free: nothing is behind it
            (4096, -100, 1500),  # a step budget larger than the queue: all of it may already be running
        ],
    )
    def test_table(self, step, priority, want):
        e = EndpointState(
            "p",
            "prefill",
            Role.PREFILL,
            True,
            queued_prefill_tokens=1500,
            queued_prefill_by_priority=self.QUEUE,
            priority_step_tokens=step,
        )
        assert e.prefill_tokens_ahead(priority) == want

    def test_no_split_known_counts_everything(self):
        e = EndpointState("p", "prefill", Role.PREFILL, True, queued_prefill_tokens=700, priority_step_tokens=512)
        assert e.prefill_tokens_ahead(-100) == 700
