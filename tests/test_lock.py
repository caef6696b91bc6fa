"""The locks the README's commands install from (requirements/*.lock) agree with pyproject.toml and the venv."""
from __future__ import annotations

import importlib.util
import os
import tomllib

import pytest
from packaging.requirements import Requirement

from tests.tiny_models import REPO

spec = importlib.util.spec_from_file_location("lock_tool", REPO / "requirements" / "lock.py")
lock_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock_tool)

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirements_of(kind: str) -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in lock_tool.SETS[kind]:
        reqs += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    return reqs


@pytest.mark.parametrize("kind", list(lock_tool.SETS))
def test_lock_is_made_from_this_pyproject(kind):
    recorded, _ = lock_tool.read_lock(REPO / "requirements" / f"{kind}.lock")
    assert recorded == lock_tool.deps_hash(), (
        f"requirements/{kind}.lock was made from another pyproject.toml: run `make lock` and commit it")


@pytest.mark.parametrize("kind", list(lock_tool.SETS))
def test_every_requirement_is_locked_within_its_range(kind):
    _, pins = lock_tool.read_lock(REPO / "requirements" / f"{kind}.lock")
    for req in requirements_of(kind):
        name = lock_tool.canonical(req.name)
        assert name in pins, f"{kind}.lock lacks {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{kind}.lock: {name}=={pins[name]} !~ {req}"


def test_extras_of_every_set_exist():
    for extras in lock_tool.SETS.values():
        assert set(extras) <= set(PROJECT["optional-dependencies"])


def test_hash_sees_a_dependency_change(tmp_path):
    edited = (REPO / "pyproject.toml").read_text().replace('"pyarrow>=15"', '"pyarrow>=16"')
    (tmp_path / "pyproject.toml").write_text(edited)
    assert lock_tool.deps_hash(tmp_path / "pyproject.toml") != lock_tool.deps_hash()


def test_this_environment_is_the_locked_one():
    """`make test` installs from the lock (OPD_LOCK, default cpu.lock): nothing here may differ from it.

    .ci/run checks the run command's venv the same way (`requirements/lock.py --check-env`).
    """
    lock = REPO / os.environ.get("OPD_LOCK", "requirements/cpu.lock")
    assert lock_tool.env_mismatches(lock) == []
