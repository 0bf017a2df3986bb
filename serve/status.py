"""``pdserve status``: a running cluster's /health body as text (pure; serve/cli.py fetches it).

One line per pool: its role, replicas running / healthy, the planner's desired (fractional, before
stabilization) and target replicas with its last decision (autoscaled pools), the configured range, and the
engines' load. Then, if /health carries ``flex`` (``{pool: {endpoint_id: role}}``), each flex replica's role.
"""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def pool_line(name: str, p: dict[str, Any]) -> str:
    plan = p.get("planner") or {}
    lo, hi = p.get("min_replicas"), p.get("max_replicas")
    rng = f" range={lo}..{hi}" if lo is not None and hi is not None else ""
    if plan.get("autoscaling"):
        scaling = (
            f" desired={_fmt(plan.get('desired_replicas'))} target={_fmt(plan.get('target_replicas'))}"
            f" last_decision={_fmt(plan.get('last_decision'))}"
        )
    else:
        scaling = f" desired={_fmt(plan.get('desired_replicas'))}" if plan else ""
    kv = p.get("kv_usage") or []
    return (
        f"  pool {name:<12} role={p.get('role', '?'):<8} replicas={p.get('replicas', 0)} "
        f"healthy={p.get('healthy', 0)}{scaling}{rng} running={p.get('running', 0)} "
        f"waiting={p.get('waiting', 0)} kv_usage={kv}"
    )


def flex_lines(flex: dict[str, dict[str, str]]) -> list[str]:
    lines = []
    for pool, roles in sorted(flex.items()):
        counts = {r: sum(1 for v in roles.values() if v == r) for r in sorted(set(roles.values()))}
        summary = " ".join(f"{r}={n}" for r, n in counts.items()) or "no replicas"
        lines.append(f"  flex {pool:<12} {summary}")
        lines += [f"    {endpoint}  {role}" for endpoint, role in sorted(roles.items())]
    return lines


def render(url: str, body: dict[str, Any]) -> list[str]:
    lines = [f"{url}  status={body.get('status')}  model={body.get('model')}"]
    lines += [pool_line(name, p) for name, p in sorted((body.get("pools") or {}).items())]
    if body.get("flex"):
        lines += flex_lines(body["flex"])
    return lines
