"""A small OpenAI chat client for fault tests: every call bounded by CLIENT_TIMEOUT_S, replies recorded
whole (status, text, finish reasons, error bodies and SSE error events, [DONE], headers)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from loadtests.client import SSE_DONE, sse_data

MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 16
CLIENT_TIMEOUT_S = 60.0  # every request's bound (per read, and overall for a stream)
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three uses of a paperclip."]


@dataclass
class Reply:
    status: int
    text: str = ""
    finish_reasons: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # OpenAI error bodies (SSE error events)
    done: bool = False  # non-streamed, or the stream ended with [DONE]
    timed_out: bool = False  # the client stopped reading at its deadline
    headers: dict = field(default_factory=dict)


def request_body(content: str, **kw) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        **kw,
    }


def chat(base_url: str, content: str, **kw) -> Reply:
    r = httpx.post(f"{base_url}/v1/chat/completions", json=request_body(content, **kw), timeout=CLIENT_TIMEOUT_S)
    body = r.json()
    if r.status_code != 200:
        return Reply(r.status_code, errors=[body.get("error")], done=True, headers=dict(r.headers))
    choice = body["choices"][0]
    return Reply(200, choice["message"]["content"], [choice["finish_reason"]], done=True, headers=dict(r.headers))


def stream(
    base_url: str,
    content: str,
    on_first_content: Callable[[], None] | None = None,
    timeout_s: float = CLIENT_TIMEOUT_S,
    **kw,
) -> Reply:
    """A streamed chat read to its end, or until timeout_s have passed (then `timed_out`)."""
    deadline = time.monotonic() + timeout_s
    with httpx.stream(
        "POST",
        f"{base_url}/v1/chat/completions",
        json=request_body(content, stream=True, **kw),
        timeout=CLIENT_TIMEOUT_S,
    ) as r:
        reply = Reply(r.status_code, headers=dict(r.headers))
        if r.status_code != 200:
            reply.errors.append(json.loads(r.read()).get("error"))
            return reply
        for line in r.iter_lines():
            if time.monotonic() > deadline:
                reply.timed_out = True
                break
            data = sse_data(line)
            if data is None:
                continue
            if data == SSE_DONE:
                reply.done = True
                break
            event = json.loads(data)
            if "error" in event:
                reply.errors.append(event["error"])
                continue
            for choice in event["choices"]:
                text = choice["delta"].get("content") or ""
                if text and not reply.text and on_first_content is not None:
                    on_first_content()
                reply.text += text
                if choice["finish_reason"] is not None:
                    reply.finish_reasons.append(choice["finish_reason"])
    return reply


def reference_answers(base_url: str) -> dict[str, tuple[str, str]]:
    """prompt -> (text, finish_reason) from a cluster before any fault."""
    out = {}
    for p in PROMPTS:
        reply = chat(base_url, p)
        assert reply.status == 200, reply.errors
        out[p] = (reply.text, reply.finish_reasons[0])
    return out
