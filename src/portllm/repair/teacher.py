"""What θ+Δθ (the patch on the base it was made on) says about the inputs: the targets a repair matches.

Computed once, before the student is loaded, so a repair holds one model at a time:
- multiple choice: θ+Δθ's distribution over each input's answer options (its per-choice log-likelihoods,
  normalised as the task's metric normalises them: by the option's length in characters for acc_norm);
- text: θ+Δθ's own continuation of each prompt (greedy), or for `self` its samples (seeded), and its
  top-k next-token distribution at every position of prompt + continuation.
"""

from __future__ import annotations

import gc
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..eval import bos_prefix, encode_pair, encode_text, loglikelihoods, open_lm, prefix_token
from .inputs import RepairInputs


@dataclass
class ChoiceTargets:
    """Per input: the token pairs of its options and θ+Δθ's probabilities over them."""

    pairs: list[list[tuple[list[int], list[int]]]]  # item -> option -> (context ids, continuation ids)
    norms: list[list[float]]  # item -> option -> divisor of its log-likelihood (1, or its length for acc_norm)
    probs: list[torch.Tensor]  # item -> θ+Δθ's probabilities over the options


@dataclass
class TextTargets:
    """Per sequence: its tokens, and θ+Δθ's top-k next-token log-probabilities at each position."""

    ids: list[list[int]]
    top_ids: list[torch.Tensor]  # [len-1, k]
    top_logp: list[torch.Tensor]  # [len-1, k], renormalised over the k
    sha256: str  # of the token ids (for `self`: what θ+Δθ wrote)


def option_norm(metric: str, continuation: str) -> float:
    """The divisor of an option's log-likelihood: its length in characters (leading space dropped) for acc_norm."""
    if metric != "acc_norm":
        return 1.0
    return float(max(1, len(continuation[1:] if continuation.startswith(" ") else continuation)))


def encode_options(tok: Any, inputs: RepairInputs, max_length: int) -> list[list[tuple[list[int], list[int]]]]:
    """Each option as (context, continuation) ids, split as the evaluation splits them; the context cut from
    the left so the whole fits `max_length` (the continuation is never cut)."""
    bos, prefix = bos_prefix(tok), prefix_token(tok)
    out = []
    for item in inputs.choices:
        opts = []
        for c, x in zip(item.contexts, item.continuations):
            ctx, cont = encode_pair(tok, c, x, bos)
            if not ctx:  # an empty context: condition on the prefix token, as the evaluation does
                ctx = [prefix]
            ctx = ctx[-max(1, max_length - len(cont)) :]
            opts.append((ctx, cont))
        out.append(opts)
    return out


def choice_targets(lm: Any, inputs: RepairInputs, max_length: int) -> ChoiceTargets:
    """θ+Δθ's option distributions, from the evaluation's own log-likelihood engine."""
    pairs = [(c, x) for it in inputs.choices for c, x in zip(it.contexts, it.continuations)]
    share = [i for i, it in enumerate(inputs.choices) for _ in it.continuations]
    lls, _ = loglikelihoods(lm, pairs, share=share)
    norms = [[option_norm(inputs.metric, x) for x in it.continuations] for it in inputs.choices]
    probs, k = [], 0
    for it, nm in zip(inputs.choices, norms):
        scores = torch.tensor([lls[k + j] / nm[j] for j in range(len(it.continuations))], dtype=torch.float64)
        probs.append(torch.softmax(scores, -1).float())
        k += len(it.continuations)
    return ChoiceTargets(encode_options(lm.tokenizer, inputs, max_length), norms, probs)


def render(tok: Any, prompt: str | list[dict[str, str]]) -> str:
    """A prompt as text: a chat (message list) through the tokenizer's template, with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    return tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def text_sequences(lm: Any, inputs: RepairInputs, gen_tokens: int, max_length: int, seed: int) -> list[list[int]]:
    """Prompt + θ+Δθ's continuation as token ids: greedy for given prompts; for `self`, sampled (seeded) from
    the seed prompts in turn, or from the prefix token alone when there are none."""
    tok, model = lm.tokenizer, lm.model
    device = next(model.parameters()).device
    bos = bos_prefix(tok)
    if inputs.generated:
        starts = [encode_text(tok, render(tok, p), bos) for p in inputs.prompts] or [[prefix_token(tok)]]
        n = inputs.samples
        prompts = [starts[i % len(starts)] for i in range(n)]
    else:
        prompts = [encode_text(tok, render(tok, p), bos) for p in inputs.prompts]
    prompts = [p[-max(1, max_length - gen_tokens) :] for p in prompts]
    torch.manual_seed(seed)
    out = []
    for p in prompts:  # one at a time: no padding to get wrong, and the seed fixes every sample
        ids = torch.tensor([p], device=device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=gen_tokens,
            do_sample=inputs.generated,
            top_p=0.95 if inputs.generated else None,
            temperature=1.0 if inputs.generated else None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
        )
        out.append(gen[0].tolist()[:max_length])
    return out


@torch.no_grad()
def text_targets(lm: Any, seqs: list[list[int]], k: int) -> TextTargets:
    """θ+Δθ's top-k next-token log-probabilities along each sequence."""
    device = next(lm.model.parameters()).device
    top_ids, top_logp = [], []
    h = hashlib.sha256()
    for s in seqs:
        h.update(str(s).encode())
        logits = lm.model(torch.tensor([s], device=device)).logits[0, :-1].float()
        v, i = torch.log_softmax(logits, -1).topk(min(k, logits.shape[-1]), -1)
        top_ids.append(i.cpu())
        top_logp.append(torch.log_softmax(v, -1).cpu())
    return TextTargets(seqs, top_ids, top_logp, h.hexdigest())


def teacher_targets(
    old: str | Path,
    patch: str | Path,
    inputs: RepairInputs,
    max_length: int,
    gen_tokens: int,
    top_k: int,
    seed: int,
    dtype: str,
    device: str,
) -> ChoiceTargets | TextTargets:
    """θ+Δθ's targets on the inputs; the model is freed before returning."""
    lm = open_lm(old, patch, dtype=dtype, device=device)
    try:
        if inputs.kind == "choices":
            return choice_targets(lm, inputs, max_length)
        seqs = text_sequences(lm, inputs, gen_tokens, max_length, seed)
        return text_targets(lm, seqs, top_k)
    finally:
        del lm
        gc.collect()
