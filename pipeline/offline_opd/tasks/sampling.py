"""Drawing distinct problems and disjoint splits, the same way for every generated task.

Why one home: a held-out split stays held out only if every task excludes the earlier splits' prompts and
draws in the same order; the seed of split i is `seed * 1000 + i`, so adding a split never changes the ones
before it.
"""

from __future__ import annotations

from typing import Callable, Collection, Mapping, TypeVar

P = TypeVar("P")   # a problem: anything with a `prompt`


def draw_distinct(n: int, draw: Callable[[], P], exclude: Collection[str], space: int, what: str) -> list[P]:
    """`n` problems from `draw` with distinct prompts, none in `exclude`, in the order drawn; `space` is how
    many distinct prompts `draw` can make, `what` names them in the error when too few are left."""
    problems: list[P] = []
    seen = set(exclude)
    if n > space - len(seen):
        raise ValueError(f"asked for {n} {what}, but only {space - len(seen)} remain; lower the split sizes or "
                         f"raise task.digits")
    while len(problems) < n:
        problem = draw()
        if problem.prompt in seen:
            continue
        seen.add(problem.prompt)
        problems.append(problem)
    return problems


def disjoint_splits(sizes: Mapping[str, int], seed: int,
                    make: Callable[[int, int, set[str]], list[P]]) -> dict[str, list[P]]:
    """Splits (e.g. sft/opd/eval) drawn in order by `make(n, split_seed, taken)`, each excluding the prompts
    of the splits before it."""
    splits: dict[str, list[P]] = {}
    taken: set[str] = set()
    for index, (name, n) in enumerate(sizes.items()):
        splits[name] = make(n, seed * 1000 + index, taken)
        taken.update(p.prompt for p in splits[name])
    return splits
