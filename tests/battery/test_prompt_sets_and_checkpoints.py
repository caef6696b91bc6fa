"""The other data files a stage reads: the prompt sets `prepare` wrote and the resume checkpoints of the
training stages. Truncated, flipped (checksum sealed in the file, or zip CRCs) or foreign: one line naming
the file, the project untouched.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.battery.project import flip_byte, refuse, run, truncate

READS = {"teacher": "sft", "sft_data": "sft", "rollouts": "opd", "evaluate": "eval"}   # stage: prompt set


def damage_prompts(path, how: str) -> None:
    if how == "truncated":
        truncate(path)
    elif how == "flipped":
        flip_byte(path, path.stat().st_size // 3)
    else:   # a Parquet file some other tool wrote there: no prompt column
        pq.write_table(pa.table({"question": ["1+1="], "id": ["x"]}), path)


@pytest.mark.parametrize("how", ["truncated", "flipped", "foreign"])
@pytest.mark.parametrize("stage", list(READS))
def test_a_damaged_prompt_set_is_named_by_the_stage_that_reads_it(project, capsys, stage, how):
    name = f"data/prompts/{READS[stage]}.parquet"
    damage_prompts(project / name, how)
    line = refuse(project, stage, capsys)
    assert name in line and ("rerun `dvc repro prepare`" in line or "'prompt'" in line), line


@pytest.mark.parametrize("how", ["truncated", "flipped"])
@pytest.mark.parametrize("stage", ["teacher", "sft", "distill"])
def test_a_damaged_resume_checkpoint_is_named(project, capsys, stage, how):
    """Same settings: the stage resumes from logs/<stage>/checkpoints/last.ckpt, which torch.load would read
    with a flipped byte without complaint; its zip CRCs do not match."""
    path = project / "logs" / stage / "checkpoints" / "last.ckpt"
    truncate(path) if how == "truncated" else flip_byte(path, path.stat().st_size // 2)
    line = refuse(project, stage, capsys)
    assert f"logs/{stage}/checkpoints/last.ckpt: the resume checkpoint is corrupt" in line, line


def test_a_damaged_run_stamp_starts_the_run_over(project):
    """run_key.json unreadable: the checkpoint cannot be proven to belong to these settings, so it is not used."""
    (project / "logs" / "distill" / "checkpoints" / "run_key.json").write_text('{"run_')
    metrics = run(project, "distill")
    assert metrics["resumed"] is False and metrics["steps"] == 2
    assert json.loads((project / "logs" / "distill" / "checkpoints" / "run_key.json").read_text())["run_key"]
