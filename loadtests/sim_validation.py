"""The simulator against measured runs: for every row of ``loadtests.bench`` runs, ``pdserve simulate``
of the same config (and ``--set`` edits), workload, rate and request count, with the measured profile;
relative errors of TTFT p50/p99, TPOT p50 and goodput, a table and a simulated-vs-measured plot.

    python -m loadtests.sim_validation RUN_DIR [RUN_DIR ...] --out loadtests/results/<run>-simulator

A row's simulated figures are the median over ``--seeds`` seeds (the measured run is one draw of
``--requests`` requests; so is each simulated seed). The simulator runs as the CLI (loadtests stay a
black box).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from loadtests.bench import parse_system, parse_workload, workload_labels
from loadtests.systems import REPO

METRICS = (  # (name, measured summary path, simulated result path)
    ("ttft_p50_s", ("ttft_s", "p50"), ("ttft_s", "p50")),
    ("ttft_p99_s", ("ttft_s", "p99"), ("ttft_s", "p99")),
    ("tpot_p50_s", ("tpot_s", "p50"), ("tpot_s", "p50")),
    ("goodput_rps", ("goodput_rps",), ("goodput_rps",)),
)
BOUNDS = {"ttft_p50_s": 0.25, "ttft_p99_s": 0.25, "tpot_p50_s": 0.25, "goodput_rps": 0.20}  # issue 19


def sim_preset(entry: str) -> str | None:
    """The simulator preset of a bench workload entry (``random:input_tokens=256,output_tokens=128``
    -> ``random-256-128``); None for an entry with options no preset has."""
    name, kw = parse_workload(entry)
    kw.pop("n", None)
    if name == "random":
        return f"random-{kw.get('input_tokens', 512)}-{kw.get('output_tokens', 64)}"
    return None if kw else name


def _get(d: dict, path: tuple[str, ...]):
    for k in path:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def simulate(config: str, overrides: list[str], preset: str, rate: float, n: int, seed: int, profiles: str | None):
    cmd = [sys.executable, "-m", "serve.cli", "simulate", config, "--workload", preset, "--rate", str(rate)]
    cmd += ["--requests", str(n), "--seed", str(seed), "--json"] + [f"--set={o}" for o in overrides]
    if profiles:
        cmd += ["--profiles", profiles]
    return json.loads(subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout)


def validate_run(run: Path, seeds: int, profiles: str | None, config_of: dict[str, str]) -> list[dict]:
    """Every row of ``ours`` systems in ``run``; ``config_of``: label -> config, for runs recorded with a
    config not in the repository."""
    summary = json.loads((run / "summary.json").read_text())
    args = summary["meta"]["args"]
    configs = {}
    for entry in args["systems"].split(","):
        label, kind, config = parse_system(entry, args["config"])
        if kind == "ours":
            config = config_of.get(label, config)
            configs[label] = str(REPO / config) if not Path(config).is_absolute() else config
    labels = dict(zip(workload_labels(args["workloads"]), args["workloads"]))
    rows = []
    for m in summary["rows"]:
        preset = sim_preset(labels[m["workload"]]) if m["workload"] in labels else None
        if m["system"] not in configs or preset is None:
            continue
        sims = [
            simulate(configs[m["system"]], args["overrides"], preset, m["rate"], m["requests"], s, profiles)
            for s in range(seeds)
        ]
        row = {"run": run.name, "system": m["system"], "workload": preset, "rate": m["rate"], "requests": m["requests"]}
        for name, mpath, spath in METRICS:
            measured = _get(m, mpath)
            simulated = statistics.median(v for v in (_get(s, spath) for s in sims) if v is not None)
            row[name] = {
                "measured": measured,
                "simulated": simulated,
                "error": (simulated - measured) / measured if measured else None,
            }
        rows.append(row)
        print(
            f"[sim-validation] {row['system']} {preset} @ {row['rate']}: "
            + ", ".join(f"{n} {row[n]['error']:+.0%}" for n, _, _ in METRICS if row[n]["error"] is not None),
            flush=True,
        )
    return rows


def table(rows: list[dict]) -> str:
    head = "| run | system | workload | rate | " + " | ".join(f"{n} meas / sim (err)" for n, _, _ in METRICS) + " |"
    lines = [head, "|" + "---|" * (4 + len(METRICS))]
    for r in rows:
        cells = []
        for n, _, _ in METRICS:
            c = r[n]
            err = "-" if c["error"] is None else f"{c['error']:+.0%}"
            cells.append(f"{c['measured']:.3f} / {c['simulated']:.3f} ({err})")
        lines.append(f"| {r['run']} | {r['system']} | {r['workload']} | {r['rate']} | " + " | ".join(cells) + " |")
    within = {
        n: sum(1 for r in rows if r[n]["error"] is not None and abs(r[n]["error"]) <= BOUNDS[n]) for n, _, _ in METRICS
    }
    lines.append("")
    lines.append(
        "within the issue's bounds: "
        + ", ".join(f"{n} {within[n]}/{len(rows)} (|err| <= {BOUNDS[n]:.0%})" for n, _, _ in METRICS)
    )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 4.2))
    for ax, (name, _, _) in zip(axes, METRICS):
        for system in sorted({r["system"] for r in rows}):
            pts = [(r[name]["measured"], r[name]["simulated"]) for r in rows if r["system"] == system]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=system, s=28)
        vals = [v for r in rows for v in (r[name]["measured"], r[name]["simulated"]) if v is not None]
        lo, hi = min(vals) * 0.8, max(vals) * 1.2
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        b = BOUNDS[name]
        ax.fill_between([lo, hi], [lo * (1 - b), hi * (1 - b)], [lo * (1 + b), hi * (1 + b)], alpha=0.12, color="g")
        ax.set(title=name, xlabel="measured", ylabel="simulated", xlim=(lo, hi), ylim=(lo, hi))
        ax.legend(fontsize=7)
    fig.suptitle("pdserve simulate vs loadtests.bench (shaded: the issue's error bound)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="loadtests.bench result directories")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--profiles", default=None, help="profile file (default: pdserve simulate's)")
    p.add_argument(
        "--system-config",
        action="append",
        default=[],
        metavar="LABEL=CONFIG",
        help="the config a run's system ran (when the run recorded one not in the repository)",
    )
    args = p.parse_args(argv)
    config_of = dict(e.split("=", 1) for e in args.system_config)
    rows = [row for run in args.runs for row in validate_run(Path(run), args.seeds, args.profiles, config_of)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=2) + "\n")
    (out / "validation.md").write_text(table(rows) + "\n")
    plot(rows, out / "simulated-vs-measured.png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
