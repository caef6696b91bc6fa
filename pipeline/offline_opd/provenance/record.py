"""The `opd_provenance.json` beside every model a stage writes: which model, tokenizer, data and settings.

Stages write it with `write_provenance`; `distill`'s consistency check and `opd-inspect` read it
with `read_provenance`, which names the file and the stage to rerun when it is missing or
incomplete, so a model folder with no history can never silently pass for π_ref. Every stage that
loads a model a stage wrote first calls `check_unchanged`: a folder edited after its stage wrote it
(weights, config, tokenizer or chat template; with or without its modification times put back) is
refused by the file that changed, instead of silently standing in for the model the record describes.
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
    from offline_opd.provenance.fingerprint import model_file_digests, model_fingerprint, tokenizer_fingerprint

    record = {"stage": stage, "model_fingerprint": model_fingerprint(model_dir),
              "tokenizer_fingerprint": tokenizer_fingerprint(model_dir), "model_files": model_file_digests(model_dir),
              "source": source, "config": config, **extra}
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


class ModelChangedError(ProvenanceError):
    """A model folder no longer holds what its stage wrote (an edit in place, a partial restore)."""


def check_unchanged(model_dir: Path | str) -> None:
    """Refuse a model folder whose files changed after the stage that wrote it recorded them.

    Folders without a provenance record (a user's own model, a test fixture) have nothing to be
    checked against and pass. The fingerprint is cached by file stats including the ctime, so this
    costs a `stat` per file unless something changed; then the changed file is named from the
    per-file digests the record holds (records written before those existed name the folder only).
    """
    from offline_opd.models.loading import resolve_model_dir
    from offline_opd.provenance.fingerprint import model_file_digests, model_fingerprint

    model_dir = Path(model_dir)
    if not (model_dir / PROVENANCE_FILE).exists():
        return
    record = read_provenance(model_dir, ("stage", "model_fingerprint"))
    now = model_fingerprint(model_dir)
    if now == record["model_fingerprint"]:
        return
    before, after = record.get("model_files") or {}, model_file_digests(model_dir)
    changed = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n)) if before else []
    what = ", ".join(changed[:3]) + (" and more" if len(changed) > 3 else "") if changed else "its files"
    stage, target = record["stage"], resolve_model_dir(model_dir)
    where = str(model_dir) if target == model_dir else f"{model_dir} (a reference to {target})"
    raise ModelChangedError(
        f"{where}: {what} changed after the `{stage}` stage wrote it (its {PROVENANCE_FILE} records model "
        f"fingerprint {record['model_fingerprint']}, the folder now hashes to {now}); restore it "
        f"(`dvc checkout {model_dir}`) or rebuild it (`dvc repro --force {stage}`)")
