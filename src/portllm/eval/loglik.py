"""Log-likelihood of continuations given contexts: batched and length-sorted, left-padded with explicit
position ids, shared contexts packed into tree rows (pack.py), and only the logits it needs asked of the
model (`logits_to_keep`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import PortLLMError
from .encode import bos_prefix, encode_pair, prefix_token
from .lm import LM, Progress
from .pack import batches, pack_rows, token_budget


def encode_requests(lm: LM, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Per (context, continuation): the tokens the model reads (cut from the left to its context) and how many
    of the last ones are the continuation's, the tokens whose log-probabilities `loglikelihoods` sums."""
    bos, prefix = bos_prefix(lm.tokenizer), prefix_token(lm.tokenizer)
    out = []
    for i, (c, x) in enumerate(pairs):
        ctx, cont = encode_pair(lm.tokenizer, c, x, bos)
        if not ctx and cont:  # an empty context: lm-eval's prefix token, or the continuation's own first token
            ctx, cont = ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
        if not cont:
            raise PortLLMError(f"empty continuation for request {i}: {x!r}")
        seq = (ctx + cont)[-(lm.max_length + 1) :]
        out.append((seq, min(len(cont), len(seq) - 1)))
    return out


@torch.inference_mode()
def loglikelihoods(
    lm: LM,
    pairs: list[tuple[str, str]],
    batch_size: int = 16,
    progress: Progress | None = None,
    share: list[Any] | None = None,
    max_tokens: int | None = None,
) -> tuple[list[float], int]:
    """Sum of log p(continuation | context) for each pair, and the number of tokens run through the model.

    Requests with the same `share` key (default: the same context) are packed into one row, so a
    shared context is computed once: BoolQ's or ARC's choices cost one pass over the passage, and
    WinoGrande's two sentences share the words before the blank. A batch holds at most
    `batch_size` rows and `max_tokens` padded tokens (see `token_budget`).
    """
    keys = share if share is not None else [c for c, _ in pairs]
    if len(keys) != len(pairs):
        raise PortLLMError(f"share has {len(keys)} keys for {len(pairs)} requests")
    by_key: dict[Any, list[tuple[int, list[int], int]]] = {}
    for i, (seq, n) in enumerate(encode_requests(lm, pairs)):
        by_key.setdefault(keys[i], []).append((i, seq, n))
    cfg = getattr(lm.model, "config", None)
    # a tree needs a custom 4D mask: eager/SDPA attention only, and no sliding window it could outgrow
    limit = (
        0
        if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager")
        else getattr(cfg, "sliding_window", None) or 1 << 62
    )
    trees = [t for reqs in by_key.values() for t in pack_rows(reqs, limit)]
    for t in trees:
        t.key = keys[next(iter(t.targets))]
    trees.sort(key=lambda t: -len(t.tokens))
    out = [0.0] * len(pairs)
    n_tokens = 0
    param = lm.model.get_input_embeddings().weight  # the base's dtype (PEFT keeps adapters in fp32)
    pad = lm.tokenizer.pad_token_id
    for batch in batches(trees, batch_size, token_budget(max_tokens, param.device, lm.model)):
        width = len(batch[0].tokens)
        keep = max(len(t.tokens) - min(o for tg in t.targets.values() for o, _ in tg) for t in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        br = torch.full((len(batch), width), -2, dtype=torch.long)
        for j, t in enumerate(batch):
            ids[j, width - len(t.tokens) :] = torch.tensor(t.tokens)
            pos[j, width - len(t.tokens) :] = torch.tensor(t.positions)
            br[j, width - len(t.tokens) :] = torch.tensor(t.branch)
        if (br >= 0).any():
            # tree attention: causal, within the prefix or the query's own branch; padding sees itself only
            q, k = br[:, :, None], br[:, None, :]
            allowed = torch.ones(width, width, dtype=torch.bool).tril() & (((k == -1) & (q != -2)) | (k == q))
            mask = torch.zeros(allowed.shape, dtype=param.dtype).masked_fill_(~allowed, torch.finfo(param.dtype).min)[
                :, None
            ]
        else:
            mask = (br != -2).long()
        route = getattr(lm.model, "route_rows", None)  # a routing.PatchSet: each row routes from its own request
        if route is not None:
            route([t.key for t in batch])
        logits = lm.model(
            input_ids=ids.to(param.device),
            attention_mask=mask.to(param.device),
            position_ids=pos.to(param.device),
            logits_to_keep=keep,
            use_cache=False,
        ).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        done = 0
        for j, t in enumerate(batch):
            shift = keep - len(t.tokens)  # row offset o is logit index o + shift
            for i, tg in t.targets.items():
                rows = torch.tensor([o + shift for o, _ in tg])
                out[i] = float(logp[j, rows, torch.tensor([tok for _, tok in tg])].sum())
                done += 1
            n_tokens += len(t.tokens)
        if progress:
            progress(done)
    return out, n_tokens
