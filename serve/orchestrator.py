"""The P/D request flow as named steps: route -> prefill -> handoff -> decode stream.

Failure policy (each path counts in metrics with a reason):
- no healthy decode replica: reject 503 + Retry-After before any engine work (a decode pool that scales from
  zero is woken first and the request waits for it, bounded: serve/cold_start.py);
- remote prefill fails or times out: the decode engine prefills locally (``prefill_fallbacks``);
  in slab push mode the decode request is already out: it is cancelled and sent again to the same
  decode replica with local prefill (a prefill that fails without our noticing, e.g. its engine
  stalls, is covered by the reservation's deadline: ``push_wait_s``, a few predicted TTFTs, at least
  the connector's ``read_timeout_s``; then the decode engine recomputes);
- decode fails before its first token (the call raises, or the engine finishes the request "error" or
  "abort" with no token): retried once on another decode replica with local prefill
  (``prefill_fallbacks{decode_retry}``; routing and admission metrics count the request once);
- decode fails after its first token: migrated (up to ``decode_migrations`` times) to another decode
  replica: the prompt plus the tokens already sent are prefilled (on a prefill replica, or there) and
  it generates the rest
  (``prefill_fallbacks{decode_migration}``); the client's stream just goes on;
- a decode failure with no retry or migration left (or no other replica): an :class:`ApiError`
  (``decode_error``), which the ingress sends as the HTTP status before its first byte and as an SSE
  error event after it; an engine finish other than "stop"/"length" never reaches the client as a
  finish_reason;
- no output for ``idle_timeout_s``: 504 ``engine_timeout``, engines abort the request.
Every engine call is cancelled (-> vLLM abort, KV freed) when the client goes away.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray.serve.exceptions import BackPressureError

from router.policy import RoutingObserver, RoutingPolicy
from router.types import EndpointState, PoolSnapshot, Rejection, RequestDescriptor, RoutingDecision
from serve.cold_start import ColdStart
from serve.failures import (
    DecodeFailed,
    EngineFinishFailed,
    PushPrefillFailed,
    decode_error,
    queue_full_error,
    rejection_to_error,
)
from serve.metrics import ClusterMetrics
from serve.pool_directory import PoolDirectory
from serve.protocol import ApiError
from workers.kv_params import KvHandoff, push_decode_handoff
from workers.messages import COMPLETE_FINISH_REASONS, DecodeRequest, PrefillRequest, SamplingSpec, TokenChunk

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GenerationJob:
    desc: RequestDescriptor
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    cache_salt: str | None = None
    priority: int = 0  # engine scheduling priority, vLLM semantics (lower first): -tier priority


PUSH_WAIT_TTFT_FACTOR = 3.0  # a push reservation waits this many predicted TTFTs for the prefill's write


def push_wait_s(predicted_ttft_s: float | None, prefill_timeout_s: float) -> float:
    """How long a push-mode decode reservation waits for its prefill: a few predicted TTFTs (so a long
    prompt's prefill fits and a dead prefill replica is given up on soon after it should have answered),
    at most as long as the router waits for a prefill; without a prediction, that whole wait (pure)."""
    if not predicted_ttft_s or predicted_ttft_s <= 0:
        return prefill_timeout_s
    return min(prefill_timeout_s, PUSH_WAIT_TTFT_FACTOR * predicted_ttft_s)


@dataclass(slots=True)
class _Progress:
    """What one request's client has received so far."""

    start_s: float  # the request reached the orchestrator
    first_s: float | None = None  # its first chunk arrived
    generated: list[int] = field(default_factory=list)  # token ids sent (a migrated decode continues after them)


class Orchestrator:
    def __init__(
        self,
        handles: Mapping[str, Any],
        policy: RoutingPolicy,
        directory: PoolDirectory,
        metrics: ClusterMetrics,
        *,
        prefill_timeout_s: float,
        idle_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        push_compression: str | None = None,
        decode_migrations: int = 1,
        observer: RoutingObserver | None = None,
        cold_start: ColdStart | None = None,
    ) -> None:
        """``prefill_timeout_s``, ``idle_timeout_s``, ``decode_migrations``: the ``router`` config fields.
        ``observer`` (the autoscaling planner) gets the policy's ``on_routed`` / ``on_first_token`` /
        ``on_finish`` events too. ``cold_start``: a request that finds no decode replica waits for an empty
        decode pool to start one (serve/cold_start.py)."""
        self._handles = handles
        self._policy = policy
        self._observers: tuple[RoutingObserver, ...] = (policy,) if observer is None else (policy, observer)
        self._directory = directory
        self._metrics = metrics
        self._prefill_timeout_s = prefill_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._decode_migrations = decode_migrations
        self._cold_start = cold_start
        self._clock = clock
        self._in_flight: collections.Counter[str] = collections.Counter()
        # prefill work dispatched and not done, in uncached tokens, by (endpoint, engine priority)
        self._queued_by_priority: collections.Counter[tuple[str, int]] = collections.Counter()
        # slab push mode (None = pull): decode requests go out with their prefill, naming its agent
        self._push_compression = push_compression
        self._kv_agents: dict[str, tuple[str, str, int]] = {}  # prefill endpoint -> its slab agent

    def set_kv_agents(self, agents: Mapping[str, Any]) -> None:
        """Replicas' transfer agents ([name, host, port]) from their latest stats polls."""
        self._kv_agents = {e: (str(a[0]), str(a[1]), int(a[2])) for e, a in agents.items() if len(a) == 3}

    def forget_replicas(self, live: set[str]) -> list[str]:
        """Drop from the policy's prefix index every replica not in ``live`` (dead, unhealthy or removed):
        its cache is gone or unreachable, and a replacement starts empty. Returns the dropped ones."""
        index = self._policy.prefix_index
        if index is None:
            return []
        gone = sorted(index.endpoints() - live)
        for endpoint in gone:
            index.drop_endpoint(endpoint)
        return gone

    def prefix_index_blocks(self) -> dict[str, int]:
        """Blocks the prefix index places on each replica (none without a prefix-aware policy)."""
        index = self._policy.prefix_index
        return index.blocks_by_endpoint() if index is not None else {}

    # -- step 1: route ---------------------------------------------------------------------
    def snapshot(self, exclude: frozenset[str] = frozenset()) -> PoolSnapshot:
        snap = self._directory.snapshot(self._in_flight, self.queued_by_priority())
        if exclude:
            snap.endpoints = [e for e in snap.endpoints if e.endpoint_id not in exclude]
        return snap

    def route(
        self, desc: RequestDescriptor, exclude: frozenset[str] = frozenset(), retry: str | None = None
    ) -> RoutingDecision:
        """Route (and admit) a request, record the outcome once (:meth:`_record`), and raise a rejection
        as the client's error. ``retry`` (``decode_retry`` / ``decode_migration``): its decode moves away
        from ``exclude`` after failing there; it is placed without admission (it was admitted when first
        routed), and a rejection of the move is the request's error, not an admission rejection."""
        snap = self.snapshot(exclude)
        t0 = time.perf_counter()
        decision = self._policy.route(desc, snap, admit=not retry)  # a moved request was admitted
        if not retry:
            self._metrics.decision_s.observe(time.perf_counter() - t0)
        self._record(desc, decision, retry)
        if isinstance(decision, Rejection):
            raise rejection_to_error(decision)
        logger.debug(
            "route %s -> prefill=%s decode=%s (%s)",
            desc.request_id,
            decision.prefill and decision.prefill.endpoint_id,
            decision.decode.endpoint_id,
            decision.reason,
        )
        return decision

    def _record(self, desc: RequestDescriptor, outcome: RoutingDecision | Rejection, retry: str | None) -> None:
        """The policy's and the observer's ``on_routed`` hook, and the routing metrics: a request counts once,
        when first routed; a move counts in ``prefill_fallbacks{retry}`` only."""
        for o in self._observers:
            o.on_routed(desc, outcome, moved=bool(retry))
        if retry:
            self._metrics.prefill_fallbacks.labels(retry).inc()
            return
        if isinstance(outcome, Rejection):
            self._metrics.rejections.labels(outcome.reason, desc.tier).inc()
            return
        where = "remote" if outcome.prefill else "local"
        self._metrics.routing.labels(where, outcome.decode.pool).inc()
        self._metrics.admitted.labels(desc.tier, where).inc()
        self._metrics.prefix_hit_tokens.inc(outcome.prefix_hit_tokens)
        if outcome.max_new_tokens is not None:
            self._metrics.throttled.labels(desc.tier, "cap_max_tokens").inc()
        self._metrics.routed_prompt_tokens.inc(desc.num_prompt_tokens)

    # -- step 2: remote prefill ----------------------------------------------------------------
    async def prefill(
        self, job: GenerationJob, target: EndpointState | None, push_rendezvous: str | None = None
    ) -> KvHandoff | None:
        """Run the prefill on ``target``; None means 'decode engine prefills locally'. In push mode
        (``push_rendezvous``) the result is not needed: the prefill engine writes to the decode's buffer."""
        return (await self._prefill(job, target, push_rendezvous))[1]

    async def _prefill(
        self, job: GenerationJob, target: EndpointState | None, push_rendezvous: str | None = None
    ) -> tuple[bool, KvHandoff | None]:
        """(the prefill call succeeded, its handoff)."""
        if target is None:
            return True, None
        req = PrefillRequest(
            request_id=job.desc.request_id,
            prompt_token_ids=job.prompt_token_ids,
            cache_salt=job.cache_salt,
            push_rendezvous=push_rendezvous,
            priority=job.priority,
        )
        t0 = self._clock()
        self._in_flight[target.endpoint_id] += 1
        resp = self._handles[target.pool].prefill.remote(req, endpoint_hint=target.endpoint_id)
        try:
            result = await asyncio.wait_for(resp, timeout=self._prefill_timeout_s)
        except asyncio.CancelledError:
            resp.cancel()
            raise
        except TimeoutError:
            resp.cancel()
            self._metrics.prefill_fallbacks.labels("timeout").inc()
            logger.warning("prefill of %s timed out on %s; prefilling on decode", req.request_id, target.endpoint_id)
            return False, None
        except BackPressureError:  # the pool's Serve queue is full: the replica is fine, just busy
            self._metrics.prefill_fallbacks.labels("queue_full").inc()
            return False, None
        except Exception as e:  # replica died, engine error...
            self._suspect(target, e)
            self._metrics.prefill_fallbacks.labels("error").inc()
            logger.warning(
                "prefill of %s failed on %s (%r); prefilling on decode", req.request_id, target.endpoint_id, e
            )
            return False, None
        finally:
            self._release(target.endpoint_id)
        self._metrics.prefill_s.observe(self._clock() - t0)
        self._metrics.prefill_engine_s.observe(result.prefill_s)
        if result.handoff is None and push_rendezvous is None:
            self._metrics.prefill_fallbacks.labels("no_handoff").inc()
        return True, result.handoff

    # -- step 3: decode stream -----------------------------------------------------------------
    async def decode(
        self, job: GenerationJob, target: EndpointState, handoff: KvHandoff | None
    ) -> AsyncIterator[TokenChunk]:
        """The engine's chunks up to and including the one that completes the request ("stop" or
        "length"). Every failure of the call is a :class:`DecodeFailed`: a finish other than those (or a
        stream that ends with no finish) with an :class:`EngineFinishFailed` cause, anything the call
        raises with that exception as its cause (and the replica out of rotation, see :meth:`_suspect`).
        504 ApiError after ``idle_timeout_s`` with no chunk."""
        req = DecodeRequest(
            request_id=job.desc.request_id,
            prompt_token_ids=job.prompt_token_ids,
            sampling=job.sampling,
            handoff=handoff,
            cache_salt=job.cache_salt,
            priority=job.priority,
        )
        self._in_flight[target.endpoint_id] += 1
        gen = None
        finished = complete = False
        try:
            gen = self._handles[target.pool].options(stream=True).generate.remote(req, endpoint_hint=target.endpoint_id)
            while True:
                try:
                    chunk = await asyncio.wait_for(gen.__anext__(), timeout=self._idle_timeout_s)
                except StopAsyncIteration:
                    finished = True
                    if complete:
                        return
                    raise EngineFinishFailed(None) from None
                except TimeoutError:
                    self._metrics.aborts.labels("idle_timeout").inc()
                    raise ApiError(
                        504,
                        f"no output for {self._idle_timeout_s:.0f}s; request aborted",
                        type_="timeout_error",
                        code="engine_timeout",
                    ) from None
                if chunk.finish_reason is not None and chunk.finish_reason not in COMPLETE_FINISH_REASONS:
                    raise EngineFinishFailed(chunk.finish_reason)  # (the call is cancelled below)
                yield chunk
                if chunk.finish_reason is not None:
                    finished = complete = True
        except ApiError:
            raise
        except BackPressureError as e:  # the pool's Serve queue is full (server.max_queued_requests)
            raise queue_full_error(e) from e
        except Exception as e:
            self._suspect(target, e)
            raise DecodeFailed(target, e) from e
        finally:
            if not finished and gen is not None:
                gen.cancel()
            self._release(target.endpoint_id)

    @staticmethod
    async def _unless_push_fails(
        stream: AsyncIterator[TokenChunk], prefill_task: asyncio.Future
    ) -> AsyncIterator[TokenChunk]:
        """``stream``, unless the push-mode prefill fails before its first chunk: then the decode call
        is cancelled (its engine aborts the request and frees the reservation) and this raises
        :class:`PushPrefillFailed`."""
        first = asyncio.ensure_future(stream.__anext__())
        try:
            await asyncio.wait({first, prefill_task}, return_when=asyncio.FIRST_COMPLETED)
            if not first.done() and not prefill_task.result()[0]:
                first.cancel()
                await asyncio.wait({first})
                raise PushPrefillFailed()
            chunk = await first
        except StopAsyncIteration:
            return
        finally:
            if not first.done():
                first.cancel()
        yield chunk
        async for chunk in stream:
            yield chunk

    # -- the whole flow ------------------------------------------------------------------------
    async def generate(self, job: GenerationJob) -> AsyncIterator[TokenChunk]:
        """Route -> prefill -> decode; then, if the decode failed: before its first chunk, a decode with
        local prefill on another replica (or, when only the push prefill failed, on the same one); after
        it, a migration. Whatever fails last is the client's error (:meth:`_failed`)."""
        progress = _Progress(start_s=self._clock())
        if self._cold_start is not None:
            await self._cold_start.ready(self.snapshot)
        decision = self.route(job.desc)
        job = _capped(job, decision)
        failure: DecodeFailed | None = None
        try:
            # closed as soon as this is (the client went away): its reservation and push prefill go at once
            async with contextlib.aclosing(self._attempt(job, decision, progress)) as attempt:
                async for chunk in attempt:
                    yield chunk
            return
        except PushPrefillFailed:
            logger.warning(
                "push prefill of %s failed; prefilling on decode replica %s",
                job.desc.request_id,
                decision.decode.endpoint_id,
            )
        except DecodeFailed as f:
            failure = f
        if failure is not None and progress.first_s is not None:
            async for chunk in self._migrate(job, failure, tuple(progress.generated)):
                yield chunk
            return
        target = decision.decode  # push prefill failed: the decode replica prefills the prompt
        if failure is not None:
            logger.warning(
                "decode of %s failed on %s before any token (%r); retrying on another replica",
                job.desc.request_id,
                failure.endpoint.endpoint_id,
                failure.cause,
            )
            target = self.route(
                job.desc, exclude=frozenset({failure.endpoint.endpoint_id}), retry="decode_retry"
            ).decode
        async for chunk in self._last_decode(job, target):
            yield chunk

    async def _attempt(
        self, job: GenerationJob, decision: RoutingDecision, progress: _Progress
    ) -> AsyncIterator[TokenChunk]:
        """The request as routed: its prefill (remote or local, pull or push) and decode stream, with
        the first-token and finish observations. Raises :class:`DecodeFailed` or :class:`PushPrefillFailed`."""
        # the prefilling replica's queued work, released once its prefill is done (idempotent)
        release = self._reserve(
            (decision.prefill or decision.decode).endpoint_id, decision.uncached_tokens, job.priority
        )
        prefill_task: asyncio.Future | None = None
        try:
            stream, prefill_task = await self._start(job, decision, release)
            async for chunk in stream:
                progress.generated += chunk.token_ids
                if progress.first_s is None:
                    progress.first_s = self._clock()
                    release()
                    self._first_token(decision, progress.first_s - progress.start_s)
                if chunk.finish_reason is not None:
                    self._finished(decision, progress)
                yield chunk
        finally:
            release()
            if prefill_task is not None and not prefill_task.done():
                prefill_task.cancel()

    async def _start(
        self, job: GenerationJob, decision: RoutingDecision, release: Callable[[], None]
    ) -> tuple[AsyncIterator[TokenChunk], asyncio.Future | None]:
        """Prefill and open the decode stream. Pull (or local prefill): the prefill's answer carries the
        handoff the decode request needs. Push: the decode request reserves a buffer while the prefill
        runs alongside (returned, to cancel); its KV arrives by WRITE, so the prefill's answer need not
        come back through here first."""
        push = self._push_handoff(job, decision)
        if push is None:
            handoff = await self.prefill(job, decision.prefill)
            if decision.prefill is not None:
                self._metrics.handoff_mode.labels("pull").inc()
                release()
            return self.decode(job, decision.decode, handoff), None
        handoff, rendezvous = push
        self._metrics.handoff_mode.labels("push").inc()
        prefill_task = asyncio.ensure_future(self._prefill(job, decision.prefill, rendezvous))
        prefill_task.add_done_callback(lambda _: release())
        return self._unless_push_fails(self.decode(job, decision.decode, handoff), prefill_task), prefill_task

    def _first_token(self, decision: RoutingDecision, ttft_s: float) -> None:
        if decision.predicted_ttft_s:
            self._metrics.ttft_pred_ratio.observe(ttft_s / decision.predicted_ttft_s)
        for o in self._observers:
            o.on_first_token(decision, ttft_s)

    def _finished(self, decision: RoutingDecision, progress: _Progress) -> None:
        tpot_s = None
        if len(progress.generated) > 1 and progress.first_s is not None:
            tpot_s = (self._clock() - progress.first_s) / (len(progress.generated) - 1)
            if decision.predicted_tpot_s:
                self._metrics.tpot_pred_ratio.observe(tpot_s / decision.predicted_tpot_s)
        for o in self._observers:
            o.on_finish(decision, tpot_s)

    async def _migrate(
        self, job: GenerationJob, failure: DecodeFailed, generated: tuple[int, ...]
    ) -> AsyncIterator[TokenChunk]:
        """Continue a decode that failed (``failure``) after sending ``generated``: on another decode
        replica, the prompt plus ``generated`` as its prompt (prefilled remotely or there, as placement
        decides), for the tokens still owed (request migration, as Dynamo does it). Greedy decoding
        continues exactly; sampled text continues from a fresh random state. No migration left, no
        other replica, or a failure of the continuation: the request's error."""
        remaining = job.sampling.max_tokens - len(generated)
        exclude = {failure.endpoint.endpoint_id}
        for attempt in range(1, self._decode_migrations + 1 if remaining > 0 else 1):
            try:
                decision = self.route(job.desc, exclude=frozenset(exclude), retry="decode_migration")
            except ApiError:  # no other decode replica: the original failure is the error
                break
            target = decision.decode
            logger.warning(
                "decode of %s failed on %s after %d tokens (%r); continuing on %s",
                job.desc.request_id,
                failure.endpoint.endpoint_id,
                len(generated),
                failure.cause,
                target.endpoint_id,
            )
            cont = dataclasses.replace(
                job,
                desc=dataclasses.replace(job.desc, request_id=f"{job.desc.request_id}-m{attempt}"),
                prompt_token_ids=job.prompt_token_ids + generated,
                sampling=dataclasses.replace(job.sampling, max_tokens=remaining),
            )
            try:
                # prefilled where placement says, like any request: a prefill replica spares the decode
                # replica that now carries the failed one's streams (pull handoff; local on failure)
                handoff = await self.prefill(cont, decision.prefill)
                async for chunk in self.decode(cont, target, handoff):
                    generated += chunk.token_ids
                    remaining -= len(chunk.token_ids)
                    yield chunk
                return
            except DecodeFailed as f:
                failure = f
                exclude.add(target.endpoint_id)
        raise self._failed(job, failure) from failure.cause

    async def _last_decode(self, job: GenerationJob, target: EndpointState) -> AsyncIterator[TokenChunk]:
        """A decode with local prefill and no retry left: any failure is the request's error."""
        try:
            async for chunk in self.decode(job, target, None):
                yield chunk
        except DecodeFailed as f:
            raise self._failed(job, f) from f.cause

    def _suspect(self, target: EndpointState, e: Exception) -> None:
        """A call that raised (the replica or its engine died, or Serve could not reach it) rather than
        an engine finishing one request badly: route around the replica until its stats vouch for it."""
        if not isinstance(e, EngineFinishFailed):
            self._directory.suspect(target.endpoint_id)

    def _failed(self, job: GenerationJob, failure: DecodeFailed) -> ApiError:
        """The client's error for the decode failure that ended the request (``failures.decode_error``)."""
        err = decode_error(failure.cause)
        self._metrics.aborts.labels(err.code).inc()
        logger.warning(
            "decode of %s failed on %s (%r): %d %s",
            job.desc.request_id,
            failure.endpoint.endpoint_id,
            failure.cause,
            err.status_code,
            err.code,
        )
        return err

    def _push_handoff(self, job: GenerationJob, decision: RoutingDecision) -> tuple[KvHandoff, str] | None:
        """Push mode for a remote prefill whose replica advertised its agent: (decode handoff, rendezvous)."""
        if self._push_compression is None or decision.prefill is None:
            return None
        agent = self._kv_agents.get(decision.prefill.endpoint_id)
        if agent is None:
            return None
        rendezvous = f"{job.desc.request_id}-{uuid.uuid4().hex[:8]}"
        return push_decode_handoff(
            agent,
            rendezvous,
            len(job.prompt_token_ids),
            self._push_compression,
            push_wait_s(decision.predicted_ttft_s, self._prefill_timeout_s),
        ), rendezvous

    def _reserve(self, endpoint_id: str, tokens: int, priority: int = 0) -> Callable[[], None]:
        """Count ``tokens`` of prefill work (at engine ``priority``) queued on ``endpoint_id``; returns
        an idempotent release."""
        if tokens <= 0:
            return lambda: None
        key = (endpoint_id, priority)
        self._queued_by_priority[key] += tokens
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self._queued_by_priority[key] -= tokens
                if self._queued_by_priority[key] <= 0:
                    del self._queued_by_priority[key]

        return release

    def queued_by_priority(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """endpoint -> ((engine priority, queued prefill tokens), ...), lowest priority value first."""
        out: dict[str, list[tuple[int, int]]] = {}
        for (endpoint_id, prio), tokens in sorted(self._queued_by_priority.items()):
            out.setdefault(endpoint_id, []).append((prio, tokens))
        return {e: tuple(v) for e, v in out.items()}

    def _release(self, endpoint_id: str) -> None:
        self._in_flight[endpoint_id] -= 1
        if self._in_flight[endpoint_id] <= 0:
            del self._in_flight[endpoint_id]

    def in_flight(self) -> dict[str, int]:
        return dict(self._in_flight)


def _capped(job: GenerationJob, decision: RoutingDecision) -> GenerationJob:
    """Decode throttling: a request admitted with a lower ``max_new_tokens`` holds its decode slot for
    fewer tokens (finish "length")."""
    if decision.max_new_tokens is not None and decision.max_new_tokens < job.sampling.max_tokens:
        return dataclasses.replace(job, sampling=dataclasses.replace(job.sampling, max_tokens=decision.max_new_tokens))
    return job
