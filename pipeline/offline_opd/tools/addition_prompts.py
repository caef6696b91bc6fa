"""Write the SmolLM2 preset's prompt file: "What is a + b?" for distinct random pairs a, b < `--below`.

The file is generated, not downloaded, so the preset needs no data set: `--count` distinct pairs drawn
with `random.Random(--seed)` (the shipped prompt_files/smollm2_addition.jsonl is the default arguments'
output), each with its `answer` for the `numeric` verifier and, when a teacher is fine-tuned, as its
training target. `prepare` then cuts the file into disjoint sft/opd/eval splits with `task.seed`.

    python -m offline_opd.tools.addition_prompts --out prompt_files/smollm2_addition.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TEMPLATE = "What is {a} + {b}? Answer with the number only."

from offline_opd.atomic import write_text


def addition_rows(count: int, below: int, seed: int) -> list[dict]:
    """`count` distinct (a, b) pairs with 0 <= a, b < `below`, in a seeded random order."""
    if not 0 < count <= below * below:
        raise SystemExit(f"--count {count}: there are only {below * below} distinct pairs below {below}")
    pairs = random.Random(seed).sample(range(below * below), count)
    return [{"prompt_id": f"add-{a}+{b}", "prompt": TEMPLATE.format(a=a, b=b), "answer": str(a + b)}
            for a, b in (divmod(p, below) for p in pairs)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opd-addition-prompts", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write (in prompt_files/)")
    parser.add_argument("--count", type=int, default=2000, help="number of distinct prompts (default 2000)")
    parser.add_argument("--below", type=int, default=100, help="operands are 0 .. below-1 (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair sample (default 0)")
    args = parser.parse_args(argv)
    rows = addition_rows(args.count, args.below, args.seed)
    write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"{args.out}: {len(rows)} prompts, a, b < {args.below}, seed {args.seed}")


if __name__ == "__main__":
    main()
