"""Fused lm_head + sparse divergence: hidden [N, H] and weight [V, H] in, per-token loss out.

The [N, V] logits are never materialised. Tokens are processed in chunks of C rows:

    logits_c = h_c @ W^T                      [C, V] in the compute dtype (hidden's dtype)
    loss_c, g_c = sparse divergence on logits_c, gradient written in place into logits_c
    grad_h[c] = g_c @ W                       [C, H]
    grad_W   += g_c^T @ h_c                   [V, H]

so the peak extra memory is one [C, V] chunk (plus, on the PyTorch path, a few float32 [C, V]
temporaries), grad_W and grad_h, instead of [N, V] logits and their gradient.

Gradient scaling. The gradients are computed in forward for grad_output == 1 (times the optional
`weights`). In backward:
  * grad_output uniform (loss.sum(), loss.mean(), any scalar times those): grad_h and grad_W are scaled
    by that scalar, which is exact; all ones costs nothing.
  * grad_output varying per token: grad_h is scaled row-wise (exact: row i of grad_h depends only on
    token i), and grad_W is recomputed chunk by chunk with the per-token scales folded in (one more
    pass of the two matmuls). Pass per-token weights through `weights=` instead to avoid that.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch.autograd.function import once_differentiable

from . import reference as _ref
from .dispatch import backend_for
from .inputs import KernelInputs, kernel_inputs

CUDA_CHUNK_ELEMS = 1 << 28  # about 512 MiB of bf16 logits per chunk (fewer passes over grad_W)
CPU_CHUNK_ELEMS = 1 << 22


def default_chunk_rows(n: int, vocab: int, device: torch.device) -> int:
    elems = CUDA_CHUNK_ELEMS if device.type == "cuda" else CPU_CHUNK_ELEMS
    rows = max(1, elems // max(vocab, 1))
    if rows >= 256:
        rows = rows // 128 * 128
    return max(1, min(n, rows))


def _fused_pass(h, W, inp: KernelInputs, need_gh, need_gw, gw_dtype, backend, chunk):
    """One chunked pass: loss [N] fp32 and the requested gradients (grad_W accumulated in gw_dtype)."""
    N, H = h.shape
    V = W.shape[0]
    loss = torch.empty(N, dtype=torch.float64 if h.dtype == torch.float64 else torch.float32, device=h.device)
    gh = torch.empty_like(h) if need_gh else None
    gw = torch.zeros(V, H, dtype=gw_dtype, device=h.device) if need_gw else None
    need_grad = need_gh or need_gw
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        h_c = h[s:e]
        logits_c = h_c @ W.t()
        rows = inp.rows(s, e)
        if backend == "triton":
            from . import triton_sparse as _tri
            loss_c, g_c = _tri.sparse_divergence_fwd(logits_c, rows, need_grad=need_grad, inplace_grad=True)
        else:
            direct = logits_c.dtype in (torch.float32, torch.float64)  # gradient built in logits_c
            loss_c, g_c = _ref.chunk_loss_grad(logits_c, rows, need_grad=need_grad, out=logits_c if direct else None)
            if g_c is not None:
                g_c = g_c.to(h.dtype)
        loss[s:e] = loss_c
        del logits_c
        if gh is not None:
            torch.matmul(g_c, W, out=gh[s:e])
        if gw is not None:
            if gw.dtype == g_c.dtype:
                gw.addmm_(g_c.t(), h_c)
            else:
                gw.addmm_(g_c.t().to(gw.dtype), h_c.to(gw.dtype))
        del g_c
    return loss, gh, gw


class FusedLinearSparseDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, inp, backend, chunk):
        W = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        need_gh, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.no_grad():
            loss, gh, gw = _fused_pass(hidden.detach(), W.detach(), inp, need_gh, need_gw, weight.dtype, backend,
                                       chunk)
        ctx.save_for_backward(hidden, weight, gh, gw)
        ctx.inp, ctx.backend, ctx.chunk = inp, backend, chunk
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        hidden, weight, gh, gw = ctx.saved_tensors
        g = grad_output.reshape(-1)
        uniform = g.numel() == 0 or g.stride(0) == 0 or bool((g == g[:1]).all())
        if uniform:
            s = float(g[0].item()) if g.numel() else 1.0
            if s != 1.0:  # out of place, so that backward can be repeated (retain_graph, gradcheck)
                gh = None if gh is None else gh * s
                gw = None if gw is None else gw * s
            return gh, gw, None, None, None
        if gh is not None:
            gh = (gh * g[:, None].to(torch.float64 if gh.dtype == torch.float64 else torch.float32)).to(gh.dtype)
        if gw is not None:
            inp = ctx.inp
            row_w = g.to(torch.float32) if inp.weights is None else inp.weights.to(torch.float32) * g
            W = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
            with torch.no_grad():
                _, _, gw = _fused_pass(hidden.detach(), W.detach(), dataclasses.replace(inp, weights=row_w), False,
                                       True, weight.dtype, ctx.backend, ctx.chunk)
        return gh, gw, None, None, None


def fused_linear_sparse_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: Optional[torch.Tensor],
    topk_logprobs: Optional[torch.Tensor],
    mode: str,
    *,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    **inputs: Any,
) -> torch.Tensor:
    """sparse_divergence(hidden @ weight.T, ...) without materialising the [N, V] logits.

    hidden: [..., H]; weight: [V, H] (the lm_head; no bias). Compute dtype is hidden's dtype (weight is
    cast to it if it differs). Returns the per-token loss, shape hidden.shape[:-1], float32. Gradients
    flow to hidden and weight; grad_weight is accumulated over chunks in weight's dtype (as Liger does).
    The other keywords (mask, weights, the pg inputs, tail_logprob, entry_weights, mode parameters) are
    those of `opd_kernels.sparse_divergence`, checked by `kernel_inputs`; `chunk_size` is the number of
    tokens per chunk (default: about 2**28 logits on CUDA, 2**22 on CPU).
    """
    lead = hidden.shape[:-1]
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be [V, {H}], got {tuple(weight.shape)}")
    h = hidden.reshape(-1, H)
    n = h.shape[0]
    inp = kernel_inputs(n, h.device, topk_ids, topk_logprobs, mode, **inputs)
    be = backend_for(h.device, backend)
    chunk = chunk_size or default_chunk_rows(n, weight.shape[0], h.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss = FusedLinearSparseDivergence.apply(h, weight, inp, be, chunk)
    else:
        W = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        with torch.no_grad():
            loss, _, _ = _fused_pass(h, W, inp, False, False, weight.dtype, be, chunk)
    return loss.reshape(lead)
