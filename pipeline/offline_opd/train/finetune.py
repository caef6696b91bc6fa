"""Fine-tuning a pretrained teacher on the task's reference answers before it teaches (`teacher.finetune_steps`).

Users often distil from their own fine-tuned model rather than from a base checkpoint. A real source
(a GGUF file or a model folder) that is weak at the task (SmolLM2-135M-Instruct answers "What is
a + b?" right a third of the time, and rambles) can be trained here on the SFT split's `answer`
column first: chat-templated prompt, then the answer, then eos, with the same supervised stack as the
toy teacher and SFT (pipeline/offline_opd/train/supervised.py). The result is saved as an ordinary
model folder, so everything downstream fingerprints the fine-tuned teacher, not its source.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import pyarrow as pa

from offline_opd.config import TeacherConfig
from offline_opd.contract.prompts import read_prompts, reference_sequences
from offline_opd.models.gguf import convert_gguf, is_gguf_source, resolve_gguf
from offline_opd.models.loading import resolve_model_source
from offline_opd.provenance.fingerprint import model_fingerprint
from offline_opd.provenance.record import write_provenance
from offline_opd.train.examples import Example


def answer_examples(tokenizer, prompts: list[str], answers: list[Optional[str]], where: str) -> list[Example]:
    """Prompt (chat template) + answer + eos per prompt; a prompt without an answer is refused."""
    fix = ("teacher.finetune_steps > 0 trains the teacher on the SFT prompts' answers: add them, or set "
           "teacher.finetune_steps: 0")
    return [Example(ids, prompt_len) for ids, prompt_len
            in reference_sequences(tokenizer, prompts, answers, where, column="answer", fix=fix)]


def finetune_teacher(source_dir: Path, prompts: Path, cfg: TeacherConfig, out: Path, logs: Path, where: str,
                     source: str, table: Optional[pa.Table] = None) -> dict:
    """Train the model in `source_dir` for `cfg.finetune_steps` steps, with the teacher's optimizer keys, on
    the (prompt, answer) pairs of the prompt set `prompts` (or of `table`, a part of it), and save it to
    `out` (weights in the source's dtype, tokenizer, provenance naming `source` and the source folder's
    fingerprint). `where` names the params file in errors. Resumes `logs` only for the same settings,
    examples and source weights.
    Returns the stage metrics with the loss curve as `loss_csv` (empty off rank 0)."""
    from transformers import AutoTokenizer

    from offline_opd.train.supervised import run_key, train_supervised
    from offline_opd.train.trainer import load_for_training, save_model

    table = read_prompts(prompts) if table is None else table
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    examples = answer_examples(tokenizer, table.column("prompt").to_pylist(), table.column("answer").to_pylist(),
                               str(prompts))
    train_cfg = dataclasses.replace(cfg, max_steps=cfg.finetune_steps)
    loaded = load_for_training(source_dir, cfg.precision, sharded=cfg.strategy == "fsdp")
    source_fp = model_fingerprint(source_dir)
    result = train_supervised(loaded.model, examples, train_cfg, tokenizer.pad_token_id or 0, logs,
                              run_key(train_cfg, examples, base=source_fp), f"{where}: teacher",
                              weights=loaded.weights)

    def finish(folder: Path) -> None:
        tokenizer.save_pretrained(folder)
        write_provenance(folder, "teacher", source=source, config=asdict(cfg),
                         finetuned_from_fingerprint=source_fp, finetune_prompts=str(prompts))

    save_model(result, out, loaded.stored_dtype, finish)
    if not result.trainer.is_global_zero:
        return {}
    return {"finetune_examples": len(examples), "final_loss": result.final_loss,
            "train_s": result.speed()["train_s"], "resumed": result.resumed,
            "loss_csv": result.loss_csv("loss")}


def finetune_stage(prompts: Path, cfg: TeacherConfig, out: Path, logs: Path, where: str,
                   table: Optional[pa.Table] = None) -> dict:
    """The `teacher` stage with `finetune_steps` > 0: the source fine-tuned on the answers of the SFT prompt
    set `prompts` (or `table`, one domain's part of it), saved to `out`. A GGUF source is dequantized into a
    temporary folder beside `out` first (deleted afterwards: only the fine-tuned teacher is an output; the
    conversion is deterministic, so a resumed run finds the same source fingerprint)."""
    if not is_gguf_source(cfg.source):
        folder = resolve_model_source(cfg.source)
        return finetune_teacher(folder, prompts, cfg, out, logs, where, str(folder), table)
    path = resolve_gguf(cfg.source, f"{where}: teacher.source")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-source-") as tmp:
        convert_gguf(path, Path(tmp))
        return finetune_teacher(Path(tmp), prompts, cfg, out, logs, where, str(path), table)
