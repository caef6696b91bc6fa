"""The paper's table (issue 9): π_ref vs offline OPD per loss, online OPD, R rounds, an inconsistent teacher.

One command, run in a project whose default DAG has run up to `sft_data` (the teacher and its SFT data are
shared by every row; everything after them is redone per seed):

    dvc repro sft_data && python bench/opd_table.py          # or: make paper-table

For every seed s, π_ref is re-trained (`sft.seed = s`), and every row re-samples its rollouts
(`rollouts.seed = s`) and trains with `distill.seed = s`, so the spread over seeds covers SFT, sampling and
training. Rows (`--rows`, comma-separated):

  fkl | jsd | rkl          offline OPD (Lightning OPD) with that divergence
  pg                       offline, the paper's loss exactly as stated (advantage log p_T(a) − log q(a), clipped)
  pg_ppo                   offline pg with a baseline and a PPO trust region (loss_params baseline 1,
                           trust_region 0.2: README "Losses")
  pg_baseline              offline pg with the baseline alone (baseline 1, no trust region)
  online_<loss>            online OPD (pipeline/offline_opd/tools/online_distill.py): same loss, optimizer steps and batch; the
                           current student samples every step and the in-process teacher scores
  online_init_<loss>       the same with a frozen π_ref sampling every step (`--sampler init`): fresh but
                           off-policy samples, to tell freshness from on-policy-ness
  r<R>                     R rounds of rollouts -> teacher_topk -> distill, each from the previous round's
                           student, distill.max_steps each (what `python -m offline_opd.tools.rounds --rounds R` runs)
  r<R>eq                   the same with distill.max_steps / R steps per round: equal total optimizer steps
  long<M>                  one round (R = 1) of M x distill.max_steps steps: r<M>'s steps without its refresh
  inconsistent             shards scored by a second teacher (trained here once like the first, from
                           teacher.seed + 1, on the same prompts' traces written in another style: README
                           "The paper's claim") for the π_ref fine-tuned on the first teacher's answers,
                           override on
  <recipe>                 offline OPD with one of the field's recipes (RECIPES, README "Losses"): taid_linear,
                           taid_adaptive (published α 5e-4), taid_adaptive_fast (α 0.02); exopd_1p25 and
                           exopd_1p5 (pg_ppo with reward scale λ; λ = 1 is pg_ppo); reject and reject_resample
                           (fkl on rollouts with flawed-prefix rejection; rows record the teacher tokens saved)
  gkd<P>                   offline fkl with GKD's mix at a constant λ = P/100 (distill.gkd): that share of each
                           batch from the rollouts, the rest from the teacher's own SFT answers (sft_topk,
                           scored once for every seed and row; not in the row's wall time). gkd100 = fkl
  gkdramp                  the same with λ ramped from 0 to 0.5 over the first half of training

Offline wall time counts rollouts + teacher scoring + distill (π_ref's SFT is common to every row), so the
offline/online ratio includes the teacher's cost. Each (row, seed) result is cached in `--work`, under a
hash of the params sections it depends on (so an edit to `distill` reuses the π_ref's and the second
teacher; edited code is not seen: delete the folder), so an
interrupted table resumes where it stopped, and processes can share the work (e.g. `--seeds 0,2` and
`--seeds 1,2` with the rows reversed: a lock per π_ref, teacher and (row, seed) makes the second wait and
reuse); a last call with every seed and row then only writes the summary. Writes `<out>.json` (DVC metrics:
per row accuracy and gain over the same seed's π_ref as mean ± std, n, wall time; the derived claims),
`<out>_runs.json` (every run), `<out>.svg` and `<out>_gain.svg` (accuracy and gain, bars with ± std), and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import re
import shutil
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

TEACHER, SFT_DATA, SFT_PROMPTS = "data/models/teacher", "data/sft", "data/prompts/sft.parquet"
PROMPTS, EVAL = "data/prompts/opd.parquet", "data/prompts/eval.parquet"
SFT_SECTIONS, TEACHER_SECTIONS = ("task", "teacher", "sft_data", "sft"), ("task", "teacher")
TEACHER2_STYLE = "terse"   # the inconsistent row's teacher writes "4+4=8 6+9=15 8+3+1=12 =1258"
LOSSES: dict[str, dict[str, Any]] = {
    "fkl": {"loss": "fkl", "loss_params": {}},
    "jsd": {"loss": "jsd", "loss_params": {}},
    "rkl": {"loss": "rkl", "loss_params": {}},
    "pg": {"loss": "pg", "loss_params": {}},
    "pg_ppo": {"loss": "pg", "loss_params": {"baseline": 1.0, "trust_region": 0.2}},
    "pg_baseline": {"loss": "pg", "loss_params": {"baseline": 1.0}},
}
# row -> (distill overrides, rollouts overrides): the recipes of issue 20, each one offline round
REJECT_PERPLEXITY = 2.0   # embedded default, π_ref seed 0: 5.5 % of its 4,096 rollouts (5.7 % of response tokens) are above
RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "taid_linear": ({"loss": "taid", "loss_params": {}}, {}),
    "taid_adaptive": ({"loss": "taid", "loss_params": {"schedule": "adaptive"}}, {}),
    "taid_adaptive_fast": ({"loss": "taid", "loss_params": {"schedule": "adaptive", "alpha": 0.02}}, {}),
    "exopd_1p25": ({"loss": "pg", "loss_params": {**LOSSES["pg_ppo"]["loss_params"], "reward_scale": 1.25}}, {}),
    "exopd_1p5": ({"loss": "pg", "loss_params": {**LOSSES["pg_ppo"]["loss_params"], "reward_scale": 1.5}}, {}),
    "reject": (LOSSES["fkl"], {"max_perplexity": REJECT_PERPLEXITY}),
    "reject_resample": (LOSSES["fkl"], {"max_perplexity": REJECT_PERPLEXITY, "resample_budget": 2}),
}
REJECTION_METRICS = ("response_tokens", "rejected_rows", "rejected_response_tokens", "dropped_rows")
DEFAULT_ROWS = "fkl,jsd,rkl,pg,pg_ppo,online_fkl,online_init_fkl,r2,r4,r8,long8,r4eq,inconsistent"
GKD_ROWS = "gkd0,gkd50,gkd100,gkdramp"   # GKD's mix (README "GKD: mixing in the teacher's own sequences")
ROW = re.compile(r"gkd(?P<gkd>\d+|ramp)$|(?P<online>online_(?P<init>init_)?)?(?P<loss>[a-z_]+)$"
                 r"|r(?P<rounds>\d+)(?P<eq>eq)?$|long(?P<long>\d+)$")
GKD_RAMP = {"lambda_start": 0.0, "lambda_end": 0.5, "ramp_frac": 0.5}
SFT_TOPK_SECTIONS = ("task", "teacher", "sft_data", "teacher_topk")


def parse_row(row: str) -> re.Match | None:
    """The row's parts (None for a recipe row)."""
    if row in RECIPES:
        return None
    m = ROW.match(row)
    if m is None or (m["loss"] and m["loss"] not in LOSSES and row != "inconsistent") \
            or (m["gkd"] and m["gkd"] != "ramp" and int(m["gkd"]) > 100):
        raise SystemExit(f"--rows: unknown row {row!r}; rows are {', '.join(LOSSES)}, online_<loss>, "
                         "online_init_<loss>, r<R>, r<R>eq, long<M>, inconsistent, gkd<P> (P <= 100), gkdramp, "
                         f"{', '.join(RECIPES)}")
    return m


def gkd_schedule(m: re.Match) -> dict[str, float]:
    """distill.gkd of a gkd row: a constant λ = P/100, or the ramp."""
    if m["gkd"] == "ramp":
        return dict(GKD_RAMP)
    return {"lambda_start": int(m["gkd"]) / 100, "lambda_end": int(m["gkd"]) / 100, "ramp_frac": 0.0}


def write_params(base: dict, work: Path, seed: int, distill: dict[str, Any] | None = None,
                 other: tuple[str, dict[str, Any]] | None = None) -> Path:
    """A params file for one run: the project's, with this seed, `distill` overrides and (section, overrides)."""
    data = json.loads(json.dumps(base))
    data["rollouts"]["seed"] = seed
    data["distill"].update(seed=seed, **(distill or {}))
    if other:
        data[other[0]].update(other[1])
    work.mkdir(parents=True, exist_ok=True)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def stage(name: str) -> Callable[[list[str]], dict]:
    """Stage `name`'s entry point, run in this process (`offline_opd.runtime.run_stage`)."""
    from offline_opd.runtime import run_stage

    return partial(run_stage, name)


def timed(fn: Callable[[list[str]], Any], argv: list[str]) -> float:
    start = time.perf_counter()
    fn(argv)
    return time.perf_counter() - start


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created): a second process that needs the same π_ref, teacher or
    (row, seed) waits for the first and then reads its result instead of redoing it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def cached(path: Path, make: Callable[[Path], None]) -> Path:
    """`path`, made by `make(tmp)` and renamed into place only when complete (a killed table redoes it)."""
    with locked(path.with_name(path.name + ".lock")):
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            make(tmp)
            tmp.rename(path)
    return path


def stage_args(work: Path, params: Path, tag: str) -> list[str]:
    return ["--params", str(params), "--metrics-dir", str(work / f"metrics_{tag}")]


def keyed(work: Path, kind: str, base: dict, sections: tuple[str, ...] | None = None) -> Path:
    """`work/kind/<hash>`: the hash of the params sections this kind of result depends on (None: all), so
    an edit reruns what it reaches and reuses the rest, like DVC (edited code is not seen: delete `work`)."""
    data = base if sections is None else {name: base[name] for name in sections}
    return work / kind / hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def pi_ref(base: dict, root: Path, seed: int) -> Path:
    """π_ref of this seed: SFT on the teacher's answers with sft.seed = seed."""
    def make(out: Path) -> None:
        work = keyed(root, "sft", base, SFT_SECTIONS) / f"s{seed}"
        params = write_params(base, work, seed, other=("sft", {"seed": seed}))
        stage("sft")(stage_args(work, params, "sft") + ["--data", SFT_DATA, "--teacher", TEACHER, "--out", str(out),
                                                        "--plots", str(work / "plots"), "--logs", str(work / "logs")])

    return cached(keyed(root, "sft", base, SFT_SECTIONS) / f"s{seed}" / "student_sft", make)


def restyled_prompts(src: Path, dest: Path, style: str) -> Path:
    """The SFT prompts with their reference traces rewritten in another style of the toy task
    (offline_opd.tasks.addition.STYLES): same prompts and answers, other text."""
    import pyarrow as pa

    from offline_opd.contract.prompts import read_prompts, write_prompts
    from offline_opd.tasks.addition import solve

    table = read_prompts(src)
    references = pa.array([solve(p, style) for p in table.column("prompt").to_pylist()],
                          table.schema.field("reference").type)
    write_prompts(dest, table.set_column(table.schema.get_field_index("reference"), "reference", references))
    return dest


def second_teacher(base: dict, root: Path) -> Path:
    """The inconsistent row's scorer: a teacher trained like the project's (same sizes, steps, tokenizer and
    prompts) from another seed, on the same computation written in another style (TEACHER2_STYLE), as
    two real teachers differ: it is as accurate, but its distribution over π_ref's tokens is not the one
    π_ref was fine-tuned on."""
    def make(out: Path) -> None:
        work = keyed(root, "teacher2", base, TEACHER_SECTIONS)
        params = write_params(base, work, 0, other=("teacher", {"seed": base["teacher"]["seed"] + 1}))
        prompts = restyled_prompts(Path(SFT_PROMPTS), work / "sft_restyled.parquet", TEACHER2_STYLE)
        stage("teacher")(stage_args(work, params, "t") + ["--prompts", str(prompts), "--out", str(out),
                                                          "--plots", str(work / "plots"), "--logs", str(work / "logs")])

    return cached(keyed(root, "teacher2", base, TEACHER_SECTIONS) / "model", make)


def sft_scores(base: dict, root: Path) -> Path:
    """The teacher's scored SFT answers (the sft_topk stage), GKD's off-policy rows: one folder for every seed."""
    def make(out: Path) -> None:
        work = keyed(root, "sft_topk", base, SFT_TOPK_SECTIONS)
        params = write_params(base, work, 0, other=("sft_topk", {"enabled": True}))
        stage("sft_topk")(stage_args(work, params, "sft_topk") + ["--teacher", TEACHER, "--sft", SFT_DATA,
                                                                  "--prompts", SFT_PROMPTS, "--out", str(out)])

    return cached(keyed(root, "sft_topk", base, SFT_TOPK_SECTIONS) / "shards", make)


def offline_round(work: Path, params: Path, policy: Path, teacher: Path, tag: str,
                  off_policy: Path | None = None) -> tuple[Path, float]:
    """rollouts of `policy` -> teacher_topk by `teacher` -> distill from `policy` (with GKD's `off_policy`
    shards, if given); (student, wall seconds)."""
    m = stage_args(work, params, tag)
    roll, shards, out = work / f"rollouts_{tag}", work / f"topk_{tag}", work / f"student_{tag}"
    wall = timed(stage("rollouts"), m + ["--policy", str(policy), "--prompts", PROMPTS, "--out", str(roll)])
    wall += timed(stage("teacher_topk"), m + ["--teacher", str(teacher), "--rollouts", str(roll), "--prompts",
                                              PROMPTS, "--out", str(shards)])
    off = ["--off-policy", str(off_policy)] if off_policy is not None else []
    wall += timed(stage("distill"), m + ["--init", str(policy), "--shards", str(shards), *off, "--out", str(out),
                                         "--logs", str(work / f"logs_{tag}"), "--plots", str(work / f"plots_{tag}")])
    return out, wall


def evaluate(work: Path, teacher: Path, ref: Path, student: Path) -> dict:
    """evaluate's metrics for `student` against `ref` (its π_ref) on the held-out prompts."""
    metrics = work / "eval.json"
    stage("evaluate")(["--teacher", str(teacher), "--ref", str(ref), "--student", str(student), "--prompts", EVAL,
                       "--metrics", str(metrics), "--plots", str(work / "plots_eval"), "--metrics-dir",
                       str(work / "m_eval")])
    return json.loads(metrics.read_text())


def train_row(row: str, seed: int, base: dict, work: Path, ref: Path, root: Path) -> tuple[Path, float]:
    """Train one (row, seed) from `ref`; (the trained student, wall seconds of the training side)."""
    from offline_opd.tools import online_distill

    m = parse_row(row)
    if m is None:
        distill, rollouts = RECIPES[row]
        params = write_params(base, work, seed, distill, ("rollouts", rollouts) if rollouts else None)
        return offline_round(work, params, ref, Path(TEACHER), "r1")
    if m["long"]:
        params = write_params(base, work, seed, {"max_steps": int(m["long"]) * base["distill"]["max_steps"]})
        return offline_round(work, params, ref, Path(TEACHER), "r1")
    if m["rounds"]:
        rounds = int(m["rounds"])
        steps = base["distill"]["max_steps"] // rounds if m["eq"] else base["distill"]["max_steps"]
        params, out, wall = write_params(base, work, seed, {"max_steps": max(1, steps)}), ref, 0.0
        for r in range(1, rounds + 1):
            out, w = offline_round(work, params, out, Path(TEACHER), f"r{r}")
            wall += w
        return out, wall
    if m["gkd"]:
        params = write_params(base, work, seed, {**LOSSES["fkl"], "gkd": gkd_schedule(m)},
                              other=("sft_topk", {"enabled": True}))
        return offline_round(work, params, ref, Path(TEACHER), "r1", sft_scores(base, root))
    if row == "inconsistent":
        params = write_params(base, work, seed, {**LOSSES["fkl"], "allow_inconsistent_teacher": True})
        return offline_round(work, params, ref, second_teacher(base, root), "r1")
    params = write_params(base, work, seed, LOSSES[m["loss"]])
    if not m["online"]:
        return offline_round(work, params, ref, Path(TEACHER), "r1")
    out = work / "student"
    wall = timed(online_distill.main, stage_args(work, params, "online") + [
        "--init", str(ref), "--teacher", TEACHER, "--prompts", PROMPTS, "--out", str(out), "--logs",
        str(work / "logs"), "--sampler", "init" if m["init"] else "student"])
    return out, wall


def run(row: str, seed: int, base: dict, root: Path) -> dict:
    """One (row, seed), cached in its work folder: accuracy, its π_ref's accuracy, KLs and wall seconds."""
    work = keyed(root, "rows", base) / row / f"s{seed}"
    done = work / "result.json"
    with locked(work.with_name(f"s{seed}.lock")):
        if done.exists():
            return json.loads(done.read_text())
        ref = pi_ref(base, root, seed)
        shutil.rmtree(work, ignore_errors=True)   # a killed run's leftovers
        student, wall = train_row(row, seed, base, work, ref, root)
        m = evaluate(work, Path(TEACHER), ref, student)
        result = {"accuracy": m["student_opd"]["accuracy"], "pi_ref": m["student_sft"]["accuracy"],
                  "fkl": m["student_opd"]["fkl"], "rkl": m["student_opd"]["rkl"],
                  "teacher": m["teacher"]["accuracy"], "wall_s": round(wall, 1)}
        rollouts = work / "metrics_r1" / "rollouts.json"
        if row in RECIPES and RECIPES[row][1]:   # rejection: what the teacher was spared
            result.update({k: json.loads(rollouts.read_text())[k] for k in REJECTION_METRICS})
        done.write_text(json.dumps(result))
    return result


def teacher2_accuracy(base: dict, root: Path) -> float:
    path = second_teacher(base, root)
    return evaluate(path.parent, path, path, path)["teacher"]["accuracy"]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# Student's t, two-sided 95 % (the 0.975 quantile) for 1..10 degrees of freedom; beyond, the normal's 1.96 is
# within 0.3 of a point at this project's spreads. No scipy in the product's dependencies for five numbers.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def ci95(xs: list[float]) -> float:
    """Half-width of the 95 % t-interval of the mean of `xs` (seeds are few: a normal interval would be too
    narrow by 40 % at 5 seeds); 0 for a single value."""
    if len(xs) < 2:
        return 0.0
    t = T975[len(xs) - 2] if len(xs) - 1 <= len(T975) else 1.96
    return t * statistics.stdev(xs) / len(xs) ** 0.5


def summarise(results: dict[str, list[dict]], teacher2: float | None) -> dict:
    """Per row: accuracy and gain over the same seed's π_ref (mean, std), n, wall; then the issue's claims."""
    rows: dict[str, dict] = {}
    first = next(iter(results.values()))
    refs = {r["seed"]: r["pi_ref"] for runs in results.values() for r in runs}
    am, asd = mean_std(list(refs.values()))
    rows["sft"] = {"accuracy_mean": round(am, 4), "accuracy_std": round(asd, 4), "gain_mean": 0.0,
                   "gain_std": 0.0, "gain_ci95": 0.0, "accuracy_ci95": round(ci95(list(refs.values())), 4),
                   "n": len(refs), "wall_s_mean": 0.0}
    for row, runs in results.items():
        (am, asd), (gm, gsd) = mean_std([r["accuracy"] for r in runs]), mean_std([r["accuracy"] - r["pi_ref"]
                                                                                  for r in runs])
        gains = [r["accuracy"] - r["pi_ref"] for r in runs]
        rows[row] = {"accuracy_mean": round(am, 4), "accuracy_std": round(asd, 4), "gain_mean": round(gm, 4),
                     "gain_std": round(gsd, 4), "gain_ci95": round(ci95(gains), 4),
                     "accuracy_ci95": round(ci95([r["accuracy"] for r in runs]), 4), "n": len(runs),
                     "wall_s_mean": round(mean_std([r["wall_s"] for r in runs])[0], 1)}
        if "rejected_response_tokens" in runs[0]:   # teacher tokens saved: rejected / (scored + rejected)
            saved = [r["rejected_response_tokens"] / (r["response_tokens"] + r["rejected_response_tokens"]) for r in runs]
            rows[row].update({"rejected_rows_mean": round(mean_std([r["rejected_rows"] for r in runs])[0], 1),
                              "teacher_tokens_saved_frac_mean": round(mean_std(saved)[0], 4)})
    teacher = first[0]["teacher"]
    best = max((r for r in rows if r != "sft"), key=lambda r: rows[r]["accuracy_mean"])
    claims: dict[str, Any] = {"teacher_accuracy": teacher, "best_row": best,
                              "best_row_over_teacher": round(rows[best]["accuracy_mean"] / teacher, 4) if teacher else None}
    if teacher2 is not None:
        claims["teacher2_accuracy"] = teacher2
    for loss in LOSSES:
        if loss in rows and f"online_{loss}" in rows:
            claims[f"offline_minus_online_{loss}"] = round(rows[loss]["accuracy_mean"]
                                                           - rows[f"online_{loss}"]["accuracy_mean"], 4)
            claims[f"online_over_offline_wall_{loss}"] = round(rows[f"online_{loss}"]["wall_s_mean"]
                                                               / rows[loss]["wall_s_mean"], 2)
    if "inconsistent" in rows and "fkl" in rows:
        claims["inconsistent_minus_consistent"] = round(rows["inconsistent"]["accuracy_mean"]
                                                        - rows["fkl"]["accuracy_mean"], 4)
    return {"rows": rows, "claims": claims}


def markdown(table: dict) -> str:
    lines = ["| row | accuracy (mean ± std) | gain over π_ref (mean ± std) | gain 95 % interval | n | wall s |",
             "|---|---|---|---|---|---|"]
    for row, v in table["rows"].items():
        low, high = 100 * (v["gain_mean"] - v["gain_ci95"]), 100 * (v["gain_mean"] + v["gain_ci95"])
        lines.append(f"| {row} | {v['accuracy_mean']:.3f} ± {v['accuracy_std']:.3f} | "
                     f"{100 * v['gain_mean']:+.1f} ± {100 * v['gain_std']:.1f} | [{low:+.1f}, {high:+.1f}] | "
                     f"{v['n']} | {v['wall_s_mean']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated rows (default {DEFAULT_ROWS}; GKD's "
                                                         f"mix: {GKD_ROWS})")
    ap.add_argument("--seeds", default="0,1,2,3,4",
                    help="comma-separated seeds (default 5: with fewer the 95 %% interval is wide; at least 3)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--work", type=Path, default=Path("bench_runs/opd_table"),
                    help="cache: <work>/{sft,teacher2,rows}/<hash of the params they depend on>/...; "
                         "delete it after changing code")
    ap.add_argument("--out", type=Path, default=Path("bench/results/opd_table"))
    args = ap.parse_args(argv)
    from offline_opd.plots import bar_chart

    rows = args.rows.split(",")
    for row in rows:
        parse_row(row)
    base = yaml.safe_load(args.params.read_text())
    root = args.work
    results: dict[str, list[dict]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for row in rows:
            results.setdefault(row, []).append({"seed": seed, **run(row, seed, base, root)})
            print(f"opd_table: {row} seed {seed}: {results[row][-1]}", flush=True)
    table = summarise(results, teacher2_accuracy(base, root) if "inconsistent" in rows else None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(table, indent=1) + "\n")
    args.out.with_name(args.out.name + "_runs.json").write_text(json.dumps(results, indent=1) + "\n")
    bars = list(table["rows"].items())
    for suffix, key, what in ((".svg", "accuracy", "greedy accuracy"),
                              ("_gain.svg", "gain", "gain over the same seed's π_ref")):
        args.out.with_name(args.out.name + suffix).write_text(bar_chart(
            f"{what}, mean ± std over seeds {args.seeds}", key,
            [(row, v[f"{key}_mean"]) for row, v in bars], [v[f"{key}_std"] for _, v in bars]))
    print(markdown(table))
    print(json.dumps(table["claims"]))
    return table


if __name__ == "__main__":
    main()
