"""The params schema: every preset validates, bad files fail naming the file and the key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from offline_opd.config import SECTIONS, ConfigError, load_all, load_section
from offline_opd.tools.preset import use_preset

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def base() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_preset_is_complete_and_valid(preset):
    cfgs = load_all(ROOT / "configs" / preset)
    assert set(cfgs) == set(SECTIONS)


def test_params_yaml_is_the_toy_preset():
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == yaml.safe_load((ROOT / "configs/toy.yaml").read_text())


def test_missing_key_names_key_and_file(tmp_path):
    data = base()
    del data["distill"]["lr"]
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=r"params\.yaml: distill\.lr: missing key"):
        load_section("distill", path)


def test_keys_that_do_not_apply_may_be_left_out_and_no_others(tmp_path):
    """A pretrained teacher needs only `source`, a prompt file no `digits`, a pretrained sft base no
    architecture: those keys read as None. Where they apply (scratch, addition) each is still required."""
    data = base()
    data["teacher"] = {"source": "some/model"}
    data["task"] = {**data["task"], "kind": "file", "prompt_file": "prompts.jsonl"}
    del data["task"]["digits"], data["task"]["gap"], data["task"]["gap_prompts"], data["task"]["style"]
    data["sft"]["source"] = "teacher"
    for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        del data["sft"][key]
    cfgs = load_all(write(tmp_path, data))
    assert cfgs["teacher"].source == "some/model" and cfgs["teacher"].max_steps is None
    assert cfgs["task"].digits is None and cfgs["task"].gap is None and cfgs["task"].style is None
    assert cfgs["sft"].hidden_size is None and cfgs["sft"].lr == base()["sft"]["lr"]
    for section, key in [("teacher", "holdout"), ("teacher", "num_layers"), ("task", "digits"), ("sft", "num_heads"),
                         ("sft", "lr")]:
        data = base()
        del data[section][key]
        with pytest.raises(ConfigError, match=rf"params\.yaml: {section}\.{key}: missing key"):
            load_all(write(tmp_path, data))


def test_pretrained_presets_leave_out_the_toy_teacher_keys():
    """Only the keys a real teacher uses: its source, and its optimizer's when it is fine-tuned (smollm2)."""
    from offline_opd.config import TeacherConfig

    for preset in ("qwen3", "smollm2"):
        data = yaml.safe_load((ROOT / "configs" / f"{preset}.yaml").read_text())
        teacher = set(data["teacher"])
        if data["teacher"].get("finetune_steps"):
            assert not teacher & {*TeacherConfig.ARCHITECTURE, *TeacherConfig.SCRATCH_ONLY}, preset
            assert teacher == {f.name for f in dataclasses.fields(TeacherConfig)} - TeacherConfig.omittable(
                data["teacher"]), preset
        else:
            assert teacher == {"source"}, preset
        assert not {"digits", "style", "gap", "gap_prompts"} & set(data["task"]), preset


def test_unknown_key_is_refused(tmp_path):
    data = base()
    data["rollouts"]["n_sample"] = 3
    with pytest.raises(ConfigError, match=r"rollouts\.n_sample: unknown key"):
        load_section("rollouts", write(tmp_path, data))


@pytest.mark.parametrize("section,key,value,msg", [
    ("teacher_topk", "k", "eight", "expected an integer"),
    ("distill", "kernel_backend", "cuda", "is not one of"),
    ("distill", "allow_inconsistent_teacher", "yes", "expected true or false"),
    ("task", "prompt_file", 3, "expected a string"),
    ("teacher", "holdout", -1, "out of range"),
    ("teacher", "eval_batch_size", 0, "out of range"),
])
def test_malformed_value_names_key(tmp_path, section, key, value, msg):
    data = base()
    data[section][key] = value
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: .*{msg}"):
        load_section(section, write(tmp_path, data))


def test_missing_section_and_file(tmp_path):
    data = base()
    del data["sft"]
    with pytest.raises(ConfigError, match="missing section 'sft:'"):
        load_section("sft", write(tmp_path, data))
    with pytest.raises(ConfigError, match="not found"):
        load_section("sft", tmp_path / "nope.yaml")


def test_float_written_without_dot_is_accepted(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("lr: 1.0e-3", "lr: 1e-3", 1)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_section("distill", path).lr == pytest.approx(1e-3)


def test_preset_switch_validates_before_replacing(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "good.yaml").write_text((ROOT / "params.yaml").read_text())
    broken = base()
    del broken["evaluate"]
    (configs / "broken.yaml").write_text(yaml.safe_dump(broken))
    dest = tmp_path / "params.yaml"
    use_preset("good", dest, configs)
    before = dest.read_text()
    with pytest.raises(ConfigError, match="evaluate"):
        use_preset("broken", dest, configs)
    assert dest.read_text() == before


@pytest.mark.parametrize("section,key,value", [
    ("distill", "max_steps", -1),
    ("distill", "batch_size", 0),
    ("distill", "lr", 0),
    ("distill", "tip_fraction", 1.5),
    ("rollouts", "temperature", -0.1),
    ("task", "digits", 0),
    ("teacher_topk", "k", -2),
])
def test_out_of_range_value_names_key_and_bound(tmp_path, section, key, value):
    data = base()
    data[section][key] = value
    with pytest.raises(ConfigError, match=rf"params\.yaml: {section}\.{key}: .* out of range; it must be"):
        load_section(section, write(tmp_path, data))


@pytest.mark.parametrize("key,value", [("gap", "big_column"), ("gap_prompts", 10), ("style", "padded")])
def test_toy_keys_switched_on_for_another_kind_are_refused(tmp_path, key, value):
    """A prompt file or the mixture would silently ignore them; left at their off values they may stay."""
    data = base()
    off = {"gap": None, "gap_prompts": None, "style": "columns"}
    data["task"] = {**data["task"], **off, "kind": "addition+reverse", key: value}
    with pytest.raises(ConfigError, match=rf"params\.yaml: task\.{key}: .*task\.kind 'addition\+reverse' ignores it"):
        load_all(write(tmp_path, data))
    data["task"][key] = off[key]
    assert load_all(write(tmp_path, data))["task"].kind == "addition+reverse"


def test_padded_answers_with_the_exact_verifier_are_refused(tmp_path):
    data = base()
    data["task"]["style"], data["evaluate"]["verifier"] = "padded", "exact"
    with pytest.raises(ConfigError, match=r"task\.style: padded .* evaluate\.verifier: exact never accepts"):
        load_all(write(tmp_path, data))
    data["evaluate"]["verifier"] = "numeric"
    assert load_all(write(tmp_path, data))["task"].style == "padded"


@pytest.mark.parametrize("preset", ["toy_carry_gap", "toy"])
def test_a_gap_presets_gap_fits_its_split(preset):
    """`opd-preset check` validates keys, not the draw: this draws the preset's SFT split as prepare does."""
    from offline_opd.tasks.addition import GAPS, gap_first, make_splits

    path = ROOT / "configs" / f"{preset}.yaml"
    task = yaml.safe_load(path.read_text(encoding="latin-1"))["task"]
    assert task["gap"] is not None, f"{preset} has no gap: this test checks a gap"
    sft = make_splits(task["digits"], {"sft": task["n_sft"], "opd": task["n_opd"], "eval": task["n_eval"]},
                      task["seed"], task["style"])["sft"]
    ordered = gap_first(sft, task["digits"], task["gap"], task["gap_prompts"], path)
    assert not any(GAPS[task["gap"]](p, task["digits"]) for p in ordered[:task["gap_prompts"]])


def test_a_gap_needs_its_size_and_a_student_budget_inside_it(tmp_path):
    """A gap the student's budget reaches past is no gap: refused naming both keys; inside it, accepted."""
    data = base()
    data["task"]["gap"], data["task"]["gap_prompts"], data["sft_data"]["n_prompts"] = "big_column", None, None
    with pytest.raises(ConfigError, match=r"params\.yaml: task\.gap_prompts: null, but task\.gap and task\.gap_prompts "
                                          r"go together"):
        load_all(write(tmp_path, data))
    data["task"]["gap_prompts"] = 3000
    with pytest.raises(ConfigError, match=r"params\.yaml: task\.gap_prompts: 3000 keeps task\.gap 'big_column' out of "
                                          r"only the first 3000 .* sft_data\.n_prompts gives the student all of them"
                                          r".*set sft_data\.n_prompts <= 3000"):
        load_all(write(tmp_path, data))
    data["sft_data"]["n_prompts"] = 3001
    with pytest.raises(ConfigError, match=r"the first 3001, the gap included"):
        load_all(write(tmp_path, data))
    data["sft_data"]["n_prompts"] = 3000
    assert load_all(write(tmp_path, data))["task"].gap_prompts == 3000
    data["task"]["gap_prompts"] = data["task"]["n_sft"] + 1
    with pytest.raises(ConfigError, match=r"task\.gap_prompts: 8001 is more than the 8000 SFT prompts"):
        load_all(write(tmp_path, data))
    data["task"]["gap"], data["task"]["gap_prompts"] = None, 10
    with pytest.raises(ConfigError, match=r"task\.gap: null, but task\.gap and task\.gap_prompts go together"):
        load_all(write(tmp_path, data))


@pytest.mark.parametrize("section", ["teacher", "sft", "distill"])
def test_cpu_offload_needs_strategy_fsdp(tmp_path, section):
    data = base()
    data[section]["cpu_offload"] = True                      # the toy preset trains with strategy auto
    with pytest.raises(ConfigError, match=rf"params\.yaml: {section}\.cpu_offload: .*strategy: fsdp"):
        load_section(section, write(tmp_path, data))
    data[section]["strategy"] = "fsdp"
    assert load_section(section, write(tmp_path, data)).cpu_offload is True
