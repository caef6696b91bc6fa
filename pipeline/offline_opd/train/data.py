"""What the training data modules share: a resumable position, and the token counts of each step.

Both data modules (teacher shards for `distill`, examples for `teacher`/`sft`) hand every rank an
endless stream of micro-batches in an order that depends only on the seed and the layout (ranks,
workers, batch size), never on timing. So a checkpoint's data position is one number, the
micro-batches each rank consumed (global step x accumulate_grad_batches; checkpoints are written
between optimizer steps), and a resumed stream starts exactly there.

`GroupedBatches` reads each optimizer step's micro-batches ahead (in the main process, after the
DataLoader's workers) and attaches the response-token count of every one of them, so the module can
divide by the step's global token count before the first forward pass (pipeline/offline_opd/train/module.py).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import pytorch_lightning as pl
import torch

from offline_opd.config import ConfigError


class GroupedBatches:
    """The batches of `loader`, each with `group_tokens` (response tokens of every micro-batch of its
    optimizer step on this rank) and `group_index` (its place in that step)."""

    def __init__(self, loader: Iterable[dict[str, Any]], accumulate: int) -> None:
        self.loader, self.accumulate = loader, accumulate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(self.loader)
        while group := list(itertools.islice(batches, self.accumulate)):
            counts = torch.tensor([int(b["response_mask"].sum()) for b in group])
            for i, batch in enumerate(group):
                yield {**batch, "group_tokens": counts, "group_index": i}


class ResumableDataModule(pl.LightningDataModule):
    """A data module whose checkpoint state is the micro-batches each rank consumed, under a layout."""

    def __init__(self) -> None:
        super().__init__()
        self.start_batches = 0

    def layout(self) -> dict[str, Any]:
        """What a position is relative to: resuming under another layout would mis-skip."""
        raise NotImplementedError

    def longest_sequence(self) -> int:
        """Tokens of the longest sequence (or of a cheap sample's longest), for the step memory estimate."""
        raise NotImplementedError

    def rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def accumulate(self) -> int:
        return self.trainer.accumulate_grad_batches if self.trainer is not None else 1

    def grouped(self, loader: Iterable[dict[str, Any]]) -> GroupedBatches:
        return GroupedBatches(loader, self.accumulate())

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": int(self.trainer.global_step) * self.accumulate(), "layout": self.layout()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["layout"] != self.layout():
            raise ConfigError(f"the checkpoint's data reader ran with {state_dict['layout']}, this run has "
                              f"{self.layout()}: resume with the same devices and settings, or delete the "
                              f"checkpoint folder to start over")
        self.start_batches = int(state_dict["batches_consumed"])
