"""The OpenAI fields real clients send to `portllm serve`, on a tiny random model in process: logprobs (equal to the
library's own forward pass), echo (reproducing `portllm eval`'s log-likelihoods, as lm-eval's `local-completions`
asks for them), list and token-id prompts, n > 1, include_usage, unsupported fields refused by name; tokenization
off the event loop; incremental detokenization equal to full decoding."""

import asyncio
import json

import pytest
import torch

import tiny
from conftest import require_module
from portllm import import_adapter
from portllm.serve import Detokenizer, decode_spec

require_module("fastapi")
hypothesis = require_module("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROMPT = "The movie was great and the actors"
PAIRS = [
    ("Question: Is this sentence positive or negative?\nAnswer:", " positive"),
    ("Question: Is this sentence positive or negative?\nAnswer:", " negative"),
    ("Sarah was a much better surgeon than Maria so", " she won."),
    ("Janet has 16 eggs", " and sells 9 of them"),
]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("fields")
    base = tiny.make_base(root / "base", bpe=True, vocab_size=320, hidden=48, layers=2)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(base)
    import_adapter(tiny.make_adapter(base, root / "adapter", seed=1), base, root / "a", task="a")
    return {"base": base, "a": root / "a"}


@pytest.fixture(scope="module")
def engine(world):
    from portllm.serve import Engine, EngineConfig

    eng = Engine(world["base"], {"a": world["a"]}, EngineConfig(max_batch=8, max_queue=16), name="tiny")
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def http(engine):
    from fastapi.testclient import TestClient

    from portllm.serve import create_app

    with TestClient(create_app(engine)) as client:
        yield client


@pytest.fixture(scope="module")
def lm(world):
    from portllm.eval import open_lm

    return open_lm(world["base"], world["a"])


def post(http, path, **body):
    r = http.post(f"/v1/{path}", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def refused(http, path, **body):
    r = http.post(f"/v1/{path}", json=body)
    assert r.status_code == 400, r.text
    return r.json()["error"]


# ---------------------------------------------------------------- incremental detokenization


def byte_fallback_tokenizer():
    """A Llama-style tokenizer: SentencePiece pieces, <0xNN> byte-fallback tokens, Llama's decoder."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["▁the", "▁movie", "é", "▁", "a", "▁€", "s", ".", "'", "n't", "▁was"]
    words = tiny.SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + pieces
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def cleanup_tokenizer():
    """A word-level tokenizer whose decode cleans up tokenization spaces (" ." -> ".", " n't" -> "n't")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = tiny.SPECIALS + ["a", ".", "'", "n't", "s", "m", "?", "ve", "re", "x", "n", "!", ","]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=True,
    )


def _hot_ids(tok):
    """Tokens worth drawing often: specials, bytes that start or continue multi-byte characters, the pieces."""
    vocab = tok.get_vocab()
    hot = [vocab[t] for t in ("<0xE2>", "<0x82>", "<0xAC>", "<0xC3>", "<0xA9>", "<0x41>", "<0xFF>") if t in vocab]
    return hot + list(tok.all_special_ids) + [i for t, i in vocab.items() if not t.startswith("<")]


TOKENIZERS = {
    "byte-level BPE": lambda: tiny.make_bpe_tokenizer(320),
    "byte fallback": byte_fallback_tokenizer,
    "cleanup": cleanup_tokenizer,
    "word level": lambda: tiny.make_tokenizer(96),
}


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_incremental_detokenization_equals_full_decoding(kind):
    tok = TOKENIZERS[kind]()
    spec = decode_spec(tok)
    assert spec.cleanup == (kind == "cleanup") and bool(spec.byte_ids) == (kind == "byte fallback")
    ids = st.one_of(st.integers(0, len(tok) - 1), st.sampled_from(_hot_ids(tok)))

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(ids, max_size=40))
    def check(tokens):
        d = Detokenizer(spec)
        pieces = [d.add(t) for t in tokens]
        assert "".join(pieces) + d.flush() == tok.decode(tokens, skip_special_tokens=True)

    check()


def test_incremental_detokenization_is_linear():
    """The tokens decoded over a whole output grow linearly with its length (re-decoding it all is quadratic)."""
    inner = tiny.make_bpe_tokenizer(320)

    class Counting:
        decoded = 0

        def __getattr__(self, name):
            return getattr(inner, name)

        def decode(self, ids, **kw):
            Counting.decoded += len(ids)
            return inner.decode(ids, **kw)

    spec = decode_spec(inner)
    spec = type(spec)(Counting(), spec.byte_ids, spec.skipped_ids, spec.cleanup)
    text = " ".join(["The movie was great and the actors were wonderful."] * 60)
    ids = inner.encode(text)
    d = Detokenizer(spec)
    out = "".join(d.add(t) for t in ids) + d.flush()
    assert out == inner.decode(ids, skip_special_tokens=True)
    assert len(ids) > 500 and Counting.decoded < 8 * len(ids)


def test_server_streams_multibyte_text_as_the_whole_decodes(engine):
    """The engine's output, piece by piece, is the full decoding of its tokens (sampled: bytes of every kind)."""
    from portllm.serve import GenRequest, SamplingParams

    cut_short = 0  # outputs that end inside a character: what is held back must come out at the end
    for seed in range(12):
        params = SamplingParams(max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True)
        pieces = list(engine.start().submit(GenRequest(engine.encode(PROMPT), "a", params)))
        ids = [t for ev in pieces for t in ev.token_ids]
        whole = engine.tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(ev.text for ev in pieces) == whole
        cut_short += whole.endswith("\ufffd")
    assert cut_short


# ---------------------------------------------------------------- logprobs, echo


def _forward_logp(lm, ids):
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_completion_logprobs_equal_the_forward_pass(http, lm):
    r = post(http, "completions", model="a", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=5)
    lp = r["choices"][0]["logprobs"]
    prompt = lm.tokenizer.encode(PROMPT)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    ids = list(prompt)
    name = {i: lm.tokenizer.decode([i]) for i in range(len(lm.tokenizer))}
    for step in range(6):
        logp = _forward_logp(lm, ids)[-1]
        tok = int(logp.argmax())  # greedy: the sampled token is the most likely one
        assert lp["tokens"][step] == name[tok]
        assert lp["token_logprobs"][step] == pytest.approx(float(logp[tok]), abs=1e-4)
        top = logp.topk(5)
        want = {name[tok]: float(logp[tok])}  # the token itself, then its alternatives (as vLLM's)
        for i, v in zip(top.indices.tolist(), top.values.tolist()):
            want.setdefault(name[i], v)
        assert lp["top_logprobs"][step] == pytest.approx(want, abs=1e-4)
        ids.append(tok)
    # sampled at temperature 1.5: still the model's own log-probabilities (before temperature)
    r = post(http, "completions", model="a", prompt=PROMPT, max_tokens=3, temperature=1.5, seed=4, logprobs=0)
    lp = r["choices"][0]["logprobs"]
    assert all(len(t) == 1 for t in lp["top_logprobs"])  # logprobs 0: the token itself only
    got = _forward_logp(lm, prompt)[-1]
    named = [float(got[i]) for i in name if name[i] == lp["tokens"][0]]
    assert any(abs(v - lp["token_logprobs"][0]) < 1e-4 for v in named)


def test_chat_logprobs_equal_the_forward_pass(http, lm):
    messages = [{"role": "user", "content": "Is the movie good?"}]
    r = post(http, "chat/completions", model="a", messages=messages, max_tokens=3, temperature=0, logprobs=True,
             top_logprobs=3)  # fmt: skip
    content = r["choices"][0]["logprobs"]["content"]
    text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    logp = _forward_logp(lm, lm.tokenizer.encode(text))[-1]
    tok = int(logp.argmax())
    assert content[0]["token"] == lm.tokenizer.decode([tok])
    assert content[0]["logprob"] == pytest.approx(float(logp[tok]), abs=1e-4)
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == pytest.approx(logp.topk(3).values.tolist(), abs=1e-4)
    assert len(content) == r["usage"]["completion_tokens"]
    plain = post(http, "chat/completions", model="a", messages=messages, max_tokens=3, temperature=0)
    assert plain["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_reproduce_portllm_eval_loglikelihoods(http, lm, max_tokens):
    """What lm-eval's local-completions does: token-id prompts (context + continuation), echo, logprobs; the
    continuation's log-likelihood is the sum of the echoed prompt logprobs after the context."""
    from portllm.eval import encode_pair, loglikelihoods

    want, _ = loglikelihoods(lm, PAIRS)
    enc = [encode_pair(lm.tokenizer, c, x) for c, x in PAIRS]
    r = post(http, "completions", model="a", prompt=[c + x for c, x in enc], max_tokens=max_tokens, echo=True,
             logprobs=1, temperature=0, seed=1234)  # fmt: skip
    choices = sorted(r["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == list(range(len(PAIRS)))
    for (ctx, cont), choice, ll in zip(enc, choices, want):
        lps = choice["logprobs"]["token_logprobs"]
        assert len(lps) == len(ctx) + len(cont) + max_tokens
        assert lps[0] is None and choice["logprobs"]["top_logprobs"][0] is None  # nothing precedes the first token
        scored = lps[len(ctx) : len(ctx) + len(cont)]
        assert sum(scored) == pytest.approx(ll, abs=1e-4)
        if max_tokens == 0:
            assert choice["text"] == lm.tokenizer.decode(ctx + cont) and choice["finish_reason"] == "length"
    assert r["usage"]["prompt_tokens"] == sum(len(c) + len(x) for c, x in enc)
    assert r["usage"]["completion_tokens"] == max_tokens * len(PAIRS)


def test_echo_of_a_text_prompt(http):
    plain = post(http, "completions", model="a", prompt=PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]
    r = post(http, "completions", model="a", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert r["choices"][0]["text"] == PROMPT + plain and r["choices"][0]["logprobs"] is None
    r = post(http, "completions", model="a", prompt=PROMPT, max_tokens=0, echo=True)
    assert r["choices"][0]["text"] == PROMPT and r["usage"]["completion_tokens"] == 0
    err = refused(http, "completions", model="a", prompt=PROMPT, max_tokens=0)
    assert err["param"] == "max_tokens" and "echo" in err["message"]


# ---------------------------------------------------------------- prompts, n, streaming


def test_list_and_token_id_prompts(http, engine):
    prompts = [PROMPT, "Janet has 16 eggs"]
    one = [post(http, "completions", model="a", prompt=p, max_tokens=5, temperature=0) for p in prompts]
    many = post(http, "completions", model="a", prompt=prompts, max_tokens=5, temperature=0)
    assert [c["text"] for c in many["choices"]] == [r["choices"][0]["text"] for r in one]
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert many["usage"]["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in one)
    ids = engine.encode(PROMPT)
    by_ids = post(http, "completions", model="a", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids["choices"][0]["text"] == one[0]["choices"][0]["text"]
    nested = post(http, "completions", model="a", prompt=[ids, engine.encode(prompts[1])], max_tokens=5, temperature=0)
    assert [c["text"] for c in nested["choices"]] == [c["text"] for c in many["choices"]]


def test_n_choices_each_their_own_stream(http):
    kw = {"model": "a", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0}
    r = post(http, "completions", n=3, seed=11, **kw)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    alone = [post(http, "completions", seed=11 + i, **kw)["choices"][0]["text"] for i in range(3)]
    assert [c["text"] for c in r["choices"]] == alone  # choice i samples with seed + i
    assert len(set(alone)) > 1
    two = post(http, "completions", model="a", prompt=[PROMPT, "Janet"], n=2, max_tokens=3, temperature=0)
    assert [c["index"] for c in two["choices"]] == [0, 1, 2, 3]
    assert two["choices"][0]["text"] == two["choices"][1]["text"] != two["choices"][2]["text"]
    chat = post(http, "chat/completions", model="a", messages=[{"role": "user", "content": "hi"}], n=2, seed=5,
                max_tokens=4, user="someone")  # fmt: skip
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    assert 2 <= chat["usage"]["completion_tokens"] <= 8  # both choices counted


def _sse(http, path, **body):
    with http.stream("POST", f"/v1/{path}", json=body) as r:
        assert r.status_code == 200
        lines = [x[len("data: ") :] for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_streaming_with_n_echo_logprobs_and_usage(http):
    kw = {"model": "a", "prompt": [PROMPT, "Janet has"], "n": 2, "max_tokens": 6, "temperature": 0.8, "seed": 3}
    whole = post(http, "completions", echo=True, logprobs=2, **kw)
    chunks = _sse(http, "completions", echo=True, logprobs=2, stream=True, stream_options={"include_usage": True}, **kw)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    for want in whole["choices"]:
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == want["index"]]
        assert "".join(c["text"] for c in mine) == want["text"]
        tokens = [t for c in mine if c["logprobs"] for t in c["logprobs"]["token_logprobs"]]
        assert tokens == pytest.approx(want["logprobs"]["token_logprobs"])
        assert mine[-1]["finish_reason"] == want["finish_reason"]
    no_usage = _sse(http, "completions", stream=True, **kw)
    assert all(c["choices"] for c in no_usage)
    messages = [{"role": "user", "content": "Tell me about the movie."}]
    whole = post(http, "chat/completions", model="a", messages=messages, n=2, max_tokens=5, seed=2, logprobs=True)
    chunks = _sse(http, "chat/completions", model="a", messages=messages, n=2, max_tokens=5, seed=2, logprobs=True,
                  stream=True, stream_options={"include_usage": True})  # fmt: skip
    assert chunks[-1]["usage"] == whole["usage"] and chunks[-1]["choices"] == []
    for want in whole["choices"]:
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == want["index"]]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"]["content"] or "" for c in mine) == want["message"]["content"]
        streamed = [t["logprob"] for c in mine if c["logprobs"] for t in c["logprobs"]["content"]]
        assert streamed == pytest.approx([t["logprob"] for t in want["logprobs"]["content"]])


# ---------------------------------------------------------------- refused by name; off the event loop


@pytest.mark.parametrize(
    "path,field,value",
    [
        ("completions", "best_of", 2),
        ("completions", "suffix", "!"),
        ("completions", "logit_bias", {"5": 1.0}),
        ("completions", "presence_penalty", 0.5),
        ("completions", "frequency_penalty", 0.5),
        ("completions", "top_k", 5),  # vLLM's, not this server's
        ("completions", "guided_json", {}),
        ("completions", "logprobs", 21),
        ("chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("chat/completions", "top_logprobs", 2),  # without logprobs: true
        ("chat/completions", "response_format", {"type": "json_object"}),
        ("chat/completions", "reasoning_effort", "low"),
    ],
)
def test_unsupported_fields_are_refused_by_name(http, path, field, value):
    body = {"model": "a", "max_tokens": 2}
    body.update({"prompt": "x"} if path == "completions" else {"messages": [{"role": "user", "content": "x"}]})
    err = refused(http, path, **body, **{field: value})
    assert err["param"] == field and field in err["message"], err


def test_chat_messages_as_clients_send_them_back(http):
    """A client appends the answer's message as the SDK dumps it (nulls included): accepted; tool calls refused."""
    answer = {"role": "assistant", "content": "ok", "refusal": None, "annotations": None, "audio": None,
              "function_call": None, "tool_calls": None}  # fmt: skip
    messages = [{"role": "user", "content": "hi"}, answer, {"role": "user", "content": "more"}]
    post(http, "chat/completions", model="a", messages=messages, max_tokens=2)
    answer = {**answer, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    err = refused(http, "chat/completions", model="a", messages=[messages[0], answer], max_tokens=2)
    assert err["param"] == "messages.1.tool_calls"
    err = refused(http, "chat/completions", model="a", messages=[{"role": "user", "content": "x", "colour": 1}])
    assert err["param"] == "messages.0.colour"


def test_tokenization_and_templating_run_off_the_event_loop(http, engine, monkeypatch):
    calls = []

    def on_loop():
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    encode, template = engine.encode, engine.chat_prompt
    monkeypatch.setattr(engine, "encode", lambda text: calls.append(("encode", on_loop())) or encode(text))
    monkeypatch.setattr(engine, "chat_prompt", lambda m: calls.append(("template", on_loop())) or template(m))
    post(http, "completions", model="a", prompt=["one", "two"], max_tokens=1)
    post(http, "chat/completions", model="a", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert {c for c, _ in calls} == {"encode", "template"}
    assert not any(loop for _, loop in calls), calls
