"""The slab connector's options.

``SlabSettings`` is ``kv_handoff.slab`` in the cluster YAML: everything only the slab connector uses.
``SlabConnectorSettings`` is what the connector parses from vLLM's ``kv_connector_extra_config``: those
settings unchanged plus the per-engine values workers/handoff.py fills in from ``kv_handoff``'s own
fields (both backends share them: UCX transports, progress thread, lease) and from the engine (its
agent's address). Both engine processes (scheduler side and worker side) parse the same dict, so they
agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvtransfer.wire import Compression

# UCX variables, read when a NIXL agent creates its UCX backend.
UCX_TLS_ENV = "UCX_TLS"
# UCX guards a worker shared by threads (the engine thread and NIXL's progress thread) with a spinlock
# by default. While the engine thread READs (UCX cma copies inside the post, holding the lock), the
# progress thread, pinned to the same core as the engine, spins on that lock and takes half the core:
# the copy runs at half speed (loadtests/kv/kv_xfer_microbench.py). With a mutex the waiter sleeps.
UCX_MT_MUTEX_ENV = "UCX_USE_MT_MUTEX"


class SlabSettings(BaseModel):
    """The slab backend's own options (``kv_handoff.slab``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compression: Compression = Field(
        "none", description="default wire compression; a prefill request may override it per request"
    )
    slab_tokens: int = Field(128, ge=1, description="minimum tokens per slab (one transfer descriptor)")
    group: int = Field(32, ge=2, description="quantization group along head_dim (int8/int4)")
    read_timeout_s: float = Field(10.0, gt=0, description="decode gives up a read (and recomputes) after this long")
    connect_timeout_s: float = Field(
        5.0, gt=0, description="decode gives up fetching a prefill agent's metadata after this long"
    )
    expiry_margin_s: float = Field(
        1.0, ge=0, description="decode does not start a read this close to the prefill's handoff deadline"
    )
    pool_mib: int | None = Field(
        None, ge=1, description="slab pool size (MiB); default: pool_tokens of KV rounded up to 256 MiB"
    )
    prefault_pool: bool = Field(
        True,
        description="touch every page of the pool at start (resident memory "
        "= pool size) so no handoff pays page faults",
    )
    huge_pages: bool = Field(
        True,
        description="back the pool with transparent huge pages (madvise): a "
        "same-host READ (UCX cma) copies at memcpy speed from them, ~half that from 4 KiB "
        "pages (kvtransfer/hostmem.py)",
    )
    pool_tokens: int = Field(16384, ge=1, description="tokens of KV in flight the default pool holds")
    idle_wait_ms: float = Field(
        2.0,
        ge=0,
        description="an engine step with nothing scheduled but handoffs "
        "pending waits up to this long for NIXL events instead of spinning",
    )

    @model_validator(mode="after")
    def _group_even(self) -> SlabSettings:
        if self.group % 2:
            raise ValueError("group must be even (int4 packs two codes per byte)")
        return self


class SlabConnectorSettings(SlabSettings):
    """``kv_connector_extra_config`` of SlabKVConnector. The defaults serve an engine started on its own
    (tests, loadtests); in a pdserve cluster workers/handoff.py sets every field below from
    ``kv_handoff`` and the engine's address."""

    handoff_timeout_s: float = Field(
        30.0, gt=0, description="prefill frees a handoff no decode confirmed after this long (kv_handoff.kv_lease_s)"
    )
    ucx_mt_mutex: bool = Field(
        True,
        description="UCX locks its worker with a mutex, not a spinlock: NIXL's "
        "progress thread then sleeps instead of spinning on the engine's core while the "
        "engine thread READs (UCX_USE_MT_MUTEX; same-host READs measured 2x faster on a 2-core VM)",
    )
    side_channel_host: str = Field(
        "127.0.0.1", description="address peers use to fetch this engine's NIXL agent metadata"
    )
    side_channel_port: int = Field(0, ge=0, le=65535, description="NIXL listener port; 0 = pick a free port")
    ucx_tls: str | None = Field(None, description="UCX_TLS for the NIXL UCX backend (None: inherit the env)")
    progress_delay_us: int = Field(
        1000, ge=0, description="NIXL progress thread poll timeout; 0 = busy spin (kv_handoff.nixl_progress_delay_us)"
    )

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> SlabConnectorSettings:
        return cls.model_validate(dict(extra or {}))
