"""Log-probabilities of the tokens a request sampled and of its prompt's tokens, as the worker computes them.

They are the model's own distribution: the log-softmax of the logits, before temperature and top_p (vLLM's
default, and what `portllm eval` scores with), whatever the request samples with. Each entry carries the
token's id and log-probability and the `k` most likely tokens at that position (k <= MAX_LOGPROBS); a
prompt's first token has none (nothing precedes it). Turning them into OpenAI's shapes is `schema`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # the most alternatives per position a request may ask for (OpenAI's chat limit, vLLM's default)


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-probability, and the k most likely tokens (id, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _entries(logp: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Rows of log-probabilities (positions × vocab) and the token at each position."""
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    if k <= 0:
        return [TokenLogprob(t, lp) for t, lp in zip(tokens, chosen)]
    vals, idx = logp.topk(k, dim=-1)
    return [TokenLogprob(t, lp, tuple(zip(i, v))) for t, lp, i, v in zip(tokens, chosen, idx.tolist(), vals.tolist())]


def sampled_logprobs(logits: torch.Tensor, tokens: list[int], ks: list[int | None]) -> list[TokenLogprob | None]:
    """Each row's sampled token (rows × vocab logits) with its top-k; None for rows that asked for none."""
    out: list[TokenLogprob | None] = [None] * len(tokens)
    rows = [j for j, k in enumerate(ks) if k is not None]
    if not rows:
        return out
    logp = torch.log_softmax(logits[rows].float(), dim=-1)
    for n, j in enumerate(rows):
        out[j] = _entries(logp[n : n + 1], [tokens[j]], ks[j] or 0)[0]
    return out


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> list[TokenLogprob | None]:
    """The prompt's tokens given what precedes each (logits: the prompt's positions × vocab); None first."""
    if len(prompt) < 2:
        return [None] * len(prompt)
    logp = torch.log_softmax(logits[-len(prompt) : -1].float(), dim=-1)
    return [None, *_entries(logp, prompt[1:], k)]
