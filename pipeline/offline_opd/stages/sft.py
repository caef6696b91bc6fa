"""Stage `sft`: π_ref, the student fine-tuned on the teacher's own answers (data/sft), loss on response tokens.

The student must share the teacher's tokenizer (the teacher's top-k ids are only meaningful in the
student's vocabulary if the ids mean the same tokens), so a real student base (`sft.source`: a model
folder or hub id) with a different tokenizer fingerprint is refused. `sft.source: scratch` builds a
small Llama on the teacher's own tokenizer, at most a quarter of the teacher's size, so there is
something left to distil; `sft.source: teacher` starts from the teacher's weights, and with
`sft.prune_to_layers` keeps only that many of its layers (Minitron-style depth pruning, healed by SFT).
The SFT parts must all come from one teacher, the one passed as --teacher; the output's opd_provenance.json records it (`sft_teacher_fingerprint`) and the parts it trained on,
which is what `distill` checks the teacher_topk shards against. Under multi-teacher OPD that is the set
fingerprint of the domain teachers, and `sft_teachers` records which teacher answered each domain.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

from offline_opd.atomic import write_text
from offline_opd.config import SftConfig
from offline_opd.errors import UserError
from offline_opd.models.loading import build_llama, parameter_count, prune_layers, resolve_model_dir, resolve_model_source
from offline_opd.provenance.consistency import (FIX_TOKENIZER, ConsistencyError, check_sft_teacher,
                                                check_student_tokenizer)
from offline_opd.provenance.record import write_provenance
from offline_opd.provenance.teachers import load_teachers
from offline_opd.runtime import cli, stage_main
from offline_opd.train.sft_shards import read_sft_parts

log = logging.getLogger("opd")

MAX_STUDENT_FRACTION = 0.25


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="the sft_data shards (data/sft)")
    parser.add_argument("--teacher", type=Path, required=True,
                        help="the teacher that wrote --data (data/models/teacher): its tokenizer for a scratch "
                             "student, its size for the quarter-size rule, its fingerprint checked against the parts")
    parser.add_argument("--out", type=Path, required=True, help="π_ref model folder (data/models/student_sft)")
    parser.add_argument("--plots", type=Path, default=Path("plots/sft"),
                        help="folder for loss.csv, the SFT training curve (default: plots/sft)")
    parser.add_argument("--logs", type=Path, default=Path("logs/sft"),
                        help="training logs and the resume checkpoint; a rerun of the same run resumes from it "
                             "(default: logs/sft)")


def scratch_student(cfg: SftConfig, teacher_dir: Path, teacher: int):
    """A fresh toy Llama on the teacher's tokenizer, refused if it is more than a quarter of the teacher
    (`teacher` parameters)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = build_llama(tokenizer, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.seed)
    student = sum(p.numel() for p in model.parameters())
    if student > MAX_STUDENT_FRACTION * teacher:
        raise UserError(f"sft: the scratch student has {student:,} parameters, more than a quarter of the "
                        f"teacher's {teacher:,}; lower sft.hidden_size / num_layers / intermediate_size")
    return model, tokenizer


def pretrained_student(cfg: SftConfig, base: Path, data_tokenizer_fp: str, data: Path):
    """A real student base (`cfg.source`, resolved to `base`), refused unless it tokenizes exactly like the
    teacher that wrote the data; loaded in the training dtype (on the meta device under strategy fsdp).
    Returns model, tokenizer, stored dtype and, under fsdp, where the weights are."""
    from transformers import AutoTokenizer

    check_student_tokenizer(cfg.source, base, data_tokenizer_fp, data)
    from offline_opd.train.trainer import load_for_training

    model, dtype, weights = load_for_training(base, cfg.precision, sharded=cfg.strategy == "fsdp")
    return model, AutoTokenizer.from_pretrained(base), dtype, weights


def run(args: argparse.Namespace, cfg: SftConfig) -> dict:
    examples, infos = read_sft_parts(args.data)
    footer = infos[0].footer
    teachers = load_teachers(args.teacher)
    teacher_dir = resolve_model_dir(teachers.first)
    teachers.check_unchanged()  # an edited teacher is named as such, not as a teacher mismatch
    teacher_fp = teachers.fingerprint
    check_sft_teacher(args.teacher, teacher_fp, args.data, footer)
    if teachers.multi and cfg.source == "teacher":
        raise UserError(f"{args.params}: sft.source: 'teacher' starts from the teacher's weights, but {args.teacher} "
                        f"holds one teacher per domain; set sft.source to scratch or a model folder")
    teacher_params = min(parameter_count(resolve_model_dir(p)) for p in teachers.folders().values())
    import torch

    from offline_opd.train.supervised import run_key, train_supervised
    from offline_opd.train.trainer import save_model, training_dtype

    if cfg.source == "scratch":
        source = "scratch"
        model, tokenizer = scratch_student(cfg, teacher_dir, teacher_params)
        model, dtype, weights = model.to(training_dtype(cfg.precision)), torch.float32, None
    else:
        # `teacher`: start from the teacher's own weights (then usually pruned); a hub id is looked up
        # once, not again for provenance.
        base = teacher_dir if cfg.source == "teacher" else resolve_model_source(cfg.source)
        source = str(base)
        model, tokenizer, dtype, weights = pretrained_student(cfg, base, footer.tokenizer_fingerprint, args.data)
    if cfg.prune_to_layers is not None:   # never with a scratch student (SftConfig refuses it at load)
        kept = prune_layers(model, cfg.prune_to_layers, f"{args.params}: sft.prune_to_layers")
        log.info("pruned the student base to layers %s", kept)
    params = sum(p.numel() for p in model.parameters())
    key = run_key(cfg, examples, teacher=teacher_fp, parts=[i.footer.run_key for i in infos], base=source)
    # Right padding is never attended by a response token: any id will do.
    result = train_supervised(model, examples, cfg, tokenizer.pad_token_id or 0, args.logs, key,
                              f"{args.params}: sft", weights=weights)

    def finish(folder: Path) -> None:
        """Tokenizer and provenance; the saved tokenizer must still be the data's."""
        tokenizer.save_pretrained(folder)
        record = write_provenance(
            folder, "sft", source=source, config=asdict(cfg), sft_teacher_fingerprint=teacher_fp,
            sft_data_files=[i.path.name for i in infos], teacher_path=str(args.teacher),
            **({"sft_teachers": footer.teachers} if footer.teachers else {}))
        if record["tokenizer_fingerprint"] != footer.tokenizer_fingerprint:
            raise ConsistencyError(f"the saved student's tokenizer {record['tokenizer_fingerprint']} differs from "
                                   f"the SFT data's {footer.tokenizer_fingerprint} ({args.data}); fix: {FIX_TOKENIZER}")

    save_model(result, args.out, dtype, finish)
    if not result.trainer.is_global_zero:
        return {}
    write_text(args.plots / "loss.csv", result.loss_csv("loss"))
    return {"params": params, "teacher_params": teacher_params, "final_loss": result.final_loss,
            "train_s": result.speed()["train_s"], "resumed": result.resumed, "examples": len(examples)}


def main(argv: list[str] | None = None) -> dict:
    return stage_main("sft", __doc__, add_args, run, argv)


if __name__ == "__main__":
    cli(main)
