"""The distillation objective on top of the divergence kernels (docs/design.md §6, last paragraph).

The divergence math lives in `kernels` (one implementation per mode, tested against a reference).
This module only decides which tokens count and how much:

* Response-token mask: only response positions carry loss; the mean is over the tokens that count,
  so a batch of long responses and a batch of short ones get the same scale.
* TIP-style selection (`distill.tip_fraction` < 1): keep the tokens that are informative for the
  student: high student entropy, or low entropy with a high divergence to the teacher (confidently
  wrong). Each response token gets its rank by student entropy and its rank by divergence; its score is
  the larger of the two, and the top `ceil(fraction · n)` scores are kept (ties: earlier token first).
  A token that is low on both (confident and already agreeing) is what gets dropped. The divergence
  loss is then averaged over the kept tokens, so its scale does not shrink with the fraction.
* CE term (`distill.ce_weight` > 0): cross-entropy on the sampled tokens, averaged over all response
  tokens. It is computed by the same kernel as the forward KL against a point-mass teacher (the sampled
  token with log-prob 0), which is exactly −log q(a) up to the kernel's 1e-6 tail floor, and keeps the
  memory benefits (no autograd-saved [N, V] softmax, fused lm_head on GPU).
* `pg` with a baseline (`loss_params.baseline` b in [0, 1]; 0 is Lightning OPD's loss exactly as the
  paper states it): the advantage becomes A(a) − b·E_q[A], where E_q[A] = sum_o q_o · clip(log p_o − log q_o,
  ±tau) over the k+1 outcomes S ∪ {tail}, from the student's own logits (stop-grad). Why: on a
  near-deterministic teacher a wrong sampled digit gets A = −tau and a right one only about +0.1, so the
  pushes down on the few wrong digits dominate the shared embeddings and drag the right digits down
  with them (README "Losses"). Subtracting the expected advantage, which is about −tau · q(wrong), leaves
  the expected gradient unchanged (E_q[∇ log q] = 0 for a constant baseline) but turns the right digits'
  advantage clearly positive. It is added as a cross-entropy kernel call weighted by b·E_q[A]·ratio, so
  the pg kernel itself is untouched. The tail bucket stands in for its tokens (their own teacher
  log-probs are not stored), as in every other mode; sampled-target shards have no tail bucket and are
  refused.
* `pg` with a trust region (`loss_params.trust_region` ε in [0, 1]; 0 is off, the paper's loss): PPO's
  clipped surrogate min(r·A, clip(r, 1 ± ε)·A) against the stored behaviour log-probs, applied as a
  per-token weight of 0 where the unclipped ratio r = q_T(a)/π_ref,T(a) has already left 1 ± ε in the
  direction the advantage (with its baseline) pushes, else 1. Why: offline OPD reuses each sampled
  token for several epochs, and without the region the same wrong token is pushed down on every pass
  long after its probability fell, moving mass to whatever the student already prefers. It is a weight,
  so the kernels are unchanged.
* pg's importance ratio exp(log q(a) − log π_ref(a)) compares log-probs at the same temperature: the
  behaviour log-prob was stored at the rollout's sampling temperature T (its footer's
  `sampling_temperature`), so the student's log q_T(a) = log_softmax(z / T)(a) is used for the ratio
  (passed to the kernel as an adjusted behaviour log-prob; the kernel treats the ratio as a constant).
* TAID: `t` is either fixed (`loss_params.t`) or ramped linearly from `t_start` to `t_end` over the
  training steps (defaults 0.4 → 1.0). TAID's adaptive rule (which raises t faster when the loss
  stops improving) is deliberately not used: a linear ramp depends only on the step, so a resumed run
  and an uninterrupted one see the same t.

All per-token weights are folded into the kernel call (`weights=`), so backward sees grad_output == 1
and costs nothing extra, on the logits path and on the fused-linear path alike.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import torch

from opd_kernels import MODE_PARAMS, MODES, check_mode_params, fused_linear_sparse_divergence, sparse_divergence
from opd_kernels.modes import LOGP_MIN, TAIL_EPS_FP32
from opd_kernels.reference import take_rows
from offline_opd.config import ConfigError, DistillConfig

# Rows per chunk of the TIP statistics pass: about 128 MiB per float32 [chunk, V] temporary, so the
# pass stays well under the memory the fused path saves, in a few dozen chunks at real vocabularies.
STATS_CHUNK_ELEMS = 1 << 25

# Kernel parameters that may follow a schedule instead of a fixed value: param -> (start key, end key,
# start default, end default). Setting the parameter itself in loss_params fixes it instead.
# Parameters the objective handles itself (not the kernels): mode -> {param: (default, low, high)}.
OBJECTIVE_PARAMS: dict[str, dict[str, tuple[float, float, float]]] = {
    "pg": {"baseline": (0.0, 0.0, 1.0), "trust_region": (0.0, 0.0, 1.0)},
}

SCHEDULABLE: dict[str, dict[str, tuple[str, str, float, float]]] = {
    "taid": {"t": ("t_start", "t_end", 0.4, 1.0)},
}


@dataclass(frozen=True)
class LossSpec:
    """A validated loss mode with its fixed kernel parameters and the linearly scheduled ones."""

    mode: str
    params: dict[str, float]
    schedule: dict[str, tuple[float, float]] = field(default_factory=dict)
    objective: dict[str, float] = field(default_factory=dict)   # OBJECTIVE_PARAMS values, never sent to kernels

    def at(self, progress: float) -> dict[str, float]:
        """Kernel parameters at `progress` in [0, 1] (fraction of training done)."""
        p = min(max(progress, 0.0), 1.0)
        return {**self.params, **{k: a + (b - a) * p for k, (a, b) in self.schedule.items()}}


def loss_spec(mode: str, raw: Mapping[str, Any], where: str) -> LossSpec:
    """Validate `loss` and `loss_params` against the kernels' parameter table.

    `where` names the params section in errors, e.g. "params.yaml: distill"; a bad entry is reported as
    "params.yaml: distill.loss_params.beta: ...".
    """
    if mode not in MODES:
        raise ConfigError(f"{where}.loss: {mode!r} is not a loss mode; use one of {', '.join(MODES)}")
    raw = dict(raw)
    objective: dict[str, float] = {}
    for name, (default, lo, hi) in OBJECTIVE_PARAMS.get(mode, {}).items():
        value = raw.pop(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
            raise ConfigError(f"{where}.loss_params.{name}: {value!r} is not a number in [{lo}, {hi}]")
        objective[name] = float(value)
    schedule: dict[str, tuple[float, float]] = {}
    for param, (k0, k1, d0, d1) in SCHEDULABLE.get(mode, {}).items():
        if param in raw:
            if k0 in raw or k1 in raw:
                raise ConfigError(f"{where}.loss_params.{param}: set either {param} (fixed) or {k0}/{k1} "
                                  f"(linear schedule), not both")
            continue
        ends = (raw.pop(k0, d0), raw.pop(k1, d1))
        for key, value in zip((k0, k1), ends):
            _check_value(mode, param, value, f"{where}.loss_params.{key}")
        schedule[param] = (float(ends[0]), float(ends[1]))
    allowed = (list(MODE_PARAMS[mode]) + [k for p in SCHEDULABLE.get(mode, {}).values() for k in p[:2]]
               + list(OBJECTIVE_PARAMS.get(mode, {})))
    for name, value in raw.items():
        if name not in MODE_PARAMS[mode]:
            raise ConfigError(f"{where}.loss_params.{name}: not a parameter of loss {mode!r}; "
                              f"allowed: {', '.join(allowed) or 'none'}")
        _check_value(mode, name, value, f"{where}.loss_params.{name}")
    params = {k: v for k, v in check_mode_params(mode, raw).items() if k not in schedule}
    return LossSpec(mode, params, schedule, objective)


def _check_value(mode: str, param: str, value: Any, where: str) -> None:
    try:
        check_mode_params(mode, {param: value})
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class Targets:
    """Teacher and behaviour-policy data for N response tokens, row-aligned with the student's rows."""

    sampled_ids: torch.Tensor       # [N] the token π_ref sampled (pg's action, the CE label)
    teacher_logprob: torch.Tensor   # [N] teacher log-prob of the sampled token (exact)
    behavior_logprob: torch.Tensor  # [N] π_ref log-prob of the sampled token at sampling time
    topk_ids: torch.Tensor          # [N, k] teacher top-k ids (k may be 0)
    topk_logprobs: torch.Tensor     # [N, k] their teacher log-probs
    mask: torch.Tensor              # [N] bool, tokens that carry loss
    tail_logprob: Optional[torch.Tensor] = None   # [N] teacher log-mass outside topk_ids (None: rebuilt)
    entry_weights: Optional[torch.Tensor] = None  # [N, k] importance weights of sampled entries (None: top-k)


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor                 # scalar the optimizer minimises (divergence + ce_weight · CE)
    divergence: torch.Tensor           # detached: kernel loss summed over the selected tokens / norm[0]
    ce: Optional[torch.Tensor]         # detached: CE summed over response tokens / norm[1] (None when ce_weight = 0)
    tokens: int                        # response tokens in the batch
    selected: int                      # tokens carrying the divergence loss (TIP)


def select_tokens(entropy: torch.Tensor, divergence: torch.Tensor, mask: torch.Tensor,
                  fraction: float) -> torch.Tensor:
    """TIP-style selection: the `ceil(fraction · n)` masked tokens ranking highest on entropy or divergence.

    Ranks are taken among the n masked tokens (0 = lowest); a token's score is max(entropy rank,
    divergence rank), so it survives by being uncertain or by being confidently far from the teacher.
    """
    n = int(mask.sum())
    budget = tip_budget(n, fraction)
    if budget == n:
        return mask.clone()
    score = torch.maximum(_masked_rank(entropy, mask), _masked_rank(divergence, mask))
    score = torch.where(mask, score, torch.full_like(score, -1))
    keep_idx = torch.argsort(score, descending=True, stable=True)[:budget]
    keep = torch.zeros_like(mask)
    keep[keep_idx] = True
    return keep


def tip_budget(n: int, fraction: float) -> int:
    """How many of n tokens TIP keeps: ceil(fraction · n), at least one of a non-empty batch."""
    return min(n, max(1, math.ceil(fraction * n)))


def _masked_rank(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rank of each masked value among the masked values (0 = smallest, ties by position)."""
    v = torch.where(mask, values.float(), torch.full_like(values, -math.inf, dtype=torch.float32))
    order = torch.argsort(v, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank - (mask.numel() - int(mask.sum()))


class DistillLoss:
    """The configured objective: call it with the student's logits [N, V], or with hidden [N, H] and the
    lm_head weight [V, H] for the fused path (the [N, V] logits are then never materialised)."""

    def __init__(self, spec: LossSpec, *, backend: str = "auto", ce_weight: float = 0.0,
                 tip_fraction: float = 1.0, chunk_size: Optional[int] = None,
                 behavior_temperature: float = 1.0) -> None:
        """`behavior_temperature`: the rollouts' sampling temperature (pg's importance ratio)."""
        if not behavior_temperature > 0:
            raise ValueError(f"behavior_temperature must be > 0, got {behavior_temperature}")
        self.behavior_temperature = behavior_temperature
        if not 0.0 < tip_fraction <= 1.0:
            raise ValueError(f"tip_fraction must be in (0, 1], got {tip_fraction}")
        if ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0, got {ce_weight}")
        self.spec, self.backend, self.ce_weight = spec, backend, ce_weight
        self.tip_fraction, self.chunk_size = tip_fraction, chunk_size

    def __call__(self, targets: Targets, progress: float, *, logits: Optional[torch.Tensor] = None,
                 hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                 norm: Optional[tuple[float, float]] = None) -> LossOutput:
        """`norm`: the (divergence, CE) token counts the sums are divided by; by default this batch's own
        (selected tokens, response tokens). The trainer passes the counts of the whole global batch."""
        if (logits is None) == (hidden is None) or (hidden is None) != (weight is None):
            raise ValueError("pass either logits, or hidden and weight")
        mask = targets.mask.bool()
        n = int(mask.sum())
        if n == 0:  # nothing to learn from; keep the graph so every rank runs the same backward
            src = logits if logits is not None else hidden
            zero = src.sum() * 0.0
            return LossOutput(zero, zero.detach(), None, 0, 0)
        params = self.spec.at(progress)
        keep = mask
        if self.tip_fraction < 1.0:
            entropy, signal = self._token_stats(targets, params, logits, hidden, weight)
            keep = select_tokens(entropy, signal, mask, self.tip_fraction)
        n_sel = int(keep.sum())
        div_norm, ce_norm = norm if norm is not None else (n_sel, n)
        ce = None
        if self.ce_weight > 0:
            ce_w = mask.float() * (self.ce_weight / ce_norm)
            ce_tok = self._kernel(
                "fkl", {}, targets.sampled_ids[:, None], torch.zeros_like(targets.teacher_logprob)[:, None],
                mask, ce_w, None, logits, hidden, weight, inplace=False)
            ce = ce_tok.sum()
        baseline = self.spec.objective.get("baseline", 0.0)
        trust = self.spec.objective.get("trust_region", 0.0)
        div_w = keep.float() / div_norm
        if self.spec.mode == "pg" and (baseline > 0 or trust > 0 or self.behavior_temperature != 1.0):
            expected_adv, behavior, inside = self._pg_terms(targets, params, baseline, trust, logits, hidden, weight)
            targets = dataclasses.replace(targets, behavior_logprob=behavior)
            div_w = div_w * inside.to(div_w.dtype)
            if baseline > 0:
                # −(A − b·E[A]·r)·log q(a) = pg's −A·r·log q(a) plus weight −b·E[A]·r on the CE −log q(a).
                base_w = div_w * -baseline * expected_adv
                ce_extra = self._kernel("fkl", {}, targets.sampled_ids[:, None],
                                        torch.zeros_like(targets.teacher_logprob)[:, None], keep, base_w,
                                        None, logits, hidden, weight, inplace=False).sum()
        div = self._kernel(self.spec.mode, params, targets.topk_ids, targets.topk_logprobs, keep,
                           div_w, targets, logits, hidden, weight, inplace=True).sum()
        if self.spec.mode == "pg" and baseline > 0:
            div = div + ce_extra
        total = div if ce is None else div + ce
        return LossOutput(total, div.detach(), None if ce is None else ce.detach() / self.ce_weight, n, n_sel)

    def _kernel(self, mode: str, params: dict, topk_ids, topk_logprobs, mask, weights,
                targets: Optional[Targets], logits, hidden, weight, *, inplace: bool) -> torch.Tensor:
        """One kernel call; pg reads the sampled-token fields of `targets`."""
        kw: dict[str, Any] = dict(mask=mask, weights=weights, backend=self.backend, **params)
        if mode == "pg":
            kw.update(sampled_ids=targets.sampled_ids, teacher_sampled_logprob=targets.teacher_logprob,
                      behavior_logprob=targets.behavior_logprob)
        elif targets is not None:
            kw.update(tail_logprob=targets.tail_logprob, entry_weights=targets.entry_weights)
        if hidden is not None:
            return fused_linear_sparse_divergence(hidden, weight, topk_ids, topk_logprobs, mode,
                                                  chunk_size=self.chunk_size, **kw)
        # In place is safe only for the last reader of the logits (the divergence call, after CE).
        return sparse_divergence(logits, topk_ids, topk_logprobs, mode, inplace_grad=inplace,
                                 chunk_size=self.chunk_size, **kw)

    @torch.no_grad()
    def _pg_terms(self, targets: Targets, params: dict, baseline: float, trust: float, logits, hidden,
                  weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per token: the baseline E_q[A]·r (r the clipped importance ratio, as the kernel applies it),
        the behaviour log-prob shifted so that the kernel's ratio exp(log q(a) − shifted) equals
        exp(log q_T(a) − behaviour) at the rollouts' sampling temperature T, and the trust-region weight:
        0 where PPO's clipped surrogate min(r·A, clip(r, 1 ± trust)·A) has no gradient (r already moved
        past 1 ± trust in the direction the advantage A − b·E_q[A] pushes), else 1 (always 1 if trust is 0)."""
        if baseline > 0 and targets.entry_weights is not None:
            raise ValueError("pg's baseline needs exact top-k shards (a tail bucket); these shards hold "
                             "sampled targets: set distill.loss_params.baseline to 0 or use topk shards")
        tau, log_clip = params["tau"], math.log(params["is_clip"])
        src = logits if logits is not None else hidden
        cd = torch.float64 if src.dtype == torch.float64 else torch.float32   # as the kernels compute
        expected = torch.empty(targets.mask.shape[0], dtype=cd, device=targets.mask.device)
        behavior, inside = torch.empty_like(expected), torch.ones_like(expected)
        for s, e, z in _logit_chunks(logits, hidden, weight, self.chunk_size):
            zf = z.to(cd)
            lq_all = torch.log_softmax(zf, dim=-1)
            a = targets.sampled_ids[s:e, None].long()
            lq_a = lq_all.gather(1, a)[:, 0]
            lq_t = torch.log_softmax(zf / self.behavior_temperature, dim=-1).gather(1, a)[:, 0]
            log_r = lq_t - targets.behavior_logprob[s:e].to(cd)   # the ratio at the sampling temperature
            shifted = lq_a - log_r
            ratio = torch.exp(log_r.clamp(max=log_clip))
            if baseline > 0:
                expected[s:e] = _expected_advantage(lq_all, targets.topk_ids[s:e], targets.topk_logprobs[s:e],
                                                    take_rows(targets.tail_logprob, s, e), tau) * ratio
            else:
                expected[s:e] = 0.0
            behavior[s:e] = shifted
            if trust > 0:
                adv = (targets.teacher_logprob[s:e].to(cd) - lq_a).clamp(-tau, tau) * ratio - baseline * expected[s:e]
                r = log_r.exp()
                inside[s:e] = torch.where(((adv > 0) & (r > 1 + trust)) | ((adv < 0) & (r < 1 - trust)), 0.0, 1.0)
        return expected, behavior, inside

    @torch.no_grad()
    def _token_stats(self, targets: Targets, params: dict, logits, hidden, weight) -> tuple[torch.Tensor, torch.Tensor]:
        """Student entropy and a divergence signal per token, for TIP (chunked, no autograd).

        The signal is the kernel's per-token loss for the divergence modes; for pg, whose loss is not a
        divergence, it is |log p_T(a) − log q(a)| on the sampled token.
        """
        entropy = torch.empty(targets.mask.shape[0], dtype=torch.float32, device=targets.mask.device)
        signal = torch.empty_like(entropy)
        for s, e, z in _logit_chunks(logits, hidden, weight, self.chunk_size):
            zf = z.float()
            lse = torch.logsumexp(zf, dim=-1)
            entropy[s:e] = lse - (torch.softmax(zf, dim=-1) * zf).sum(-1)
            if self.spec.mode == "pg":
                lq = zf.gather(1, targets.sampled_ids[s:e, None].long())[:, 0] - lse
                signal[s:e] = (targets.teacher_logprob[s:e].float() - lq).abs()
            else:
                signal[s:e] = sparse_divergence(z, targets.topk_ids[s:e], targets.topk_logprobs[s:e],
                                                self.spec.mode, mask=targets.mask[s:e], backend=self.backend,
                                                tail_logprob=take_rows(targets.tail_logprob, s, e),
                                                entry_weights=take_rows(targets.entry_weights, s, e), **params)
        return entropy, signal


def _expected_advantage(lq_all: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                        tail_logprob: Optional[torch.Tensor], tau: float) -> torch.Tensor:
    """E_q[clip(log p − log q, ±tau)] over the k+1 outcomes S ∪ {tail}, per row (in lq_all's dtype).

    tail_logprob None: the teacher tail is rebuilt as 1 − sum_S p (floored like the kernels do)."""
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < lq_all.shape[1])
    lq = torch.where(valid, lq_all.gather(1, torch.where(valid, ids, torch.zeros_like(ids))), 0.0)
    lp = torch.where(valid, topk_logprobs.to(lq_all.dtype).clamp(LOGP_MIN, 0.0), 0.0)
    q = torch.where(valid, lq.exp(), 0.0)
    terms = (q * (lp - lq).clamp(-tau, tau)).sum(1)
    q_tail = (1.0 - q.sum(1)).clamp(min=TAIL_EPS_FP32)
    if tail_logprob is None:
        lp_tail = torch.log((1.0 - torch.where(valid, lp.exp(), 0.0).sum(1)).clamp(min=TAIL_EPS_FP32))
    else:
        lp_tail = tail_logprob.to(lq_all.dtype).clamp(LOGP_MIN, 0.0)
    return terms + q_tail * (lp_tail - q_tail.log()).clamp(-tau, tau)


def _logit_chunks(logits, hidden, weight, chunk_size: Optional[int]) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Row chunks of the logits, computed from hidden @ weight.T on the fused path (never [N, V] at once)."""
    n = logits.shape[0] if logits is not None else hidden.shape[0]
    vocab = logits.shape[1] if logits is not None else weight.shape[0]
    step = chunk_size or max(1, STATS_CHUNK_ELEMS // vocab)
    w = None if weight is None else weight.to(hidden.dtype)
    for s in range(0, n, step):
        e = min(n, s + step)
        yield s, e, (logits[s:e] if logits is not None else hidden[s:e] @ w.t())


def loss_from_config(cfg: DistillConfig, where: str, behavior_temperature: float = 1.0) -> DistillLoss:
    """The objective `distill` trains with, validated with errors naming `where` (e.g. "params.yaml: distill").

    `behavior_temperature`: the temperature the rollouts were sampled at (their footers' `sampling_temperature`)."""
    return DistillLoss(loss_spec(cfg.loss, cfg.loss_params, where), backend=cfg.kernel_backend,
                       ce_weight=cfg.ce_weight, tip_fraction=cfg.tip_fraction,
                       behavior_temperature=behavior_temperature)
