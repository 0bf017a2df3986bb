"""Discrete-event simulation of a ``SimCluster`` serving a workload, with the real router deciding.

Events (a heap on simulated time): arrivals, engine steps, KV handoffs landing, stats polls. What each
part does, and how it follows what the served cluster does:

- **Routing.** ``router.pipeline.build_policy(cluster.router, block_size)`` routes every arrival on a
  ``PoolSnapshot`` of ``EndpointState``s: the engines' load as of their last stats poll (every
  ``router.stats_period_s``) plus the router's own reservations (requests in flight per replica,
  uncached prefill tokens queued on the replica that prefills, released when its prefill returns or
  its first token arrives), as serve/orchestrator.py keeps them. Its hooks are fed as the orchestrator
  feeds them: ``on_routed`` at routing, ``on_first_token`` / ``on_finish`` with observed TTFT / TPOT,
  ``on_stats`` at each poll with the engines' prefill and decode samples. Prompts carry
  ``router.hashing.block_keys`` of their synthetic token ids, and engines evicting cached blocks
  remove them from the prefix index (KV cache events).
- **Prefill replicas.** FCFS queue; each step takes up to the engine's token budget
  (``max_num_batched_tokens``, vLLM's chunked prefill) from the queue head and lasts
  ``prefill_s(step tokens)``. A prompt's cached prefix (the engine's LRU prefix cache of full blocks)
  is not computed.
- **KV handoff.** A finished remote prefill's KV crosses the pools' ``Link`` (bytes x
  ``kvtransfer.wire.wire_byte_ratio`` of the cluster's compression), plus the receiving engine's
  profiled handoff time for those bytes; then the request waits on its decode replica.
- **Decode replicas.** Continuous batching: every step gives each running request one token; waiting
  requests join (FCFS, up to ``max_num_seqs``) while the KV cache has the blocks for their context;
  a running request that cannot grow preempts the latest joined one, which recomputes later (vLLM's
  recompute preemption). A handed-off request's KV loads during the first step it is scheduled in
  (vLLM's asynchronous KV load: the request waits for remote KV); its first token comes from the
  next. A request prefilled locally is computed in chunks from the step budget left after the decode
  tokens, interleaved with the decode steps. Step time: ``decode_step_s(batch, mean context)`` plus
  the prefill chunk's marginal time.

- **Serving path.** The decode pool's profile's ``serving`` term (``ServingOverhead``: ingress, Ray
  Serve calls, handoff control messages, SSE streaming, measured against a running cluster) is added
  to what a client sees: ``ttft_s`` to every first token, ``tpot_s`` to every later token's gap. It
  delays the stream, not the engines: the engine steps and the router's load view are as above; the
  router's TTFT / TPOT observations include it (the orchestrator sits behind the ingress).
- **Serving processes' CPU.** Where the serving processes share an engine's cores (a pool's
  ``serving_core_share`` > 0), they take ``u = token rate x serving.cpu_per_token_s x share`` of its core
  time (the cluster's streamed tokens per second over the last stats period): its steps last
  ``1 / (1 - u)`` times their profiled time (u at most ``MAX_SERVING_CPU_SHARE``).

Not modelled: engine failures and retries, prefill-side KV limits, QoS tiers (every request is the
default tier), network contention between concurrent handoffs.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache

import numpy as np

from capacity.cluster import SimCluster, SimPool
from capacity.profile import EngineProfile, ServingOverhead
from capacity.workload import SimRequest, Workload
from kvtransfer.wire import wire_byte_ratio
from router.admission import engine_priority
from router.hashing import block_keys
from router.pipeline import build_policy
from router.types import EndpointState, PoolSnapshot, Rejection, RequestDescriptor, Role, RoutingDecision

DEFAULT_BUDGET_TOKENS = 2048  # vLLM's max_num_batched_tokens default with chunked prefill
MAX_SAMPLES = 256  # prefill samples a replica hands over per stats poll (workers/stats.py)
CONTEXT_BUCKET_TOKENS = 256  # decode steps are averaged per (batch, context // this) (workers/stats.py)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}

MAX_SERVING_CPU_SHARE = 0.9  # the serving processes never take a shared core entirely from its engine

_ARRIVE, _STEP, _HANDOFF, _POLL = 0, 1, 2, 3


@dataclass(frozen=True)
class Percentiles:
    p50: float | None
    p90: float | None
    p99: float | None
    mean: float | None
    n: int

    @classmethod
    def of(cls, values) -> Percentiles:
        v = np.asarray(values, dtype=float)
        if v.size == 0:
            return cls(None, None, None, None, 0)
        p50, p90, p99 = np.percentile(v, [50, 90, 99]).tolist()  # linear, as loadtests/stats.py
        return cls(p50, p90, p99, float(v.mean()), int(v.size))


@dataclass(frozen=True)
class SimResult:
    requests: int
    completed: int
    refused: dict[str, int]  # rejection reason -> requests
    duration_s: float  # start to the last finish
    ttft_s: Percentiles
    tpot_s: Percentiles
    itl_s: Percentiles
    throughput_rps: float
    output_tokens_per_s: float
    goodput_rps: float  # requests per second that completed within both SLOs
    slo_attainment: float  # share of all requests (refused ones count as misses) within both SLOs
    cost_per_hour: float
    cost_per_million_output_tokens: float | None
    prefix_hit_tokens: int  # prompt tokens served from engines' prefix caches
    prompt_tokens: int
    local_prefills: int
    remote_prefills: int
    preemptions: int
    mean_in_system: float  # time-averaged requests in the system (admitted, not finished)
    mean_latency_s: float  # mean arrival-to-finish of completed requests
    estimated: bool  # some profile is an estimate (roofline), not a measurement

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a terminal."""

        def ms(p: Percentiles) -> str:
            return "/".join("-" if v is None else f"{v * 1e3:.0f}" for v in (p.p50, p.p90, p.p99))

        per_m = self.cost_per_million_output_tokens
        lines = [
            f"requests {self.requests}: completed {self.completed}, refused {sum(self.refused.values())}"
            + (f" {self.refused}" if self.refused else ""),
            f"TTFT p50/p90/p99 ms {ms(self.ttft_s)}   TPOT {ms(self.tpot_s)}   ITL {ms(self.itl_s)}",
            f"throughput {self.throughput_rps:.2f} req/s, {self.output_tokens_per_s:.1f} output tok/s; "
            f"goodput {self.goodput_rps:.2f} req/s; SLO attainment {self.slo_attainment:.1%}",
            f"prefills local {self.local_prefills} / remote {self.remote_prefills}; prefix-cache hits "
            f"{self.prefix_hit_tokens}/{self.prompt_tokens} prompt tokens; preemptions {self.preemptions}",
            f"cost {self.cost_per_hour:.2f}/h"
            + (f", {per_m:.3f} per million output tokens" if per_m is not None else ""),
        ]
        if self.estimated:
            lines.append("(some profiles are roofline estimates, not measurements)")
        return "\n".join(lines)


class _Req:
    __slots__ = (
        "id",
        "spec",
        "desc",
        "decision",
        "max_new",
        "generated",
        "context",
        "blocks",
        "prefill_left",
        "uncached",
        "prefill_start_s",
        "first_s",
        "last_s",
        "finish_s",
        "release",
        "decode_engine",
        "loading",
    )

    def __init__(self, i: int, spec: SimRequest, desc: RequestDescriptor) -> None:
        self.id, self.spec, self.desc = i, spec, desc
        self.decision: RoutingDecision | None = None
        self.max_new = spec.max_new_tokens
        self.generated = 0
        self.context = 0  # KV tokens it holds on its decode engine
        self.blocks = 0
        self.prefill_left = 0  # uncached tokens still to compute locally (0: decoding)
        self.uncached = 0  # tokens its latest prefill computes
        self.prefill_start_s = 0.0
        self.first_s: float | None = None
        self.last_s = 0.0
        self.finish_s: float | None = None
        self.release = 0  # router-reserved prefill tokens not yet released
        self.decode_engine: _Engine | None = None
        self.loading = False  # its handed-off KV loads into the decode engine during its first step there


@cache
def _step_table(profile: EngineProfile):
    """decode_step_s and prefill_s memoised per profile (batch, 16-token context buckets)."""

    @lru_cache(maxsize=65536)
    def decode(batch: int, ctx_bucket: int) -> float:
        return profile.decode_step_s(batch, ctx_bucket * 16)

    @lru_cache(maxsize=65536)
    def prefill(tokens: int) -> float:
        return profile.prefill_s(tokens)

    return decode, prefill


class _Engine:
    def __init__(self, sim: Simulation, pool: SimPool, index: int, budget_tokens: int) -> None:
        self.sim = sim
        self.pool = pool
        self.id = f"{pool.name}-{index}"
        self.role = Role.DECODE if pool.role == "decode" else Role.PREFILL
        p = pool.profile
        self.bs = sim.bs
        self.capacity_blocks = max(1, p.kv_capacity_tokens // self.bs)
        self.max_num_seqs = p.max_num_seqs
        self.budget = budget_tokens
        self.decode_s, self.prefill_s = _step_table(p)
        self.cache: OrderedDict[int, None] = OrderedDict()  # prefix cache: block key -> (LRU order)
        self.prefill_q: deque[_Req] = deque()  # prefill replica: FCFS
        self.waiting: deque[_Req] = deque()  # decode replica: waiting to join the batch
        self.running: list[_Req] = []
        self.used_blocks = 0
        self.busy = False
        self.in_flight = 0
        self.queued_tokens = 0
        self.polled = (0, 0, 0.0)  # (running, waiting, kv usage) at the last poll
        self.prefill_samples: list[tuple[int, float]] = []
        # per (batch, context bucket): [seconds summed, context summed, steps], as workers/stats.py
        self.decode_steps: dict[tuple[int, int], list] = {}
        self._state: EndpointState | None = None

    # router view -------------------------------------------------------------------------------
    def state(self) -> EndpointState:
        if self._state is None:
            r, w, kv = self.polled
            self._state = EndpointState(
                endpoint_id=self.id,
                pool=self.pool.name,
                role=self.role,
                healthy=True,
                num_running=r,
                num_waiting=w,
                kv_usage=kv,
                kv_capacity_tokens=self.capacity_blocks * self.bs,
                in_flight=self.in_flight,
                queued_prefill_tokens=self.queued_tokens,
                queued_prefill_by_priority=((self.sim.priority, self.queued_tokens),) if self.queued_tokens else (),
                updated_s=self.sim.now,
            )
        return self._state

    def poll(self) -> None:
        waiting = len(self.prefill_q) + len(self.waiting)
        self.polled = (len(self.running), waiting, self.used_blocks / self.capacity_blocks)
        self._state = None

    def dirty(self) -> None:
        self._state = None

    # prefix cache --------------------------------------------------------------------------------
    def cached_blocks(self, keys: tuple[int, ...], prompt_tokens: int) -> int:
        """Leading blocks of ``keys`` in the cache (at most (prompt - 1) // block_size: the last token
        is always computed); touches them."""
        n, cap = 0, (prompt_tokens - 1) // self.bs
        cache = self.cache
        for k in keys[:cap]:
            if k not in cache:
                break
            cache.move_to_end(k)
            n += 1
        return n

    def store(self, keys: tuple[int, ...]) -> None:
        cache = self.cache
        for k in keys:
            if k in cache:
                cache.move_to_end(k)
            else:
                cache[k] = None
        over = len(cache) - self.capacity_blocks
        if over > 0:
            gone = [cache.popitem(last=False)[0] for _ in range(over)]
            if self.sim.index is not None:
                self.sim.index.remove(self.id, gone)

    # steps ---------------------------------------------------------------------------------------
    def kick(self) -> None:
        if self.busy:
            return
        plan = self._plan_prefill() if self.role is Role.PREFILL else self._plan_decode()
        if plan is None:
            return
        stretch = self.sim.serving_stretch(self.pool)
        if stretch != 1.0:
            plan = (plan[0] * stretch, *plan[1:])
        self.busy = True
        self.sim.push(self.sim.now + plan[0], _STEP, (self, plan))

    def _start_prefill(self, r: _Req) -> None:
        hit = self.cached_blocks(r.desc.block_hashes, r.desc.num_prompt_tokens)
        r.prefill_left = r.uncached = r.desc.num_prompt_tokens - hit * self.bs
        r.prefill_start_s = self.sim.now
        self.sim.hit_tokens += hit * self.bs

    def _plan_prefill(self):
        if not self.prefill_q:
            return None
        budget, chunks = self.budget, []
        for r in self.prefill_q:
            if budget <= 0:
                break
            if r.prefill_start_s < 0:
                self._start_prefill(r)
            take = min(budget, r.prefill_left)
            chunks.append((r, take))
            budget -= take
        tokens = self.budget - budget
        return self.prefill_s(tokens), chunks, (), tokens, ()

    def _plan_decode(self):
        bs = self.bs
        decodes = [r for r in self.running if r.prefill_left == 0 and not r.loading]
        # each decoding request grows by one token; preempt the latest joined while KV runs out
        need = sum(1 for r in decodes if r.context % bs == 0)
        while self.used_blocks + need > self.capacity_blocks and len(self.running) > 1:
            victim = self.running.pop()
            self.used_blocks -= victim.blocks
            if victim.prefill_left == 0 and not victim.loading:
                decodes.remove(victim)
                need -= victim.context % bs == 0
            victim.blocks, victim.context, victim.loading = 0, 0, False
            victim.prefill_start_s = -1.0  # recompute: prompt + what it generated
            self.waiting.appendleft(victim)
            self.sim.preemptions += 1
        budget = self.budget - len(decodes)
        loads = []
        # join waiting requests while a slot, KV and (for a local prefill) budget allow
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            ctx = r.desc.num_prompt_tokens + r.generated
            blocks = -(-ctx // bs)
            if self.used_blocks + need + blocks + (ctx % bs == 0) > self.capacity_blocks:
                break
            if r.prefill_start_s < 0:  # prefills here (locally routed or preempted)
                if budget <= 0:
                    break
                self._start_prefill(r)
                r.prefill_left += r.generated
                r.uncached += r.generated
            self.waiting.popleft()
            r.blocks, r.context = blocks, ctx
            self.used_blocks += blocks
            self.running.append(r)
            if r.loading:
                loads.append(r)
            elif r.prefill_left == 0:
                decodes.append(r)
                budget -= 1
        chunks = []
        for r in self.running:
            if r.prefill_left > 0 and budget > 0:
                take = min(budget, r.prefill_left)
                chunks.append((r, take))
                budget -= take
        if not decodes and not chunks:
            return (0.0, (), (), 0, loads) if loads else None
        prefill_tokens = sum(t for _, t in chunks)
        step_s = 0.0
        if decodes:
            ctx = sum(r.context for r in decodes) // len(decodes)
            step_s = self.decode_s(len(decodes), ctx // 16)
            if prefill_tokens:
                step_s += max(0.0, self.prefill_s(prefill_tokens) - self.prefill_s(1))
        else:
            step_s = self.prefill_s(prefill_tokens)
        return step_s, chunks, decodes, prefill_tokens, loads

    def step_done(self, plan) -> None:
        step_s, chunks, decodes, _, loads = plan
        for r in loads:
            r.loading = False
        sim, now = self.sim, self.sim.now
        self.busy = False
        if self.role is Role.PREFILL:
            for r, take in chunks:
                r.prefill_left -= take
                if r.prefill_left == 0:
                    self.prefill_q.popleft()
                    self.store(r.desc.block_hashes)
                    self.prefill_samples.append((r.uncached, now - r.prefill_start_s))
                    sim.prefill_returned(self, r)
        else:
            if decodes:
                ctx = sum(r.context for r in decodes) // len(decodes)
                acc = self.decode_steps.get((len(decodes), ctx // CONTEXT_BUCKET_TOKENS))
                if acc is None:
                    acc = self.decode_steps[(len(decodes), ctx // CONTEXT_BUCKET_TOKENS)] = [0.0, 0, 0]
                acc[0] += step_s
                acc[1] += ctx
                acc[2] += 1
            bs = self.bs
            for r in decodes:
                if r.context % bs == 0:
                    r.blocks += 1
                    self.used_blocks += 1
                r.context += 1
                sim.token(r, now)
            for r, take in chunks:
                r.prefill_left -= take
                if r.prefill_left == 0:
                    self.store(r.desc.block_hashes)
                    self.prefill_samples.append((r.uncached, now - r.prefill_start_s))
                    sim.token(r, now)
            done = [r for r in self.running if r.finish_s is not None]
            if done:
                self.running = [r for r in self.running if r.finish_s is None]
                for r in done:
                    self.used_blocks -= r.blocks
                    r.blocks = 0
        self.kick()


class Simulation:
    def __init__(self, cluster: SimCluster, seed: int) -> None:
        self.cluster = cluster
        self.bs = cluster.block_size
        self.now = 0.0
        self.heap: list = []
        self._seq = 0
        self.policy = build_policy(cluster.router, cluster.block_size, random.Random(seed), clock=lambda: self.now)
        self.index = self.policy.prefix_index
        self.engines: list[_Engine] = []
        for pool in cluster.pools:
            budget = int(pool.profile.meta.get("max_num_batched_tokens") or DEFAULT_BUDGET_TOKENS)
            self.engines += [_Engine(self, pool, i, budget) for i in range(pool.replicas)]
        self.by_id = {e.id: e for e in self.engines}
        tiers = cluster.router.qos_tiers
        default = tiers.get(cluster.router.default_tier)
        # the engine priority every request runs at (the default tier's), as the orchestrator sends it
        self.priority = engine_priority(default.priority) if default is not None else 0
        self.slo_ttft_s = cluster.router.slo.ttft_ms / 1e3
        self.slo_tpot_s = cluster.router.slo.tpot_ms / 1e3
        self.itl: list[float] = []
        self.refused: Counter[str] = Counter()
        self.hit_tokens = 0
        self.preemptions = 0
        self.local = self.remote = 0
        self.outstanding = 0
        self.area = 0.0  # integral of requests in the system over time
        self._area_t = 0.0
        self.requests: list[_Req] = []
        self.serving_cpu_per_token_s = max(p.profile.serving.cpu_per_token_s for p in cluster.pools)
        self.token_rate = 0.0  # tokens streamed per second over the last stats period
        self._tokens = 0  # tokens streamed since the last stats poll
        self._polled_s = 0.0

    def push(self, t: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (t, self._seq, kind, payload))

    def _count(self, delta: int) -> None:
        self.area += self.outstanding * (self.now - self._area_t)
        self._area_t = self.now
        self.outstanding += delta

    def serving_stretch(self, pool: SimPool) -> float:
        """How much longer ``pool``'s engine steps last than profiled while the serving processes take
        CPU on its cores (1.0 where they do not)."""
        if not pool.serving_core_share or not self.serving_cpu_per_token_s:
            return 1.0
        u = self.token_rate * self.serving_cpu_per_token_s * pool.serving_core_share
        return 1.0 / (1.0 - min(u, MAX_SERVING_CPU_SHARE))

    def snapshot(self) -> PoolSnapshot:
        return PoolSnapshot(endpoints=[e.state() for e in self.engines], taken_s=self.now)

    # request flow --------------------------------------------------------------------------------
    def arrive(self, r: _Req) -> None:
        outcome = self.policy.route(r.desc, self.snapshot())
        self.policy.on_routed(r.desc, outcome)
        if isinstance(outcome, Rejection):
            self.refused[outcome.reason] += 1
            return
        self._count(+1)
        r.decision = outcome
        if outcome.max_new_tokens is not None:
            r.max_new = min(r.max_new, outcome.max_new_tokens)
        decode = self.by_id[outcome.decode.endpoint_id]
        r.decode_engine = decode
        target = self.by_id[outcome.prefill.endpoint_id] if outcome.prefill else decode
        r.release = outcome.uncached_tokens
        target.queued_tokens += r.release
        target.in_flight += 1
        target.dirty()
        r.prefill_start_s = -1.0
        if outcome.prefill is None:
            self.local += 1
            decode.waiting.append(r)
        else:
            self.remote += 1
            target.prefill_q.append(r)
        target.kick()

    def _release(self, r: _Req, engine: _Engine) -> None:
        if r.release:
            engine.queued_tokens -= r.release
            r.release = 0
            engine.dirty()

    def prefill_returned(self, prefill: _Engine, r: _Req) -> None:
        """A remote prefill finished: its reservation goes, its KV crosses to the decode replica."""
        self._release(r, prefill)
        prefill.in_flight -= 1
        prefill.dirty()
        decode = r.decode_engine
        decode.in_flight += 1
        decode.dirty()
        c = self.cluster
        raw = r.desc.num_prompt_tokens * decode.pool.profile.kv_bytes_per_token
        dtype_bytes = DTYPE_BYTES.get(decode.pool.profile.key.dtype, 2)
        wire = int(raw * wire_byte_ratio(c.kv_compression, dtype_bytes))
        t = c.link(prefill.pool.name, decode.pool.name).transfer_s(wire) + decode.pool.profile.handoff_s(wire)
        self.push(self.now + t, _HANDOFF, r)

    def handoff_done(self, r: _Req) -> None:
        e = r.decode_engine
        e.store(r.desc.block_hashes)  # received blocks are cached on the decode engine too
        r.prefill_start_s = 0.0  # its KV is here: it joins as a decode, after a step that loads it
        r.prefill_left = 0
        r.loading = True
        e.waiting.append(r)
        e.kick()

    def token(self, r: _Req, now: float) -> None:
        r.generated += 1
        self._tokens += 1
        serving = r.decode_engine.pool.profile.serving
        if r.first_s is None:
            r.first_s = now
            self._release(r, r.decode_engine)  # a local prefill's reservation (a remote one's is gone)
            self.policy.on_first_token(r.decision, now - r.desc.arrival_s + serving.ttft_s)
        else:
            self.itl.append(now - r.last_s + serving.tpot_s)
        r.last_s = now
        if r.generated >= r.max_new:
            r.finish_s = now
            tpot = (now - r.first_s) / (r.generated - 1) + serving.tpot_s if r.generated > 1 else None
            self.policy.on_finish(r.decision, tpot)
            e = r.decode_engine
            e.in_flight -= 1
            e.dirty()
            self._count(-1)

    def poll(self) -> None:
        """Every replica's stats poll: its load for the snapshots, its drained timing samples for the
        policy (the prefill samples of the period, at most ``MAX_SAMPLES``; the decode steps averaged
        per (batch, context bucket), as workers/stats.py drains them). The period's streamed-token rate
        is taken here too."""
        if self.now > self._polled_s:
            self.token_rate = self._tokens / (self.now - self._polled_s)
            self._tokens, self._polled_s = 0, self.now
        for e in self.engines:
            e.poll()
            if e.prefill_samples or e.decode_steps:
                decode = [(b, int(a[1] / a[2]), a[0] / a[2]) for (b, _), a in sorted(e.decode_steps.items())]
                self.policy.on_stats(_Samples(e.pool.name, e.prefill_samples[-MAX_SAMPLES:], decode))
                e.prefill_samples, e.decode_steps = [], {}

    def warm_up(self) -> None:
        """What the router's start-up warm-up (``router.admission.warmup_prompt_tokens``) gives its cost
        models: one prefill sample per warm-up size and a batch-1 decode step, per pool."""
        sizes = self.cluster.router.admission.warmup_prompt_tokens
        if not sizes:
            return
        for pool in self.cluster.pools:
            p = pool.profile
            prefill = [(n, p.prefill_s(n)) for n in sizes]
            decode = [(1, n, p.decode_step_s(1, n)) for n in sizes] if pool.role == "decode" else []
            self.policy.on_stats(_Samples(pool.name, prefill, decode))

    def run_requests(self, specs: list[SimRequest]) -> None:
        """Serve ``specs`` until the last one ends."""
        tier, model = self.cluster.router.default_tier, self.cluster.pools[0].profile.key.model
        hashes: dict[tuple[int, ...], tuple[int, ...]] = {}
        self.requests = []
        for i, s in enumerate(specs):
            keys = hashes.get(s.prompt_token_ids)
            if keys is None:
                keys = hashes[s.prompt_token_ids] = block_keys(s.prompt_token_ids, self.bs)
            desc = RequestDescriptor(f"sim-{i}", model, s.prompt_tokens, s.max_new_tokens, tier, s.arrival_s, keys)
            self.requests.append(_Req(i, s, desc))
        self.warm_up()
        self._run(self.requests, self.cluster.router.stats_period_s)

    def result(self) -> SimResult:
        return _result(self, self.requests, self.cluster)

    def _run(self, reqs: list[_Req], period_s: float) -> None:
        for r in reqs:
            self.push(r.desc.arrival_s, _ARRIVE, r)
        self.push(0.0, _POLL, None)
        left = len(reqs)
        heap = self.heap
        while heap:
            t, _, kind, payload = heapq.heappop(heap)
            self.now = t
            if kind == _STEP:
                engine, plan = payload
                engine.step_done(plan)
            elif kind == _ARRIVE:
                left -= 1
                self.arrive(payload)
            elif kind == _HANDOFF:
                self.handoff_done(payload)
            elif kind == _POLL:
                self.poll()
                if left or self.outstanding:
                    self.push(t + period_s, _POLL, None)
        self._count(0)


@dataclass
class _Samples:
    pool: str
    prefill_samples: list = field(default_factory=list)
    decode_samples: list = field(default_factory=list)


def simulate(cluster: SimCluster, workload: Workload, rate: float, n_requests: int, seed: int) -> SimResult:
    """Simulate ``n_requests`` of ``workload`` arriving at ``rate`` req/s on ``cluster`` (seeded:
    the same arguments give the same result)."""
    sim = Simulation(cluster, seed)
    sim.run_requests(workload.requests(rate, n_requests, seed))
    return sim.result()


def _client_view(r: _Req) -> tuple[float, float | None, float]:
    """A finished request's TTFT, TPOT (None for one token) and finish time as its client sees them: the
    engines' times plus the serving path's ``ServingOverhead`` of its decode pool."""
    serving = r.decode_engine.pool.profile.serving
    n = r.generated - 1
    ttft = r.first_s - r.desc.arrival_s + serving.ttft_s
    tpot = (r.finish_s - r.first_s) / n + serving.tpot_s if n > 0 else None
    return ttft, tpot, r.finish_s + serving.ttft_s + n * serving.tpot_s


def unloaded_request_s(cluster: SimCluster, prompt_tokens: int, max_new_tokens: int) -> tuple[float, float | None]:
    """TTFT and TPOT of one request alone on ``cluster`` (distinct prompt tokens: no prefix-cache hit),
    from the engines' profiles only (every pool's serving term zeroed): what the serving path's
    measurement (serve/serving_profile.py) subtracts from a running cluster's figures."""
    none = ServingOverhead()
    bare = dataclasses.replace(
        cluster,
        pools=tuple(
            dataclasses.replace(p, profile=dataclasses.replace(p.profile, serving=none)) for p in cluster.pools
        ),
    )
    sim = Simulation(bare, seed=0)
    sim.run_requests([SimRequest(0.0, tuple(range(1, prompt_tokens + 1)), max_new_tokens)])
    res = sim.result()
    return res.ttft_s.p50, res.tpot_s.p50


def _result(sim: Simulation, reqs: list[_Req], cluster: SimCluster) -> SimResult:
    done = [r for r in reqs if r.finish_s is not None]
    seen = {r.id: _client_view(r) for r in done}  # (TTFT, TPOT or None, finish) as the client sees them
    # from the start (arrival offsets count from 0) to the last finish, as loadtests.bench times a run
    last = max((v[2] for v in seen.values()), default=0.0)
    duration = max(last, max((r.desc.arrival_s for r in reqs), default=0.0), 1e-9)
    ttft = [v[0] for v in seen.values()]
    tpot = [v[1] for v in seen.values() if v[1] is not None]
    good = sum(1 for v in seen.values() if v[0] <= sim.slo_ttft_s and (v[1] is None or v[1] <= sim.slo_tpot_s))
    out_tokens = sum(r.generated for r in done)
    hours = duration / 3600
    cost_h = cluster.price_per_hour
    return SimResult(
        requests=len(reqs),
        completed=len(done),
        refused=dict(sorted(sim.refused.items())),
        duration_s=duration,
        ttft_s=Percentiles.of(ttft),
        tpot_s=Percentiles.of(tpot),
        itl_s=Percentiles.of(sim.itl),
        throughput_rps=len(done) / duration,
        output_tokens_per_s=out_tokens / duration,
        goodput_rps=good / duration,
        slo_attainment=good / len(reqs) if reqs else math.nan,
        cost_per_hour=cost_h,
        cost_per_million_output_tokens=cost_h * hours / out_tokens * 1e6 if out_tokens else None,
        prefix_hit_tokens=sim.hit_tokens,
        prompt_tokens=sum(r.desc.num_prompt_tokens for r in reqs),
        local_prefills=sim.local,
        remote_prefills=sim.remote,
        preemptions=sim.preemptions,
        mean_in_system=sim.area / duration,
        mean_latency_s=float(np.mean([seen[r.id][2] - r.desc.arrival_s for r in done])) if done else 0.0,
        estimated=any(p.profile.estimated for p in cluster.pools),
    )
