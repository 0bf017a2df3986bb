"""The KV handoff seam: how a pool's engines are configured for, and shape requests for, moving
a prefill's KV cache to a decode engine.

``HandoffBackend`` is small on purpose; the stock NIXL connector is one implementation and the
slab connector in ``kvtransfer/`` (``SlabHandoff``, ``kv_handoff.backend: slab``) plugs in beside it.
Engines never talk to each other through us: the connector moves the bytes; we only carry its
``kv_transfer_params`` from one response to the next request.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from kvtransfer.config import UCX_MT_MUTEX_ENV, UCX_TLS_ENV, SlabConnectorSettings
from kvtransfer.ports import free_port
from kvtransfer.wire import KEY_DO_REMOTE_PREFILL, prefill_push_params, prefill_request_params
from workers.config import KvHandoffConfig
from workers.engine_env import KV_CACHE_HUGE_PAGES_ENV, NIXL_PROGRESS_DELAY_ENV, NIXL_PROGRESS_THREAD_ENV
from workers.kv_params import KvHandoff

# vLLM's ``KVTransferConfig.kv_load_failure_policy`` for every backend: a KV load that fails (peer gone,
# transfer error, lease expired) makes the decode engine recompute the prompt. vLLM's default, "fail",
# finishes the request with finish_reason "error" instead.
KV_LOAD_FAILURE_POLICY = "recompute"


class HandoffBackend(Protocol):
    name: str

    def engine_env(self) -> dict[str, str]:
        """Environment the engine process needs (set before the engine starts)."""

    def kv_transfer_config(self) -> dict[str, Any]:
        """vLLM ``kv_transfer_config`` for every engine of the cluster."""

    def prefill_params(self, push_rendezvous: str | None = None) -> dict[str, Any]:
        """``kv_transfer_params`` of a prefill-only request (push mode: pushing to ``push_rendezvous``)."""

    def kv_agent(self) -> list:
        """[name, host, port] of this engine's transfer agent, for push-mode peers ([] = none)."""

    def handoff_from_output(self, params: Mapping[str, Any] | None) -> KvHandoff | None:
        """The typed handoff from a finished prefill's output params (None: nothing to hand off)."""


class _RemotePrefillParams:
    """Request shaping shared by the pull-mode connectors: a prefill-only request keeps its KV for a
    remote decode, and the prefill's output params (``do_remote_prefill``) become the decode's handoff."""

    name: str

    def prefill_params(self, push_rendezvous: str | None = None) -> dict[str, Any]:
        return prefill_request_params()

    def kv_agent(self) -> list:
        return []

    def handoff_from_output(self, params: Mapping[str, Any] | None) -> KvHandoff | None:
        if not params or not params.get(KEY_DO_REMOTE_PREFILL):
            return None
        return KvHandoff.from_kv_transfer_params(params, connector=self.name)


class NixlHandoff(_RemotePrefillParams):
    """vLLM's ``NixlConnector``: the decode engine READs the prefill engine's KV blocks over UCX; a
    failed READ is recomputed on decode.

    Every engine is ``kv_both`` so a replica can serve either side; each picks a free side-channel
    port at start (no fixed global ports, no collisions between replicas on one node).
    """

    name = "nixl"

    def __init__(self, cfg: KvHandoffConfig, side_channel_host: str, side_channel_port: int | None = None):
        self._cfg = cfg
        self._host = side_channel_host
        self._port = side_channel_port or free_port(side_channel_host if side_channel_host != "0.0.0.0" else "")

    @property
    def side_channel(self) -> tuple[str, int]:
        return self._host, self._port

    def engine_env(self) -> dict[str, str]:
        return {
            UCX_TLS_ENV: self._cfg.ucx_tls,
            "VLLM_NIXL_SIDE_CHANNEL_HOST": self._host,
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(self._port),
            NIXL_PROGRESS_THREAD_ENV: "1" if self._cfg.nixl_progress_thread else "0",
            NIXL_PROGRESS_DELAY_ENV: str(self._cfg.nixl_progress_delay_us),
            UCX_MT_MUTEX_ENV: "y" if self._cfg.ucx_mt_mutex else "n",
            KV_CACHE_HUGE_PAGES_ENV: "1" if self._cfg.kv_cache_huge_pages else "0",
        }

    def kv_transfer_config(self) -> dict[str, Any]:
        stock = self._cfg.nixl_progress_thread and self._cfg.nixl_progress_delay_us == 0
        quiet = (
            {}
            if stock
            else {"kv_connector": "QuietNixlConnector", "kv_connector_module_path": "workers.nixl_connector"}
        )
        return {
            "kv_connector": "NixlConnector",
            "kv_role": "kv_both",
            "kv_buffer_device": self._cfg.kv_buffer_device,
            "kv_load_failure_policy": KV_LOAD_FAILURE_POLICY,
            "kv_connector_extra_config": {"kv_lease_duration": self._cfg.kv_lease_s},
            **quiet,
        }


class SlabHandoff(_RemotePrefillParams):
    """Our ``SlabKVConnector`` (kvtransfer/): the prefill packs the prompt's blocks into slabs (one NIXL
    descriptor each, optionally int8/int4) in a pre-registered pool; the decode engine READs them.

    Pull (default): the prefill output's ``kv_transfer_params`` carry the slabs' addresses. Push
    (``slab_mode: push``): the decode request names this engine's agent (``kv_agent``, reported in
    WorkerStats) and a rendezvous id, and this engine WRITEs into its reservation. A failed transfer is
    recomputed on decode. ``kv_lease_s`` is the prefill's handoff timeout.
    """

    name = "slab"

    def __init__(self, cfg: KvHandoffConfig, side_channel_host: str):
        self._cfg = cfg
        self._host = side_channel_host if side_channel_host != "0.0.0.0" else "127.0.0.1"
        # the agent's name and listener are chosen here (a free port, no fixed ports) so this replica can
        # advertise them: push-mode decode requests name their prefill's agent before it answered
        self._agent_name = f"slab-{uuid.uuid4().hex[:12]}"
        self._port = free_port(self._host)

    def engine_env(self) -> dict[str, str]:
        return {UCX_TLS_ENV: self._cfg.ucx_tls}

    def kv_agent(self) -> list:
        return [self._agent_name, self._host, self._port]

    def prefill_params(self, push_rendezvous: str | None = None) -> dict[str, Any]:
        if push_rendezvous:
            return prefill_push_params(push_rendezvous, self._cfg.slab.compression)
        return prefill_request_params()

    def kv_transfer_config(self) -> dict[str, Any]:
        return {
            "kv_connector": "SlabKVConnector",
            "kv_connector_module_path": "kvtransfer.connector",
            "kv_role": "kv_both",
            "kv_buffer_device": "cpu",
            "kv_load_failure_policy": KV_LOAD_FAILURE_POLICY,
            "engine_id": self._agent_name,
            "kv_connector_extra_config": self.connector_settings().model_dump(),
        }

    def connector_settings(self) -> SlabConnectorSettings:
        """The connector's settings: ``kv_handoff.slab`` unchanged, plus the fields both backends share
        (owned by ``kv_handoff``) and this engine's agent address. The one place they are mapped."""
        return SlabConnectorSettings(
            **self._cfg.slab.model_dump(),
            handoff_timeout_s=float(self._cfg.kv_lease_s),
            side_channel_host=self._host,
            side_channel_port=self._port,
            progress_delay_us=self._cfg.nixl_progress_delay_us,
            ucx_mt_mutex=self._cfg.ucx_mt_mutex,
            ucx_tls=self._cfg.ucx_tls,
        )


def make_handoff(cfg: KvHandoffConfig, side_channel_host: str) -> HandoffBackend:
    if cfg.backend == "nixl":
        return NixlHandoff(cfg, side_channel_host)
    if cfg.backend == "slab":
        return SlabHandoff(cfg, side_channel_host)
    raise ValueError(f"unknown kv_handoff.backend {cfg.backend!r}")
