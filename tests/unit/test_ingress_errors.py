"""serve/ingress.py + serve/responses.py: how a failed generation reaches the client. Before the first
byte: the error's HTTP status (the ApiError propagates to the app's handler); after it: an SSE
``data: {"error": ...}`` event and ``[DONE]``, with no finish chunk and no usage chunk; a non-streaming
request never gets a 200 with partial text. A fake orchestrator plays scripted chunks and errors."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from loadtests.client import sse_data
from router.types import RequestDescriptor
from serve.adapters import ParsedRequest
from serve.ingress import Ingress, _Charge
from serve.metrics import ClusterMetrics
from serve.orchestrator import GenerationJob
from serve.protocol import ApiError, ChatCompletionRequest
from serve.responses import finish_reason
from workers.messages import SamplingSpec, TokenChunk

FAILED = ApiError(502, "the decode engine failed", type_="server_error", code="decode_failed")
HI, THERE = TokenChunk("hi", (7,)), TokenChunk(" there", (8,), "stop")


class FakeOrchestrator:
    """Plays a script from ``generate``: chunks are yielded, exceptions raised."""

    def __init__(self, script):
        self.script = script

    async def generate(self, job):
        for item in self.script:
            if isinstance(item, BaseException):
                raise item
            yield item


def _ingress(script):
    """The ingress's request-path methods over a fake orchestrator (no Serve replica around them)."""
    ns = SimpleNamespace(_orch=FakeOrchestrator(script), metrics=ClusterMetrics(lambda: []))
    ns._finish_metrics = lambda *a: Ingress._finish_metrics(ns, *a)
    return ns


def _parsed(stream, include_usage=False):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    job = GenerationJob(RequestDescriptor("r1", "m", 3, 8, "free", 0.0), (1, 2, 3), SamplingSpec(8))
    return ParsedRequest("chat", ChatCompletionRequest.model_validate(body), job, "chatcmpl-1", 0)


def _events(script, include_usage=True):
    """The SSE payloads of a streamed request (the ``first`` pull is what _handle awaits before the 200)."""

    async def main():
        return [e async for e in Ingress._stream(_ingress(script), _parsed(True, include_usage), 0.0, _Charge(None, 8))]

    return [sse_data(e.decode().strip()) for e in asyncio.run(main())]


class TestStreaming:
    def test_complete_stream_has_its_finish_usage_and_done(self):
        events = _events([HI, THERE])
        finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-2]]
        assert finishes == [None, None, "stop"] and json.loads(events[-2])["usage"]["completion_tokens"] == 2
        assert events[-1] == "[DONE]"

    def test_error_after_the_first_byte_is_an_error_event_and_no_finish(self):
        events = _events([HI, FAILED])
        assert events[-1] == "[DONE]" and json.loads(events[-2]) == FAILED.body()  # vLLM's shape
        chunks = [json.loads(e) for e in events[:-2]]
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None]  # role, "hi"
        assert all(c.get("usage") is None for c in chunks)

    def test_error_before_the_first_byte_propagates_as_the_http_status(self):
        async def main():
            stream = Ingress._stream(_ingress([FAILED]), _parsed(True), 0.0, _Charge(None, 8))
            await stream.__anext__()

        with pytest.raises(ApiError) as ei:
            asyncio.run(main())
        assert ei.value is FAILED

    def test_unexpected_exception_after_the_first_byte_is_a_500_error_event(self):
        events = _events([HI, RuntimeError("bug")])
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "internal_error"


class TestNonStreaming:
    def test_error_after_tokens_is_the_error_not_a_truncated_200(self):
        with pytest.raises(ApiError) as ei:
            asyncio.run(Ingress._complete(_ingress([HI, FAILED]), _parsed(False), 0.0, _Charge(None, 8)))
        assert ei.value is FAILED

    def test_unexpected_exception_is_a_500(self):
        with pytest.raises(ApiError) as ei:
            asyncio.run(Ingress._complete(_ingress([HI, RuntimeError("bug")]), _parsed(False), 0.0, _Charge(None, 8)))
        assert (ei.value.status_code, ei.value.code) == (500, "internal_error")

    def test_client_disconnect_cancels_the_generation_and_counts(self):
        """Serve cancels the call when the client goes away: the orchestrator's generator is closed (its
        engine calls abort) and the request counts as a client_disconnect abort with status 499."""
        closed = asyncio.Event()

        class FakeBlockingOrchestrator:
            async def generate(self, job):
                try:
                    yield HI
                    await asyncio.Event().wait()  # the engine is still generating
                finally:
                    closed.set()

        ns = _ingress([])
        ns._orch = FakeBlockingOrchestrator()

        async def main():
            task = asyncio.ensure_future(Ingress._complete(ns, _parsed(False), 0.0, _Charge(None, 8)))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return closed.is_set()

        assert asyncio.run(asyncio.wait_for(main(), timeout=5))
        assert ns.metrics.aborts.labels("client_disconnect")._value.get() == 1
        assert ns.metrics.requests.labels("chat", "499")._value.get() == 1

    def test_complete_response(self):
        charge = _Charge(None, 8)
        resp = asyncio.run(Ingress._complete(_ingress([HI, THERE]), _parsed(False), 0.0, charge))
        assert (charge.generated, charge.unused_tokens) == (2, 6)  # given back to the key's token bucket
        body = json.loads(resp.body)
        assert resp.status_code == 200 and body["choices"][0]["message"]["content"] == "hi there"
        assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("reason", ["error", "abort", "repetition"])
def test_an_engine_failure_is_never_rendered_as_a_finish_reason(reason):
    assert (finish_reason("stop"), finish_reason("length"), finish_reason(None)) == ("stop", "length", None)
    with pytest.raises(ValueError):
        finish_reason(reason)
