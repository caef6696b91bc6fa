"""Fault injection: SIGKILL a resumable stage at a random moment, rerun it, and compare with a clean run.

    PYTHONPATH=pipeline:kernels:. python bench/fault_injection.py [--trials 20] [--stages sft_data,rollouts,teacher_topk,distill]
                                                 [--seed 0] [--workdir DIR]

What it does, on configs/ci.yaml-sized data (parts made smaller so each stage writes several):
  1. runs the whole chain once, uninterrupted, through the stages' real CLIs (the reference), timing
     each stage under test from the moment it starts writing;
  2. per trial and stage: starts the stage on the reference inputs into a fresh output folder, waits
     until it starts writing (its output folder, or distill's logs, appears: start-up is over), then
     kills its process group with SIGKILL after a uniform random delay in [0, the time the reference
     run spent from that point to its end),
     reruns the same command to completion (what `dvc repro` does after a crash: the parts folders and
     logs/distill persist), and checks the result: the shard run check passes (every part, one run key,
     no row twice), no row lost or duplicated against the reference, and every part's rows equal to
     the reference's (distill: the saved weights equal, tensor by tensor).
The last thing printed is a markdown table; the exit status is 1 if any trial differed.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from offline_opd.contract import shards  # noqa: E402

STAGES = ["sft_data", "rollouts", "teacher_topk", "distill"]
# configs/ci.yaml with smaller parts and more distill steps, so a kill can land between parts/checkpoints.
OVERRIDES = {"sft_data": {"rows_per_shard": 25}, "rollouts": {"rows_per_shard": 8},
             "distill": {"max_steps": 12, "checkpoint_every_n_steps": 2}}
# Each stage's command (relative to the work folder), as in dvc.yaml; `{out}` is the folder under test.
COMMANDS = {
    "prepare": "--out data/prompts",
    "teacher": "--prompts data/prompts/sft.parquet --out data/models/teacher --plots plots/teacher",
    "sft_data": "--teacher data/models/teacher --prompts data/prompts/sft.parquet --out {out}",
    "sft": "--data data/sft --teacher data/models/teacher --out data/models/student_sft --plots plots/sft",
    "rollouts": "--policy data/models/student_sft --prompts data/prompts/opd.parquet --out {out}",
    "teacher_topk": "--teacher data/models/teacher --rollouts data/rollouts "
                    "--prompts data/prompts/opd.parquet --out {out}",
    "distill": "--init data/models/student_sft --shards data/teacher_topk --out {out} "
               "--logs {out}_logs --plots {out}_plots",
}
REFERENCE_OUT = {"sft_data": "data/sft", "rollouts": "data/rollouts", "teacher_topk": "data/teacher_topk",
                 "distill": "data/models/student_opd"}


@dataclass
class Trial:
    stage: str
    kill_after_s: float
    parts_at_kill: int        # parts (or checkpoints) on disk when the process died
    identical: bool
    rows_lost: int
    rows_duplicated: int
    note: str = ""


def command(stage: str, out: str, metrics: str) -> list[str]:
    return [sys.executable, "-m", f"offline_opd.stages.{stage}", "--params", "params.yaml", "--metrics-dir", metrics,
            *COMMANDS[stage].format(out=out).split()]


def env() -> dict:
    roots = os.pathsep.join(str(REPO / d) for d in ("pipeline", "kernels"))   # this checkout's code, not an install
    return {**os.environ, "PYTHONPATH": roots, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_to_end(work: Path, stage: str, out: str, metrics: str = "metrics") -> None:
    proc = subprocess.run(command(stage, out, metrics), cwd=work, env=env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def work_started(stage: str, out: Path) -> Path:
    """What appears on disk when a stage has finished starting up (imports, model load) and begins writing."""
    return Path(f"{out}_logs") if stage == "distill" else out


def start_and_wait(work: Path, stage: str, out: str, metrics: str) -> subprocess.Popen:
    """Start a stage in its own process group (stderr to <work>/<stage>.log); return once it begins
    writing, or has ended."""
    with open(work / f"{stage}.log", "w") as log:
        proc = subprocess.Popen(command(stage, out, metrics), cwd=work, env=env(), stdout=subprocess.DEVNULL,
                                stderr=log, start_new_session=True)
    while proc.poll() is None and not work_started(stage, work / out).exists():
        time.sleep(0.02)
    return proc


def build_reference(work: Path) -> dict[str, float]:
    """The uninterrupted chain; returns, per stage under test, the seconds it spent working after start-up."""
    params = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    for section, keys in OVERRIDES.items():
        params[section].update(keys)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    busy = {}
    for stage in ["prepare", "teacher", "sft_data", "sft", "rollouts", "teacher_topk", "distill"]:
        if stage not in STAGES:
            run_to_end(work, stage, "")
            continue
        proc = start_and_wait(work, stage, REFERENCE_OUT[stage], "metrics")
        started = time.perf_counter()
        if proc.wait():
            raise RuntimeError(f"{stage} failed ({proc.returncode}):\n{(work / f'{stage}.log').read_text()[-3000:]}")
        busy[stage] = time.perf_counter() - started
    return busy


def on_disk(stage: str, out: Path) -> int:
    if stage == "distill":
        return len(list(Path(f"{out}_logs").rglob("*.ckpt")))
    return len(shards.list_parts(out)) if out.exists() else 0


def rows_by_id(folder: Path) -> dict[str, dict]:
    """Every row of a shard folder by its id, and how many rows there were in all."""
    import pyarrow as pa

    rows: dict[str, dict] = {}
    for path in shards.list_parts(folder):
        info = shards.open_shard(path, shards.read_meta(path)["kind"])
        for row in pa.concat_tables(shards.iter_row_groups(info)).to_pylist():
            rows.setdefault(row.get("sample_id", row["prompt_id"]), []).append(row)
    return rows


def compare(stage: str, got: Path, ref: Path) -> tuple[bool, int, int, str]:
    """(identical, rows lost, rows duplicated, note) of `got` against the reference `ref`."""
    if stage == "distill":
        from safetensors.torch import load_file

        a, b = load_file(got / "model.safetensors"), load_file(ref / "model.safetensors")
        same = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
        return same, 0, 0, "" if same else "weights differ"
    note = ""
    try:
        shards.check_folder(got)
    except shards.ShardError as exc:
        note = str(exc)[:120]
    mine, theirs = rows_by_id(got), rows_by_id(ref)
    lost = len(theirs.keys() - mine.keys())
    duplicated = sum(len(v) - 1 for v in mine.values())
    same = not note and mine == theirs and [p.name for p in shards.list_parts(got)] == [
        p.name for p in shards.list_parts(ref)]
    return same, lost, duplicated, note


def trial(work: Path, stage: str, index: int, rng: random.Random, budget_s: float) -> Trial:
    out = f"trials/{stage}-{index}"
    shutil.rmtree(work / "trials", ignore_errors=True)
    delay = rng.uniform(0, budget_s)
    proc = start_and_wait(work, stage, out, f"trials/metrics-{index}")
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    parts = on_disk(stage, work / out)
    run_to_end(work, stage, out, f"trials/metrics-{index}")
    same, lost, dup, note = compare(stage, work / out, work / REFERENCE_OUT[stage])
    return Trial(stage, round(delay, 2), parts, same, lost, dup, note)


def run_trials(stages: list[str], trials: int, seed: int, work: Path) -> tuple[dict[str, float], list[Trial]]:
    times = build_reference(work)  # every stage's reference, so the kill window is known for each
    rng = random.Random(seed)
    results = [trial(work, stage, i, rng, times[stage]) for stage in stages for i in range(trials)]
    return times, results


def table(times: dict[str, float], results: list[Trial]) -> str:
    lines = ["| stage | reference s working | trials | identical | rows lost | rows duplicated | kills with parts/ckpts on disk |",
             "|---|---|---|---|---|---|---|"]
    for stage in dict.fromkeys(r.stage for r in results):
        mine = [r for r in results if r.stage == stage]
        lines.append(f"| {stage} | {times[stage]:.1f} | {len(mine)} | {sum(r.identical for r in mine)} | "
                     f"{sum(r.rows_lost for r in mine)} | {sum(r.rows_duplicated for r in mine)} | "
                     f"{sum(r.parts_at_kill > 0 for r in mine)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="kills per stage (default 20)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown or args.trials < 1:
        parser.error(f"--stages must be among {','.join(STAGES)} and --trials >= 1")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="opd-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    times, results = run_trials(stages, args.trials, args.seed, work)
    for r in results:
        if not r.identical:
            print(f"DIFFERS: {r}")
    print(table(times, results))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.identical for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
