"""Multi-teacher OPD on the two-domain toy (README: Multi-teacher OPD): the merged student vs students distilled
from each domain teacher alone, on both sub-tasks, over seeds.

    nice -n 10 python bench/multiteacher.py --work /tmp/mt --seeds 0,1,2 --teacher-steps 600

The merged run is `configs/multiteacher.yaml` through `dvc repro` in a scratch project (`<work>/proj`, made with
offline_opd.tools.scratch_project.init_project); seed s sets sft.seed, rollouts.seed and distill.seed, so the teachers and prompts
are shared by every run and only `sft` onwards reruns. The baselines reuse that project's prompts and domain teachers:
the one specialist's folder is copied and rerouted to serve both domains (what `teacher.domains: {add: {}, rev: add}`
rebuilds: same keys, data and seed), then `sft_data` .. `evaluate` run stage by stage under `<work>/runs/<row>/s<seed>`.
Each (row, seed) result lands in `<work>/results/<row>_s<seed>.json` (eval.json plus wall/CPU time and load) and is
not redone; the table of mean ± std accuracies per domain is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipeline"))

from offline_opd.provenance.teachers import write_routes  # noqa: E402
from offline_opd.tools.scratch_project import init_project, ran_stages  # noqa: E402

BASELINES = {"add_only": {"add": "add", "rev": "add"}, "rev_only": {"add": "rev", "rev": "rev"}}
ROWS = ("merged", *BASELINES)


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def timed(args: list[str], cwd: Path, env: dict) -> tuple[subprocess.CompletedProcess, dict]:
    """Run one command; its wall time, its children's CPU time and the load average around it."""
    t0, c0, l0 = time.time(), os.times(), loadavg()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    c1 = os.times()
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc, {"wall_s": round(time.time() - t0, 1),
                  "cpu_s": round(c1.children_user - c0.children_user + c1.children_system - c0.children_system, 1),
                  "load_before": l0, "load_after": loadavg()}


def params(root: Path, seed: int, teacher_steps: int) -> dict:
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["teacher"]["max_steps"] = teacher_steps
    for section in ("sft", "rollouts", "distill"):
        p[section]["seed"] = seed
    return p


def merged(root: Path, env: dict, seed: int, teacher_steps: int) -> tuple[Path, dict]:
    (root / "params.yaml").write_text(yaml.safe_dump(params(root, seed, teacher_steps), sort_keys=False))
    proc, run = timed(["dvc", "repro"], root, env)
    return root / "metrics" / "eval.json", {**run, "stages": ran_stages(proc.stdout)}


def baseline(root: Path, work: Path, env: dict, row: str, seed: int, teacher_steps: int) -> tuple[Path, dict]:
    base = work / "runs" / row
    teacher = base / "teacher"
    routes = BASELINES[row]
    if not teacher.exists():
        shutil.copytree(root / "data" / "models" / "teacher" / routes["add"], teacher / routes["add"])
        write_routes(teacher, routes)
    run_dir = base / f"s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params(root, seed, teacher_steps), sort_keys=False))
    prompts, stage = root / "data" / "prompts", [sys.executable, "-m"]
    common = ["--params", str(run_dir / "params.yaml"), "--metrics-dir", str(run_dir / "metrics")]
    steps = [   # sft_data is greedy, so seed-independent: shared by the seeds (a rerun finds its parts finished)
        ["offline_opd.stages.sft_data", "--teacher", str(teacher), "--prompts", str(prompts / "sft.parquet"),
         "--out", str(base / "sft")],
        ["offline_opd.stages.sft", "--data", str(base / "sft"), "--teacher", str(teacher), "--out", "student_sft",
         "--plots", "plots/sft", "--logs", "logs/sft"],
        ["offline_opd.stages.rollouts", "--policy", "student_sft", "--prompts", str(prompts / "opd.parquet"),
         "--out", "rollouts"],
        ["offline_opd.stages.teacher_topk", "--teacher", str(teacher), "--rollouts", "rollouts", "--prompts",
         str(prompts / "opd.parquet"), "--out", "teacher_topk"],
        ["offline_opd.stages.distill", "--init", "student_sft", "--shards", "teacher_topk", "--out", "student_opd",
         "--logs", "logs/distill", "--plots", "plots/distill"],
        ["offline_opd.stages.evaluate", "--teacher", str(teacher), "--ref", "student_sft", "--student",
         "student_opd", "--prompts", str(prompts / "eval.parquet"), "--metrics", "eval.json"],
    ]
    total = {"wall_s": 0.0, "cpu_s": 0.0, "load_before": loadavg()}
    for step in steps:
        _, run = timed([*stage, *step, *common], run_dir, env)
        total["wall_s"] += run["wall_s"]
        total["cpu_s"] += run["cpu_s"]
    return run_dir / "eval.json", {**total, "load_after": loadavg()}


def table(results: Path) -> str:
    """Mean ± std accuracy per (row, domain) over the seeds found, and the distillation gain."""
    acc: dict[tuple[str, str, str], list[float]] = {}
    for path in sorted(results.glob("*_s*.json")):
        row = path.stem.rsplit("_s", 1)[0]
        for domain, values in json.loads(path.read_text())["domains"].items():
            for model in ("teacher", "student_sft", "student_opd"):
                acc.setdefault((row, domain, model), []).append(values[model]["accuracy"])

    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    lines = ["| students | domain | seeds | teacher (routed) | π_ref (SFT) | distilled | gain |",
             "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        for domain in ("add", "rev"):
            if (row, domain, "teacher") in acc:
                t, s, o = (acc[(row, domain, m)] for m in ("teacher", "student_sft", "student_opd"))
                lines.append(f"| {row} | {domain} | {len(o)} | {ms(t)} | {ms(s)} | {ms(o)} | "
                             f"{ms([b - a for a, b in zip(s, o)])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (project, runs, results)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--teacher-steps", type=int, default=1000, help="teacher.max_steps (the preset's: 1000)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to run ({', '.join(ROWS)})")
    args = parser.parse_args()
    root, results = args.work / "proj", args.work / "results"
    results.mkdir(parents=True, exist_ok=True)
    if not (root / "dvc.yaml").exists():
        root.mkdir(parents=True)
        env = init_project(root, "multiteacher")
    else:
        env = {**os.environ, "OPD_CACHE_DIR": str(root / ".cache"),
               "PYTHONPATH": os.pathsep.join(str(root / d) for d in ("pipeline", "kernels"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for seed in (int(s) for s in args.seeds.split(",")):
        for row in args.rows.split(","):
            dest = results / f"{row}_s{seed}.json"
            if dest.exists():
                continue
            metrics, run = (merged(root, env, seed, args.teacher_steps) if row == "merged"
                            else baseline(root, args.work, env, row, seed, args.teacher_steps))
            dest.write_text(json.dumps({**json.loads(metrics.read_text()), "_run": run}, indent=1))
            print(row, seed, run, flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
