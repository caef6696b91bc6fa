"""The toy task's contract: a real char tokenizer and Llama model, deterministic disjoint splits, a fair verifier."""

import pytest

from offline_opd.models.loading import build_llama
from offline_opd.models.toy import build_char_tokenizer
from offline_opd.tasks import addition as toy_task
from offline_opd.tasks.verifiers import numeric


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_tokenizer_round_trips_and_decodes_exactly(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    text = "864+394=4+4+0=08 6+9+0=15  8+3+1=12 =1258\nWhat is 2 + 2?"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character, plus <bos>
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert not getattr(loaded, "chat_template", None)


def test_model_round_trips_with_special_ids(tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = build_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                 seed=3)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    assert torch.allclose(loaded(ids).logits, model.eval()(ids).logits)
    for cfg in (loaded.config, loaded.generation_config):
        assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
            tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    other = build_llama(tokenizer, 32, 1, 2, 64, seed=4)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_solution_is_a_correct_long_trace(tokenizer):
    for p in toy_task.make_problems(3, 200, seed=1):
        a, b = (int(x) for x in p.prompt[:-1].split("+"))
        assert p.answer == str(a + b)
        assert p.solution.endswith("=" + p.answer)
        assert len(tokenizer(p.solution, add_special_tokens=False)["input_ids"]) >= 30
        assert numeric(p.solution, p.answer)
    assert toy_task.solve("864+394=") == "4+4+0=08 6+9+0=15 8+3+1=12 =1258"


def test_terse_style_is_the_same_computation_in_other_text(tokenizer):
    """The mismatched teacher's style (bench/opd_table.py): the same answer, other tokens, same tokenizer."""
    assert toy_task.solve("864+394=", "terse") == "4+4=8 6+9=15 8+3+1=12 =1258"
    for p in toy_task.make_problems(3, 200, seed=2):
        terse = toy_task.solve(p.prompt, "terse")
        assert numeric(terse, p.answer) and terse != p.solution
        assert tokenizer.decode(tokenizer(terse, add_special_tokens=False)["input_ids"]) == terse
    with pytest.raises(ValueError, match="unknown trace style 'fancy'"):
        toy_task.solve("1+2=", "fancy")


def test_problems_deterministic_and_splits_disjoint():
    assert toy_task.make_problems(3, 50, seed=7) == toy_task.make_problems(3, 50, seed=7)
    assert toy_task.make_problems(3, 50, seed=7) != toy_task.make_problems(3, 50, seed=8)
    splits = toy_task.make_splits(3, {"sft": 400, "opd": 100, "eval": 100}, seed=0)
    prompts = [p.prompt for split in splits.values() for p in split]
    assert len(prompts) == len(set(prompts)) == 600
    assert len({p.prompt_id for split in splits.values() for p in split}) == 600
    assert splits == toy_task.make_splits(3, {"sft": 400, "opd": 100, "eval": 100}, seed=0)


def test_make_problems_refuses_more_than_exist():
    with pytest.raises(ValueError, match="only 81"):
        toy_task.make_problems(1, 82, seed=0)
