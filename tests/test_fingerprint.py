"""Fingerprints: copies agree, any changed weight byte or tokenization rule disagrees, the cache is honest."""

import json
import os
import shutil

import pytest

from offline_opd.provenance import fingerprint as fpm
from offline_opd.provenance.fingerprint import main, model_fingerprint, tokenizer_fingerprint
from offline_opd.models.loading import ModelPathError, write_model_ref
from offline_opd.provenance.record import write_provenance
from tests.tiny_models import save_model, swap_token_ids


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def model(tmp_path):
    return save_model(tmp_path / "model", seed=0)


def flip_last_weight_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_copies_agree_across_folders_and_mtimes(model, tmp_path):
    copy = tmp_path / "far" / "away" / "copy"
    shutil.copytree(model, copy, copy_function=shutil.copy)  # fresh mtimes
    os.utime(copy / "model.safetensors", ns=(1, 1))
    assert model_fingerprint(copy) == model_fingerprint(model)
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(model)


def test_one_changed_weight_byte_changes_the_model_not_the_tokenizer(model, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(model, copy)
    flip_last_weight_byte(copy / "model.safetensors")
    assert model_fingerprint(copy) != model_fingerprint(model)
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(model)


def test_saving_the_same_weights_twice_agrees_despite_volatile_fields(model, tmp_path):
    copy = tmp_path / "resaved"
    shutil.copytree(model, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "transformers_version": "0.0", "_name_or_path": "/x"}))
    assert model_fingerprint(copy) == model_fingerprint(model)
    (copy / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    assert model_fingerprint(copy) != model_fingerprint(model)


def test_chat_template_is_part_of_the_model_only(model, tmp_path):
    copy = tmp_path / "chat"
    shutil.copytree(model, copy)
    (copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert model_fingerprint(copy) != model_fingerprint(model)
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(model)


def test_files_beside_the_weights_do_not_count(model, tmp_path):
    """Trainer leftovers, pipeline metadata and a second weight copy are not what transformers loads."""
    copy = tmp_path / "checkpoint"
    shutil.copytree(model, copy)
    for name in ["optimizer.pt", "training_args.bin", "rng_state.pth", "consolidated.safetensors"]:
        (copy / name).write_bytes(os.urandom(64))
    write_provenance(copy, "sft", "scratch", {})
    assert model_fingerprint(copy) == model_fingerprint(model)


def test_sharded_weights_and_a_missing_shard(tmp_path):
    from transformers import AutoModelForCausalLM

    single = save_model(tmp_path / "single", seed=0)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="20KB")
    shutil.copy(single / "tokenizer.json", sharded)
    shutil.copy(single / "tokenizer_config.json", sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    parts = sorted(set(index["weight_map"].values()))
    assert len(parts) > 1
    first = model_fingerprint(sharded)
    flip_last_weight_byte(sharded / parts[-1])
    assert model_fingerprint(sharded) != first
    (sharded / parts[0]).unlink()
    with pytest.raises(ModelPathError, match=f"lists {parts[0]}, which is missing"):
        model_fingerprint(sharded)


def test_tokenizer_fingerprint_follows_ids_and_rules_not_cosmetics(model, tmp_path):
    base = tokenizer_fingerprint(model)
    cosmetic = tmp_path / "cosmetic"
    shutil.copytree(model, cosmetic)
    cfg = json.loads((cosmetic / "tokenizer_config.json").read_text())
    (cosmetic / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 4096}))
    assert tokenizer_fingerprint(cosmetic) == base
    assert tokenizer_fingerprint(swap_token_ids(save_model(tmp_path / "swapped"))) != base
    rules = tmp_path / "rules"  # same vocabulary, different pre-tokenizer: text splits differently
    shutil.copytree(model, rules)
    tok = json.loads((rules / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (rules / "tokenizer.json").write_text(json.dumps(tok))
    assert tokenizer_fingerprint(rules) != base
    special = tmp_path / "special"
    shutil.copytree(model, special)
    (special / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": "<eos>"}))
    assert tokenizer_fingerprint(special) != base


def test_cache_skips_rehashing_and_invalidates_on_change(model, monkeypatch, cache_dir):
    first = model_fingerprint(model)
    digest = fpm._file_digest
    monkeypatch.setattr(fpm, "_file_digest", lambda *a: pytest.fail("cache hit expected: no file hashed"))
    assert model_fingerprint(model) == first
    monkeypatch.setattr(fpm, "_file_digest", digest)
    flip_last_weight_byte(model / "model.safetensors")  # new mtime: the entry is stale
    assert model_fingerprint(model) != first
    cache = json.loads((cache_dir / "fingerprints.json").read_text())
    assert sum(k.startswith("model:") for k in cache) == 1  # replaced, not accumulated


def test_cache_forgets_folders_that_are_gone(model, tmp_path, cache_dir):
    gone = tmp_path / ".student.tmp-123"  # what atomic_dir leaves behind in the cache: a renamed folder
    shutil.copytree(model, gone)
    model_fingerprint(gone)
    shutil.rmtree(gone)
    model_fingerprint(model)
    assert list(json.loads((cache_dir / "fingerprints.json").read_text())) == [f"model:{model.resolve()}"]


def test_cache_follows_a_folder_renamed_into_place(model, tmp_path, monkeypatch):
    """A stage fingerprints its output inside atomic_dir's temporary folder, then renames it: the next
    stage must not hash the weights again, while a copy (new inodes, mtimes preserved) is hashed."""
    tmp = tmp_path / ".student.tmp-123"
    shutil.copytree(model, tmp)
    first = model_fingerprint(tmp)
    copy = tmp_path / "copy"
    shutil.copytree(tmp, copy)
    final = tmp_path / "student"
    os.replace(tmp, final)
    hashed = []
    digest = fpm._file_digest
    monkeypatch.setattr(fpm, "_file_digest", lambda path, bar: hashed.append(path.parent) or digest(path, bar))
    assert model_fingerprint(final) == first and hashed == []
    assert model_fingerprint(copy) == first and set(hashed) == {copy}


def test_model_refs_resolve_to_the_target(model, tmp_path):
    ref = tmp_path / "teacher_ref"
    ref.mkdir()
    write_model_ref(ref, model)
    assert model_fingerprint(ref) == model_fingerprint(model)


def test_not_a_model_folder(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(ModelPathError, match="no weights"):
        model_fingerprint(tmp_path / "half")
    with pytest.raises(ModelPathError, match="no tokenizer files"):
        tokenizer_fingerprint(tmp_path / "half")


def test_cli_prints_both_and_fails_in_one_line(model, tmp_path, capsys):
    main([str(model), "--json"])
    row = json.loads(capsys.readouterr().out)
    assert row == {"path": str(model), "model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(model)}
    main([str(model)])
    assert capsys.readouterr().out.split()[0] == model_fingerprint(model)
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "nope")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: model path {tmp_path / 'nope'} does not exist")
