"""The embedded toy models: tiny seeded Llamas on the character-level tokenizer, built locally in well
under a second (never downloaded), for smoke runs, benchmarks and tests that need a real Hugging Face
folder without a real model."""

from __future__ import annotations

from pathlib import Path

from offline_opd.models.loading import build_char_tokenizer, build_llama


def save_toy_model(out: Path, seed: int = 0, hidden: int = 16, layers: int = 2) -> Path:
    """A toy Llama with random (seeded) weights plus the character tokenizer, saved in `out`."""
    tok = build_char_tokenizer()
    build_llama(tok, hidden, layers, 2, 2 * hidden, seed).save_pretrained(out)
    tok.save_pretrained(out)
    return out
