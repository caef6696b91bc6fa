"""Sparse-teacher divergence kernels (design sections 6 and 7).

Public API:

    sparse_divergence(logits, topk_ids, topk_logprobs, mode, *, mask=None, sampled_ids=None,
                      teacher_sampled_logprob=None, behavior_logprob=None, weights=None,
                      backend="auto", inplace_grad=False, chunk_size=None, **mode_params) -> loss
    fused_linear_sparse_divergence(hidden, weight, topk_ids, topk_logprobs, mode, *, <same keywords>)
    MODES, MODE_PARAMS, PARAM_RANGES, check_mode_params, backend_for

The loss is per token (shape of logits without its last dim), float32 (float64 for float64 logits),
0 on masked rows. The gradient with respect to the logits (or hidden and weight) is computed in the
forward pass; backward only rescales it by grad_output (free when grad_output is all ones, e.g.
loss.sum(); fold token weights in with `weights=`). The teacher inputs get no gradient. The math
(every mode's gradient) is in kernels/MATH.md.
"""

from __future__ import annotations

from typing import Optional

import torch

from .modes import MODE_PARAMS, MODES, PARAM_RANGES, check_mode_params, kernel_mode
from . import reference as _ref

__all__ = [
    "sparse_divergence", "fused_linear_sparse_divergence", "MODES", "MODE_PARAMS", "PARAM_RANGES",
    "check_mode_params", "backend_for", "triton_available",
]

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # pragma: no cover - triton is a declared dependency
        return False


def backend_for(device: torch.device | str, backend: str = "auto") -> str:
    """The backend `sparse_divergence` uses for tensors on `device`: 'triton' or 'torch'.

    auto: Triton on CUDA when triton imports, otherwise the chunked PyTorch path. 'triton' on CPU runs
    Triton's interpreter (needs TRITON_INTERPRET=1 set before opd_kernels.triton_sparse is imported).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    dev = torch.device(device)
    return "triton" if dev.type == "cuda" and triton_available() else "torch"


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


class _Inputs:
    """Validated, flattened (2-D / 1-D) inputs shared by both entry points."""

    def __init__(self, n, device, topk_ids, topk_logprobs, mode, mask, sampled_ids, teacher_sampled_logprob,
                 behavior_logprob, weights, mode_params, tail_logprob=None, entry_weights=None):
        self.mode_id, self.cst = kernel_mode(mode, mode_params)
        if topk_ids is None or (torch.is_tensor(topk_ids) and topk_ids.numel() == 0 and n > 0):
            k = 0
            topk_ids = topk_logprobs = None
        else:
            k = topk_ids.shape[-1]
        self.k = k
        if mode != "pg" and k > 0:
            if topk_logprobs is None:
                raise ValueError("topk_logprobs is required with topk_ids")
            if topk_ids.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
            if topk_logprobs.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                raise TypeError(f"topk_logprobs must be a float tensor, got {topk_logprobs.dtype}")
            self.topk_ids = _flat(topk_ids, n, "topk_ids", k)
            self.topk_logprobs = _flat(topk_logprobs, n, "topk_logprobs", k)
        else:  # pg reads no top-k at all
            self.topk_ids = self.topk_logprobs = None
        sparse = mode != "pg"
        self.tail_logprob = _flat(tail_logprob, n, "tail_logprob") if sparse else None
        ew = _flat(entry_weights, n, "entry_weights", k) if sparse and k > 0 else None
        self.entry_weights = None if ew is None else ew.detach()
        if mode == "pg":
            if sampled_ids is None or teacher_sampled_logprob is None:
                raise ValueError("mode 'pg' needs sampled_ids and teacher_sampled_logprob")
        self.sampled_ids = _flat(sampled_ids, n, "sampled_ids") if mode == "pg" else None
        self.teacher_sampled_logprob = _flat(teacher_sampled_logprob, n, "teacher_sampled_logprob") \
            if mode == "pg" else None
        self.behavior_logprob = _flat(behavior_logprob, n, "behavior_logprob") if mode == "pg" else None
        keep = _flat(mask, n, "mask")
        self.keep = None if keep is None else keep.to(device=device, dtype=torch.bool)  # None: every row
        w = _flat(weights, n, "weights")
        self.weights = None if w is None else w.detach()


def sparse_divergence(
    logits: torch.Tensor,
    topk_ids: Optional[torch.Tensor],
    topk_logprobs: Optional[torch.Tensor],
    mode: str,
    *,
    mask: Optional[torch.Tensor] = None,
    sampled_ids: Optional[torch.Tensor] = None,
    teacher_sampled_logprob: Optional[torch.Tensor] = None,
    behavior_logprob: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    tail_logprob: Optional[torch.Tensor] = None,
    entry_weights: Optional[torch.Tensor] = None,
    backend: str = "auto",
    inplace_grad: bool = False,
    chunk_size: Optional[int] = None,
    **mode_params,
) -> torch.Tensor:
    """Per-token divergence between the student `logits` and a sparse (top-k) teacher.

    logits: [..., V] float32 / bfloat16 (float16, and float64 on the torch backend, also work).
    topk_ids: [..., k] int32/int64 teacher top-k token ids (distinct within a row; an id < 0 or >= V
        marks an empty slot); None or k = 0 allowed (pg needs none).
    topk_logprobs: [..., k] fp16/bf16/fp32 teacher log-probs of those ids (descending).
    mode: one of MODES; mode parameters as keywords (MODE_PARAMS lists them with defaults).
    mask: [...] bool, False rows get loss 0 and gradient 0 (and are not read by the Triton kernel).
    sampled_ids, teacher_sampled_logprob: [...] for pg: sampled token and the teacher's exact log-prob.
    behavior_logprob: [...] optional for pg: pi_ref log-prob at sampling time; enables the importance
        weight min(exp(log q(a) - behavior_logprob), is_clip) (stop-gradient).
    weights: [...] optional per-token weights (stop-gradient) folded into the loss and the gradient:
        returns weights * loss. Use it to average over tokens, so that backward sees grad_output == 1
        and costs nothing (loss.sum().backward()).
    tail_logprob: [...] optional teacher log-probability of the mass outside the row's ids, computed
        exactly at scoring time; without it the tail is rebuilt as 1 - sum exp(topk_logprobs), which
        loses nats when the tail is small (kernels/MATH.md §4).
    entry_weights: [..., k] optional importance weights (stop-gradient): the ids are then a weighted
        sample of the whole vocabulary and the loss is sum_j w_j l_j, an unbiased estimate of the
        full-vocabulary divergence, with no tail bucket (kernels/MATH.md §6).
    backend: 'auto' (Triton on CUDA, chunked PyTorch otherwise), 'triton' or 'torch'.
    inplace_grad: write the gradient into `logits` itself (no [N, V] allocation at all). The caller
        promises not to use the logits values afterwards, and that the op that produced them does not
        need them for its own backward (a matmul does not; a tanh soft-cap does).
    chunk_size: rows per chunk on the torch backend (default about 4M logits per chunk).

    Returns the per-token loss with shape logits.shape[:-1].
    """
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension")
    lead = logits.shape[:-1]
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    n = z.shape[0]
    inp = _Inputs(n, z.device, topk_ids, topk_logprobs, mode, mask, sampled_ids, teacher_sampled_logprob,
                  behavior_logprob, weights, mode_params, tail_logprob, entry_weights)
    be = backend_for(z.device, backend)
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    args = (inp.topk_ids, inp.topk_logprobs, inp.keep, inp.weights, inp.mode_id, inp.cst, inp.sampled_ids,
            inp.teacher_sampled_logprob, inp.behavior_logprob, inp.tail_logprob,
            inp.entry_weights)  # the order of both implementations
    if be == "triton":
        from . import triton_sparse as _tri
        if z.dtype == torch.float64:
            raise TypeError("the triton backend takes fp32/bf16/fp16 logits; use backend='torch' for float64")
        if need_grad:
            loss = _tri.SparseDivergenceTriton.apply(z, *args, bool(inplace_grad))
        else:
            loss, _ = _tri.sparse_divergence_fwd(z.detach(), *args, need_grad=False)
    else:
        if need_grad:
            loss = _ref.SparseDivergenceTorch.apply(z, *args, bool(inplace_grad), chunk_size, True)
        else:
            with torch.no_grad():
                loss = _ref.SparseDivergenceTorch.forward(_NoCtx(), z.detach(), *args, False, chunk_size, False)
    return loss.reshape(lead)


class _NoCtx:
    """Stand-in ctx for running a Function's forward without autograd."""

    def save_for_backward(self, *tensors):
        pass


def fused_linear_sparse_divergence(hidden, weight, topk_ids, topk_logprobs, mode, **kwargs):
    """See opd_kernels.fused_linear.fused_linear_sparse_divergence."""
    from .fused_linear import fused_linear_sparse_divergence as _f
    return _f(hidden, weight, topk_ids, topk_logprobs, mode, **kwargs)
