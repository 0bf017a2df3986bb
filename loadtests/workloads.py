"""Seeded, download-free workloads: each yields RequestSpec objects with an arrival offset.

Text comes from a fixed English word list shipped here; lengths are in words, and ~1.3 tokens per
word for SmolLM2's tokenizer. Distributions and where their parameters come from:

- ``random``: fixed ``input_words`` / ``max_tokens`` (default 512 tokens in / 64 out, the
  vLLM ``benchmark_serving`` "random" dataset shape).
- ``chat``: long-tailed lengths, log-normal prompt (median 180 tokens, sigma 1.0) and output
  (median 120 tokens, sigma 0.8), clipped to the context: the shape reported for ShareGPT-style
  conversations (Splitwise / DistServe trace analyses: prompt median ~100-300, output median
  ~100-250, heavy right tail).
- ``shared-prefix``: ``num_system_prompts`` long system prompts (~400 tokens), many users, each
  user's history grows turn by turn (multi-turn chat, the prefix-cache workload).
- ``shared-prefix-wide``: the same with 12 system prompts and 48 users (a working set larger than a
  small replica's KV cache).
- ``long-prompt``: summarisation, prompts near ``max_model_len`` minus the output, short outputs.
- ``qos``: the ``chat`` shape (or ``base=random``: 512/64) with ``x-customer-tier`` headers drawn
  premium/standard/free = 10/30/60 %.
- ``phase-shift``: the traffic's shape changes twice: prefill-heavy (long prompts, short answers),
  decode-heavy (short prompts, long answers), prefill-heavy again, ``phase_s`` each; requests tagged
  with their phase. The load a ``role: flex`` pool follows by flipping replicas between roles.
Arrivals are open-loop: Poisson at ``rate`` req/s, or a piecewise-constant rate schedule
(``bursty``: base rate, tripled within a minute, then back; ``phase-shift``: ``rate`` in the
prefill-heavy phases, ``decode_rate`` in the decode-heavy one).

Closed-loop conversations (``CONVERSATIONS``; run by ``loadtests.closedloop``):

- ``multi-turn``: what a chat client does. Conversations start open-loop (Poisson, ``rate / turns``
  conversations per second, so ``rate`` is still the offered request rate); inside one, each turn is
  sent after the previous answer arrived plus a think time (exponential, mean ``think_s``), and its
  history holds the model's *actual* earlier answers, so every turn extends the last one's tokens
  (the shape prefix caching is built for; the open-loop ``shared-prefix`` history uses synthetic
  answers instead). Each conversation has one of ``num_system_prompts`` system prompts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

WORDS = (
    "the of and to in is was for on that with as by at from his her an which it be are this had not "
    "but were they have their all one been has more when there so can who into up out about would "
    "what some time only other new them than first also after two then these may any such most over "
    "world city river mountain market science music history language garden kitchen window morning "
    "evening winter summer ocean forest village station library museum engine system network signal "
    "memory question answer problem method result report letter story picture number paper water "
    "light sound colour stone metal glass bridge road field animal bird tree flower child teacher "
    "doctor farmer driver writer player friend family people country government company office"
).split()

TOKENS_PER_WORD = 1.3


@dataclass(frozen=True, slots=True)
class RequestSpec:
    arrival_s: float  # offset from the start of the run
    messages: tuple[dict, ...]  # chat messages
    max_tokens: int
    headers: dict = field(default_factory=dict)
    tag: str = ""  # workload-specific label (tier, system prompt id, ...)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def poisson_arrivals(rng: random.Random, rate: float, n: int) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def schedule_arrivals(rng: random.Random, schedule: Sequence[tuple[float, float]], n: int) -> list[float]:
    """Poisson arrivals with a piecewise-constant rate: ``schedule`` = [(duration_s, rate), ...]."""
    out, t0 = [], 0.0
    for duration, rate in schedule:
        t = t0
        while len(out) < n:
            t += rng.expovariate(rate)
            if t >= t0 + duration:
                break
            out.append(t)
        t0 += duration
    return out


def bursty_schedule(base_rate: float, minute_s: float = 60.0) -> list[tuple[float, float]]:
    """Base rate, a ramp to 3x within a minute, a minute at 3x, back to base."""
    return [
        (minute_s / 2, base_rate),
        (minute_s / 4, base_rate * 2),
        (minute_s, base_rate * 3),
        (minute_s / 2, base_rate),
    ]


def _user(text: str) -> tuple[dict, ...]:
    return ({"role": "user", "content": text},)


def random_fixed(
    seed: int, n: int, rate: float, input_tokens: int = 512, output_tokens: int = 64, **_
) -> list[RequestSpec]:
    rng = random.Random(seed)
    n_words = int(input_tokens / TOKENS_PER_WORD)
    return [RequestSpec(t, _user(words(rng, n_words)), output_tokens) for t in poisson_arrivals(rng, rate, n)]


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def chat_mix(seed: int, n: int, rate: float, max_model_len: int = 2048, **_) -> list[RequestSpec]:
    rng = random.Random(seed)
    out = []
    for t in poisson_arrivals(rng, rate, n):
        prompt = _lognormal(rng, 180, 1.0, 8, max_model_len // 2)
        output = _lognormal(rng, 120, 0.8, 4, max_model_len // 4)
        out.append(RequestSpec(t, _user(words(rng, int(prompt / TOKENS_PER_WORD))), output))
    return out


def shared_prefix(
    seed: int,
    n: int,
    rate: float,
    num_system_prompts: int = 3,
    num_users: int = 24,
    system_tokens: int = 400,
    turn_tokens: int = 40,
    output_tokens: int = 32,
    max_history_turns: int = 6,
    **_,
) -> list[RequestSpec]:
    rng = random.Random(seed)
    systems = [
        f"You are assistant #{i}. " + words(rng, int(system_tokens / TOKENS_PER_WORD))
        for i in range(num_system_prompts)
    ]
    histories: dict[int, list[dict]] = {}
    out = []
    for t in poisson_arrivals(rng, rate, n):
        user = rng.randrange(num_users)
        sys_id = user % num_system_prompts
        hist = histories.setdefault(user, [])
        hist.append({"role": "user", "content": words(rng, int(turn_tokens / TOKENS_PER_WORD))})
        msgs = ({"role": "system", "content": systems[sys_id]},) + tuple(hist[-(2 * max_history_turns - 1) :])
        out.append(RequestSpec(t, msgs, output_tokens, tag=f"system-{sys_id}"))
        hist.append({"role": "assistant", "content": words(rng, int(output_tokens / TOKENS_PER_WORD))})
    return out


def long_prompt(
    seed: int, n: int, rate: float, max_model_len: int = 2048, output_tokens: int = 32, **_
) -> list[RequestSpec]:
    rng = random.Random(seed)
    n_words = int((max_model_len - output_tokens - 64) * 0.9 / TOKENS_PER_WORD)
    return [
        RequestSpec(t, _user("Summarise the following text in one sentence: " + words(rng, n_words)), output_tokens)
        for t in poisson_arrivals(rng, rate, n)
    ]


def bursty(seed: int, n: int, rate: float, minute_s: float = 60.0, **kw) -> list[RequestSpec]:
    rng = random.Random(seed)
    arrivals = schedule_arrivals(rng, bursty_schedule(rate, minute_s), n)
    base = random_fixed(seed + 1, len(arrivals), rate, **kw)
    return [RequestSpec(t, s.messages, s.max_tokens) for t, s in zip(arrivals, base)]


PHASES = ("1-prefill-heavy", "2-decode-heavy", "3-prefill-heavy")


def phase_shift(
    seed: int,
    n: int,
    rate: float,
    phase_s: float = 90.0,
    prefill_input_tokens: int = 1024,
    prefill_output_tokens: int = 16,
    decode_input_tokens: int = 64,
    decode_output_tokens: int = 256,
    decode_rate: float | None = None,
    **_,
) -> list[RequestSpec]:
    """Three phases of ``phase_s`` seconds (at most ``n`` requests in all): prefill-heavy at ``rate``,
    decode-heavy at ``decode_rate`` (default ``rate``), prefill-heavy at ``rate``; tag = the phase."""
    rng = random.Random(seed)
    shapes = (
        (rate, prefill_input_tokens, prefill_output_tokens),
        (decode_rate or rate, decode_input_tokens, decode_output_tokens),
        (rate, prefill_input_tokens, prefill_output_tokens),
    )
    arrivals = schedule_arrivals(rng, [(phase_s, r) for r, _, _ in shapes], n)
    out = []
    for t in arrivals:
        i = min(int(t // phase_s), len(PHASES) - 1)
        _, input_tokens, output_tokens = shapes[i]
        out.append(RequestSpec(t, _user(words(rng, int(input_tokens / TOKENS_PER_WORD))), output_tokens, tag=PHASES[i]))
    return out


TIERS = (("premium", 0.10), ("standard", 0.30), ("free", 0.60))


def qos_mix(seed: int, n: int, rate: float, base: str = "chat", **kw) -> list[RequestSpec]:
    """``base`` (default ``chat``) with a QoS tier per request; ``base=random`` gives the prefill-heavy
    fixed 512/64 shape."""
    if base not in ("chat", "random"):
        raise ValueError(f"qos base workload must be chat or random, not {base!r}")
    rng = random.Random(seed + 7)
    out = []
    for s in WORKLOADS[base](seed, n, rate, **kw):
        tier = rng.choices([t for t, _ in TIERS], weights=[w for _, w in TIERS])[0]
        out.append(RequestSpec(s.arrival_s, s.messages, s.max_tokens, {"x-customer-tier": tier}, tag=tier))
    return out


def shared_prefix_wide(seed: int, n: int, rate: float, **kw) -> list[RequestSpec]:
    """``shared-prefix`` with many tenants: 12 system prompts, 48 users. Its working set (~36 system
    blocks of 128 tokens + histories) outgrows a small per-replica KV cache, the regime where placement
    decides what stays cached: round-robin makes every replica cache every prefix, prefix-aware placement
    partitions them."""
    kw = {"num_system_prompts": 12, "num_users": 48, **kw}
    return shared_prefix(seed, n, rate, **kw)


WORKLOADS = {
    "random": random_fixed,
    "chat": chat_mix,
    "shared-prefix": shared_prefix,
    "shared-prefix-wide": shared_prefix_wide,
    "long-prompt": long_prompt,
    "bursty": bursty,
    "qos": qos_mix,
    "phase-shift": phase_shift,
}


@dataclass(frozen=True, slots=True)
class Conversation:
    """A closed-loop chat: ``user_turns[i]`` is sent after answer ``i - 1`` arrived and ``think_s[i - 1]``
    passed; the history carries the model's actual answers."""

    arrival_s: float  # when its first turn is sent, offset from the start of the run
    system: str
    user_turns: tuple[str, ...]
    think_s: tuple[float, ...]  # pause after each answer before the next turn
    max_tokens: int
    headers: dict = field(default_factory=dict)
    tag: str = ""


def multi_turn(
    seed: int,
    n: int,
    rate: float,
    num_system_prompts: int = 12,
    turns: int = 6,
    system_tokens: int = 400,
    turn_tokens: int = 40,
    output_tokens: int = 32,
    think_s: float = 2.0,
    **_,
) -> list[Conversation]:
    """``n`` requests as ``ceil(n / turns)`` conversations of ``turns`` turns (the last one shorter)."""
    rng = random.Random(seed)
    systems = [
        f"You are assistant #{i}. " + words(rng, int(system_tokens / TOKENS_PER_WORD))
        for i in range(num_system_prompts)
    ]
    sizes = [min(turns, n - i) for i in range(0, n, turns)]
    out = []
    for t, size in zip(poisson_arrivals(rng, rate / turns, len(sizes)), sizes):
        sys_id = rng.randrange(num_system_prompts)
        out.append(
            Conversation(
                t,
                systems[sys_id],
                tuple(words(rng, int(turn_tokens / TOKENS_PER_WORD)) for _ in range(size)),
                tuple(rng.expovariate(1.0 / think_s) if think_s > 0 else 0.0 for _ in range(size - 1)),
                output_tokens,
                tag=f"system-{sys_id}",
            )
        )
    return out


CONVERSATIONS = {"multi-turn": multi_turn}


def is_closed_loop(name: str) -> bool:
    return name in CONVERSATIONS


def build(name: str, seed: int, n: int, rate: float, **kw) -> list[RequestSpec] | list[Conversation]:
    """Open-loop ``RequestSpec`` lists, or ``Conversation`` lists for the closed-loop names."""
    known = {**WORKLOADS, **CONVERSATIONS}
    if name not in known:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(known)}")
    return known[name](seed=seed, n=n, rate=rate, **kw)
