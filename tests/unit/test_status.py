"""``pdserve status``: a recorded /health body (an autoscaled decode pool, a flex pool) as text."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from serve import cli
from serve.status import render

HEALTH = json.loads((Path(__file__).parent / "data" / "health_autoscale_flex.json").read_text())


def test_render_shows_replicas_planner_decisions_and_flex_roles():
    lines = render("http://h:8000", HEALTH)
    assert lines[0] == "http://h:8000  status=ok  model=SmolLM2-135M-Instruct"
    decode = next(line for line in lines if "pool decode" in line)
    for part in ("replicas=2", "healthy=1", "desired=1.375", "target=2", "last_decision=hold_downscale_window"):
        assert part in decode
    assert "range=0..2" in decode
    prefill = next(line for line in lines if "pool prefill" in line)
    assert "desired=0.214" in prefill and "target=" not in prefill  # not autoscaled: signals only
    mixed = next(line for line in lines if "pool mixed" in line)
    assert "desired" not in mixed  # no plan yet
    i = lines.index(next(line for line in lines if line.startswith("  flex mixed")))
    assert "decode=1" in lines[i] and "prefill=1" in lines[i]
    assert lines[i + 1 :] == ["    f0dd  prefill", "    f1ee  decode"]


def test_render_without_flex_or_planner():
    body = {k: v for k, v in HEALTH.items() if k != "flex"}
    assert not any("flex" in line for line in render("u", body))
    assert render("u", {"status": "unavailable", "model": "m", "pools": {}}) == ["u  status=unavailable  model=m"]


def test_cmd_status_prints_the_cluster(monkeypatch, capsys):
    seen = []

    def fake_get(url, timeout):
        seen.append(url)
        return httpx.Response(200, json=HEALTH)

    monkeypatch.setattr(httpx, "get", fake_get)
    assert cli.main(["status", "--url", "http://h:8000/"]) == 0
    assert seen == ["http://h:8000/health"]
    out = capsys.readouterr().out.splitlines()
    assert out == render("http://h:8000/", HEALTH)
