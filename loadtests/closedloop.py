"""Closed-loop conversations: each turn is sent when the previous answer has arrived (plus think time),
with the model's actual answers in the history, as a chat client does.

Conversations start at their open-loop arrival times. Bounded like the open-loop runner: turns that
would start after ``max_duration_s`` are skipped and counted (as are the turns after a failed one: a
client does not continue a conversation whose answer it never got); in-flight turns get ``drain_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from loadtests.client import RequestRecord, stream_chat
from loadtests.openloop import RunResult, load_session, wait_bounded
from loadtests.workloads import Conversation


def turn_messages(conv: Conversation, answers: Sequence[str]) -> list[dict]:
    """The request for turn ``len(answers)``: system prompt, every earlier turn and answer, the new turn."""
    msgs = [{"role": "system", "content": conv.system}]
    for user, answer in zip(conv.user_turns, answers):
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    msgs.append({"role": "user", "content": conv.user_turns[len(answers)]})
    return msgs


def turn_tag(index: int, turn: int, conv: Conversation) -> str:
    """``c<conversation>/t<turn>/<workload tag>``: which conversation and turn a record belongs to."""
    return f"c{index}/t{turn}/{conv.tag}"


async def run_closed_loop(
    base_url: str,
    model: str,
    conversations: Sequence[Conversation],
    max_duration_s: float = 300.0,
    drain_s: float = 120.0,
    max_connections: int = 512,
    timeline_period_s: float | None = 1.0,
) -> RunResult:
    result = RunResult()
    in_flight: dict[int, float] = {}  # conversation index -> start offset of its running turn
    accounted: dict[int, int] = {}  # conversation index -> turns recorded or skipped

    async with load_session(base_url, result, max_connections, timeline_period_s) as (client, t0):

        async def converse(i: int, conv: Conversation) -> None:
            answers: list[str] = []
            for turn in range(len(conv.user_turns)):
                if turn:
                    await asyncio.sleep(conv.think_s[turn - 1])
                start = time.perf_counter() - t0
                if start > max_duration_s:
                    break
                in_flight[i] = start
                rec = await stream_chat(
                    client,
                    base_url,
                    model,
                    turn_messages(conv, answers),
                    conv.max_tokens,
                    conv.headers,
                    start_s=start,
                    tag=turn_tag(i, turn, conv),
                    timeout_s=max_duration_s + drain_s,
                )
                del in_flight[i]
                result.records.append(rec)
                accounted[i] = turn + 1
                if rec.outcome != "ok":
                    break
                answers.append(rec.text)

        tasks = []
        ordered = sorted(conversations, key=lambda c: c.arrival_s)
        for i, conv in enumerate(ordered):
            if conv.arrival_s > max_duration_s:
                continue
            delay = conv.arrival_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(converse(i, conv)))
        await wait_bounded(tasks, t0, max_duration_s, drain_s)
        result.records += [
            RequestRecord(
                start_s=s, outcome="error", reason="client_timeout", tag=turn_tag(i, accounted.get(i, 0), ordered[i])
            )
            for i, s in in_flight.items()
        ]
        # turns never sent: after the window closed, after a failed turn, or cut off by the drain bound
        result.skipped = sum(len(c.user_turns) - accounted.get(i, 0) - (i in in_flight) for i, c in enumerate(ordered))
    return result
