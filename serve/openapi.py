"""The OpenAPI document at ``/openapi.json``: FastAPI's routes with the request bodies the ingress parses
itself (``ChatCompletionRequest``, ``CompletionRequest``), the error bodies and statuses every route can
answer with, the tier and tenant headers, and the optional bearer key. Clients and fuzzers read it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from serve.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse

REF = "#/components/schemas/{model}"
BODIES = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest"}
_ERRORS = {
    "400": "invalid request (body, parameter, unknown tier, request above the key's token limit)",
    "401": "missing or wrong API key (auth on)",
    "403": "the tenant header names another tenant than the key's, or an admin route without an admin key",
    "404": "unknown model or route",
    "405": "method not allowed",
    "413": "request body above server.max_body_bytes",
    "429": "a rate limit of the key, or a tier's quota; Retry-After says when to retry",
    "503": "no capacity or draining; Retry-After says when to retry",
    "504": "no engine output for router.idle_timeout_s",
}
GENERATION_ERRORS = ("400", "401", "403", "404", "413", "429", "503", "504")


def _headers(tier_header: str, tenant_header: str) -> list[dict[str, Any]]:
    return [
        {
            "name": tier_header,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "QoS tier (router.tier_header); with an API key at most the key's tier",
        },
        {
            "name": tenant_header,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "tenant for prefix-cache isolation (router.tenant_header); with an API key the key's own",
        },
    ]


def _error(desc: str) -> dict[str, Any]:
    return {
        "description": desc,
        "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}},
    }


def build_openapi(
    app: FastAPI, tier_header: str = "x-customer-tier", tenant_header: str = "x-tenant-id"
) -> dict[str, Any]:
    """The document, built once per app; the header parameters carry the deployment's header names."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version="1", description=app.description, routes=app.routes)
    _, defs = models_json_schema(
        [(ChatCompletionRequest, "validation"), (CompletionRequest, "validation"), (ErrorResponse, "serialization")],
        ref_template=REF,
    )
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(defs["$defs"])
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            op["security"] = [] if path == "/health" else [{"bearer": []}, {}]
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's own validation error: the ingress answers 400 instead
            if path in BODIES:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": REF.format(model=BODIES[path])}}},
                }
                op["parameters"] = _headers(tier_header, tenant_header)
                responses["200"] = {
                    "description": "the completion (JSON), or server-sent events when stream is true",
                    "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
                }
                codes = GENERATION_ERRORS
            elif path == "/health":
                responses["200"] = {
                    "description": "ok",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
                responses["503"] = {
                    "description": "unavailable, warming up or draining",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
                codes = ("405",)
            elif path.startswith("/admin/"):
                codes = ("401", "403", "405")
            else:
                codes = ("401", "405")
            for c in codes:
                responses.setdefault(c, _error(_ERRORS[c]))
            if path == "/metrics":
                responses["200"] = {"description": "Prometheus text format", "content": {"text/plain": {}}}
    app.openapi_schema = doc
    return doc
