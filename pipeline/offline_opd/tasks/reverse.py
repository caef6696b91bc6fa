"""A second toy sub-task for multi-teacher OPD: reverse a string of digits ("rev:86430=" -> "03468").

Why this one: it shares the addition task's character vocabulary (digits, ':', '=') and prompt shape, so one
toy tokenizer serves both domains, yet it needs a different skill (copying from the far end of the prompt
rather than adding columns), so a teacher trained on one sub-task alone fails the other and a student merged
from two specialised teachers can be compared with students distilled from either alone. The answer is the
whole response, which the `numeric` verifier compares by value (leading zeros included: "03468" == "3468").
"""

from __future__ import annotations

import random
from typing import Collection

from offline_opd.tasks.addition import Problem
from offline_opd.tasks.sampling import disjoint_splits, draw_distinct


def make_problems(length: int, n: int, seed: int, exclude: Collection[str] = ()) -> list[Problem]:
    """`n` distinct reversal problems of `length`-digit strings, deterministic in `seed`, none in `exclude`."""
    rng = random.Random(f"toy-reverse/{length}/{seed}")

    def draw() -> Problem:
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        return Problem(f"rev{length}-{digits}", f"rev:{digits}=", digits[::-1], digits[::-1])
    return draw_distinct(n, draw, exclude, 10 ** length, f"reversals of {length}-digit strings")


def make_splits(length: int, sizes: dict[str, int], seed: int) -> dict[str, list[Problem]]:
    """Disjoint splits drawn in order, each excluding the prompts before it."""
    return disjoint_splits(sizes, seed, lambda n, split_seed, taken: make_problems(length, n, split_seed, taken))
