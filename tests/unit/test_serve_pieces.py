import json

import pytest

from serve.adapters import RequestAdapter
from serve.app import ROUTER_CLASS, pool_deployment_options
from serve.config import DEFAULT_CONFIG, ClusterConfig
from serve.metrics import ClusterMetrics
from serve.model_prep import MANIFEST, verify_manifest, write_manifest
from serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from workers.messages import WorkerStats


class TestDeploymentOptions:
    def test_fixed_and_autoscaled_pools(self):
        data = ClusterConfig.from_yaml(DEFAULT_CONFIG).model_dump(mode="json")
        data["pools"][1]["replicas"] = {"min": 1, "max": 3}
        cfg = ClusterConfig.from_dict(data)
        fixed = pool_deployment_options(cfg.pools[0], cfg)
        auto = pool_deployment_options(cfg.pools[1], cfg)
        assert fixed["name"] == "pool-prefill" and fixed["num_replicas"] == 1
        assert auto["autoscaling_config"].max_replicas == 3 and "num_replicas" not in auto
        rr = fixed["request_router_config"]
        assert rr.request_router_class == ROUTER_CLASS
        assert rr.request_router_kwargs == {"pool": "prefill", "role": "prefill"}

    def test_gpu_pool_requests_gpus(self):
        data = ClusterConfig.from_yaml(DEFAULT_CONFIG).model_dump(mode="json")
        data["pools"][0]["device"] = {"kind": "gpu", "gpu_type": "A100", "count": 1}
        data["pools"][0]["engine"]["block_size"] = 128
        cfg = ClusterConfig.from_dict(data)
        actor = pool_deployment_options(cfg.pools[0], cfg)["ray_actor_options"]
        assert actor["num_gpus"] == 1 and actor["accelerator_type"] == "A100"


class TestModelManifest:
    def test_detects_missing_and_corrupt_files(self, tmp_path):
        (tmp_path / "model.safetensors").write_bytes(b"weights")
        (tmp_path / "config.json").write_text("{}")
        write_manifest(tmp_path, {"package": "x"})
        assert verify_manifest(tmp_path) == (True, "ok")
        (tmp_path / "model.safetensors").write_bytes(b"weightz")
        assert verify_manifest(tmp_path)[1] == "checksum mismatch for model.safetensors"
        (tmp_path / "config.json").unlink()
        assert not verify_manifest(tmp_path)[0]

    def test_no_manifest(self, tmp_path):
        assert verify_manifest(tmp_path) == (False, "no manifest")
        (tmp_path / MANIFEST).write_text("not json")
        assert not verify_manifest(tmp_path)[0]

    def test_prepared_model_is_verified(self, model_dir):
        ok, why = verify_manifest(model_dir)
        assert ok, why
        cfg = json.loads((model_dir / "config.json").read_text())
        assert cfg["num_hidden_layers"] == 30 and cfg["num_key_value_heads"] == 3


@pytest.fixture(scope="module")
def adapter(tokenizer):
    return RequestAdapter(
        tokenizer, "m", max_model_len=64, default_tier="free", known_tiers={"free": 10, "premium": 100}
    )


class TestRequestAdapter:
    def test_warmup_job_is_bounded_salted_and_labelled(self, adapter, tokenizer):
        j = adapter.warmup_job(512, seed=1)
        assert j.desc.num_prompt_tokens == 64 - 8 == len(j.prompt_token_ids)  # clamped to the context
        assert j.desc.tier == "warmup" and j.cache_salt == "warmup" and j.sampling.max_tokens == 8
        assert all(100 <= t < len(tokenizer) for t in j.prompt_token_ids)
        assert adapter.warmup_job(512, seed=1).prompt_token_ids == j.prompt_token_ids  # seeded

    def test_chat_template_and_defaults(self, adapter, tokenizer):
        body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
        p = adapter.build("chat", body, None)
        text = tokenizer.decode(list(p.job.prompt_token_ids))
        assert "Hi" in text and text.rstrip().endswith("assistant")
        assert p.job.sampling.max_tokens == 64 - len(p.job.prompt_token_ids)
        assert p.job.desc.tier == "free" and p.response_id.startswith("chatcmpl-")
        assert p.job.priority == -10  # vLLM serves lower values first

    def test_token_prompt_and_tier(self, adapter):
        body = CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3], "max_tokens": 4, "stop": "x"})
        p = adapter.build("completion", body, "Premium")
        assert p.job.prompt_token_ids == (1, 2, 3) and p.job.desc.tier == "premium"
        assert p.job.priority == -100  # ahead of free (-10) in a priority-scheduling engine
        assert p.job.sampling.stop == ("x",)

    @pytest.mark.parametrize(
        "kind, body, status, code",
        [
            ("chat", {"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
            (
                "chat",
                {"model": "m", "messages": [{"role": "user", "content": "w " * 80}]},
                400,
                "context_length_exceeded",
            ),
            ("completion", {"model": "m", "prompt": "x", "max_tokens": 64}, 400, "context_length_exceeded"),
            ("completion", {"model": "m", "prompt": [10**9]}, 400, "invalid_value"),
        ],
    )
    def test_errors(self, adapter, kind, body, status, code):
        cls = ChatCompletionRequest if kind == "chat" else CompletionRequest
        with pytest.raises(ApiError) as ei:
            adapter.build(kind, cls.model_validate(body), None)
        assert (ei.value.status_code, ei.value.code) == (status, code)

    def test_unknown_tier(self, adapter):
        body = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
        with pytest.raises(ApiError) as ei:
            adapter.build("completion", body, "gold")
        assert ei.value.param == "x-customer-tier"


def test_metrics_render_worker_stats():
    stats = [
        WorkerStats(
            endpoint_id="d1",
            pool="decode",
            role="decode",
            num_waiting=2,
            kv_usage=0.5,
            kv_transfers_total=3,
            kv_transfer_bytes_total=1024,
            prompt_tokens_external_kv=40,
        )
    ]
    m = ClusterMetrics(lambda: stats)
    m.observe_handoff_durations([0.01, 0.02])
    text = m.render().decode()
    assert 'pdserve_pool_queue_depth{pool="decode",role="decode"} 2.0' in text
    assert 'pdserve_kv_handoff_bytes_total{pool="decode"} 1024.0' in text
    assert 'pdserve_engine_prompt_tokens_total{endpoint="d1",pool="decode",source="external_kv_transfer"} 40.0' in text
    assert "pdserve_kv_handoff_duration_seconds_count 2.0" in text


def test_integration_scrape_parses_the_rendered_exposition():
    """tests/integration/cluster_utils.py's parser: samples keyed by exposed name (suffix kept) and labels."""
    from tests.integration.cluster_utils import metric_sum, parse_samples

    stats = [
        WorkerStats(endpoint_id=f"d{i}", pool="decode", role="decode", num_waiting=i, kv_usage=0.25) for i in (1, 2)
    ]
    m = ClusterMetrics(lambda: stats)
    m.observe_handoff_durations([0.01, 0.02])
    m.prefill_fallbacks.labels("decode_retry").inc(2)
    samples = parse_samples(m.render().decode())
    assert samples[("pdserve_pool_queue_depth", frozenset({("pool", "decode"), ("role", "decode")}))] == 3.0
    assert metric_sum(samples, "pdserve_engine_kv_usage_ratio") == 0.5
    assert metric_sum(samples, "pdserve_engine_kv_usage_ratio", endpoint="d2") == 0.25
    assert metric_sum(samples, "pdserve_kv_handoff_duration_seconds_count") == 2.0
    assert metric_sum(samples, "pdserve_prefill_fallbacks_total", reason="decode_retry") == 2.0


def test_prefix_index_metrics_are_read_at_scrape_time():
    from tests.integration.cluster_utils import metric_sum, parse_samples

    blocks, events = {"d1": 3, "d2": 5}, [7]
    m = ClusterMetrics(lambda: [])
    m.watch_prefix_index(lambda: blocks, lambda: events[0])
    samples = parse_samples(m.render().decode())
    assert metric_sum(samples, "pdserve_prefix_index_blocks", endpoint="d2") == 5
    assert metric_sum(samples, "pdserve_prefix_index_kv_events") == 7
    del blocks["d2"]  # a replica the index forgot is gone from the next scrape
    events[0] = 9
    samples = parse_samples(m.render().decode())
    assert metric_sum(samples, "pdserve_prefix_index_blocks") == 3
    assert metric_sum(samples, "pdserve_prefix_index_blocks", endpoint="d2") == 0
    assert metric_sum(samples, "pdserve_prefix_index_kv_events") == 9


class TestStartupWait:
    """serve/runner.wait_app_running over a FAKE ``serve.status()`` (scripted application states)."""

    @staticmethod
    def _fake_status(monkeypatch, states):
        from types import SimpleNamespace

        from ray import serve

        seq = iter(states)

        def status():
            st = next(seq, states[-1])
            dep = SimpleNamespace(
                status="UPDATING",
                replica_states={"STARTING": 1, "RUNNING": 1},
                message="1 replica taking long to initialize",
            )
            return SimpleNamespace(
                applications={"app": SimpleNamespace(status=st, message="", deployments={"pool-decode": dep})}
            )

        monkeypatch.setattr(serve, "status", status)

    def test_returns_once_running(self, monkeypatch):
        from serve.runner import wait_app_running

        self._fake_status(monkeypatch, ["DEPLOYING", "DEPLOYING", "RUNNING"])
        wait_app_running("app", deadline=float("inf"), poll_s=0)

    def test_deploy_failed_raises_with_deployment_states(self, monkeypatch):
        from serve.runner import wait_app_running

        self._fake_status(monkeypatch, ["DEPLOYING", "DEPLOY_FAILED"])
        with pytest.raises(RuntimeError, match="pool-decode UPDATING replicas=.*STARTING"):
            wait_app_running("app", deadline=float("inf"), poll_s=0)

    def test_stuck_replica_times_out_instead_of_hanging(self, monkeypatch):
        import time

        from serve.runner import wait_app_running

        self._fake_status(monkeypatch, ["DEPLOYING"])
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="not running in time: .*taking long to initialize"):
            wait_app_running("app", deadline=time.monotonic() + 0.2, poll_s=0.01)
        assert time.monotonic() - t0 < 5


def test_push_reservation_waits_a_few_predicted_ttfts_within_the_prefill_timeout():
    from serve.orchestrator import push_wait_s

    assert push_wait_s(16.0, 60.0) == pytest.approx(48.0)  # a 4k-token prompt: 16 s of prefill on one core
    assert push_wait_s(0.5, 60.0) == pytest.approx(1.5)  # short: given up on soon (the connector keeps
    # at least its read_timeout_s)
    assert push_wait_s(40.0, 60.0) == 60.0  # never past the router's own prefill wait
    assert push_wait_s(None, 60.0) == 60.0  # admission off: no prediction


class TestDirectIngressEnv:
    """serve.runner.direct_ingress_env read by Ray Serve's own port allocator (a fresh interpreter:
    Serve reads these settings at import)."""

    ALLOCATE_TWICE = (
        "from ray.serve._private.node_port_manager import PortAllocator;"
        "from ray.serve._private.constants import RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT as lo,"
        " RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT as hi;"
        "a = PortAllocator(lo, hi, 'http', 'node');"
        "first = a.allocate('replica-1'); a.release('replica-1', first);"
        "print(first, a.allocate('replica-2'))"
    )

    def test_the_ingress_replica_gets_the_configured_port_again_after_a_restart(self):
        import os
        import subprocess
        import sys

        from serve.config import ServerConfig
        from serve.runner import direct_ingress_env

        env = {**os.environ, **direct_ingress_env(ServerConfig(port=18123))}
        out = subprocess.run(
            [sys.executable, "-c", self.ALLOCATE_TWICE], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["18123", "18123"]

    def test_off_leaves_serve_alone(self):
        from serve.config import ServerConfig
        from serve.runner import direct_ingress_env

        assert direct_ingress_env(ServerConfig(direct_ingress=False)) == {}
