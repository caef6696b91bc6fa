"""The embedded toy task: multi-digit addition answered with a worked, per-column trace.

Why a trace and not just the sum: offline OPD matters when errors compound over a long response, as in
real reasoning. The response for "864+394=" is

    4+4+0=08 6+9+0=15 8+3+1=12 =1258

one step per column (least significant first): the two digits, the incoming carry, and the two-digit
column sum whose first digit is the next carry. Each token depends on a few earlier ones at fixed
offsets (a digit of the prompt, the carry three tokens back), so a tiny model can learn every step
locally, yet one wrong carry spoils the final answer. The final answer follows the last '=', which is
what `verify` reads.

The toy models (pipeline/offline_opd/models/toy.py) are real Llamas on a real character-level Hugging Face tokenizer,
so the toy path runs through exactly the same loading, generation and scoring code as a real model;
this module only makes the prompts, their reference traces and answers (`prepare`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import pyarrow as pa

from offline_opd.config import TaskConfig
from offline_opd.contract.prompts import PROMPT_SCHEMA
from offline_opd.errors import UserError
from offline_opd.tasks.sampling import disjoint_splits, draw_distinct


@dataclass(frozen=True)
class Problem:
    prompt_id: str
    prompt: str
    answer: str
    solution: str


# Trace styles (`task.style`): "columns" is the task's (every step writes both digits, the carry and a two-digit
# sum); "terse" is how another teacher might write the same computation (the carry only when it is 1, sums
# without a leading zero: "4+4=8 6+9=15 8+3+1=12 =1258"). Same answers, same tokenizer, other text:
# bench/opd_table.py trains its mismatched teacher on "terse" traces. "padded" is "columns" with the answer
# written one digit wider than the operands ("... 4+1+0=05 =0577"): its first two digits are the last
# column's sum whether or not that column carries out, so a sum with a carry out is read off the trace the
# same way as one without (what configs/toy_carry_gap.yaml's gap needs; the numeric verifier reads 0577 as 577).
STYLES = ("columns", "terse", "padded")


def column_sums(a: str, b: str) -> list[int]:
    """Each column's sum with its incoming carry, least significant first (the trace's `08 15 12`)."""
    width = max(len(a), len(b))
    sums, carry = [], 0
    for x, y in zip(reversed(a.zfill(width)), reversed(b.zfill(width))):
        sums.append(int(x) + int(y) + carry)
        carry = sums[-1] // 10
    return sums


# What a gap in the student's SFT data can leave out (`task.gap`), as a test on a problem with `digits`-digit
# operands. Both are things the teacher's data has and π_ref never sees, so only the teacher's log-probs can
# teach them; they differ in how many rounds that takes (README "A gap the teacher fills"):
# - "big_column": a column summing to 15 or more (with its carry), in about a third of 3-digit additions. The
#   student never writes "15".."19". The teacher's targets at each such sum are right on π_ref's rollouts, since
#   a column step depends only on what is written before it, so one offline round fixes every column; what it
#   leaves is the final answer, which copies those sums (a second divergence, which a second round reaches).
# - "carry_out": a sum one digit wider than the operands (about 60 %). The student's data has the top column's
#   carry and the answer's leading digit always 0: it learns them as constants, not copies, so each round
#   fixes only the first of them in its rollouts, and the gap takes several rounds to fill.
BIG_COLUMN = 15
GAPS = {
    "big_column": lambda p, digits: max(column_sums(*p.prompt[:-1].split("+"))) >= BIG_COLUMN,
    "carry_out": lambda p, digits: len(p.answer) > digits,
}


def solve(prompt: str, style: str = "columns") -> str:
    """The reference trace for an addition prompt "a+b=" in `style`; raises ValueError for anything else."""
    match = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
    if not match:
        raise ValueError(f"not an addition prompt of the toy task: {prompt!r} (expected e.g. '864+394=')")
    if style not in STYLES:
        raise ValueError(f"unknown trace style {style!r}; styles are {', '.join(STYLES)}")
    a, b = match.groups()
    width = max(len(a), len(b))
    a, b = a.zfill(width), b.zfill(width)
    sums = column_sums(a, b)
    carries = [0] + [total // 10 for total in sums[:-1]]   # each column's incoming carry
    steps = [f"{x}+{y}{'+1' if carry else ''}={total}" if style == "terse" else f"{x}+{y}+{carry}={total:02d}"
             for x, y, carry, total in zip(reversed(a), reversed(b), carries, sums)]
    answer = str(int(a) + int(b))
    return " ".join(steps) + f" ={answer.zfill(width + 1) if style == 'padded' else answer}"


def make_problems(digits: int, n: int, seed: int, exclude: Collection[str] = (),
                  style: str = "columns") -> list[Problem]:
    """`n` distinct problems with `digits`-digit operands and `style` traces, deterministic in `seed`, none of
    whose prompts is in `exclude` (pass the other splits' prompts to keep held-out sets held out)."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    low, high = 10 ** (digits - 1), 10 ** digits - 1
    rng = random.Random(f"toy-addition/{digits}/{seed}")

    def draw() -> Problem:
        a, b = rng.randint(low, high), rng.randint(low, high)
        return Problem(f"add{digits}-{a}+{b}", f"{a}+{b}=", str(a + b), solve(f"{a}+{b}=", style))
    return draw_distinct(n, draw, exclude, (high - low + 1) ** 2, f"{digits}-digit additions")


def make_splits(digits: int, sizes: dict[str, int], seed: int, style: str = "columns") -> dict[str, list[Problem]]:
    """Disjoint splits (e.g. sft/opd/eval) drawn in order, each excluding the prompts before it."""
    return disjoint_splits(sizes, seed, lambda n, split_seed, taken: make_problems(digits, n, split_seed, taken,
                                                                                   style))


def gap_first(problems: list[Problem], digits: int, gap: str, size: int, params: Path) -> list[Problem]:
    """The same problems, `size` of those without `gap` (GAPS) first, then the rest in drawn order.

    Why reorder rather than draw a separate set: the teacher still trains on the same prompts it would have
    had, and only the student's budget (the first sft_data.n_prompts) changes what it sees. The prompts without
    the gap are a fraction of the split, so `size` must fit; the error names the most it can be.
    """
    without = [p for p in problems if not GAPS[gap](p, digits)]
    if len(without) < size:
        raise UserError(f"{params}: task.gap_prompts: {size}, but only {len(without)} of the {len(problems)} SFT "
                        f"prompts are without task.gap {gap!r}; lower gap_prompts to at most {len(without)}, "
                        f"or raise task.n_sft")
    head = {p.prompt_id for p in without[:size]}
    return without[:size] + [p for p in problems if p.prompt_id not in head]


class AdditionTask:
    """`task.kind: addition`: disjoint sft/opd/eval splits of `task.digits`-digit additions.

    Each row carries its worked trace as `reference`: the scratch toy teacher trains on it, so the
    teacher stage needs no task code.
    """

    def __init__(self, cfg: TaskConfig, params: Path) -> None:
        self.cfg, self.params = cfg, params

    def splits(self) -> dict[str, pa.Table]:
        sizes = {"sft": self.cfg.n_sft, "opd": self.cfg.n_opd, "eval": self.cfg.n_eval}
        problems = make_splits(self.cfg.digits, sizes, self.cfg.seed, self.cfg.style)
        if self.cfg.gap is not None:
            problems["sft"] = gap_first(problems["sft"], self.cfg.digits, self.cfg.gap, self.cfg.gap_prompts,
                                        self.params)
        return {name: pa.table({"prompt_id": [p.prompt_id for p in rows], "prompt": [p.prompt for p in rows],
                                "answer": [p.answer for p in rows], "reference": [p.solution for p in rows]},
                               schema=PROMPT_SCHEMA)
                for name, rows in problems.items()}
