"""Chunked PyTorch implementation of the sparse-teacher divergences: the CPU path and the reference.

The loss of every mode depends on the student row z only through lse = logsumexp(z), the k gathered
logits z_S and the tail mass q_tail = 1 - sum_S q. Its gradient is therefore

    dL/dz_i = q_i * c               for i not in S   (one scalar c per row)
    dL/dz_j = u_j - q_j * G          for j in S       (k sparse values)

with u_o = Q_o * dL/dQ_o per outcome o of S + {tail}, G = sum_o u_o and c = u_tail / q_tail - G
(see kernels/MATH.md for the derivation and every mode's u). The forward pass computes the loss and this
gradient together, row chunk by row chunk, so the peak extra memory is a few [chunk, V] float32 buffers,
never [N, V] float32; the gradient is written into a buffer of the logits' dtype (or into the logits
themselves with `inplace_grad=True`), and backward only rescales it by grad_output.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .inputs import KernelInputs
from .modes import LOGP_MIN, MODE_ID, TAIL_EPS_FP32, TAIL_EPS_FP64

PG, FKL, RKL, JSD, SKEW_FKL, SKEW_RKL, TAID, ENTROPY_AWARE = (
    MODE_ID[m] for m in ("pg", "fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "taid", "entropy_aware"))

# Default number of rows per chunk: about 4M logits, i.e. 16 MiB per float32 [chunk, V] buffer.
DEFAULT_CHUNK_ELEMS = 1 << 22


def default_chunk_rows(n_rows: int, vocab: int) -> int:
    return max(1, min(n_rows, DEFAULT_CHUNK_ELEMS // max(vocab, 1)))


def _xdiff(a: torch.Tensor, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """a * (la - lb), defined as 0 where a == 0 (0 log 0 = 0)."""
    return torch.where(a > 0, a * (la - lb), torch.zeros_like(a))


def outcome_terms(lp, lq, p, q, mode: int, cst: Tuple[float, float, float, float], ea_alpha=None):
    """Per-outcome loss term l_o and u_o = Q_o * dL/dQ_o, elementwise over any shape.

    lp, lq: log P_o, log Q_o (finite); p, q: P_o, Q_o. cst: the constants of `modes.kernel_mode`.
    ea_alpha: per-row mixing weight for entropy_aware (broadcastable).
    """
    c0, c1, c2, _ = cst
    if mode == FKL:
        return _xdiff(p, lp, lq), -p
    if mode == RKL:
        return _xdiff(q, lq, lp), torch.where(q > 0, q * (lq - lp + 1.0), torch.zeros_like(q))
    if mode == JSD:
        beta, lb, l1b = c0, c1, c2
        lm = torch.logaddexp(lb + lp, l1b + lq)
        kq = _xdiff(q, lq, lm)
        return beta * _xdiff(p, lp, lm) + (1.0 - beta) * kq, (1.0 - beta) * kq
    if mode == SKEW_FKL:
        alpha, la, l1a = c0, c1, c2
        lm = torch.logaddexp(la + lp, l1a + lq)
        return _xdiff(p, lp, lm), -(1.0 - alpha) * torch.exp(lp + lq - lm)
    if mode == SKEW_RKL:
        alpha, la, l1a = c0, c1, c2
        lm = torch.logaddexp(la + lq, l1a + lp)
        u = torch.where(q > 0, q * (lq - lm + 1.0 - alpha * torch.exp(lq - lm)), torch.zeros_like(q))
        return _xdiff(q, lq, lm), u
    if mode == TAID:
        _, lt, l1t = c0, c1, c2
        lpt = torch.logaddexp(l1t + lq, lt + lp)
        pt = torch.exp(lpt)
        return _xdiff(pt, lpt, lq), -pt
    if mode == ENTROPY_AWARE:
        lf, uf = outcome_terms(lp, lq, p, q, FKL, cst)
        lr, ur = outcome_terms(lp, lq, p, q, RKL, cst)
        return (1.0 - ea_alpha) * lr + ea_alpha * lf, (1.0 - ea_alpha) * ur + ea_alpha * uf
    raise ValueError(f"bad mode id {mode}")


def chunk_loss_grad(
    z: torch.Tensor,
    inp: KernelInputs,
    need_grad: bool = True,
    out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Loss [C] and gradient [C, V] (compute dtype: float64 for float64 logits, else float32) of a chunk.

    inp: the chunk's C rows (`KernelInputs.rows`). Of its fields: keep, rows to compute (others get loss 0
    and gradient 0); weights multiply the loss and the gradient of each row; tail_logprob, the teacher's
    exact log-mass outside the stored ids (None: rebuilt as 1 - sum_S p, clamped); entry_weights, given,
    make the stored entries an importance sample of the whole vocabulary and the loss sum_j w_j l_j with
    no tail bucket (kernels/MATH.md §6). out: optional [C, V] buffer of the compute dtype to build the
    gradient in (it may be `z` itself: z is fully read before out is written).
    """
    mode, cst, keep, weights = inp.mode_id, inp.cst, inp.keep, inp.weights
    topk_ids, topk_logprobs, tail_logprob, entry_weights = (inp.topk_ids, inp.topk_logprobs, inp.tail_logprob,
                                                             inp.entry_weights)
    sampled_ids, teacher_sampled_logprob, behavior_logprob = (inp.sampled_ids, inp.teacher_sampled_logprob,
                                                              inp.behavior_logprob)
    cd = torch.float64 if z.dtype == torch.float64 else torch.float32
    C, V = z.shape
    zf = z.to(cd)
    lse = torch.logsumexp(zf, dim=-1)
    grad = None
    if mode == PG:
        tau = cst[0]
        a = sampled_ids.to(torch.long).clamp(0, V - 1)[:, None]
        lqa = zf.gather(1, a)[:, 0] - lse
        adv = (teacher_sampled_logprob.to(cd) - lqa).clamp(-tau, tau)
        if behavior_logprob is not None:
            # min(exp(x), is_clip) as exp(min(x, log is_clip)): no overflow
            adv = adv * torch.exp((lqa - behavior_logprob.to(cd)).clamp(max=cst[2]))
        loss = -adv * lqa
        if need_grad:
            grad = _softmax_into(zf, lse, out).mul_(adv[:, None])
            # dL/dz_a = adv * (q_a - 1): overwrite rather than add, to keep it exact.
            grad.scatter_(1, a, (adv * (torch.exp(lqa) - 1.0))[:, None])
    else:
        eps = TAIL_EPS_FP64 if cd == torch.float64 else TAIL_EPS_FP32
        if topk_ids is None or topk_ids.shape[1] == 0:
            ids = torch.zeros(C, 0, dtype=torch.long, device=z.device)
            lp_in = torch.zeros(C, 0, dtype=cd, device=z.device)
        else:
            ids = topk_ids.to(torch.long)
            lp_in = topk_logprobs.to(cd)
        valid = (ids >= 0) & (ids < V)
        idc = torch.where(valid, ids, torch.zeros_like(ids))
        zero = torch.zeros((), dtype=cd, device=z.device)
        lq = torch.where(valid, zf.gather(1, idc) - lse[:, None], zero)
        lp = torch.where(valid, lp_in.clamp(LOGP_MIN, 0.0), zero)
        q = torch.where(valid, torch.exp(lq), zero)
        p = torch.where(valid, torch.exp(lp), zero)
        q_raw = 1.0 - q.sum(1)
        if tail_logprob is None:
            pt = (1.0 - p.sum(1)).clamp(min=eps)
            lpt = torch.log(pt)
        else:  # stored exactly at scoring time: no cancellation, no floor but LOGP_MIN
            lpt = tail_logprob.to(cd).clamp(LOGP_MIN, 0.0)
            pt = torch.exp(lpt)
        qt = q_raw.clamp(min=eps)
        lqt = torch.log(qt)
        # Sampled entries carry importance weights and estimate the whole vocabulary: no tail bucket.
        # Neither when the row stores every id of the vocabulary (k = V): the tail holds no outcome, and the
        # student's complement there is rounding noise (kernels/MATH.md §4).
        ew = torch.ones_like(lp) if entry_weights is None else torch.where(valid, entry_weights.to(cd), zero)
        wt = torch.where(valid.sum(1) < V, 1.0, 0.0).to(cd) if entry_weights is None else torch.zeros_like(lse)
        ea = None
        if mode == ENTROPY_AWARE:
            h, s = cst[0], cst[1]
            ent = -(torch.where(valid, ew * p * lp, zero)).sum(1) - wt * pt * lpt
            ea = torch.sigmoid((ent - h) / s)
        ell_s, u_s = outcome_terms(lp, lq, p, q, mode, cst, None if ea is None else ea[:, None])
        ell_s = torch.where(valid, ew * ell_s, zero)
        u_s = torch.where(valid, ew * u_s, zero)
        ell_t, u_t = outcome_terms(lpt, lqt, pt, qt, mode, cst, ea)
        loss = ell_s.sum(1) + wt * ell_t
        if need_grad:
            live = q_raw >= eps  # a clamped tail is a constant: no gradient through it
            g_t = torch.where(live, wt * u_t / qt, zero)
            G = u_s.sum(1) + torch.where(live, wt * u_t, zero)
            c = g_t - G
            grad = _softmax_into(zf, lse, out).mul_(c[:, None])
            if ids.shape[1]:
                vals = u_s - q * G[:, None]
                rr, kk = valid.nonzero(as_tuple=True)
                grad[rr, idc[rr, kk]] = vals[rr, kk]
    if weights is not None:
        loss = loss * weights.to(cd)
        if grad is not None:
            grad.mul_(weights.to(cd)[:, None])
    if keep is not None:
        loss = torch.where(keep, loss, torch.zeros_like(loss))  # where, not *: masked rows may hold NaN
        if grad is not None:
            grad.masked_fill_(~keep[:, None], 0.0)
    return loss, grad


def _softmax_into(zf: torch.Tensor, lse: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """exp(zf - lse[:, None]) with one [C, V] buffer (out if given)."""
    if out is None:
        return torch.sub(zf, lse[:, None]).exp_()
    return torch.sub(zf, lse[:, None], out=out).exp_()


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor, inplace: bool) -> Tuple[torch.Tensor, bool]:
    """Multiply the precomputed [N, V] gradient row-wise by grad_output [N]: (result, modified grad?).

    grad_output all ones (loss.sum().backward()) returns `grad` itself: no pass over memory. Otherwise
    one multiply, in place when `inplace` (the caller gave up the buffer with inplace_grad=True),
    else into a new tensor so that backward can be repeated (retain_graph, gradcheck). One device sync.
    """
    g = grad_output.reshape(-1)
    if g.numel() == 0:
        return grad, False
    first = g[:1]
    if g.stride(0) == 0 or bool((g == first).all()):
        s = float(first.item())
        if s == 1.0:
            return grad, False
        return (grad.mul_(s), True) if inplace else (grad * s, False)
    col = g[:, None].to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    return (grad.mul_(col), True) if inplace else ((grad * col).to(grad.dtype), False)


def sparse_divergence_chunked(logits: torch.Tensor, inp: KernelInputs, need_grad: bool = True,
                              inplace_grad: bool = False,
                              chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The PyTorch path on 2-D logits and their `inp`, chunk by chunk: (loss [N], grad [N, V] logits dtype or None)."""
    N, V = logits.shape
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(N, dtype=out_dtype, device=logits.device)
    grad = None
    if need_grad:
        grad = logits if inplace_grad else torch.empty_like(logits)
    chunk = chunk_size or default_chunk_rows(N, V)
    with torch.no_grad():
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            # build the gradient directly in the output when it has the compute dtype (fp32, fp64)
            direct = grad is not None and grad.dtype == out_dtype
            ls, gs = chunk_loss_grad(logits[s:e], inp.rows(s, e), need_grad, out=grad[s:e] if direct else None)
            loss[s:e] = ls
            if gs is not None and not direct:
                grad[s:e].copy_(gs)
    return loss, grad


class SavedGradient(torch.autograd.Function):
    """Autograd of either implementation (`opd_kernels.sparse_divergence` picks one): `loss_and_grad(logits)`
    computes the loss and its gradient together in forward; backward only rescales the saved gradient by
    grad_output (`scale_saved_grad`). Only the logits get a gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor,
                loss_and_grad: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]], inplace_grad: bool):
        loss, grad = loss_and_grad(logits.detach())
        ctx.save_for_backward(grad.detach())
        ctx.inplace, ctx.consumed = bool(inplace_grad), False
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError("sparse_divergence(inplace_grad=True): backward ran already and rescaled the "
                               "gradient in place; it cannot run again")
        (grad,) = ctx.saved_tensors
        out, ctx.consumed = scale_saved_grad(grad, grad_output, ctx.inplace)
        return out, None, None
