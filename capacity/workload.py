"""Token-level workloads for the simulator: when requests arrive, how long their prompts and outputs
are, and which prompt prefixes they share.

Arrivals are Poisson at the offered rate, a piecewise-constant rate ``schedule`` (multiples of the
rate), or a ``trace`` replayed as recorded. Prompt and output lengths are fixed or log-normal (median,
sigma, clipped). ``prefix`` groups model a multi-turn chat: a few long system prompts shared by many
users, each user's history growing turn by turn (the prefix-cache workload); prompts are then built
from synthetic token ids so that equal text gives equal block hashes.

``PRESETS`` carry the names and parameters of loadtests/workloads.py's open-loop workloads
(tests/unit/test_workload.py checks they agree; lengths there are in words at 1.3 tokens a word).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOCAB_TOKENS = 49_152  # SmolLM2's vocabulary; any size works, ids only need to differ


@dataclass(frozen=True, slots=True)
class Lengths:
    """Token counts: ``median_tokens`` exactly (``sigma`` 0) or log-normal, clipped to the bounds."""

    median_tokens: int
    sigma: float = 0.0
    min_tokens: int = 1
    max_tokens: int = 1 << 20

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.sigma <= 0:
            return np.full(n, self.median_tokens, dtype=np.int64)
        x = rng.lognormal(np.log(self.median_tokens), self.sigma, n)
        return np.clip(x.astype(np.int64), self.min_tokens, self.max_tokens)


@dataclass(frozen=True, slots=True)
class PrefixGroups:
    """Multi-turn chat with shared system prompts: each request is a random user's next turn; its prompt
    is the user's system prompt (``user % num_system_prompts``) followed by the last
    ``2 * max_history_turns - 1`` messages of the user's history (turns and the answers between them)."""

    num_system_prompts: int = 3
    num_users: int = 24
    system_tokens: int = 400
    turn_tokens: int = 40
    answer_tokens: int = 32  # the synthetic answer appended to the history after each turn
    max_history_turns: int = 6


@dataclass(frozen=True, slots=True)
class SimRequest:
    arrival_s: float
    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int
    group: str = ""  # the prefix group (system prompt) it belongs to, if any

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    prompt: Lengths
    output: Lengths
    prefix: PrefixGroups | None = None
    schedule: tuple[tuple[float, float], ...] = ()  # (duration_s, multiple of the rate); () = Poisson
    trace: tuple[tuple[float, int, int], ...] = ()  # (arrival_s, prompt tokens, output tokens), replayed

    def arrivals_s(self, rng: np.random.Generator, rate: float, n: int) -> np.ndarray:
        if self.trace:
            return np.array([t for t, _, _ in self.trace[:n]], dtype=float)
        if not self.schedule:
            return np.cumsum(rng.exponential(1.0 / rate, n))
        out: list[float] = []
        t0 = 0.0
        for duration_s, mult in self.schedule:  # each segment ends with its duration or at n arrivals
            gaps = np.cumsum(rng.exponential(1.0 / (rate * mult), n - len(out)))
            out.extend((t0 + gaps[gaps < duration_s]).tolist())
            t0 += duration_s
            if len(out) >= n:
                break
        return np.array(out[:n], dtype=float)

    def requests(self, rate: float, n: int, seed: int) -> list[SimRequest]:
        """``n`` requests (fewer when a schedule or trace ends first), seeded."""
        rng = np.random.default_rng(seed)
        arrivals = self.arrivals_s(rng, rate, n)
        n = len(arrivals)
        if self.prefix is not None:
            return _prefix_requests(self.prefix, rng, arrivals)
        if self.trace:
            prompts = np.array([p for _, p, _ in self.trace[:n]])
            outputs = np.array([o for _, _, o in self.trace[:n]])
        else:
            prompts, outputs = self.prompt.sample(rng, n), self.output.sample(rng, n)
        ids = rng.integers(0, VOCAB_TOKENS, int(prompts.sum())).tolist()
        out, at = [], 0
        for t, p, o in zip(arrivals.tolist(), prompts.tolist(), outputs.tolist()):
            out.append(SimRequest(t, tuple(ids[at : at + p]), int(o)))
            at += p
        return out


def _prefix_requests(g: PrefixGroups, rng: np.random.Generator, arrivals: np.ndarray) -> list[SimRequest]:
    def text(n: int) -> tuple[int, ...]:
        return tuple(rng.integers(0, VOCAB_TOKENS, n).tolist())

    systems = [text(g.system_tokens) for _ in range(g.num_system_prompts)]
    histories: dict[int, list[tuple[int, ...]]] = {}
    users = rng.integers(0, g.num_users, len(arrivals)).tolist()
    out = []
    for t, user in zip(arrivals.tolist(), users):
        sys_id = user % g.num_system_prompts
        hist = histories.setdefault(user, [])
        hist.append(text(g.turn_tokens))
        prompt = systems[sys_id] + sum(hist[-(2 * g.max_history_turns - 1) :], ())
        out.append(SimRequest(t, prompt, g.answer_tokens, group=f"system-{sys_id}"))
        hist.append(text(g.answer_tokens))
    return out


def bursty_schedule(minute_s: float = 60.0) -> tuple[tuple[float, float], ...]:
    """Base rate, 2x for a quarter minute, 3x for a minute, back to base (loadtests ``bursty``)."""
    return ((minute_s / 2, 1.0), (minute_s / 4, 2.0), (minute_s, 3.0), (minute_s / 2, 1.0))


def fixed(prompt_tokens: int, output_tokens: int, name: str = "") -> Workload:
    return Workload(name or f"random-{prompt_tokens}-{output_tokens}", Lengths(prompt_tokens), Lengths(output_tokens))


PRESETS: dict[str, Workload] = {
    "random-256-128": fixed(256, 128),
    "random-512-64": fixed(512, 64),
    "shared-prefix": Workload("shared-prefix", Lengths(0), Lengths(32), prefix=PrefixGroups()),
    "shared-prefix-wide": Workload(
        "shared-prefix-wide", Lengths(0), Lengths(32), prefix=PrefixGroups(num_system_prompts=12, num_users=48)
    ),
    "bursty": Workload("bursty", Lengths(512), Lengths(64), schedule=bursty_schedule()),
    "chat": Workload(
        "chat",
        Lengths(180, sigma=1.0, min_tokens=8, max_tokens=1024),
        Lengths(120, sigma=0.8, min_tokens=4, max_tokens=512),
    ),
}


def load_trace(path: str | Path) -> Workload:
    """A trace file: JSON lines of ``{"arrival_s", "prompt_tokens", "output_tokens"}``."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    trace = tuple(sorted((float(r["arrival_s"]), int(r["prompt_tokens"]), int(r["output_tokens"])) for r in rows))
    return Workload(f"trace:{Path(path).name}", Lengths(1), Lengths(1), trace=trace)


def get_workload(name: str) -> Workload:
    """A preset by name, or ``trace:PATH``."""
    if name.startswith("trace:"):
        return load_trace(name.removeprefix("trace:"))
    if name not in PRESETS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(PRESETS)} or trace:PATH")
    return PRESETS[name]
