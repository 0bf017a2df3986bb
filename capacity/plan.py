"""``pdserve plan``: the heterogeneous-device planner. The upper level (capacity/search.py) groups devices
and gives each group a phase; the lower level here picks each group's TP/PP and replica count, routes
prefill pools' KV to decode pools over the cheapest links, and chooses the KV wire compression; the
analytic estimate (capacity/estimate.py) scores a plan as SLO-meeting requests per dollar. An optional
``confirm`` callable (a SimCluster -> goodput per dollar, e.g. the simulator) re-scores the best few.

Output: a pdserve config mapping (pools, router SLOs, KV handoff) and a report that sets the plan beside
two baselines on the same inventory: every group colocated, and an even prefill/decode split."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from capacity.cluster import Link, SimCluster, SimPool
from capacity.cpu_estimate import smollm2_cpu_estimate
from capacity.estimate import Estimate, Flow, PoolLoad, PoolTimes, decode_shares, estimate, pool_times
from capacity.inventory import Inventory
from capacity.profile import MEASURED, ROOFLINE, EngineProfile, load_profiles
from capacity.roofline import DTYPE_BYTES, DoesNotFit, ModelSpec, estimate_profile
from capacity.search import (
    DECODE,
    PREFILL,
    Group,
    SearchConfig,
    Solution,
    canonical,
    cluster_devices,
    initial_solution,
    tabu_search,
)
from capacity.simulator import simulate
from capacity.workload import Workload
from kvtransfer.config import SlabSettings
from router.config import RouterConfig, SloConfig

GPU_TP = (1, 2, 4, 8)
GPU_PP = (1, 2, 4)
BLOCK_SIZE = 128  # the pools' engine.block_size (a multiple of 32 for CPU engines, one value for all pools)
# A prefill group takes the TP/PP with the most prompts per second among those whose 90th-percentile
# prompt prefills within this share of the TTFT SLO (room left for queueing and the handoff); when none
# does, the fastest one.
PREFILL_LATENCY_SHARE = 0.5
# KV wire compression turns on when the routed handoffs take more than this share of the TTFT SLO
HANDOFF_BUDGET = 0.05
COMPRESSIONS = ("none", "int8", "int4")
PREFILL_MAX_NUM_SEQS = 64
TOP_K_CONFIRM = 3
DEFAULT_SEARCH = SearchConfig()


def wire_ratio(compression: str, dtype_bytes: int, group: int = SlabSettings().group) -> float:
    """Wire bytes / KV bytes of the slab codec (kvtransfer/quant.py GroupQuant: codes, fp16 scale and a
    zero point per group of ``group`` values)."""
    if compression == "none":
        return 1.0
    per_value = 1.0 + 3.0 / group if compression == "int8" else 0.5 + 2.5 / group
    return per_value / dtype_bytes


@dataclass(frozen=True)
class PoolPlan:
    name: str
    phase: str
    device_type: str
    kind: str  # "gpu" | "cpu"
    tp: int
    pp: int
    replicas: int
    devices: tuple[int, ...]  # the devices the replicas use
    replica_nodes: tuple[str, ...]
    profile: EngineProfile
    times: PoolTimes
    price_per_replica: float
    max_num_seqs: int

    @property
    def devices_per_replica(self) -> int:
        return self.tp * self.pp

    def load(self) -> PoolLoad:
        return PoolLoad(self.name, self.phase, self.replicas, self.times, self.price_per_replica * self.replicas)


@dataclass(frozen=True)
class BuiltPlan:
    solution: Solution
    pools: tuple[PoolPlan, ...]
    flows: tuple[Flow, ...]  # indices into prefill_pools / decode_pools
    compression: str
    estimate: Estimate
    idle_devices: tuple[int, ...]

    @property
    def prefill_pools(self) -> list[PoolPlan]:
        return [p for p in self.pools if p.phase == PREFILL]

    @property
    def decode_pools(self) -> list[PoolPlan]:
        return [p for p in self.pools if p.phase == DECODE]

    @property
    def estimated(self) -> bool:
        return any(p.profile.source != MEASURED for p in self.pools)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class Planner:
    def __init__(
        self,
        inv: Inventory,
        model: ModelSpec,
        workload: Workload,
        slo: SloConfig,
        dtype: str = "bfloat16",
        search: SearchConfig = DEFAULT_SEARCH,
    ):
        if workload.rate is None:
            raise ValueError(f"workload {workload.name!r} has no rate: give one (--rate)")
        self.inv, self.model, self.wl, self.slo, self.dtype, self.search = inv, model, workload, slo, dtype, search
        self._lower: dict[tuple, PoolPlan | None] = {}
        self._built: dict[Solution, BuiltPlan] = {}
        self._candidates: dict[tuple[str, int], list[tuple[int, int, EngineProfile, PoolTimes]]] = {}
        self._prompt_q = workload.prompt_quantiles()

    # --- profiles and TP/PP candidates -----------------------------------------------------------
    @cached_property
    def _cpu_profiles(self) -> dict[str, EngineProfile]:
        out = {}
        for t in {d.type for d in self.inv.devices if d.kind == "cpu"}:
            path, dt = self.inv.profile_path(t), self.inv.device_type(t)
            profiles = [p for p in load_profiles(path) if p.device_kind == "cpu"] if path and path.exists() else []
            if dt.device_type:
                profiles = [p for p in profiles if p.key.device_type == dt.device_type]
            profiles = [p for p in profiles if p.key.tp == 1 and p.key.pp == 1]
            named = [p for p in profiles if p.key.model in (self.model.name, self.model.served_name)]
            out[t] = (named or profiles or [smollm2_cpu_estimate(self.model.name, t)])[0]
        return out

    def candidates(self, device_type: str, max_devices: int) -> list[tuple[int, int, EngineProfile, PoolTimes]]:
        """(tp, pp, profile, times) of every parallelism whose replica fits ``max_devices`` devices."""
        key = (device_type, max_devices)
        if key in self._candidates:
            return self._candidates[key]
        out = []
        if self.inv.device_type(device_type).kind == "cpu":
            prof = self._cpu_profiles[device_type]
            out.append((1, 1, prof, pool_times(prof, self.wl, prof.max_num_seqs)))
        else:
            gpu = self.inv.gpu(device_type)
            for tp in GPU_TP:
                if self.model.heads % tp or (self.model.kv_heads % tp and tp % self.model.kv_heads):
                    continue
                for pp in GPU_PP:
                    if tp * pp > max_devices or pp > self.model.layers:
                        continue
                    try:
                        prof = estimate_profile(self.model, gpu, tp, pp, self.dtype)
                    except DoesNotFit:
                        continue
                    out.append((tp, pp, prof, pool_times(prof, self.wl, prof.max_num_seqs)))
        self._candidates[key] = out
        return out

    def price(self, device_type: str) -> float:
        return self.inv.price_per_hour(device_type)

    def prefill_rank(self, device_type: str) -> float:
        """Compute per unit of memory bandwidth: high = a prefill device (initial phases)."""
        if self.inv.device_type(device_type).kind == "cpu":
            return 0.0
        g = self.inv.gpu(device_type)
        return g.dense_tflops / g.memory_bw_gbs

    # --- lower level -------------------------------------------------------------------------------
    def lower(self, group: Group) -> PoolPlan | None:
        """The group's pool: TP/PP and replicas (replicas stay within a node), or None when no replica fits."""
        devs = [self.inv.devices[i] for i in group.devices]
        per_node: dict[str, list[int]] = {}
        for d in sorted(devs, key=lambda d: (d.node, d.id)):
            per_node.setdefault(d.node, []).append(d.id)
        dtype = devs[0].type
        key = (group.phase, dtype, tuple((n, len(ids)) for n, ids in per_node.items()))
        if key in self._lower:
            cached = self._lower[key]
            return cached if cached is None else self._with_devices(cached, per_node)
        longest_prompt = float(self._prompt_q.max())
        out_tokens = float(self.wl.output_quantiles().mean())
        best, best_key = None, None
        for tp, pp, prof, times in self.candidates(dtype, max(len(ids) for ids in per_node.values())):
            d = tp * pp
            replicas = sum(len(ids) // d for ids in per_node.values())
            if replicas == 0 or prof.kv_capacity_tokens < longest_prompt:
                continue
            if group.phase == PREFILL:
                p90 = float(times.prefill_q_s[int(0.9 * (len(times.prefill_q_s) - 1))])
                meets = p90 <= self.slo.ttft_s * PREFILL_LATENCY_SHARE
                rank = (meets, replicas / times.prefill_mean_s if meets else -times.prefill_mean_s, -d)
            else:
                rank = (replicas * times.decode_capacity_rps(out_tokens, self.slo.tpot_s), -d)
            if best_key is None or rank > best_key:
                best_key, best = rank, (tp, pp, prof, times, replicas)
        if best is None:
            self._lower[key] = None
            return None
        tp, pp, prof, times, replicas = best
        max_seqs = min(prof.max_num_seqs, PREFILL_MAX_NUM_SEQS) if group.phase == PREFILL else times.n_max
        plan = PoolPlan(
            name="",
            phase=group.phase,
            device_type=dtype,
            kind=devs[0].kind,
            tp=tp,
            pp=pp,
            replicas=replicas,
            devices=(),
            replica_nodes=(),
            profile=prof,
            times=times,
            price_per_replica=self.price(dtype) * tp * pp,
            max_num_seqs=max_seqs,
        )
        self._lower[key] = plan
        return self._with_devices(plan, per_node)

    @staticmethod
    def _with_devices(plan: PoolPlan, per_node: dict[str, list[int]]) -> PoolPlan:
        d = plan.devices_per_replica
        used, nodes = [], []
        for node, ids in per_node.items():
            n = len(ids) // d
            used += ids[: n * d]
            nodes += [node] * n
        return PoolPlan(**{**plan.__dict__, "devices": tuple(used), "replica_nodes": tuple(nodes)})

    def pool_link(self, a: PoolPlan, b: PoolPlan) -> Link:
        """The slowest link between any replica of ``a`` and any of ``b`` (replicas are placed by Ray)."""
        specs = [
            self.inv.link(self.inv.devices[x], self.inv.devices[y])
            for x in sorted({a.devices[i * a.devices_per_replica] for i in range(a.replicas)})
            for y in sorted({b.devices[i * b.devices_per_replica] for i in range(b.replicas)})
        ]
        bw = min(s.bandwidth_gbps for s in specs)
        return Link(bandwidth_gbps=bw, latency_s=max(s.latency_us for s in specs) * 1e-6)

    def route(self, prefill: list[PoolPlan], decode: list[PoolPlan], kv_bytes: float) -> list[Flow]:
        """Prefill -> decode flows: each prefill pool sends its share (by service rate) and each decode pool
        takes its share (by capacity at the TPOT SLO); pairs with the quickest handoff are filled first."""
        if not prefill:
            return []
        mu = np.array([p.replicas / p.times.prefill_mean_s for p in prefill])
        supply = list(mu / mu.sum())
        demand = list(decode_shares([p.load() for p in decode], self.wl, self.slo))
        links = {(i, j): self.pool_link(p, d) for i, p in enumerate(prefill) for j, d in enumerate(decode)}
        flows = []
        for (i, j), link in sorted(links.items(), key=lambda kv: (kv[1].transfer_s(int(kv_bytes)), kv[0])):
            share = min(supply[i], demand[j])
            if share > 1e-12:
                flows.append(Flow(i, j, share, link))
                supply[i] -= share
                demand[j] -= share
        return flows

    def build(self, solution: Solution) -> BuiltPlan:
        if solution in self._built:
            return self._built[solution]
        pools, idle, counts = [], [], {}
        for g in solution:
            p = self.lower(g)
            if p is None or p.replicas == 0:
                idle += g.devices
                continue
            idle += sorted(set(g.devices) - set(p.devices))
            base = f"{p.phase}-{_slug(p.device_type)}"
            counts[base] = counts.get(base, 0) + 1
            pools.append(PoolPlan(**{**p.__dict__, "name": f"{base}-{counts[base] - 1}"}))
        prefill = [p for p in pools if p.phase == PREFILL]
        decode = [p for p in pools if p.phase == DECODE]
        first = (prefill + decode)[0].profile if pools else None
        kv_per_token = first.kv_bytes_per_token if first else 0
        dtype_bytes = DTYPE_BYTES.get(first.key.dtype, 2) if first else 2
        mean_kv = float(self._prompt_q.mean()) * kv_per_token
        flows = self.route(prefill, decode, mean_kv) if decode else []
        compression = "none"
        if flows:
            for c in COMPRESSIONS:
                compression = c
                mean_handoff = sum(
                    f.share * f.link.transfer_s(int(mean_kv * wire_ratio(c, dtype_bytes))) for f in flows
                )
                if mean_handoff <= HANDOFF_BUDGET * self.slo.ttft_s:
                    break
        kv_q = self._prompt_q * kv_per_token * wire_ratio(compression, dtype_bytes)
        est = estimate([p.load() for p in prefill], [p.load() for p in decode], flows, kv_q, self.wl, self.slo)
        built = BuiltPlan(solution, tuple(prefill + decode), tuple(flows), compression, est, tuple(sorted(idle)))
        self._built[solution] = built
        return built

    def score(self, solution: Solution) -> float:
        return self.build(solution).estimate.goodput_per_dollar

    # --- baselines -------------------------------------------------------------------------------
    def colocated_baseline(self) -> Solution:
        """Every cluster of the initial grouping colocated (decode pools that prefill their own prompts)."""
        return canonical([Group(c, DECODE) for c in cluster_devices(self.inv)])

    def even_split_baseline(self) -> Solution:
        """Every node's devices of each type halved: one half prefill, the other decode (a lone device
        alternates between the phases across nodes)."""
        groups, lone = [], 0
        for c in cluster_devices(self.inv):
            by_node: dict[str, list[int]] = {}
            for i in c:
                by_node.setdefault(self.inv.devices[i].node, []).append(i)
            for ids in by_node.values():
                if len(ids) == 1:
                    groups.append(Group(tuple(ids), PREFILL if lone % 2 else DECODE))
                    lone += 1
                    continue
                half = len(ids) // 2
                groups += [Group(tuple(ids[:half]), PREFILL), Group(tuple(ids[half:]), DECODE)]
        return canonical(groups)

    # --- outputs ---------------------------------------------------------------------------------
    def sim_cluster(self, built: BuiltPlan) -> SimCluster:
        """The plan as the simulator's cluster."""
        links = {}
        for f in built.flows:
            links[(built.prefill_pools[f.prefill].name, built.decode_pools[f.decode].name)] = f.link
        return SimCluster(
            pools=tuple(
                SimPool(
                    name=p.name,
                    role=p.phase,
                    replicas=p.replicas,
                    profile=p.profile,
                    price_per_hour=p.price_per_replica,
                    devices_per_replica=p.devices_per_replica,
                    node=p.replica_nodes[0],
                )
                for p in built.pools
            ),
            router=RouterConfig(slo=self.slo),
            block_size=BLOCK_SIZE,
            links=links,
            kv_compression=None if built.compression == "none" else built.compression,
        )

    def max_model_len(self) -> int:
        need = float(self._prompt_q.max() + self.wl.output_quantiles().max())
        return int(min(self.model.max_model_len, max(2048, 2 ** math.ceil(math.log2(need)))))

    def config(self, built: BuiltPlan) -> dict:
        """The pdserve config mapping of a plan (serve/config.py ClusterConfig validates it)."""
        pools = []
        for p in built.pools:
            engine = {"block_size": BLOCK_SIZE, "max_num_seqs": int(p.max_num_seqs)}
            if p.kind == "gpu":
                device = {"kind": "gpu", "gpu_type": self.inv.gpu(p.device_type).ray_accelerator_type}
                device["count"] = p.devices_per_replica
                engine |= {"tensor_parallel_size": p.tp, "pipeline_parallel_size": p.pp}
            else:
                cores = [str(self.inv.devices[i].local_index) for i in p.devices]
                device = {"kind": "cpu", "cpu_cores": cores[0] if len(cores) == 1 else cores}
            pools.append({"name": p.name, "role": p.phase, "replicas": p.replicas, "device": device, "engine": engine})
        cfg = {
            "model": {
                "name": self.model.served_name or self.model.name,
                "path": self.model.path or self.model.name,
                "max_model_len": self.max_model_len(),
            },
            "router": {"policy": "slo-aware", "slo": {"ttft_ms": self.slo.ttft_ms, "tpot_ms": self.slo.tpot_ms}},
            "pools": pools,
        }
        if built.compression != "none":
            cfg["kv_handoff"] = {"backend": "slab", "slab": {"compression": built.compression}}
        if len({n for p in built.pools for n in p.replica_nodes}) > 1:
            cfg["ray"] = {"address": "auto"}
        return cfg


def estimate_kind(built: BuiltPlan) -> str:
    """How a plan's timings were obtained, for every output that shows its figures."""
    sources = {p.profile.source for p in built.pools}
    if ROOFLINE in sources:
        return "estimate (roofline)"
    if sources - {MEASURED}:
        return "estimate (" + ", ".join(sorted(sources - {MEASURED})) + ")"
    return "estimate from measured profiles"


@dataclass
class PlanResult:
    planner: Planner
    plan: BuiltPlan
    colocated: BuiltPlan
    even_split: BuiltPlan
    iterations: int
    evaluations: int
    elapsed_s: float
    confirmed: dict[str, float] = field(default_factory=dict)  # "plan" / baseline name -> confirm() score

    @property
    def config(self) -> dict:
        return self.planner.config(self.plan)

    def summary(self) -> dict:
        p = self.planner
        rows = {"plan": self.plan, "colocated": self.colocated, "even-split": self.even_split}

        def describe(b: BuiltPlan) -> dict:
            return {
                **b.estimate.to_dict(),
                "compression": b.compression,
                "pools": [
                    {
                        "name": x.name,
                        "phase": x.phase,
                        "device_type": x.device_type,
                        "tp": x.tp,
                        "pp": x.pp,
                        "replicas": x.replicas,
                        "devices": len(x.devices),
                        "nodes": sorted(set(x.replica_nodes)),
                        "cost_per_hour": round(x.price_per_replica * x.replicas, 4),
                        "profile_source": x.profile.source,
                    }
                    for x in b.pools
                ],
                "idle_devices": len(b.idle_devices),
            }

        base = self.plan.estimate.goodput_per_dollar
        return {
            "inventory": p.inv.spec.name,
            "model": p.model.name,
            "workload": p.wl.model_dump(exclude={"trace"}),
            "slo": p.slo.model_dump(),
            "estimate_kind": estimate_kind(self.plan),
            "search": {
                "iterations": self.iterations,
                "evaluations": self.evaluations,
                "elapsed_s": round(self.elapsed_s, 2),
                "seed": p.search.seed,
                "tenure": p.search.tenure,
            },
            "results": {k: describe(v) for k, v in rows.items()},
            "ratios": {
                f"plan/{k}": round(float(base / v.estimate.goodput_per_dollar), 3)
                if v.estimate.goodput_per_dollar
                else None
                for k, v in rows.items()
                if k != "plan"
            },
            "confirmed": self.confirmed,
        }

    def report(self) -> str:
        s = self.summary()
        lines = [
            f"# pdserve plan: {s['inventory']} / {s['model']}",
            "",
            f"Workload: {self.planner.wl.rate:g} req/s; SLO TTFT {s['slo']['ttft_ms']:g} ms, "
            f"TPOT {s['slo']['tpot_ms']:g} ms. Figures: {s['estimate_kind']}, analytic queueing model.",
            f"Search: {s['search']['iterations']} tabu iterations, {s['search']['evaluations']} plans scored in "
            f"{s['search']['elapsed_s']} s (seed {s['search']['seed']}).",
            "",
        ]
        for name, r in s["results"].items():
            lines += [
                f"## {name}",
                "",
                f"goodput {r['goodput_rps']:.3f} req/s of {r['offered_rps']:g} offered (admitted "
                f"{r['admitted_rps']:.3f}; TTFT attainment {r['ttft_attainment']:.3f}, "
                f"TPOT {r['tpot_attainment']:.3f}), "
                f"cost {r['cost_per_hour']:.2f} USD/h, {r['goodput_per_dollar']:.1f} SLO-meeting requests per USD; "
                f"KV wire compression {r['compression']}; idle devices {r['idle_devices']}",
                "",
                "| pool | phase | device | TP | PP | replicas | devices | nodes | USD/h | profile |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for x in r["pools"]:
                lines.append(
                    f"| {x['name']} | {x['phase']} | {x['device_type']} | {x['tp']} | {x['pp']} | {x['replicas']} | "
                    f"{x['devices']} | {','.join(x['nodes'])} | {x['cost_per_hour']:.2f} | {x['profile_source']} |"
                )
            lines.append("")
        lines.append("Ratios of goodput per dollar: " + ", ".join(f"{k} {v}" for k, v in s["ratios"].items()))
        if s["confirmed"]:
            lines.append("Confirmed (simulator): " + json.dumps(s["confirmed"]))
        return "\n".join(lines) + "\n"


def consolidate(planner: Planner, solution: Solution) -> Solution:
    """Merge groups of one device type and phase while the score does not drop (fewer, larger pools
    for the same estimate: the search leaves equivalent fragments behind)."""
    current, score = solution, planner.score(solution)
    for _ in range(len(solution)):
        merged = None
        for i, a in enumerate(current):
            for b in current[i + 1 :]:
                same = planner.inv.devices[a.devices[0]].type == planner.inv.devices[b.devices[0]].type
                if same and a.phase == b.phase:
                    cand = canonical([g for g in current if g not in (a, b)] + [Group(a.devices + b.devices, a.phase)])
                    if planner.score(cand) >= score * (1 - 1e-6):  # equal up to rounding
                        merged = cand
                        break
            if merged:
                break
        if merged is None:
            break
        current, score = merged, planner.score(merged)
    return current


def simulated_goodput_per_dollar(workload: Workload, requests: int, seed: int = 0) -> Callable[[SimCluster], float]:
    """A ``confirm`` scorer: SLO-meeting requests per USD of a plan as the simulator (capacity/simulator.py)
    serves ``requests`` of ``workload`` at its rate, with the plan's router placing and admitting them."""

    def score(cluster: SimCluster) -> float:
        res = simulate(cluster, workload, workload.rate, requests, seed)
        return res.goodput_rps * 3600.0 / cluster.price_per_hour if cluster.price_per_hour else 0.0

    return score


def plan(
    inv: Inventory,
    model: ModelSpec,
    workload: Workload,
    slo: SloConfig,
    search: SearchConfig = DEFAULT_SEARCH,
    dtype: str = "bfloat16",
    confirm: Callable[[SimCluster], float] | None = None,
    top_k: int = TOP_K_CONFIRM,
) -> PlanResult:
    """Search the inventory's plans; with ``confirm``, the best ``top_k`` by the estimate and both baselines are
    re-scored by it and the best by ``confirm`` wins (a baseline may: the estimate can rank plans wrongly)."""
    t0 = time.perf_counter()
    planner = Planner(inv, model, workload, slo, dtype, search)
    initial = initial_solution(inv, planner.prefill_rank)
    result = tabu_search(inv, initial, planner.score, search)
    chosen = planner.build(consolidate(planner, result.best))
    colocated = planner.build(planner.colocated_baseline())
    even = planner.build(planner.even_split_baseline())
    confirmed: dict[str, float] = {}
    if confirm is not None:
        top = [consolidate(planner, s) for _, s in result.ranked[:top_k]]
        scores = {s: confirm(planner.sim_cluster(planner.build(s))) for s in top}
        for base in (colocated, even):
            if base.solution not in scores:
                scores[base.solution] = confirm(planner.sim_cluster(base))
        order = [*top, colocated.solution, even.solution]
        chosen = planner.build(max(scores, key=lambda s: (scores[s], -order.index(s))))
        confirmed = {
            "plan": scores[chosen.solution],
            "colocated": scores[colocated.solution],
            "even-split": scores[even.solution],
        }
    return PlanResult(
        planner, chosen, colocated, even, result.iterations, result.evaluations, time.perf_counter() - t0, confirmed
    )
