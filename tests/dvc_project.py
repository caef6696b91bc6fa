"""A fresh git+DVC project holding this repo's pipeline and a preset, for end-to-end `dvc repro` tests."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The folders that hold the import packages (offline_opd, opd_kernels): like src/, never packages themselves.
SOURCE_ROOTS = ("pipeline", "kernels")
STAGES = ["prepare", "teacher", "sft_data", "sft", "rollouts", "teacher_topk", "sft_topk", "distill", "evaluate"]


def sh(args: list[str], cwd: Path, env: dict, timeout: int = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(?:[\w/]+\.yaml:)?([a-z_0-9]+)'", output)


def init_project(root: Path, preset: str) -> dict:
    """Copy the pipeline, kernels and presets into `root`, activate `preset`, git+dvc init; return the env."""
    for name in [*SOURCE_ROOTS, "configs", "prompt_files"]:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ["dvc.yaml", ".dvcignore", ".gitignore"]:
        shutil.copy(REPO / name, root / name)
    shutil.copy(REPO / "configs" / f"{preset}.yaml", root / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OPD_CACHE_DIR": str(root / ".cache"), "PYTHONPATH": os.pathsep.join(str(root / d) for d in SOURCE_ROOTS)}
    sh(["git", "init", "-q"], root, env)
    sh(["git", "config", "user.email", "ci@example.com"], root, env)
    sh(["git", "config", "user.name", "ci"], root, env)
    sh(["dvc", "init", "-q"], root, env)
    sh(["dvc", "config", "core.analytics", "false"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "init"], root, env)
    return env
