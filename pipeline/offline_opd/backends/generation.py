"""The `hf` backend's sampling: responses with their behaviour-policy log-probs (records in base.py).

Offline OPD needs, for every sampled token, the exact log-prob the sampling policy gave it
(log_softmax(logits / T) of that token), so the `hf` backend runs its own KV-cached decoding loop
instead of `model.generate`: `generate` would apply the model's `generation_config` (top-k, top-p,
repetition penalty, ...) and the recorded log-probs would no longer describe the distribution the
tokens came from. Temperature 0 means greedy decoding, with log-probs reported at T = 1.

Randomness is per sequence: sample j of a call is drawn by inverse-CDF sampling from uniforms of its
own `torch.Generator`, seeded from (seed, j) (`base.job_seeds`), so a result depends neither on the
batch size nor on what the process ran before (vLLM gets the same per-request seeds).
"""

from __future__ import annotations

from typing import Sequence

from offline_opd.backends.base import Sample, Sampling, check_prompts, job_seeds, stop_token_ids


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


class HFGenerator:
    """Batched, left-padded, KV-cached sampling with a loaded transformers model on CPU or GPU."""

    def __init__(self, model, tokenizer, batch_size: int) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = model.device
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config)

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[list[Sample]]:
        from tqdm import tqdm

        check_prompts(prompt_ids)
        n = sampling.n
        jobs = [p for p in prompt_ids for _ in range(n)]           # job j is prompt j // n, sample j % n
        seeds = job_seeds(sampling.seed, len(jobs))
        out: list[Sample | None] = [None] * len(jobs)
        batches = length_batches([len(p) for p in jobs], self.batch_size)
        for idx in tqdm(batches, desc="generate", unit="batch", leave=False):
            for j, sample in zip(idx, self._generate_batch([jobs[j] for j in idx], sampling.temperature,
                                                           sampling.max_new_tokens, [seeds[j] for j in idx])):
                out[j] = sample
        return [out[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def _generate_batch(self, prompts: list[list[int]], temperature: float, max_new_tokens: int,
                        seeds: list[int]) -> list[Sample]:
        import torch

        ids, mask, positions = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        # One uniform per (row, step) from the row's own generator: the draw of a row does not
        # depend on which rows share its batch.
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s),
                                           dtype=torch.float64) for s in seeds]).to(self.device)
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
                    # Inverse CDF: the first token whose cumulative probability exceeds u (a token of
                    # probability 0 owns an empty interval, so it is never drawn).
                    cdf = logp.double().exp().cumsum(-1)
                    u = uniforms[:, t:t + 1] * cdf[:, -1:]
                    tok = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[-1] - 1)
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
