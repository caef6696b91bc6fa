"""The shard contract: round trip, footer metadata, validation errors naming the file, resume rules."""

import re

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offline_opd.contract import shards, tables
from tests.tiny_models import legacy


def teacher_table(n_rows: int = 5, k: int = 4, seed: int = 0, first: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(first, first + n_rows):
        p, t = int(rng.integers(2, 6)), int(rng.integers(1, 9))
        lp = np.sort(-rng.random((t, k)).astype(np.float32) * 5, axis=1)[:, ::-1]
        rows.append({
            "sample_id": f"q{i}#0", "prompt_id": f"q{i}",
            "input_ids": rng.integers(0, 50, p + t).astype(np.int32).tolist(), "prompt_len": p,
            "behavior_logprob": (-rng.random(t)).astype(np.float32).tolist(),
            "teacher_logprob": (-rng.random(t)).astype(np.float32).tolist(),
            "tail_logprob": np.log1p(-np.exp(lp.astype(np.float64)).sum(1).clip(max=0.999)).tolist(),
            "topk_ids": rng.integers(0, 50, t * k).astype(np.int32).tolist(),
            "topk_logprobs": lp.reshape(-1).tolist(),
        })
    return pa.Table.from_pylist(rows)


META = {"kind": "teacher_topk", "teacher_fingerprint": "t" * 16, "policy_fingerprint": "p" * 16,
        "tokenizer_fingerprint": "z" * 16, "k": 4, "scoring_temperature": "1.0", "privileged_context": None,
        "backend": "hf", "backend_version": "x", "run_key": "r1"}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_and_footer(tmp_path, dtype):
    table = teacher_table()
    path = shards.write_shard(tmp_path / shards.part_name(0), table, META, tables.teacher_schema(dtype))
    info = shards.open_shard(path, "teacher_topk", tables.teacher_schema(dtype))
    assert info.num_rows == 5 and info.meta["k"] == "4" and info.meta["privileged_context"] == "null"
    assert info.meta["schema_version"] == shards.SCHEMA_VERSION and "created_at" not in info.meta
    back = pa.concat_tables(shards.iter_row_groups(info))
    assert back.column("input_ids").to_pylist() == table.column("input_ids").to_pylist()
    got = np.concatenate(back.column("topk_logprobs").to_pylist()).astype(np.float32)
    want = np.concatenate(table.column("topk_logprobs").to_pylist()).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-3 if dtype == "float16" else 0)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"


def test_duckdb_and_polars_read_float16_shards(tmp_path):
    shards.write_shard(tmp_path / shards.part_name(0), teacher_table(), META, tables.teacher_schema("float16"))
    glob = str(tmp_path / "*.parquet")
    n, k = duckdb.execute(f"select count(*), avg(len(topk_ids) / (len(input_ids) - prompt_len)) "
                      f"from read_parquet('{glob}')").fetchone()
    assert (n, k) == (5, 4.0)
    (lp,) = duckdb.execute(f"select min(list_min(topk_logprobs)) from read_parquet('{glob}')").fetchone()
    assert -5.01 < lp < 0
    assert pl.read_parquet(glob)["topk_logprobs"].list.len().sum() == 4 * sum(
        len(x) - p for x, p in zip(teacher_table()["input_ids"].to_pylist(), teacher_table()["prompt_len"].to_pylist()))


def test_wrong_schema_names_file_and_column(tmp_path):
    path = tmp_path / shards.part_name(0)
    schema = tables.teacher_schema()
    bad = teacher_table().drop_columns(["teacher_logprob"]).cast(pa.schema([f for f in schema if f.name != "teacher_logprob"]))
    pq.write_table(bad.replace_schema_metadata({f"opd.{k}": str(v) for k, v in META.items()} | {"opd.schema_version": tables.SCHEMA_VERSION}), path)
    with pytest.raises(shards.ShardError, match=rf"{path.name}.*missing column 'teacher_logprob'"):
        shards.open_shard(path, "teacher_topk", tables.teacher_schema())


def test_missing_footer_and_wrong_kind(tmp_path):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(teacher_table(), path)
    with pytest.raises(shards.ShardError, match="footer metadata lacks"):
        shards.open_shard(path, "teacher_topk")
    shards.write_shard(path, teacher_table(), META, tables.teacher_schema())
    with pytest.raises(shards.ShardError, match="is a 'teacher_topk' shard, expected 'rollouts'"):
        shards.open_shard(path, "rollouts")


def test_truncated_file_is_reported_by_name(tmp_path):
    path = shards.write_shard(tmp_path / shards.part_name(0), teacher_table(50), META, tables.teacher_schema())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(shards.ShardError, match=path.name):
        shards.open_shard(path, "teacher_topk")


def test_finished_parts_keeps_only_this_runs_intact_parts(tmp_path):
    schema = tables.teacher_schema()
    shards.write_shard(tmp_path / shards.part_name(0), teacher_table(), META, schema)
    shards.write_shard(tmp_path / shards.part_name(1), teacher_table(), META | {"run_key": "other"}, schema)
    broken = shards.write_shard(tmp_path / shards.part_name(2), teacher_table(), META, schema)
    broken.write_bytes(b"PAR1 garbage")
    (tmp_path / ".part-00003.parquet.tmp-123").write_bytes(b"half")
    done, stale = shards.finished_parts(tmp_path, "teacher_topk", "r1")
    assert done == {"part-00000.parquet"}
    assert [p.name for p in stale] == ["part-00001.parquet", "part-00002.parquet"]
    # the temporary is gone now; the stale parts stay until this run has a part to replace them with
    assert sorted(p.name for p in tmp_path.iterdir()) == [shards.part_name(j) for j in range(3)]


def test_a_flipped_byte_makes_a_finished_part_one_to_redo(tmp_path):
    path = shards.write_shard(tmp_path / shards.part_name(0), teacher_table(), META, tables.teacher_schema())
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    assert shards.finished_parts(tmp_path, "teacher_topk", "r1") == (set(), [path])


def test_stale_parts_go_only_when_a_new_part_is_ready(tmp_path, monkeypatch):
    schema = tables.teacher_schema()
    for j in range(3):
        shards.write_shard(tmp_path / shards.part_name(j), teacher_table(), META | {"run_key": "old"}, schema)
    plan = shards.pending_parts(tmp_path, "teacher_topk", "r1", n_parts=2)
    assert plan.todo == [0, 1] and len(plan.stale) == 3
    assert len(shards.list_parts(tmp_path)) == 3, "planning alone removes nothing"

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(pq, "write_table", fail)
        with pytest.raises(OSError):
            shards.write_shard(tmp_path / shards.part_name(0), teacher_table(), META, schema,
                               before_replace=plan.clear_stale)
    assert [shards.read_meta(p)["run_key"] for p in shards.list_parts(tmp_path)] == ["old"] * 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary is left"
    shards.write_shard(tmp_path / shards.part_name(0), teacher_table(), META, schema, before_replace=plan.clear_stale)
    assert [p.name for p in shards.list_parts(tmp_path)] == [shards.part_name(0)]


def test_parts_written_at_once_leave_each_other_s_names_alone(tmp_path):
    """Ray actors write one plan's parts at the same time: a part's `replaced_by` removes the stale files no
    part of the run will replace and its own, never a stale name another writer may already have filled."""
    schema = tables.teacher_schema()
    for j in range(4):
        shards.write_shard(tmp_path / shards.part_name(j), teacher_table(), META | {"run_key": "old"}, schema)
    plan = shards.pending_parts(tmp_path, "teacher_topk", META["run_key"], n_parts=3)
    assert plan.todo == [0, 1, 2] and len(plan.stale) == 4
    # Another process writes part 1 first, with its own copy of the plan.
    shards.write_shard(tmp_path / shards.part_name(1), teacher_table(), META, schema, before_replace=plan.replaced_by(1))
    assert [shards.read_meta(p)["run_key"] for p in shards.list_parts(tmp_path)] == ["old", META["run_key"], "old"]
    shards.write_shard(tmp_path / shards.part_name(0), teacher_table(), META, schema, before_replace=plan.replaced_by(0))
    keys = {p.name: shards.read_meta(p)["run_key"] for p in shards.list_parts(tmp_path)}
    assert keys == {shards.part_name(0): META["run_key"], shards.part_name(1): META["run_key"],
                    shards.part_name(2): "old"}, "part 1 kept; part 2's old file is its writer's to replace"


def test_shard_spec():
    from offline_opd.runtime import parse_shard_spec

    assert parse_shard_spec("1/4") == (1, 4)
    for bad in ["4/4", "x", "1/0"]:
        with pytest.raises(ValueError):
            parse_shard_spec(bad)


def test_open_run_refuses_mixed_and_incomplete_runs(tmp_path):
    schema = tables.teacher_schema()
    for j in range(3):
        shards.write_shard(tmp_path / shards.part_name(j), teacher_table(first=5 * j), META | {"num_parts": 3},
                           schema)
    assert [i.path.name for i in shards.open_run(tmp_path, "teacher_topk", schema)] == [
        shards.part_name(j) for j in range(3)]
    shards.write_shard(tmp_path / shards.part_name(2), teacher_table(), META | {"num_parts": 3, "run_key": "r2"},
                       schema)
    with pytest.raises(shards.ShardError, match=r"disagree on run_key: r1 in part-00000.parquet but r2 in "
                                                r"part-00002.parquet"):
        shards.open_run(tmp_path, "teacher_topk", schema)
    (tmp_path / shards.part_name(2)).unlink()
    (tmp_path / shards.part_name(1)).unlink()
    shards.write_shard(tmp_path / shards.part_name(3), teacher_table(first=15), META | {"num_parts": 3}, schema)
    with pytest.raises(shards.ShardError, match=r"part-00003.parquet: not a part of the `teacher_topk` run.*say 3"):
        shards.open_run(tmp_path, "teacher_topk", schema)
    (tmp_path / shards.part_name(3)).rename(tmp_path / "part-00000 (copy).parquet")
    with pytest.raises(shards.ShardError, match=r"part-00000 \(copy\).parquet: not a part of the `teacher_topk`"):
        shards.open_run(tmp_path, "teacher_topk", schema)
    (tmp_path / "part-00000 (copy).parquet").unlink()
    with pytest.raises(shards.ShardError, match=r"incomplete \(1 parts, its footers say 3; missing "
                                                r"part-00001.parquet, part-00002.parquet\)"):
        shards.open_run(tmp_path, "teacher_topk", schema)
    with pytest.raises(shards.ShardError, match="no part-"):
        shards.open_run(tmp_path / "empty", "teacher_topk", schema)


def flip_byte_in_data_page(path, group: int, column: str) -> None:
    """Corrupt one byte of the last data page of `column` in row group `group` (inside the page body)."""
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    chunk = meta.row_group(group).column(next(i for i, n in enumerate(names) if n.startswith(column)))
    offset = chunk.data_page_offset + chunk.total_compressed_size - 4
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_page_checksums_are_written_and_a_flipped_byte_names_file_and_row_group(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "ROW_GROUP_SIZE", 10)
    path = shards.write_shard(tmp_path / shards.part_name(0), teacher_table(50), META, tables.teacher_schema())
    info = shards.open_shard(path, "teacher_topk", tables.teacher_schema())
    assert info.num_row_groups == 5
    intact = [t.column("teacher_logprob").to_pylist() for t in shards.iter_row_groups(info)]
    flip_byte_in_data_page(path, 2, "teacher_logprob")
    # without the page CRC the flip is silent: the values just change
    assert pq.ParquetFile(path).read_row_group(2).column("teacher_logprob").to_pylist() != intact[2]
    with pytest.raises(shards.ShardError, match=rf"{path.name}: its bytes do not match the checksum sealed"):
        shards.open_shard(path, "teacher_topk", tables.teacher_schema())  # the footer is intact, the seal is not
    read = shards.iter_row_groups(info)  # a shard opened before the damage: the page CRC names it when streamed
    assert [next(read).column("teacher_logprob").to_pylist() for _ in range(2)] == intact[:2]
    with pytest.raises(shards.ShardError, match=rf"{path.name}: row group 2 is unreadable.*(CRC|checksum)"):
        next(read)


def test_version_1_teacher_shards_read_with_a_warning(tmp_path):
    from offline_opd.contract.codec import Plain
    from offline_opd.contract.tables import TeacherFormat

    v1 = TeacherFormat(Plain("float16"), width=4, samples=0, exact_tail=False)
    old, schema = legacy(teacher_table().drop_columns(["tail_logprob"]), tables.teacher_schema(v1), "1")
    shards.write_shard(tmp_path / shards.part_name(0), old, META | {"schema_version": "1"}, schema)
    with pytest.warns(UserWarning, match=r"schema version 1 .* rebuilt from the top-k"):
        (info,) = shards.open_teacher_shards(tmp_path)
    assert shards.teacher_format([info]) == v1
    shards.write_shard(tmp_path / shards.part_name(0), teacher_table(), META | {"schema_version": "0"},
                       tables.teacher_schema())
    with pytest.raises(shards.ShardError, match="schema version 0, this code reads 1, 2, 3"):
        shards.open_teacher_shards(tmp_path)


def test_opd_inspect_verify_reads_every_page(tmp_path, monkeypatch, capsys):
    from offline_opd.tools.inspect_shards import main

    monkeypatch.setattr(shards, "ROW_GROUP_SIZE", 10)
    for j in range(2):
        shards.write_shard(tmp_path / shards.part_name(j), teacher_table(30), META, tables.teacher_schema())
    main(["verify", "--shards", f"{tmp_path}/*.parquet"])
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split() for line in lines] == [[shards.part_name(j), "3", "ok"] for j in range(2)]
    flip_byte_in_data_page(tmp_path / shards.part_name(1), 1, "topk_ids")
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--shards", f"{tmp_path}/*.parquet"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert re.search(r"part-00001\.parquet: row group 1 is unreadable.*CRC", err)
