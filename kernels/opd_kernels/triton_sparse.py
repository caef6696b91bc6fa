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

from .inputs import KernelInputs
from .modes import LOGP_MIN, MODE_ID, TAIL_EPS_FP32

PG = tl.constexpr(MODE_ID["pg"])
FKL = tl.constexpr(MODE_ID["fkl"])
RKL = tl.constexpr(MODE_ID["rkl"])
JSD = tl.constexpr(MODE_ID["jsd"])
SKEW_FKL = tl.constexpr(MODE_ID["skew_fkl"])
SKEW_RKL = tl.constexpr(MODE_ID["skew_rkl"])
TAID = tl.constexpr(MODE_ID["taid"])
ENTROPY_AWARE = tl.constexpr(MODE_ID["entropy_aware"])

MAX_K = 256
MAX_SEGMENTS = 64  # coop kernel: at most this many programs cooperate on one row


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
def _row_terms(lse, zs, lp_raw, valid, za, tlp, blp, tail_lp, ew, V, c0, c1, c2, tail_eps, logp_min,
               MODE: tl.constexpr, HAS_BEHAVIOR: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_EW: tl.constexpr):
    """Loss and gradient pieces of one row given its log-sum-exp (kernels/MATH.md).

    HAS_TAIL: tail_lp is the teacher's exact tail log-mass (else rebuilt from the entries). HAS_EW: the
    entries carry importance weights ew and the tail bucket is left out (MATH.md §6). A row that stores
    all V ids has an empty tail: no tail bucket either (MATH.md §4).

    Returns (loss, c, u_s, q, G, adv, lqa): the gradient is q_i * c off S, u_j - q_j * G on S, and for pg
    adv * (q_a - 1) at the sampled token a (u_s, q, G unused for pg; adv, lqa unused otherwise).
    """
    if MODE == PG:
        lqa = za - lse
        adv = tl.minimum(tl.maximum(tlp - lqa, -c0), c0)
        if HAS_BEHAVIOR:
            adv = adv * tl.exp(tl.minimum(lqa - blp, c2))  # min(ratio, is_clip)
        loss = -adv * lqa
        c = adv
        u_s = zs
        q = zs
        G = adv
    else:
        lq = tl.where(valid, zs - lse, 0.0)
        lp = tl.where(valid, tl.minimum(tl.maximum(lp_raw, logp_min), 0.0), 0.0)
        q = tl.where(valid, tl.exp(lq), 0.0)
        p = tl.where(valid, tl.exp(lp), 0.0)
        q_raw = 1.0 - tl.sum(q, 0)
        if HAS_TAIL:
            lpt = tl.minimum(tl.maximum(tail_lp, logp_min), 0.0)
            pt = tl.exp(lpt)
        else:
            pt = tl.maximum(1.0 - tl.sum(p, 0), tail_eps)
            lpt = tl.log(pt)
        qt = tl.maximum(q_raw, tail_eps)
        lqt = tl.log(qt)
        if HAS_EW:
            w_s = tl.where(valid, ew, 0.0)
            wt = 0.0
        else:
            w_s = tl.where(valid, 1.0, 0.0)
            wt = tl.where(tl.sum(valid.to(tl.int32), 0) < V, 1.0, 0.0)
        ea = 0.0
        if MODE == ENTROPY_AWARE:
            ent = -tl.sum(w_s * p * lp, 0) - wt * pt * lpt
            ea = 1.0 / (1.0 + tl.exp(-(ent - c0) / c1))
        ell_s, u_s = _outcome(lp, lq, p, q, c0, c1, c2, ea, MODE)
        ell_s = tl.where(valid, w_s * ell_s, 0.0)
        u_s = tl.where(valid, w_s * u_s, 0.0)
        ell_t, u_t = _outcome(lpt, lqt, pt, qt, c0, c1, c2, ea, MODE)
        loss = tl.sum(ell_s, 0) + wt * ell_t
        live = q_raw >= tail_eps  # a clamped tail is a constant: no gradient through it
        g_t = tl.where(live, wt * u_t / qt, 0.0)
        G = tl.sum(u_s, 0) + tl.where(live, wt * u_t, 0.0)
        c = g_t - G
        adv = c
        lqa = c
    return loss, c, u_s, q, G, adv, lqa


@triton.jit
def _tail_and_weights(tail_ptr, ew_ptr, stride_ew, row, ks, kmask, HAS_TAIL: tl.constexpr, HAS_EW: tl.constexpr):
    """The row's optional exact tail log-mass and per-entry importance weights (0.0 when absent)."""
    tail_lp = 0.0
    if HAS_TAIL:
        tail_lp = tl.load(tail_ptr + row).to(tl.float32)
    ew = 0.0
    if HAS_EW:
        ew = tl.load(ew_ptr + row * stride_ew + ks, mask=kmask, other=0.0).to(tl.float32)
    return tail_lp, ew


@triton.jit
def _sparse_div_kernel(
    z_ptr, stride_z, g_ptr, stride_g,
    ids_ptr, stride_ids, lp_ptr, stride_lp,
    keep_ptr, w_ptr, samp_ptr, tlp_ptr, blp_ptr, tail_ptr, ew_ptr, stride_ew, loss_ptr,
    N, V, K,
    c0, c1, c2, tail_eps, logp_min,
    MODE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, HAS_BEHAVIOR: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_EW: tl.constexpr,
    EV1: tl.constexpr, EV2: tl.constexpr,
):
    # EV1 / EV2: L2 eviction hints for pass 1 loads / pass 2 loads and stores ("evict_last" keeps the
    # row in L2 for the second read, "evict_first" streams).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_V)
    nblk = tl.cdiv(V, BLOCK_V)
    for row32 in range(pid, N, nprog):
        row = tl.cast(row32, tl.int64)
        z_row = z_ptr + row * stride_z
        g_row = g_ptr + row * stride_g
        if HAS_MASK:
            keep = tl.load(keep_ptr + row)
        else:
            keep = 1
        if keep != 0:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + row).to(tl.float32)
            else:
                w = 1.0
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
                tail_lp, ew = _tail_and_weights(tail_ptr, ew_ptr, stride_ew, row, ks, valid, HAS_TAIL, HAS_EW)
            # ---- pass 1: online log-sum-exp; one block-max reduction per block, per-lane sums.
            # The next block is loaded before the current one is reduced (manual prefetch).
            m = float("-inf")
            s_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
            x_next = tl.load(z_row + offs, mask=offs < V, other=float("-inf"), eviction_policy=EV1).to(tl.float32)
            for b in range(0, nblk):
                x = x_next
                cols_n = (b + 1) * BLOCK_V + offs
                x_next = tl.load(z_row + cols_n, mask=cols_n < V, other=float("-inf"),
                                 eviction_policy=EV1).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s_vec = s_vec * tl.exp(m - m_safe) + tl.exp(x - m_safe)
                m = m_new
            lse = m + tl.log(tl.sum(s_vec, 0))
            if MODE == PG:
                tlp = tl.load(tlp_ptr + row).to(tl.float32)
                blp = 0.0
                if HAS_BEHAVIOR:
                    blp = tl.load(blp_ptr + row).to(tl.float32)
                loss, c, u_s, q, G, adv, lqa = _row_terms(lse, za, za, za, za, tlp, blp, za, za, V, c0, c1, c2,
                                                          tail_eps, logp_min, MODE, HAS_BEHAVIOR, False, False)
            else:
                loss, c, u_s, q, G, adv, lqa = _row_terms(lse, zs, lp_raw, valid, 0.0, 0.0, 0.0, tail_lp, ew, V, c0,
                                                          c1, c2, tail_eps, logp_min, MODE, HAS_BEHAVIOR, HAS_TAIL,
                                                          HAS_EW)
            tl.store(loss_ptr + row, loss * w)
            if COMPUTE_GRAD:
                cw = c * w
                # every thread's gathers are done before any gradient store (inplace_grad aliasing)
                tl.debug_barrier()
                # ---- pass 2, back to front: grad = exp(z - lse) * c
                for b in range(0, nblk):
                    cols = (nblk - 1 - b) * BLOCK_V + offs
                    msk = cols < V
                    x = tl.load(z_row + cols, mask=msk, other=float("-inf"), eviction_policy=EV2).to(tl.float32)
                    g = tl.exp(x - lse) * cw
                    tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=msk, eviction_policy=EV2)
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


@triton.jit
def _sparse_div_coop_kernel(
    z_ptr, stride_z, g_ptr, stride_g,
    ids_ptr, stride_ids, lp_ptr, stride_lp,
    keep_ptr, w_ptr, samp_ptr, tlp_ptr, blp_ptr, tail_ptr, ew_ptr, stride_ew, loss_ptr,
    pm_ptr, ps_ptr, zs_ptr, cnt_ptr, work_ptr,
    N, V, K, G,
    c0, c1, c2, tail_eps, logp_min,
    MODE: tl.constexpr, SEG: tl.constexpr, BLOCK_K: tl.constexpr, GMAX: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, HAS_BEHAVIOR: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_TAIL: tl.constexpr, HAS_EW: tl.constexpr,
):
    """CUDA only: each row is split into G segments of SEG logits, one work item each; the segment stays
    in registers, so the logits are read from memory once. The G programs of a row exchange their partial
    (max, sum exp) and gathered logits through small scratch buffers and a per-row arrival counter.

    Work items are taken in order from an atomic counter, so a program only ever waits for items that
    running programs hold or that the next free program takes: no deadlock as long as G programs can
    be resident at once (G <= 64 here, against >= one program per SM). Not for the interpreter (it runs
    programs one after another).
    """
    offs = tl.arange(0, SEG)
    ks = tl.arange(0, BLOCK_K)
    gs_ = tl.arange(0, GMAX)
    total = N * G
    item = tl.atomic_add(work_ptr, 1)
    while item < total:
        row = (item // G).to(tl.int64)
        seg = item % G
        start = seg * SEG
        cols = start + offs
        msk = cols < V
        z_row = z_ptr + row * stride_z
        g_row = g_ptr + row * stride_g
        if HAS_MASK:
            keep = tl.load(keep_ptr + row)
        else:
            keep = 1
        if keep != 0:
            # the loads that only depend on the row are issued first, together
            if MODE == PG:
                a = tl.load(samp_ptr + row).to(tl.int64)
            else:
                ids = tl.load(ids_ptr + row * stride_ids + ks, mask=ks < K, other=-1).to(tl.int64)
                lp_raw = tl.load(lp_ptr + row * stride_lp + ks, mask=ks < K, other=0.0).to(tl.float32)
                tail_lp, ew = _tail_and_weights(tail_ptr, ew_ptr, stride_ew, row, ks, ks < K, HAS_TAIL, HAS_EW)
            if HAS_WEIGHT:
                w = tl.load(w_ptr + row).to(tl.float32)
            else:
                w = 1.0
            x = tl.load(z_row + cols, mask=msk, other=float("-inf")).to(tl.float32)
            # this segment's share of the gathered logits, published before arrival (so that with
            # inplace_grad no program overwrites a logit another one still has to gather)
            if MODE == PG:
                a = tl.minimum(tl.maximum(a, 0), V - 1)
                mine_a = (a >= start) & (a < start + SEG)
                za_own = tl.load(z_row + a, mask=mine_a, other=0.0).to(tl.float32)
                tl.store(zs_ptr + row * BLOCK_K, za_own, mask=mine_a)
            else:
                valid = (ks < K) & (ids >= 0) & (ids < V)
                ids_c = tl.where(valid, ids, 0)
                mine = valid & (ids_c >= start) & (ids_c < start + SEG)
                z_own = tl.load(z_row + ids_c, mask=mine, other=0.0).to(tl.float32)
                tl.store(zs_ptr + row * BLOCK_K + ks, z_own, mask=mine)
            m_loc = tl.max(x, 0)
            m_safe = tl.where(m_loc == float("-inf"), 0.0, m_loc)
            s_loc = tl.sum(tl.exp(x - m_safe), 0)
            tl.store(pm_ptr + row * G + seg, m_loc)
            tl.store(ps_ptr + row * G + seg, s_loc)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + row, 1, sem="release") + 1
            while arrived < G:
                arrived = tl.atomic_add(cnt_ptr + row, 0, sem="acquire")
            tl.debug_barrier()
            pm = tl.load(pm_ptr + row * G + gs_, mask=gs_ < G, other=float("-inf"), cache_modifier=".cg")
            ps = tl.load(ps_ptr + row * G + gs_, mask=gs_ < G, other=0.0, cache_modifier=".cg")
            mx = tl.max(pm, 0)
            mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
            lse = mx_safe + tl.log(tl.sum(ps * tl.exp(pm - mx_safe), 0))
            if MODE == PG:
                za = tl.load(zs_ptr + row * BLOCK_K, cache_modifier=".cg")
                tlp = tl.load(tlp_ptr + row).to(tl.float32)
                blp = 0.0
                if HAS_BEHAVIOR:
                    blp = tl.load(blp_ptr + row).to(tl.float32)
                loss, c, u_s, q, Gs, adv, lqa = _row_terms(lse, za, za, za, za, tlp, blp, za, za, V, c0, c1, c2,
                                                           tail_eps, logp_min, MODE, HAS_BEHAVIOR, False, False)
            else:
                zs = tl.load(zs_ptr + row * BLOCK_K + ks, mask=valid, other=0.0, cache_modifier=".cg")
                loss, c, u_s, q, Gs, adv, lqa = _row_terms(lse, zs, lp_raw, valid, 0.0, 0.0, 0.0, tail_lp, ew, V, c0,
                                                           c1, c2, tail_eps, logp_min, MODE, HAS_BEHAVIOR, HAS_TAIL,
                                                           HAS_EW)
            if seg == 0:
                tl.store(loss_ptr + row, loss * w)
            if COMPUTE_GRAD:
                g = tl.exp(x - lse) * (c * w)
                tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=msk)
                tl.debug_barrier()
                if MODE == PG:
                    ga = adv * (tl.exp(lqa) - 1.0) * w
                    tl.store(g_row + a, ga.to(g_ptr.dtype.element_ty), mask=mine_a)
                else:
                    gv = (u_s - q * Gs) * w
                    tl.store(g_row + ids_c, gv.to(g_ptr.dtype.element_ty), mask=mine)
                tl.debug_barrier()
        else:
            if seg == 0:
                tl.store(loss_ptr + row, 0.0)
            if COMPUTE_GRAD:
                tl.store(g_row + cols, tl.zeros([SEG], dtype=g_ptr.dtype.element_ty), mask=msk)
        item = tl.atomic_add(work_ptr, 1)


_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def kernel_choice(device: torch.device) -> str:
    """'twopass' (default) or 'coop' (single read, CUDA only; OPD_SPARSE_KERNEL=coop selects it)."""
    if device.type != "cuda":
        return "twopass"
    return os.environ.get("OPD_SPARSE_KERNEL", "twopass")


def default_config(V: int, dtype: torch.dtype, device: torch.device, kernel: str) -> Tuple[int, int, int]:
    """(BLOCK_V or SEG, num_warps, programs) for rows of V logits of `dtype`.

    Overridable with OPD_SPARSE_BLOCK_V / OPD_SPARSE_WARPS / OPD_SPARSE_PROGS_PER_SM (benchmarks).
    """
    if device.type != "cuda":  # interpreter: big blocks mean few Python-level steps
        return min(triton.next_power_of_2(V), 1024), 1, 1 << 30
    if kernel == "coop":
        block, warps, per_sm = 2048, 2, 16
    elif V * dtype.itemsize >= 1 << 17:  # long rows (>= 128 KiB): fewer rows in flight, bigger blocks
        block, warps, per_sm = 16384 // dtype.itemsize * 2, 16, 1
    else:
        block, warps, per_sm = 8192 // dtype.itemsize * 2, 8, 2
    block = int(os.environ.get("OPD_SPARSE_BLOCK_V", block))
    block = min(block, triton.next_power_of_2(V))
    warps = int(os.environ.get("OPD_SPARSE_WARPS", warps))
    per_sm = int(os.environ.get("OPD_SPARSE_PROGS_PER_SM", per_sm))
    return block, warps, _sm_count(device) * per_sm


def sparse_divergence_fwd(
    logits: torch.Tensor,
    inp: KernelInputs,
    need_grad: bool = True,
    inplace_grad: bool = False,
    block_v: Optional[int] = None,
    num_warps: Optional[int] = None,
    programs: Optional[int] = None,
    kernel: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the kernel on 2-D logits and their `inp`; returns (loss [N] fp32, grad [N, V] logits dtype or None).

    block_v, num_warps, programs, kernel ('coop' / 'twopass'): overrides for tests and benchmarks.
    """
    mode, cst, keep, weights = inp.mode_id, inp.cst, inp.keep, inp.weights
    topk_ids, topk_logprobs, tail_logprob, entry_weights = (inp.topk_ids, inp.topk_logprobs, inp.tail_logprob,
                                                             inp.entry_weights)
    sampled_ids, teacher_sampled_logprob, behavior_logprob = (inp.sampled_ids, inp.teacher_sampled_logprob,
                                                              inp.behavior_logprob)
    if logits.device.type != "cuda" and not is_interpreted():
        raise RuntimeError("the Triton backend on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                           "before opd_kernels.triton_sparse is imported (use backend='torch' on CPU)")
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
    kernel = kernel or kernel_choice(dev)
    bv, nw, progs = default_config(V, logits.dtype, dev, kernel)
    bv = block_v or bv
    nw = num_warps or nw
    if kernel == "coop" and triton.cdiv(V, bv) > MAX_SEGMENTS:
        bv = triton.next_power_of_2(triton.cdiv(V, MAX_SEGMENTS))
    if kernel == "coop" and dev.type != "cuda" and triton.cdiv(V, bv) > 1:
        raise ValueError("the coop kernel needs concurrent programs: on the interpreter only with V <= block_v")
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
    dummy = loss  # never read when unused
    w = dummy if weights is None else weights.to(torch.float32).contiguous()
    samp = sampled_ids.contiguous() if sampled_ids is not None else dummy
    tlp = teacher_sampled_logprob.contiguous() if teacher_sampled_logprob is not None else dummy
    blp = behavior_logprob.contiguous() if behavior_logprob is not None else dummy
    has_tail = tail_logprob is not None and mode != MODE_ID["pg"]
    tail = tail_logprob.to(torch.float32).contiguous() if has_tail else dummy
    has_ew = entry_weights is not None and K > 0
    ew = entry_weights.to(torch.float32).contiguous() if has_ew else dummy
    g = grad if grad is not None else logits
    has_mask = keep is not None
    keep8 = keep.to(torch.int8).contiguous() if has_mask else dummy
    common = dict(MODE=mode, BLOCK_K=block_k, COMPUTE_GRAD=need_grad, HAS_BEHAVIOR=behavior_logprob is not None,
                  HAS_MASK=has_mask, HAS_WEIGHT=weights is not None, HAS_TAIL=has_tail, HAS_EW=has_ew,
                  num_warps=nw)
    if kernel == "coop":
        G = triton.cdiv(V, bv)
        pm = torch.empty(N * G, dtype=torch.float32, device=dev)
        ps = torch.empty(N * G, dtype=torch.float32, device=dev)
        zs = torch.empty(N * block_k, dtype=torch.float32, device=dev)
        counters = torch.zeros(N + 1, dtype=torch.int32, device=dev)  # per-row arrivals, then the work counter
        grid = (min(N * G, programs or progs),)
        _sparse_div_coop_kernel[grid](
            logits, logits.stride(0), g, g.stride(0), ids, s_ids, lps, s_lp,
            keep8, w, samp, tlp, blp, tail, ew, ew.stride(0) if has_ew else 0, loss, pm, ps, zs, counters,
            counters[N:],
            N, V, K, G,
            float(cst[0]), float(cst[1]), float(cst[2]), TAIL_EPS_FP32, LOGP_MIN,
            SEG=bv, GMAX=max(triton.next_power_of_2(G), 2), **common)
    else:
        _sparse_div_kernel[(min(N, programs or progs),)](
            logits, logits.stride(0), g, g.stride(0), ids, s_ids, lps, s_lp,
            keep8, w, samp, tlp, blp, tail, ew, ew.stride(0) if has_ew else 0, loss,
            N, V, K,
            float(cst[0]), float(cst[1]), float(cst[2]), TAIL_EPS_FP32, LOGP_MIN,
            BLOCK_V=bv, EV1=os.environ.get("OPD_SPARSE_EV1", "evict_last") if dev.type == "cuda" else "",
            EV2=os.environ.get("OPD_SPARSE_EV2", "evict_first") if dev.type == "cuda" else "", **common)
    return loss, grad
