"""The router's prefix index fed by vLLM KV cache events: vLLM's own event encoding, applied to the
index; and a real ZMQ PUB -> KvEventFeed subscription on loopback (no engine)."""

import asyncio

import msgspec
import pytest
import zmq

from router.hashing import block_hashes
from router.prefix_index import PrefixIndex
from serve.kv_events import KvEventFeed, apply_event_batch


def vllm_batch(*events) -> bytes:
    from vllm.distributed.kv_events import KVEventBatch

    return msgspec.msgpack.Encoder().encode(KVEventBatch(ts=1.0, events=list(events)))


def stored(hashes):
    from vllm.distributed.kv_events import BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    return BlockStored(
        block_hashes=[maybe_convert_block_hash(h) for h in hashes],
        parent_block_hash=None,
        token_ids=[],
        block_size=128,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )


def removed(hashes):
    from vllm.distributed.kv_events import BlockRemoved
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    return BlockRemoved(block_hashes=[maybe_convert_block_hash(h) for h in hashes], medium="GPU")


PROMPT = block_hashes(list(range(512)), 128)  # 4 blocks, as the router computes them


class TestApplyEvents:
    def test_stored_removed_cleared(self):
        from vllm.distributed.kv_events import AllBlocksCleared

        idx = PrefixIndex()
        assert apply_event_batch(idx, "e1", vllm_batch(stored(PROMPT))) == 1
        assert idx.match(PROMPT, ["e1", "e2"]) == {"e1": 4, "e2": 0}
        apply_event_batch(idx, "e1", vllm_batch(removed(PROMPT[2:3])))
        assert idx.match(PROMPT, ["e1"]) == {"e1": 2}  # a hit never counts past a hole
        apply_event_batch(idx, "e2", vllm_batch(stored(PROMPT[:1])))
        apply_event_batch(idx, "e1", vllm_batch(AllBlocksCleared()))
        assert idx.match(PROMPT, ["e1", "e2"]) == {"e1": 0, "e2": 1}

    def test_unknown_events_are_skipped(self):
        payload = msgspec.msgpack.encode([1.0, [{"type": "SomethingNew"}, {"type": "AllBlocksCleared"}], None])
        assert apply_event_batch(PrefixIndex(), "e", payload) == 1


class TestKvEventFeed:
    def test_subscribes_applies_and_unsubscribes_on_leave(self):
        async def scenario():
            ctx = zmq.Context()
            pub = ctx.socket(zmq.PUB)
            port = pub.bind_to_random_port("tcp://127.0.0.1")
            idx = PrefixIndex()
            feed = KvEventFeed(idx, topic="kv")
            feed.sync({"e1": f"tcp://127.0.0.1:{port}"})
            try:
                for _ in range(100):  # PUB/SUB: resend until the late joiner is connected (bounded)
                    pub.send_multipart([b"kv", (0).to_bytes(8, "big"), vllm_batch(stored(PROMPT))])
                    await asyncio.sleep(0.05)
                    if idx.match(PROMPT, ["e1"])["e1"] == 4:
                        break
                assert idx.match(PROMPT, ["e1"]) == {"e1": 4} and feed.events_applied >= 1
                feed.sync({})  # the engine left the pool: unsubscribed (the ingress drops its blocks)
                assert feed.subscribed() == {}
            finally:
                feed.close()
                pub.close(linger=0)
                ctx.term()

        asyncio.run(asyncio.wait_for(scenario(), timeout=30))


class TestWithVllmPublisher:
    """vLLM's own ZmqEventPublisher (what every engine runs) -> our feed, through the endpoints the
    workers configure. vLLM only BINDs wildcard/ipc endpoints and CONNECTs to anything else, so a
    plain tcp://127.0.0.1:PORT would silently publish to nobody."""

    @pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3"])
    def test_endpoints_are_bound_by_vllm(self, host):
        from vllm.distributed.kv_events import ZmqEventPublisher

        from workers.engine import kv_events_endpoints

        bind, address = kv_events_endpoints(host)
        assert ZmqEventPublisher._is_bind_endpoint(bind)
        assert address.startswith("ipc://") if host == "127.0.0.1" else address.startswith(f"tcp://{host}:")

    def test_events_flow_from_a_vllm_publisher(self):
        from vllm.distributed.kv_events import KVEventBatch, ZmqEventPublisher

        from workers.engine import KV_EVENTS_TOPIC, kv_events_endpoints

        bind, address = kv_events_endpoints("127.0.0.1")
        pub = ZmqEventPublisher(data_parallel_rank=0, endpoint=bind, topic=KV_EVENTS_TOPIC)

        async def scenario():
            idx = PrefixIndex()
            feed = KvEventFeed(idx, topic=KV_EVENTS_TOPIC)
            feed.sync({"e1": address})
            try:
                for _ in range(100):  # bounded: resend until the subscription is live
                    pub.publish(KVEventBatch(ts=1.0, events=[stored(PROMPT)]))
                    await asyncio.sleep(0.05)
                    if idx.match(PROMPT, ["e1"])["e1"] == 4:
                        break
                assert idx.match(PROMPT, ["e1"]) == {"e1": 4}
            finally:
                feed.close()

        try:
            asyncio.run(asyncio.wait_for(scenario(), timeout=30))
        finally:
            pub.shutdown()
