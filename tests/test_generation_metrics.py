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
