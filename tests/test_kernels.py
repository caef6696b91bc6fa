"""Sparse-teacher divergence kernels: reference math, Triton vs reference, fused linear.

Without CUDA the Triton kernel runs in Triton's CPU interpreter: TRITON_INTERPRET=1 is set in conftest.py, before
`opd_kernels.triton_sparse` is imported (kernels imports it lazily). With CUDA the same tests run the
compiled kernel on the GPU.

Tolerances.
* float32 logits: both implementations compute in float32 from the same inputs and differ only in
  summation order, so loss and gradient agree to 1e-5 relative to the largest magnitude.
* bfloat16 logits: both read the same bf16 values and compute in float32, so the loss (float32) still
  agrees to 1e-5. The gradient is stored in bf16 by both; float32 values that differ by ~1e-7 can
  round to neighbouring bf16 numbers, so elements may differ by one bf16 ulp, which is at most 2**-7
  of the element's magnitude (8 significand bits), plus the float32 slack.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch

import opd_kernels
from opd_kernels import MODE_PARAMS, MODES, check_mode_params, fused_linear_sparse_divergence, sparse_divergence
from opd_kernels import reference as ref
from opd_kernels.inputs import kernel_inputs
from opd_kernels.modes import KERNEL_MODES, kernel_mode

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"


def _triton():
    from opd_kernels import triton_sparse

    assert ON_GPU or triton_sparse.is_interpreted(), "tests/conftest.py sets TRITON_INTERPRET=1 without CUDA"
    return triton_sparse


# --------------------------------------------------------------------------------------------------
# Inputs and test-only dense / naive implementations


def make_inputs(N, V, k, *, dtype=torch.float32, lp_dtype=torch.float16, ids_dtype=torch.int32, scale=3.0,
                seed=0, mask_frac=0.0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale)
    teacher = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * scale, -1)
    if k:
        ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
        lp = teacher.gather(1, ids)
        lp, order = lp.sort(1, descending=True)
        ids = ids.gather(1, order)
    else:
        ids = torch.zeros(N, 0, dtype=torch.long)
        lp = torch.zeros(N, 0, dtype=torch.float64)
    samp = torch.randint(0, V, (N,), generator=g)
    tlp = teacher.gather(1, samp[:, None])[:, 0]
    blp = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * scale, -1).gather(
        1, samp[:, None])[:, 0]
    mask = torch.rand(N, generator=g) >= mask_frac
    return dict(
        z=z.to(device=device, dtype=dtype), ids=ids.to(device=device, dtype=ids_dtype),
        lp=lp.to(device=device, dtype=lp_dtype), samp=samp.to(device), tlp=tlp.float().to(device),
        blp=blp.float().to(device), mask=mask.to(device))


def pg_kw(d, behavior=True):
    kw = dict(sampled_ids=d["samp"], teacher_sampled_logprob=d["tlp"])
    if behavior:
        kw["behavior_logprob"] = d["blp"]
    return kw


def run(d, mode, backend, *, mask=True, weights=None, grad_out=None, inplace=False, logits=None, **prm):
    """Loss and d(sum(loss * grad_out))/dlogits through the public API."""
    z = (d["z"] if logits is None else logits).clone().requires_grad_(True)
    kw = pg_kw(d) if mode == "pg" else {}
    loss = sparse_divergence(z, d["ids"], d["lp"], mode, mask=d["mask"] if mask else None, weights=weights,
                             backend=backend, inplace_grad=inplace, **kw, **prm)
    go = torch.ones_like(loss) if grad_out is None else grad_out
    (gz,) = torch.autograd.grad(loss, z, go)
    return loss.detach(), gz


def coarse_naive(z, ids, lp, mode, prm, *, samp=None, tlp=None, blp=None, eps=1e-12):
    """Plain autograd formula on the k+1 outcomes (float64), independent of opd_kernels.reference."""
    prm = check_mode_params(mode, prm)
    lq_all = torch.log_softmax(z, -1)
    if mode == "pg":
        lqa = lq_all.gather(1, samp[:, None])[:, 0]
        a = (tlp - lqa).clamp(-prm["tau"], prm["tau"])
        if blp is not None:
            a = a * torch.exp(lqa - blp).clamp(max=prm["is_clip"])
        return -a.detach() * lqa
    q = lq_all.gather(1, ids).exp()
    p = lp.exp()
    P = torch.cat([p, (1 - p.sum(1)).clamp(min=eps)[:, None]], 1)
    Q = torch.cat([q, (1 - q.sum(1)).clamp(min=eps)[:, None]], 1)
    return _divergence(P, Q, mode, prm)


def _divergence(P, Q, mode, prm):
    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)

    if mode == "fkl" or (mode == "jsd" and prm["beta"] == 0):
        return kl(P, Q)
    if mode == "rkl" or (mode == "jsd" and prm["beta"] == 1):
        return kl(Q, P)
    if mode == "jsd":
        b = prm["beta"]
        M = b * P + (1 - b) * Q
        return b * kl(P, M) + (1 - b) * kl(Q, M)
    if mode == "skew_fkl":
        a = prm["alpha"]
        return kl(P, a * P + (1 - a) * Q)
    if mode == "skew_rkl":
        a = prm["alpha"]
        return kl(Q, a * Q + (1 - a) * P)
    if mode == "taid":
        t = prm["t"]
        return kl((1 - t) * Q.detach() + t * P, Q)
    if mode == "entropy_aware":
        ent = -(P * P.log()).sum(-1)
        a = torch.sigmoid((ent - prm["h"]) / prm["s"])
        return (1 - a) * kl(Q, P) + a * kl(P, Q)
    raise AssertionError(mode)


def rel(a, b, floor=0.1):
    """max |a - b| / max(max |b|, floor), in float64.

    The floor: loss terms and gradient entries are O(1) quantities computed in float32 (unit roundoff
    6e-8), so where the true value is ~0 (e.g. both distributions all in the tail) both sides carry
    rounding noise of ~1e-7 that no relative measure can compare.
    """
    a, b = a.double().cpu(), b.double().cpu()
    den = max(b.abs().max().item() if b.numel() else 0.0, floor)
    return (a - b).abs().max().item() / den


def assert_close_bf16_grad(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    bound = 2.0 ** -7 * torch.maximum(a.abs(), b.abs()) + 1e-5 * b.abs().max()
    bad = (a - b).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} elements beyond one bf16 ulp; max diff {(a - b).abs().max():.3g}"


# --------------------------------------------------------------------------------------------------
# Mode table


def test_mode_table_and_validation():
    assert set(MODES) == {"pg", "fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "taid", "entropy_aware"}
    assert MODE_PARAMS["jsd"] == {"beta": 0.5} and MODE_PARAMS["skew_rkl"] == {"alpha": 0.1}
    assert set(MODE_PARAMS["entropy_aware"]) == {"h", "s"} and set(MODE_PARAMS["pg"]) == {"tau", "is_clip"}
    assert check_mode_params("jsd", {"beta": 0.3}) == {"beta": 0.3}
    with pytest.raises(ValueError, match="unknown loss mode"):
        check_mode_params("kl", {})
    with pytest.raises(ValueError, match="unknown parameter"):
        check_mode_params("fkl", {"beta": 0.5})
    with pytest.raises(ValueError, match="outside"):
        check_mode_params("jsd", {"beta": 1.5})
    with pytest.raises(ValueError, match="outside"):
        check_mode_params("entropy_aware", {"s": 0.0})
    d = make_inputs(2, 5, 2, device="cpu")
    with pytest.raises(ValueError, match="needs sampled_ids"):
        sparse_divergence(d["z"], d["ids"], d["lp"], "pg", backend="torch")
    assert opd_kernels.backend_for("cpu") == "torch" and opd_kernels.backend_for("cpu", "triton") == "triton"


def test_one_record_per_mode():
    """The kernel ids, the public defaults table and the constants all come from the one record per mode."""
    ids = [m.id for m in KERNEL_MODES.values()]
    assert len(set(ids)) == len(ids) and tuple(KERNEL_MODES) == MODES
    assert all(MODE_PARAMS[name] == {k: p.default for k, p in m.params.items()} for name, m in KERNEL_MODES.items())
    assert all(check_mode_params(name, {}) == MODE_PARAMS[name] for name in MODES)   # defaults are in range
    assert kernel_mode("skew_fkl", {"alpha": 0.25}) == (KERNEL_MODES["skew_fkl"].id,
                                                        (0.25, math.log(0.25), math.log(0.75), 0.0))
    assert kernel_mode("jsd", {"beta": 0.0}) == kernel_mode("fkl")   # TRL's endpoints
    assert kernel_mode("jsd", {"beta": 1.0}) == kernel_mode("rkl")
    assert [m.name for m in KERNEL_MODES.values() if m.sampled_token] == ["pg"]


def test_kernel_inputs_are_one_frozen_record_sliced_by_rows():
    d = make_inputs(6, 20, 3, device="cpu")
    g = torch.Generator().manual_seed(4)
    kw = dict(mask=d["mask"], weights=torch.rand(6, generator=g), tail_logprob=-torch.rand(6, generator=g),
              entry_weights=torch.rand(6, 3, generator=g))
    inp = kernel_inputs(6, "cpu", d["ids"], d["lp"], "jsd", beta=0.3, **kw, **pg_kw(d))
    with pytest.raises(dataclasses.FrozenInstanceError):
        inp.keep = None
    part = inp.rows(2, 5)
    for f in dataclasses.fields(inp):
        whole, rows = getattr(inp, f.name), getattr(part, f.name)
        assert torch.equal(rows, whole[2:5]) if torch.is_tensor(whole) else rows == whole, f.name
    # a divergence mode drops the sampled-token inputs; pg drops the top-k, the tail and the entry weights
    assert inp.sampled_ids is None and inp.topk_ids.shape == (6, 3) and inp.entry_weights is not None
    pg = kernel_inputs(6, "cpu", d["ids"], d["lp"], "pg", **kw, **pg_kw(d))
    assert pg.topk_ids is None and pg.tail_logprob is None and pg.entry_weights is None
    assert torch.equal(pg.sampled_ids, d["samp"]) and pg.mode_id == KERNEL_MODES["pg"].id


# --------------------------------------------------------------------------------------------------
# Hand-computed values on a 3-token vocabulary


def _three_token_case():
    z = [1.0, 2.0, 0.5]
    ez = [math.exp(v) for v in z]
    q = [e / sum(ez) for e in ez]
    p = [0.3, 0.6, 0.1]  # teacher: top-2 = tokens 1 (0.6) and 0 (0.3), tail = token 2 (0.1)
    return z, q, p


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hand_computed_three_tokens(backend):
    if backend == "triton":
        _triton()
    z, q, p = _three_token_case()
    logits = torch.tensor([z], dtype=torch.float32, device=DEV)
    ids = torch.tensor([[1, 0]], device=DEV)
    lp = torch.tensor([[math.log(0.6), math.log(0.3)]], device=DEV)
    # With S = {1, 0} the tail is exactly token 2, so the coarsened divergences are the full ones.
    fkl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    rkl = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    fkl_grad = [qi - pi for pi, qi in zip(p, q)]  # d/dz of KL(p || softmax z)
    rkl_grad = [qi * (math.log(qi / pi) - rkl) for pi, qi in zip(p, q)]
    for mode, val, grad in (("fkl", fkl, fkl_grad), ("rkl", rkl, rkl_grad)):
        x = logits.clone().requires_grad_(True)
        loss = sparse_divergence(x, ids, lp, mode, backend=backend)
        loss.sum().backward()
        assert loss.item() == pytest.approx(val, rel=1e-5)
        assert x.grad[0].tolist() == pytest.approx(grad, rel=1e-4, abs=1e-6)
    # pg: sampled token 2, teacher log-prob log 0.1, tau large enough not to clip.
    a = 2
    adv = math.log(0.1) - math.log(q[a])
    x = logits.clone().requires_grad_(True)
    loss = sparse_divergence(x, None, None, "pg", sampled_ids=torch.tensor([a], device=DEV),
                             teacher_sampled_logprob=torch.tensor([math.log(0.1)], device=DEV), backend=backend)
    loss.sum().backward()
    assert loss.item() == pytest.approx(-adv * math.log(q[a]), rel=1e-5)
    expect = [adv * qi - (adv if i == a else 0.0) for i, qi in enumerate(q)]  # -A * d log q_a / dz
    assert x.grad[0].tolist() == pytest.approx(expect, rel=1e-4, abs=1e-6)
    # pg clipping and importance weight: tau = 0.5 clips A, behaviour log-prob gives ratio 1.5 < is_clip.
    x = logits.clone().requires_grad_(True)
    blp = math.log(q[a] / 1.5)
    loss = sparse_divergence(x, None, None, "pg", sampled_ids=torch.tensor([a], device=DEV),
                             teacher_sampled_logprob=torch.tensor([math.log(0.1)], device=DEV),
                             behavior_logprob=torch.tensor([blp], device=DEV), tau=0.5, backend=backend)
    clipped = max(-0.5, min(0.5, adv))
    assert loss.item() == pytest.approx(-1.5 * clipped * math.log(q[a]), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# The reference against independent float64 computations


@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_dense_full_vocab_when_k_equals_v(mode):
    N, V = 6, 11
    d = make_inputs(N, V, V, dtype=torch.float64, lp_dtype=torch.float64, ids_dtype=torch.int64, device="cpu")
    loss, gz = run(d, mode, "torch", mask=False)
    z = d["z"].clone().requires_grad_(True)
    if mode == "pg":
        dense = coarse_naive(z, None, None, mode, {}, samp=d["samp"], tlp=d["tlp"].double(), blp=d["blp"].double())
    else:
        prm = check_mode_params(mode, {})
        p_full = torch.zeros(N, V, dtype=torch.float64).scatter(1, d["ids"], d["lp"].exp())
        dense = _divergence(p_full, torch.softmax(z, -1), mode, prm)
    (gd,) = torch.autograd.grad(dense.sum(), z)
    assert rel(loss, dense.detach()) < 1e-10
    assert rel(gz, gd) < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_naive_coarsened_autograd(mode):
    N, V, k = 7, 23, 4
    d = make_inputs(N, V, k, dtype=torch.float64, lp_dtype=torch.float64, ids_dtype=torch.int64, mask_frac=0.3,
                    device="cpu")
    w = torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    go = torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loss, gz = run(d, mode, "torch", weights=w, grad_out=go)
    z = d["z"].clone().requires_grad_(True)
    naive = coarse_naive(z, d["ids"], d["lp"], mode, {}, samp=d["samp"], tlp=d["tlp"].double(),
                         blp=d["blp"].double())
    naive = torch.where(d["mask"], naive * w, torch.zeros_like(naive))
    (gn,) = torch.autograd.grad(naive, z, go)
    assert rel(loss, naive.detach()) < 1e-10
    assert rel(gz, gn) < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_reference_gradcheck(mode):
    N, V, k = 3, 9, 3
    d = make_inputs(N, V, k, dtype=torch.float64, lp_dtype=torch.float64, ids_dtype=torch.int64, scale=1.0,
                    device="cpu")
    kw = pg_kw(d) if mode == "pg" else {}
    # pg's advantage and importance weight, and taid's stopgrad(q), are stop-gradient, while gradcheck
    # differentiates the true function: clip pg's (tau, is_clip tiny: locally constant) and use taid at
    # t = 1 (the stop-gradient term vanishes). The naive-autograd test above covers them with detach().
    prm = {"pg": {"tau": 1e-3, "is_clip": 1e-3}, "jsd": {"beta": 0.3}, "skew_fkl": {"alpha": 0.2}, "skew_rkl": {"alpha": 0.2}, "taid": {"t": 1.0},
           "entropy_aware": {"h": 1.0, "s": 0.7}}.get(mode, {})
    z = d["z"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: sparse_divergence(x, d["ids"], d["lp"], mode, backend="torch", **kw, **prm), (z,))


def test_jsd_endpoints_follow_trl_convention():
    d = make_inputs(4, 20, 5, dtype=torch.float64, lp_dtype=torch.float64, device="cpu")
    for beta, other in ((0.0, "fkl"), (1.0, "rkl")):
        a, ga = run(d, "jsd", "torch", beta=beta)
        b, gb = run(d, other, "torch")
        assert torch.equal(a, b) and torch.equal(ga, gb)
    # near the endpoints JSD(beta) / beta -> FKL and JSD(beta) / (1 - beta) -> RKL
    a, _ = run(d, "jsd", "torch", beta=1e-6)
    b, _ = run(d, "fkl", "torch")
    assert rel(a / 1e-6, b) < 1e-4


def test_chunked_path_is_chunk_invariant_and_bounded(monkeypatch):
    d = make_inputs(13, 40, 5, dtype=torch.float32, device="cpu", mask_frac=0.2)
    seen = []
    orig = ref.chunk_loss_grad

    def spy(z, *a, **k):
        seen.append(z.shape[0])
        return orig(z, *a, **k)

    monkeypatch.setattr(ref, "chunk_loss_grad", spy)
    outs = []
    for chunk in (1, 4, 13):
        seen.clear()
        z = d["z"].clone().requires_grad_(True)
        loss = sparse_divergence(z, d["ids"], d["lp"], "jsd", mask=d["mask"], backend="torch", chunk_size=chunk)
        loss.sum().backward()
        assert max(seen) <= chunk and sum(seen) == 13  # every temporary is [<= chunk, V]
        outs.append((loss.detach(), z.grad))
    for loss, g in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(g, outs[0][1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inplace_grad_masking_weights_and_shapes(backend):
    if backend == "triton":
        _triton()
    d = make_inputs(8, 50, 6, mask_frac=0.3)
    w = torch.rand(8, device=DEV)
    a, ga = run(d, "fkl", backend, weights=w)
    buf = d["z"].clone().requires_grad_(True)
    loss = sparse_divergence(buf, d["ids"], d["lp"], "fkl", mask=d["mask"], weights=w, backend=backend,
                             inplace_grad=True)
    (gb,) = torch.autograd.grad(loss, buf, torch.ones_like(loss))
    assert gb.data_ptr() == buf.data_ptr()  # the gradient lives in the logits buffer
    assert torch.equal(loss, a) and torch.equal(gb, ga)
    assert (ga[~d["mask"]] == 0).all() and (a[~d["mask"]] == 0).all()
    # weights fold into loss and gradient
    b, gbw = run(d, "fkl", backend)
    assert torch.allclose(a, b * w, rtol=1e-6) and torch.allclose(ga, gbw * w[:, None], rtol=1e-5, atol=1e-7)
    # leading dims and no-grad path
    with torch.no_grad():
        c = sparse_divergence(d["z"].reshape(2, 4, 50), d["ids"].reshape(2, 4, 6), d["lp"].reshape(2, 4, 6),
                              "fkl", mask=d["mask"].reshape(2, 4), backend=backend)
    assert c.shape == (2, 4) and torch.allclose(c.reshape(-1), b, rtol=1e-6)
    # a second backward after an in-place rescale is refused
    buf = d["z"].clone().requires_grad_(True)
    loss = sparse_divergence(buf, d["ids"], d["lp"], "fkl", backend=backend, inplace_grad=True)
    torch.autograd.grad(loss, buf, torch.rand_like(loss), retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run again"):
        torch.autograd.grad(loss, buf, torch.rand_like(loss))


# --------------------------------------------------------------------------------------------------
# Triton kernel vs reference

CASES = {
    # name: (N, V, k, extra make_inputs kwargs, kernel block_v)
    "odd": (9, 300, 7, dict(mask_frac=0.3), 64),     # V not a multiple of the block, odd k, masked rows
    "k1": (5, 37, 1, dict(), 16),
    "kV": (4, 37, 37, dict(), 16),                    # tail empty
    "extreme": (6, 200, 5, dict(scale=1e4), 64),      # logits and teacher log-probs around +-1e4
}


def _kernels(V, block_v):
    """Kernel variants to check: the two-pass kernel always; the cooperative split-row kernel (the CUDA
    default) on the GPU, and on the interpreter only when a row is one segment (it runs programs one
    after another, so programs cannot wait for each other)."""
    return ["twopass", "coop"] if ON_GPU or V <= block_v else ["twopass"]


def _compare(d, mode, dtype, block_v, prm=None):
    tri = _triton()
    prm = prm or {}
    kw = pg_kw(d) if mode == "pg" else {}
    inp = kernel_inputs(d["z"].shape[0], d["z"].device, d["ids"], d["lp"], mode, mask=d["mask"], **kw, **prm)
    a, ga = run(d, mode, "torch", **prm)
    for kern in _kernels(d["z"].shape[1], block_v):
        b, gb = tri.sparse_divergence_fwd(d["z"], inp, block_v=block_v, kernel=kern)
        assert torch.isfinite(b).all() and torch.isfinite(gb.float()).all(), kern
        assert rel(b, a) < 1e-5, kern
        if dtype == torch.float32:
            assert rel(gb, ga) < 1e-5, kern
        else:
            assert_close_bf16_grad(gb, ga)
    return a, ga


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_triton_matches_reference(mode, dtype, case):
    N, V, k, extra, block_v = CASES[case]
    lp_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    d = make_inputs(N, V, k, dtype=dtype, lp_dtype=lp_dtype, seed=zlib.crc32(f"{mode}/{case}".encode()) % 1000, **extra)
    if case == "extreme":
        d["lp"] = d["lp"].float().clamp(min=-1e4)  # fp16 would overflow to -inf (also handled, below)
    loss, grad = _compare(d, mode, dtype, block_v)
    if case == "kV" and mode != "pg":
        # nothing outside S: the loss is the full divergence and every row's gradient sums to 0
        assert grad.double().sum(1).abs().max() < 1e-2 * grad.double().abs().max() + 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_triton_single_segment_rows(mode):
    """Rows of one block: on the interpreter this is where the cooperative kernel can run too."""
    d = make_inputs(6, 300, 9, mask_frac=0.3)
    _compare(d, mode, torch.float32, 512)


@pytest.mark.parametrize("mode", ["fkl", "rkl", "jsd", "taid", "entropy_aware"])
def test_triton_teacher_topk_carries_almost_all_mass(mode):
    N, V, k = 5, 64, 8
    d = make_inputs(N, V, k, lp_dtype=torch.float32)
    lp = torch.log_softmax(torch.randn(N, k, generator=torch.Generator().manual_seed(3)), -1).sort(
        1, descending=True).values + math.log1p(-1e-9)
    d["lp"] = lp.to(DEV)
    _compare(d, mode, torch.float32, 16)


@pytest.mark.parametrize("mode", ["fkl", "skew_rkl"])
def test_triton_k256_int64_ids_fp32_teacher(mode):
    d = make_inputs(3, 300, 256, lp_dtype=torch.float32, ids_dtype=torch.int64)
    _compare(d, mode, torch.float32, 128)


def test_triton_pg_k0_and_fp16_minus_inf_teacher():
    d = make_inputs(6, 100, 0, mask_frac=0.3)
    # k = 0 and no behaviour log-prob
    tri = _triton()
    z = d["z"].clone().requires_grad_(True)
    loss = sparse_divergence(z, None, None, "pg", mask=d["mask"], backend="torch", **pg_kw(d, behavior=False))
    loss.sum().backward()
    inp = kernel_inputs(6, z.device, None, None, "pg", mask=d["mask"], **pg_kw(d, behavior=False))
    b, gb = tri.sparse_divergence_fwd(d["z"], inp, block_v=32)
    assert rel(b, loss.detach()) < 1e-5 and rel(gb, z.grad) < 1e-5
    # teacher log-probs of -inf in fp16 stay finite
    d = make_inputs(4, 60, 5)
    d["lp"][:, -1] = float("-inf")
    for mode in ("fkl", "rkl", "jsd"):
        _compare(d, mode, torch.float32, 32)


@pytest.mark.parametrize("mode", ["fkl", "pg"])
def test_triton_public_api_backward(mode):
    _triton()
    d = make_inputs(7, 90, 3, mask_frac=0.2)
    go = torch.rand(7, device=DEV)
    a, ga = run(d, mode, "torch", grad_out=go)
    b, gb = run(d, mode, "triton", grad_out=go)
    assert rel(b, a) < 1e-5 and rel(gb, ga) < 1e-5


# --------------------------------------------------------------------------------------------------
# Fused linear


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["fkl", "pg"])
def test_fused_linear_matches_unfused(mode, backend):
    if backend == "triton":
        _triton()
    N, H, V, k = 21, 16, 70, 5
    d = make_inputs(N, V, k, mask_frac=0.25)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(N, H, generator=g).to(DEV)
    W = (torch.randn(V, H, generator=g) * 0.5).to(DEV)
    w = torch.rand(N, generator=g).to(DEV)
    kw = pg_kw(d) if mode == "pg" else {}
    for go in (torch.ones(N), torch.full((N,), 0.25), torch.rand(N, generator=g)):
        go = go.to(DEV)
        h1, W1 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        h2, W2 = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        l1 = fused_linear_sparse_divergence(h1, W1, d["ids"], d["lp"], mode, mask=d["mask"], weights=w,
                                            backend=backend, chunk_size=8, **kw)
        l2 = sparse_divergence(h2 @ W2.t(), d["ids"], d["lp"], mode, mask=d["mask"], weights=w, backend="torch", **kw)
        g1 = torch.autograd.grad(l1, (h1, W1), go)
        g2 = torch.autograd.grad(l2, (h2, W2), go)
        assert rel(l1.detach(), l2.detach()) < 1e-5
        assert rel(g1[0], g2[0]) < 1e-5 and rel(g1[1], g2[1]) < 1e-5


def test_fused_linear_bf16_frozen_weight():
    d = make_inputs(10, 40, 4)
    g = torch.Generator().manual_seed(6)
    h = torch.randn(10, 8, generator=g).to(DEV, torch.bfloat16).requires_grad_(True)
    W = torch.randn(40, 8, generator=g).to(DEV, torch.bfloat16)  # no grad: only hidden's gradient
    loss = fused_linear_sparse_divergence(h, W, d["ids"], d["lp"], "rkl", chunk_size=3)
    loss.sum().backward()
    h2 = h.detach().clone().requires_grad_(True)
    ref_loss = sparse_divergence(h2 @ W.t(), d["ids"], d["lp"], "rkl", backend="torch")
    ref_loss.sum().backward()
    assert rel(loss.detach(), ref_loss.detach()) < 1e-5
    assert rel(h.grad, h2.grad) < 2e-2  # bf16 matmuls on differently rounded gradients


# --------------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_gpu_realistic_vocab_no_extra_allocation(mode):
    N, V, k = 64, 151936, 64
    d = make_inputs(N, V, k, dtype=torch.bfloat16, lp_dtype=torch.float16, mask_frac=0.1)
    a, ga = run(d, mode, "torch")
    z = d["z"].clone().requires_grad_(True)
    kw = pg_kw(d) if mode == "pg" else {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = sparse_divergence(z, d["ids"], d["lp"], mode, mask=d["mask"], inplace_grad=True, **kw)
    (gz,) = torch.autograd.grad(loss.sum(), z)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < N * V  # far less than one bf16 [N, V] buffer (= 2 N V bytes)
    assert gz.data_ptr() == z.data_ptr()
    assert rel(loss, a) < 1e-5
    assert_close_bf16_grad(gz, ga)


# --------------------------------------------------------------------------------------------------
# Exact tail and importance-weighted entries (shards v2)


def _tail_inputs(N=6, V=80, k=5, seed=11):
    d = make_inputs(N, V, k, lp_dtype=torch.float32, seed=seed, mask_frac=0.2)
    g = torch.Generator().manual_seed(seed)
    d["tail"] = torch.log(torch.rand(N, generator=g, dtype=torch.float64) * 0.5 + 1e-3).float().to(DEV)
    d["ew"] = (torch.rand(N, k, generator=g) * 3).to(DEV)
    return d


@pytest.mark.parametrize("mode", [m for m in MODES if m != "pg"])
def test_reference_exact_tail_and_entry_weights_match_naive(mode):
    """The tail bucket uses the given tail log-mass; entry weights give sum_j w_j l_j and no tail."""
    d = _tail_inputs()
    prm = {}
    z64 = d["z"].double().cpu().requires_grad_(True)
    ids, lp = d["ids"].long().cpu(), d["lp"].double().cpu()
    lq_all = torch.log_softmax(z64, -1)
    q = lq_all.gather(1, ids).exp()
    P = torch.cat([lp.exp(), d["tail"].double().cpu().exp()[:, None]], 1)
    Q = torch.cat([q, (1 - q.sum(1)).clamp(min=1e-12)[:, None]], 1)
    want = _divergence(P, Q, mode, check_mode_params(mode, prm))
    got = sparse_divergence(z64, ids, lp, mode, tail_logprob=d["tail"].cpu(), backend="torch")
    assert rel(got.detach(), want.detach()) < 1e-9
    (gw,) = torch.autograd.grad(want.sum(), z64)
    z2 = z64.detach().clone().requires_grad_(True)
    (gg,) = torch.autograd.grad(sparse_divergence(z2, ids, lp, mode, tail_logprob=d["tail"].cpu(),
                                                  backend="torch").sum(), z2)
    assert rel(gg, gw) < 1e-9
    # entry weights: elementwise terms of the full-vocabulary divergence, weighted, summed over the entries
    if mode != "entropy_aware":  # its mixing weight depends on the (estimated) entropy: not elementwise
        ew = d["ew"].double().cpu()
        z1 = z64.detach().clone().requires_grad_(True)
        q1 = torch.log_softmax(z1, -1).gather(1, ids).exp()
        want_w = (ew * _elementwise(lp.exp(), q1, mode, check_mode_params(mode, prm))).sum(1)
        z3 = z64.detach().clone().requires_grad_(True)
        got_w = sparse_divergence(z3, ids, lp, mode, entry_weights=ew, backend="torch")
        assert rel(got_w.detach(), want_w.detach()) < 1e-9
        (g1,) = torch.autograd.grad(want_w.sum(), z1)
        (g2,) = torch.autograd.grad(got_w.sum(), z3)
        assert rel(g2, g1) < 1e-9


def _elementwise(p, q, mode, prm):
    """Per-token terms f(p_i, q_i) whose sum over the vocabulary is the full divergence."""
    def xl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a))

    if mode == "fkl" or (mode == "jsd" and prm["beta"] == 0):
        return xl(p, q)
    if mode == "rkl":
        return xl(q, p)
    if mode == "jsd":
        b = prm["beta"]
        m = b * p + (1 - b) * q
        return b * xl(p, m) + (1 - b) * xl(q, m)
    if mode == "skew_fkl":
        return xl(p, prm["alpha"] * p + (1 - prm["alpha"]) * q)
    if mode == "skew_rkl":
        return xl(q, prm["alpha"] * q + (1 - prm["alpha"]) * p)
    if mode == "taid":
        t = prm["t"]
        return xl((1 - t) * q.detach() + t * p, q)
    raise AssertionError(mode)


@pytest.mark.parametrize("tail", ["floor", "rebuilt"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", [m for m in MODES if m != "pg"])  # pg reads no entries and no tail
def test_k_equals_v_in_fp32_is_the_full_vocabulary_loss(mode, backend, tail):
    """k = V in fp32: the empty tail adds nothing. Shards store an empty tail as the floor -1e4
    (sparse_targets.TAIL_FLOOR); the student's complement is then ~1e-7 of rounding, clamped to 1e-6,
    which gave rkl a spurious 1e-6 * (log 1e-6 + 1e4) = +1e-2 nats per token before the fix."""
    if backend == "triton":
        _triton()
    N, V = 5, 64
    d = make_inputs(N, V, V, lp_dtype=torch.float32, seed=3)
    floor = torch.full((N,), -1.0e4, device=DEV) if tail == "floor" else None
    z = d["z"].clone().requires_grad_(True)
    loss = sparse_divergence(z, d["ids"], d["lp"], mode, tail_logprob=floor, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    z64 = d["z"].double().cpu().requires_grad_(True)
    p_full = torch.zeros(N, V, dtype=torch.float64).scatter(1, d["ids"].long().cpu(), d["lp"].double().cpu().exp())
    dense = _divergence(p_full, torch.softmax(z64, -1), mode, check_mode_params(mode, {}))
    (want,) = torch.autograd.grad(dense.sum(), z64)
    assert (loss.double().cpu() - dense.detach()).abs().max() < 2e-5, (loss, dense)
    assert rel(grad, want) < 1e-5


@pytest.mark.parametrize("mode", [m for m in MODES if m != "pg"])
def test_triton_exact_tail_and_entry_weights_match_reference(mode):
    tri = _triton()
    d = _tail_inputs()
    for kw in (dict(tail_logprob=d["tail"]), dict(entry_weights=d["ew"]),
               dict(tail_logprob=d["tail"], entry_weights=d["ew"])):
        a, ga = run(d, mode, "torch", **kw)
        inp = kernel_inputs(d["z"].shape[0], d["z"].device, d["ids"], d["lp"], mode, mask=d["mask"], **kw)
        for kern in _kernels(80, 128):
            b, gb = tri.sparse_divergence_fwd(d["z"], inp, block_v=128, kernel=kern)
            assert rel(b, a) < 1e-5 and rel(gb, ga) < 1e-5, (kern, list(kw))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_linear_passes_tail_and_entry_weights(backend):
    if backend == "triton":
        _triton()
    d = _tail_inputs(N=9, V=40, k=4)
    g = torch.Generator().manual_seed(8)
    h = torch.randn(9, 8, generator=g).to(DEV).requires_grad_(True)
    W = torch.randn(40, 8, generator=g).to(DEV).requires_grad_(True)
    kw = dict(tail_logprob=d["tail"], entry_weights=d["ew"], mask=d["mask"])
    l1 = fused_linear_sparse_divergence(h, W, d["ids"], d["lp"], "jsd", backend=backend, chunk_size=4, **kw)
    h2, W2 = h.detach().clone().requires_grad_(True), W.detach().clone().requires_grad_(True)
    l2 = sparse_divergence(h2 @ W2.t(), d["ids"], d["lp"], "jsd", backend="torch", **kw)
    g1, g2 = torch.autograd.grad(l1.sum(), (h, W)), torch.autograd.grad(l2.sum(), (h2, W2))
    assert rel(l1.detach(), l2.detach()) < 1e-5 and rel(g1[0], g2[0]) < 1e-5 and rel(g1[1], g2[1]) < 1e-5
    # and the inputs matter: without them the loss differs
    l3 = sparse_divergence(h2 @ W2.t(), d["ids"], d["lp"], "jsd", backend="torch", mask=d["mask"])
    assert rel(l3.detach(), l2.detach()) > 1e-2
