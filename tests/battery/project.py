"""A tiny but complete pipeline project, the stages run on it the way dvc.yaml runs them, and what a case asserts.

The project is the CI preset shrunk until every stage takes a second or two (a 2-step toy teacher, 40 SFT
prompts, 8 OPD prompts, 2 parts per shard folder). It is built once per session by running every stage's
real `main` in DAG order with dvc.yaml's own arguments; each case works on a copy. A refused case must
leave every file of the project as it was (`snapshot` before, compare after), and print exactly one line.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DAG = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
STAGES = list(DAG)
SHARD_FOLDERS = {"sft_data": "data/sft", "rollouts": "data/rollouts", "teacher_topk": "data/teacher_topk"}
READER = {"sft_data": "sft", "rollouts": "teacher_topk", "teacher_topk": "distill"}   # who reads each folder
# A line stage_main's logging writes (subprocesses only: in-process, pytest captures log records), and a
# progress bar's redraw (tqdm: "name:  50%|#####     | 1/2 [..]"): what a user sees besides the one error line.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \S+ (DEBUG|INFO|WARNING) ")
PROGRESS = re.compile(r"\d+%\|.*\| *[\d?]+/[\d?]+ \[")
WARNING = re.compile(r"^(/\S+\.py:\d+: |  warnings\.warn\()")   # a library's warning, printed by `warnings`


def message_lines(stderr: str) -> list[str]:
    """The lines of stderr that are neither log records (nor the text of a record whose message starts on the
    next line), progress-bar redraws (split at \\r as a terminal does) nor library warnings."""
    kept, continued = [], False
    for line in re.split(r"[\r\n]", stderr):
        if continued and line.strip():
            continued = False
            continue
        if LOG_LINE.match(line):
            continued = not LOG_LINE.sub("", line).strip()
        elif line.strip() and not line.strip().startswith("\x1b[A") and not PROGRESS.search(line) \
                and not WARNING.match(line):
            kept.append(line)
    return kept


def tiny_params() -> dict[str, Any]:
    """The CI preset, shrunk so the whole DAG runs in well under a minute on 2 shared cores."""
    params = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    params["task"].update(digits=2, n_sft=40, n_opd=8, n_eval=4)
    params["teacher"].update(max_steps=2, batch_size=8, checkpoint_every_n_steps=1)
    params["sft_data"].update(max_new_tokens=12, rows_per_shard=20, batch_size=20)
    params["sft"].update(max_steps=2, batch_size=8, checkpoint_every_n_steps=1)
    params["rollouts"].update(max_new_tokens=12, rows_per_shard=8, batch_size=16)
    params["teacher_topk"].update(batch_size=16)
    params["distill"].update(max_steps=2, batch_size=4, checkpoint_every_n_steps=1, shuffle_row_groups=1)
    params["evaluate"].update(max_new_tokens=12, batch_size=8, divergence_batch_size=8)
    return params


def write_params(root: Path, params: dict[str, Any]) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def edit_params(root: Path, section: str, **values: Any) -> dict[str, Any]:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section].update(values)
    write_params(root, params)
    return params


def stage_argv(stage: str) -> list[str]:
    """dvc.yaml's arguments of `stage` (paths relative to the project root)."""
    return DAG[stage]["cmd"].split(f"offline_opd.stages.{stage}")[1].split()


def run(root: Path, stage: str, *extra: str) -> dict:
    """Run a stage in-process in the project, as `dvc repro` would (its dvc.yaml arguments)."""
    from offline_opd.runtime import run_stage

    with contextlib.chdir(root):
        return run_stage(stage, stage_argv(stage) + list(extra))


def build(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_params(root, tiny_params())
    for stage in STAGES:
        run(root, stage)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file of the project (hidden ones included: a leftover temporary or lock is a change) by content."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def refusal(capsys, call: Callable[[], Any], status: int = 2) -> str:
    """Call a stage or tool entry point that must refuse: exit `status`, one stderr line, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        call()
    err = capsys.readouterr().err
    lines = message_lines(err)
    assert exc.value.code == status, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def refuse(root: Path, stage: str, capsys, *extra: str, status: int = 2) -> str:
    """Run `stage` in the project expecting a refusal that leaves every file of the project untouched."""
    before = snapshot(root)
    line = refusal(capsys, lambda: run(root, stage, *extra), status)
    assert snapshot(root) == before, f"{stage} changed the project although it refused: {line}"
    return line


def env() -> dict[str, str]:
    """The environment of a stage or tool run as a process: this checkout's code, no progress bars."""
    roots = os.pathsep.join(str(REPO / d) for d in ("pipeline", "kernels"))
    return {**os.environ, "PYTHONPATH": f"{roots}{os.pathsep}{REPO}", "TQDM_DISABLE": "1"}


def command(stage: str, *extra: str) -> list[str]:
    """The command line dvc.yaml gives `stage`, with this interpreter."""
    return [sys.executable, "-m", f"offline_opd.stages.{stage}", *stage_argv(stage), *extra]


def one_error_line(stderr: str) -> str:
    """The single non-log line of a subprocess's stderr (asserted single, and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = message_lines(stderr)
    assert len(lines) == 1, stderr
    return lines[0]


# --- damage -----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def times_kept(path: Path, keep: bool = True):
    """Edit a file and, with `keep`, put its access and modification times back (what `cp -p`, rsync -t or
    `touch -r` do): only the ctime, which nothing can set back, still moves."""
    st = path.stat()
    yield
    if keep:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def flip_byte(path: Path, offset: int, keep_times: bool = False) -> None:
    with times_kept(path, keep_times):
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))


def data_offset(path: Path) -> int:
    """A byte inside the first data page of the first column (page CRC and seal both cover it)."""
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
    return chunk.data_page_offset + chunk.total_compressed_size - 2


def footer_offset(path: Path, text: bytes = b"run_key") -> int:
    """A byte of a footer value (after the key `text`): neither page CRCs nor readers notice it changing."""
    data = path.read_bytes()
    (length,) = struct.unpack("<I", data[-8:-4])
    footer_start = len(data) - 8 - length
    at = data.index(b"opd." + text, footer_start)
    return at + len(b"opd." + text) + 4      # past the key and the value's length prefix, inside the value


def truncate(path: Path, fraction: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def params_copy() -> dict[str, Any]:
    return copy.deepcopy(tiny_params())
