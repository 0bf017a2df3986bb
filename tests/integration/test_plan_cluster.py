"""`pdserve plan` on this machine's CPU cores (configs/inventories/this-machine-cpu.yaml) writes a config
that starts as a real cluster and serves the bundled model."""

from __future__ import annotations

import httpx
import pytest

from serve.cli import main
from serve.config import ClusterConfig
from tests.conftest import REPO
from tests.integration.cluster_utils import free_port, health, running_cluster, wait_for

pytestmark = pytest.mark.integration


def test_planned_cpu_config_starts_and_serves(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    argv = ["plan", str(REPO / "configs" / "inventories" / "this-machine-cpu.yaml"), "--model", "bundled:smollm2"]
    argv += ["--workload", str(REPO / "configs" / "workloads" / "cpu-small.yaml")]
    argv += ["--slo-ttft-ms", "4000", "--slo-tpot-ms", "250", "--out", str(out), "--report", str(tmp_path / "r.md")]
    assert main(argv) == 0
    capsys.readouterr()
    planned = ClusterConfig.from_yaml(out)
    port = free_port()
    # test-only edits: a free port, the test app name, eager engines (a fast start)
    overrides = [f"server.port={port}", "app_name=pdserve-test"]
    overrides += [f"pools.{i}.engine.enforce_eager=true" for i in range(len(planned.pools))]
    cfg = ClusterConfig.from_yaml(out, overrides)
    with running_cluster(cfg) as cluster:
        body = wait_for(lambda: (b := health(cluster.base_url))["status"] == "ok" and b, timeout_s=120)
        assert set(body["pools"]) == {p.name for p in planned.pools}
        for p in planned.pools:
            assert body["pools"][p.name]["replicas"] == p.replicas.min
        r = httpx.post(
            f"{cluster.base_url}/v1/chat/completions",
            timeout=120,
            json={
                "model": planned.model.name,
                "max_tokens": 16,
                "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
            },
        )
        assert r.status_code == 200, r.text
        # greedy text depends on the engines' dtype and compile mode (eager here); that it is generated is the point
        body = r.json()
        assert body["choices"][0]["message"]["content"].strip() and body["usage"]["completion_tokens"] > 0
