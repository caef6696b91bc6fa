"""The `sft_data` shards as `sft`'s training examples: every part of one run, from one teacher and tokenizer."""

from __future__ import annotations

from pathlib import Path

from offline_opd.contract import shards
from offline_opd.contract.tables import SFT_SCHEMA
from offline_opd.errors import UserError
from offline_opd.train.examples import Example


def read_sft_parts(folder: Path) -> tuple[list[Example], list[shards.ShardInfo]]:
    """All parts of one complete sft_data run, checked to come from a single teacher and tokenizer."""
    infos = shards.open_run(folder, "sft_data", SFT_SCHEMA,
                            agree=("teacher_fingerprint", "tokenizer_fingerprint", "run_key"))
    examples = []
    for info in infos:
        for group in shards.iter_row_groups(info, columns=["input_ids", "prompt_len"]):
            for ids, plen in zip(group.column("input_ids").to_pylist(), group.column("prompt_len").to_pylist()):
                if len(ids) > plen:
                    examples.append(Example(ids, plen))
    if not examples:
        raise UserError(f"{folder}: every response is empty; nothing to fine-tune on")
    return examples, infos
