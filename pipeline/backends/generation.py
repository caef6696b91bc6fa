"""Sampling responses with their behaviour-policy log-probs: the `hf` and `vllm` generation backends.

Offline OPD needs, for every sampled token, the exact log-prob the sampling policy gave it
(log_softmax(logits / T) of that token), so the `hf` backend runs its own KV-cached decoding loop
instead of `model.generate`: `generate` would apply the model's `generation_config` (top-k, top-p,
repetition penalty, ...) and the recorded log-probs would no longer describe the distribution the
tokens came from. Temperature 0 means greedy decoding, with log-probs reported at T = 1.

Randomness comes from one `torch.Generator` per batch, seeded from (seed, batch index), so a
result does not depend on what the process ran before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class Sample:
    response_ids: list[int]   # generated ids, stopping after eos (eos included) or at max_new_tokens
    logprobs: list[float]     # behaviour-policy log-prob of each response id, at the sampling temperature


class Generator(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                 seed: int) -> list[list[Sample]]:
        """`n` samples per prompt, as [prompt][sample]."""
        ...


def get_generator(backend: str, model_path: Path | str, *, batch_size: int,
                  device: str | None = None) -> Generator:
    """The generation backend named in the params (`hf` or `vllm`), loaded on `device` (default: cuda if any)."""
    if backend == "hf":
        return HFGenerator(model_path, batch_size=batch_size, device=device)
    if backend == "vllm":
        from pipeline.backends.vllm_backend import VLLMGenerator

        return VLLMGenerator(model_path, batch_size=batch_size, device=device)
    raise ValueError(f"unknown generation backend {backend!r}; use one of {', '.join(BACKENDS)}")


def backend_version(backend: str) -> str:
    """Library versions recorded in shard footers: numbers can change across versions of either."""
    if backend == "vllm":
        from pipeline.backends.vllm_backend import vllm_version

        return vllm_version()
    import torch
    import transformers

    return f"transformers {transformers.__version__}, torch {torch.__version__}"


def greedy_decode(backend: str, model_dir: Path | str, prompts: Sequence[str], *, batch_size: int,
                  max_new_tokens: int) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Prompt ids, greedy response ids and decoded response texts of one model, which is freed on return.

    Greedy decoding draws no random numbers, so the result is deterministic (the seed is irrelevant).
    """
    import gc

    from pipeline.models import load_tokenizer
    from pipeline.prompts import encode_prompt

    tokenizer = load_tokenizer(model_dir)
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    generator = get_generator(backend, model_dir, batch_size=batch_size)
    samples = generator.generate(prompt_ids, n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
    del generator
    gc.collect()
    responses = [s[0].response_ids for s in samples]
    return prompt_ids, responses, tokenizer.batch_decode(responses, skip_special_tokens=True)


def batch_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for batch `index` (seed 0 batch 1 and seed 1 batch 0 must differ)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (an OOM shows up at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device):
    """Left-padded ids, attention mask and position ids (0 at each sequence's first real token)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            ids[row, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[row, width - len(s):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often list several)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    ids.discard(None)
    if not ids:
        raise ValueError("the model has no eos token (tokenizer.eos_token_id and generation_config are unset); "
                         "set eos_token in its tokenizer_config.json")
    return sorted(ids)


def model_dtype(device: str) -> str:
    """fp32 on CPU (exact, and CPUs gain little from bf16); bf16 on GPU, as vLLM would run it."""
    return "float32" if device == "cpu" else "bfloat16"


class HFGenerator:
    """Batched, left-padded, KV-cached sampling with transformers on CPU or GPU."""

    def __init__(self, model_path: Path | str, *, batch_size: int, device: str | None = None) -> None:
        from pipeline.models import default_device, load_model, load_tokenizer

        self.device = device or default_device()
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_model(model_path, self.device, model_dtype(self.device))
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                 seed: int) -> list[list[Sample]]:
        from tqdm import tqdm

        if n < 1 or max_new_tokens < 1 or temperature < 0:
            raise ValueError(f"need n >= 1, max_new_tokens >= 1, temperature >= 0; got n={n}, "
                             f"max_new_tokens={max_new_tokens}, temperature={temperature}")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("an empty prompt cannot be continued: every prompt needs at least one token")
        jobs = [p for p in prompt_ids for _ in range(n)]           # job j is prompt j // n, sample j % n
        out: list[Sample | None] = [None] * len(jobs)
        batches = length_batches([len(p) for p in jobs], self.batch_size)
        for b, idx in enumerate(tqdm(batches, desc="generate", unit="batch", leave=False)):
            for j, sample in zip(idx, self._generate_batch([jobs[j] for j in idx], temperature,
                                                           max_new_tokens, batch_seed(seed, b))):
                out[j] = sample
        return [out[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def _generate_batch(self, prompts: list[list[int]], temperature: float, max_new_tokens: int,
                        seed: int) -> list[Sample]:
        import torch

        ids, mask, positions = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        rng = torch.Generator(device=self.device).manual_seed(seed)
        stop = torch.as_tensor(self.stop_ids, device=self.device)
        rows = len(prompts)
        tokens = torch.empty((rows, max_new_tokens), dtype=torch.long, device=self.device)
        logps = torch.empty((rows, max_new_tokens), dtype=torch.float32, device=self.device)
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)
        lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=self.device)
        cache = None
        step_ids, step_pos = ids, positions
        with torch.inference_mode():
            for t in range(max_new_tokens):
                res = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                 past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = res.past_key_values
                logits = res.logits[:, -1].float()
                if temperature > 0:
                    logp = torch.log_softmax(logits / temperature, dim=-1)
                    tok = torch.multinomial(logp.exp(), 1, generator=rng).squeeze(1)
                else:
                    logp = torch.log_softmax(logits, dim=-1)
                    tok = logp.argmax(-1)
                tokens[:, t] = tok
                logps[:, t] = logp.gather(1, tok[:, None]).squeeze(1)
                hit = ~done & torch.isin(tok, stop)
                lengths = torch.where(hit, t + 1, lengths)
                done |= hit
                if bool(done.all()):
                    break
                # Finished rows keep decoding (their tokens are cut off below); one fused batch is
                # cheaper than reshaping the KV cache every time a row ends.
                step_ids = tok[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
        tokens_l, logps_l, lengths_l = tokens.tolist(), logps.tolist(), lengths.tolist()
        return [Sample(tokens_l[r][:lengths_l[r]], logps_l[r][:lengths_l[r]]) for r in range(rows)]
