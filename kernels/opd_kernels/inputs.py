"""The inputs of one kernel call, validated and flattened once: what both implementations and both backwards read.

`sparse_divergence` and `fused_linear_sparse_divergence` build one `KernelInputs` from their keywords;
the chunked PyTorch path (`reference.chunk_loss_grad`), the Triton launcher
(`triton_sparse.sparse_divergence_fwd`) and the fused-linear pass take that object, so adding an input
means adding one field, not keeping several positional argument lists in step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .modes import KERNEL_MODES, Constants, kernel_mode


@dataclass(frozen=True)
class KernelInputs:
    """Row-aligned inputs of N rows (2-D [N, k] or 1-D [N]); None where a mode or the caller has none."""

    mode_id: int                                             # modes.KernelMode.id of the kernel that runs
    cst: Constants                                           # the mode's constants (modes.kernel_mode)
    topk_ids: Optional[torch.Tensor] = None                  # [N, k] teacher ids (None: pg, or k = 0)
    topk_logprobs: Optional[torch.Tensor] = None             # [N, k] their teacher log-probs
    keep: Optional[torch.Tensor] = None                      # [N] bool rows to compute (None: every row)
    weights: Optional[torch.Tensor] = None                   # [N] per-row weights (detached)
    sampled_ids: Optional[torch.Tensor] = None               # [N] pg: the sampled token
    teacher_sampled_logprob: Optional[torch.Tensor] = None   # [N] pg: the teacher's log-prob of it
    behavior_logprob: Optional[torch.Tensor] = None          # [N] pg: pi_ref's log-prob of it (optional)
    tail_logprob: Optional[torch.Tensor] = None              # [N] exact teacher log-mass outside topk_ids
    entry_weights: Optional[torch.Tensor] = None             # [N, k] importance weights (detached)

    def rows(self, s: int, e: int) -> "KernelInputs":
        """Rows s:e of every per-row input: one chunk's share."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[s:e] for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def _flat(t: Optional[torch.Tensor], n: int, name: str, last: Optional[int] = None) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = torch.as_tensor(t)
    if last is None:
        if t.numel() != n:
            raise ValueError(f"{name} must have one value per token ({n}), got shape {tuple(t.shape)}")
        return t.reshape(n)
    if t.numel() != n * last or (t.dim() and t.shape[-1] != last):
        raise ValueError(f"{name} must have shape [..., {last}] with {n} rows, got {tuple(t.shape)}")
    return t.reshape(n, last)


def _detached(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach()


def kernel_inputs(n: int, device: torch.device | str, topk_ids: Optional[torch.Tensor],
                  topk_logprobs: Optional[torch.Tensor], mode: str, *, mask: Optional[torch.Tensor] = None,
                  sampled_ids: Optional[torch.Tensor] = None, teacher_sampled_logprob: Optional[torch.Tensor] = None,
                  behavior_logprob: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                  tail_logprob: Optional[torch.Tensor] = None, entry_weights: Optional[torch.Tensor] = None,
                  **mode_params: Any) -> KernelInputs:
    """Validate the public entry points' inputs for n rows and flatten them (`sparse_divergence` documents
    each keyword; any other keyword is a mode parameter, checked against the mode's record).

    A mode reads either the teacher's top-k (with the optional tail and entry weights) or the sampled
    token (pg); the inputs it does not read are dropped here.
    """
    mode_id, cst = kernel_mode(mode, mode_params)
    on_sampled = KERNEL_MODES[mode].sampled_token
    if topk_ids is None or (torch.is_tensor(topk_ids) and topk_ids.numel() == 0 and n > 0):
        k = 0
        topk_ids = topk_logprobs = None
    else:
        k = topk_ids.shape[-1]
    ids = lps = None
    if not on_sampled and k > 0:
        if topk_logprobs is None:
            raise ValueError("topk_logprobs is required with topk_ids")
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
        if topk_logprobs.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"topk_logprobs must be a float tensor, got {topk_logprobs.dtype}")
        ids, lps = _flat(topk_ids, n, "topk_ids", k), _flat(topk_logprobs, n, "topk_logprobs", k)
    if on_sampled and (sampled_ids is None or teacher_sampled_logprob is None):
        raise ValueError(f"mode {mode!r} needs sampled_ids and teacher_sampled_logprob")
    keep = _flat(mask, n, "mask")
    return KernelInputs(
        mode_id, cst, ids, lps,
        keep=None if keep is None else keep.to(device=device, dtype=torch.bool),
        weights=_detached(_flat(weights, n, "weights")),
        sampled_ids=_flat(sampled_ids, n, "sampled_ids") if on_sampled else None,
        teacher_sampled_logprob=_flat(teacher_sampled_logprob, n, "teacher_sampled_logprob") if on_sampled else None,
        behavior_logprob=_flat(behavior_logprob, n, "behavior_logprob") if on_sampled else None,
        tail_logprob=None if on_sampled else _flat(tail_logprob, n, "tail_logprob"),
        entry_weights=_detached(_flat(entry_weights, n, "entry_weights", k)) if not on_sampled and k > 0 else None)
