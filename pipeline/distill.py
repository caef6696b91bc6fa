"""Stage `distill`: train π_ref on the precomputed teacher top-k shards (offline on-policy distillation).

Order of work, cheapest checks first: the teacher-consistency check (shard footers, provenance,
fingerprints; refuses a mismatched teacher, policy or tokenizer unless distill.allow_inconsistent_teacher
is set, which is then recorded), the loss settings, every shard's footer and schema, and only then the
student. The teacher is never loaded: the shards hold everything the loss needs.

Training is a Lightning Trainer: max_steps, deterministic seeds, CSV (and TensorBoard, if installed)
logs and a `last.ckpt` checkpoint under --logs. A rerun with the same settings and inputs resumes from
that checkpoint (weights, optimizer, schedule and the exact data position); a checkpoint from other
settings or inputs is discarded with its logs. The result is a Hugging Face folder at --out (written
atomically, with opd_provenance.json), the loss curve at --plots/loss.csv, and metrics/distill.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from pipeline.atomic import atomic_dir, write_json, write_text
from pipeline.config import DistillConfig
from pipeline.consistency import check_distill_inputs
from pipeline.errors import UserError
from pipeline.shards import ShardError, ShardInfo
from pipeline.stage import stage_main

log = logging.getLogger("opd.distill")

CKPT_DIR = "checkpoints"
RUN_KEY_FILE = "run_key.json"
LAST_CKPT = "last.ckpt"
FINAL_LOSS_WINDOW = 10


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", type=Path, required=True,
                        help="π_ref: the Hugging Face model folder training starts from (the sft stage's output)")
    parser.add_argument("--shards", type=Path, required=True,
                        help="folder of teacher_topk part-*.parquet shards (streamed, never loaded whole)")
    parser.add_argument("--out", type=Path, required=True,
                        help="where the distilled model is written (a Hugging Face folder, replaced atomically)")
    parser.add_argument("--logs", type=Path, required=True,
                        help="training logs and the resume checkpoint (keep it between runs to resume)")
    parser.add_argument("--plots", type=Path, required=True, help="folder for loss.csv (columns step, train_loss)")


def run_key(cfg: DistillConfig, report: dict, infos: list[ShardInfo]) -> str:
    """Identity of a training run: its settings and its exact inputs. A checkpoint resumes only under it."""
    shard_ids = [[i.path.name, i.meta.get("run_key"), i.meta.get("created_at")] for i in infos]
    payload = {"config": dataclasses.asdict(cfg), "init": report["init_fingerprint"],
               "teacher": report["teacher_fingerprint"], "shards": shard_ids}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def resume_checkpoint(logs: Path, key: str) -> Optional[Path]:
    """`last.ckpt` if it was written under `key`; otherwise clear the logs of the other run and start fresh."""
    ckpt_dir = logs / CKPT_DIR
    stamp = ckpt_dir / RUN_KEY_FILE
    try:
        same = json.loads(stamp.read_text())["run_key"] == key
    except (OSError, ValueError, KeyError):
        same = False
    last = ckpt_dir / LAST_CKPT
    if same and last.exists():
        log.info("resuming from %s", last)
        return last
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return None  # a DDP worker process: rank 0 already cleared and stamped the folder
    if logs.exists():
        log.info("discarding %s: it belongs to other settings or inputs", logs)
        shutil.rmtree(logs)
    write_json(stamp, {"run_key": key})
    return None


def build_trainer(cfg: DistillConfig, logs: Path):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    loggers: list[Any] = [CSVLogger(logs, name="csv")]
    try:
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(logs, name="tensorboard"))
    except ImportError:
        pass
    checkpoint = ModelCheckpoint(dirpath=logs / CKPT_DIR, save_last=True, save_top_k=0,
                                 every_n_train_steps=cfg.checkpoint_every_n_steps)
    return pl.Trainer(
        max_steps=cfg.max_steps, precision=cfg.precision, gradient_clip_val=cfg.grad_clip or None,
        logger=loggers, callbacks=[checkpoint], enable_progress_bar=True, deterministic=True,
        log_every_n_steps=min(10, cfg.max_steps), num_sanity_val_steps=0, use_distributed_sampler=False,
        enable_model_summary=False)


def save_model(module, init: Path, out: Path, cfg: DistillConfig, report: dict) -> dict:
    """The trained weights and π_ref's tokenizer (unchanged) as a Hugging Face folder, with provenance."""
    from transformers import AutoTokenizer

    from pipeline.models import resolve_model_dir
    from pipeline.provenance import write_provenance

    with atomic_dir(out) as tmp:
        module.model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(resolve_model_dir(init)).save_pretrained(tmp)
        return write_provenance(
            tmp, "distill", source=str(init), config=dataclasses.asdict(cfg),
            init_fingerprint=report["init_fingerprint"], teacher_fingerprint=report["teacher_fingerprint"],
            allow_inconsistent_teacher=cfg.allow_inconsistent_teacher, consistency=report)


def loss_csv(history: list[list[float]]) -> str:
    return "step,train_loss\n" + "".join(f"{int(s)},{loss:.6g}\n" for s, loss in history)


def check_kernel_backend(cfg: DistillConfig, params: Path) -> None:
    """`triton` without a GPU would fail deep in training (or crawl in the interpreter unasked); say so first."""
    import torch

    if cfg.kernel_backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(f"{params}: distill.kernel_backend: 'triton' needs a CUDA GPU and none is visible; set it to "
                        f"'auto' (Triton on GPU, PyTorch on CPU) or 'torch'")


def run(args: argparse.Namespace, cfg: DistillConfig) -> dict:
    check_kernel_backend(cfg, args.params)
    report = check_distill_inputs(args.init, args.shards, cfg.allow_inconsistent_teacher)

    import pytorch_lightning as pl

    from kernels import backend_for
    from pipeline.distill_data import TeacherShardDataModule, unwrap_worker_error
    from pipeline.distill_module import DistillModule
    from pipeline.losses import loss_from_config

    objective = loss_from_config(cfg, f"{args.params}: distill")
    data = TeacherShardDataModule(args.shards, cfg.batch_size, cfg.seed, cfg.shuffle_row_groups, cfg.num_workers)
    data.setup()
    ckpt = resume_checkpoint(args.logs, run_key(cfg, report, data.infos))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = DistillModule(args.init, cfg, objective)
    trainer = build_trainer(cfg, args.logs)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    except ShardError as exc:
        raise unwrap_worker_error(exc) from None
    if trainer.global_step < cfg.max_steps:
        raise RuntimeError(f"training stopped at step {trainer.global_step} of {cfg.max_steps}")
    # The final state, so a rerun (say, after --out was deleted) saves again without retraining.
    trainer.save_checkpoint(args.logs / CKPT_DIR / LAST_CKPT)
    if not trainer.is_global_zero:
        return {}
    save_model(module, args.init, args.out, cfg, report)
    write_text(args.plots / "loss.csv", loss_csv(module.loss_history))
    tail = [loss for _, loss in module.loss_history[-FINAL_LOSS_WINDOW:]]
    secs, device = module.train_seconds, module.train_device
    return {
        "final_loss": round(sum(tail) / len(tail), 6) if tail else None,
        "steps": trainer.global_step,
        "resumed": ckpt is not None,
        "train_s": round(secs, 2),
        "response_tokens_per_s": round(module.response_tokens / secs, 1) if secs else None,
        "tokens_per_s": round(module.all_tokens / secs, 1) if secs else None,
        "device": None if device is None else str(device),
        "kernel_backend": None if device is None else backend_for(device, cfg.kernel_backend),
        "fused_linear": None if device is None else module.fused_on(device),
        "allow_inconsistent_teacher": cfg.allow_inconsistent_teacher,
        "consistency_override_used": report["override_used"],
    }


def main(argv: list[str] | None = None) -> dict:
    return stage_main("distill", __doc__, add_args, run, argv)


if __name__ == "__main__":
    main()
