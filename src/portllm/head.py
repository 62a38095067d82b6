"""The LM head run only at the positions a loss reads.

A causal LM's head maps every position to the whole vocabulary, and the losses here read a few of them: a
patch learns its answer tokens, a repair compares answer options. On Gemma-3 (262k tokens) the head over a
padded training batch was most of a step's time and held ~1 GB of fp32 logits. transformers computes the
head only at the positions named by `logits_to_keep` (a 1-D index tensor, the same for every row); the loss
is then its own `ForCausalLMLoss` semantics (mean cross-entropy over the labelled tokens), on those positions.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F


def _model_class(model: Any) -> type:
    """The class of the transformers model, under PEFT's wrapper if any (whose forward takes **kwargs)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(inner)


@cache
def _takes_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def logits_at(model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits [rows, len(positions), vocab] at the sorted sequence `positions` (the rows' common index set);
    a model whose forward cannot narrow its head computes every position and is sliced."""
    positions = positions.to(ids.device)
    if _takes_keep(_model_class(model)):
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=positions, use_cache=False).logits
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, positions]


def predicting(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is labelled in some row (-100 = not learned)."""
    return (labels[:, 1:] != -100).any(0).nonzero().squeeze(-1)


def lm_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss for `labels` (mean cross-entropy of the labelled tokens given what precedes
    them), with the head run only where a labelled token is predicted."""
    pos = predicting(labels)
    logits = logits_at(model, ids, mask, pos)
    target = labels[:, pos + 1].to(logits.device)
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100)
