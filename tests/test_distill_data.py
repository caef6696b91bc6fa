"""The teacher-shard reader: streaming by row group, splitting across ranks and workers, exact resume,
collation, and corrupted shards surfacing as ShardError naming the file."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from offline_opd.contract import shards, tables
from offline_opd.config import ConfigError
from offline_opd.train.shard_data import (TeacherShardDataModule, TeacherShardStream, collate, reader_units,
                                   shard_units, unwrap_worker_error)
from tests.tiny_models import pi_ref, pi_ref_meta, plain_format, teacher_rows, write_teacher_shards

K = 3


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def shard_dir(tmp_path, monkeypatch):
    """128 rows in 2 shards of 8 row groups of 8 rows."""
    monkeypatch.setattr(shards, "ROW_GROUP_SIZE", 8)
    init = pi_ref(tmp_path / "pi_ref")
    write_teacher_shards(tmp_path / "shards", pi_ref_meta(init, k=K), n_parts=2, rows_per_part=64)
    return tmp_path / "shards"


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def ids_of(batches):
    return [s for b in batches for s in b["sample_id"]]


def test_streams_row_group_by_row_group(shard_dir, monkeypatch):
    infos = shards.open_teacher_shards(shard_dir)  # the run check reads the sample_id column; not counted here
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: reads.append(i) or real(self, i, **kw))
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("a whole shard was read"))
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("a whole shard was read"))
    stream = TeacherShardStream(infos, batch_size=8, seed=0, shuffle_row_groups=2)
    first = next(iter(stream))
    assert len(reads) == 2                     # one shuffle window, not the 16 row groups
    assert first["input_ids"].shape[0] == 8


def test_ranks_and_workers_split_an_epoch_without_overlap_or_gaps(shard_dir):
    infos = shards.open_teacher_shards(shard_dir)
    units = shard_units(infos)
    assert len(units) == 16 and sum(u.rows for u in units) == 128
    for epoch in range(3):
        dealt = [u for r in range(4) for u in reader_units(units, 0, epoch, r, 4)]
        assert sorted(dealt, key=lambda u: (u.shard, u.group)) == units
    assert reader_units(units, 0, 0, 0, 4) != reader_units(units, 0, 1, 0, 4)   # reshuffled per epoch
    seen = []
    for rank in range(2):  # 2 ranks x 2 workers = 4 readers of 32 rows = 4 batches each per epoch
        loader = DataLoader(TeacherShardStream(infos, 8, 0, 2, rank=rank, world_size=2), batch_size=None,
                            num_workers=2)
        seen += ids_of(take(loader, 8))
    assert sorted(seen) == [f"s{i:05d}" for i in range(128)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_neither_repeats_nor_skips(shard_dir, workers):
    def module():
        dm = TeacherShardDataModule(shard_dir, batch_size=6, seed=1, shuffle_row_groups=3, num_workers=workers)
        dm.setup()
        return dm

    full = take(module().train_dataloader(), 30)          # 180 rows: crosses an epoch boundary
    assert len(set(ids_of(full[:20]))) == 120              # no repeats within the first epoch
    first = module()
    head = take(first.train_dataloader(), 11)
    first.trainer = SimpleNamespace(global_step=11, global_rank=0, world_size=1, accumulate_grad_batches=1)
    state = first.state_dict()
    second = module()
    second.load_state_dict(state)
    tail = take(second.train_dataloader(), 19)
    assert ids_of(head + tail) == ids_of(full)
    for a, b in zip(head + tail, full):
        for key in ("input_ids", "topk_ids", "topk_logprobs", "behavior_logprob"):
            assert torch.equal(a[key], b[key])


def test_resume_under_another_layout_is_refused(shard_dir):
    dm = TeacherShardDataModule(shard_dir, batch_size=6, seed=1, shuffle_row_groups=3, num_workers=0)
    dm.trainer = SimpleNamespace(global_step=3, global_rank=0, world_size=1, accumulate_grad_batches=1)
    state = dm.state_dict()
    other = TeacherShardDataModule(shard_dir, batch_size=6, seed=1, shuffle_row_groups=3, num_workers=2)
    with pytest.raises(ConfigError, match="num_workers"):
        other.load_state_dict(state)


def test_collate_places_teacher_values_at_their_tokens():
    table = teacher_rows(3, k=2, vocab=20, seed=4)
    b = collate(table, plain_format(2))
    rows = table.to_pylist()
    T = max(len(r["input_ids"]) for r in rows)
    assert b["input_ids"].shape == (3, T) and b["topk_ids"].shape == (3, T, 2)
    for i, r in enumerate(rows):
        n, p = len(r["input_ids"]), r["prompt_len"]
        assert b["input_ids"][i, :n].tolist() == r["input_ids"]
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert b["response_mask"][i].tolist() == [False] * p + [True] * (n - p) + [False] * (T - n)
        assert b["topk_ids"][i, p:n].reshape(-1).tolist() == r["topk_ids"]
        assert (b["topk_ids"][i, :p] == -1).all() and (b["topk_ids"][i, n:] == -1).all()
        np.testing.assert_allclose(b["topk_logprobs"][i, p:n].reshape(-1).numpy(), r["topk_logprobs"], rtol=1e-6)
        np.testing.assert_allclose(b["teacher_logprob"][i, p:n].numpy(), r["teacher_logprob"], rtol=1e-6)
        np.testing.assert_allclose(b["behavior_logprob"][i, p:n].numpy(), r["behavior_logprob"], rtol=1e-6)
    assert b["sample_id"] == table.column("sample_id").to_pylist()


def test_truncated_shard_is_refused_up_front_naming_the_file(shard_dir):
    path = shard_dir / "part-00001.parquet"
    path.write_bytes(path.read_bytes()[:-100])
    dm = TeacherShardDataModule(shard_dir, batch_size=6, seed=1, shuffle_row_groups=3, num_workers=0)
    with pytest.raises(shards.ShardError, match="part-00001.parquet"):
        dm.setup()


def test_corrupt_row_group_in_a_worker_surfaces_as_shard_error(shard_dir):
    path = shard_dir / "part-00000.parquet"
    dm = TeacherShardDataModule(shard_dir, batch_size=6, seed=1, shuffle_row_groups=3, num_workers=2)
    dm.setup()       # the run check reads sample ids, so damage the file after it to reach the workers
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    data[4:len(data) - footer] = b"\xff" * (len(data) - footer - 4)   # data pages garbage, footer intact
    path.write_bytes(bytes(data))
    with pytest.raises(shards.ShardError) as info:
        take(dm.train_dataloader(), 40)
    msg = str(unwrap_worker_error(info.value))
    assert msg.startswith(str(path)) and "row group" in msg and "\n" not in msg
    with pytest.raises(shards.ShardError, match="do not match the checksum sealed"):   # damaged before setup:
        TeacherShardDataModule(shard_dir, 6, 1, 3, num_workers=0).setup()          # refused there


def test_rows_that_break_the_length_contract_name_file_and_sample(tmp_path):
    init = pi_ref(tmp_path / "pi_ref")
    [path] = write_teacher_shards(tmp_path / "shards", pi_ref_meta(init, k=K), n_parts=1, rows_per_part=4)
    table = pq.read_table(path)
    ids = table.column("topk_ids").to_pylist()
    ids[2] = ids[2][:-1]
    table = table.set_column(table.schema.get_field_index("topk_ids"), "topk_ids", pa.array(ids, pa.list_(pa.int32())))
    shards.write_shard(path, table, shards.read_meta(path), tables.teacher_schema("float16"))
    stream = TeacherShardStream(shards.open_teacher_shards(tmp_path / "shards"), 2, 0, 1)
    with pytest.raises(shards.ShardError, match=r"part-00000\.parquet: row group 0, sample_id s00002: topk_ids"):
        next(iter(stream))


def test_too_few_row_groups_for_the_readers(tmp_path):
    init = pi_ref(tmp_path / "pi_ref")
    write_teacher_shards(tmp_path / "shards", pi_ref_meta(init, k=K), n_parts=1, rows_per_part=4)
    stream = TeacherShardStream(shards.open_teacher_shards(tmp_path / "shards"), 2, 0, 1, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="num_workers"):
        next(iter(stream))
    dm = TeacherShardDataModule(tmp_path / "shards", batch_size=2, seed=0, shuffle_row_groups=1, num_workers=2)
    with pytest.raises(ConfigError, match=r"1 row groups cannot feed 2 readers"):   # in the main process
        dm.train_dataloader()
