"""Triton kernel for the sparse-teacher divergences: loss and gradient in one launch.

One program handles one row at a time (a persistent grid loops over rows):

1. pass 1 reads the row once and keeps an online log-sum-exp (running max per block, per-lane sums),
2. it gathers the k student logits z_S (and, for `pg`, the sampled logit), computes the loss of the
   k+1 outcomes S + {tail}, u_o = Q_o dL/dQ_o, and the row scalar c (kernels/MATH.md),
3. pass 2 reads the row again, back to front so that the most recently read blocks (still in L2) come
   first, and writes grad_i = q_i * c in the gradient's dtype (the logits buffer itself with
   inplace_grad=True), then, after a block barrier, overwrites the k entries of S with u_j - q_j * G.

No [N, V] float32 temporary exists; backward only rescales the saved gradient by grad_output (free when
grad_output is all ones, as with loss.sum()).

On CPU the kernel runs in Triton's interpreter: set TRITON_INTERPRET=1 before this module is imported.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .modes import LOGP_MIN, MODE_ID, TAIL_EPS_FP32
from .reference import run_backward

PG = tl.constexpr(MODE_ID["pg"])
FKL = tl.constexpr(MODE_ID["fkl"])
RKL = tl.constexpr(MODE_ID["rkl"])
JSD = tl.constexpr(MODE_ID["jsd"])
SKEW_FKL = tl.constexpr(MODE_ID["skew_fkl"])
SKEW_RKL = tl.constexpr(MODE_ID["skew_rkl"])
TAID = tl.constexpr(MODE_ID["taid"])
ENTROPY_AWARE = tl.constexpr(MODE_ID["entropy_aware"])

MAX_K = 256


def is_interpreted() -> bool:
    """True when this module's kernels were built for Triton's CPU interpreter."""
    return not isinstance(_sparse_div_kernel, triton.runtime.jit.JITFunction)


@triton.jit
def _lae(a, b):
    """log(exp(a) + exp(b)) for finite a, b."""
    mx = tl.maximum(a, b)
    return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))


@triton.jit
def _xdiff(a, la, lb):
    """a * (la - lb), 0 where a == 0."""
    return tl.where(a > 0, a * (la - lb), 0.0)


@triton.jit
def _outcome(lp, lq, p, q, c0, c1, c2, ea, MODE: tl.constexpr):
    """Per-outcome loss term and u = Q * dL/dQ (see kernels/MATH.md), fp32."""
    if MODE == FKL:
        ell = _xdiff(p, lp, lq)
        u = -p
    elif MODE == RKL:
        ell = _xdiff(q, lq, lp)
        u = tl.where(q > 0, q * (lq - lp + 1.0), 0.0)
    elif MODE == JSD:
        lm = _lae(c1 + lp, c2 + lq)
        kq = _xdiff(q, lq, lm)
        ell = c0 * _xdiff(p, lp, lm) + (1.0 - c0) * kq
        u = (1.0 - c0) * kq
    elif MODE == SKEW_FKL:
        lm = _lae(c1 + lp, c2 + lq)
        ell = _xdiff(p, lp, lm)
        u = -(1.0 - c0) * tl.exp(lp + lq - lm)
    elif MODE == SKEW_RKL:
        lm = _lae(c1 + lq, c2 + lp)
        ell = _xdiff(q, lq, lm)
        u = tl.where(q > 0, q * (lq - lm + 1.0 - c0 * tl.exp(lq - lm)), 0.0)
    elif MODE == TAID:
        lpt = _lae(c2 + lq, c1 + lp)
        pt = tl.exp(lpt)
        ell = _xdiff(pt, lpt, lq)
        u = -pt
    else:  # ENTROPY_AWARE: (1 - ea) * RKL + ea * FKL
        ell = (1.0 - ea) * _xdiff(q, lq, lp) + ea * _xdiff(p, lp, lq)
        u = (1.0 - ea) * tl.where(q > 0, q * (lq - lp + 1.0), 0.0) - ea * p
    return ell, u


@triton.jit
def _sparse_div_kernel(
    z_ptr, stride_z, g_ptr, stride_g,
    ids_ptr, stride_ids, lp_ptr, stride_lp,
    keep_ptr, w_ptr, samp_ptr, tlp_ptr, blp_ptr, loss_ptr,
    N, V, K,
    c0, c1, c2, tail_eps, logp_min,
    MODE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, HAS_BEHAVIOR: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_V)
    nblk = tl.cdiv(V, BLOCK_V)
    for row32 in range(pid, N, nprog):
        row = tl.cast(row32, tl.int64)
        z_row = z_ptr + row * stride_z
        g_row = g_ptr + row * stride_g
        keep = tl.load(keep_ptr + row)
        if keep != 0:
            w = tl.load(w_ptr + row).to(tl.float32)
            if MODE == PG:
                a = tl.load(samp_ptr + row).to(tl.int64)
                a = tl.minimum(tl.maximum(a, 0), V - 1)
                za = tl.load(z_row + a).to(tl.float32)
            else:
                ks = tl.arange(0, BLOCK_K)
                ids = tl.load(ids_ptr + row * stride_ids + ks, mask=ks < K, other=-1).to(tl.int64)
                valid = (ks < K) & (ids >= 0) & (ids < V)
                ids_c = tl.where(valid, ids, 0)
                zs = tl.load(z_row + ids_c, mask=valid, other=0.0).to(tl.float32)
                lp_raw = tl.load(lp_ptr + row * stride_lp + ks, mask=valid, other=0.0).to(tl.float32)
            # ---- pass 1: online log-sum-exp; one block-max reduction per block, per-lane sums.
            # The next block is loaded before the current one is reduced (manual prefetch).
            m = float("-inf")
            s_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
            x_next = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            for b in range(0, nblk):
                x = x_next
                cols_n = (b + 1) * BLOCK_V + offs
                x_next = tl.load(z_row + cols_n, mask=cols_n < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s_vec = s_vec * tl.exp(m - m_safe) + tl.exp(x - m_safe)
                m = m_new
            lse = m + tl.log(tl.sum(s_vec, 0))
            # ---- the k+1 outcomes
            if MODE == PG:
                lqa = za - lse
                tlp = tl.load(tlp_ptr + row).to(tl.float32)
                adv = tl.minimum(tl.maximum(tlp - lqa, -c0), c0)
                if HAS_BEHAVIOR:
                    blp = tl.load(blp_ptr + row).to(tl.float32)
                    adv = adv * tl.exp(tl.minimum(lqa - blp, c2))  # min(ratio, is_clip)
                loss = -adv * lqa
                c = adv
            else:
                lq = tl.where(valid, zs - lse, 0.0)
                lp = tl.where(valid, tl.minimum(tl.maximum(lp_raw, logp_min), 0.0), 0.0)
                q = tl.where(valid, tl.exp(lq), 0.0)
                p = tl.where(valid, tl.exp(lp), 0.0)
                p_raw = 1.0 - tl.sum(p, 0)
                q_raw = 1.0 - tl.sum(q, 0)
                pt = tl.maximum(p_raw, tail_eps)
                qt = tl.maximum(q_raw, tail_eps)
                lpt = tl.log(pt)
                lqt = tl.log(qt)
                ea = 0.0
                if MODE == ENTROPY_AWARE:
                    ent = -tl.sum(tl.where(valid, p * lp, 0.0), 0) - pt * lpt
                    ea = 1.0 / (1.0 + tl.exp(-(ent - c0) / c1))
                ell_s, u_s = _outcome(lp, lq, p, q, c0, c1, c2, ea, MODE)
                ell_s = tl.where(valid, ell_s, 0.0)
                u_s = tl.where(valid, u_s, 0.0)
                ell_t, u_t = _outcome(lpt, lqt, pt, qt, c0, c1, c2, ea, MODE)
                loss = tl.sum(ell_s, 0) + ell_t
                live = q_raw >= tail_eps
                g_t = tl.where(live, u_t / qt, 0.0)
                G = tl.sum(u_s, 0) + tl.where(live, u_t, 0.0)
                c = g_t - G
            tl.store(loss_ptr + row, loss * w)
            if COMPUTE_GRAD:
                cw = c * w
                # every thread's gathers are done before any gradient store (inplace_grad aliasing)
                tl.debug_barrier()
                # ---- pass 2, back to front: grad = exp(z - lse) * c
                for b in range(0, nblk):
                    cols = (nblk - 1 - b) * BLOCK_V + offs
                    msk = cols < V
                    x = tl.load(z_row + cols, mask=msk, other=float("-inf")).to(tl.float32)
                    g = tl.exp(x - lse) * cw
                    tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=msk)
                tl.debug_barrier()
                # ---- sparse entries overwrite the base value
                if MODE == PG:
                    ga = adv * (tl.exp(lqa) - 1.0) * w
                    tl.store(g_row + a, ga.to(g_ptr.dtype.element_ty))
                else:
                    gs = (u_s - q * G) * w
                    tl.store(g_row + ids_c, gs.to(g_ptr.dtype.element_ty), mask=valid)
                tl.debug_barrier()
        else:
            tl.store(loss_ptr + row, 0.0)
            if COMPUTE_GRAD:
                zeros = tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty)
                for b in range(0, nblk):
                    cols = b * BLOCK_V + offs
                    tl.store(g_row + cols, zeros, mask=cols < V)


_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def default_config(V: int, dtype: torch.dtype, device: torch.device) -> Tuple[int, int, int]:
    """(BLOCK_V, num_warps, programs) for a row of V logits of `dtype`.

    Overridable with OPD_SPARSE_BLOCK_V / OPD_SPARSE_WARPS / OPD_SPARSE_PROGS_PER_SM (benchmarks).
    """
    if device.type != "cuda":  # interpreter: big blocks mean few Python-level steps
        return min(triton.next_power_of_2(V), 1024), 1, 1 << 30
    block = int(os.environ.get("OPD_SPARSE_BLOCK_V", 4096 if dtype.itemsize <= 2 else 2048))
    block = min(block, triton.next_power_of_2(V))
    warps = int(os.environ.get("OPD_SPARSE_WARPS", 8))
    per_sm = int(os.environ.get("OPD_SPARSE_PROGS_PER_SM", 2))
    return block, warps, _sm_count(device) * per_sm


def sparse_divergence_fwd(
    logits: torch.Tensor,
    topk_ids: Optional[torch.Tensor],
    topk_logprobs: Optional[torch.Tensor],
    keep: torch.Tensor,
    weights: Optional[torch.Tensor],
    mode: int,
    cst: Tuple[float, float, float, float],
    sampled_ids: Optional[torch.Tensor] = None,
    teacher_sampled_logprob: Optional[torch.Tensor] = None,
    behavior_logprob: Optional[torch.Tensor] = None,
    need_grad: bool = True,
    inplace_grad: bool = False,
    block_v: Optional[int] = None,
    num_warps: Optional[int] = None,
    programs: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the kernel on 2-D inputs; returns (loss [N] fp32, grad [N, V] logits dtype or None)."""
    if logits.device.type != "cuda" and not is_interpreted():
        raise RuntimeError("the Triton backend on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                           "before kernels.triton_sparse is imported (use backend='torch' on CPU)")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"triton backend: logits must be fp32, bf16 or fp16, got {logits.dtype}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    N, V = logits.shape
    dev = logits.device
    loss = torch.empty(N, dtype=torch.float32, device=dev)
    grad = None
    if need_grad:
        grad = logits if inplace_grad else torch.empty_like(logits)
    if N == 0:
        return loss, grad
    bv, nw, progs = default_config(V, logits.dtype, dev)
    bv = block_v or bv
    nw = num_warps or nw
    progs = min(N, programs or progs)
    if mode == MODE_ID["pg"] or topk_ids is None:
        K = 0
        ids = torch.zeros(1, dtype=torch.int32, device=dev)
        lps = torch.zeros(1, dtype=torch.float32, device=dev)
        s_ids = s_lp = 0
    else:
        K = topk_ids.shape[1]
        if K > MAX_K:
            raise ValueError(f"triton backend supports k <= {MAX_K}, got {K}")
        ids, lps = topk_ids, topk_logprobs
        s_ids, s_lp = ids.stride(0), lps.stride(0)
        if K and (ids.stride(1) != 1 or lps.stride(1) != 1):
            ids, lps = ids.contiguous(), lps.contiguous()
            s_ids, s_lp = ids.stride(0), lps.stride(0)
    block_k = max(triton.next_power_of_2(max(K, 1)), 2)
    w = torch.ones(N, dtype=torch.float32, device=dev) if weights is None else weights.to(torch.float32).contiguous()
    dummy = loss  # never read when unused
    samp = sampled_ids.contiguous() if sampled_ids is not None else dummy
    tlp = teacher_sampled_logprob.contiguous() if teacher_sampled_logprob is not None else dummy
    blp = behavior_logprob.contiguous() if behavior_logprob is not None else dummy
    g = grad if grad is not None else logits
    _sparse_div_kernel[(progs,)](
        logits, logits.stride(0), g, g.stride(0),
        ids, s_ids, lps, s_lp,
        keep.to(torch.int8).contiguous(), w, samp, tlp, blp, loss,
        N, V, K,
        float(cst[0]), float(cst[1]), float(cst[2]), TAIL_EPS_FP32, LOGP_MIN,
        MODE=mode, BLOCK_V=bv, BLOCK_K=block_k,
        COMPUTE_GRAD=need_grad, HAS_BEHAVIOR=behavior_logprob is not None,
        num_warps=nw,
    )
    return loss, grad


class SparseDivergenceTriton(torch.autograd.Function):
    """Autograd function over 2-D inputs; the public wrapper is `kernels.sparse_divergence`."""

    @staticmethod
    def forward(ctx, logits, topk_ids, topk_logprobs, keep, weights, mode, cst, sampled_ids,
                teacher_sampled_logprob, behavior_logprob, inplace_grad):
        loss, grad = sparse_divergence_fwd(
            logits.detach(), topk_ids, topk_logprobs, keep, weights, mode, cst, sampled_ids,
            teacher_sampled_logprob, behavior_logprob, need_grad=True, inplace_grad=inplace_grad)
        ctx.save_for_backward(grad.detach())
        ctx.inplace, ctx.consumed = bool(inplace_grad), False
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        return (run_backward(ctx, grad_output),) + (None,) * 10
