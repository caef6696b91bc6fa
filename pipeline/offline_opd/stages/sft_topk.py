"""Stage `sft_topk`: the teacher scores its own SFT answers, GKD's off-policy rows (`distill.gkd`).

For each data/sft/part-i.parquet it writes data/sft_topk/part-i.parquet in the teacher shard contract of
`teacher_topk` (same columns, codec, footer keys, checksums, run key and resume; every `teacher_topk`
setting applies): the SFT rows as rollout columns (sample_id `prompt_id#0`, behavior_logprob the writer's
log-prob: 0 for greedy answers) plus the teacher's top-k, tail and sampled-token log-probs. The footer's
policy fields name the teacher that wrote the rows (from the sft_data footers), `source` is "sft_data".

Consistency: the scoring teacher must be the teacher that wrote the SFT data (which is π_ref's SFT
teacher, so the same one that scores the rollouts); `distill` checks the whole chain again before it
mixes these rows with the rollouts' (provenance/consistency.py).

With `sft_topk.enabled: false` (the default) the stage scores nothing and leaves an empty folder, so the
default DAG costs what it did; distill reads the folder only when λ < 1 at some step. Why a stage of its
own, not a second output of teacher_topk: new rollouts (every seed, every round of multi-round OPD) then
rerun only teacher_topk, never this scoring of data that did not change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa

from offline_opd.backends.score_parts import ScoreWork, score_parts, scoring_fields
from offline_opd.config import SftTopkConfig, load_params, run_settings
from offline_opd.contract import shards
from offline_opd.contract.footers import SftDataFooter, TeacherTopkFooter
from offline_opd.contract.prompts import PrivilegedPrompts
from offline_opd.contract.tables import SFT_SCHEMA, teacher_format, teacher_written_rows
from offline_opd.errors import UserError
from offline_opd.models.loading import load_config, load_tokenizer
from offline_opd.provenance.consistency import check_sft_scorer, override_allowed
from offline_opd.provenance.fingerprint import model_fingerprint, tokenizer_fingerprint
from offline_opd.provenance.record import check_unchanged
from offline_opd.runtime import add_scoring_args, cli, stage_main

KIND = "sft_topk"
SHARD_KIND = "teacher_topk"   # the footer kind: the same contract as the rollouts' teacher shards


def add_args(parser: argparse.ArgumentParser) -> None:
    add_scoring_args(parser, "--sft", "the teacher's SFT answers (data/sft)", "sft_data")


class SftScoreWork(ScoreWork):
    """Part j of an sft_topk run: the teacher scores its own answers of sft_data part j."""

    def rows(self, j: int) -> pa.Table:
        return teacher_written_rows(pa.concat_tables(shards.iter_row_groups(self.parts[j])),
                                    self.footer.sampling_temperature)


def run(args: argparse.Namespace, cfg: SftTopkConfig) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    if not cfg.enabled:   # the output is a function of the params: no parts, whatever an earlier run left
        shards.pending_parts(args.out, SHARD_KIND, "disabled", 0, args.shard).clear_stale()
        return {"enabled": False, "parts_total": 0}
    topk = load_params(args.params, required=("teacher_topk",))["teacher_topk"]
    fmt = teacher_format(topk, load_config(args.teacher).vocab_size, args.params, args.teacher)
    parts = shards.open_run(args.sft, "sft_data", SFT_SCHEMA)
    sft: SftDataFooter = parts[0].footer
    check_unchanged(args.teacher)
    teacher_fp, teacher_tok = model_fingerprint(args.teacher), tokenizer_fingerprint(args.teacher)
    if teacher_tok != sft.tokenizer_fingerprint:
        raise UserError(f"tokenizer mismatch: teacher {args.teacher} has tokenizer fingerprint {teacher_tok}, but "
                        f"the SFT answers in {parts[0].path} were tokenized with {sft.tokenizer_fingerprint}; score "
                        f"them with the teacher that wrote them (`dvc repro sft_data sft_topk`)")
    check_sft_scorer(args.teacher, teacher_fp, parts[0], override_allowed(args.params))
    privileged = None
    if topk.privileged_context is not None:
        prompts_path = args.prompts or Path(sft.prompts_path or "")
        privileged = PrivilegedPrompts(topk.privileged_context, prompts_path, load_tokenizer(args.teacher))
    key = shards.make_run_key(config=run_settings(topk), teacher=teacher_fp, sft_data=sft.run_key,
                              prompts=privileged.digest if privileged else None)
    pending = shards.pending_parts(args.out, SHARD_KIND, key, len(parts), args.shard)
    footer = TeacherTopkFooter.of_sft_data(sft, **scoring_fields(topk, fmt, args.teacher, teacher_fp, key, len(parts)))
    work = SftScoreWork(args.teacher, topk, parts, args.out, footer, pending, fmt, privileged)
    return {"enabled": True, **score_parts(work, len(range(args.shard[0], len(parts), args.shard[1])), KIND)}


def main(argv: list[str] | None = None) -> dict:
    return stage_main(KIND, __doc__, add_args, run, argv)


if __name__ == "__main__":
    cli(main)
