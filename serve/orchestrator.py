"""The P/D request flow as named steps: route -> prefill -> handoff -> decode stream.

Failure policy (each path counts in metrics with a reason):
- no healthy decode replica: reject 503 + Retry-After before any engine work;
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
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from router.policy import RoutingPolicy
from router.types import EndpointState, PoolSnapshot, Rejection, RequestDescriptor, RoutingDecision
from serve.failures import EngineFinishFailed, PushPrefillFailed, decode_error, rejection_to_error
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
    priority: int = 0          # engine scheduling priority, vLLM semantics (lower first): -tier priority


PUSH_WAIT_TTFT_FACTOR = 3.0   # a push reservation waits this many predicted TTFTs for the prefill's write


def push_wait_s(predicted_ttft_s: float | None, prefill_timeout_s: float) -> float:
    """How long a push-mode decode reservation waits for its prefill: a few predicted TTFTs (so a long
    prompt's prefill fits and a dead prefill replica is given up on soon after it should have answered),
    at most as long as the router waits for a prefill; without a prediction, that whole wait (pure)."""
    if not predicted_ttft_s or predicted_ttft_s <= 0:
        return prefill_timeout_s
    return min(prefill_timeout_s, PUSH_WAIT_TTFT_FACTOR * predicted_ttft_s)


class Orchestrator:
    def __init__(self, handles: Mapping[str, Any], policy: RoutingPolicy, directory: PoolDirectory,
                 metrics: ClusterMetrics, *, prefill_timeout_s: float, idle_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic, push_compression: str | None = None,
                 decode_migrations: int = 1) -> None:
        """``prefill_timeout_s``, ``idle_timeout_s``, ``decode_migrations``: the ``router`` config fields."""
        self._handles = handles
        self._policy = policy
        self._directory = directory
        self._metrics = metrics
        self._prefill_timeout_s = prefill_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._decode_migrations = decode_migrations
        self._clock = clock
        self._in_flight: collections.Counter[str] = collections.Counter()
        # prefill work dispatched and not done, in uncached tokens, by (endpoint, engine priority)
        self._queued_by_priority: collections.Counter[tuple[str, int]] = collections.Counter()
        self._index = getattr(policy, "index", None)          # prefix-aware policies expose theirs
        # slab push mode (None = pull): decode requests go out with their prefill, naming its agent
        self._push_compression = push_compression
        self._kv_agents: dict[str, tuple[str, str, int]] = {}    # prefill endpoint -> its slab agent

    def set_kv_agents(self, agents: Mapping[str, Any]) -> None:
        """Replicas' transfer agents ([name, host, port]) from their latest stats polls."""
        self._kv_agents = {e: (str(a[0]), str(a[1]), int(a[2])) for e, a in agents.items() if len(a) == 3}

    def forget_replicas(self, live: set[str]) -> list[str]:
        """Drop from the prefix index every replica not in ``live`` (dead, unhealthy or removed): its
        cache is gone or unreachable, and a replacement starts empty. Returns the dropped ones."""
        if self._index is None:
            return []
        gone = sorted(self._index.endpoints() - live)
        for endpoint in gone:
            self._index.drop_endpoint(endpoint)
        return gone

    def prefix_index_blocks(self) -> dict[str, int]:
        """Blocks the prefix index places on each replica (none without a prefix-aware policy)."""
        return self._index.blocks_by_endpoint() if self._index is not None else {}

    # -- step 1: route ---------------------------------------------------------------------
    def snapshot(self, exclude: frozenset[str] = frozenset()) -> PoolSnapshot:
        snap = self._directory.snapshot(self._in_flight, self.queued_by_priority())
        if exclude:
            snap.endpoints = [e for e in snap.endpoints if e.endpoint_id not in exclude]
        return snap

    def route(self, desc: RequestDescriptor, exclude: frozenset[str] = frozenset(), retry: str | None = None
              ) -> RoutingDecision:
        """Route (and admit) a request. ``retry`` (``decode_retry`` / ``decode_migration``): its decode
        moves away from ``exclude`` after failing there; the request was counted when first routed, so
        this counts the move (``prefill_fallbacks{retry}``) and records the new decode replica in the
        prefix index, nothing else (a rejection of the move is the request's error, not an admission
        rejection)."""
        snap = self.snapshot(exclude)
        t0 = time.perf_counter()
        decision = self._policy.route(desc, snap, admit=not retry)     # a moved request was admitted
        if retry:
            self._metrics.prefill_fallbacks.labels(retry).inc()
            if isinstance(decision, Rejection):
                raise rejection_to_error(decision)
            if self._index is not None and desc.block_hashes:     # it prefills the prompt itself
                self._index.add(decision.decode.endpoint_id, desc.block_hashes)
            return decision
        self._metrics.decision_s.observe(time.perf_counter() - t0)
        if isinstance(decision, Rejection):
            self._metrics.rejections.labels(decision.reason, desc.tier).inc()
            raise rejection_to_error(decision)
        where = "remote" if decision.prefill else "local"
        self._metrics.routing.labels(where, decision.decode.pool).inc()
        self._metrics.admitted.labels(desc.tier, where).inc()
        self._metrics.prefix_hit_tokens.inc(decision.prefix_hit_tokens)
        if decision.max_new_tokens is not None:
            self._metrics.throttled.labels(desc.tier, "cap_max_tokens").inc()
        self._metrics.routed_prompt_tokens.inc(desc.num_prompt_tokens)
        if self._index is not None and desc.block_hashes:
            # the router's own record: both replicas will hold the prompt's KV blocks
            for e in filter(None, (decision.prefill, decision.decode)):
                self._index.add(e.endpoint_id, desc.block_hashes)
        logger.debug("route %s -> prefill=%s decode=%s (%s)", desc.request_id,
                     decision.prefill and decision.prefill.endpoint_id, decision.decode.endpoint_id, decision.reason)
        return decision

    # -- step 2: remote prefill ----------------------------------------------------------------
    async def prefill(self, job: GenerationJob, target: EndpointState | None,
                      push_rendezvous: str | None = None) -> KvHandoff | None:
        """Run the prefill on ``target``; None means 'decode engine prefills locally'. In push mode
        (``push_rendezvous``) the result is not needed: the prefill engine writes to the decode's buffer."""
        return (await self._prefill(job, target, push_rendezvous))[1]

    async def _prefill(self, job: GenerationJob, target: EndpointState | None,
                       push_rendezvous: str | None = None) -> tuple[bool, KvHandoff | None]:
        """(the prefill call succeeded, its handoff)."""
        if target is None:
            return True, None
        req = PrefillRequest(request_id=job.desc.request_id, prompt_token_ids=job.prompt_token_ids,
                             cache_salt=job.cache_salt, push_rendezvous=push_rendezvous, priority=job.priority)
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
        except Exception as e:  # replica died, engine error...
            self._suspect(target, e)
            self._metrics.prefill_fallbacks.labels("error").inc()
            logger.warning("prefill of %s failed on %s (%r); prefilling on decode", req.request_id,
                           target.endpoint_id, e)
            return False, None
        finally:
            self._release(target.endpoint_id)
        self._metrics.prefill_s.observe(self._clock() - t0)
        if result.handoff is None and push_rendezvous is None:
            self._metrics.prefill_fallbacks.labels("no_handoff").inc()
        return True, result.handoff

    # -- step 3: decode stream -----------------------------------------------------------------
    async def decode(self, job: GenerationJob, target: EndpointState, handoff: KvHandoff | None
                     ) -> AsyncIterator[TokenChunk]:
        """The engine's chunks up to and including the one that completes the request ("stop" or
        "length"). Raises :class:`EngineFinishFailed` instead of yielding any other finish, and when the
        stream ends with no finish; 504 ApiError after ``idle_timeout_s`` with no chunk."""
        req = DecodeRequest(request_id=job.desc.request_id, prompt_token_ids=job.prompt_token_ids,
                            sampling=job.sampling, handoff=handoff, cache_salt=job.cache_salt,
                            priority=job.priority)
        self._in_flight[target.endpoint_id] += 1
        gen = self._handles[target.pool].options(stream=True).generate.remote(req, endpoint_hint=target.endpoint_id)
        finished = complete = False
        try:
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
                    raise ApiError(504, f"no output for {self._idle_timeout_s:.0f}s; request aborted",
                                   type_="timeout_error", code="engine_timeout") from None
                if chunk.finish_reason is not None and chunk.finish_reason not in COMPLETE_FINISH_REASONS:
                    raise EngineFinishFailed(chunk.finish_reason)     # (the call is cancelled below)
                yield chunk
                if chunk.finish_reason is not None:
                    finished = complete = True
        finally:
            if not finished:
                gen.cancel()
            self._release(target.endpoint_id)

    @staticmethod
    async def _unless_push_fails(stream: AsyncIterator[TokenChunk], prefill_task: asyncio.Future
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
        t0 = self._clock()
        decision = self.route(job.desc)
        if decision.max_new_tokens is not None and decision.max_new_tokens < job.sampling.max_tokens:
            # decode throttling: this request may hold a decode slot for fewer tokens (finish "length")
            job = dataclasses.replace(job, sampling=dataclasses.replace(job.sampling,
                                                                       max_tokens=decision.max_new_tokens))
        model_of = getattr(self._policy, "model", None)
        # the prefilling replica's queued work, released once its prefill is done (idempotent)
        release = self._reserve((decision.prefill or decision.decode).endpoint_id, decision.uncached_tokens,
                                job.priority)
        produced = push_failed = False
        generated: list[int] = []       # token ids sent so far (a migrated decode continues after them)
        failure: Exception | None = None
        push = self._push_handoff(job, decision)
        prefill_task = None
        try:
            if push is not None:
                # push: the decode request reserves a buffer while the prefill runs; its KV arrives
                # by WRITE, so the prefill's answer need not come back through here first
                handoff, rendezvous = push
                self._metrics.handoff_mode.labels("push").inc()
                prefill_task = asyncio.ensure_future(self._prefill(job, decision.prefill, rendezvous))
                prefill_task.add_done_callback(lambda _: release())
            else:
                handoff = await self.prefill(job, decision.prefill)
                if decision.prefill is not None:
                    self._metrics.handoff_mode.labels("pull").inc()
                    release()
            first_s = None
            stream = self.decode(job, decision.decode, handoff)
            if prefill_task is not None:
                stream = self._unless_push_fails(stream, prefill_task)
            async for chunk in stream:
                generated += chunk.token_ids
                if not produced:
                    produced, first_s = True, self._clock()
                    release()
                    if decision.predicted_ttft_s:
                        ratio = (first_s - t0) / decision.predicted_ttft_s
                        self._metrics.ttft_pred_ratio.observe(ratio)
                        if model_of is not None:
                            model_of((decision.prefill or decision.decode).pool).observe_ttft_ratio(ratio)
                if chunk.finish_reason is not None and decision.predicted_tpot_s and len(generated) > 1:
                    tpot = (self._clock() - first_s) / (len(generated) - 1)
                    ratio = tpot / decision.predicted_tpot_s
                    self._metrics.tpot_pred_ratio.observe(ratio)
                    if model_of is not None:
                        model_of(decision.decode.pool).observe_tpot_ratio(ratio)
                yield chunk
            return
        except (ApiError, asyncio.CancelledError, GeneratorExit):
            raise
        except PushPrefillFailed:
            push_failed = True
            logger.warning("push prefill of %s failed; prefilling on decode replica %s", job.desc.request_id,
                           decision.decode.endpoint_id)
        except Exception as e:
            failure = e
            self._suspect(decision.decode, e)
            if not produced:
                logger.warning("decode of %s failed on %s before any token (%r); retrying on another replica",
                               job.desc.request_id, decision.decode.endpoint_id, e)
        finally:
            release()
            if prefill_task is not None and not prefill_task.done():
                prefill_task.cancel()
        if produced:
            assert failure is not None
            async for chunk in self._migrate(job, decision.decode, failure, tuple(generated)):
                yield chunk
            return
        if push_failed:     # the decode replica is fine: it prefills the prompt itself
            target = decision.decode
        else:
            target = self.route(job.desc, exclude=frozenset({decision.decode.endpoint_id}), retry="decode_retry").decode
        async for chunk in self._last_decode(job, target):
            yield chunk

    async def _migrate(self, job: GenerationJob, failed: EndpointState, error: Exception,
                       generated: tuple[int, ...]) -> AsyncIterator[TokenChunk]:
        """Continue a decode that failed on ``failed`` after sending ``generated``: on another decode
        replica, the prompt plus ``generated`` as its prompt (prefilled remotely or there, as placement
        decides), for the tokens still owed (request migration, as Dynamo does it). Greedy decoding
        continues exactly; sampled text continues from a fresh random state. No migration left, no
        other replica, or a failure of the continuation:
        the request's error."""
        remaining = job.sampling.max_tokens - len(generated)
        exclude = {failed.endpoint_id}
        for attempt in range(1, self._decode_migrations + 1 if remaining > 0 else 1):
            try:
                decision = self.route(job.desc, exclude=frozenset(exclude), retry="decode_migration")
            except ApiError:        # no other decode replica: the original failure is the error
                break
            target = decision.decode
            logger.warning("decode of %s failed on %s after %d tokens (%r); continuing on %s",
                           job.desc.request_id, failed.endpoint_id, len(generated), error, target.endpoint_id)
            cont = dataclasses.replace(
                job, desc=dataclasses.replace(job.desc, request_id=f"{job.desc.request_id}-m{attempt}"),
                prompt_token_ids=job.prompt_token_ids + generated,
                sampling=dataclasses.replace(job.sampling, max_tokens=remaining))
            try:
                # prefilled where placement says, like any request: a prefill replica spares the decode
                # replica that now carries the failed one's streams (pull handoff; local on failure)
                handoff = await self.prefill(cont, decision.prefill)
                async for chunk in self.decode(cont, target, handoff):
                    generated += chunk.token_ids
                    remaining -= len(chunk.token_ids)
                    yield chunk
                return
            except (ApiError, asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as e:
                self._suspect(target, e)
                failed, error = target, e
                exclude.add(target.endpoint_id)
        raise self._failed(job, failed, error) from error

    async def _last_decode(self, job: GenerationJob, target: EndpointState) -> AsyncIterator[TokenChunk]:
        """A decode with local prefill and no retry left: any failure is the request's error."""
        try:
            async for chunk in self.decode(job, target, None):
                yield chunk
        except (ApiError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            self._suspect(target, e)
            raise self._failed(job, target, e) from e

    def _suspect(self, target: EndpointState, e: Exception) -> None:
        """A call that raised (the replica or its engine died, or Serve could not reach it) rather than
        an engine finishing one request badly: route around the replica until its stats vouch for it."""
        if not isinstance(e, EngineFinishFailed):
            self._directory.suspect(target.endpoint_id)

    def _failed(self, job: GenerationJob, target: EndpointState, e: Exception) -> ApiError:
        err = decode_error(e)
        self._metrics.aborts.labels(err.code).inc()
        logger.warning("decode of %s failed on %s (%r): %d %s", job.desc.request_id, target.endpoint_id, e,
                       err.status_code, err.code)
        return err

    def _push_handoff(self, job: GenerationJob, decision: RoutingDecision) -> tuple[KvHandoff, str] | None:
        """Push mode for a remote prefill whose replica advertised its agent: (decode handoff, rendezvous)."""
        if self._push_compression is None or decision.prefill is None:
            return None
        agent = self._kv_agents.get(decision.prefill.endpoint_id)
        if agent is None:
            return None
        rendezvous = f"{job.desc.request_id}-{uuid.uuid4().hex[:8]}"
        return push_decode_handoff(agent, rendezvous, len(job.prompt_token_ids), self._push_compression,
                                   push_wait_s(decision.predicted_ttft_s, self._prefill_timeout_s)), rendezvous

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

    def observe(self, stats) -> None:
        """Calibrate the policy's cost models from a replica's drained engine samples."""
        model_of = getattr(self._policy, "model", None)
        if model_of is None:
            return
        m = model_of(stats.pool)
        for tokens, seconds in stats.prefill_samples:
            m.observe_prefill(tokens, seconds)
        for batch, context_tokens, seconds in stats.decode_samples:
            m.observe_decode(batch, seconds, context_tokens)
        if stats.kv_transfer_durations_s and stats.kv_transfers_total:
            avg_bytes = stats.kv_transfer_bytes_total // stats.kv_transfers_total
            for d in stats.kv_transfer_durations_s:
                m.observe_handoff(avg_bytes, d)

    def _release(self, endpoint_id: str) -> None:
        self._in_flight[endpoint_id] -= 1
        if self._in_flight[endpoint_id] <= 0:
            del self._in_flight[endpoint_id]

    def in_flight(self) -> dict[str, int]:
        return dict(self._in_flight)
