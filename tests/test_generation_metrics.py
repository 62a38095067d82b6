"""Generation metrics against independent computations: reference log-likelihood per token, exact match, chrF."""

import math
from collections import Counter

import pytest
import torch

import tiny
from portllm.eval.metrics import corpus_chrf, exact_match, generation_scores, mean_token_loglik, sentence_chrf
from portllm.sft import completion_loglik


def ngram_stats(hyp, ref, n):
    """Popović's chrF statistics for one order: character n-grams with whitespace removed."""
    h, r = hyp.replace(" ", ""), ref.replace(" ", "")
    hc = Counter(h[i : i + n] for i in range(len(h) - n + 1))
    rc = Counter(r[i : i + n] for i in range(len(r) - n + 1))
    return sum(hc.values()), sum(rc.values()), sum((hc & rc).values())


def chrf_by_hand(pairs, order=6, beta=2.0):
    """F-beta of the character n-gram precision and recall averaged over orders 1-6 (statistics summed over pairs)."""
    precs, recs = [], []
    for n in range(1, order + 1):
        nh = nr = nm = 0
        for hyp, ref in pairs:
            a, b, c = ngram_stats(hyp, ref, n)
            nh, nr, nm = nh + a, nr + b, nm + c
        if nh and nr:
            precs.append(nm / nh)
            recs.append(nm / nr)
    p, r = sum(precs) / len(precs), sum(recs) / len(recs)
    return 100 * (1 + beta**2) * p * r / (beta**2 * p + r) if p + r else 0.0


PAIRS = [
    ("the cat sat on the mat", "the cat sat on a mat"),
    ("It is blue.", "It's blue, mostly."),
    ("Paris", "The capital is Paris"),
]


def test_chrf_matches_an_independent_computation():
    for hyp, ref in PAIRS:
        assert sentence_chrf(hyp, ref) == pytest.approx(chrf_by_hand([(hyp, ref)]), abs=1e-9)
    hyps, refs = zip(*PAIRS)
    assert corpus_chrf(list(hyps), list(refs)) == pytest.approx(chrf_by_hand(PAIRS), abs=1e-9)
    assert sentence_chrf("same words", "same words") == pytest.approx(100.0)


def test_exact_match_strips_only_surrounding_whitespace():
    assert exact_match(" Paris\n", "Paris")
    assert not exact_match("paris", "Paris") and not exact_match("Paris.", "Paris")
    s = generation_scores(predictions=[" Paris", "Rome", "blue"], references=["Paris", "Lyon", "blue"])
    assert s.exact_match == pytest.approx(2 / 3) and s.n == 3
    assert s.chrf == pytest.approx(chrf_by_hand([(" Paris", "Paris"), ("Rome", "Lyon"), ("blue", "blue")]))


def test_loglik_per_token_is_a_mean_of_per_completion_means():
    s = generation_scores(token_logprobs=[[-1.0, -3.0], [-0.5]])
    assert s.loglik_per_token == pytest.approx((-2.0 + -0.5) / 2) and s.exact_match is None
    assert mean_token_loglik([-1.0, -2.0, -6.0]) == pytest.approx(-3.0)
    with pytest.raises(ValueError):
        mean_token_loglik([])


def test_completion_loglik_matches_a_token_by_token_computation(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny.make_base(tmp_path / "b", initializer_range=0.3)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    # ragged rows (padding inside a batch), labels on the completions only
    rows = [([1, 5, 6, 7, 8, 9], [-100, -100, -100, 7, 8, 9]), ([1, 10, 11], [-100, -100, 11])]
    rows.append(([1, 12, 13, 14, 15, 16, 17, 18], [-100] * 5 + [16, 17, 18]))
    got = completion_loglik(model, rows, pad_id=3, batch=2)
    means = []
    with torch.no_grad():
        for ids, labels in rows:  # one row at a time, no padding: the log-probability of each labelled token
            lps = []
            for t in range(1, len(ids)):
                if labels[t] == -100:
                    continue
                logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1]
                lps.append(float(torch.log_softmax(logits.double(), -1)[ids[t]]))
            means.append(sum(lps) / len(lps))
    assert got == pytest.approx(sum(means) / len(means), abs=1e-4)
    assert math.isfinite(got) and got < 0


# ---------------------------------------------------------------- a generation task file's metrics in eval and compare

GEN_TASK = {
    "name": "toy_answers",
    "kind": "gen",
    "metric": "exact_match",
    "train": {"file": "rows.jsonl"},
    "eval": {"file": "rows.jsonl"},
    "fields": ["q", "a"],
    "gold": {"field": "a"},
    "prompt": "Question: {{ q }}\nAnswer:",
    "target": "{{ a }}",  # after target_delimiter, a space
    "generation": {"stop": ["\n"], "max_new_tokens": 6, "metrics": ["loglik", "exact_match", "chrf"]},
}
QUESTIONS = ["Is the movie good?", "Was it great?", "Sarah won?", "Janet has 16 eggs?", "Positive or negative?"]


def write_task(folder, answers, **changes):
    import json

    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.jsonl").write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in zip(QUESTIONS, answers)))
    f = folder / "toy_answers.yaml"
    f.write_text(yaml.safe_dump(GEN_TASK | changes, sort_keys=False))
    return f


def test_a_generation_task_file_records_its_metrics_per_example(tmp_path):
    """Each record's loglik (the reference after the prompt, per token), exact_match and chrF against the
    reference completion, equal to a token-by-token computation, a plain string comparison and chrF by hand;
    the references are set to the model's own greedy outputs for some rows, so exact match is not all False."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from portllm.eval import evaluate, open_lm
    from portllm.tasks import get_task

    base = tiny.make_base(tmp_path / "base", bpe=True, vocab_size=320, initializer_range=0.3)
    lm = open_lm(base)
    first = evaluate(lm, [get_task(str(write_task(tmp_path / "t1", ["yes"] * 5)))], out=tmp_path / "run1")
    assert first.tasks["toy_answers"].n == 5
    outputs = [json.loads(x)["output"] for x in (tmp_path / "run1" / "samples_toy_answers.jsonl").open()]
    answers = [o.strip() if i % 2 == 0 and o.strip() else f"no {i}" for i, o in enumerate(outputs)]
    res = evaluate(lm, [get_task(str(write_task(tmp_path / "t2", answers)))], out=tmp_path / "run2")
    recs = [json.loads(x) for x in (tmp_path / "run2" / "samples_toy_answers.jsonl").open()]
    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base).eval()
    lls = []
    for q, a, r in zip(QUESTIONS, answers, recs):
        prompt = f"Question: {q}\nAnswer:"
        c, whole = tok.encode(prompt), tok.encode(prompt + " " + a)
        assert whole[: len(c)] == c
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
        lls.append(sum(float(logp[j - 1, whole[j]]) for j in range(len(c), len(whole))) / (len(whole) - len(c)))
        assert r["loglik"] == pytest.approx(lls[-1], abs=1e-4)
        assert r["exact_match"] == (r["output"].strip() == a)
        assert r["chrf"] == pytest.approx(chrf_by_hand([(r["output"], " " + a)]), abs=1e-9)
    matched = [r["exact_match"] for r in recs]
    assert any(matched) and not all(matched)
    extra = res.tasks["toy_answers"].extra
    assert extra["loglik_per_token"] == pytest.approx(sum(lls) / 5, abs=1e-4)
    assert extra["exact_match_reference"] == pytest.approx(sum(matched) / 5)
    from sacrebleu.metrics import CHRF  # the slice's chrF is the corpus score, as sacrebleu itself computes it

    refs = [" " + a for a in answers]
    assert extra["chrf"] == pytest.approx(CHRF().corpus_score([r["output"] for r in recs], [refs]).score, abs=1e-9)


def write_run(d, task, records):
    import json

    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"model": d.name, "patch": None, "tasks": {task: {"task": task}}}))
    (d / f"samples_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_compare_pairs_each_generation_metric_by_example(tmp_path):
    """B − A of every recorded metric, paired by idx (B's records in another order, one example only in A), with
    the paired-bootstrap interval of the per-example differences; the CLI prints them in their own table."""
    import random
    import subprocess
    import sys

    from portllm.eval import compare
    from portllm.stats import paired_bootstrap

    rng = random.Random(0)
    a = [{"idx": i, "pred": None, "gold": "x", "correct": False, "output": "o", "loglik": -2 - rng.random(),
          "exact_match": rng.random() < 0.3, "chrf": 100 * rng.random()} for i in range(30)]  # fmt: skip
    b = [r | {"loglik": r["loglik"] + 0.3 + 0.1 * rng.random(), "exact_match": rng.random() < 0.6,
              "chrf": r["chrf"] + 5 * rng.random()} for r in a[:29]]  # fmt: skip
    rng.shuffle(b)
    write_run(tmp_path / "a", "gen", a)
    write_run(tmp_path / "b", "gen", b)
    m = compare(tmp_path / "a", tmp_path / "b").tasks["gen"].metrics
    assert set(m) == {"loglik", "exact_match", "chrf"}
    by_idx = {r["idx"]: r for r in b}
    for name, d in m.items():
        xa = [float(r[name]) for r in a[:29]]
        xb = [float(by_idx[r["idx"]][name]) for r in a[:29]]
        diff, lo, hi = paired_bootstrap(xa, xb)
        assert d.n == 29 and d.a == pytest.approx(sum(xa) / 29) and d.b == pytest.approx(sum(xb) / 29)
        assert (d.diff, d.ci_low, d.ci_high) == pytest.approx((diff, lo, hi))
    assert m["loglik"].ci_low > 0.3  # every pair moved by 0.3 to 0.4
    env = dict(__import__("os").environ, COLUMNS="200")
    r = subprocess.run([sys.executable, "-m", "portllm.cli", "compare", tmp_path / "a", tmp_path / "b"],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if " loglik │" in line or " chrf │" in line]
    assert len(rows) == 2 and f"{m['loglik'].diff:+.4f}" in rows[0] + rows[1], r.stdout
    mc = [{"idx": i, "pred": 0, "gold": 0, "correct": True} for i in range(5)]  # no metrics recorded: none shown
    write_run(tmp_path / "c", "mc", mc)
    assert compare(tmp_path / "c", tmp_path / "c").tasks["mc"].metrics == {}
    assert "metrics" not in compare(tmp_path / "c", tmp_path / "c").to_dict()["tasks"]["mc"]


def test_an_unknown_generation_metric_is_one_line_naming_the_file_and_field(tmp_path):
    from portllm import PortLLMError
    from portllm.tasks import get_task

    f = write_task(tmp_path, ["yes"] * 5, generation={"metrics": ["loglik", "bleu"]})
    with pytest.raises(PortLLMError, match=r"toy_answers.yaml: generation.metrics: unknown metric 'bleu'"):
        get_task(str(f))
    f = write_task(tmp_path, ["yes"] * 5, kind="mc", metric="acc", choices=["a", "b"], generation={"metrics": ["chrf"]})
    with pytest.raises(PortLLMError, match=r"toy_answers.yaml: generation: only generation tasks"):
        get_task(str(f))
