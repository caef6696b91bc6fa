"""Multi-teacher OPD's engine: one engine per domain teacher, behind the calls `sft_data` and `teacher_topk` make.

Rows are grouped by their domain's teacher, each group goes to that teacher's engine in one call (which
batches it as usual), and the results come back in the rows' order. With one teacher (no domains) there is
one engine and every call passes straight through, so the single-teacher stages make exactly the calls they
made before. All domain teachers are loaded at once: right for the toy and for a few small experts; for
large experts, a prompt set sorted by domain with `rows_per_shard` cut at the domain boundaries keeps each
part on one teacher (the others' engines then idle in memory).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence, TypeVar

from offline_opd.backends.base import Extras, Sample, Sampling, Scored
from offline_opd.backends.engine import Engine
from offline_opd.provenance.teachers import Teachers

T = TypeVar("T")


class RoutedEngine:
    """The engines of a `Teachers` set, addressed by each row's domain."""

    def __init__(self, teachers: Teachers, open_one: Callable[..., Engine]) -> None:
        self.teachers, self.engines = teachers, {}
        try:
            for name, path in teachers.folders().items():
                self.engines[name] = open_one(path)
        except BaseException:
            self.close()
            raise
        self.tokenizer = next(iter(self.engines.values())).tokenizer

    def _groups(self, n: int, domains: Optional[Sequence[str]]) -> dict[str, list[int]]:
        """Row indices per engine name."""
        if self.teachers.routes is None:
            return {"": list(range(n))}
        if domains is None:
            raise ValueError("a multi-teacher engine needs each row's domain")
        groups: dict[str, list[int]] = {}
        for i, domain in enumerate(domains):
            groups.setdefault(self.teachers.routes[domain], []).append(i)
        return groups

    def _routed(self, n: int, domains: Optional[Sequence[str]], call: Callable[[Engine, list[int]], list[T]]) -> list[T]:
        groups = self._groups(n, domains)
        if len(groups) == 1 and len(next(iter(groups.values()))) == n:
            return call(self.engines[next(iter(groups))], list(range(n)))   # one teacher: the rows as they are
        out: list = [None] * n
        for name, rows in groups.items():
            for i, result in zip(rows, call(self.engines[name], rows)):
                out[i] = result
        return out

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling,
                 domains: Optional[Sequence[str]] = None) -> list[list[Sample]]:
        return self._routed(len(prompt_ids), domains,
                            lambda engine, rows: engine.generate([prompt_ids[i] for i in rows], sampling))

    def score(self, input_ids: list[list[int]], prompt_lens: list[int], k: int, extras: Extras | None = None,
              domains: Optional[Sequence[str]] = None) -> list[Scored]:
        def call(engine: Engine, rows: list[int]) -> list[Scored]:
            mine = extras
            if extras is not None and len(rows) != len(input_ids):
                pick = (lambda values: None if values is None else [values[i] for i in rows])
                mine = replace(extras, uniforms=pick(extras.uniforms), union_ids=pick(extras.union_ids))
            return engine.score([input_ids[i] for i in rows], [prompt_lens[i] for i in rows], k=k, extras=mine)

        return self._routed(len(input_ids), domains, call)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
