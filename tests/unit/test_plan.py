"""The planner (capacity/inventory.py, search.py, estimate.py, plan.py) and `pdserve plan`."""

import time
from pathlib import Path

import pytest
import yaml

from capacity.estimate import poisson_cdf
from capacity.inventory import load_inventory, parse_inventory
from capacity.plan import Planner, plan, wire_ratio
from capacity.roofline import Roofline, load_model
from capacity.search import (
    DECODE,
    PREFILL,
    Group,
    SearchConfig,
    canonical,
    cluster_devices,
    initial_solution,
    neighbours,
)
from capacity.workload import Lengths, Workload, load_workload
from router.config import SloConfig
from serve.cli import main
from serve.config import ClusterConfig
from tests.conftest import REPO

INVENTORIES = REPO / "configs" / "inventories"
WORKLOADS = REPO / "configs" / "workloads"
LLAMA8 = load_model("llama-3.1-8b")
CHAT = load_workload(WORKLOADS / "chat.yaml").with_rate(150)
SLO = SloConfig(ttft_ms=1000, tpot_ms=60)
QUICK = SearchConfig(iterations=15, patience=6, seed=0)


def test_length_quantiles():
    fixed = Lengths(dist="fixed", value=100).quantiles(8)
    assert list(fixed) == [100] * 8
    uni = Lengths(dist="uniform", low=100, high=300).quantiles(10)
    assert uni.min() > 100 and uni.max() < 300 and uni.mean() == pytest.approx(200, abs=1)
    logn = Lengths(dist="lognormal", mean=1000, cv=0.5, max=100000).quantiles(200)
    assert logn.mean() == pytest.approx(1000, rel=0.03) and list(logn) == sorted(logn)
    with pytest.raises(ValueError, match="needs"):
        Lengths(dist="uniform", low=1)


def test_poisson_cdf():
    assert poisson_cdf(0, 2.0) == pytest.approx(0.1353, abs=1e-4)
    assert poisson_cdf(3, 2.0) == pytest.approx(0.8571, abs=1e-4)
    assert poisson_cdf(-1, 2.0) == 0.0 and poisson_cdf(5, 0.0) == 1.0
    assert poisson_cdf(100, 100.0) == pytest.approx(0.5266, abs=0.01)  # normal approximation


def test_clustering_follows_servers_and_types():
    inv = load_inventory(INVENTORIES / "h100-a10g-t4.yaml")
    clusters = cluster_devices(inv)
    assert [len(c) for c in clusters] == [4, 8, 8]
    for c in clusters:
        assert len({(inv.devices[i].node, inv.devices[i].type) for i in c}) == 1
    mixed = parse_inventory({"name": "mixed", "nodes": [{"name": "n0", "devices": {"A100-80GB": 2, "L4": 2}}]})
    assert [len(c) for c in cluster_devices(mixed)] == [2, 2]  # one server, split by type


def _whole(inv, solution):
    ids = sorted(i for g in solution for i in g.devices)
    assert ids == [d.id for d in inv.devices], "every device in exactly one group"
    for g in solution:
        assert len({inv.devices[i].type for i in g.devices}) == 1, "a group holds one device type"
        assert g.phase in (PREFILL, DECODE) and g.devices
    assert any(g.phase == DECODE for g in solution)


def test_moves_keep_the_inventory_whole():
    inv = load_inventory(INVENTORIES / "a100-l4.yaml")
    planner = Planner(inv, LLAMA8, CHAT, SLO)
    frontier = [initial_solution(inv, planner.prefill_rank), planner.even_split_baseline()]
    seen, kinds = set(), set()
    for _ in range(3):  # three rounds of moves from two starts, bounded
        nxt = []
        for s in frontier[:6]:
            for name, n in neighbours(inv, s):
                _whole(inv, n)
                kinds.add(name.split()[0])
                if n not in seen:
                    seen.add(n)
                    nxt.append(n)
        frontier = nxt
    assert kinds == {"flip", "split", "merge", "move"}
    assert len(seen) > 50


def test_same_seed_same_plan():
    inv = load_inventory(INVENTORIES / "h100-a10g-t4.yaml")
    a = plan(inv, LLAMA8, CHAT, SLO, search=QUICK)
    b = plan(load_inventory(INVENTORIES / "h100-a10g-t4.yaml"), LLAMA8, CHAT, SLO, search=QUICK)
    assert a.plan.solution == b.plan.solution and a.config == b.config
    assert a.summary()["results"] == b.summary()["results"]


def _check_memory(planner, built):
    out_mean = float(planner.wl.output_quantiles().mean())
    prompt = planner.wl.prompt_quantiles()
    for p in built.pools:
        r = Roofline(planner.model, planner.inv.gpu(p.device_type), p.tp, p.pp, planner.dtype)
        batch_kv = p.max_num_seqs * (prompt.mean() + out_mean) if p.phase == DECODE else prompt.max()
        need = r.weight_bytes_per_gpu + batch_kv * r.kv_bytes_per_token_per_gpu
        assert need <= r.usable_bytes_per_gpu, f"{p.name}: {need / 2**30:.1f} GiB per GPU"


@pytest.mark.parametrize("inventory", ["a100-l4.yaml", "h100-a10g-t4.yaml"])
def test_plan_fits_memory_validates_and_beats_nothing_silently(inventory):
    inv = load_inventory(INVENTORIES / inventory)
    res = plan(inv, LLAMA8, CHAT, SLO, search=QUICK)
    for built in (res.plan, res.colocated, res.even_split):
        _check_memory(res.planner, built)
        _whole(inv, built.solution)
        cfg = ClusterConfig.from_dict(res.planner.config(built))
        assert {p.name for p in cfg.pools} == {p.name for p in built.pools}
        for pool, p in zip(cfg.pools, built.pools):
            assert pool.device.kind == "gpu" and pool.device.count == p.tp * p.pp
            assert pool.engine.tensor_parallel_size == p.tp and pool.replicas.min == p.replicas
        assert built.estimate.goodput_rps <= CHAT.rate
        assert built.estimate.cost_per_hour == pytest.approx(
            sum(inv.price_per_hour(inv.devices[i].type) for p in built.pools for i in p.devices)
        )
    assert res.plan.estimate.goodput_per_dollar > 0
    assert res.summary()["estimate_kind"] == "estimate (roofline)"
    # the search starts from the clustered solution and keeps the best it saw
    start = res.planner.build(initial_solution(inv, res.planner.prefill_rank))
    assert res.plan.estimate.goodput_per_dollar >= start.estimate.goodput_per_dollar * (1 - 1e-6)


def test_70b_plan_uses_tensor_parallel_replicas_that_fit():
    inv = load_inventory(INVENTORIES / "a100-l4.yaml")
    res = plan(inv, load_model("llama-3.1-70b"), CHAT.with_rate(20), SloConfig(ttft_ms=3000, tpot_ms=150), search=QUICK)
    assert res.plan.pools and all(p.tp * p.pp >= 2 for p in res.plan.pools)
    _check_memory(res.planner, res.plan)
    ClusterConfig.from_dict(res.config)


def test_slow_links_turn_on_kv_compression():
    data = {
        "name": "slow",
        "nodes": [{"name": "p", "devices": {"A100-80GB": 2}}, {"name": "d", "devices": {"A100-80GB": 2}}],
        "links": {"inter_node": {"bandwidth_gbps": 1.0, "latency_us": 100}},
    }
    inv = parse_inventory(data)
    planner = Planner(inv, LLAMA8, CHAT, SLO)
    split = canonical([Group((0, 1), PREFILL), Group((2, 3), DECODE)])
    built = planner.build(split)
    assert built.compression in ("int8", "int4") and built.flows
    cfg = planner.config(built)
    assert cfg["kv_handoff"] == {"backend": "slab", "slab": {"compression": built.compression}}
    ClusterConfig.from_dict(cfg)
    fast = parse_inventory({**data, "links": {"inter_node": {"bandwidth_gbps": 400.0}}})
    assert Planner(fast, LLAMA8, CHAT, SLO).build(split).compression == "none"
    assert wire_ratio("int4", 2) < wire_ratio("int8", 2) < wire_ratio("none", 2) == 1.0


def test_confirm_hook_picks_the_best_of_the_top_plans_and_the_baselines():
    inv = load_inventory(INVENTORIES / "h100-a10g-t4.yaml")
    calls = []

    def prefill_replicas(cluster):  # a stand-in simulator's score: prefers plans with more prefill replicas
        return float(sum(p.replicas for p in cluster.pools if p.role == PREFILL))

    def fake_confirm(cluster):
        calls.append(cluster)
        assert cluster.price_per_hour > 0 and cluster.router.slo.ttft_ms == SLO.ttft_ms
        return prefill_replicas(cluster)

    res = plan(inv, LLAMA8, CHAT, SLO, search=QUICK, confirm=fake_confirm, top_k=3)
    assert 3 <= len(calls) <= 3 + 2  # the top three, then the baselines not among them
    assert res.confirmed["plan"] == max(prefill_replicas(c) for c in calls)  # a baseline may win
    assert res.confirmed["plan"] >= max(res.confirmed["colocated"], res.confirmed["even-split"])


def test_cpu_inventory_plans_a_config_on_cores():
    inv = load_inventory(INVENTORIES / "this-machine-cpu.yaml")
    wl = load_workload(WORKLOADS / "cpu-small.yaml")
    res = plan(inv, load_model("bundled:smollm2"), wl, SloConfig(ttft_ms=4000, tpot_ms=250), search=QUICK)
    cfg = ClusterConfig.from_dict(res.config)
    assert cfg.model.path == "bundled:smollm2"
    cores = []
    for pool in cfg.pools:
        assert pool.device.kind == "cpu"
        binding = pool.device.cpu_cores
        cores += [binding] if isinstance(binding, str) else binding
    assert sorted(cores) == ["0", "1"], "each core runs one engine"


def test_32_gpus_plan_within_a_minute():
    data = {
        "name": "big",
        "nodes": [{"name": f"h{i}", "devices": {"H100-SXM": 8}} for i in range(2)]
        + [{"name": f"l{i}", "devices": {"L40S": 8}} for i in range(2)],
    }
    inv = parse_inventory(data)
    t0 = time.perf_counter()
    res = plan(inv, LLAMA8, CHAT.with_rate(400), SLO, search=SearchConfig(iterations=60, seed=1))
    elapsed = time.perf_counter() - t0
    assert len(inv.devices) == 32 and res.plan.pools
    assert elapsed < 60, f"{elapsed:.1f} s"


def test_cli_plan_writes_a_valid_config(tmp_path: Path, capsys):
    out, report = tmp_path / "plan.yaml", tmp_path / "plan.md"
    args = [
        "plan",
        str(INVENTORIES / "this-machine-cpu.yaml"),
        "--model",
        "bundled:smollm2",
        "--workload",
        str(WORKLOADS / "cpu-small.yaml"),
        "--rate",
        "0.8",
        "--slo-ttft-ms",
        "4000",
        "--slo-tpot-ms",
        "250",
        "--out",
        str(out),
        "--report",
        str(report),
        "--iterations",
        "10",
    ]
    assert main(args) == 0
    assert ClusterConfig.from_yaml(out).pools
    assert "## colocated" in report.read_text() and "## even-split" in report.read_text()
    summary = yaml.safe_load(Path(f"{report}.json").read_text())
    assert summary["workload"]["rate"] == 0.8 and summary["estimate_kind"].startswith("estimate")
    assert main(["validate", str(out)]) == 0
    capsys.readouterr()


def test_cli_plan_takes_a_preset_workload_and_needs_a_rate(capsys):
    args = ["plan", str(INVENTORIES / "this-machine-cpu.yaml"), "--model", "bundled:smollm2", "--workload"]
    args += ["random-512-64", "--slo-ttft-ms", "4000", "--slo-tpot-ms", "250", "--iterations", "5"]
    assert main(args) == 2
    assert "no rate" in capsys.readouterr().err
    assert main([*args, "--rate", "0.5"]) == 0
    printed = capsys.readouterr().out  # no --out / --report: the config, then the report
    cfg = ClusterConfig.from_dict(yaml.safe_load(printed[: printed.index("# pdserve plan:")]))
    assert {p.device.kind for p in cfg.pools} == {"cpu"}
    assert "## colocated" in printed and "0.5 req/s" in printed


def test_workload_rate_override():
    wl = Workload(prompt_tokens=Lengths(value=10), output_tokens=Lengths(value=5), rate=2.0)
    assert wl.with_rate(None).rate == 2.0 and wl.with_rate(7.0).rate == 7.0
    no_rate = wl.model_copy(update={"rate": None})
    with pytest.raises(ValueError, match="no rate"):
        no_rate.with_rate(None)
    with pytest.raises(ValueError, match="no rate"):
        Planner(load_inventory(INVENTORIES / "a100-l4.yaml"), LLAMA8, no_rate, SLO)


def test_inventory_rejects_unknown_types_and_overrides_prices():
    with pytest.raises(KeyError, match="B9000"):
        parse_inventory({"name": "x", "nodes": [{"name": "n", "devices": {"B9000": 2}}]})
    with pytest.raises(ValueError, match="price_per_hour"):
        parse_inventory(
            {"name": "x", "device_types": {"c": {"kind": "cpu"}}, "nodes": [{"name": "n", "devices": {"c": 1}}]}
        )
    inv = parse_inventory(
        {"name": "x", "device_types": {"L4": {"price_per_hour": 0.5}}, "nodes": [{"name": "n", "devices": {"L4": 2}}]}
    )
    assert inv.price_per_hour("L4") == 0.5 and inv.gpu("L4").memory_gib == 24
    assert inv.link(inv.devices[0], inv.devices[1]).bandwidth_gbps == pytest.approx(31.5 * 8)


def test_sampled_lengths_keep_the_quantiles_mean_and_spread():
    import numpy as np

    rng = np.random.default_rng(0)
    for d in (
        Lengths(dist="lognormal", mean=400, cv=0.8),
        Lengths(dist="uniform", low=100, high=500),
        Lengths(dist="fixed", value=256),
    ):
        x = d.sample(rng, 40_000)
        q = d.quantiles(400)
        assert x.mean() == pytest.approx(q.mean(), rel=0.05), d
        assert x.std() == pytest.approx(q.std(), rel=0.15, abs=1.0), d


def test_simulator_confirms_the_cpu_plan_and_both_baselines():
    """``pdserve plan --confirm N``: the simulator re-scores the plan and both baselines (requests per USD)."""
    from capacity.plan import simulated_goodput_per_dollar

    wl = load_workload(WORKLOADS / "cpu-small.yaml")
    inv = load_inventory(INVENTORIES / "this-machine-cpu.yaml")
    res = plan(
        inv,
        load_model("smollm2-135m"),
        wl,
        SloConfig(ttft_ms=4000, tpot_ms=250),
        search=QUICK,
        confirm=simulated_goodput_per_dollar(wl, 200),
    )
    assert set(res.confirmed) == {"plan", "colocated", "even-split"}
    assert all(v > 0 for v in res.confirmed.values()), res.confirmed
