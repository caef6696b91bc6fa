"""The locks the README's commands install from (requirements/*.lock) agree with pyproject.toml and the venv.

The checks are `requirements/lock.py`'s own (`--verify`, `--check-env`), run as the command a developer runs.
"""
from __future__ import annotations

import os
import subprocess
import sys

from tests.tiny_models import REPO

LOCK_TOOL = [sys.executable, str(REPO / "requirements" / "lock.py")]


def lock_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LOCK_TOOL, *args], capture_output=True, text=True, timeout=120)


def test_locks_fit_this_pyproject():
    out = lock_tool("--verify")
    assert out.returncode == 0, out.stderr


def test_verify_fails_on_a_changed_dependency(tmp_path):
    edited = tmp_path / "pyproject.toml"
    edited.write_text((REPO / "pyproject.toml").read_text().replace('"pyarrow>=15"', '"pyarrow>=99"'))
    out = lock_tool("--verify", "--pyproject", str(edited))
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert any("made from another pyproject.toml" in line for line in lines)
    assert any("pyarrow==" in line and "outside pyarrow>=99" in line for line in lines)
    assert {line.split(":")[1].strip() for line in lines} == {"requirements/cpu.lock", "requirements/gpu.lock"}


def test_verify_fails_on_an_unlocked_extra(tmp_path):
    edited = tmp_path / "pyproject.toml"
    edited.write_text((REPO / "pyproject.toml").read_text().replace(
        'dev = ["pytest>=8", "pytest-timeout>=2"]', 'dev = ["pytest>=8", "pytest-timeout>=2", "hypothesis>=6"]'))
    out = lock_tool("--verify", "cpu", "--pyproject", str(edited))
    assert out.returncode == 1 and "hypothesis is not locked" in out.stderr


def test_this_environment_is_the_locked_one():
    """`make test` installs from the lock (OPD_LOCK, default cpu.lock): nothing here may differ from it.

    .ci/run checks the run command's venv the same way.
    """
    lock = os.environ.get("OPD_LOCK", "requirements/cpu.lock")
    out = lock_tool("--check-env", "gpu" if lock.endswith("gpu.lock") else "cpu")
    assert out.returncode == 0, out.stderr
