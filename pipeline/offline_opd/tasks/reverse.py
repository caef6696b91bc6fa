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


def make_problems(length: int, n: int, seed: int, exclude: Collection[str] = ()) -> list[Problem]:
    """`n` distinct reversal problems of `length`-digit strings, deterministic in `seed`, none in `exclude`."""
    space = 10 ** length
    excluded = set(exclude)
    if n > space - len(excluded):
        raise ValueError(f"asked for {n} reversal problems, but only {space - len(excluded)} {length}-digit "
                         f"strings remain; lower the split sizes or raise task.digits")
    rng = random.Random(f"toy-reverse/{length}/{seed}")
    problems: list[Problem] = []
    seen = set(excluded)
    while len(problems) < n:
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        prompt = f"rev:{digits}="
        if prompt in seen:
            continue
        seen.add(prompt)
        problems.append(Problem(f"rev{length}-{digits}", prompt, digits[::-1], digits[::-1]))
    return problems


def make_splits(length: int, sizes: dict[str, int], seed: int) -> dict[str, list[Problem]]:
    """Disjoint splits drawn in order, each excluding the prompts before it."""
    splits: dict[str, list[Problem]] = {}
    taken: set[str] = set()
    for index, (name, n) in enumerate(sizes.items()):
        splits[name] = make_problems(length, n, seed * 1000 + index, exclude=taken)
        taken.update(p.prompt for p in splits[name])
    return splits
