"""The distill stage end to end on tiny local models: every loss mode trains and saves a loadable HF
folder, position alignment, exact resume, discarded checkpoints, consistency refusal and override,
clean CLI errors, and the teacher never being loaded."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from offline_opd.stages import distill as distill_stage
from offline_opd.contract import shards
from offline_opd.config import load_section
from offline_opd.train.module import OBJECTIVE_KEY, TrainModule
from offline_opd.train.shard_data import collate
from offline_opd.train.trainer import load_for_training
from offline_opd.provenance.fingerprint import model_fingerprint
from offline_opd.train.losses import loss_from_config
from offline_opd.models.loading import default_device
from offline_opd.provenance.record import read_provenance
from tests.tiny_models import params_file, pi_ref, pi_ref_meta, plain_format, save_model, teacher_rows, write_teacher_shards

K = 4


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "ROW_GROUP_SIZE", 8)
    init = pi_ref(tmp_path / "pi_ref")
    write_teacher_shards(tmp_path / "shards", pi_ref_meta(init, k=K), n_parts=2, rows_per_part=24)
    return tmp_path, init


def run_distill(root: Path, init: Path, tag: str = "", **distill) -> dict:
    params = params_file(root, **distill)
    return distill_stage.main([
        "--params", str(params), "--metrics-dir", str(root / f"metrics{tag}"), "--init", str(init),
        "--shards", str(root / "shards"), "--out", str(root / f"out{tag}"), "--logs", str(root / f"logs{tag}"),
        "--plots", str(root / f"plots{tag}")])


def loss_rows(root: Path, tag: str = "") -> list[dict]:
    with open(root / f"plots{tag}" / "loss.csv") as f:
        return list(csv.DictReader(f))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("mode", ["pg", "fkl", "rkl", "jsd"])
def test_each_mode_trains_and_saves_a_loadable_hf_folder(inputs, mode):
    root, init = inputs
    metrics = run_distill(root, init, loss=mode)
    on_gpu = default_device() == "cuda"
    assert metrics["steps"] == 3 and metrics["fused_linear"] is on_gpu
    assert metrics["kernel_backend"] == ("triton" if on_gpu else "torch")
    assert metrics["response_tokens_per_s"] > 0 and metrics["allow_inconsistent_teacher"] is False
    assert json.loads((root / "metrics" / "distill.json").read_text())["final_loss"] == metrics["final_loss"]
    out = root / "out"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("7") == transformers.AutoTokenizer.from_pretrained(init).convert_tokens_to_ids("7")
    before, after = weights(init), weights(out)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    prov = read_provenance(out)
    assert prov["stage"] == "distill" and prov["config"]["loss"] == mode
    assert prov["init_fingerprint"] == model_fingerprint(init) and prov["model_fingerprint"] == model_fingerprint(out)
    assert prov["teacher_fingerprint"] == "feedc0de" * 2 and prov["allow_inconsistent_teacher"] is False
    assert prov["consistency"]["override_used"] is False
    assert [r["step"] for r in loss_rows(root)] == ["0", "1", "2"]
    assert (root / "logs" / "csv").is_dir() and (root / "logs" / "checkpoints" / "last.ckpt").exists()


def reference_coarse_fkl(model, batch) -> torch.Tensor:
    """Per-token loop: logits at t-1 against the teacher's top-k at t, on the k+1 outcomes S ∪ tail."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = []
    for b in range(batch["input_ids"].shape[0]):
        for t in range(1, batch["input_ids"].shape[1]):
            if not batch["response_mask"][b, t]:
                continue
            lq = torch.log_softmax(logits[b, t - 1].double(), -1)
            ids, lp = batch["topk_ids"][b, t].long(), batch["topk_logprobs"][b, t].double()
            p = torch.cat([lp.exp(), (1 - lp.exp().sum()).reshape(1)])
            q = torch.cat([lq[ids].exp(), (1 - lq[ids].exp().sum()).reshape(1)])
            losses.append((p * (p.log() - q.log())).sum())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("fused", [False, True])
def test_loss_uses_logits_at_the_previous_position(inputs, fused):
    root, init = inputs
    cfg = load_section("distill", params_file(root, loss="fkl"))
    module = TrainModule(load_for_training(init, cfg.precision)[0], cfg, loss_from_config(cfg, "p"), fused=fused)
    batch = collate(teacher_rows(5, K, module.model.config.vocab_size, seed=7), plain_format(K))
    got = module.compute_loss(batch).loss
    want = reference_coarse_fkl(module.model, batch)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def sampled_gap(model, batch) -> float:
    """Mean squared gap between teacher and student log-prob of the sampled tokens (what pg closes)."""
    with torch.no_grad():
        lq = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    m = batch["response_mask"][:, 1:]
    lq_a = lq[:, :-1].gather(2, batch["input_ids"][:, 1:, None])[..., 0][m]
    return float(((batch["teacher_logprob"][:, 1:][m] - lq_a) ** 2).mean())


@pytest.mark.parametrize("mode", ["pg", "fkl", "rkl", "jsd"])
def test_training_on_a_fixed_batch_reduces_the_objective(inputs, mode):
    root, init = inputs
    cfg = load_section("distill", params_file(root, loss=mode))
    module = TrainModule(load_for_training(init, cfg.precision)[0], cfg, loss_from_config(cfg, "p"))
    batch = collate(teacher_rows(8, K, module.model.config.vocab_size, seed=3), plain_format(K))
    opt = torch.optim.Adam(module.model.parameters(), lr=3e-3)
    first_gap = sampled_gap(module.model, batch)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        out = module.compute_loss(batch)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    if mode == "pg":   # the pg surrogate is not a divergence; the gap it closes is
        assert sampled_gap(module.model, batch) < 0.8 * first_gap
    else:
        assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("loss", [{}, {"loss": "taid", "loss_params": {"schedule": "adaptive", "alpha": 0.9}}])
def test_interrupted_run_resumes_to_the_same_result(inputs, monkeypatch, loss):
    """Also with TAID's adaptive t, whose state (t, momentum, previous loss) the checkpoint carries."""
    root, init = inputs
    run_distill(root, init, tag="_ref", max_steps=5, **loss)
    real_step = TrainModule.training_step

    def crash_at_3(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("simulated crash")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(TrainModule, "training_step", crash_at_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_distill(root, init, max_steps=5, **loss)
    crashed = torch.load(root / "logs" / "checkpoints" / "last.ckpt", weights_only=False)
    assert crashed["global_step"] == 3
    assert not (root / "out").exists()
    monkeypatch.setattr(TrainModule, "training_step", real_step)
    metrics = run_distill(root, init, max_steps=5, **loss)
    assert metrics["resumed"] is True and metrics["steps"] == 5
    assert loss_rows(root) == loss_rows(root, "_ref")
    final = [torch.load(root / f"logs{tag}" / "checkpoints" / "last.ckpt", weights_only=False)[OBJECTIVE_KEY]
             for tag in ("", "_ref")]
    assert final[0] == final[1]
    if loss:   # t had left its start and its linear floor when the run was cut, so the state mattered
        assert crashed[OBJECTIVE_KEY]["t"]["t"] > 0.4 + 0.6 * 2 / 5
    ref, got = weights(root / "out_ref"), weights(root / "out")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=1e-7)


def test_checkpoint_from_other_settings_is_discarded(inputs):
    root, init = inputs
    run_distill(root, init)
    old_stamp = (root / "logs" / "checkpoints" / "run_key.json").read_text()
    metrics = run_distill(root, init, lr=5e-3)
    assert metrics["resumed"] is False and metrics["steps"] == 3
    assert (root / "logs" / "checkpoints" / "run_key.json").read_text() != old_stamp
    assert [p.name for p in (root / "logs" / "csv").iterdir()] == ["version_0"]   # the old run's logs went too


def test_teacher_is_never_loaded(tmp_path, monkeypatch):
    teacher = save_model(tmp_path / "teacher", seed=9, hidden=32, layers=1)
    init = pi_ref(tmp_path / "pi_ref", teacher_fp=model_fingerprint(teacher))
    write_teacher_shards(tmp_path / "shards", pi_ref_meta(init, k=K, teacher_fp=model_fingerprint(teacher),
                                                          teacher_path=str(teacher)), n_parts=1, rows_per_part=16)
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        real = cls.from_pretrained.__func__

        def guarded(klass, path, *a, _real=real, **kw):
            assert Path(path).resolve() != teacher.resolve(), "distill loaded the teacher"
            return _real(klass, path, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(guarded))
    assert run_distill(tmp_path, init)["steps"] == 3


def test_mismatched_teacher_is_refused_then_recorded_with_the_override(tmp_path, capsys):
    init = pi_ref(tmp_path / "pi_ref")
    write_teacher_shards(tmp_path / "shards", pi_ref_meta(init, k=K, teacher_fp="0" * 16), n_parts=1, rows_per_part=16)
    with pytest.raises(SystemExit) as exit_info:
        run_distill(tmp_path, init)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: teacher mismatch") and "0" * 16 in err and "feedc0de" * 2 in err
    assert not (tmp_path / "out").exists()
    metrics = run_distill(tmp_path, init, allow_inconsistent_teacher=True)
    prov = read_provenance(tmp_path / "out")
    assert metrics["allow_inconsistent_teacher"] is True and metrics["consistency_override_used"] is True
    assert prov["allow_inconsistent_teacher"] is True and prov["consistency"]["mismatches"][0]["check"] == "teacher"


def test_corrupt_row_group_is_a_one_line_error_naming_the_file(inputs, capsys):
    root, init = inputs
    path = root / "shards" / "part-00001.parquet"
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    data[4:len(data) - footer] = b"\xff" * (len(data) - footer - 4)
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        run_distill(root, init, num_workers=2, max_steps=20)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {path}: its bytes do not match the checksum sealed in its footer")
    assert not (root / "out").exists()


def test_bad_loss_param_names_the_key(inputs, capsys):
    root, init = inputs
    with pytest.raises(SystemExit):
        run_distill(root, init, loss="jsd", loss_params={"bta": 0.5})
    assert "params.yaml: distill.loss_params.bta: not a parameter of loss 'jsd'" in capsys.readouterr().err

