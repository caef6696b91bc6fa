"""Tasks and verifiers: the built-in verifiers, a user's own verifier plugged in by name, and the task interface."""

from __future__ import annotations

import sys

import pytest

from offline_opd.config import TaskConfig
from offline_opd.errors import UserError
from offline_opd.contract.prompts import PROMPT_SCHEMA
from offline_opd.tasks.task import make_task
from offline_opd.tasks.verifiers import accuracy, exact, load_verifier, numeric


@pytest.mark.parametrize("response, answer, ok", [
    ("4+4+0=08 6+9+0=15 8+3+1=12 =1258", "1258", True),
    ("4+4+0=08 6+9+0=15 8+3+1=12 =1248", "1258", False),   # wrong final answer
    ("4+4+0=08 6+9+0=15 8+3+1=12 =12a58", "1258", False),  # garbled
    ("4+4+0=08 6+9+0=15 8+3+1=12 =", "1258", False),       # truncated: no final number
    ("", "1258", False),
    ("1258", "1258", True),                                # bare number, no '='
    ("so she has 40 + 2 apples.\n#### 42", "Natalia sold 48/2 = 24 clips ... #### 42", True),
    ("#### 1,000", "1000", True),
    ("The answer is 7.5.", "7.50", True),
    ("x = 41", "42", False),
    ("capital = Paris", "Paris", True),
    ("capital = Rome", "Paris", False),
])
def test_numeric_verifier(response, answer, ok):
    assert numeric(response, answer) is ok


def test_exact_verifier_compares_final_segments():
    assert exact("so the capital = Paris", "Paris") and not exact("so the capital = Paris.", "Paris")
    assert exact("#### 42", "Natalia ... #### 42") and not exact("#### 42.0", "42")


def test_accuracy_counts_accepted_responses():
    assert accuracy(numeric, ["4+4+0=08 =8", "=19", "no answer"], ["8", "18", "3"]) == pytest.approx(1 / 3)


def test_a_users_own_verifier_plugs_in_by_module_and_function(tmp_path, monkeypatch):
    """A verifier in the user's own file, named in params as module:function; the package is not edited."""
    (tmp_path / "my_checks.py").write_text(
        "def shouts(response: str, answer: str) -> bool:\n"
        "    return response.strip() == answer.upper()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_checks", raising=False)
    verify = load_verifier("my_checks:shouts")
    assert verify("PARIS", "paris") and not verify("Paris", "paris")
    assert accuracy(verify, ["PARIS", "rome", "ROME"], ["paris", "rome", "rome"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("spec, message", [
    ("numerical", "not a verifier; use numeric, exact or module:function"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("json:no_such_function", "module 'json' has no function 'no_such_function'"),
])
def test_bad_verifier_names_the_key_and_the_fix(spec, message):
    with pytest.raises(UserError, match="params.yaml: evaluate.verifier") as info:
        load_verifier(spec)
    assert message in str(info.value)


def test_both_tasks_give_the_prompt_contract(tmp_path):
    base = dict(digits=2, n_sft=6, n_opd=3, n_eval=3, seed=0, gap=None, gap_prompts=None, style="columns")
    params = tmp_path / "params.yaml"
    toy = make_task(TaskConfig(kind="addition", prompt_file=None, **base), params).splits()
    (tmp_path / "prompt_files").mkdir()
    (tmp_path / "prompt_files/p.jsonl").write_text("\n".join(f'{{"prompt": "q{i}", "answer": "{i}"}}' for i in range(12)))
    mine = make_task(TaskConfig(kind="file", prompt_file=str(tmp_path / "prompt_files/p.jsonl"), **base), params).splits()
    for splits in (toy, mine):
        assert list(splits) == ["sft", "opd", "eval"]
        assert all(t.schema == PROMPT_SCHEMA for t in splits.values())
        assert [t.num_rows for t in splits.values()] == [6, 3, 3]
    assert all(r is not None for r in toy["sft"].column("reference").to_pylist())
    assert mine["sft"].column("reference").null_count == 6


@pytest.mark.parametrize("prompt,padded", [("431+146=", "1+6+0=07 3+4+0=07 4+1+0=05 =0577"),
                                           ("297+808=", "7+8+0=15 9+0+1=10 2+8+1=11 =1105"),
                                           ("5+7=", "5+7+0=12 =12"), ("3+4=", "3+4+0=07 =07"),
                                           ("5+123=", "5+3+0=08 0+2+0=02 0+1+0=01 =0128")])
def test_padded_traces_read_a_carry_out_the_way_they_read_none(prompt, padded):
    """The answer is one digit wider than the operands, so its first two digits are always the last column's
    sum; the steps are the columns style's, and the numeric verifier takes the padded answer by value."""
    from offline_opd.tasks.addition import solve

    assert solve(prompt, "padded") == padded
    assert solve(prompt, "padded").rpartition(" =")[0] == solve(prompt).rpartition(" =")[0]
    a, b = prompt[:-1].split("+")
    assert numeric(solve(prompt, "padded"), str(int(a) + int(b)))


def test_task_style_writes_the_references_and_keeps_the_prompts(tmp_path):
    base = dict(digits=3, n_sft=40, n_opd=4, n_eval=4, seed=0, gap=None, gap_prompts=None, prompt_file=None, kind="addition")
    params = tmp_path / "params.yaml"
    columns = make_task(TaskConfig(style="columns", **base), params).splits()["sft"].to_pylist()
    padded = make_task(TaskConfig(style="padded", **base), params).splits()["sft"].to_pylist()
    assert [r["prompt"] for r in padded] == [r["prompt"] for r in columns]
    assert [r["answer"] for r in padded] == [r["answer"] for r in columns]
    assert all(r["reference"].endswith(" =" + r["answer"].zfill(4)) for r in padded)
    assert any(len(r["answer"]) == 3 for r in padded) and any(len(r["answer"]) == 4 for r in padded)
