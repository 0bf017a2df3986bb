"""Open-loop load: send each request at its scheduled arrival time, whatever the server does.

Bounded by request count (the workload) and wall time (``max_duration_s``): requests not yet sent
when time runs out are skipped and counted; in-flight ones are given ``drain_s`` to finish.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx

from loadtests.client import RequestRecord, stream_chat
from loadtests.timeline import sample_metrics
from loadtests.workloads import RequestSpec


@dataclass
class RunResult:
    records: list[RequestRecord] = field(default_factory=list)
    duration_s: float = 0.0
    skipped: int = 0
    timeline: list[dict] = field(default_factory=list)  # server /metrics samples (timeline.parse_sample)


@asynccontextmanager
async def load_session(
    base_url: str,
    result: RunResult,
    max_connections: int = 512,
    timeline_period_s: float | None = 1.0,
    t0: float | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, float]]:
    """An HTTP client and the run's start time (``time.perf_counter()``: ``t0``, or now), with the
    /metrics sampler running for the duration; sets ``result.duration_s`` on exit. Shared by the open-
    and closed-loop runners."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    async with httpx.AsyncClient(limits=limits, timeout=None) as client:
        t0 = time.perf_counter() if t0 is None else t0
        stop = asyncio.Event()
        sampler = (
            asyncio.create_task(sample_metrics(base_url, t0, timeline_period_s, result.timeline, stop))
            if timeline_period_s
            else None
        )
        try:
            yield client, t0
        finally:
            stop.set()
            if sampler:
                await sampler
            result.duration_s = time.perf_counter() - t0


async def wait_bounded(tasks: list[asyncio.Task], t0: float, max_duration_s: float, drain_s: float) -> set:
    """Wait for ``tasks`` until ``drain_s`` after the arrival window closes; cancel and return the rest."""
    if not tasks:
        return set()
    _, pending = await asyncio.wait(tasks, timeout=drain_s + max(0.0, max_duration_s - (time.perf_counter() - t0)))
    for p in pending:
        p.cancel()
    if pending:
        await asyncio.wait(pending)
    return pending


async def run_open_loop(
    base_url: str,
    model: str,
    specs: Sequence[RequestSpec],
    max_duration_s: float = 300.0,
    drain_s: float = 120.0,
    max_connections: int = 512,
    timeline_period_s: float | None = 1.0,
    t0: float | None = None,
) -> RunResult:
    """``t0``: the run's start (``time.perf_counter()``, default now), for a caller that acts on the
    same clock alongside (arrivals, ``start_s`` and the timeline are offsets from it)."""
    result = RunResult()
    async with load_session(base_url, result, max_connections, timeline_period_s, t0) as (client, t0):
        tasks, start_of = [], {}
        for spec in sorted(specs, key=lambda s: s.arrival_s):
            if spec.arrival_s > max_duration_s:
                result.skipped += 1
                continue
            delay = spec.arrival_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(
                stream_chat(
                    client,
                    base_url,
                    model,
                    spec.messages,
                    spec.max_tokens,
                    spec.headers,
                    start_s=spec.arrival_s,
                    tag=spec.tag,
                    timeout_s=max_duration_s + drain_s,
                )
            )
            tasks.append(task)
            start_of[task] = (spec.arrival_s, spec.tag)
        pending = await wait_bounded(tasks, t0, max_duration_s, drain_s)
        result.records = [t.result() for t in tasks if t not in pending]
        result.records += [
            RequestRecord(start_s=start_of[p][0], outcome="error", reason="client_timeout", tag=start_of[p][1])
            for p in pending
        ]
    return result
