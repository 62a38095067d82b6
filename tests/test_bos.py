"""BOS follows the tokenizer, as in lm-evaluation-harness 0.4.x: a tokenizer whose own settings add
a BOS (Gemma's `add_bos_token: true`) gets it once at the start of every scored row and prompt; one
that adds none (SmolLM2's) is encoded exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny
from conftest import require_module
from portllm.eval import (
    bos_prefix,
    encode_pair,
    encode_text,
    generate,
    loglikelihoods,
    open_lm,
    prefix_token,
)

PAIRS = [
    ("The movie was great and the actors", " were wonderful."),
    ("Question: Is this sentence positive or negative?\nAnswer:", " positive"),
    ("Question: Is this sentence positive or negative?\nAnswer:", " negative"),
    ("Sarah was a much better surgeon than Maria so ", "she won."),
    ("<s>The movie was", " great"),  # a context that already starts with the BOS string
    ("", " yes"),  # an empty context
]


def _model(root: Path, add_bos: bool) -> Path:
    from transformers import AutoTokenizer

    d = tiny.make_base(root, bpe=True, vocab_size=320, hidden=32, layers=1)
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_bos_token = add_bos  # the tokenizer's own setting, as Gemma's: its post-processor adds BOS
    tok.save_pretrained(d)
    cfg_file = d / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["add_bos_token"] = add_bos
    cfg_file.write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def with_bos(tmp_path_factory):
    return open_lm(_model(tmp_path_factory.mktemp("bos") / "m", True))


@pytest.fixture(scope="module")
def without_bos(tmp_path_factory):
    return open_lm(_model(tmp_path_factory.mktemp("nobos") / "m", False))


def _rows(lm, pairs):
    """The token rows the model is given (padding removed), and the scores."""
    seen: list[list[int]] = []
    forward = lm.model.forward

    def spy(*a, **kw):
        ids, mask = kw["input_ids"], kw["attention_mask"]
        for j in range(ids.shape[0]):
            real = (mask[j] != 0) if mask.ndim == 2 else (ids[j] != lm.tokenizer.pad_token_id)
            seen.append(ids[j][real].tolist())
        return forward(*a, **kw)

    lm.model.forward = spy
    try:
        scores, _ = loglikelihoods(lm, pairs, batch_size=4)
    finally:
        del lm.model.forward
    return seen, scores


def _reference(lm, ctx: list[int], cont: list[int]) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def test_tokenizer_settings_decide(with_bos, without_bos):
    bos = with_bos.tokenizer.bos_token_id
    assert with_bos.tokenizer.encode("The movie")[0] == bos  # the tokenizer itself adds it
    assert bos_prefix(with_bos.tokenizer) == [bos]
    assert without_bos.tokenizer.encode("The movie")[0] != bos
    assert bos_prefix(without_bos.tokenizer) == []


def test_bos_once_at_the_start_of_every_pair(with_bos):
    tok = with_bos.tokenizer
    bos = tok.bos_token_id
    for c, x in PAIRS:
        ctx, cont = encode_pair(tok, c, x)
        assert ctx[0] == bos and ctx.count(bos) == 1 and bos not in cont, (c, ctx)
        # what lm-eval 0.4.x computes: tokenizer.encode with its default special tokens, and none for a
        # text that already starts with the BOS string
        special = not c.startswith(tok.bos_token)
        n = len(c) - len(c.rstrip())
        c2, x2 = (c[:-n], c[-n:] + x) if n else (c, x)
        whole = tok.encode(c2 + x2, add_special_tokens=special)
        ref_ctx = tok.encode(c2, add_special_tokens=special)
        assert (ctx, cont) == (ref_ctx, whole[len(ref_ctx) :])


def test_scored_rows_start_with_one_bos(with_bos):
    tok = with_bos.tokenizer
    bos = tok.bos_token_id
    rows, scores = _rows(with_bos, PAIRS)
    assert rows and all(r[0] == bos and r.count(bos) == 1 for r in rows), rows
    for (c, x), s in zip(PAIRS, scores):
        assert s == pytest.approx(_reference(with_bos, *encode_pair(tok, c, x)), abs=1e-4)


def test_generation_prompts_start_with_one_bos(with_bos):
    tok = with_bos.tokenizer
    bos = tok.bos_token_id
    seen = []
    gen = with_bos.model.generate

    def spy(*a, **kw):
        for ids, mask in zip(kw["input_ids"], kw["attention_mask"]):
            seen.append(ids[mask.bool()].tolist())
        return gen(*a, **kw)

    with_bos.model.generate = spy
    try:
        generate(with_bos, ["The movie was", "<s>Question: x", "Answer:"], max_new_tokens=2, batch_size=2)
    finally:
        del with_bos.model.generate
    assert len(seen) == 3 and all(r[0] == bos and r.count(bos) == 1 for r in seen), seen


def test_no_bos_tokenizer_is_unchanged(without_bos):
    """SmolLM2's case: exactly the ids of add_special_tokens=False, as before this change."""
    tok = without_bos.tokenizer
    for c, x in PAIRS[:4]:
        n = len(c) - len(c.rstrip())
        c2, x2 = (c[:-n], c[-n:] + x) if n else (c, x)
        whole = tok.encode(c2 + x2, add_special_tokens=False)
        ctx = tok.encode(c2, add_special_tokens=False)
        assert encode_pair(tok, c, x) == (ctx, whole[len(ctx) :])
    assert encode_text(tok, "The movie was") == tok.encode("The movie was", add_special_tokens=False)
    rows, _ = _rows(without_bos, PAIRS[:4])
    assert all(tok.bos_token_id not in r for r in rows)


def test_empty_context_uses_lm_evals_prefix_token(without_bos):
    """lm-eval conditions an empty context on BOS (EOS when the tokenizer has none), or on the
    continuation's own first token when that is the prefix token."""
    tok = without_bos.tokenizer
    assert prefix_token(tok) == tok.bos_token_id
    rows, scores = _rows(without_bos, [("", " great")])
    cont = tok.encode(" great", add_special_tokens=False)
    assert rows == [[tok.bos_token_id] + cont[:-1]]
    assert scores[0] == pytest.approx(_reference(without_bos, [tok.bos_token_id], cont), abs=1e-4)
    rows, _ = _rows(without_bos, [("", "<s> great")])
    assert rows == [[tok.bos_token_id] + cont[:-1]]  # not [BOS, BOS, ...]


@pytest.mark.integration
def test_embedded_gemma_context_starts_with_bos():
    """The embedded Gemma-3 270M tokenizer (tokenization only; the model is never run)."""
    from portllm.models import EMBEDDED, _embedded_gguf

    require_module(EMBEDDED["gemma3-270m"].package)  # installed by `make install`; fails there when missing
    from transformers import AutoTokenizer

    gguf = _embedded_gguf("gemma3-270m")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    bos = tok.bos_token_id
    assert bos is not None and bos_prefix(tok) == [bos]
    ctx, cont = encode_pair(tok, "Question: Is this sentence positive or negative?\nAnswer:", " positive")
    assert ctx[0] == bos and ctx.count(bos) == 1 and bos not in cont
    ctx, _ = encode_pair(tok, "<bos>Question: x\nAnswer:", " yes")
    assert ctx[0] == bos and ctx.count(bos) == 1
    assert encode_text(tok, "Question: 2+2?\nAnswer:")[:1] == [bos]


@pytest.mark.integration
def test_embedded_smollm2_adds_no_bos():
    """SmolLM2's tokenizer adds no BOS: its contexts are encoded exactly as before."""
    from transformers import AutoTokenizer

    from portllm.models import resolve_base

    tok = AutoTokenizer.from_pretrained(resolve_base("smollm2-135m"))
    assert bos_prefix(tok) == []
    text = "Question: Is this sentence positive or negative?\nAnswer:"
    assert encode_pair(tok, text, " positive")[0] == tok.encode(text, add_special_tokens=False)
