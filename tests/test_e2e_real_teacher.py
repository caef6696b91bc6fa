"""End to end with a real (pretrained-style) teacher folder and a prompt file, as a new user runs it.

`teacher.source` is a local Hugging Face folder (not `scratch`), so `teacher` trains nothing; `dvc repro`
must still find every output dvc.yaml declares. The prompts come from `prompt_files/`, the folder
`prepare` depends on: editing the file must rerun `prepare` and every stage after it. Slow (2-4 min on
2 shared cores: a whole repro plus three stages, each paying the Python/torch start-up).
"""

import json

import pytest
import yaml

from offline_opd.tasks import addition as toy_task
from offline_opd.tools.scratch_project import STAGES, init_project, ran_stages, sh
from tests.tiny_models import save_model

# Tiny sizes: the run is dominated by each stage's Python start-up, not by compute.
SIZES = {"n_sft": 30, "n_opd": 8, "n_eval": 8}


def write_prompt_file(path, seed: int) -> None:
    problems = toy_task.make_problems(3, sum(SIZES.values()), seed)
    path.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems))


@pytest.mark.slow
def test_real_teacher_folder_and_prompt_file_edits(tmp_path):
    teacher = save_model(tmp_path / "pretrained_teacher", seed=3, hidden=48, layers=2)
    root = tmp_path / "project"
    root.mkdir()
    env = init_project(root, "ci")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["task"].update(kind="file", prompt_file="prompt_files/mine.jsonl", **SIZES)
    params["teacher"]["source"] = str(teacher)
    params["sft"].update(hidden_size=8, max_steps=2)
    params["distill"].update(max_steps=2, checkpoint_every_n_steps=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_prompt_file(root / "prompt_files" / "mine.jsonl", seed=0)

    first = sh(["dvc", "repro"], root, env).stdout
    assert ran_stages(first) == STAGES
    assert (root / "plots/teacher/loss.csv").read_text() == "step,loss\n"   # declared, honest: no rows
    assert "no rows" in (root / "plots/teacher/loss.svg").read_text()
    ref = json.loads((root / "data/models/teacher/opd_model_ref.json").read_text())
    assert ref["path"] == str(teacher.resolve())                          # pointed at, not retrained
    first_eval = (root / "data/prompts/eval.parquet").read_bytes()

    assert ran_stages(sh(["dvc", "repro"], root, env).stdout) == []
    # Edit the prompt file: prepare reruns, and so does what reads its output. Reproducing up to
    # sft_data shows it; `dvc status` then shows the change travelling on to sft (the rest of the
    # chain is the ordinary DVC behaviour tests/test_e2e_dvc.py covers).
    write_prompt_file(root / "prompt_files" / "mine.jsonl", seed=1)
    again = sh(["dvc", "repro", "sft_data"], root, env).stdout
    assert ran_stages(again) == ["prepare", "teacher", "sft_data"]
    assert (root / "data/prompts/eval.parquet").read_bytes() != first_eval
    status = json.loads(sh(["dvc", "status", "--json"], root, env).stdout)
    assert {"sft", "rollouts", "teacher_topk", "evaluate"} <= set(status)
