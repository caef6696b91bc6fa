"""The `hf` engine: one transformers model, loaded once, behind both `generate` and `score`."""

from __future__ import annotations

from pathlib import Path

from offline_opd.backends.base import Extras, Sample, Sampling, Scored, check_fits
from offline_opd.backends.generation import HFGenerator
from offline_opd.backends.scoring import HFScorer


class HFEngine:
    """transformers on CPU or GPU: KV-cached sampling (generation.py) and prefill scoring (scoring.py)."""

    def __init__(self, model_path: Path | str, *, batch_size: int, dtype: str, max_model_len: int, section: str,
                 device: str) -> None:
        from offline_opd.models.loading import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(model_path)
        self.model = load_model(model_path, device, dtype)
        self.max_model_len, self.section = max_model_len, section
        self._generator = HFGenerator(self.model, self.tokenizer, batch_size)
        self._scorer = HFScorer(self.model, self.tokenizer.pad_token_id, batch_size)
        self.stop_ids = self._generator.stop_ids

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[list[Sample]]:
        check_fits([len(p) + sampling.max_new_tokens for p in prompt_ids], self.max_model_len, self.section)
        return self._generator.generate(prompt_ids, sampling)

    def score(self, input_ids: list[list[int]], prompt_lens: list[int], k: int,
              extras: Extras | None = None) -> list[Scored]:
        check_fits([len(s) for s in input_ids], self.max_model_len, self.section)
        return self._scorer.score(input_ids, prompt_lens, k, extras)

    def logits_model(self):
        return self.model

    def close(self) -> None:
        import gc

        self.model = self._generator = self._scorer = None
        gc.collect()
