"""Weighted scorers of the router pipeline: rank the candidate decode replicas of one request, by name
(``router.pipeline.scorers``: name -> weight). Pure: stdlib only.

A replica's score is the sum over scorers of ``coefficient(request) x feature(replica)``: the weight
and every per-request factor fold into one coefficient, so the per-replica work is one product per
scorer (this runs on every request, see loadtests/micro/router_microbench.py). Defaults:

- ``prefix`` (+): the share of the prompt the replica already caches (hit blocks x block size / prompt);
- ``load`` (-): outstanding requests / ``router.placement.max_batch_hint``;
- ``kv`` (-): KV cache usage, 0..1.

The best score wins (scores rounded to 9 digits, so float noise does not break ties); ties at random.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from router.config import PlacementConfig
from router.types import EndpointState


@dataclass(frozen=True, slots=True)
class ScoreContext:
    """What the scorers know about the request being placed."""

    hits: Mapping[str, int]  # endpoint -> cached prefix blocks (capped below the prompt's last token)
    prompt_tokens: int
    block_size: int


class Scorer(Protocol):
    def coefficient(self, ctx: ScoreContext) -> float:
        """The weight, signed and scaled for this request."""

    def feature(self, e: EndpointState, ctx: ScoreContext) -> float: ...


@dataclass(frozen=True, slots=True)
class PrefixScorer:
    weight: float

    def coefficient(self, ctx: ScoreContext) -> float:
        return self.weight * ctx.block_size / max(ctx.prompt_tokens, 1)

    def feature(self, e: EndpointState, ctx: ScoreContext) -> float:
        return ctx.hits[e.endpoint_id]


@dataclass(frozen=True, slots=True)
class LoadScorer:
    weight: float
    max_batch_hint: int

    def coefficient(self, ctx: ScoreContext) -> float:
        return -(self.weight / self.max_batch_hint)

    def feature(self, e: EndpointState, ctx: ScoreContext) -> float:
        return e.load


@dataclass(frozen=True, slots=True)
class KvScorer:
    weight: float

    def coefficient(self, ctx: ScoreContext) -> float:
        return -self.weight

    def feature(self, e: EndpointState, ctx: ScoreContext) -> float:
        return e.kv_usage


SCORERS: dict[str, Callable[[float, PlacementConfig], Scorer]] = {
    "prefix": lambda w, _: PrefixScorer(w),
    "load": lambda w, p: LoadScorer(w, p.max_batch_hint),
    "kv": lambda w, _: KvScorer(w),
}


def build_scorers(weights: Mapping[str, float], placement: PlacementConfig) -> tuple[Scorer, ...]:
    return tuple(SCORERS[name](w, placement) for name, w in weights.items())


def pick_best(
    cands: Sequence[EndpointState], scorers: Sequence[Scorer], ctx: ScoreContext, rng: random.Random
) -> EndpointState:
    terms = [(s.coefficient(ctx), s.feature) for s in scorers]
    scored = []
    for c in cands:
        total = 0.0
        for k, feature in terms:
            total += k * feature(c, ctx)
        scored.append((round(total, 9), c))
    top = max(s for s, _ in scored)
    tied = [c for s, c in scored if s == top]
    return tied[0] if len(tied) == 1 else rng.choice(tied)
