"""OpenAI request body -> tokenised prompt + SamplingSpec + RequestDescriptor (tokenise once, here)."""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from router.admission import engine_priority
from router.hashing import block_keys
from router.types import RequestDescriptor
from serve.orchestrator import GenerationJob
from serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, validation_error_to_api
from workers.messages import SamplingSpec

WARMUP_TIER = "warmup"  # label (metrics) and cache salt of the router's start-up calibration requests


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    kind: str  # "chat" | "completion"
    body: ChatCompletionRequest | CompletionRequest
    job: GenerationJob
    response_id: str
    created_s: int


def parse_body(raw: bytes, model_cls: type[BaseModel]) -> Any:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"Invalid JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise validation_error_to_api(e) from None


class RequestAdapter:
    """Turns validated bodies into jobs. Holds the tokenizer; knows the served model and limits."""

    def __init__(
        self,
        tokenizer: Any,
        served_model: str,
        max_model_len: int,
        default_tier: str,
        known_tiers: Mapping[str, int] | frozenset[str],
        block_size: int = 128,
        share_prefix_across_tenants: bool = False,
    ) -> None:
        """``known_tiers``: tier -> its QoS priority (higher is served first; a plain set = all 0)."""
        self._tok = tokenizer
        self.block_size = block_size
        self.share_prefix = share_prefix_across_tenants
        self.served_model = served_model
        self.max_model_len = max_model_len
        self._default_tier = default_tier
        self._tiers = dict(known_tiers) if isinstance(known_tiers, Mapping) else dict.fromkeys(known_tiers, 0)

    def check_model(self, model: str) -> None:
        if model != self.served_model:
            raise ApiError(
                404,
                f"The model '{model}' does not exist. Available: ['{self.served_model}'].",
                type_="not_found_error",
                param="model",
                code="model_not_found",
            )

    def chat_prompt_ids(self, body: ChatCompletionRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # template rejects the conversation (e.g. role order)
            raise ApiError(
                400, f"Cannot apply the chat template to these messages: {e}", param="messages", code="invalid_messages"
            ) from None
        return self._tok.encode(text, add_special_tokens=False)

    def completion_prompt_ids(self, body: CompletionRequest) -> list[int]:
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], list):
            p = p[0]
        elif isinstance(p, list) and p and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            return self._tok.encode(p, add_special_tokens=True)
        vocab = len(self._tok)
        if any(t < 0 or t >= vocab for t in p):
            raise ApiError(400, f"Token ids in 'prompt' must be in [0, {vocab}).", param="prompt", code="invalid_value")
        return list(p)

    def warmup_job(self, num_tokens: int, seed: int = 0, max_tokens: int = 8) -> GenerationJob:
        """A synthetic request (random token ids, its own cache salt) for the start-up calibration."""
        rng = random.Random(seed)
        n = max(1, min(num_tokens, self.max_model_len - max_tokens))
        ids = tuple(rng.randrange(100, len(self._tok)) for _ in range(n))
        desc = RequestDescriptor(
            request_id=f"warmup-{uuid.uuid4().hex}",
            model=self.served_model,
            num_prompt_tokens=n,
            max_new_tokens=max_tokens,
            tier=WARMUP_TIER,
            arrival_s=time.time(),
            block_hashes=block_keys(ids, self.block_size, WARMUP_TIER),
        )
        return GenerationJob(
            desc=desc,
            prompt_token_ids=ids,
            cache_salt=WARMUP_TIER,
            sampling=SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        )

    def max_new_tokens(self, requested: int | None, num_prompt_tokens: int, param: str) -> int:
        room = self.max_model_len - num_prompt_tokens
        if room <= 0 or (requested is not None and requested > room):
            asked = (
                f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, {requested} "
                f"for the completion)"
                if requested is not None
                else f"{num_prompt_tokens} tokens in the prompt"
            )
            raise ApiError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {asked}. Please reduce the length of the prompt or completion.",
                param=param if requested is not None and room > 0 else "messages",
                code="context_length_exceeded",
            )
        return requested if requested is not None else room

    def tier(self, header_value: str | None) -> str:
        if header_value is None:
            return self._default_tier
        tier = header_value.strip().lower()
        if tier not in self._tiers:
            raise ApiError(
                400,
                f"Unknown customer tier '{header_value}'; use one of {sorted(self._tiers)}.",
                param="x-customer-tier",
                code="invalid_value",
            )
        return tier

    def cache_salt(self, tenant: str | None) -> str | None:
        """Per-tenant prefix-cache salt (vLLM ``cache_salt``): no prefix hit crosses tenants. The
        tenant name itself never reaches the engines."""
        if self.share_prefix or not tenant:
            return None
        return hashlib.sha256(tenant.encode()).hexdigest()[:32]

    def build(
        self,
        kind: str,
        body: ChatCompletionRequest | CompletionRequest,
        tier_header: str | None,
        tenant_header: str | None = None,
    ) -> ParsedRequest:
        self.check_model(body.model)
        if kind == "chat":
            ids = self.chat_prompt_ids(body)
            param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        else:
            ids = self.completion_prompt_ids(body)
            param = "max_tokens"
        if not ids:
            raise ApiError(400, "The prompt is empty after tokenisation.", param="prompt", code="invalid_value")
        max_new = self.max_new_tokens(body.requested_max_tokens(), len(ids), param)
        rid = uuid.uuid4().hex
        sampling = SamplingSpec(
            max_tokens=max_new,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stop_list(),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            ignore_eos=body.ignore_eos,
        )
        salt = self.cache_salt(tenant_header or body.user)
        tier = self.tier(tier_header)
        desc = RequestDescriptor(
            request_id=rid,
            model=body.model,
            num_prompt_tokens=len(ids),
            max_new_tokens=max_new,
            tier=tier,
            arrival_s=time.time(),
            block_hashes=block_keys(ids, self.block_size, salt),
        )
        job = GenerationJob(
            desc=desc,
            prompt_token_ids=tuple(ids),
            sampling=sampling,
            cache_salt=salt,
            priority=engine_priority(self._tiers[tier]),
        )
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        return ParsedRequest(kind=kind, body=body, job=job, response_id=prefix + rid, created_s=int(time.time()))
