"""Teacher scoring of shard parts, shared by `teacher_topk` (rollouts) and `sft_topk` (the teacher's own
SFT answers): the unit of work the pool runs (`ScoreWork`, part j scored and written by whichever process
runs it), the footer fields every scored part carries, and the run's summary.

Both stages score with the `teacher_topk` section's settings and write the same shard contract.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from offline_opd.backends import pool
from offline_opd.backends.base import SCORING_TEMPERATURE, rollout_extras
from offline_opd.backends.engine import Engine, engine_footer, load_engine
from offline_opd.config import TeacherTopkConfig, run_settings
from offline_opd.contract import shards
from offline_opd.contract.footers import TeacherTopkFooter
from offline_opd.contract.prompts import PrivilegedPrompts, teacher_inputs
from offline_opd.contract.sparse_targets import Selection
from offline_opd.backends.routing import RoutedEngine
from offline_opd.contract.tables import TeacherFormat, add_domains, scored_stats, scored_table, teacher_schema
from offline_opd.provenance.teachers import load_teachers, row_domains

SECTION = "teacher_topk"   # the params section both scoring stages read, named in engine errors


@dataclass(frozen=True)
class ScoreWork:
    """Part j of a teacher_topk run: the teacher scores rollouts part j and the scored part is written, by
    whichever process runs it (offline_opd.backends.pool)."""

    teacher: Path                           # a teacher folder, or one with a teacher per domain
    cfg: TeacherTopkConfig
    parts: list[shards.ShardInfo]           # the rollout parts, checked as one run
    out: Path
    footer: TeacherTopkFooter
    pending: shards.PartPlan
    fmt: TeacherFormat
    privileged: PrivilegedPrompts | None
    domains: dict[str, str] | None = None   # prompt_id -> domain, under multi-teacher OPD only

    @contextmanager
    def open(self) -> Iterator[Callable[[int], dict]]:
        cfg, tp = self.cfg, self.cfg.cluster.tensor_parallel
        engines = [RoutedEngine(load_teachers(self.teacher),
                                lambda path: load_engine(path, cfg, SECTION, max_logprobs=cfg.k, tensor_parallel=tp))]
        try:
            # π_ref's own top ids for the union targets: a second engine, on the policy the rollouts name.
            if cfg.union_student_k:
                engines.append(load_engine(Path(self.footer.policy_path), cfg, SECTION,
                                           max_logprobs=cfg.union_student_k, tensor_parallel=tp))
            yield partial(self.part, engines[0], engines[1] if len(engines) > 1 else None)
        finally:
            for engine in engines:
                engine.close()

    def rows(self, j: int) -> pa.Table:
        """The rows part j scores, in the rollout columns (`sft_topk` reads the teacher's answers instead)."""
        return pa.concat_tables(shards.iter_row_groups(self.parts[j]))

    def part(self, engine: RoutedEngine, pi_ref: Engine | None, j: int) -> dict:
        cfg = self.cfg
        rollouts = self.rows(j)
        extras = rollout_extras(rollouts, Selection.of(cfg), cfg.seed, pi_ref, cfg.union_student_k)
        domains = row_domains(self.domains, rollouts.column("prompt_id").to_pylist(), self.parts[j].path)
        scored = engine.score(*teacher_inputs(rollouts, self.privileged), k=cfg.k, extras=extras, domains=domains)
        table = scored_table(rollouts, scored, self.fmt)
        if domains is not None:
            table = add_domains(table, domains, self.footer.teachers)
        path = shards.write_shard(self.out / shards.part_name(j), table,
                                  self.footer, teacher_schema(self.fmt, domains is not None), self.fmt.encodings(),
                                  before_replace=self.pending.replaced_by(j))
        return {"rows": rollouts.num_rows, "bytes": path.stat().st_size, **scored_stats(rollouts, scored)}


def scoring_fields(cfg: TeacherTopkConfig, fmt: TeacherFormat, teacher: Path, teacher_fp: str, key: str,
                   num_parts: int) -> dict:
    """The footer fields of every scored part, whatever wrote its rows: the run, the teacher, the entry format
    and the settings (`TeacherTopkFooter.of_rollouts` / `of_sft_data` add who wrote the rows)."""
    return dict(run_key=key, num_parts=num_parts, teacher_fingerprint=teacher_fp, teacher_path=str(teacher),
                k=cfg.k, scoring_temperature=SCORING_TEMPERATURE, privileged_context=cfg.privileged_context,
                logprob_dtype=cfg.logprob_dtype, **engine_footer(cfg), codec=fmt.codec.describe(), width=fmt.width,
                samples=fmt.samples, selection=cfg.selection, config=run_settings(cfg))


def score_parts(work: ScoreWork, owned: int, kind: str) -> dict:
    """Score this process's parts still to write (of `owned`; here or on the stage's Ray pool) and summarise."""
    todo = work.pending.todo
    stats = {"parts_total": len(work.parts), "parts_skipped": owned - len(todo), "parts_written": 0, "rows": 0,
             "response_tokens": 0, "bytes": 0, "sum_teacher_logprob": 0.0, "sampled_in_topk": 0}
    if not todo:
        work.pending.clear_stale()
        return stats
    start = time.perf_counter()
    for _, record in pool.run_units(work, todo, work.cfg.cluster, kind):
        stats["parts_written"] += 1
        for name, value in record.items():
            stats[name] += value
    tokens = max(stats["response_tokens"], 1)
    return {**{k: v for k, v in stats.items() if k != "sum_teacher_logprob"},
            # engine start included: with Ray the engines load in parallel
            "tokens_per_s": round(stats["response_tokens"] / max(time.perf_counter() - start, 1e-9), 1),
            "bytes_per_response_token": round(stats["bytes"] / tokens, 2),
            # How far π_ref's samples are from the teacher: the teacher's NLL per sampled token.
            "teacher_nll_per_token": round(-stats["sum_teacher_logprob"] / tokens, 4),
            "sampled_in_topk_frac": round(stats["sampled_in_topk"] / tokens, 4)}
