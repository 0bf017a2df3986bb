"""serve/orchestrator.py, pull mode: the failure policy. Every engine failure ends either in a retry or
in an ApiError, never in a finish_reason other than "stop"/"length". Fakes stand in for the Serve
deployment handles (scripted prefill and decode calls), the replica lists and the routing policy."""

import asyncio

import pytest

from router.policy import StatelessPolicy
from router.types import Rejection, RequestDescriptor, Role, RoutingDecision
from serve.metrics import ClusterMetrics
from serve.orchestrator import GenerationJob, Orchestrator
from serve.pool_directory import PoolDirectory, endpoint_from_stats
from serve.protocol import ApiError
from tests.unit.serve_fakes import FakeHandleBase, FakeResponse
from workers.kv_params import KvHandoff
from workers.messages import PrefillResult, SamplingSpec, TokenChunk

HANDOFF = KvHandoff.from_kv_transfer_params(
    {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [[4, 5]],
        "remote_engine_id": "eng",
        "remote_request_id": "r1",
        "remote_host": "127.0.0.1",
        "remote_port": 5600,
        "tp_size": 1,
        "remote_num_tokens": 100,
        "transfer_mode": "pull",
    },
    connector="nixl",
)
HI, THERE = TokenChunk("hi", (7,)), TokenChunk(" there", (8,), "stop")
HANG = "hang"  # a scripted call that never answers


class FakeSource:
    """A fake Serve request router's replica list for one pool."""

    def __init__(self, pool, role, *ids):
        self.pool, self.role, self.ids = pool, role, ids

    def endpoints(self):
        return [endpoint_from_stats(i, self.pool, self.role, None) for i in self.ids]


class FakePolicy(StatelessPolicy):
    """Routes to the first decode replica of the snapshot (so an excluded one is skipped) and the first
    prefill replica, reporting a prefix hit; no decode replica left -> the policy's rejection. Records
    its calls and hooks."""

    def __init__(self):
        self.calls, self.admits, self.routed, self.first_tokens, self.finishes = 0, [], [], [], []

    def route(self, desc, snapshot, admit=True):
        self.calls += 1
        self.admits.append(admit)
        decode = sorted(snapshot.by_role(Role.DECODE), key=lambda e: e.endpoint_id)
        prefill = snapshot.by_role(Role.PREFILL)
        if not decode:
            return Rejection(reason="no_decode_replica", status_code=503, retry_after_s=5.0, message="none")
        return RoutingDecision(
            decode=decode[0],
            prefill=prefill[0] if prefill else None,
            reason="fake",
            prefix_hit_tokens=32,
            uncached_tokens=68,
        )

    def on_routed(self, req, outcome, moved=False):
        self.routed.append(
            (
                outcome
                if isinstance(outcome, Rejection)
                else (outcome.decode.endpoint_id, outcome.prefill and outcome.prefill.endpoint_id),
                moved,
            )
        )

    def on_first_token(self, decision, ttft_s):
        self.first_tokens.append((decision.decode.endpoint_id, ttft_s))

    def on_finish(self, decision, tpot_s):
        self.finishes.append((decision.decode.endpoint_id, tpot_s))


class FakeStream:
    """A fake Serve streaming response playing a script: chunks are yielded, exceptions raised, HANG waits
    until cancelled; the end of the script ends the stream."""

    def __init__(self, script):
        self.script, self.cancelled = list(script), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.script:
            raise StopAsyncIteration
        item = self.script.pop(0)
        if item == HANG:
            await asyncio.Event().wait()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class FakeHandles(FakeHandleBase):
    """Fake deployment handles of both pools. ``prefill``: "ok" (answers with HANDOFF), HANG, or an
    exception to raise; ``decodes``: endpoint -> scripts, one per call to that replica."""

    def __init__(self, prefill="ok", decodes=None):
        self.prefill_script, self.decode_scripts = prefill, decodes or {}
        self.prefills, self.decodes = [], []  # (endpoint, request, response/stream)

    def remote(self, req, endpoint_hint):
        if hasattr(req, "sampling"):  # a DecodeRequest
            s = FakeStream(self.decode_scripts[endpoint_hint].pop(0))
            self.decodes.append((endpoint_hint, req, s))
            return s

        async def run():
            if self.prefill_script == HANG:
                await asyncio.Event().wait()
            if isinstance(self.prefill_script, BaseException):
                raise self.prefill_script
            return PrefillResult(req.request_id, endpoint_hint, HANDOFF, 100, 0, 0.01)

        r = FakeResponse(run())
        self.prefills.append((endpoint_hint, req, r))
        return r


def _orch(handles, decode_ids=("d0", "d1"), prefill=True, **timeouts):
    directory = PoolDirectory()
    directory.register("decode", FakeSource("decode", Role.DECODE, *decode_ids))
    if prefill:
        directory.register("prefill", FakeSource("prefill", Role.PREFILL, "p0"))
    metrics, policy = ClusterMetrics(lambda: []), FakePolicy()
    kw = {"prefill_timeout_s": 5.0, "idle_timeout_s": 5.0, **timeouts}
    orch = Orchestrator({"prefill": handles, "decode": handles}, policy, directory, metrics, **kw)
    return orch, metrics, policy


JOB = GenerationJob(
    RequestDescriptor("r1", "m", 100, 8, "free", 0.0, block_hashes=(11, 12)), tuple(range(100)), SamplingSpec(8)
)


def _run(orch, job=JOB):
    """(chunks received, the ApiError that ended the stream or None)."""

    async def main():
        got = []
        try:
            async for c in orch.generate(job):
                got.append(c)
        except ApiError as e:
            return got, e
        return got, None

    return asyncio.run(asyncio.wait_for(main(), timeout=10))


def _count(metric, *labels):
    return (metric.labels(*labels) if labels else metric)._value.get()


def _idle(orch):
    assert sum(orch._in_flight.values()) == 0 and orch.queued_by_priority() == {}


class TestPrefillFailures:
    def test_prefill_answer_hands_its_kv_to_the_decode(self):
        handles = FakeHandles(decodes={"d0": [[HI, THERE]]})
        orch, metrics, _ = _orch(handles)
        assert _run(orch) == ([HI, THERE], None)
        ((endpoint, req, _),) = handles.decodes
        assert endpoint == "d0" and req.handoff == HANDOFF
        assert sum(_count(metrics.prefill_fallbacks, r) for r in ("timeout", "error", "no_handoff")) == 0

    def test_prefill_timeout_prefills_on_the_decode_engine(self):
        handles = FakeHandles(prefill=HANG, decodes={"d0": [[HI, THERE]]})
        orch, metrics, _ = _orch(handles, prefill_timeout_s=0.05)
        assert _run(orch) == ([HI, THERE], None)
        ((_, _, prefill_call),) = handles.prefills
        assert prefill_call.cancelled  # the prefill engine aborts its request
        ((endpoint, req, _),) = handles.decodes
        assert endpoint == "d0" and req.handoff is None
        assert _count(metrics.prefill_fallbacks, "timeout") == 1 and _count(metrics.prefill_fallbacks, "error") == 0
        _idle(orch)

    def test_prefill_error_prefills_on_the_decode_engine(self):
        handles = FakeHandles(prefill=RuntimeError("prefill replica died"), decodes={"d0": [[HI, THERE]]})
        orch, metrics, _ = _orch(handles)
        assert _run(orch) == ([HI, THERE], None)
        ((endpoint, req, _),) = handles.decodes
        assert endpoint == "d0" and req.handoff is None
        assert _count(metrics.prefill_fallbacks, "error") == 1 and _count(metrics.prefill_fallbacks, "timeout") == 0
        _idle(orch)


class TestDecodeFailures:
    @pytest.mark.parametrize(
        "failure",
        [RuntimeError("replica died"), TokenChunk("", (), "error"), TokenChunk("", (), "abort")],
        ids=["exception", "error", "abort"],
    )
    def test_failure_before_the_first_token_is_retried_on_another_replica(self, failure):
        handles = FakeHandles(decodes={"d0": [[failure]], "d1": [[HI, THERE]]})
        orch, metrics, _ = _orch(handles)
        assert _run(orch) == ([HI, THERE], None)
        (first, _, first_stream), (second, retry_req, _) = handles.decodes
        assert (first, second) == ("d0", "d1") and retry_req.handoff is None  # local prefill on d1
        assert first_stream.cancelled  # d0 aborts its request
        assert _count(metrics.prefill_fallbacks, "decode_retry") == 1
        _idle(orch)

    def test_stream_ending_without_a_finish_is_a_failure(self):
        handles = FakeHandles(decodes={"d0": [[]], "d1": [[HI, THERE]]})
        orch, metrics, _ = _orch(handles)
        assert _run(orch) == ([HI, THERE], None)
        assert [d[0] for d in handles.decodes] == ["d0", "d1"]
        assert _count(metrics.prefill_fallbacks, "decode_retry") == 1

    @pytest.mark.parametrize(
        "reason, status, code",
        [("error", 502, "engine_error"), ("abort", 503, "engine_aborted"), (None, 502, "engine_error")],
    )
    def test_engine_failure_on_the_retry_too_is_an_error(self, reason, status, code):
        fail = [TokenChunk("", (), reason)] if reason else []
        handles = FakeHandles(decodes={"d0": [fail], "d1": [list(fail)]})
        orch, metrics, _ = _orch(handles)
        chunks, err = _run(orch)
        assert chunks == [] and (err.status_code, err.code) == (status, code)
        assert (err.retry_after_s is not None) == (reason == "abort")  # 503 carries Retry-After
        assert [d[0] for d in handles.decodes] == ["d0", "d1"]
        assert _count(metrics.aborts, code) == 1
        _idle(orch)

    def test_exception_on_the_retry_too_is_502_decode_failed(self):
        handles = FakeHandles(decodes={"d0": [[RuntimeError("a")]], "d1": [[RuntimeError("b")]]})
        orch, metrics, _ = _orch(handles)
        chunks, err = _run(orch)
        assert chunks == [] and (err.status_code, err.code) == (502, "decode_failed")
        assert _count(metrics.aborts, "decode_failed") == 1 and len(handles.decodes) == 2

    def test_exception_after_the_first_token_without_migration_is_502_decode_failed(self):
        handles = FakeHandles(decodes={"d0": [[HI, RuntimeError("replica died")]], "d1": [[HI, THERE]]})
        orch, metrics, _ = _orch(handles, decode_migrations=0)
        chunks, err = _run(orch)
        assert chunks == [HI] and (err.status_code, err.code) == (502, "decode_failed")
        assert len(handles.decodes) == 1  # no retry once tokens went out
        assert _count(metrics.aborts, "decode_failed") == 1 and _count(metrics.prefill_fallbacks, "decode_retry") == 0
        _idle(orch)

    @pytest.mark.parametrize("reason, status, code", [("error", 502, "engine_error"), ("abort", 503, "engine_aborted")])
    def test_engine_failure_after_tokens_is_an_error_never_a_finish(self, reason, status, code):
        handles = FakeHandles(decodes={"d0": [[HI, TokenChunk(" th", (9,), reason)]], "d1": [[HI, THERE]]})
        orch, _, _ = _orch(handles, decode_migrations=0)
        chunks, err = _run(orch)
        assert chunks == [HI] and (err.status_code, err.code) == (status, code)
        assert all(c.finish_reason is None for c in chunks) and len(handles.decodes) == 1

    def test_no_output_for_idle_timeout_is_504(self):
        handles = FakeHandles(decodes={"d0": [[HI, HANG]]})
        orch, metrics, _ = _orch(handles, idle_timeout_s=0.05)
        chunks, err = _run(orch)
        assert chunks == [HI] and (err.status_code, err.code) == (504, "engine_timeout")
        ((_, _, stream),) = handles.decodes
        assert stream.cancelled and _count(metrics.aborts, "idle_timeout") == 1
        _idle(orch)


class TestMigration:
    """A decode that fails after its first token continues on another replica: the prompt plus the
    tokens already sent, prefilled there, for the tokens still owed."""

    @pytest.mark.parametrize("failure", [RuntimeError("replica died"), TokenChunk(" th", (9,), "abort")])
    def test_the_stream_goes_on_from_another_replica(self, failure):
        handles = FakeHandles(decodes={"d0": [[HI, failure]], "d1": [[THERE]]})
        orch, metrics, _ = _orch(handles)
        assert _run(orch) == ([HI, THERE], None)
        (_, first, _), (where, cont, _) = handles.decodes
        assert where == "d1" and cont.handoff == HANDOFF  # placed like any request: p0 prefills
        assert [(p[0], p[1].prompt_token_ids) for p in handles.prefills][-1] == ("p0", cont.prompt_token_ids)
        assert cont.prompt_token_ids == JOB.prompt_token_ids + (7,)  # ...the prompt and the token already sent
        assert cont.sampling.max_tokens == JOB.sampling.max_tokens - 1 and cont.request_id != first.request_id
        assert _count(metrics.prefill_fallbacks, "decode_migration") == 1
        assert _count(metrics.aborts, "decode_failed") == 0
        _idle(orch)

    def test_no_other_replica_is_the_original_error(self):
        handles = FakeHandles(decodes={"d0": [[HI, RuntimeError("replica died")]]})
        orch, metrics, _ = _orch(handles, decode_ids=("d0",))
        chunks, err = _run(orch)
        assert chunks == [HI] and (err.status_code, err.code) == (502, "decode_failed")
        assert len(handles.decodes) == 1 and _count(metrics.aborts, "decode_failed") == 1
        _idle(orch)

    def test_a_failed_continuation_with_no_migration_left_is_an_error(self):
        handles = FakeHandles(decodes={"d0": [[HI, RuntimeError("a")]], "d1": [[RuntimeError("b")]]})
        orch, metrics, _ = _orch(handles)
        chunks, err = _run(orch)
        assert chunks == [HI] and (err.status_code, err.code) == (502, "decode_failed")
        assert [d[0] for d in handles.decodes] == ["d0", "d1"] and _count(metrics.aborts, "decode_failed") == 1
        _idle(orch)


class TestRetryCountsOnce:
    def test_routing_and_admission_metrics_count_the_request_once(self):
        handles = FakeHandles(decodes={"d0": [[RuntimeError("replica died")]], "d1": [[HI, THERE]]})
        orch, metrics, policy = _orch(handles)
        assert _run(orch) == ([HI, THERE], None)
        assert policy.admits == [True, False]  # it was routed twice, admitted once...
        assert _count(metrics.routing, "remote", "decode") == 1  # ...and counted once
        assert _count(metrics.admitted, "free", "remote") == 1
        assert _count(metrics.prefix_hit_tokens) == 32
        assert _count(metrics.routed_prompt_tokens) == 100
        assert metrics.decision_s._sum.get() > 0 and _decision_count(metrics) == 1
        assert _count(metrics.prefill_fallbacks, "decode_retry") == 1
        # the policy hears of each routing once: the request on p0 and d0, then its decode moved to d1
        assert policy.routed == [(("d0", "p0"), False), (("d1", "p0"), True)]

    def test_latency_hooks_hear_of_the_routed_attempt_once(self):
        ticks = iter(range(100))
        handles = FakeHandles(decodes={"d0": [[HI, THERE]]})
        orch, _, policy = _orch(handles, clock=lambda: float(next(ticks)))
        assert _run(orch) == ([HI, THERE], None)
        # start 0, prefill 1-2, first chunk 3, finish 4: TTFT 3 s; TPOT 1 s over the one token after the first
        assert policy.first_tokens == [("d0", 3.0)] and policy.finishes == [("d0", 1.0)]
        handles = FakeHandles(decodes={"d0": [[RuntimeError("replica died")]], "d1": [[HI, THERE]]})
        orch, _, policy = _orch(handles)
        assert _run(orch) == ([HI, THERE], None)
        assert policy.first_tokens == [] and policy.finishes == []  # a retry predicts nothing

    def test_a_rejected_retry_is_the_requests_error_not_an_admission_rejection(self):
        handles = FakeHandles(decodes={"d0": [[RuntimeError("replica died")]]})
        orch, metrics, policy = _orch(handles, decode_ids=("d0",))
        chunks, err = _run(orch)
        assert chunks == [] and (err.status_code, err.code) == (503, "no_decode_replica")
        assert _count(metrics.rejections, "no_decode_replica", "free") == 0
        assert policy.routed[-1] == (Rejection("no_decode_replica", "none", 503, 5.0), True)
        assert _count(metrics.prefill_fallbacks, "decode_retry") == 1
        assert _count(metrics.admitted, "free", "remote") == 1


def _decision_count(metrics):
    (family,) = [m for m in metrics.decision_s.collect()]
    return next(s.value for s in family.samples if s.name.endswith("_count"))


class TestSuspects:
    def test_a_call_that_raised_takes_its_replica_out_of_rotation_a_bad_finish_does_not(self):
        handles = FakeHandles(decodes={"d0": [[RuntimeError("replica died")]], "d1": [[HI, THERE]]})
        orch, _, _ = _orch(handles)
        assert _run(orch) == ([HI, THERE], None)
        assert {e.endpoint_id: e.healthy for e in orch.snapshot().endpoints if e.pool == "decode"} == {
            "d0": False,
            "d1": True,
        }
        handles = FakeHandles(decodes={"d0": [[TokenChunk("", (), "error")]], "d1": [[HI, THERE]]})
        orch, _, _ = _orch(handles)
        assert _run(orch) == ([HI, THERE], None)
        assert all(e.healthy for e in orch.snapshot().endpoints)


class TestForgetReplicas:
    def test_replicas_not_live_leave_the_prefix_index(self):
        from router.prefix_index import PrefixIndex

        orch, _, policy = _orch(FakeHandles(decodes={}))
        assert orch.forget_replicas({"d0"}) == [] and orch.prefix_index_blocks() == {}  # a policy without one
        index = policy.prefix_index = PrefixIndex()
        index.add("d0", [1, 2, 3])
        index.add("d1", [1, 2])
        assert orch.forget_replicas({"d0", "d1", "p0"}) == []
        assert orch.forget_replicas({"d1"}) == ["d0"]  # d0 died
        assert index.endpoints() == {"d1"}
        assert index.match([1, 2, 3], ["d0", "d1"]) == {"d0": 0, "d1": 2}
        assert index.blocks_by_endpoint() == {"d1": 2} == orch.prefix_index_blocks()


class TestBackPressure:
    """A pool whose Serve queue is full (server.max_queued_requests): Serve raises BackPressureError."""

    def test_full_prefill_queue_prefills_on_decode_and_keeps_the_replica(self):
        from ray.serve.exceptions import BackPressureError

        handles = FakeHandles(prefill=BackPressureError(8, 8), decodes={"d0": [[HI, THERE]]})
        orch, metrics, _ = _orch(handles)
        assert _run(orch) == ([HI, THERE], None)
        assert _count(metrics.prefill_fallbacks, "queue_full") == 1 and _count(metrics.prefill_fallbacks, "error") == 0
        assert all(e.healthy for e in orch.snapshot().endpoints)
        _idle(orch)

    def test_full_decode_queue_is_503_with_retry_after_and_no_suspect(self):
        from ray.serve.exceptions import BackPressureError

        handles = FakeHandles(decodes={"d0": [[BackPressureError(8, 8)]], "d1": [[HI, THERE]]})
        orch, _, _ = _orch(handles)
        got, err = _run(orch)
        assert got == [] and (err.status_code, err.code) == (503, "queue_full")
        assert err.body()["error"]["type"] == "server_error" and err.headers()["Retry-After"] == "1"
        assert all(e.healthy for e in orch.snapshot().endpoints)
        _idle(orch)
