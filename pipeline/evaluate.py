"""Stage `evaluate`: the teacher, π_ref (the SFT student) and the distilled student, side by side.

For each model: greedy accuracy on the eval prompts with the task verifier (the first evaluate.n_eval
prompts; null = all). For each student, also its mean per-token divergence to the teacher on the
student's own greedy responses: full-vocabulary KL(teacher ‖ student) (`fkl`) and KL(student ‖
teacher) (`rkl`), averaged over response tokens, from one batched forward of both models over the same
sequences. Greedy decoding and fixed inputs make the numbers deterministic.

Writes --metrics (metrics/eval.json): {"teacher": {"accuracy"}, "student_sft": {"accuracy", "fkl",
"rkl"}, "student_opd": {...}, "opd_gain": accuracy(student_opd) − accuracy(student_sft), "n_eval"},
and with --plots DIR also DIR/accuracy.csv (model, accuracy) for `dvc plots`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pipeline.atomic import write_json, write_text
from pipeline.config import EvaluateConfig
from pipeline.errors import UserError
from pipeline.stage import stage_main


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", type=Path, required=True, help="teacher model folder (or model ref)")
    parser.add_argument("--ref", type=Path, required=True, help="π_ref, the SFT student (student_sft)")
    parser.add_argument("--student", type=Path, required=True, help="the distilled student (student_opd)")
    parser.add_argument("--prompts", type=Path, required=True,
                        help="eval prompt set (Parquet with prompt_id, prompt and reference answer)")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON file the results are written to")
    parser.add_argument("--plots", type=Path, default=None,
                        help="optional folder for accuracy.csv (columns model, accuracy)")


def divergence_to_teacher(teacher, student, prompt_ids: Sequence[list[int]], responses: Sequence[list[int]],
                          batch_size: int) -> dict[str, float]:
    """Mean full-vocabulary KL(teacher‖student) and KL(student‖teacher) over the response tokens.

    Both models see the same right-padded sequences; position t−1's logits predict response token t.
    """
    import torch
    from tqdm import tqdm

    device = next(student.parameters()).device
    sums = {"fkl": 0.0, "rkl": 0.0}
    tokens = 0
    for s in tqdm(range(0, len(prompt_ids), batch_size), desc="divergence", unit="batch", leave=False):
        seqs = [p + r for p, r in zip(prompt_ids[s:s + batch_size], responses[s:s + batch_size])]
        starts = torch.tensor([len(p) for p in prompt_ids[s:s + batch_size]])
        lengths = torch.tensor([len(q) for q in seqs])
        width = int(lengths.max())
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, q in enumerate(seqs):
            ids[row, :len(q)] = torch.as_tensor(q)
        pos = torch.arange(width)
        attn = (pos[None] < lengths[:, None]).long()
        target = ((pos[None] >= starts[:, None]) & (pos[None] < lengths[:, None]))[:, 1:]
        ids, attn, target = ids.to(device), attn.to(device), target.to(device)
        with torch.inference_mode():
            lp = torch.log_softmax(teacher(input_ids=ids, attention_mask=attn).logits[:, :-1][target].float(), -1)
            lq = torch.log_softmax(student(input_ids=ids, attention_mask=attn).logits[:, :-1][target].float(), -1)
        sums["fkl"] += float((lp.exp() * (lp - lq)).sum())
        sums["rkl"] += float((lq.exp() * (lq - lp)).sum())
        tokens += int(target.sum())
    return {k: v / max(1, tokens) for k, v in sums.items()}


def run(args: argparse.Namespace, cfg: EvaluateConfig) -> dict:
    from pipeline.backends.generation import greedy_decode, model_dtype
    from pipeline.models import default_device, load_model, resolve_model_dir
    from pipeline.prompts import read_prompts
    from pipeline.tasks.addition import accuracy

    models = {"teacher": args.teacher, "student_sft": args.ref, "student_opd": args.student}
    for path in models.values():
        resolve_model_dir(path)  # a missing model fails here, before any generation
    table = read_prompts(args.prompts)
    if cfg.n_eval is not None:
        table = table.slice(0, cfg.n_eval)
    prompts, answers, ids = (table.column(c).to_pylist() for c in ("prompt", "answer", "prompt_id"))
    if not prompts:
        raise UserError(f"{args.prompts}: no eval prompts (evaluate.n_eval={cfg.n_eval})")
    missing = [i for i, a in zip(ids, answers) if a is None]
    if missing:
        raise UserError(f"{args.prompts}: {len(missing)} eval prompts have no reference answer (e.g. "
                        f"prompt_id {missing[0]}); the verifier needs one for every eval prompt")

    results: dict = {}
    generated = {}
    for name, path in models.items():
        prompt_ids, responses, texts = greedy_decode(cfg.backend, path, prompts, batch_size=cfg.batch_size,
                                                     max_new_tokens=cfg.max_new_tokens)
        results[name] = {"accuracy": accuracy(texts, answers)}
        generated[name] = (prompt_ids, responses)
    device = default_device()
    teacher = load_model(args.teacher, device, model_dtype(device))
    for name in ("student_sft", "student_opd"):
        student = load_model(models[name], device, model_dtype(device))
        results[name].update(divergence_to_teacher(teacher, student, *generated[name], cfg.batch_size))
        del student
    results["opd_gain"] = results["student_opd"]["accuracy"] - results["student_sft"]["accuracy"]
    results["n_eval"] = len(prompts)
    write_json(args.metrics, results)
    if args.plots is not None:
        rows = "".join(f"{name},{results[name]['accuracy']}\n" for name in models)
        write_text(args.plots / "accuracy.csv", "model,accuracy\n" + rows)
    return {"n_eval": len(prompts)}


def main(argv: list[str] | None = None) -> dict:
    return stage_main("evaluate", __doc__, add_args, run, argv)


if __name__ == "__main__":
    main()
