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
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.bench", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    row, convo = summary["rows"]
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
    answered = [r for r in raw["records"] if r["outcome"] == "ok"]
    assert len(answered) == row["ok"] and all(r["completion_tokens"] == 16 for r in answered)
    assert raw["timeline"] and {"queue", "running", "replicas"} <= set(raw["timeline"][0])
    report = (out / "report.md").read_text()
    assert f"| ours | random | 1.0 | {row['ok']}/8 |" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["cdf-multi-turn-1.0.png", "cdf-random-1.0.png", "goodput-multi-turn.png", "goodput-random.png"]
    assert all((out / p).stat().st_size > 5000 for p in pngs)

    # closed loop: two 2-turn conversations; a turn is sent only after the previous answer, with it as history
    assert convo["workload"] == "multi-turn" and convo["requests"] + convo["skipped"] == 4
    records = json.loads((out / "raw" / "ours-multi-turn-1.0.json").read_text())["records"]
    turns = {"/".join(r["tag"].split("/")[:2]): r for r in records}  # tag c<conversation>/t<turn>/system-<k>
    assert turns and all(r["outcome"] in ("ok", "rejected") for r in records)
    # at least one turn answered in full (the first turn finds the cluster idle, as above)
    answered = [r for r in records if r["outcome"] == "ok"]
    assert answered and all(r["completion_tokens"] == 8 for r in answered), records
    for conv in ("c0", "c1"):
        first, second = turns.get(f"{conv}/t0"), turns.get(f"{conv}/t1")
        if first and second:
            assert first["outcome"] == "ok" and second["start_s"] >= first["start_s"] + first["e2e_s"]
            if second["outcome"] == "ok":
                # the second prompt holds the first prompt, its 8-token answer and a ~16-token new turn
                assert second["prompt_tokens"] >= first["prompt_tokens"] + 8 + 10, (first, second)
