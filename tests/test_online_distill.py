"""The online OPD baseline on a tiny configuration: the student samples every step, the teacher scores."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from offline_opd.tools import online_distill
from tests.tiny_models import params_file, pi_ref, save_model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def setup(tmp_path, **topk):
    init, teacher = pi_ref(tmp_path / "pi_ref"), save_model(tmp_path / "teacher", seed=3)
    prompts = tmp_path / "opd.parquet"
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(5)], "prompt": [f"{i}+{i}=" for i in range(5)],
                             "answer": [str(2 * i) for i in range(5)]}), prompts)
    params = params_file(tmp_path, batch_size=4, max_steps=3)
    data = yaml.safe_load(params.read_text())
    data["rollouts"].update(n_samples=2, max_new_tokens=5)
    data["teacher_topk"].update(k=3, **topk)
    params.write_text(yaml.safe_dump(data))
    return ["--params", str(params), "--metrics-dir", str(tmp_path / "metrics"), "--init", str(init),
            "--teacher", str(teacher), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
            "--logs", str(tmp_path / "logs")]


def assert_behaviour_logprobs_are(model, batch) -> None:
    """The batch's behaviour log-probs (T = 1 here) at response positions are `model`'s own."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    resp = batch["response_mask"][:, 1:]
    torch.testing.assert_close(batch["behavior_logprob"][:, 1:][resp], logp[resp], rtol=1e-4, atol=1e-4)


def test_online_opd_samples_and_scores_every_step_and_trains(tmp_path, monkeypatch):
    seen = []
    orig = online_distill.OnlineBatches._batches

    def spy(self):
        for batch in orig(self):
            seen.append((batch, {n: p.detach().clone() for n, p in self.module.model.named_parameters()}))
            yield batch

    monkeypatch.setattr(online_distill.OnlineBatches, "_batches", spy)
    online_distill.main(setup(tmp_path))
    metrics = json.loads((tmp_path / "metrics" / "online_distill.json").read_text())
    assert metrics["steps"] == 3 and len(seen) == 3
    for batch, _ in seen:   # the shard batch format, 2 prompts x 2 samples, teacher top-3 at response tokens
        assert batch["input_ids"].shape[0] == 4 and batch["topk_ids"].shape[-1] == 3
        resp = batch["response_mask"]
        assert (batch["topk_ids"][resp] >= 0).all() and (batch["topk_ids"][~resp] == -1).all()
        assert (batch["teacher_logprob"][resp] <= 0).all() and (batch["behavior_logprob"][resp] <= 0).all()
    # the targets are the teacher's own: top-1 at token t is the teacher's argmax after tokens < t
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    batch = seen[0][0]
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    resp = batch["response_mask"][:, 1:]
    assert torch.equal(batch["topk_ids"][:, 1:][resp][:, 0], logits[:, :-1].argmax(-1)[resp])
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    torch.testing.assert_close(batch["teacher_logprob"][:, 1:][resp], logp[resp], rtol=1e-4, atol=1e-4)
    # the behaviour log-probs are those of the weights that sampled the batch (T = 1 here)
    for batch, state in (seen[0], seen[-1]):
        student = AutoModelForCausalLM.from_pretrained(tmp_path / "pi_ref").eval()
        student.load_state_dict(state, strict=False)
        assert_behaviour_logprobs_are(student, batch)
    # each batch was sampled by the weights of that moment: they changed between the samplings
    first, last = seen[0][1], seen[-1][1]
    assert any(not torch.equal(first[n], last[n]) for n in first)
    assert (tmp_path / "out" / "config.json").exists()


def test_online_metrics_break_the_run_down_by_phase(tmp_path):
    """bench/cost.py reads these: every phase timed (wall and CPU), within the run's total, with its tokens."""
    online_distill.main(setup(tmp_path))
    metrics = json.loads((tmp_path / "metrics" / "online_distill.json").read_text())
    phases = metrics["phases"]
    assert set(phases) == {"load", "generate", "score", "train"}
    for clock in ("wall_s", "cpu_s"):
        assert all(p[clock] >= 0 for p in phases.values())
    assert all(phases[name]["wall_s"] > 0 for name in phases)   # each phase ran
    assert sum(p["wall_s"] for p in phases.values()) <= metrics["online_wall_s"] <= metrics["wall_s"]
    assert sum(p["cpu_s"] for p in phases.values()) <= metrics["online_cpu_s"] + 1e-3
    assert metrics["sequences"] == 3 * 4   # steps x batch: every sequence sampled and scored once
    assert 0 < metrics["generated_tokens"] <= metrics["sequences"] * 5   # rollouts.max_new_tokens each
    assert metrics["scored_tokens"] > metrics["generated_tokens"]        # the teacher reads the prompts too
    assert metrics["train_tokens"] == metrics["scored_tokens"] and metrics["train_cpu_s"] >= 0


def test_online_opd_refuses_sampled_teacher_targets(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        online_distill.main(setup(tmp_path, selection="sampled", samples=2))
    assert exc.value.code == 2
    assert "teacher_topk.selection must be 'topk'" in capsys.readouterr().err


def test_init_sampler_samples_every_step_with_the_frozen_initial_weights(tmp_path, monkeypatch):
    """`--sampler init` (the diagnostic): fresh samples each step, all from π_ref, while the student trains."""
    seen = []
    orig = online_distill.OnlineBatches._batches

    def spy(self):
        for batch in orig(self):
            seen.append(batch)
            yield batch

    monkeypatch.setattr(online_distill.OnlineBatches, "_batches", spy)
    online_distill.main(setup(tmp_path) + ["--sampler", "init"])
    assert json.loads((tmp_path / "metrics" / "online_distill.json").read_text())["sampler"] == "init"
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "pi_ref").eval()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert any(not torch.equal(a, b) for a, b in zip(ref.state_dict().values(), trained.state_dict().values()))
    assert len(seen) == 3 and not torch.equal(seen[0]["input_ids"], seen[-1]["input_ids"])
    for batch in seen:   # every batch's behaviour log-probs are π_ref's, however far the student has moved
        assert_behaviour_logprobs_are(ref, batch)
