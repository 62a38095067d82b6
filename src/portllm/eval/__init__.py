"""Scoring causal LMs on the task suite, and comparing two models' answers.

A model is a base spec, a base with a patch attached at runtime (PEFT), or a ported model directory
(`lm`). Log-likelihood multiple choice is batched and length-sorted, left-padded with explicit position
ids, and asks the model only for the logits it needs (`loglik`, rows and batches from `pack`, tokens from
`encode`). Generation is batched greedy decoding with a KV cache and stop strings (`generation`).

Every score carries its Wilson 95% interval and the slice's majority-class baseline (`metrics`, stored as
`results`); two runs are compared paired, example by example (`comparison`): flips, B − A with a
paired-bootstrap interval, McNemar. `run` puts them together: `evaluate(open_lm(...), tasks)`.
"""

from .comparison import (
    DEFAULT_MARGIN,
    CompareResult,
    MetricDiff,
    RunRef,
    TaskFlips,
    aligned_correct,
    compare,
    flips,
    metric_diffs,
    paired_records,
)
from .encode import bos_prefix, encode_pair, encode_text, prefix_token
from .generation import cut_at_stop, generate, generate_ids
from .lm import LM, Progress, open_lm
from .loglik import loglikelihoods
from .metrics import (
    Accuracy,
    accuracy,
    bootstrap_stderr,
    extract_flexible,
    extract_strict,
    mc_records,
    normalize_number,
)
from .pack import CPU_BATCH_TOKENS, token_budget
from .results import EvalResult, TaskResult, TaskRun, read_run
from .run import empty_result, evaluate, run_task

__all__ = [
    "CPU_BATCH_TOKENS",
    "DEFAULT_MARGIN",
    "LM",
    "Accuracy",
    "CompareResult",
    "EvalResult",
    "MetricDiff",
    "Progress",
    "RunRef",
    "TaskFlips",
    "TaskResult",
    "TaskRun",
    "accuracy",
    "aligned_correct",
    "bootstrap_stderr",
    "bos_prefix",
    "compare",
    "cut_at_stop",
    "encode_pair",
    "encode_text",
    "empty_result",
    "evaluate",
    "extract_flexible",
    "extract_strict",
    "flips",
    "generate",
    "generate_ids",
    "loglikelihoods",
    "mc_records",
    "metric_diffs",
    "normalize_number",
    "open_lm",
    "paired_records",
    "prefix_token",
    "read_run",
    "run_task",
    "token_budget",
]
