"""The router pipeline's stages one by one (filters, scorers, decider, admission stage), its config by
name, and the policy hooks: route() changes no state, on_routed records once (pure)."""

import random
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from router.admission_stage import SloAdmission
from router.config import PlacementConfig, RouterConfig
from router.cost_model import CostModel
from router.deciders import ConditionalPrefill
from router.filters import Healthy, apply_filters, build_filters
from router.pipeline import SloAwarePolicy, build_policy
from router.policy import NO_DECODE_REPLICA, LeastLoadedPolicy, RoundRobinPolicy
from router.prefix_index import PrefixIndex
from router.scorers import KvScorer, LoadScorer, PrefixScorer, ScoreContext, build_scorers, pick_best
from router.tier_activity import TierActivity
from router.types import EndpointState, PoolSnapshot, Rejection, RequestDescriptor, Role

BS = 16


def ep(eid, role=Role.DECODE, load=0, kv=0.0, queued=0, healthy=True):
    return EndpointState(eid, role.value, role, healthy, num_running=load, kv_usage=kv, queued_prefill_tokens=queued)


def req(tokens=160, tier="free", hashes=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)):
    return RequestDescriptor("r", "m", tokens, 16, tier, 0.0, tuple(hashes))


class TestFilters:
    def test_healthy_by_name(self):
        (f,) = build_filters(["healthy"])
        assert isinstance(f, Healthy)
        assert [e.endpoint_id for e in apply_filters([f], [ep("a"), ep("b", healthy=False)])] == ["a"]
        assert [e.endpoint_id for e in apply_filters([], [ep("a"), ep("b", healthy=False)])] == ["a", "b"]


class TestScorers:
    CTX = ScoreContext(hits={"a": 5, "b": 0}, prompt_tokens=160, block_size=BS)

    def test_each_scorer_is_coefficient_times_feature(self):
        a = ep("a", load=4, kv=0.5)
        assert PrefixScorer(2.0).coefficient(self.CTX) * PrefixScorer(2.0).feature(a, self.CTX) == 2.0 * 80 / 160
        assert LoadScorer(0.5, 16).coefficient(self.CTX) * LoadScorer(0.5, 16).feature(a, self.CTX) == -0.5 * 4 / 16
        assert KvScorer(0.2).coefficient(self.CTX) * KvScorer(0.2).feature(a, self.CTX) == -0.2 * 0.5

    def test_built_by_name_in_config_order(self):
        s = build_scorers({"kv": 0.2, "prefix": 1.0}, PlacementConfig(max_batch_hint=8))
        assert [type(x) for x in s] == [KvScorer, PrefixScorer]
        (load,) = build_scorers({"load": 1.0}, PlacementConfig(max_batch_hint=8))
        assert load == LoadScorer(1.0, 8)

    def test_pick_best_and_ties_at_random(self):
        scorers = build_scorers({"prefix": 1.0, "load": 0.5, "kv": 0.2}, PlacementConfig())
        a, b = ep("a", load=2), ep("b")
        assert pick_best([a, b], scorers, self.CTX, random.Random(0)) is a  # half the prompt cached
        assert pick_best([a, b], scorers[1:], self.CTX, random.Random(0)) is b  # load only
        ctx = ScoreContext(hits={"c": 1, "d": 1}, prompt_tokens=160, block_size=BS)
        c, d = ep("c"), ep("d")
        picks = {pick_best([c, d], scorers, ctx, random.Random(i)).endpoint_id for i in range(20)}
        assert picks == {"c", "d"}


class TestDecider:
    def decider(self, **placement):
        cfg = RouterConfig(placement=placement)
        models: dict[str, CostModel] = {}
        return ConditionalPrefill(
            cfg.placement,
            SloAdmission(cfg, models.setdefault).tiers,
            lambda pool: models.setdefault(pool, CostModel()),
            random.Random(0),
        )

    def test_no_prefill_replica_with_room_is_local(self):
        d = self.decider(prefill_queue_limit_tokens=100)
        out = d.place(1000, "free", ep("D"), [ep("P", Role.PREFILL, queued=500)], {"D": 0, "P": 0}, BS)
        assert (out.prefill, out.reason, out.uncached_tokens) == (None, "local_prefill:no_prefill_room", 1000)
        out = d.place(1000, "free", ep("D", load=1), [ep("P", Role.PREFILL, queued=50)], {"D": 0, "P": 0}, BS)
        assert (out.prefill.endpoint_id, out.reason) == ("P", "remote_prefill")

    def test_an_idle_decode_replica_prefills_unless_the_prefill_replica_has_more_cached(self):
        d = self.decider()
        out = d.place(1000, "free", ep("D"), [ep("P", Role.PREFILL, queued=50)], {"D": 0, "P": 0}, BS)
        assert (out.prefill, out.reason, out.uncached_tokens) == (None, "local_prefill:idle", 1000)
        out = d.place(1000, "free", ep("D"), [ep("P", Role.PREFILL)], {"D": 0, "P": 10}, BS)
        assert (out.prefill.endpoint_id, out.reason, out.uncached_tokens) == ("P", "remote_prefill", 840)
        off = self.decider(local_prefill_when_idle=False)
        out = off.place(1000, "free", ep("D"), [ep("P", Role.PREFILL)], {"D": 0, "P": 0}, BS)
        assert (out.prefill.endpoint_id, out.reason) == ("P", "remote_prefill")

    def test_hit_and_uncached_are_the_prefilling_replicas(self):
        out = self.decider().place(1000, "free", ep("D"), [ep("P", Role.PREFILL)], {"D": 1, "P": 10}, BS)
        assert (out.prefix_hit_tokens, out.uncached_tokens) == (160, 840)
        out = self.decider().place(60, "free", ep("D"), [ep("P", Role.PREFILL)], {"D": 1, "P": 3}, BS)
        assert (out.prefill, out.reason, out.prefix_hit_tokens, out.uncached_tokens) == (
            None,
            "local_prefill:short",
            16,
            44,
        )


class TestAdmissionStage:
    def test_unknown_tier_is_the_default_and_arrival_activates_it(self):
        t = [0.0]
        stage = SloAdmission(RouterConfig(), lambda pool: CostModel(), TierActivity(30.0, lambda: t[0]))
        assert stage.tier_of(req(tier="gold")) == "free" and stage.tier_of(req(tier="premium")) == "premium"
        assert stage.active_tiers(PoolSnapshot([])) == frozenset()
        stage.arrive("premium")
        assert stage.active_tiers(PoolSnapshot([])) == {"premium"}
        t[0] = 31.0
        assert stage.active_tiers(PoolSnapshot([])) == frozenset()

    def test_no_lending_without_tier_idle(self):
        stage = SloAdmission(RouterConfig(admission={"tier_idle_s": None}), lambda pool: CostModel())
        stage.arrive("free")  # nothing to record
        assert stage.activity is None and stage.active_tiers(PoolSnapshot([])) is None


class TestPipelineConfig:
    def test_defaults_are_the_placement_weights(self):
        cfg = RouterConfig()
        assert cfg.pipeline.filters == ["healthy"] and cfg.pipeline.decider == "conditional"
        assert cfg.scorer_weights() == {"prefix": 1.0, "load": 0.5, "kv": 0.2}
        assert RouterConfig(placement={"load_weight": 0.9}).scorer_weights() == {"prefix": 1.0, "load": 0.9, "kv": 0.2}

    def test_scorers_by_name(self):
        cfg = RouterConfig(pipeline={"scorers": {"load": 1.0, "prefix": 2.0}})
        assert list(cfg.scorer_weights().items()) == [("load", 1.0), ("prefix", 2.0)]
        pol = SloAwarePolicy(cfg, PrefixIndex(), {}, BS)
        assert [type(s) for s in pol.scorers] == [LoadScorer, PrefixScorer]

    @pytest.mark.parametrize(
        "pipeline",
        [
            {"scorers": {"cache": 1.0}},
            {"scorers": {"load": -1.0}},
            {"filters": ["fresh"]},
            {"decider": "always-remote"},
            {"stages": []},
        ],
    )
    def test_unknown_names_are_refused(self, pipeline):
        with pytest.raises(ValidationError):
            RouterConfig(pipeline=pipeline)

    def test_weights_in_one_place(self):
        with pytest.raises(ValidationError, match="one place"):
            RouterConfig(placement={"kv_weight": 0.1}, pipeline={"scorers": {"kv": 0.3}})
        RouterConfig(placement={"max_batch_hint": 8}, pipeline={"scorers": {"kv": 0.3}})  # not a weight


class TestHooks:
    def policy(self, clock=None, **router):
        cfg = RouterConfig(**router)
        activity = TierActivity(30.0, clock) if clock else None
        return SloAwarePolicy(cfg, PrefixIndex(), {}, BS, random.Random(0), activity=activity)

    SNAP = PoolSnapshot([ep("D1", load=1), ep("P1", Role.PREFILL)])  # a busy decode replica: remote prefill

    def test_route_changes_no_state(self):
        t = [0.0]
        pol = self.policy(lambda: t[0])
        r = req(1000, tier="premium", hashes=range(60))
        first = pol.route(r, self.SNAP)
        assert pol.route(r, self.SNAP) == first and pol.route(r, self.SNAP, admit=False).decode == first.decode
        assert len(pol.prefix_index) == 0 and pol.admission.active_tiers(self.SNAP) == frozenset()
        assert pol.models.keys() == {"decode", "prefill"}  # models are created on first use (not state)

    def test_on_routed_records_both_replicas_and_the_arrival(self):
        t = [0.0]
        pol = self.policy(lambda: t[0])
        r = req(1000, tier="premium", hashes=range(60))
        d = pol.route(r, self.SNAP)
        assert d.prefill.endpoint_id == "P1"
        pol.on_routed(r, d)
        assert pol.prefix_index.blocks_by_endpoint() == {"D1": 60, "P1": 60}
        assert pol.admission.active_tiers(self.SNAP) == {"premium"}

    def test_a_move_records_only_its_new_decode_replica_and_no_arrival(self):
        t = [0.0]
        pol = self.policy(lambda: t[0])
        r = req(1000, tier="premium", hashes=range(60))
        pol.on_routed(r, pol.route(r, self.SNAP, admit=False), moved=True)
        assert pol.prefix_index.blocks_by_endpoint() == {"D1": 60}
        assert pol.admission.active_tiers(self.SNAP) == frozenset()

    def test_a_refusal_records_the_arrival_only_when_admission_decided_it(self):
        t = [0.0]
        pol = self.policy(lambda: t[0])
        crowded = PoolSnapshot([ep("D1", load=1), ep("P1", Role.PREFILL, queued=5000)])
        r = req(1000, tier="premium", hashes=range(60))
        refused = pol.route(r, crowded)
        assert isinstance(refused, Rejection) and refused.reason == "overload_ttft"
        pol.on_routed(r, refused)
        assert len(pol.prefix_index) == 0 and pol.admission.active_tiers(crowded) == {"premium"}
        pol = self.policy(lambda: t[0])
        assert pol.route(r, PoolSnapshot([ep("P1", Role.PREFILL)])) == NO_DECODE_REPLICA
        pol.on_routed(r, NO_DECODE_REPLICA)
        assert pol.admission.active_tiers(crowded) == frozenset()
        pol = self.policy(lambda: t[0], admission={"enabled": False})
        pol.on_routed(r, pol.route(r, self.SNAP))
        assert pol.admission.active_tiers(self.SNAP) == frozenset()

    def test_latency_hooks_feed_the_biases_of_the_pools_that_served(self):
        pol = self.policy()
        d = pol.route(req(1000, hashes=range(60)), self.SNAP)
        pol.on_first_token(d, 2 * d.predicted_ttft_s)
        pol.on_finish(d, 0.5 * d.predicted_tpot_s)
        pol.on_finish(d, None)  # a one-token answer: no TPOT
        prefill, decode = pol.model("prefill"), pol.model("decode")
        assert prefill.ttft_bias == pytest.approx(2**0.1) and decode.ttft_bias == 1.0
        assert decode.tpot_bias == pytest.approx(0.5**0.1) and prefill.tpot_bias == 1.0
        unpredicted = pol.route(req(1000, hashes=range(60)), self.SNAP, admit=False)
        pol.on_first_token(unpredicted, 9.0)
        pol.on_finish(unpredicted, 9.0)
        assert prefill.ttft_bias == pytest.approx(2**0.1) and decode.tpot_bias == pytest.approx(0.5**0.1)

    def test_on_stats_fits_the_pools_model(self):
        pol = self.policy()
        for _ in range(60):
            pol.on_stats(
                SimpleNamespace(
                    pool="prefill", prefill_samples=[(100, 1.0), (1000, 10.0)], decode_samples=[(4, 1000, 0.2)]
                )
            )
        assert pol.model("prefill").prefill_tokens_per_s() == pytest.approx(100, rel=0.05)
        assert pol.model("prefill").decode_step_s(4, 1000) == pytest.approx(0.2, rel=0.05)
        assert pol.model("decode").prefill.n == 0

    def test_baselines_have_no_state_to_feed(self):
        for pol in (
            LeastLoadedPolicy(random.Random(0)),
            RoundRobinPolicy(),
            build_policy(RouterConfig(policy="round-robin"), BS),
        ):
            d = pol.route(req(), self.SNAP)
            pol.on_routed(req(), d)
            pol.on_first_token(d, 1.0)
            pol.on_finish(d, 0.1)
            assert pol.prefix_index is None and pol.route(req(), PoolSnapshot([])) == NO_DECODE_REPLICA
