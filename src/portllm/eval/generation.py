"""Generation: batched greedy decoding with a KV cache, cut at stop strings."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .encode import bos_prefix, encode_text
from .lm import LM, Progress


def generate(
    lm: LM,
    prompts: list[str],
    stop: Iterable[str] = (),
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> tuple[list[str], int]:
    """Greedy continuations of each prompt, cut at the first stop string."""
    bos = bos_prefix(lm.tokenizer)  # as lm-eval: the tokenizer's BOS first, then left truncation
    enc = [encode_text(lm.tokenizer, p, bos) for p in prompts]
    return generate_ids(lm, enc, stop, max_new_tokens, batch_size, progress)


@torch.inference_mode()
def generate_ids(
    lm: LM,
    prompts: list[list[int]],
    stop: Iterable[str] = (),
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> tuple[list[str], int]:
    """Greedy continuations of already tokenized prompts (cut from the left to leave room for the new tokens),
    in left-padded batches of similar length, cut at the first stop string; also the tokens processed."""
    tok = lm.tokenizer
    stop = [s for s in stop if s]
    enc = [p[-(lm.max_length - max_new_tokens) :] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    out = [""] * len(prompts)
    tokens = 0
    device = next(lm.model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(idx):
            ids[j, width - len(enc[i]) :] = torch.tensor(enc[i])
            mask[j, width - len(enc[i]) :] = 1
        gen = lm.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_strings=stop or None,
            tokenizer=tok,
            pad_token_id=pad,
        )
        new = gen[:, width:]
        for j, i in enumerate(idx):
            row = new[j].tolist()
            n = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            text = tok.decode(row[:n], skip_special_tokens=True)
            out[i] = cut_at_stop(text, stop)
            tokens += len(enc[i]) + n
        if progress:
            progress(len(idx))
    return out, tokens


def cut_at_stop(text: str, stop: Iterable[str]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text if cut < 0 else text[:cut]
