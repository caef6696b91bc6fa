"""bench/cost.py's grown teacher: a bigger model (more layers, more MLP neurons) that says exactly what the
teacher says, so the cost comparison's online student learns and samples as with the real teacher."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from offline_opd.provenance.fingerprint import tokenizer_fingerprint
from tests.tiny_models import load_bench, save_model

@pytest.fixture(scope="module")
def cost():
    return load_bench("cost")


def test_grown_teacher_is_bigger_and_returns_the_same_logits(tmp_path, cost):
    teacher = save_model(tmp_path / "teacher", seed=3, hidden=32, layers=2)
    grown = cost.grown_teacher(teacher, 5, 256, tmp_path / "grown")
    small, big = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (teacher, grown))
    assert big.config.num_hidden_layers == 5 and big.config.intermediate_size == 256
    assert sum(p.numel() for p in big.parameters()) > 3 * sum(p.numel() for p in small.parameters())
    ids = torch.randint(3, small.config.vocab_size, (3, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        torch.testing.assert_close(big(**batch).logits, small(**batch).logits, rtol=0, atol=1e-5)
    assert cost.check_same_logits(teacher, grown, batch) <= 1e-5
    assert tokenizer_fingerprint(grown) == tokenizer_fingerprint(teacher)   # teacher_topk's structural check


def test_grown_teacher_refuses_to_shrink(tmp_path, cost):
    teacher = save_model(tmp_path / "teacher", seed=3, hidden=32, layers=2)
    with pytest.raises(SystemExit, match="grow, do not shrink"):
        cost.grown_teacher(teacher, 1, 256, tmp_path / "grown")
