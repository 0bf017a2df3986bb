"""SlabConnectorScheduler: the slab connector's bookkeeping in vLLM's scheduler process.

It owns the slab pool's byte ranges (``RangeAllocator``; the pool itself lives in the worker, whose
address arrives once through the handshake), decides what the worker packs and reads each step,
and produces/consumes the ``kv_transfer_params`` of a handoff. Only request attributes are read
(``request_id``, ``kv_transfer_params``, ``num_prompt_tokens``, ``num_computed_tokens``,
``status``), so unit tests drive it with plain objects.

Prefill (producer) request, ``{"do_remote_decode": true}``, ``max_tokens=1``::

    update_state_after_alloc  -> tracked as producing
    build_connector_meta      -> in the step whose chunk completes the prompt: allocate a pool range,
                                 PackJob (the worker packs in that step's wait_for_save)
    request_finished          -> finished normally: (True, params) = hold the blocks, publish;
                                 aborted/other: free the range now, (False, None)
    update_connector_output   -> finished_sending (decode's notification or the worker's
                                 handoff_timeout_s) frees the range; vLLM frees the blocks

Decode (consumer) request, params from the prefill's output::

    get_num_new_matched_tokens -> (prompt tokens beyond the local hit, load_async=True); pure
    update_state_after_alloc   -> allocate a receive range, RecvJob; marks params processed (once)
    update_connector_output    -> finished_recving (success or failure) frees the range

Push mode (both requests sent at once, ``slab_push`` in their params): the decode request's
``update_state_after_alloc`` reserves a range for the whole prompt and a RecvJob whose handoff
describes that range; the worker sends it to the prefill's agent, which WRITEs the slabs it packed
and notifies. The prefill side is the same as pull, its PackJob naming the rendezvous id.

Who frees what: vLLM frees paged blocks (after finished_sending on prefill; on decode always);
this class frees pool ranges; the worker releases NIXL handles. Every allocated range is freed by
exactly one of: request_finished (not published), finished_sending, finished_recving.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvtransfer.codec import SlabCodec
from kvtransfer.config import SlabConnectorSettings
from kvtransfer.metadata import PackJob, RecvJob, SlabConnectorMetadata, SlabHandshake
from kvtransfer.slab import RangeAllocator, SlabSpec, plan_slabs
from kvtransfer.stats import KVTransferStats
from kvtransfer.wire import (
    COMPRESSIONS,
    KEY_COMPRESSION,
    KEY_DO_REMOTE_DECODE,
    KEY_DO_REMOTE_PREFILL,
    KEY_SLAB_HANDOFF,
    PROTOCOL_VERSION,
    SlabDesc,
    SlabHandoff,
    SlabPush,
)

logger = logging.getLogger(__name__)

FINISHED_OK = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")


@dataclass(frozen=True, slots=True)
class _Packed:
    offset: int
    slabs: tuple[SlabDesc, ...]
    num_tokens: int
    compression: str


class SlabConnectorScheduler:
    def __init__(
        self,
        settings: SlabConnectorSettings,
        engine_id: str,
        spec: SlabSpec,
        dtype: Any,
        block_ids_of: Callable[[str], Sequence[int]],
        clock: Callable[[], float] = time.time,
    ):
        self.settings, self.engine_id, self.spec, self.dtype = settings, engine_id, spec, dtype
        self._block_ids_of = block_ids_of
        self._clock = clock
        self._handshake: SlabHandshake | None = None
        self._alloc: RangeAllocator | None = None
        self._codecs = {c: SlabCodec(spec, dtype, c, settings.group) for c in COMPRESSIONS}
        self._producing: dict[str, Any] = {}  # req id -> Request, prompt not complete yet
        self._packed: dict[str, _Packed] = {}  # packed this or an earlier step, not finished
        self._published: dict[str, int] = {}  # req id -> pool offset, awaiting finished_sending
        self._receiving: dict[str, int] = {}  # req id -> pool offset, awaiting finished_recving
        self._meta = SlabConnectorMetadata()
        self.stats = KVTransferStats()

    # ----------------------------------------------------------------------------- set-up
    def set_handshake(self, handshake: SlabHandshake) -> None:
        """Called once after the worker registered its pool (vLLM's handshake collection)."""
        self._handshake = handshake
        self._alloc = RangeAllocator(handshake.pool_nbytes)
        logger.info("slab pool %d MiB at %s:%d", handshake.pool_nbytes >> 20, handshake.host, handshake.port)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    # ----------------------------------------------------------------------------- decode side
    def _compatible(self, h: SlabHandoff) -> bool:
        s = self.spec
        # any block size: equal sizes scatter whole blocks, others token by token (worker side)
        return (h.num_layers, h.num_kv_heads, h.head_dim, h.dtype, h.k_transposed) == (
            s.num_layers,
            s.num_kv_heads,
            s.head_dim,
            self.dtype_name,
            self._handshake.k_transposed if self._handshake else True,
        )

    def _handoff(self, request: Any) -> SlabHandoff | None:
        """The request's handoff if this engine can load it (same KV geometry, dtype and layout)."""
        h = SlabHandoff.from_kv_transfer_params(request.kv_transfer_params)
        if h is None or not h.slabs:
            return None
        return h if self._compatible(h) else None

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Side-effect free. Remote tokens beyond the (block-aligned) local hit, loaded async."""
        params = request.kv_transfer_params
        if not params or not params.get(KEY_DO_REMOTE_PREFILL):
            return 0, False
        if KEY_SLAB_HANDOFF not in params and SlabPush.from_kv_transfer_params(params) is not None:
            count = request.num_prompt_tokens - num_computed_tokens  # push: the prefill sends it all
            return (count, True) if count > 0 else (0, False)
        h = self._handoff(request)
        if h is None:
            return 0, False
        count = min(h.num_tokens, request.num_prompt_tokens) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Any, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """May be called twice for an async load (second time after the load); acts once."""
        params = request.kv_transfer_params
        if not params:
            return
        if params.get(KEY_DO_REMOTE_DECODE):
            self._producing[request.request_id] = request
            return
        if not params.get(KEY_DO_REMOTE_PREFILL):
            return
        push = SlabPush.from_kv_transfer_params(params) if KEY_SLAB_HANDOFF not in params else None
        if push is not None:
            params[KEY_DO_REMOTE_PREFILL] = False
            self._reserve_push(request, block_ids, num_external_tokens, push)
            return
        h = SlabHandoff.from_kv_transfer_params(params)
        params[KEY_DO_REMOTE_PREFILL] = False  # one transfer per request, even if rescheduled
        if h is None or not h.slabs:
            return
        if num_external_tokens <= 0 or not self._compatible(h):
            # a full local hit, or KV this engine cannot load (logged): let the prefill free now
            if not self._compatible(h):
                logger.warning("handoff %r does not match this engine's KV layout; recomputing", h)
                self.stats.fail("incompatible")
            self._meta.recvs.append(RecvJob(request.request_id, h, (), 0, None))
            return
        end = min(h.num_tokens, request.num_prompt_tokens)
        first_token = end - num_external_tokens
        first_block = first_token // h.block_size
        nbytes = sum(s.nbytes for s in h.slabs if s.first_block + s.num_blocks > first_block)
        offset = self._alloc.allocate(nbytes) if self._alloc else None
        span = {"first_token": first_token, "end_token": end}
        if offset is None:
            self.stats.fail("pool_full")
            job = RecvJob(request.request_id, h, tuple(block_ids), first_block, None, fail="pool_full", **span)
        else:
            self._receiving[request.request_id] = offset
            job = RecvJob(request.request_id, h, tuple(block_ids), first_block, offset, **span)
        self._meta.recvs.append(job)

    def _reserve_push(self, request: Any, block_ids: Sequence[int], num_external_tokens: int, push: SlabPush) -> None:
        """Reserve a range for the whole prompt's slabs (our block size; the prefill must match it) and
        describe it as a handoff whose slab addresses are OURS. No range (full local hit, bad
        compression or pool full): a job whose empty reservation tells the prefill to let go."""
        num_tokens = request.num_prompt_tokens
        first_token = num_tokens - max(0, num_external_tokens)
        span = {"first_token": first_token, "end_token": num_tokens, "push": push}
        fail = None
        if num_external_tokens > 0 and push.compression not in COMPRESSIONS:
            fail = "bad_compression"
        codec = self._codecs.get(push.compression)
        slabs, offset = [], None
        if num_external_tokens > 0 and fail is None:
            plan = plan_slabs(range(math.ceil(num_tokens / self.spec.block_size)), num_tokens, self.spec)
            sizes = [codec.wire_nbytes(len(sl.block_ids)) for sl in plan.slabs]
            offset = self._alloc.allocate(sum(sizes)) if self._alloc else None
            if offset is None:
                fail = "pool_full"
            else:
                base, pos, first = self._handshake.pool_addr + offset, 0, 0
                for sl, size in zip(plan.slabs, sizes):
                    slabs.append(SlabDesc(base + pos, size, first, len(sl.block_ids)))
                    pos, first = pos + size, first + len(sl.block_ids)
                self._receiving[request.request_id] = offset
        if fail:
            self.stats.fail(fail)
        reservation = self._describe(
            push.rendezvous,
            num_tokens,
            push.compression,
            self._clock() + max(self.settings.read_timeout_s, push.timeout_s),
            slabs,
        )
        self._meta.recvs.append(
            RecvJob(
                request.request_id,
                reservation,
                tuple(block_ids),
                first_token // self.spec.block_size,
                offset,
                fail=fail,
                **span,
            )
        )

    # ----------------------------------------------------------------------------- prefill side
    def _compression(self, params: Mapping[str, Any]) -> str:
        c = params.get(KEY_COMPRESSION) or self.settings.compression
        return c if c in COMPRESSIONS else self.settings.compression

    def _plan_pack(self, request: Any) -> None:
        req_id = request.request_id
        num_tokens = request.num_prompt_tokens
        block_ids = list(self._block_ids_of(req_id))[: math.ceil(num_tokens / self.spec.block_size)]
        compression = self._compression(request.kv_transfer_params)
        codec = self._codecs[compression]
        plan = plan_slabs(block_ids, num_tokens, self.spec)
        sizes = [codec.wire_nbytes(len(s.block_ids)) for s in plan.slabs]
        offset = self._alloc.allocate(sum(sizes)) if self._alloc else None
        if offset is None:
            self.stats.fail("pool_full")
            logger.warning(
                "slab pool full (%d bytes in use); request will be recomputed by decode",
                self._alloc.used_bytes if self._alloc else 0,
            )
            return
        base = self._handshake.pool_addr + offset
        descs, pos, first = [], 0, 0
        for slab, size in zip(plan.slabs, sizes):
            descs.append(SlabDesc(base + pos, size, first, len(slab.block_ids)))
            pos, first = pos + size, first + len(slab.block_ids)
        self._packed[req_id] = _Packed(offset, tuple(descs), num_tokens, compression)
        push = SlabPush.from_kv_transfer_params(request.kv_transfer_params)
        self._meta.packs.append(
            PackJob(
                req_id,
                tuple(block_ids),
                offset,
                tuple(len(s.block_ids) for s in plan.slabs),
                tuple(sizes),
                compression,
                push=push.rendezvous if push else None,
            )
        )

    def build_connector_meta(self, num_scheduled_tokens: Mapping[str, int], idle: bool) -> SlabConnectorMetadata:
        """Once per step; returns this step's jobs and resets the outbox."""
        for req_id, request in list(self._producing.items()):
            n = num_scheduled_tokens.get(req_id, 0)
            if n and request.num_computed_tokens + n >= request.num_prompt_tokens:
                del self._producing[req_id]
                self._plan_pack(request)
        meta, self._meta = self._meta, SlabConnectorMetadata()
        meta.idle = idle
        return meta

    def request_finished(self, request: Any, block_ids: Sequence[int]) -> tuple[bool, dict[str, Any] | None]:
        """Exactly once per request, before vLLM frees its blocks."""
        req_id = request.request_id
        self._producing.pop(req_id, None)
        packed = self._packed.pop(req_id, None)
        if packed is None:
            return False, None
        if getattr(request.status, "name", str(request.status)) not in FINISHED_OK or not block_ids:
            self._alloc.free(packed.offset)
            self._meta.discarded.add(req_id)
            return False, None
        timeout = self.settings.handoff_timeout_s
        self._published[req_id] = packed.offset
        self._meta.published[req_id] = timeout
        handoff = self._describe(req_id, packed.num_tokens, packed.compression, self._clock() + timeout, packed.slabs)
        return True, handoff.to_kv_transfer_params()

    def _describe(
        self, request_id: str, num_tokens: int, compression: str, deadline_unix_s: float, slabs: Sequence[SlabDesc]
    ) -> SlabHandoff:
        """Slabs in this engine's pool, described for the peer that READs (pull) or WRITEs (push) them."""
        hs, s = self._handshake, self.spec
        return SlabHandoff(
            version=PROTOCOL_VERSION,
            engine_id=hs.agent_name,
            request_id=request_id,
            host=hs.host,
            port=hs.port,
            num_tokens=num_tokens,
            block_size=s.block_size,
            dtype=self.dtype_name,
            num_layers=s.num_layers,
            num_kv_heads=s.num_kv_heads,
            head_dim=s.head_dim,
            k_transposed=hs.k_transposed,
            compression=compression,
            group=self.settings.group,
            deadline_unix_s=deadline_unix_s,
            slabs=list(slabs),
        )

    # ----------------------------------------------------------------------------- both
    def update_connector_output(self, finished_sending: Sequence[str], finished_recving: Sequence[str]) -> None:
        for req_id in finished_sending or ():
            offset = self._published.pop(req_id, None)
            if offset is not None:
                self._alloc.free(offset)
        for req_id in finished_recving or ():
            offset = self._receiving.pop(req_id, None)
            if offset is not None:
                self._alloc.free(offset)

    def has_pending(self) -> bool:
        return bool(self._published or self._receiving)

    def pool_bytes_in_use(self) -> int:
        return self._alloc.used_bytes if self._alloc else 0

    def take_stats(self) -> KVTransferStats | None:
        if self.stats.is_empty():
            return None
        out, self.stats = self.stats, KVTransferStats()
        return out

    def assert_empty(self) -> None:
        """Leak check: no tracked request and no pool range in use."""
        leftovers = {
            "producing": self._producing,
            "packed": self._packed,
            "published": self._published,
            "receiving": self._receiving,
        }
        assert not any(leftovers.values()), {k: list(v) for k, v in leftovers.items() if v}
        assert self.pool_bytes_in_use() == 0, self.pool_bytes_in_use()
