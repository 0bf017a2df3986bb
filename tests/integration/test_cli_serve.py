"""`pdserve serve` as a user runs it: default config, ready line, one request, a locust run and the benchmark's
smoke mode against it, Ctrl-C, nothing left."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import REPO
from tests.integration.cluster_utils import free_port

pytestmark = pytest.mark.integration


def run_locust(base_url: str, csv_prefix) -> dict[tuple[str, str], dict]:
    """The shipped locustfile, headless, bounded (2 users, 20 s), small random prompts; CSV stats rows."""
    env = {
        **os.environ,
        "PDSERVE_WORKLOAD": "random",
        "PDSERVE_WORKLOAD_ARGS": '{"input_tokens": 64, "output_tokens": 8}',
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            "loadtests/locustfile.py",
            "--headless",
            "-H",
            base_url,
            "-u",
            "2",
            "-r",
            "2",
            "-t",
            "20s",
            "--stop-timeout",
            "30",
            "--csv",
            str(csv_prefix),
            "--only-summary",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(f"{csv_prefix}_stats.csv") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def run_bench_smoke(base_url: str, tmp_path) -> None:
    """The benchmark harness's smoke mode, as a user runs it against a running server (``--url``): two small
    workloads (open loop, and closed-loop conversations), a report and plots; every request served or cleanly
    refused."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.bench", "--smoke", "--url", base_url, "--out", str(out)],
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
    assert row["server_rss_bytes"] is None and row["ready_s"] is None  # a server the bench did not start
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


def test_serve_default_config_then_ctrl_c_leaves_no_processes(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()  # keep draining: a full pipe would block the server
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 600 and proc.poll() is None:
            if any(line.startswith("[pdserve] ready in") for line in list(lines)):
                break
            time.sleep(0.5)
        assert any(line.startswith("[pdserve] ready in") for line in lines), "".join(lines[-40:])
        assert any(f"http://127.0.0.1:{port}/v1" in line for line in lines)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            timeout=120,
            json={
                "model": "SmolLM2-135M-Instruct",
                "max_tokens": 16,
                "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
            },
        )
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
        stats = run_locust(f"http://127.0.0.1:{port}", tmp_path / "locust")
        main = stats[("POST", "chat:random")]
        rejected = sum(int(r["Request Count"]) for (t, _), r in stats.items() if t == "REJECTED")
        served = int(main["Request Count"]) - rejected  # admission may shed some (503/429)
        assert served >= 4 and int(main["Failure Count"]) == 0
        # a request cut off when the run stops may have fired its TTFT without finishing
        assert served <= int(stats[("TTFT", "random")]["Request Count"]) <= served + 2
        assert int(stats[("ITL", "random")]["Request Count"]) >= served
        assert int(stats[("TPOT", "random")]["Request Count"]) >= served - 1
        run_bench_smoke(f"http://127.0.0.1:{port}", tmp_path)
        tree = psutil.Process(proc.pid).children(recursive=True)
        engines = [p for p in tree if p.name().startswith("VLLM::")]
        assert len(engines) >= 2, [p.name() for p in tree]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=10)
        assert proc.returncode == 0, "".join(lines[-40:])
        assert any(line.startswith("[pdserve] stopped") for line in lines)
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"orphans left after Ctrl-C: {[(p.pid, p.name()) for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
