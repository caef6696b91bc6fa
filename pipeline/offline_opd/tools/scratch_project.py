"""A fresh git+DVC project holding this checkout's pipeline and one preset: run the whole DAG somewhere
else without touching the checkout's data, dvc.lock or params.yaml.

    python -m offline_opd.tools.scratch_project /tmp/opd-toy --preset toy
    cd /tmp/opd-toy && PYTHONPATH=pipeline:kernels dvc repro

The end-to-end tests and the benchmarks build their projects with it. It copies from a source checkout
(the folder that holds dvc.yaml next to pipeline/ and kernels/), so it refuses to run from an installed wheel.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from offline_opd.errors import UserError

# The folders that hold the import packages (offline_opd, opd_kernels): like src/, never packages themselves.
SOURCE_ROOTS = ("pipeline", "kernels")
STAGES = ["prepare", "teacher", "sft_data", "sft", "rollouts", "teacher_topk", "sft_topk", "distill", "evaluate"]
CHECKOUT = Path(__file__).resolve().parents[3]


def sh(args: list[str], cwd: Path, env: dict, timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run `args` in `cwd`; a non-zero exit raises with the tail of both streams."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def ran_stages(output: str) -> list[str]:
    """The stages `dvc repro` ran, in order, from its output."""
    return re.findall(r"Running stage '(?:[\w/]+\.yaml:)?([a-z_0-9]+)'", output)


def init_project(root: Path, preset: str, checkout: Path = CHECKOUT) -> dict:
    """Copy the pipeline, kernels and presets of `checkout` into `root`, activate `preset`, git+dvc init;
    return the environment to run `dvc` in (the copy's source roots on PYTHONPATH)."""
    if not (checkout / "dvc.yaml").is_file():
        raise UserError(f"{checkout}: not a source checkout (no dvc.yaml); run from a clone of the repository")
    if not (checkout / "configs" / f"{preset}.yaml").is_file():
        raise UserError(f"no preset {preset!r} in {checkout / 'configs'}")
    for name in [*SOURCE_ROOTS, "configs", "prompt_files"]:
        shutil.copytree(checkout / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ["dvc.yaml", ".dvcignore", ".gitignore"]:
        shutil.copy(checkout / name, root / name)
    shutil.copy(checkout / "configs" / f"{preset}.yaml", root / "params.yaml")
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m offline_opd.tools.scratch_project", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the new project's folder (must not exist)")
    parser.add_argument("--preset", default="toy", help="a preset of configs/ to copy to params.yaml")
    args = parser.parse_args(argv)
    if args.root.exists():
        raise SystemExit(f"error: {args.root} exists; name a new folder")
    try:
        init_project(args.root, args.preset)
    except UserError as exc:
        shutil.rmtree(args.root, ignore_errors=True)
        raise SystemExit(f"error: {exc}") from None
    print(f"{args.root}: project with preset {args.preset}; run `PYTHONPATH=pipeline:kernels dvc repro` there")


if __name__ == "__main__":
    main()
