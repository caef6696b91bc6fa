"""The `teacher` and `sft` training data: (prompt + response) examples in memory, streamed as batches.

An SFT batch has the same keys as a distill batch (pipeline/offline_opd/train/shard_data.collate), with the
teacher replaced by a point mass on the response's own next token (top-1 id = that token, log-prob
0): the forward KL to it is the cross-entropy, so SFT runs the distill module and kernels unchanged.

Order: the rows of shuffled epochs drawn one after another from one seeded generator, cut into global
micro-batches; micro-batch j of rank r holds rows [(j·W + r)·b, (j·W + r + 1)·b) of that order (W
ranks, b rows each). So the rows of one optimizer step are the same for any split into ranks and
accumulation steps, and a rank resuming at micro-batch j needs nothing but j. Sequences are
right-padded to the longest in their micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset

from offline_opd.train.data import GroupedBatches, ResumableDataModule


@dataclass(frozen=True)
class Example:
    """One training sequence: prompt + response ids; loss on `input_ids[prompt_len:]`."""

    input_ids: list[int]
    prompt_len: int


def check_examples(examples: Sequence[Example]) -> None:
    if not examples:
        raise ValueError("no training examples")
    for row, e in enumerate(examples):
        if not 0 < e.prompt_len < len(e.input_ids):
            raise ValueError(f"example {row}: prompt_len {e.prompt_len} leaves no response tokens "
                             f"in a sequence of {len(e.input_ids)}")


def collate(examples: Sequence[Example], rows: Sequence[int], pad_id: int) -> dict[str, Any]:
    """Right-padded [B, T] tensors with point-mass targets; `rows` become the batch's sample ids."""
    lengths = torch.tensor([len(e.input_ids) for e in examples])
    ids = torch.full((len(examples), int(lengths.max())), pad_id, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.as_tensor(e.input_ids)
    positions = torch.arange(ids.shape[1])
    prompt_lens = torch.tensor([e.prompt_len for e in examples])
    real = positions < lengths[:, None]
    response = (positions >= prompt_lens[:, None]) & real
    zeros = torch.zeros(ids.shape, dtype=torch.float32)
    return {
        "input_ids": ids, "attention_mask": real.long(), "response_mask": response,
        "topk_ids": torch.where(response, ids, -1)[..., None].int(), "topk_logprobs": zeros[..., None],
        "teacher_logprob": zeros, "behavior_logprob": zeros, "sample_id": list(rows),
    }


class RowOrder:
    """Row indices of consecutive shuffled epochs from one seeded generator, drawn as far as needed."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)

    def take(self, start: int, count: int) -> list[int]:
        while self.order.numel() < start + count:
            self.order = torch.cat([self.order, torch.randperm(self.n, generator=self.generator)])
        return self.order[start:start + count].tolist()


class ExampleStream(IterableDataset):
    """Rank `rank`'s endless micro-batches, from micro-batch `start_batches` on."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, start_batches: int = 0) -> None:
        super().__init__()
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.rank, self.world_size, self.start_batches = rank, world_size, start_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = RowOrder(len(self.examples), self.seed)
        b = self.batch_size
        for j in range(self.start_batches, 2**62):
            rows = order.take((j * self.world_size + self.rank) * b, b)
            yield collate([self.examples[i] for i in rows], rows, self.pad_id)


class ExampleDataModule(ResumableDataModule):
    """In-memory examples; in the main process (collating a few hundred short rows is cheap)."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, pad_id: int) -> None:
        super().__init__()
        check_examples(examples)
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id

    def train_dataloader(self) -> GroupedBatches:
        rank, world = self.rank_world()
        stream = ExampleStream(self.examples, self.batch_size, self.seed, self.pad_id, rank, world,
                               self.start_batches)
        return self.grouped(DataLoader(stream, batch_size=None))

    def layout(self) -> dict[str, Any]:
        return {"world_size": self.rank_world()[1], "batch_size": self.batch_size, "seed": self.seed,
                "examples": len(self.examples)}

    def longest_sequence(self) -> int:
        return max(len(e.input_ids) for e in self.examples)
