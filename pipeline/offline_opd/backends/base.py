"""What every backend returns and checks, with no backend's code: the records and the shared rules.

Both engines (`hf`: hf.py with generation.py and scoring.py; `vllm`: vllm_backend.py) import this module
and nothing of each other, so the shards they write are interchangeable by construction:

* `Sampling` / `Sample`: sampling with the exact behaviour-policy log-prob of every sampled token
  (log_softmax(logits / T) of that token; temperature 0 means greedy, log-probs then at T = 1).
* `Extras` / `Scored`: teacher scoring, for every response token its top-k (or the sparse targets of
  offline_opd.contract.sparse_targets) and the sampled token's exact log-prob, at SCORING_TEMPERATURE.
* Randomness is per sequence: sample j of a call draws from its own generator seeded from (seed, j)
  (`job_seeds`), so a result depends neither on the batch size nor on what the process ran before.
* Inputs are refused before any work: empty prompts, bad prompt lengths, sequences longer than the
  engine's max_model_len.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from offline_opd.contract.sparse_targets import Selection, draw_uniforms
from offline_opd.errors import UserError

# Teacher scores are the teacher's own distribution (T = 1); the student's sampling temperature is a
# property of the rollouts, not of the teacher.
SCORING_TEMPERATURE = 1.0


@dataclass(frozen=True)
class Sample:
    response_ids: list[int]   # generated ids, stopping after eos (eos included) or at max_new_tokens
    logprobs: list[float]     # behaviour-policy log-prob of each response id, at the sampling temperature


@dataclass(frozen=True)
class Sampling:
    """How to sample: `n` responses per prompt at `temperature` (0 = greedy, log-probs then at T = 1)."""

    n: int
    temperature: float
    max_new_tokens: int
    seed: int

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1 or self.temperature < 0:
            raise ValueError(f"need n >= 1, max_new_tokens >= 1, temperature >= 0; got n={self.n}, "
                             f"max_new_tokens={self.max_new_tokens}, temperature={self.temperature}")


@dataclass(frozen=True)
class Scored:
    teacher_logprob: np.ndarray   # [T] float32: log-prob of each response token
    topk_ids: np.ndarray          # [T, W] int32: stored ids per position (top-k first, descending; -1 empty)
    topk_logprobs: np.ndarray     # [T, W] float32: their log-probs
    tail_logprob: np.ndarray      # [T] float32: log of the teacher mass outside the stored ids, exact in fp32
    sample_counts: Optional[np.ndarray] = None  # [T, W] uint8: draws per entry (0: not drawn); sampled only


@dataclass(frozen=True)
class Extras:
    """Optional per-sequence inputs beyond top-k (offline_opd.contract.sparse_targets): what to store, the
    uniforms [T, samples] that drive the draws, π_ref's own top ids [T, e] to add (union)."""

    selection: Selection
    uniforms: Optional[list[np.ndarray]] = None
    union_ids: Optional[list[np.ndarray]] = None


def rollout_extras(rollouts, selection: Selection, seed: int, policy_scorer, union_k: int) -> Extras:
    """The Extras of one rollouts part (a pyarrow table): per-sequence draws seeded from (seed, sample_id),
    and π_ref's own top ids (`policy_scorer`, an engine on π_ref, scores the rollouts as sampled)."""
    ids, plens = rollouts.column("input_ids").to_pylist(), rollouts.column("prompt_len").to_pylist()
    uniforms = None
    if selection.sampled:
        uniforms = [draw_uniforms(seed, sid, len(x) - p, selection.samples)
                    for sid, x, p in zip(rollouts.column("sample_id").to_pylist(), ids, plens)]
    union = None
    if policy_scorer is not None:
        union = [s.topk_ids for s in policy_scorer.score(ids, plens, k=union_k)]
    return Extras(selection, uniforms, union)


def batch_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for batch `index` (seed 0 batch 1 and seed 1 batch 0 must differ)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def job_seeds(seed: int, n_jobs: int) -> list[int]:
    """The seed of each sequence of one call: job j (prompt j // n, sample j % n) gets (seed, j)."""
    return [batch_seed(seed, j) for j in range(n_jobs)]


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often list several)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    ids.discard(None)
    if not ids:
        raise ValueError("the model has no eos token (tokenizer.eos_token_id and generation_config are unset); "
                         "set eos_token in its tokenizer_config.json")
    return sorted(ids)


def check_prompts(prompt_ids: Sequence[Sequence[int]]) -> None:
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("an empty prompt cannot be continued: every prompt needs at least one token")


def check_inputs(input_ids: list[list[int]], prompt_lens: list[int], k: int, vocab: int) -> None:
    """Bad lengths would silently shift every score by a position; refuse them before any work."""
    if not 0 <= k <= vocab:
        raise ValueError(f"k={k} must be between 0 and the vocabulary size {vocab}")
    if len(input_ids) != len(prompt_lens):
        raise ValueError(f"{len(input_ids)} sequences but {len(prompt_lens)} prompt lengths")
    for i, (ids, p) in enumerate(zip(input_ids, prompt_lens)):
        if not 1 <= p <= len(ids):
            raise ValueError(f"sequence {i}: prompt_len {p} must be in [1, {len(ids)}] (the first token "
                             f"has no prediction to score)")


def check_fits(lengths: Sequence[int], max_model_len: int, section: str) -> None:
    """Refuse a sequence longer than the engine's max_model_len before any work (vLLM would fail mid-run)."""
    longest = max(lengths, default=0)
    if longest > max_model_len:
        raise UserError(f"params.yaml: {section}.max_model_len is {max_model_len} but a sequence needs {longest} "
                        f"tokens (prompt + max_new_tokens); raise {section}.max_model_len (up to what the model "
                        f"supports) or shorten the prompts / max_new_tokens")
