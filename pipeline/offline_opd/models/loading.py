"""Loading models and tokenizers from local Hugging Face folders, with errors that say what to fix.

A stage output such as `data/models/teacher/` is either a real model folder (the toy models) or a
small folder holding `opd_model_ref.json`, which points at a large model elsewhere (a real teacher is
fingerprinted, not copied). Every loader resolves refs first, so the toy path and the real path are
the same code.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from offline_opd.errors import UserError

REF_FILE = "opd_model_ref.json"
MAX_POSITIONS = 256


class ModelPathError(UserError, FileNotFoundError):
    """A model path does not exist or is not a Hugging Face model folder."""


def resolve_model_dir(path: Path | str) -> Path:
    """The real model folder behind `path` (following an `opd_model_ref.json` if present)."""
    path = Path(path)
    if not path.exists():
        raise ModelPathError(f"model path {path} does not exist: run the stage that writes it "
                             f"(`dvc repro`) or fix the path in params.yaml")
    if not path.is_dir():
        raise ModelPathError(f"model path {path} is a file; expected a Hugging Face model folder")
    ref = path / REF_FILE
    if ref.exists():
        target = Path(json.loads(ref.read_text())["path"])
        if not target.exists():
            raise ModelPathError(f"{ref} points at {target}, which does not exist")
        path = target
    if not (path / "config.json").exists():
        raise ModelPathError(f"{path} has no config.json: not a Hugging Face model folder")
    return path


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_source(source: str) -> Path:
    """A params `source` (a local model folder, or a Hugging Face hub id such as `Qwen/Qwen3-0.6B`)
    as a local folder. Anything that exists locally, or looks like a path, is a path; only a bare
    `org/name` that does not exist locally is fetched with huggingface_hub (into its usual cache)."""
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or not HUB_ID.fullmatch(source):
        return resolve_model_dir(path)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(source)
    except Exception as exc:  # offline, unknown id, gated repo: all end the same way for the user
        raise ModelPathError(f"model {source!r} is not a local folder and could not be fetched from the "
                             f"Hugging Face hub ({type(exc).__name__}: {exc}); download it first and put "
                             f"its local path in params.yaml") from exc
    return resolve_model_dir(local)


def build_llama(tokenizer, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                seed: int):
    """A randomly initialised (seeded) Llama with tied embeddings sized for `tokenizer`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, do_sample=False)
    return model


def prune_layers(model, keep: int, where: str) -> list[int]:
    """Keep `keep` decoder layers of `model` in place: the first and last, the rest evenly spaced.

    Why these: the first and last layers map into and out of the embedding space and are the most
    damaging to remove (Minitron, arXiv 2407.14679); the middle ones are redundant enough that a short
    SFT recovers most of the loss. Returns the kept layer indices (recorded in the config).
    """
    import torch

    layers = model.model.layers
    total = len(layers)
    if not 1 <= keep <= total:
        raise UserError(f"{where}: {keep} layers requested but the model has {total}; use 1..{total}")
    kept = sorted({round(i * (total - 1) / max(1, keep - 1)) for i in range(keep)}) if keep > 1 else [0]
    model.model.layers = torch.nn.ModuleList([layers[i] for i in kept])
    for new, layer in enumerate(model.model.layers):  # the KV cache indexes layers by position
        layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    return kept
@contextmanager
def loading(folder: Path, files: str) -> Iterator[None]:
    """Turn a damaged model folder (truncated weights, corrupt config.json or tokenizer files) into one
    line naming the files, instead of a library traceback deep in a later stage."""
    from safetensors import SafetensorError

    try:
        yield
    except ModelPathError:
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ModelPathError(f"{folder}/{files}: does not load ({type(exc).__name__}: {detail}); the folder is "
                             f"damaged or incomplete: rerun the stage that wrote it (dvc repro -f) or restore "
                             f"it") from exc


def load_config(path: Path | str):
    """The model's transformers config (config.json), a damaged file reported as such."""
    from transformers import AutoConfig

    folder = resolve_model_dir(path)
    with loading(folder, "config.json"):
        return AutoConfig.from_pretrained(folder)


def parameter_count(path: Path | str) -> int:
    """Number of parameters of the model in `path`, from its config alone (no weights are read)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def write_model_ref(out_dir: Path | str, target: Path | str, extra: dict | None = None) -> None:
    from offline_opd.atomic import write_json

    write_json(Path(out_dir) / REF_FILE, {"path": str(Path(target).resolve()), **(extra or {})})


def load_tokenizer(path: Path | str, padding_side: str = "left"):
    """Tokenizer with a pad token and left padding (batched generation and scoring need both)."""
    from transformers import AutoTokenizer

    folder = resolve_model_dir(path)
    with loading(folder, "tokenizer files"):
        tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: Path | str, device: str = "cpu", dtype: str = "float32"):
    """A causal LM in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(path)
    load_config(folder)  # a corrupt config.json is named as such, not as a weights problem
    with loading(folder, ", ".join(sorted(p.name for p in folder.glob("*.safetensors"))) or "weights"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
