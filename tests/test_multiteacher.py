"""Multi-teacher OPD: each rollout is scored by its domain's teacher, every row says which, and the edges refuse
a row scored by the wrong one (README: Multi-teacher OPD)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from offline_opd.backends.base import SCORING_TEMPERATURE
from offline_opd.config import ConfigError, TaskConfig, load_params
from offline_opd.contract import shards
from offline_opd.contract.prompts import read_prompts, write_prompts
from offline_opd.contract.tables import teacher_format_of
from offline_opd.provenance.consistency import ConsistencyError, check_distill_inputs
from offline_opd.provenance.fingerprint import TokenizerMismatch, model_fingerprint, tokenizer_fingerprint
from offline_opd.provenance.record import write_provenance
from offline_opd.provenance.teachers import TeacherRoutingError, load_teachers, set_fingerprint, write_routes
from offline_opd.stages import distill, rollouts, teacher, teacher_topk
from offline_opd.tasks.mixture import MixtureTask
from offline_opd.tasks.verifiers import numeric
from offline_opd.tools import inspect_shards
from tests.tiny_models import LOCAL_CLUSTER, REPO, hf_engine, params_file, save_model, swap_token_ids

ENGINE = {"dtype": "float32", "max_model_len": 256, "kv_cache_gib": 1.0, "cluster": LOCAL_CLUSTER}
DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())   # every key of a section, then the tiny overrides
ROLLOUTS = {**DEFAULTS["rollouts"], "backend": "hf", "batch_size": 8, **ENGINE, "max_new_tokens": 8,
            "temperature": 1.0, "rows_per_shard": 4, "seed": 0, "n_samples": 2}
TOPK = {**DEFAULTS["teacher_topk"], "backend": "hf", "batch_size": 8, **ENGINE, "k": 3, "logprob_dtype": "float32",
        "privileged_context": None, "selection": "topk", "samples": 0, "union_student_k": 0, "seed": 0,
        "codec": "plain"}


@pytest.fixture(autouse=True)
def fingerprint_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def teacher_set(root: Path, seeds: dict[str, int]) -> Path:
    """A `teacher` stage output with one tiny teacher per domain (as the stage writes it: provenance with domain)."""
    for name, seed in seeds.items():
        save_model(root / name, seed=seed, hidden=24)
        write_provenance(root / name, "teacher", "scratch", {}, domain=name)
    write_routes(root, {name: name for name in seeds})
    return root


def mixture_prompts(n: int) -> pa.Table:
    return MixtureTask(TaskConfig("addition+reverse", 2, 2, n, 2, 0, None, None, None, None)).splits()["opd"]


def run(module, root: Path, argv: list[str], **sections) -> dict:
    path = root / f"params-{len(list(root.glob('params-*')))}.yaml"
    path.write_text(yaml.safe_dump(sections))
    return module.main(["--params", str(path), "--metrics-dir", str(root / "metrics"), *argv])


def score(root: Path, teachers: Path, rollouts_dir: Path, out: Path, prompts: Path, **sections) -> dict:
    return run(teacher_topk, root, ["--teacher", str(teachers), "--rollouts", str(rollouts_dir), "--prompts",
                                    str(prompts), "--out", str(out)], teacher_topk=TOPK, **sections)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two domain teachers, a π_ref fine-tuned (by provenance) on their answers, its rollouts and the scored shards."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("multi")
    teachers = teacher_set(root / "teachers", {"add": 1, "rev": 2})
    fps = {d: model_fingerprint(teachers / d) for d in ("add", "rev")}
    save_model(root / "policy", seed=0, hidden=16)
    write_provenance(root / "policy", "sft", "scratch", {}, sft_teacher_fingerprint=set_fingerprint(fps),
                     sft_teachers=fps, sft_data_files=["part-00000.parquet"])
    write_prompts(root / "opd.parquet", mixture_prompts(7))
    run(rollouts, root, ["--policy", str(root / "policy"), "--prompts", str(root / "opd.parquet"),
                         "--out", str(root / "rollouts")], rollouts=ROLLOUTS)
    score(root, teachers, root / "rollouts", root / "topk", root / "opd.parquet")
    return root, teachers, fps


def rows(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in shards.list_parts(folder))


def test_each_row_is_scored_by_its_domains_teacher(world):
    root, teachers, fps = world
    table = rows(root / "topk")
    prompts = read_prompts(root / "opd.parquet")
    domain_of = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("domain").to_pylist()))
    assert table.column("domain").to_pylist() == [domain_of[p] for p in table.column("prompt_id").to_pylist()]
    assert set(table.column("domain").to_pylist()) == {"add", "rev"}
    assert table.column("teacher_fingerprint").to_pylist() == [fps[d] for d in table.column("domain").to_pylist()]
    meta = shards.read_meta(shards.list_parts(root / "topk")[0])
    assert json.loads(meta["teachers"]) == fps and meta["teacher_fingerprint"] == set_fingerprint(fps)
    fmt = teacher_format_of(shards.list_parts(root / "topk")[0], meta)
    for domain in ("add", "rev"):   # the stored numbers are a direct forward of that domain's teacher, not the other's
        mine = table.filter(pa.compute.equal(table.column("domain"), domain))
        ids, plens = mine.column("input_ids").to_pylist(), mine.column("prompt_len").to_pylist()
        direct = hf_engine(teachers / domain, batch_size=8).score(ids, plens, k=TOPK["k"])
        other = hf_engine(teachers / ("rev" if domain == "add" else "add"), batch_size=8).score(ids, plens, k=3)
        stored = np.concatenate(mine.column("teacher_logprob").to_pylist())
        want = np.concatenate([s.teacher_logprob for s in direct])
        np.testing.assert_allclose(stored, want, atol=1e-5)
        assert not np.allclose(stored, np.concatenate([s.teacher_logprob for s in other]), atol=1e-3)
        decoded = fmt.decode(mine)
        np.testing.assert_array_equal(decoded["topk_ids"], np.concatenate([s.topk_ids for s in direct]))
    assert SCORING_TEMPERATURE == 1.0


def test_consistent_multi_teacher_shards_pass_distills_check(world):
    root, _, fps = world
    report = check_distill_inputs(root / "policy", root / "topk", allow_inconsistent_teacher=False)
    assert report["teachers"] == report["sft_teachers"] == fps and report["override_used"] is False
    assert report["teacher_fingerprint"] == report["sft_teacher_fingerprint"] == set_fingerprint(fps)


def tamper(src: Path, dst: Path, row: int) -> Path:
    """A copy of the shards where row `row` of part 0 claims the other domain's teacher (as a buggy scorer would
    write it: a validly sealed shard with the original footer)."""
    shutil.copytree(src, dst)
    part = shards.list_parts(dst)[0]
    meta = shards.read_meta(part)
    table = pq.read_table(part)
    teachers = json.loads(meta["teachers"])
    column = table.column("teacher_fingerprint").to_pylist()
    domain = table.column("domain")[row].as_py()
    column[row] = teachers["rev" if domain == "add" else "add"]
    table = table.set_column(table.schema.get_field_index("teacher_fingerprint"), "teacher_fingerprint",
                             pa.array(column, pa.string()))
    fmt = teacher_format_of(part, meta)
    shards.write_shard(part, table, {k: v for k, v in meta.items() if k not in ("created_at", "file_sha256")},
                       shards.teacher_schema(fmt, True), fmt.encodings())
    return part


def test_a_row_scored_by_the_wrong_teacher_is_refused_naming_file_row_and_domain(world, tmp_path, capsys):
    root, _, _ = world
    part = tamper(root / "topk", tmp_path / "topk", row=1)
    domain = pq.read_table(part).column("domain")[1].as_py()
    with pytest.raises(ConsistencyError) as err:
        check_distill_inputs(root / "policy", tmp_path / "topk", allow_inconsistent_teacher=True)  # never overridable
    message = str(err.value)
    assert str(part) in message and "row 1 " in message and f"domain {domain!r}" in message
    with pytest.raises(SystemExit) as exit_:
        distill.main(["--params", str(params_file(tmp_path)), "--metrics-dir", str(tmp_path / "metrics"),
                      "--init", str(root / "policy"), "--shards", str(tmp_path / "topk"), "--out",
                      str(tmp_path / "student"), "--logs", str(tmp_path / "logs"), "--plots", str(tmp_path / "plots")])
    assert exit_.value.code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err_lines) == 1 and f"domain {domain!r}" in err_lines[0] and str(part) in err_lines[0]
    assert not (tmp_path / "student").exists()


def test_pi_ref_fine_tuned_on_another_domain_teacher_is_refused_by_domain(world, tmp_path):
    root, _, fps = world
    policy = tmp_path / "policy"
    shutil.copytree(root / "policy", policy)
    other = {**fps, "rev": "0123456789abcdef"}
    write_provenance(policy, "sft", "scratch", {}, sft_teacher_fingerprint=set_fingerprint(other),
                     sft_teachers=other, sft_data_files=["part-00000.parquet"])
    with pytest.raises(ConsistencyError, match="teacher of domain 'rev' mismatch") as err:
        check_distill_inputs(policy, root / "topk", allow_inconsistent_teacher=False)
    assert "domain 'add'" not in str(err.value)
    report = check_distill_inputs(policy, root / "topk", allow_inconsistent_teacher=True)   # an ablation may
    assert report["override_used"] is True


def test_swapped_teacher_folders_are_refused_before_scoring(world, tmp_path, capsys):
    root, teachers, _ = world
    swapped = tmp_path / "teachers"
    shutil.copytree(teachers, swapped)
    (swapped / "add").rename(swapped / "tmp")
    (swapped / "rev").rename(swapped / "add")
    (swapped / "tmp").rename(swapped / "rev")
    with pytest.raises(TeacherRoutingError, match="holds the teacher of domain 'rev'"):
        load_teachers(swapped)
    with pytest.raises(SystemExit) as exit_:
        score(tmp_path, swapped, root / "rollouts", tmp_path / "topk", root / "opd.parquet")
    assert exit_.value.code == 2 and "swapped" in capsys.readouterr().err
    assert not (tmp_path / "topk").exists() or not shards.list_parts(tmp_path / "topk")


def test_a_prompt_domain_without_a_teacher_is_one_line_naming_it(world, tmp_path, capsys):
    root, teachers, _ = world
    only_add = tmp_path / "teachers"
    shutil.copytree(teachers / "add", only_add / "add")
    write_routes(only_add, {"add": "add"})
    with pytest.raises(SystemExit) as exit_:
        score(tmp_path, only_add, root / "rollouts", tmp_path / "topk", root / "opd.parquet")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert exit_.value.code == 2 and len(err) == 1 and "prompt domain 'rev' has no teacher" in err[0]
    assert "teacher.domains" in err[0]


def test_domain_teachers_with_different_tokenizers_are_refused_naming_both(world, tmp_path):
    _, teachers, _ = world
    odd = tmp_path / "teachers"
    shutil.copytree(teachers, odd)
    swap_token_ids(odd / "rev")
    with pytest.raises(TokenizerMismatch) as err:
        load_teachers(odd).tokenizer_fingerprint()
    assert str(odd / "rev") in str(err.value) and str(odd / "add") in str(err.value)
    assert tokenizer_fingerprint(odd / "rev") != tokenizer_fingerprint(odd / "add")


def test_one_domain_scores_exactly_like_the_single_teacher_path(world, tmp_path):
    """One domain teacher: the shards hold the single-teacher rows, column for column and value for value, plus the
    two domain columns (so not byte-identical files: the default `teacher.domains: {}` is the single path itself)."""
    root, teachers, _ = world
    prompts = read_prompts(root / "opd.parquet")
    one = prompts.set_column(prompts.schema.get_field_index("domain"), "domain",
                             pa.array(["add"] * prompts.num_rows, pa.string()))
    write_prompts(tmp_path / "one.parquet", one)
    one_set = tmp_path / "teachers"
    shutil.copytree(teachers / "add", one_set / "add")
    write_routes(one_set, {"add": "add"})
    # π_ref's SFT teachers are the two-domain set: the override lets both runs score (it changes no row written).
    ablation = {"distill": {**yaml.safe_load((REPO / "params.yaml").read_text())["distill"],
                            "allow_inconsistent_teacher": True}}
    score(tmp_path, one_set, root / "rollouts", tmp_path / "multi", tmp_path / "one.parquet", **ablation)
    score(tmp_path, teachers / "add", root / "rollouts", tmp_path / "single", root / "opd.parquet", **ablation)
    multi, single = rows(tmp_path / "multi"), rows(tmp_path / "single")
    assert multi.drop_columns(["domain", "teacher_fingerprint"]).equals(single)
    # ... and the single-teacher path writes nothing new: no domain columns, no `teachers` footer key
    assert "domain" not in single.column_names and "teacher_fingerprint" not in single.column_names
    assert "teachers" not in shards.read_meta(shards.list_parts(tmp_path / "single")[0])
    assert set(multi.column("teacher_fingerprint").to_pylist()) == {model_fingerprint(teachers / "add")}


def test_inspect_mix_counts_equal_the_rows(world, capsys):
    root, _, fps = world
    inspect_shards.main(["mix", "--shards", str(root / "topk")])
    lines = capsys.readouterr().out.splitlines()[2:]
    table = rows(root / "topk")
    got = {line.split()[0]: line.split() for line in lines}
    for domain in ("add", "rev"):
        mine = table.filter(pa.compute.equal(table.column("domain"), domain))
        tokens = sum(len(x) - p for x, p in zip(mine.column("input_ids").to_pylist(),
                                                mine.column("prompt_len").to_pylist()))
        assert got[domain][1:4] == [fps[domain], str(mine.num_rows), str(tokens)]
    assert got["total"][1] == str(table.num_rows)


def test_inspect_tokens_decodes_with_the_teachers_shared_tokenizer(world, capsys):
    root, teachers, _ = world
    inspect_shards.main(["tokens", "--top", "2", "--tokenizer", str(teachers), "--shards", str(root / "topk")])
    assert "largest teacher-student gaps" in capsys.readouterr().out


def test_mixture_task_tags_and_interleaves_domains():
    splits = MixtureTask(TaskConfig("addition+reverse", 3, 9, 4, 5, 0, None, None, None, None)).splits()
    sft = splits["sft"]
    assert sft.column("domain").to_pylist() == ["add", "rev"] * 4 + ["add"]
    seen = [set(t.column("prompt").to_pylist()) for t in splits.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    for prompt, answer, reference, domain in zip(*(sft.column(c).to_pylist() for c in
                                                   ("prompt", "answer", "reference", "domain"))):
        assert numeric(reference, answer)
        if domain == "rev":
            assert answer == prompt[len("rev:"):-1][::-1]


def params_with(tmp_path: Path, **teacher) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["teacher"] = {**data["teacher"], **teacher}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("domains, key", [
    ({"add": {}, "rev": "nope"}, "teacher.domains.rev: 'nope' names no domain"),
    ({"add": {}, "rev": "rev"}, "teacher.domains.rev: 'rev' names no domain"),
    ({"a/b": {}}, "teacher.domains.a/b: not a domain name"),
    ({"add": {"lr": -1}}, "teacher.domains.add.lr: -1.0 is out of range"),
    ({"add": {"colour": 1}}, "teacher.domains.add.colour: unknown key"),
    ({"add": {"domains": {}}}, "teacher.domains.add.domains:"),
    ({"add": 3}, "teacher.domains.add: expected a mapping"),
])
def test_bad_teacher_domains_are_one_line_naming_the_key(tmp_path, domains, key):
    with pytest.raises(ConfigError) as err:
        load_params(params_with(tmp_path, domains=domains), required=("teacher",))
    assert key in str(err.value) and "\n" not in str(err.value)


def test_domain_routes_and_expert_settings():
    cfg = load_params(REPO / "configs" / "multiteacher.yaml", required=("teacher",))["teacher"]
    assert cfg.routes() == {"add": "add", "rev": "rev"} and cfg.experts() == ["add", "rev"]
    assert cfg.expert("add").domains == {} and cfg.expert("add").hidden_size == cfg.hidden_size


def teacher_stage(tmp_path: Path, capsys=None, **domains_and_task) -> dict:
    data = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    data["teacher"] = {**data["teacher"], "hidden_size": 16, "intermediate_size": 32, "max_steps": 2,
                       "batch_size": 8, "domains": domains_and_task.get("domains", {"add": {}, "rev": {"seed": 3}})}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"teacher": data["teacher"]}))
    mixture = TaskConfig("addition+reverse", 2, 24, 2, 2, 0, None, None, None, None)
    write_prompts(tmp_path / "sft.parquet", MixtureTask(mixture)
                  .splits()["sft"])
    return teacher.main(["--params", str(path), "--metrics-dir", str(tmp_path / "metrics"), "--prompts",
                         str(tmp_path / "sft.parquet"), "--out", str(tmp_path / "teacher"), "--plots",
                         str(tmp_path / "plots"), "--logs", str(tmp_path / "logs")])


@pytest.mark.slow
def test_teacher_stage_trains_one_teacher_per_domain_on_its_domain_only(tmp_path):
    metrics = teacher_stage(tmp_path)
    teachers = load_teachers(tmp_path / "teacher")
    assert teachers.routes == {"add": "add", "rev": "rev"}
    for domain in ("add", "rev"):
        record = json.loads((tmp_path / "teacher" / domain / "opd_provenance.json").read_text())
        assert record["domain"] == domain and "domains" not in record["config"]
        assert metrics["domains"][domain]["heldout_n"] == 1   # 12 prompts of its domain: a tenth held out
    assert teachers.fingerprints["add"] != teachers.fingerprints["rev"]
    assert (tmp_path / "plots" / "loss.csv").read_text().startswith("step,add,rev\n")


def test_teacher_domain_without_prompts_is_refused_naming_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        teacher_stage(tmp_path, domains={"add": {}, "rev": {}, "mul": {}})
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert exit_.value.code == 2 and len(err) == 1 and "teacher.domains.mul: no prompt" in err[0]
    with pytest.raises(SystemExit):
        teacher_stage(tmp_path, domains={"add": {}})
    assert "no teacher for prompt domain 'rev'" in capsys.readouterr().err


def test_a_prompt_file_with_a_domain_column_keeps_it(tmp_path):
    from offline_opd.tasks.prompt_file import file_splits

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i), "domain": "ab"[i % 2],
                                        "split": ("sft", "opd", "eval")[i % 3]}) + "\n" for i in range(12)))
    splits = file_splits(TaskConfig("file", 1, 1, 1, 1, 0, str(path), None, None, None), path)
    assert all(t.column("domain").to_pylist() == ["ab"[int(a) % 2] for a in t.column("answer").to_pylist()]
               for t in splits.values())
    write_prompts(tmp_path / "sft.parquet", splits["sft"])
    assert read_prompts(tmp_path / "sft.parquet").column_names[-1] == "domain"
