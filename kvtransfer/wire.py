"""The KV handoff's wire: the ``kv_transfer_params`` keys, the slab connector's handoff messages, NIXL
notifications and compression names. Shared by both sides of the seam (workers/ shapes requests and
reads prefill outputs, the connector in kvtransfer/ produces and consumes them); msgspec and the
stdlib only, no vLLM.

vLLM's connectors exchange an untyped dict through the request (``do_remote_decode`` on the prefill
request; the prefill response's params on the decode request). The slab connector nests its own
versioned payload in it.

PROTOCOL_VERSION history:
  1: first version. Slabs are raw paged blocks (layer-major) or GroupQuant of their token-major
     view; one descriptor per slab; pull (decode READs), NIXL notification = remote request id.
  2: int8/int4 quantize the token-major view after a Hadamard rotation along head_dim.
  3: push mode (decode reserves, prefill WRITEs): ``slab_push`` params and typed notifications.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

import msgspec

PROTOCOL_VERSION = 3

# Wire compression of slabs (group-wise along head_dim after a Hadamard rotation; kvtransfer/codec.py)
Compression = Literal["none", "int8", "int4"]
COMPRESSIONS: tuple[str, ...] = get_args(Compression)


def wire_byte_ratio(compression: str | None, dtype_bytes: int, group: int = 32) -> float:
    """Wire bytes per raw KV byte of a slab of ``dtype_bytes``-wide values: 1 uncompressed; int8 and
    int4 carry codes (8 or 4 bits a value) plus, per group of ``group`` values, an fp16 scale and an
    8-bit (int8) or 4-bit (int4) zero point (kvtransfer/quant.py GroupQuant.encoded_nbytes)."""
    if compression in (None, "none"):
        return 1.0
    if compression == "int8":
        return (1 + 3 / group) / dtype_bytes
    if compression == "int4":
        return (0.5 + 2.5 / group) / dtype_bytes
    raise ValueError(f"unknown compression {compression!r}; choose from {COMPRESSIONS}")


# kv_transfer_params keys (vLLM's NixlConnector names where they mean the same thing)
KEY_DO_REMOTE_DECODE = "do_remote_decode"
KEY_DO_REMOTE_PREFILL = "do_remote_prefill"
KEY_REMOTE_ENGINE_ID = "remote_engine_id"
KEY_REMOTE_REQUEST_ID = "remote_request_id"
KEY_REMOTE_HOST = "remote_host"
KEY_REMOTE_PORT = "remote_port"
KEY_REMOTE_BLOCK_IDS = "remote_block_ids"
KEY_REMOTE_NUM_TOKENS = "remote_num_tokens"
KEY_COMPRESSION = "compression"  # optional per-request override on the prefill request
KEY_SLAB_HANDOFF = "slab_handoff"  # our nested, versioned payload (SlabHandoff)
KEY_SLAB_PUSH = "slab_push"  # push mode: {"rendezvous": id} on the prefill request, a SlabPush
# (also naming the prefill's agent) on the decode request

# NIXL notifications between agents. A read-done notification is the prefill's bare request id
# (pull); push mode adds typed messages, "<kind> <payload>".
NOTE_RESERVE = b"slab-reserve "  # decode -> prefill: msgspec JSON SlabHandoff of the reserved range
NOTE_PUSHED = b"slab-pushed "  # prefill -> decode, after the WRITE landed: rendezvous id
NOTE_PUSH_FAILED = b"slab-pushfail "  # prefill -> decode: rendezvous id (the decode recomputes)


def prefill_request_params() -> dict[str, Any]:
    """Params that turn a request into a prefill-only request whose KV is kept for a remote decode (pull)."""
    return {
        KEY_DO_REMOTE_DECODE: True,
        KEY_DO_REMOTE_PREFILL: False,
        KEY_REMOTE_ENGINE_ID: None,
        KEY_REMOTE_BLOCK_IDS: None,
        KEY_REMOTE_HOST: None,
        KEY_REMOTE_PORT: None,
    }


class SlabDesc(msgspec.Struct, frozen=True, array_like=True):
    """One transfer descriptor: ``nbytes`` at ``addr`` in the prefill's registered pool, carrying
    sender blocks ``first_block .. first_block + num_blocks`` of the request."""

    addr: int
    nbytes: int
    first_block: int
    num_blocks: int


class SlabHandoff(msgspec.Struct, frozen=True):
    """Where a finished prefill's slabs are and how to decode them (travels in kv_transfer_params)."""

    version: int
    engine_id: str  # = the prefill's NIXL agent name
    request_id: str  # prefill request id (the read-done notification names it)
    host: str
    port: int  # NIXL listener of the prefill's agent
    num_tokens: int  # prompt tokens whose KV the slabs hold
    block_size: int  # sender block size
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    k_transposed: bool
    compression: str
    group: int
    deadline_unix_s: float  # the prefill frees the slabs at about this time
    slabs: list[SlabDesc] = []

    @property
    def wire_nbytes(self) -> int:
        return sum(s.nbytes for s in self.slabs)

    def to_kv_transfer_params(self) -> dict[str, Any]:
        return {
            KEY_DO_REMOTE_PREFILL: True,
            KEY_DO_REMOTE_DECODE: False,
            KEY_REMOTE_ENGINE_ID: self.engine_id,
            KEY_REMOTE_REQUEST_ID: self.request_id,
            KEY_REMOTE_HOST: self.host,
            KEY_REMOTE_PORT: self.port,
            KEY_REMOTE_NUM_TOKENS: self.num_tokens,
            KEY_SLAB_HANDOFF: msgspec.to_builtins(self),
        }

    @classmethod
    def from_kv_transfer_params(cls, params: Mapping[str, Any] | None) -> SlabHandoff | None:
        """The handoff of a decode request's params; None if there is none or it is malformed or of
        another protocol version (the request then prefills locally)."""
        if not params or not params.get(KEY_DO_REMOTE_PREFILL) or not isinstance(params.get(KEY_SLAB_HANDOFF), dict):
            return None
        try:
            handoff = msgspec.convert(params[KEY_SLAB_HANDOFF], cls)
        except msgspec.ValidationError:
            return None
        return handoff if handoff.version == PROTOCOL_VERSION else None

    def __repr__(self) -> str:  # anon: ids and sizes only
        return (
            f"SlabHandoff(engine={self.engine_id}, req={self.request_id}, tokens={self.num_tokens}, "
            f"slabs={len(self.slabs)}, bytes={self.wire_nbytes}, {self.compression})"
        )


class SlabPush(msgspec.Struct, frozen=True):
    """Push mode on a decode request: the decode engine reserves a pool range for the whole prompt and
    tells the prefill agent (``engine_id`` at ``host:port``) which pushes the slabs of the prefill
    request carrying the same ``rendezvous`` id. Both requests are sent at once: the transfer starts as
    soon as the prefill packed, without the caller's round trip between them."""

    rendezvous: str
    engine_id: str = ""  # the prefill's agent (decode request only)
    host: str = ""
    port: int = 0
    compression: str = "none"
    # how long the decode's reservation waits for the prefill's write (its queueing + prefill compute);
    # the decode takes max(this, its read_timeout_s). Callers that know the predicted prefill time set it:
    # a 4k-token prompt prefills for ~16 s on one CPU core, past the 10 s read_timeout_s
    timeout_s: float = 0.0

    @classmethod
    def from_kv_transfer_params(cls, params: Mapping[str, Any] | None) -> SlabPush | None:
        raw = (params or {}).get(KEY_SLAB_PUSH)
        if not isinstance(raw, dict):
            return None
        try:
            return msgspec.convert(raw, cls)
        except msgspec.ValidationError:
            return None


def decode_push_params(push: SlabPush) -> dict[str, Any]:
    """``kv_transfer_params`` of a push-mode decode request."""
    return {KEY_DO_REMOTE_PREFILL: True, KEY_DO_REMOTE_DECODE: False, KEY_SLAB_PUSH: msgspec.to_builtins(push)}


def prefill_push_params(rendezvous: str, compression: str | None = None) -> dict[str, Any]:
    """``kv_transfer_params`` of a push-mode prefill request (``max_tokens=1``)."""
    params: dict[str, Any] = {KEY_DO_REMOTE_DECODE: True, KEY_SLAB_PUSH: {"rendezvous": rendezvous}}
    if compression:
        params[KEY_COMPRESSION] = compression
    return params
