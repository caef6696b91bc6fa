"""Model and tokenizer fingerprints: what "the same teacher" means, exactly (design §5).

A model fingerprint hashes the config, the weight file contents, the tokenizer files and the chat
template, so two copies of one model in different folders agree and any changed weight byte
disagrees. A tokenizer fingerprint hashes what decides token ids (vocabulary, added and special
tokens), so a teacher and a student that tokenize identically agree even when their
`tokenizer_config.json` differ in cosmetic fields. Hashing tens of GB of weights is slow, so both are
cached, keyed on each file's path, size and mtime.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from pipeline.atomic import write_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "vocab.txt", "merges.txt", "added_tokens.json", "tokenizer.model")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# Fields save_pretrained writes that say where or with what a model was saved, not what it is.
VOLATILE_JSON_KEYS = {"transformers_version", "_name_or_path", "name_or_path", "torch_dtype_str"}
SHORT = 16


def cache_path() -> Path:
    root = os.environ.get("OPD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "offline-opd")
    return Path(root) / "fingerprints.json"


def _model_files(model_dir: Path) -> list[Path]:
    names = [p for p in sorted(model_dir.iterdir()) if p.is_file()]
    keep = [p for p in names if p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)
            or p.name in TOKENIZER_FILES or p.name in CHAT_TEMPLATE_FILES]
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in keep):
        raise FileNotFoundError(f"{model_dir}: no weight files (*.safetensors or *.bin); not a model folder")
    return keep


def _file_digest(path: Path) -> str:
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        if isinstance(obj, dict):
            canon = {k: v for k, v in obj.items() if k not in VOLATILE_JSON_KEYS}
            return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def _cache_key(kind: str, model_dir: Path, files: list[Path]) -> str:
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps([kind, str(model_dir.resolve()), stats]).encode()).hexdigest()


def _cached(kind: str, model_dir: Path, files: list[Path], compute) -> str:
    key = _cache_key(kind, model_dir, files)
    path = cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key not in cache:
        cache[key] = compute()
        try:
            write_json(path, cache)
        except OSError:
            pass  # a read-only home only costs a recomputation next time
    return cache[key]


def model_fingerprint(model_dir: Path | str) -> str:
    """Hash of config, weights, tokenizer files and chat template of a Hugging Face model folder."""
    model_dir = _existing_dir(model_dir)
    files = _model_files(model_dir)

    def compute() -> str:
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}\0{_file_digest(p)}\n".encode())
        return h.hexdigest()[:SHORT]

    return _cached("model", model_dir, files, compute)


def tokenizer_fingerprint(model_dir: Path | str) -> str:
    """Hash of the token-to-id mapping and special tokens: equal iff two tokenizers assign equal ids."""
    model_dir = _existing_dir(model_dir)
    files = [p for p in sorted(model_dir.iterdir()) if p.name in TOKENIZER_FILES]
    if not files:
        raise FileNotFoundError(f"{model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")

    def compute() -> str:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        payload = {
            "vocab": sorted(tok.get_vocab().items()),
            "special": sorted((name, str(tok.convert_tokens_to_ids(t)) if isinstance(t, str) else str(t))
                              for name, t in tok.special_tokens_map.items()),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:SHORT]

    return _cached("tokenizer", model_dir, files, compute)


def _existing_dir(model_dir: Path | str) -> Path:
    from pipeline.models import resolve_model_dir

    return resolve_model_dir(model_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="opd-fingerprint",
        description="Print the model and tokenizer fingerprints of Hugging Face model folders "
                    "(cached by path, size and mtime; the first call on a large model reads every weight byte).")
    parser.add_argument("model_dirs", nargs="+", help="local model folders (or pipeline model refs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per folder")
    args = parser.parse_args(argv)
    for d in args.model_dirs:
        row = {"path": d, "model": model_fingerprint(d), "tokenizer": tokenizer_fingerprint(d)}
        print(json.dumps(row) if args.json else f"{row['model']}  tokenizer={row['tokenizer']}  {d}")


if __name__ == "__main__":
    main()
