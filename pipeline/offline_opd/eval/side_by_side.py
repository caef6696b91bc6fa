"""Teacher and students side by side on the same eval prompts: what `evaluate` measures, per prompt set.

The stage decides which prompts and models (and, for multi-teacher OPD, which teacher per domain); this module
decodes each model greedily once, scores accuracy with the verifier, agreement with the teacher, and the
full-vocabulary divergences on the student's own responses (eval/divergence.py). Kept out of the stage so that
another driver (a notebook, a sweep) can compare models without going through DVC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from offline_opd.backends.engine import Engine, greedy_responses, load_engine, resolve_dtype
from offline_opd.backends.pool import pooled_greedy_responses
from offline_opd.config import EvaluateConfig
from offline_opd.contract.prompts import encode_prompt
from offline_opd.eval.divergence import divergences
from offline_opd.models.loading import default_device, load_model, load_tokenizer
from offline_opd.tasks.verifiers import accuracy, exact


class Answers(NamedTuple):
    prompt_ids: list[list[int]]
    responses: list[list[int]]   # greedy response ids
    texts: list[str]             # decoded responses, what the verifier reads



def greedy_answers(engine: Engine, prompts: list[str], max_new_tokens: int) -> Answers:
    """Prompt ids, greedy response ids and the decoded responses of one engine's model."""
    prompt_ids = [encode_prompt(engine.tokenizer, p) for p in prompts]
    responses = greedy_responses(engine, prompt_ids, max_new_tokens)
    return Answers(prompt_ids, responses, engine.tokenizer.batch_decode(responses, skip_special_tokens=True))


def answer(model: Path, cfg: EvaluateConfig, prompts: list[str]) -> tuple[Answers, int, Any]:
    """One model's greedy answers, its tokenizer's pad id, and a transformers module for its divergences.

    `cluster.backend: local` loads the engine here and reuses its module (hf: no second load). `ray` decodes
    on the actor pool, in the engine batches one process would make (identical responses), and this process
    loads the module only for the divergences, once the pool has let the model go.
    """
    if cfg.cluster.backend == "local":
        engine = load_engine(model, cfg, "evaluate", tensor_parallel=cfg.cluster.tensor_parallel)
        answers = greedy_answers(engine, prompts, cfg.max_new_tokens)
        pad_id, module = engine.tokenizer.pad_token_id, engine.logits_model()
        engine.close()
        return answers, pad_id, module
    tokenizer = load_tokenizer(model)
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    responses = pooled_greedy_responses(model, cfg, "evaluate", prompt_ids, cfg.max_new_tokens)
    answers = Answers(prompt_ids, responses, tokenizer.batch_decode(responses, skip_special_tokens=True))
    device = default_device()
    return answers, tokenizer.pad_token_id, load_model(model, device, resolve_dtype(cfg.dtype, device))


def compare(teacher: Path, models: dict[str, Path], cfg: EvaluateConfig, verify, prompts: list[str],
            answers: list[str]) -> dict:
    """The teacher's accuracy, and each student's accuracy, agreement with the teacher and divergences to it."""
    teacher_answers, pad_id, teacher_lm = answer(teacher, cfg, prompts)
    results: dict = {"teacher": {"accuracy": accuracy(verify, teacher_answers.texts, answers)}}
    for name in ("student_sft", "student_opd"):
        mine, _, student_lm = answer(models[name], cfg, prompts)
        results[name] = {"accuracy": accuracy(verify, mine.texts, answers),
                         # Agreement needs no verifier: the final answer (last segment) equals the teacher's.
                         "teacher_agreement": accuracy(exact, mine.texts, teacher_answers.texts)}
        results[name].update(divergences(teacher_lm, student_lm, mine.prompt_ids, mine.responses,
                                         cfg.divergence_batch_size, pad_id))
        del student_lm
    results["opd_gain"] = results["student_opd"]["accuracy"] - results["student_sft"]["accuracy"]
    return results


def weighted_mean(per: dict[str, dict]) -> dict:
    """Every number of the per-domain results, averaged with each domain's n_eval as its weight."""
    total = sum(r["n_eval"] for r in per.values())
    first = next(iter(per.values()))
    out: dict = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = {k: sum(r[key][k] * r["n_eval"] for r in per.values()) / total for k in value}
        elif key != "n_eval":
            out[key] = sum(r[key] * r["n_eval"] for r in per.values()) / total
    return out
