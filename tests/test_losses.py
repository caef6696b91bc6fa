"""The objective on top of the kernels: masking, averaging, TIP selection, CE term, schedules, validation.

References are dense PyTorch computations over the full vocabulary (k = V, so the k+1-outcome
divergence equals the full one) with ordinary autograd; the module under test goes through the kernels.
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
import torch.nn.functional as F

from offline_opd.config import ConfigError
from opd_kernels import KERNEL_MODES
from offline_opd.train.losses import (LOSSES, SCHEDULE_KEY, DistillLoss, LossSpec, Targets, loss_from_config,
                                      loss_spec, select_tokens)
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


def sampled_logprobs(z: torch.Tensor, t, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log q over the vocabulary, log q(a) of the sampled tokens, and the tempered log q_T(a) of pg's ratio."""
    lq_all = torch.log_softmax(z, -1)
    a = t.sampled_ids[:, None]
    return lq_all, lq_all.gather(1, a)[:, 0], torch.log_softmax(z / temperature, -1).gather(1, a)[:, 0]


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
        lq_all, lq, lq_t = sampled_logprobs(z, t, temperature)
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
                    **{k: v for s in loss.schedules.values() for k, v in ((s.start_key, s.start), (s.end_key, s.end))},
                    **{k: p.default for s in loss.schedules.values() for k, p in s.adaptive.items()},
                    **({SCHEDULE_KEY: "linear"} if loss.schedules else {})}
        assert set(loss.allowed_keys) == set(defaults)
        for key in loss.allowed_keys:   # the adaptive rule's keys with the schedule that reads them
            rule = any(key in s.adaptive for s in loss.schedules.values())
            loss_spec(name, {key: defaults[key], **({SCHEDULE_KEY: "adaptive"} if rule else {})}, "p")


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


# ---- ExOPD: reward extrapolation in pg (Yang et al., Generalized On-Policy Distillation, arXiv 2602.12125) ----

@pytest.mark.parametrize("reference", ["behavior", "student"])
@pytest.mark.parametrize("params,temperature", [({}, 1.0), ({"baseline": 1.0, "trust_region": 0.2}, 0.8),
                                                ({"baseline": 0.5}, 1.0)])
def test_exopd_at_reward_scale_1_is_todays_pg_exactly(reference, params, temperature):
    """λ = 1 is OPD whatever the reference: the same loss and gradient, bit for bit."""
    logits, _, t = make(seed=9, k=4)
    if reference == "behavior" and temperature != 1.0:
        temperature = 1.0
    today, today_grad = run(DistillLoss(loss_spec("pg", params, "p"), behavior_temperature=temperature), logits, t)
    spec = loss_spec("pg", {**params, "reward_scale": 1.0, "reference": reference}, "p")
    got, got_grad = run(DistillLoss(spec, behavior_temperature=temperature), logits, t)
    assert torch.equal(got.loss, today.loss) and torch.equal(got_grad, today_grad)


@pytest.mark.parametrize("reference,scale,baseline,trust,temperature", [
    ("behavior", 1.5, 0.0, 0.0, 1.0), ("behavior", 1.25, 1.0, 0.2, 1.0), ("behavior", 0.5, 0.0, 0.0, 1.0),
    ("student", 1.5, 0.0, 0.0, 1.0), ("student", 1.25, 1.0, 0.2, 0.8)])
def test_exopd_advantage_is_the_papers_dense_reward(reference, scale, baseline, trust, temperature):
    """G-OPD's per-token advantage, written from the paper's objective E[λ·log(p_T/π_ref) − log(q/π_ref)]:
    A = clip(λ·(log p_T(a) − log π_ref(a)) − (log q(a) − log π_ref(a)), ±tau), π_ref the stored behaviour
    log-prob or the student itself (stop-grad); the rest of pg (ratio, baseline E_q[clip(λ·(log p − log q))],
    trust region) as in the test above."""
    logits, teacher, t = make(seed=8, k=4)
    tau, is_clip = 3.0, 1.5
    spec = loss_spec("pg", {"tau": tau, "is_clip": is_clip, "baseline": baseline, "trust_region": trust,
                            "reward_scale": scale, "reference": reference}, "p")
    out, grad = run(DistillLoss(spec, behavior_temperature=temperature), logits, t)

    def ref(z):
        lq_all, lq, lq_t = sampled_logprobs(z, t, temperature)
        log_ref = t.behavior_logprob.double() if reference == "behavior" else lq.detach()
        reward = scale * (t.teacher_logprob.double() - log_ref)       # λ · log(p_T / π_ref)
        kl = lq.detach() - log_ref                                    # log(q / π_ref)
        adv = (reward - kl).clamp(-tau, tau)
        ratio = torch.exp(lq_t - t.behavior_logprob.double()).clamp(max=is_clip).detach()
        in_s = torch.zeros(N, V, dtype=torch.bool).scatter_(1, t.topk_ids, True)
        q, p = lq_all.exp().detach(), teacher.exp()
        q_tail, p_tail = (q * ~in_s).sum(1).clamp(min=1e-6), (p * ~in_s).sum(1).clamp(min=1e-6)
        expected = ((q * (scale * (teacher - lq_all.detach())).clamp(-tau, tau)) * in_s).sum(1) \
            + q_tail * (scale * (p_tail.log() - q_tail.log())).clamp(-tau, tau)
        full = adv - baseline * expected
        r = torch.exp(lq_t - t.behavior_logprob.double()).detach()
        outside = ((full > 0) & (r > 1 + trust)) | ((full < 0) & (r < 1 - trust)) if trust > 0 else r < 0
        return (-full * ratio * lq * (~outside)).mean()

    want, want_grad = dense(ref, logits)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)
    plain = loss_spec("pg", {"tau": tau, "is_clip": is_clip, "baseline": baseline, "trust_region": trust}, "p")
    _, plain_grad = run(DistillLoss(plain, behavior_temperature=temperature), logits, t)
    assert not torch.allclose(plain_grad, grad)   # λ ≠ 1 changes the update


def test_exopd_behavior_reference_needs_untempered_rollouts():
    """The stored behaviour log-probs are π_ref's own only at sampling temperature 1."""
    spec = loss_spec("pg", {"reward_scale": 1.5}, "p")
    with pytest.raises(ValueError, match="reference: student, or sample the rollouts at rollouts.temperature: 1"):
        DistillLoss(spec, behavior_temperature=0.7)
    DistillLoss(loss_spec("pg", {"reward_scale": 1.5, "reference": "student"}, "p"), behavior_temperature=0.7)
    cfg = types.SimpleNamespace(loss="pg", loss_params={"reward_scale": 1.5}, kernel_backend="auto", ce_weight=0.0,
                                tip_fraction=1.0)
    with pytest.raises(ConfigError, match=r"^params\.yaml: distill\.loss_params: reference: behavior"):
        loss_from_config(cfg, "params.yaml: distill", behavior_temperature=0.7)


# ---- adaptive TAID (Shing et al., ICLR 2025, Algorithm 1) ----

def paper_taid_t(losses: list[float], max_steps: int, start: float, end: float, alpha: float,
                 beta: float) -> list[float]:
    """The t each step trains with, from TAID's Algorithm 1: after step n with loss J_n,
    δ = (J_{n-1} − J_n)/(J_{n-1} + ε), m ← β·m + (1 − β)·δ, t ← min(end, max(t_linear(n), t + α·σ(m)·(1 − t)))."""
    t, m, prev, used = start, 0.0, None, []
    for n, loss in enumerate(losses):
        used.append(t)
        if prev is not None:
            m = beta * m + (1 - beta) * (prev - loss) / (prev + 1e-15)
            t_linear = start + (end - start) * n / max_steps
            t = min(end, max(t_linear, t + alpha / (1 + math.exp(-m)) * (1 - t)))
        prev = loss
    return used


# falling fast, stalled, rising, falling again
SCRIPTED_LOSSES = [2.0 * 0.7 ** n for n in range(8)] + [0.16] * 6 + [0.16 + 0.05 * n for n in range(6)] \
    + [0.4 * 0.8 ** n for n in range(10)]


def drive(objective: DistillLoss, losses: list[float], max_steps: int, first_step: int = 0) -> list[float]:
    """Feed `losses` as the losses of steps first_step, first_step + 1, ...; the t each step used."""
    used = []
    for n, loss in enumerate(losses, start=first_step):
        used.append(objective.params_at(n / max_steps)["t"])
        objective.observe(loss, n / max_steps)
    return used


def test_adaptive_taid_t_follows_the_published_update():
    rule = {"t_start": 0.2, "t_end": 0.8, "alpha": 0.07, "beta": 0.6}
    max_steps = 28
    used = drive(DistillLoss(loss_spec("taid", {"schedule": "adaptive", **rule}, "p")), SCRIPTED_LOSSES, max_steps)
    want = paper_taid_t(SCRIPTED_LOSSES, max_steps, 0.2, 0.8, 0.07, 0.6)
    assert used == pytest.approx(want, rel=1e-12, abs=1e-15)
    # the three branches of the update all occur: the momentum step leads while the loss falls, the linear
    # floor takes over once it stalls and rises, and t_end caps it
    floor = [0.2 + 0.6 * (n - 1) / max_steps for n in range(len(used))]   # the ramp at the step t_n came from
    regimes = ["cap" if u == 0.8 else "lead" if u > f + 1e-3 else "floor" if u == pytest.approx(f) else "?"
               for u, f in zip(used[2:], floor[2:])]
    assert {"cap", "lead", "floor"} <= set(regimes) and regimes[0] == "lead" and regimes[-1] == "cap"
    assert all(b >= a for a, b in zip(used, used[1:]))
    # the paper's point: a falling loss moves t faster than a stalled one
    fall = drive(DistillLoss(loss_spec("taid", {"schedule": "adaptive", **rule}, "p")), [1.0 * 0.8 ** n for n in range(6)], 1000)
    flat = drive(DistillLoss(loss_spec("taid", {"schedule": "adaptive", **rule}, "p")), [1.0] * 6, 1000)
    assert fall[-1] > flat[-1] > 0.2


def test_adaptive_taid_state_resumes_the_same_sequence(tmp_path):
    spec = loss_spec("taid", {"schedule": "adaptive", "alpha": 0.1, "beta": 0.7}, "p")
    max_steps, cut = 40, 11
    whole = drive(DistillLoss(spec), SCRIPTED_LOSSES, max_steps)
    first = DistillLoss(spec)
    drive(first, SCRIPTED_LOSSES[:cut], max_steps)
    torch.save({"opd_objective_state": first.state_dict()}, tmp_path / "last.ckpt")   # as the module saves it
    resumed = DistillLoss(spec)
    resumed.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=False)["opd_objective_state"])
    assert drive(resumed, SCRIPTED_LOSSES[cut:], max_steps, first_step=cut) == whole[cut:]
    fresh = drive(DistillLoss(spec), SCRIPTED_LOSSES[cut:], max_steps, first_step=cut)
    assert fresh != whole[cut:]   # the state is what carries the sequence over


def test_adaptive_taid_trains_with_its_current_t():
    logits, _, t = make(k=4)
    objective = DistillLoss(loss_spec("taid", {"schedule": "adaptive", "alpha": 0.5}, "p"))
    drive(objective, [1.0, 0.5, 0.3], 100)
    t_now = objective.params_at(0.03)["t"]
    assert t_now > 0.4 + 0.6 * 0.03
    got, got_grad = run(objective, logits, t, progress=0.03)
    fixed, fixed_grad = run(DistillLoss(loss_spec("taid", {"t": t_now}, "p")), logits, t)
    assert torch.equal(got.loss, fixed.loss) and torch.equal(got_grad, fixed_grad)
    assert objective.scheduled(0.03) == {"t": t_now}


def test_taid_schedule_key_keeps_the_old_meanings():
    assert loss_spec("taid", {"schedule": "linear"}, "p") == loss_spec("taid", {}, "p")
    assert loss_spec("taid", {"schedule": "fixed", "t": 0.3}, "p") == loss_spec("taid", {"t": 0.3}, "p")
    assert loss_spec("taid", {"schedule": "fixed"}, "p").at(0.7) == {"t": 0.5}   # the kernel's default t
    spec = loss_spec("taid", {"schedule": "adaptive"}, "p")
    assert spec.adaptive["t"].alpha == 5e-4 and spec.adaptive["t"].beta == 0.99 and spec.at(0.5) == {}


@pytest.mark.parametrize("params,match", [
    ({"schedule": "cosine"}, r"distill\.loss_params\.schedule: 'cosine' is not one of fixed, linear, adaptive"),
    ({"alpha": 0.1}, r"distill\.loss_params\.alpha: only the adaptive schedule reads it"),
    ({"schedule": "linear", "beta": 0.5}, r"distill\.loss_params\.beta: only the adaptive schedule reads it"),
    ({"schedule": "adaptive", "t": 0.5}, r"distill\.loss_params\.t: set either t \(fixed\) or t_start/t_end"),
    ({"schedule": "fixed", "t_end": 0.5}, r"distill\.loss_params\.t_end: schedule: fixed reads only t"),
    ({"schedule": "adaptive", "t_start": 0.9, "t_end": 0.5}, r"distill\.loss_params\.t_start: 0\.9 is above t_end"),
    ({"schedule": "adaptive", "beta": 1.0}, r"distill\.loss_params\.beta: 1\.0 is not a number in \[0\.0, 1\.0\)"),
    ({"schedule": "adaptive", "alpha": -0.1}, r"distill\.loss_params\.alpha: -0\.1 is not a number"),
])
def test_bad_taid_schedules_name_the_key(params, match):
    with pytest.raises(ConfigError, match=match):
        loss_spec("taid", params, "params.yaml: distill")


def test_bad_exopd_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"distill\.loss_params\.reference: 'teacher' is not one of behavior, student"):
        loss_spec("pg", {"reference": "teacher"}, "params.yaml: distill")
    with pytest.raises(ConfigError, match=r"distill\.loss_params\.reward_scale: 0 is not a number in \(0\.0, inf\]"):
        loss_spec("pg", {"reward_scale": 0}, "params.yaml: distill")
