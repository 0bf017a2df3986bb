"""One vLLM engine (AsyncLLM) in a subprocess, driven over stdin/stdout JSON lines: what the
integration tests and loadtests/kv/kv_bench.py use to run real prefill/decode/colocated engines side by
side without Ray. Not part of the connector.

Server (a subprocess; vLLM spawns its own engine-core and worker processes under it)::

    python -m loadtests.kv.kv_harness '<json EngineOptions>'

Protocol: every reply line starts with ``@@kvh@@ `` (vLLM logs share stdout). Requests:
``{"op": "generate", "requests": [{"prompt_token_ids": [...], "max_tokens": n,
"kv_transfer_params": {...}|null}], "concurrent": false}`` -> ``{"outputs": [{"token_ids",
"kv_transfer_params", "latency_s", "ttft_s"}]}``; ``{"op": "stats"}`` -> ``{"kv_cache_usage",
"num_running", "num_waiting", "connector": KVTransferStats dict (accumulated), "connector_raw"}``;
``{"op": "exit"}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

PREFIX = "@@kvh@@ "


# ---------------------------------------------------------------------------------- client side
class EngineProcess:
    """Client of one harness subprocess. Every wait is bounded; ``stop`` always kills the group."""

    def __init__(
        self,
        options: dict[str, Any],
        env: dict[str, str],
        log_path: str,
        cwd: str,
        start_timeout_s: float = 300.0,
        wait: bool = True,
    ):
        self.options = options
        self._log = open(log_path, "w")  # noqa: SIM115 (lives as long as the process)
        self._replies: queue.Queue[dict] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loadtests.kv.kv_harness", json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env},
            cwd=cwd,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ready: dict = {}
        if wait:
            self.wait_ready(start_timeout_s)

    def wait_ready(self, timeout_s: float = 300.0) -> EngineProcess:
        if not self.ready:
            self.ready = self._wait(timeout_s)
        if not self.ready.get("ready"):
            raise RuntimeError(f"engine {self.options.get('name')} failed to start: {self.ready}")
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self._replies.put(json.loads(line[len(PREFIX) :]))
            elif not self._log.closed:
                self._log.write(line)
                self._log.flush()
        self._replies.put({"error": "engine process exited", "returncode": self.proc.poll()})

    def _wait(self, timeout_s: float) -> dict:
        try:
            return self._replies.get(timeout=timeout_s)
        except queue.Empty:
            return {"error": f"no reply within {timeout_s} s"}

    def call(self, timeout_s: float = 300.0, **request: Any) -> dict:
        self.submit(**request)
        return self.result(timeout_s)

    def submit(self, **request: Any) -> None:
        """Send a request without waiting (e.g. a push-mode decode before its prefill); replies come
        back in order through :meth:`result`."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"engine {self.options.get('name')} is not running")
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout_s: float = 300.0) -> dict:
        reply = self._wait(timeout_s)
        if "error" in reply:
            raise RuntimeError(f"engine {self.options.get('name')}: {reply}")
        return reply

    def generate(self, requests: list[dict], concurrent: bool = False, timeout_s: float = 300.0) -> list[dict]:
        return self.call(op="generate", requests=requests, concurrent=concurrent, timeout_s=timeout_s)["outputs"]

    def stats(self) -> dict:
        return self.call(op="stats", timeout_s=30)

    def kill(self) -> None:
        """Hard kill (SIGKILL to the whole process group), e.g. to simulate a dead peer."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        self._log.close()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None and self.ready.get("ready"):  # a starting engine reads no stdin
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                pass
        if not self._log.closed:
            self.kill()


# ---------------------------------------------------------------------------------- server side
def _engine_args(o: dict[str, Any]):
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs: dict[str, Any] = {
        "model": o["model"],
        "block_size": o.get("block_size", 128),
        "max_model_len": o.get("max_model_len", 2048),
        "dtype": o.get("dtype", "float32"),
        "enforce_eager": True,
        "enable_prefix_caching": o.get("enable_prefix_caching", False),
        "max_num_seqs": o.get("max_num_seqs", 32),
        "disable_log_stats": False,
    }
    if o.get("max_num_batched_tokens"):
        kwargs["max_num_batched_tokens"] = o["max_num_batched_tokens"]
    if o.get("kv_transfer_config"):
        kwargs["kv_transfer_config"] = o["kv_transfer_config"]
    return AsyncEngineArgs(**kwargs)


class _Capture:
    """Latest scheduler stats and the connector stats accumulated since start."""

    def __init__(self) -> None:
        self.kv_cache_usage = 0.0
        self.num_running = self.num_waiting = 0
        self.connector: dict[str, Any] = {}
        self.connector_raw: list[dict[str, Any]] = []

    def factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        capture = self

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is None:
                    return
                capture.kv_cache_usage = scheduler_stats.kv_cache_usage
                capture.num_running = scheduler_stats.num_running_reqs
                capture.num_waiting = scheduler_stats.num_waiting_reqs
                data = scheduler_stats.kv_connector_stats
                if data:
                    capture.add(data)

            def log_engine_initialized(self):
                pass

        return Logger

    def add(self, data: dict[str, Any]) -> None:
        if "num_handoffs_sent" in data:  # our KVTransferStats
            from kvtransfer.stats import KVTransferStats

            self.connector = (
                KVTransferStats.from_dict(self.connector).aggregate(KVTransferStats.from_dict(data)).to_dict()
            )
        else:  # another connector's stats: keep the raw dicts
            self.connector_raw.append(data)


async def _one(llm, req: dict[str, Any], idx: int) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"kv_transfer_params": req["kv_transfer_params"]} if req.get("kv_transfer_params") else None
    params = SamplingParams(
        temperature=0.0, max_tokens=req.get("max_tokens", 16), extra_args=extra, ignore_eos=req.get("ignore_eos", False)
    )
    t0 = time.perf_counter()
    ttft = None
    final = None
    async for out in llm.generate(
        TokensPrompt(prompt_token_ids=req["prompt_token_ids"]),
        params,
        request_id=f"{req.get('id', 'r')}-{idx}-{time.monotonic_ns()}",
    ):
        if ttft is None and out.outputs and out.outputs[0].token_ids:
            ttft = time.perf_counter() - t0
        final = out
    return {
        "token_ids": list(final.outputs[0].token_ids),
        "kv_transfer_params": final.kv_transfer_params,
        "finish_reason": final.outputs[0].finish_reason,
        "latency_s": time.perf_counter() - t0,
        "ttft_s": ttft,
    }


async def _serve(options: dict[str, Any]) -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    capture = _Capture()
    llm = AsyncLLM.from_engine_args(_engine_args(options), stat_loggers=[capture.factory()])

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "pid": os.getpid()})
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        msg = json.loads(line)
        try:
            if msg["op"] == "exit":
                break
            if msg["op"] == "generate":
                reqs = msg["requests"]
                if msg.get("concurrent"):
                    outs = await asyncio.gather(*(_one(llm, r, i) for i, r in enumerate(reqs)))
                else:
                    outs = [await _one(llm, r, i) for i, r in enumerate(reqs)]
                reply({"outputs": list(outs)})
            elif msg["op"] == "stats":
                reply(
                    {
                        "kv_cache_usage": capture.kv_cache_usage,
                        "num_running": capture.num_running,
                        "num_waiting": capture.num_waiting,
                        "connector": capture.connector,
                        "connector_raw": capture.connector_raw,
                    }
                )
            else:
                reply({"error": f"unknown op {msg['op']!r}"})
        except Exception as e:  # noqa: BLE001 (report, keep serving)
            reply({"error": repr(e)})
    llm.shutdown()


def main() -> None:
    asyncio.run(_serve(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
