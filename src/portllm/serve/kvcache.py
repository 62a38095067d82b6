"""The running batch's KV cache: rows leave it, newcomers join it. The one module that touches transformers' cache.

Continuous batching edits the cache a forward pass returns, which transformers does not offer as an API.
Everything this relies on is here, so a transformers upgrade is checked in one place (tested on 5.x):

- `model.forward`'s cache keyword: `cache` (transformers 5; the old name warns) or `past_key_values`
  (4.x), read from the signature; the output carries the cache under the same attribute name.
- `transformers.cache_utils.DynamicCache` (what a forward pass with `use_cache=True` returns) and its
  `layers` list, one `CacheLayerMixin` per decoder layer.
- `transformers.cache_utils.DynamicLayer`, matched by exact type: a plain growing layer (not
  `DynamicSlidingWindowLayer` or another subclass), the only kind whose tensors are padded and joined here.
- `DynamicLayer.keys` / `.values`: tensors shaped (batch, kv_heads, seq, head_dim), read and ASSIGNED here
  (left-trimmed and left-padded along dim 2, concatenated along dim 0); `keys is None` means not filled.
- `CacheLayerMixin.batch_select_indices(indices)`: keeps the given batch rows of a layer (any layer type).

The attention mask travels with the cache: its columns are the cache's sequence positions, 0 for padding.
Left padding is zeros in the cache and 0 in the mask, so it never reaches attention.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def cache_keyword(model: Any) -> str:
    """The name `model.forward` takes (and returns) the cache under: `cache` in transformers 5, else the old one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def joinable(cache: Any) -> bool:
    """A cache whose layers are plain growing tensors (not sliding windows): rows can be padded and joined."""
    from transformers.cache_utils import DynamicLayer  # deferred: `export-vllm` imports portllm.serve, runs no model

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(x) is DynamicLayer and x.keys is not None for x in layers)


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BatchCache:
    """A batch's cache (as a forward pass returned it) and its attention mask (rows × positions)."""

    def __init__(self, cache: Any, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask

    @property
    def joinable(self) -> bool:
        """Whether newcomers can join it (see `joinable`): while not, the batch runs out before others are admitted."""
        return joinable(self.cache)

    def keep(self, rows: list[int]) -> None:
        """Keep these rows; drop the columns that are padding for every row left."""
        idx = torch.tensor(rows, device=self.mask.device)
        for layer in self.cache.layers:
            layer.batch_select_indices(idx)
        mask = self.mask[idx]
        if joinable(self.cache):
            used = mask.sum(0).nonzero()
            first = int(used[0]) if len(used) else 0
            if first > 0:
                for layer in self.cache.layers:
                    layer.keys = layer.keys[:, :, first:]
                    layer.values = layer.values[:, :, first:]
                mask = mask[:, first:]
        self.mask = mask

    def join(self, other: BatchCache) -> None:
        """Another batch's rows appended to this one's: each left-padded (zeros, masked out) to the longer."""
        a, b = self.mask.shape[1], other.mask.shape[1]
        width = max(a, b)
        for la, lb in zip(self.cache.layers, other.cache.layers):
            la.keys = torch.cat([_left_pad(la.keys, width - a, 2), _left_pad(lb.keys, width - b, 2)], dim=0)
            la.values = torch.cat([_left_pad(la.values, width - a, 2), _left_pad(lb.values, width - b, 2)], dim=0)
        self.mask = torch.cat([_left_pad(self.mask, width - a, 1), _left_pad(other.mask, width - b, 1)], dim=0)

    def grow(self) -> torch.Tensor:
        """One more position for every row (the token being decoded); the mask to pass with it."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self.mask
