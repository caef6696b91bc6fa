"""Distilled accuracy per teacher-shard format, over seeds, against plain top-k shards in the same run.

Takes a project where `dvc repro teacher_topk` has run (the embedded default: a scratch copy of the repo
with the toy preset), and for each variant re-runs `teacher_topk` with the variant's `teacher_topk`
settings into a scratch folder, then `distill` (one run per `distill.seed`) and `evaluate`, with the
project's own params otherwise. Prints per variant: bytes per response token of its shards, the distilled
student's greedy accuracy per seed, their mean and half-range (the seed spread), and the mean's
difference to the first variant listed (`plain` by default).

    PYTHONPATH=. python bench/shard_accuracy.py --run /path/to/project --seeds 0 1 2 \\
        --variants plain q8 sampled8
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
    run, scratch = args.run.resolve(), (args.scratch or args.run / "bench_accuracy").resolve()
    base = yaml.safe_load((run / "params.yaml").read_text())
    data = run / "data"
    print(f"{'variant':<15} {'B/token':>8} " + " ".join(f"{'seed ' + str(s):>7}" for s in args.seeds)
          + f" {'mean':>7} {'spread':>7} {'vs first':>8}", flush=True)
    baseline = None
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
            stage("distill", p, sd, "--init", str(data / "models/student_sft"), "--shards", str(topk),
                  "--out", str(sd / "student_opd"), "--logs", str(sd / "logs"), "--plots", str(sd / "plots"))
            stage("evaluate", p, sd, "--teacher", str(data / "models/teacher"), "--ref",
                  str(data / "models/student_sft"), "--student", str(sd / "student_opd"), "--prompts",
                  str(data / "prompts/eval.parquet"), "--metrics", str(sd / "eval.json"))
            acc.append(json.loads((sd / "eval.json").read_text())["student_opd"]["accuracy"])
        mean, spread = sum(acc) / len(acc), (max(acc) - min(acc)) / 2
        baseline = mean if baseline is None else baseline
        print(f"{name:<15} {stats['bytes_per_response_token']:>8.2f} " + " ".join(f"{a:>7.3f}" for a in acc)
              + f" {mean:>7.3f} {spread:>7.3f} {mean - baseline:>+8.3f}", flush=True)


if __name__ == "__main__":
    main()
