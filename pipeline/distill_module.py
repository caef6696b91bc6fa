"""The distillation LightningModule: π_ref's weights, trained on precomputed teacher shards.

The teacher is never in memory: everything the loss needs from it is in the batch. The student's
logits are computed only at response positions (position t−1 predicts token t): the decoder's hidden
states are gathered there first, so prompt and padding positions never reach the lm_head. On CUDA the
fused lm_head + divergence kernel takes those hidden states and the lm_head weight and never builds
the [N, V] logits; on CPU (or where the fused path does not apply) the logits of the response
positions are built and handed to the kernel, which writes its gradient into them in place.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch

from pipeline.config import DistillConfig
from pipeline.lm_training import lr_factor
from pipeline.losses import DistillLoss, LossOutput, Targets
from pipeline.models import load_model

HISTORY_KEY = "opd_loss_history"


class DistillModule(pl.LightningModule):
    """`fused`: None picks the fused-linear path on CUDA when the model's lm_head allows it."""

    def __init__(self, init_dir: Path | str, cfg: DistillConfig, objective: DistillLoss,
                 fused: Optional[bool] = None) -> None:
        super().__init__()
        self.cfg, self.objective, self.fused_choice = cfg, objective, fused
        self.model = load_model(init_dir)
        self.model.train()
        head = self.model.get_output_embeddings()
        if getattr(self.model.config, "final_logit_softcapping", None):
            raise ValueError(f"{init_dir}: models with final logit soft-capping are not supported "
                             f"(the kernels take plain lm_head logits)")
        self.fused_ok = isinstance(head, torch.nn.Linear) and head.bias is None
        self.loss_history: list[list[float]] = []   # [step, train_loss], kept in the checkpoint
        self.response_tokens = 0                     # trained in this process (for tokens/s)
        self.all_tokens = 0
        self.train_seconds = 0.0
        self.train_device: Optional[torch.device] = None
        self._t0: Optional[float] = None

    def fused_on(self, device: torch.device) -> bool:
        """Whether training steps on `device` use the fused lm_head + divergence kernel."""
        if self.fused_choice is not None:
            return self.fused_choice and self.fused_ok
        return device.type == "cuda" and self.fused_ok

    def compute_loss(self, batch: dict[str, Any]) -> LossOutput:
        """The objective on one collated batch (see pipeline.distill_data.collate)."""
        target = batch["response_mask"][:, 1:]
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        hidden = hidden[:, :-1][target]
        n = hidden.shape[0]
        targets = Targets(
            sampled_ids=batch["input_ids"][:, 1:][target],
            teacher_logprob=batch["teacher_logprob"][:, 1:][target],
            behavior_logprob=batch["student_logprob"][:, 1:][target],
            topk_ids=batch["topk_ids"][:, 1:][target],
            topk_logprobs=batch["topk_logprobs"][:, 1:][target],
            tail_logprob=batch["tail_logprob"][:, 1:][target] if "tail_logprob" in batch else None,
            entry_weights=batch["entry_weights"][:, 1:][target] if "entry_weights" in batch else None,
            mask=torch.ones(n, dtype=torch.bool, device=hidden.device),
        )
        progress = self.global_step / max(1, self.cfg.max_steps)
        head = self.model.get_output_embeddings()
        if self.fused_on(hidden.device):
            if torch.is_autocast_enabled(hidden.device.type):  # what the lm_head matmul would see
                hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
            return self.objective(targets, progress, hidden=hidden, weight=head.weight)
        return self.objective(targets, progress, logits=head(hidden))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        out = self.compute_loss(batch)
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite distill loss {loss} at step {self.global_step} "
                                     f"(samples {batch['sample_id'][:3]}...)")
        self.loss_history.append([self.global_step, loss])
        self.response_tokens += out.tokens
        self.all_tokens += int(batch["attention_mask"].sum())
        bs = batch["input_ids"].shape[0]
        self.log("train_loss", out.loss.detach(), prog_bar=True, batch_size=bs)
        self.log("divergence", out.divergence, batch_size=bs)
        if out.ce is not None:
            self.log("ce", out.ce, batch_size=bs)
        self.log("tip_kept", out.selected / max(1, out.tokens), batch_size=bs)
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=bs)
        return out.loss

    def on_train_start(self) -> None:
        # Recorded here: Lightning moves the module back to the CPU when fit ends.
        self.train_device = self.device

    def on_train_end(self) -> None:
        if self._t0 is not None:
            self.train_seconds = time.perf_counter() - self._t0

    def configure_optimizers(self) -> dict:
        """AdamW (weight decay on matrices only, not on norms and biases); linear warmup, cosine to zero."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=self.cfg.lr)
        steps, warm = self.cfg.max_steps, self.cfg.warmup_frac
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps, warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[HISTORY_KEY] = self.loss_history

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loss_history = list(checkpoint.get(HISTORY_KEY, []))
