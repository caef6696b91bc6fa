"""Stage `teacher`: the teacher model every later stage is tied to (its fingerprint is recorded downstream).

`teacher.source: scratch` (the embedded default) trains a small Llama from scratch on the reference
traces of the toy SFT prompts, holding a slice of them out to report greedy accuracy, and saves a real
Hugging Face folder (safetensors + tokenizer). Any other `teacher.source` is a local model folder (or,
only then, a hub id fetched with huggingface_hub): it is checked (config and tokenizer load) and
fingerprinted, and the output folder holds a reference to it instead of a copy of its weights.
Either way the folder gets opd_provenance.json, and the training curve goes to <plots>/loss.csv (a
real teacher is not trained here, so its curve has the header and no rows; dvc.yaml declares the file).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from pipeline import toy_task
from pipeline.atomic import atomic_dir, write_text
from pipeline.config import TeacherConfig
from pipeline.generation import greedy_decode
from pipeline.models import load_config, load_tokenizer, parameter_count, resolve_model_source, write_model_ref
from pipeline.prompts import encode_prompt, read_prompts
from pipeline.provenance import write_provenance
from pipeline.errors import UserError
from pipeline.stage import stage_main
from pipeline.train.examples import Example

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
    parser.add_argument("--logs", type=Path, default=Path("logs/teacher"),
                        help="the toy teacher's training logs and resume checkpoint (default: logs/teacher)")


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
    import torch

    from pipeline.train.supervised import run_key, train_supervised
    from pipeline.train.trainer import save_model, training_dtype

    tokenizer = toy_task.build_tokenizer()
    train_set = toy_examples(tokenizer, prompts[:len(prompts) - holdout], args.prompts)
    model = toy_task.build_model(tokenizer, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                                 cfg.intermediate_size, cfg.seed).to(training_dtype(cfg.precision))
    params = sum(p.numel() for p in model.parameters())
    result = train_supervised(model, train_set, cfg, tokenizer.pad_token_id, args.logs,
                              run_key(cfg, train_set, holdout=holdout), f"{args.params}: teacher")
    max_new = max(len(e.input_ids) - e.prompt_len for e in train_set) + 8

    def finish(folder: Path) -> Optional[float]:
        """Tokenizer, held-out greedy accuracy of the saved folder, provenance."""
        tokenizer.save_pretrained(folder)
        accuracy = None
        if holdout:
            texts = greedy_decode("hf", folder, prompts[-holdout:], batch_size=EVAL_BATCH, max_new_tokens=max_new)[2]
            accuracy = toy_task.accuracy(texts, answers[-holdout:])
        write_provenance(folder, "teacher", source="scratch", config=asdict(cfg),
                         train_prompts=str(args.prompts), heldout_prompts=holdout)
        return accuracy

    accuracy = save_model(result, args.out, torch.float32, finish)
    if not result.trainer.is_global_zero:
        return {}
    write_text(args.plots / "loss.csv", result.loss_csv("loss"))
    metrics = {"params": params, "final_loss": result.final_loss, "train_s": result.speed()["train_s"],
               "resumed": result.resumed, "heldout_n": holdout}
    if accuracy is not None:
        metrics["heldout_accuracy"] = accuracy
        log.info("teacher greedy accuracy on %d held-out prompts: %.3f", holdout, accuracy)
    return metrics


def adopt_existing(args: argparse.Namespace, cfg: TeacherConfig) -> dict:
    """A real teacher: check it loads, fingerprint it, and point at it (tens of GB are not copied)."""
    target = resolve_model_source(cfg.source)
    load_config(target)
    load_tokenizer(target)
    with atomic_dir(args.out) as tmp:
        write_model_ref(tmp, target, {"source": cfg.source})
        write_provenance(tmp, "teacher", source=str(target), config=asdict(cfg))
    write_text(args.plots / "loss.csv", "step,loss\n")  # the declared curve: no rows, nothing was trained
    return {"params": parameter_count(target)}


def run(args: argparse.Namespace, cfg: TeacherConfig) -> dict:
    return train_scratch(args, cfg) if cfg.source == "scratch" else adopt_existing(args, cfg)


def main(argv: list[str] | None = None) -> dict:
    return stage_main("teacher", __doc__, add_args, run, argv)


if __name__ == "__main__":
    main()
