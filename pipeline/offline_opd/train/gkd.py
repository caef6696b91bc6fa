"""GKD's sampling mixture (Agarwal et al., ICLR 2024): how many sequences of each micro-batch are on-policy.

GKD trains on a fraction λ of on-policy sequences (here: π_ref's rollouts, scored by `teacher_topk`) and
1 − λ of the teacher's own sequences (the `sft_data` rows, scored by `sft_topk`), and found the mixture
to matter more than the divergence. λ follows `distill.gkd`: `lambda_start` at step 0, linear to
`lambda_end` over the first `ramp_frac` of `max_steps`, then constant (`ramp_frac: 0` with start = end:
constant; the default 1 is today's pure on-policy run).

Why counts and not coins: TRL's GKDTrainer flips one coin per batch, so a run's realised mix wanders
by ±√(λ(1−λ)/n_batches). Here micro-batch j of every rank holds n_on(j) = R(j+1) − R(j) on-policy rows,
R(j) = round(B · Σ_{i<j} λ(step of i)) (B = batch_size, round half up): the realised cumulative count
never strays more than half a row from the schedule's, and each batch is within one row of λ·B. The
counts need no random numbers; which rows fill them comes from the two pools' seeded streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mix:
    """The λ schedule of one run, in micro-batches of `batch_size` rows, `accumulate` per optimizer step."""

    lambda_start: float
    lambda_end: float
    ramp_steps: float       # optimizer steps of the linear ramp (0: lambda_end from the start)
    batch_size: int
    accumulate: int = 1
    _sums: list[float] = field(default_factory=lambda: [0.0], init=False, repr=False, compare=False)

    @classmethod
    def of(cls, gkd, max_steps: int, batch_size: int, accumulate: int = 1) -> "Mix":
        """The schedule `distill.gkd` (`config.GkdConfig`) describes for a run of `max_steps` steps."""
        return cls(gkd.lambda_start, gkd.lambda_end, gkd.ramp_frac * max_steps, batch_size, accumulate)

    def at(self, step: int) -> float:
        """λ at optimizer step `step`."""
        if step >= self.ramp_steps:
            return self.lambda_end
        return self.lambda_start + (self.lambda_end - self.lambda_start) * step / self.ramp_steps

    def cumulative(self, batches: int) -> int:
        """R(j): on-policy rows in the first `batches` micro-batches of a rank (Σ λ kept per micro-batch, in
        one fixed order, so every caller and every resume gets the same integers)."""
        while len(self._sums) <= batches:
            j = len(self._sums) - 1
            self._sums.append(self._sums[-1] + self.at(j // self.accumulate))
        return math.floor(self._sums[batches] * self.batch_size + 0.5)

    def on_policy(self, batch: int) -> int:
        """n_on(j): the on-policy rows of micro-batch `batch` (the rest are off-policy)."""
        return self.cumulative(batch + 1) - self.cumulative(batch)

    def counts_before(self, batches: int, role: int, workers: int) -> tuple[int, int]:
        """(on, off) rows that the micro-batches j < `batches` with j ≡ role (mod workers) took: where
        that DataLoader worker's two row streams resume."""
        on = sum(self.on_policy(j) for j in range(role, batches, workers))
        return on, len(range(role, batches, workers)) * self.batch_size - on
