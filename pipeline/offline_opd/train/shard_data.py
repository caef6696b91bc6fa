"""Streaming the teacher_topk shards into padded training batches, resumable to the exact batch.

Nothing is loaded whole: every shard is checked up front from its footer, then each reader streams
row groups. The unit of work is one row group. Per data epoch e, all row groups are put in an order
drawn from (seed, e) and dealt round-robin to the G = ranks × dataloader-workers readers, so every
row group goes to exactly one reader per epoch. A reader mixes its row groups `shuffle_row_groups` at
a time (a bounded shuffle buffer: the rows of those groups in an order drawn from (seed, e, reader,
window)), and cuts its row stream into batches of `batch_size` sequences, continuing across windows
and epochs (the stream is endless; the Trainer stops at max_steps).

Why this resumes exactly: a reader's stream is a pure function of (seed, layout, row-group sizes), so
its position is just the number of rows it has handed out. The DataLoader takes batch i from worker
i mod W, so the one number a checkpoint stores (micro-batches consumed on each rank) gives
every reader's row offset; a resumed reader skips that many rows using row-group sizes from the
footers, reading only the window it resumes in, and the resumed workers take over the readers in the
rotated order that keeps the round-robin sequence of batches unchanged.

GKD (`distill.gkd`): a second pool, the teacher's own scored sequences (`sft_topk`), is read the same
way; micro-batch j takes `Mix.on_policy(j)` rows from the on-policy reader and the rest from the
off-policy one (pipeline/offline_opd/train/gkd.py). Those counts depend only on j, so a resumed reader
still knows how many rows of each pool it has handed out.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from offline_opd.contract import shards
from offline_opd.config import ConfigError
from offline_opd.contract.tables import BEHAVIOR, ROLLOUT_SCHEMA, TeacherFormat
from offline_opd.train.data import GroupedBatches, ResumableDataModule
from offline_opd.train.gkd import Mix

# The rollout columns a batch needs (all but prompt_id).
ROLLOUT_COLUMNS = [name for name in ROLLOUT_SCHEMA.names if name != "prompt_id"]


@dataclass(frozen=True)
class Unit:
    """One row group of one shard: what a reader is dealt."""

    shard: int
    group: int
    rows: int


def shard_units(infos: list[shards.ShardInfo]) -> list[Unit]:
    """All row groups of all shards, with their row counts (from the footers)."""
    units = []
    for s, info in enumerate(infos):
        meta = pq.ParquetFile(info.path).metadata
        units += [Unit(s, g, meta.row_group(g).num_rows) for g in range(info.num_row_groups)]
    return units


def reader_units(units: list[Unit], seed: int, epoch: int, reader: int, readers: int) -> list[Unit]:
    """The row groups reader `reader` of `readers` streams in data epoch `epoch`, in order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    return [units[i] for i in order[reader::readers]]


def check_readers(row_groups: int, world_size: int, workers: int) -> None:
    """Every reader needs a row group per epoch, or its stream would never yield."""
    if row_groups < world_size * workers:
        raise ConfigError(f"{row_groups} row groups cannot feed {world_size * workers} readers "
                          f"({world_size} ranks x {workers} workers): lower distill.num_workers")


class Pool:
    """The shards of one row source (π_ref's rollouts, or the teacher's SFT answers), read as one stream per
    reader: per data epoch e its row groups in an order drawn from (seed, e), dealt round-robin to the
    readers, mixed `window` row groups at a time."""

    def __init__(self, infos: list[shards.ShardInfo], fmt: TeacherFormat, seed: int, window: int) -> None:
        self.infos, self.units, self.fmt, self.seed, self.window = infos, shard_units(infos), fmt, seed, window

    def rows(self, reader: int, readers: int, skip: int) -> Iterator[pa.Table]:
        """This reader's row stream, window by window, starting `skip` rows in."""
        for epoch in itertools.count():
            units = reader_units(self.units, self.seed, epoch, reader, readers)
            for w in range(0, len(units), self.window):
                window = units[w:w + self.window]
                n = sum(u.rows for u in window)
                if skip >= n:  # resume: skip whole windows without reading them
                    skip -= n
                    continue
                table = pa.concat_tables([self._read(u) for u in window])
                order = np.random.default_rng([self.seed, epoch, reader, w]).permutation(table.num_rows)
                yield table.take(pa.array(order[skip:]))
                skip = 0

    def _read(self, unit: Unit) -> pa.Table:
        info = self.infos[unit.shard]
        (table,) = shards.iter_row_groups(info, ROLLOUT_COLUMNS + [f.name for f in self.fmt.fields()], [unit.group])
        check_rows(table, self.fmt, f"{info.path}: row group {unit.group}")
        return table


class RowTaker:
    """Hands out the next n rows of a stream of tables; the stream is not touched until rows are asked for."""

    def __init__(self, tables: Iterator[pa.Table]) -> None:
        self.tables, self.pending, self.have = tables, [], 0

    def take(self, n: int) -> pa.Table:
        while self.have < n:
            table = next(self.tables)
            self.pending.append(table)
            self.have += table.num_rows
        rows = pa.concat_tables(self.pending)
        self.pending, self.have = [rows.slice(n)], rows.num_rows - n
        return rows.slice(0, n)


class TeacherShardStream(IterableDataset):
    """An endless stream of collated batches for one rank (split further across its DataLoader workers).

    With `off_policy` shards and a `mix` (GKD, pipeline/offline_opd/train/gkd.py), micro-batch j holds
    mix.on_policy(j) rows of the on-policy stream followed by the rest from the off-policy one; both pools
    are read the same way, with the same seed, so λ = 1 gives exactly the on-policy-only batches and λ = 0
    exactly those of the off-policy shards alone. A pool is read only once a batch takes rows from it."""

    def __init__(self, infos: list[shards.ShardInfo], batch_size: int, seed: int, shuffle_row_groups: int,
                 rank: int = 0, world_size: int = 1, start_batches: int = 0,
                 off_policy: Optional[list[shards.ShardInfo]] = None, mix: Optional[Mix] = None) -> None:
        super().__init__()
        if batch_size < 1 or shuffle_row_groups < 1:
            raise ValueError(f"batch_size and shuffle_row_groups must be >= 1, got {batch_size}, {shuffle_row_groups}")
        if (off_policy is None) != (mix is None) or (mix is not None and mix.batch_size != batch_size):
            raise ValueError("off-policy shards need a mix of the same batch size, and a mix needs off-policy shards")
        self.fmt = shards.teacher_format(infos)
        self.pools = [Pool(infos, self.fmt, seed, shuffle_row_groups)]
        if off_policy is not None:
            self.pools.append(Pool(off_policy, self.fmt, seed, shuffle_row_groups))
        self.mix = mix or Mix(1.0, 1.0, 0, batch_size)
        self.batch_size = batch_size
        self.rank, self.world_size, self.start_batches = rank, world_size, start_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        readers = self.world_size * workers
        for pool in self.pools:
            check_readers(len(pool.units), self.world_size, workers)
        # The resumed loader's batch j is the original run's batch start + j, which came from worker
        # (start + j) mod W: so this worker continues the stream of that one, from its batch start + worker.
        role = (worker + self.start_batches) % workers
        skips = self.mix.counts_before(self.start_batches, role, workers)
        takers = [RowTaker(pool.rows(self.rank * workers + role, readers, skip))
                  for pool, skip in zip(self.pools, skips)]
        for j in itertools.count(self.start_batches + worker, workers):
            on = self.mix.on_policy(j)
            parts = [t.take(n) for t, n in zip(takers, (on, self.batch_size - on)) if n]
            yield collate(parts[0] if len(parts) == 1 else pa.concat_tables(parts), self.fmt)


def check_rows(table: pa.Table, fmt: TeacherFormat, where: str) -> None:
    """Row-level contract the footer cannot show: per-token columns match the response length."""
    length = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    prompt = table.column("prompt_len").to_numpy()
    resp = length - prompt
    problems = [("prompt_len must be in [1, len(input_ids)]", (prompt < 1) | (resp < 0))]
    for name, width in {BEHAVIOR: 1, **fmt.widths()}.items():
        got = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
        problems.append((f"{name} must hold {width} value(s) per response token", got != resp * width))
    for what, bad in problems:
        if bad.any():
            sid = table.column("sample_id")[int(np.argmax(bad))].as_py()
            raise shards.ShardError(f"{where}, sample_id {sid}: {what} (width {fmt.width}); the shard is inconsistent: "
                                    f"rerun the `teacher_topk` stage")


def collate(table: pa.Table, fmt: TeacherFormat) -> dict[str, Any]:
    """Right-padded [B, T] / [B, T, W] tensors; per-token values sit at the position of their token.

    Keys: input_ids, attention_mask, response_mask (True at response tokens), topk_ids (-1 elsewhere),
    topk_logprobs, teacher_logprob, behavior_logprob (π_ref's log-prob at sampling time), sample_id (list),
    and, when the shards hold them, tail_logprob [B, T] and entry_weights [B, T, W] (decoded by `fmt`).
    """
    length = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    prompt = table.column("prompt_len").to_numpy().astype(np.int64)
    resp = length - prompt
    B, T = len(length), int(length.max(initial=1))
    rows, cols = _positions(length, np.zeros_like(length))
    rrows, rcols = _positions(resp, prompt)

    def flat(name: str) -> np.ndarray:
        return pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)

    ids = np.zeros((B, T), np.int64)
    ids[rows, cols] = flat("input_ids")
    attn = np.zeros((B, T), np.int64)
    attn[rows, cols] = 1
    resp_mask = np.zeros((B, T), bool)
    resp_mask[rrows, rcols] = True
    per_token = {}
    for name in ("teacher_logprob", BEHAVIOR):
        arr = np.zeros((B, T), np.float32)
        arr[rrows, rcols] = flat(name)
        per_token[name] = torch.from_numpy(arr)
    for key, values in fmt.decode(table).items():
        if values is not None:
            arr = np.full((B, T, *values.shape[1:]), -1 if key == "topk_ids" else 0, values.dtype)
            arr[rrows, rcols] = values
            per_token[key] = torch.from_numpy(arr)
    return {
        "input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn),
        "response_mask": torch.from_numpy(resp_mask), **per_token,
        "sample_id": table.column("sample_id").to_pylist(),
    }


def _positions(counts: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every element when row b holds counts[b] values from column starts[b] on."""
    rows = np.repeat(np.arange(len(counts)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return rows, np.arange(int(counts.sum())) - first + starts[rows]


def unwrap_worker_error(exc: shards.ShardError) -> shards.ShardError:
    """A ShardError a DataLoader worker raised reaches the main process with the worker's traceback
    folded into its message: keep only the original message (file, row group, fix), on one line."""
    marker = f"{shards.ShardError.__module__}.{shards.ShardError.__qualname__}: "
    text = str(exc)
    if marker not in text:
        return exc
    return shards.ShardError(" ".join(text.rsplit(marker, 1)[1].split()))


class TeacherShardDataModule(ResumableDataModule):
    """The teacher shards of one distill run; its state in a checkpoint is the reader position.

    With `off_policy_dir` and a `gkd` schedule that goes below λ = 1 (`config.GkdConfig`), batches mix in
    the teacher's own scored sequences (`sft_topk`); otherwise that folder is never opened."""

    def __init__(self, shards_dir: Path | str, batch_size: int, seed: int, shuffle_row_groups: int,
                 num_workers: int, off_policy_dir: Path | str | None = None, gkd: Any = None,
                 max_steps: int = 1) -> None:
        super().__init__()
        self.shards_dir, self.batch_size, self.seed = Path(shards_dir), batch_size, seed
        self.shuffle_row_groups, self.num_workers = shuffle_row_groups, num_workers
        self.off_policy_dir = Path(off_policy_dir) if off_policy_dir is not None and gkd is not None \
            and gkd.off_policy else None
        self.gkd, self.max_steps = gkd, max_steps
        self.infos: Optional[list[shards.ShardInfo]] = None
        self.off_infos: Optional[list[shards.ShardInfo]] = None

    def open(self) -> None:
        """Open both folders: every shard's footer, schema and seal checked (idempotent)."""
        if self.infos is None:
            if self.gkd is not None and self.gkd.off_policy and self.off_policy_dir is None:
                raise ConfigError("distill.gkd mixes in the teacher's own sequences, but no off-policy shard folder "
                                  "was given: pass --off-policy data/sft_topk")
            self.infos = shards.open_teacher_shards(self.shards_dir)
            if self.off_policy_dir is not None:
                self.off_infos = shards.open_teacher_shards(self.off_policy_dir)

    def setup(self, stage: Optional[str] = None) -> None:
        """Open the shards (if not yet) and check that both pools batch together (distill calls it before
        loading the model)."""
        self.open()
        shards.teacher_format(self.infos + (self.off_infos or []))   # one batch, one format

    def mix(self) -> Optional[Mix]:
        """The GKD schedule in this run's micro-batches (None: on-policy only)."""
        if self.off_infos is None:
            return None
        return Mix.of(self.gkd, self.max_steps, self.batch_size, self.accumulate())

    def gkd_metrics(self, steps: int) -> dict[str, float]:
        """The on-policy share of the sequences `steps` optimizer steps trained on, as the schedule dealt them."""
        mix = self.mix()
        if mix is None:
            return {"gkd_on_policy_frac": 1.0}
        batches = steps * mix.accumulate
        return {"gkd_on_policy_frac": round(mix.cumulative(batches) / max(1, batches * mix.batch_size), 4),
                "gkd_off_policy_rows_per_rank": batches * mix.batch_size - mix.cumulative(batches)}

    def train_dataloader(self) -> GroupedBatches:
        self.setup()
        rank, world = self.rank_world()
        stream = TeacherShardStream(self.infos, self.batch_size, self.seed, self.shuffle_row_groups, rank, world,
                                    self.start_batches, self.off_infos, self.mix())
        for pool in stream.pools:   # here, not deep in a worker
            check_readers(len(pool.units), world, max(1, self.num_workers))
        return self.grouped(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                       pin_memory=torch.cuda.is_available()))

    def longest_sequence(self) -> int:
        """The longest sequence in the first row group of every part: a sample, read before any batch."""
        self.setup()
        return max(max(pc.list_value_length(next(shards.iter_row_groups(i, ["input_ids"]))
                                             .column("input_ids")).to_pylist(), default=0)
                   for i in self.infos + (self.off_infos or []))

    def layout(self) -> dict[str, Any]:
        self.setup()
        out = {"world_size": self.rank_world()[1], "num_workers": self.num_workers, "batch_size": self.batch_size,
               "seed": self.seed, "shuffle_row_groups": self.shuffle_row_groups,
               "shards": [[i.path.name, i.num_rows] for i in self.infos]}
        if self.off_infos is not None:
            out["off_policy_shards"] = [[i.path.name, i.num_rows] for i in self.off_infos]
        return out
