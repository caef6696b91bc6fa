"""The `opd_provenance.json` beside every model a stage writes: which model, tokenizer, data and settings.

Stages write it with `write_provenance`; `distill`'s consistency check and `opd-inspect` read it
with `read_provenance`, which names the file and the stage to rerun when it is missing or
incomplete, so a model folder with no history can never silently pass for π_ref.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from offline_opd.errors import UserError
from offline_opd.atomic import write_json

PROVENANCE_FILE = "opd_provenance.json"
# No timestamp: the record is part of a DVC-hashed model folder, and a rerun that reproduces the same
# weights must reproduce the same bytes, or every downstream stage reruns for nothing.
REQUIRED = ("stage", "model_fingerprint", "tokenizer_fingerprint", "source", "config")


class ProvenanceError(UserError, ValueError):
    """A model folder's provenance file is missing or incomplete. The message names the file and the fix."""


def write_provenance(model_dir: Path | str, stage: str, source: str, config: dict, **extra: Any) -> dict:
    """Fingerprint the finished model in `model_dir` and record it with the stage's settings.

    Call it on the folder as it will be published (inside `atomic_dir` is fine: fingerprints hash
    contents, not paths).
    """
    from offline_opd.provenance.fingerprint import model_fingerprint, tokenizer_fingerprint

    record = {"stage": stage, "model_fingerprint": model_fingerprint(model_dir),
              "tokenizer_fingerprint": tokenizer_fingerprint(model_dir), "source": source, "config": config,
              **extra}
    write_json(Path(model_dir) / PROVENANCE_FILE, record)
    return record


def read_provenance(model_dir: Path | str, required: tuple[str, ...] = REQUIRED) -> dict:
    """The provenance record of a model folder, checked for the keys the caller relies on."""
    path = Path(model_dir) / PROVENANCE_FILE
    if not path.exists():
        raise ProvenanceError(f"{path}: not found; {model_dir} was not written by a pipeline stage "
                              f"(or by an older version): rerun the stage that writes it (`dvc repro`)")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProvenanceError(f"{path}: not valid JSON ({exc}); rerun the stage that writes it") from exc
    missing = [k for k in required if k not in record] if isinstance(record, dict) else list(required)
    if missing:
        raise ProvenanceError(f"{path}: lacks {', '.join(missing)}; rerun the stage "
                              f"'{record.get('stage', '?') if isinstance(record, dict) else '?'}' that wrote it")
    return record
