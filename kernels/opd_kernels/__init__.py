"""Sparse-teacher divergence kernels (design sections 6 and 7).

Public API:

    sparse_divergence(logits, topk_ids, topk_logprobs, mode, *, mask=None, sampled_ids=None,
                      teacher_sampled_logprob=None, behavior_logprob=None, weights=None,
                      backend="auto", inplace_grad=False, chunk_size=None, **mode_params) -> loss
    fused_linear_sparse_divergence(hidden, weight, topk_ids, topk_logprobs, mode, *, <same keywords>)
    MODES, MODE_PARAMS, KERNEL_MODES (one record per mode: modes.KernelMode), check_mode_params, backend_for
    KernelInputs: one call's validated inputs, as the implementations (reference, triton_sparse) take them

The loss is per token (shape of logits without its last dim), float32 (float64 for float64 logits),
0 on masked rows. The gradient with respect to the logits (or hidden and weight) is computed in the
forward pass; backward only rescales it by grad_output (free when grad_output is all ones, e.g.
loss.sum(); fold token weights in with `weights=`). The teacher inputs get no gradient. The math
(every mode's gradient) is in kernels/MATH.md.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .dispatch import BACKENDS, backend_for, triton_available
from .fused_linear import fused_linear_sparse_divergence
from .inputs import KernelInputs, kernel_inputs
from .modes import KERNEL_MODES, MODE_PARAMS, MODES, KernelMode, check_mode_params
from . import reference as _ref

__all__ = [
    "sparse_divergence", "fused_linear_sparse_divergence", "MODES", "MODE_PARAMS", "KERNEL_MODES", "KernelMode",
    "KernelInputs", "check_mode_params", "backend_for", "triton_available", "BACKENDS",
]


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
    inp = kernel_inputs(n, z.device, topk_ids, topk_logprobs, mode, mask=mask, sampled_ids=sampled_ids,
                        teacher_sampled_logprob=teacher_sampled_logprob, behavior_logprob=behavior_logprob,
                        weights=weights, tail_logprob=tail_logprob, entry_weights=entry_weights, **mode_params)
    be = backend_for(z.device, backend)
    if be == "triton":
        from . import triton_sparse as _tri
        if z.dtype == torch.float64:
            raise TypeError("the triton backend takes fp32/bf16/fp16 logits; use backend='torch' for float64")
        run = functools.partial(_tri.sparse_divergence_fwd, inp=inp, inplace_grad=bool(inplace_grad))
    else:
        run = functools.partial(_ref.sparse_divergence_chunked, inp=inp, inplace_grad=bool(inplace_grad),
                                chunk_size=chunk_size)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss = _ref.SavedGradient.apply(z, functools.partial(run, need_grad=True), bool(inplace_grad))
    else:
        with torch.no_grad():
            loss, _ = run(z.detach(), need_grad=False)
    return loss.reshape(lead)
