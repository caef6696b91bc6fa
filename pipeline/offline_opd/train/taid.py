"""TAID's adaptive interpolation coefficient t (`distill.loss_params.schedule: adaptive`).

TAID (Shing et al., "TAID: Temporally Adaptive Interpolated Distillation", ICLR 2025, Algorithm 1 and
SakanaAI's published implementation) trains on KL(p_t ‖ q) with p_t between the student (t = 0) and the
teacher (t = 1), and moves t towards 1 faster while the loss is falling and slower once it stalls. After
each optimizer step n, with J_n that step's TAID loss:

    δ_n = (J_{n−1} − J_n) / (J_{n−1} + 1e-15)           relative improvement
    m_n = β·m_{n−1} + (1 − β)·δ_n                       its momentum (m_0 = 0)
    t_{n+1} = min(t_end, max(t_linear(n), t_n + α·σ(m_n)·(1 − t_n)))

with t_linear(n) = t_start + (t_end − t_start)·n / max_steps the linear schedule as a floor (t never
lags behind it) and t_1 = t_start; the first step only records J_1. Defaults α = 5e-4, β = 0.99 are the
published ones. J is the step's divergence summed over all ranks and micro-batches (the global loss the
trainer logs), so every rank moves t identically; the published code updates on each rank's micro-batch
loss. The state (t, m, J_{n−1}) is saved in every checkpoint, so a resumed run continues the same sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

# Added to the previous loss in δ's denominator, as the published update does.
RELATIVE_EPS = 1e-15


@dataclass(frozen=True)
class AdaptiveRule:
    """The validated settings of one adaptively scheduled parameter (loss_params t_start, t_end, alpha, beta)."""

    start: float
    end: float
    alpha: float
    beta: float

    def floor(self, progress: float) -> float:
        """The linear schedule at `progress` (fraction of training done): t never falls below it."""
        return self.start + (self.end - self.start) * min(max(progress, 0.0), 1.0)


class AdaptiveT:
    """The running state of the rule: t, the momentum m and the previous step's loss (None before the first)."""

    def __init__(self, rule: AdaptiveRule) -> None:
        self.rule = rule
        self.t: float = rule.start
        self.momentum: float = 0.0
        self.prev_loss: Optional[float] = None

    def observe(self, loss: float, progress: float) -> None:
        """Update t with the loss of the step just taken at `progress` (= its step index / max_steps)."""
        if self.prev_loss is None:
            self.prev_loss = loss
            return
        r = self.rule
        delta = (self.prev_loss - loss) / (self.prev_loss + RELATIVE_EPS)
        self.momentum = r.beta * self.momentum + (1.0 - r.beta) * delta
        step = r.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
        self.t = min(r.end, max(r.floor(progress), self.t + step))
        self.prev_loss = loss

    def state_dict(self) -> dict:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.momentum, self.prev_loss = float(state["t"]), float(state["momentum"]), state["prev_loss"]


def _sigmoid(x: float) -> float:
    """σ(x) without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
