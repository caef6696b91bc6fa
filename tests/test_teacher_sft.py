"""Stages `teacher`, `sft_data`, `sft` on a tiny config, and the shared training loop's determinism."""

import json

import pytest
import torch
import yaml

from offline_opd.models.toy import build_char_tokenizer
from offline_opd.stages import prepare
from offline_opd.stages import sft
from offline_opd.stages import sft_data
from offline_opd.contract import shards, tables
from offline_opd.stages import teacher
from offline_opd.tasks import addition as toy_task
from offline_opd.provenance.fingerprint import model_fingerprint, tokenizer_fingerprint
from offline_opd.models.loading import REF_FILE, ModelPathError, resolve_model_source
from offline_opd.provenance.record import read_provenance
from offline_opd.contract.prompts import read_prompts
from tests import tiny_models

TASK = {"kind": "addition", "digits": 3, "n_sft": 60, "n_opd": 8, "n_eval": 8, "seed": 0, "prompt_file": None,
        "gap": None, "gap_prompts": None, "style": "columns"}
TEACHER = {**yaml.safe_load((tiny_models.REPO / "params.yaml").read_text())["teacher"],
           "source": "scratch", "hidden_size": 48, "num_layers": 2, "num_heads": 2, "intermediate_size": 96,
           "max_steps": 4, "batch_size": 16, "lr": 3.0e-3, "warmup_frac": 0.25, "seed": 0,
           "checkpoint_every_n_steps": 2}
SFT_DATA = {"backend": "hf", "batch_size": 32, "dtype": "float32", "max_model_len": 256, "kv_cache_gib": 1.0,
            "cluster": tiny_models.LOCAL_CLUSTER,
            "max_new_tokens": 12, "temperature": 0.0, "rows_per_shard": 25,
            "seed": 0, "n_prompts": None}
SFT = {**{k: v for k, v in TEACHER.items() if k not in ("holdout", "eval_batch_size", "domains", "finetune_steps")},
       "hidden_size": 16, "num_layers": 1, "intermediate_size": 32, "prune_to_layers": None}


def write_params(folder, **sections):
    folder.mkdir(parents=True, exist_ok=True)
    params = {"task": TASK, "teacher": TEACHER, "sft_data": SFT_DATA, "sft": SFT}
    for name, overrides in sections.items():
        params[name] = {**params[name], **overrides}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return ["--params", str(path), "--metrics-dir", str(folder / "metrics")]


def stage_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """prepare -> teacher -> sft_data on the tiny config, once for the module."""
    root = tmp_path_factory.mktemp("h2")
    common = write_params(root)
    prepare.main(common + ["--out", str(root / "prompts")])
    teacher.main(common + ["--prompts", str(root / "prompts/sft.parquet"), "--out", str(root / "teacher"),
                           "--plots", str(root / "plots/teacher"), "--logs", str(root / "logs/teacher")])
    sft_data.main(common + ["--teacher", str(root / "teacher"), "--prompts", str(root / "prompts/sft.parquet"),
                            "--out", str(root / "sft")])
    return root, common


def test_teacher_is_a_loadable_hf_folder_with_provenance(pipeline_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = pipeline_dir
    model = AutoModelForCausalLM.from_pretrained(root / "teacher")
    tok = AutoTokenizer.from_pretrained(root / "teacher")
    assert (root / "teacher" / "model.safetensors").exists()
    assert tok.decode(tok("12+34=")["input_ids"], skip_special_tokens=True) == "12+34="
    assert model.config.vocab_size == len(tok)
    record = read_provenance(root / "teacher")
    assert record["stage"] == "teacher" and record["source"] == "scratch"
    # one teacher's own keys, as before multi-teacher OPD: `domains` is not recorded (same provenance bytes)
    assert record["config"] == {k: v for k, v in TEACHER.items() if k != "domains"}
    assert record["model_fingerprint"] == model_fingerprint(root / "teacher")
    metrics = json.loads((root / "metrics" / "teacher.json").read_text())
    assert metrics["params"] == sum(p.numel() for p in model.parameters())
    assert 0.0 <= metrics["heldout_exact_match"] <= 1.0 and metrics["heldout_n"] == 6
    assert metrics["final_loss"] > 0 and metrics["wall_s"] > 0
    curve = (root / "plots/teacher/loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == TEACHER["max_steps"] + 1


def test_sft_data_parts_carry_the_teacher(pipeline_dir):
    root, common = pipeline_dir
    parts = shards.list_parts(root / "sft")
    assert [p.name for p in parts] == [shards.part_name(i) for i in range(3)]   # 60 prompts / 25 per part
    info = shards.open_shard(parts[0], "sft_data", tables.SFT_SCHEMA)
    assert info.meta["teacher_fingerprint"] == model_fingerprint(root / "teacher")
    assert info.meta["tokenizer_fingerprint"] == tokenizer_fingerprint(root / "teacher")
    row = next(shards.iter_row_groups(info)).to_pylist()[0]
    tok = build_char_tokenizer()
    assert row["input_ids"][:row["prompt_len"]] == tok(row["prompt"])["input_ids"]
    response_ids = row["input_ids"][row["prompt_len"]:]
    assert 1 <= len(response_ids) <= SFT_DATA["max_new_tokens"]
    assert tok.decode(response_ids, skip_special_tokens=True) == row["response"]
    mtimes = [p.stat().st_mtime_ns for p in parts]
    sft_data.main(common + ["--teacher", str(root / "teacher"), "--prompts", str(root / "prompts/sft.parquet"),
                            "--out", str(root / "sft")])
    assert json.loads((root / "metrics" / "sft_data.json").read_text())["parts_written"] == 0   # resumed: all done
    assert [p.stat().st_mtime_ns for p in parts] == mtimes


def test_n_prompts_answers_only_the_first_prompts_and_refuses_more_than_there_are(pipeline_dir, tmp_path, capsys):
    """sft_data.n_prompts is π_ref's SFT budget: the first n SFT prompts answered, the rest never generated."""
    root, _ = pipeline_dir
    argv = ["--teacher", str(root / "teacher"), "--prompts", str(root / "prompts/sft.parquet")]
    sft_data.main(write_params(tmp_path / "p", sft_data={"n_prompts": 30}) + argv + ["--out", str(tmp_path / "sft")])
    rows = [r for p in shards.list_parts(tmp_path / "sft")
            for g in shards.iter_row_groups(shards.open_shard(p, "sft_data")) for r in g.to_pylist()]
    first = read_prompts(root / "prompts/sft.parquet").column("prompt_id").to_pylist()[:30]
    assert [r["prompt_id"] for r in rows] == first
    assert len(shards.list_parts(tmp_path / "sft")) == 2   # 30 prompts / 25 per part

    def config(folder):
        return json.loads(shards.read_meta(shards.list_parts(folder)[0])["config"])

    assert config(tmp_path / "sft")["n_prompts"] == 30
    assert "n_prompts" not in config(root / "sft")   # null: the footers of before the key existed
    err = stage_error(capsys, sft_data.main, write_params(tmp_path / "q", sft_data={"n_prompts": 61}) + argv +
                      ["--out", str(tmp_path / "sft2")])
    assert "sft_data.n_prompts: 61 is more than the 60 prompts" in err


def test_sft_trains_pi_ref_with_teacher_provenance(pipeline_dir):
    from transformers import AutoModelForCausalLM

    root, common = pipeline_dir
    sft.main(common + ["--data", str(root / "sft"), "--teacher", str(root / "teacher"),
                       "--out", str(root / "student"), "--plots", str(root / "plots/sft"),
                       "--logs", str(root / "logs/sft")])
    model = AutoModelForCausalLM.from_pretrained(root / "student")
    record = read_provenance(root / "student")
    assert record["sft_teacher_fingerprint"] == model_fingerprint(root / "teacher")
    assert record["sft_data_files"] == [p.name for p in shards.list_parts(root / "sft")]
    assert record["tokenizer_fingerprint"] == tokenizer_fingerprint(root / "teacher")
    metrics = json.loads((root / "metrics" / "sft.json").read_text())
    assert metrics["params"] == sum(p.numel() for p in model.parameters()) <= metrics["teacher_params"] / 4
    assert metrics["examples"] == TASK["n_sft"]


def test_sft_refuses_a_student_base_with_another_tokenizer(pipeline_dir, tmp_path, capsys):
    root, _ = pipeline_dir
    base = tiny_models.swap_token_ids(tiny_models.save_model(tmp_path / "base"))   # same chars, other ids
    argv = write_params(tmp_path, sft={"source": str(base)})
    err = stage_error(capsys, sft.main, argv + ["--data", str(root / "sft"), "--teacher", str(root / "teacher"),
                                               "--out", str(tmp_path / "student"), "--plots", str(tmp_path),
                                               "--logs", str(tmp_path / "logs")])
    assert "tokenizer mismatch" in err and tokenizer_fingerprint(base) in err
    assert not (tmp_path / "student").exists()


def test_sft_refuses_parts_from_two_teachers_and_too_big_students(pipeline_dir, tmp_path, capsys):
    root, common = pipeline_dir
    mixed = tmp_path / "sft"
    mixed.mkdir()
    for i, part in enumerate(shards.list_parts(root / "sft")):
        info = shards.open_shard(part, "sft_data")
        table = next(shards.iter_row_groups(info))
        meta = {**info.meta, "teacher_fingerprint": "someotherteacher"} if i == 1 else info.meta
        shards.write_shard(mixed / part.name, table, meta, tables.SFT_SCHEMA)
    args = ["--teacher", str(root / "teacher"), "--out", str(tmp_path / "student"), "--plots", str(tmp_path),
            "--logs", str(tmp_path / "logs")]
    err = stage_error(capsys, sft.main, common + ["--data", str(mixed)] + args)
    assert "someotherteacher" in err and "part-00001.parquet" in err
    big = write_params(tmp_path / "big", sft={"hidden_size": 48, "num_layers": 2, "intermediate_size": 96})
    err = stage_error(capsys, sft.main, big + ["--data", str(root / "sft")] + args)
    assert "more than a quarter" in err
    assert not (tmp_path / "student").exists()


def test_teacher_from_a_local_model_is_referenced_not_copied(tmp_path):
    base = tiny_models.save_model(tmp_path / "real")
    argv = write_params(tmp_path, teacher={"source": str(base)})
    teacher.main(argv + ["--prompts", str(tmp_path / "unused.parquet"), "--out", str(tmp_path / "teacher"),
                         "--plots", str(tmp_path / "plots"), "--logs", str(tmp_path / "logs")])
    assert json.loads((tmp_path / "teacher" / REF_FILE).read_text())["path"] == str(base.resolve())
    # Both declared in dvc.yaml: the curve has no rows, the logs folder is empty.
    assert (tmp_path / "plots" / "loss.csv").read_text() == "step,loss\n"
    assert (tmp_path / "logs").is_dir() and not list((tmp_path / "logs").iterdir())
    assert not list((tmp_path / "teacher").glob("*.safetensors"))
    record = read_provenance(tmp_path / "teacher")
    assert record["model_fingerprint"] == model_fingerprint(base) and record["source"] == str(base)


def test_missing_model_path_is_a_model_path_error(tmp_path, capsys):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelPathError, match=str(missing)):
        resolve_model_source(str(missing))
    argv = write_params(tmp_path, teacher={"source": str(missing)})
    err = stage_error(capsys, teacher.main, argv + ["--prompts", "x.parquet", "--out", str(tmp_path / "t")])
    assert str(missing) in err


def test_scratch_teacher_refuses_prompts_that_are_not_the_toy_task(tmp_path, capsys):
    prompts = tmp_path / "prompt_files" / "mine.jsonl"
    prompts.parent.mkdir(parents=True)
    prompts.write_text("\n".join(json.dumps({"prompt": f"What is {i} apples?"}) for i in range(40)))
    argv = write_params(tmp_path, task={"kind": "file", "prompt_file": str(prompts), "n_sft": 20, "n_opd": 10,
                                        "n_eval": 10})
    prepare.main(argv + ["--out", str(tmp_path / "prompts")])
    err = stage_error(capsys, teacher.main, argv + ["--prompts", str(tmp_path / "prompts/sft.parquet"),
                                                    "--out", str(tmp_path / "teacher"), "--plots", str(tmp_path)])
    assert "no 'reference' response" in err and "teacher.source" in err


def test_sft_from_a_pretrained_student_trains_and_keeps_its_dtype(pipeline_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, _ = pipeline_dir
    base = tiny_models.save_model(tmp_path / "base")      # the teacher's toy tokenizer, random weights
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(base)   # stored in bf16
    argv = write_params(tmp_path, sft={"source": str(base), "max_steps": 8, "lr": 1e-2, "warmup_frac": 0.0})
    metrics = sft.main(argv + ["--data", str(root / "sft"), "--teacher", str(root / "teacher"),
                               "--out", str(tmp_path / "student"), "--plots", str(tmp_path / "plots"),
                               "--logs", str(tmp_path / "logs")])
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "student" / "model.safetensors")
    assert before.keys() == after.keys()
    assert {t.dtype for t in after.values()} == {torch.bfloat16}              # trained in fp32, saved as stored
    assert json.loads((tmp_path / "student" / "config.json").read_text())["dtype"] == "bfloat16"
    assert any(not torch.equal(before[k], after[k]) for k in before)
    curve = [float(line.split(",")[1]) for line in (tmp_path / "plots" / "loss.csv").read_text().splitlines()[1:]]
    assert len(curve) == 8 and curve[-1] < curve[0]
    assert read_provenance(tmp_path / "student")["source"] == str(base)
    assert metrics["params"] == sum(t.numel() for t in after.values())


def test_sft_from_the_teacher_pruned_to_fewer_layers(pipeline_dir, tmp_path):
    """`sft.source: teacher` + `prune_to_layers`: the student keeps the teacher's tokenizer and 1 of its 2 layers."""
    root, _ = pipeline_dir
    argv = write_params(tmp_path, sft={"source": "teacher", "prune_to_layers": 1, "max_steps": 2})
    metrics = sft.main(argv + ["--data", str(root / "sft"), "--teacher", str(root / "teacher"),
                               "--out", str(tmp_path / "student"), "--plots", str(tmp_path / "plots"),
                               "--logs", str(tmp_path / "logs")])
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and metrics["params"] < metrics["teacher_params"]
    assert tokenizer_fingerprint(tmp_path / "student") == tokenizer_fingerprint(root / "teacher")
    assert read_provenance(tmp_path / "student")["source"] == str((root / "teacher").resolve())


def answer_prompts(tmp_path):
    """A file task whose prompts carry answers, prepared: the SFT split a fine-tuned teacher trains on."""
    prompts = tmp_path / "prompt_files" / "sums.jsonl"
    prompts.parent.mkdir(parents=True)
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                               for a in range(8) for b in range(5)))
    task = {"kind": "file", "prompt_file": str(prompts), "n_sft": 24, "n_opd": 8, "n_eval": 8}
    prepare.main(write_params(tmp_path, task=task) + ["--out", str(tmp_path / "prompts")])
    return task


def answer_loss(model_dir, table) -> float:
    """Mean cross-entropy of the answers (+ eos) given their prompts: the fine-tuning objective."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline_opd.train.finetune import answer_examples

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    losses = []
    for e in answer_examples(tok, table.column("prompt").to_pylist(), table.column("answer").to_pylist(), "t"):
        ids = torch.tensor([e.input_ids])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        target = ids[0, 1:]
        losses.append(-logp[torch.arange(len(target)), target][e.prompt_len - 1:].mean().item())
    return sum(losses) / len(losses)


def run_teacher(tmp_path, task, **overrides) -> dict:
    argv = write_params(tmp_path, task=task, teacher=overrides)
    return teacher.main(argv + ["--prompts", str(tmp_path / "prompts/sft.parquet"), "--out", str(tmp_path / "teacher"),
                                "--plots", str(tmp_path / "plots"), "--logs", str(tmp_path / "logs")])


def test_finetune_steps_zero_uses_the_source_as_it_is(tmp_path):
    base = tiny_models.save_model(tmp_path / "real")
    run_teacher(tmp_path, answer_prompts(tmp_path), source=str(base), finetune_steps=0)
    assert model_fingerprint(tmp_path / "teacher") == model_fingerprint(base)
    assert "finetuned_from_fingerprint" not in read_provenance(tmp_path / "teacher")


def test_finetuned_teacher_learns_the_answers_and_is_what_downstream_sees(tmp_path):
    """finetune_steps > 0: new weights, lower loss on the SFT answers, and sft_data's parts record the
    fine-tuned teacher (the fingerprint chain starts at it, not at its source)."""
    from safetensors.torch import load_file

    base = tiny_models.save_model(tmp_path / "real")
    task = answer_prompts(tmp_path)
    metrics = run_teacher(tmp_path, task, source=str(base), finetune_steps=12, lr=1e-2, warmup_frac=0.0,
                          batch_size=8)
    out = tmp_path / "teacher"
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    sft_table = read_prompts(tmp_path / "prompts/sft.parquet")
    assert answer_loss(out, sft_table) < answer_loss(base, sft_table)
    record = read_provenance(out)
    assert record["finetuned_from_fingerprint"] == model_fingerprint(base) != model_fingerprint(out)
    assert record["model_fingerprint"] == model_fingerprint(out) and record["source"] == str(base.resolve())
    assert metrics["finetune_examples"] == 24 and metrics["params"] == sum(t.numel() for t in after.values())
    assert len((tmp_path / "plots" / "loss.csv").read_text().splitlines()) == 1 + 12
    argv = write_params(tmp_path, task=task)
    sft_data.main(argv + ["--teacher", str(out), "--prompts", str(tmp_path / "prompts/sft.parquet"),
                          "--out", str(tmp_path / "sft")])
    parts = shards.list_parts(tmp_path / "sft")
    assert parts and {shards.open_shard(p, "sft_data").meta["teacher_fingerprint"] for p in parts} == \
        {model_fingerprint(out)}


def test_finetune_needs_answers_and_a_real_source(tmp_path, capsys):
    base = tiny_models.save_model(tmp_path / "real")
    prompts = tmp_path / "prompt_files" / "mine.jsonl"
    prompts.parent.mkdir(parents=True)
    prompts.write_text("\n".join(json.dumps({"prompt": f"What is {i} apples?"}) for i in range(40)))
    task = {"kind": "file", "prompt_file": str(prompts), "n_sft": 20, "n_opd": 10, "n_eval": 10}
    prepare.main(write_params(tmp_path, task=task) + ["--out", str(tmp_path / "prompts")])
    argv = write_params(tmp_path, task=task, teacher={"source": str(base), "finetune_steps": 2})
    err = stage_error(capsys, teacher.main, argv + ["--prompts", str(tmp_path / "prompts/sft.parquet"),
                                                    "--out", str(tmp_path / "teacher"), "--logs", str(tmp_path / "l")])
    assert "has no 'answer'" in err and "teacher.finetune_steps" in err
    argv = write_params(tmp_path, task=task, teacher={"source": "scratch", "finetune_steps": 2})
    err = stage_error(capsys, teacher.main, argv + ["--prompts", str(tmp_path / "prompts/sft.parquet"),
                                                    "--out", str(tmp_path / "teacher")])
    assert "teacher.finetune_steps" in err and "scratch" in err
