"""Stage `distill`: train π_ref on the precomputed teacher top-k shards (offline on-policy distillation).

Order of work, cheapest checks first: the teacher-consistency check (shard footers, provenance,
fingerprints; refuses a mismatched teacher, policy or tokenizer unless distill.allow_inconsistent_teacher
is set, which is then recorded), every shard's footer and schema, the loss settings (pg's importance
ratio reads the rollouts' sampling temperature from the footers), and only then the student. With
distill.gkd putting λ below 1 (GKD), the batches also hold the teacher's own scored SFT answers
(--off-policy, the sft_topk stage's folder), checked against the same chain (pipeline/offline_opd/train/gkd.py). The teacher is never loaded: the shards hold everything the loss needs.

Training is the shared stack in pipeline/offline_opd/train/ (strategy, precision, accumulation, checkpointing
from the distill section): CSV (and TensorBoard, if installed) logs and a `last.ckpt` checkpoint under
--logs. A rerun with the same settings and inputs resumes from that checkpoint (weights, optimizer,
schedule and the exact data position); a checkpoint from other settings or inputs is discarded with
its logs. The result is a Hugging Face folder at --out (written
atomically, with opd_provenance.json), the loss curve at --plots/loss.csv, and metrics/distill.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from offline_opd.atomic import write_text
from offline_opd.config import DistillConfig
from offline_opd.provenance.consistency import check_distill_inputs
from offline_opd.contract.shards import ShardError, ShardInfo
from offline_opd.runtime import cli, stage_main

log = logging.getLogger("opd.distill")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", type=Path, required=True,
                        help="π_ref: the Hugging Face model folder training starts from (the sft stage's output)")
    parser.add_argument("--shards", type=Path, required=True,
                        help="folder of teacher_topk part-*.parquet shards (streamed, never loaded whole)")
    parser.add_argument("--off-policy", type=Path, default=None,
                        help="GKD's off-policy rows: the teacher's scored SFT answers (the sft_topk stage's "
                             "data/sft_topk); read only when distill.gkd puts λ below 1")
    parser.add_argument("--out", type=Path, required=True,
                        help="where the distilled model is written (a Hugging Face folder, replaced atomically)")
    parser.add_argument("--logs", type=Path, required=True,
                        help="training logs and the resume checkpoint (keep it between runs to resume)")
    parser.add_argument("--plots", type=Path, required=True, help="folder for loss.csv (columns step, train_loss)")


def run_key(cfg: DistillConfig, report: dict, infos: list[ShardInfo]) -> str:
    """Identity of a training run: its settings and its exact inputs. A checkpoint resumes only under it."""
    # The sealed sha256 of each part (not a time of writing): a part rewritten with other bytes is another input.
    shard_ids = [[i.path.name, i.meta.get("run_key"), i.meta.get("file_sha256")] for i in infos]
    payload = {"config": dataclasses.asdict(cfg), "init": report["init_fingerprint"],
               "teacher": report["teacher_fingerprint"], "shards": shard_ids}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run(args: argparse.Namespace, cfg: DistillConfig) -> dict:
    from offline_opd.train.losses import check_kernel_backend, loss_from_config

    check_kernel_backend(cfg, args.params)
    off_policy = args.off_policy if cfg.gkd.off_policy else None
    from offline_opd.train.shard_data import TeacherShardDataModule, unwrap_worker_error

    data = TeacherShardDataModule(args.shards, cfg.batch_size, cfg.seed, cfg.shuffle_row_groups, cfg.num_workers,
                                  off_policy, cfg.gkd, cfg.max_steps)
    data.open()   # every shard opened and its seal checked once, for the consistency check and for training
    report = check_distill_inputs(args.init, args.shards, cfg.allow_inconsistent_teacher, off_policy,
                                  data.infos, data.off_infos)

    from transformers import AutoTokenizer

    from opd_kernels import backend_for
    from offline_opd.models.loading import resolve_model_dir
    from offline_opd.provenance.record import write_provenance
    from offline_opd.train.module import TrainModule
    from offline_opd.train.trainer import fit, load_for_training, save_model

    data.setup()
    objective = loss_from_config(cfg, f"{args.params}: distill",
                                 behavior_temperature=data.infos[0].footer.sampling_temperature)
    model, dtype, weights = load_for_training(args.init, cfg.precision, sharded=cfg.strategy == "fsdp")
    module = TrainModule(model, cfg, objective, weights=weights)
    try:
        result = fit(module, data, cfg, args.logs, run_key(cfg, report, data.infos + (data.off_infos or [])),
                     f"{args.params}: distill")
    except ShardError as exc:
        raise unwrap_worker_error(exc) from None

    def finish(folder: Path) -> None:
        """π_ref's tokenizer (unchanged) and the provenance next to the trained weights."""
        AutoTokenizer.from_pretrained(resolve_model_dir(args.init)).save_pretrained(folder)
        write_provenance(
            folder, "distill", source=str(args.init), config=dataclasses.asdict(cfg),
            init_fingerprint=report["init_fingerprint"], teacher_fingerprint=report["teacher_fingerprint"],
            # Carried forward so the next round of multi-round OPD can start from this student: it
            # descends from the same SFT data, and that teacher's shards are what stay consistent with it.
            sft_teacher_fingerprint=report["sft_teacher_fingerprint"],
            **({"sft_teachers": report["sft_teachers"]} if "sft_teachers" in report else {}),   # multi-teacher OPD
            allow_inconsistent_teacher=cfg.allow_inconsistent_teacher, consistency=report)

    save_model(result, args.out, dtype, finish)
    if not result.trainer.is_global_zero:
        return {}
    write_text(args.plots / "loss.csv", result.loss_csv("train_loss"))
    device = module.train_device
    return {
        "final_loss": result.final_loss,
        "steps": result.trainer.global_step,
        "resumed": result.resumed,
        **result.speed(),
        "kernel_backend": None if device is None else backend_for(device, cfg.kernel_backend),
        "fused_linear": None if device is None else module.fused_on(device),
        "allow_inconsistent_teacher": cfg.allow_inconsistent_teacher,
        "consistency_override_used": report["override_used"],
        **data.gkd_metrics(result.trainer.global_step),
    }


def main(argv: list[str] | None = None) -> dict:
    return stage_main("distill", __doc__, add_args, run, argv)


if __name__ == "__main__":
    cli(main)
