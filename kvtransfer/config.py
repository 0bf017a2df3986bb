"""SlabSettings: the slab connector's options, parsed once from vLLM's ``kv_connector_extra_config``.

Both engine processes (scheduler side and worker side) parse the same dict, so they agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Process environment for engines that run the slab codecs on CPU: glibc malloc keeps freed memory for
# reuse. No mmap per large block (each large torch temporary would come back as fresh pages, one page
# fault per 4 KiB, expensive under virtualisation) and no trimming of the heap back to the kernel.
# vLLM's CPU docs get the same effect from tcmalloc via LD_PRELOAD. Read by glibc at process start.
MALLOC_REUSE_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


# UCX guards a worker shared by threads (the engine thread and NIXL's progress thread) with a spinlock
# by default. While the engine thread READs (UCX cma copies inside the post, holding the lock), the
# progress thread, pinned to the same core as the engine, spins on that lock and takes half the core:
# the copy runs at half speed (loadtests/kv/kv_xfer_microbench.py). With a mutex the waiter sleeps.
UCX_MT_MUTEX_ENV = "UCX_USE_MT_MUTEX"


class SlabSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    slab_tokens: int = Field(128, ge=1, description="minimum tokens per slab (one transfer descriptor)")
    compression: Literal["none", "int8", "int4"] = Field(
        "none", description="default wire compression; a prefill request may override it per request")
    group: int = Field(32, ge=2, description="quantization group along head_dim (int8/int4)")
    handoff_timeout_s: float = Field(30.0, gt=0, description="prefill frees a handoff no decode confirmed "
                                     "after this long")
    read_timeout_s: float = Field(10.0, gt=0, description="decode gives up a read (and recomputes) after this long")
    connect_timeout_s: float = Field(5.0, gt=0, description="decode gives up fetching a prefill agent's "
                                     "metadata after this long")
    expiry_margin_s: float = Field(1.0, ge=0, description="decode does not start a read this close to the "
                                   "prefill's handoff deadline")
    pool_mib: int | None = Field(None, ge=1, description="slab pool size (MiB); default: pool_tokens of KV "
                                 "rounded up to 256 MiB")
    prefault_pool: bool = Field(True, description="touch every page of the pool at start (resident memory "
                                "= pool size) so no handoff pays page faults")
    huge_pages: bool = Field(True, description="back the pool with transparent huge pages (madvise): a "
                             "same-host READ (UCX cma) copies at memcpy speed from them, ~half that from 4 KiB "
                             "pages (kvtransfer/hostmem.py)")
    ucx_mt_mutex: bool = Field(True, description="UCX locks its worker with a mutex, not a spinlock: NIXL's "
                               "progress thread then sleeps instead of spinning on the engine's core while the "
                               "engine thread READs (UCX_USE_MT_MUTEX; 2x faster same-host READs here)")
    pool_tokens: int = Field(16384, ge=1, description="tokens of KV in flight the default pool holds")
    side_channel_host: str = Field("127.0.0.1", description="address peers use to fetch this engine's NIXL "
                                   "agent metadata")
    side_channel_port: int = Field(0, ge=0, le=65535, description="NIXL listener port; 0 = pick a free port")
    ucx_tls: str | None = Field(None, description="UCX_TLS for the NIXL UCX backend (None: inherit the env)")
    progress_delay_us: int = Field(1000, ge=0, description="NIXL progress thread poll timeout; 0 = busy spin")
    idle_wait_ms: float = Field(2.0, ge=0, description="an engine step with nothing scheduled but handoffs "
                                "pending waits up to this long for NIXL events instead of spinning")

    @model_validator(mode="after")
    def _group_even(self) -> SlabSettings:
        if self.group % 2:
            raise ValueError("group must be even (int4 packs two codes per byte)")
        return self

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> SlabSettings:
        return cls.model_validate(dict(extra or {}))
