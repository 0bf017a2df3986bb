"""Flex vs static roles on the ``phase-shift`` workload, from a bench run's raw records and timelines.

    python -m loadtests.flex_report loadtests/results/<run> --flex flex --static static

Per system and per phase: requests, goodput (requests meeting both SLOs per second of the phase), TTFT p99 and
TPOT p99; the flex/static goodput ratios; for the flex system, the time from each shift of the traffic's shape
to the controller's first flip decision and to the flip applied (from the 1 s ``/metrics`` timeline, so to
within a second). Writes ``flex.json`` and ``flex.png`` (offered load, the flex pool's roles, TTFT and TPOT
over time) into the run directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadtests.client import RequestRecord  # noqa: E402
from loadtests.stats import dist, meets_slo  # noqa: E402
from loadtests.workloads import PHASES  # noqa: E402

# the counter that moves first after each shift: to decode after the first, back to prefill after the second
SHIFT_DECISIONS = ("flex_decode_heavy_decisions", "flex_prefill_heavy_decisions")


def load_raw(run: Path, system: str) -> dict:
    (path,) = sorted((run / "raw").glob(f"{system}-phase-shift-*.json"))
    return json.loads(path.read_text())


def records_of(raw: dict) -> list[RequestRecord]:
    fields = set(RequestRecord.__dataclass_fields__) - {"text"}
    return [RequestRecord(**{k: v for k, v in r.items() if k in fields}) for r in raw["records"]]


def phase_table(records: list[RequestRecord], phase_s: float, ttft_slo_s: float, tpot_slo_s: float) -> dict:
    out = {}
    for phase in PHASES:
        rs = [r for r in records if r.tag == phase]
        ok = [r for r in rs if r.outcome == "ok"]
        good = [r for r in ok if meets_slo(r, ttft_slo_s, tpot_slo_s)]
        out[phase] = {
            "requests": len(rs),
            "ok": len(ok),
            "good": len(good),
            "goodput_rps": len(good) / phase_s,
            "ttft_p99_s": dist([r.ttft_s for r in ok if r.ttft_s is not None])["p99"],
            "tpot_p99_s": dist([r.tpot_s for r in ok if r.tpot_s is not None])["p99"],
        }
    return out


def first_rise(timeline: list[dict], field: str, after_s: float) -> float | None:
    """Seconds from ``after_s`` to the first timeline sample where ``field`` exceeds its value at ``after_s``."""
    before = [s.get(field, 0.0) for s in timeline if s["t"] <= after_s]
    base = before[-1] if before else 0.0
    for s in timeline:
        if s["t"] > after_s and s.get(field, 0.0) > base:
            return round(s["t"] - after_s, 2)
    return None


def shift_times(timeline: list[dict], phase_s: float) -> list[dict]:
    out = []
    for i, field in enumerate(SHIFT_DECISIONS, start=1):
        at = i * phase_s
        out.append(
            {
                "shift_at_s": at,
                "to": "decode-heavy" if i == 1 else "prefill-heavy",
                "decision_after_s": first_rise(timeline, field, at),
                "flip_applied_after_s": first_rise(timeline, "flex_flips", at),
            }
        )
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def build(run: Path, flex: str, static: str, phase_s: float, ttft_slo_s: float, tpot_slo_s: float) -> dict:
    raws = {s: load_raw(run, s) for s in (flex, static)}
    tables = {s: phase_table(records_of(r), phase_s, ttft_slo_s, tpot_slo_s) for s, r in raws.items()}
    overall = {s: r["summary"]["goodput_rps"] for s, r in raws.items()}
    return {
        "phase_s": phase_s,
        "slo": {"ttft_s": ttft_slo_s, "tpot_s": tpot_slo_s},
        "goodput_rps": overall,
        "goodput_ratio": _ratio(overall[flex], overall[static]),
        "phases": tables,
        "phase_goodput_ratio": {
            p: _ratio(tables[flex][p]["goodput_rps"], tables[static][p]["goodput_rps"]) for p in PHASES
        },
        "flex_shifts": shift_times(raws[flex]["timeline"], phase_s),
        "flex_flips_total": max((s.get("flex_flips", 0.0) for s in raws[flex]["timeline"]), default=0.0),
    }


def plot(run: Path, flex: str, static: str, phase_s: float, slo: dict) -> Path:
    raws = {s: load_raw(run, s) for s in (flex, static)}
    fig, (ax_load, ax_roles, ax_ttft, ax_tpot) = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    recs = records_of(raws[flex])
    end = max((r.start_s for r in recs), default=0.0) + 10
    width = 10.0
    edges = [i * width for i in range(int(end // width) + 2)]
    for phase in PHASES:
        starts = [r.start_s for r in recs if r.tag == phase]
        counts = [sum(e <= t < e + width for t in starts) / width for e in edges]
        ax_load.step(edges, counts, where="post", label=phase)
    ax_load.set_ylabel("offered req/s (10 s bins)")
    ax_load.legend(fontsize=8)
    tl = raws[flex]["timeline"]
    t = [s["t"] for s in tl]
    for field, label in (("flex_prefill", "prefill"), ("flex_decode", "decode"), ("flex_draining", "draining")):
        ax_roles.step(t, [s.get(field, 0.0) for s in tl], where="post", label=f"{flex}: {label} replicas")
    ax_roles.plot(t, [s.get("flex_desired_prefill", 0.0) for s in tl], ":", label="desired prefill (demand)")
    ax_roles.set_ylabel("replicas")
    ax_roles.legend(fontsize=8)
    for system in (flex, static):
        rs = [r for r in records_of(raws[system]) if r.outcome == "ok"]
        ax_ttft.scatter([r.start_s for r in rs], [r.ttft_s for r in rs], s=4, label=system)
        with_tpot = [r for r in rs if r.tpot_s is not None]
        ax_tpot.scatter([r.start_s for r in with_tpot], [r.tpot_s for r in with_tpot], s=4, label=system)
    ax_ttft.axhline(slo["ttft_s"], color="grey", ls="--", lw=0.8)
    ax_tpot.axhline(slo["tpot_s"], color="grey", ls="--", lw=0.8)
    ax_ttft.set_yscale("log")
    ax_tpot.set_yscale("log")
    ax_ttft.set_ylabel("TTFT s (by arrival)")
    ax_tpot.set_ylabel("TPOT s (by arrival)")
    ax_tpot.set_xlabel("seconds since the run started")
    ax_ttft.legend(fontsize=8)
    for ax in (ax_load, ax_roles, ax_ttft, ax_tpot):
        for k in (1, 2):
            ax.axvline(k * phase_s, color="black", lw=0.6)
    fig.suptitle(f"phase-shift: {flex} (role: flex) vs {static} (static roles)")
    fig.tight_layout()
    path = run / "flex.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--flex", default="flex")
    p.add_argument("--static", default="static")
    p.add_argument("--phase-s", type=float, default=90.0)
    args = p.parse_args(argv)
    meta = json.loads((args.run / "summary.json").read_text())["meta"]
    slo = meta["slo"]
    out = build(args.run, args.flex, args.static, args.phase_s, slo["ttft_s"], slo["tpot_s"])
    (args.run / "flex.json").write_text(json.dumps(out, indent=2))
    plot(args.run, args.flex, args.static, args.phase_s, slo)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
