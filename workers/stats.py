"""Collect an engine's load, KV and handoff counters from vLLM's stat-logger hook.

``EngineStatsCollector`` is registered as an ``AsyncLLM`` stat logger; it keeps the latest
scheduler gauges and cumulative counters, and ``snapshot()`` turns them into ``WorkerStats``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from workers.messages import WorkerStats

MAX_SAMPLES = 256  # per drain period; older samples are dropped
CONTEXT_BUCKET_TOKENS = 256  # decode samples are averaged per (batch, context bucket)


class EngineStatsCollector(StatLoggerBase):
    """Cumulative counters + latest gauges of one engine. Thread-safe; never raises into vLLM."""

    def __init__(self, vllm_config: Any = None, engine_index: int = 0) -> None:  # noqa: D401
        self._lock = threading.Lock()
        self._stats = WorkerStats(endpoint_id="", pool="", role="")
        self._pending_durations: list[float] = []
        self._prefill_samples: list[tuple[int, float]] = []
        # (batch, context bucket) -> [sum of step seconds, sum of context tokens, steps]
        self._decode_steps: dict[tuple[int, int], list[float]] = {}
        self._vllm_config = vllm_config

    def factory(self, vllm_config: Any, engine_index: int = 0) -> EngineStatsCollector:
        """Stat-logger factory handed to ``AsyncLLM``: returns this very collector."""
        self._vllm_config = vllm_config
        return self

    def _capacity_tokens(self) -> int:
        """KV cache size in tokens; known once the engine core has profiled memory."""
        cache = getattr(self._vllm_config, "cache_config", None)
        blocks, size = getattr(cache, "num_gpu_blocks", None), getattr(cache, "block_size", None)
        return int(blocks) * int(size) if blocks and size else 0

    def priority_step_tokens(self) -> int:
        """0 for an arrival-order engine; else the token budget of one of its steps (a higher-priority
        arrival waits at most for the lower-priority work already in the running batch)."""
        sched = getattr(self._vllm_config, "scheduler_config", None)
        if str(getattr(sched, "policy", "fcfs")).lower().rsplit(".", 1)[-1] != "priority":
            return 0
        return int(getattr(sched, "max_num_batched_tokens", 0) or 0)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        with self._lock:
            s = self._stats
            if scheduler_stats is not None:
                s.num_running = scheduler_stats.num_running_reqs
                s.num_waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                s.kv_usage = float(scheduler_stats.kv_cache_usage)
                s.kv_capacity_tokens = s.kv_capacity_tokens or self._capacity_tokens()
                if scheduler_stats.kv_connector_stats:
                    self._record_connector(scheduler_stats.kv_connector_stats)
            if iteration_stats is not None:
                p = iteration_stats.prompt_token_stats
                s.prompt_tokens_total += p.total
                s.prompt_tokens_computed += p.computed
                s.prompt_tokens_local_cache_hit += p.local_cache_hit
                s.prompt_tokens_external_kv += p.external_kv_transfer
                s.generation_tokens_total += iteration_stats.num_generation_tokens
                self._record_prefills(iteration_stats.finished_requests or ())
                self._record_step(iteration_stats)
            s.updated_s = time.time()

    def _record_prefills(self, finished) -> None:
        """Prefill calibration from finished requests: (uncached prompt tokens, prefill seconds).

        Prefill-only requests (one generated token: the prefill pool's, and remote prefills in general)
        finish in the step that completed their prefill, so the ones finishing in one step were
        prefilled together and each reports that shared step's time: they make ONE sample, their
        tokens summed. (Taken one by one, three 512-token prompts batched in a 0.6 s step would read as
        512 tokens per 0.6 s, three times too slow, and the router would predict queue waits 3x too
        long.) Requests that decoded further are samples of their own."""
        batch_tokens, batch_s, samples = 0, 0.0, []
        for f in finished:
            uncached = int(f.num_prompt_tokens) - int(f.num_cached_tokens or 0)
            if uncached <= 0 or f.prefill_time <= 0:
                continue
            if int(f.num_generation_tokens) <= 1:
                batch_tokens, batch_s = batch_tokens + uncached, max(batch_s, float(f.prefill_time))
            else:
                samples.append((uncached, float(f.prefill_time)))
        if batch_tokens:
            samples.append((batch_tokens, batch_s))
        if samples:
            self._prefill_samples = (self._prefill_samples + samples)[-MAX_SAMPLES:]

    def _record_step(self, it) -> None:
        """Decode calibration from engine steps: a step that produced a next token for ``k`` running
        requests (plus first tokens for new ones) took the inter-token latency those requests saw,
        so (batch = all requests that got a token, seconds = their mean inter-token latency) is one
        exact sample of TPOT at that batch, including any prefill work the step carried. The step's
        context is the KV the running requests hold (usage x capacity, block-granular)."""
        itl = it.inter_token_latencies_iter
        if not itl:
            return
        batch = len(itl) + len(it.time_to_first_tokens_iter)
        context = int(self._stats.kv_usage * self._stats.kv_capacity_tokens)
        acc = self._decode_steps.setdefault((batch, context // CONTEXT_BUCKET_TOKENS), [0.0, 0.0, 0])
        acc[0] += sum(itl) / len(itl)
        acc[1] += context
        acc[2] += 1

    def _record_connector(self, data: dict[str, Any]) -> None:
        """Fold one interval of connector stats in: vLLM NixlConnector's dict or our slab connector's
        ``KVTransferStats.to_dict()`` (kvtransfer/stats.py; recognised by its ``handoff_s`` key)."""
        s = self._stats
        if "handoff_s" in data:  # slab connector
            durations = data.get("handoff_s") or []
            s.kv_transfer_bytes_total += int(data.get("wire_bytes") or 0)
            s.kv_transfer_raw_bytes_total += int(data.get("raw_bytes") or 0)
            s.kv_transfer_descriptors_total += int(data.get("num_descriptors") or 0)
            s.kv_transfer_failures_total += int(sum((data.get("failures") or {}).values()))
        else:
            durations = data.get("transfer_duration") or []
            nbytes = int(sum(data.get("bytes_transferred") or []))
            s.kv_transfer_bytes_total += nbytes
            s.kv_transfer_raw_bytes_total += nbytes
            s.kv_transfer_descriptors_total += int(sum(data.get("num_descriptors") or []))
            s.kv_transfer_failures_total += sum(
                len(data.get(k) or [])
                for k in (
                    "num_failed_transfers",
                    "num_failed_notifications",
                    "num_failed_handshakes",
                    "num_kv_expired_reqs",
                )
            )
        s.kv_transfers_total += len(durations)
        s.kv_transfer_seconds_total += float(sum(durations))
        self._pending_durations.extend(float(d) for d in durations)

    def log_engine_initialized(self) -> None:
        pass

    def snapshot(self, endpoint_id: str, pool: str, role: str, healthy: bool, drain: bool = False) -> WorkerStats:
        """A copy of the current stats; ``drain`` hands over (and clears) per-transfer durations."""
        with self._lock:
            d = self._stats.to_dict()
            if drain:
                d["kv_transfer_durations_s"] = self._pending_durations
                d["prefill_samples"] = self._prefill_samples
                d["decode_samples"] = [
                    (b, int(acc[1] / acc[2]), acc[0] / acc[2]) for (b, _), acc in sorted(self._decode_steps.items())
                ]
                self._pending_durations, self._prefill_samples, self._decode_steps = [], [], {}
            else:
                d["kv_transfer_durations_s"], d["prefill_samples"], d["decode_samples"] = [], [], []
        # updated_s = when the replica answered (it is alive), not when the engine last logged:
        # an idle engine logs nothing and must not look stale.
        d.update(
            endpoint_id=endpoint_id,
            pool=pool,
            role=role,
            healthy=healthy,
            updated_s=time.time(),
            priority_step_tokens=self.priority_step_tokens(),
        )
        return WorkerStats.from_dict(d)
