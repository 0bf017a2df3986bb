"""Prometheus metrics of the cluster (the only module that touches prometheus_client).

Request-path metrics are observed at the ingress; engine metrics (queue depth, KV usage, handoff
counters) are exported from the latest ``WorkerStats`` of every replica at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from workers.messages import WorkerStats

_LATENCY_BUCKETS_S = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_HANDOFF_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _PrefixIndexCollector:
    def __init__(self, blocks: Callable[[], Mapping[str, int]], kv_events: Callable[[], int]) -> None:
        self._blocks, self._kv_events = blocks, kv_events

    def collect(self):
        g = GaugeMetricFamily(
            "pdserve_prefix_index_blocks",
            "KV blocks the router's prefix index places on each replica (replicas that are gone are dropped)",
            labels=["endpoint"],
        )
        for endpoint, n in self._blocks().items():
            g.add_metric([endpoint], n)
        yield g
        yield GaugeMetricFamily(
            "pdserve_prefix_index_kv_events",
            "Engine KV cache events applied to the router's prefix index (since start)",
            value=self._kv_events(),
        )


class _WorkerStatsCollector:
    """Exports the cached per-replica WorkerStats as gauges and counters."""

    def __init__(self, source) -> None:
        self._source = source  # callable -> Iterable[WorkerStats]

    def collect(self):
        stats: list[WorkerStats] = list(self._source())
        g_queue = GaugeMetricFamily(
            "pdserve_pool_queue_depth", "Requests waiting in engine queues", labels=["pool", "role"]
        )
        g_running = GaugeMetricFamily(
            "pdserve_pool_running_requests", "Requests running in engines", labels=["pool", "role"]
        )
        g_replicas = GaugeMetricFamily("pdserve_pool_replicas", "Healthy replicas per pool", labels=["pool", "role"])
        g_kv = GaugeMetricFamily(
            "pdserve_engine_kv_usage_ratio", "Fraction of KV blocks in use", labels=["pool", "endpoint"]
        )
        c_prompt = CounterMetricFamily(
            "pdserve_engine_prompt_tokens", "Prompt tokens by source", labels=["pool", "endpoint", "source"]
        )
        c_gen = CounterMetricFamily("pdserve_engine_generation_tokens", "Generated tokens", labels=["pool", "endpoint"])
        c_xfer = CounterMetricFamily("pdserve_kv_handoff_transfers", "KV handoff transfers completed", labels=["pool"])
        c_bytes = CounterMetricFamily(
            "pdserve_kv_handoff_bytes", "KV bytes moved by handoffs (on the wire)", labels=["pool"]
        )
        c_raw = CounterMetricFamily(
            "pdserve_kv_handoff_raw_bytes", "KV bytes moved by handoffs, before compression", labels=["pool"]
        )
        c_desc = CounterMetricFamily("pdserve_kv_handoff_descriptors", "Transfer descriptors posted", labels=["pool"])
        c_fail = CounterMetricFamily("pdserve_kv_handoff_failures", "Failed/expired KV handoffs", labels=["pool"])
        pools: dict[tuple[str, str], list[WorkerStats]] = {}
        for s in stats:
            pools.setdefault((s.pool, s.role), []).append(s)
            g_kv.add_metric([s.pool, s.endpoint_id], s.kv_usage)
            c_gen.add_metric([s.pool, s.endpoint_id], s.generation_tokens_total)
            for source, attr in (
                ("local_compute", "prompt_tokens_computed"),
                ("local_cache_hit", "prompt_tokens_local_cache_hit"),
                ("external_kv_transfer", "prompt_tokens_external_kv"),
            ):
                c_prompt.add_metric([s.pool, s.endpoint_id, source], getattr(s, attr))
        for (pool, role), items in sorted(pools.items()):
            g_queue.add_metric([pool, role], sum(s.num_waiting for s in items))
            g_running.add_metric([pool, role], sum(s.num_running for s in items))
            g_replicas.add_metric([pool, role], sum(1 for s in items if s.healthy))
            c_xfer.add_metric([pool], sum(s.kv_transfers_total for s in items))
            c_bytes.add_metric([pool], sum(s.kv_transfer_bytes_total for s in items))
            c_raw.add_metric([pool], sum(s.kv_transfer_raw_bytes_total for s in items))
            c_desc.add_metric([pool], sum(s.kv_transfer_descriptors_total for s in items))
            c_fail.add_metric([pool], sum(s.kv_transfer_failures_total for s in items))
        yield from (g_queue, g_running, g_replicas, g_kv, c_prompt, c_gen, c_xfer, c_bytes, c_raw, c_desc, c_fail)


# pdserve_planner_<name>{pool}: the autoscaling planner's inputs and outputs (serve/planner.py)
PLANNER_GAUGES = {
    "arrival_rate": "Arrivals per second over the demand window, refused requests included",
    "refused_rate": "Refused arrivals per second over the demand window",
    "forecast_rate": "Arrivals per second forecast for the next interval",
    "prompt_tokens_mean": "Mean uncached prompt tokens of arrivals",
    "output_tokens_mean": "Mean requested output tokens of arrivals",
    "ttft_predicted_seconds": "Mean predicted TTFT of recent admitted requests",
    "ttft_observed_seconds": "Mean observed TTFT of recent admitted requests",
    "ttft_ratio": "Observed / predicted TTFT",
    "tpot_predicted_seconds": "Mean predicted TPOT of recent admitted requests",
    "tpot_observed_seconds": "Mean observed TPOT of recent admitted requests",
    "tpot_ratio": "Observed / predicted TPOT",
    "queued_prefill_tokens": "Uncached prompt tokens dispatched for prefill and not done",
    "decode_batch": "Requests running in the pool's engines",
    "waiting_requests": "Requests waiting in the pool's engines",
    "kv_usage": "Mean KV usage of the pool's replicas",
    "current_replicas": "Replicas the router sees",
    "desired_replicas": "Replicas the SLOs need next interval, before stabilization",
    "target_replicas": "Replica target after stabilization (autoscaled pools)",
}


class ClusterMetrics:
    def __init__(self, worker_stats_source) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pdserve_requests", "Finished HTTP requests", ["route", "status"], registry=r)
        self.rejections = Counter(
            "pdserve_admission_rejections", "Requests rejected before admission", ["reason", "tier"], registry=r
        )
        self.prefill_fallbacks = Counter(
            "pdserve_prefill_fallbacks",
            "Remote prefills that fell back to local prefill on the decode engine",
            ["reason"],
            registry=r,
        )
        self.routing = Counter("pdserve_routing_decisions", "Routing decisions", ["prefill", "decode_pool"], registry=r)
        self.handoff_mode = Counter(
            "pdserve_kv_handoff_requests",
            "Remote prefills by KV handoff mode (pull: decode after the prefill's answer; push: both at once)",
            ["mode"],
            registry=r,
        )
        self.admitted = Counter("pdserve_admitted_requests", "Requests admitted", ["tier", "prefill"], registry=r)
        self.prefix_hit_tokens = Counter(
            "pdserve_prefix_hit_tokens",
            "Prompt tokens the chosen replica had cached (router's prefix index)",
            registry=r,
        )
        self.decision_s = Histogram(
            "pdserve_router_decision_duration_seconds",
            "Routing policy decision time (placement + admission, per request)",
            buckets=(2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2.5e-3, 1e-2),
            registry=r,
        )
        self.throttled = Counter(
            "pdserve_admission_throttled", "Requests admitted with throttling", ["tier", "action"], registry=r
        )
        self.routed_prompt_tokens = Counter(
            "pdserve_routed_prompt_tokens", "Prompt tokens of routed requests", registry=r
        )
        ratio_buckets = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 8.0)
        self.ttft_pred_ratio = Histogram(
            "pdserve_ttft_actual_over_predicted",
            "Observed / predicted time to first token (admission model error)",
            buckets=ratio_buckets,
            registry=r,
        )
        self.tpot_pred_ratio = Histogram(
            "pdserve_tpot_actual_over_predicted",
            "Observed / predicted time per output token",
            buckets=ratio_buckets,
            registry=r,
        )
        self.aborts = Counter("pdserve_request_aborts", "Requests aborted before finishing", ["reason"], registry=r)
        self.ttft = Histogram(
            "pdserve_request_ttft_seconds",
            "Time to first token at the ingress",
            ["route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.itl = Histogram(
            "pdserve_request_inter_token_latency_seconds",
            "Gap between streamed tokens",
            ["route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.e2e = Histogram(
            "pdserve_request_e2e_seconds",
            "End-to-end request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.prefill_s = Histogram(
            "pdserve_prefill_seconds", "Remote prefill call duration", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.prefill_engine_s = Histogram(
            "pdserve_prefill_engine_seconds",
            "Part of a remote prefill call spent in the prefill replica's engine (its queue and the forward "
            "pass, as the replica measured it); pdserve_prefill_seconds less this is the call's overhead "
            "(the ingress and replica event loops, Ray, routing)",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.handoff_s = Histogram(
            "pdserve_kv_handoff_duration_seconds",
            "Per-transfer KV handoff time",
            buckets=_HANDOFF_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.completion_tokens = Counter("pdserve_completion_tokens", "Tokens returned to clients", registry=r)
        self.planner = {
            name: Gauge(f"pdserve_planner_{name}", doc, ["pool"], registry=r) for name, doc in PLANNER_GAUGES.items()
        }
        self.planner_decisions = Counter(
            "pdserve_planner_decisions",
            "Autoscaling decisions by reason (scale_up, scale_down, hold_*, at_min, at_max, steady, cold_start)",
            ["pool", "reason"],
            registry=r,
        )
        self.cold_start_waits = Counter(
            "pdserve_cold_start_waits",
            "Requests that waited for an empty decode pool's first replica, by outcome (served, timeout, failed)",
            ["pool", "outcome"],
            registry=r,
        )
        # role flips of flex pools (serve/flex.py)
        self.flex_role = Gauge(
            "pdserve_flex_role",
            "1 for the role a flex replica serves now (prefill, decode, or draining while it flips), else 0",
            ["pool", "replica", "role"],
            registry=r,
        )
        self.flex_flips = Counter(
            "pdserve_flex_flips", "Role flips applied, by reason", ["pool", "from", "to", "reason"], registry=r
        )
        self.flex_flip_s = Histogram(
            "pdserve_flex_flip_seconds",
            "A role flip from the drain mark to the switch (in-flight work of the old role finishing)",
            ["pool"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=r,
        )
        self.flex_decisions = Counter(
            "pdserve_flex_decisions",
            "Flex controller decisions by reason (prefill_heavy, decode_heavy, below_min_*, or a hold)",
            ["pool", "reason"],
            registry=r,
        )
        self.flex_desired_prefill = Gauge(
            "pdserve_flex_desired_prefill",
            "Prefill replicas the measured demand asks of a flex pool (fractional, before hysteresis)",
            ["pool"],
            registry=r,
        )
        r.register(_WorkerStatsCollector(worker_stats_source))

    def watch_prefix_index(self, blocks: Callable[[], Mapping[str, int]], kv_events: Callable[[], int]) -> None:
        """Export the router's prefix index as it is at scrape time: blocks per replica and KV events applied."""
        self.registry.register(_PrefixIndexCollector(blocks, kv_events))

    def observe_handoff_durations(self, durations_s: Iterable[float]) -> None:
        for d in durations_s:
            self.handoff_s.observe(d)

    def render(self) -> bytes:
        return generate_latest(self.registry)
