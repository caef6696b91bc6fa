"""Distilled accuracy per teacher-shard format, over seeds, against plain top-k shards in the same run.

Takes a project where `dvc repro teacher_topk` has run (the embedded default: a scratch copy of the repo
with the toy preset), and for each variant re-runs `teacher_topk` with the variant's `teacher_topk`
settings into a scratch folder, then `distill` (one run per `distill.seed`) and `evaluate`, with the
project's own params otherwise. Prints per variant: bytes per response token of its shards, the distilled
student's greedy accuracy per seed, their mean, standard deviation and standard error, and against the
first variant listed (`plain` by default) the mean of the per-seed differences (the same seed trains both,
so the difference is paired) with its standard error. `--out` also writes every number as JSON. A seed
whose eval.json exists in the scratch folder is not rerun (delete the folder after changing code).

    PYTHONPATH=. python bench/shard_accuracy.py --run /path/to/project --seeds 0 1 2 \\
        --variants plain q8 sampled8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

# teacher_topk overrides per variant; `sampled8` stores 8 draws per position instead of the top 8 (on a
# peaked teacher most draws repeat one id, so it costs about as many bytes as `topk2`).
VARIANTS = {
    "plain": {},
    "q16": {"codec": "q16"},
    "q8": {"codec": "q8"},
    "compact": {"codec": "compact"},
    "topk2": {"k": 2},
    "sampled8": {"selection": "sampled", "samples": 8},
    "topk4+sampled4": {"selection": "topk+sampled", "k": 4, "samples": 4},
}


def stage(module: str, params: Path, scratch: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", f"offline_opd.stages.{module}", "--params", str(params), "--metrics-dir",
           str(scratch / "metrics"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, default=None, help="output folder (default RUN/bench_accuracy)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["plain", "q8"], choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="also write the results here (JSON)")
    args = parser.parse_args()
    run, scratch = args.run.resolve(), (args.scratch or args.run / "bench_accuracy").resolve()
    base = yaml.safe_load((run / "params.yaml").read_text())
    data = run / "data"
    print(f"{'variant':<15} {'B/token':>8} " + " ".join(f"{'seed ' + str(s):>7}" for s in args.seeds)
          + f" {'mean':>7} {'std':>6} {'s.e.':>6} {'vs first':>8} {'s.e.':>6}", flush=True)
    baseline, results = None, {}
    for name in args.variants:
        out = scratch / name
        out.mkdir(parents=True, exist_ok=True)
        params = {**base, "teacher_topk": {**base["teacher_topk"], **VARIANTS[name]}}
        topk = out / "topk"
        (out / "params.yaml").write_text(yaml.safe_dump(params))
        stage("teacher_topk", out / "params.yaml", out, "--teacher", str(data / "models/teacher"),
              "--rollouts", str(data / "rollouts"), "--prompts", str(data / "prompts/opd.parquet"), "--out", str(topk))
        stats = json.loads((out / "metrics" / "teacher_topk.json").read_text())
        acc = []
        for seed in args.seeds:
            sd = out / f"seed{seed}"
            p = sd / "params.yaml"
            sd.mkdir(exist_ok=True)
            p.write_text(yaml.safe_dump({**params, "distill": {**params["distill"], "seed": seed}}))
            if not (sd / "eval.json").exists():   # a finished seed is kept: an interrupted run resumes
                stage("distill", p, sd, "--init", str(data / "models/student_sft"), "--shards", str(topk),
                      "--out", str(sd / "student_opd"), "--logs", str(sd / "logs"), "--plots", str(sd / "plots"))
                stage("evaluate", p, sd, "--teacher", str(data / "models/teacher"), "--ref",
                      str(data / "models/student_sft"), "--student", str(sd / "student_opd"), "--prompts",
                      str(data / "prompts/eval.parquet"), "--metrics", str(sd / "eval.json"))
            acc.append(json.loads((sd / "eval.json").read_text())["student_opd"]["accuracy"])
        mean, std = statistics.mean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0
        baseline = acc if baseline is None else baseline
        diff = [a - b for a, b in zip(acc, baseline)]
        diff_se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else 0.0
        results[name] = {"teacher_topk": VARIANTS[name], "bytes_per_response_token": stats["bytes_per_response_token"],
                         "accuracy": dict(zip(map(str, args.seeds), acc)), "mean": mean, "std": std,
                         "se": std / len(acc) ** 0.5, "diff_vs_first": statistics.mean(diff), "diff_se": diff_se}
        print(f"{name:<15} {stats['bytes_per_response_token']:>8.2f} " + " ".join(f"{a:>7.3f}" for a in acc)
              + f" {mean:>7.3f} {std:>6.3f} {std / len(acc) ** 0.5:>6.3f} {statistics.mean(diff):>+8.3f} "
              f"{diff_se:>6.3f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"seeds": args.seeds, "variants": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
