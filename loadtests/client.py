"""One streamed OpenAI chat request, timed from the client: TTFT, every inter-token gap, usage."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import httpx

SSE_DONE = "[DONE]"  # the payload that ends an OpenAI stream


def sse_data(line: str | bytes) -> str | None:
    """The payload of one server-sent-events line ``data: <payload>`` (``SSE_DONE`` included); None for
    any other line (blank separators, comments). The one SSE parser of the load-test and test clients."""
    if isinstance(line, bytes):
        line = line.decode()
    return line[len("data: ") :] if line.startswith("data: ") else None


@dataclass(slots=True)
class RequestRecord:
    start_s: float  # offset from run start
    status: int = 0  # HTTP status (0 = transport error)
    outcome: str = "ok"  # ok | rejected | error
    reason: str = ""  # rejection / error code
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tag: str = ""
    text: str = ""  # the generated text (kept for closed-loop histories, not recorded)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (vLLM benchmark definition)."""
        if self.e2e_s is None or self.ttft_s is None or self.completion_tokens <= 1:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["text"]
        d["tpot_s"] = self.tpot_s
        return d


async def stream_chat(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    messages,
    max_tokens: int,
    headers: dict | None = None,
    start_s: float = 0.0,
    tag: str = "",
    timeout_s: float = 300.0,
) -> RequestRecord:
    rec = RequestRecord(start_s=start_s, tag=tag)
    body = {
        "model": model,
        "messages": list(messages),
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    last = None
    parts: list[str] = []
    try:
        async with client.stream(
            "POST", f"{base_url}/v1/chat/completions", json=body, headers=headers or {}, timeout=timeout_s
        ) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                rec.outcome = "rejected" if r.status_code in (429, 503) else "error"
                rec.reason = _error_code(text) or str(r.status_code)
                return rec
            async for line in r.aiter_lines():
                data = sse_data(line)
                if data is None or data == SSE_DONE:
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.outcome, rec.reason = "error", str(chunk["error"].get("code") or "stream_error")
                    continue
                if chunk.get("usage"):
                    rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    rec.completion_tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices") or []:
                    if content := (c.get("delta") or {}).get("content"):
                        parts.append(content)
                        now = time.perf_counter()
                        if last is None:
                            rec.ttft_s = now - t0
                        else:
                            rec.itl_s.append(now - last)
                        last = now
    except (httpx.HTTPError, ValueError) as e:
        rec.outcome, rec.reason = "error", type(e).__name__
        return rec
    rec.e2e_s = time.perf_counter() - t0
    rec.text = "".join(parts)
    if rec.outcome == "ok" and rec.ttft_s is None:
        rec.outcome, rec.reason = "error", "no_tokens"
    return rec


def _error_code(text: str) -> str:
    try:
        err = json.loads(text)["error"]
        return str(err.get("code") or err.get("type") or "")
    except (ValueError, KeyError, TypeError):
        return ""
