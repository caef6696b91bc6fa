"""Every shard folder (data/sft, data/rollouts, data/teacher_topk) damaged every way a user or a disk can.

Two read paths per folder, each of which must check what the shard-folder check checks:
* the stage that reads the folder refuses it with one line naming the file, and changes nothing;
* the stage that wrote the folder, rerun (resume), never counts a damaged part as finished: it writes the
  part again and the folder ends up equal to the undamaged run, or, for a file that is not its own (a
  stray), refuses in one line without touching anything.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offline_opd.contract import shards
from tests.battery.project import (READER, SHARD_FOLDERS, data_offset, flip_byte, footer_offset, refuse, run,
                                   truncate)

OTHER_KIND = {"sft_data": "rollouts", "rollouts": "sft_data", "teacher_topk": "rollouts"}


def damage(root: Path, kind: str, how: str) -> str:
    """Damage `kind`'s folder in `root` as `how` says; return the file name the refusal must name."""
    folder = root / SHARD_FOLDERS[kind]
    first, second = shards.list_parts(folder)
    if how == "truncated":
        truncate(second)
    elif how == "flipped data byte":
        flip_byte(second, data_offset(second))
    elif how == "flipped data byte, times kept":
        flip_byte(second, data_offset(second), keep_times=True)
    elif how == "flipped footer byte":
        flip_byte(second, footer_offset(second))
    elif how == "part copied over another":
        shutil.copy(first, second)
    elif how == "part copied to a new index":
        shutil.copy(first, folder / shards.part_name(2))
        return shards.part_name(2)
    elif how == "part copied beside":
        shutil.copy(first, folder / "part-00000 (copy).parquet")
        return "part-00000 (copy).parquet"
    elif how == "stray parquet":
        pq.write_table(pa.table({"note": ["not a shard"]}), folder / "notes.parquet")
        return "notes.parquet"
    elif how == "foreign parquet as a part":
        pq.write_table(pq.read_table(second).drop_columns(["prompt_id"]).replace_schema_metadata({}), second)
    elif how == "part of another kind":
        shutil.copy(shards.list_parts(root / SHARD_FOLDERS[OTHER_KIND[kind]])[1], second)
    elif how == "part missing":
        second.unlink()
    elif how == "part of another run":
        meta = {k: v for k, v in shards.read_meta(second).items() if k != "file_sha256"}
        table = pq.read_table(second)
        shards.write_shard(second, table, {**meta, "run_key": "f" * 64}, table.schema.remove_metadata())
    else:
        raise ValueError(how)
    return second.name


DAMAGES = ["truncated", "flipped data byte", "flipped data byte, times kept", "flipped footer byte",
           "part copied over another", "part copied to a new index", "part copied beside", "stray parquet",
           "foreign parquet as a part", "part of another kind", "part missing", "part of another run"]
# What the writing stage does with its own damaged folder: write the damaged part again, or refuse a file
# that is not one of its parts (it never deletes what it did not write).
NOT_ITS_OWN = {"part copied beside", "stray parquet"}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", list(SHARD_FOLDERS))
def test_the_reading_stage_refuses_a_damaged_folder(project, capsys, kind, how):
    name = damage(project, kind, how)
    line = refuse(project, READER[kind], capsys)
    assert name in line, line


def folder_contents(folder: Path) -> tuple[list[str], pa.Table, list[dict]]:
    parts = shards.list_parts(folder)
    metas = [{k: v for k, v in shards.read_meta(p).items() if k != "file_sha256"} for p in parts]
    return [p.name for p in parts], pa.concat_tables(pq.read_table(p) for p in parts), metas


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", list(SHARD_FOLDERS))
def test_the_writing_stage_redoes_damaged_parts_or_refuses_strays(project, built, capsys, kind, how):
    name = damage(project, kind, how)
    if how in NOT_ITS_OWN:
        assert name in refuse(project, kind, capsys)
        return
    metrics = run(project, kind)
    assert metrics["parts_written"] == (0 if how == "part copied to a new index" else 1)
    assert folder_contents(project / SHARD_FOLDERS[kind]) == folder_contents(built / SHARD_FOLDERS[kind])
    assert not [p for p in (project / SHARD_FOLDERS[kind]).iterdir() if p.name.startswith(".")]
