"""Online cost model of a pool: predicts prefill time and decode step time.

Each quantity is linear in its drivers, ``y = a + b * x (+ c * z)``, fitted by recursive least squares with exponential
forgetting (recent behaviour dominates; a change of hardware or load shape is tracked within a
few dozen samples), starting from a prior (config, or a short warm-up) that counts as
``prior_weight`` samples:

- prefill seconds vs uncached prompt tokens (engine-reported prefill time of finished requests);
- decode seconds per output token vs decode batch size (requests in the step) and the KV context the
  step attends over (tokens held by running requests: attention cost grows with it).

On top, an end-to-end correction per quantity (``ttft_bias``, ``tpot_bias``): the geometric moving
average of observed / predicted TTFT and TPOT of admitted requests. It absorbs what the lines do not
model (the KV handoff, queueing in the serving path, batch interference), so the
prediction the admission test uses is calibrated on the very quantity the SLO constrains.

Pure: stdlib only. Not thread-safe; the router owns one per pool and updates it from one loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


class OnlineLinear:
    """``y = w . (1, x_1 .. x_k)`` by recursive least squares with forgetting factor ``lam``.

    ``scales`` condition the problem (tokens ~1e3, context tokens ~1e4): feature ``i`` enters as ``x_i / scales[i]``.
    The prior ``weights`` count as ``prior_weight`` samples."""

    def __init__(
        self, weights: Sequence[float], scales: Sequence[float], prior_weight: float = 5.0, lam: float = 0.98
    ) -> None:
        if len(weights) != len(scales) + 1:
            raise ValueError("one weight per feature plus the intercept")
        self.lam = lam
        self.scales = tuple(scales)
        self.w = [weights[0]] + [w * sc for w, sc in zip(weights[1:], self.scales)]
        n, p = len(self.w), 1.0 / max(prior_weight, 1e-6)
        self.P = [[p if i == j else 0.0 for j in range(n)] for i in range(n)]
        self.p_max = p
        self.n = 0

    def _phi(self, xs: Sequence[float]) -> list[float]:
        return [1.0] + [x / sc for x, sc in zip(xs, self.scales)]

    def predict(self, *xs: float) -> float:
        return sum(w * f for w, f in zip(self.w, self._phi(xs)))

    def coef(self, i: int) -> float:
        """Weight of feature ``i`` (0 = intercept) in unscaled units."""
        return self.w[i] if i == 0 else self.w[i] / self.scales[i - 1]

    def update(self, *xs: float, y: float) -> None:
        phi, P, lam, n = self._phi(xs), self.P, self.lam, len(self.w)
        Pphi = [sum(P[i][j] * phi[j] for j in range(n)) for i in range(n)]
        denom = lam + sum(phi[i] * Pphi[i] for i in range(n))
        k = [v / denom for v in Pphi]
        err = y - sum(w * f for w, f in zip(self.w, phi))
        self.w = [w + ki * err for w, ki in zip(self.w, k)]
        # P = (P - k phi^T P) / lam   (P symmetric: phi^T P = Pphi^T)
        P = [[(P[i][j] - k[i] * Pphi[j]) / lam for j in range(n)] for i in range(n)]
        # Bounded covariance: forgetting divides P by lam every sample, so a direction the data does
        # not excite (a constant prompt size, a steady batch) winds up without bound (1e25 after 3,000
        # identical samples) and the next odd sample (a step that carried a prefill) swings the fit
        # several-fold. Eigenvalues above the prior's variance are clipped back to it: unexcited
        # directions are no less certain than at start, excited ones keep forgetting (tracking) as is.
        # The trigger is the cheap test "a diagonal entry above the cap" (implies an eigenvalue above
        # it; the converse may lag by up to a factor n, which only delays the clip a few samples).
        if max(P[i][i] for i in range(n)) > self.p_max:
            P = _clip_eigenvalues(P, self.p_max)
        self.P = P
        self.n += 1


class OnlineLine(OnlineLinear):
    """``y = a + b x``: the one-feature case."""

    def __init__(self, a: float, b: float, prior_weight: float = 5.0, lam: float = 0.98, x_scale: float = 1.0) -> None:
        super().__init__((a, b), (x_scale,), prior_weight, lam)

    @property
    def intercept(self) -> float:
        return self.coef(0)

    @property
    def slope(self) -> float:
        return self.coef(1)

    def update(self, x: float, y: float) -> None:  # type: ignore[override]
        super().update(x, y=y)


def _clip_eigenvalues(P: list[list[float]], cap: float, sweeps: int = 12) -> list[list[float]]:
    """``V diag(min(l, cap)) V^T`` of a small symmetric matrix (cyclic Jacobi; stdlib only)."""
    n = len(P)
    A = [row[:] for row in P]
    V = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    for _ in range(sweeps):
        off = sum(A[i][j] ** 2 for i in range(n) for j in range(n) if i != j)
        if off <= 1e-30 * max(1.0, sum(A[i][i] ** 2 for i in range(n))):
            break
        for p in range(n - 1):
            for q in range(p + 1, n):
                if A[p][q] == 0.0:
                    continue
                theta = (A[q][q] - A[p][p]) / (2 * A[p][q])
                t = math.copysign(1.0, theta) / (abs(theta) + math.sqrt(theta * theta + 1))
                c = 1 / math.sqrt(t * t + 1)
                sn = t * c
                for k in range(n):  # A = J^T A J, V = V J
                    akp, akq = A[k][p], A[k][q]
                    A[k][p], A[k][q] = c * akp - sn * akq, sn * akp + c * akq
                for k in range(n):
                    apk, aqk = A[p][k], A[q][k]
                    A[p][k], A[q][k] = c * apk - sn * aqk, sn * apk + c * aqk
                for k in range(n):
                    vkp, vkq = V[k][p], V[k][q]
                    V[k][p], V[k][q] = c * vkp - sn * vkq, sn * vkp + c * vkq
    lam = [min(A[i][i], cap) for i in range(n)]
    return [[sum(V[i][k] * lam[k] * V[j][k] for k in range(n)) for j in range(n)] for i in range(n)]


@dataclass(frozen=True, slots=True)
class CostPrior:
    """Cold-start guesses; measured on the 2-core CPU box (engine microbenchmark, float32)."""

    prefill_tokens_per_s: float = 300.0
    prefill_overhead_s: float = 0.05
    decode_step_s: float = 0.10  # per output token at batch 1
    decode_step_per_seq_s: float = 0.004  # added per extra running sequence
    decode_step_per_kilotoken_s: float = 0.001  # added per 1k tokens of context in the batch


BIAS_RANGE = (0.5, 4.0)  # a correction outside this means the model is broken, not biased
RATIO_CLIP = (0.25, 4.0)  # one observation moves the bias by at most RATIO_CLIP ** alpha


class CostModel:
    def __init__(
        self, prior: CostPrior | None = None, prior_weight: float = 5.0, lam: float = 0.98, bias_alpha: float = 0.1
    ) -> None:
        p = prior or CostPrior()
        self.bias_alpha = bias_alpha
        self.ttft_bias = 1.0
        self.tpot_bias = 1.0
        self.prefill = OnlineLine(p.prefill_overhead_s, 1.0 / p.prefill_tokens_per_s, prior_weight, lam, 1e3)
        self.decode = OnlineLinear(
            (p.decode_step_s - p.decode_step_per_seq_s, p.decode_step_per_seq_s, p.decode_step_per_kilotoken_s / 1e3),
            (10.0, 1e4),
            prior_weight,
            lam,
        )

    # observations ------------------------------------------------------------------------------
    def observe_prefill(self, uncached_tokens: int, seconds: float) -> None:
        if uncached_tokens > 0 and seconds > 0:
            self.prefill.update(uncached_tokens, seconds)

    def observe_decode(self, batch: int, seconds_per_token: float, context_tokens: int = 0) -> None:
        """One engine step: ``batch`` requests got a token in ``seconds_per_token`` while the running
        requests held ``context_tokens`` of KV."""
        if batch > 0 and seconds_per_token > 0:
            self.decode.update(batch, max(context_tokens, 0), y=seconds_per_token)

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

    def decode_step_s(self, batch: int, context_tokens: int = 0) -> float:
        return max(self.decode.predict(max(batch, 1), max(context_tokens, 0)), 1e-4)

    def prefill_tokens_per_s(self) -> float:
        return 1.0 / max(self.prefill.coef(1), 1e-9)


def _ewma_log(bias: float, ratio: float, alpha: float) -> float:
    """Move ``bias`` by ``ratio`` in log space (ratio 2 and 0.5 weigh the same), clamped."""
    if not ratio > 0 or math.isinf(ratio):
        return bias
    b = bias * min(max(ratio, RATIO_CLIP[0]), RATIO_CLIP[1]) ** alpha
    return min(max(b, BIAS_RANGE[0]), BIAS_RANGE[1])
