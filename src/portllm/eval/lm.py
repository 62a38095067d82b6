"""A model ready to score, and opening one: a base spec, a base with a patch attached at runtime (PEFT),
or a ported model directory.

Opening is the one place that chooses how a model runs (device, dtype, threads: see device.place) and where a patch
must pass the compatibility gate (`check(...).require("attach", ...)`) before PEFT sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import models  # looked up at call time: tests replace models.load_base to prove the check reads first
from ..check import check
from ..device import Placement, place, resolve_dtype, weight_bytes
from ..errors import PortLLMError
from ..patch import Patch
from ..sign import require_trusted

Progress = Callable[[int], None]  # told how many requests (or prompts) just finished


@dataclass
class LM:
    """A model ready to score: what it is (spec, patch) and the objects that run it."""

    model: Any
    tokenizer: Any
    spec: str
    patch: str | None = None
    patch_fingerprint: str | None = None
    dtype: str = "float32"
    max_length: int = 2048
    device: str = "cpu"


def open_lm(
    spec: str | Path,
    patch: str | Path | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    require_signature: bool = False,
    trusted: list | None = None,
    device: str = "cpu",
) -> LM:
    """Load a base (or ported model) and optionally attach a patch at runtime with PEFT.

    With `require_signature` (or `trusted` public keys), the patch is verified before any tensor is read.
    A patch is checked against the base first (`check`: headers and configs), as `port` does: PEFT
    would attach one made for another base silently or fail with a traceback. A plain PEFT adapter
    (no manifest) gets the same structural check.
    """
    if threads:
        torch.set_num_threads(threads)
    fp = None
    if patch is not None:
        require_trusted(patch, require_signature, trusted)
        loaded = Patch.load(patch, require_manifest=False)
        base = models.BaseRef.of(spec)  # resolved once: the check and the load share it
        check(loaded, base).require("attach", f"patch {patch} does not fit {spec}")
        fp = loaded.weights_sha256
    ref = base if patch is not None else models.BaseRef.of(spec)
    where = placement(ref, device, dtype)
    model, tok = models.load_base(ref, dtype=where.dtype, device=where.device, spread=where.spread)
    if tok is None:
        raise PortLLMError(f"{spec} has no tokenizer; evaluation needs one")
    if patch is not None:
        from peft import PeftModel  # deferred: PEFT is only needed once a patch is attached

        model = PeftModel.from_pretrained(model, str(patch)).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = getattr(model, "config", None)
    max_len = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
    return LM(
        model,
        tok,
        str(spec),
        str(patch) if patch else None,
        fp,
        where.dtype,
        min(max_len, 4096),
        "spread" if where.spread else where.device,
    )


def placement(ref: models.BaseRef, device: str, dtype: str) -> Placement:
    """Where `ref` runs: `device.place`, told the weights' size when more than one GPU could hold them."""
    several = torch.cuda.is_available() and torch.cuda.device_count() > 1
    size = None
    if several:
        size = weight_bytes([tuple(info.shape) for _, info in ref.index.values()], resolve_dtype(dtype, "cuda:0"))
    return place(device, dtype, size)
