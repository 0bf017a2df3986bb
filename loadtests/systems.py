"""Systems under test, each started as its own process tree and stopped completely.

- ``ours``: ``pdserve serve CONFIG``;
- ``colocated``: one plain vLLM OpenAI server on the same total cores (what users run instead);
- ``raypd``: Ray Serve LLM's own prefill/decode app (``loadtests/raypd_app.py``);
- a server already running (``loadtests.bench --url``): ``AttachedSystem``, used as found and never stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent


@dataclass
class SystemProcess:
    name: str
    base_url: str
    proc: subprocess.Popen
    log_path: Path
    started_s: float = 0.0
    ready_s: float = 0.0
    _log: object = field(default=None, repr=False)

    def rss_bytes(self) -> int:
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self, timeout_s: float = 120.0) -> None:
        """SIGINT (a clean stop), then SIGKILL the whole tree if anything is left."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        _, alive = psutil.wait_procs(tree, timeout=20)
        for p in alive:
            p.kill()
        if self._log:
            self._log.close()


@dataclass
class AttachedSystem:
    """A server the bench did not start: benchmarked where it runs, never stopped; neither its start-up time
    nor its memory is measured (``None``)."""

    name: str
    base_url: str
    proc: None = None
    log_path: str = "(not started by the bench)"
    ready_s: float | None = None

    def rss_bytes(self) -> None:
        return None

    def stop(self) -> None:
        pass


SERVER_AUTOGROUP_NICE = 10


def lower_session_priority(pid: int, nice: int = SERVER_AUTOGROUP_NICE) -> bool:
    """Keep the system under test from starving the load generator on a shared box.

    With ``kernel.sched_autogroup_enabled`` (the default on most Linux distributions)
    every session is one scheduling group, and per-process nice values only rank processes WITHIN a
    group. The server runs in its own session, so its saturated engines, proxy and router (one group)
    share the CPU with the client (another group) group-fairly, and under load the client's event loop
    waits for a core (0.5-2.6 s measured, loadtests/README.md): tokens the ingress sent steadily reach
    the client in bursts, inflating client-side TTFT and inter-token latency. Setting the server
    session's autogroup nice lowers the whole group's weight; the client then gets a core when it needs
    one, as a remote client would. Best effort: a no-op where autogroups are off or unsupported.
    Returns whether the priority was set."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
        return True
    except OSError:
        return False


def _spawn(name: str, cmd: list[str], env: dict, port: int, log_dir: Path) -> SystemProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    lower_session_priority(proc.pid)
    return SystemProcess(
        name=name,
        base_url=f"http://127.0.0.1:{port}",
        proc=proc,
        log_path=log_path,
        started_s=time.monotonic(),
        _log=log,
    )


def wait_ready(sp: SystemProcess | AttachedSystem, model: str, timeout_s: float = 900.0) -> None:
    """Until the server answers a chat request (a started one's start-up time in ``ready_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sp.proc is not None and sp.proc.poll() is not None:
            raise RuntimeError(f"{sp.name} exited with {sp.proc.returncode}; see {sp.log_path}")
        try:
            # a server that says it is not ready (pdserve: pools starting, router warming up) is not
            # pinged: its 503s would only add rejections to the metrics every system is judged by
            if httpx.get(f"{sp.base_url}/health", timeout=10).status_code == 503:
                time.sleep(2.0)
                continue
            r = httpx.post(
                f"{sp.base_url}/v1/chat/completions",
                timeout=30,
                json={"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "ping"}]},
            )
            if r.status_code == 200:
                if sp.proc is not None:
                    sp.ready_s = time.monotonic() - sp.started_s
                return
        except httpx.HTTPError:
            pass
        time.sleep(2.0)
    raise TimeoutError(f"{sp.name} not ready after {timeout_s}s; see {sp.log_path}")


def resolved_config(config: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """``ours``' config as ``pdserve validate CONFIG --set ...`` resolves it (overlay ``base:`` chain, then
    the ``KEY=VALUE`` overrides, then defaults): the product's own loader, run as a command."""
    cmd = [sys.executable, "-m", "serve.cli", "validate", config] + [f"--set={o}" for o in overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SystemExit(f"pdserve validate {config}: {proc.stderr.strip() or proc.returncode}")
    return json.loads(proc.stdout)


def start_ours(
    config: str,
    port: int,
    log_dir: Path,
    name: str = "ours",
    overrides: Sequence[str] = (),
    env: dict[str, str] | None = None,
    **_,
) -> SystemProcess:
    """``pdserve serve CONFIG --port PORT --set ...``; ``env``: extra environment of the server (and so of the
    local Ray it starts)."""
    cmd = [sys.executable, "-m", "serve.cli", "serve", config, "--port", str(port), *(f"--set={o}" for o in overrides)]
    return _spawn(name, cmd, env or {}, port, log_dir)


def start_colocated(
    model_dir: str,
    model: str,
    port: int,
    log_dir: Path,
    cores: str = "0-1",
    kv_gib: int = 2,
    max_model_len: int = 2048,
    dtype: str | None = None,
    **_,
) -> SystemProcess:
    """Plain vLLM as its CPU docs start it: the OpenAI server with its own defaults (compiled model,
    the checkpoint's dtype, its block size), on the same cores and KV space in total as ``ours``
    (``VLLM_CPU_OMP_THREADS_BIND`` / ``VLLM_CPU_KVCACHE_SPACE``, the two settings those docs ask for)
    and the same context length. ``dtype`` only when the bench is told one."""
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
    ] + (["--dtype", dtype] if dtype else [])
    env = {"VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    return _spawn("colocated", cmd, env, port, log_dir)


def start_raypd(model_dir: str, model: str, port: int, log_dir: Path, dtype: str | None = None, **_) -> SystemProcess:
    cmd = [sys.executable, "-m", "loadtests.raypd_app", model_dir, model, str(port)] + ([dtype] if dtype else [])
    return _spawn("raypd", cmd, {}, port, log_dir)


STARTERS = {"ours": start_ours, "colocated": start_colocated, "raypd": start_raypd}
