"""`pg`: Lightning OPD's policy gradient on the sampled token, with its baseline and trust region.

The kernel computes the paper's loss −A·r·log q(a), A = clip(log p_T(a) − log q(a), ±tau), r the clipped
importance ratio against the behaviour log-prob. This term adds, all off by default:

* A baseline (`loss_params.baseline` b in [0, 1]; 0 is Lightning OPD's loss exactly as the paper states
  it): the advantage becomes A(a) − b·E_q[A], where E_q[A] = sum_o q_o · clip(log p_o − log q_o, ±tau)
  over the k+1 outcomes S ∪ {tail}, from the student's own logits (stop-grad). Why: on a
  near-deterministic teacher a wrong sampled digit gets A = −tau and a right one only about +0.1, so the
  pushes down on the few wrong digits dominate the shared embeddings and drag the right digits down
  with them (README "Losses"). Subtracting the expected advantage, which is about −tau · q(wrong), leaves
  the expected gradient unchanged (E_q[∇ log q] = 0 for a constant baseline) but turns the right digits'
  advantage clearly positive. It is added as a cross-entropy kernel call weighted by b·E_q[A]·ratio, so
  the pg kernel itself is untouched. The tail bucket stands in for its tokens (their own teacher
  log-probs are not stored), as in every other mode; sampled-target shards have no tail bucket and are
  refused.
* A trust region (`loss_params.trust_region` ε in [0, 1]; 0 is off, the paper's loss): PPO's clipped
  surrogate min(r·A, clip(r, 1 ± ε)·A) against the stored behaviour log-probs, applied as a per-token
  weight of 0 where the unclipped ratio r = q_T(a)/π_ref,T(a) has already left 1 ± ε in the direction
  the advantage (with its baseline) pushes, else 1. Why: offline OPD reuses each sampled token for
  several epochs, and without the region the same wrong token is pushed down on every pass long after
  its probability fell, moving mass to whatever the student already prefers. It is a weight, so the
  kernels are unchanged.
* Reward extrapolation, ExOPD (`loss_params.reward_scale` λ > 0, default 1; `loss_params.reference`
  `behavior` or `student`): Yang et al., "Learning beyond Teacher: Generalized On-Policy Distillation with
  Reward Extrapolation" (arXiv 2602.12125) read OPD as dense KL-constrained RL, max E[λ·(log p_T − log π_ref)
  − (log q − log π_ref)] per token, whose advantage is A = λ·(log p_T(a) − log π_ref(a)) − (log q(a) −
  log π_ref(a)). λ = 1 is OPD whatever the reference (π_ref cancels: A = log p_T(a) − log q(a)); λ > 1
  extrapolates the reward. The reference is π_ref itself (`behavior`: the log-prob stored in the shards at
  sampling time; the paper's default, the student before OPD) or the current student (`student`, stop-grad:
  A = λ·(log p_T − log q)). It enters the kernel as an extrapolated teacher log-prob
  λ·log p_T(a) + (1 − λ)·log π_ref(a), so the kernel's clip(· − log q(a), ±tau) is the clipped ExOPD
  advantage; λ = 1 leaves the inputs untouched. The baseline takes E_q[clip(λ·(log p − log q), ±tau)],
  exact for `student`; for `behavior` it leaves out (λ − 1)·KL(q‖π_ref), because only the sampled token's
  π_ref log-prob is stored (any baseline that does not depend on the token keeps the gradient unbiased).
  `behavior` needs rollouts sampled at temperature 1, where the stored log-probs are π_ref's own.
* The importance ratio exp(log q(a) − log π_ref(a)) compares log-probs at the same temperature: the
  behaviour log-prob was stored at the rollout's sampling temperature T (its footer's
  `sampling_temperature`), so the student's log q_T(a) = log_softmax(z / T)(a) is used for the ratio
  (passed to the kernel as an adjusted behaviour log-prob; the kernel treats the ratio as a constant).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, NamedTuple, Optional

import torch

from opd_kernels.modes import LOGP_MIN, TAIL_EPS_FP32, Param
from offline_opd.train.terms import Choice, KernelTerm, Student, Targets

# The loss_params pg handles itself (never sent to the kernels): name -> default and range, or options.
PG_PARAMS: dict[str, Param | Choice] = {
    "baseline": Param(0.0, 0.0, 1.0), "trust_region": Param(0.0, 0.0, 1.0),
    "reward_scale": Param(1.0, 0.0, math.inf, low_inclusive=False),
    "reference": Choice("behavior", ("behavior", "student")),
}


class Corrections(NamedTuple):
    """Per token, what `PolicyGradient._corrections` hands the kernel call (see its docstring)."""

    expected: torch.Tensor   # b's E_q[A]·r (0 without a baseline)
    behavior: torch.Tensor   # behaviour log-prob shifted for the temperature-matched ratio
    inside: torch.Tensor     # trust-region weight, 1 or 0
    reward: torch.Tensor     # the (extrapolated) teacher log-prob the kernel's advantage reads


class PolicyGradient(KernelTerm):
    """pg's term: the kernel's policy gradient on the sampled token, with the corrections above."""

    def __init__(self, mode: str, objective: Mapping[str, float], *, behavior_temperature: float = 1.0) -> None:
        super().__init__(mode, objective, behavior_temperature=behavior_temperature)
        prm = {name: objective.get(name, p.default) for name, p in PG_PARAMS.items()}
        self.baseline, self.trust = prm["baseline"], prm["trust_region"]
        self.scale, self.reference = prm["reward_scale"], prm["reference"]
        self.behavior_temperature = behavior_temperature
        if self.scale != 1.0 and self.reference == "behavior" and behavior_temperature != 1.0:
            raise ValueError(f"reference: behavior with reward_scale {self.scale:g} reads π_ref's log-probs from the "
                             f"shards, but the rollouts were sampled at temperature {behavior_temperature:g}, so "
                             f"they hold π_ref's tempered log-probs; set reference: student, or sample the "
                             f"rollouts at rollouts.temperature: 1")

    def inputs(self, targets: Targets) -> dict[str, Optional[torch.Tensor]]:
        return dict(sampled_ids=targets.sampled_ids, teacher_sampled_logprob=targets.teacher_logprob,
                    behavior_logprob=targets.behavior_logprob)

    def loss(self, targets: Targets, params: dict[str, float], student: Student, keep: torch.Tensor,
             weights: torch.Tensor) -> torch.Tensor:
        extra = None
        if self.baseline > 0 or self.trust > 0 or self.behavior_temperature != 1.0 or self.scale != 1.0:
            fix = self._corrections(targets, params, student)
            targets = dataclasses.replace(targets, behavior_logprob=fix.behavior,
                                          **({"teacher_logprob": fix.reward} if self.scale != 1.0 else {}))
            weights = weights * fix.inside.to(weights.dtype)
            if self.baseline > 0:
                # −(A − b·E[A]·r)·log q(a): pg's −A·r·log q(a) plus weight −b·E[A]·r on the CE −log q(a)
                extra = student.cross_entropy(targets, keep, weights * -self.baseline * fix.expected).sum()
        div = super().loss(targets, params, student, keep, weights)
        return div if extra is None else div + extra

    def signal(self, targets: Targets, params: dict[str, float], logits: torch.Tensor, lse: torch.Tensor,
               backend: str) -> torch.Tensor:
        """pg's loss is not a divergence: the signal is |A| = |reward log-prob − log q(a)| on the sampled token."""
        lq = logits.float().gather(1, targets.sampled_ids[:, None].long())[:, 0] - lse
        return (self.reward(targets.teacher_logprob.float(), targets.behavior_logprob.float(), lq) - lq).abs()

    def reward(self, teacher: torch.Tensor, behavior: torch.Tensor, lq_a: torch.Tensor) -> torch.Tensor:
        """The teacher log-prob the advantage reads: λ·log p_T(a) + (1 − λ)·log π_ref(a), with π_ref the stored
        behaviour log-prob or the student's own log q(a); log p_T(a) itself at λ = 1."""
        if self.scale == 1.0:
            return teacher
        ref = behavior if self.reference == "behavior" else lq_a
        return self.scale * teacher + (1.0 - self.scale) * ref

    @torch.no_grad()
    def _corrections(self, targets: Targets, params: dict[str, float], student: Student) -> Corrections:
        """Per token: the baseline E_q[A]·r (r the clipped importance ratio, as the kernel applies it),
        the behaviour log-prob shifted so that the kernel's ratio exp(log q(a) − shifted) equals
        exp(log q_T(a) − behaviour) at the rollouts' sampling temperature T, the trust-region weight:
        0 where PPO's clipped surrogate min(r·A, clip(r, 1 ± trust)·A) has no gradient (r already moved
        past 1 ± trust in the direction the advantage A − b·E_q[A] pushes), else 1 (always 1 if trust is 0),
        and the reward log-prob (`reward`: ExOPD's extrapolated teacher log-prob)."""
        if self.baseline > 0 and targets.entry_weights is not None:
            raise ValueError("pg's baseline needs exact top-k shards (a tail bucket); these shards hold "
                             "sampled targets: set distill.loss_params.baseline to 0 or use topk shards")
        tau, log_clip = params["tau"], math.log(params["is_clip"])
        cd = torch.float64 if student.source.dtype == torch.float64 else torch.float32   # as the kernels compute
        expected = torch.empty(targets.mask.shape[0], dtype=cd, device=targets.mask.device)
        behavior, inside, reward = torch.empty_like(expected), torch.ones_like(expected), torch.empty_like(expected)
        for s, e, z in student.chunks():
            t = targets.rows(s, e)
            zf = z.to(cd)
            lq_all = torch.log_softmax(zf, dim=-1)
            a = t.sampled_ids[:, None].long()
            lq_a = lq_all.gather(1, a)[:, 0]
            lq_t = torch.log_softmax(zf / self.behavior_temperature, dim=-1).gather(1, a)[:, 0]
            log_r = lq_t - t.behavior_logprob.to(cd)   # the ratio at the sampling temperature
            shifted = lq_a - log_r
            ratio = torch.exp(log_r.clamp(max=log_clip))
            reward[s:e] = self.reward(t.teacher_logprob.to(cd), t.behavior_logprob.to(cd), lq_a)
            if self.baseline > 0:
                expected[s:e] = expected_advantage(lq_all, t.topk_ids, t.topk_logprobs, t.tail_logprob, tau,
                                                   self.scale) * ratio
            else:
                expected[s:e] = 0.0
            behavior[s:e] = shifted
            if self.trust > 0:
                adv = (reward[s:e] - lq_a).clamp(-tau, tau) * ratio - self.baseline * expected[s:e]
                r = log_r.exp()
                inside[s:e] = torch.where(((adv > 0) & (r > 1 + self.trust)) | ((adv < 0) & (r < 1 - self.trust)),
                                          0.0, 1.0)
        return Corrections(expected, behavior, inside, reward)


def expected_advantage(lq_all: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                       tail_logprob: Optional[torch.Tensor], tau: float, scale: float = 1.0) -> torch.Tensor:
    """E_q[clip(scale·(log p − log q), ±tau)] over the k+1 outcomes S ∪ {tail}, per row (in lq_all's dtype);
    `scale` is ExOPD's reward scale λ with the student as reference.

    tail_logprob None: the teacher tail is rebuilt as 1 − sum_S p (floored like the kernels do)."""
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < lq_all.shape[1])
    lq = torch.where(valid, lq_all.gather(1, torch.where(valid, ids, torch.zeros_like(ids))), 0.0)
    lp = torch.where(valid, topk_logprobs.to(lq_all.dtype).clamp(LOGP_MIN, 0.0), 0.0)
    q = torch.where(valid, lq.exp(), 0.0)
    terms = (q * (scale * (lp - lq)).clamp(-tau, tau)).sum(1)
    q_tail = (1.0 - q.sum(1)).clamp(min=TAIL_EPS_FP32)
    if tail_logprob is None:
        lp_tail = torch.log((1.0 - torch.where(valid, lp.exp(), 0.0).sum(1)).clamp(min=TAIL_EPS_FP32))
    else:
        lp_tail = tail_logprob.to(lq_all.dtype).clamp(LOGP_MIN, 0.0)
    return terms + q_tail * (scale * (lp_tail - q_tail.log())).clamp(-tau, tau)
