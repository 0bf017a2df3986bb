"""vLLM's NixlConnector without NIXL's busy-polling progress thread.

NIXL's agent starts a progress thread by default that spins a full core per engine even when
idle (measured: 99% of a core per agent with UCX over tcp/sm). On a CPU box that is half the
machine. vLLM polls transfer state on every engine step, which progresses the UCX worker, and
same-node shared-memory / RDMA reads need no progress on the target side, so the thread is not
needed there. Multi-node TCP fabrics should keep it (``kv_handoff.nixl_progress_thread: true``).

Loaded by vLLM inside the engine worker process via ``kv_connector_module_path``.
"""

from __future__ import annotations

import functools

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector

if base_worker.nixl_agent_config is not None and not getattr(base_worker.nixl_agent_config, "_pdserve_quiet", False):
    _original = base_worker.nixl_agent_config

    @functools.wraps(_original)
    def _quiet_agent_config(*args, **kwargs):
        kwargs.setdefault("enable_prog_thread", False)
        return _original(*args, **kwargs)

    _quiet_agent_config._pdserve_quiet = True
    base_worker.nixl_agent_config = _quiet_agent_config


class QuietNixlConnector(NixlConnector):
    """NixlConnector whose NIXL agent has no progress thread (see module docstring)."""
