"""Greedy exact match against reference responses: the toy teacher's held-out accuracy.

No task verifier: the toy reference is the whole trace, so an exact match is a correct answer.
"""

from __future__ import annotations

from pathlib import Path

from offline_opd.backends.engine import greedy_responses, load_engine
from offline_opd.config import EngineConfig
from offline_opd.contract.prompts import encode_prompt


def greedy_exact_match(model_dir: Path, prompts: list[str], references: list[str], max_new_tokens: int,
                       engine_cfg: EngineConfig, section: str) -> float:
    """Fraction of `prompts` the model in `model_dir` answers greedily with exactly the reference response."""
    engine = load_engine(model_dir, engine_cfg, section)
    try:
        responses = greedy_responses(engine, [encode_prompt(engine.tokenizer, p) for p in prompts], max_new_tokens)
        texts = engine.tokenizer.batch_decode(responses, skip_special_tokens=True)
    finally:
        engine.close()
    return sum(t == r for t, r in zip(texts, references)) / max(1, len(references))
