"""Model folders a stage wrote, changed in place afterwards, are refused where they are read.

Each edit keeps the folder loadable (so nothing else would notice), and is made with and without its
access and modification times put back, the way `cp -p`, `rsync -t` or `touch -r` leave a file: the
fingerprint cache keys on the ctime too, which nothing but the clock can set back. The refusal names the
folder and the file that changed; the project is untouched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from offline_opd.provenance.fingerprint import model_fingerprint
from tests.battery.project import flip_byte, refuse, run, times_kept, truncate

# Which stage wrote each folder (named in the refusal) and the edits that keep it loadable.
WRITER = {"teacher": "teacher", "student_sft": "sft", "student_opd": "distill"}


def edit(folder: Path, what: str, keep_times: bool) -> str:
    """Change one file of a model folder in place, keeping its size; return the file's name."""
    if what == "weights":
        path = folder / "model.safetensors"
        flip_byte(path, path.stat().st_size - 5, keep_times)
    elif what == "tokenizer":   # '0' and '1' trade ids: same text, other ids, same file size
        path = folder / "tokenizer.json"
        with times_kept(path, keep_times):
            text = path.read_text()
            a, b = re.search(r'"0": (\d+)', text).group(1), re.search(r'"1": (\d+)', text).group(1)
            path.write_text(text.replace(f'"0": {a},', '"0": @,').replace(f'"1": {b},', f'"1": {a},')
                            .replace('"0": @,', f'"0": {b},'))
    elif what == "config":
        path = folder / "config.json"
        with times_kept(path, keep_times):
            path.write_text(path.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    elif what == "tokenizer config":
        path = folder / "tokenizer_config.json"
        with times_kept(path, keep_times):
            path.write_text(path.read_text().replace('"model_max_length": 256', '"model_max_length": 255'))
    elif what == "chat template":
        path = folder / "chat_template.jinja"
        path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    else:
        raise ValueError(what)
    return path.name


CASES = [  # (folder, edit, times kept, the stage that reads it)
    ("teacher", "weights", True, "sft_data"), ("teacher", "weights", False, "teacher_topk"),
    ("teacher", "tokenizer", True, "sft"), ("teacher", "tokenizer", False, "evaluate"),
    ("teacher", "config", True, "teacher_topk"), ("teacher", "config", False, "sft_data"),
    ("teacher", "tokenizer config", True, "evaluate"), ("teacher", "tokenizer config", False, "sft"),
    ("teacher", "chat template", False, "sft_data"),
    ("student_sft", "weights", True, "rollouts"), ("student_sft", "weights", False, "distill"),
    ("student_sft", "tokenizer", True, "distill"), ("student_sft", "tokenizer", False, "rollouts"),
    ("student_sft", "config", True, "evaluate"), ("student_sft", "config", False, "distill"),
    ("student_sft", "tokenizer config", True, "rollouts"), ("student_sft", "tokenizer config", False, "evaluate"),
    ("student_sft", "chat template", False, "distill"),
    ("student_opd", "weights", True, "evaluate"), ("student_opd", "config", True, "evaluate"),
    ("student_opd", "chat template", False, "evaluate"),
]


@pytest.mark.parametrize("folder,what,keep_times,reader", CASES,
                         ids=[f"{f}-{w}-{'times kept' if k else 'touched'}-{r}" for f, w, k, r in CASES])
def test_a_model_changed_in_place_is_refused_where_it_is_read(project, capsys, folder, what, keep_times, reader):
    path = project / "data" / "models" / folder
    model_fingerprint(path)  # the cache holds the folder as written: only the ctime can tell it changed
    name = edit(path, what, keep_times)
    line = refuse(project, reader, capsys)
    if (folder, what, reader) == ("student_sft", "tokenizer", "distill"):   # structural, reported first
        assert "tokenizer mismatch" in line and f"data/models/{folder}" in line, line
        return
    assert f"data/models/{folder}: {name} changed after the `{WRITER[folder]}` stage wrote it" in line, line


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
@pytest.mark.parametrize("folder,reader", [("teacher", "sft_data"), ("student_sft", "distill")])
def test_a_damaged_provenance_record_is_named(project, capsys, folder, reader, damage):
    path = project / "data" / "models" / folder / "opd_provenance.json"
    if damage == "truncated":
        truncate(path)
    else:
        path.write_text(path.read_text().replace('"stage":', '"stahe":'))
    assert "opd_provenance.json" in refuse(project, reader, capsys)


@pytest.mark.parametrize("folder,reader", [("student_opd", "evaluate"), ("student_sft", "rollouts")])
def test_truncated_weights_are_named(project, capsys, folder, reader):
    truncate(project / "data" / "models" / folder / "model.safetensors")
    assert "model.safetensors" in refuse(project, reader, capsys)


def test_a_corrupt_fingerprint_cache_only_costs_a_recomputation(project, fingerprint_cache):
    cache = fingerprint_cache / "fingerprints.json"
    model_fingerprint(project / "data" / "models" / "teacher")
    cache.write_text(cache.read_text()[:40])
    assert run(project, "sft_data")["parts_written"] == 0
    assert json.loads(cache.read_text())  # rewritten whole
