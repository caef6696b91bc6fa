"""No import name of this project collides with another distribution, from the repo root or elsewhere.

transformers >= 5.2x imports the PyPI package `kernels` (the Hugging Face kernel hub); a top-level
`kernels/__init__.py` in the repository root shadowed it for every `python` started there, and the first
stage failed. The folders pipeline/ and kernels/ are source roots now; the packages are offline_opd and
opd_kernels. Here a conflicting `kernels` and `pipeline` are installed on PYTHONPATH and must win.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import REPO

STAGE_AND_TOOL_MODULES = sorted(
    ".".join(p.relative_to(REPO / "pipeline").with_suffix("").parts)
    for sub in ("stages", "tools") for p in (REPO / "pipeline" / "offline_opd" / sub).glob("[!_]*.py"))

# Each foreign name must resolve to the installed distribution: the real one where it is installed (the
# kernel hub comes with transformers >= 5.2x), else a stand-in package put on PYTHONPATH by the test.
PROBE = """
import importlib, os, sys
repo, modules = sys.argv[1], sys.argv[2:]
for name in ("kernels", "pipeline"):
    mod = importlib.import_module(name)
    origin = getattr(mod, "__file__", None) or ""
    assert origin and not origin.startswith(repo), f"{name} resolved to {origin or 'a namespace in the repo'}"
import transformers.modeling_utils
import opd_kernels
for name in modules:
    importlib.import_module(name)
print("ok", len(modules))
"""


def installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_the_probe_lists_every_stage():
    assert {"offline_opd.stages.teacher", "offline_opd.stages.distill", "offline_opd.tools.inspect_shards"} <= set(
        STAGE_AND_TOOL_MODULES)


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_foreign_kernels_and_pipeline_packages_win(tmp_path, where):
    site = tmp_path / "site"
    site.mkdir()
    for name in ("kernels", "pipeline"):
        if not installed(name):
            (site / name).mkdir()
            (site / name / "__init__.py").write_text("FOREIGN = True\n")
    cwd = REPO if where == "repo_root" else tmp_path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO), *STAGE_AND_TOOL_MODULES], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", str(len(STAGE_AND_TOOL_MODULES))]


def test_no_root_folder_is_a_package_but_tests():
    """A regular package in the root would shadow any same-named distribution for `python` run there."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages <= {"tests"}, packages
