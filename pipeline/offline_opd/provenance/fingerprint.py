"""Model and tokenizer fingerprints: what "the same teacher" means, exactly (docs/design.md §5).

A model fingerprint hashes the config, the weight file contents, the tokenizer files and the chat
template, so two copies of one model in different folders agree and any changed weight byte
disagrees. A tokenizer fingerprint hashes what decides token ids (vocabulary, added and special
tokens, normalizer, pre-tokenizer, merges, post-processor), so a teacher and a student that
tokenize identically agree even when their `tokenizer_config.json` differ in cosmetic fields.
Hashing tens of GB of weights is slow, so both are cached, keyed on the folder's path and each
file's name, size, mtime and ctime (and inode, so that a folder renamed into place keeps its entry).
The ctime is what catches an edit in place whose mtime was put back (`touch -r`, `cp -p`, rsync -t):
setting a file's times sets its ctime to now, and nothing but the clock can set a ctime back.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from offline_opd.atomic import write_json
from offline_opd.errors import UserError
from offline_opd.models.loading import ModelPathError, loading, resolve_model_dir

# What transformers loads, in its order of preference: (index file, single file).
WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "vocab.txt", "merges.txt", "added_tokens.json", "tokenizer.model")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# Fields save_pretrained writes that say where or with what a model was saved, not what it is.
VOLATILE_JSON_KEYS = {"transformers_version", "_name_or_path", "name_or_path", "torch_dtype_str"}
SHORT = 16
FIX_TOKENIZER = ("teacher and student must share one tokenizer: rebuild them with the same tokenizer and rerun "
                 "`dvc repro`")


class TokenizerMismatch(UserError, ValueError):
    """Models that must read text into the same token ids do not. The message names both and the fix."""


def cache_path() -> Path:
    root = os.environ.get("OPD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "offline-opd")
    return Path(root) / "fingerprints.json"


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files transformers would load, and only those.

    Trainer checkpoints also hold optimizer.pt, rng_state.pth or training_args.bin, and some repos
    ship a second copy of the weights (consolidated.safetensors); hashing those would make one model
    fingerprint differently depending on what lies beside it.
    """
    for index, single in WEIGHT_LAYOUTS:
        if (model_dir / index).exists():
            try:
                names = sorted(set(json.loads((model_dir / index).read_text())["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, AttributeError) as exc:
                raise ModelPathError(f"{model_dir / index}: unreadable weight index ({exc!r}); "
                                     f"re-save the model") from None
            missing = [n for n in names if not (model_dir / n).is_file()]
            if missing:
                raise ModelPathError(f"{model_dir / index} lists {missing[0]}, which is missing: the download or "
                                     f"copy is incomplete")
            return [model_dir / n for n in names]
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise ModelPathError(f"{model_dir}: no weights (model.safetensors, a sharded index, or pytorch_model.bin); "
                         f"not a Hugging Face model folder, or its download is incomplete")


def _model_files(model_dir: Path) -> list[Path]:
    described = [p for p in sorted(model_dir.iterdir()) if p.is_file() and (
        p.name == "config.json" or p.name in TOKENIZER_FILES or p.name in CHAT_TEMPLATE_FILES)]
    return sorted(described + weight_files(model_dir))


def _file_digest(path: Path, bar: tqdm) -> str:
    """sha256 of a file; JSON files minus the fields that only say where or with what they were saved."""
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        if isinstance(obj, dict):
            canon = {k: v for k, v in obj.items() if k not in VOLATILE_JSON_KEYS}
            bar.update(path.stat().st_size)
            return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _cached(kind: str, model_dir: Path, files: list[Path], compute: Callable[[], dict[str, Any]],
            needs: str = "fingerprint") -> dict[str, Any]:
    """One entry per (kind, folder), valid while every file keeps its name, size, mtime and ctime.

    Keying entries on the folder (not on the stats) lets a retrained model replace its old entry,
    and entries of folders that no longer exist (atomic_dir temporaries) are dropped on write, so
    the cache stays as small as the set of model folders on disk. A folder renamed into place (what
    atomic_dir does after a stage fingerprints its output) keeps its files' inodes and ctimes too, so
    the next stage takes the entry made under the temporary name instead of reading every weight byte
    again; a copy (new inodes, even with mtimes preserved) is hashed, and so is a file edited in place
    whose mtime was restored (its ctime moved). An entry lacking the field `needs` (written by an older
    version) is recomputed.
    """
    slot = f"{kind}:{model_dir.resolve()}"
    stats, inodes = [], []
    for p in files:
        st = p.stat()
        stats.append([p.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
        inodes.append([st.st_dev, st.st_ino])
    path = cache_path()
    cache = _read_cache(path)
    entry = cache.get(slot)
    if isinstance(entry, dict) and entry.get("files") == stats and needs in entry:
        return entry
    renamed = next((e for k, e in cache.items() if k.startswith(f"{kind}:") and isinstance(e, dict)
                    and e.get("files") == stats and e.get("inodes") == inodes and needs in e), None)
    value = {k: v for k, v in renamed.items() if k not in ("files", "inodes")} if renamed is not None else compute()
    # Re-read: other processes may have added entries while this one was hashing.
    cache = {k: v for k, v in _read_cache(path).items() if Path(k.partition(":")[2]).is_dir()}
    cache[slot] = {"files": stats, "inodes": inodes, **value}
    try:
        write_json(path, cache)
    except OSError:
        pass  # a read-only home only costs a recomputation next time
    return cache[slot]


def model_file_digests(model_dir: Path | str) -> dict[str, str]:
    """sha256 of each file the model fingerprint covers (config, weights, tokenizer, chat template), by name.

    Recorded in opd_provenance.json, so that a folder changed after its stage wrote it is reported by
    the file that changed (offline_opd.provenance.record.check_unchanged).
    """
    return dict(_model_entry(resolve_model_dir(model_dir))["digests"])


def model_fingerprint(model_dir: Path | str) -> str:
    """Hash of config, weights, tokenizer files and chat template of a Hugging Face model folder.

    File names and contents only, never paths: a copy elsewhere agrees, one changed weight byte does not.
    """
    return _model_entry(resolve_model_dir(model_dir))["fingerprint"]


def _model_entry(model_dir: Path) -> dict[str, Any]:
    files = _model_files(model_dir)

    def compute() -> dict[str, Any]:
        total = sum(p.stat().st_size for p in files)
        with tqdm(total=total, desc=f"fingerprint {model_dir}", unit="B", unit_scale=True,
                  disable=total < 1 << 28) as bar:
            digests = {p.name: _file_digest(p, bar) for p in files}
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}\0{digests[p.name]}\n".encode())
        return {"fingerprint": h.hexdigest()[:SHORT], "digests": digests}

    return _cached("model", model_dir, files, compute, needs="digests")


def tokenizer_fingerprint(model_dir: Path | str) -> str:
    """Hash of what decides token ids: equal iff two tokenizers turn every text into the same ids.

    That is the vocabulary and added tokens plus the normalizer, pre-tokenizer, merges and
    post-processor (two tokenizers with one vocabulary but different merges split text differently),
    and the ids of the special tokens; not cosmetic `tokenizer_config.json` fields such as
    model_max_length, so a teacher and a student of one family agree.
    """
    model_dir = resolve_model_dir(model_dir)
    files = [p for p in sorted(model_dir.iterdir()) if p.name in TOKENIZER_FILES]
    if not files:
        raise ModelPathError(f"{model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                             f"save the tokenizer into the model folder with save_pretrained")

    def compute() -> str:
        from transformers import AutoTokenizer

        with loading(model_dir, "tokenizer files"):
            tok = AutoTokenizer.from_pretrained(model_dir)
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            rules = json.loads(backend.to_str())
            rules.pop("truncation", None)
            rules.pop("padding", None)
        else:  # tokenizers without a Rust backend: the id mapping is all that can be compared
            rules = {"vocab": sorted(tok.get_vocab().items())}
        special = {name: tok.convert_tokens_to_ids(value) for name, value in tok.special_tokens_map.items()}
        payload = json.dumps({"rules": rules, "special": special}, sort_keys=True)
        return {"fingerprint": hashlib.sha256(payload.encode()).hexdigest()[:SHORT]}

    return _cached("tokenizer", model_dir, files, compute)["fingerprint"]


def check_same_tokenizer(models: dict[str, Path]) -> str:
    """Every model reads text into the same ids (evaluate compares their answers and log-probs token by token).
    Returns the shared tokenizer fingerprint."""
    fps = {name: tokenizer_fingerprint(path) for name, path in models.items()}
    first = next(iter(models))
    other = next((n for n in models if fps[n] != fps[first]), None)
    if other is not None:
        raise TokenizerMismatch(f"tokenizer mismatch: {other} {models[other]} has tokenizer {fps[other]} but "
                               f"{first} {models[first]} has {fps[first]}; fix: {FIX_TOKENIZER}")
    return fps[first]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="opd-fingerprint",
        description="Print the model and tokenizer fingerprints of Hugging Face model folders. The model "
                    "fingerprint hashes config, weights, tokenizer files and chat template (not paths: copies "
                    "agree); the tokenizer fingerprint hashes what decides token ids. Both are cached by file "
                    "name, size, mtime and ctime in $OPD_CACHE_DIR (default ~/.cache/offline-opd): the first call on a "
                    "large model reads every weight byte, later calls are instant.")
    parser.add_argument("model_dirs", nargs="+", type=Path,
                        help="local model folders (or pipeline outputs holding opd_model_ref.json)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per folder")
    args = parser.parse_args(argv)
    from offline_opd.runtime import closed_pipe_is_quiet

    with closed_pipe_is_quiet():  # `opd-fingerprint a b c | head -1` stops quietly
        for d in args.model_dirs:
            try:
                row = {"path": str(d), "model": model_fingerprint(d), "tokenizer": tokenizer_fingerprint(d)}
            except ModelPathError as exc:
                print(f"error: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            print(json.dumps(row) if args.json else f"{row['model']}  tokenizer={row['tokenizer']}  {d}", flush=True)


if __name__ == "__main__":
    main()
