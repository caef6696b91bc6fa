"""Seed sweep of the default DAG (issue 19): does the gain a user sees on `make run` hold across seeds?

Run in a project whose DAG has run up to `sft_data` (the teacher and its SFT data do not depend on the seed):

    dvc repro sft_data && python bench/seed_sweep.py --seeds 0,1,2,3,4

For each seed s it runs what `dvc repro` runs after `sft_data` with sft.seed = rollouts.seed =
distill.seed = s (seed 0 is the default run itself): π_ref, rollouts, teacher_topk, distill, evaluate, through
bench/opd_table.py's cached runs (rows `fkl`, the default loss, and `inconsistent`, the mismatched teacher).
`--sft-scale 2` also trains each seed's π_ref for 2 x sft.max_steps: when π_ref is at its plateau, the two
agree within the seeds' noise. Prints one row per seed, then mean ± std, and the CPU seconds (user + sys of
this process and its children), wall seconds and load average of the whole sweep, because on a shared
machine wall time alone says little.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import opd_table  # noqa: E402  (bench/ is a folder of scripts, not a package)


def cpu_seconds() -> float:
    """User + sys CPU seconds of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def scaled_pi_ref(base: dict, root: Path, seed: int, scale: float) -> float:
    """Greedy accuracy of π_ref trained for scale x sft.max_steps (same seed, data and everything else)."""
    longer = json.loads(json.dumps(base))
    longer["sft"]["max_steps"] = round(base["sft"]["max_steps"] * scale)
    ref = opd_table.pi_ref(longer, root, seed)
    done = ref.parent / "eval_ref.json"
    with opd_table.locked(ref.parent / "eval_ref.lock"):   # two sweeps of the same seed evaluate it once
        if not done.exists():
            metrics = opd_table.evaluate(ref.parent / "eval", Path(opd_table.TEACHER), ref, ref)
            done.write_text(json.dumps(metrics))
    return json.loads(done.read_text())["student_sft"]["accuracy"]


def mean_std(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--rows", default="fkl,inconsistent", help="bench/opd_table.py rows (default fkl,inconsistent)")
    ap.add_argument("--sft-scale", type=float, default=None,
                    help="also train π_ref for this multiple of sft.max_steps (plateau check), e.g. 2")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--work", type=Path, default=Path("bench_runs/opd_table"),
                    help="bench/opd_table.py's cache (shared with it: the same runs are not redone)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/seed_sweep.json"))
    args = ap.parse_args(argv)
    rows = args.rows.split(",")
    for row in rows:
        opd_table.parse_row(row)
    base = yaml.safe_load(args.params.read_text())
    start_wall, start_cpu, load_before = time.perf_counter(), cpu_seconds(), os.getloadavg()
    table: list[dict] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        entry: dict = {"seed": seed}
        for row in rows:
            result = opd_table.run(row, seed, base, args.work)
            entry.update(pi_ref=result["pi_ref"], teacher=result["teacher"])
            entry[row] = result["accuracy"]
            entry[f"{row}_gain"] = result["accuracy"] - result["pi_ref"]
        if args.sft_scale:
            entry[f"pi_ref_x{args.sft_scale:g}"] = scaled_pi_ref(base, args.work, seed, args.sft_scale)
        table.append(entry)
        print(f"seed_sweep: {json.dumps(entry)}", flush=True)
    columns = [c for c in table[0] if c != "seed"]
    summary = {c: {"mean": round(statistics.fmean(e[c] for e in table), 4),
                   "std": round(statistics.stdev(e[c] for e in table), 4) if len(table) > 1 else 0.0}
               for c in columns}
    cost = {"cpu_s": round(cpu_seconds() - start_cpu, 1), "wall_s": round(time.perf_counter() - start_wall, 1),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    print("| seed | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for e in table:
        print(f"| {e['seed']} | " + " | ".join(f"{100 * e[c]:+.1f}" if c.endswith("_gain") else f"{e[c]:.3f}"
                                              for c in columns) + " |")
    print("| mean ± std | " + " | ".join(
        f"{100 * summary[c]['mean']:+.1f} ± {100 * summary[c]['std']:.1f}" if c.endswith("_gain")
        else mean_std([e[c] for e in table]) for c in columns) + " |")
    print(json.dumps(cost))
    result = {"seeds": table, "summary": summary, "cost": cost}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
