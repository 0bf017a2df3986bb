"""A workload, the one schema ``pdserve simulate`` and ``pdserve plan`` read: the offered load (rate and
arrival pattern), prompt and output lengths in tokens, and prefix sharing. The SLOs are not part of it
(router.config.SloConfig: the router's, given to ``pdserve plan`` on its command line).

A workload is a built-in preset by name, ``trace:PATH`` (a recorded trace), or a YAML file of the fields of
``Workload`` (``configs/workloads/``). ``rate`` is the offered requests per second; the commands' ``--rate``
overrides it, and a preset has none (the command gives it).

- Arrivals: Poisson at the rate, a piecewise-constant rate ``schedule`` (multiples of the rate), or a
  ``trace`` replayed as recorded.
- Lengths (``Lengths``): fixed, uniform or log-normal (mean, cv), clipped. The simulator samples requests
  from them; the planner's analytic estimate averages over equal-probability quantile points (the midpoints
  of ``QUANTILE_POINTS`` equal slices of the CDF), so a skewed distribution weighs its tail and no random
  draw is involved.
- Prefix sharing: ``prefix_share`` (the share of prompt tokens a prefix cache holds: the planner prefills
  the rest; the simulator's prompts share nothing, so it judges such a workload without the cache) or
  ``prefix`` groups, a multi-turn chat in which a few long system prompts are shared by many
  users, each user's history growing turn by turn (prompts are built from synthetic token ids, so equal
  text gives equal block hashes).

``PRESETS`` carry the names and parameters of loadtests/workloads.py's open-loop workloads
(tests/unit/test_workload.py checks they agree; lengths there are in words at 1.3 tokens a word).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

VOCAB_TOKENS = 49_152  # SmolLM2's vocabulary; any size works, ids only need to differ
QUANTILE_POINTS = 24


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _midpoints(n: int) -> np.ndarray:
    return (np.arange(n) + 0.5) / n


class Lengths(_Strict):
    """Tokens per request: ``fixed`` (value), ``uniform`` (low..high) or ``lognormal`` (mean, cv =
    standard deviation / mean), clipped to [min, max]."""

    dist: Literal["fixed", "uniform", "lognormal"] = "fixed"
    value: int | None = Field(None, ge=1)
    low: int | None = Field(None, ge=1)
    high: int | None = Field(None, ge=1)
    mean: float | None = Field(None, gt=0)
    cv: float = Field(0.5, ge=0)
    min: int = Field(1, ge=1)
    max: int = Field(32768, ge=1)

    @model_validator(mode="after")
    def _params(self) -> Lengths:
        need = {"fixed": ("value",), "uniform": ("low", "high"), "lognormal": ("mean",)}[self.dist]
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            raise ValueError(f"{self.dist} length distribution needs {missing}")
        if self.dist == "uniform" and self.low > self.high:
            raise ValueError("uniform: low > high")
        return self

    @classmethod
    def lognormal_median(cls, median_tokens: float, sigma: float, min_tokens: int, max_tokens: int) -> Lengths:
        """The log-normal of this median and sigma (of the log), as mean and cv."""
        return cls(
            dist="lognormal",
            mean=median_tokens * math.exp(sigma**2 / 2),
            cv=math.sqrt(math.expm1(sigma**2)),
            min=min_tokens,
            max=max_tokens,
        )

    def _log_params(self) -> tuple[float, float]:
        """(mu, sigma) of the log of a log-normal."""
        sigma = math.sqrt(math.log1p(self.cv**2))
        return math.log(self.mean) - sigma**2 / 2, sigma

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` random lengths (a fixed length is not clipped)."""
        if self.dist == "fixed":
            return np.full(n, self.value, dtype=np.int64)
        if self.dist == "uniform":
            x = rng.integers(self.low, self.high, n, endpoint=True)
        else:
            x = rng.lognormal(*self._log_params(), n).astype(np.int64)
        return np.clip(x, self.min, self.max)

    def quantiles(self, n: int = QUANTILE_POINTS) -> np.ndarray:
        """``n`` equal-probability points of the distribution, ascending, in tokens."""
        u = _midpoints(n)
        if self.dist == "fixed":
            x = np.full(n, float(self.value))
        elif self.dist == "uniform":
            x = self.low + u * (self.high - self.low)
        else:
            mu, sigma = self._log_params()
            x = np.exp(mu + sigma * np.array([NormalDist().inv_cdf(p) for p in u]))
        return np.clip(np.round(x), self.min, self.max)


class PrefixGroups(_Strict):
    """Multi-turn chat with shared system prompts: each request is a random user's next turn; its prompt
    is the user's system prompt (``user % num_system_prompts``) followed by the last
    ``2 * max_history_turns - 1`` messages of the user's history (turns and the answers between them)."""

    num_system_prompts: int = Field(3, ge=1)
    num_users: int = Field(24, ge=1)
    system_tokens: int = Field(400, ge=1)
    turn_tokens: int = Field(40, ge=1)
    answer_tokens: int = Field(32, ge=1)  # each request's output, appended to the history after its turn
    max_history_turns: int = Field(6, ge=1)

    @property
    def full_prompt_tokens(self) -> int:
        """A prompt once the user's history fills the window."""
        h = self.max_history_turns
        return self.system_tokens + h * self.turn_tokens + (h - 1) * self.answer_tokens


@dataclass(frozen=True, slots=True)
class SimRequest:
    arrival_s: float
    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int
    group: str = ""  # the prefix group (system prompt) it belongs to, if any

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class Workload(_Strict):
    """Lengths come from ``prompt_tokens`` and ``output_tokens``, or from the ``prefix`` groups, or from the
    ``trace`` (which also gives the arrivals)."""

    name: str = ""
    rate: float | None = Field(None, gt=0, description="offered requests per second (--rate overrides it)")
    prompt_tokens: Lengths | None = None
    output_tokens: Lengths | None = None
    prefix_share: float = Field(
        0.0, ge=0, lt=1, description="share of prompt tokens found in a prefix cache (not prefilled again)"
    )
    prefix: PrefixGroups | None = None
    schedule: tuple[tuple[float, float], ...] = ()  # (duration_s, multiple of the rate); () = Poisson
    trace: tuple[tuple[float, int, int], ...] = ()  # (arrival_s, prompt tokens, output tokens), replayed

    @model_validator(mode="after")
    def _one_source_of_lengths(self) -> Workload:
        lengths = self.prompt_tokens is not None or self.output_tokens is not None
        if self.trace and (lengths or self.prefix or self.schedule):
            raise ValueError("a trace gives arrivals and lengths: no prompt_tokens, output_tokens, prefix, schedule")
        if self.prefix and (lengths or self.prefix_share):
            raise ValueError(
                "prefix groups give the lengths and the cached share: no prompt_tokens, output_tokens, prefix_share"
            )
        if not (self.trace or self.prefix) and (self.prompt_tokens is None or self.output_tokens is None):
            raise ValueError("a workload needs prompt_tokens and output_tokens (or prefix groups, or a trace)")
        return self

    def with_rate(self, rate: float | None) -> Workload:
        """The workload at ``rate`` (None: its own rate); an error when neither gives one."""
        if rate is None and self.rate is None:
            raise ValueError(f"workload {self.name!r} has no rate: give one (--rate)")
        return self if rate is None else self.model_copy(update={"rate": rate})

    # --- the planner's view: quantile points and the cached share ------------------------------------
    def prompt_quantiles(self, n: int = QUANTILE_POINTS) -> np.ndarray:
        """``n`` equal-probability prompt lengths, ascending (prefix groups: every user's history full)."""
        full = self.prefix.full_prompt_tokens if self.prefix else 0
        return self._quantiles(1, self.prompt_tokens, full, n)

    def output_quantiles(self, n: int = QUANTILE_POINTS) -> np.ndarray:
        """``n`` equal-probability output lengths, ascending."""
        return self._quantiles(2, self.output_tokens, self.prefix.answer_tokens if self.prefix else 0, n)

    def _quantiles(self, trace_column: int, lengths: Lengths | None, prefix_tokens: int, n: int) -> np.ndarray:
        """Quantile points of one length: the trace's column, the prefix groups' fixed length, or ``lengths``."""
        if self.trace:
            col = [row[trace_column] for row in self.trace]
            return np.quantile(col, _midpoints(n), method="inverted_cdf").astype(float)
        if self.prefix:
            return np.full(n, float(prefix_tokens))
        return lengths.quantiles(n)

    @property
    def cached_share(self) -> float:
        """Share of prompt tokens a prefix cache holds. Prefix groups: the system prompt (once a user's
        history fills the window, the history after it shifts every turn)."""
        if self.prefix:
            return self.prefix.system_tokens / self.prefix.full_prompt_tokens
        return self.prefix_share

    # --- the simulator's view: requests --------------------------------------------------------------
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
            prompts, outputs = self.prompt_tokens.sample(rng, n), self.output_tokens.sample(rng, n)
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


def fixed(prompt_tokens: int, output_tokens: int, name: str = "", **fields) -> Workload:
    return Workload(
        name=name or f"random-{prompt_tokens}-{output_tokens}",
        prompt_tokens=Lengths(value=prompt_tokens),
        output_tokens=Lengths(value=output_tokens),
        **fields,
    )


PRESETS: dict[str, Workload] = {
    "random-256-128": fixed(256, 128),
    "random-512-64": fixed(512, 64),
    "shared-prefix": Workload(name="shared-prefix", prefix=PrefixGroups()),
    "shared-prefix-wide": Workload(name="shared-prefix-wide", prefix=PrefixGroups(num_system_prompts=12, num_users=48)),
    "bursty": fixed(512, 64, "bursty", schedule=bursty_schedule()),
    "chat": Workload(
        name="chat",
        prompt_tokens=Lengths.lognormal_median(180, sigma=1.0, min_tokens=8, max_tokens=1024),
        output_tokens=Lengths.lognormal_median(120, sigma=0.8, min_tokens=4, max_tokens=512),
    ),
}


def load_trace(path: str | Path) -> Workload:
    """A trace file: JSON lines of ``{"arrival_s", "prompt_tokens", "output_tokens"}``."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    trace = tuple(sorted((float(r["arrival_s"]), int(r["prompt_tokens"]), int(r["output_tokens"])) for r in rows))
    return Workload(name=f"trace:{Path(path).name}", trace=trace)


def load_workload(spec: str | Path) -> Workload:
    """A preset by name, ``trace:PATH``, or a YAML file of ``Workload`` fields (named after the file unless it
    says otherwise)."""
    spec = str(spec)
    if spec in PRESETS:
        return PRESETS[spec]
    if spec.startswith("trace:"):
        return load_trace(spec.removeprefix("trace:"))
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown workload {spec!r}; choose from {sorted(PRESETS)}, trace:PATH or a YAML file")
    return Workload.model_validate({"name": path.stem, **(yaml.safe_load(path.read_text()) or {})})
