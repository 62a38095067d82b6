"""Text to tokens as lm-evaluation-harness 0.4.x makes them: the tokenizer's own BOS (never doubled),
and a context/continuation pair split where lm-eval splits it.

Scoring, generation, training and the server all encode through here, so their tokens agree.
"""

from __future__ import annotations

from typing import Any


def bos_prefix(tok: Any) -> list[int]:
    """[BOS] when the tokenizer itself starts every text with it (Gemma's add_bos_token), else [].

    lm-evaluation-harness 0.4.x encodes with the tokenizer's own special-token settings, so a Gemma
    context starts with <bos> (Gemma scores far worse without it) and a SmolLM2 context with nothing.
    Asking the tokenizer, rather than a list of model families, keeps the two engines in step."""
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return []
    with_specials = tok.encode("a", add_special_tokens=True)
    return [bos] if with_specials[:1] == [bos] and tok.encode("a", add_special_tokens=False)[:1] != [bos] else []


def encode_text(tok: Any, text: str, bos: list[int] | None = None) -> list[int]:
    """Tokens of one text as lm-eval encodes it: the tokenizer's BOS first, unless the text already
    starts with the BOS string (a chat template that writes it), so it is never doubled."""
    bos = bos_prefix(tok) if bos is None else bos
    ids = tok.encode(text, add_special_tokens=False)
    return bos + ids if bos and not text.startswith(str(tok.bos_token)) else ids


def encode_pair(tok: Any, context: str, continuation: str, bos: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Tokens of context and continuation as lm-evaluation-harness splits them: trailing spaces of
    the context move to the continuation, and the continuation is whatever the whole adds. The
    context starts with BOS where the tokenizer adds one (`bos_prefix`; pass it to skip the probe)."""
    bos = bos_prefix(tok) if bos is None else bos
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = encode_text(tok, context + continuation, bos)
    ctx = encode_text(tok, context, bos)
    return ctx, whole[len(ctx) :]


def prefix_token(tok: Any) -> int:
    """What an empty context is conditioned on: BOS, else EOS (lm-eval's `prefix_token_id`)."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
