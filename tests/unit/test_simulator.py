"""capacity/simulator.py: invariants of the discrete-event simulation that runs the real router, and
serve/sim_cluster.py's mapping of a config onto it."""

import dataclasses
import json
import time

import pytest

import capacity.simulator as simulator
from capacity.cluster import Link, SimCluster, SimPool
from capacity.profile import MEASURED, EngineProfile, ProfileKey, ServingOverhead
from capacity.simulator import Simulation, simulate, unloaded_request_s
from capacity.workload import PRESETS, fixed
from router.config import AdmissionConfig, RouterConfig
from serve.config import ClusterConfig
from serve.sim_cluster import pool_profile, serving_core_shares, sim_cluster

MODEL = "SmolLM2-135M-Instruct"


def fake_profile(kv_capacity_tokens: int = 40_000, dtype: str = "float32", device_type: str = "cpu-1core-amx"):
    """Round numbers of the shape measured on the CPU box: ~0.6 s for a 512-token prefill, ~35 ms
    decode steps growing with batch and context, a few ms per handoff."""
    return EngineProfile(
        key=ProfileKey(MODEL, device_type, dtype=dtype),
        device_kind="cpu",
        source=MEASURED,
        prefill=((16, 0.05), (512, 0.6), (2048, 2.6)),
        decode=tuple((b, c, 0.03 + 0.002 * b + 0.00001 * b * c / 16) for b in (1, 8, 32, 64) for c in (128, 1024)),
        handoff=((1000, 0.002), (10_000_000, 0.05)),
        kv_bytes_per_token=23040,
        kv_capacity_tokens=kv_capacity_tokens,
        max_num_seqs=64,
    )


def cluster(prefill: int = 1, decode: int = 1, router: RouterConfig | None = None, **kw) -> SimCluster:
    prof = kw.pop("profile", fake_profile())
    pools = [SimPool("prefill", "prefill", prefill, prof, price_per_hour=1.0)] if prefill else []
    pools.append(SimPool("decode", "decode", decode, prof, price_per_hour=2.0))
    return SimCluster(tuple(pools), router or RouterConfig(), 128, **kw)


NO_ADMISSION = RouterConfig(admission=AdmissionConfig(enabled=False))
# every prompt over the link: an idle decode replica would prefill it itself (placement.local_prefill_when_idle)
ALWAYS_HANDOFF = RouterConfig(admission=AdmissionConfig(enabled=False), placement={"local_prefill_when_idle": False})


def test_every_request_ends_exactly_once(monkeypatch):
    """Each request is routed once, and either refused or finished once; nothing stays reserved."""
    calls = {"routed": 0, "finish": 0}
    real_build = simulator.build_policy

    def counting_build(*a, **kw):
        policy = real_build(*a, **kw)
        routed, finish = policy.on_routed, policy.on_finish

        def on_routed(*x, **y):
            calls["routed"] += 1
            return routed(*x, **y)

        def on_finish(*x, **y):
            calls["finish"] += 1
            return finish(*x, **y)

        policy.on_routed, policy.on_finish = on_routed, on_finish
        return policy

    monkeypatch.setattr(simulator, "build_policy", counting_build)
    sim = Simulation(cluster(1, 2), seed=3)
    sim.run_requests(PRESETS["chat"].requests(rate=4.0, n=400, seed=3))
    res = sim.result()
    assert res.requests == 400 and calls["routed"] == 400
    assert res.completed + sum(res.refused.values()) == 400
    assert calls["finish"] == res.completed > 0
    assert all(r.generated == r.max_new for r in sim.requests if r.finish_s is not None)
    assert all(e.in_flight == 0 and e.queued_tokens == 0 and e.used_blocks == 0 for e in sim.engines)
    assert not any(e.running or e.waiting or e.prefill_q for e in sim.engines)


def test_littles_law_on_a_steady_run():
    """Mean requests in the system = offered rate x mean time in the system (admission off, a load the
    cluster sustains)."""
    rate = 2.0
    res = simulate(cluster(1, 2, NO_ADMISSION), PRESETS["random-256-128"], rate, 2000, seed=1)
    assert res.completed == 2000
    assert res.mean_in_system == pytest.approx(rate * res.mean_latency_s, rel=0.1)
    assert res.throughput_rps == pytest.approx(rate, rel=0.1)


def test_zero_refusals_with_admission_off():
    overload = 8.0  # several times what one prefill replica sustains on 512-token prompts
    off = simulate(cluster(1, 1, NO_ADMISSION), PRESETS["random-512-64"], overload, 300, seed=0)
    assert off.refused == {} and off.completed == 300
    on = simulate(cluster(1, 1), PRESETS["random-512-64"], overload, 300, seed=0)
    assert sum(on.refused.values()) > 0  # the same load with admission on is refused in part


def test_prefix_aware_placement_hits_the_cache_more_than_round_robin():
    prefix = RouterConfig(admission=AdmissionConfig(enabled=False))
    rr = RouterConfig(policy="round-robin")
    small_kv = fake_profile(kv_capacity_tokens=4096)
    # many tenants, replicas whose caches hold a third of the working set: placement decides what stays
    args = (PRESETS["shared-prefix-wide"], 1.0, 400)
    aware = simulate(cluster(0, 3, prefix, profile=small_kv), *args, seed=2)
    blind = simulate(cluster(0, 3, rr, profile=small_kv), *args, seed=2)
    assert aware.prompt_tokens == blind.prompt_tokens
    assert aware.prefix_hit_tokens > 1.5 * blind.prefix_hit_tokens
    assert aware.ttft_s.p50 < blind.ttft_s.p50


def test_handoff_compression_shortens_ttft_on_a_slow_link():
    slow = Link(bandwidth_gbps=0.05, latency_s=1e-3)  # 512 tokens x 23 KB = 94 Mbit: ~1.9 s raw
    wl = fixed(512, 16)
    raw = simulate(cluster(1, 1, ALWAYS_HANDOFF, default_link=slow), wl, 0.2, 60, seed=4)
    int4 = simulate(cluster(1, 1, ALWAYS_HANDOFF, default_link=slow, kv_compression="int4"), wl, 0.2, 60, seed=4)
    assert raw.remote_prefills == int4.remote_prefills == 60
    assert int4.ttft_s.p50 < raw.ttft_s.p50 - 1.0


def test_deterministic_by_seed():
    c = cluster(1, 2)
    a = simulate(c, PRESETS["chat"], 3.0, 300, seed=7)
    b = simulate(c, PRESETS["chat"], 3.0, 300, seed=7)
    other = simulate(c, PRESETS["chat"], 3.0, 300, seed=8)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != other.to_dict()


def test_kv_capacity_makes_requests_wait():
    """A decode replica with KV for a few requests at a time queues the rest: TTFT grows, nothing is lost."""
    big = simulate(cluster(1, 1, NO_ADMISSION), fixed(512, 128), 2.0, 100, seed=5)
    tight = simulate(
        cluster(1, 1, NO_ADMISSION, profile=fake_profile(kv_capacity_tokens=2048)), fixed(512, 128), 2.0, 100, seed=5
    )
    assert tight.completed == big.completed == 100
    assert tight.ttft_s.p90 > 2 * big.ttft_s.p90


def test_cost_figures():
    res = simulate(cluster(1, 2), fixed(128, 32), 1.0, 100, seed=0)
    assert res.cost_per_hour == 1.0 + 2 * 2.0
    tokens_per_hour = res.output_tokens_per_s * 3600
    assert res.cost_per_million_output_tokens == pytest.approx(res.cost_per_hour / tokens_per_hour * 1e6)


def test_ten_thousand_requests_on_64_replicas_in_seconds():
    c = cluster(16, 48, NO_ADMISSION)
    t0 = time.perf_counter()
    res = simulate(c, PRESETS["chat"], 30.0, 10_000, seed=0)
    took = time.perf_counter() - t0
    assert res.completed == 10_000
    assert took < 30.0, f"{took:.1f} s (goal: < 10 s on an idle 2-core box)"


def test_serving_term_adds_to_what_the_client_sees_not_to_the_engines():
    """A profile's serving term raises every TTFT by its ``ttft_s`` and every later token's gap by its
    ``tpot_s``; the engines' work (tokens, prefills, cache hits) is the same."""
    overhead = ServingOverhead(ttft_s=0.15, tpot_s=0.004)
    served = dataclasses.replace(fake_profile(), serving=overhead)
    args = (PRESETS["random-256-128"], 1.0, 200)
    bare = simulate(cluster(1, 1, NO_ADMISSION), *args, seed=3)
    with_path = simulate(cluster(1, 1, NO_ADMISSION, profile=served), *args, seed=3)
    assert with_path.completed == bare.completed == 200
    assert (with_path.local_prefills, with_path.remote_prefills) == (bare.local_prefills, bare.remote_prefills)
    for q in ("p50", "p99", "mean"):
        assert getattr(with_path.ttft_s, q) == pytest.approx(getattr(bare.ttft_s, q) + 0.15, abs=1e-9)
        assert getattr(with_path.tpot_s, q) == pytest.approx(getattr(bare.tpot_s, q) + 0.004, abs=1e-9)
    assert with_path.itl_s.p50 == pytest.approx(bare.itl_s.p50 + 0.004, abs=1e-9)
    # every request finishes later by the first-token term plus 127 token gaps
    assert with_path.mean_latency_s == pytest.approx(bare.mean_latency_s + 0.15 + 127 * 0.004, abs=1e-6)


def test_serving_cpu_stretches_the_steps_of_engines_on_shared_cores():
    """The serving processes' CPU per streamed token slows only the engines on cores they share, more
    so at a higher token rate; with no shared core the run is as without it."""
    prof = dataclasses.replace(fake_profile(), serving=ServingOverhead(cpu_per_token_s=0.002))

    def run(share: float, rate: float):
        c = cluster(1, 1, NO_ADMISSION, profile=prof)
        pools = tuple(dataclasses.replace(p, serving_core_share=share if p.role == "decode" else 0.0) for p in c.pools)
        return simulate(dataclasses.replace(c, pools=pools), PRESETS["random-256-128"], rate, 200, seed=6)

    bare = simulate(cluster(1, 1, NO_ADMISSION), PRESETS["random-256-128"], 2.0, 200, seed=6)
    assert run(0.0, 2.0).to_dict() == bare.to_dict()
    shared = run(0.5, 2.0)
    assert shared.completed == 200
    # ~2 req/s x 128 tokens x 2 ms x 0.5: ~25 % of the core; slower steps then batch more requests
    assert shared.tpot_s.p50 > 1.25 * bare.tpot_s.p50
    sim = Simulation(cluster(1, 1, NO_ADMISSION, profile=prof), seed=0)
    sim.token_rate = 250.0
    decode_pool = dataclasses.replace(sim.cluster.pools[1], serving_core_share=0.5)
    assert sim.serving_stretch(decode_pool) == pytest.approx(1 / (1 - 250 * 0.002 * 0.5))
    assert sim.serving_stretch(sim.cluster.pools[0]) == 1.0  # share 0
    sim.token_rate = 1e6
    assert sim.serving_stretch(decode_pool) == pytest.approx(1 / (1 - simulator.MAX_SERVING_CPU_SHARE))
    slow = run(0.5, 0.5)
    slow_bare = simulate(cluster(1, 1, NO_ADMISSION), PRESETS["random-256-128"], 0.5, 200, seed=6)
    assert slow.tpot_s.p50 / slow_bare.tpot_s.p50 < shared.tpot_s.p50 / bare.tpot_s.p50


def test_unloaded_request_is_the_engines_alone():
    """``unloaded_request_s``: one request's TTFT / TPOT from the engine profiles, the serving term left
    out; a lone short prompt prefills on the idle decode replica (placement.local_prefill_when_idle)."""
    prof = dataclasses.replace(fake_profile(), serving=ServingOverhead(ttft_s=5.0, tpot_s=1.0))
    ttft, tpot = unloaded_request_s(cluster(1, 1, NO_ADMISSION, profile=prof), 100, 8)
    assert ttft == pytest.approx(prof.prefill_s(100))
    assert tpot == pytest.approx(prof.decode_step_s(1, 101), rel=0.05)
    remote_ttft, _ = unloaded_request_s(cluster(1, 1, ALWAYS_HANDOFF, profile=prof), 100, 8)
    assert remote_ttft > ttft  # the handoff, the step that loads the KV, then the first decode step


def test_profile_file_serving_section(tmp_path):
    """The serving section round-trips through a profile file; a profile written without one loads with
    no serving term; the shipped profile carries a measured one."""
    from capacity.profile import load_profiles, save_profiles
    from serve.sim_cluster import DEFAULT_PROFILES

    served = dataclasses.replace(fake_profile(), serving=ServingOverhead(0.1, 0.002, "measured here"))
    path = tmp_path / "p.json"
    save_profiles(path, [served])
    assert load_profiles(path) == [served]
    data = json.loads(path.read_text())
    del data["profiles"][0]["serving"]
    path.write_text(json.dumps(data))
    (old,) = load_profiles(path)
    assert old.serving == ServingOverhead() and old == dataclasses.replace(served, serving=ServingOverhead())
    shipped = load_profiles(DEFAULT_PROFILES)
    assert all(0.0 < p.serving.ttft_s < 1.0 and p.serving.notes for p in shipped)


# serve/sim_cluster.py -----------------------------------------------------------------------------


def test_default_config_maps_each_pool_to_its_profile():
    cfg = ClusterConfig.from_yaml("serve/default.yaml")
    profiles = [fake_profile(dtype="bfloat16"), fake_profile(device_type="cpu-2core-amx")]
    sc = sim_cluster(cfg, profiles)
    assert [(p.name, p.role, p.replicas) for p in sc.pools] == [("prefill", "prefill", 1), ("decode", "decode", 1)]
    for pool, conf in zip(sc.pools, cfg.pools):
        assert pool.profile.key.device_type == "cpu-1core-amx"  # one bound core each
        assert pool.profile.max_num_seqs == conf.engine.max_num_seqs
        assert pool.profile.kv_capacity_tokens == 2**30 // 23040  # kv_cache_space_gib: 1
    assert sc.kv_compression is None and sc.block_size == 128


def test_serving_core_shares_follow_ray_serving_cores():
    """Where the serving processes run (serve/affinity.py) decides which engines they take CPU from."""
    assert serving_core_shares(ClusterConfig.from_yaml("serve/default.yaml")) == {"prefill": 1.0, "decode": 0.0}
    all_cores = ClusterConfig.from_yaml("configs/bench/serving-cores-all.yaml")
    assert serving_core_shares(all_cores) == {"prefill": 0.5, "decode": 0.5}
    # two colocated replicas on cores 0 and 1: no core is free of a decode engine, Ray runs on both
    assert serving_core_shares(ClusterConfig.from_yaml("configs/bench/prefix-2x.yaml")) == {"decode": 0.5}
    joined = ClusterConfig.from_yaml("serve/default.yaml", ["ray.address=auto"])
    assert serving_core_shares(joined) == {}
    sc = sim_cluster(ClusterConfig.from_yaml("serve/default.yaml"), [fake_profile(dtype="bfloat16")])
    assert [p.serving_core_share for p in sc.pools] == [1.0, 0.0]


def test_missing_profile_is_a_clear_error():
    cfg = ClusterConfig.from_yaml("configs/bench/prefix-2x.yaml")  # float32 engines
    with pytest.raises(KeyError, match="dtype=float32"):
        pool_profile([fake_profile(dtype="bfloat16")], MODEL, cfg.pools[0])
    other = dataclasses.replace(fake_profile(), key=ProfileKey("another-model", "cpu-1core-amx", dtype="float32"))
    with pytest.raises(KeyError):
        pool_profile([other], MODEL, cfg.pools[0])


def test_cli_simulate(tmp_path, capsys):
    from capacity.profile import save_profiles
    from serve.cli import main

    path = tmp_path / "profiles.json"
    save_profiles(path, [fake_profile(dtype="bfloat16"), fake_profile(dtype="float32")])
    args = ["simulate", "--workload", "random-512-64", "--rate", "1", "--requests", "50", "--profiles", str(path)]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests"] == 50 and out["completed"] + sum(out["refused"].values()) == 50
    assert main(args) == 0
    assert "TTFT p50/p90/p99 ms" in capsys.readouterr().out
    assert main([*args[:-1], str(tmp_path / "missing.json")]) == 2


def test_cli_simulate_reads_a_workload_file_at_its_rate(tmp_path, capsys):
    from capacity.profile import save_profiles
    from serve.cli import main

    path = tmp_path / "profiles.json"
    save_profiles(path, [fake_profile(dtype="bfloat16")])
    wl = "configs/workloads/cpu-small.yaml"  # rate: 0.5
    args = ["simulate", "--workload", wl, "--requests", "40", "--profiles", str(path), "--json"]
    runs = {}
    for rate in (None, "0.5", "5"):
        assert main(args + (["--rate", rate] if rate else [])) == 0
        runs[rate] = json.loads(capsys.readouterr().out)
    assert runs[None] == runs["0.5"] != runs["5"]
    assert runs[None]["requests"] == 40
    assert main(["simulate", "--workload", "chat", "--profiles", str(path)]) == 2  # a preset has no rate
    assert "no rate" in capsys.readouterr().err
