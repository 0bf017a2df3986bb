"""OpenAI response bodies and SSE chunks (chat.completion[.chunk], text_completion)."""

from __future__ import annotations

import json
from typing import Any

from serve.adapters import ParsedRequest
from workers.messages import COMPLETE_FINISH_REASONS


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(reason: str | None) -> str | None:
    """The OpenAI finish_reason of a chunk. Only a complete request has one: the orchestrator turns every
    other engine finish (abort, error, ...) into an error, so one arriving here is a bug, not a "stop"."""
    if reason is None or reason in COMPLETE_FINISH_REASONS:
        return reason
    raise ValueError(f"finish_reason {reason!r} is an engine failure, not a completion")


def full_response(
    p: ParsedRequest, text: str, reason: str | None, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    if p.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason(reason),
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}
        obj = "text_completion"
    return {
        "id": p.response_id,
        "object": obj,
        "created": p.created_s,
        "model": p.body.model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


class ChunkWriter:
    """Builds the stream's chunks for one request."""

    def __init__(self, p: ParsedRequest) -> None:
        self._p = p
        self._include_usage = bool(p.body.stream_options and p.body.stream_options.include_usage)

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self._p.kind == "chat" else "text_completion"
        d = {
            "id": self._p.response_id,
            "object": obj,
            "created": self._p.created_s,
            "model": self._p.body.model,
            "choices": choices,
        }
        if self._include_usage:
            d["usage"] = None
        return d

    def role(self) -> bytes | None:
        if self._p.kind != "chat":
            return None
        return sse(
            self._envelope(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
        )

    def delta(self, text: str, reason: str | None) -> bytes:
        if self._p.kind == "chat":
            choice = {
                "index": 0,
                "delta": {"content": text} if text else {},
                "logprobs": None,
                "finish_reason": finish_reason(reason),
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}
        return sse(self._envelope([choice]))

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes | None:
        if not self._include_usage:
            return None
        d = self._envelope([])
        d["usage"] = usage(prompt_tokens, completion_tokens)
        return sse(d)

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return sse(body)

    @staticmethod
    def done() -> bytes:
        return sse("[DONE]")
