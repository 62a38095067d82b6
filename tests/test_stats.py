"""Paired statistics against independent implementations (scipy)."""

import random

import pytest

from conftest import require_module
from portllm.stats import majority, mcnemar_exact, paired, paired_bootstrap, wilson

scipy_stats = require_module("scipy.stats")


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (7, 20), (450, 872), (1, 3)])
def test_wilson_matches_scipy(k, n):
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert hi - lo > 0  # never "± 0.0", even at 0 or n


@pytest.mark.parametrize("b,c", [(0, 0), (5, 0), (3, 9), (38, 20), (12, 12), (1, 40)])
def test_mcnemar_exact_matches_scipy_binomial(b, c):
    expected = 1.0 if b + c == 0 else scipy_stats.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_paired_bootstrap_matches_scipy():
    rng = random.Random(1)
    a = [int(rng.random() < 0.8) for _ in range(400)]
    b = [x if rng.random() < 0.9 else 1 - x for x in a]
    diff, lo, hi = paired_bootstrap(a, b, iters=20_000)
    ref = scipy_stats.bootstrap(
        (a, b),
        lambda x, y: sum(y) / len(y) - sum(x) / len(x),
        paired=True,
        vectorized=False,
        n_resamples=5_000,
        method="percentile",
        random_state=0,
    )
    assert diff == pytest.approx(sum(b) / 400 - sum(a) / 400)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.006)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.006)


def test_identical_predictions_give_a_zero_interval_and_no_difference():
    a = [1, 0, 1, 1, 0] * 40
    p = paired(a, a)
    assert (p.diff, p.ci_low, p.ci_high, p.negative_flips, p.positive_flips, p.mcnemar_p) == (0, 0, 0, 0, 0, 1.0)
    assert p.within(0.01) and p.verdict(0.01).startswith("no difference")


def test_no_difference_is_claimed_only_inside_the_margin():
    rng = random.Random(0)
    a = [int(rng.random() < 0.7) for _ in range(100)]
    b = [x if rng.random() < 0.85 else 1 - x for x in a]  # noisy: a wide interval
    p = paired(a, b)
    assert not p.within(0.01) and p.verdict(0.01) in ("inconclusive", "B better", "B worse")
    worse = paired([1] * 100, [1] * 60 + [0] * 40)
    assert worse.verdict() == "B worse" and worse.negative_flips == 40 and worse.mcnemar_p < 1e-6


def test_majority_baseline():
    assert majority([1, 1, 0, 1]) == (1, 0.75)
    assert majority([]) == (None, 0.0)
