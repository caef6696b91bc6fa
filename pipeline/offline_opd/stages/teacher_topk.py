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

Multi-teacher OPD (a --teacher folder with one teacher per domain, pipeline/offline_opd/provenance/teachers.py):
each rollout is scored by the teacher of its prompt's domain (read from --prompts, or the prompt set the
rollouts recorded), each row records its domain and that teacher's fingerprint, and the footer maps every
domain to its teacher (`teachers`); `teacher_fingerprint` is then the set's.

Resume, `--shard i/n` and `teacher_topk.cluster` (a Ray Data actor pool) work as in `rollouts`; a part's
run key covers these settings (but not `cluster`), the teacher's fingerprint and the rollouts' run key, so
new rollouts or a new teacher redo every part.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from offline_opd.backends.score_parts import ScoreWork, score_parts, scoring_fields
from offline_opd.config import TeacherTopkConfig, run_settings
from offline_opd.contract import shards
from offline_opd.contract.footers import RolloutsFooter, TeacherTopkFooter
from offline_opd.contract.prompts import PrivilegedPrompts
from offline_opd.contract.tables import ROLLOUT_SCHEMA, teacher_format
from offline_opd.models.loading import load_config, load_tokenizer
from offline_opd.provenance.consistency import check_scoring_teacher, check_scoring_tokenizer, override_allowed
from offline_opd.provenance.teachers import load_teachers
from offline_opd.runtime import add_scoring_args, cli, stage_main

KIND = "teacher_topk"


def add_args(parser: argparse.ArgumentParser) -> None:
    add_scoring_args(parser, "--rollouts", "rollout shards folder (data/rollouts)", "rollout")


def run(args: argparse.Namespace, cfg: TeacherTopkConfig) -> dict:
    shard = args.shard
    teachers = load_teachers(args.teacher)
    fmt = teacher_format(cfg, load_config(teachers.first).vocab_size, args.params, args.teacher)
    parts = shards.open_run(args.rollouts, "rollouts", ROLLOUT_SCHEMA)
    first = parts[0]
    teachers.check_unchanged()  # an edited teacher is named as such, not as a tokenizer mismatch
    policy: RolloutsFooter = first.footer
    teacher_fp, teacher_tok = teachers.fingerprint, teachers.tokenizer_fingerprint()
    check_scoring_tokenizer(args.teacher, teacher_tok, first)
    prompts_path = args.prompts or Path(policy.prompts_path or "")
    domains = teachers.prompt_domains(prompts_path)   # every domain has a teacher, before the chain names one
    check_scoring_teacher(args.teacher, teacher_fp, first, override_allowed(args.params), teachers.fingerprints)
    privileged = None
    if cfg.privileged_context is not None:
        privileged = PrivilegedPrompts(cfg.privileged_context, prompts_path, load_tokenizer(teachers.first))
    key = shards.make_run_key(config=run_settings(cfg), teacher=teacher_fp, rollouts=policy.run_key,
                              prompts=privileged.digest if privileged else None,
                              **({"domains": sorted(domains.items())} if domains else {}))
    args.out.mkdir(parents=True, exist_ok=True)
    pending = shards.pending_parts(args.out, KIND, key, len(parts), shard)
    footer = TeacherTopkFooter.of_rollouts(
        policy, **scoring_fields(cfg, fmt, args.teacher, teacher_fp, key, len(parts)),
        **({"teachers": teachers.fingerprints} if teachers.multi else {}))
    work = ScoreWork(args.teacher, cfg, parts, args.out, footer, pending, fmt, privileged, domains)
    return score_parts(work, len(range(shard[0], len(parts), shard[1])), KIND)


def main(argv: list[str] | None = None) -> dict:
    return stage_main(KIND, __doc__, add_args, run, argv)


if __name__ == "__main__":
    cli(main)
