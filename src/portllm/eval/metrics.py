"""From model outputs to scores: GSM8K answer extraction, multiple-choice records, and what a slice's
records say (bootstrap stderr, Wilson 95% interval, majority-class baseline)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..stats import majority, wilson
from ..tasks import Example, Task

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "")
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def extract_strict(text: str) -> str | None:
    """GSM8K strict match: the number after '#### '."""
    m = _STRICT.search(text)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(text: str) -> str | None:
    """GSM8K flexible extract: the last number-like span in the text."""
    found = [a or b for a, b in _FLEX.findall(text)]
    found = [f for f in found if re.search(r"\d", f)]
    return normalize_number(found[-1]) if found else None


def bootstrap_stderr(values: list[float], iters: int = 1000, seed: int = 0) -> float:
    if len(values) < 2:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    v = torch.tensor(values, dtype=torch.float64)
    idx = torch.randint(0, len(v), (iters, len(v)), generator=g)
    return float(v[idx].mean(dim=1).std())


def _choice_len(cont: str) -> int:
    return max(1, len(cont[1:] if cont.startswith(" ") else cont))


@dataclass(frozen=True)
class Accuracy:
    """What a slice's per-example records say beyond the mean: its Wilson 95% interval (sensible at 0
    and n, where a bootstrap stderr reads "± 0.0") and the majority-class baseline, the accuracy of
    always answering the most frequent gold (None for generation, where there is no class to repeat)."""

    k: int
    n: int
    ci_low: float
    ci_high: float
    majority: float | None


def accuracy(records: list[dict[str, Any]], generative: bool = False) -> Accuracy:
    """Wilson interval and majority baseline of one task's records (samples_<task>.jsonl rows)."""
    k = sum(1 for r in records if r["correct"])
    lo, hi = wilson(k, len(records))
    maj = None if generative or not records else majority([r["gold"] for r in records])[1]
    return Accuracy(k, len(records), lo, hi, maj)


def mc_records(task: Task, examples: list[Example], lls: list[float]) -> list[dict[str, Any]]:
    """Per-example records from the answer options' log-likelihoods (in example, then option order)."""
    records: list[dict[str, Any]] = []
    k = 0
    for e in examples:
        s = lls[k : k + len(e.continuations)]
        k += len(e.continuations)
        acc_pred = max(range(len(s)), key=lambda i: s[i])
        normed = [v / _choice_len(c) for v, c in zip(s, e.continuations)]
        norm_pred = max(range(len(s)), key=lambda i: normed[i])
        pred = norm_pred if task.metric == "acc_norm" else acc_pred
        records.append(
            {
                "idx": e.idx,
                "pred": pred,
                "gold": e.gold,
                "correct": pred == e.gold,
                "scores": s,
                "acc_pred": acc_pred,
                "acc_norm_pred": norm_pred,
            }
        )
    return records


@dataclass(frozen=True)
class GenerationScores:
    """A generation slice's scores: the mean per-token log-likelihood of the reference completions (works for
    any instruction data, with no decoding, and compares across models: the default), the share of outputs
    equal to their reference, and chrF (0-100, sacrebleu's defaults: character 6-grams, beta 2)."""

    n: int
    loglik_per_token: float | None
    exact_match: float | None
    chrf: float | None


def mean_token_loglik(token_logprobs: list[float]) -> float:
    """One reference completion's mean log-likelihood per token (natural log); the mean over a slice is of
    these, so a long completion weighs as much as a short one."""
    if not token_logprobs:
        raise ValueError("a reference completion with no tokens has no log-likelihood")
    return sum(token_logprobs) / len(token_logprobs)


def exact_match(prediction: str, reference: str) -> bool:
    """The output equals the reference once surrounding whitespace is stripped (case and punctuation count)."""
    return prediction.strip() == reference.strip()


def sentence_chrf(prediction: str, reference: str) -> float:
    """chrF of one output against its reference, 0-100 (sacrebleu's sentence score: what per-example
    records and paired bootstraps resample)."""
    from sacrebleu.metrics import CHRF  # deferred: only generation scoring needs sacrebleu

    return float(CHRF().sentence_score(prediction, [reference]).score)


def corpus_chrf(predictions: list[str], references: list[str]) -> float:
    """chrF of a slice, 0-100: n-gram statistics summed over the slice before the F-score, as sacrebleu does."""
    from sacrebleu.metrics import CHRF  # deferred: only generation scoring needs sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} outputs for {len(references)} references")
    return float(CHRF().corpus_score(predictions, [references]).score)


def generation_scores(
    token_logprobs: list[list[float]] | None = None,
    predictions: list[str] | None = None,
    references: list[str] | None = None,
) -> GenerationScores:
    """Scores of one slice: the log-likelihood from the references' token log-probabilities, exact match and
    chrF from greedy outputs and their references (each None where its inputs are not given)."""
    ll = [mean_token_loglik(t) for t in token_logprobs] if token_logprobs is not None else None
    em = ch = None
    if predictions is not None:
        if references is None or len(references) != len(predictions):
            raise ValueError("exact match and chrF need one reference per output")
        em = sum(map(exact_match, predictions, references)) / len(predictions) if predictions else None
        ch = corpus_chrf(predictions, references) if predictions else None
    n = len(ll) if ll is not None else len(predictions or [])
    return GenerationScores(n, sum(ll) / len(ll) if ll else None, em, ch)
