"""The embedded toy models: a character-level tokenizer and tiny seeded Llamas on it, built locally in well
under a second (never downloaded), for the scratch teacher (`teacher.source: scratch`), smoke runs,
benchmarks and tests that need a real Hugging Face folder without a real model. Generic model code
(models/loading.py) knows nothing of them: a real model brings its own tokenizer.
"""

from __future__ import annotations

import string
from pathlib import Path

from offline_opd.models.loading import MAX_POSITIONS, build_llama

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
# The toy models' alphabet: printable ASCII plus newline, enough for the toy task and any plain-text
# prompt. The tokenizer is built from it here, not by the task, so the toy teacher and a scratch
# student need no task code.
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]


def build_char_tokenizer():
    """A character-level fast tokenizer: one token per character, `<bos>` prepended, exact decoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()  # join characters back without the default space separator
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, clean_up_tokenization_spaces=False,
                                   model_max_length=MAX_POSITIONS)



def save_toy_model(out: Path, seed: int = 0, hidden: int = 16, layers: int = 2) -> Path:
    """A toy Llama with random (seeded) weights plus the character tokenizer, saved in `out`."""
    tok = build_char_tokenizer()
    build_llama(tok, hidden, layers, 2, 2 * hidden, seed).save_pretrained(out)
    tok.save_pretrained(out)
    return out
