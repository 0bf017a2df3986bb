"""One A/B across several benchmark runs (sweep points): ratio of a system to its baseline per point.

    python -m loadtests.sweep --param "KV blocks per replica" --system prefix --baseline rr \
        --workload shared-prefix-wide --point 32=loadtests/results/20261122-164807 \
        --point 24=loadtests/results/20261129-140341 --point 24=loadtests/results/20261129-143101 \
        --out loadtests/results/20261129-prefix-sweep

Each ``--point VALUE=RUN_DIR`` names a ``python -m loadtests.bench`` run (its ``summary.json``) and
the value of the swept parameter in it (e.g. its ``--set``); repeated values are repeats. Writes
``sweep.json`` (per run: both systems' numbers and the ratios) and ``sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from loadtests.report import plt, save_figure

# (label, key in a bench row, lower is better)
METRICS = (
    ("prefix-cache hit rate", "prefix_cache_hit_rate", False),
    ("TTFT p50", "ttft_p50", True),
    ("goodput", "goodput_rps", False),
)


def _value(row: dict, key: str) -> float | None:
    return row["ttft_s"]["p50"] if key == "ttft_p50" else row.get(key)


def sweep_points(points: list[tuple[str, dict]], system: str, baseline: str, workload: str) -> list[dict]:
    """One entry per run: the swept value, both systems' metrics and system / baseline ratios."""
    out = []
    for value, summary in points:
        rows = {r["system"]: r for r in summary["rows"] if r["workload"] == workload}
        if system not in rows or baseline not in rows:
            raise SystemExit(f"run {summary['meta']['run_id']} has no {system}/{baseline} rows for {workload}")
        entry = {
            "value": value,
            "run_id": summary["meta"]["run_id"],
            "seed": summary["meta"]["args"].get("seed"),
            "overrides": summary["meta"]["args"].get("overrides", []),
        }
        for _, key, _ in METRICS:
            a, b = _value(rows[system], key), _value(rows[baseline], key)
            entry[key] = {system: a, baseline: b, "ratio": a / b if a is not None and b else None}
        out.append(entry)
    return out


def plot(entries: list[dict], param: str, system: str, baseline: str, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    values = sorted({e["value"] for e in entries}, key=lambda v: float(v))
    for ax, (label, key, lower) in zip(axes, METRICS):
        xs = [float(e["value"]) for e in entries]
        ax.scatter(xs, [e[key]["ratio"] for e in entries], color="C0", label="each run")
        means = [statistics.mean(e[key]["ratio"] for e in entries if e["value"] == v) for v in values]
        ax.plot([float(v) for v in values], means, color="C0", alpha=0.6, label="mean")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{label}: {system} / {baseline} ({'lower' if lower else 'higher'} is better)")
        ax.set_xlabel(param)
        ax.set_ylabel("ratio")
        ax.legend()
    return save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--param", required=True, help="name of the swept parameter (axis label)")
    p.add_argument("--system", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--point", action="append", required=True, metavar="VALUE=RUN_DIR")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    points = []
    for item in args.point:
        value, _, run_dir = item.partition("=")
        points.append((value, json.loads((Path(run_dir) / "summary.json").read_text())))
    entries = sweep_points(points, args.system, args.baseline, args.workload)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(
        json.dumps(
            {
                "param": args.param,
                "system": args.system,
                "baseline": args.baseline,
                "workload": args.workload,
                "points": entries,
            },
            indent=2,
        )
    )
    plot(entries, args.param, args.system, args.baseline, out / "sweep.png")
    for e in entries:
        print(
            f"{args.param}={e['value']} ({e['run_id']}): "
            + ", ".join(f"{key} {e[key]['ratio']:.2f}x" for _, key, _ in METRICS if e[key]["ratio"] is not None)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
