"""router/pipeline.py: prefix-aware scoring, conditional disaggregation, admission wiring, hooks (pure)."""

import dataclasses
import random

import pytest

from router.admission_stage import tier_policies
from router.config import RouterConfig
from router.hashing import block_hashes
from router.pipeline import SloAwarePolicy, build_policy
from router.policy import LeastLoadedPolicy
from router.prefix_index import PrefixIndex
from router.tier_activity import TierActivity
from router.types import EndpointState, PoolSnapshot, Rejection, RequestDescriptor, Role

BS = 128


def ep(eid, role, load=0, kv=0.0, queued=0, healthy=True):
    return EndpointState(eid, role.value, role, healthy, num_running=load, kv_usage=kv, queued_prefill_tokens=queued)


def req(tokens, tier="free", salt=None, prompt=None):
    ids = prompt if prompt is not None else list(range(tokens))
    return RequestDescriptor("r", "m", len(ids), 16, tier, 0.0, tuple(block_hashes(ids, BS, salt)))


def routed(pol, r, snap, admit=True):
    """Route and record the outcome (the ``on_routed`` hook), as the orchestrator does."""
    d = pol.route(r, snap, admit=admit)
    pol.on_routed(r, d, moved=not admit)
    return d


def policy(**router):
    """The pipeline with ``router``; the idle-decode rule is off unless given (most tests route to idle
    replicas to test other rules; TestLocalPrefillWhenIdle tests that one)."""
    placement = {"local_prefill_when_idle": False, **router.pop("placement", {})}
    cfg = RouterConfig(placement=placement, **router)
    return SloAwarePolicy(cfg, PrefixIndex(), {}, BS, random.Random(0))


class TestPlacement:
    def test_equal_load_longest_prefix_wins(self):
        pol = policy(admission={"enabled": False})
        r = req(1024)
        pol.prefix_index.add("D2", r.block_hashes[:6])
        pol.prefix_index.add("D1", r.block_hashes[:2])
        snap = PoolSnapshot([ep("D1", Role.DECODE), ep("D2", Role.DECODE), ep("P1", Role.PREFILL)])
        d = routed(pol, r, snap)
        assert d.decode.endpoint_id == "D2" and d.prefill.endpoint_id == "P1" and d.reason == "remote_prefill"

    def test_overloaded_holder_loses(self):
        pol = policy(admission={"enabled": False})
        r = req(1024)
        pol.prefix_index.add("D2", r.block_hashes[:2])  # a small hit (2/8 of the prompt) ...
        snap = PoolSnapshot([ep("D1", Role.DECODE), ep("D2", Role.DECODE, load=16, kv=0.9)])
        assert routed(pol, r, snap).decode.endpoint_id == "D1"  # ... does not beat a full queue

    def test_prefill_replica_with_longest_prefix_and_room(self):
        pol = policy(admission={"enabled": False}, placement={"prefill_queue_limit_tokens": 1000})
        r = req(1024)
        pol.prefix_index.add("P2", r.block_hashes[:4])
        pol.prefix_index.add("P3", r.block_hashes[:7])
        snap = PoolSnapshot(
            [ep("D1", Role.DECODE), ep("P1", Role.PREFILL), ep("P2", Role.PREFILL), ep("P3", Role.PREFILL, queued=5000)]
        )
        d = routed(pol, r, snap)
        assert d.prefill.endpoint_id == "P2" and d.prefix_hit_tokens == 512 and d.uncached_tokens == 512

    @pytest.mark.parametrize(
        "tokens,decode_hit_blocks,prefill_up,expected",
        [
            (40, 0, True, "local_prefill:short"),
            (1024, 0, True, "remote_prefill"),
            (1100, 8, True, "local_prefill:cached"),  # 1024 of 1100 tokens cached on the decode replica
            (1024, 0, False, "local_prefill:no_prefill_replica"),
        ],
    )
    def test_conditional_disaggregation(self, tokens, decode_hit_blocks, prefill_up, expected):
        pol = policy(admission={"enabled": False})
        r = req(tokens)
        pol.prefix_index.add("D1", r.block_hashes[:decode_hit_blocks])
        eps = [ep("D1", Role.DECODE)] + ([ep("P1", Role.PREFILL)] if prefill_up else [])
        d = routed(pol, r, PoolSnapshot(eps))
        assert d.reason == expected and (d.prefill is None) == expected.startswith("local")

    def test_hit_never_counts_the_last_prompt_token(self):
        pol = policy(admission={"enabled": False})
        r = req(256)
        pol.prefix_index.add("D1", r.block_hashes)
        d = routed(pol, r, PoolSnapshot([ep("D1", Role.DECODE)]))
        assert d.prefix_hit_tokens == 128 and d.uncached_tokens == 128

    def test_tenant_salt_prevents_cross_tenant_hits(self):
        pol = policy(admission={"enabled": False})
        prompt = list(range(1024))
        pol.prefix_index.add("D1", req(0, salt="tenant-a", prompt=prompt).block_hashes)
        snap = PoolSnapshot([ep("D1", Role.DECODE)])  # local prefill: the hit is the decode replica's
        assert routed(pol, req(0, salt="tenant-b", prompt=prompt), snap).prefix_hit_tokens == 0
        assert routed(pol, req(0, salt="tenant-a", prompt=prompt), snap).prefix_hit_tokens == 896

    def test_no_decode_is_503(self):
        d = routed(policy(), req(100), PoolSnapshot([ep("P1", Role.PREFILL), ep("D1", Role.DECODE, healthy=False)]))
        assert isinstance(d, Rejection) and d.status_code == 503


class TestAdmissionWiring:
    def test_free_shed_premium_admitted(self):
        pol = policy()  # prior: 300 tok/s, SLO 2 s TTFT by default
        snap = PoolSnapshot([ep("D1", Role.DECODE), ep("P1", Role.PREFILL, queued=420)])  # ~1.45 s queued
        premium = routed(pol, req(100, tier="premium"), snap)  # TTFT: queue + prefill + decode's first step
        free = routed(pol, req(100, tier="free"), snap)  # premium active: free may fill 0.6 x 2 s of queue
        assert isinstance(free, Rejection) and free.status_code == 429 and free.retry_after_s >= 1
        assert not isinstance(premium, Rejection) and premium.predicted_ttft_s == pytest.approx(1.83 + 0.10, rel=0.05)

    def test_priority_engine_premium_waits_only_for_its_share_of_the_queue(self):
        # 1,500 free tokens queued (5 s at the prior's 300 tok/s): an arrival-order engine would make
        # premium wait behind all of it (503); a priority engine serves premium after the step in
        # progress (budget 256 tokens, ~0.85 s), so premium is admitted and free still shed
        by_prio = ((-100, 0), (-10, 1500))
        fcfs = PoolSnapshot(
            [
                ep("D1", Role.DECODE),
                dataclasses.replace(ep("P1", Role.PREFILL, queued=1500), queued_prefill_by_priority=by_prio),
            ]
        )
        prio = PoolSnapshot(
            [
                ep("D1", Role.DECODE),
                dataclasses.replace(
                    ep("P1", Role.PREFILL, queued=1500), queued_prefill_by_priority=by_prio, priority_step_tokens=256
                ),
            ]
        )
        pol = policy()
        assert isinstance(routed(pol, req(100, tier="premium"), fcfs), Rejection)
        d = routed(pol, req(100, tier="premium"), prio)
        assert not isinstance(d, Rejection) and d.predicted_ttft_s == pytest.approx(
            (256 + 100) / 300 + 0.05 * 2 + 0.10, rel=0.1
        )
        assert isinstance(routed(pol, req(100, tier="free"), prio), Rejection)

    def test_overload_is_503_for_everyone(self):
        pol = policy()
        snap = PoolSnapshot([ep("D1", Role.DECODE), ep("P1", Role.PREFILL, queued=3000)])
        d = routed(pol, req(300, tier="premium"), snap)
        assert isinstance(d, Rejection) and d.status_code == 503 and d.reason == "overload_ttft"

    def test_a_request_already_admitted_is_placed_without_admission(self):
        """A decode moved after its replica failed (retry or migration) was admitted once: it is placed
        even where a new request would be refused."""
        pol = policy()
        snap = PoolSnapshot([ep("D1", Role.DECODE), ep("P1", Role.PREFILL, queued=3000)])
        d = routed(pol, req(300, tier="premium"), snap, admit=False)
        assert not isinstance(d, Rejection) and d.decode.endpoint_id == "D1" and d.predicted_ttft_s is None

    def test_tier_slo_overrides_and_builders(self):
        cfg = RouterConfig(
            qos_tiers={"gold": {"reserved_fraction": 1.0, "priority": 1, "slo": {"ttft_ms": 500}}}, default_tier="gold"
        )
        assert tier_policies(cfg)["gold"].ttft_s == 0.5
        assert isinstance(build_policy(RouterConfig(policy="least-loaded"), BS), LeastLoadedPolicy)
        assert isinstance(build_policy(RouterConfig(), BS), SloAwarePolicy)


class FakeClock:
    """A settable stand-in for time.monotonic."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class TestWorkConservingTiers:
    """Reservations of idle higher tiers are lent to the lower ones (router.admission.tier_idle_s)."""

    QUEUED = 420  # ~1.4 s at the prior's 300 tok/s: over free's 60 %, within the 2 s SLO

    def snap(self, queued=QUEUED, by_priority=()):
        p = dataclasses.replace(ep("P1", Role.PREFILL, queued=queued), queued_prefill_by_priority=by_priority)
        return PoolSnapshot([ep("D1", Role.DECODE), p])

    def lending(self, clock, **router):
        pol = policy(**router)
        return SloAwarePolicy(pol.cfg, PrefixIndex(), {}, BS, random.Random(0), activity=TierActivity(30.0, clock))

    def test_untiered_traffic_alone_uses_the_whole_budget(self):
        strict = policy(admission={"tier_idle_s": None})  # reservations never lent
        d = routed(strict, req(100, tier="free"), self.snap())
        assert isinstance(d, Rejection) and d.reason == "tier_quota"
        pol = self.lending(FakeClock())
        d = routed(pol, req(100, tier="free"), self.snap())
        assert not isinstance(d, Rejection) and d.predicted_ttft_s == pytest.approx(1.83 + 0.10, rel=0.05)
        # unknown tiers are the default tier (free): the same
        assert not isinstance(routed(pol, req(100, tier="warmup"), self.snap()), Rejection)
        # the default config lends too (its own monotonic clock)
        assert not isinstance(routed(policy(), req(100, tier="free"), self.snap()), Rejection)

    def test_alone_it_is_refused_only_when_no_tier_fits(self):
        d = routed(self.lending(FakeClock()), req(300, tier="free"), self.snap(queued=3000))
        assert isinstance(d, Rejection) and d.status_code == 503 and d.reason == "overload_ttft"

    def test_premium_takes_its_share_back_and_lends_it_again_after_the_window(self):
        clock = FakeClock(1000.0)
        pol = self.lending(clock)
        assert not isinstance(routed(pol, req(100, tier="free"), self.snap()), Rejection)
        clock.t = 1001.0
        assert not isinstance(routed(pol, req(100, tier="premium"), self.snap()), Rejection)
        clock.t = 1002.0
        d = routed(pol, req(100, tier="free"), self.snap())
        assert isinstance(d, Rejection) and d.reason == "tier_quota" and d.status_code == 429
        clock.t = 1031.0  # premium's arrival exactly 30 s ago
        assert isinstance(routed(pol, req(100, tier="free"), self.snap()), Rejection)
        clock.t = 1031.5  # no premium traffic for over 30 s
        assert not isinstance(routed(pol, req(100, tier="free"), self.snap()), Rejection)

    def test_a_refused_request_still_claims_its_tiers_share(self):
        clock = FakeClock()
        pol = self.lending(clock)
        premium = routed(pol, req(300, tier="premium"), self.snap(queued=3000))
        assert isinstance(premium, Rejection) and premium.reason == "overload_ttft"
        d = routed(pol, req(100, tier="free"), self.snap())
        assert isinstance(d, Rejection) and d.reason == "tier_quota"

    def test_queued_prefill_work_keeps_a_tier_active(self):
        clock = FakeClock()
        pol = self.lending(clock)
        routed(pol, req(100, tier="premium"), self.snap())
        clock.t = 100.0  # premium's arrival is long past ...
        busy = self.snap(by_priority=((-100, 20), (-10, 400)))  # ... but its prefill is still queued
        d = routed(pol, req(100, tier="free"), busy)
        assert isinstance(d, Rejection) and d.reason == "tier_quota"
        assert pol.admission.active_tiers(busy) == {"free", "premium"}
        assert not isinstance(routed(pol, req(100, tier="free"), self.snap(by_priority=((-10, 420),))), Rejection)

    def test_standard_lends_to_free_only_while_idle(self):
        # 250 tokens queued (0.88 s) + this prompt's prefill (0.38 s) = 1.27 s of queue with it; the
        # waiting room the 2 s SLO leaves after its ~0.5 s service is ~1.5 s: over free's own 0.6
        # (0.91 s) and 0.7 with premium's share (1.06 s), within 0.9 with standard's (1.36 s)
        clock = FakeClock()
        pol = self.lending(clock)
        snap = self.snap(queued=250)
        routed(pol, req(100, tier="premium"), self.snap())
        assert not isinstance(routed(pol, req(100, tier="free"), snap), Rejection)  # standard idle: lent
        clock.t = 25.0
        routed(pol, req(100, tier="standard"), self.snap())
        assert routed(pol, req(100, tier="free"), snap).reason == "tier_quota"  # every tier active
        clock.t = 40.0  # premium idle
        assert routed(pol, req(100, tier="free"), snap).reason == "tier_quota"  # 0.7 is not enough
        clock.t = 56.0  # both idle
        assert not isinstance(routed(pol, req(100, tier="free"), snap), Rejection)


class TestLocalPrefillWhenSooner:
    """A backed-up prefill replica: the decode replica prefills the prompt itself when it would finish it
    sooner and the stall keeps its next step within the TPOT SLO (priors: 5,000 prompt tokens/s, 50 ms
    decode steps; a 512-token prompt is ~0.1 s of prefill)."""

    def route(self, prefill_queued=0, decode_queued=0, tokens_per_s=5000.0, tpot_ms=250.0, **placement):
        placement = {"local_prefill_when_sooner": True, **placement}
        pol = policy(
            admission={"enabled": False, "prefill_tokens_per_s_prior": tokens_per_s, "decode_step_s_prior": 0.05},
            slo={"ttft_ms": 4000, "tpot_ms": tpot_ms},
            placement=placement,
        )
        snap = PoolSnapshot(
            [ep("D1", Role.DECODE, queued=decode_queued), ep("P1", Role.PREFILL, queued=prefill_queued)]
        )
        return routed(pol, req(512), snap)

    def test_backed_up_prefill_replica_sheds_to_the_decode_engine(self):
        d = self.route(prefill_queued=4096)
        assert (d.prefill, d.reason, d.uncached_tokens) == (None, "local_prefill:sooner", 512)

    def test_idle_prefill_replica_keeps_the_prompt(self):
        d = self.route(prefill_queued=0)
        assert d.prefill.endpoint_id == "P1" and d.reason == "remote_prefill"

    def test_not_when_the_decode_engine_has_as_much_queued(self):
        d = self.route(prefill_queued=1024, decode_queued=1024)
        assert d.prefill.endpoint_id == "P1"

    def test_not_when_the_stall_would_break_the_tpot_slo(self):
        # 300 tokens/s: a 512-token prefill stalls the batch ~1.7 s, far past a 250 ms TPOT
        assert self.route(prefill_queued=8000, tokens_per_s=300.0).prefill.endpoint_id == "P1"
        # fast prefill, but a TPOT SLO tighter than one step plus the stall
        assert self.route(prefill_queued=4096, tpot_ms=120.0).prefill.endpoint_id == "P1"

    def test_off_by_config(self):
        assert self.route(prefill_queued=4096, local_prefill_when_sooner=False).prefill.endpoint_id == "P1"
        assert RouterConfig().placement.local_prefill_when_sooner is False  # off unless a config opts in


class TestLocalPrefillWhenIdle:
    def _route(self, decode_kw, prefill_kw=None, tokens=1024, decode_hit_blocks=0, prefill_hit_blocks=0):
        pol = policy(admission={"enabled": False}, placement={"local_prefill_when_idle": True})
        r = req(tokens)
        pol.prefix_index.add("D1", r.block_hashes[:decode_hit_blocks])
        pol.prefix_index.add("P1", r.block_hashes[:prefill_hit_blocks])
        snap = PoolSnapshot([ep("D1", Role.DECODE, **decode_kw), ep("P1", Role.PREFILL, **(prefill_kw or {}))])
        return routed(pol, r, snap)

    def test_an_idle_decode_replica_prefills_itself(self):
        d = self._route({})
        assert (d.prefill, d.reason, d.uncached_tokens) == (None, "local_prefill:idle", 1024)

    def test_not_when_it_has_work(self):
        for kw in ({"load": 1}, {"queued": 200}):
            d = self._route(kw)
            assert d.prefill is not None and d.reason == "remote_prefill", kw

    def test_not_when_the_prefill_replica_has_more_of_the_prompt_cached(self):
        d = self._route({}, prefill_hit_blocks=4)
        assert d.prefill is not None and d.prefix_hit_tokens == 4 * BS
        # ... unless its queue makes up the difference
        d = self._route({}, {"queued": 4 * BS}, prefill_hit_blocks=4)
        assert (d.prefill, d.reason) == (None, "local_prefill:idle")

    def test_on_by_default(self):
        assert RouterConfig().placement.local_prefill_when_idle is True
