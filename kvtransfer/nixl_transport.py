"""NixlTransport: the slab connector's transport over NIXL (UCX backend). The only module that
imports nixl.

* One agent per engine worker, named by the engine id, with NIXL's own listener thread serving its
  metadata on ``side_channel_port`` (0 = a free port picked here): no fixed global ports.
* The slab pool is registered once (``register_memory``) at start.
* NIXL's Python agent hard-codes the progress thread's poll timeout ``pthrDelay = 0`` (a busy
  spinning core per engine). The agent is built with the compiled bindings wrapped for the duration
  of the constructor so the config carries ``progress_delay_us`` (workers/nixl_connector.py does the
  same for vLLM's connector).
* UCX locks its worker with a mutex unless ``mt_mutex`` is False (kvtransfer.config.UCX_MT_MUTEX_ENV:
  the default spinlock makes the progress thread spin against the engine thread's READ).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import torch
from nixl._api import nixl_agent, nixl_agent_config

from kvtransfer.config import UCX_MT_MUTEX_ENV, UCX_TLS_ENV
from kvtransfer.ports import free_port
from kvtransfer.transport import Desc, TransferState

logger = logging.getLogger(__name__)

_BUILD_LOCK = threading.Lock()


class _DelayedBindings:
    """Proxy of NIXL's compiled bindings whose ``nixlAgent`` sets the progress thread's delay."""

    def __init__(self, real: Any, delay_us: int):
        self._real, self._delay_us = real, delay_us

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def nixlAgent(self, name, config):
        config.pthrDelay = self._delay_us
        return self._real.nixlAgent(name, config)


def build_agent(name: str, port: int, delay_us: int) -> nixl_agent:
    conf = nixl_agent_config(enable_prog_thread=True, enable_listen_thread=True, listen_port=port, backends=["UCX"])
    module = sys.modules[nixl_agent.__module__]
    with _BUILD_LOCK:
        real = module.nixlBind
        module.nixlBind = _DelayedBindings(real, delay_us)
        try:
            return nixl_agent(name, conf)
        finally:
            module.nixlBind = real


class NixlTransport:
    def __init__(
        self,
        name: str,
        host: str,
        port: int = 0,
        progress_delay_us: int = 1000,
        ucx_tls: str | None = None,
        mt_mutex: bool | None = True,
    ):
        # read by UCX when the backend is created, just below
        if ucx_tls:
            os.environ[UCX_TLS_ENV] = ucx_tls
        if mt_mutex is not None:
            os.environ[UCX_MT_MUTEX_ENV] = "y" if mt_mutex else "n"
        self.name, self._host = name, host
        self._port = port or free_port(host)
        self._agent = build_agent(name, self._port, progress_delay_us)
        self._connecting: set[str] = set()
        self._connected: set[str] = set()
        self._reg = None
        logger.info(
            "NIXL agent %s listening on %s:%d (progress delay %d us)", name, host, self._port, progress_delay_us
        )

    def register_pool(self, pool: torch.Tensor) -> None:
        if self._reg is not None:
            raise RuntimeError("the slab pool is registered once")
        self._reg = self._agent.get_reg_descs(pool)
        self._agent.register_memory(self._reg)

    def listen_address(self) -> tuple[str, int]:
        return self._host, self._port

    def connect(self, peer: str, host: str, port: int) -> None:
        if peer in self._connected or peer in self._connecting:
            return
        self._connecting.add(peer)
        self._agent.fetch_remote_metadata(peer, host, port)

    def is_connected(self, peer: str) -> bool:
        if peer in self._connected:
            return True
        if peer in self._connecting and self._agent.check_remote_metadata(peer):
            self._connecting.discard(peer)
            self._connected.add(peer)
            return True
        return False

    def forget(self, peer: str) -> None:
        """Allow a later :meth:`connect` to fetch ``peer`` again (after a failed attempt)."""
        self._connecting.discard(peer)

    def read(self, peer: str, local: Sequence[Desc], remote: Sequence[Desc], notify: bytes) -> Any:
        return self._xfer("READ", peer, local, remote, notify)

    def write(self, peer: str, local: Sequence[Desc], remote: Sequence[Desc], notify: bytes) -> Any:
        return self._xfer("WRITE", peer, local, remote, notify)

    def _xfer(self, op: str, peer: str, local: Sequence[Desc], remote: Sequence[Desc], notify: bytes) -> Any:
        local_d = self._agent.get_xfer_descs([(a, n, 0) for a, n in local], "DRAM")
        remote_d = self._agent.get_xfer_descs([(a, n, 0) for a, n in remote], "DRAM")
        handle = self._agent.initialize_xfer(op, local_d, remote_d, peer, notify)
        if self._agent.transfer(handle) == "ERR":
            self._agent.release_xfer_handle(handle)
            raise RuntimeError(f"NIXL {op} with {peer} failed to start")
        return handle

    def poll(self, handle: Any) -> TransferState:
        state = self._agent.check_xfer_state(handle)
        return (
            TransferState.DONE if state == "DONE" else TransferState.FAILED if state == "ERR" else TransferState.PENDING
        )

    def release(self, handle: Any) -> None:
        try:
            self._agent.release_xfer_handle(handle)
        except Exception:
            logger.warning("could not release a NIXL transfer handle", exc_info=True)

    def notify(self, peer: str, message: bytes) -> None:
        self._agent.send_notif(peer, message)

    def drain_notifications(self) -> list[tuple[str, bytes]]:
        return [(peer, m) for peer, msgs in self._agent.get_new_notifs().items() for m in msgs]

    def close(self) -> None:
        if self._reg is not None:
            try:
                self._agent.deregister_memory(self._reg)
            except Exception:
                logger.warning("deregister_memory failed", exc_info=True)
            self._reg = None
