"""Loss modes of design section 6: names, parameters with defaults, validation, numeric constants.

Shared by the chunked PyTorch path (`opd_kernels.reference`) and the Triton path (`opd_kernels.triton_sparse`),
so both accept exactly the same modes and parameters. The math is in `kernels/MATH.md`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Tuple

# mode -> {param: default}. The training config validates against this (see `check_mode_params`).
MODE_PARAMS: Dict[str, Dict[str, float]] = {
    # Lightning-OPD policy gradient on the sampled token. tau: clip of the advantage
    # A = log p_T(a) - log q(a) to [-tau, tau]; is_clip: upper clip of the importance ratio
    # exp(log q(a) - behavior_logprob), used only when behavior_logprob is given.
    "pg": {"tau": 5.0, "is_clip": 2.0},
    "fkl": {},
    "rkl": {},
    # Generalized JSD as in GKD / TRL: beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q.
    # beta = 0 and beta = 1 follow TRL's convention: they mean fkl and rkl (the normalised limits).
    "jsd": {"beta": 0.5},
    # DistiLLM: KL(p || alpha*p + (1-alpha)*q) and KL(q || alpha*q + (1-alpha)*p).
    "skew_fkl": {"alpha": 0.1},
    "skew_rkl": {"alpha": 0.1},
    # TAID: KL(p_t || q), p_t = (1-t)*stopgrad(q) + t*p on S and tail. t is set by the caller's schedule.
    "taid": {"t": 0.5},
    # (1-a)*RKL + a*FKL, a = sigmoid((H_T - h)/s), H_T the teacher entropy (nats) on S and tail.
    "entropy_aware": {"h": 1.0, "s": 0.5},
}

MODES: Tuple[str, ...] = tuple(MODE_PARAMS)

# Allowed ranges, (low, high, low_inclusive, high_inclusive), for config validation and error messages.
PARAM_RANGES: Dict[str, Dict[str, Tuple[float, float, bool, bool]]] = {
    "pg": {"tau": (0.0, math.inf, False, True), "is_clip": (0.0, math.inf, False, True)},
    "fkl": {},
    "rkl": {},
    "jsd": {"beta": (0.0, 1.0, True, True)},
    "skew_fkl": {"alpha": (0.0, 1.0, True, True)},
    "skew_rkl": {"alpha": (0.0, 1.0, True, True)},
    "taid": {"t": (0.0, 1.0, True, True)},
    "entropy_aware": {"h": (-math.inf, math.inf, False, False), "s": (0.0, math.inf, False, False)},
}

# Integer ids used inside the kernels.
MODE_ID = {"pg": 0, "fkl": 1, "rkl": 2, "jsd": 3, "skew_fkl": 4, "skew_rkl": 5, "taid": 6,
           "entropy_aware": 7}

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
    if mode not in MODE_PARAMS:
        raise ValueError(f"unknown loss mode {mode!r}; supported: {', '.join(MODES)}")
    params = dict(params or {})
    unknown = set(params) - set(MODE_PARAMS[mode])
    if unknown:
        allowed = ", ".join(MODE_PARAMS[mode]) or "none"
        raise ValueError(f"mode {mode!r} got unknown parameter(s) {sorted(unknown)}; allowed: {allowed}")
    out = dict(MODE_PARAMS[mode])
    for name, value in params.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"mode {mode!r}: parameter {name!r} must be a number, got {value!r}") from None
        lo, hi, lo_inc, hi_inc = PARAM_RANGES[mode][name]
        ok = (value >= lo if lo_inc else value > lo) and (value <= hi if hi_inc else value < hi)
        if not ok or math.isnan(value):
            lb = "[" if lo_inc else "("
            rb = "]" if hi_inc else ")"
            raise ValueError(f"mode {mode!r}: parameter {name!r}={value} outside {lb}{lo}, {hi}{rb}")
        out[name] = value
    return out


def _log(x: float) -> float:
    return math.log(x) if x > 0 else NEG_BIG


def kernel_mode(mode: str, params: Mapping[str, Any] | None = None) -> Tuple[int, Tuple[float, float, float, float]]:
    """(mode id, four float constants) as both implementations consume them.

    jsd with beta 0 or 1 is mapped to fkl or rkl here (TRL's convention).
    """
    prm = check_mode_params(mode, params)
    if mode == "jsd":
        b = prm["beta"]
        if b == 0.0:
            return MODE_ID["fkl"], (0.0, 0.0, 0.0, 0.0)
        if b == 1.0:
            return MODE_ID["rkl"], (0.0, 0.0, 0.0, 0.0)
        return MODE_ID["jsd"], (b, _log(b), _log(1.0 - b), 0.0)
    if mode in ("skew_fkl", "skew_rkl"):
        a = prm["alpha"]
        return MODE_ID[mode], (a, _log(a), _log(1.0 - a), 0.0)
    if mode == "taid":
        t = prm["t"]
        return MODE_ID[mode], (t, _log(t), _log(1.0 - t), 0.0)
    if mode == "entropy_aware":
        return MODE_ID[mode], (prm["h"], prm["s"], 0.0, 0.0)
    if mode == "pg":
        return MODE_ID[mode], (prm["tau"], prm["is_clip"], math.log(prm["is_clip"]), 0.0)
    return MODE_ID[mode], (0.0, 0.0, 0.0, 0.0)
