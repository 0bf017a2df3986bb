"""Summaries of a run's RequestRecords (pure)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from loadtests.client import RequestRecord


def dist(values: Sequence[float]) -> dict[str, float | None]:
    return {
        # numpy's default (linear) percentile: the definition kvtransfer.stats.percentile uses too
        **{f"p{q}": float(np.percentile(values, q)) if values else None for q in (50, 90, 99)},
        "mean": (sum(values) / len(values)) if values else None,
        "n": len(values),
    }


def meets_slo(r: RequestRecord, ttft_slo_s: float, tpot_slo_s: float) -> bool:
    if r.outcome != "ok" or r.ttft_s is None:
        return False
    tpot = r.tpot_s
    return r.ttft_s <= ttft_slo_s and (tpot is None or tpot <= tpot_slo_s)


def summarize(
    records: Sequence[RequestRecord], duration_s: float, ttft_slo_s: float, tpot_slo_s: float, skipped: int = 0
) -> dict:
    ok = [r for r in records if r.outcome == "ok"]
    good = [r for r in ok if meets_slo(r, ttft_slo_s, tpot_slo_s)]
    dur = max(duration_s, 1e-9)
    return {
        "requests": len(records),
        "ok": len(ok),
        "skipped": skipped,
        "rejected": dict(Counter(r.reason for r in records if r.outcome == "rejected")),
        "errors": dict(Counter(r.reason for r in records if r.outcome == "error")),
        "duration_s": duration_s,
        "throughput_rps": len(ok) / dur,
        "output_tps": sum(r.completion_tokens for r in ok) / dur,
        "goodput_rps": len(good) / dur,
        "slo_attainment": len(good) / len(records) if records else 0.0,
        "ttft_s": dist([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": dist([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": dist([g for r in ok for g in r.itl_s]),
        "e2e_s": dist([r.e2e_s for r in ok if r.e2e_s is not None]),
    }


def summarize_by_tag(
    records: Sequence[RequestRecord], duration_s: float, ttft_slo_s: float, tpot_slo_s: float
) -> dict[str, dict]:
    """``summarize`` per record tag (the QoS tier in the ``qos`` workload); rates over the whole run."""
    tags = sorted({r.tag for r in records})
    return {t: summarize([r for r in records if r.tag == t], duration_s, ttft_slo_s, tpot_slo_s) for t in tags}
