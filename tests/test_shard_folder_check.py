"""The shard-folder check: a part missing, a part duplicated, or a part from another run is refused by
`distill` before training (one line, exit 2, nothing written) and reported by `opd-inspect check DIR`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from offline_opd.stages import distill

from offline_opd.tools import inspect_shards

from offline_opd.contract import shards
from tests.tiny_models import params_file, pi_ref, pi_ref_meta, write_teacher_shards

N_PARTS = 3


@pytest.fixture
def run(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """π_ref and a complete 3-part teacher_topk run of it (footers name the run key and part count)."""
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    init = pi_ref(tmp_path / "pi_ref")
    meta = {**pi_ref_meta(init), "num_parts": N_PARTS, "run_key": "run-a"}
    write_teacher_shards(tmp_path / "shards", meta, n_parts=N_PARTS, rows_per_part=4)
    return tmp_path, init


def refused_by_distill(root: Path, init: Path, capsys) -> str:
    argv = ["--params", str(params_file(root)), "--metrics-dir", str(root / "metrics"), "--init", str(init),
            "--shards", str(root / "shards"), "--out", str(root / "out"), "--logs", str(root / "logs"),
            "--plots", str(root / "plots")]
    with pytest.raises(SystemExit) as exc:
        distill.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (root / "out").exists() and not (root / "logs").exists()   # refused before training
    return err


def refused_by_inspect(root: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        inspect_shards.main(["check", str(root / "shards")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    return err


def test_complete_run_passes(run, capsys):
    root, _ = run
    inspect_shards.main(["check", str(root / "shards")])
    out = capsys.readouterr().out
    assert "ok, 3 parts of one teacher_topk run (12 rows" in out


@pytest.mark.parametrize("part", [1, N_PARTS - 1])   # a gap, and the last part (only the footer count shows it)
def test_missing_part(run, capsys, part):
    root, init = run
    (root / "shards" / shards.part_name(part)).unlink()
    for err in (refused_by_distill(root, init, capsys), refused_by_inspect(root, capsys)):
        assert f"incomplete ({N_PARTS - 1} parts, its footers say {N_PARTS}; missing {shards.part_name(part)}" in err


def test_duplicated_part(run, capsys):
    root, init = run
    folder = root / "shards"
    shutil.copy(folder / shards.part_name(0), folder / shards.part_name(2))
    for err in (refused_by_distill(root, init, capsys), refused_by_inspect(root, capsys)):
        # its footer names it part 0: caught before its rows are compared
        assert shards.part_name(2) in err and "holds part '0' of its run" in err and "copied part" in err


def test_duplicated_rows_under_a_parts_own_name(run, capsys):
    """Rows of part 0 written again as part 1 (a part index that matches its name): the row check names it."""
    root, init = run
    folder = root / "shards"
    first = folder / shards.part_name(0)
    table = pq.read_table(first)
    meta = {k: v for k, v in shards.read_meta(first).items() if k not in ("file_sha256", "part")}
    shards.write_shard(folder / shards.part_name(1), table, meta, table.schema.remove_metadata())
    for err in (refused_by_distill(root, init, capsys), refused_by_inspect(root, capsys)):
        assert shards.part_name(1) in err and "is also in part-00000.parquet" in err and "duplicated" in err


def test_part_of_another_run_of_the_same_teacher_and_policy(run, capsys):
    root, init = run
    folder = root / "shards"
    (folder / shards.part_name(1)).unlink()
    # Same teacher, same policy, same footer otherwise: only the run (say, another rollout seed) differs.
    other = {**pi_ref_meta(init), "num_parts": N_PARTS, "run_key": "run-b"}
    write_teacher_shards(root / "other", other, n_parts=N_PARTS, rows_per_part=4)
    shutil.copy(root / "other" / shards.part_name(1), folder / shards.part_name(1))
    for err in (refused_by_distill(root, init, capsys), refused_by_inspect(root, capsys)):
        assert "disagree on run_key: run-a in part-00000.parquet but run-b in part-00001.parquet" in err
