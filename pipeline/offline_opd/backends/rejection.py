"""Flawed-prefix rejection: drop degenerate rollouts before the teacher scores them (`rollouts.max_perplexity`).

A response whose perplexity under the policy that sampled it, exp(−mean over its tokens of the behaviour
log-prob), is above the threshold went off the rails early (repetition, garbage after a flawed prefix):
scoring it costs teacher compute and training on it teaches little. The log-probs are the ones every
rollout already records (at the sampling temperature, so this is the perplexity under the distribution the
tokens were drawn from: π_ref itself at temperature 1). Practitioners use thresholds of 100 to 500 on real
models; a small toy policy needs a threshold near its own typical perplexity.

A rejected response may be redrawn, up to `rollouts.resample_budget` times: round r redraws every slot
still rejected, in slot order, with the seed (part seed, r), and each redraw is kept only if it passes. A
slot still rejected after the budget is left out of the part (its `prompt#i` sample id is missing). The
draws depend on the part's seed and the rejected slots alone (each job of a round draws from its own
generator, `base.job_seeds`), never on the engine's batch size or on which process runs the part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from offline_opd.backends.base import Sample, Sampling, batch_seed

Generate = Callable[[list[list[int]], Sampling], list[list[Sample]]]


def perplexity(logprobs: Sequence[float]) -> float:
    """exp(−mean log-prob) of one response (1.0 for an empty one: nothing to judge)."""
    if not len(logprobs):
        return 1.0
    return math.exp(-math.fsum(logprobs) / len(logprobs))


@dataclass
class Rejections:
    """What rejection did in one part: the stage's metrics and the part's footer report it."""

    rejected_rows: int = 0              # draws rejected, redraws included
    rejected_response_tokens: int = 0   # their response tokens: teacher tokens never scored
    resampled_rows: int = 0             # slots filled by a redraw that passed
    dropped_rows: int = 0               # slots left out after the budget

    def add(self, sample: Sample) -> None:
        self.rejected_rows += 1
        self.rejected_response_tokens += len(sample.response_ids)


def sample_with_rejection(generate: Generate, prompts: list[list[int]], sampling: Sampling,
                          max_perplexity: float, budget: int) -> tuple[list[list[Optional[Sample]]], Rejections]:
    """`generate(prompts, sampling)` with every response above `max_perplexity` redrawn up to `budget` times
    and, if it never passes, replaced by None; samples[p][i] is the i-th response to prompt p."""
    samples: list[list[Optional[Sample]]] = [list(row) for row in generate(prompts, sampling)]
    stats = Rejections()
    pending = []
    for p, row in enumerate(samples):
        for i, sample in enumerate(row):
            if perplexity(sample.logprobs) > max_perplexity:
                stats.add(sample)
                pending.append((p, i))
    for attempt in range(1, budget + 1):
        if not pending:
            break
        redraw = Sampling(1, sampling.temperature, sampling.max_new_tokens, seed=batch_seed(sampling.seed, attempt))
        fresh = generate([prompts[p] for p, _ in pending], redraw)
        still = []
        for (p, i), (sample,) in zip(pending, fresh):
            if perplexity(sample.logprobs) > max_perplexity:
                stats.add(sample)
                still.append((p, i))
            else:
                samples[p][i] = sample
                stats.resampled_rows += 1
        pending = still
    for p, i in pending:
        samples[p][i] = None
    stats.dropped_rows = len(pending)
    return samples, stats
