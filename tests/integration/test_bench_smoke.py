"""The benchmark harness's smoke mode, as CI runs it: one system, one small workload, real cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_bench_smoke_produces_report_and_plots(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "loadtests.bench", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["system"] == "ours" and row["requests"] == 8
    # admission may shed some requests early (429/503): every request is served or cleanly rejected
    rejected = sum(row["rejected"].values())
    # (the first request finds an idle cluster and is always admitted)
    assert row["ok"] >= 1 and row["ok"] + rejected == 8 and not row["errors"]
    assert set(row["rejected"]) <= {"tier_quota", "overload_ttft", "overload_tpot"}
    # sane, not fast: the smoke run checks the harness; speed claims come from full runs
    assert 0 < row["ttft_s"]["p50"] < 120 and 0 < row["itl_s"]["p50"] < 5
    assert row["output_tps"] > 0 and 0 <= row["goodput_rps"] <= row["throughput_rps"] > 0
    assert row["server_rss_bytes"] > 1 << 30  # Ray + two engines
    raw = json.loads((out / "raw" / "ours-random-1.0.json").read_text())
    assert "pdserve_kv_handoff_bytes_total" in raw["metrics"]
    assert all(r["completion_tokens"] == 16 for r in raw["records"] if r["outcome"] == "ok")
    assert raw["timeline"] and {"queue", "running", "replicas"} <= set(raw["timeline"][0])
    report = (out / "report.md").read_text()
    assert f"| ours | random | 1.0 | {row['ok']}/8 |" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["cdf-random-1.0.png", "goodput-random.png"]
    assert all((out / p).stat().st_size > 5000 for p in pngs)
