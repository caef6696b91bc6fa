"""A full disk, a read-only file system and immutable paths: one line naming the path, exit 2, outputs kept.

These use the real thing: a small tmpfs mounted over a project folder (full: filled to a few kB; read-only:
remounted `ro`) and `chattr +i`. Both need root (CAP_SYS_ADMIN for mount, CAP_LINUX_IMMUTABLE for chattr);
without it the cases skip, saying so, and the simulated full-disk cases (a writer that raises ENOSPC:
test_outputs_survive.py, tests/test_bad_inputs.py) still run. A read-only or immutable output is found
before any work (offline_opd.atomic.check_writable); a full disk when it happens, with every temporary removed.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.battery.project import edit_params, refuse, refusal, run, snapshot


@functools.cache
def can(what: str) -> bool:
    """Whether this machine lets the tests mount a tmpfs or set the immutable flag."""
    with tempfile.TemporaryDirectory() as tmp:
        if what == "mount":
            ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", tmp], capture_output=True)
            if ok.returncode == 0:
                subprocess.run(["umount", tmp], check=True)
            return ok.returncode == 0
        probe = Path(tmp) / "f"
        probe.touch()
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True)
        if ok.returncode == 0:
            subprocess.run(["chattr", "-i", str(probe)], check=True)
        return ok.returncode == 0


needs_mount = pytest.mark.skipif(not (shutil.which("mount") and can("mount")),
                                 reason="mounting a tmpfs needs root (CAP_SYS_ADMIN); simulated ENOSPC cases still run")
needs_chattr = pytest.mark.skipif(not (shutil.which("chattr") and can("chattr")),
                                  reason="chattr +i needs root (CAP_LINUX_IMMUTABLE) and a file system that has it")


@contextlib.contextmanager
def tmpfs_over(folder: Path, free_kb: int | None = None, readonly: bool = False):
    """Mount a tmpfs over `folder` holding a copy of what it held, then fill it to `free_kb` kB free, or
    remount it read-only. Unmounting shows the original folder again."""
    with tempfile.TemporaryDirectory() as stash:
        copy = Path(stash) / "copy"
        shutil.copytree(folder, copy, symlinks=True)
        used = sum(p.stat().st_size for p in copy.rglob("*") if p.is_file())
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used // 1024 + 2048}k", "tmpfs", str(folder)],
                       check=True)
        try:
            shutil.copytree(copy, folder, symlinks=True, dirs_exist_ok=True)
            if free_kb is not None:
                st = os.statvfs(folder)
                with open(folder / ".filler", "wb") as f:
                    f.write(b"\0" * max(st.f_bavail * st.f_frsize - free_kb * 1024, 0))
            if readonly:
                subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
            yield folder
        finally:
            gc.collect()  # a failed writer's file object, held by the traceback of the refusal, closes now
            if subprocess.run(["umount", str(folder)]).returncode != 0:
                subprocess.run(["umount", "-l", str(folder)], check=True)
                raise AssertionError(f"{folder}: a file on it was still open after the stage returned")


@contextlib.contextmanager
def immutable(path: Path):
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# The stage, a params change that makes it write anew, and whether it trains first (then only its logs change).
FULL_DATA = {"prepare": ("task", {"seed": 3}), "sft_data": ("sft_data", {"seed": 3}),
             "rollouts": ("rollouts", {"seed": 3}), "teacher_topk": ("teacher_topk", {"seed": 3}),
             "sft": ("sft", {"lr": 1e-3}), "distill": ("distill", {"lr": 5e-3})}


def without_logs(files: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in files.items() if not k.startswith("logs/")}


@needs_mount
@pytest.mark.parametrize("stage", list(FULL_DATA))
def test_a_full_disk_under_data_is_one_line_and_keeps_the_old_outputs(project, capsys, stage):
    """data/ is full (4 kB free): the stage fails where it writes, names the path, and leaves no temporary;
    the training stages have trained by then, so only their resume state (logs/) moved on."""
    section, change = FULL_DATA[stage]
    edit_params(project, section, **change)
    with tmpfs_over(project / "data", free_kb=4):
        before = without_logs(snapshot(project))
        line = refusal(capsys, lambda: run(project, stage))
        assert without_logs(snapshot(project)) == before
    assert "No space left on device" in line and f"while {stage} ran" in line and "data/" in line, line


@needs_mount
def test_a_full_metrics_folder_keeps_the_old_metrics(project, capsys):
    """Not a byte free where evaluate writes: found when it takes its lock beside metrics/eval.json."""
    edit_params(project, "evaluate", n_eval=2)
    with tmpfs_over(project / "metrics", free_kb=0):
        before = snapshot(project)
        line = refusal(capsys, lambda: run(project, "evaluate"))
        assert snapshot(project) == before
    assert "No space left on device" in line and "metrics" in line, line


READ_ONLY = {"prepare": "data", "sft_data": "data", "sft": "data", "rollouts": "data", "teacher_topk": "data",
             "distill": "data", "evaluate": "metrics", "teacher": "plots"}


@needs_mount
@pytest.mark.parametrize("stage", list(READ_ONLY))
def test_a_read_only_file_system_is_refused_before_any_work(project, capsys, stage):
    folder = READ_ONLY[stage]
    with tmpfs_over(project / folder, readonly=True):
        line = refuse(project, stage, capsys)
    assert "Read-only file system" in line and folder in line, line


IMMUTABLE = [  # (stage, path made immutable, a params change so the stage has work to do)
    ("teacher_topk", "data/teacher_topk", ("teacher_topk", {"seed": 3})),
    ("rollouts", "data/rollouts/part-00001.parquet", ("rollouts", {"seed": 3})),
    ("prepare", "data/prompts/opd.parquet", ("task", {"seed": 3})),
    ("distill", "data/models/student_opd", ("distill", {"lr": 5e-3})),
    ("distill", "metrics/distill.json", ("distill", {"lr": 5e-3})),
    ("distill", "plots/distill/loss.csv", ("distill", {"lr": 5e-3})),
    ("sft", "logs/sft", ("sft", {"lr": 1e-3})),
    ("evaluate", "metrics/eval.json", ("evaluate", {"n_eval": 2})),
]


@needs_chattr
@pytest.mark.parametrize("stage,path,change", IMMUTABLE, ids=[f"{s}-{p}" for s, p, _ in IMMUTABLE])
def test_an_immutable_output_is_refused_before_any_work(project, capsys, stage, path, change):
    edit_params(project, change[0], **change[1])
    with immutable(project / path):
        line = refuse(project, stage, capsys)
    assert path in line and ("immutable" in line or "not permitted" in line), line
