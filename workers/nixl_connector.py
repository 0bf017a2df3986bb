"""vLLM's NixlConnector with a sleeping (not spinning) NIXL progress thread.

NIXL's Python agent hard-codes ``pthrDelay = 0`` for its UCX progress thread, so the thread calls
``poll()`` with a zero timeout in a loop and spins a full core per engine even when idle (measured:
99% of a core per agent with UCX over tcp/sm). On a CPU box that is half the machine. Turning the
thread off instead stalls transfers over TCP: the target side only progresses when its engine
steps, so an idle or busy prefill engine delays reads (measured: ~1.9 s per 2-block handoff).

The thread itself is event driven (it polls the UCX workers' event fds) and ``pthrDelay`` is only its
poll timeout, so a delay of ~1 ms gives prompt progress at near-zero idle cost. This module sets it
from ``PDSERVE_NIXL_PROGRESS_DELAY_US`` and can switch the thread off with
``PDSERVE_NIXL_PROGRESS_THREAD=0``. Loaded by vLLM inside the engine worker process via
``kv_connector_module_path``; the engine environment comes from workers/handoff.py.

It also restores the engine thread's CPU affinity that vLLM's CPU NIXL worker overrides (below).
"""

from __future__ import annotations

import functools
import os
import sys

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector
from vllm.logger import init_logger

from kvtransfer.hostmem import collapse_to_huge_pages
from workers.engine_env import KV_CACHE_HUGE_PAGES_ENV, NIXL_PROGRESS_DELAY_ENV, NIXL_PROGRESS_THREAD_ENV
from workers.vllm_plugin import register as register_plumbing_fixes

logger = init_logger(__name__)


class _AgentBindings:
    """Proxy of NIXL's compiled bindings that sets the progress thread's poll timeout on new agents."""

    def __init__(self, real, delay_us: int) -> None:
        self._real, self._delay_us = real, delay_us

    def __getattr__(self, name):
        return getattr(self._real, name)

    def nixlAgent(self, name, config):  # noqa: N802 (NIXL's name)
        config.pthrDelay = self._delay_us
        return self._real.nixlAgent(name, config)


def _install() -> None:
    if base_worker.nixl_agent_config is None or getattr(base_worker.nixl_agent_config, "_pdserve", False):
        return
    thread_on = os.environ.get(NIXL_PROGRESS_THREAD_ENV, "1") != "0"
    delay_us = int(os.environ.get(NIXL_PROGRESS_DELAY_ENV, "1000"))
    original = base_worker.nixl_agent_config

    @functools.wraps(original)
    def agent_config(*args, **kwargs):
        kwargs.setdefault("enable_prog_thread", thread_on)
        return original(*args, **kwargs)

    agent_config._pdserve = True
    base_worker.nixl_agent_config = agent_config
    api = sys.modules.get(original.__module__)
    if api is not None and hasattr(api, "nixlBind") and not isinstance(api.nixlBind, _AgentBindings):
        api.nixlBind = _AgentBindings(api.nixlBind, delay_us)


_install()


# The engine-process plumbing fixes (shared-memory queue spinning and lost wake-ups) live in
# workers/vllm_plugin.py, a vLLM general plugin; registering here too covers an uninstalled checkout.
register_plumbing_fixes()


class QuietNixlConnector(NixlConnector):
    """NixlConnector whose NIXL progress thread sleeps between polls (see module docstring).

    It also undoes a CPU-only side effect of vLLM's NIXL worker: to "reserve a core for KV loads" it
    calls ``os.sched_setaffinity(0, <last core of each NUMA node>)`` from the thread that builds the
    connector, which is the engine's model-forward (OpenMP master) thread. Every engine on a node then
    computes on the same last core, whatever ``VLLM_CPU_OMP_THREADS_BIND`` says (measured on a 2-core VM: the
    prefill engine bound to core 0 ran on core 1, next to the decode engine). The thread's mask from
    before construction is restored.

    On CPU engines it moves the paged KV caches onto transparent huge pages before NIXL registers
    them (``PDSERVE_KV_CACHE_HUGE_PAGES``, on by default): a same-host READ is the kernel's
    ``process_vm_readv``, which copies from 2 MiB pages ~2.7x faster than from 4 KiB ones
    (loadtests/kv/kv_xfer_microbench.py).
    """

    def __init__(self, *args, **kwargs):
        mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        super().__init__(*args, **kwargs)
        if mask is not None and os.sched_getaffinity(0) != mask:
            logger.info(
                "restoring the engine thread's CPU affinity %s (NIXL worker set %s)",
                sorted(mask),
                sorted(os.sched_getaffinity(0)),
            )
            os.sched_setaffinity(0, mask)

    def register_kv_caches(self, kv_caches):
        if os.environ.get(KV_CACHE_HUGE_PAGES_ENV, "1") != "0":
            moved = sum(collapse_to_huge_pages(t) for t in kv_caches.values())
            logger.info("KV caches on huge pages: %d of %d tensors", moved, len(kv_caches))
        super().register_kv_caches(kv_caches)
