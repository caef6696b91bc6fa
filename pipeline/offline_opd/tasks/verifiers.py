"""Verifiers: does a response answer its prompt correctly? Chosen by `evaluate.verifier` in params.

- `numeric`: the last number of the response's final segment equals the reference by value
  (1,000 == 1000.0; GSM8K "#### 42" references work); non-numeric references must match exactly.
- `exact`: the response's final segment (after the last '####' or '=', stripped) equals the reference's.
- `module:function`: your own `function(response: str, answer: str) -> bool`, imported from
  `module` (a module on PYTHONPATH, e.g. a file next to params.yaml when run from the repo root),
  so a new task needs no edit to this package.
"""

from __future__ import annotations

import importlib
import re
from decimal import Decimal, InvalidOperation
from typing import Callable, Sequence

from offline_opd.errors import UserError

Verifier = Callable[[str, str], bool]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_segment(text: str) -> str:
    """The part of a response that holds its final answer: after the last '####' (GSM8K style),
    else after the last '=', else all of it."""
    for marker in ("####", "="):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip()
    return text.strip()


def extract_answer(text: str) -> str | None:
    """The last number of the final segment (None if it has none)."""
    numbers = _NUMBER.findall(final_segment(text))
    return numbers[-1] if numbers else None


def _as_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def numeric(response: str, answer: str) -> bool:
    """Whether `response` ends in the reference `answer`.

    Numeric references are compared by value (1,000 == 1000.0) with the last number of the final
    segment; others must equal the final segment exactly. A reference written GSM8K style
    ("... #### 42") is reduced to its final segment first.
    """
    expected = final_segment(answer) if "####" in answer else answer.strip()
    want = _as_number(expected)
    if want is None:
        return final_segment(response) == expected
    got = extract_answer(response)
    return got is not None and _as_number(got) == want


def exact(response: str, answer: str) -> bool:
    """Whether the response's final segment equals the reference's, character for character."""
    return final_segment(response) == final_segment(answer)


BUILTIN: dict[str, Verifier] = {"numeric": numeric, "exact": exact}


_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def check_verifier(spec: str, where: str = "params.yaml: evaluate.verifier") -> None:
    """`spec` names a built-in or has the form module:function; checked at params load, without importing."""
    if spec not in BUILTIN and not _SPEC.fullmatch(spec):
        raise UserError(f"{where}: {spec!r} is not a verifier; use {', '.join(BUILTIN)} or module:function")


def load_verifier(spec: str, where: str = "params.yaml: evaluate.verifier") -> Verifier:
    """The verifier named by `spec`: a built-in name or `module:function`."""
    check_verifier(spec, where)
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{where}: cannot import module {module_name!r} ({exc}); put it on PYTHONPATH "
                        f"(e.g. a .py file in the repo root) or fix the name") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{where}: module {module_name!r} has no function {attr!r}; define "
                        f"{attr}(response: str, answer: str) -> bool there")
    return fn


def accuracy(verify: Verifier, responses: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of `responses` that `verify` accepts against the matching reference answer."""
    return sum(bool(verify(r, a)) for r, a in zip(responses, answers)) / max(1, len(answers))
