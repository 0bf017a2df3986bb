"""KvHandoff <-> vLLM ``kv_transfer_params``: the ONLY module that knows the dict's keys.

vLLM's connectors exchange an untyped dict through the request (``do_remote_decode`` on the
prefill request; the prefill response's params on the decode request). We keep a typed view and
the original dict, so a connector's extra keys survive the round trip unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KEY_DO_REMOTE_DECODE = "do_remote_decode"
KEY_DO_REMOTE_PREFILL = "do_remote_prefill"
KEY_SLAB_HANDOFF = "slab_handoff"          # kvtransfer.metadata.SlabHandoff (slabs: [addr, nbytes, first, n])
KEY_SLAB_PUSH = "slab_push"                # kvtransfer.metadata.SlabPush (push mode)
KEY_COMPRESSION = "compression"


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
        missing = [k for k in ("remote_engine_id", "remote_request_id", "remote_host", "remote_port")
                   if params.get(k) is None]
        if missing:
            raise ValueError(f"kv_transfer_params lacks {missing}")
        block_ids = params.get("remote_block_ids") or []
        num_blocks = sum(len(g) for g in block_ids) if block_ids and isinstance(block_ids[0], (list, tuple)) \
            else len(block_ids)
        slab = params.get(KEY_SLAB_HANDOFF)
        if not num_blocks and isinstance(slab, dict):     # SlabKVConnector: blocks travel grouped in slabs
            num_blocks = sum(int(s[3]) for s in slab.get("slabs") or [])
        return cls(
            remote_engine_id=str(params["remote_engine_id"]),
            remote_request_id=str(params["remote_request_id"]),
            remote_host=str(params["remote_host"]),
            remote_port=int(params["remote_port"]),
            num_blocks=num_blocks,
            num_tokens=int(params.get("remote_num_tokens") or 0),
            connector=connector,
            raw=dict(params),
        )


def prefill_request_params() -> dict[str, Any]:
    """Params that turn a request into a prefill-only request whose KV is kept for a remote decode."""
    return {KEY_DO_REMOTE_DECODE: True, KEY_DO_REMOTE_PREFILL: False,
            "remote_engine_id": None, "remote_block_ids": None, "remote_host": None, "remote_port": None}


def push_prefill_params(rendezvous: str, compression: str) -> dict[str, Any]:
    """Slab push mode, prefill side: keep the KV for a remote decode and push it to the decode engine
    whose reservation names ``rendezvous`` (as ``kvtransfer.metadata.prefill_push_params``)."""
    return {KEY_DO_REMOTE_DECODE: True, KEY_SLAB_PUSH: {"rendezvous": rendezvous}, KEY_COMPRESSION: compression}


def push_decode_handoff(agent: tuple[str, str, int], rendezvous: str, num_tokens: int,
                        compression: str, timeout_s: float = 0.0) -> KvHandoff:
    """Slab push mode, decode side: the handoff of a decode request sent together with its prefill;
    ``agent`` = the prefill engine's slab agent (name, host, port) from its WorkerStats; ``timeout_s`` =
    how long the decode's reservation waits for the prefill (0: the connector's ``read_timeout_s``)."""
    engine_id, host, port = agent
    raw = {KEY_DO_REMOTE_PREFILL: True, KEY_DO_REMOTE_DECODE: False,
           KEY_SLAB_PUSH: {"rendezvous": rendezvous, "engine_id": engine_id, "host": host, "port": int(port),
                           "compression": compression, "timeout_s": float(timeout_s)}}
    return KvHandoff(remote_engine_id=engine_id, remote_request_id=rendezvous, remote_host=host,
                     remote_port=int(port), num_blocks=0, num_tokens=num_tokens, connector="slab-push", raw=raw)
