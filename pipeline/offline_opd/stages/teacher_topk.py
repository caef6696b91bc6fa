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
import hashlib
import json
import string
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from offline_opd.contract import shards
from offline_opd.config import TeacherTopkConfig, load_params, run_settings
from offline_opd.provenance.consistency import check_scoring_teacher
from offline_opd.provenance.teachers import Teachers, load_teachers
from offline_opd.backends.engine import Engine, engine_footer, load_engine
from offline_opd.backends.pool import run_units
from offline_opd.backends.routing import RoutedEngine
from offline_opd.models.loading import load_config, load_tokenizer
from offline_opd.contract.prompts import encode_prompt, prompt_domains, read_prompts
from offline_opd.backends.base import SCORING_TEMPERATURE, Extras
from offline_opd.errors import UserError
from offline_opd.contract.footers import RolloutsFooter, TeacherTopkFooter
from offline_opd.contract.tables import (ROLLOUT_SCHEMA, TeacherFormat, add_domains, scored_table, teacher_format,
                                         teacher_schema)
from offline_opd.contract.sparse_targets import Selection, draw_uniforms
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


def check_tokenizer(teacher: Path, teacher_tok: str, rollouts: shards.ShardInfo) -> None:
    """Teacher and π_ref must read token ids identically (docs/design.md §3), or every score is of the wrong token."""
    policy_tok = rollouts.meta["tokenizer_fingerprint"]
    if teacher_tok != policy_tok:
        raise UserError(
            f"tokenizer mismatch: teacher {teacher} has tokenizer fingerprint {teacher_tok}, but the rollouts "
            f"in {rollouts.path} were tokenized with {policy_tok} (policy {rollouts.meta.get('policy_path')}); "
            f"teacher and student must share one tokenizer: use a teacher with the student's tokenizer, or "
            f"rebuild the student from the teacher's")


def allow_override(params: Path) -> bool:
    """`distill.allow_inconsistent_teacher`, the one switch for a teacher ablation, read here too so that
    the ablation's shards can be scored. Not a param of this stage: it decides only whether the stage
    refuses, never what it writes (and a refusal leaves no output for DVC to cache)."""
    distill = load_params(params, required=()).get("distill")
    return distill is not None and distill.allow_inconsistent_teacher


class PrivilegedPrompts:
    """Teacher prompt ids under the privileged-context template, per prompt_id."""

    def __init__(self, template: str, prompts_path: Path, tokenizer) -> None:
        # The template's fields were checked at params load (config.check_template).
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        table = read_prompts(prompts_path)
        ids, texts, answers = (table.column(c).to_pylist() for c in ("prompt_id", "prompt", "answer"))
        if "answer" in fields and None in answers:
            raise UserError(f"{prompts_path}: prompt {ids[answers.index(None)]} has no answer, but "
                            f"teacher_topk.privileged_context uses {{answer}}")
        self.tokenizer, self.template, self.path = tokenizer, template, prompts_path
        self.rows = dict(zip(ids, zip(texts, answers)))
        self.digest = hashlib.sha256(json.dumps([ids, texts, answers]).encode()).hexdigest()

    def encode(self, prompt_id: str) -> list[int]:
        if prompt_id not in self.rows:
            raise UserError(f"{self.path}: no prompt {prompt_id!r}, which the rollouts hold; pass the OPD "
                            f"prompt set the rollouts were sampled from with --prompts")
        prompt, answer = self.rows[prompt_id]
        return encode_prompt(self.tokenizer, self.template.format(prompt=prompt, answer=answer))


def row_domains(teachers: Teachers, prompts_path: Path) -> dict[str, str] | None:
    """prompt_id -> domain under multi-teacher OPD (every domain checked to have a teacher); None with one teacher."""
    if not teachers.multi:
        return None
    table = read_prompts(prompts_path)
    domains = prompt_domains(table)
    teachers.check_domains(domains, str(prompts_path))
    return dict(zip(table.column("prompt_id").to_pylist(), domains))


def part_domains(domains: dict[str, str], rollouts: pa.Table, where: Path) -> list[str]:
    """The domain of each rollout row, by its prompt_id."""
    out = [domains.get(p) for p in rollouts.column("prompt_id").to_pylist()]
    if None in out:
        pid = rollouts.column("prompt_id")[out.index(None)].as_py()
        raise UserError(f"{where}: prompt {pid!r} is not in the prompt set that gives the domains; pass the OPD prompt "
                        f"set the rollouts were sampled from with --prompts")
    return out


def teacher_inputs(table: pa.Table, privileged: PrivilegedPrompts | None) -> tuple[list[list[int]], list[int]]:
    """What the teacher scores: the rollout rows as they are, or the same responses after the privileged prompt."""
    ids, plens = table.column("input_ids").to_pylist(), table.column("prompt_len").to_pylist()
    if privileged is None:
        return ids, plens
    cache: dict[str, list[int]] = {}
    out = []
    for pid, seq, p in zip(table.column("prompt_id").to_pylist(), ids, plens):
        if pid not in cache:
            cache[pid] = privileged.encode(pid)
        out.append(cache[pid] + seq[p:])
    return out, [len(cache[pid]) for pid in table.column("prompt_id").to_pylist()]


def extras_for(rollouts: pa.Table, selection: Selection, seed: int, policy_scorer, union_k: int) -> Extras:
    """Per-sequence draws and π_ref's top ids for one part (π_ref scores the rollouts as sampled)."""
    ids, plens = rollouts.column("input_ids").to_pylist(), rollouts.column("prompt_len").to_pylist()
    uniforms = None
    if selection.sampled:
        uniforms = [draw_uniforms(seed, sid, len(x) - p, selection.samples)
                    for sid, x, p in zip(rollouts.column("sample_id").to_pylist(), ids, plens)]
    union = None
    if policy_scorer is not None:
        union = [s.topk_ids for s in policy_scorer.score(ids, plens, k=union_k)]
    return Extras(selection, uniforms, union)


@dataclass(frozen=True)
class ScoreWork:
    """Part j of a teacher_topk run: the teacher scores rollouts part j and the scored part is written, by
    whichever process runs it (offline_opd.backends.pool)."""

    teachers: Teachers
    cfg: TeacherTopkConfig
    parts: list[shards.ShardInfo]           # the rollout parts, checked as one run
    out: Path
    footer: TeacherTopkFooter
    pending: shards.PartPlan
    fmt: TeacherFormat
    selection: Selection
    privileged: PrivilegedPrompts | None
    domains: dict[str, str] | None          # prompt_id -> domain, under multi-teacher OPD only

    @contextmanager
    def open(self) -> Iterator[Callable[[int], dict]]:
        cfg, tp = self.cfg, self.cfg.cluster.tensor_parallel
        engines = [RoutedEngine(self.teachers,
                                lambda path: load_engine(path, cfg, KIND, max_logprobs=cfg.k, tensor_parallel=tp))]
        try:
            # π_ref's own top ids for the union targets: a second engine, on the policy the rollouts name.
            if cfg.union_student_k:
                engines.append(load_engine(Path(self.footer.policy_path), cfg, KIND,
                                           max_logprobs=cfg.union_student_k, tensor_parallel=tp))
            yield partial(self.part, engines[0], engines[1] if len(engines) > 1 else None)
        finally:
            for engine in engines:
                engine.close()

    def part(self, engine: RoutedEngine, pi_ref: Engine | None, j: int) -> dict:
        cfg = self.cfg
        rollouts = pa.concat_tables(shards.iter_row_groups(self.parts[j]))
        extras = extras_for(rollouts, self.selection, cfg.seed, pi_ref, cfg.union_student_k)
        domains = None if self.domains is None else part_domains(self.domains, rollouts, self.parts[j].path)
        scored = engine.score(*teacher_inputs(rollouts, self.privileged), k=cfg.k, extras=extras, domains=domains)
        table = scored_table(rollouts, scored, self.fmt)
        if domains is not None:
            table = add_domains(table, domains, self.footer.teachers)
        path = shards.write_shard(self.out / shards.part_name(j), table,
                                  self.footer, teacher_schema(self.fmt, domains is not None), self.fmt.encodings(),
                                  before_replace=self.pending.replaced_by(j))
        stats = {"rows": rollouts.num_rows, "bytes": path.stat().st_size, "response_tokens": 0,
                 "sum_teacher_logprob": 0.0, "sampled_in_topk": 0}
        for s, seq, p in zip(scored, rollouts.column("input_ids").to_pylist(),
                             rollouts.column("prompt_len").to_pylist()):
            stats["response_tokens"] += s.teacher_logprob.size
            stats["sum_teacher_logprob"] += float(s.teacher_logprob.sum())
            stats["sampled_in_topk"] += int((s.topk_ids == np.asarray(seq[p:])[:, None]).any(1).sum())
        return stats


def run(args: argparse.Namespace, cfg: TeacherTopkConfig) -> dict:
    shard = args.shard
    selection = Selection.of(cfg)
    teachers = load_teachers(args.teacher)
    vocab = load_config(teachers.first).vocab_size
    if cfg.k > vocab:
        raise UserError(f"{args.params}: teacher_topk.k: {cfg.k} is more than the teacher's vocabulary ({vocab} "
                        f"tokens, {args.teacher}); lower k")
    if cfg.union_student_k > vocab:
        raise UserError(f"{args.params}: teacher_topk.union_student_k: {cfg.union_student_k} is more than the "
                        f"vocabulary ({vocab} tokens, {args.teacher}); lower union_student_k")
    parts = shards.open_run(args.rollouts, "rollouts", ROLLOUT_SCHEMA)
    first = parts[0]
    teachers.check_unchanged()  # an edited teacher is named as such, not as a tokenizer mismatch
    policy: RolloutsFooter = first.footer
    teacher_fp, teacher_tok = teachers.fingerprint, teachers.tokenizer_fingerprint()
    check_tokenizer(args.teacher, teacher_tok, first)
    prompts_path = args.prompts or Path(policy.prompts_path or "")
    domains = row_domains(teachers, prompts_path)   # every domain has a teacher, before the chain names one
    check_scoring_teacher(args.teacher, teacher_fp, first, allow_override(args.params), teachers.fingerprints)
    privileged = None
    if cfg.privileged_context is not None:
        privileged = PrivilegedPrompts(cfg.privileged_context, prompts_path, load_tokenizer(teachers.first))
    key = shards.make_run_key(config=run_settings(cfg), teacher=teacher_fp, rollouts=policy.run_key,
                              prompts=privileged.digest if privileged else None,
                              **({"domains": sorted(domains.items())} if domains else {}))
    fmt = teacher_format(cfg, vocab)
    args.out.mkdir(parents=True, exist_ok=True)
    pending = shards.pending_parts(args.out, KIND, key, len(parts), shard)
    todo = pending.todo
    footer = TeacherTopkFooter(   # the rollouts' policy fields unchanged: which policy sampled the rows, and how
        policy_fingerprint=policy.policy_fingerprint, policy_path=policy.policy_path,
        tokenizer_fingerprint=policy.tokenizer_fingerprint, sampling_temperature=policy.sampling_temperature,
        run_key=key, rollouts_run_key=policy.run_key, num_parts=len(parts), teacher_fingerprint=teacher_fp,
        teacher_path=str(args.teacher), k=cfg.k, scoring_temperature=SCORING_TEMPERATURE,
        privileged_context=cfg.privileged_context, logprob_dtype=cfg.logprob_dtype, **engine_footer(cfg),
        codec=fmt.codec.describe(), width=fmt.width, samples=fmt.samples, selection=cfg.selection,
        config=run_settings(cfg), **({"teachers": teachers.fingerprints} if teachers.multi else {}))
    stats = {"parts_total": len(parts), "parts_skipped": len(range(shard[0], len(parts), shard[1])) - len(todo),
             "parts_written": 0, "rows": 0, "response_tokens": 0, "bytes": 0, "sum_teacher_logprob": 0.0,
             "sampled_in_topk": 0}
    if not todo:
        pending.clear_stale()
        return stats
    work = ScoreWork(teachers, cfg, parts, args.out, footer, pending, fmt, selection, privileged, domains)
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
