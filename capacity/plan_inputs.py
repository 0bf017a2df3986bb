"""What ``pdserve plan`` plans for: the workload (arrival rate, prompt and output length distributions,
prefix sharing) and the SLOs, read from YAML.

A length distribution is summarised by equal-probability quantile points (the midpoints of
``QUANTILE_POINTS`` equal slices of its CDF): the planner's estimates average over them, so a skewed
distribution weighs its tail and no random draw is involved."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from capacity import workload as sim_workload

QUANTILE_POINTS = 24


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LengthDist(_Strict):
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
    def _params(self) -> LengthDist:
        need = {"fixed": ("value",), "uniform": ("low", "high"), "lognormal": ("mean",)}[self.dist]
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            raise ValueError(f"{self.dist} length distribution needs {missing}")
        if self.dist == "uniform" and self.low > self.high:
            raise ValueError("uniform: low > high")
        return self

    def to_sim(self) -> sim_workload.Lengths:
        """The same lengths as the simulator's ``Lengths`` (a log-normal of this mean and cv unless fixed)."""
        if self.dist == "fixed":
            return sim_workload.Lengths(self.value, min_tokens=self.min, max_tokens=self.max)
        if self.dist == "uniform":
            mean = (self.low + self.high) / 2
            cv = (self.high - self.low) / math.sqrt(12) / mean
        else:
            mean, cv = self.mean, self.cv
        sigma = math.sqrt(math.log1p(cv**2))
        median = max(1, round(mean * math.exp(-(sigma**2) / 2)))
        return sim_workload.Lengths(median, sigma, min_tokens=self.min, max_tokens=self.max)

    def quantiles(self, n: int = QUANTILE_POINTS) -> np.ndarray:
        """``n`` equal-probability points of the distribution, ascending, in tokens."""
        u = (np.arange(n) + 0.5) / n
        if self.dist == "fixed":
            x = np.full(n, float(self.value))
        elif self.dist == "uniform":
            x = self.low + u * (self.high - self.low)
        else:
            sigma = math.sqrt(math.log1p(self.cv**2))
            mu = math.log(self.mean) - sigma**2 / 2
            x = np.exp(mu + sigma * np.array([NormalDist().inv_cdf(p) for p in u]))
        return np.clip(np.round(x), self.min, self.max)


class Workload(_Strict):
    rate: float = Field(1.0, gt=0, description="requests per second (pdserve plan --rate overrides it)")
    prompt_tokens: LengthDist
    output_tokens: LengthDist
    prefix_share: float = Field(
        0.0, ge=0, lt=1, description="share of prompt tokens found in a prefix cache (not prefilled again)"
    )

    def with_rate(self, rate: float | None) -> Workload:
        return self if rate is None else self.model_copy(update={"rate": rate})

    def to_sim(self, name: str = "plan") -> sim_workload.Workload:
        """The simulator's workload (capacity/workload.py) of the same lengths, Poisson at ``rate``: fixed
        lengths stay fixed; log-normal and uniform become log-normals of the same mean and cv. Prompts have
        no shared prefixes there: the simulator confirms a plan without ``prefix_share`` (conservative)."""
        return sim_workload.Workload(name, self.prompt_tokens.to_sim(), self.output_tokens.to_sim())


class Slo(_Strict):
    ttft_ms: float = Field(..., gt=0)
    tpot_ms: float = Field(..., gt=0)

    @property
    def ttft_s(self) -> float:
        return self.ttft_ms / 1e3

    @property
    def tpot_s(self) -> float:
        return self.tpot_ms / 1e3


def load_workload(path: str | Path) -> Workload:
    return Workload.model_validate(yaml.safe_load(Path(path).read_text()))
