"""Fixtures of the bad-input battery: one tiny project built per session, a fresh copy per case.

The fingerprint cache lives outside the project (a refusal must not change any project file, and the
cache legitimately changes), and progress bars are off so a stage's stderr is its one refusal line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.battery.project import build, copy_tree

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def fingerprint_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("fingerprint_cache")
    previous = os.environ.get("OPD_CACHE_DIR")
    os.environ["OPD_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("OPD_CACHE_DIR", None)
    else:
        os.environ["OPD_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def built(tmp_path_factory, fingerprint_cache) -> Path:
    """The whole DAG run once on the tiny params (about half a minute on 2 shared cores)."""
    return build(tmp_path_factory.mktemp("battery") / "project")


@pytest.fixture
def project(built, tmp_path) -> Path:
    """A private copy of the built project (a few hundred kB), so a case may damage anything in it."""
    return copy_tree(built, tmp_path / "project")
