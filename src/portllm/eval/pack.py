"""Packing log-likelihood requests into rows and rows into batches.

The choices of one question share a context: packed into one tree-shaped row (a prefix, then one branch per
continuation path), the context runs through the model once. Batches hold the longest rows first, up to a
row count and a padded-token budget.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Tree:
    """The requests of one question packed into one row: a shared prefix, then one branch per
    distinct continuation path. Branches see the prefix and themselves, never each other."""

    tokens: list[int]  # prefix, then each branch without its last token
    positions: list[int]  # position ids: every branch restarts after the prefix
    branch: list[int]  # -1 for the prefix, else the branch index
    targets: dict[int, list[tuple[int, int]]]  # request -> (row offset of the predicting logit, token)
    key: Any = None  # the share key of its requests (reported to a routed model, see loglikelihoods)


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(x) for x in seqs)
    first = seqs[0]
    for k in range(n):
        if any(x[k] != first[k] for x in seqs[1:]):
            return k
    return n


def pack_tree(reqs: list[tuple[int, list[int], int]]) -> Tree:
    """reqs: (request index, full token sequence, length of its scored continuation)."""
    seqs = [seq for _, seq, _ in reqs]
    p = min(_common_prefix(seqs), *(len(seq) - m for _, seq, m in reqs))  # never share scored tokens
    tokens, branch = list(seqs[0][:p]), [-1] * p
    positions = list(range(p))
    targets: dict[int, list[tuple[int, int]]] = {}
    starts: dict[tuple[int, ...], int] = {}
    for i, seq, m in reqs:
        rest = tuple(seq[p:])
        if rest not in starts:  # identical paths share one branch
            starts[rest] = len(tokens)
            b = len(starts) - 1
            tokens += rest[:-1]
            positions += range(p, p + len(rest) - 1)
            branch += [b] * (len(rest) - 1)
        s = starts[rest]
        # token rest[t] is predicted by the prefix's last logit (t = 0) or by rest[t - 1]'s
        targets[i] = [((p - 1) if t == 0 else s + t - 1, rest[t]) for t in range(len(rest) - m, len(rest))]
    if len(starts) == 1:  # a single path is a plain causal row
        branch = [-1] * len(tokens)
    return Tree(tokens, positions, branch, targets)


def pack_rows(reqs: list[tuple[int, list[int], int]], tree_limit: int) -> list[Tree]:
    """One tree for the group, or one row per request when the group shares nothing or its tree
    would be longer than `tree_limit` tokens."""
    tree = pack_tree(reqs)
    shares = tree.branch[:1] == [-1]
    is_tree = any(b >= 0 for b in tree.branch)
    if shares and (not is_tree or len(tree.tokens) <= tree_limit):
        return [tree]
    return [pack_tree([r]) for r in reqs]


CPU_BATCH_TOKENS = 640
ACCELERATOR_BATCH_TOKENS = 1 << 16  # a device whose free memory torch cannot tell (mps): a fixed budget
GPU_MEMORY_SHARE = 0.5  # of the memory free after loading that one scoring batch may take (fragmentation, caches)
GPU_BUDGET_RANGE = (512, 1 << 18)
PROBE_TOKENS = 256
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {device: budget}


def token_budget(max_tokens: int | None, device: torch.device, model: Any = None) -> int:
    """Padded tokens per forward pass. On CPU, throughput peaks when a batch's activations stay
    in cache: long BoolQ rows run ~1.7x faster a few at a time than sixteen at a time, while short
    SST-2 rows still gain from sixteen (benchmarks/eval_batching.py). On a CUDA device the budget is
    measured on the model (`measured_budget`), not guessed."""
    if max_tokens:
        return max_tokens
    if device.type == "cpu":
        return CPU_BATCH_TOKENS
    if device.type == "cuda" and model is not None:
        return measured_budget(model, device)
    return ACCELERATOR_BATCH_TOKENS


def budget_for(free_bytes: float, per_token_bytes: float) -> int:
    """The tokens that fit in GPU_MEMORY_SHARE of the free memory at the measured cost per token, within
    GPU_BUDGET_RANGE."""
    lo, hi = GPU_BUDGET_RANGE
    return int(min(hi, max(lo, GPU_MEMORY_SHARE * free_bytes / max(1.0, per_token_bytes))))


def measured_budget(model: Any, device: torch.device) -> int:
    """Padded tokens per forward pass on a CUDA device: one forward pass of PROBE_TOKENS tokens measures the
    peak memory a token adds (activations and the logits of every position: an upper bound, as scoring keeps
    only the continuations' logits), and the budget is what fits in the memory free after the model is
    loaded (`budget_for`). Measured once per model and device."""
    seen = _MEASURED.setdefault(model, {})
    if str(device) not in seen:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        ids = torch.zeros((1, PROBE_TOKENS), dtype=torch.long, device=device)
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
        per_token = (torch.cuda.max_memory_allocated(device) - before) / PROBE_TOKENS
        free, _ = torch.cuda.mem_get_info(device)
        seen[str(device)] = budget_for(free, per_token)
    return seen[str(device)]


def batches(trees: list[Tree], rows: int, budget: int) -> Iterable[list[Tree]]:
    """Consecutive trees (longest first) while rows and padded width fit the budget."""
    b = 0
    while b < len(trees):
        width = len(trees[b].tokens)
        n = max(1, min(rows, budget // max(1, width)))
        yield trees[b : b + n]
        b += n
