"""The planner on mixed GPU inventories against its two baselines (every group colocated, an even
prefill/decode split): plans, predicted goodput per dollar and ratios, recorded as JSON + PNG + markdown.

Figures are the planner's analytic estimate on roofline profiles (capacity/roofline.py), not measurements;
with ``--confirm N`` also the simulator's (capacity/simulator.py: N requests through the real router on the
same roofline profiles) for the chosen plan and both baselines.

    python -m loadtests.plan_study [--out loadtests/results/<run>-plan] [--rate 200] [--confirm 2000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
import yaml

from capacity.inventory import load_inventory
from capacity.plan import plan, simulated_goodput_per_dollar
from capacity.roofline import load_model
from capacity.search import SearchConfig
from capacity.workload import load_workload
from router.config import SloConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INVENTORIES = ("a100-l4", "h100-a10g-t4")
SYSTEMS = ("plan", "colocated", "even-split")


def run(out: Path, model: str, workload: str, rate: float, slo: SloConfig, seed: int, confirm: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    wl = load_workload(REPO / "configs" / "workloads" / f"{workload}.yaml").with_rate(rate)
    spec = load_model(model)
    summary = {"model": model, "workload": workload, "rate": rate, "slo": slo.model_dump(), "inventories": {}}
    for name in INVENTORIES:
        res = plan(
            load_inventory(REPO / "configs" / "inventories" / f"{name}.yaml"),
            spec,
            wl,
            slo,
            SearchConfig(seed=seed),
            confirm=simulated_goodput_per_dollar(wl, confirm, seed) if confirm else None,
        )
        (out / f"{name}.config.yaml").write_text(
            f"# pdserve plan configs/inventories/{name}.yaml --model {model} --workload {workload} --rate {rate:g}"
            f" --slo-ttft-ms {slo.ttft_ms:g} --slo-tpot-ms {slo.tpot_ms:g} --seed {seed}: estimate (roofline)\n"
            + yaml.safe_dump(res.config, sort_keys=False)
        )
        (out / f"{name}.report.md").write_text(res.report())
        summary["inventories"][name] = res.summary()
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    chart(out / "goodput_per_dollar.png", summary)
    return summary


def chart(path: Path, summary: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for k, system in enumerate(SYSTEMS):
        values = [summary["inventories"][n]["results"][system]["goodput_per_dollar"] for n in INVENTORIES]
        bars = ax.bar([i + (k - 1) * width for i in range(len(INVENTORIES))], values, width, label=system)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        simulated = [summary["inventories"][n]["confirmed"].get(system) for n in INVENTORIES]
        if all(v is not None for v in simulated):
            bars = ax.bar(
                [i + (k - 1) * width for i in range(len(INVENTORIES))],
                simulated,
                width * 0.4,
                color="none",
                edgecolor="black",
                hatch="//",
                label=f"{system} (simulated)" if k == 0 else None,
            )
    ax.set_xticks(range(len(INVENTORIES)), INVENTORIES)
    ax.set_ylabel("SLO-meeting requests per USD")
    ax.set_title(
        f"{summary['model']} @ {summary['rate']:g} req/s offered, SLO TTFT {summary['slo']['ttft_ms']:g} ms / "
        f"TPOT {summary['slo']['tpot_ms']:g} ms\nestimate (roofline), not measured",
        fontsize=9,
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--workload", default="chat")
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--confirm", type=int, default=0, help="simulate N requests per plan and baseline")
    a = p.parse_args()
    out = Path(a.out or REPO / "loadtests" / "results" / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-plan")
    slo = SloConfig(ttft_ms=a.slo_ttft_ms, tpot_ms=a.slo_tpot_ms)
    s = run(out, a.model, a.workload, a.rate, slo, a.seed, a.confirm)
    for name, inv in s["inventories"].items():
        print(name, json.dumps(inv["ratios"]), {k: v["goodput_per_dollar"] for k, v in inv["results"].items()})
        print(name, "simulated:", json.dumps(inv["confirmed"]))
    print(out)


if __name__ == "__main__":
    main()
