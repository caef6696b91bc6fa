"""Supervised training on (prompt, response) examples: the toy teacher and SFT.

The same module and trainer as distill, with the objective reduced to cross-entropy on response
tokens: the kernels' forward KL against a point-mass teacher (pipeline/offline_opd/train/examples.py builds the
batches that way), which never materialises an autograd-saved [N, V] softmax and uses the fused
lm_head on GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from offline_opd.config import TrainConfig
from offline_opd.train.losses import DistillLoss, loss_spec
from offline_opd.train.examples import Example, ExampleDataModule
from offline_opd.train.module import TrainModule
from offline_opd.train.sharding import MetaWeights
from offline_opd.train.trainer import FitResult, fit


def cross_entropy_objective() -> DistillLoss:
    """Cross-entropy on every response token, as the forward KL to a point mass on it."""
    return DistillLoss(loss_spec("fkl", {}, "sft"), backend="auto")


def run_key(cfg: TrainConfig, examples: Sequence[Example], **inputs: Any) -> str:
    """Identity of a supervised run (settings, the examples, named inputs): a checkpoint resumes only under it."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.prompt_len, e.input_ids]).encode())
    payload = {"config": dataclasses.asdict(cfg), "examples": digest.hexdigest(), **inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def train_supervised(model: torch.nn.Module, examples: Sequence[Example], cfg: TrainConfig, pad_id: int,
                     logs: Path, key: str, where: str, weights: Optional[MetaWeights] = None) -> FitResult:
    """Fine-tune `model` (already in the training dtype, or on the meta device with its `weights`) on
    `examples`, resuming `logs` under `key`; `where` names the params section in errors."""
    data = ExampleDataModule(examples, cfg.batch_size, cfg.seed, pad_id)
    return fit(TrainModule(model, cfg, cross_entropy_objective(), weights=weights), data, cfg, logs, key, where)
