"""Stage `teacher`: the teacher model every later stage is tied to (its fingerprint is recorded downstream).

`teacher.source: scratch` (the embedded default) trains a small Llama from scratch on the reference
traces of the toy SFT prompts, holding a slice of them out to report greedy accuracy, and saves a real
Hugging Face folder (safetensors + tokenizer). Any other `teacher.source` is a local model folder (or,
only then, a hub id fetched with huggingface_hub): it is checked (config and tokenizer load) and
fingerprinted, and the output folder holds a reference to it instead of a copy of its weights.
Either way the folder gets opd_provenance.json, and the training curve goes to <plots>/loss.csv.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.tasks import addition as toy_task
from pipeline.atomic import atomic_dir
from pipeline.config import TeacherConfig
from pipeline.backends.generation import greedy_decode
from pipeline.lm_training import Example, train_lm
from pipeline.models import default_device, load_tokenizer, parameter_count, resolve_model_source, write_model_ref
from pipeline.prompts import encode_prompt, read_prompts
from pipeline.provenance import write_provenance
from pipeline.errors import UserError
from pipeline.stage import stage_main

log = logging.getLogger("opd")

# Prompts kept out of the toy teacher's training to measure its greedy accuracy (capped at a tenth).
HOLDOUT = 500
EVAL_BATCH = 500


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=Path, required=True,
                        help="SFT prompt set (data/prompts/sft.parquet); the toy teacher trains on its traces")
    parser.add_argument("--out", type=Path, required=True, help="teacher model folder (data/models/teacher)")
    parser.add_argument("--plots", type=Path, default=Path("plots/teacher"),
                        help="folder for loss.csv, the toy teacher's training curve (default: plots/teacher)")


def toy_examples(tokenizer, prompts: list[str], where: Path) -> list[Example]:
    """Prompt + reference trace + eos for each prompt; refuses prompts the toy task cannot solve."""
    examples = []
    for prompt in prompts:
        try:
            solution = toy_task.solve(prompt)
        except ValueError:
            raise UserError(f"{where}: prompt {prompt!r} is not a toy addition; teacher.source 'scratch' only "
                            f"trains the embedded toy teacher. With your own prompts set teacher.source to a "
                            f"Hugging Face model folder") from None
        prompt_ids = encode_prompt(tokenizer, prompt)
        response = tokenizer(solution, add_special_tokens=False)["input_ids"]
        examples.append(Example(prompt_ids + response + [tokenizer.eos_token_id], len(prompt_ids)))
    return examples


def train_scratch(args: argparse.Namespace, cfg: TeacherConfig) -> dict:
    table = read_prompts(args.prompts)
    prompts, answers = table.column("prompt").to_pylist(), table.column("answer").to_pylist()
    holdout = min(HOLDOUT, len(prompts) // 10)
    if len(prompts) - holdout < 1:
        raise UserError(f"{args.prompts}: {len(prompts)} prompts leave nothing to train the teacher on; "
                        f"raise task.n_sft")
    tokenizer = toy_task.build_tokenizer()
    train_set = toy_examples(tokenizer, prompts[:len(prompts) - holdout], args.prompts)
    model = toy_task.build_model(tokenizer, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                                 cfg.intermediate_size, cfg.seed).to(default_device())
    start = time.perf_counter()
    result = train_lm(model, train_set, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                      warmup_frac=cfg.warmup_frac, seed=cfg.seed, pad_id=tokenizer.pad_token_id,
                      curve_csv=args.plots / "loss.csv", desc="teacher")
    train_s = time.perf_counter() - start
    max_new = max(len(e.input_ids) - e.prompt_len for e in train_set) + 8
    with atomic_dir(args.out) as tmp:
        model.cpu().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        accuracy = None
        if holdout:
            texts = greedy_decode("hf", tmp, prompts[-holdout:], batch_size=EVAL_BATCH, max_new_tokens=max_new)[2]
            accuracy = toy_task.accuracy(texts, answers[-holdout:])
        write_provenance(tmp, "teacher", source="scratch", config=asdict(cfg),
                         train_prompts=str(args.prompts), heldout_prompts=holdout)
    metrics = {"params": sum(p.numel() for p in model.parameters()), "final_loss": round(result.final_loss, 5),
               "train_s": round(train_s, 1), "heldout_n": holdout}
    if accuracy is not None:
        metrics["heldout_accuracy"] = accuracy
        log.info("teacher greedy accuracy on %d held-out prompts: %.3f", holdout, accuracy)
    return metrics


def adopt_existing(args: argparse.Namespace, cfg: TeacherConfig) -> dict:
    """A real teacher: check it loads, fingerprint it, and point at it (tens of GB are not copied)."""
    from transformers import AutoConfig

    target = resolve_model_source(cfg.source)
    try:
        AutoConfig.from_pretrained(target)
        load_tokenizer(target)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"teacher.source {cfg.source} ({target}): config or tokenizer does not load "
                        f"({type(exc).__name__}: {exc})") from exc
    with atomic_dir(args.out) as tmp:
        write_model_ref(tmp, target, {"source": cfg.source})
        write_provenance(tmp, "teacher", source=str(target), config=asdict(cfg))
    return {"params": parameter_count(target)}


def run(args: argparse.Namespace, cfg: TeacherConfig) -> dict:
    return train_scratch(args, cfg) if cfg.source == "scratch" else adopt_existing(args, cfg)


def main(argv: list[str] | None = None) -> dict:
    return stage_main("teacher", __doc__, add_args, run, argv)


if __name__ == "__main__":
    main()
