"""KvHandoff: the typed view of a handoff's vLLM ``kv_transfer_params`` that workers/ and serve/ carry
from a prefill's output to its decode request. The dict's keys and the slab connector's payloads are
defined in kvtransfer/wire.py.

We keep a typed view and the original dict, so a connector's extra keys survive the round trip
unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvtransfer.wire import (
    KEY_DO_REMOTE_PREFILL,
    KEY_REMOTE_BLOCK_IDS,
    KEY_REMOTE_ENGINE_ID,
    KEY_REMOTE_HOST,
    KEY_REMOTE_NUM_TOKENS,
    KEY_REMOTE_PORT,
    KEY_REMOTE_REQUEST_ID,
    KEY_SLAB_HANDOFF,
    SlabPush,
    decode_push_params,
)


@dataclass(frozen=True, slots=True)
class KvHandoff:
    """Where a finished prefill's KV lives and how the decode engine can fetch it."""

    remote_engine_id: str
    remote_request_id: str
    remote_host: str
    remote_port: int
    num_blocks: int
    num_tokens: int
    connector: str
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def to_kv_transfer_params(self) -> dict[str, Any]:
        """The params for the decode request, exactly as the connector produced them."""
        return dict(self.raw)

    @classmethod
    def from_kv_transfer_params(cls, params: Mapping[str, Any], connector: str) -> KvHandoff:
        if not params.get(KEY_DO_REMOTE_PREFILL):
            raise ValueError("prefill output carries no remote-prefill handoff")
        missing = [
            k
            for k in (KEY_REMOTE_ENGINE_ID, KEY_REMOTE_REQUEST_ID, KEY_REMOTE_HOST, KEY_REMOTE_PORT)
            if params.get(k) is None
        ]
        if missing:
            raise ValueError(f"kv_transfer_params lacks {missing}")
        block_ids = params.get(KEY_REMOTE_BLOCK_IDS) or []
        num_blocks = (
            sum(len(g) for g in block_ids) if block_ids and isinstance(block_ids[0], (list, tuple)) else len(block_ids)
        )
        slab = params.get(KEY_SLAB_HANDOFF)
        if not num_blocks and isinstance(slab, dict):  # SlabKVConnector: blocks travel grouped in slabs
            num_blocks = sum(int(s[3]) for s in slab.get("slabs") or [])
        return cls(
            remote_engine_id=str(params[KEY_REMOTE_ENGINE_ID]),
            remote_request_id=str(params[KEY_REMOTE_REQUEST_ID]),
            remote_host=str(params[KEY_REMOTE_HOST]),
            remote_port=int(params[KEY_REMOTE_PORT]),
            num_blocks=num_blocks,
            num_tokens=int(params.get(KEY_REMOTE_NUM_TOKENS) or 0),
            connector=connector,
            raw=dict(params),
        )


def push_decode_handoff(
    agent: tuple[str, str, int], rendezvous: str, num_tokens: int, compression: str, timeout_s: float = 0.0
) -> KvHandoff:
    """Slab push mode, decode side: the handoff of a decode request sent together with its prefill;
    ``agent`` = the prefill engine's slab agent (name, host, port) from its WorkerStats; ``timeout_s`` =
    how long the decode's reservation waits for the prefill (0: the connector's ``read_timeout_s``)."""
    engine_id, host, port = agent
    raw = decode_push_params(SlabPush(rendezvous, engine_id, host, int(port), compression, float(timeout_s)))
    return KvHandoff(
        remote_engine_id=engine_id,
        remote_request_id=rendezvous,
        remote_host=host,
        remote_port=int(port),
        num_blocks=0,
        num_tokens=num_tokens,
        connector="slab-push",
        raw=raw,
    )
