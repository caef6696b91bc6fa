"""Thread policy: how a stage's time reacts to a concurrent CPU hog, with 1 torch thread vs one per core.

    PYTHONPATH=. python bench/thread_policy.py [--steps 60] [--repeats 2]
    PYTHONPATH=. python bench/thread_policy.py --full      # whole `dvc repro` of the toy default

Default: the `teacher` stage of the embedded toy default (configs/toy.yaml sizes, `teacher.steps`
shortened to --steps) run through its CLI, for OPD_NUM_THREADS in {1, cores} (cores = os.cpu_count()),
each idle and next to a hog (one busy-looping process per core, started before the stage and killed
after it). Reported: the stage's own training time (metrics `train_s`, start-up excluded) and wall time,
the median over --repeats, and hog/idle ratios. Baseline and variants are measured in the same run.
--full: `dvc repro` of the toy preset in a fresh git+DVC project (offline_opd.tools.scratch_project), idle and with
the hog, with the default policy (and --threads N to compare another setting); prints both wall times.
The last thing printed is a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@contextmanager
def cpu_hog(processes: int) -> Iterator[None]:
    """`processes` busy loops competing for the CPU, as other jobs on a shared machine do."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def stage_env(threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPD_NUM_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO)
    if threads is not None:
        env["OPD_NUM_THREADS"] = str(threads)
    return env


def prepare_inputs(work: Path, steps: int) -> None:
    params = yaml.safe_load((REPO / "configs" / "toy.yaml").read_text())
    params["teacher"]["max_steps"] = steps
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-m", "offline_opd.stages.prepare", "--out", "data/prompts"], cwd=work,
                   env=stage_env(1), check=True, capture_output=True)


def time_teacher(work: Path, threads: int) -> tuple[float, float]:
    """(train_s, wall_s) of one `teacher` run with `threads` torch threads, from scratch: the previous run's
    model, metrics and resume checkpoint are removed first (else the stage would resume a finished run)."""
    for done in ("data/models", "metrics", "plots", "logs"):
        shutil.rmtree(work / done, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "offline_opd.stages.teacher", "--prompts", "data/prompts/sft.parquet",
                    "--out", "data/models/teacher", "--plots", "plots/teacher"], cwd=work, env=stage_env(threads),
                   check=True, capture_output=True)
    wall = time.perf_counter() - start
    return json.loads((work / "metrics" / "teacher.json").read_text())["train_s"], wall


def short_stage(steps: int, repeats: int) -> str:
    cores = os.cpu_count() or 1
    rows = ["| torch threads | idle train s | hog train s | hog/idle | idle wall s | hog wall s |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="opd-threads-") as tmp:
        work = Path(tmp)
        prepare_inputs(work, steps)
        for threads in sorted({1, cores}):
            idle = [time_teacher(work, threads) for _ in range(repeats)]
            with cpu_hog(cores):
                hog = [time_teacher(work, threads) for _ in range(repeats)]
            it, iw = (statistics.median(x) for x in zip(*idle))
            ht, hw = (statistics.median(x) for x in zip(*hog))
            rows.append(f"| {threads} | {it:.1f} | {ht:.1f} | {ht / it:.2f} | {iw:.1f} | {hw:.1f} |")
    return (f"teacher stage, toy default sizes, {steps} steps, median of {repeats}; hog = {cores} busy "
            f"processes on {cores} cores\n" + "\n".join(rows))


def full_repro(threads: int | None) -> str:
    from offline_opd.tools.scratch_project import init_project, sh

    cores = os.cpu_count() or 1
    rows = ["| setting | idle dvc repro s | hog dvc repro s | hog/idle |", "|---|---|---|---|"]
    times = {}
    for hog in (False, True):
        with tempfile.TemporaryDirectory(prefix="opd-threads-full-") as tmp:
            env = {**init_project(Path(tmp), "toy"), **stage_env(threads)}
            start = time.perf_counter()
            if hog:
                with cpu_hog(cores):
                    sh(["dvc", "repro"], Path(tmp), env, timeout=6 * 3600)
            else:
                sh(["dvc", "repro"], Path(tmp), env, timeout=6 * 3600)
            times[hog] = time.perf_counter() - start
    label = f"OPD_NUM_THREADS={threads}" if threads else "default policy"
    rows.append(f"| {label} | {times[False]:.0f} | {times[True]:.0f} | {times[True] / times[False]:.2f} |")
    return f"dvc repro of the toy default; hog = {cores} busy processes on {cores} cores\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="teacher training steps of the short run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting (the median is reported)")
    parser.add_argument("--full", action="store_true", help="time a whole `dvc repro` idle and with the hog")
    parser.add_argument("--threads", type=int, default=None, help="with --full: OPD_NUM_THREADS (default: policy)")
    args = parser.parse_args()
    print(full_repro(args.threads) if args.full else short_stage(args.steps, args.repeats))


if __name__ == "__main__":
    main()
