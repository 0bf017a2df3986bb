"""Helpers for integration tests against a real local cluster (HTTP on loopback only)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvtransfer.ports import free_port  # noqa: F401  (re-exported: outside the ephemeral range)
from serve.config import DEFAULT_CONFIG, ClusterConfig


@contextlib.contextmanager
def running_cluster(cfg: ClusterConfig) -> Iterator:
    """A started cluster (``serve.runner.RunningCluster``), always stopped on the way out."""
    from serve.runner import start_cluster

    c = start_cluster(cfg, timeout_s=600, progress=lambda m: None)
    try:
        yield c
    finally:
        c.stop()


# every prompt prefilled on a prefill replica and handed off (tests of the disaggregated path): no short,
# cached or idle-decode exception sends one to the decode replica
ALWAYS_REMOTE_PREFILL = {
    "local_prefill_max_tokens": 0,
    "local_prefill_min_hit_ratio": 1.0,
    "local_prefill_when_idle": False,
}


def cluster_config(
    port: int, decode_replicas: int = 1, dtype: str | None = None, kv_handoff: dict | None = None, **router
) -> ClusterConfig:
    data = ClusterConfig.from_yaml(DEFAULT_CONFIG).model_dump(mode="json")
    data["server"]["port"] = port
    data["kv_handoff"].update(kv_handoff or {})
    data["app_name"] = "pdserve-test"
    for pool in data["pools"]:
        # eager engines: a fast start, and greedy outputs comparable with the eager reference run
        pool["engine"]["enforce_eager"] = True
        if dtype:
            pool["engine"]["dtype"] = dtype
        if pool["role"] == "decode":
            pool["replicas"] = {"min": decode_replicas, "max": decode_replicas}
            if decode_replicas > 1:
                pool["device"]["cpu_cores"] = ["1", "0"]  # by local rank, wrapping around
    data["router"].update(router)
    return ClusterConfig.from_dict(data)


def parse_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(sample name, frozenset(label items)): value}. Sample names are as exposed,
    suffix included (``..._total``, ``..._count``, ``..._sum``, ``..._bucket``, ``..._created``)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(base_url: str) -> dict[tuple[str, frozenset], float]:
    """The cluster's /metrics, parsed by :func:`parse_samples`."""
    return parse_samples(httpx.get(f"{base_url}/metrics", timeout=10).text)


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def health(base_url: str) -> dict:
    """The cluster's ``/health`` body (any status)."""
    return httpx.get(f"{base_url}/health", timeout=10).json()


def per_endpoint(samples: dict, name: str, **labels: str) -> dict[str, float]:
    """endpoint -> value of the samples of ``name`` that carry an ``endpoint`` label and ``labels``."""
    want = set(labels.items())
    return {
        dict(ls)["endpoint"]: v
        for (n, ls), v in samples.items()
        if n == name and want <= set(ls) and "endpoint" in dict(ls)
    }


def freed_after_disconnect(base_url: str, before: dict) -> bool:
    """After one client left: no request running or queued, no KV held in any engine, and one more
    ``client_disconnect`` abort than the ``before`` scrape."""
    s = scrape(base_url)
    return (
        metric_sum(s, "pdserve_pool_running_requests") == 0
        and metric_sum(s, "pdserve_pool_queue_depth") == 0
        and metric_sum(s, "pdserve_engine_kv_usage_ratio") == 0
        and metric_sum(s, "pdserve_request_aborts_total", reason="client_disconnect")
        == metric_sum(before, "pdserve_request_aborts_total", reason="client_disconnect") + 1
    )


def wait_for(pred, timeout_s: float = 20.0, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s (last={last!r})")


def settled_scrape(base_url: str, timeout_s: float = 30.0) -> dict:
    """A scrape taken once no request is running and engine counters stopped moving (stats reach
    the ingress with a poll's delay, so a scrape right after a request can miss its last numbers)."""
    deadline = time.monotonic() + timeout_s
    prev = None
    while time.monotonic() < deadline:
        cur = scrape(base_url)
        counters = {k: v for k, v in cur.items() if k[0].startswith(("pdserve_engine_", "pdserve_kv_handoff"))}
        if prev is not None and counters == prev and metric_sum(cur, "pdserve_pool_running_requests") == 0:
            return cur
        prev = counters
        time.sleep(1.0)
    return scrape(base_url)
