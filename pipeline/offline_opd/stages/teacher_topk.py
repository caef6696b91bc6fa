"""Stage `teacher_topk`: the teacher scores every rollout token once, so distill never loads it.

For each data/rollouts/part-i.parquet it writes data/teacher_topk/part-i.parquet: the same rows plus
`teacher_logprob` (the sampled token's log-prob, exact even outside the top-k), `topk_ids` and
`topk_logprobs` (T·k values per row, row-major, log-probs descending), scored at temperature 1. The
footer copies the rollouts' policy fields and adds the teacher's fingerprint, k, the optional
privileged context and the backend, which is what distill's consistency check reads.

With `teacher_topk.privileged_context` set (e.g. "Answer: {answer}\\n{prompt}"), the teacher scores
the same response tokens after `template.format(prompt=..., answer=...)` instead of the student's
prompt; the prompt set is read from --prompts, or from the path the rollouts recorded.

Shards v2 (pipeline/offline_opd/contract/sparse_targets.py, pipeline/offline_opd/contract/codec.py): every position also stores
`tail_logprob`, the teacher's exact log-mass outside the stored ids; `teacher_topk.selection` adds
draws from the teacher (`sample_counts`), `union_student_k` adds π_ref's own top ids (π_ref, read
from the rollouts' `policy_path`, is loaded next to the teacher for that), and `codec` sets how ids
and log-probs are stored. The footer records codec, width (entries per position) and samples.

Resume, `--shard i/n` and `teacher_topk.cluster` (a Ray Data actor pool) work as in `rollouts`; a part's
run key covers these settings (but not `cluster`), the teacher's fingerprint and the rollouts' run key, so
new rollouts or a new teacher redo every part.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from offline_opd.backends.base import SCORING_TEMPERATURE, rollout_extras
from offline_opd.backends.engine import Engine, engine_footer, load_engine
from offline_opd.backends.pool import run_units
from offline_opd.config import TeacherTopkConfig, run_settings
from offline_opd.contract import shards
from offline_opd.contract.footers import RolloutsFooter, TeacherTopkFooter
from offline_opd.contract.prompts import PrivilegedPrompts, teacher_inputs
from offline_opd.contract.sparse_targets import Selection
from offline_opd.contract.tables import (ROLLOUT_SCHEMA, TeacherFormat, scored_stats, scored_table, teacher_format,
                                         teacher_schema)
from offline_opd.models.loading import load_config, load_tokenizer
from offline_opd.provenance.consistency import check_scoring_teacher, check_scoring_tokenizer, override_allowed
from offline_opd.provenance.fingerprint import model_fingerprint, tokenizer_fingerprint
from offline_opd.provenance.record import check_unchanged
from offline_opd.runtime import add_shard_arg, cli, stage_main

KIND = "teacher_topk"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", type=Path, required=True, help="teacher model folder (data/models/teacher)")
    parser.add_argument("--rollouts", type=Path, required=True, help="rollout shards folder (data/rollouts)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the scored part-XXXXX.parquet shards")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="prompt set with the answers for teacher_topk.privileged_context (default: the "
                             "prompt file recorded in the rollout footers); unused without privileged context")
    add_shard_arg(parser)


@dataclass(frozen=True)
class ScoreWork:
    """Part j of a teacher_topk run: the teacher scores rollouts part j and the scored part is written, by
    whichever process runs it (offline_opd.backends.pool)."""

    teacher: Path
    cfg: TeacherTopkConfig
    parts: list[shards.ShardInfo]           # the rollout parts, checked as one run
    out: Path
    footer: TeacherTopkFooter
    pending: shards.PartPlan
    fmt: TeacherFormat
    selection: Selection
    privileged: PrivilegedPrompts | None

    @contextmanager
    def open(self) -> Iterator[Callable[[int], dict]]:
        cfg, tp = self.cfg, self.cfg.cluster.tensor_parallel
        engines = [load_engine(self.teacher, cfg, KIND, max_logprobs=cfg.k, tensor_parallel=tp)]
        try:
            # π_ref's own top ids for the union targets: a second engine, on the policy the rollouts name.
            if cfg.union_student_k:
                engines.append(load_engine(Path(self.footer.policy_path), cfg, KIND,
                                           max_logprobs=cfg.union_student_k, tensor_parallel=tp))
            yield partial(self.part, engines[0], engines[1] if len(engines) > 1 else None)
        finally:
            for engine in engines:
                engine.close()

    def part(self, engine: Engine, pi_ref: Engine | None, j: int) -> dict:
        cfg = self.cfg
        rollouts = pa.concat_tables(shards.iter_row_groups(self.parts[j]))
        extras = rollout_extras(rollouts, self.selection, cfg.seed, pi_ref, cfg.union_student_k)
        scored = engine.score(*teacher_inputs(rollouts, self.privileged), k=cfg.k, extras=extras)
        path = shards.write_shard(self.out / shards.part_name(j), scored_table(rollouts, scored, self.fmt),
                                  self.footer, teacher_schema(self.fmt), self.fmt.encodings(),
                                  before_replace=self.pending.replaced_by(j))
        return {"rows": rollouts.num_rows, "bytes": path.stat().st_size, **scored_stats(rollouts, scored)}


def run(args: argparse.Namespace, cfg: TeacherTopkConfig) -> dict:
    shard = args.shard
    selection = Selection.of(cfg)
    fmt = teacher_format(cfg, load_config(args.teacher).vocab_size, args.params, args.teacher)
    parts = shards.open_run(args.rollouts, "rollouts", ROLLOUT_SCHEMA)
    first = parts[0]
    check_unchanged(args.teacher)  # an edited teacher is named as such, not as a tokenizer mismatch
    policy: RolloutsFooter = first.footer
    teacher_fp, teacher_tok = model_fingerprint(args.teacher), tokenizer_fingerprint(args.teacher)
    check_scoring_tokenizer(args.teacher, teacher_tok, first)
    check_scoring_teacher(args.teacher, teacher_fp, first, override_allowed(args.params))
    privileged = None
    if cfg.privileged_context is not None:
        prompts_path = args.prompts or Path(policy.prompts_path or "")
        privileged = PrivilegedPrompts(cfg.privileged_context, prompts_path, load_tokenizer(args.teacher))
    key = shards.make_run_key(config=run_settings(cfg), teacher=teacher_fp, rollouts=policy.run_key,
                              prompts=privileged.digest if privileged else None)
    args.out.mkdir(parents=True, exist_ok=True)
    pending = shards.pending_parts(args.out, KIND, key, len(parts), shard)
    todo = pending.todo
    footer = TeacherTopkFooter.of_rollouts(
        policy, run_key=key, num_parts=len(parts), teacher_fingerprint=teacher_fp, teacher_path=str(args.teacher),
        k=cfg.k, scoring_temperature=SCORING_TEMPERATURE, privileged_context=cfg.privileged_context,
        logprob_dtype=cfg.logprob_dtype, **engine_footer(cfg), codec=fmt.codec.describe(), width=fmt.width,
        samples=fmt.samples, selection=cfg.selection, config=run_settings(cfg))
    stats = {"parts_total": len(parts), "parts_skipped": len(range(shard[0], len(parts), shard[1])) - len(todo),
             "parts_written": 0, "rows": 0, "response_tokens": 0, "bytes": 0, "sum_teacher_logprob": 0.0,
             "sampled_in_topk": 0}
    if not todo:
        pending.clear_stale()
        return stats
    work = ScoreWork(args.teacher, cfg, parts, args.out, footer, pending, fmt, selection, privileged)
    start = time.perf_counter()
    for _, record in run_units(work, todo, cfg.cluster, KIND):
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


def main(argv: list[str] | None = None) -> dict:
    return stage_main(KIND, __doc__, add_args, run, argv)


if __name__ == "__main__":
    cli(main)
