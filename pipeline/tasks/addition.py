"""The embedded toy task: multi-digit addition answered with a worked, per-column trace.

Why a trace and not just the sum: offline OPD matters when errors compound over a long response, as in
real reasoning. The response for "864+394=" is

    4+4+0=08 6+9+0=15 8+3+1=12 =1258

one step per column (least significant first): the two digits, the incoming carry, and the two-digit
column sum whose first digit is the next carry. Each token depends on a few earlier ones at fixed
offsets (a digit of the prompt, the carry three tokens back), so a tiny model can learn every step
locally, yet one wrong carry spoils the final answer. The final answer follows the last '=', which is
what `verify` reads.

The tokenizer is a real character-level Hugging Face tokenizer and the models are real Llama models,
so the toy path runs through exactly the same loading, generation and scoring code as a real model.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Collection, Sequence

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
# Printable ASCII plus newline: enough for the task and for any plain-text prompt a user tries.
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
MAX_POSITIONS = 256


@dataclass(frozen=True)
class Problem:
    prompt_id: str
    prompt: str
    answer: str
    solution: str


def build_tokenizer():
    """A character-level fast tokenizer: one token per character, `<bos>` prepended, exact decoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()  # join characters back without the default space separator
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, clean_up_tokenization_spaces=False,
                                   model_max_length=MAX_POSITIONS)


def build_model(tokenizer, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                seed: int):
    """A randomly initialised (seeded) Llama with tied embeddings sized for `tokenizer`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, do_sample=False)
    return model


def solve(prompt: str) -> str:
    """The reference trace for an addition prompt "a+b="; raises ValueError for anything else."""
    match = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
    if not match:
        raise ValueError(f"not an addition prompt of the toy task: {prompt!r} (expected e.g. '864+394=')")
    a, b = match.groups()
    width = max(len(a), len(b))
    a, b = a.zfill(width), b.zfill(width)
    steps, carry = [], 0
    for x, y in zip(reversed(a), reversed(b)):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    return " ".join(steps) + f" ={int(a) + int(b)}"


def make_problems(digits: int, n: int, seed: int, exclude: Collection[str] = ()) -> list[Problem]:
    """`n` distinct problems with `digits`-digit operands, deterministic in `seed`, none of whose
    prompts is in `exclude` (pass the other splits' prompts to keep held-out sets held out)."""
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    low, high = 10 ** (digits - 1), 10 ** digits - 1
    space = (high - low + 1) ** 2
    excluded = set(exclude)
    if n > space - len(excluded):
        raise ValueError(f"asked for {n} problems, but only {space - len(excluded)} {digits}-digit "
                         f"additions remain; lower the split sizes or raise task.digits")
    rng = random.Random(f"toy-addition/{digits}/{seed}")
    problems: list[Problem] = []
    seen = set(excluded)
    while len(problems) < n:
        a, b = rng.randint(low, high), rng.randint(low, high)
        prompt = f"{a}+{b}="
        if prompt in seen:
            continue
        seen.add(prompt)
        problems.append(Problem(f"add{digits}-{a}+{b}", prompt, str(a + b), solve(prompt)))
    return problems


def make_splits(digits: int, sizes: dict[str, int], seed: int) -> dict[str, list[Problem]]:
    """Disjoint splits (e.g. sft/opd/eval) drawn in order, each excluding the prompts before it."""
    splits: dict[str, list[Problem]] = {}
    taken: set[str] = set()
    for index, (name, n) in enumerate(sizes.items()):
        splits[name] = make_problems(digits, n, seed * 1000 + index, exclude=taken)
        taken.update(p.prompt for p in splits[name])
    return splits


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_segment(text: str) -> str:
    """The part of a response that holds its final answer: after the last '####' (GSM8K style),
    else after the last '=', else all of it."""
    for marker in ("####", "="):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip()
    return text.strip()


def extract_answer(text: str) -> str | None:
    """The last number of the final segment (None if it has none)."""
    numbers = _NUMBER.findall(final_segment(text))
    return numbers[-1] if numbers else None


def _as_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def verify(response: str, answer: str) -> bool:
    """Whether `response` ends in the reference `answer`.

    Numeric references are compared by value (1,000 == 1000.0) with the last number of the final
    segment; others must equal the final segment exactly. A reference written GSM8K style
    ("... #### 42") is reduced to its final segment first.
    """
    expected = final_segment(answer) if "####" in answer else answer.strip()
    want = _as_number(expected)
    if want is None:
        return final_segment(response) == expected
    got = extract_answer(response)
    return got is not None and _as_number(got) == want


def accuracy(responses: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of `responses` that `verify` accepts against the matching reference answer."""
    return sum(verify(r, a) for r, a in zip(responses, answers)) / max(1, len(answers))
