"""`pdserve serve` as a user runs it: default config, ready line, one request, Ctrl-C, nothing left."""

from __future__ import annotations

import csv
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
