"""``pdserve plan``: an inventory, a model, a workload and SLOs -> the planned config (checked as
``pdserve validate`` checks it) and the report, written to files or printed (the planning is
capacity/plan.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from capacity.inventory import load_inventory
from capacity.plan import PlanResult, plan, simulated_goodput_per_dollar
from capacity.roofline import load_model
from capacity.search import SearchConfig
from capacity.workload import load_workload
from router.config import SloConfig
from serve.config import ClusterConfig


def run_plan(
    inventory: str,
    model: str,
    workload: str,
    rate: float | None,
    slo: SloConfig,
    search: SearchConfig,
    dtype: str = "bfloat16",
    confirm_requests: int = 0,
    out: str | Path | None = None,
    report: str | Path | None = None,
    show=print,
) -> PlanResult:
    """Plan; the config goes to ``out`` (else ``show``), the report to ``report`` and its data to
    ``REPORT.json`` (else the report to ``show``)."""
    wl = load_workload(workload).with_rate(rate)
    confirm = simulated_goodput_per_dollar(wl, confirm_requests, search.seed) if confirm_requests else None
    result = plan(load_inventory(inventory), load_model(model), wl, slo, search=search, dtype=dtype, confirm=confirm)
    ClusterConfig.from_dict(result.config)  # what pdserve validate checks
    text = yaml.safe_dump(result.config, sort_keys=False)
    if out:
        header = f"# pdserve plan {inventory} --model {model}: {result.summary()['estimate_kind']}\n"
        Path(out).write_text(header + text)
    else:
        show(text)
    if report:
        Path(report).write_text(result.report())
        Path(f"{report}.json").write_text(json.dumps(result.summary(), indent=1))
    else:
        show(result.report())
    return result
