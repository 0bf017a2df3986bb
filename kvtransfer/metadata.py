"""The slab connector's own messages inside one engine: the per-step scheduler -> worker metadata
(jobs) and the worker -> scheduler handshake. What travels between engines is in kvtransfer/wire.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)

from kvtransfer.wire import SlabHandoff, SlabPush


@dataclass(frozen=True, slots=True)
class PackJob:
    """Prefill side: pack ``block_ids`` into the pool at ``offset`` (slabs back to back) in this step's
    ``wait_for_save`` (after the forward that completes the prompt wrote the KV)."""

    request_id: str
    block_ids: tuple[int, ...]
    offset: int
    slab_blocks: tuple[int, ...]  # blocks per slab, in order
    slab_nbytes: tuple[int, ...]
    compression: str
    push: str | None = None  # push mode: the rendezvous id the decode's reservation names


@dataclass(frozen=True, slots=True)
class RecvJob:
    """Decode side: read ``handoff``'s slabs from ``first_block`` on into the pool at ``offset``, then
    scatter into ``block_ids`` (the request's local block table). No slabs: only tell the prefill to
    release (e.g. a full local prefix hit)."""

    request_id: str
    handoff: SlabHandoff
    block_ids: tuple[int, ...]
    first_block: int  # first sender block to load (local prefix hit before it)
    offset: int | None  # pool offset for the received bytes (None: release only)
    fail: str | None = None  # already failed in the scheduler (a failure reason): report it
    first_token: int = 0  # absolute positions [first_token, end_token) are loaded; used when
    end_token: int = 0  # the sender's block size differs (token-granular scatter)
    push: SlabPush | None = None  # push mode: ``handoff`` describes OUR reserved range (slab addresses
    # in this engine's pool); the prefill named in ``push`` writes it


@dataclass
class SlabConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, one per engine step (built by ``build_connector_meta``)."""

    packs: list[PackJob] = field(default_factory=list)
    recvs: list[RecvJob] = field(default_factory=list)
    published: dict[str, float] = field(default_factory=dict)  # req id -> handoff timeout (s)
    discarded: set[str] = field(default_factory=set)  # packed but never published (aborted)
    idle: bool = False  # nothing scheduled this step


@dataclass
class SlabHandshake(KVConnectorHandshakeMetadata):
    """Worker -> scheduler once at start: how peers reach this engine's agent and pool."""

    agent_name: str
    host: str
    port: int
    pool_addr: int
    pool_nbytes: int
    k_transposed: bool = True
