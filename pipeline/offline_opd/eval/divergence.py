"""Full-vocabulary KL between two loaded models on the same sequences, a block of positions at a time.

Why blocks: at a real vocabulary (49k for SmolLM2, 152k for Qwen3) the fp32 log-softmax of a whole
batch, [B, T, V] for two models, is gigabytes. Like the `hf` scorer, only the response positions'
logits are computed (left padding right-aligns every response), and they are turned into fp32
log-probs LOGPROB_CHUNK_ELEMS elements at a time, so peak memory stays near the two models' logits.
"""

from __future__ import annotations

from typing import Sequence

from offline_opd.backends.generation import left_pad, length_batches
from offline_opd.backends.scoring import LOGPROB_CHUNK_ELEMS


def response_logits(model, seqs: list[list[int]], width: int, pad_id: int):
    """Logits at the last `width` positions that predict a token of the left-padded `seqs`: [B, width, V]."""
    ids, mask, positions = left_pad(seqs, pad_id, model.device)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1).logits[:, :-1]


def divergences(teacher, student, prompt_ids: Sequence[list[int]], responses: Sequence[list[int]],
                batch_size: int, pad_id: int) -> dict[str, float]:
    """Mean KL(teacher ‖ student) (`fkl`) and KL(student ‖ teacher) (`rkl`) over all response tokens."""
    import torch
    from tqdm import tqdm

    sums = {"fkl": 0.0, "rkl": 0.0}
    tokens = 0
    keep = [i for i, r in enumerate(responses) if r]
    for idx in tqdm(length_batches([len(prompt_ids[i]) + len(responses[i]) for i in keep], batch_size),
                    desc="divergence", unit="batch", leave=False):
        rows = [keep[i] for i in idx]
        seqs = [prompt_ids[i] + responses[i] for i in rows]
        lens = torch.tensor([len(responses[i]) for i in rows])
        width = int(lens.max())
        with torch.inference_mode():
            t_logits = response_logits(teacher, seqs, width, pad_id)
            s_logits = response_logits(student, seqs, width, pad_id)
            # Column c of the right-aligned block belongs to a response iff c >= width - len.
            valid = (torch.arange(width)[None] >= width - lens[:, None]).to(t_logits.device)
            step = max(1, LOGPROB_CHUNK_ELEMS // (len(rows) * t_logits.shape[-1]))
            for s in range(0, width, step):
                lp = torch.log_softmax(t_logits[:, s:s + step].float(), -1)
                lq = torch.log_softmax(s_logits[:, s:s + step].float(), -1)
                m = valid[:, s:s + step]
                sums["fkl"] += float(((lp.exp() * (lp - lq)).sum(-1) * m).sum())
                sums["rkl"] += float(((lq.exp() * (lq - lp)).sum(-1) * m).sum())
        tokens += int(lens.sum())
    return {k: v / max(1, tokens) for k, v in sums.items()}
