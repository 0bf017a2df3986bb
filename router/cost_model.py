"""Online cost model of a pool: predicts prefill time, decode step time and handoff time.

Each quantity is a line ``y = a + b * x`` fitted by recursive least squares with exponential
forgetting (recent behaviour dominates; a change of hardware or load shape is tracked within a
few dozen samples), starting from a prior (config, or a short warm-up) that counts as
``prior_weight`` samples:

- prefill seconds vs uncached prompt tokens (engine-reported prefill time of finished requests);
- decode seconds per output token vs decode batch size (running requests on the engine);
- handoff seconds vs KV bytes.

On top, an end-to-end correction per quantity (``ttft_bias``, ``tpot_bias``): the geometric moving
average of observed / predicted TTFT and TPOT of admitted requests. It absorbs what the lines do not
model (the decode side's first step, queueing in the serving path, batch interference), so the
prediction the admission test uses is calibrated on the very quantity the SLO constrains.

Pure: stdlib only. Not thread-safe; the router owns one per pool and updates it from one loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class OnlineLine:
    """``y = a + b x`` by recursive least squares with forgetting factor ``lam``."""

    def __init__(self, a: float, b: float, prior_weight: float = 5.0, lam: float = 0.98,
                 x_scale: float = 1.0) -> None:
        self.lam = lam
        self.x_scale = x_scale          # conditions the problem (tokens ~1e3, bytes ~1e7)
        self.w = [a, b * x_scale]
        p = 1.0 / max(prior_weight, 1e-6)
        self.P = [[p, 0.0], [0.0, p]]
        self.n = 0

    def predict(self, x: float) -> float:
        return self.w[0] + self.w[1] * (x / self.x_scale)

    @property
    def intercept(self) -> float:
        return self.w[0]

    @property
    def slope(self) -> float:
        return self.w[1] / self.x_scale

    def update(self, x: float, y: float) -> None:
        phi = (1.0, x / self.x_scale)
        P, lam = self.P, self.lam
        Pphi = (P[0][0] * phi[0] + P[0][1] * phi[1], P[1][0] * phi[0] + P[1][1] * phi[1])
        denom = lam + phi[0] * Pphi[0] + phi[1] * Pphi[1]
        k = (Pphi[0] / denom, Pphi[1] / denom)
        err = y - (self.w[0] * phi[0] + self.w[1] * phi[1])
        self.w = [self.w[0] + k[0] * err, self.w[1] + k[1] * err]
        # P = (P - k phi^T P) / lam
        phiP = (phi[0] * P[0][0] + phi[1] * P[1][0], phi[0] * P[0][1] + phi[1] * P[1][1])
        self.P = [[(P[i][j] - k[i] * phiP[j]) / lam for j in range(2)] for i in range(2)]
        self.n += 1


@dataclass(frozen=True, slots=True)
class CostPrior:
    """Cold-start guesses; measured on the 2-core CPU box (engine microbenchmark, float32)."""

    prefill_tokens_per_s: float = 300.0
    prefill_overhead_s: float = 0.05
    decode_step_s: float = 0.10           # per output token at batch 1
    decode_step_per_seq_s: float = 0.004  # added per extra running sequence
    handoff_overhead_s: float = 0.01
    handoff_bytes_per_s: float = 1e9


BIAS_RANGE = (0.5, 4.0)   # a correction outside this means the model is broken, not biased
RATIO_CLIP = (0.25, 4.0)  # one observation moves the bias by at most RATIO_CLIP ** alpha


class CostModel:
    def __init__(self, prior: CostPrior | None = None, prior_weight: float = 5.0, lam: float = 0.98,
                 bias_alpha: float = 0.1) -> None:
        p = prior or CostPrior()
        self.bias_alpha = bias_alpha
        self.ttft_bias = 1.0
        self.tpot_bias = 1.0
        self.prefill = OnlineLine(p.prefill_overhead_s, 1.0 / p.prefill_tokens_per_s, prior_weight, lam, 1e3)
        self.decode = OnlineLine(p.decode_step_s - p.decode_step_per_seq_s, p.decode_step_per_seq_s,
                                 prior_weight, lam, 10.0)
        self.handoff = OnlineLine(p.handoff_overhead_s, 1.0 / p.handoff_bytes_per_s, prior_weight, lam, 1e7)

    # observations ------------------------------------------------------------------------------
    def observe_prefill(self, uncached_tokens: int, seconds: float) -> None:
        if uncached_tokens > 0 and seconds > 0:
            self.prefill.update(uncached_tokens, seconds)

    def observe_decode(self, batch: int, seconds_per_token: float) -> None:
        if batch > 0 and seconds_per_token > 0:
            self.decode.update(batch, seconds_per_token)

    def observe_handoff(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.handoff.update(nbytes, seconds)

    def observe_ttft_ratio(self, actual_over_predicted: float) -> None:
        """Observed / predicted TTFT of one admitted request (prediction made with the current bias)."""
        self.ttft_bias = _ewma_log(self.ttft_bias, actual_over_predicted, self.bias_alpha)

    def observe_tpot_ratio(self, actual_over_predicted: float) -> None:
        self.tpot_bias = _ewma_log(self.tpot_bias, actual_over_predicted, self.bias_alpha)

    # predictions (never below a small floor: a fit may drift negative at the edges) --------------
    def prefill_s(self, uncached_tokens: int) -> float:
        if uncached_tokens <= 0:
            return 0.0
        return max(self.prefill.predict(uncached_tokens), uncached_tokens * 1e-6)

    def decode_step_s(self, batch: int) -> float:
        return max(self.decode.predict(max(batch, 1)), 1e-4)

    def handoff_s(self, nbytes: int) -> float:
        return max(self.handoff.predict(nbytes), 0.0) if nbytes > 0 else 0.0

    def prefill_tokens_per_s(self) -> float:
        return 1.0 / max(self.prefill.slope, 1e-9)


def _ewma_log(bias: float, ratio: float, alpha: float) -> float:
    """Move ``bias`` by ``ratio`` in log space (ratio 2 and 0.5 weigh the same), clamped."""
    if not ratio > 0 or math.isinf(ratio):
        return bias
    b = bias * min(max(ratio, RATIO_CLIP[0]), RATIO_CLIP[1]) ** alpha
    return min(max(b, BIAS_RANGE[0]), BIAS_RANGE[1])
