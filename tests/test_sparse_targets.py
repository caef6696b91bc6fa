"""Stored teacher entries (offline_opd.contract.sparse_targets): the exact tail, and the unbiased sampled estimator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opd_kernels import check_mode_params, sparse_divergence
from offline_opd.contract.sparse_targets import Selection, draw_uniforms, entry_weights, select, tail_from_logprobs

ELEMENTWISE = ["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "taid"]


def teacher_with_tail(V: int, k: int, tail: float, seed: int = 0) -> torch.Tensor:
    """fp32 log-probs [1, V] whose k best ids hold 1 - tail of the mass (the rest spread over V - k ids)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64), 0) * (1 - tail)
    rest = torch.softmax(torch.randn(V - k, generator=g, dtype=torch.float64), 0) * tail
    return torch.cat([head, rest]).log()[torch.randperm(V, generator=g)][None]


def test_stored_tail_is_exact_where_the_rebuild_is_not():
    """Tail mass 1e-5 at k = 32 over a 50k vocabulary: the stored tail log-prob is exact to fp32 precision; the
    v1 rebuild 1 - Σ exp(top-k) from the stored float16 (or even float32) log-probs is not."""
    V, k, tail = 50_000, 32, 1e-5
    logp64 = teacher_with_tail(V, k, tail)
    logp = logp64.float()   # what the scorer's fp32 log_softmax hands over
    ids, lps, counts, stored = select(logp, Selection("topk", k))
    true = math.log(torch.exp(logp64[0]).sum().item() - torch.exp(logp64[0, ids[0]]).sum().item())
    assert counts is None and ids.shape == (1, k)
    assert abs(stored.item() - true) < 1e-5          # fp32 log-probs carry ~6e-8 relative error each
    for dtype, off_by in ((torch.float16, 0.5), (torch.float32, 1e-3)):
        rebuilt = 1.0 - torch.exp(lps.to(dtype).float()).sum().item()
        err = abs(math.log(max(rebuilt, 1e-6)) - true)   # the kernels' v1 floor
        assert err > off_by, (dtype, err)
    # vLLM path: only the entries' fp32 log-probs are known; the complement in float64 is close
    assert abs(tail_from_logprobs(lps.numpy())[0] - true) < 0.02


def test_topk_union_and_draws_are_well_formed():
    logp = torch.log_softmax(torch.randn(5, 30, generator=torch.Generator().manual_seed(1)), -1)
    extra = torch.tensor([[0, 1, 1], [2, 2, 3], [29, 28, 27], [5, 5, 5], [6, 7, 8]])
    u = torch.from_numpy(np.stack([draw_uniforms(0, f"s{i}", 1, 6)[0] for i in range(5)]))
    ids, lps, counts, tail = select(logp, Selection("topk+sampled", 3, 6), extra, u)
    assert ids.shape == lps.shape == counts.shape == (5, 3 + 3 + 6)
    for r in range(5):
        kept = ids[r][ids[r] >= 0]
        assert len(set(kept.tolist())) == len(kept), "stored ids are distinct"
        assert set(logp[r].topk(3).indices.tolist()) <= set(kept.tolist())
        assert set(extra[r].tolist()) <= set(kept.tolist()), "π_ref's ids are added"
        assert int(counts[r].sum()) == 6 and (counts[r, :6] == 0).all()
        torch.testing.assert_close(lps[r][ids[r] >= 0], logp[r, kept])
        rest = torch.ones(30, dtype=torch.bool)
        rest[kept] = False
        torch.testing.assert_close(tail[r], torch.logsumexp(logp[r][rest], 0))
    # the draws are a function of (seed, sample_id): the same uniforms give the same entries
    again = select(logp, Selection("topk+sampled", 3, 6), extra, u)
    assert torch.equal(again[0], ids) and torch.equal(again[2], counts)


def _elementwise(p, q, mode):
    """f(p_i, q_i) whose sum over the vocabulary is the full divergence."""
    prm = check_mode_params(mode, {})

    def xl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a))

    if mode == "fkl":
        return xl(p, q)
    if mode == "rkl":
        return xl(q, p)
    if mode == "jsd":
        m = 0.5 * p + 0.5 * q
        return 0.5 * xl(p, m) + 0.5 * xl(q, m)
    if mode == "skew_fkl":
        return xl(p, prm["alpha"] * p + (1 - prm["alpha"]) * q)
    if mode == "skew_rkl":
        return xl(q, prm["alpha"] * q + (1 - prm["alpha"]) * p)
    t = prm["t"]
    return xl((1 - t) * q.detach() + t * p, q)


@pytest.mark.parametrize("selection", ["sampled", "topk+sampled"])
@pytest.mark.parametrize("mode", ELEMENTWISE)
def test_sampled_estimator_is_unbiased_for_loss_and_gradient(mode, selection):
    """Mean over many draws of the weighted sparse loss and its gradient = the full-vocabulary ones,
    within Monte-Carlo error (5 standard errors, per gradient component)."""
    V, draws, m = 12, 20_000, 4
    g = torch.Generator().manual_seed(7)
    logp = torch.log_softmax(torch.randn(1, V, generator=g, dtype=torch.float64) * 1.5, -1)
    z = torch.randn(V, generator=g, dtype=torch.float64)
    zf = z.clone().requires_grad_(True)
    full = _elementwise(logp[0].exp(), torch.softmax(zf, -1), mode).sum()
    (full_grad,) = torch.autograd.grad(full, zf)
    sel = Selection(selection, 2, m)
    u = torch.rand(draws, m, generator=g, dtype=torch.float64)
    ids, lps, counts, tail = select(logp.float().expand(draws, V).contiguous(), sel, None, u)
    w = torch.from_numpy(entry_weights(counts.numpy(), lps.numpy(), tail.numpy(), m))
    zs = z.expand(draws, V).clone().requires_grad_(True)
    # exact teacher log-probs for the terms (the fp32 ones only chose and weighted the entries)
    lp_exact = torch.where(ids >= 0, logp[0][ids.clamp(min=0)], torch.zeros((), dtype=torch.float64))
    loss = sparse_divergence(zs, ids, lp_exact, mode, entry_weights=w, backend="torch")
    (grad,) = torch.autograd.grad(loss.sum(), zs)
    se = loss.detach().std() / math.sqrt(draws)
    assert abs(loss.detach().mean() - full.detach()) < 5 * se + 1e-6, (float(loss.mean()), float(full))
    gse = grad.std(0) / math.sqrt(draws)
    assert ((grad.mean(0) - full_grad).abs() <= 5 * gse + 1e-6).all()
    # and the estimator is not trivially exact: single draws do vary
    assert loss.detach().std() > 1e-3
