"""What the simulator and the planner reason about: pools of engine replicas with their profiles and
prices, the links KV handoffs cross, and the router config that places requests on them.

A ``SimCluster`` is built from a pdserve config plus profiles (``pdserve simulate``) or by the planner
from an inventory (``pdserve plan``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from capacity.profile import EngineProfile
from router.config import RouterConfig


@dataclass(frozen=True)
class Link:
    """One direction of the path a KV handoff takes between two pools."""

    bandwidth_gbps: float  # gigabits per second
    latency_s: float = 0.0

    def transfer_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes * 8 / (self.bandwidth_gbps * 1e9)


@dataclass(frozen=True)
class SimPool:
    name: str
    role: str  # "prefill" | "decode" (a decode pool prefills locally when no prefill replica is chosen)
    replicas: int
    profile: EngineProfile  # one replica's timings (all its GPUs together: TP x PP)
    price_per_hour: float = 0.0  # one replica, all its devices
    devices_per_replica: int = 1
    node: str = "node0"
    # share of the serving processes' CPU work (ingress, Ray Serve, streaming) that runs on each replica's
    # cores: 0 where they have cores of their own (a GPU engine, or pinned apart), 1 / n per core shared
    # where they spread over n cores
    serving_core_share: float = 0.0


@dataclass(frozen=True)
class SimCluster:
    pools: tuple[SimPool, ...]
    router: RouterConfig
    block_size: int
    links: dict[tuple[str, str], Link] = field(default_factory=dict)  # (prefill pool, decode pool) -> link
    default_link: Link = Link(bandwidth_gbps=100.0, latency_s=20e-6)
    kv_compression: str | None = None  # None | "int8" | "int4": KV handoff wire compression

    def link(self, prefill_pool: str, decode_pool: str) -> Link:
        return self.links.get((prefill_pool, decode_pool), self.default_link)

    @property
    def price_per_hour(self) -> float:
        return sum(p.price_per_hour * p.replicas for p in self.pools)
