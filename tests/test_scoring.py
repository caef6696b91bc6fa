"""The hf scorer against an unbatched manual forward: top-k ids and log-probs, and the exact sampled log-prob."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny_models import hf_engine, save_model

K = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return save_model(tmp_path_factory.mktemp("score") / "teacher", seed=11)


def sequences(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Ragged prompts and responses of random tokens, so many responses rank outside the top-k."""
    rng = np.random.default_rng(seed)
    seqs, prompt_lens = [], []
    for _ in range(7):
        p, t = int(rng.integers(1, 9)), int(rng.integers(0, 14))
        seqs.append(rng.integers(0, vocab, p + t).tolist())
        prompt_lens.append(p)
    return seqs, prompt_lens


def test_scorer_matches_manual_forward(model_dir):
    scorer = hf_engine(model_dir, batch_size=3)
    vocab = scorer.model.config.vocab_size
    seqs, prompt_lens = sequences(vocab)
    scored = scorer.score(seqs, prompt_lens, k=K)
    outside = 0
    for ids, p, s in zip(seqs, prompt_lens, scored):
        t = len(ids) - p
        assert s.teacher_logprob.shape == (t,) and s.teacher_logprob.dtype == np.float32
        assert s.topk_ids.shape == (t, K) and s.topk_ids.dtype == np.int32
        assert s.topk_logprobs.shape == (t, K) and s.topk_logprobs.dtype == np.float32
        with torch.no_grad():
            logp = torch.log_softmax(scorer.model(torch.tensor([ids])).logits[0].float(), -1)[p - 1:-1]
        response = torch.tensor(ids[p:], dtype=torch.long)
        np.testing.assert_allclose(s.teacher_logprob, logp.gather(1, response[:, None]).squeeze(1).numpy(),
                                   atol=1e-5)
        ref_lp, ref_ids = logp.topk(K, dim=-1)
        np.testing.assert_array_equal(s.topk_ids, ref_ids.numpy())
        np.testing.assert_allclose(s.topk_logprobs, ref_lp.numpy(), atol=1e-5)
        assert np.all(np.diff(s.topk_logprobs, axis=1) <= 0), "top-k log-probs must be descending"
        outside += int((~(s.topk_ids == np.asarray(ids[p:])[:, None]).any(1)).sum())
    assert outside > 5, "the test must cover sampled tokens outside the top-k"


def test_batch_size_does_not_change_scores(model_dir):
    scorer = hf_engine(model_dir, batch_size=7)
    seqs, prompt_lens = sequences(scorer.model.config.vocab_size, seed=1)
    a = scorer.score(seqs, prompt_lens, k=K)
    b = hf_engine(model_dir, batch_size=1).score(seqs, prompt_lens, k=K)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.teacher_logprob, y.teacher_logprob, atol=1e-5)
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=1e-5)


def test_k_zero_and_bad_inputs(model_dir):
    scorer = hf_engine(model_dir, batch_size=4)
    (s,) = scorer.score([[2, 3, 4, 5]], [2], k=0)
    assert s.topk_ids.shape == (2, 0) and s.teacher_logprob.shape == (2,)
    with pytest.raises(ValueError, match="prompt_len"):
        scorer.score([[2, 3]], [0], k=2)
    with pytest.raises(ValueError, match="vocabulary size"):
        scorer.score([[2, 3]], [1], k=10_000)


def test_position_blocks_do_not_change_scores(model_dir, monkeypatch):
    """Log-probs are computed a block of positions at a time; one position per block must agree exactly."""
    import offline_opd.backends.scoring as scoring

    scorer = hf_engine(model_dir, batch_size=7)
    seqs, prompt_lens = sequences(scorer.model.config.vocab_size, seed=3)
    whole = scorer.score(seqs, prompt_lens, k=K)
    monkeypatch.setattr(scoring, "LOGPROB_CHUNK_ELEMS", 1)
    blocked = scorer.score(seqs, prompt_lens, k=K)
    for a, b in zip(whole, blocked):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        np.testing.assert_array_equal(a.teacher_logprob, b.teacher_logprob)
