"""The distillation objective on top of the divergence kernels (design §6, last paragraph).

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
* TAID: `t` is either fixed (`loss_params.t`) or ramped linearly from `t_start` to `t_end` over the
  training steps (defaults 0.4 → 1.0). TAID's adaptive rule (which raises t faster when the loss
  stops improving) is deliberately not used: a linear ramp depends only on the step, so a resumed run
  and an uninterrupted one see the same t.

All per-token weights are folded into the kernel call (`weights=`), so backward sees grad_output == 1
and costs nothing extra, on the logits path and on the fused-linear path alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import torch

from kernels import MODE_PARAMS, MODES, check_mode_params, fused_linear_sparse_divergence, sparse_divergence
from kernels.reference import take_rows
from pipeline.config import ConfigError, DistillConfig

# Rows per chunk of the TIP statistics pass: about 128 MiB per float32 [chunk, V] temporary, so the
# pass stays well under the memory the fused path saves, in a few dozen chunks at real vocabularies.
STATS_CHUNK_ELEMS = 1 << 25

# Kernel parameters that may follow a schedule instead of a fixed value: param -> (start key, end key,
# start default, end default). Setting the parameter itself in loss_params fixes it instead.
SCHEDULABLE: dict[str, dict[str, tuple[str, str, float, float]]] = {
    "taid": {"t": ("t_start", "t_end", 0.4, 1.0)},
}


@dataclass(frozen=True)
class LossSpec:
    """A validated loss mode with its fixed kernel parameters and the linearly scheduled ones."""

    mode: str
    params: dict[str, float]
    schedule: dict[str, tuple[float, float]] = field(default_factory=dict)

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
    allowed = list(MODE_PARAMS[mode]) + [k for p in SCHEDULABLE.get(mode, {}).values() for k in p[:2]]
    for name, value in raw.items():
        if name not in MODE_PARAMS[mode]:
            raise ConfigError(f"{where}.loss_params.{name}: not a parameter of loss {mode!r}; "
                              f"allowed: {', '.join(allowed) or 'none'}")
        _check_value(mode, name, value, f"{where}.loss_params.{name}")
    params = {k: v for k, v in check_mode_params(mode, raw).items() if k not in schedule}
    return LossSpec(mode, params, schedule)


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
                 tip_fraction: float = 1.0, chunk_size: Optional[int] = None) -> None:
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
        div = self._kernel(self.spec.mode, params, targets.topk_ids, targets.topk_logprobs, keep,
                           keep.float() / div_norm, targets, logits, hidden, weight, inplace=True).sum()
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


def _logit_chunks(logits, hidden, weight, chunk_size: Optional[int]) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Row chunks of the logits, computed from hidden @ weight.T on the fused path (never [N, V] at once)."""
    n = logits.shape[0] if logits is not None else hidden.shape[0]
    vocab = logits.shape[1] if logits is not None else weight.shape[0]
    step = chunk_size or max(1, STATS_CHUNK_ELEMS // vocab)
    w = None if weight is None else weight.to(hidden.dtype)
    for s in range(0, n, step):
        e = min(n, s + step)
        yield s, e, (logits[s:e] if logits is not None else hidden[s:e] @ w.t())


def loss_from_config(cfg: DistillConfig, where: str) -> DistillLoss:
    """The objective `distill` trains with, validated with errors naming `where` (e.g. "params.yaml: distill")."""
    if not 0.0 < cfg.tip_fraction <= 1.0:
        raise ConfigError(f"{where}.tip_fraction: {cfg.tip_fraction} is outside (0, 1]; 1.0 keeps every token")
    if cfg.ce_weight < 0:
        raise ConfigError(f"{where}.ce_weight: {cfg.ce_weight} is negative; use 0 to disable the CE term")
    return DistillLoss(loss_spec(cfg.loss, cfg.loss_params, where), backend=cfg.kernel_backend,
                       ce_weight=cfg.ce_weight, tip_fraction=cfg.tip_fraction)
