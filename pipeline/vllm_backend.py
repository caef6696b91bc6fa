"""The `vllm` generation and scoring backends (GPU, optional extra: pip install 'offline-opd[vllm]').

This is the only module that imports vLLM, and only when a backend is built, so the rest of the
pipeline installs and runs without it. Two engine settings carry the contract:

- Generation uses `logprobs_mode="processed_logprobs"`: vLLM's default returns log-probs of the raw
  logits, before temperature, which is not the distribution the tokens were sampled from. Sampling
  params are passed explicitly (top-p 1, top-k off), so the model's generation_config cannot change
  the sampling distribution behind the recorded log-probs.
- Scoring is a prefill with `prompt_logprobs=k` and the engine's `max_logprobs` raised to k. vLLM
  returns the k best tokens per position plus the actual token when it ranks outside them; prompt
  log-probs are never temperature-scaled, so scoring is at T = 1 like the `hf` scorer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.generation import Sample, batch_seed, stop_token_ids
from pipeline.models import resolve_model_dir
from pipeline.scoring import Extras, Scored, check_inputs
from pipeline.sparse_targets import tail_from_logprobs
from pipeline.errors import UserError

INSTALL_HINT = "pip install 'offline-opd[vllm]'"


def _vllm():
    try:
        import vllm
    except ImportError as exc:
        raise UserError(f"backend 'vllm' needs vLLM, which is not installed ({exc}); install it with "
                        f"{INSTALL_HINT} on a machine with a CUDA GPU, or set backend: hf") from None
    return vllm


def vllm_version() -> str:
    return f"vllm {_vllm().__version__}"


def _engine(model_path: Path | str, device: str | None, **engine_args):
    vllm = _vllm()
    if device not in (None, "cuda"):
        raise UserError(f"backend 'vllm' runs on CUDA only (device {device!r} requested); use backend: hf")
    return vllm.LLM(model=str(resolve_model_dir(model_path)), **engine_args)


class VLLMGenerator:
    """Sampling with vLLM; each prompt gets its own seed, so results do not depend on scheduling."""

    def __init__(self, model_path: Path | str, *, batch_size: int, device: str | None = None) -> None:
        from transformers import GenerationConfig

        from pipeline.models import load_tokenizer

        # batch_size caps the sequences decoded at once (vLLM schedules them itself).
        self.llm = _engine(model_path, device, max_num_seqs=batch_size, logprobs_mode="processed_logprobs")
        try:
            gen_config = GenerationConfig.from_pretrained(resolve_model_dir(model_path))
        except OSError:  # no generation_config.json: the tokenizer's eos is the only stop token
            gen_config = None
        self.stop_ids = stop_token_ids(load_tokenizer(model_path), gen_config)

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                 seed: int) -> list[list[Sample]]:
        from vllm import SamplingParams, TokensPrompt

        params = [SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_new_tokens,
                                 logprobs=0, seed=batch_seed(seed, i), stop_token_ids=self.stop_ids,
                                 detokenize=False) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=True)
        return [[Sample(list(c.token_ids), [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)])
                 for c in out.outputs] for out in outputs]


class VLLMScorer:
    """Teacher scoring as a vLLM prefill with prompt log-probs (the engine's max_logprobs is fixed at its start)."""

    def __init__(self, model_path: Path | str, *, batch_size: int, device: str | None = None) -> None:
        _vllm()  # fail before any work when vLLM is missing, not at the first batch
        self.model_path, self.batch_size, self.device = model_path, batch_size, device
        self.llm, self.k = None, None

    def score(self, input_ids: list[list[int]], prompt_lens: list[int], k: int,
              extras: Extras | None = None) -> list[Scored]:
        from vllm import SamplingParams, TokensPrompt

        if extras is not None and (extras.selection.mode != "topk" or extras.union_ids is not None):
            # vLLM returns only the top log-probs, not the distribution to draw from or to score other ids in.
            raise UserError("backend 'vllm' stores top-k only: set teacher_topk.selection: topk and "
                            "teacher_topk.union_student_k: 0, or use teacher_topk.backend: hf")
        if self.llm is None:
            # Prefix caching would skip the prefill that computes prompt log-probs for cached blocks.
            self.llm = _engine(self.model_path, self.device, max_num_seqs=self.batch_size,
                               max_logprobs=max(k, 20), enable_prefix_caching=False)
            self.k = max(k, 20)
        elif k > self.k:
            # A second engine would not fit beside the first on the GPU, and vLLM frees one unreliably.
            raise ValueError(f"this vLLM scorer was started for k <= {self.k}; make a new one for k={k}")
        check_inputs(input_ids, prompt_lens, k, self.llm.llm_engine.model_config.get_vocab_size())
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in input_ids], params,
                                    use_tqdm=True)
        return [_scored(ids, p, out.prompt_logprobs, k) for ids, p, out in zip(input_ids, prompt_lens, outputs)]


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
