"""The issue-9 table: SFT (π_ref) vs offline OPD per loss, online OPD, R rounds, an inconsistent teacher.

Run inside a project whose default DAG has run up to teacher_topk (data/models/{teacher,student_sft},
data/prompts, data/teacher_topk), e.g. the embedded default after `dvc repro teacher_topk`:

    python bench/opd_table.py --rows fkl,online_fkl,r2 --seeds 0,1,2 --out bench/results/opd_table

Rows (any subset, comma-separated):
  fkl | jsd | rkl | pg | pg_baseline   offline OPD with that loss (pg_baseline: pg with loss_params.baseline 1)
  online_<loss>                        online OPD (pipeline/online_distill.py), same loss, steps and batch
  r<R>                                 R rounds of rollouts -> teacher_topk -> distill (the default loss),
                                       distill.max_steps / R steps each: the same total steps as R = 1
  inconsistent                         shards scored by --teacher2 (another seed, same accuracy) for the
                                       π_ref fine-tuned on --teacher's answers, with the override set
Each seed reruns rollouts (rollouts.seed) and trains with distill.seed = seed; π_ref and the teacher are
the project's (the SFT itself is not re-run per seed: that is the row's remaining source of variance
this script does not vary). Offline wall time counts rollouts + teacher scoring + distill, so the
offline/online ratio includes the teacher's cost. Writes <out>.json (DVC metrics: per row mean, std,
n, wall time) and <out>.svg (bar chart of mean accuracy), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import yaml

SFT, TEACHER, PROMPTS, EVAL = ("data/models/student_sft", "data/models/teacher", "data/prompts/opd.parquet",
                               "data/prompts/eval.parquet")


def loss_of(name: str) -> dict[str, Any]:
    """distill keys of a loss row name: a loss mode, or pg_baseline (pg with loss_params.baseline 1)."""
    return {"loss": "pg", "loss_params": {"baseline": 1.0}} if name == "pg_baseline" else {"loss": name, "loss_params": {}}


def params_for(base: dict, work: Path, seed: int, **distill: Any) -> Path:
    """A params file for one run: the project's, with the seed and `distill` overrides."""
    data = json.loads(json.dumps(base))
    data["rollouts"]["seed"] = seed
    data["distill"].update(seed=seed, **distill)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def timed(fn: Callable[[list[str]], Any], argv: list[str]) -> float:
    start = time.perf_counter()
    fn(argv)
    return time.perf_counter() - start


def offline_round(work: Path, params: Path, policy: str, teacher: str, tag: str) -> tuple[Path, float]:
    """rollouts of `policy` -> teacher_topk by `teacher` -> distill from `policy`; (student, wall seconds)."""
    from pipeline import distill, rollouts, teacher_topk

    m = ["--params", str(params), "--metrics-dir", str(work / f"metrics_{tag}")]
    roll, shards, out = work / f"rollouts_{tag}", work / f"topk_{tag}", work / f"student_{tag}"
    wall = timed(rollouts.main, m + ["--policy", policy, "--prompts", PROMPTS, "--out", str(roll)])
    wall += timed(teacher_topk.main, m + ["--teacher", teacher, "--rollouts", str(roll), "--prompts", PROMPTS,
                                          "--out", str(shards)])
    wall += timed(distill.main, m + ["--init", policy, "--shards", str(shards), "--out", str(out),
                                     "--logs", str(work / f"logs_{tag}"), "--plots", str(work / f"plots_{tag}")])
    return out, wall


def accuracy(work: Path, student: Path) -> tuple[float, float]:
    """(student accuracy, π_ref accuracy) on the eval prompts."""
    from pipeline import evaluate

    metrics = work / "eval.json"
    evaluate.main(["--teacher", TEACHER, "--ref", SFT, "--student", str(student), "--prompts", EVAL,
                   "--metrics", str(metrics), "--plots", str(work / "plots_eval"),
                   "--metrics-dir", str(work / "metrics_eval")])
    m = json.loads(metrics.read_text())
    return m["student_opd"]["accuracy"], m["student_sft"]["accuracy"]


def run_row(row: str, seed: int, base: dict, work: Path, teacher2: str | None) -> dict:
    """One (row, seed): accuracy, π_ref accuracy and wall seconds of the training side."""
    from pipeline import online_distill

    work.mkdir(parents=True, exist_ok=True)
    if row.startswith("online_"):
        params = params_for(base, work, seed, **loss_of(row.removeprefix("online_")))
        out = work / "student"
        wall = timed(online_distill.main, ["--params", str(params), "--metrics-dir", str(work / "metrics"),
                                           "--init", SFT, "--teacher", TEACHER, "--prompts", PROMPTS,
                                           "--out", str(out), "--logs", str(work / "logs")])
    elif row.startswith("r") and row[1:].isdigit():
        rounds = int(row[1:])   # the same total optimizer steps as one round: distill.max_steps / R each
        steps = max(1, base["distill"]["max_steps"] // rounds)
        params, out, wall = params_for(base, work, seed, max_steps=steps), SFT, 0.0
        for r in range(1, rounds + 1):
            out, w = offline_round(work, params, str(out), TEACHER, f"r{r}")
            wall += w
    elif row == "inconsistent":
        if teacher2 is None:
            raise SystemExit("row 'inconsistent' needs --teacher2 (a second teacher of equal accuracy)")
        out, wall = offline_round(work, params_for(base, work, seed, allow_inconsistent_teacher=True), SFT,
                                  teacher2, "r1")
    else:
        out, wall = offline_round(work, params_for(base, work, seed, **loss_of(row)), SFT, TEACHER, "r1")
    acc, ref = accuracy(work, Path(out))
    return {"accuracy": acc, "pi_ref": ref, "wall_s": round(wall, 1)}


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    def stat(xs: list[float]) -> tuple[float, float]:
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    table = {}
    refs = [r["pi_ref"] for rows in results.values() for r in rows]
    if refs:
        table["sft"] = {"accuracy_mean": refs[0], "accuracy_std": 0.0, "n": 1, "wall_s_mean": 0.0}
    for row, runs in results.items():
        (am, asd), (wm, _) = stat([r["accuracy"] for r in runs]), stat([r["wall_s"] for r in runs])
        table[row] = {"accuracy_mean": round(am, 4), "accuracy_std": round(asd, 4), "n": len(runs),
                      "wall_s_mean": round(wm, 1)}
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="fkl,jsd,rkl,pg,online_fkl,r2,r4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--teacher2", default=None)
    ap.add_argument("--work", type=Path, default=Path("bench_runs/opd_table"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/opd_table"))
    args = ap.parse_args()
    from pipeline.plots import bar_chart

    base = yaml.safe_load(args.params.read_text())
    results: dict[str, list[dict]] = {}
    for row in args.rows.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            work = args.work / row / f"s{seed}"
            shutil.rmtree(work, ignore_errors=True)
            results.setdefault(row, []).append(run_row(row, seed, base, work, args.teacher2))
            print(row, seed, results[row][-1], flush=True)
    table = summarise(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": table, "runs": results}, indent=1))
    args.out.with_suffix(".svg").write_text(
        bar_chart("greedy accuracy (mean over seeds)", "accuracy",
                  [(row, v["accuracy_mean"]) for row, v in table.items()]))
    print(f"{'row':<14}{'accuracy':>18}{'n':>4}{'wall s':>9}")
    for row, v in table.items():
        print(f"{row:<14}{v['accuracy_mean']:>10.3f} ± {v['accuracy_std']:.3f}{v['n']:>4}{v['wall_s_mean']:>9.1f}")


if __name__ == "__main__":
    main()
