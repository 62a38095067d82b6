"""`portllm train --data`: a user's prompt/completion or chat JSONL, completion-only loss, held-out scoring."""

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest

import tiny
from portllm import Patch, PortLLMError
from portllm.sft import encode_messages, encode_rows, read_sft, split_heldout
from portllm.train import TrainConfig, train_on_data

# a chat template for the word-level tiny tokenizer: a turn is "<s> ROLE content </s>", roles as vocabulary words
ROLE = {"system": "w90", "user": "w91", "assistant": "w89"}
TEMPLATE = (
    "{% for m in messages %}{{ '<s> ' + {'system': 'w90', 'user': 'w91', 'assistant': 'w89'}[m['role']] + ' ' "
    "+ m['content'] + ' </s> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<s> w89 ' }}{% endif %}"
)
CFG = dict(steps=30, batch_size=8, lr=2e-2, max_length=32, checkpoint_every=5, device="cpu")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def memorisable(n=48, seed=0):
    """Prompts of random words, one fixed answer: a tiny model learns the answer within a few dozen steps."""
    rng = random.Random(seed)
    return [
        {"prompt": f"w{rng.randint(4, 40)} w{rng.randint(4, 40)} w{rng.randint(4, 40)}", "completion": " w60 w61"}
        for _ in range(n)
    ]


def template_ids(tok, msgs):
    """The chat template's own tokenization (transformers 5 returns a BatchEncoding, 4.x a list)."""
    out = tok.apply_chat_template(msgs, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return tiny.make_base(root / "base", template=TEMPLATE, initializer_range=0.3)


@pytest.fixture(scope="module")
def tok(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def test_completion_only_loss_masks_every_prompt_token():
    bpe = tiny.make_bpe_tokenizer()
    rows = [
        {"prompt": "Question: Is the movie great?", "completion": " yes"},
        {"prompt": "Sarah was a much better surgeon than Maria so", "completion": " she won."},
    ]
    enc = encode_rows(bpe, rows, 256)
    assert enc.dropped == 0 and len(enc.examples) == 2
    for row, (ids, labels) in zip(rows, enc.examples):
        prompt = bpe(row["prompt"], add_special_tokens=False)["input_ids"]  # independent: the tokenizer itself
        whole = bpe(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
        assert whole[: len(prompt)] == prompt
        assert ids == whole + [bpe.eos_token_id]  # plain text, no chat template (TRL's standard prompt-completion)
        assert labels == [-100] * len(prompt) + whole[len(prompt) :] + [bpe.eos_token_id]


def test_truncation_cuts_the_prompt_from_the_left_and_drops_long_completions(tok):
    rows = [
        {"prompt": " ".join(f"w{i}" for i in range(10, 30)), "completion": " w60 w61"},
        {"prompt": "w5", "completion": " " + " ".join(f"w{i}" for i in range(40, 52))},  # 12 + EOS > 8
    ]
    enc = encode_rows(tok, rows, 8)
    assert enc.dropped == 1 and len(enc.examples) == 1
    ids, labels = enc.examples[0]
    want = tok(" ".join(f"w{i}" for i in range(25, 30)) + " w60 w61", add_special_tokens=False)["input_ids"]
    assert ids == want + [tok.eos_token_id]  # the last 5 prompt tokens, the whole completion, EOS
    assert labels == [-100] * 5 + want[5:] + [tok.eos_token_id]


def test_messages_apply_the_chat_template_and_unmask_exactly_the_assistant_turns(tok):
    msgs = [
        {"role": "system", "content": "w4 w5"},
        {"role": "user", "content": "w6 w7 w8"},
        {"role": "assistant", "content": "w9 w10"},
        {"role": "user", "content": "w11"},
        {"role": "assistant", "content": "w12 w13 w14"},
    ]
    ids, labels, keep = encode_messages(tok, msgs)
    assert ids == template_ids(tok, msgs)
    # independent: each turn is <s> ROLE content </s>; an assistant turn's content and its </s> are learned
    want_ids, want_labels = [], []
    for m in msgs:
        words = [tok.convert_tokens_to_ids(w) for w in m["content"].split()]
        turn = [tok.bos_token_id, tok.convert_tokens_to_ids(ROLE[m["role"]])] + words + [tok.eos_token_id]
        want_ids += turn
        learned = words + [tok.eos_token_id] if m["role"] == "assistant" else [-100] * (len(words) + 1)
        want_labels += [-100, -100] + learned
    assert ids == want_ids and labels == want_labels
    assert keep == 4  # the last assistant turn's w12 w13 w14 </s>


@pytest.mark.integration
def test_messages_on_smollm2s_chat_template():
    from transformers import AutoTokenizer

    from portllm.models import resolve_base

    smol = AutoTokenizer.from_pretrained(resolve_base("smollm2-135m"))
    msgs = [
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "It is blue."},
        {"role": "user", "content": "And grass?"},
        {"role": "assistant", "content": "Green."},
    ]
    ids, labels, _ = encode_messages(smol, msgs)
    assert ids == template_ids(smol, msgs)
    learned = [i for i, y in zip(ids, labels) if y != -100]
    assert smol.decode(learned) == "It is blue.<|im_end|>\nGreen.<|im_end|>\n"
    assert all(y in (-100, i) for i, y in zip(ids, labels))


@pytest.mark.parametrize(
    "lines, match",
    [
        ([], "has no rows"),
        (['{"prompt": "w4"}'], ':1: missing "completion"'),
        (['{"completion": "w4"}'], ':1: missing "prompt"'),
        (['{"prompt": "w4", "completion": ""}'], ':1: "completion" is empty'),
        (['{"prompt": "w4", "completion": 3}'], ':1: "completion" must be a string'),
        (["", '{"prompt": "w4", "completion": "w5"}', "not json"], ":3: not a JSON object"),
        (["[1, 2]"], ":1: not a JSON object"),
        (
            ['{"prompt": "w4", "completion": "w5"}', '{"messages": [{"role": "assistant", "content": "w5"}]}'],
            ":2: a messages row in a file of prompt-completion rows",
        ),
        (['{"messages": [{"role": "bot", "content": "w5"}]}'], ":1: message 0 has role 'bot'"),
        (['{"messages": [{"role": "user"}]}'], ':1: message 0 must have "role" and "content"'),
        (['{"messages": [{"role": "user", "content": "w4"}]}'], ":1: no assistant message"),
        (['{"messages": []}'], ':1: "messages" must be a non-empty list'),
        (['{"messages": [{"role": "assistant", "content": "w4"}], "prompt": "w5"}'], ":1: has both messages"),
    ],
)
def test_malformed_rows_are_one_line_errors_naming_the_line(tmp_path, lines, match):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(x + "\n" for x in lines))
    with pytest.raises(PortLLMError, match=match) as e:
        read_sft(f)
    assert "\n" not in str(e.value) and str(f) in str(e.value)


def test_heldout_split_is_seeded_and_at_least_one_row(tmp_path):
    data = read_sft(write_jsonl(tmp_path / "d.jsonl", memorisable(12)))
    tr, held = split_heldout(data, None, 0.01)
    assert len(held) == 1 and len(tr) == 11
    tr2, held2 = split_heldout(data, None, 0.25)
    assert len(held2) == 3 and split_heldout(data, None, 0.25) == (tr2, held2)
    assert sorted(map(json.dumps, tr2 + held2)) == sorted(map(json.dumps, data.rows))
    other = read_sft(write_jsonl(tmp_path / "e.jsonl", memorisable(3, seed=1)))
    assert split_heldout(data, other, None) == (data.rows, other.rows)
    with pytest.raises(PortLLMError, match="not both"):
        split_heldout(data, other, 0.1)


def test_training_on_data_raises_heldout_loglik_and_the_manifest_keeps_no_text(base, tmp_path):
    f = write_jsonl(tmp_path / "mine.jsonl", memorisable())
    r = train_on_data(base, f, tmp_path / "p", TrainConfig(**CFG), eval_fraction=0.125)
    h = r.heldout
    assert h["rows"] == 6
    assert h["loglik_per_token_after"] > h["loglik_per_token_before"] + 1.0
    raw = (tmp_path / "p" / "portllm.json").read_text()
    d = Patch.load(tmp_path / "p").extra["training"]["data"]
    assert d["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert (d["rows"], d["train_rows"], d["format"]) == (48, 42, "prompt-completion")
    assert d["heldout"]["loglik_per_token_after"] == h["loglik_per_token_after"]
    for row in memorisable():
        assert row["prompt"] not in raw and row["completion"].strip() not in raw


def test_a_changed_data_file_never_resumes_an_old_checkpoint(base, tmp_path, capfd):
    f = write_jsonl(tmp_path / "mine.jsonl", memorisable())
    cfg = TrainConfig(**{**CFG, "steps": 12})

    def stop(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    for resumes in (True, False):
        with pytest.raises(KeyboardInterrupt):
            train_on_data(base, f, tmp_path / "p", cfg, callback=stop, overwrite=True)
        if not resumes:  # the same rows, so the same tokens: only the file's sha256 tells them apart
            f.write_text(f.read_text() + "\n")
        r = train_on_data(base, f, tmp_path / "p", cfg, overwrite=True)
        assert r.resumed_from == (5 if resumes else 0)
    assert "checkpoint" in capfd.readouterr().err


def run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "portllm.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_train_data(base, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": "w60 w61"}]}
        for r in memorisable(12)
    ]
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    r = run(
        "train",
        "--base",
        base,
        "--data",
        f,
        "--out",
        tmp_path / "p",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--eval-fraction",
        "0.25",
    )
    assert r.returncode == 0, r.stderr
    assert "held-out reference log-likelihood per token" in r.stdout and "(n=3)" in r.stdout
    assert Patch.load(tmp_path / "p").extra["training"]["data"]["format"] == "messages"
    r = run("train", "--base", base, "--out", tmp_path / "q", "--device", "cpu")
    assert r.returncode != 0 and "pass one of --task NAME and --data FILE.jsonl" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w4"}\n')
    r = run("train", "--base", base, "--data", bad, "--out", tmp_path / "q", "--device", "cpu")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode != 0 and len(lines) == 1 and f"{bad}:1: missing" in lines[0]
