"""The one trainer builder and run driver for `teacher`, `sft` and `distill`.

`fit()` owns what every training stage needs around `Trainer.fit`: the run key that decides whether
`<logs>/checkpoints/last.ckpt` may be resumed (weights, optimizer, schedule and the exact data
position), deterministic seeds, CSV (and TensorBoard, if installed) logs, checkpoints written through
a temporary file and a rename (a kill -9 mid-write leaves the previous checkpoint intact), and the
final model gathered on rank 0.

Strategies: `auto` (one device, or DDP when devices > 1), `ddp`, `fsdp` (FULL_SHARD, one FSDP unit
per decoder layer, the class named in the model's `_no_split_modules`; with gradient_checkpointing,
activation checkpointing per decoder layer; checkpoints sharded per rank). Dtypes: weights are
loaded in the training dtype (bf16 under bf16-true, else fp32 master weights) and saved in the base
model's own dtype.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from offline_opd.atomic import atomic_dir, write_json
from offline_opd.config import ConfigError, TrainConfig
from offline_opd.errors import UserError
from offline_opd.models.loading import resolve_model_dir
from offline_opd.provenance.record import check_unchanged
from offline_opd.runtime import is_rank_zero
from offline_opd.train.data import ResumableDataModule
from offline_opd.train.module import TrainModule

log = logging.getLogger("opd.train")

CKPT_DIR = "checkpoints"
RUN_KEY_FILE = "run_key.json"
LAST_CKPT = "last.ckpt"
FINAL_LOSS_WINDOW = 10
T = TypeVar("T")


def training_dtype(precision: str) -> torch.dtype:
    """The dtype weights live in while training: bf16 only under bf16-true (mixed keeps fp32 masters)."""
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def load_for_training(path: Path | str, precision: str) -> tuple[torch.nn.Module, torch.dtype]:
    """A pretrained causal LM loaded straight into the training dtype, and the dtype it is stored in
    (refused if a stage wrote it and it changed since: `check_unchanged`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_unchanged(path)
    folder = resolve_model_dir(path)
    stored = getattr(AutoConfig.from_pretrained(folder), "dtype", None) or torch.float32
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=training_dtype(precision))
    return model, stored


def decoder_layer_classes(model: torch.nn.Module) -> set[type]:
    """The decoder layer class(es) FSDP wraps and checkpoints one by one (Hugging Face names them)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); "
                         f"strategy fsdp cannot wrap it per layer")
    return classes


def build_strategy(cfg: TrainConfig, model: torch.nn.Module, where: str) -> Any:
    """The Lightning strategy for `cfg.strategy`; `where` names the params section in errors."""
    if cfg.strategy == "fsdp":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}.strategy: fsdp needs CUDA GPUs (Lightning's FSDP has no CPU path); "
                              f"use ddp or auto on this machine")
        from pytorch_lightning.strategies import FSDPStrategy

        layers = decoder_layer_classes(model)
        return FSDPStrategy(auto_wrap_policy=layers, sharding_strategy="FULL_SHARD", state_dict_type="sharded",
                            activation_checkpointing_policy=layers if cfg.gradient_checkpointing else None)
    return cfg.strategy


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file, then a rename: a checkpoint is whole or the previous one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def build_trainer(cfg: TrainConfig, logs: Path, model: torch.nn.Module, where: str) -> pl.Trainer:
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
    plugins = [] if cfg.strategy == "fsdp" else [AtomicCheckpointIO()]   # FSDP writes its own sharded folders
    return pl.Trainer(
        max_steps=cfg.max_steps, precision=cfg.precision, gradient_clip_val=cfg.grad_clip or None,
        accumulate_grad_batches=cfg.accumulate_grad_batches, strategy=build_strategy(cfg, model, where),
        devices=cfg.devices, num_nodes=cfg.num_nodes, plugins=plugins,
        logger=loggers, callbacks=[checkpoint], enable_progress_bar=True, deterministic=True,
        log_every_n_steps=min(10, cfg.max_steps), num_sanity_val_steps=0, use_distributed_sampler=False,
        enable_model_summary=False)


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
        check_checkpoint(last, logs)
        log.info("resuming from %s", last)
        return last
    if not is_rank_zero():
        return None  # a worker process: rank 0 already cleared and stamped the folder
    if logs.exists():
        log.info("discarding %s: it belongs to other settings or inputs", logs)
        shutil.rmtree(logs)
    write_json(stamp, {"run_key": key})
    return None


def check_checkpoint(path: Path, logs: Path) -> None:
    """A resume checkpoint must be whole: torch.save writes a zip whose entries carry CRC32s, so a truncated
    or flipped byte is found here (one read of the file) and named, instead of failing inside Lightning's
    restore with a traceback. FSDP's sharded checkpoints (folders) are left to their own loader."""
    if path.is_dir():
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        bad = f"{type(exc).__name__}: {exc}"
    if bad is not None:
        raise UserError(f"{path}: the resume checkpoint is corrupt ({bad}); delete {logs} to start this run "
                        f"over (the stage's previous outputs are untouched)")


@dataclass
class FitResult:
    module: TrainModule
    trainer: pl.Trainer
    resumed: bool

    @property
    def final_loss(self) -> Optional[float]:
        """Mean loss of the last steps (one step's loss is noisy)."""
        tail = [loss for _, loss in self.module.loss_history[-FINAL_LOSS_WINDOW:]]
        return round(sum(tail) / len(tail), 6) if tail else None

    def loss_csv(self, loss_column: str) -> str:
        return f"step,{loss_column}\n" + "".join(f"{int(s)},{v:.6g}\n" for s, v in self.module.loss_history)

    def speed(self) -> dict[str, Any]:
        """Throughput of this process's training (tokens on this rank)."""
        m, secs = self.module, self.module.train_seconds
        return {"train_s": round(secs, 2),
                "response_tokens_per_s": round(m.response_tokens / secs, 1) if secs else None,
                "tokens_per_s": round(m.all_tokens / secs, 1) if secs else None,
                "device": None if m.train_device is None else str(m.train_device)}


def fit(module: TrainModule, data: ResumableDataModule, cfg: TrainConfig, logs: Path, key: str,
        where: str) -> FitResult:
    """Train to cfg.max_steps, resuming `<logs>` if it holds a checkpoint of the run `key`.

    `where` names the params section in errors, e.g. "params.yaml: sft"."""
    ckpt = resume_checkpoint(logs, key)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer = build_trainer(cfg, logs, module.model, where)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    if trainer.global_step < cfg.max_steps:
        raise RuntimeError(f"training stopped at step {trainer.global_step} of {cfg.max_steps}")
    # The final state, so a rerun (say, after the output was deleted) saves again without retraining.
    trainer.save_checkpoint(logs / CKPT_DIR / LAST_CKPT)
    return FitResult(module, trainer, ckpt is not None)


def full_state_dict(result: FitResult) -> dict[str, torch.Tensor]:
    """The trained weights, whole, on rank 0's CPU (every rank must call this; others get {})."""
    from pytorch_lightning.strategies import FSDPStrategy

    strategy = result.trainer.strategy
    if not isinstance(strategy, FSDPStrategy):
        if not result.trainer.is_global_zero:
            return {}
        return {k: v.detach().cpu() for k, v in result.module.model.state_dict().items()}
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        state = strategy.model.state_dict()
    return {k.removeprefix("model."): v for k, v in state.items()}


def save_model(result: FitResult, out_dir: Path, dtype: torch.dtype, finish: Callable[[Path], T]) -> Optional[T]:
    """Write the trained model to `out_dir` as a Hugging Face folder in `dtype` (the base model's).

    Every rank must call this (FSDP gathers the shards); rank 0 writes the weights into a temporary
    folder, `finish(folder)` adds the rest (tokenizer, provenance), and the folder replaces `out_dir`
    atomically. Returns what `finish` returned, None on the other ranks.
    """
    state = full_state_dict(result)
    if not result.trainer.is_global_zero:
        return None
    model = result.module.model
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict={k: v.to(dtype) for k, v in state.items()
                                               if k not in result.module.tied_names})
        model.config.dtype = dtype            # save_pretrained records the in-memory (training) dtype
        model.config.save_pretrained(tmp)
        return finish(tmp)
