"""KVTransferStats: what the slab connector measured during an interval (pure; no vLLM, no
prometheus). Workers produce it, vLLM ships it to the frontend as a dict (``to_dict``), and
``serve/metrics.py`` turns it into ``pdserve_kv_transfer_*`` metrics. ``aggregate`` merges two
intervals or two workers; ``reduce`` summarises one interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# failure reasons (a bounded label set)
REASONS = (
    "connect_timeout",
    "read_timeout",
    "read_error",
    "expired",
    "incompatible",
    "pool_full",
    "pack_error",
    "decode_error",
    "handoff_timeout",
)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (``q`` in 0-100) of ``values``, None when there are none: numpy's
    default (linear interpolation between the two closest ranks), the project's one percentile
    definition, so the connector's stats, the load-test reports and the microbenchmarks compare."""
    return float(np.percentile(values, q)) if len(values) else None


@dataclass
class KVTransferStats:
    num_handoffs_sent: int = 0  # prefill: handoffs published (slabs packed)
    num_handoffs_received: int = 0  # decode: handoffs read and scattered
    num_slabs: int = 0  # slabs packed (prefill) + read (decode)
    num_descriptors: int = 0  # transfer descriptors posted (decode READs)
    raw_bytes: int = 0  # KV bytes before compression (of what went on the wire)
    wire_bytes: int = 0  # bytes on the wire
    num_released_by_notification: int = 0
    num_released_by_timeout: int = 0
    pack_s: list[float] = field(default_factory=list)  # per handoff, prefill
    handoff_s: list[float] = field(default_factory=list)  # per handoff, decode: read start -> scattered
    transfer_s: list[float] = field(default_factory=list)  # per handoff, decode: NIXL READ only
    failures: dict[str, int] = field(default_factory=dict)  # reason -> count

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def is_empty(self) -> bool:
        return self == KVTransferStats()

    def aggregate(self, other: KVTransferStats) -> KVTransferStats:
        """Add ``other`` into self (counters add, observations concatenate); returns self."""
        for name in (
            "num_handoffs_sent",
            "num_handoffs_received",
            "num_slabs",
            "num_descriptors",
            "raw_bytes",
            "wire_bytes",
            "num_released_by_notification",
            "num_released_by_timeout",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.pack_s += other.pack_s
        self.handoff_s += other.handoff_s
        self.transfer_s += other.transfer_s
        for reason, n in other.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + n
        return self

    def reduce(self) -> dict[str, float]:
        """One interval as flat numbers (descriptors per handoff, compression ratio, p50/p99 ...)."""
        handoffs = max(1, self.num_handoffs_received)
        out: dict[str, float] = {
            "handoffs_sent": self.num_handoffs_sent,
            "handoffs_received": self.num_handoffs_received,
            "descriptors_per_handoff": self.num_descriptors / handoffs,
            "wire_bytes": self.wire_bytes,
            "raw_bytes": self.raw_bytes,
            "wire_to_raw": self.wire_bytes / self.raw_bytes if self.raw_bytes else 0.0,
            # 0.0 for an interval without samples (vLLM logs every value as a number)
            "handoff_p50_s": percentile(self.handoff_s, 50) or 0.0,
            "handoff_p99_s": percentile(self.handoff_s, 99) or 0.0,
            "pack_p50_s": percentile(self.pack_s, 50) or 0.0,
            "released_by_notification": self.num_released_by_notification,
            "released_by_timeout": self.num_released_by_timeout,
        }
        for reason, n in sorted(self.failures.items()):
            out[f"failures_{reason}"] = n
        return out

    def latency_histogram(self) -> list[int]:
        """Cumulative counts of ``handoff_s`` per bucket of ``LATENCY_BUCKETS_S`` (+Inf last)."""
        return [sum(v <= b for v in self.handoff_s) for b in LATENCY_BUCKETS_S] + [len(self.handoff_s)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> KVTransferStats:
        return cls(**data) if data else cls()
