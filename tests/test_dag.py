"""dvc.yaml is honest: each stage lists exactly the project code it imports, its params section and metrics.

A missing dependency means an edited module silently does not rerun a stage; an extra one reruns it
for nothing. The import closure is read from the source (lazy imports inside functions included).
"""

import ast
from pathlib import Path

import pytest
import yaml

from offline_opd.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
DAG = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

OPTIONAL: set[str] = set()
# Functions whose imports only validate other sections' params at load (offline_opd.validation): no stage's
# output depends on them, so they are deps only of the stages that import those modules themselves.
VALIDATION_ONLY = {"pipeline/offline_opd/validation.py": {"check_registries"}}


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] == "opd_kernels":
        return ROOT / "kernels" / "opd_kernels"  # the kernel package is one dependency
    if parts[0] != "offline_opd":
        return None
    path = ROOT.joinpath("pipeline", *parts).with_suffix(".py")
    return path if path.exists() else None


def imports(path: Path) -> set[str]:
    found = set()
    skip = VALIDATION_ONLY.get(path.relative_to(ROOT).as_posix(), set())
    tree = ast.parse(path.read_text())
    tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name in skip)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def closure(start: Path) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        rel = path.relative_to(ROOT).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        if path.is_dir():
            continue
        for name in imports(path):
            dep = module_file(name)
            if dep is not None:
                todo.append(dep)
    seen.discard("pipeline/offline_opd/__init__.py")
    return seen


@pytest.mark.parametrize("stage", list(DAG))
def test_stage_code_deps_match_imports(stage):
    spec = DAG[stage]
    module = spec["cmd"].split("python -m ")[1].split()[0]
    needed = closure(ROOT.joinpath("pipeline", *module.split(".")).with_suffix(".py"))
    listed = {d for d in spec["deps"] if d.startswith(("pipeline", "kernels"))}
    assert needed - OPTIONAL - listed == set(), f"{stage}: imports not listed in deps"
    assert listed - needed == set(), f"{stage}: deps listed but never imported"


@pytest.mark.parametrize("stage", list(DAG))
def test_stage_params_and_timing_metrics(stage):
    spec = DAG[stage]
    assert all(p in SECTIONS for p in spec["params"])
    metrics = [next(iter(m)) if isinstance(m, dict) else m for m in spec.get("metrics", [])]
    assert f"metrics/{stage}.json" in metrics, "stage_main writes metrics/<stage>.json; declare it"
