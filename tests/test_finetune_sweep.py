"""bench/finetune_sweep.py, the loop that chose the SmolLM2 preset's teacher.lr and finetune_steps: it must train
on the prompt file's answers and score held-out prompts with the verifier, or its table says nothing."""

import json
from pathlib import Path

import pytest

from tests.tiny_models import load_bench, save_model

@pytest.fixture(scope="module")
def sweep():
    return load_bench("finetune_sweep")


def prompt_file(path: Path, n: int) -> Path:
    """Every answer is 7: a tiny model learns it in a few dozen steps, and an untrained one does not say it."""
    path.write_text("".join(json.dumps({"prompt": f"{i} + {7 - i % 8}?", "answer": "7"}) + "\n" for i in range(n)))
    return path


def test_sweep_learns_the_answers_and_scores_held_out_prompts(tmp_path, sweep):
    model = save_model(tmp_path / "model", seed=0, hidden=32, layers=1)
    out = tmp_path / "log.json"
    sweep.main(["--model", str(model), "--prompts", str(prompt_file(tmp_path / "p.jsonl", 24)), "--train-n", "16",
                "--held-n", "8", "--steps", "40", "--lr", "1e-2", "--batch-size", "4", "--eval-at", "1,40",
                "--max-new-tokens", "2", "--out", str(out)])
    log = json.loads(out.read_text())["log"]
    assert [row["step"] for row in log] == [1, 40]
    assert log[0]["held_accuracy"] < 0.5 and log[-1]["held_accuracy"] == 1.0


def test_sweep_refuses_a_file_too_short_for_both_splits(tmp_path, sweep):
    model = save_model(tmp_path / "model", seed=0, hidden=32, layers=1)
    with pytest.raises(SystemExit, match="fewer than --train-n"):
        sweep.main(["--model", str(model), "--prompts", str(prompt_file(tmp_path / "p.jsonl", 10)),
                    "--train-n", "8", "--held-n", "4", "--out", str(tmp_path / "log.json")])
