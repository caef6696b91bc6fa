"""The one supervised training loop the `teacher` and `sft` stages share: next-token loss on responses.

Why its own loop and not Lightning or `Trainer`: these runs are minutes on a CPU, and what matters is
that they are exactly reproducible (two runs with the same seed give identical weights, so DVC's
cache and the teacher fingerprints stay meaningful) and cheap per step. Sequences are right-padded, so
causal attention alone keeps real tokens from seeing padding and no attention mask is built; loss is
taken on response tokens only (the prompt is given, not learned).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.atomic import write_text

log = logging.getLogger("opd")

IGNORE = -100
ADAM_BETAS = (0.9, 0.98)
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class Example:
    """One training sequence: prompt + response ids; loss on `input_ids[prompt_len:]`."""

    input_ids: list[int]
    prompt_len: int


@dataclass(frozen=True)
class TrainResult:
    final_loss: float   # mean loss over the last tenth of the steps (one step's loss is noisy)


def pad_examples(examples: Sequence[Example], pad_id: int):
    """Right-padded ids [N, L], labels [N, L] (IGNORE outside responses) and lengths [N]."""
    import torch

    if not examples:
        raise ValueError("no training examples")
    lengths = torch.tensor([len(e.input_ids) for e in examples])
    ids = torch.full((len(examples), int(lengths.max())), pad_id, dtype=torch.long)
    for row, e in enumerate(examples):
        if not 0 < e.prompt_len < len(e.input_ids):
            raise ValueError(f"example {row}: prompt_len {e.prompt_len} leaves no response tokens "
                             f"in a sequence of {len(e.input_ids)}")
        ids[row, :len(e.input_ids)] = torch.as_tensor(e.input_ids)
    positions = torch.arange(ids.shape[1])
    prompt_lens = torch.tensor([e.prompt_len for e in examples])
    in_response = (positions >= prompt_lens[:, None]) & (positions < lengths[:, None])
    labels = torch.where(in_response, ids, IGNORE)
    return ids, labels, lengths


def lr_factor(step: int, steps: int, warmup_frac: float) -> float:
    """Linear warmup to the peak, then cosine decay to zero."""
    warmup = max(1, round(steps * warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def batch_order(n: int, batch_size: int, steps: int, seed: int):
    """Row indices for every step: shuffled epochs, drawn from a seeded generator (no global state)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch_size / n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(epochs)])[:steps * batch_size].view(
        steps, batch_size)


def train_lm(model, examples: Sequence[Example], *, steps: int, batch_size: int, lr: float,
             warmup_frac: float, seed: int, pad_id: int, curve_csv: Path | None = None,
             desc: str = "train") -> TrainResult:
    """Train `model` in place with AdamW and warmup + cosine; write step,loss,lr to `curve_csv`."""
    import torch
    from tqdm import tqdm

    if steps < 1 or batch_size < 1:
        raise ValueError(f"need steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    torch.manual_seed(seed)  # dropout-free models, but keep any stochastic layer reproducible too
    device = next(model.parameters()).device
    ids, labels, lengths = pad_examples(examples, pad_id)
    ids, labels = ids.to(device), labels.to(device)
    order = batch_order(len(examples), batch_size, steps, seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]      # matrices decay; norms do not
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=ADAM_BETAS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup_frac))
    model.train()
    losses: list[float] = []
    rows = ["step,loss,lr"]
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        idx = order[step]
        width = int(lengths[idx].max())
        batch_labels = labels[idx, :width]
        lr_now = opt.param_groups[0]["lr"]
        out = model(input_ids=ids[idx, :width], labels=batch_labels, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        sched.step()
        loss = float(out.loss.detach())
        losses.append(loss)
        rows.append(f"{step},{loss:.6f},{lr_now:.6g}")
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss:.4f}")
    model.eval()
    if curve_csv is not None:
        write_text(curve_csv, "\n".join(rows) + "\n")
    tail = losses[-max(1, steps // 10):]
    result = TrainResult(final_loss=sum(tail) / len(tail))
    log.info("%s: %d steps, final loss %.4f", desc, steps, result.final_loss)
    return result
