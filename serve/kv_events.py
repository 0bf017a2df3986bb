"""Feed the router's prefix index from the engines' KV cache events (vLLM ``kv_events_config``).

Every engine with ``engine.kv_events`` publishes ZMQ PUB multipart messages ``(topic, seq,
payload)``; ``payload`` is a msgpack ``KVEventBatch`` = ``[ts, [event, ...], dp_rank]`` whose events
are tagged maps: ``{"type": "BlockStored", "block_hashes": [...], ...}``, ``{"type":
"BlockRemoved", "block_hashes": [...]}``, ``{"type": "AllBlocksCleared"}``. Block hashes are the
engine's own (ints by default, see ``router.hashing.short_key``), so the index learns exactly what
each engine holds and, unlike the router's own record, when it evicts it.

The feed runs in the router's event loop (one ``zmq.asyncio`` SUB task per engine), so index
updates never race with routing decisions. Subscriptions follow the pool monitor: an engine that
disappears is unsubscribed and its blocks dropped from the index. Events are best-effort (a PUB
socket drops messages for a slow subscriber); the router's own record of routed prompts stays on
as the fallback, and LRU bounds whatever goes stale.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Mapping
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from router.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)

_decoder = msgspec.msgpack.Decoder()


def apply_event_batch(index: PrefixIndex, endpoint_id: str, payload: bytes) -> int:
    """Decode one published batch and apply it to ``index`` for ``endpoint_id``; returns the number
    of events applied. Unknown event types are skipped (newer engines may add some)."""
    batch = _decoder.decode(payload)
    events: list[Any] = batch[1] if isinstance(batch, (list, tuple)) else batch.get("events", [])
    n = 0
    for ev in events:
        kind = ev.get("type") if isinstance(ev, dict) else None
        if kind == "BlockStored":
            index.add(endpoint_id, ev.get("block_hashes") or ())
        elif kind == "BlockRemoved":
            index.remove(endpoint_id, ev.get("block_hashes") or ())
        elif kind == "AllBlocksCleared":
            index.drop_endpoint(endpoint_id)
        else:
            continue
        n += 1
    return n


class KvEventFeed:
    """One SUB subscription per engine that advertises an events endpoint (``WorkerStats.kv_events_endpoint``)."""

    def __init__(self, index: PrefixIndex, topic: str = "kv") -> None:
        self._index = index
        self._topic = topic.encode()
        self._ctx: zmq.asyncio.Context | None = None
        self._tasks: dict[str, tuple[str, asyncio.Task]] = {}
        self.events_applied = 0
        self.decode_errors = 0

    def subscribed(self) -> dict[str, str]:
        return {e: addr for e, (addr, _) in self._tasks.items()}

    def sync(self, endpoints: Mapping[str, str]) -> None:
        """Subscribe to ``endpoint_id -> address`` (call from the event loop after every poll); engines
        no longer listed are unsubscribed (the ingress drops replicas that are gone from the index)."""
        for eid in list(self._tasks):
            addr, task = self._tasks[eid]
            if endpoints.get(eid) != addr or task.done():
                task.cancel()
                del self._tasks[eid]
        for eid, addr in endpoints.items():
            if addr and eid not in self._tasks:
                if self._ctx is None:
                    self._ctx = zmq.asyncio.Context()
                # fresh context: not tied to whatever request happened to trigger the poll
                task = asyncio.get_running_loop().create_task(self._run(eid, addr), context=contextvars.Context())
                self._tasks[eid] = (addr, task)

    async def _run(self, endpoint_id: str, address: str) -> None:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self._topic)
        sock.connect(address)
        logger.info("subscribed to KV cache events of %s at %s", endpoint_id, address)
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) < 3:
                    continue
                try:
                    self.events_applied += apply_event_batch(self._index, endpoint_id, frames[-1])
                except (msgspec.DecodeError, TypeError, ValueError, AttributeError):
                    self.decode_errors += 1
                    logger.debug("undecodable KV event batch from %s", endpoint_id)
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        for _, task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
