"""SlabKVConnector: vLLM KV connector (v1 API) that hands KV from a prefill engine to a decode engine
as slabs — runs of paged blocks across all layers, one NIXL descriptor each, optionally int8/int4.

Load it with ``kv_transfer_config={"kv_connector": "SlabKVConnector", "kv_connector_module_path":
"kvtransfer.connector", "kv_role": "kv_both", "kv_connector_extra_config": {...SlabConnectorSettings}}``.

This class is a facade: the scheduler process gets a ``SlabConnectorScheduler``
(kvtransfer/scheduler_side.py), the worker process a ``SlabConnectorWorker``
(kvtransfer/worker_side.py); each hook forwards to one of them. Hook order and contracts are
vLLM's (``KVConnectorBase_V1``); see those modules for who frees what. Failure policy: a failed or
timed-out read is reported in ``failed_recving`` and vLLM recomputes the prompt locally when
``kv_load_failure_policy="recompute"`` is set (vLLM 0.32's default is "fail": the request errors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.logger import init_logger
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtransfer.config import SlabConnectorSettings
from kvtransfer.metadata import SlabConnectorMetadata, SlabHandshake
from kvtransfer.scheduler_side import SlabConnectorScheduler
from kvtransfer.slab import SlabSpec
from kvtransfer.stats import KVTransferStats
from kvtransfer.worker_side import SlabConnectorWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)


class SlabConnectorStats(KVConnectorStats):
    """vLLM's stats envelope around :class:`KVTransferStats` (``data`` = its ``to_dict()``)."""

    def _stats(self) -> KVTransferStats:
        return KVTransferStats.from_dict(self.data)

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> SlabConnectorStats:
        self.data = self._stats().aggregate(KVTransferStats.from_dict(other.data)).to_dict()
        return self

    def reduce(self) -> dict[str, int | float]:
        return self._stats().reduce()

    def is_empty(self) -> bool:
        return self._stats().is_empty()


def _make_nixl_transport(settings: SlabConnectorSettings, engine_id: str):
    from kvtransfer.nixl_transport import NixlTransport

    return NixlTransport(
        engine_id,
        settings.side_channel_host,
        settings.side_channel_port,
        settings.progress_delay_us,
        settings.ucx_tls,
        settings.ucx_mt_mutex,
    )


class SlabKVConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self.settings = SlabConnectorSettings.from_extra_config(ktc.kv_connector_extra_config)
        self.engine_id = str(ktc.engine_id)
        self.scheduler: SlabConnectorScheduler | None = None
        self.worker: SlabConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            group = kv_cache_config.kv_cache_groups[0]
            spec = group.kv_cache_spec
            sspec = SlabSpec(
                num_layers=len(group.layer_names),
                num_kv_heads=spec.num_kv_heads,
                head_dim=spec.head_size,
                block_size=spec.block_size,
                dtype_bytes=torch.tensor([], dtype=spec.dtype).element_size(),
                min_slab_tokens=self.settings.slab_tokens,
            )
            self.scheduler = SlabConnectorScheduler(
                self.settings, self.engine_id, sspec, spec.dtype, self._block_ids_of
            )
        else:
            self.worker = SlabConnectorWorker(
                self.settings, self.engine_id, lambda: _make_nixl_transport(self.settings, self.engine_id)
            )

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        """The load writes the request's own blocks of every transfer group (not a hash-addressed
        store), so vLLM need not zero them first."""
        return self._kv_cache_config.transfer_group_ids

    def _block_ids_of(self, req_id: str) -> list[int]:
        return list(self._kv_cache_manager.get_block_ids(req_id)[0])

    # ----------------------------------------------------------------------------- scheduler hooks
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        self.scheduler.update_state_after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(
            scheduler_output.num_scheduled_tokens, scheduler_output.total_num_scheduled_tokens == 0
        )

    def update_connector_output(self, connector_output: KVConnectorOutput):
        self.scheduler.update_connector_output(
            connector_output.finished_sending or (), connector_output.finished_recving or ()
        )

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        if len(metadata) != 1:
            raise NotImplementedError("SlabKVConnector supports one worker per engine (TP=PP=1)")
        (hs,) = metadata.values()
        assert isinstance(hs, SlabHandshake), type(hs)
        self.scheduler.set_handshake(hs)

    # ----------------------------------------------------------------------------- worker hooks
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self.worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self.worker.handshake if self.worker is not None else None

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if isinstance(meta, SlabConnectorMetadata):
            self.worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads complete between steps (async); nothing to wait for per layer."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Packing happens once per step in wait_for_save, after the forward wrote every layer."""

    def wait_for_save(self):
        meta = self._connector_metadata
        if isinstance(meta, SlabConnectorMetadata):
            self.worker.wait_for_save(meta)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        sending, recving, failed = self.worker.get_transfer_results()
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending, recving, _ = self.worker.get_transfer_results()
        return sending, recving

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        side = self.worker if self.worker is not None else self.scheduler
        stats = side.take_stats() if side is not None else None
        return SlabConnectorStats(data=stats.to_dict()) if stats is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return SlabConnectorStats(data=data or {})

    def shutdown(self):
        if self.worker is not None:
            self.worker.shutdown()
