"""A loss mode's per-token term, and the two things every term reads: the targets and the student's output.

`DistillLoss` (losses.py) decides which tokens count and how much; the term of the configured mode
computes the loss on them. For the divergence modes that is one kernel call against the teacher's
sparse targets (`KernelTerm`); pg adds its own corrections (`offline_opd.train.pg`). The student's
output is either its logits, or its hidden states and the lm_head weight on the fused path (`Student`),
where the [N, V] logits are never materialised.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import torch

from opd_kernels import fused_linear_sparse_divergence, sparse_divergence

# Rows per chunk of the passes over the logits outside the kernels (TIP statistics, pg's corrections):
# about 128 MiB per float32 [chunk, V] temporary, so a pass stays well under the memory the fused path
# saves, in a few dozen chunks at real vocabularies.
STATS_CHUNK_ELEMS = 1 << 25


@dataclass(frozen=True)
class Choice:
    """A loss parameter that names one of a few options (pg's `reference`, taid's `schedule`); the numeric
    ones are `opd_kernels.modes.Param`."""

    default: str
    options: tuple[str, ...]

    def contains(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.options

    def interval(self) -> str:
        return "one of " + ", ".join(self.options)


@dataclass(frozen=True)
class Targets:
    """Teacher and behaviour-policy data for N response tokens, row-aligned with the student's rows."""

    sampled_ids: torch.Tensor       # [N] the token π_ref sampled (pg's action, the CE label)
    teacher_logprob: torch.Tensor   # [N] teacher log-prob of the sampled token (exact)
    behavior_logprob: torch.Tensor  # [N] π_ref log-prob of the sampled token at sampling time
    topk_ids: torch.Tensor          # [N, k] teacher top-k ids (k may be 0)
    topk_logprobs: torch.Tensor     # [N, k] their teacher log-probs
    mask: torch.Tensor              # [N] bool, tokens that carry loss
    tail_logprob: Optional[torch.Tensor] = None   # [N] teacher log-mass outside topk_ids (None: rebuilt)
    entry_weights: Optional[torch.Tensor] = None  # [N, k] importance weights of sampled entries (None: top-k)

    def rows(self, s: int, e: int) -> "Targets":
        """Rows s:e of every field: one chunk's share."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[s:e] for f in dataclasses.fields(self)
                                            if getattr(self, f.name) is not None})


@dataclass(frozen=True)
class Student:
    """The student's output for N rows: `logits` [N, V], or `hidden` [N, H] and the lm_head `weight` [V, H],
    with the kernel settings every call on it uses."""

    logits: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    backend: str = "auto"
    chunk_size: Optional[int] = None

    def __post_init__(self) -> None:
        if (self.logits is None) == (self.hidden is None) or (self.hidden is None) != (self.weight is None):
            raise ValueError("pass either logits, or hidden and weight")

    @property
    def source(self) -> torch.Tensor:
        """The tensor the loss's graph starts from (logits, or hidden on the fused path)."""
        return self.logits if self.logits is not None else self.hidden

    def divergence(self, topk_ids: Optional[torch.Tensor], topk_logprobs: Optional[torch.Tensor], mode: str, *,
                   inplace: bool, **kw: Any) -> torch.Tensor:
        """One kernel call (per-token loss). `inplace`: the call may write the gradient into the logits, so
        it must be the last reader of them."""
        if self.hidden is not None:
            return fused_linear_sparse_divergence(self.hidden, self.weight, topk_ids, topk_logprobs, mode,
                                                  backend=self.backend, chunk_size=self.chunk_size, **kw)
        return sparse_divergence(self.logits, topk_ids, topk_logprobs, mode, backend=self.backend,
                                 inplace_grad=inplace, chunk_size=self.chunk_size, **kw)

    def cross_entropy(self, targets: Targets, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Per-token −log q(a) of the sampled tokens, times `weights`: the forward KL against a point-mass
        teacher (the sampled token with log-prob 0), which is exactly −log q(a) up to the kernel's 1e-6 tail
        floor, and keeps the kernels' memory benefits (no autograd-saved [N, V] softmax, fused lm_head)."""
        return self.divergence(targets.sampled_ids[:, None], torch.zeros_like(targets.teacher_logprob)[:, None],
                               "fkl", mask=mask, weights=weights, inplace=False)

    def chunks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, end, logits) row chunks, computed from hidden @ weight.T on the fused path (never [N, V] at once)."""
        n = self.source.shape[0]
        vocab = self.logits.shape[1] if self.logits is not None else self.weight.shape[0]
        step = self.chunk_size or max(1, STATS_CHUNK_ELEMS // vocab)
        w = None if self.weight is None else self.weight.to(self.hidden.dtype)
        for s in range(0, n, step):
            e = min(n, s + step)
            yield s, e, (self.logits[s:e] if self.logits is not None else self.hidden[s:e] @ w.t())


class KernelTerm:
    """A divergence mode's term: the kernel's per-token loss against the teacher's top-k (with the exact
    tail or the entries' importance weights when the shards carry them)."""

    def __init__(self, mode: str, objective: Mapping[str, float], *, behavior_temperature: float = 1.0) -> None:
        """The constructor every term shares, so that `DistillLoss` builds any of them from the config:
        `objective`, the validated loss_params the term handles itself (`LossMode.objective`: none for a
        divergence mode); `behavior_temperature`, the rollouts' sampling temperature (for terms that
        compare with the behaviour policy)."""
        self.mode = mode

    def inputs(self, targets: Targets) -> dict[str, Optional[torch.Tensor]]:
        """The kernel keywords this mode reads from `targets`, besides the top-k."""
        return dict(tail_logprob=targets.tail_logprob, entry_weights=targets.entry_weights)

    def loss(self, targets: Targets, params: dict[str, float], student: Student, keep: torch.Tensor,
             weights: torch.Tensor) -> torch.Tensor:
        """Sum over the `keep` tokens of weights × the per-token loss. Runs last: it may take over the logits."""
        return student.divergence(targets.topk_ids, targets.topk_logprobs, self.mode, mask=keep, weights=weights,
                                  inplace=True, **params, **self.inputs(targets)).sum()

    def signal(self, targets: Targets, params: dict[str, float], logits: torch.Tensor, lse: torch.Tensor,
               backend: str) -> torch.Tensor:
        """TIP's per-token divergence signal on a chunk (`targets` and `logits` its rows, `lse` their
        log-sum-exp in float32): the kernel's own per-token loss."""
        return sparse_divergence(logits, targets.topk_ids, targets.topk_logprobs, self.mode, mask=targets.mask,
                                 backend=backend, **self.inputs(targets), **params)
