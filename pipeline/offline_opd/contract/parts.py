"""What the two generating stages (`sft_data`, `rollouts`) share: a prompt set cut into resumable parts.

Both tokenize their prompts with the generating model's own tokenizer, key the run on the stage's
settings, that model's fingerprint and the prompts (so new settings, a new model or new prompts redo
every part), cut the prompts into parts of whole prompts, and stamp every part with the same footer
provenance. Only the model's role (`teacher` or `policy`, which names its footer fields) and the
number of prompts per part differ. Under multi-teacher OPD (`sft_data` with a teacher per domain,
pipeline/offline_opd/provenance/teachers.py) the "model" is the set of domain teachers: its set fingerprint,
their shared tokenizer, the footer's `teachers` mapping, and each prompt's domain.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from offline_opd.contract import shards
from offline_opd.config import GenerationConfig, run_settings
from offline_opd.errors import UserError
from offline_opd.provenance.teachers import Teachers
from offline_opd.backends.engine import engine_footer
from offline_opd.models.loading import load_tokenizer
from offline_opd.contract.prompts import encode_prompt, prompt_domains, read_prompts
from offline_opd.contract.footers import FOOTERS, RolloutsFooter, SftDataFooter

ROLES = {"sft_data": "teacher", "rollouts": "policy"}   # which model generates a stage's parts


@dataclass(frozen=True)
class PromptParts:
    """The prompts of one run, their token ids, and this process's share of the parts still to write.

    Pickled to every Ray actor of the stage (offline_opd.backends.pool), so it holds no tokenizer: a worker
    decodes with its engine's own, loaded from the same model folder."""

    prompt_ids: list[str]
    texts: list[str]
    answers: list[str | None]
    tokens: list[list[int]]
    per_part: int              # whole prompts per part
    footer: RolloutsFooter | SftDataFooter   # the footer every part carries
    pending: shards.PartPlan   # this process's part indices still to write, and the parts they replace
    skipped: int               # this process's parts already complete (resumed)
    domains: list[str] | None = None   # each prompt's domain, under multi-teacher OPD only

    def part_domains(self, part: int) -> list[str] | None:
        """The domains of part `part`'s prompts (None: one teacher)."""
        return None if self.domains is None else self.domains[self.bounds(part)]

    @property
    def todo(self) -> list[int]:
        return self.pending.todo

    def bounds(self, part: int) -> slice:
        """The prompts of part `part`."""
        return slice(part * self.per_part, min((part + 1) * self.per_part, len(self.tokens)))


def plan_parts(kind: str, model: Path | Teachers, prompts_path: Path, out: Path, cfg: GenerationConfig,
               per_part: int, shard: tuple[int, int], size_key: str, limit: int | None = None) -> PromptParts:
    """Read and tokenize the prompts and list the parts left to write (and the stale parts they replace,
    removed only once a new part is ready: `shards.PartPlan`).

    `kind` ("sft_data": the teacher generates, or "rollouts": the policy) names the model's run-key input
    and footer fields (`teacher_fingerprint` or `policy_fingerprint`, and its path); `size_key` is the
    `task` key to raise when there are no prompts. `model` is a model folder or a `Teachers` set (sft_data).
    `limit` keeps only the first `limit` prompts (`sft_data.n_prompts`); more than the file holds is refused.
    """
    role = ROLES[kind]
    teachers = model if isinstance(model, Teachers) else Teachers(model, None)
    teachers.check_unchanged()  # an edited model is named as such before anything is computed from it
    table = read_prompts(prompts_path)
    if table.num_rows == 0:
        raise UserError(f"{prompts_path}: no prompts; rerun `dvc repro prepare` with task.{size_key} > 0")
    if limit is not None:
        if limit > table.num_rows:
            raise UserError(f"{kind}.n_prompts: {limit} is more than the {table.num_rows} prompts in {prompts_path}; "
                            f"lower it, raise task.{size_key}, or set it to null (all)")
        table = table.slice(0, limit)
    prompt_ids, texts, answers = (table.column(c).to_pylist() for c in ("prompt_id", "prompt", "answer"))
    domains = prompt_domains(table) if teachers.multi else None
    teachers.check_domains(domains, str(prompts_path))
    tokenizer = load_tokenizer(teachers.first)
    tokens = [encode_prompt(tokenizer, t, f"{prompts_path}: prompt {pid}") for pid, t in zip(prompt_ids, texts)]
    fingerprint = teachers.fingerprint
    digest = hashlib.sha256(json.dumps([prompt_ids, texts] + ([domains] if domains else [])).encode()).hexdigest()
    key = shards.make_run_key(config=run_settings(cfg), prompts=digest, **{role: fingerprint})
    n_parts = math.ceil(len(tokens) / per_part)
    out.mkdir(parents=True, exist_ok=True)
    pending = shards.pending_parts(out, kind, key, n_parts, shard)
    footer = FOOTERS[kind](
        run_key=key, num_parts=n_parts, **{f"{role}_fingerprint": fingerprint, f"{role}_path": str(teachers.root)},
        tokenizer_fingerprint=teachers.tokenizer_fingerprint(), prompts_path=str(prompts_path),
        sampling_temperature=cfg.temperature, **engine_footer(cfg), config=run_settings(cfg),
        **({"teachers": teachers.fingerprints} if teachers.multi else {}))
    skipped = len(range(shard[0], n_parts, shard[1])) - len(pending.todo)
    return PromptParts(prompt_ids, texts, answers, tokens, per_part, footer, pending, skipped, domains)
