"""The one trainer builder and run driver for `teacher`, `sft` and `distill`.

`fit()` owns what every training stage needs around `Trainer.fit`: the run key that decides whether
`<logs>/checkpoints/last.ckpt` may be resumed (weights, optimizer, schedule and the exact data
position), deterministic seeds, CSV (and TensorBoard, if installed) logs, checkpoints written through
a temporary file and a rename (a kill -9 mid-write leaves the previous checkpoint intact), and the
final model gathered on rank 0.

Strategies: `auto` (one device, or DDP when devices > 1), `ddp`, `fsdp` (FSDP2 through Lightning's
ModelParallelStrategy: `fully_shard` per decoder layer and at the root, sharded DCP checkpoints, a
pretrained model loaded on the meta device and read shard by shard: pipeline/offline_opd/train/sharding.py).
Dtypes: weights are loaded in the training dtype (bf16 under bf16-true, else fp32 master weights) and
saved in the base model's own dtype.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence, TypeVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from offline_opd.atomic import atomic_dir, write_json
from offline_opd.config import TrainConfig
from offline_opd.errors import UserError
from offline_opd.models.loading import resolve_model_dir
from offline_opd.provenance.record import check_unchanged
from offline_opd.runtime import Terminated, is_rank_zero
from offline_opd.train.data import ResumableDataModule
from offline_opd.train.module import TrainModule
from offline_opd.train.resources import Shape, check_fits_machine
from offline_opd.train.sharding import MetaWeights, ShardedStrategy, gather_full_state, load_on_meta

log = logging.getLogger("opd.train")

CKPT_DIR = "checkpoints"
RUN_KEY_FILE = "run_key.json"
LAST_CKPT = "last.ckpt"
FINAL_LOSS_WINDOW = 10
T = TypeVar("T")


def training_dtype(precision: str) -> torch.dtype:
    """The dtype weights live in while training: bf16 only under bf16-true (mixed keeps fp32 masters)."""
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


class Loaded(NamedTuple):
    model: torch.nn.Module
    stored_dtype: torch.dtype               # what the export writes
    weights: Optional[MetaWeights]          # sharded loading: where the meta-device model's weights are


def load_for_training(path: Path | str, precision: str, sharded: bool = False) -> Loaded:
    """A pretrained causal LM in the training dtype, and the dtype it is stored in (refused if a stage
    wrote it and it changed since: `check_unchanged`).

    `sharded` (strategy fsdp): the parameters stay on the meta device and each rank reads its own shard
    of them after fully_shard (TrainModule.configure_model), so no rank holds the whole model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_unchanged(path)
    folder = resolve_model_dir(path)
    stored = getattr(AutoConfig.from_pretrained(folder), "dtype", None) or torch.float32
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    if sharded:
        model, weights = load_on_meta(folder, training_dtype(precision))
        return Loaded(model, stored, weights)
    return Loaded(AutoModelForCausalLM.from_pretrained(folder, dtype=training_dtype(precision)), stored, None)


def build_strategy(cfg: TrainConfig) -> Any:
    """The Lightning strategy for `cfg.strategy`."""
    if cfg.strategy == "fsdp":
        return ShardedStrategy(cfg.devices * cfg.num_nodes, cfg.cpu_offload)
    return cfg.strategy


def trainer_precision(cfg: TrainConfig) -> str:
    """Lightning's precision flag. Under fsdp, bf16-mixed is FSDP2's MixedPrecisionPolicy (bf16 parameters
    and compute, fp32 masters and gradient reduction), so no autocast on top."""
    return "32-true" if cfg.strategy == "fsdp" and cfg.precision == "bf16-mixed" else cfg.precision


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file, then a rename: a checkpoint is whole or the previous one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def build_trainer(cfg: TrainConfig, logs: Path, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
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
    plugins = [] if cfg.strategy == "fsdp" else [AtomicCheckpointIO()]   # FSDP writes sharded folders itself
    return pl.Trainer(
        max_steps=cfg.max_steps, precision=trainer_precision(cfg), gradient_clip_val=cfg.grad_clip or None,
        accumulate_grad_batches=cfg.accumulate_grad_batches, strategy=build_strategy(cfg),
        devices=cfg.devices, num_nodes=cfg.num_nodes, plugins=plugins,
        logger=loggers, callbacks=[checkpoint, *callbacks], enable_progress_bar=True, deterministic=True,
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
        return {"train_s": round(secs, 2), "train_cpu_s": round(m.train_cpu_seconds, 2), "train_tokens": m.all_tokens,
                "response_tokens_per_s": round(m.response_tokens / secs, 1) if secs else None,
                "tokens_per_s": round(m.all_tokens / secs, 1) if secs else None,
                "device": None if m.train_device is None else str(m.train_device)}


def fit(module: TrainModule, data: ResumableDataModule, cfg: TrainConfig, logs: Path, key: str,
        where: str, callbacks: Sequence[pl.Callback] = ()) -> FitResult:
    """Train to cfg.max_steps, resuming `<logs>` if it holds a checkpoint of the run `key`; `where` names the
    params section in errors (e.g. "params.yaml: sft"); `callbacks`: more Lightning callbacks (measurements)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_fits_machine(cfg, Shape.of(module.model), data.longest_sequence(), module.fused_on(device), where)
    ckpt = resume_checkpoint(logs, key)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer = build_trainer(cfg, logs, callbacks)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    except SIGTERMException:
        # Lightning's own SIGTERM handler ends fit with this SystemExit, whose code (None) means success:
        # the stage was stopped, and says so like any stage stopped by SIGTERM (offline_opd.runtime).
        raise Terminated(signal.SIGTERM) from None
    except SystemExit as exc:
        # Lightning turns Ctrl-C into sys.exit(1) after its graceful shutdown; give it back to the stage,
        # which prints one line and exits with 130 like every other stage (the last checkpoint stays for resume).
        # Only Ctrl-C: `trainer.interrupted` is also set by any other exception, a library's SystemExit included.
        if trainer.interrupted and isinstance(exc.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    if trainer.global_step < cfg.max_steps:
        raise RuntimeError(f"training stopped at step {trainer.global_step} of {cfg.max_steps}")
    # The final state, so a rerun (say, after the output was deleted) saves again without retraining.
    trainer.save_checkpoint(logs / CKPT_DIR / LAST_CKPT)
    return FitResult(module, trainer, ckpt is not None)


def full_state_dict(result: FitResult, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The trained weights, whole, in `dtype`, on rank 0's CPU, without the second names of tied
    parameters (every rank must call this; the others get {})."""
    module = result.module
    if module.is_sharded:
        return gather_full_state(module.model, dtype, module.tied_names)
    if not result.trainer.is_global_zero:
        return {}
    return {k: v.detach().to("cpu", dtype) for k, v in module.model.state_dict().items() if k not in module.tied_names}


def save_model(result: FitResult, out_dir: Path, dtype: torch.dtype, finish: Callable[[Path], T]) -> Optional[T]:
    """Write the trained model to `out_dir` as a Hugging Face folder in `dtype` (the base model's).

    Every rank must call this (FSDP gathers the shards); rank 0 writes the weights into a temporary
    folder, `finish(folder)` adds the rest (tokenizer, provenance), and the folder replaces `out_dir`
    atomically. Returns what `finish` returned, None on the other ranks.
    """
    state = full_state_dict(result, dtype)
    if not result.trainer.is_global_zero:
        return None
    model = result.module.model
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        model.config.dtype = dtype            # save_pretrained records the in-memory (training) dtype
        model.config.save_pretrained(tmp)
        return finish(tmp)
