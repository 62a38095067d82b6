"""A user's own instruction or chat data for `portllm train --data`: reading, splitting and tokenizing it.

The two row formats TRL's `SFTTrainer` reads, one per JSON line, one format per file:

- `{"prompt": str, "completion": str}`: used as plain text, prompt then completion, EOS appended; the
  loss is on the completion (and EOS) only. As in TRL (`completion_only_loss=None` means completion-only
  for prompt-completion data), a *standard* prompt/completion row gets no chat template even when the
  tokenizer has one: write the rows as `messages` to have it applied.
- `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`: rendered with the
  tokenizer's chat template; the loss is on the assistant turns' tokens only (their content and whatever
  the template closes a turn with), found as the difference between the rendered conversation up to an
  assistant turn (with the generation prompt) and up to its end, so any template works, with or without
  `{% generation %}` markers. (TRL trains on the whole conversation unless `assistant_only_loss=True`.)

Truncation to `max_length` cuts the prompt (for messages: the earliest tokens) from the left, never the
completion: a row whose completion (for messages: the last assistant turn) does not fit is dropped and
counted, and the caller prints the count.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import PortLLMError
from .eval import encode_pair
from .head import logits_at, predicting

ROLES = ("system", "user", "assistant")
FORMATS = ("prompt-completion", "messages")
HELDOUT_SEED = 0  # the held-out split does not move with the training seed


@dataclass
class SFTData:
    """The rows of one data file, its format and its sha256 (what a manifest records: never the rows)."""

    path: Path
    rows: list[dict[str, Any]]
    format: str
    sha256: str

    def record(self) -> dict[str, Any]:
        return {"file": self.path.name, "sha256": self.sha256, "rows": len(self.rows), "format": self.format}


@dataclass
class Encoded:
    """Tokenized rows as (input ids, labels: -100 off the completion), and how many were dropped as too long."""

    examples: list[tuple[list[int], list[int]]]
    dropped: int = 0


def read_sft(path: str | Path) -> SFTData:
    """Read and vet a JSONL file of prompt/completion or messages rows; a bad row is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise PortLLMError(f"data file {path} not found")
    raw = path.read_bytes()
    rows: list[dict[str, Any]] = []
    fmt = None
    for n, line in enumerate(raw.decode("utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise PortLLMError(f"{where}: not a JSON object ({e.msg})") from None
        kind = _row_format(row, where)
        if fmt is None:
            fmt = kind
        elif kind != fmt:
            raise PortLLMError(f"{where}: a {kind} row in a file of {fmt} rows; use one format per file")
        rows.append(row)
    if fmt is None:
        raise PortLLMError(f"data file {path} has no rows; expected JSON lines of prompt/completion or messages")
    return SFTData(path, rows, fmt, hashlib.sha256(raw).hexdigest())


def _row_format(row: Any, where: str) -> str:
    if not isinstance(row, dict):
        raise PortLLMError(f"{where}: not a JSON object")
    if "messages" in row:
        if "prompt" in row or "completion" in row:
            raise PortLLMError(f"{where}: has both messages and prompt/completion; use one format")
        _check_messages(row["messages"], where)
        return "messages"
    for key in ("prompt", "completion"):
        if key not in row:
            raise PortLLMError(f'{where}: missing "{key}"; rows are {{"prompt", "completion"}} or {{"messages"}}')
        if not isinstance(row[key], str):
            raise PortLLMError(f'{where}: "{key}" must be a string (conversational prompts go in "messages")')
    if not row["completion"]:
        raise PortLLMError(f'{where}: "completion" is empty')
    return "prompt-completion"


def _check_messages(msgs: Any, where: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise PortLLMError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}}')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PortLLMError(f'{where}: message {i} must have "role" and "content"')
        if m["role"] not in ROLES:
            raise PortLLMError(f"{where}: message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise PortLLMError(f"{where}: message {i}'s content must be a string")
    if not any(m["role"] == "assistant" for m in msgs):
        raise PortLLMError(f"{where}: no assistant message, so nothing to learn")


def split_heldout(
    data: SFTData, eval_data: SFTData | None, fraction: float | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows): `eval_data`'s rows, else a seeded `fraction` of `data` (at least one row)."""
    if eval_data is not None:
        if fraction is not None:
            raise PortLLMError("pass --eval-data or --eval-fraction, not both")
        if eval_data.format != data.format:
            raise PortLLMError(f"--eval-data is {eval_data.format} rows but --data is {data.format}; use one format")
        return list(data.rows), list(eval_data.rows)
    if fraction is None or fraction == 0:
        return list(data.rows), []
    if not 0 < fraction < 1:
        raise PortLLMError(f"--eval-fraction {fraction:g} must be in [0, 1)")
    n = len(data.rows)
    k = max(1, round(fraction * n))
    if k >= n:
        raise PortLLMError(f"{data.path} has {n} rows: too few to hold out {k} and train on the rest")
    held = set(random.Random(HELDOUT_SEED).sample(range(n), k))
    return [r for i, r in enumerate(data.rows) if i not in held], [r for i, r in enumerate(data.rows) if i in held]


def encode_rows(tok: Any, rows: list[dict[str, Any]], max_length: int) -> Encoded:
    """(ids, labels) per row, prompt cut from the left; rows whose completion alone exceeds `max_length` dropped."""
    out = Encoded([])
    for row in rows:
        ids, labels, keep = encode_messages(tok, row["messages"]) if "messages" in row else encode_completion(tok, row)
        if keep > max_length:
            out.dropped += 1
            continue
        cut = max(0, len(ids) - max_length)  # the prompt cut from the left, never the completion
        out.examples.append((ids[cut:], labels[cut:]))
    return out


def encode_completion(tok: Any, row: dict[str, Any]) -> tuple[list[int], list[int], int]:
    """Prompt + completion + EOS as plain text: (ids, labels -100 on the prompt, tokens that must be kept)."""
    p, c = encode_pair(tok, row["prompt"], row["completion"])  # as the shipped tasks' training splits them
    if tok.eos_token_id is not None:
        c = c + [tok.eos_token_id]
    return p + c, [-100] * len(p) + c, len(c)


def encode_messages(tok: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int], int]:
    """The chat template's tokens (as `apply_chat_template(tokenize=True)` gives them) with labels on the
    assistant turns only, and how many tokens from the last assistant turn's start on must be kept."""
    if not getattr(tok, "chat_template", None):
        raise PortLLMError(
            "the base's tokenizer has no chat template; messages rows need one (or write prompt/completion rows)"
        )
    if not tok.is_fast:
        raise PortLLMError("messages rows need a fast tokenizer (character offsets locate the assistant turns)")
    text = _render(tok, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = _render(tok, messages[:i], True), _render(tok, messages[: i + 1], False)
        start, end = len(before), len(upto)
        if not text.startswith(before) or not text.startswith(upto) or start > end:
            raise PortLLMError("the chat template does not render a conversation as the prefix of a longer one")
        spans.append((start, end))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [-100] * len(ids)
    first_of_last = len(ids)
    for j, (a, _b) in enumerate(enc["offset_mapping"]):
        for s, e in spans:
            if s <= a < e:
                labels[j] = ids[j]
                if (s, e) == spans[-1]:
                    first_of_last = min(first_of_last, j)
    return ids, labels, len(ids) - first_of_last


def _render(tok: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def completion_loglik(model: Any, examples: list[tuple[list[int], list[int]]], pad_id: int, batch: int = 8) -> float:
    """Mean over rows of the mean per-token log-likelihood of each row's labelled (reference completion) tokens."""
    per_row = completion_logliks(model, examples, pad_id, batch)
    return sum(per_row) / len(per_row) if per_row else float("nan")


@torch.no_grad()
def completion_logliks(
    model: Any, examples: list[tuple[list[int], list[int]]], pad_id: int, batch: int = 8
) -> list[float]:
    """Per row, the mean per-token log-likelihood (nats) of its labelled tokens: what a paired comparison of two
    models on the same rows resamples."""
    from .train import collate  # deferred: train imports this module

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_row: list[float] = []
    for k in range(0, len(examples), batch):
        ids, labels, mask = collate(examples[k : k + batch], pad_id, str(device))
        pos = predicting(labels)
        logp = torch.log_softmax(logits_at(model, ids, mask, pos).float(), -1)
        target = labels[:, pos + 1]
        keep = target != -100
        tok_lp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
        per_row += (tok_lp.sum(1) / keep.sum(1).clamp(min=1)).tolist()
    model.train(was_training)
    return per_row
