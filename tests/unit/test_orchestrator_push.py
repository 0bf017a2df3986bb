"""serve/orchestrator.py, slab push mode: a prefill that fails before its decode produced a token
cancels that decode and decodes on the same replica with local prefill. Fakes stand in for the Serve
deployment handles and the routing policy (this tests the flow, not the engines; the real push path
runs in tests/integration/test_cluster_slab_push.py)."""

import asyncio

from router.policy import StatelessPolicy
from router.types import RequestDescriptor, Role, RoutingDecision
from serve.metrics import ClusterMetrics
from serve.orchestrator import GenerationJob, Orchestrator
from serve.pool_directory import PoolDirectory, endpoint_from_stats
from tests.unit.serve_fakes import FakeHandleBase, FakeResponse
from workers.messages import PrefillResult, SamplingSpec, TokenChunk

PREFILL = endpoint_from_stats("p0", "prefill", Role.PREFILL, None)
DECODE = endpoint_from_stats("d0", "decode", Role.DECODE, None)
TOKEN = TokenChunk("hi", (7,), "stop")


class FakeStream:
    """A fake Serve streaming response. A push decode (with a handoff) waits for KV until
    ``kv_arrives`` is set (or it is cancelled); a local-prefill decode answers at once."""

    def __init__(self, waits: asyncio.Event | None):
        self.waits, self.cancelled, self.done = waits, False, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.done:
            raise StopAsyncIteration
        if self.waits is not None:
            await self.waits.wait()
        self.done = True
        return TOKEN

    def cancel(self):
        self.cancelled = True


class FakeHandles(FakeHandleBase):
    """Fake deployment handles of both pools: ``.prefill.remote`` and ``.options().generate.remote``."""

    def __init__(self, prefill_fails: bool):
        self.prefill_fails, self.kv_arrives, self.decodes = prefill_fails, asyncio.Event(), []

    def remote(self, req, endpoint_hint):
        if hasattr(req, "sampling"):  # a DecodeRequest
            s = FakeStream(self.kv_arrives if req.handoff is not None else None)
            self.decodes.append((req, s))
            return s

        async def run():
            await asyncio.sleep(0.02)
            if self.prefill_fails:
                raise RuntimeError("prefill replica died")
            self.kv_arrives.set()  # its WRITE landed
            return PrefillResult(req.request_id, endpoint_hint, None, 100, 0, 0.02)

        return FakeResponse(run())


class FakePolicy(StatelessPolicy):
    def route(self, desc, snapshot, admit=True):
        return RoutingDecision(
            decode=DECODE, prefill=PREFILL, reason="remote_prefill", uncached_tokens=100, predicted_ttft_s=1.0
        )


def _run(prefill_fails: bool):
    async def main():
        handles = FakeHandles(prefill_fails)
        metrics = ClusterMetrics(None)
        orch = Orchestrator(
            {"prefill": handles, "decode": handles},
            FakePolicy(),
            PoolDirectory(),
            metrics,
            prefill_timeout_s=60.0,
            idle_timeout_s=600.0,
            push_compression="none",
        )
        orch.set_kv_agents({"p0": ["agent-p0", "127.0.0.1", 5000]})
        job = GenerationJob(RequestDescriptor("r1", "m", 100, 8, "free", 0.0), tuple(range(100)), SamplingSpec(8))
        chunks = await asyncio.wait_for(_collect(orch.generate(job)), timeout=10)
        return chunks, handles, metrics, orch

    return asyncio.run(main())


async def _collect(gen):
    return [c async for c in gen]


def test_push_prefill_failure_cancels_the_decode_and_prefills_locally_on_it():
    chunks, handles, metrics, orch = _run(prefill_fails=True)
    assert chunks == [TOKEN]
    (push_req, push_stream), (local_req, local_stream) = handles.decodes
    assert push_req.handoff is not None and push_req.handoff.connector == "slab-push"
    assert push_stream.cancelled  # the engine aborts it and frees the reservation
    assert local_req.handoff is None and not local_stream.cancelled
    assert metrics.prefill_fallbacks.labels("error")._value.get() == 1
    assert sum(orch._in_flight.values()) == 0 and orch.queued_by_priority() == {}


def test_push_prefill_success_keeps_the_one_decode():
    chunks, handles, metrics, orch = _run(prefill_fails=False)
    assert chunks == [TOKEN]
    ((req, stream),) = handles.decodes
    assert req.handoff is not None and not stream.cancelled
    assert metrics.prefill_fallbacks.labels("error")._value.get() == 0
    assert metrics.prefill_fallbacks.labels("no_handoff")._value.get() == 0  # push answers carry none
