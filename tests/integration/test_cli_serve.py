"""`pdserve serve` as a user runs it: default config, ready line, one request, Ctrl-C, nothing left."""

from __future__ import annotations

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


def test_serve_default_config_then_ctrl_c_leaves_no_processes():
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()  # keep draining: a full pipe would block the server
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 600 and proc.poll() is None:
            if any(l.startswith("[pdserve] ready in") for l in list(lines)):
                break
            time.sleep(0.5)
        assert any(l.startswith("[pdserve] ready in") for l in lines), "".join(lines[-40:])
        assert any(f"http://127.0.0.1:{port}/v1" in l for l in lines)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "SmolLM2-135M-Instruct", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
        tree = psutil.Process(proc.pid).children(recursive=True)
        engines = [p for p in tree if p.name().startswith("VLLM::")]
        assert len(engines) >= 2, [p.name() for p in tree]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=10)
        assert proc.returncode == 0, "".join(lines[-40:])
        assert any(l.startswith("[pdserve] stopped") for l in lines)
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"orphans left after Ctrl-C: {[(p.pid, p.name()) for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
