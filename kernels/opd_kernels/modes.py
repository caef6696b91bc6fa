"""Loss modes of design section 6: one record per mode (parameters, defaults, ranges, kernel id, constants).

Shared by the chunked PyTorch path (`opd_kernels.reference`) and the Triton path (`opd_kernels.triton_sparse`),
so both accept exactly the same modes and parameters. The math is in `kernels/MATH.md`. What the training
objective adds on top of a mode (schedules, pg's baseline) is recorded in the pipeline
(`offline_opd.train.losses.LOSSES`); the kernels stay usable without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

# The four float constants a kernel call reads (c0, c1, c2, unused); each mode says what they hold.
Constants = Tuple[float, float, float, float]
NO_CONSTANTS: Constants = (0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Param:
    """A numeric parameter: its default and its allowed range (with or without each end)."""

    default: float
    low: float
    high: float
    low_inclusive: bool = True
    high_inclusive: bool = True

    def contains(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below and not math.isnan(value)

    def interval(self) -> str:
        return f"{'[' if self.low_inclusive else '('}{self.low}, {self.high}{']' if self.high_inclusive else ')'}"


def _no_constants(prm: Mapping[str, float]) -> Constants:
    return NO_CONSTANTS


def _itself(prm: Mapping[str, float]) -> Optional[str]:
    return None


@dataclass(frozen=True)
class KernelMode:
    """Everything about one loss mode the kernels compute.

    `constants` turns the validated parameters into the kernel's four constants; `runs_as` names another
    mode whose kernel computes this one for these parameters (jsd's endpoints), None for itself.
    `sampled_token`: the loss reads the sampled token and the teacher's log-prob of it (pg), not the top-k.
    """

    name: str
    id: int                                   # the integer the kernels branch on
    params: Mapping[str, Param] = field(default_factory=dict)
    constants: Callable[[Mapping[str, float]], Constants] = _no_constants
    runs_as: Callable[[Mapping[str, float]], Optional[str]] = _itself
    sampled_token: bool = False

    @property
    def defaults(self) -> Dict[str, float]:
        return {name: p.default for name, p in self.params.items()}


def _log(x: float) -> float:
    return math.log(x) if x > 0 else NEG_BIG


def _mixture(key: str) -> Callable[[Mapping[str, float]], Constants]:
    """(x, log x, log(1 - x), 0) for a mixing weight x: the constants of jsd, skew_* and taid."""
    return lambda prm: (prm[key], _log(prm[key]), _log(1.0 - prm[key]), 0.0)


KERNEL_MODES: Dict[str, KernelMode] = {m.name: m for m in (
    # Lightning-OPD policy gradient on the sampled token. tau: clip of the advantage
    # A = log p_T(a) - log q(a) to [-tau, tau]; is_clip: upper clip of the importance ratio
    # exp(log q(a) - behavior_logprob), used only when behavior_logprob is given.
    KernelMode("pg", 0, {"tau": Param(5.0, 0.0, math.inf, low_inclusive=False),
                         "is_clip": Param(2.0, 0.0, math.inf, low_inclusive=False)},
               constants=lambda prm: (prm["tau"], prm["is_clip"], math.log(prm["is_clip"]), 0.0),
               sampled_token=True),
    KernelMode("fkl", 1),
    KernelMode("rkl", 2),
    # Generalized JSD as in GKD / TRL: beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q.
    # beta = 0 and beta = 1 follow TRL's convention: they mean fkl and rkl (the normalised limits).
    KernelMode("jsd", 3, {"beta": Param(0.5, 0.0, 1.0)}, _mixture("beta"),
               runs_as=lambda prm: {0.0: "fkl", 1.0: "rkl"}.get(prm["beta"])),
    # DistiLLM: KL(p || alpha*p + (1-alpha)*q) and KL(q || alpha*q + (1-alpha)*p).
    KernelMode("skew_fkl", 4, {"alpha": Param(0.1, 0.0, 1.0)}, _mixture("alpha")),
    KernelMode("skew_rkl", 5, {"alpha": Param(0.1, 0.0, 1.0)}, _mixture("alpha")),
    # TAID: KL(p_t || q), p_t = (1-t)*stopgrad(q) + t*p on S and tail. t is set by the caller's schedule.
    KernelMode("taid", 6, {"t": Param(0.5, 0.0, 1.0)}, _mixture("t")),
    # (1-a)*RKL + a*FKL, a = sigmoid((H_T - h)/s), H_T the teacher entropy (nats) on S and tail.
    KernelMode("entropy_aware", 7, {"h": Param(1.0, -math.inf, math.inf, False, False),
                                    "s": Param(0.5, 0.0, math.inf, False, False)},
               constants=lambda prm: (prm["h"], prm["s"], 0.0, 0.0)),
)}

# Views of the records above, never edited by hand: the mode names, {mode: {param: default}} (the public
# API's table) and {mode: kernel id} (what the implementations branch on).
MODES: Tuple[str, ...] = tuple(KERNEL_MODES)
MODE_PARAMS: Dict[str, Dict[str, float]] = {name: m.defaults for name, m in KERNEL_MODES.items()}
MODE_ID: Dict[str, int] = {name: m.id for name, m in KERNEL_MODES.items()}

# Floor for the tail masses p_tail = 1 - sum_S p and q_tail = 1 - sum_S q. They are computed as a
# complement, so in float32 they carry an absolute rounding error of a few 1e-7 (k terms summed, and the
# log-sum-exp's rounding); below the floor the computed value is noise. A clamped student tail is a
# constant: no gradient flows through it (exactly what autograd of `clamp(min=eps)` gives).
TAIL_EPS_FP32 = 1e-6
TAIL_EPS_FP64 = 1e-12
# Teacher log-probs are clamped to [LOGP_MIN, 0] so that -inf (fp16 underflow) stays finite.
LOGP_MIN = -1.0e4
# Stand-in for log(0) in the mixtures (alpha, beta or t at 0 or 1): exp(NEG_BIG + x) == 0 and no NaN.
NEG_BIG = -1.0e30


def check_mode_params(mode: str, params: Mapping[str, Any] | None = None) -> Dict[str, float]:
    """Validate `params` for `mode` and return the full parameter dict with defaults filled in.

    Raises ValueError naming the mode and the parameter for an unknown mode, an unknown parameter or a
    value outside its range.
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown loss mode {mode!r}; supported: {', '.join(MODES)}")
    spec = KERNEL_MODES[mode]
    params = dict(params or {})
    unknown = set(params) - set(spec.params)
    if unknown:
        allowed = ", ".join(spec.params) or "none"
        raise ValueError(f"mode {mode!r} got unknown parameter(s) {sorted(unknown)}; allowed: {allowed}")
    out = spec.defaults
    for name, value in params.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"mode {mode!r}: parameter {name!r} must be a number, got {value!r}") from None
        if not spec.params[name].contains(value):
            raise ValueError(f"mode {mode!r}: parameter {name!r}={value} outside {spec.params[name].interval()}")
        out[name] = value
    return out


def kernel_mode(mode: str, params: Mapping[str, Any] | None = None) -> Tuple[int, Constants]:
    """(mode id, four float constants) as both implementations consume them.

    jsd with beta 0 or 1 is mapped to fkl or rkl here (TRL's convention).
    """
    prm = check_mode_params(mode, params)
    spec = KERNEL_MODES[mode]
    alias = spec.runs_as(prm)
    if alias is not None:
        return kernel_mode(alias)
    return spec.id, spec.constants(prm)
