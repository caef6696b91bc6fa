"""The `hf` backend's teacher scoring: per response token, the teacher's top-k and the sampled token's log-prob.

One prefill per batch, no decoding: position t of a sequence scores token input_ids[prompt_len + t]
given everything before it, at temperature 1 (the teacher's own distribution; the student's sampling
temperature is a property of the rollouts, not of the teacher). The sampled token's log-prob is
gathered separately from the top-k, so it is exact even when the token ranks outside the top-k: the
`pg` loss and the tail bucket of the sparse divergences both need it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from offline_opd.backends.base import SCORING_TEMPERATURE, Extras, Scored, check_inputs
from offline_opd.backends.generation import length_batches, left_pad
from offline_opd.contract.sparse_targets import Selection, select

LOGPROB_CHUNK_ELEMS = 1 << 26  # fp32 log-prob elements per block of positions (256 MiB)


class HFScorer:
    """Batched left-padded prefill of a loaded transformers model; log_softmax in fp32 on the response positions only."""

    def __init__(self, model, pad_id: int, batch_size: int) -> None:
        self.model, self.pad_id, self.batch_size = model, pad_id, batch_size
        self.device = model.device

    def score(self, input_ids: list[list[int]], prompt_lens: list[int], k: int,
              extras: Optional[Extras] = None) -> list[Scored]:
        from tqdm import tqdm

        check_inputs(input_ids, prompt_lens, k, self.model.config.get_text_config().vocab_size)
        extras = extras or Extras(Selection("topk", k))
        out: list[Scored | None] = [None] * len(input_ids)
        for idx in tqdm(length_batches([len(s) for s in input_ids], self.batch_size), desc="score",
                        unit="batch", leave=False):
            for i, scored in zip(idx, self._score_batch([input_ids[i] for i in idx],
                                                        [len(input_ids[i]) - prompt_lens[i] for i in idx],
                                                        extras, idx)):
                out[i] = scored
        return out

    def _score_batch(self, seqs: list[list[int]], resp_lens: list[int], extras: Extras,
                     idx: list[int]) -> list[Scored]:
        import torch

        ids, mask, positions = left_pad(seqs, self.pad_id, self.device)
        # Left padding right-aligns every sequence, so all response tokens lie in the last
        # max(resp_lens) columns and only those logits (plus one) are computed.
        width = max(resp_lens)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                logits_to_keep=width + 1).logits[:, :-1]
            targets = ids[:, ids.shape[1] - width:]
            # fp32 log-probs a block of positions at a time: peak memory stays near the logits
            # themselves instead of three [B, width, V] fp32 copies (gigabytes at V = 152k).
            step = max(1, LOGPROB_CHUNK_ELEMS // (logits.shape[0] * logits.shape[-1]))
            per_row = {name: _right_aligned([getattr(extras, name)[i] for i in idx], resp_lens, width)
                       for name in ("uniforms", "union_ids") if getattr(extras, name) is not None}
            parts = []
            for s in range(0, max(width, 1), step):  # one (empty) block when no response tokens
                logp = torch.log_softmax(logits[:, s:s + step].float() / SCORING_TEMPERATURE, dim=-1)
                B, S, V = logp.shape
                block = {name: torch.from_numpy(a[:, s:s + step].reshape(B * S, -1)) for name, a in per_row.items()}
                chosen = select(logp.reshape(B * S, V), extras.selection, block.get("union_ids"), block.get("uniforms"))
                parts.append([logp.gather(-1, targets[:, s:s + step, None]).squeeze(-1),
                              *(None if x is None else x.reshape(B, S, *x.shape[1:]) for x in chosen)])
            cols = [None if x[0] is None else torch.cat(x, dim=1).cpu().numpy() for x in zip(*parts)]
        sampled, top_ids, top_lp, counts, tail = cols
        top_ids = top_ids.astype(np.int32)
        return [Scored(sampled[r, width - n:], top_ids[r, width - n:], top_lp[r, width - n:], tail[r, width - n:],
                       None if counts is None else counts[r, width - n:])
                for r, n in enumerate(resp_lens)]


def _right_aligned(per_seq: list[np.ndarray], resp_lens: list[int], width: int) -> np.ndarray:
    """[B, width, e] from per-sequence [T_r, e] arrays, right-aligned like the left-padded batch (-1 elsewhere)."""
    e = per_seq[0].shape[1] if per_seq else 0
    out = np.full((len(per_seq), width, e), -1, dtype=per_seq[0].dtype if per_seq else np.float64)
    for r, (a, n) in enumerate(zip(per_seq, resp_lens)):
        out[r, width - n:] = a[:n]
    return out
