"""The embedded default's teacher: a small Llama trained from scratch on the toy task's reference traces.

`teacher.source: scratch` only. A slice of the SFT prompts is held out (`teacher.holdout`, at most a tenth) to
report greedy exact match, so a user sees that the teacher is worth distilling before anything learns from it.
The folder is a real Hugging Face one (safetensors + the toy char tokenizer): every later stage loads it like
a real model. Lives here, not in the stage, because it is the one place generic code meets the toy tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import pyarrow as pa

from offline_opd.atomic import write_text
from offline_opd.config import EngineConfig, TeacherConfig
from offline_opd.contract.prompts import read_prompts, reference_sequences
from offline_opd.errors import UserError
from offline_opd.eval.exact_match import greedy_exact_match
from offline_opd.models.loading import MAX_POSITIONS, build_llama
from offline_opd.models.toy import build_char_tokenizer
from offline_opd.provenance.record import write_provenance
from offline_opd.train.examples import Example

log = logging.getLogger("opd")


def train_scratch(prompts_path: Path, cfg: TeacherConfig, out: Path, plots: Path, logs: Path, params_label: str,
                  record: dict, table: Optional[pa.Table] = None) -> dict:
    """Train, save and check the toy teacher; `record`: extra provenance fields (a domain teacher's domain),
    `table`: the prompts to train on (default: all of `prompts_path`). Returns the stage's metrics."""
    table = read_prompts(prompts_path) if table is None else table
    prompts, references = table.column("prompt").to_pylist(), table.column("reference").to_pylist()
    holdout = min(cfg.holdout, len(prompts) // 10)   # at most a tenth of the prompts
    if len(prompts) - holdout < 1:
        raise UserError(f"{prompts_path}: {len(prompts)} prompts leave nothing to train the teacher on; "
                        f"raise task.n_sft")
    import torch

    from offline_opd.train.supervised import run_key, train_supervised
    from offline_opd.train.trainer import save_model, training_dtype

    tokenizer = build_char_tokenizer()
    train_set = [Example(ids, plen) for ids, plen in
                 reference_sequences(tokenizer, prompts, references, prompts_path)[:len(prompts) - holdout]]
    model = build_llama(tokenizer, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
                                 cfg.intermediate_size, cfg.seed).to(training_dtype(cfg.precision))
    params = sum(p.numel() for p in model.parameters())
    result = train_supervised(model, train_set, cfg, tokenizer.pad_token_id, logs,
                              run_key(cfg, train_set, holdout=holdout), f"{params_label}: teacher")
    max_new = max(len(e.input_ids) - e.prompt_len for e in train_set) + 8

    def finish(folder: Path) -> Optional[float]:
        """Tokenizer, held-out greedy exact match of the saved folder, provenance."""
        tokenizer.save_pretrained(folder)
        # The toy model's own engine: hf (what its numbers were measured with), its dtype as saved (auto: fp32 on
        # CPU), its whole context (MAX_POSITIONS); kv_cache_gib is vLLM's and unused by hf.
        engine = EngineConfig("hf", cfg.eval_batch_size, "auto", MAX_POSITIONS, kv_cache_gib=1.0)
        accuracy = (greedy_exact_match(folder, prompts[-holdout:], references[-holdout:], max_new, engine, "teacher")
                    if holdout else None)
        write_provenance(folder, "teacher", source="scratch", config=cfg.spec(),
                         train_prompts=str(prompts_path), heldout_prompts=holdout, **record)
        return accuracy

    accuracy = save_model(result, out, torch.float32, finish)
    if not result.trainer.is_global_zero:
        return {}
    write_text(plots / "loss.csv", result.loss_csv("loss"))
    metrics = {"params": params, "final_loss": result.final_loss, "train_s": result.speed()["train_s"],
               "resumed": result.resumed, "heldout_n": holdout}
    if accuracy is not None:
        metrics["heldout_exact_match"] = accuracy
        log.info("teacher greedy exact match on %d held-out prompts: %.3f", holdout, accuracy)
    return metrics
