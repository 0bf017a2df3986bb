"""How engine failures reach the client: the errors the orchestrator raises for a rejected request and
for a decode that failed. Before the first byte the ingress answers with the error's HTTP status; after
it, with an SSE error event (``data: {"error": ...}``, as vLLM's OpenAI server sends one) and no finish chunk.
"""

from __future__ import annotations

from router.types import EndpointState, Rejection
from serve.protocol import ApiError


class PushPrefillFailed(Exception):
    """A push-mode prefill failed before its decode produced a token (the decode is cancelled)."""


class DecodeFailed(Exception):
    """A decode call failed on ``endpoint``: ``cause`` is an :class:`EngineFinishFailed` (the engine ended
    the request badly) or what the call raised (the replica or its engine died, Serve could not reach it).
    The orchestrator's decode step raises it for every failure of the call; what the client sees is
    :func:`decode_error` of its cause, once no retry or migration is left."""

    def __init__(self, endpoint: EndpointState, cause: Exception) -> None:
        super().__init__(f"decode failed on {endpoint.endpoint_id}: {cause!r}")
        self.endpoint = endpoint
        self.cause = cause


class EngineFinishFailed(Exception):
    """The decode engine ended the request without completing it: a finish reason other than "stop" or
    "length" ("error", "abort", ...), or a stream that ended with no finish reason (``reason`` None)."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(f"decode engine finished the request with {reason!r}")
        self.reason = reason


ENGINE_ABORT_RETRY_AFTER_S = 1.0


def decode_error(e: Exception) -> ApiError:
    """The client's error for a decode that failed with no retry left (or after its first token)."""
    if isinstance(e, EngineFinishFailed) and e.reason == "abort":
        # vLLM finishes a request "abort" that its engine dropped without our asking (the engine shutting
        # down, paused, or recovering from a fault): the request is fine and the replica is going away or
        # busy, so a retry soon lands on a live one -> 503 + Retry-After, as when no decode replica is healthy
        return ApiError(
            503,
            "the decode engine aborted the request; retry",
            type_="overloaded_error",
            code="engine_aborted",
            retry_after_s=ENGINE_ABORT_RETRY_AFTER_S,
        )
    if isinstance(e, EngineFinishFailed):
        # "error" (a request-level engine failure, e.g. a KV load failure), or an unknown finish: the
        # upstream engine failed -> 502 Bad Gateway
        return ApiError(
            502,
            f"the decode engine failed the request (finish reason {e.reason!r})",
            type_="server_error",
            code="engine_error",
        )
    return ApiError(502, "the decode engine failed", type_="server_error", code="decode_failed")


def rejection_to_error(r: Rejection) -> ApiError:
    type_ = "rate_limit_error" if r.status_code == 429 else "overloaded_error"
    return ApiError(r.status_code, r.message, type_=type_, code=r.reason, retry_after_s=r.retry_after_s)


def queue_full_error(e: Exception) -> ApiError:
    """Serve refused the call: the deployment's queue holds ``server.max_queued_requests`` already."""
    retry = getattr(e, "retry_after_s", None) or 1.0
    return ApiError(
        503,
        "The server is busy (request queue full); retry after the time in Retry-After.",
        type_="server_error",
        code="queue_full",
        retry_after_s=retry,
    )
