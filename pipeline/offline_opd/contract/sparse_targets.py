"""Which teacher entries a shard stores per response position, and the weights that make them an estimate.

`teacher_topk.selection` (docs/design.md §10, shards v2; the estimator is derived in kernels/MATH.md §6):

* `topk`: the teacher's k most likely ids, plus (with `union_student_k`) π_ref's own top ids that
  the teacher's top-k misses, scored by the teacher. Losses see these entries plus one tail bucket
  holding the rest of the mass, which is stored exactly (below), never rebuilt from the entries.
* `sampled`: m draws with replacement from the teacher distribution p; each distinct id j is stored
  once with its count c_j. With w_j = c_j / (m p_j), Σ_j w_j f(p_j, q_j) is an unbiased estimate of
  the full-vocabulary Σ_i f(p_i, q_i) for any per-token divergence term f (arXiv 2503.16870).
* `topk+sampled`: the deterministic entries of `topk` exactly (weight 1), plus m draws from p
  restricted to the rest of the vocabulary (mass M), weighted w_j = c_j M / (m p_j): exact where
  the teacher is confident, unbiased for the remainder.

Counts, not weights, are stored: they are small integers (one byte), and the weights follow from
them, the stored log-probs and the stored tail (`entry_weights`), so a codec that quantises the
log-probs changes weights and terms consistently.

`tail_logprob` is always the teacher's log-mass outside every stored id, computed at scoring time in
fp32 as a log-sum-exp over the complement: exact to fp32 precision however small the tail is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:  # torch is imported where the scorer runs, not by readers of this module's numpy side
    import torch

SELECTIONS = ("topk", "sampled", "topk+sampled")
MAX_SAMPLES = 255     # counts are stored as uint8
TAIL_FLOOR = -1.0e4   # log-mass stored for an empty tail (k = V): exp() is exactly 0, and no -inf in files


@dataclass(frozen=True)
class Selection:
    """What to store per position: `k` top ids, `samples` draws, per `mode` (one of SELECTIONS)."""

    mode: str = "topk"
    k: int = 0
    samples: int = 0

    def __post_init__(self) -> None:
        if self.mode not in SELECTIONS:
            raise ValueError(f"selection {self.mode!r}: use one of {', '.join(SELECTIONS)}")
        if self.sampled and not 1 <= self.samples <= MAX_SAMPLES:
            raise ValueError(f"selection {self.mode!r} needs 1 <= samples <= {MAX_SAMPLES}, got {self.samples}")

    @classmethod
    def of(cls, cfg: Any) -> "Selection":
        """The selection `teacher_topk` settings (`config.TeacherTopkConfig`, whose cross-key rules are checked
        at load) describe."""
        return cls(cfg.selection, cfg.k, cfg.samples)

    @property
    def sampled(self) -> bool:
        return self.mode != "topk"

    @property
    def top(self) -> int:
        """How many ids are taken by rank (0 for pure sampling)."""
        return 0 if self.mode == "sampled" else self.k

    def width(self, extra: int = 0) -> int:
        """Stored entries per position (slots a duplicate leaves empty hold id -1)."""
        det = self.top + extra if self.mode != "sampled" else 0
        return det + (self.samples if self.sampled else 0)


def select(logp: "torch.Tensor", sel: Selection, extra_ids: Optional["torch.Tensor"] = None,
           uniforms: Optional["torch.Tensor"] = None) -> tuple:
    """Entries of R positions from their fp32 teacher log-probs `logp` [R, V] (torch).

    extra_ids: [R, e] ids to add to the top ids (union with π_ref's top ids, -1 = none; ignored by
    `sampled`). uniforms: [R, samples] numbers in [0, 1) that drive the draws (inverse CDF), made per
    sequence by the caller so that the draws do not depend on batching or blocking.
    Returns (ids [R, W] int64 with -1 in empty slots, their log-probs [R, W] fp32 (-inf when empty), counts [R, W]
    uint8 (0: not a draw) or None for `topk`, tail_logprob [R] fp32).
    """
    import torch

    R, V = logp.shape
    cols = []
    if sel.mode != "sampled":
        top = logp.topk(min(sel.top, V), dim=-1, sorted=True).indices
        cols.append(top)
        if extra_ids is not None and extra_ids.shape[1]:
            extra = extra_ids.to(device=logp.device, dtype=torch.long)
            dup = (extra[:, :, None] == top[:, None, :]).any(-1) | _earlier_duplicate(extra) | (extra >= V)
            cols.append(torch.where(dup, torch.full_like(extra, -1), extra))
    det = torch.cat(cols, 1) if cols else torch.zeros(R, 0, dtype=torch.long, device=logp.device)
    taken = torch.zeros(R, V + 1, dtype=torch.bool, device=logp.device)  # column V collects the -1 slots
    taken.scatter_(1, torch.where(det < 0, V, det), True)
    counts = None
    ids = det
    if sel.sampled:
        cdf = torch.exp(logp.double()).masked_fill_(taken[:, :V], 0.0).cumsum_(1)
        total = cdf[:, -1]
        x = uniforms.to(device=logp.device, dtype=torch.float64) * total[:, None]
        draws = torch.searchsorted(cdf, x.contiguous(), right=True).clamp_(max=V - 1).sort(1).values
        first = torch.ones_like(draws, dtype=torch.bool)
        first[:, 1:] = draws[:, 1:] != draws[:, :-1]
        first &= (total > 0)[:, None]  # the stored ids already hold the whole distribution: no draws
        n = torch.searchsorted(draws, draws, right=True) - torch.searchsorted(draws, draws)
        drawn = torch.where(first, draws, torch.full_like(draws, -1))
        counts = torch.cat([torch.zeros_like(det, dtype=torch.uint8), torch.where(first, n, 0).to(torch.uint8)], 1)
        taken.scatter_(1, torch.where(drawn < 0, V, drawn), True)
        ids = torch.cat([det, drawn], 1)
    valid = ids >= 0
    lps = logp.gather(1, ids.clamp(min=0)).masked_fill_(~valid, float("-inf"))
    tail = torch.logsumexp(logp.masked_fill(taken[:, :V], float("-inf")), dim=-1).clamp(min=TAIL_FLOOR)
    return ids, lps, counts, tail


def draw_uniforms(seed: int, sample_id: str, positions: int, samples: int) -> np.ndarray:
    """[positions, samples] uniforms of one sequence: a function of (seed, sample_id) only."""
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little")
    return np.random.default_rng(digest).random((positions, samples))


def _earlier_duplicate(ids: "torch.Tensor") -> "torch.Tensor":
    """[R, e] bool: the id already appears earlier in its row (a union list may repeat nothing twice)."""
    import torch

    eq = ids[:, :, None] == ids[:, None, :]
    return (eq & torch.ones_like(eq[0], dtype=torch.bool).tril(-1)).any(-1)


def tail_from_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """log(1 - Σ exp(lp)) per row in float64: the tail when only the entries' fp32 log-probs are known
    (vLLM returns no full distribution). The float64 sum adds no error, but each fp32 log-prob carries
    ~6e-8 relative rounding, so the tail is good to ~1e-7 absolute: about 1 % at a 1e-5 tail, where
    the float16 rebuild is off by nats (the hf scorer's log-sum-exp over the complement has no such limit)."""
    mass = np.exp(logprobs.astype(np.float64)).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.maximum(np.log1p(-np.minimum(mass, 1.0)), TAIL_FLOOR).astype(np.float32)


def entry_weights(counts: np.ndarray, logprobs: np.ndarray, tail_logprob: np.ndarray, samples: int) -> np.ndarray:
    """Importance weights [..., W] of stored entries from their draw counts [..., W] (kernels/MATH.md §6).

    A deterministic entry (count 0, id >= 0) has weight 1; a drawn one c_j M / (m p_j), where M, the
    mass the draws came from, is the tail plus the drawn entries' own mass (all of it for `sampled`).
    Empty slots (id -1) get 1 like deterministic ones; the kernels skip them by their id.
    """
    c = counts.astype(np.float64)
    lp = logprobs.astype(np.float64)
    drawn = c > 0
    mass = np.exp(tail_logprob.astype(np.float64)) + np.where(drawn, np.exp(lp), 0.0).sum(-1)
    w = np.where(drawn, c * mass[..., None] / max(samples, 1) * np.exp(-np.where(drawn, lp, 0.0)), 1.0)
    return w.astype(np.float32)

