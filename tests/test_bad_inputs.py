"""Every bad input a new user can make is one line naming `params.yaml: section.key` (or the file), exit 2.

Table-driven, stages run in-process through their real `main(argv)` (spawning a process per case is too
slow on 2 cores). Each case asserts: exit status 2, exactly one line on stderr, no traceback, the line
names the key or file, and nothing was written (no output folder, no metrics file).
"""

from __future__ import annotations

import copy
import errno
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from offline_opd.stages import distill

from offline_opd.stages import evaluate

from offline_opd.stages import prepare

from offline_opd.stages import rollouts

from offline_opd.stages import sft

from offline_opd.stages import sft_data

from offline_opd import runtime as stage

from offline_opd.stages import teacher

from offline_opd.stages import teacher_topk
from offline_opd.tasks import prompt_file
from tests.tiny_models import save_model

REPO = Path(__file__).resolve().parents[1]
CI = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())

# The stage that reads each section, and the arguments it needs besides --params/--metrics-dir (paths
# under the case folder; a config error must stop the stage before any of them is touched).
STAGES: dict[str, tuple[Callable, list[str]]] = {
    "task": (prepare.main, ["--out", "out"]),
    "teacher": (teacher.main, ["--prompts", "p.parquet", "--out", "out", "--plots", "plots"]),
    "sft_data": (sft_data.main, ["--teacher", "model", "--prompts", "p.parquet", "--out", "out"]),
    "sft": (sft.main, ["--data", "data", "--teacher", "model", "--out", "out", "--plots", "plots"]),
    "rollouts": (rollouts.main, ["--policy", "model", "--prompts", "p.parquet", "--out", "out"]),
    "teacher_topk": (teacher_topk.main, ["--teacher", "model", "--rollouts", "data", "--out", "out"]),
    "distill": (distill.main, ["--init", "model", "--shards", "data", "--out", "out", "--logs", "logs",
                               "--plots", "plots"]),
    "evaluate": (evaluate.main, ["--teacher", "model", "--ref", "model", "--student", "model",
                                 "--prompts", "p.parquet", "--metrics", "out/eval.json"]),
}

# (section, key, bad value, words the message must contain besides `params.yaml: section.key`)
BAD_VALUES = [
    ("task", "digits", 0, ">= 1"),
    ("task", "n_sft", 0, ">= 1"),
    ("task", "n_opd", -1, ">= 1"),
    ("task", "n_eval", 0, ">= 1"),
    ("task", "seed", -1, ">= 0"),
    ("task", "kind", "csv", "not one of"),
    ("task", "prompt_file", "prompt_files/x.jsonl", "ignores it"),
    ("teacher", "hidden_size", 0, ">= 1"),
    ("teacher", "num_layers", 0, ">= 1"),
    ("teacher", "num_heads", 0, ">= 1"),
    ("teacher", "num_heads", 5, "hidden_size"),
    ("teacher", "num_heads", 48, "even"),
    ("teacher", "intermediate_size", -8, ">= 1"),
    ("teacher", "max_steps", -1, ">= 1"),
    ("teacher", "adam_beta2", 1.0, "< 1"),
    ("teacher", "batch_size", 0, ">= 1"),
    ("teacher", "lr", 0, "> 0"),
    ("teacher", "lr", -3e-3, "> 0"),
    ("teacher", "warmup_frac", 1.5, "<= 1"),
    ("sft_data", "batch_size", 0, ">= 1"),
    ("sft_data", "max_new_tokens", 0, ">= 1"),
    ("sft_data", "temperature", -1.0, ">= 0"),
    ("sft_data", "rows_per_shard", 0, ">= 1"),
    ("sft_data", "backend", "tgi", "not one of"),
    ("sft", "num_heads", 3, "hidden_size"),
    ("sft", "max_steps", 0, ">= 1"),
    ("sft", "accumulate_grad_batches", 0, ">= 1"),
    ("sft", "strategy", "deepspeed", "not one of"),
    ("sft", "lr", "fast", "expected a number"),
    ("rollouts", "n_samples", 0, ">= 1"),
    ("rollouts", "temperature", -0.5, ">= 0"),
    ("rollouts", "batch_size", -4, ">= 1"),
    ("rollouts", "seed", -1, ">= 0"),
    ("rollouts", "max_perplexity", 0.5, ">= 1"),
    ("rollouts", "resample_budget", -1, ">= 0"),
    ("teacher_topk", "k", -1, ">= 0"),
    ("teacher_topk", "batch_size", 0, ">= 1"),
    ("teacher_topk", "logprob_dtype", "int8", "not one of"),
    ("distill", "max_steps", -1, ">= 1"),
    ("distill", "batch_size", 0, ">= 1"),
    ("distill", "lr", 0, "> 0"),
    ("distill", "warmup_frac", -0.1, ">= 0"),
    ("distill", "tip_fraction", 2, "<= 1"),
    ("distill", "num_workers", -1, ">= 0"),
    ("distill", "shuffle_row_groups", 0, ">= 1"),
    ("distill", "checkpoint_every_n_steps", 0, ">= 1"),
    ("distill", "grad_clip", -1, ">= 0"),
    ("distill", "weight_decay", -0.1, ">= 0"),
    ("distill", "ce_weight", -1, ">= 0"),
    ("distill", "precision", "fp8", "not one of"),
    ("distill", "kernel_backend", "cuda", "not one of"),
    ("distill", "seed", 1.5, "expected an integer"),
    ("evaluate", "batch_size", 0, ">= 1"),
    ("evaluate", "n_eval", 0, ">= 1"),
    ("evaluate", "max_new_tokens", 0, ">= 1"),
    ("evaluate", "backend", "sglang", "not one of"),
    ("sft_data", "cluster.backend", "dask", "not one of"),
    ("rollouts", "cluster.replicas", 0, ">= 1"),
    ("teacher_topk", "cluster.cpus_per_replica", -1, ">= 0"),
    ("teacher_topk", "cluster.gpus_per_replica", 2, "backend: vllm"),
    ("evaluate", "cluster.gpus_per_replica", 1.5, "whole number"),
    ("evaluate", "cluster.address", 6379, "expected a string"),
]


def run_stage(root: Path, capsys, section: str, params: dict | str | None = None,
              args: list[str] | None = None) -> str:
    """Run the stage that reads `section` in `root`; assert the one-line refusal; return that line."""
    main, stage_args = STAGES[section]
    path = root / "params.yaml"
    if params is not None:
        path.write_text(params if isinstance(params, str) else yaml.safe_dump(params))
    argv = ["--params", str(path), "--metrics-dir", str(root / "metrics")]
    argv += [str(root / a) if not a.startswith("--") else a for a in (args or stage_args)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    # Nothing partial: no output file (a resumable stage may have made its empty parts folder), no metrics.
    assert not (root / "out").exists() or not any((root / "out").rglob("*"))
    assert not (root / "metrics").exists()
    assert not list(root.glob(".out.tmp-*"))
    return lines[0]


@pytest.mark.parametrize("section,key,value,words", BAD_VALUES,
                         ids=[f"{s}.{k}={v}" for s, k, v, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_key(tmp_path, capsys, section, key, value, words):
    params = copy.deepcopy(CI)
    *outer, last = key.split(".")          # cluster.replicas: a key of the nested `cluster` mapping
    target = params[section]
    for name in outer:
        target = target[name]
    target[last] = value
    line = run_stage(tmp_path, capsys, section, params)
    assert f"params.yaml: {section}.{key}" in line and words in line, line


def test_malformed_parameter_files(tmp_path, capsys):
    params = copy.deepcopy(CI)
    del params["distill"]["lr"]
    assert "distill.lr: missing key" in run_stage(tmp_path, capsys, "distill", params)
    params = copy.deepcopy(CI)
    params["sft"]["learning_rate"] = 1e-3
    assert "sft.learning_rate: unknown key" in run_stage(tmp_path, capsys, "sft", params)
    params = copy.deepcopy(CI)
    del params["rollouts"]
    assert "missing section 'rollouts:'" in run_stage(tmp_path, capsys, "rollouts", params)
    assert "not valid YAML" in run_stage(tmp_path, capsys, "task", "task: [unclosed\n")
    (tmp_path / "params.yaml").unlink()
    assert "parameter file not found" in run_stage(tmp_path, capsys, "task")


def file_task(root: Path, name: str, content: bytes) -> dict:
    """CI params whose prompts come from `prompt_files/<name>` holding `content`."""
    (root / "prompt_files").mkdir(exist_ok=True)
    (root / "prompt_files" / name).write_bytes(content)
    params = copy.deepcopy(CI)
    params["task"].update(kind="file", prompt_file=str(root / "prompt_files" / name))
    return params


@pytest.mark.parametrize("name,content,words", [
    ("latin1.jsonl", '{"prompt": "caf\u00e9"}\n'.encode("latin-1"), "line 1 is not UTF-8"),
    ("huge.jsonl", b'{"prompt": "' + b"x" * (prompt_file.MAX_LINE_BYTES + 8) + b'"}\n', "line 1 is longer than"),
    ("broken.jsonl", b'{"prompt": "a"}\n{"prompt": \n', "line 2 is not JSON"),
    ("list.jsonl", b'["a", "b"]\n', "not an object"),
    ("prompts.csv", b"prompt\na\n", "unknown file type"),
    ("garbage.parquet", b"not parquet at all", "could not read it as parquet"),
])
def test_bad_prompt_files_name_the_file(tmp_path, capsys, name, content, words):
    line = run_stage(tmp_path, capsys, "task", file_task(tmp_path, name, content))
    assert name in line and words in line, line


def test_prompt_file_outside_the_tracked_folder_or_null(tmp_path, capsys):
    params = file_task(tmp_path, "ok.jsonl", b'{"prompt": "a"}\n')
    (tmp_path / "elsewhere.jsonl").write_text('{"prompt": "a"}\n')
    params["task"]["prompt_file"] = str(tmp_path / "elsewhere.jsonl")
    assert "outside prompt_files/" in run_stage(tmp_path, capsys, "task", params)
    params["task"]["prompt_file"] = None
    assert "task.prompt_file is null" in run_stage(tmp_path, capsys, "task", params)


@pytest.fixture
def model(tmp_path) -> Path:
    return save_model(tmp_path / "model", hidden=16, layers=1)


def test_k_larger_than_the_vocabulary(tmp_path, capsys, model):
    params = copy.deepcopy(CI)
    params["teacher_topk"]["k"] = 100_000
    line = run_stage(tmp_path, capsys, "teacher_topk", params)
    assert "teacher_topk.k: 100000 is more than the teacher's vocabulary" in line


def test_triton_kernels_without_cuda(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    params = copy.deepcopy(CI)
    params["distill"]["kernel_backend"] = "triton"
    assert "distill.kernel_backend: 'triton' needs a CUDA GPU" in run_stage(tmp_path, capsys, "distill", params)


def damage(folder: Path, what: str) -> str:
    """Damage a model folder the way an interrupted copy or a bad edit does; return the file's name."""
    if what == "weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return "safetensors"
    if what == "config":
        (folder / "config.json").write_text('{"model_type": "llama", ')
        return "config.json"
    (folder / "tokenizer.json").write_text('{"version": ')
    return "tokenizer"


@pytest.mark.parametrize("what", ["weights", "config", "tokenizer"])
def test_damaged_model_folder_reaching_a_later_stage(tmp_path, capsys, model, what, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    pytest.importorskip("safetensors")
    name = damage(model, what)
    params = copy.deepcopy(CI)
    prepare.main(["--params", str(_write(tmp_path / "p", params)), "--metrics-dir", str(tmp_path / "p" / "m"),
                  "--out", str(tmp_path / "prompts")])
    line = run_stage(tmp_path, capsys, "sft_data", params,
                     ["--teacher", "model", "--prompts", "prompts/sft.parquet", "--out", "out"])
    assert str(model) in line and name in line and "rerun the stage" in line, line


def test_damaged_teacher_source(tmp_path, capsys, model):
    damage(model, "config")
    params = copy.deepcopy(CI)
    params["teacher"]["source"] = str(model)
    assert f"{model}/config.json: does not load" in run_stage(tmp_path, capsys, "teacher", params)


def _write(folder: Path, params: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder / "params.yaml"


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys):
    def interrupted(args, cfg):
        raise KeyboardInterrupt

    _write(tmp_path, CI)
    with pytest.raises(SystemExit) as exc:
        stage.stage_main("prepare", None, lambda parser: parser.add_argument("--out", type=Path), interrupted,
                         section="task", argv=[
            "--params", str(tmp_path / "params.yaml"), "--metrics-dir", str(tmp_path / "metrics"), "--out", "x"])
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Ctrl-C" in err and "Traceback" not in err
    assert not (tmp_path / "metrics").exists()


def test_disk_full_names_the_path_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full(table, where, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(pq, "write_table", full)
    line = run_stage(tmp_path, capsys, "task", copy.deepcopy(CI))
    assert "No space left on device" in line and ".out.tmp-" in line and "sft.parquet" in line, line



@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_bad_thread_count_in_the_environment(tmp_path, capsys, monkeypatch, value):
    monkeypatch.setenv(stage.THREADS_ENV, value)
    assert f"{stage.THREADS_ENV}={value!r}" in run_stage(tmp_path, capsys, "task", copy.deepcopy(CI))


def test_thread_policy_default_and_override(monkeypatch):
    """1 torch thread unless OPD_NUM_THREADS (then OMP_NUM_THREADS) says otherwise; applied to a loaded torch."""
    before = torch.get_num_threads()
    monkeypatch.delenv(stage.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert stage.torch_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert stage.torch_threads() == 3
    monkeypatch.setenv(stage.THREADS_ENV, "2")
    try:
        assert stage.apply_thread_policy() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
