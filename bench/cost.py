"""Offline vs online OPD cost, side by side in one run, phase by phase (issue 19, item 3).

Run in a project whose default DAG has run up to `sft` (the teacher, π_ref and the OPD prompts exist):

    dvc repro sft && nice -n 10 python bench/cost.py

For each configuration, both methods start from the same π_ref with the same params (loss, optimizer steps,
batch, seed):

  offline   the stages `rollouts` (π_ref samples rollouts.n_samples responses per OPD prompt, once),
            `teacher_topk` (the teacher scores them, once) and `distill` (trains over those shards), each run
            in this process;
  online    `python -m offline_opd.tools.online_distill`: every step the current student samples a fresh
            batch and the in-process teacher scores it (its metrics time each phase).

Configurations: `toy`, then one per `--grow` (default 4,512 and 12,1024):

  toy                 the project's teacher (`--teacher`).
  grown_<L>x<I>       the same teacher grown to L decoder layers and I MLP neurons: extra layers and neurons whose
            weights that write into the residual stream (o_proj, down_proj) are zero. It returns the toy
            teacher's logits (to float rounding; the run prints the largest difference), so the online student
            learns and samples as with `toy`, at the cost of a bigger model (a dense matmul costs the same with
            zeros). Its accuracy is the toy teacher's; only its cost matters here. It is not the teacher that
            wrote π_ref's SFT data, so both methods run with distill.allow_inconsistent_teacher (the check that
            would refuse it reads fingerprints, not logits).

Both methods score in batches of `--score-batch` sequences (default distill.batch_size, the batch online
scores each step; `params` keeps teacher_topk.batch_size): with the same batch shape the teacher's per-token
cost is about the same on both sides, so the ratio measures how often each method scores. On one CPU thread
the 12 x 1,024 teacher scored 1.7x slower per token in teacher_topk's batches of 512 than online's of 64, and
online / offline fell from 3.35-3.87x to 2.3x (README "Offline vs online cost, phase by phase").

A first untimed pass of both methods (2 steps, the toy teacher) warms the process up. Per configuration it
then prints a table: per phase (student generation, teacher scoring, training, load/other)
the wall seconds, the process's CPU seconds (all threads; the machine may be shared, so the load average is
printed before and after) and the tokens handled, for both methods; then the measured per-token forward
cost of the teacher vs the student (a short microbenchmark of both models' forward on the same batch of
this run's rollouts) and online / offline. Why the ratio is what it is: offline generates and scores
n_opd x n_samples sequences once, online max_steps x batch_size of them, one batch at a time; both train
the same steps. So online / offline tends to `reuse` = max_steps x batch_size / (n_opd x n_samples) when
generation and scoring dominate, and to 1 when training does. Writes `--out` (JSON).

Offline generation and scoring are whole stages (their model loads and shard writes included: the work a
user pays for); offline load/other is distill's wall time outside its training loop (loading π_ref,
opening the shards, saving); online load/other is its model loads plus what its phases leave of its wall
time (Lightning's setup, saving).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

GROW = ("4,512", "12,1024")
PHASES = (("generation", "student generation"), ("scoring", "teacher scoring"), ("training", "training"),
          ("other", "load/other"))


def parse_size(text: str) -> tuple[int, int]:
    try:
        layers, intermediate = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--grow {text!r}: expected LAYERS,INTERMEDIATE, e.g. 12,1024") from None
    return layers, intermediate


def clocked(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(fn's result, wall seconds, this process's CPU seconds, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_params(base: dict, path: Path, max_steps: int | None, score_batch: str, allow_inconsistent: bool) -> Path:
    """The project's params with this comparison's overrides (the same file for both methods)."""
    data = json.loads(json.dumps(base))
    if max_steps is not None:
        data["distill"]["max_steps"] = max_steps
    if score_batch != "params":
        data["teacher_topk"]["batch_size"] = int(score_batch) if score_batch else data["distill"]["batch_size"]
    if allow_inconsistent:
        data["distill"]["allow_inconsistent_teacher"] = True
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def grown_teacher(teacher: Path, layers: int, intermediate: int, out: Path) -> Path:
    """`teacher` (a Llama) with `layers` decoder layers and `intermediate` MLP neurons, computing the same logits:
    the original layers come first with their weights in the leading slice of each matrix; every weight that
    writes into the residual stream from new capacity (new neurons' down_proj columns, new layers' o_proj and
    down_proj) is zero, so each new layer adds exactly zero and each new neuron contributes nothing."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from offline_opd.models.loading import load_tokenizer, resolve_model_dir

    small = AutoModelForCausalLM.from_pretrained(resolve_model_dir(teacher), torch_dtype=torch.float32)
    if not isinstance(small, LlamaForCausalLM):
        raise SystemExit(f"--grow: {teacher} is a {type(small).__name__}; growing supports Llama teachers "
                         f"(the toy's); pass --grow none, or a bigger --teacher")
    old = small.config
    if layers < old.num_hidden_layers or intermediate < old.intermediate_size:
        raise SystemExit(f"--grow {layers},{intermediate}: the teacher already has {old.num_hidden_layers} layers "
                         f"and {old.intermediate_size} MLP neurons; grow, do not shrink")
    config = type(old).from_dict({**old.to_dict(), "num_hidden_layers": layers, "intermediate_size": intermediate})
    if getattr(config, "layer_types", None):
        config.layer_types = [old.layer_types[0]] * layers
    torch.manual_seed(0)
    big = LlamaForCausalLM(config).eval()
    state, source = big.state_dict(), small.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            if name in source:
                value[tuple(slice(0, n) for n in source[name].shape)] = source[name]
                if name.endswith("mlp.down_proj.weight"):
                    value[:, old.intermediate_size:] = 0
            elif name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                value.zero_()
    big.load_state_dict(state)
    big.generation_config = small.generation_config
    shutil.rmtree(out, ignore_errors=True)
    big.save_pretrained(out)
    load_tokenizer(teacher).save_pretrained(out)
    return out


def check_same_logits(a: Path, b: Path, batch: dict) -> float:
    """Largest |logit difference| of two models on `batch` (the grown teacher must say what the toy one says)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        la, lb = (AutoModelForCausalLM.from_pretrained(p).eval()(**batch).logits for p in (a, b))
    return float((la - lb).abs().max())


def rollout_batch(rollouts: Path, size: int, pad_id: int) -> dict:
    """The first `size` rollout sequences (prompt + response), left-padded, as a forward's inputs."""
    import pyarrow.parquet as pq
    import torch

    ids = pq.read_table(sorted(rollouts.glob("part-*.parquet"))[0], columns=["input_ids"]).column(
        "input_ids").to_pylist()[:size]
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in ids])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
    return {"input_ids": input_ids, "attention_mask": mask}


def forward_cost(models: dict[str, Path], batch: dict, repeats: int) -> dict[str, float]:
    """Median seconds per 1,000 tokens of each model's forward (no grad, fp32) on the same batch, the models
    timed in alternation so that a change in the machine's load hits both alike."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in models.items()}
    tokens = int(batch["attention_mask"].sum())
    times: dict[str, list[float]] = {name: [] for name in loaded}
    with torch.no_grad():
        for model in loaded.values():   # warm-up
            model(**batch)
        for _ in range(repeats):
            for name, model in loaded.items():
                start = time.perf_counter()
                model(**batch)
                times[name].append(time.perf_counter() - start)
    return {name: round(1000 * statistics.median(t) / tokens, 5) for name, t in times.items()}


def stage(name: str, argv: list[str]) -> dict:
    from offline_opd.runtime import run_stage

    return run_stage(name, argv)


def offline(work: Path, params: Path, init: Path, teacher: Path, prompts: Path) -> dict:
    """rollouts -> teacher_topk -> distill, each clocked; the phases and tokens."""
    m = ["--params", str(params), "--metrics-dir", str(work / "metrics")]
    roll, shards = work / "rollouts", work / "topk"
    r, r_wall, r_cpu = clocked(lambda: stage("rollouts", m + ["--policy", str(init), "--prompts", str(prompts),
                                                               "--out", str(roll)]))
    _, s_wall, s_cpu = clocked(lambda: stage("teacher_topk", m + ["--teacher", str(teacher), "--rollouts", str(roll),
                                                                   "--prompts", str(prompts), "--out", str(shards)]))
    d, d_wall, d_cpu = clocked(lambda: stage("distill", m + ["--init", str(init), "--shards", str(shards), "--out",
                                                              str(work / "student"), "--logs", str(work / "logs"),
                                                              "--plots", str(work / "plots")]))
    scored = scored_tokens(roll)
    return {"phases": {
        "generation": {"wall_s": r_wall, "cpu_s": r_cpu, "tokens": r["response_tokens"], "sequences": r["rows"]},
        "scoring": {"wall_s": s_wall, "cpu_s": s_cpu, "tokens": scored, "sequences": r["rows"]},
        "training": {"wall_s": d["train_s"], "cpu_s": d["train_cpu_s"], "tokens": d["train_tokens"],
                     "steps": d["steps"]},
        "other": {"wall_s": d_wall - d["train_s"], "cpu_s": d_cpu - d["train_cpu_s"]}},
        "wall_s": r_wall + s_wall + d_wall, "cpu_s": r_cpu + s_cpu + d_cpu, "rollouts": roll}


def scored_tokens(rollouts: Path) -> int:
    """Tokens the teacher read: every rollout's prompt + response."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return sum(int(pc.sum(pc.list_value_length(pq.read_table(p, columns=["input_ids"]).column("input_ids"))).as_py())
               for p in sorted(rollouts.glob("part-*.parquet")))


def online(work: Path, params: Path, init: Path, teacher: Path, prompts: Path) -> dict:
    """online_distill, clocked; the phases its metrics report, the rest of the wall time as load/other."""
    from offline_opd.tools import online_distill

    m, wall, cpu = clocked(lambda: online_distill.main([
        "--params", str(params), "--metrics-dir", str(work / "metrics"), "--init", str(init), "--teacher",
        str(teacher), "--prompts", str(prompts), "--out", str(work / "student"), "--logs", str(work / "logs")]))
    p = m["phases"]
    timed = [p[name] for name in ("generate", "score", "train")]
    return {"phases": {
        "generation": {**p["generate"], "tokens": m["generated_tokens"], "sequences": m["sequences"]},
        "scoring": {**p["score"], "tokens": m["scored_tokens"], "sequences": m["sequences"]},
        "training": {**p["train"], "tokens": m["train_tokens"], "steps": m["steps"]},
        "other": {"wall_s": wall - sum(t["wall_s"] for t in timed), "cpu_s": cpu - sum(t["cpu_s"] for t in timed)}},
        "wall_s": wall, "cpu_s": cpu}


def compare(name: str, work: Path, base: dict, args: argparse.Namespace, teacher: Path) -> dict:
    """Both methods for one teacher, then the forward microbenchmark on this run's rollouts."""
    from offline_opd.models.loading import load_tokenizer

    load_before = load_average()
    params = write_params(base, work / "params.yaml", args.max_steps, args.score_batch, allow_inconsistent=name != "toy")
    off = offline(work / "offline", params, args.init, teacher, args.prompts)
    on = online(work / "online", params, args.init, teacher, args.prompts)
    used = yaml.safe_load(params.read_text())
    distill = used["distill"]
    batch = rollout_batch(off.pop("rollouts"), distill["batch_size"],
                          load_tokenizer(args.init).pad_token_id)
    per_ktok = forward_cost({"teacher": teacher, "student": args.init}, batch, args.repeats)
    result = {"teacher": str(teacher), "score_batch": used["teacher_topk"]["batch_size"], "offline": off, "online": on,
              "forward_s_per_1k_tokens": per_ktok,
              "teacher_over_student_per_token": round(per_ktok["teacher"] / per_ktok["student"], 2),
              "reuse": round(distill["max_steps"] * distill["batch_size"] / off["phases"]["generation"]["sequences"], 2),
              "online_over_offline_wall": round(on["wall_s"] / off["wall_s"], 2),
              "online_over_offline_cpu": round(on["cpu_s"] / off["cpu_s"], 2),
              "load_average_before": load_before, "load_average_after": load_average()}
    if name != "toy":
        result["max_logit_difference_from_toy_teacher"] = check_same_logits(args.teacher, teacher, batch)
    return result


def per_1k(side: dict, phase: str) -> float:
    """Wall milliseconds per 1,000 tokens of one phase."""
    p = side["phases"][phase]
    return 1e6 * p["wall_s"] / max(1, p["tokens"])


def table(name: str, r: dict) -> str:
    """The side-by-side Markdown table of one configuration, with its ratios."""
    off, on = r["offline"], r["online"]

    def cells(side: dict, key: str) -> str:
        p = side["phases"][key]
        return f"{p['wall_s']:.1f} | {p['cpu_s']:.1f} | {p.get('tokens', '')}"

    lines = [f"**{name}** (teacher {r['teacher']}; load average {r['load_average_before']} before, "
             f"{r['load_average_after']} after)", "",
             "| phase | offline wall s | offline CPU s | offline tokens | online wall s | online CPU s | online tokens |",
             "|---|---|---|---|---|---|---|"]
    for key, label in PHASES:
        lines.append(f"| {label} | {cells(off, key)} | {cells(on, key)} |")
    lines += [f"| **total** | {off['wall_s']:.1f} | {off['cpu_s']:.1f} | | {on['wall_s']:.1f} | {on['cpu_s']:.1f} | |", "",
              f"sequences generated and scored: offline {off['phases']['generation']['sequences']}, online "
              f"{on['phases']['generation']['sequences']} (reuse {r['reuse']}); optimizer steps "
              f"{off['phases']['training']['steps']} both",
              f"forward per 1,000 tokens: teacher {1000 * r['forward_s_per_1k_tokens']['teacher']:.2f} ms, student "
              f"{1000 * r['forward_s_per_1k_tokens']['student']:.2f} ms: teacher/student "
              f"{r['teacher_over_student_per_token']}x per token",
              f"teacher scoring per 1,000 tokens (batches of {r['score_batch']}): offline "
              f"{per_1k(off, 'scoring'):.0f} ms, online {per_1k(on, 'scoring'):.0f} ms",
              f"online / offline: {r['online_over_offline_wall']}x wall, {r['online_over_offline_cpu']}x CPU"]
    if "max_logit_difference_from_toy_teacher" in r:
        lines.append(f"grown teacher's largest logit difference from the toy teacher: "
                     f"{r['max_logit_difference_from_toy_teacher']:.2g}")
    return "\n".join(lines)


def rounded(value: Any) -> Any:
    """Floats to 4 decimals, all the way down (timings are not more precise than that)."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--init", type=Path, default=Path("data/models/student_sft"), help="π_ref")
    ap.add_argument("--teacher", type=Path, default=Path("data/models/teacher"))
    ap.add_argument("--prompts", type=Path, default=Path("data/prompts/opd.parquet"), help="the OPD prompts")
    ap.add_argument("--grow", action="append", default=None,
                    help="LAYERS,INTERMEDIATE of a grown teacher, one configuration each (repeatable; default "
                         f"{' and '.join(GROW)}; `none`: the toy only)")
    ap.add_argument("--score-batch", default="",
                    help="teacher_topk.batch_size for both methods (default distill.batch_size; `params`: the params')")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="distill.max_steps for both methods (default: the params'); fewer steps also lower "
                         "online's re-sampling, so the ratio falls with them")
    ap.add_argument("--repeats", type=int, default=5, help="timed forwards per model in the microbenchmark")
    ap.add_argument("--work", type=Path, default=Path("bench_runs/cost"), help="scratch folder (replaced)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/cost.json"))
    args = ap.parse_args(argv)
    sizes = [] if args.grow == ["none"] else [parse_size(g) for g in (args.grow or GROW)]
    base = yaml.safe_load(args.params.read_text())
    shutil.rmtree(args.work, ignore_errors=True)
    import torch

    from offline_opd.runtime import torch_threads   # what every stage (and online_distill) runs with

    results: dict[str, Any] = {
        "command": " ".join(["python", "bench/cost.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch_threads(), "platform": platform.platform(),
                    "cuda": torch.cuda.is_available()},
        "configs": {}}
    # Untimed: both methods for 2 steps, so that neither side of the first comparison pays this process's
    # first imports and kernel warm-ups (the offline side would, running first).
    warm = argparse.Namespace(**{**vars(args), "max_steps": 2, "repeats": 1})
    compare("toy", args.work / "warm_up", base, warm, args.teacher)
    for size in [None, *sizes]:
        name = "toy" if size is None else f"grown_{size[0]}x{size[1]}"
        teacher = args.teacher if size is None else grown_teacher(args.teacher, *size, args.work / f"{name}_teacher")
        results["configs"][name] = compare(name, args.work / name, base, args, teacher)
        print(table(name, results["configs"][name]), flush=True)
        print(flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rounded(results), indent=1, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
