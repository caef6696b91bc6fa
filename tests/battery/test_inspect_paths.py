"""`opd-inspect` and the README's DuckDB recipe read only what the shard-folder check passed.

Every command that reads shards (summary, meta, tokens, sql, queries) first runs the check distill runs
(each part's sealed checksum, footer, one complete run, no row twice, no stray `.parquet`), so a flipped
byte or a stray file is one line naming it instead of changed numbers; the SQL it prints lists the
checked parts by name, so plain DuckDB reads exactly them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import duckdb
import pyarrow.parquet as pq
import pytest

from offline_opd.contract import shards
from offline_opd.tools.inspect_shards import main
from tests.battery.project import SHARD_FOLDERS, env, refusal, snapshot
from tests.battery.test_shard_folders import damage

COMMANDS = {"summary": ["summary"], "meta": ["meta"], "tokens": ["tokens", "--top", "2"],
            "sql": ["sql", "select count(*) from shards"], "queries": ["queries"]}
DAMAGES = ["flipped data byte", "flipped footer byte", "stray parquet", "part copied beside"]


def inspect(project, capsys, *argv: str) -> str:
    before = snapshot(project)
    with contextlib.chdir(project):
        line = refusal(capsys, lambda: main(list(argv)))
    assert snapshot(project) == before
    return line


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_reading_command_refuses_what_the_folder_check_refuses(project, capsys, command, how):
    name = damage(project, "teacher_topk", how)
    assert name in inspect(project, capsys, *COMMANDS[command])


@pytest.mark.parametrize("kind", list(SHARD_FOLDERS))
@pytest.mark.parametrize("command", ["check", "verify"])
def test_check_and_verify_name_a_flipped_byte_in_any_folder(project, capsys, kind, command):
    name = damage(project, kind, "flipped footer byte")
    argv = ["check", SHARD_FOLDERS[kind]] if command == "check" else ["verify", "--shards", SHARD_FOLDERS[kind]]
    assert name in inspect(project, capsys, *argv)


def test_a_glob_that_matches_a_stray_file_is_refused(project, capsys):
    (project / "data" / "teacher_topk" / "README.txt").write_text("notes")
    line = inspect(project, capsys, "--shards", "data/teacher_topk/*", "summary")
    assert "README.txt" in line and "not a part" in line


def test_the_printed_sql_reads_exactly_the_checked_parts_in_plain_duckdb(project, capsys):
    """A stray in the folder is refused; after it is moved out, the views `queries` prints (what the README
    tells users to run in plain DuckDB) list the parts by name and count exactly their rows."""
    with contextlib.chdir(project):
        main(["queries", "views"])
        views = capsys.readouterr().out
        assert "*.parquet" not in views and "part-00001.parquet" in views
        (project / "data" / "teacher_topk" / "more.parquet").write_bytes(
            (project / "data" / "teacher_topk" / "part-00000.parquet").read_bytes())
        con = duckdb.connect()
        con.execute(views)
        rows = con.execute("select count(*) from shards").fetchone()[0]
    parts = shards.list_parts(project / "data" / "teacher_topk")
    assert rows == sum(pq.read_metadata(p).num_rows for p in parts)


PIPED = {"summary": ["summary"], "meta": ["meta"], "queries": ["queries"], "check": ["check", "data/teacher_topk"],
         "verify": ["verify"], "tokens": ["tokens", "--top", "3"]}


@pytest.mark.parametrize("command", list(PIPED))
def test_output_into_a_closed_pipe_ends_quietly(project, command):
    """`opd-inspect ... | head -0`: the reader is gone before the first write. No traceback, no noise,
    status 141, what a shell reports for `cat` stopped by SIGPIPE."""
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "offline_opd.tools.inspect_shards", *PIPED[command]], cwd=project,
                          stdout=write, stderr=subprocess.PIPE, env=env(), timeout=120)
    os.close(write)
    assert (proc.returncode, proc.stderr.decode()) == (141, "")


def test_a_reader_that_stops_after_one_line_ends_it_quietly(project):
    """`opd-inspect sql ... | head -1` on more output than a pipe holds."""
    proc = subprocess.Popen([sys.executable, "-m", "offline_opd.tools.inspect_shards", "sql",
                             "select * from tokens, range(40)"], cwd=project, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"filename")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_opd_fingerprint_into_a_closed_pipe(project):
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "offline_opd.provenance.fingerprint", "data/models/teacher",
                           "data/models/student_sft"], cwd=project, stdout=write, stderr=subprocess.PIPE, env=env(),
                          timeout=120)
    os.close(write)
    assert (proc.returncode, proc.stderr.decode()) == (141, "")
