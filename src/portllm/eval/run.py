"""Scoring tasks: one task's examples through log-likelihood or generation into records and totals,
and a task list into an EvalResult (with `out`, the run directory `compare` reads)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..progress import Bar
from ..tasks import Example, Task, load_examples
from .generation import generate
from .lm import LM, Progress
from .loglik import encode_requests, loglikelihoods
from .metrics import (
    accuracy,
    bootstrap_stderr,
    exact_match,
    extract_flexible,
    extract_strict,
    generation_scores,
    mc_records,
    sentence_chrf,
)
from .pack import token_budget
from .results import EvalResult, TaskRun


def run_task(
    lm: LM,
    task: Task,
    examples: list[Example],
    batch_size: int = 16,
    progress: Progress | None = None,
    max_tokens: int | None = None,
) -> TaskRun:
    """Score one task; records follow the eval split's file order."""
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    extra: dict[str, float] = {}
    if task.kind == "mc":
        pairs = [(c, x) for e in examples for c, x in zip(e.contexts, e.continuations)]
        share = [e.idx for e in examples for _ in e.continuations]
        lls, tokens = loglikelihoods(lm, pairs, batch_size, progress, share, max_tokens)
        records = mc_records(task, examples, lls)
        extra["acc"] = sum(r["acc_pred"] == r["gold"] for r in records) / max(1, len(records))
        extra["acc_norm"] = sum(r["acc_norm_pred"] == r["gold"] for r in records) / max(1, len(records))
    else:
        texts, tokens = generate(
            lm, [e.prompt for e in examples], task.stop, task.max_new_tokens, max(1, batch_size // 2), progress
        )
        strict_ok = []
        for e, text in zip(examples, texts):
            flex, strict = extract_flexible(text), extract_strict(text)
            strict_ok.append(float(strict == e.gold))
            records.append(
                {
                    "idx": e.idx,
                    "pred": flex,
                    "gold": e.gold,
                    "correct": flex == e.gold,
                    "strict": strict,
                    "output": text,
                }
            )
        extra["exact_match_strict"] = sum(strict_ok) / max(1, len(strict_ok))
        extra["exact_match_flexible"] = sum(r["correct"] for r in records) / max(1, len(records))
        if task.gen_metrics and records:
            extra |= generation_metrics(lm, task, examples, records, batch_size, max_tokens)
    correct = [float(r["correct"]) for r in records]
    value = sum(correct) / max(1, len(correct))
    acc = accuracy(records, generative=task.kind != "mc")
    return TaskRun(
        task.name,
        task.metric,
        value,
        bootstrap_stderr(correct),
        len(records),
        records,
        time.perf_counter() - t0,
        tokens,
        extra,
        acc.ci_low,
        acc.ci_high,
        acc.majority,
    )


def generation_metrics(
    lm: LM, task: Task, examples: list[Example], records: list[dict[str, Any]], batch_size: int, max_tokens: int | None
) -> dict[str, float]:
    """The task file's `generation.metrics`, each against the example's reference completion (its `target`):
    per record `loglik` (mean per-token log-likelihood of the reference after the prompt), `exact_match` and
    `chrf` (sentence chrF), which `compare` pairs; returned, the slice's means (chrF: sacrebleu's corpus score)."""
    refs = [e.target for e in examples]
    extra: dict[str, float] = {}
    if "loglik" in task.gen_metrics:
        pairs = [(e.prompt, e.target) for e in examples]
        sums, _ = loglikelihoods(lm, pairs, batch_size, None, None, max_tokens)
        for r, total, (_, n) in zip(records, sums, encode_requests(lm, pairs)):
            r["loglik"] = total / n
        extra["loglik_per_token"] = sum(r["loglik"] for r in records) / len(records)
    if "exact_match" in task.gen_metrics or "chrf" in task.gen_metrics:
        scores = generation_scores(predictions=[r["output"] for r in records], references=refs)
        for r, ref in zip(records, refs):
            if "exact_match" in task.gen_metrics:
                r["exact_match"] = exact_match(r["output"], ref)
            if "chrf" in task.gen_metrics:
                r["chrf"] = sentence_chrf(r["output"], ref)
        if "exact_match" in task.gen_metrics:
            extra["exact_match_reference"] = scores.exact_match
        if "chrf" in task.gen_metrics:
            extra["chrf"] = scores.chrf
    return extra


def empty_result(lm: LM, limit: int | None, batch_size: int, max_tokens: int | None) -> EvalResult:
    """An EvalResult naming the model and the batch settings, before any task is scored (eval and routed eval)."""
    device = lm.model.get_input_embeddings().weight.device
    return EvalResult(
        lm.spec, lm.patch, lm.patch_fingerprint, lm.dtype, limit, batch_size, token_budget(max_tokens, device, lm.model)
    )


def evaluate(
    lm: LM,
    tasks: list[Task],
    limit: int | None = None,
    data: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
    max_tokens: int | None = None,
) -> EvalResult:
    """Run tasks; with `out`, write OUT/samples_<task>.jsonl and OUT/results.json (the result's to_dict())."""
    loaded = {t.name: load_examples(t, "eval", data, limit) for t in tasks}  # fail fast on bad data
    result = empty_result(lm, limit, batch_size, max_tokens)
    total = sum(len(e) * (len(e[0].continuations) or 1) for e in loaded.values() if e)
    with Bar(show_progress, total, "eval") as bar:
        for t in tasks:
            bar.describe(t.name)
            run = run_task(lm, t, loaded[t.name], batch_size, bar.advance, max_tokens)
            result.tasks[t.name] = run.result(lm)
            if out is not None:
                Path(out).mkdir(parents=True, exist_ok=True)
                write_text_atomic(
                    Path(out) / f"samples_{t.name}.jsonl", "".join(json.dumps(r) + "\n" for r in run.records)
                )
    if out is not None:
        write_text_atomic(Path(out) / "results.json", json.dumps(result.to_dict(), indent=2))
    return result
