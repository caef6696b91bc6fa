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
  tokens, computed by the kernels (`terms.Student.cross_entropy` says how).
* The loss modes are one registry, `LOSSES`: one record per mode with its kernel mode (parameters,
  defaults, ranges, kernel id: `opd_kernels.modes.KERNEL_MODES`), the parameters its term handles itself,
  the parameters that may follow a schedule, and the term class that computes it. The divergence modes
  are one kernel call (`terms.KernelTerm`); `pg` carries its baseline, trust region, temperature-matched
  importance ratio and ExOPD's reward extrapolation in its own term (`offline_opd.train.pg`).
* TAID: `loss_params.schedule` picks how `t` moves: `fixed` (`loss_params.t`), `linear` from `t_start` to
  `t_end` over the training steps (defaults 0.4 → 1.0), or `adaptive`, TAID's momentum rule driven by the
  relative change of the loss, with the linear ramp as its floor (`offline_opd.train.taid`; `alpha`,
  `beta`). Without `schedule`, setting `t` means fixed and leaving it out linear, as before the key
  existed. The adaptive state lives in the objective (`DistillLoss.observe`, `state_dict`), and the
  training module saves it in every checkpoint, so a resumed run and an uninterrupted one see the same t.

All per-token weights are folded into the kernel call (`weights=`), so backward sees grad_output == 1
and costs nothing extra, on the logits path and on the fused-linear path alike.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from opd_kernels import KERNEL_MODES, KernelMode, check_mode_params
from opd_kernels.modes import Param
from offline_opd.config import ConfigError, DistillConfig
from offline_opd.errors import UserError
from offline_opd.train.pg import PG_PARAMS, PolicyGradient
from offline_opd.train.taid import AdaptiveRule, AdaptiveT
from offline_opd.train.terms import Choice, KernelTerm, Student, Targets

# The loss_params key that picks how a mode's scheduled parameter moves (taid's t), and its options.
SCHEDULE_KEY = "schedule"
SCHEDULE_KINDS = ("fixed", "linear", "adaptive")


@dataclass(frozen=True)
class Schedule:
    """A kernel parameter that may move over training: the loss_params keys of its two ends and their
    defaults (the linear ramp, and the adaptive rule's start, end and floor), and the adaptive rule's own
    parameters. Setting the parameter itself in loss_params fixes it instead."""

    start_key: str
    end_key: str
    start: float
    end: float
    adaptive: Mapping[str, Param] = field(default_factory=dict)


@dataclass(frozen=True)
class LossMode:
    """One value of `distill.loss`: its kernel mode, the loss_params its term handles itself (never sent to the
    kernels), the kernel parameters that may follow a schedule, and the term class that computes it."""

    kernel: KernelMode
    term: type[KernelTerm] = KernelTerm
    objective: Mapping[str, Param | Choice] = field(default_factory=dict)
    schedules: Mapping[str, Schedule] = field(default_factory=dict)

    @property
    def allowed_keys(self) -> list[str]:
        """Every key loss_params may hold for this mode."""
        scheduled = [k for s in self.schedules.values() for k in (s.start_key, s.end_key, *s.adaptive)]
        return (list(self.kernel.params) + ([SCHEDULE_KEY] if self.schedules else []) + scheduled
                + list(self.objective))


LOSSES: dict[str, LossMode] = {loss.kernel.name: loss for loss in (
    LossMode(KERNEL_MODES["pg"], PolicyGradient, objective=PG_PARAMS),
    LossMode(KERNEL_MODES["fkl"]),
    LossMode(KERNEL_MODES["rkl"]),
    LossMode(KERNEL_MODES["jsd"]),
    LossMode(KERNEL_MODES["skew_fkl"]),
    LossMode(KERNEL_MODES["skew_rkl"]),
    # alpha, beta: the adaptive rule's step size and momentum, the published defaults (offline_opd.train.taid).
    LossMode(KERNEL_MODES["taid"], schedules={"t": Schedule("t_start", "t_end", 0.4, 1.0, adaptive={
        "alpha": Param(5e-4, 0.0, 1.0), "beta": Param(0.99, 0.0, 1.0, high_inclusive=False)})}),
    LossMode(KERNEL_MODES["entropy_aware"]),
)}


@dataclass(frozen=True)
class LossSpec:
    """A validated loss mode with its fixed kernel parameters, the linearly scheduled ones and the adaptive ones."""

    mode: str
    params: dict[str, float]
    schedule: dict[str, tuple[float, float]] = field(default_factory=dict)
    objective: dict[str, float | str] = field(default_factory=dict)   # LossMode.objective values, never sent to kernels
    adaptive: dict[str, AdaptiveRule] = field(default_factory=dict)   # their value is state: DistillLoss holds it

    def at(self, progress: float) -> dict[str, float]:
        """Fixed and linearly scheduled kernel parameters at `progress` in [0, 1] (fraction of training done)."""
        p = min(max(progress, 0.0), 1.0)
        return {**self.params, **{k: a + (b - a) * p for k, (a, b) in self.schedule.items()}}


def loss_spec(mode: str, raw: Mapping[str, Any], where: str) -> LossSpec:
    """Validate `loss` and `loss_params` against the loss registry.

    `where` names the params section in errors, e.g. "params.yaml: distill"; a bad entry is reported as
    "params.yaml: distill.loss_params.beta: ...".
    """
    if mode not in LOSSES:
        raise ConfigError(f"{where}.loss: {mode!r} is not a loss mode; use one of {', '.join(LOSSES)}")
    loss = LOSSES[mode]
    raw = dict(raw)
    objective = {name: _setting(prm, raw.pop(name, prm.default), f"{where}.loss_params.{name}")
                 for name, prm in loss.objective.items()}
    schedule: dict[str, tuple[float, float]] = {}
    adaptive: dict[str, AdaptiveRule] = {}
    kind = raw.pop(SCHEDULE_KEY, None) if loss.schedules else None
    for param, sch in loss.schedules.items():
        moving = _schedule(mode, param, sch, kind, raw, f"{where}.loss_params")
        if isinstance(moving, AdaptiveRule):
            adaptive[param] = moving
        elif moving is not None:
            schedule[param] = moving
    for name, value in raw.items():
        if name not in loss.kernel.params:
            raise ConfigError(f"{where}.loss_params.{name}: not a parameter of loss {mode!r}; "
                              f"allowed: {', '.join(loss.allowed_keys) or 'none'}")
        _check_value(mode, name, value, f"{where}.loss_params.{name}")
    params = {k: v for k, v in check_mode_params(mode, raw).items() if k not in schedule and k not in adaptive}
    return LossSpec(mode, params, schedule, objective, adaptive)


def _schedule(mode: str, param: str, sch: Schedule, kind: Optional[str], raw: dict[str, Any],
              where: str) -> None | tuple[float, float] | AdaptiveRule:
    """How `param` moves, its keys popped from `raw`: None (fixed: `param` stays in `raw` for the kernel, or
    takes the kernel's default), the linear ramp's ends, or the adaptive rule. `kind`: loss_params.schedule,
    None when unset (fixed if `param` is set, else linear, the meanings from before the key existed)."""
    if kind is None:
        kind = "fixed" if param in raw else "linear"
    if kind not in SCHEDULE_KINDS:
        raise ConfigError(f"{where}.{SCHEDULE_KEY}: {kind!r} is not one of {', '.join(SCHEDULE_KINDS)}")
    rule_keys = [k for k in sch.adaptive if k in raw]
    if kind != "adaptive" and rule_keys:
        raise ConfigError(f"{where}.{rule_keys[0]}: only the adaptive schedule reads it; set {SCHEDULE_KEY}: "
                          f"adaptive, or remove it")
    if param in raw:
        if kind != "fixed" or sch.start_key in raw or sch.end_key in raw:
            raise ConfigError(f"{where}.{param}: set either {param} (fixed) or {sch.start_key}/{sch.end_key} "
                              f"(a {'linear' if kind == 'fixed' else kind} schedule), not both")
        return None
    if kind == "fixed":
        stray = next((k for k in (sch.start_key, sch.end_key) if k in raw), None)
        if stray is not None:
            raise ConfigError(f"{where}.{stray}: {SCHEDULE_KEY}: fixed reads only {param}; set {SCHEDULE_KEY}: "
                              f"linear or adaptive, or remove it")
        return None
    ends = (raw.pop(sch.start_key, sch.start), raw.pop(sch.end_key, sch.end))
    for key, value in zip((sch.start_key, sch.end_key), ends):
        _check_value(mode, param, value, f"{where}.{key}")
    start, end = float(ends[0]), float(ends[1])
    if kind == "linear":
        return start, end
    if start > end:
        raise ConfigError(f"{where}.{sch.start_key}: {ends[0]} is above {sch.end_key} {ends[1]}, but the adaptive "
                          f"{param} only grows; set {sch.start_key} <= {sch.end_key}")
    return AdaptiveRule(start, end, **{k: _setting(p, raw.pop(k, p.default), f"{where}.{k}")
                                       for k, p in sch.adaptive.items()})


def _setting(prm: Param | Choice, value: Any, where: str) -> float | str:
    """A loss_params value the objective reads (not the kernels), checked against its range or options."""
    if isinstance(prm, Choice):
        if not prm.contains(value):
            raise ConfigError(f"{where}: {value!r} is not {prm.interval()}")
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not prm.contains(value):
        raise ConfigError(f"{where}: {value!r} is not a number in {prm.interval()}")
    return float(value)


def _check_value(mode: str, param: str, value: Any, where: str) -> None:
    try:
        check_mode_params(mode, {param: value})
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor                 # scalar the optimizer minimises (divergence + ce_weight · CE)
    divergence: torch.Tensor           # detached: the mode's term summed over the selected tokens / norm[0]
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
        if not 0.0 < tip_fraction <= 1.0:
            raise ValueError(f"tip_fraction must be in (0, 1], got {tip_fraction}")
        if ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0, got {ce_weight}")
        self.spec, self.backend, self.ce_weight = spec, backend, ce_weight
        self.tip_fraction, self.chunk_size = tip_fraction, chunk_size
        self.term = LOSSES[spec.mode].term(spec.mode, spec.objective, behavior_temperature=behavior_temperature)
        self.adaptive = {name: AdaptiveT(rule) for name, rule in spec.adaptive.items()}

    def params_at(self, progress: float) -> dict[str, float]:
        """The kernel parameters of a step at `progress`: fixed, linearly scheduled and adaptive (their state)."""
        return {**self.spec.at(progress), **{name: state.t for name, state in self.adaptive.items()}}

    def scheduled(self, progress: float) -> dict[str, float]:
        """The parameters that move over training, at `progress` (for the logs)."""
        return {k: v for k, v in self.params_at(progress).items() if k in self.spec.schedule or k in self.adaptive}

    def observe(self, divergence: float, progress: float) -> None:
        """After an optimizer step at `progress`: feed its global divergence to the adaptive parameters."""
        for state in self.adaptive.values():
            state.observe(divergence, progress)

    def state_dict(self) -> dict[str, dict]:
        """What a resumed run needs to continue the adaptive parameters (empty without them)."""
        return {name: state.state_dict() for name, state in self.adaptive.items()}

    def load_state_dict(self, state: Mapping[str, dict]) -> None:
        for name, value in state.items():
            self.adaptive[name].load_state_dict(value)

    def __call__(self, targets: Targets, progress: float, *, logits: Optional[torch.Tensor] = None,
                 hidden: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                 norm: Optional[tuple[float, float]] = None) -> LossOutput:
        """`norm`: the (divergence, CE) token counts the sums are divided by; by default this batch's own
        (selected tokens, response tokens). The trainer passes the counts of the whole global batch."""
        student = Student(logits, hidden, weight, self.backend, self.chunk_size)
        mask = targets.mask.bool()
        n = int(mask.sum())
        if n == 0:  # nothing to learn from; keep the graph so every rank runs the same backward
            zero = student.source.sum() * 0.0
            return LossOutput(zero, zero.detach(), None, 0, 0)
        params = self.params_at(progress)
        keep = mask
        if self.tip_fraction < 1.0:
            entropy, signal = self._token_stats(targets, params, student)
            keep = select_tokens(entropy, signal, mask, self.tip_fraction)
        n_sel = int(keep.sum())
        div_norm, ce_norm = norm if norm is not None else (n_sel, n)
        ce = None
        if self.ce_weight > 0:
            ce = student.cross_entropy(targets, mask, mask.float() * (self.ce_weight / ce_norm)).sum()
        # The term runs last: its kernel call may write the gradient into the logits (in place).
        div = self.term.loss(targets, params, student, keep, keep.float() / div_norm)
        total = div if ce is None else div + ce
        return LossOutput(total, div.detach(), None if ce is None else ce.detach() / self.ce_weight, n, n_sel)

    @torch.no_grad()
    def _token_stats(self, targets: Targets, params: dict, student: Student) -> tuple[torch.Tensor, torch.Tensor]:
        """Student entropy and the term's divergence signal per token, for TIP (chunked, no autograd)."""
        entropy = torch.empty(targets.mask.shape[0], dtype=torch.float32, device=targets.mask.device)
        signal = torch.empty_like(entropy)
        for s, e, z in student.chunks():
            zf = z.float()
            lse = torch.logsumexp(zf, dim=-1)
            entropy[s:e] = lse - (torch.softmax(zf, dim=-1) * zf).sum(-1)
            signal[s:e] = self.term.signal(targets.rows(s, e), params, z, lse, self.backend)
        return entropy, signal


def check_kernel_backend(cfg: DistillConfig, params: Path | str) -> None:
    """`triton` without a GPU would fail deep in training (or crawl in the interpreter unasked); say so first."""
    if cfg.kernel_backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(f"{params}: distill.kernel_backend: 'triton' needs a CUDA GPU and none is visible; set it to "
                        f"'auto' (Triton on GPU, PyTorch on CPU) or 'torch'")


def loss_from_config(cfg: DistillConfig, where: str, behavior_temperature: float = 1.0) -> DistillLoss:
    """The objective `distill` trains with, validated with errors naming `where` (e.g. "params.yaml: distill").

    `behavior_temperature`: the temperature the rollouts were sampled at (their footers' `sampling_temperature`)."""
    spec = loss_spec(cfg.loss, cfg.loss_params, where)
    try:
        return DistillLoss(spec, backend=cfg.kernel_backend, ce_weight=cfg.ce_weight, tip_fraction=cfg.tip_fraction,
                           behavior_temperature=behavior_temperature)
    except ValueError as exc:   # a term refusing these settings against the shards (pg's reference)
        raise ConfigError(f"{where}.loss_params: {exc}") from None
