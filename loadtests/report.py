"""Markdown report + PNG plots of a benchmark run (matplotlib, headless)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(v, scale=1.0, digits=2) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def _ratio(a, b) -> str:
    if a is None or b in (None, 0):
        return "-"
    return f"{a / b:.2f}x"


def write_report(out: Path, rows: list[dict], meta: dict) -> None:
    lines = [
        f"# Benchmark {meta['run_id']}",
        "",
        f"SLOs: TTFT <= {meta['slo']['ttft_s']} s, TPOT <= {meta['slo']['tpot_s']} s. "
        "Goodput = requests meeting both, per second.",
        "",
        "| system | workload | rate | ok/sent | rejected | errors | goodput rps | out tok/s | TTFT p50/p99 ms "
        "| ITL p50/p99 ms | TPOT p50 ms | prefix hit % | RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['workload']} | {r['rate']} | {r['ok']}/{r['requests']} | "
            f"{sum(r['rejected'].values())} | {sum(r['errors'].values())} | {r['goodput_rps']:.2f} | "
            f"{r['output_tps']:.1f} | {_fmt(r['ttft_s']['p50'], 1e3, 0)}/{_fmt(r['ttft_s']['p99'], 1e3, 0)} | "
            f"{_fmt(r['itl_s']['p50'], 1e3, 0)}/{_fmt(r['itl_s']['p99'], 1e3, 0)} | "
            f"{_fmt(r['tpot_s']['p50'], 1e3, 0)} | {_fmt(r.get('prefix_cache_hit_rate'), 100, 0)} | "
            f"{_fmt(r['server_rss_bytes'], 2**-30, 1)} |"
        )
    by_key = {(r["system"], r["workload"], r["rate"]): r for r in rows}
    peers = ("colocated", "raypd")
    for base in dict.fromkeys((*peers, *meta.get("baselines", []))):  # a peer named as baseline: one table
        for system in sorted({r["system"] for r in rows} - {base, *peers}):
            pairs = [(r, by_key.get((base, r["workload"], r["rate"]))) for r in rows if r["system"] == system]
            pairs = [(a, b) for a, b in pairs if b]
            if pairs:
                lines += _ratio_table(system, base, pairs)
    lines += _tier_tables(rows, by_key, meta.get("baselines", []))
    lines += ["", "Plots: " + ", ".join(f"`{p.name}`" for p in plot_all(out, rows))]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _tier_tables(rows: list[dict], by_key: dict, baselines: list[str]) -> list[str]:
    """Per-QoS-tier outcomes of workloads whose requests carry a tier (``by_tier``), and per-tier
    ratios against each baseline."""
    tiered = [r for r in rows if r.get("by_tier")]
    if not tiered:
        return []
    lines = [
        "",
        "## By QoS tier",
        "",
        "| system | workload | rate | tier | ok/sent | rejected | goodput rps | TTFT p50/p99 ms | TPOT p50 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tiered:
        for tier, t in r["by_tier"].items():
            lines.append(
                f"| {r['system']} | {r['workload']} | {r['rate']} | {tier} | {t['ok']}/{t['requests']} | "
                f"{sum(t['rejected'].values())} | {t['goodput_rps']:.3f} | "
                f"{_fmt(t['ttft_s']['p50'], 1e3, 0)}/{_fmt(t['ttft_s']['p99'], 1e3, 0)} | "
                f"{_fmt(t['tpot_s']['p50'], 1e3, 0)} |"
            )
    for base in baselines:
        pairs = [(a, by_key.get((base, a["workload"], a["rate"]))) for a in tiered if a["system"] != base]
        pairs = [(a, b) for a, b in pairs if b and b.get("by_tier")]
        if not pairs:
            continue
        lines += [
            "",
            f"### by tier vs {base}",
            "",
            "| system | workload | rate | tier | admitted ratio | goodput ratio | TTFT p50 ratio | TTFT p99 ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for a, b in pairs:
            for tier, t in a["by_tier"].items():
                u = b["by_tier"].get(tier)
                if u:
                    lines.append(
                        f"| {a['system']} | {a['workload']} | {a['rate']} | {tier} | "
                        f"{_ratio(t['ok'], u['ok'])} | {_ratio(t['goodput_rps'], u['goodput_rps'])} | "
                        f"{_ratio(t['ttft_s']['p50'], u['ttft_s']['p50'])} | "
                        f"{_ratio(t['ttft_s']['p99'], u['ttft_s']['p99'])} |"
                    )
    return lines


def _ratio_table(system: str, base: str, pairs: list[tuple[dict, dict]]) -> list[str]:
    lines = [
        "",
        f"## {system} vs {base}",
        "",
        "| workload | rate | goodput ratio | ITL p99 ratio | TTFT p50 ratio | TTFT p99 ratio | TPOT p50 ratio "
        "| prefix hit-rate ratio | replica-s ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a, b in pairs:
        lines.append(
            f"| {a['workload']} | {a['rate']} | {_ratio(a['goodput_rps'], b['goodput_rps'])} | "
            f"{_ratio(a['itl_s']['p99'], b['itl_s']['p99'])} | "
            f"{_ratio(a['ttft_s']['p50'], b['ttft_s']['p50'])} | "
            f"{_ratio(a['ttft_s']['p99'], b['ttft_s']['p99'])} | "
            f"{_ratio(a['tpot_s']['p50'], b['tpot_s']['p50'])} | "
            f"{_ratio(a.get('prefix_cache_hit_rate'), b.get('prefix_cache_hit_rate'))} | "
            f"{_ratio(_replica_s(a), _replica_s(b))} |"
        )
    return lines


def _replica_s(row: dict) -> float | None:
    """The run's replica-seconds over all pools (its cost; loadtests/timeline.py), if sampled."""
    return (row.get("replica_seconds") or {}).get("total")


def plot_all(out: Path, rows: list[dict]) -> list[Path]:
    paths = []
    by_wl = defaultdict(list)
    for r in rows:
        by_wl[r["workload"]].append(r)
    panels = (
        ("goodput (req/s meeting TTFT+TPOT SLOs)", lambda r: r["goodput_rps"]),
        ("TTFT p50 (ms)", lambda r: _ms(r["ttft_s"]["p50"])),
        ("inter-token latency p99 (ms)", lambda r: _ms(r["itl_s"]["p99"])),
    )
    for wl, items in by_wl.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
        for ax, (label, value) in zip(axes, panels):
            for system in sorted({r["system"] for r in items}):
                pts = sorted((r["rate"], value(r)) for r in items if r["system"] == system and value(r) is not None)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
            ax.set_xlabel("offered load (req/s)")
            ax.set_ylabel(label)
            ax.set_title(f"{label.split(' (')[0]} vs rate: {wl}", fontsize=9)
        rates = sorted({r["rate"] for r in items})
        axes[0].plot(rates, rates, ls=":", color="grey", label="offered")
        for ax in axes:
            ax.legend(fontsize=8)
        paths.append(save_figure(fig, out / f"goodput-{wl}.png"))
        paths += _cdfs(out, wl, items)
        if wl.startswith("bursty"):
            paths += [_timeline(out, wl, rate, items) for rate in sorted({r["rate"] for r in items})]
    return paths


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def bins(times: list[float], width: float, end: float) -> tuple[list[float], list[float]]:
    """Events per second in ``width``-second bins over [0, ``end``]: (bin centres, rates)."""
    n = max(1, int(end // width) + 1)
    counts = [0] * n
    for t in times:
        if 0 <= t < n * width:
            counts[int(t // width)] += 1
    return [i * width + width / 2 for i in range(n)], [c / width for c in counts]


def _timeline(out: Path, wl: str, rate: float, items: list[dict], bin_s: float = 5.0) -> Path:
    """Offered rate, completions, rejections, queue depth and replicas over time, per system."""
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for system in sorted({r["system"] for r in items if r["rate"] == rate}):
        raw = out / "raw" / f"{system}-{wl}-{rate}.json"
        if not raw.exists():
            continue
        data = json.loads(raw.read_text())
        recs, tl = data["records"], data.get("timeline") or []
        end = max([x["start_s"] + (x["e2e_s"] or 0) for x in recs] + [s["t"] for s in tl] + [1.0])
        xs, offered = bins([x["start_s"] for x in recs], bin_s, end)
        line = axes[0].plot(xs, offered, ls="--", label=f"{system} offered")[0]
        _, done = bins([x["start_s"] + x["e2e_s"] for x in recs if x["outcome"] == "ok" and x["e2e_s"]], bin_s, end)
        axes[0].plot(xs, done, color=line.get_color(), label=f"{system} completed")
        _, rej = bins([x["start_s"] for x in recs if x["outcome"] == "rejected"], bin_s, end)
        axes[0].bar(xs, rej, width=bin_s * 0.8, alpha=0.3, color=line.get_color(), label=f"{system} rejected")
        if tl:
            axes[1].plot(
                [s["t"] for s in tl], [s.get("queue", 0) for s in tl], color=line.get_color(), label=f"{system} queued"
            )
            axes[1].plot(
                [s["t"] for s in tl],
                [s.get("running", 0) for s in tl],
                color=line.get_color(),
                ls=":",
                label=f"{system} running",
            )
            _replica_steps(axes[2], system, tl, line.get_color())
    axes[0].set_ylabel(f"req/s ({bin_s:.0f} s bins)")
    axes[0].set_title(f"bursty trace (base {rate} req/s, 3x peak): arrivals, completions, rejections")
    axes[1].set_ylabel("requests in engines")
    axes[2].set_ylabel("replicas")
    axes[2].set_xlabel("seconds since run start")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, ncol=3)
    return save_figure(fig, out / f"timeline-{wl}-{rate}.png")


# timeline keys (loadtests/timeline.py) drawn as replica steps -> line style: per pool (a prefix ending in ".")
# or a whole key
_REPLICA_SERIES = {"replicas.": "-", "target.": "--", "flex_prefill": ":", "flex_decode": ":", "flex_draining": ":"}


def _series_style(key: str) -> str | None:
    return next((ls for p, ls in _REPLICA_SERIES.items() if key == p or (p.endswith(".") and key.startswith(p))), None)


def _replica_steps(ax, system: str, tl: list[dict], color: str) -> None:
    """Replicas of each pool (solid, from /health), the planner's target of autoscaled pools (dashed) and
    flex replicas per role (dotted), as steps; a timeline without /health samples: healthy replicas of all
    pools (from /metrics)."""
    keys = sorted({k for s in tl for k in s if _series_style(k)})
    if not keys and any("replicas" in s for s in tl):
        keys = ["replicas"]
    markers = "osd^v<>"
    for i, key in enumerate(keys):
        style = _series_style(key)
        pts = [(s["t"], s[key]) for s in tl if key in s]
        ax.step(
            [t for t, _ in pts],
            [v for _, v in pts],
            where="post",
            color=color,
            ls=style,
            marker=markers[i % len(markers)],
            markevery=max(1, len(pts) // 12),
            markersize=4,
            label=f"{system} {key}",
        )


def _cdfs(out: Path, wl: str, items: list[dict]) -> list[Path]:
    top_rate = max(r["rate"] for r in items)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for system in sorted({r["system"] for r in items}):
        raw = out / "raw" / f"{system}-{wl}-{top_rate}.json"
        if not raw.exists():
            continue
        recs = [x for x in json.loads(raw.read_text())["records"] if x["outcome"] == "ok"]
        for ax, values in (
            (axes[0], [x["ttft_s"] for x in recs if x["ttft_s"] is not None]),
            (axes[1], [g for x in recs for g in x["itl_s"]]),
        ):
            if values:
                v = sorted(values)
                ax.plot([x * 1e3 for x in v], [(i + 1) / len(v) for i in range(len(v))], label=system)
    for ax, name in ((axes[0], "TTFT"), (axes[1], "inter-token latency")):
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("CDF")
        ax.set_title(f"{name} CDF: {wl} @ {top_rate} req/s")
        ax.legend()
    return [save_figure(fig, out / f"cdf-{wl}-{top_rate}.png")]


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    """Rewrite a recorded run's report.md and plots, e.g. with more baselines:
    ``python -m loadtests.report loadtests/results/RUN --baseline noadmit``."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--baseline", action="append", default=[])
    a = ap.parse_args(argv)
    out = Path(a.run_dir)
    data = json.loads((out / "summary.json").read_text())
    meta = data["meta"]
    meta["baselines"] = list(dict.fromkeys([*meta.get("baselines", []), *a.baseline]))
    write_report(out, data["rows"], meta)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "rows": data["rows"]}, indent=2))
    print(f"rewrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
