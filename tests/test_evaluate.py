"""The scoring engine on a tiny random model: batched scores equal a slow, unpadded reference."""

import dataclasses
import json

import pytest
import torch

import tiny
from portllm import PortLLMError
from portllm.eval import (
    LM,
    EvalResult,
    TaskResult,
    compare,
    encode_pair,
    evaluate,
    extract_flexible,
    extract_strict,
    flips,
    generate,
    loglikelihoods,
    open_lm,
    run_task,
)
from portllm.stats import majority, mcnemar_exact, wilson
from portllm.tasks import Example, get_task


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tiny.make_base(tmp_path_factory.mktemp("bpe") / "m", bpe=True, vocab_size=320, hidden=48, layers=2)
    return open_lm(d)


def slow_loglik(lm: LM, context: str, cont: str) -> float:
    ctx, c = encode_pair(lm.tokenizer, context, cont)
    ids = torch.tensor([ctx + c])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(c)))


PAIRS = [
    ("The movie was great and the actors", " were wonderful."),
    ("Question: Is this sentence positive or negative?\nAnswer:", " positive"),
    ("Question: Is this sentence positive or negative?\nAnswer:", " negative"),
    ("Sarah was a much better surgeon than Maria so Sarah", " won the easier cases and more"),
    ("Janet has 16 eggs ", "and sells 9"),  # trailing space moves into the continuation
    ("x", " True"),
]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_scores_match_slow_reference(lm, batch_size):
    fast, tokens = loglikelihoods(lm, PAIRS, batch_size=batch_size)
    slow = [slow_loglik(lm, c, x) for c, x in PAIRS]
    for f, s in zip(fast, slow):
        assert f == pytest.approx(s, abs=1e-4)
    assert tokens > 0


TREE_PAIRS = [  # (context, continuation, share key)
    ("Question: which is right?\nAnswer:", " the first of all the answers", 0),
    ("Question: which is right?\nAnswer:", " the second", 0),
    ("Question: which is right?\nAnswer:", " the second", 0),  # a duplicate shares its branch
    ("Question: which is right?\nAnswer:", " x", 0),
    ("Sarah was a better surgeon than Maria, so Sarah", " won the hard cases", 1),  # WinoGrande-like
    ("Sarah was a better surgeon than Maria, so Maria", " won the hard cases", 1),
    ("abc", " d", 2),
    ("zzz", " d e f", 2),  # nothing in common with its group: unpacked
]


@pytest.mark.parametrize("batch_size,max_tokens", [(1, None), (2, None), (16, None), (16, 12), (16, 1)])
def test_packed_shared_contexts_match_slow_reference(lm, batch_size, max_tokens):
    pairs = [(c, x) for c, x, _ in TREE_PAIRS]
    fast, tokens = loglikelihoods(
        lm, pairs, batch_size=batch_size, share=[k for *_, k in TREE_PAIRS], max_tokens=max_tokens
    )
    for f, (c, x) in zip(fast, pairs):
        assert f == pytest.approx(slow_loglik(lm, c, x), abs=1e-4)
    unshared = sum(len(sum(encode_pair(lm.tokenizer, c, x), [])) - 1 for c, x in pairs)
    assert tokens < unshared * 0.7  # the shared words ran once


def test_batches_respect_rows_and_token_budget():
    from portllm.eval.pack import Tree, batches

    trees = [Tree([0] * n, [], [], {}) for n in (10, 9, 4, 4, 4, 4, 1)]
    sizes = [[len(t.tokens) for t in b] for b in batches(trees, rows=3, budget=16)]
    assert sizes == [[10], [9], [4, 4, 4], [4, 1]]  # a row longer than the budget still runs, alone
    assert sum(map(len, sizes)) == len(trees)


def test_tree_rows_only_where_the_model_allows_them(lm, monkeypatch):
    """Flash attention takes no 4D mask and a sliding window must not be outgrown: rows fall back to one
    request each (still exact); a single request never needs a tree mask."""
    from portllm.eval.pack import pack_tree

    assert set(pack_tree([(0, [5, 6, 7, 8], 2)]).branch) == {-1}
    pairs = [(c, x) for c, x, _ in TREE_PAIRS]
    keys = [k for *_, k in TREE_PAIRS]
    _, packed = loglikelihoods(lm, pairs, share=keys)
    monkeypatch.setattr(lm.model.config, "sliding_window", 4, raising=False)
    fast, unpacked = loglikelihoods(lm, pairs, share=keys)
    assert unpacked > packed
    for f, (c, x) in zip(fast, pairs):
        assert f == pytest.approx(slow_loglik(lm, c, x), abs=1e-4)


def test_share_keys_must_match_requests(lm):
    with pytest.raises(PortLLMError, match="share"):
        loglikelihoods(lm, PAIRS, share=[0])


def test_encode_pair_moves_trailing_space(lm):
    ctx, cont = encode_pair(lm.tokenizer, "Janet has ", "eggs")
    assert lm.tokenizer.decode(ctx) == "Janet has" and lm.tokenizer.decode(cont) == " eggs"


def test_mc_metrics_and_records(lm):
    exs = [Example(i, g, ("Answer:",) * 2, (" yes", " no"), target=" yes") for i, g in enumerate([0, 1, 0])]
    run = run_task(lm, get_task("sst2"), exs)
    assert [r["idx"] for r in run.records] == [0, 1, 2]
    # the same two continuations after the same context always give the same prediction
    assert len({r["pred"] for r in run.records}) == 1
    assert run.value == pytest.approx(sum(r["correct"] for r in run.records) / 3)
    assert 0 <= run.stderr <= 0.5
    assert (run.ci_low, run.ci_high) == wilson(round(3 * run.value), 3) and run.majority == pytest.approx(2 / 3)


def test_generation_has_no_majority_baseline(lm):
    exs = [Example(i, "18", prompt=f"Question: {i} + 1?\nAnswer:") for i in range(2)]
    run = run_task(lm, dataclasses.replace(get_task("gsm8k"), max_new_tokens=4), exs, batch_size=2)
    assert run.majority is None and run.result(lm).majority is None
    assert (run.ci_low, run.ci_high) == wilson(sum(r["correct"] for r in run.records), 2)


def test_acc_norm_uses_choice_length(lm):
    exs = [Example(0, 0, ("Question: Is this sentence",) * 2, (" positive or negative", " x"), target=" x")]
    run = run_task(lm, get_task("arc_easy"), exs)
    r = run.records[0]
    s = r["scores"]
    assert r["acc_pred"] == (0 if s[0] > s[1] else 1)
    assert r["acc_norm_pred"] == (0 if s[0] / 20 > s[1] / 1 else 1)
    assert r["pred"] == r["acc_norm_pred"]


def test_generation_matches_unbatched_greedy(lm):
    prompts = [
        "The movie was",
        "Question: Janet has 16 eggs and sells 9 of them for $2 each. How much?\nAnswer:",
        "Sarah",
    ]
    batched, _ = generate(lm, prompts, stop=(), max_new_tokens=8, batch_size=3)
    for p, b in zip(prompts, batched):
        ids = torch.tensor([lm.tokenizer.encode(p)])
        with torch.no_grad():
            g = lm.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        assert b == lm.tokenizer.decode(g[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize(
    "text,strict,flex",
    [
        ("Janet sells 9 eggs.\n#### 18", "18", "18"),
        ("The answer is $1,234.", None, "1234"),
        ("#### -7\nQuestion:", "-7", "-7"),
        ("She has 3 apples, then 4.5 more, total 7.50.", None, "7.50"),
        ("2 + 2 = 4. So 4.", None, "4"),
        ("no digits here...", None, None),
        ("#### 1,000,000", "1000000", "1000000"),
        ("It costs 18.00 dollars", None, "18"),
    ],
)
def test_gsm8k_extraction(text, strict, flex):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flex


def _write_run(d, task, records):
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"model": "m", "tasks": {task: {"value": 0}}}))
    (d / f"samples_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_flips_on_hand_built_runs(tmp_path):
    gold = [0, 1, 1, 0, 1]
    a = [0, 1, 0, 0, 0]  # right on 0,1,3
    b = [0, 0, 1, 0, 1]  # right on 0,2,3,4
    mk = lambda preds: [
        {"idx": i, "pred": p, "gold": g, "correct": p == g} for i, (p, g) in enumerate(zip(preds, gold))
    ]
    f = flips(mk(a), mk(b))
    assert (f.negative_flips, f.positive_flips) == (1, 2)
    assert f.negative_flip_idx == [1]
    assert f.acc_a == 0.6 and f.acc_b == 0.8 and f.agreement == 0.4
    assert list(f.to_dict()) == [
        "n",
        "acc_a",
        "acc_b",
        "agreement",
        "negative_flips",
        "positive_flips",
        "negative_flip_rate",
        "positive_flip_rate",
        "negative_flip_idx",
        "diff",
        "ci_low",
        "ci_high",
        "mcnemar_p",
        "margin",
        "verdict",
    ]
    assert f.diff == pytest.approx(0.2) and f.mcnemar_p == pytest.approx(mcnemar_exact(1, 2))
    assert f.ci_low <= f.diff <= f.ci_high and f.verdict == "inconclusive"  # 5 examples prove nothing
    assert flips(mk(a), []).to_dict() == {"n": 0}
    _write_run(tmp_path / "A", "sst2", mk(a))
    _write_run(tmp_path / "B", "sst2", mk(b))
    c = compare(tmp_path / "A", tmp_path / "B")
    assert c.tasks["sst2"].negative_flip_rate == 0.2
    d = c.to_dict()
    assert d["a"] == {"dir": str(tmp_path / "A"), "model": "m", "patch": None}
    assert d["tasks"]["sst2"] == f.to_dict() and d["margin"] == 0.01


def test_compare_bad_input(tmp_path):
    with pytest.raises(PortLLMError, match="not an eval run"):
        compare(tmp_path, tmp_path)
    _write_run(tmp_path / "A", "sst2", [])
    (tmp_path / "A" / "samples_sst2.jsonl").write_text('{"idx": 0}\nnot json\n')
    with pytest.raises(PortLLMError, match=r"samples_sst2.jsonl:2: malformed"):
        compare(tmp_path / "A", tmp_path / "A")


def test_evaluate_writes_results_and_samples(lm, tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "sst2").mkdir(parents=True)
    (data / "sst2" / "test.tsv").write_text("sentence\tlabel\nThe movie was great .\t1\nawful and boring\t0\nfine\t1\n")
    res = evaluate(lm, [get_task("sst2")], limit=3, data=data, out=tmp_path / "run")
    r = res.tasks["sst2"]
    assert r.n == 3 and r.metric == "acc" and r.tokens_per_s > 0 and set(r.extra) == {"acc", "acc_norm"}
    lines = (tmp_path / "run" / "samples_sst2.jsonl").read_text().splitlines()
    samples = [json.loads(x) for x in lines]
    assert [x["idx"] for x in samples] == [0, 1, 2]
    # the Wilson interval of the score and the majority-class baseline of the slice (gold 1, 0, 1)
    assert (r.ci_low, r.ci_high) == wilson(sum(x["correct"] for x in samples), 3)
    assert r.ci_low <= r.value <= r.ci_high and r.majority == majority([1, 0, 1])[1] == pytest.approx(2 / 3)
    text = (tmp_path / "run" / "results.json").read_text()
    assert json.loads(text) == res.to_dict() and text == json.dumps(res.to_dict(), indent=2)
    assert list(res.to_dict()) == [
        "model",
        "patch",
        "patch_fingerprint",
        "dtype",
        "limit",
        "batch_size",
        "max_batch_tokens",
        "tasks",
    ]
    assert list(res.to_dict()["tasks"]["sst2"])[:12] == [
        "task",
        "metric",
        "value",
        "stderr",
        "n",
        "model",
        "patch",
        "patch_fingerprint",
        "dtype",
        "time_s",
        "tokens",
        "tokens_per_s",
    ]
    saved = json.loads(text)["tasks"]["sst2"]
    assert (saved["ci_low"], saved["ci_high"], saved["majority"]) == (r.ci_low, r.ci_high, r.majority)
    assert EvalResult.read(tmp_path / "run") == res  # read back, typed


def test_patch_attached_at_runtime_changes_scores(world):
    """A patch attached with PEFT scores exactly like the ported (merged) model."""
    from portllm import port

    base = open_lm(world["new"])
    patched = open_lm(world["new"], patch=world["patch"])
    assert patched.patch_fingerprint
    import pathlib
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        port(world["patch"], world["new"], pathlib.Path(t) / "ported")
        ported = open_lm(pathlib.Path(t) / "ported")
        pairs = [("w4 w5 w6", " w7 w8"), ("w9", " w10")]
        a, _ = loglikelihoods(patched, pairs)
        b, _ = loglikelihoods(ported, pairs)
        c, _ = loglikelihoods(base, pairs)
    assert a == pytest.approx(b, abs=1e-4)
    assert max(abs(x - y) for x, y in zip(a, c)) > 1e-3


def _write_eval_run(d, task, correct, gold=None):
    """An eval run directory as `evaluate` writes it: results.json (EvalResult) and samples_<task>.jsonl."""
    gold = gold or [1] * len(correct)
    recs = [
        {"idx": i, "pred": g if c else 1 - g, "gold": g, "correct": bool(c)}
        for i, (c, g) in enumerate(zip(correct, gold))
    ]
    k, n = sum(correct), len(correct)
    lo, hi = wilson(k, n)
    res = EvalResult("m", None, None, "float32", None, 16, 640)
    res.tasks[task] = TaskResult(task, "acc", k / n, 0.0, n, "m", None, None, "float32", 1.0, 10, 10.0, {}, lo, hi, 1.0)
    d.mkdir()
    (d / "results.json").write_text(json.dumps(res.to_dict(), indent=2))
    (d / f"samples_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_compare_paired_statistics_on_known_answers(tmp_path):
    """40 examples right in A and wrong in B, none the other way: B is worse beyond doubt; identical
    runs show no difference; a few flips both ways on 50 examples settle nothing."""
    base = [1] * 100 + [0] * 60
    _write_eval_run(tmp_path / "A", "sst2", [1] * 40 + base)
    _write_eval_run(tmp_path / "B", "sst2", [0] * 40 + base)
    _write_eval_run(tmp_path / "A2", "sst2", [1] * 40 + base)
    f = compare(tmp_path / "A", tmp_path / "B").tasks["sst2"]
    assert (f.n, f.negative_flips, f.positive_flips) == (200, 40, 0)
    assert f.diff == pytest.approx(-0.2) and f.ci_low < f.diff < f.ci_high < 0
    assert f.mcnemar_p < 1e-6 and f.mcnemar_p == pytest.approx(2 * 0.5**40)
    assert f.verdict == "B worse"
    assert compare(tmp_path / "B", tmp_path / "A").tasks["sst2"].verdict == "B better"
    same = compare(tmp_path / "A", tmp_path / "A2")
    g = same.tasks["sst2"]
    assert (g.diff, g.ci_low, g.ci_high, g.mcnemar_p) == (0.0, 0.0, 0.0, 1.0)
    assert g.verdict == "no difference beyond ±1 points"
    assert compare(tmp_path / "A", tmp_path / "A2", margin=0.05).tasks["sst2"].verdict == (
        "no difference beyond ±5 points"
    )
    _write_eval_run(tmp_path / "C", "sst2", [1, 1, 0, 0] + [1] * 46)
    _write_eval_run(tmp_path / "D", "sst2", [0, 0, 1, 1] + [1] * 46)
    h = compare(tmp_path / "C", tmp_path / "D").tasks["sst2"]
    assert h.diff == 0 and h.ci_low < -0.01 and h.ci_high > 0.01 and h.verdict == "inconclusive"
    assert h.mcnemar_p == 1.0
    with pytest.raises(PortLLMError, match="fraction"):
        compare(tmp_path / "A", tmp_path / "B", margin=1)


def test_results_without_intervals_still_read(tmp_path):
    """results.json written before the Wilson interval and majority keys reads back with them None."""
    old = {"task": "sst2", "metric": "acc", "value": 0.5, "stderr": 0.1, "n": 2, "model": "m", "patch": None}
    r = TaskResult.from_dict(old | {"acc": 0.5})
    assert (r.ci_low, r.ci_high, r.majority) == (None, None, None) and r.extra == {"acc": 0.5}
