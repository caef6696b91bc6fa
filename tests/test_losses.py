"""The objective on top of the kernels: masking, averaging, TIP selection, CE term, schedules, validation.

References are dense PyTorch computations over the full vocabulary (k = V, so the k+1-outcome
divergence equals the full one) with ordinary autograd; the module under test goes through the kernels.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from offline_opd.config import ConfigError
from opd_kernels import KERNEL_MODES
from offline_opd.train.losses import LOSSES, DistillLoss, LossSpec, Targets, loss_spec, select_tokens
from offline_opd.train.pg import PolicyGradient
from offline_opd.train.terms import KernelTerm

N, V, H = 7, 11, 5


def make(seed: int = 0, k: int = V, mask=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    lp, ids = teacher.sort(-1, descending=True)
    sampled = torch.randint(0, V, (N,), generator=g)
    t = Targets(sampled_ids=sampled, teacher_logprob=teacher.gather(1, sampled[:, None])[:, 0].float(),
                behavior_logprob=-torch.rand(N, generator=g), topk_ids=ids[:, :k], topk_logprobs=lp[:, :k],
                mask=torch.ones(N, dtype=torch.bool) if mask is None else torch.tensor(mask))
    return logits, teacher, t


def dense_fkl(logits, teacher):
    return (teacher.exp() * (teacher - torch.log_softmax(logits, -1))).sum(-1)


def run(objective, logits, t, progress=0.0):
    z = logits.clone().requires_grad_(True)
    out = objective(t, progress, logits=z.clone())  # the clone may be overwritten by the in-place gradient
    out.loss.backward()
    return out, z.grad


def dense(fn, logits):
    z = logits.clone().requires_grad_(True)
    loss = fn(z)
    loss.backward()
    return loss.detach(), z.grad


def test_select_tokens_keeps_uncertain_or_confidently_wrong():
    entropy = torch.tensor([3.0, 2.0, 1.0, 0.0])
    divergence = torch.tensor([0.0, 1.0, 0.0, 5.0])   # token 3: confident and far from the teacher
    mask = torch.ones(4, dtype=torch.bool)
    assert select_tokens(entropy, divergence, mask, 0.5).tolist() == [True, False, False, True]
    assert select_tokens(entropy, divergence, mask, 0.75).tolist() == [True, True, False, True]
    assert select_tokens(entropy, divergence, mask, 1.0).tolist() == [True] * 4
    # masked tokens are never selected and do not count in the budget: ceil(0.5 * 3) = 2 of the 3
    masked = torch.tensor([False, True, True, True])
    assert select_tokens(entropy, divergence, masked, 0.5).tolist() == [False, True, False, True]
    assert select_tokens(entropy, divergence, masked, 0.01).sum() == 1


@pytest.mark.parametrize("mask", [None, [True, False, True, True, False, True, True]])
def test_fkl_is_mean_over_unmasked_tokens(mask):
    logits, teacher, t = make(mask=mask)
    keep = t.mask
    out, grad = run(DistillLoss(LossSpec("fkl", {})), logits, t)
    want, want_grad = dense(lambda z: dense_fkl(z, teacher)[keep].mean(), logits)
    assert out.tokens == out.selected == int(keep.sum()) and out.ce is None
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)
    assert (grad[~keep] == 0).all()


def test_ce_term_is_mean_cross_entropy_on_sampled_tokens():
    logits, teacher, t = make(mask=[True, True, False, True, True, True, True])
    keep = t.mask
    out, grad = run(DistillLoss(LossSpec("fkl", {}), ce_weight=0.5), logits, t)

    def ref(z):
        return dense_fkl(z, teacher)[keep].mean() + 0.5 * F.cross_entropy(z[keep], t.sampled_ids[keep])

    want, want_grad = dense(ref, logits)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-5)   # kernel's 1e-6 tail floor
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ce.double(), F.cross_entropy(logits[keep], t.sampled_ids[keep]),
                               rtol=1e-5, atol=1e-5)


def test_tip_averages_over_selected_tokens_only():
    logits, teacher, t = make(seed=3)
    out, grad = run(DistillLoss(LossSpec("fkl", {}), tip_fraction=0.4), logits, t)
    q = torch.log_softmax(logits, -1)
    entropy = -(q.exp() * q).sum(-1)
    sel = select_tokens(entropy, dense_fkl(logits, teacher), t.mask, 0.4)
    assert out.selected == int(sel.sum()) == math.ceil(0.4 * N) and out.tokens == N
    want, want_grad = dense(lambda z: dense_fkl(z, teacher)[sel].mean(), logits)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)


def test_pg_is_clipped_advantage_times_ratio_times_logq():
    logits, _, t = make(seed=5, k=0)
    tau, is_clip = 0.7, 1.5
    out, grad = run(DistillLoss(LossSpec("pg", {"tau": tau, "is_clip": is_clip})), logits, t)

    def ref(z):
        lq = torch.log_softmax(z, -1).gather(1, t.sampled_ids[:, None])[:, 0]
        adv = (t.teacher_logprob.double() - lq).clamp(-tau, tau).detach()
        ratio = torch.exp(lq - t.behavior_logprob.double()).clamp(max=is_clip).detach()
        return (-adv * ratio * lq).mean()

    want, want_grad = dense(ref, logits)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("baseline,temperature,k,trust", [(1.0, 1.0, 4, 0.0), (0.5, 0.7, 4, 0.0), (0.0, 1.3, 0, 0.0),
                                                          (1.0, 1.0, V, 0.0), (1.0, 0.8, 4, 0.2), (0.0, 1.0, 0, 0.3)])
def test_pg_baseline_temperature_trust_region_match_an_independent_formula(baseline, temperature, k, trust):
    """−(A − b·E_q[A]·r)·log q(a) with r the clipped ratio exp(log q_T(a) − behaviour), E_q over S ∪ {tail};
    with a trust region ε, the tokens whose unclipped ratio already left 1 ± ε in the direction of their
    advantage get no gradient (PPO's clipped surrogate)."""
    logits, teacher, t = make(seed=6, k=k)
    tau, is_clip = 0.9, 1.5
    spec = loss_spec("pg", {"tau": tau, "is_clip": is_clip, "baseline": baseline, "trust_region": trust}, "p")
    out, grad = run(DistillLoss(spec, behavior_temperature=temperature), logits, t)

    def ref(z):
        lq_all = torch.log_softmax(z, -1)
        a = t.sampled_ids[:, None]
        lq = lq_all.gather(1, a)[:, 0]
        lq_t = torch.log_softmax(z / temperature, -1).gather(1, a)[:, 0]
        ratio = torch.exp(lq_t - t.behavior_logprob.double()).clamp(max=is_clip).detach()
        adv = (t.teacher_logprob.double() - lq).clamp(-tau, tau).detach()
        in_s = torch.zeros(N, V, dtype=torch.bool).scatter_(1, t.topk_ids, True)   # outcomes: S and one tail
        q, p = lq_all.exp().detach(), teacher.exp()
        q_tail, p_tail = (q * ~in_s).sum(1).clamp(min=1e-6), (p * ~in_s).sum(1).clamp(min=1e-6)
        expected = ((q * (teacher - lq_all.detach()).clamp(-tau, tau)) * in_s).sum(1) \
            + q_tail * (p_tail.log() - q_tail.log()).clamp(-tau, tau)
        full = adv - baseline * expected
        r = torch.exp(lq_t - t.behavior_logprob.double()).detach()
        outside = ((full > 0) & (r > 1 + trust)) | ((full < 0) & (r < 1 - trust)) if trust > 0 else r < 0
        kept.append(~outside)
        return (-full * ratio * lq * (~outside)).mean()

    kept: list[torch.Tensor] = []
    want, want_grad = dense(ref, logits)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)
    if trust > 0:   # the region drops some tokens and keeps others (the case is not vacuous)
        assert 0 < int(kept[0].sum()) < N
    if baseline > 0:   # the baseline changes the update (not a no-op)
        plain, plain_grad = run(DistillLoss(loss_spec("pg", {"tau": tau, "is_clip": is_clip}, "p"),
                                            behavior_temperature=temperature), logits, t)
        assert not torch.allclose(plain_grad, grad)


def test_pg_baseline_refuses_sampled_targets():
    logits, _, t = make(k=4)
    t = Targets(**{**t.__dict__, "entry_weights": torch.ones(N, 4, dtype=torch.float64)})
    with pytest.raises(ValueError, match="baseline needs exact top-k shards"):
        run(DistillLoss(loss_spec("pg", {"baseline": 1.0}, "p")), logits, t)


@pytest.mark.parametrize("mode,params", [("fkl", {}), ("jsd", {}), ("pg", {}), ("pg", {"baseline": 1.0})])
def test_fused_path_matches_logits_path(mode, params):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    _, _, t = make(seed=2, k=4)
    objective = DistillLoss(loss_spec(mode, params, "p"), ce_weight=0.3, tip_fraction=0.6, chunk_size=3,
                            behavior_temperature=0.8)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    a = objective(t, 0.0, logits=h1 @ w1.t())
    a.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    b = objective(t, 0.0, hidden=h2, weight=w2)
    b.loss.backward()
    assert a.selected == b.selected < N
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-7)


def test_all_tokens_masked_gives_zero_loss_with_a_graph():
    logits, _, t = make(mask=[False] * N)
    out, grad = run(DistillLoss(LossSpec("fkl", {})), logits, t)
    assert out.loss.item() == 0.0 and out.tokens == 0 and (grad == 0).all()


def test_taid_t_follows_a_linear_schedule_unless_fixed():
    spec = loss_spec("taid", {}, "params.yaml: distill")
    assert spec.at(0.0) == {"t": 0.4} and spec.at(1.0) == {"t": 1.0}
    assert spec.at(0.5)["t"] == pytest.approx(0.7)
    assert loss_spec("taid", {"t_start": 0.0, "t_end": 0.5}, "p").at(0.5)["t"] == pytest.approx(0.25)
    assert loss_spec("taid", {"t": 0.3}, "p").at(0.9) == {"t": 0.3}
    with pytest.raises(ConfigError, match="not both"):
        loss_spec("taid", {"t": 0.3, "t_end": 0.9}, "p")


def test_taid_loss_changes_with_progress():
    logits, _, t = make(k=4)
    objective = DistillLoss(loss_spec("taid", {}, "p"))
    early, _ = run(objective, logits, t, progress=0.0)
    late, _ = run(objective, logits, t, progress=1.0)
    fkl, _ = run(DistillLoss(LossSpec("fkl", {})), logits, t)
    assert early.loss.item() != pytest.approx(late.loss.item())
    assert late.loss.item() == pytest.approx(fkl.loss.item(), rel=1e-6)   # t = 1 is the forward KL


@pytest.mark.parametrize("mode,params,match", [
    ("jsd", {"bta": 0.5}, r"params\.yaml: distill\.loss_params\.bta: not a parameter of loss 'jsd'; allowed: beta"),
    ("jsd", {"beta": 1.5}, r"params\.yaml: distill\.loss_params\.beta: .*outside"),
    ("taid", {"t_start": -1}, r"params\.yaml: distill\.loss_params\.t_start: .*outside"),
    ("fkl", {"beta": 0.5}, r"distill\.loss_params\.beta: not a parameter of loss 'fkl'; allowed: none"),
    ("kl", {}, r"params\.yaml: distill\.loss: 'kl' is not a loss mode"),
    ("pg", {"baseline": 2}, r"params\.yaml: distill\.loss_params\.baseline: 2 is not a number in \[0\.0, 1\.0\]"),
    ("fkl", {"baseline": 1}, r"distill\.loss_params\.baseline: not a parameter of loss 'fkl'"),
    ("pg", {"trust_region": 1.5}, r"distill\.loss_params\.trust_region: 1\.5 is not a number in \[0\.0, 1\.0\]"),
])
def test_bad_loss_settings_name_the_key(mode, params, match):
    with pytest.raises(ConfigError, match=match):
        loss_spec(mode, params, "params.yaml: distill")


def test_every_kernel_mode_is_one_loss_record():
    assert list(LOSSES) == list(KERNEL_MODES)
    for name, loss in LOSSES.items():
        assert loss.kernel is KERNEL_MODES[name]
        spec = loss_spec(name, {}, "p")   # every default is valid
        assert spec.objective == {k: p.default for k, p in loss.objective.items()}
        assert set(spec.params) | set(spec.schedule) == set(loss.kernel.params)
        # every key the record allows is accepted on its own, at its default
        defaults = {**loss.kernel.defaults, **{k: p.default for k, p in loss.objective.items()},
                    **{k: v for s in loss.schedules.values() for k, v in ((s.start_key, s.start), (s.end_key, s.end))}}
        assert set(loss.allowed_keys) == set(defaults)
        for key in loss.allowed_keys:
            loss_spec(name, {key: defaults[key]}, "p")


def test_the_objective_uses_the_records_term(monkeypatch):
    """DistillLoss builds the term its mode's record names, with the record's objective params."""
    seen = []

    class Spy(KernelTerm):
        def loss(self, targets, params, student, keep, weights):
            seen.append((self.mode, dict(params), int(keep.sum())))
            return super().loss(targets, params, student, keep, weights)

    monkeypatch.setitem(LOSSES, "rkl", dataclasses.replace(LOSSES["rkl"], term=Spy))
    logits, teacher, t = make(k=V)
    out, _ = run(DistillLoss(loss_spec("rkl", {}, "p")), logits, t)
    assert seen == [("rkl", {}, N)]
    want, _ = dense(lambda z: (torch.log_softmax(z, -1).exp() * (torch.log_softmax(z, -1) - teacher)).sum(-1).mean(),
                    logits)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-6, atol=1e-7)
    assert isinstance(DistillLoss(loss_spec("pg", {"baseline": 0.5}, "p")).term, PolicyGradient)
    assert DistillLoss(loss_spec("pg", {"baseline": 0.5}, "p")).term.baseline == 0.5
